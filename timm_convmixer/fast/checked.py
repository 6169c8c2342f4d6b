"""``auto``'s rule on devices we may never have measured: a fused path is used for a case only after checking it there.

A *case* is (device, input shape, dtype, autocast, memory format, block mode, activation, kernel size). The first
time ``auto`` meets a case it runs the fused path and the plain modules on the real input, compares the results
(per-dtype tolerance, NaN where the other has NaN), times both, and keeps the fused path where it is faster by more
than the timing's noise (:func:`wins`), else the plain modules; and the plain modules when the results differ (with a
warning naming the case).

Under fp16/bf16 autocast the plain modules are no exact yardstick: they round after every op, the fused kernels
once, from fp32 sums (eager's bf16 BatchNorm backward on a CPU misses some bias gradients by more than 100%). There
both are compared with the plain modules run once more in fp32 (autocast off): each result tensor of the fused path
must be within ``max(tolerance, ERROR_FACTOR x the plain modules' own error on that tensor)`` of it, the rule
``benchmarks/gpu_check.py`` uses. An fp32 training step on a CPU is judged the same way against a float64 step, with
at least :data:`FLOAT64_REFERENCE_FLOOR` allowed: two correct fp32 implementations that sum in different orders
differ by more than fp32's tolerance on a near-cancelling sum (a conv bias's gradient ahead of BatchNorm) and where a
ReLU's input lies within rounding of zero. The decision is cached for the process and said once
(:class:`FastPathDecision` warning); :data:`decisions` holds them all, which benchmarks print.

No side effect happens twice: in training mode the trial runs on copies of the BatchNorm buffers' state (restored
afterwards) and under a forked random-number state, then the chosen path runs once for real, updating the running
statistics and drawing drop-path masks exactly as an unchecked call would.
"""
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .eligibility import BlockParts, StemParts

Parts = Union[BlockParts, StemParts]  # what a case is about: a block, or the stem

__all__ = [
    'Decision', 'ERROR_FACTOR', 'FASTER_BY', 'FLOAT64_REFERENCE_FLOOR', 'FastPathDecision', 'RACE', 'STEM',
    'blocks_declined', 'case_key', 'decide', 'decision_records', 'decisions', 'fastest', 'forget', 'settled',
    'tolerance', 'wins',
]


class FastPathDecision(UserWarning):
    """Says once per case which path ``auto`` chose and why (filter it with ``warnings`` to silence it)."""


class Decision(NamedTuple):
    path: str  # the fused path's name, or 'eager'
    reason: str
    fused_ms: Optional[float]
    eager_ms: Optional[float]
    max_rel_err: Optional[float]  # the fused result's error: against the plain modules, or the reference
    limit: Optional[float] = None  # what max_rel_err had to stay within (tolerance, or the reference rule's bound)


decisions: Dict[Tuple, Decision] = {}

TIMED_REPEATS = 2  # each path runs 1 + 2 times in all: the check, then two timed runs
STEM = 'cpu_stem'  # the stem's fused path (fast.stem_forward): its cases are checked as a block's are
RACE = 'race'  # the fused-path name under which the race between several accepted paths is recorded (see fastest)
RACE_ROUNDS = 3
ERROR_FACTOR = 2.  # with an fp32 reference: the fused error may be this many times the plain modules' own
# against a float64 step (fp32 training on a CPU), the least a fused result's error is allowed: where a pre-activation
# lies within fp32 rounding of zero, two correct fp32 implementations put it on either side of a ReLU, and each such
# element moves a gradient's norm by ~1/sqrt(its size); at 8 x 768 x 32 x 32 a handful of them put lean_cpu 1.05e-3
# from float64 where the plain modules were at most 5e-6 from it (another input: 9.9e-5 against 3.3e-5). The kernels
# themselves are held to float64 within 1e-5 by the tests; this check is there to catch a path that is wrong.
FLOAT64_REFERENCE_FLOOR = 2e-3
# A fused path is taken only where its check ran it this much faster than the plain modules: closer than that is the
# timing's noise on a shared machine, and a tie should keep what the user would otherwise run. Seen on an AVX2 VM: a
# training block's lean path checked 0.5% faster (761.5 against 765.5 ms), then ran 2-6% slower over 9 rounds.
FASTER_BY = 0.03


def wins(fused_ms: float, eager_ms: float) -> bool:
    """Whether a fused path that timed ``fused_ms`` in its check is taken over plain modules that timed
    ``eager_ms``: faster by more than :data:`FASTER_BY`."""
    return fused_ms * (1 + FASTER_BY) < eager_ms


def forget() -> None:
    """Drop every cached decision (the next call of each case is checked again)."""
    decisions.clear()


def tolerance(dtype: torch.dtype, device_type: str) -> float:
    """Relative (norm-wise) difference a correct fused path may show against the plain modules in ``dtype``.

    fp32 allows TF32: cuDNN's convolutions use it by default (``torch.backends.cudnn.allow_tf32``), so the plain
    modules themselves carry ~1e-3 relative error on a GPU.
    """
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32:
        return 2e-3 if device_type == 'cuda' and torch.backends.cudnn.allow_tf32 else 1e-5
    if dtype == torch.float16:
        return 1e-2
    return 4e-2  # bfloat16: 8 bits of mantissa through a depthwise and a pointwise convolution


def case_key(path: str, parts: Parts, x: torch.Tensor, compute_dtype: torch.dtype) -> Tuple:
    """The case a decision about ``path`` (the fused path's name) holds for."""
    return (path,) + _case(parts, x, compute_dtype)


def _case(parts: Parts, x: torch.Tensor, compute_dtype: torch.dtype) -> Tuple:
    """:func:`case_key` less the path: taken once for all the keys of a call (every block call asks for several)."""
    return (
        x.device.type, x.device.index, tuple(x.shape), x.dtype, compute_dtype,
        x.is_contiguous(memory_format=torch.channels_last), parts.mode, parts.act, parts.kernel_size,
    )


def decision_records() -> List[Dict[str, object]]:
    """:data:`decisions` as JSON-ready dicts (what benchmarks write): the case's fields by name plus the decision."""
    records = []
    for key, d in decisions.items():
        fused_path, device_type, index, shape, dtype, compute, channels_last, mode, act, k = key
        records.append({
            'key': str(key), 'fused_path': fused_path, **d._asdict(), 'device': device_type, 'device_index': index,
            'shape': list(shape), 'dtype': str(dtype).replace('torch.', ''),
            'compute_dtype': str(compute).replace('torch.', ''), 'channels_last': channels_last, 'block_mode': mode,
            'act': act, 'kernel_size': k,
        })
    return records


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds one call of ``fn`` takes, the device synchronized before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _time_both_ms(fused: Callable[[], object], eager: Callable[[], object],
                  device: torch.device) -> Tuple[float, float]:
    """Best of :data:`TIMED_REPEATS` runs of each, interleaved so drift in the machine's speed hits both alike.

    The correctness check has just run both once, so compilation, autotuning and the allocator are warm.
    """
    times: Tuple[List[float], List[float]] = ([], [])
    for _ in range(TIMED_REPEATS):
        for fn, bucket in ((fused, times[0]), (eager, times[1])):
            bucket.append(_call_ms(fn, device))
    return min(times[0]), min(times[1])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float('inf')
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return float('inf')
    a, b = a[~nan_a], b[~nan_b]
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.numel() else 0.


def _buffers_state(block: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The buffers a trial may change, to restore after it: those of modules in training mode (BatchNorm's running
    statistics). An eval-mode block changes none, and writing them back would fail on a model made under
    ``torch.inference_mode`` (its buffers are inference tensors) and bump their versions, which makes every kept
    fold of them stale."""
    return [(buf, buf.detach().clone()) for m in block.modules() if m.training for buf in m.buffers(recurse=False)]


def _restore(state: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buf, saved in state:
            buf.copy_(saved)


def _forked_rng(device: torch.device):
    return torch.random.fork_rng(devices=[device] if device.type == 'cuda' else [])


def _errors(got, want) -> List[float]:
    """Relative error of each tensor of ``got`` (a tensor or a tuple of them) against ``want``'s."""
    gots = got if isinstance(got, tuple) else (got,)
    wants = want if isinstance(want, tuple) else (want,)
    if len(gots) != len(wants):
        return [float('inf')]
    return [_rel_err(g, w) for g, w in zip(gots, wants)] or [0.]


def _precision(result) -> str:
    """The dtype a reference ran in, as messages name it: ``fp32`` or ``float64``."""
    first = result[0] if isinstance(result, tuple) else result
    return 'fp32' if first.dtype == torch.float32 else str(first.dtype).replace('torch.', '')


def _judge(candidate, plain, exact, tol: float) -> Tuple[float, float]:
    """``(error, limit)`` of the fused result: against the plain modules with ``tol``, or, given the reference result
    ``exact``, per tensor against it with ``max(tol, ERROR_FACTOR x plain's error)`` (the tensor nearest its limit)."""
    if exact is None:
        return max(_errors(candidate, plain)), tol
    pairs = [(err, max(tol, ERROR_FACTOR * own))
             for err, own in zip(_errors(candidate, exact), _errors(plain, exact))]
    return max(pairs, key=lambda p: p[0] / p[1])


def decide(
        key: Tuple,
        name: str,
        block: nn.Module,
        x: torch.Tensor,
        fused: Callable[[], Optional[object]],
        eager: Callable[[], object],
        dtype: torch.dtype,
        reference: Optional[Callable[[], object]] = None,
) -> Decision:
    """Check ``fused`` against ``eager`` for this case (both return a tensor or a tuple of tensors), time both, and
    cache which to use. Neither call's side effects survive: buffers and random state are restored.

    ``reference``: the plain modules in fp32 (autocast off), given when ``dtype`` is a 16-bit autocast dtype, or in
    float64 for an fp32 training check on a CPU; then the fused result is judged by its distance to it against the
    plain modules' own (see the module docstring).
    """
    cached = decisions.get(key)
    if cached is not None:
        return cached
    state = _buffers_state(block)

    def trial(fn):
        try:
            with _forked_rng(x.device):
                return fn()
        finally:
            _restore(state)

    try:
        plain = trial(eager)
        try:
            candidate = trial(fused)
        except Exception as e:  # a kernel that fails to compile or launch on this device must not take the model down
            candidate = e
        if isinstance(candidate, Exception):
            decision = Decision('eager', f'{name} failed: {type(candidate).__name__}: {candidate}', None, None, None)
            warnings.warn(f'timm_convmixer: the fused {name} path failed for {_describe(key)} '
                          f'({type(candidate).__name__}: {candidate}); using the plain modules for this case',
                          RuntimeWarning, stacklevel=3)
        elif candidate is None:
            decision = Decision('eager', f'{name} does not apply to this case', None, None, None)
        else:
            exact = None
            if reference is not None:
                try:
                    exact = trial(reference)
                except Exception:  # noqa: BLE001 -- e.g. a bf16 model has no fp32 run: judged against the plain modules
                    exact = None
            tol = tolerance(dtype, x.device.type)
            if exact is not None and _precision(exact) == 'float64':
                tol = max(tol, FLOAT64_REFERENCE_FLOOR)
            err, limit = _judge(candidate, plain, exact, tol)
            against = 'the plain modules' if exact is None else f'the plain modules in {_precision(exact)}'
            if not err <= limit:
                decision = Decision('eager', f'{name} differs from {against} (relative error {err:.3g} > '
                                    f'{limit:.3g})', None, None, err, limit)
                warnings.warn(f'timm_convmixer: the fused {name} path gave a different result from {against} '
                              f'for {_describe(key)} (relative error {err:.3g}, tolerance {limit:.3g}); using the '
                              f'plain modules for this case', RuntimeWarning, stacklevel=3)
            else:
                with _forked_rng(x.device):
                    fused_ms, eager_ms = _time_both_ms(fused, eager, x.device)
                _restore(state)
                won = wins(fused_ms, eager_ms)
                tie = f', within {FASTER_BY:.0%}: the plain modules kept' if not won and fused_ms < eager_ms else ''
                decision = Decision(
                    name if won else 'eager',
                    f'{name} {fused_ms:.3f} ms vs plain modules {eager_ms:.3f} ms{tie}, relative difference from '
                    f'{against} {err:.2g}', fused_ms, eager_ms, err, limit)
    finally:
        _restore(state)
    decisions[key] = decision
    if decision.path != 'eager' or decision.fused_ms is not None:
        warnings.warn(f'timm_convmixer: using {decision.path} for {_describe(key)} ({decision.reason})',
                      FastPathDecision, stacklevel=3)
    return decision


def fastest(
        trials: Dict[str, Tuple[Callable[..., Optional[object]], ...]],
        parts: Parts,
        block: nn.Module,
        x: torch.Tensor,
        dtype: torch.dtype,
) -> Optional[str]:
    """The fastest of several fused paths for one case, each checked with :func:`decide` on first use: ``trials``
    maps a path's name to its ``(fused, eager, reference)`` callables, or ``(fused, eager, reference, raced)`` where
    what the path costs in a model is not ``fused`` (``raced``: what the race times instead; ``fused`` is what is
    checked). ``None`` when the check accepted none.

    Where the check accepts several, they race: :data:`RACE_ROUNDS` interleaved rounds, one call of each per round,
    best time kept, recorded (and said once) as the case's :data:`RACE` decision. Why not compare what each path's own
    check measured: those are separate runs, each path against the plain modules, and on a shared machine two
    paths 10% apart swapped places between such runs (on this project's AVX-512 VM auto kept oneDNN's path over
    ours with oneDNN's pointwise conv, which a same-process A/B had at 53.8 against 48.2 ms a block).
    """
    case = _case(parts, x, dtype)
    answer = _settled(list(trials), case)
    if answer is not None:  # (every call after the first of a case)
        return answer
    made = {}
    for path, (fused, eager, reference, *_) in trials.items():
        key = (path,) + case
        made[path] = decisions.get(key) or decide(key, path, block, x, fused, eager, dtype, reference)
    accepted = [path for path, d in made.items() if d.path != 'eager']
    key = (RACE,) + case
    if len(accepted) > 1 and key not in decisions:
        decisions[key] = _race({path: trials[path][-1 if len(trials[path]) > 3 else 0] for path in accepted}, made,
                               block, x)
        warnings.warn(f'timm_convmixer: using {decisions[key].path} for {_describe(key)} ({decisions[key].reason})',
                      FastPathDecision, stacklevel=3)
    return _settled(list(trials), case)


def _race(fused: Dict[str, Callable[[], object]], made: Dict[str, Decision], block: nn.Module,
          x: torch.Tensor) -> Decision:
    """The accepted paths timed against each other (rotating order each round; buffers and random state restored)."""
    state = _buffers_state(block)
    times: Dict[str, List[float]] = {path: [] for path in fused}
    order = list(fused)
    try:
        with _forked_rng(x.device):
            for r in range(RACE_ROUNDS):
                for path in order[r % len(order):] + order[:r % len(order)]:
                    times[path].append(_call_ms(fused[path], x.device))
    finally:
        _restore(state)
    best = {path: min(t) for path, t in times.items()}
    winner = min(best, key=best.get)
    return made[winner]._replace(
        path=winner, fused_ms=best[winner],
        reason='fastest of ' + ', '.join(f'{path} {ms:.3f} ms' for path, ms in best.items()) +
               f' (best of {RACE_ROUNDS} interleaved rounds)')


def settled(paths: Sequence[str], parts: Parts, x: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """What :func:`fastest` answers for this case once it has been asked, without checking or timing anything:
    ``None`` while a path or the race between them is undecided, or when the check accepted none."""
    return _settled(paths, _case(parts, x, dtype))


def _settled(paths: Sequence[str], case: Tuple) -> Optional[str]:
    made = [decisions.get((path,) + case) for path in paths]
    if not made or None in made:
        return None
    accepted = [d.path for d in made if d.path != 'eager']
    if len(accepted) < 2:
        return accepted[0] if accepted else None
    race = decisions.get((RACE,) + case)
    return None if race is None else race.path


def blocks_declined(shape: Sequence[int], act: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether eval-mode blocks with activation ``act`` (any kernel size) have been checked on a CPU channels_last
    input of ``shape`` and ``dtype``, computing in ``dtype`` (fp32 with autocast off, or bf16 under bf16 autocast),
    and took none of the fused paths offered: what the stem's path asks about the blocks that read its output,
    without holding them (a case's key names no module, only its shape and kind)."""
    case = ('cpu', None, tuple(shape), dtype, dtype, True, 'eval', act)
    taken: Dict[int, bool] = {}  # kernel size -> whether any path was accepted (all offered paths decide together)
    for key, d in decisions.items():
        if key[0] not in (RACE, STEM) and key[1:9] == case:
            taken[key[9]] = taken.get(key[9], False) or d.path != 'eager'
    return any(not accepted for accepted in taken.values())


def _describe(key: Tuple) -> str:
    path, device_type, index, shape, dtype, compute_dtype, channels_last, mode, act, k = key
    device = device_type if index is None else f'{device_type}:{index}'
    fmt = 'channels_last' if channels_last else 'NCHW'
    what, size = ('the stem', 'patch') if path == STEM else (f'{mode} blocks', 'kernel')
    return (f'{what} on {device}, input {tuple(shape)} {str(dtype).replace("torch.", "")} {fmt}, compute '
            f'{str(compute_dtype).replace("torch.", "")}, {act}, {size} {k}')
