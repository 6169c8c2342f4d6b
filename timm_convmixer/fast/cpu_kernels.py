"""Our compiled CPU kernels (``csrc/``): built on first use, cached on disk, never required.

Why compile at all: the depthwise half of a block (conv, bias, activation, BatchNorm scale, residual add) is where
oneDNN is weakest at ConvMixer's shapes on AVX2 CPUs (``csrc/dw_block.cpp``'s header); one kernel of ours does it in
a single pass. The pointwise half is a GEMM of ours with the bias, activation and BatchNorm affine applied to each
tile in registers (``csrc/pw_block.cpp``), one pass where oneDNN needs two. In training, the depthwise conv's weight
gradient, which ATen computes at a fraction of its forward's speed, is ours too (``csrc/dw_grad.cpp``, for the lean
block's backward), and so are the lean block's batch-statistics normalisations with their activation, drop path and
residual (``csrc/bn_train.cpp``: two reads and a write per step where torch's kernels make five to seven passes).
All are compiled the way Inductor compiles its CPU kernels, for the vector ISA ATen itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``), by ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``
needed; ~25 s once, then loaded from torch's extension cache, keyed by the sources, the flags and the torch
version).

Nothing depends on them: when the build is impossible or fails, :func:`load` returns ``None`` after one
``RuntimeWarning`` naming why, and the oneDNN path runs. ``TIMM_CONVMIXER_CPU_BUILD=0`` skips the build (for
machines where compiling at run time is unwelcome); :func:`build` builds ahead of time (e.g. in an image).
"""
import functools
import hashlib
import logging
import os
import threading
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .checked import FastPathDecision

__all__ = ['ACT_BY_NAME', 'BUILD_ENV_VAR', 'MAX_KERNEL_SIZE', 'bf16_dot', 'bn_act_apply', 'bn_act_backward',
           'bn_act_stats', 'build', 'build_error', 'build_id', 'dw_block', 'dw_taps', 'dw_weight_grad',
           'fma_peak_gflops', 'load', 'pw_block', 'pw_pack', 'storage_use_count']

BUILD_ENV_VAR = 'TIMM_CONVMIXER_CPU_BUILD'
_CSRC = os.path.join(os.path.dirname(__file__), 'csrc')
SOURCES = [os.path.join(_CSRC, name) for name in ('dw_block.cpp', 'dw_grad.cpp', 'bn_train.cpp', 'pw_block.cpp',
                                                    'fma_peak.cpp')]
HEADERS = [os.path.join(_CSRC, name) for name in ('cpu_common.h', 'gelu_table.h')]
# activation name (eligibility.ACT_NAMES) -> the kernel's code (enum Act in the C++ source)
ACT_BY_NAME: Dict[str, int] = {'identity': 0, 'relu': 1, 'gelu': 2, 'gelu_tanh': 3, 'silu': 4}
MAX_KERNEL_SIZE = 64  # dw_block keeps one pointer per window row on its stack; dw_weight_grad takes the same
# ATen's CPU capability -> (the macro selecting ATen's Vectorized<float> implementation, compiler flags), as
# Inductor builds its CPU kernels for that ISA; any other capability gets ATen's portable vectors
_ISA_FLAGS: Dict[str, Tuple[List[str], List[str]]] = {
    'AVX2': (['CPU_CAPABILITY_AVX2'], ['-mavx2', '-mfma', '-mf16c']),
    'AVX512': (['CPU_CAPABILITY_AVX512'], ['-mavx512f', '-mavx512dq', '-mavx512vl', '-mavx512bw', '-mfma']),
}

_lock = threading.Lock()
_ops = None
_error: Optional[str] = None
_tried = False


def _capability() -> str:
    get = getattr(getattr(torch.backends, 'cpu', None), 'get_cpu_capability', None)
    return get() if get is not None else 'DEFAULT'


def _flags(capability: Optional[str] = None) -> List[str]:
    """Compiler flags for ``capability`` (default: this CPU's)."""
    macros, arch = _ISA_FLAGS.get(capability or _capability(), ([], []))
    return ['-O3', '-fopenmp', *arch, *[f'-D{m}' for m in macros]]


def _name(flags: List[str]) -> str:
    """The extension's name: a new source, flags or torch version builds anew instead of reusing a stale cache."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(' '.join(flags).encode())
    digest.update(torch.__version__.encode())
    return f'timm_convmixer_cpu_{digest.hexdigest()[:12]}'


def build_id() -> str:
    """The name of this CPU's build (a digest of the sources, flags and torch version): what a benchmark records
    as the kernels it ran, whether or not they are built yet."""
    return _name(_flags())


def _compile():
    # importing cpp_extension logs a warning about CUDA_HOME on CUDA builds of torch without a GPU: not ours to show
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    flags = _flags()
    cpp_extension.load(_name(flags), SOURCES, extra_cflags=flags, extra_ldflags=['-fopenmp'],
                       is_python_module=False)
    return torch.ops.timm_convmixer_cpu


def load():
    """``torch.ops.timm_convmixer_cpu`` (building it on the first call of the process), or ``None`` when it cannot
    be had: ``TIMM_CONVMIXER_CPU_BUILD=0``, no compiler or ninja, or a failed build (said once, then not retried)."""
    global _ops, _error, _tried
    if _tried:
        return _ops
    with _lock:
        if _tried:
            return _ops
        if os.environ.get(BUILD_ENV_VAR, '1').strip() == '0':
            _error = f'{BUILD_ENV_VAR}=0'
        else:
            warnings.warn(
                'timm_convmixer: loading its CPU kernels (compiled with torch.utils.cpp_extension on first '
                f'use on this machine, ~25 s, then cached; {BUILD_ENV_VAR}=0 skips it)', FastPathDecision,
                stacklevel=4)
            try:
                _ops = _compile()
            except Exception as e:  # noqa: BLE001 -- no compiler, no ninja, a compile error: the oneDNN path runs
                _error = f'{type(e).__name__}: {str(e).strip()[-500:]}'
                warnings.warn(f'timm_convmixer: could not build its CPU kernels ({_error}); blocks use '
                              'oneDNN for both convolutions instead', RuntimeWarning, stacklevel=4)
        _tried = True
    return _ops


def build() -> None:
    """Build (or load) the kernels now, raising if that is impossible: for images and set-up scripts."""
    if load() is None:
        raise RuntimeError(f'timm_convmixer: the CPU kernels are unavailable: {_error}')


def build_error() -> Optional[str]:
    """Why :func:`load` returned ``None`` (``None`` if it has not been called or succeeded)."""
    return _error


def dw_taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise weight ``(C, 1, k, k)`` as :func:`dw_block` takes its taps: ``(k * k, C)``, each tap's channels
    contiguous (detached)."""
    c, _, k, _ = weight.shape
    return weight.detach().reshape(c, k * k).t().contiguous()


def dw_block(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, kernel_size: int,
             act: str, out: torch.Tensor, in_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
             residual: bool = True, pad: Optional[int] = None, addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = x + scale * act(depthwise_conv_same(x) + bias)`` for a channels_last ``x`` (``out`` likewise, not
    ``x``), float32 or bfloat16 (computed in float32; ``out`` in ``x``'s dtype, or float32 for a bf16 ``x``, a bf16
    ``out`` rounded once on store; a bf16 ``x`` and ``out`` at kernel sizes 5, 7, 8 and 9 where :func:`bf16_dot`
    have the taps rounded to bf16 and multiplied in pairs, sums in float32): ``taps`` is the depthwise weight as
    ``(k * k, C)``, ``bias``/``scale`` hold ``C`` values (float32, as every per-channel operand). With
    ``in_affine = (s, t)`` (``C`` values each) the block's input is ``s * x + t`` per channel, applied as the kernel
    reads ``x``; with ``residual=False`` (a float32 ``x``) ``out = scale * act(depthwise_conv_same(x) + bias)``, the
    lean training block's bare convolution. ``pad`` (bare convolution only) puts that many zero rows and columns
    before the image and ``k - 1 - pad`` after instead of "same" padding's ``(k - 1) // 2``: ``k // 2`` is the
    transposed convolution of an even window (its input gradient). ``addend`` (bare convolution only; channels_last
    float32 of ``x``'s shape; it may be ``out`` itself) is added to ``out`` as it is stored. The kernel must be loaded."""
    in_scale, in_shift = in_affine if in_affine is not None else (None, None)
    _ops.dw_block(x, taps, bias, scale, kernel_size, ACT_BY_NAME[act], out, in_scale, in_shift, residual,
                  -1 if pad is None else pad, addend)
    return out


def dw_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_weight, grad_bias)`` of a depthwise "same" convolution (stride 1) with input ``x`` and output gradient
    ``grad``, both channels_last float32 of one shape: ``(C, 1, k, k)`` and ``(C,)``. The kernels must be loaded."""
    return _ops.dw_weight_grad(x, grad, kernel_size)


def bn_act_stats(t: torch.Tensor, act: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the mean and biased variance of ``act(t)`` over a channels_last float32 ``t`` (float64 ``[C]``
    each; the same bits on any number of threads). The kernels must be loaded."""
    return _ops.bn_act_stats(t, ACT_BY_NAME[act])


def bn_act_apply(t: torch.Tensor, act: str, scale: torch.Tensor, shift: torch.Tensor, mask: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out = residual + mask[n] * (scale * act(t) + shift)`` for channels_last float32 ``t``, ``residual`` and
    ``out`` of one shape (``out`` float32, or bfloat16, rounded once on store): ``scale``/``shift`` one float32 per
    channel, ``mask`` one per image (either may be ``None``). The kernels must be loaded."""
    _ops.bn_act_apply(t, ACT_BY_NAME[act], scale, shift, mask, residual, out)
    return out


def bn_act_backward(grad: torch.Tensor, t: torch.Tensor, act: str, mean: torch.Tensor, invstd: torch.Tensor,
                    weight: Optional[torch.Tensor], mask: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
                    out_sums: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients wrt ``(t, weight, bias)`` of ``mask[n] * batch_norm(act(t))`` normalised with the batch statistics
    ``mean``/``invstd`` (float32 ``[C]``; ``weight`` ``None`` for an affine-free norm) for the output gradient
    ``grad``, and with ``out_sums`` the first's per-channel sums over its float32 values (the bias gradient of a
    convolution that made ``t``; else ``None``): ``t`` and ``grad`` channels_last float32, the result ``t``'s layout
    (in ``out`` where given, a tensor like ``t``, float32 or bfloat16, rounded once on store). The kernels must be
    loaded."""
    out = torch.empty_like(t, memory_format=torch.channels_last) if out is None else out
    grad_w, grad_b, sums = _ops.bn_act_backward(grad, t, ACT_BY_NAME[act], mean, invstd, weight, mask, out, out_sums)
    return out, grad_w, grad_b, sums if out_sums else None


def pw_pack(weight: torch.Tensor) -> torch.Tensor:
    """The pointwise weight ``(C_out, C_in)`` in the panels :func:`pw_block` reads (done once per weight): float32,
    or bfloat16 (in pairs along ``C_in``, which must be even; where :func:`bf16_dot` is True)."""
    return _ops.pw_pack(weight)


@functools.lru_cache(maxsize=None)
def bf16_dot() -> bool:
    """Whether our kernels multiply bf16 pairs here (:func:`pw_block` then takes a bfloat16 ``u``, and
    :func:`dw_block` pairs the taps of a bfloat16 ``x`` and ``out``): kernels built for AVX-512 on a CPU with
    AVX512-BF16, whose ``vdpbf16ps`` multiplies bf16 pairs at twice the float32 FMA's rate (asked once: every bf16
    block call asks). The kernels must be loaded."""
    return _ops.bf16_dot_supported()


def pw_block(u: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
             act: str, out: torch.Tensor) -> torch.Tensor:
    """``out = scale * act(conv1x1(u) + bias) + shift`` for a channels_last ``u`` (``out`` likewise, float32 or
    bfloat16, rounded once on store; its own storage, with the output channels): ``panels`` from :func:`pw_pack` of
    the weight in ``u``'s dtype, ``bias``/``scale``/``shift`` one float32 per output channel. A float32 ``u`` is
    multiplied in float32, a bfloat16 one (where :func:`bf16_dot`) in bf16 pairs with float32 sums, as eager
    autocast's convolution. The kernels must be loaded."""
    _ops.pw_block(u, panels, bias, scale, shift, ACT_BY_NAME[act], out)
    return out


def fma_peak_gflops(per_thread: int = 4_000_000, repeats: int = 12) -> float:
    """This CPU's fp32 FMA throughput in GFLOP/s on ATen's current threads (``csrc/fma_peak.cpp``: independent
    vector FMAs from registers, the best of ``repeats`` runs of ``per_thread`` rounds of 12-16 each, ~16-25 ms a run
    on these 2-core VMs): the ceiling a fraction of peak is a fraction of. The kernels must be loaded. Why 12 runs: on
    a 2-core Zen 3 VM, best-of-3 readings ranged 94-189 GFLOP/s within minutes (a run whose second thread is held
    off reads one core's worth), which put engines at 127% of "peak"."""
    return _ops.fma_peak_gflops(per_thread, repeats)


def storage_use_count(t: torch.Tensor) -> int:
    """Strong references to ``t``'s storage (tensors, views, storage objects): 1 when ``t`` is its only holder."""
    return _ops.storage_use_count(t)
