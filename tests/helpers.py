"""The functions behind the shared test fixtures in ``conftest.py``: BatchNorm randomising, small models, counted
block paths, auto's choice from its decision records, subprocess runs.

Plain functions with no side effects on import (no pytest, no thread settings), so scripts outside the test suite
can use them too, e.g. ``benchmarks/gpu_check.py`` with ``sys.path.insert(0, 'tests'); from helpers import
randomize_bn``. Tests use the fixtures; module-level helpers of a test file import from here.
"""
import contextlib
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn as nn

SMALL_VARIANT = 'convmixer_256_8_ks5_p2'


@dataclass(frozen=True)
class Normal:
    """``mean + std * N(0, 1)``, drawn with ``torch.randn``."""
    std: float = 1.
    mean: float = 0.

    def sample(self, n: int, dtype: torch.dtype, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.randn(n, generator=generator, dtype=dtype) * self.std + self.mean


@dataclass(frozen=True)
class Uniform:
    """``U(low, high)``, drawn with ``torch.rand``."""
    low: float
    high: float

    def sample(self, n: int, dtype: torch.dtype, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=dtype) * (self.high - self.low) + self.low


Distribution = Optional[Any]  # a Normal, a Uniform, or None to leave that tensor as it is


def randomize_bn(
        model: nn.Module,
        seed: Optional[int] = 1,
        *,
        mean: Distribution = Normal(0.3),
        var: Distribution = Uniform(0.5, 1.5),
        weight: Distribution = Normal(1.),
        bias: Distribution = Normal(0.3),
        num_batches_tracked: Optional[int] = None,
) -> nn.Module:
    """Give every ``BatchNorm2d`` non-trivial statistics and affine parameters, so folding mistakes, skipped
    buffers and channel mix-ups show (a fresh BatchNorm in eval mode is the identity). Returns ``model``.

    The defaults include negative scales (``weight`` is N(0, 1)), the hardest case for BatchNorm folding; a test
    that needs another distribution passes it. ``seed=None`` draws from torch's global generator (seeded per test
    by ``conftest``), otherwise from a generator of its own. Values are drawn on the CPU in each tensor's dtype,
    per BatchNorm in the order mean, var, weight, bias, then copied (so any device works).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.BatchNorm2d):
                continue
            for tensor, dist in ((m.running_mean, mean), (m.running_var, var), (m.weight, weight), (m.bias, bias)):
                if dist is not None:
                    tensor.copy_(dist.sample(m.num_features, tensor.dtype, generator))
            if num_batches_tracked is not None:
                m.num_batches_tracked.fill_(num_batches_tracked)
    return model


def small_model(
        name: str = SMALL_VARIANT,
        *,
        depth: int = 2,
        seed: Optional[int] = None,
        randomize: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, depth=depth, **kwargs)``: a registered variant cut down to a few blocks.

    ``seed`` seeds torch's global generator first (so the weights are reproducible); ``randomize`` (keyword
    arguments of :func:`randomize_bn`, ``{}`` for its defaults) randomises the BatchNorms and returns the model in
    eval mode, where those statistics are used. Without it the model comes back as timm builds it (train mode).
    """
    import timm
    if seed is not None:
        torch.manual_seed(seed)
    model = timm.create_model(name, depth=depth, **kwargs)
    if randomize is not None:
        randomize_bn(model, **randomize)
        model.eval()
    return model


def run_counted(fn: Callable[..., Any], *args: Any, backend: Optional[str] = None) -> Tuple[Any, Dict[str, int]]:
    """``fn(*args)`` with ``timm_convmixer.fast.counters`` reset first; returns the result and which path answered
    each ConvMixer block call (``{'cpu': 2}``, ``{'eager': 3}``, ...). ``backend`` forces one for the call."""
    from timm_convmixer import fast
    fast.reset_counters()
    with fast.use_backend(backend) if backend is not None else contextlib.nullcontext():
        result = fn(*args)
    return result, dict(fast.counters)


def auto_choice(records: Iterable[Dict[str, Any]], **case: Any) -> str:
    """The path ``auto`` takes for the case whose decision records (``checked.decision_records()``) match ``case``
    field by field: the fused path its check accepted, the winner of the race between them where it accepted
    several (which must then be recorded), ``'eager'`` where it accepted none."""
    from timm_convmixer.fast.checked import RACE
    mine = [r for r in records if all(r[k] == v for k, v in case.items())]
    assert mine, f'no decision recorded for {case}'
    accepted = [r['fused_path'] for r in mine if r['path'] != 'eager' and r['fused_path'] != RACE]
    if len(accepted) > 1:
        races = [r for r in mine if r['fused_path'] == RACE]
        assert len(races) == 1 and races[0]['path'] in accepted, (accepted, races)
        return races[0]['path']
    return accepted[0] if accepted else 'eager'


def auto_paths_from_nchw(records: Iterable[Dict[str, Any]]) -> Tuple[bool, str, str]:
    """``(stem took its fast path, first block's path, second block's path)`` as auto decided them, from its decision
    records, for a two-block model on an NCHW image: the fast stem's output is channels_last (its decision stands
    even where the blocks then declined every fused path on it), and so is a fused block's, so the second block is a
    case of its own only where the first ran the plain modules on NCHW input."""
    from timm_convmixer.fast.checked import STEM
    records = list(records)
    stem_fast = auto_choice(records, fused_path=STEM, block_mode='eval', channels_last=False) == STEM
    blocks = [r for r in records if r['fused_path'] != STEM]
    first = auto_choice(blocks, block_mode='eval', channels_last=stem_fast)
    second = first if stem_fast or first == 'eager' else auto_choice(blocks, block_mode='eval', channels_last=True)
    return stem_fast, first, second


def run_python(
        *args: str,
        code: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        unset: Iterable[str] = (),
        cwd: Optional[str] = None,
        timeout: float = 300,
        check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python *args`` (then ``-c code`` when given, dedented) in a fresh interpreter of the same environment.

    The environment is this process's, without the names in ``unset``, updated with ``env``. With ``check`` a
    non-zero exit fails the test with the command's output. Returns the ``CompletedProcess`` (text output).
    """
    cmd = [sys.executable, *map(str, args)]
    if code is not None:
        cmd += ['-c', textwrap.dedent(code)]
    full_env = {k: v for k, v in os.environ.items() if k not in set(unset)}
    full_env.update(env or {})
    proc = subprocess.run(cmd, env=full_env, cwd=None if cwd is None else str(cwd), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f'subprocess failed ({proc.returncode}): {cmd[1:]}\n'
            f'--- stdout (tail) ---\n{proc.stdout[-6000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}')
    return proc
