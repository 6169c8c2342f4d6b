"""Raw Triton kernels for the ConvMixer block, with their launch helpers.

Everything here works on NHWC memory (a ``channels_last`` NCHW tensor is exactly that), so channels are the
contiguous, vectorised axis. A depthwise program owns a strip of adjacent pixels of one row (8; channels across its
threads), so a loaded source pixel feeds every output of the strip it reaches from registers (see
:func:`_dw_conv_strip`): on an H100 that ran 1.85x-2.2x the speed of tiles with one load per tap.

Kernels (``act``: one of the ``ACT_*`` codes, a runtime argument, so one compiled kernel serves every activation):

* ``dw_fwd``: ``y = x + scale * act(dwconv_kxk(x) + b) + shift`` -- the whole depthwise residual branch of a block
  with eval-mode BatchNorm folded into a per-channel ``scale``/``shift``, one read of ``x`` (taps hit cache), one write.
* ``dw_bwd_gz``: recomputes ``z = dwconv(x) + b`` (nothing but ``x`` is saved for backward), writes
  ``gz = gy * scale * act'(z)`` in the accumulation dtype, and per-program partial sums for the gradients of
  ``scale``, ``shift`` and ``b``.
* ``dw_bwd_gx``: ``gx = gy + conv_transpose(gz, w)`` (the residual's gradient plus the conv's).
* ``dw_bwd_gw``: per-tap partial sums of ``gz * shifted x``; a program owns one row of taps and gathers all of its
  horizontal shifts in one ``[taps, pixels, channels]`` load, so ``gz`` is read once per tap row, not once per tap.
* ``act_affine_fwd`` / ``act_affine_bwd``: the pointwise conv's epilogue ``scale * act(p) + shift`` on the GEMM output
  ``p`` (bias already added by ``addmm``), and its gradient.
* ``act_stats`` / ``stats_combine`` (:func:`bn_batch_stats`): training-mode BatchNorm's batch statistics of
  ``act(t)``: per-program shifted partial sums, then one launch combining them (Chan's formula, float64) and
  deriving invstd, the affine's scale and shift and the unbiased variance; ``bn_train_bwd`` / ``bn_bwd_coef``: its
  backward's two passes and, between them, one launch summing the first pass's partials into the second's
  coefficients. Per normalisation that is a handful of launches where torch ops on ``[C]`` vectors took ~35 (the
  host's time to issue them decided small-image training speed).
* ``pw_fwd``: the pointwise conv as one GEMM with that epilogue fused: ``scale * act(x @ w.T + b) + shift`` on NHWC
  rows, optionally also writing ``p = x @ w.T + b`` for the backward (which is ``act_affine_bwd`` plus two GEMMs).

Register budget: every kernel is shaped to stay within 128 registers per thread without spilling on sm_80 and sm_90
(so an SM can hold 16 warps of a memory-bound kernel). Element-wise tiles hold at most one 16-byte vector per thread
(a tile row is one 128-byte line of channels; half the rows when the channel count is not a multiple of 16, as loads
are then element-wise); depthwise programs give each thread 4 channels of 8 pixels (4 in the backward's
recomputation, which also keeps act' and three sums), and their loop over kernel rows is not unrolled. Offsets inside
an image are 32-bit from a 64-bit per-program base. Strips of 16 pixels ran 1.21x-1.26x faster again for 9x9 kernels
on the H100 but took 165-253 registers. ``tests/test_triton_aot.py`` compiles every specialisation the helpers
launch for sm_80 and sm_90 and checks the budget; :func:`record_launches` is how it learns what they launch.

Partial sums go to ``[programs, ...]`` buffers reduced by ``torch.sum`` or a second small kernel rather than atomics,
so results are deterministic run to run.

Every kernel also runs under Triton's CPU interpreter: launching with CPU tensors uses an ``InterpretedFunction`` of
the same source, whatever ``TRITON_INTERPRET`` was at import time. That is for testing only (it is very slow).
For that to work the kernels call only ``triton.language`` *builtins* and this module's own :func:`_device_fn`
helpers: library functions that are themselves ``@triton.jit`` (``tl.sum``, ``tl.cdiv``, ``tl.zeros``) stay
compiled-only when triton was imported without the variable, so the kernels spell them out
(``tl.reduce(v, 0, _sum_combine)`` is exactly what ``tl.sum`` lowers to; the interpreter recognises that combine
function and sums with numpy).
"""
import contextlib
import math
import struct
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.language.standard import _sum_combine
from triton.runtime.jit import JITFunction

from .runtime import rows  # (exported here too: the row kernels' callers use K.rows)

__all__ = [
    'ACT_IDENTITY', 'ACT_GELU', 'ACT_RELU', 'ACT_SILU', 'ACT_GELU_TANH', 'ACT_CODES', 'ACT_BY_NAME',
    'dw_fwd', 'dw_fwd_taps', 'taps', 'dw_bwd', 'dw_conv', 'dw_conv_bwd', 'act_affine_fwd', 'act_affine_bwd',
    'bn_batch_stats', 'BatchNormStats', 'bn_train_bwd', 'pw_fwd', 'pw_bwd',
    'Launch', 'record_launches', 'kernels', 'rows', 'image',
]

ACT_IDENTITY = 0
ACT_GELU = 1  # exact, erf form (nn.GELU())
ACT_RELU = 2
ACT_SILU = 3
ACT_GELU_TANH = 4  # nn.GELU(approximate='tanh')
ACT_CODES = (ACT_IDENTITY, ACT_GELU, ACT_RELU, ACT_SILU, ACT_GELU_TANH)
# by the names eligibility.act_name gives the activation modules
ACT_BY_NAME = {'identity': ACT_IDENTITY, 'gelu': ACT_GELU, 'relu': ACT_RELU, 'silu': ACT_SILU,
               'gelu_tanh': ACT_GELU_TANH}


class Launch(NamedTuple):
    """One kernel launch as a helper would issue it: what the ahead-of-time compile test specialises."""
    kernel: '_Kernel'
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]  # constexprs and compile options (num_warps, num_stages)


_recorders: List[List[Launch]] = []


@contextlib.contextmanager
def record_launches() -> Iterator[List[Launch]]:
    """Collect the launches the helpers make for ``meta`` tensors (which launch nothing).

    The helpers run their ordinary code on meta tensors -- shapes, tile choices, buffers -- so the list is exactly what
    they would launch for real tensors of those shapes and dtypes.
    """
    launches: List[Launch] = []
    _recorders.append(launches)
    try:
        yield launches
    finally:
        _recorders.remove(launches)


class _Kernel:
    """One kernel source, compiled by ``triton.jit`` for GPU tensors and interpreted for CPU tensors.

    ``triton.jit`` decides between compiling and interpreting when the decorator runs (reading ``TRITON_INTERPRET``),
    so a module imported before a test sets the variable would be stuck with the compiler. Keeping both lets the
    tests drive the very same source through the interpreter without subprocesses or module reloads.
    Flags and the activation code are not specialised on (``do_not_specialize``): the JIT would otherwise compile a
    separate kernel for the value 1.
    """

    def __init__(self, fn: Callable, do_not_specialize: Sequence[str] = ()):
        self.fn = fn
        self.name = fn.__name__
        self.jit = triton.jit(fn, do_not_specialize=list(do_not_specialize))
        self._interp = None

    def interp(self):
        if self._interp is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interp = InterpretedFunction(self.fn)
        return self._interp

    def launch(self, grid: Tuple[int, ...], *args: Any, device: torch.device, **kwargs: Any) -> None:
        if device.type == 'meta':
            if not _recorders:
                raise RuntimeError(f'{self.name}: meta tensors launch nothing; use record_launches()')
            _recorders[-1].append(Launch(self, tuple(grid), args, kwargs))
            return
        kernel = self.interp() if device.type == 'cpu' else self.jit
        kernel[grid](*args, **kwargs)


class _DeviceFn(JITFunction):
    """A ``@triton.jit`` helper that interpreted kernels can call too.

    Compiled kernels see a ``JITFunction`` and inline it as usual; called from an interpreted kernel (the only way it
    is called as a Python function) it runs its own interpreted version.
    """

    def __call__(self, *args, **kwargs):
        if getattr(self, '_interp', None) is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interp = InterpretedFunction(self.fn)
        return self._interp(*args, **kwargs)


def _device_fn(fn: Callable) -> _DeviceFn:
    return _DeviceFn(fn)


def _cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: Triton 3.8 made it a ``ConstexprFunction`` whose call costs microseconds, and
    the launch helpers make ~8 such calls per block (host time decides small-image models' speed)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (see :func:`_cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _acc_dtype(dtype: torch.dtype):
    """fp32 accumulation for every dtype but fp64 (kept exact so tests can compare to float64 references)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _line_c(C: int, dtype: torch.dtype) -> int:
    """Channels per tile row: one 128-byte line (8 threads x 16-byte vectors), fewer for narrow tensors."""
    return min(128 // dtype.itemsize, _next_pow2(C))


_NUM_WARPS = 4
_TILE_ROWS = 16  # with 128-byte rows and 4 warps: one 16-byte vector per thread
_STRIP = 8  # output pixels per depthwise program (see _strip_tile)
_GZ_STRIP = 4  # the backward's recomputation also keeps act' and three running sums
_STRIP_C = 256  # channels per depthwise program (at most)


def _tile_rows(n: int, rows: int = _TILE_ROWS, channels: int = 16) -> int:
    """Rows (pixels) of a ``[rows, channel line]`` tile, at most ``n``. Half as many when the tensor's channel count
    ``channels`` is not a multiple of 16: the JIT then knows nothing of the rows' alignment, channel loads are not
    vectorised and every element needs its own address registers."""
    if channels % 16:
        rows = max(1, rows // 2)
    return min(rows, _next_pow2(n))


def _strip_tile(W: int, C: int, dtype: torch.dtype, strip: int) -> Tuple[int, int, int]:
    """``(STRIP, BLOCK_C, num_warps)`` of the depthwise kernels: strips of ``strip`` pixels (8 x 9 taps reuse each
    loaded pixel up to 9 times; more would need more accumulator registers) over blocks of up to 256 channels, so
    that the strip's accumulators, one kernel row's taps and a loaded pixel fit the register budget: 4 channels per
    thread in fp32 accumulation (8 x 4 + 9 x 4 + 4 registers), and 1 in fp64 (the tests' dtype: twice the registers
    per value) or where the channel count is not a multiple of 16 (loads are then element-wise, each with its own
    64-bit address)."""
    block_c = min(_STRIP_C, _next_pow2(C))
    per_thread = 1 if C % 16 or dtype == torch.float64 else 4
    return min(strip, W), block_c, max(1, block_c // (32 * per_thread))


def _check_image_fits_int32(H: int, W: int, C: int) -> None:
    if H * W * C >= 2 ** 31:
        raise ValueError(f'an image of {C}x{H}x{W} elements exceeds the kernels\' 32-bit in-image offsets')


# --------------------------------------------------------------------------------------------------------------------
# activations (codes as ACT_*; literals here because a jit function may only read constexpr globals)


@_device_fn
def _act(z, ACT):
    """``act(z)``, same dtype as ``z``."""
    if ACT == 1:
        a = 0.5 * z * (1. + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:
        a = tl.maximum(z, 0.)
    elif ACT == 3:
        a = z / (1. + tl.exp(-z))
    elif ACT == 4:
        # 0.5 * z * (1 + tanh(u)) == z * sigmoid(2u), u = sqrt(2/pi) * (z + 0.044715 z^3)
        u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)
        a = z / (1. + tl.exp(-u2))
    else:
        a = z
    return a


@_device_fn
def _act_and_grad(z, ACT):
    """``(act(z), act'(z))``, same dtype as ``z``; ReLU's derivative at 0 is 0, as in PyTorch."""
    if ACT == 1:
        cdf = 0.5 * (1. + tl.erf(z * 0.7071067811865476))
        a = z * cdf
        da = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 2:
        a = tl.maximum(z, 0.)
        da = (z > 0.).to(z.dtype)
    elif ACT == 3:
        s = 1. / (1. + tl.exp(-z))
        a = z * s
        da = s * (1. + z * (1. - s))
    elif ACT == 4:
        u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)
        s = 1. / (1. + tl.exp(-u2))  # 0.5 * (1 + tanh(u))
        a = z * s
        da = s + z * (2. * s * (1. - s)) * (0.7978845608028654 + 0.10703222440469236 * z * z)
    else:
        a = z
        da = tl.full(z.shape, 1., z.dtype)
    return a, da


# --------------------------------------------------------------------------------------------------------------------
# depthwise conv + bias + act + affine + residual


@_device_fn
def _dw_conv_strip(src_img, w_ptr, h, w0, offs_c, mask_c, H, W, C,
                   K: tl.constexpr, TRANSPOSED: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   STRIP: tl.constexpr, BLOCK_C: tl.constexpr):
    """``STRIP`` adjacent output pixels ``w0 ...`` of row ``h`` of the "same" depthwise conv (or its transpose) of
    the image at ``src_img``, as a tuple of ``[BLOCK_C]`` vectors.

    The threads own channels and every pixel of the strip, so each source pixel a kernel row reaches is loaded once
    and feeds every output it touches from registers: ``STRIP + K - 1`` loads for ``STRIP * K`` FMAs per kernel row,
    where a tile of pixels with a load per tap made the kernel load-bound (one load per FMA). All loops are unrolled
    but the one over kernel rows (the accumulators are a tuple); rows outside the image are skipped by the loop's
    bounds, columns outside it masked.
    """
    PAD: tl.constexpr = (K - 1) // 2  # PyTorch "same": (k-1)//2 before, k//2 after
    # forward: output w, tap j reads source w + j - PAD; transposed: source w + PAD - j. Source column
    # w0 + q - LEFT for q = 0 .. STRIP + K - 2 covers both, with tap j = q - p (forward) or p + K - 1 - q.
    if TRANSPOSED:
        LEFT: tl.constexpr = K - 1 - PAD
    else:
        LEFT: tl.constexpr = PAD
    zero_c = offs_c * 0  # scalar conditions as vectors: the interpreter mis-types scalar-bool & vector-bool
    acc = ()
    for p in tl.static_range(STRIP):
        acc = acc + (tl.full((BLOCK_C,), 0., ACC_DTYPE),)
    # a loop over the kernel rows that reach the image (not unrolled: an unrolled one had the compiler issue every
    # row's loads at once, 255 registers and spills); one row's taps and pixels are live at a time
    if TRANSPOSED:  # x[h] fed z[h - i + PAD]: source rows h + PAD - i
        i_lo = tl.maximum(h + PAD - (H - 1), 0)
        i_hi = tl.minimum(h + PAD + 1, K)
    else:  # source rows h + i - PAD
        i_lo = tl.maximum(PAD - h, 0)
        i_hi = tl.minimum(H + PAD - h, K)
    for i in range(i_lo, i_hi):
        if TRANSPOSED:
            row = src_img + (h + PAD - i) * W * C
        else:
            row = src_img + (h + i - PAD) * W * C
        taps = ()
        for j in tl.static_range(K):
            taps = taps + (tl.load(w_ptr + (i * K + j) * C + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE),)
        for q in tl.static_range(STRIP + K - 1):
            ww = w0 + (q - LEFT) + zero_c
            xv = tl.load(row + ww * C + offs_c, mask=mask_c & (ww >= 0) & (ww < W), other=0.)
            xv = xv.to(ACC_DTYPE)
            out = ()
            for p in tl.static_range(STRIP):
                a = acc[p]
                if TRANSPOSED:  # tap indices spelled out: a name assigned here would be a tensor, not a constexpr
                    if p + K - 1 - q >= 0 and p + K - 1 - q < K:
                        a = a + xv * taps[p + K - 1 - q]
                else:
                    if q - p >= 0 and q - p < K:
                        a = a + xv * taps[q - p]
                out = out + (a,)
            acc = out
    return acc


@_device_fn
def _strip_program(pid_row, pid_c, H, W, C, STRIP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program ``(n, h, strip)`` x channel block -> ``(h, w0, image base, channels, channel mask)``."""
    num_s = (W + STRIP - 1) // STRIP
    nh = pid_row // num_s
    img = (nh // H).to(tl.int64) * H * W * C  # 64-bit image base; offsets inside an image are 32-bit
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return nh % H, (pid_row % num_s) * STRIP, img, offs_c, offs_c < C


@_device_fn
def _channel_bias(b_ptr, offs_c, mask_c, HAS_BIAS, ACC_DTYPE: tl.constexpr):
    """The conv bias of channels ``offs_c``, zeros without one (``HAS_BIAS`` is a runtime flag: one compiled kernel
    serves both)."""
    return tl.load(b_ptr + offs_c, mask=mask_c & (offs_c * 0 + HAS_BIAS != 0), other=0.).to(ACC_DTYPE)


@_device_fn
def _strip_pixel(h, w0, p, W, C, offs_c, mask_c):
    """Element offsets (in the image) and mask of pixel ``p`` of the strip at ``(h, w0)``: where each depthwise
    kernel reads its residual or gradient and writes its result."""
    ww = offs_c * 0 + (w0 + p)  # a vector: the interpreter mis-types scalar-bool & vector-bool
    return (h * W + ww) * C + offs_c, mask_c & (ww < W)


def _dw_fwd_kernel(
        x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr,
        H, W, C, ACT, HAS_BIAS,
        K: tl.constexpr, ACC_DTYPE: tl.constexpr, STRIP: tl.constexpr, BLOCK_C: tl.constexpr,
        AFFINE: tl.constexpr,
):
    """``x + scale * act(z) + shift`` for ``z = dwconv(x) + bias`` (``AFFINE``: the eval block's depthwise half), or
    ``z`` alone (the training block's convolution, whose normalisation needs the batch statistics of ``act(z)``)."""
    h, w0, img, offs_c, mask_c = _strip_program(tl.program_id(0), tl.program_id(1), H, W, C, STRIP, BLOCK_C)
    acc = _dw_conv_strip(x_ptr + img, w_ptr, h, w0, offs_c, mask_c, H, W, C,
                         K, False, ACC_DTYPE, STRIP, BLOCK_C)
    bias = _channel_bias(b_ptr, offs_c, mask_c, HAS_BIAS, ACC_DTYPE)
    if AFFINE:
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    for p in tl.static_range(STRIP):
        offs, m = _strip_pixel(h, w0, p, W, C, offs_c, mask_c)
        z = acc[p] + bias
        if AFFINE:
            res = tl.load(x_ptr + img + offs, mask=m, other=0.).to(ACC_DTYPE)
            z = res + _act(z, ACT) * scale + shift
        tl.store(out_ptr + img + offs, z.to(out_ptr.dtype.element_ty), mask=m)


def _dw_bwd_gz_kernel(
        x_ptr, w_ptr, b_ptr, scale_ptr, gy_ptr, gz_ptr, part_ptr,
        H, W, C, ROWS, ACT, HAS_BIAS,
        K: tl.constexpr, ACC_DTYPE: tl.constexpr, STRIP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Each program walks ``ROWS`` image rows of one strip, so the partial sums are ``ROWS`` times fewer."""
    pid_row = tl.program_id(0)  # (n, row chunk, strip)
    num_s = (W + STRIP - 1) // STRIP
    num_hb = (H + ROWS - 1) // ROWS
    nhb = pid_row // num_s
    w0 = (pid_row % num_s) * STRIP
    h0 = (nhb % num_hb) * ROWS
    img = (nhb // num_hb).to(tl.int64) * H * W * C
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    bias = _channel_bias(b_ptr, offs_c, mask_c, HAS_BIAS, ACC_DTYPE)

    s_ga = tl.full((BLOCK_C,), 0., ACC_DTYPE)  # d scale
    s_gy = tl.full((BLOCK_C,), 0., ACC_DTYPE)  # d shift
    s_gz = tl.full((BLOCK_C,), 0., ACC_DTYPE)  # d bias
    for h in range(h0, tl.minimum(h0 + ROWS, H)):
        # recompute z = dwconv(x) + b: cheaper than storing it in forward for a memory-bound block
        acc = _dw_conv_strip(x_ptr + img, w_ptr, h, w0, offs_c, mask_c, H, W, C,
                             K, False, ACC_DTYPE, STRIP, BLOCK_C)
        for p in tl.static_range(STRIP):
            offs, m = _strip_pixel(h, w0, p, W, C, offs_c, mask_c)
            a, da = _act_and_grad(acc[p] + bias, ACT)
            gy = tl.load(gy_ptr + img + offs, mask=m, other=0.).to(ACC_DTYPE)
            gz = gy * scale * da
            tl.store(gz_ptr + img + offs, gz, mask=m)
            s_ga += gy * a  # gy is 0 where masked
            s_gy += gy
            s_gz += gz

    # partials [3, programs, C]: d scale, d shift, d bias
    num_rows = tl.num_programs(0)
    part = part_ptr + pid_row.to(tl.int64) * C + offs_c
    tl.store(part, s_ga, mask=mask_c)
    tl.store(part + num_rows * C, s_gy, mask=mask_c)
    tl.store(part + 2 * num_rows * C, s_gz, mask=mask_c)


def _dw_bwd_gx_kernel(
        gz_ptr, w_ptr, gy_ptr, gx_ptr,
        H, W, C,
        K: tl.constexpr, ACC_DTYPE: tl.constexpr, STRIP: tl.constexpr, BLOCK_C: tl.constexpr,
):
    h, w0, img, offs_c, mask_c = _strip_program(tl.program_id(0), tl.program_id(1), H, W, C, STRIP, BLOCK_C)
    acc = _dw_conv_strip(gz_ptr + img, w_ptr, h, w0, offs_c, mask_c, H, W, C,
                         K, True, ACC_DTYPE, STRIP, BLOCK_C)
    for p in tl.static_range(STRIP):
        offs, m = _strip_pixel(h, w0, p, W, C, offs_c, mask_c)
        gy = tl.load(gy_ptr + img + offs, mask=m, other=0.).to(ACC_DTYPE)
        tl.store(gx_ptr + img + offs, (acc[p] + gy).to(gx_ptr.dtype.element_ty), mask=m)


def _dw_bwd_gw_kernel(
        gz_ptr, x_ptr, part_ptr,
        NH, H, W, C, SPLIT,
        K: tl.constexpr, ACC_DTYPE: tl.constexpr, TAPS: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program ``(i, c-block, s)``: the taps of kernel row ``i`` over rows ``s, s + SPLIT, ...``.

    The ``K`` horizontal shifts of a row are one ``[TAPS, BLOCK_W, BLOCK_C]`` gather (``TAPS``: ``K`` rounded up to a
    power of two, the extra taps masked), multiplied by the ``gz`` tile loaded once for all of them.
    """
    PAD: tl.constexpr = (K - 1) // 2
    i = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    taps = tl.arange(0, TAPS)

    acc = tl.full((TAPS, BLOCK_W, BLOCK_C), 0., ACC_DTYPE)
    zero64 = pid_s.to(tl.int64) * 0
    for r in range(pid_s, NH, SPLIT):
        r64 = r + zero64  # int64 row index (the interpreter's loop variable is a Python int, without .to)
        hh = r64 % H + i - PAD
        src = x_ptr + (r64 + (i - PAD)) * W * C  # (n * H + hh) * W * C: same image, as hh is checked below
        dst = gz_ptr + r64 * W * C
        hh_t = taps * 0 + hh  # a vector: the interpreter mis-types scalar-bool & vector-bool
        tap_ok = (taps < K) & (hh_t >= 0) & (hh_t < H)
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            m_gz = (offs_w < W)[:, None] & mask_c[None, :]
            gv = tl.load(dst + offs_w[:, None] * C + offs_c[None, :], mask=m_gz, other=0.)
            ww = offs_w[None, :] + taps[:, None] - PAD  # [TAPS, BLOCK_W]
            m_x = (tap_ok[:, None] & (ww >= 0) & (ww < W))[:, :, None] & m_gz[None, :, :]
            xv = tl.load(src + ww[:, :, None] * C + offs_c[None, None, :], mask=m_x, other=0.)
            acc += gv.to(ACC_DTYPE)[None, :, :] * xv.to(ACC_DTYPE)
    # partials [SPLIT, K*K, C]
    out = part_ptr + (pid_s.to(tl.int64) * K * K + i * K) * C + taps[:, None] * C + offs_c[None, :]
    tl.store(out, tl.reduce(acc, 1, _sum_combine), mask=(taps < K)[:, None] & mask_c[None, :])


_dw_fwd = _Kernel(_dw_fwd_kernel, do_not_specialize=('ACT', 'HAS_BIAS'))
_dw_bwd_gz = _Kernel(_dw_bwd_gz_kernel, do_not_specialize=('ROWS', 'ACT', 'HAS_BIAS'))
_dw_bwd_gx = _Kernel(_dw_bwd_gx_kernel)
_dw_bwd_gw = _Kernel(_dw_bwd_gw_kernel, do_not_specialize=('SPLIT',))

_GZ_ROWS = 8  # image rows per gz program
_GW_SPLIT = 64  # programs along the rows for the weight gradient


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW tensor -> contiguous NHWC tensor (free for a ``channels_last`` input)."""
    return x.permute(0, 2, 3, 1).contiguous()


def image(rows_: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """:func:`rows` back to a channels_last ``[N, C, H, W]`` tensor of ``like``'s shape (a view)."""
    N, C, H, W = like.shape
    return rows_.view(N, H, W, C).permute(0, 3, 1, 2)


def taps(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise weight ``[C, 1, k, k]`` -> ``[k*k, C]``, so each tap's per-channel weights are one coalesced load
    (the layout :func:`dw_fwd_taps` takes)."""
    C, _, k, _ = weight.shape
    return weight.reshape(C, k * k).t().contiguous()


def dw_fwd(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        scale: torch.Tensor,
        shift: torch.Tensor,
        act: int,
) -> torch.Tensor:
    """``x + scale * act(dwconv(x, weight, "same") + bias) + shift`` for NCHW ``x``; returns a channels_last tensor
    of ``x``'s dtype. Accumulates in fp32 (fp64 for fp64 inputs)."""
    return dw_fwd_taps(x, taps(weight), bias, scale.contiguous(), shift.contiguous(), act)


def dw_fwd_taps(
        x: torch.Tensor,
        w_taps: torch.Tensor,
        bias: Optional[torch.Tensor],
        scale: torch.Tensor,
        shift: torch.Tensor,
        act: int,
) -> torch.Tensor:
    """:func:`dw_fwd` with the weight already in the kernels' layout (``taps(weight)``) and contiguous ``scale``/
    ``shift``: what an inference call passes from constants it keeps between calls (no per-call weight copy)."""
    return _dw_forward(x, w_taps, bias, (scale, shift), act)


def dw_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``dwconv(x, weight, "same") + bias`` alone, what the training block's normalisation then takes: a
    channels_last tensor of ``x``'s dtype (callers pass all three in the compute dtype, as autocast would cast
    them), accumulated in fp32 (fp64 for fp64) and rounded once, as cuDNN's convolution does."""
    return _dw_forward(x, taps(weight), bias, None, ACT_BY_NAME['identity'])


def _dw_forward(x, w_taps, bias, affine: Optional[Tuple[torch.Tensor, torch.Tensor]], act: int) -> torch.Tensor:
    N, C, H, W = x.shape
    k = math.isqrt(w_taps.shape[0])
    _check_image_fits_int32(H, W, C)
    x_nhwc = _nhwc(x)
    out = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    scale, shift = affine if affine is not None else (w_taps, w_taps)  # not read without AFFINE
    STRIP, BLOCK_C, warps = _strip_tile(W, C, x.dtype, _STRIP)
    grid = (N * H * _cdiv(W, STRIP), _cdiv(C, BLOCK_C))
    _dw_fwd.launch(
        grid, x_nhwc, w_taps, bias if bias is not None else w_taps, scale, shift,
        out.permute(0, 2, 3, 1), H, W, C, act, bias is not None,
        K=k, ACC_DTYPE=_acc_dtype(x.dtype), STRIP=STRIP, BLOCK_C=BLOCK_C, AFFINE=affine is not None,
        num_warps=warps, device=x.device)
    return out


def dw_bwd(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        scale: torch.Tensor,
        act: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`dw_fwd` wrt ``(x, weight, bias, scale, shift)``; ``weight``/``bias``/``scale``/``shift``
    gradients come back in fp32 (fp64 for fp64 inputs) and are cast by the caller. ``bias``'s gradient is returned
    even when ``bias`` is None (the caller drops it)."""
    N, C, H, W = x.shape
    k = weight.shape[-1]
    _check_image_fits_int32(H, W, C)
    acc_t = _torch_acc_dtype(x.dtype)
    x_nhwc = _nhwc(x)
    gy_nhwc = _nhwc(grad_out)
    w_taps = taps(weight)

    STRIP, BLOCK_C, warps = _strip_tile(W, C, x.dtype, _GZ_STRIP)
    rows = min(_GZ_ROWS, H)
    programs = N * _cdiv(H, rows) * _cdiv(W, STRIP)
    gz = torch.empty((N, H, W, C), dtype=acc_t, device=x.device)
    part = torch.empty((3, programs, C), dtype=acc_t, device=x.device)
    _dw_bwd_gz.launch(
        (programs, _cdiv(C, BLOCK_C)), x_nhwc, w_taps, bias if bias is not None else w_taps,
        scale.contiguous(), gy_nhwc, gz, part, H, W, C, rows, act, bias is not None,
        K=k, ACC_DTYPE=_acc_dtype(x.dtype), STRIP=STRIP, BLOCK_C=BLOCK_C, num_warps=warps, device=x.device)
    g_scale, g_shift, g_bias = part.sum(dim=1).unbind(0)
    gx = _dw_grad_input(gz, w_taps, k, gy_nhwc, x)
    g_weight = _dw_grad_weight(gz, x_nhwc, k)
    return gx, g_weight, g_bias, g_scale, g_shift


def dw_conv_bwd(grad_z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, grad_residual: torch.Tensor,
                needs: Tuple[bool, bool, bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of :func:`dw_conv` wrt ``(x, weight, bias)`` for ``grad_z``, each only where ``needs`` says: ``x``'s
    is ``grad_residual + dwconv^T(grad_z)`` (the gradient ``x`` also gets through the block's residual, added in the
    same pass) in ``grad_residual``'s dtype; ``weight``'s and ``bias``'s in fp32 (fp64 for fp64), cast by the caller.
    ``x`` and ``weight`` as the forward computed with them (its compute dtype)."""
    N, C, H, W = x.shape
    k = weight.shape[-1]
    _check_image_fits_int32(H, W, C)
    gz = _nhwc(grad_z)
    gx = g_weight = g_bias = None
    if needs[0]:
        gx = _dw_grad_input(gz, taps(weight), k, _nhwc(grad_residual), grad_residual)
    if needs[1]:
        g_weight = _dw_grad_weight(gz, _nhwc(x), k)
    if needs[2]:
        g_bias = gz.reshape(-1, C).sum(0, dtype=_torch_acc_dtype(x.dtype))
    return gx, g_weight, g_bias


def _dw_grad_input(gz: torch.Tensor, w_taps: torch.Tensor, k: int, gy_nhwc: torch.Tensor,
                   like: torch.Tensor) -> torch.Tensor:
    """``gy + dwconv^T(gz)`` (NHWC ``gz``, ``gy``; ``k x k`` taps) as a channels_last tensor of ``like``'s shape and
    dtype."""
    N, C, H, W = like.shape
    STRIP, BLOCK_C, warps = _strip_tile(W, C, gz.dtype, _STRIP)  # the conv reads gz
    gx = torch.empty((N, C, H, W), dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    _dw_bwd_gx.launch(
        (N * H * _cdiv(W, STRIP), _cdiv(C, BLOCK_C)), gz, w_taps, gy_nhwc, gx.permute(0, 2, 3, 1),
        H, W, C, K=k, ACC_DTYPE=_acc_dtype(like.dtype), STRIP=STRIP, BLOCK_C=BLOCK_C, num_warps=warps,
        device=like.device)
    return gx


def _dw_grad_weight(gz: torch.Tensor, x_nhwc: torch.Tensor, k: int) -> torch.Tensor:
    """The depthwise weight's gradient ``[C, 1, k, k]`` from NHWC ``gz`` and ``x``, accumulated in fp32 (fp64)."""
    N, H, W, C = x_nhwc.shape
    acc_t = _torch_acc_dtype(x_nhwc.dtype)
    # [taps, pixels, channels] tiles of 2048 elements (1024 for fp64): 16 (8) per thread
    taps = _next_pow2(k)
    BLOCK_C = min(16 if x_nhwc.dtype == torch.float64 else 32, _next_pow2(C))
    BLOCK_W_GW = _tile_rows(W, max(1, 64 // taps), C)
    NH = N * H
    split = max(1, min(NH, _GW_SPLIT))
    part_w = torch.empty((split, k * k, C), dtype=acc_t, device=x_nhwc.device)
    _dw_bwd_gw.launch(
        (k, _cdiv(C, BLOCK_C), split), gz, x_nhwc, part_w, NH, H, W, C, split,
        K=k, ACC_DTYPE=_acc_dtype(x_nhwc.dtype), TAPS=taps, BLOCK_W=BLOCK_W_GW, BLOCK_C=BLOCK_C,
        num_warps=_NUM_WARPS, device=x_nhwc.device)
    return part_w.sum(dim=0).t().reshape(C, 1, k, k)


@_device_fn
def _row_tile(t, M, C, mask_c, pid_m, BLOCK_M: tl.constexpr):
    """Row tile ``t`` of a row-walking kernel over ``[M, C]`` rows: its first row, its ``[BLOCK_M, BLOCK_C]`` mask and
    its 64-bit element base (``pid_m`` only lends its 64-bit type: the loop index may be a plain int)."""
    row0 = t * BLOCK_M
    m = (row0 + tl.arange(0, BLOCK_M) < M)[:, None] & mask_c[None, :]
    return row0, m, (row0 + pid_m.to(tl.int64) * 0) * C


# --------------------------------------------------------------------------------------------------------------------
# pointwise conv epilogue: scale * act(p) + shift on the GEMM output


def _act_affine_fwd_kernel(
        p_ptr, scale_ptr, shift_ptr, res_ptr, mask_ptr, out_ptr, M, C, HW, ACT,
        ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """``scale * act(p) + shift``, times ``mask[row // HW]`` (a per-sample drop-path factor) and plus ``res`` (the
    residual) where asked: a training-mode BatchNorm applied with its batch statistics folded into scale/shift."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    m = (offs_m < M)[:, None] & mask_c[None, :]
    base = (pid_m * BLOCK_M).to(tl.int64) * C  # 64-bit tile base, 32-bit offsets inside the tile
    offs = tl.arange(0, BLOCK_M)[:, None] * C + offs_c[None, :]
    p = tl.load(p_ptr + base + offs, mask=m, other=0.).to(ACC_DTYPE)
    a = _act(p, ACT)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    y = a * scale[None, :] + shift[None, :]
    if HAS_MASK:
        y = y * tl.load(mask_ptr + offs_m // HW, mask=offs_m < M, other=0.).to(ACC_DTYPE)[:, None]
    if HAS_RES:
        y += tl.load(res_ptr + base + offs, mask=m, other=0.).to(ACC_DTYPE)
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _act_affine_bwd_kernel(
        p_ptr, scale_ptr, gy_ptr, gp_ptr, part_ptr, M, C, TILES, ACT,
        ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Each program walks ``TILES`` row tiles; partial sums ``[3, programs, C]`` of ``gy * act(p)`` (d scale),
    ``gy`` (d shift) and ``gp`` (d bias of the GEMM that made ``p``)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    offs = tl.arange(0, BLOCK_M)[:, None] * C + offs_c[None, :]
    s_ga = tl.full((BLOCK_M, BLOCK_C), 0., ACC_DTYPE)
    s_gy = tl.full((BLOCK_M, BLOCK_C), 0., ACC_DTYPE)
    s_gp = tl.full((BLOCK_M, BLOCK_C), 0., ACC_DTYPE)
    for t in range(pid_m * TILES, tl.minimum(pid_m * TILES + TILES, (M + BLOCK_M - 1) // BLOCK_M)):
        _, m, base = _row_tile(t, M, C, mask_c, pid_m, BLOCK_M)
        p = tl.load(p_ptr + base + offs, mask=m, other=0.).to(ACC_DTYPE)
        gy = tl.load(gy_ptr + base + offs, mask=m, other=0.).to(ACC_DTYPE)
        a, da = _act_and_grad(p, ACT)
        gp = (gy * scale[None, :] * da).to(gp_ptr.dtype.element_ty)
        tl.store(gp_ptr + base + offs, gp, mask=m)
        s_ga += tl.where(m, gy * a, 0.)
        s_gy += gy
        s_gp += gp.to(ACC_DTYPE)
    num_m = tl.num_programs(0)
    part = part_ptr + pid_m.to(tl.int64) * C + offs_c
    tl.store(part, tl.reduce(s_ga, 0, _sum_combine), mask=mask_c)
    tl.store(part + num_m * C, tl.reduce(s_gy, 0, _sum_combine), mask=mask_c)
    tl.store(part + 2 * num_m * C, tl.reduce(s_gp, 0, _sum_combine), mask=mask_c)


_act_affine_fwd = _Kernel(_act_affine_fwd_kernel, do_not_specialize=('HW', 'ACT'))
_act_affine_bwd = _Kernel(_act_affine_bwd_kernel, do_not_specialize=('TILES', 'ACT'))

_BLOCK_M = 32
_BWD_BLOCK_M = 16  # three running sums besides the tile: one 16-byte vector per thread
_BWD_TILES = 16  # row tiles per backward program


def act_affine_fwd(
        p: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: int,
        residual: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, rows_per_sample: int = 1,
        out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``scale * act(p) + shift`` for a row-major ``[M, C]`` ``p`` (fp32 math), in ``out_dtype`` (``p``'s by default).

    Training-mode BatchNorm uses the optional terms: ``mask`` (``[M // rows_per_sample]``, one factor per sample,
    drop path) multiplies the result and ``residual`` (``[M, C]``) is added to it, in the same pass.
    """
    M, C = p.shape
    p = p.contiguous()
    out = torch.empty((M, C), dtype=out_dtype or p.dtype, device=p.device)
    BLOCK_C = _line_c(C, p.dtype)
    BLOCK_M = _tile_rows(M, _BLOCK_M, C)
    grid = (_cdiv(M, BLOCK_M), _cdiv(C, BLOCK_C))
    _act_affine_fwd.launch(
        grid, p, scale.contiguous(), shift.contiguous(), p if residual is None else residual.contiguous(),
        p if mask is None else mask.contiguous(), out, M, C, rows_per_sample, act,
        ACC_DTYPE=_acc_dtype(p.dtype), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, HAS_RES=residual is not None,
        HAS_MASK=mask is not None, num_warps=_NUM_WARPS, device=p.device)
    return out


def _act_affine_bwd_launch(
        grad_out: torch.Tensor, p: torch.Tensor, scale: torch.Tensor, act: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, C = p.shape
    p = p.contiguous()
    grad_out = grad_out.contiguous()
    gp = torch.empty_like(p)
    BLOCK_C = _line_c(C, p.dtype)
    BLOCK_M = _tile_rows(M, _BWD_BLOCK_M, C)
    tiles = _cdiv(M, BLOCK_M)
    programs = _cdiv(tiles, _BWD_TILES)
    part = torch.empty((3, programs, C), dtype=_torch_acc_dtype(p.dtype), device=p.device)
    _act_affine_bwd.launch(
        (programs, _cdiv(C, BLOCK_C)), p, scale.contiguous(), grad_out, gp, part, M, C, _BWD_TILES, act,
        ACC_DTYPE=_acc_dtype(p.dtype), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=_NUM_WARPS, device=p.device)
    g_scale, g_shift, g_p = part.sum(dim=1).unbind(0)
    return gp, g_scale, g_shift, g_p


def act_affine_bwd(
        grad_out: torch.Tensor, p: torch.Tensor, scale: torch.Tensor, act: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`act_affine_fwd` wrt ``(p, scale, shift)``; the last two in fp32 (fp64 for fp64)."""
    gp, g_scale, g_shift, _ = _act_affine_bwd_launch(grad_out, p, scale, act)
    return gp, g_scale, g_shift


# --------------------------------------------------------------------------------------------------------------------
# training-mode BatchNorm of act(t): batch statistics, and the backward's two passes


def _act_stats_kernel(
        t_ptr, part_ptr, M, C, TILES, ACT,
        ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial sums ``[3, programs, C]`` of ``a = act(t)`` over each program's ``TILES`` row tiles: a shift (``a`` of
    the program's first row), ``sum(a - shift)`` and ``sum((a - shift)^2)``. Shifting by a value from the data keeps
    the variance free of the cancellation ``E[a^2] - E[a]^2`` suffers when the mean is large; the programs' partials
    are combined exactly (Chan's formula, float64) by the launcher."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs = tl.arange(0, BLOCK_M)[:, None] * C + offs_c[None, :]
    first = (pid_m * TILES * BLOCK_M).to(tl.int64) * C
    k = _act(tl.load(t_ptr + first + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE), ACT)
    s1 = tl.full((BLOCK_M, BLOCK_C), 0., ACC_DTYPE)
    s2 = tl.full((BLOCK_M, BLOCK_C), 0., ACC_DTYPE)
    for t in range(pid_m * TILES, tl.minimum(pid_m * TILES + TILES, (M + BLOCK_M - 1) // BLOCK_M)):
        _, m, base = _row_tile(t, M, C, mask_c, pid_m, BLOCK_M)
        v = tl.load(t_ptr + base + offs, mask=m, other=0.).to(ACC_DTYPE)
        d = tl.where(m, _act(v, ACT) - k[None, :], 0.)
        s1 += d
        s2 += d * d
    num_m = tl.num_programs(0)
    part = part_ptr + pid_m.to(tl.int64) * C + offs_c
    tl.store(part, k, mask=mask_c)
    tl.store(part + num_m * C, tl.reduce(s1, 0, _sum_combine), mask=mask_c)
    tl.store(part + 2 * num_m * C, tl.reduce(s2, 0, _sum_combine), mask=mask_c)


@_device_fn
def _stats_partials(part_ptr, p0, offs_c, mask_c, M, C, P, ROWS, BLOCK_P: tl.constexpr):
    """Partials ``p0 .. p0 + BLOCK_P`` of ``_act_stats_kernel``'s ``[3, P, C]`` for the channels ``offs_c``: their
    mask, element offsets, row counts and (float64) shifts and shifted sums."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    m = (offs_p < P)[:, None] & mask_c[None, :]
    n = tl.maximum(tl.minimum(M - offs_p * ROWS, ROWS), 1).to(tl.float64)[:, None]
    idx = offs_p[:, None] * C + offs_c[None, :]
    shift = tl.load(part_ptr + idx, mask=m, other=0.).to(tl.float64)
    s1 = tl.load(part_ptr + P * C + idx, mask=m, other=0.).to(tl.float64)
    return m, idx, n, shift, s1


def _stats_combine_kernel(
        part_ptr, stats_ptr, w_ptr, b_ptr, M, C, P, ROWS, eps_hi, eps_lo, unbias_hi, unbias_lo, HAS_W, HAS_B,
        OUT_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Mean and biased variance from ``_act_stats_kernel``'s partials ``[3, P, C]``: Chan's parallel combination of
    the programs' (count, mean, M2) in float64, program ``p`` having counted ``min(ROWS, M - p * ROWS)`` rows. One
    launch where the same formula in torch ops took ~22 small kernels per normalisation (and the host time to issue
    them, which decided small-image training speed).

    ``stats`` rows: mean, var, then what training-mode BatchNorm derives from them, in ``OUT_DTYPE`` as torch's ops
    on ``[C]`` vectors would: ``invstd = rsqrt(var + eps)``, ``scale = weight *
    invstd`` (``invstd`` without weight), ``shift = bias - mean * scale``, and the unbiased variance ``var * unbias``
    for the running statistics. Scalars arrive as float32 pairs ``hi + lo`` (a kernel's float argument is float32),
    exact to ~1e-16 for float64 statistics and rounding to ``hi`` alone in float32."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    total = tl.full((BLOCK_C,), 0., tl.float64)
    for p0 in range(0, P, BLOCK_P):
        m, idx, n, shift, s1 = _stats_partials(part_ptr, p0, offs_c, mask_c, M, C, P, ROWS, BLOCK_P)
        total += tl.reduce(tl.where(m, n * shift + s1, 0.), 0, _sum_combine)
    mean = total / M
    m2 = tl.full((BLOCK_C,), 0., tl.float64)
    for p0 in range(0, P, BLOCK_P):
        m, idx, n, shift, s1 = _stats_partials(part_ptr, p0, offs_c, mask_c, M, C, P, ROWS, BLOCK_P)
        s2 = tl.load(part_ptr + 2 * P * C + idx, mask=m, other=0.).to(tl.float64)
        d = shift + s1 / n - mean[None, :]
        m2 += tl.reduce(tl.where(m, s2 - s1 * s1 / n + n * d * d, 0.), 0, _sum_combine)
    mean_o = mean.to(OUT_DTYPE)
    var_o = tl.maximum(m2 / M, 0.).to(OUT_DTYPE)
    tl.store(stats_ptr + offs_c, mean_o, mask=mask_c)
    tl.store(stats_ptr + C + offs_c, var_o, mask=mask_c)
    invstd = 1. / tl.sqrt(var_o + eps_hi + eps_lo)
    scale = invstd
    if HAS_W:
        scale = tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(OUT_DTYPE) * invstd
    shift = -mean_o * scale
    if HAS_B:
        shift = shift + tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(OUT_DTYPE)
    tl.store(stats_ptr + 2 * C + offs_c, invstd, mask=mask_c)
    tl.store(stats_ptr + 3 * C + offs_c, scale, mask=mask_c)
    tl.store(stats_ptr + 4 * C + offs_c, shift, mask=mask_c)
    tl.store(stats_ptr + 5 * C + offs_c, var_o * unbias_hi + var_o * unbias_lo, mask=mask_c)


def _bn_bwd_coef_kernel(
        part_ptr, coef_ptr, w_ptr, sums_ptr, M, C, P, HAS_W,
        OUT_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The second backward pass's coefficients from the first's partial sums ``[2, P, C]`` (of ``dy`` and ``dy *
    xhat``), summed in float64: ``coef`` rows 2-4 (``coef`` holds mean and invstd in rows 0-1) ``alpha = weight *
    invstd``, ``c1 = sum(dy) / M``, ``c2 = invstd * sum(dy * xhat) / M``, and ``sums`` ``[2, C]`` = ``sum(dy)``,
    ``sum(dy * xhat)`` (the bias's and weight's gradients). One launch for ~12 small torch ops."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s_dy = tl.full((BLOCK_C,), 0., tl.float64)
    s_dyx = tl.full((BLOCK_C,), 0., tl.float64)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        m = (offs_p < P)[:, None] & mask_c[None, :]
        idx = offs_p[:, None] * C + offs_c[None, :]
        s_dy += tl.reduce(tl.load(part_ptr + idx, mask=m, other=0.).to(tl.float64), 0, _sum_combine)
        s_dyx += tl.reduce(tl.load(part_ptr + P * C + idx, mask=m, other=0.).to(tl.float64), 0, _sum_combine)
    s_dy_o = s_dy.to(OUT_DTYPE)
    s_dyx_o = s_dyx.to(OUT_DTYPE)
    invstd = tl.load(coef_ptr + C + offs_c, mask=mask_c, other=0.).to(OUT_DTYPE)
    alpha = invstd
    if HAS_W:
        alpha = invstd * tl.load(w_ptr + offs_c, mask=mask_c, other=0.).to(OUT_DTYPE)
    tl.store(coef_ptr + 2 * C + offs_c, alpha, mask=mask_c)
    tl.store(coef_ptr + 3 * C + offs_c, s_dy_o / M, mask=mask_c)
    tl.store(coef_ptr + 4 * C + offs_c, invstd * s_dyx_o / M, mask=mask_c)
    tl.store(sums_ptr + offs_c, s_dy_o, mask=mask_c)
    tl.store(sums_ptr + C + offs_c, s_dyx_o, mask=mask_c)


def _bn_train_bwd_kernel(
        t_ptr, gy_ptr, mask_ptr, coef_ptr, gt_ptr, part_ptr, M, C, HW, TILES, ACT,
        ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_MASK: tl.constexpr, REDUCE: tl.constexpr,
):
    """Backward of ``y = bn(act(t))`` on batch statistics, ``dy = gy * mask[row // HW]``; ``coef`` is ``[5, C]``:
    mean, invstd, and (second pass) ``alpha = weight * invstd``, ``c1 = sum(dy) / M``, ``c2 = invstd * sum(dy * xhat)
    / M``.

    ``REDUCE`` (first pass): partial sums ``[2, programs, C]`` of ``dy`` and ``dy * xhat``, ``xhat = (a - mean) *
    invstd``. Otherwise: ``gt = act'(t) * alpha * (dy - c1 - (a - mean) * c2)``, BatchNorm's input gradient.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs = tl.arange(0, BLOCK_M)[:, None] * C + offs_c[None, :]
    mean = tl.load(coef_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    invstd = tl.load(coef_ptr + C + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    if REDUCE:
        s_dy = tl.full((BLOCK_M, BLOCK_C), 0., ACC_DTYPE)
        s_dyx = tl.full((BLOCK_M, BLOCK_C), 0., ACC_DTYPE)
    else:
        alpha = tl.load(coef_ptr + 2 * C + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
        c1 = tl.load(coef_ptr + 3 * C + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
        c2 = tl.load(coef_ptr + 4 * C + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    for t in range(pid_m * TILES, tl.minimum(pid_m * TILES + TILES, (M + BLOCK_M - 1) // BLOCK_M)):
        row0, m, base = _row_tile(t, M, C, mask_c, pid_m, BLOCK_M)
        rows = row0 + tl.arange(0, BLOCK_M)
        v = tl.load(t_ptr + base + offs, mask=m, other=0.).to(ACC_DTYPE)
        dy = tl.load(gy_ptr + base + offs, mask=m, other=0.).to(ACC_DTYPE)
        if HAS_MASK:
            dy = dy * tl.load(mask_ptr + rows // HW, mask=rows < M, other=0.).to(ACC_DTYPE)[:, None]
        if REDUCE:
            centred = _act(v, ACT) - mean[None, :]
            s_dy += dy
            s_dyx += tl.where(m, dy * centred * invstd[None, :], 0.)
        else:
            a, da = _act_and_grad(v, ACT)
            g = da * alpha[None, :] * (dy - c1[None, :] - (a - mean[None, :]) * c2[None, :])
            tl.store(gt_ptr + base + offs, g.to(gt_ptr.dtype.element_ty), mask=m)
    if REDUCE:
        num_m = tl.num_programs(0)
        part = part_ptr + pid_m.to(tl.int64) * C + offs_c
        tl.store(part, tl.reduce(s_dy, 0, _sum_combine), mask=mask_c)
        tl.store(part + num_m * C, tl.reduce(s_dyx, 0, _sum_combine), mask=mask_c)


_act_stats = _Kernel(_act_stats_kernel, do_not_specialize=('TILES', 'ACT'))
_stats_combine = _Kernel(_stats_combine_kernel, do_not_specialize=('P', 'ROWS', 'HAS_W', 'HAS_B'))
_bn_bwd_coef = _Kernel(_bn_bwd_coef_kernel, do_not_specialize=('P', 'HAS_W'))
_COMBINE_P = 8  # partials per step of the combinations' loops (16 took 134 registers on sm_80)
_COMBINE_C = 64  # channels per combination program
_bn_train_bwd = _Kernel(_bn_train_bwd_kernel, do_not_specialize=('HW', 'TILES', 'ACT'))


def _row_programs(M: int, C: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_C, programs along the rows)`` of the row-walking kernels (``_BWD_TILES`` tiles each)."""
    BLOCK_M = _tile_rows(M, _BWD_BLOCK_M, C)
    return BLOCK_M, _line_c(C, dtype), _cdiv(_cdiv(M, BLOCK_M), _BWD_TILES)


class BatchNormStats(NamedTuple):
    """A training-mode BatchNorm's per-channel quantities for one batch (fp32; fp64 for fp64)."""
    mean: torch.Tensor
    var: torch.Tensor  # biased: what normalises
    invstd: torch.Tensor
    scale: torch.Tensor  # weight * invstd
    shift: torch.Tensor  # bias - mean * scale
    var_unbiased: torch.Tensor  # what the running variance follows


def bn_batch_stats(t: torch.Tensor, act: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> BatchNormStats:
    """Batch mean and biased variance of ``act(t)`` over the rows of a row-major ``[M, C]`` ``t`` (one read of
    ``t``), and what training-mode BatchNorm derives from them (``weight``/``bias``: its affine, or ``None``), in fp32
    (fp64 for fp64); two launches."""
    M, C = t.shape
    t = t.contiguous()
    BLOCK_M, BLOCK_C, programs = _row_programs(M, C, t.dtype)
    acc = _torch_acc_dtype(t.dtype)
    part = torch.empty((3, programs, C), dtype=acc, device=t.device)
    _act_stats.launch(
        (programs, _cdiv(C, BLOCK_C)), t, part, M, C, _BWD_TILES, act,
        ACC_DTYPE=_acc_dtype(t.dtype), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=_NUM_WARPS, device=t.device)
    stats = torch.empty((len(BatchNormStats._fields), C), dtype=acc, device=t.device)
    block_c = min(_COMBINE_C, _next_pow2(C))
    _stats_combine.launch(
        (_cdiv(C, block_c),), part, stats, stats if weight is None else weight.contiguous(),
        stats if bias is None else bias.contiguous(), M, C, programs, BLOCK_M * _BWD_TILES, *_split(eps),
        *_split(M / max(M - 1, 1)), weight is not None, bias is not None,
        OUT_DTYPE=_acc_dtype(t.dtype), BLOCK_P=_COMBINE_P, BLOCK_C=block_c, num_warps=_NUM_WARPS, device=t.device)
    return BatchNormStats(*stats.unbind(0))


def _split(v: float) -> Tuple[float, float]:
    """``v`` as two float32 values whose sum is ``v`` to ~1e-16 (see ``_stats_combine_kernel``)."""
    hi = struct.unpack('f', struct.pack('f', v))[0]
    return hi, v - hi


def bn_train_bwd(
        grad_out: torch.Tensor, t: torch.Tensor, act: int, mean: torch.Tensor, invstd: torch.Tensor,
        weight: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None, rows_per_sample: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``y = weight * (act(t) - mean) * invstd + bias`` where mean and invstd are ``act(t)``'s batch
    statistics, for ``[M, C]`` rows, with ``grad_out`` first multiplied by the per-sample ``mask`` (drop path).

    Returns ``(grad_t, grad_weight, grad_bias)``: ``grad_t`` in ``t``'s dtype; ``sum(dy * xhat)`` and ``sum(dy)``
    in fp32 (fp64 for fp64) -- ``weight``'s and ``bias``'s gradients. Two reads of ``t`` and ``grad_out``.
    """
    M, C = t.shape
    t = t.contiguous()
    grad_out = grad_out.contiguous()
    acc_t = _torch_acc_dtype(t.dtype)
    BLOCK_M, BLOCK_C, programs = _row_programs(M, C, t.dtype)
    grid = (programs, _cdiv(C, BLOCK_C))
    mask_arg = t if mask is None else mask.contiguous()
    coef = torch.empty((5, C), dtype=acc_t, device=t.device)
    torch.stack((mean.to(acc_t), invstd.to(acc_t)), out=coef[:2])
    part = torch.empty((2, programs, C), dtype=acc_t, device=t.device)
    meta = dict(ACC_DTYPE=_acc_dtype(t.dtype), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, HAS_MASK=mask is not None,
                num_warps=_NUM_WARPS, device=t.device)
    _bn_train_bwd.launch(grid, t, grad_out, mask_arg, coef, t, part, M, C, rows_per_sample, _BWD_TILES, act,
                         REDUCE=True, **meta)
    sums = torch.empty((2, C), dtype=acc_t, device=t.device)
    block_c = min(_COMBINE_C, _next_pow2(C))
    _bn_bwd_coef.launch(
        (_cdiv(C, block_c),), part, coef, coef if weight is None else weight.contiguous(), sums, M, C, programs,
        weight is not None, OUT_DTYPE=_acc_dtype(t.dtype), BLOCK_P=_COMBINE_P, BLOCK_C=block_c,
        num_warps=_NUM_WARPS, device=t.device)
    s_dy, s_dyx = sums.unbind(0)
    grad_t = torch.empty_like(t)
    _bn_train_bwd.launch(grid, t, grad_out, mask_arg, coef, grad_t, part, M, C, rows_per_sample, _BWD_TILES, act,
                         REDUCE=False, **meta)
    return grad_t, s_dyx, s_dy


# --------------------------------------------------------------------------------------------------------------------
# pointwise conv: GEMM with the bias + act + affine epilogue fused


def _pw_fwd_kernel(
        x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr, p_ptr,
        M, N, K, ACT, HAS_BIAS, STORE_P,
        ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out = scale * act(x @ w.T + b) + shift`` (and ``p = x @ w.T + b`` when ``STORE_P``); ``x`` ``[M, K]``,
    ``w`` ``[N, K]`` (a conv weight as it is), row-major. Tiles are visited in groups of ``GROUP_M`` row tiles so
    a group's ``w`` columns stay in L2. ``DOT_UPCAST`` (the interpreter only) multiplies in fp32."""
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_tile = x_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_tile = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N] of w.T
    acc = tl.full((BLOCK_M, BLOCK_N), 0., ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_tile, mask=mask_m[:, None] & mask_k[None, :], other=0.)
        b = tl.load(w_tile, mask=mask_k[:, None] & mask_n[None, :], other=0.)
        if DOT_UPCAST:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        x_tile += BLOCK_K
        w_tile += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.).to(ACC_DTYPE)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    m_out = mask_m[:, None] & mask_n[None, :]
    if STORE_P:
        tl.store(p_ptr + offs, acc.to(p_ptr.dtype.element_ty), mask=m_out)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=0.).to(ACC_DTYPE)
    y = _act(acc, ACT) * scale[None, :] + shift[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m_out)


_pw_fwd = _Kernel(_pw_fwd_kernel, do_not_specialize=('ACT', 'HAS_BIAS', 'STORE_P'))


def _fp32_dot_precision() -> str:
    """What cuBLAS would do for an fp32 matmul: TF32 tensor cores only when PyTorch allows them."""
    precision = getattr(torch.backends.cuda.matmul, 'fp32_precision', 'none')
    if precision in ('tf32', 'ieee'):
        return precision
    try:
        return 'tf32' if torch.backends.cuda.matmul.allow_tf32 else 'ieee'
    except RuntimeError:  # legacy flag unreadable once the new API was used
        return 'ieee'


def _pw_config(dtype: torch.dtype, precision: str, M: int, N: int, K: int) -> Dict[str, int]:
    """Tiles for the fused GEMM: 128x64 on tensor cores for 16-bit inputs and TF32 (128x128 would hold 64 accumulators
    per thread and, with the epilogue, exceed 128 registers), smaller for ieee fp32 and fp64 (CUDA-core FMA), half as
    tall for channel counts that are not multiples of 16; clipped for tiny problems (tl.dot needs 16 at least)."""
    if dtype in (torch.float16, torch.bfloat16):
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)
    elif dtype == torch.float32 and precision == 'tf32':
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)
    elif dtype == torch.float32:  # FMA: operands of a whole K step sit in registers, so a short one
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)
    else:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)
    if N % 16 or K % 16:  # rows not known to be aligned: element-wise loads, an address per element (see _tile_rows)
        cfg['BLOCK_M'] //= 2
        cfg['BLOCK_K'] = 16
    for name, n in (('BLOCK_M', M), ('BLOCK_N', N), ('BLOCK_K', K)):
        cfg[name] = max(16, min(cfg[name], _next_pow2(n)))
    return cfg


def pw_fwd(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        scale: torch.Tensor,
        shift: torch.Tensor,
        act: int,
        store_p: bool,
        dot_precision: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale * act(x @ weight.T + bias) + shift, p)`` for ``x`` ``[M, K]`` and ``weight`` ``[N, K]``, in ``x``'s
    dtype with fp32 accumulation (fp64 for fp64; fp32 inputs on TF32 tensor cores only when PyTorch allows TF32 for
    matmuls). ``p = x @ weight.T + bias`` is written only when ``store_p`` (for the backward); otherwise it comes back
    empty. ``dot_precision`` (``'ieee'``/``'tf32'``) overrides PyTorch's fp32 matmul setting."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    p = torch.empty((M, N) if store_p else (0,), dtype=x.dtype, device=x.device)
    precision = (dot_precision or _fp32_dot_precision()) if x.dtype == torch.float32 else 'ieee'
    cfg = _pw_config(x.dtype, precision, M, N, K)
    grid = (_cdiv(M, cfg['BLOCK_M']) * _cdiv(N, cfg['BLOCK_N']),)
    _pw_fwd.launch(
        grid, x, weight, bias if bias is not None else weight, scale.contiguous(), shift.contiguous(), out,
        p if store_p else out, M, N, K, act, bias is not None, store_p,
        ACC_DTYPE=_acc_dtype(x.dtype), DOT_PRECISION=precision, GROUP_M=8, **cfg, device=x.device,
        # Triton 3.8's interpreter multiplies bf16 operands' bit patterns as integers; bf16 products are exact in
        # fp32, so upcasting first gives what the GPU's bf16 dot gives
        DOT_UPCAST=x.device.type == 'cpu' and x.dtype == torch.bfloat16)
    return out, p


def pw_bwd(
        grad_out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        p: torch.Tensor,
        scale: torch.Tensor,
        act: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`pw_fwd`'s output wrt ``(x, weight, bias, scale, shift)`` from the saved pre-activation
    ``p``: the epilogue's gradient in one kernel (``gp`` and every per-channel sum), then two GEMMs in torch. The
    per-channel gradients come back in fp32 (fp64 for fp64)."""
    gp, g_scale, g_shift, g_bias = _act_affine_bwd_launch(grad_out, p, scale, act)
    gx = gp.mm(weight)
    g_weight = gp.t().mm(x)
    return gx, g_weight, g_bias, g_scale, g_shift


def kernels() -> Dict[str, _Kernel]:
    """Every kernel of this module by name (what a launch record's ``kernel.name`` refers to)."""
    return {k.name: k for k in (_dw_fwd, _dw_bwd_gz, _dw_bwd_gx, _dw_bwd_gw, _act_affine_fwd, _act_affine_bwd,
                                _act_stats, _stats_combine, _bn_train_bwd, _bn_bwd_coef, _pw_fwd)}
