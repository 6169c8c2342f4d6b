"""Fast paths for a ConvMixer block, behind one seam: ``block_forward(block, x)``.

``MixerBlock.forward`` calls :func:`block_forward` first; it returns the block's output computed by a faster route,
or ``None`` when no fast route applies (then the plain modules run). A fast route must compute the same function
as the eager modules, so a block is offered to one only when :func:`.eligibility.block_parts` (the one eligibility
check) finds a plain ConvMixer block in eval or training mode, and no tracer, compiler or functorch transform is
watching (those must see the plain modules; ``torch.compile`` may get a node that dispatches at run time, below).
Each backend then adds only its own conditions (device, dtype, kernels).

Backends:

* ``'auto'`` (default): the fastest correct path, measured where it is not known. Eval-mode CPU tensors -> the paths
  of :mod:`.cpu` (oneDNN's convolutions, our compiled kernels, or ours and oneDNN's), eval-mode CUDA tensors -> the
  Triton kernels, and training-mode blocks (BatchNorm on batch statistics) on any device -> the memory-lean block of
  :mod:`.lean` (on a CPU also its compiled implementation, :mod:`.lean_cpu`, on a Triton device its Triton one,
  :mod:`.lean_triton`), each only for a case (device, shape, dtype, mode...) where :mod:`.checked` found it correct
  and faster than the plain modules on first use; where several paths pass, the winner of a race between them
  (:func:`.checked.fastest`). With ``TRITON_INTERPRET=1`` CPU tensors count as a Triton device (tests). A model's
  chain of blocks goes through :func:`blocks_forward`, which lets consecutive ``cpu_hybrid`` blocks hand each other
  their output unwritten.
* ``'eager'``: never a fast path.
* ``'lean'``, ``'lean_cpu'``, ``'lean_triton'``, ``'cpu'``, ``'cpu_compiled'``, ``'cpu_hybrid'``, ``'triton'``,
  ``'triton_gemm'``: only that path, unchecked, where it applies (the way to force one). ``'lean'`` runs the lean
  block's normalisations on torch's kernels, ``'lean_cpu'`` on our compiled CPU kernels, ``'lean_triton'`` its
  normalisations and depthwise conv on Triton kernels (the same memory kept); ``'cpu'`` both convolutions on
  oneDNN, ``'cpu_compiled'`` both halves in our C++ kernels (built on first use), ``'cpu_hybrid'`` our depthwise
  kernel and oneDNN's pointwise conv; ``'triton'`` runs the pointwise conv on cuBLAS with a Triton epilogue pass,
  ``'triton_gemm'`` as one Triton GEMM with the epilogue fused.

The patch stem has a fast path on CPU in each mode, counted as ``'cpu_stem'`` (eval, :mod:`.cpu_stem`: the
non-overlapping conv as our blocks' GEMM over the image's patches, its activation and BatchNorm in the epilogue,
output channels_last; training, :mod:`.lean_stem`: the same GEMM and :mod:`.lean_cpu`'s normalisation, keeping what
the lean blocks keep), offered through :func:`stem_forward` on the same terms as a block's: the CPU backends force
the eval one and ``'lean_cpu'`` the training one, ``auto`` checks each per case, ``'eager'`` and the others never
take them.

Choose with :func:`set_backend`, the :func:`use_backend` context manager or the ``TIMM_CONVMIXER_BACKEND``
environment variable (read at import). The choice is process-global.

Under ``torch.compile`` an eval-mode block on a Triton device that wants no gradients (``auto`` or a Triton backend)
is traced as one node that runs this same dispatch when the compiled graph runs (:mod:`.compiled`); every other traced
call, and everything ``torch.export`` traces, gets the plain modules.

:data:`counters` counts which path answered each block call (a backend's name, or ``'eager'``), and
:data:`stem_counters` each stem call (``'cpu_stem'`` or ``'eager'``), which is how tests and benchmarks check what
actually ran. Tracing counts nothing (a counter bumped while tracing would be guarded on, one recompilation per
call); a compiled node's calls are counted when they run.
"""
import contextlib
import copy
import os
import warnings
from collections import Counter
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from . import compiled
from .checked import decisions
from .kept import forget as forget_kept
from .eligibility import BlockParts, block_parts, has_hooks, stem_parts
from .lean import TorchNorm, lean_applies, lean_block_forward
from .runtime import autocast_state, conv_dtype, triton_device

__all__ = [
    'BACKENDS', 'block_forward', 'blocks_forward', 'check_backend', 'counters', 'decisions', 'forget_kept',
    'get_backend', 'reset_counters', 'set_backend', 'stem_counters', 'stem_forward', 'use_backend',
]

BACKENDS = ('auto', 'eager', 'lean', 'lean_cpu', 'lean_triton', 'cpu', 'cpu_compiled', 'cpu_hybrid', 'triton',
            'triton_gemm')
ENV_VAR = 'TIMM_CONVMIXER_BACKEND'

# which path answered each MixerBlock call since the last reset_counters()
counters: Counter = Counter()
# likewise for each Stem call: 'cpu_stem' or 'eager'
stem_counters: Counter = Counter()


def check_backend(name: str) -> str:
    """``name`` as one of :data:`BACKENDS` (any case), or a ``ValueError`` naming the choices: for anything that
    takes a backend name before it sets it (``set_backend``, ``bench --engines``'s ``backend=``)."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f'backend: expected one of {BACKENDS}, got {name!r}')
    return name.lower()


def _backend_from_env() -> str:
    value = os.environ.get(ENV_VAR, '').strip()
    if not value:
        return 'auto'
    try:
        return check_backend(value)
    except ValueError:
        # never break ``import timm`` (the autoload hook imports us) over a typo in the environment
        warnings.warn(f'{ENV_VAR}={value!r} is not one of {BACKENDS}; using "auto"')
        return 'auto'


_backend = _backend_from_env()


def set_backend(name: str) -> None:
    """Select the fast path for all ConvMixer blocks: one of :data:`BACKENDS` (see the module docstring)."""
    global _backend
    _backend = check_backend(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend (process-global, so not meant for concurrent threads choosing differently)."""
    global _backend
    previous = _backend
    _backend = check_backend(name)
    try:
        yield
    finally:
        _backend = previous


def reset_counters() -> None:
    counters.clear()
    stem_counters.clear()


def _is_compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):
        return compiler.is_compiling()
    dynamo = getattr(torch, '_dynamo', None)  # torch < 2.3
    return bool(dynamo is not None and dynamo.is_compiling())


def _watched() -> bool:
    """True under anything else that must see the plain modules (torch.compile/export tracing is handled before,
    uncounted, by :func:`block_forward`): TorchScript tracing, functorch transforms (vmap, grad), forward-mode AD,
    global module hooks."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return _transforms_active() or _forward_ad_active() or _global_hooks()


def _forward_ad_active() -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level()``: dual tensors' tangents go through the plain modules' ops
    only (the fused paths would drop them; the lean block has no forward-mode rule)."""
    return getattr(torch.autograd.forward_ad, '_current_level', -1) >= 0


def _transforms_active() -> bool:
    """functorch transforms (vmap, grad) are running: their batched tensors must meet the plain modules."""
    are_active = getattr(torch._C, '_are_functorch_transforms_active', None)
    return are_active is not None and are_active()


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return any(bool(getattr(m, name, None)) for name in (
        '_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
        '_global_backward_pre_hooks'))


def _eager(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(block, x)


def _eager_no_grad(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain modules as an eval-mode check compares against them."""
    with torch.no_grad():
        return _eager(block, x)


# the Triton eval paths: backend/counter name -> how triton_block_forward runs the pointwise conv and its epilogue
TRITON_PATHS = {'triton': 'cublas', 'triton_gemm': 'triton'}


def _triton_forward(
        block: nn.Module, parts: BlockParts, x: torch.Tensor, path: str = 'triton') -> Optional[torch.Tensor]:
    try:
        from .triton_ops import triton_block_forward
    except ImportError:  # the module, triton, or a GPU toolchain missing: the eager modules run
        return None
    return triton_block_forward(block, x, parts=parts, pointwise=TRITON_PATHS[path])


def _fp32_reference(x: torch.Tensor, run: Callable[[torch.Tensor], object]) -> Optional[Callable[[], object]]:
    """What a check compares both paths with under fp16/bf16 autocast (:func:`.checked.decide`): ``run`` on the
    input in fp32 with autocast off. ``None`` otherwise (the plain modules are then the yardstick themselves)."""
    _, enabled, dtype = autocast_state(x.device.type)
    if not enabled or dtype not in (torch.float16, torch.bfloat16) or x.dtype == torch.float64:
        return None

    def reference():
        with torch.autocast(x.device.type, enabled=False):
            return run(x.float())
    return _once(reference)


def _once(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` computed on the first call only: a reference every path of a case is compared with."""
    result = []

    def once():
        if not result:
            result.append(fn())
        return result[0]
    return once


def _fp64_reference(block: nn.Module, x: torch.Tensor, step) -> Optional[Callable[[], object]]:
    """What a training check on a CPU in fp32 compares every path with: the plain modules' step in float64, on a copy
    of the block (``step(forward, source, params)`` as :func:`_checked_train` builds them). ``None`` elsewhere.

    Why: fp32 results of two correct implementations that sum in different orders differ by far more than fp32's
    tolerance on a near-cancelling sum; the pointwise conv's bias gradient, ahead of an activation and BatchNorm, came
    out 1.9e-3 (relative, norm-wise) apart between ``lean_cpu`` and the plain modules at 8 x 768 x 32 x 32, while
    against float64 ``lean_cpu`` was the closer of the two. Judged against float64 (each result within
    ``max(tolerance, 2x the plain modules' own error)``, as under 16-bit autocast), a path is held to eager's own
    accuracy. The float64 step cost 2.5-6x an fp32 one there, once per case. CPU only: not measured on a GPU.
    """
    if x.device.type != 'cpu' or x.dtype != torch.float32 or conv_dtype(x) != torch.float32:
        return None

    def reference():
        twin = copy.deepcopy(block).double()
        return step(lambda u: _eager(twin, u), x.double(), [p for p in twin.parameters() if p.requires_grad])()
    return _once(reference)


def _checked_eval(block: nn.Module, parts: BlockParts, x: torch.Tensor) -> Tuple[str, Optional[torch.Tensor]]:
    """auto's eval path on a Triton device: ``(path, output)``, the fastest of the Triton paths the check on first
    use found right and faster than the plain modules (each is timed against them), or ``('triton', None)``."""
    from . import checked
    dtype = conv_dtype(x)

    def fused(path):
        def run():
            with torch.no_grad():
                return _triton_forward(block, parts, x, path)
        return run

    eager = lambda: _eager_no_grad(block, x)  # noqa: E731
    reference = _fp32_reference(x, lambda t: _eager_no_grad(block, t))
    path = checked.fastest({path: (fused(path), eager, reference) for path in TRITON_PATHS}, parts, block, x, dtype)
    if path is None:
        return 'triton', None
    return path, _triton_forward(block, parts, x, path)


def _checked_cpu(block: nn.Module, parts: BlockParts, x: torch.Tensor) -> Tuple[str, Optional[torch.Tensor]]:
    """auto's eval path on CPU: ``(path, output)``, the fastest CPU path (oneDNN's convolutions or our compiled
    kernels) that the check on first use found right and faster than the plain modules, or ``('cpu', None)``.

    Whether one wins depends on the CPU (measured: oneDNN's path 1.5x the built-in on an AVX-512 CPU, 0.87-1.06x on
    an AVX2-only Zen 3), so it is timed rather than assumed. The fused paths work in channels_last; their trials get
    the input already converted, since in a model only the first block pays that conversion and every later block
    would be denied the path if the first one's decision counted it. Likewise ``cpu_hybrid`` races the others as a
    block of a chain runs it (:func:`blocks_forward`): its output's BatchNorm not written but carried into the next
    block, a pass a lone block pays and a model's blocks do not (timed with it, the race took ``cpu_compiled`` under
    bf16 autocast on 512_16_ks8_p7 and 768_32, whose chains ran 1.02x-1.05x faster on ``cpu_hybrid``, Zen 4). Where
    ``cpu_hybrid``'s output would be fresh pages every call, it is not raced (:func:`.cpu.raced_paths`).
    """
    from . import checked, cpu
    paths = cpu.raced_paths(parts, x)
    if not paths:
        return 'cpu', None  # decided per call (grad mode, dtypes), so not cached as a case's decision
    converted = []

    def channels_last():
        if not converted:
            converted.append(x.contiguous(memory_format=torch.channels_last))
        return converted[0]

    def fused(path):
        return lambda: cpu.block_forward(parts, channels_last(), path)

    def chained():
        return cpu.hybrid_forward(parts, channels_last())

    eager = lambda: _eager_no_grad(block, x)  # noqa: E731
    reference = _fp32_reference(x, lambda t: _eager_no_grad(block, t))
    trials = {path: (fused(path), eager, reference) + ((chained,) if path == 'cpu_hybrid' else ()) for path in paths}
    path = checked.fastest(trials, parts, block, x, conv_dtype(x))
    cpu.chosen(parts, path)
    return ('cpu', None) if path is None else (path, cpu.block_forward(parts, x, path))


def _lean_norms(parts: BlockParts, x: torch.Tensor):
    """The lean block's implementations that apply here by path name: torch's kernels everywhere, our compiled
    ones on a CPU, the fused Triton ones on a Triton device."""
    norms = {'lean': TorchNorm}
    from . import lean_cpu
    if lean_cpu.applies(parts, x):
        norms['lean_cpu'] = lean_cpu.CpuNorm
    if triton_device(x):
        try:
            from . import lean_triton
        except ImportError:  # triton or a GPU toolchain missing: torch's kernels only
            return norms
        if lean_triton.applies(parts, x):
            norms['lean_triton'] = lean_triton.TritonNorm
    return norms


def _checked_train(block: nn.Module, parts: BlockParts, x: torch.Tensor) -> Tuple[str, Optional[torch.Tensor]]:
    """auto's training path: ``(path, output)``, the fastest lean implementation the check on first use found right
    and faster than the plain modules (each is timed against them), or ``('lean', None)``."""
    norms = _lean_norms(parts, x)
    if triton_device(x):  # as for eval blocks: on a Triton device (the interpreter's CPU tensors) no CPU path
        norms.pop('lean_cpu', None)
    path = _fastest_step(block, parts, x, {
        path: (lambda t, norm=norm: lean_block_forward(parts, t, norm)) for path, norm in norms.items()})
    if path is None:
        return 'lean', None
    return path, lean_block_forward(parts, x, norms[path])


def _fastest_step(module: nn.Module, parts, x: torch.Tensor,
                  forwards: Dict[str, Callable[[torch.Tensor], Optional[torch.Tensor]]]) -> Optional[str]:
    """Which of the training ``forwards`` (path name -> the module's forward by that path) auto takes for this case
    (:func:`.checked.fastest`): each checked on first use as a whole training step (output, then the gradients of
    the input where it wants one and of the parameters) against the plain modules', under 16-bit autocast against
    their fp32 step and in fp32 on a CPU against their float64 one; ``None`` where it accepted none."""
    from . import checked
    dtype = conv_dtype(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads: Dict[Tuple, torch.Tensor] = {}

    def gradient(out: torch.Tensor) -> torch.Tensor:
        """The output gradient every trial of this check gets: the same values (drawn once, in fp32 whatever the
        output's dtype, so the fp32 and float64 references get the same), in the output's dtype and memory format,
        as the next layer would hand it back. Drawn NCHW for a channels_last output, it cost the plain modules a
        mixed-layout backward the model never runs (a plain bf16 block at 8 x 768 x 32 x 32 checked 267 ms against
        204 with its gradient channels_last, Zen 4), and the draw itself (23 ms there) was in every timed run."""
        cl = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        key = (tuple(out.shape), out.dtype, cl)
        if key not in grads:
            seed = torch.Generator(device=x.device).manual_seed(0)
            drawn = torch.randn(out.shape, generator=seed, device=out.device).to(out.dtype)
            grads[key] = drawn.contiguous(memory_format=torch.channels_last) if cl else drawn
        return grads[key]

    def step(forward, source=x, wrt_params=params):
        def run():
            inp = source.detach().requires_grad_(x.requires_grad)
            out = forward(inp)
            if out is None:
                return None
            wrt = ([inp] if inp.requires_grad else []) + wrt_params
            return (out,) + torch.autograd.grad(out, wrt, gradient(out))
        return run

    eager = step(lambda t: _eager(module, t))
    reference = (_fp32_reference(x, lambda t: step(lambda u: _eager(module, u), t)())
                 or _fp64_reference(module, x, step))
    trials = {path: (step(forward), eager, reference) for path, forward in forwards.items()}
    return checked.fastest(trials, parts, module, x, dtype)


def _fast_forward(block: nn.Module, x: torch.Tensor, backend: str, parts: Optional[BlockParts] = None):
    """``(path, output)`` of the first fast path that answers, or ``None``. ``parts``: the block's, where the caller
    has just taken them."""
    if parts is None:
        parts = block_parts(block)
    if parts is None:
        return None
    if parts.mode == 'train':
        if backend == 'lean':
            return 'lean', lean_block_forward(parts, x)
        if backend in ('lean_cpu', 'lean_triton'):
            norm = _lean_norms(parts, x).get(backend)
            return backend, None if norm is None else lean_block_forward(parts, x, norm)
        if backend == 'auto' and lean_applies(parts, x):
            return _checked_train(block, parts, x)
        return None
    if x.device.type == 'cpu' and backend.startswith('cpu'):
        from . import cpu
        return backend, cpu.block_forward(parts, x, backend)
    if x.device.type == 'cpu' and backend == 'auto' and not triton_device(x):
        return _checked_cpu(block, parts, x)
    if backend in TRITON_PATHS:
        return backend, _triton_forward(block, parts, x, backend)
    if backend == 'auto' and triton_device(x):
        return _checked_eval(block, parts, x)
    return None


def _offered(x: torch.Tensor) -> bool:
    """Whether a fast path may see this call at all (not while a tracer, compiler or transform is watching)."""
    return type(x) is torch.Tensor and not _watched()


def block_forward(block: nn.Module, x: torch.Tensor, parts: Optional[BlockParts] = None) -> Optional[torch.Tensor]:
    """The block's output by a fast path, or ``None`` to let the plain modules run. ``parts``: the block's
    (:func:`.eligibility.block_parts`), where the caller has just taken them (the compiled graph's node)."""
    if _is_compiling():
        # nothing is counted while tracing: a global bumped inside a traced function is guarded on, so each call
        # recompiled until torch.compile's recompile limit, after which the whole forward ran uncompiled (seen on an
        # H200 after 8 calls); the node's calls are counted when they run
        return _traced_block(block, x)
    if _offered(x):
        from . import cpu
        cpu.warn_if_bf16_is_emulated(x)
        if _backend != 'eager':
            answer = _fast_forward(block, x, _backend, parts)
            if answer is not None and answer[1] is not None:
                counters[answer[0]] += 1
                return answer[1]
    counters['eager'] += 1
    return None


def _traced_block(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """While ``torch.compile`` traces: an eval block that wants no gradients, on a Triton device, with ``auto`` or a
    Triton backend, becomes one node that dispatches at run time (:mod:`.compiled`: Inductor's code for the plain
    modules can be many times slower than our kernels on a GPU); anything else, ``None``: the plain modules are
    traced and Inductor fuses them, as they are for ``torch.export`` (:func:`.compiled.block_node` tells). On CPU
    Inductor's own code for them is one of the engines ours is measured against (``bench --engines``), so it is left
    to Inductor."""
    if _backend not in ('auto',) + tuple(TRITON_PATHS) or not triton_device(x) or type(x) is not torch.Tensor:
        return None  # (tensor subclasses, and functorch's batched tensors: the node has no rule for them)
    if _transforms_active():
        return None
    parts = block_parts(block)
    if parts is None or parts.mode != 'eval':
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return None  # the node has no backward
    _, enabled, dtype = autocast_state(x.device.type)
    return compiled.block_node(parts, x, enabled, dtype)


def stem_forward(stem: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The stem's output by its CPU fast path (channels_last), or ``None`` to let its modules run.

    ``Stem.forward`` calls it first, as a block's forward calls :func:`block_forward`. Offered as a block is: not
    under a tracer, compiler or transform, a plain stem whose children have no hooks (:func:`.eligibility.stem_parts`),
    on a CPU. In eval mode (:mod:`.cpu_stem`; fp32 or bf16 autocast, :func:`.cpu_stem.applies`) the CPU backends
    force it; ``auto`` checks it per case like a block's path (against the plain stem and the first block's
    conversion of its output, :data:`.checked.STEM`), and keeps the plain stem where blocks have been found to take
    none of the CPU paths on the fast stem's output (:func:`.checked.blocks_declined`) before the stem's own check:
    the plain blocks would then only be moved to channels_last. Once made, the stem's decision stands (every call of
    a case computes the same). In training (:mod:`.lean_stem`, fp32, in fp32 under bf16 autocast too,
    :func:`.lean_stem.applies`) ``'lean_cpu'`` forces it and ``auto`` checks a training step of it against the plain
    stem's, as a training block's.
    """
    if _is_compiling():
        return None  # uncounted, as a block's call (see block_forward)
    from . import checked, cpu, cpu_stem, lean_stem
    parts = None
    if (_offered(x) and x.device.type == 'cpu' and not triton_device(x)
            and _backend in ('auto', 'lean_cpu') + cpu.PATHS):
        parts = stem_parts(stem)
    out = None
    if parts is not None and parts.mode == 'train':
        if _backend == 'lean_cpu':
            out = lean_stem.forward(parts, x)
        elif _backend == 'auto' and lean_stem.applies(parts, x) and _fastest_step(
                stem, parts, x, {checked.STEM: lambda t: lean_stem.forward(parts, t)}) is not None:
            out = lean_stem.forward(parts, x)
    elif parts is not None and _backend != 'lean_cpu':
        dtype = conv_dtype(x)
        if _backend != 'auto':
            out = cpu_stem.forward(parts, x)
        elif cpu_stem.applies(parts, x) and (
                checked.case_key(checked.STEM, parts, x, dtype) in checked.decisions
                or not checked.blocks_declined(cpu_stem.output_shape(parts, x), parts.act, dtype)):
            # a decision made is followed even where the blocks declined since (on the call that made it, their
            # checks came after it): the same input gives the same output on every call (timm's FX test compares a
            # model's first call with its second exactly)
            run = lambda: cpu_stem.forward(parts, x)  # noqa: E731
            reference = _fp32_reference(x, lambda t: cpu_stem.eager(stem, t))
            path = checked.fastest({checked.STEM: (run, lambda: cpu_stem.eager(stem, x), reference)}, parts, stem,
                                   x, dtype)
            out = None if path is None else run()
    stem_counters['eager' if out is None else checked.STEM] += 1
    return out


def _runs_hybrid(parts: BlockParts, x: torch.Tensor) -> bool:
    """Whether this block would run ``cpu_hybrid`` on ``x`` alone: forced, or auto's decision for the case, already
    made, is it (an undecided case is not guessed: the block runs alone, so auto's check sees its real input)."""
    if parts.mode != 'eval':
        return False
    if _backend == 'cpu_hybrid':
        return True
    from . import checked, cpu
    return checked.settled(cpu.paths(parts, x), parts, x, conv_dtype(x)) == 'cpu_hybrid'


def blocks_forward(blocks: nn.Sequential, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A model's chain of blocks run on ``x``, or ``None`` to let ``blocks(x)`` run them one by one.

    Why a chain: between consecutive blocks that both run ``cpu_hybrid``, the first one's pointwise BatchNorm (a full
    pass over the activations) is carried into the second's depthwise kernel instead of written out. Every block
    still runs the path it would run alone (forced, or auto's decision for its case) and is counted as such; the
    others are called as usual. Not offered where the chain's hooks, or a block's own, must see it run.
    """
    if (_is_compiling() or not _offered(x) or _backend not in ('auto', 'cpu_hybrid') or x.device.type != 'cpu'
            or (_backend == 'auto' and triton_device(x)) or has_hooks(blocks)):
        # (under Triton's interpreter CPU tensors are a Triton device: auto's blocks take no CPU path there)
        return None
    from . import cpu
    _, autocast, autocast_dtype = autocast_state('cpu')
    if autocast and not (autocast_dtype == torch.bfloat16 and cpu.native_bf16()):
        # without native bf16 cpu_hybrid computes in fp32 and each block's output is rounded to bf16, as alone: a
        # chain would hand on fp32, a case of its own to auto, and return fp32 where the blocks return bf16
        return None
    carried = None
    for block in blocks:
        parts = None if has_hooks(block) else block_parts(block)
        if parts is not None and _runs_hybrid(parts, x if carried is None else carried.a):
            step = cpu.hybrid_forward(parts, x, carried)
            if step is not None:
                carried = step
                counters['cpu_hybrid'] += 1
                continue
        if carried is not None:
            x, carried = cpu.materialize(carried), None
        if parts is None:
            x = block(x)
        else:  # MixerBlock.forward's two steps, with the parts taken above (block(x) would take them again)
            out = block_forward(block, x, parts)
            x = _eager(block, x) if out is None else out
    return x if carried is None else cpu.materialize(carried)
