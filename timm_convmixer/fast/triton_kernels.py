"""Raw Triton kernels for the ConvMixer block, with their launch helpers.

Everything here works on NHWC memory (a ``channels_last`` NCHW tensor is exactly that), so channels are the
contiguous, vectorised axis and a depthwise tap is one coalesced row load per pixel.

Kernels (``ACT``: 0 identity, 1 GELU (exact, erf form), 2 ReLU):

* ``dw_fwd``: ``y = x + scale * act(dwconv_kxk(x) + b) + shift`` -- the whole depthwise residual branch of a block
  with eval-mode BatchNorm folded into a per-channel ``scale``/``shift``, one read of ``x`` (taps hit cache), one write.
* ``dw_bwd_gz``: recomputes ``z = dwconv(x) + b`` (nothing but ``x`` is saved for backward), writes
  ``gz = gy * scale * act'(z)`` in the accumulation dtype, and per-program partial sums for the gradients of
  ``scale``, ``shift`` and ``b``.
* ``dw_bwd_gx``: ``gx = gy + conv_transpose(gz, w)`` (the residual's gradient plus the conv's).
* ``dw_bwd_gw``: per-tap partial sums of ``gz * shifted x``, split over rows for parallelism.
* ``act_affine_fwd`` / ``act_affine_bwd``: the pointwise conv's epilogue ``scale * act(p) + shift`` on the GEMM output
  ``p`` (bias already added by ``addmm``), and its gradient.

Partial sums go to ``[programs, ...]`` buffers reduced by ``torch.sum`` rather than atomics, so results are
deterministic run to run.

Every kernel also runs under Triton's CPU interpreter: launching with CPU tensors uses an ``InterpretedFunction`` of
the same source, whatever ``TRITON_INTERPRET`` was at import time. That is for testing only (it is very slow).
For that to work the kernels call only ``triton.language`` *builtins*: library functions that are themselves
``@triton.jit`` (``tl.sum``, ``tl.cdiv``, ``tl.zeros``) stay compiled-only when triton was imported without the
variable, so the kernels spell them out (``tl.reduce(v, 0, _sum_combine)`` is exactly what ``tl.sum`` lowers to;
the interpreter recognises that combine function and sums with numpy).
"""
from typing import Any, Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.standard import _sum_combine

__all__ = [
    'ACT_IDENTITY', 'ACT_GELU', 'ACT_RELU',
    'dw_fwd', 'dw_bwd', 'act_affine_fwd', 'act_affine_bwd',
]

ACT_IDENTITY = 0
ACT_GELU = 1
ACT_RELU = 2

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


class _Kernel:
    """One kernel source, compiled by ``triton.jit`` for GPU tensors and interpreted for CPU tensors.

    ``triton.jit`` decides between compiling and interpreting when the decorator runs (reading ``TRITON_INTERPRET``),
    so a module imported before a test sets the variable would be stuck with the compiler. Keeping both lets the
    tests drive the very same source through the interpreter without subprocesses or module reloads.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.jit = triton.jit(fn)
        self._interp = None

    def interp(self):
        if self._interp is None:
            from triton.runtime.interpreter import InterpretedFunction
            self._interp = InterpretedFunction(self.fn)
        return self._interp

    def launch(self, grid: Tuple[int, ...], *args: Any, device: torch.device, **kwargs: Any) -> None:
        kernel = self.interp() if device.type == 'cpu' else self.jit
        kernel[grid](*args, **kwargs)


def _acc_dtype(dtype: torch.dtype):
    """fp32 accumulation for every dtype but fp64 (kept exact so tests can compare to float64 references)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_c(C: int) -> int:
    return min(64, triton.next_power_of_2(C))


def _block_w(W: int) -> int:
    return min(32, triton.next_power_of_2(W))


# --------------------------------------------------------------------------------------------------------------------
# depthwise conv + bias + act + affine + residual


def _dw_fwd_kernel(
        x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr,
        H, W, C,
        K: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACC_DTYPE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_row = tl.program_id(0)  # (n, h, w-block)
    pid_c = tl.program_id(1)
    num_wb = (W + BLOCK_W - 1) // BLOCK_W
    wb = pid_row % num_wb
    nh = (pid_row // num_wb).to(tl.int64)
    h = nh % H
    n = nh // H
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_w = offs_w < W
    mask_c = offs_c < C

    acc = tl.full((BLOCK_W, BLOCK_C), 0., ACC_DTYPE)
    zero_w = tl.full((BLOCK_W,), 0, tl.int64)
    for i in range(K):
        hh = h + i - PAD
        hh_w = zero_w + hh  # a vector: the interpreter mis-types scalar-bool & vector-bool
        row_ok = (hh_w >= 0) & (hh_w < H)
        row_base = (n * H + hh) * W
        for j in tl.static_range(K):
            ww = offs_w + (j - PAD)
            m = (row_ok & (ww >= 0) & (ww < W))[:, None] & mask_c[None, :]
            xv = tl.load(x_ptr + (row_base + ww)[:, None] * C + offs_c[None, :], mask=m, other=0.)
            wv = tl.load(w_ptr + (i * K + j) * C + offs_c, mask=mask_c, other=0.)
            acc += xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)[None, :]

    if ACT == 1:
        a = 0.5 * acc * (1. + tl.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        a = tl.maximum(acc, 0.)
    else:
        a = acc
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)

    offs = ((n * H + h) * W + offs_w)[:, None] * C + offs_c[None, :]
    m_out = mask_w[:, None] & mask_c[None, :]
    res = tl.load(x_ptr + offs, mask=m_out, other=0.).to(ACC_DTYPE)
    y = res + a * scale[None, :] + shift[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m_out)


def _dw_bwd_gz_kernel(
        x_ptr, w_ptr, b_ptr, scale_ptr, gy_ptr, gz_ptr, part_ptr,
        H, W, C,
        K: tl.constexpr, PAD: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACC_DTYPE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_row = tl.program_id(0)
    pid_c = tl.program_id(1)
    num_wb = (W + BLOCK_W - 1) // BLOCK_W
    wb = pid_row % num_wb
    nh = (pid_row // num_wb).to(tl.int64)
    h = nh % H
    n = nh // H
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_w = offs_w < W
    mask_c = offs_c < C

    # recompute z = dwconv(x) + b: cheaper than storing it in forward for a memory-bound block
    acc = tl.full((BLOCK_W, BLOCK_C), 0., ACC_DTYPE)
    zero_w = tl.full((BLOCK_W,), 0, tl.int64)
    for i in range(K):
        hh = h + i - PAD
        hh_w = zero_w + hh  # a vector: the interpreter mis-types scalar-bool & vector-bool
        row_ok = (hh_w >= 0) & (hh_w < H)
        row_base = (n * H + hh) * W
        for j in tl.static_range(K):
            ww = offs_w + (j - PAD)
            m = (row_ok & (ww >= 0) & (ww < W))[:, None] & mask_c[None, :]
            xv = tl.load(x_ptr + (row_base + ww)[:, None] * C + offs_c[None, :], mask=m, other=0.)
            wv = tl.load(w_ptr + (i * K + j) * C + offs_c, mask=mask_c, other=0.)
            acc += xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)[None, :]

    if ACT == 1:
        cdf = 0.5 * (1. + tl.erf(acc * 0.7071067811865476))
        a = acc * cdf
        da = cdf + acc * tl.exp(-0.5 * acc * acc) * 0.3989422804014327
    elif ACT == 2:
        a = tl.maximum(acc, 0.)
        da = tl.where(acc > 0., 1., 0.).to(ACC_DTYPE)
    else:
        a = acc
        da = tl.full((BLOCK_W, BLOCK_C), 1., ACC_DTYPE)

    offs = ((n * H + h) * W + offs_w)[:, None] * C + offs_c[None, :]
    m_out = mask_w[:, None] & mask_c[None, :]
    gy = tl.load(gy_ptr + offs, mask=m_out, other=0.).to(ACC_DTYPE)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    gz = gy * scale[None, :] * da
    gz = tl.where(m_out, gz, 0.)
    tl.store(gz_ptr + offs, gz, mask=m_out)

    # partials [3, programs, C]: d scale, d shift, d bias
    num_rows = tl.num_programs(0)
    part = part_ptr + pid_row.to(tl.int64) * C + offs_c
    tl.store(part, tl.reduce(tl.where(m_out, gy * a, 0.), 0, _sum_combine), mask=mask_c)
    tl.store(part + num_rows * C, tl.reduce(gy, 0, _sum_combine), mask=mask_c)
    tl.store(part + 2 * num_rows * C, tl.reduce(gz, 0, _sum_combine), mask=mask_c)


def _dw_bwd_gx_kernel(
        gz_ptr, w_ptr, gy_ptr, gx_ptr,
        H, W, C,
        K: tl.constexpr, PAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_row = tl.program_id(0)
    pid_c = tl.program_id(1)
    num_wb = (W + BLOCK_W - 1) // BLOCK_W
    wb = pid_row % num_wb
    nh = (pid_row // num_wb).to(tl.int64)
    h = nh % H
    n = nh // H
    offs_w = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_w = offs_w < W
    mask_c = offs_c < C

    # x[h, w] fed z[h - i + PAD, w - j + PAD] through tap (i, j): the transposed convolution
    acc = tl.full((BLOCK_W, BLOCK_C), 0., ACC_DTYPE)
    zero_w = tl.full((BLOCK_W,), 0, tl.int64)
    for i in range(K):
        hh = h - i + PAD
        hh_w = zero_w + hh  # a vector: the interpreter mis-types scalar-bool & vector-bool
        row_ok = (hh_w >= 0) & (hh_w < H)
        row_base = (n * H + hh) * W
        for j in tl.static_range(K):
            ww = offs_w - (j - PAD)
            m = (row_ok & (ww >= 0) & (ww < W))[:, None] & mask_c[None, :]
            gv = tl.load(gz_ptr + (row_base + ww)[:, None] * C + offs_c[None, :], mask=m, other=0.)
            wv = tl.load(w_ptr + (i * K + j) * C + offs_c, mask=mask_c, other=0.)
            acc += gv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]

    offs = ((n * H + h) * W + offs_w)[:, None] * C + offs_c[None, :]
    m_out = mask_w[:, None] & mask_c[None, :]
    gy = tl.load(gy_ptr + offs, mask=m_out, other=0.).to(ACC_DTYPE)
    tl.store(gx_ptr + offs, (acc + gy).to(gx_ptr.dtype.element_ty), mask=m_out)


def _dw_bwd_gw_kernel(
        gz_ptr, x_ptr, part_ptr,
        NH, H, W, C, SPLIT,
        K: tl.constexpr, PAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tap = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    i = tap // K
    j = tap % K
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    acc = tl.full((BLOCK_W, BLOCK_C), 0., ACC_DTYPE)
    zero_w = tl.full((BLOCK_W,), 0, tl.int64)
    zero64 = pid_s.to(tl.int64) * 0
    for r in range(pid_s, NH, SPLIT):
        r64 = r + zero64  # int64 row index (the interpreter's loop variable is a Python int, without .to)
        h = r64 % H
        hh = h + i - PAD
        hh_w = zero_w + hh  # a vector: the interpreter mis-types scalar-bool & vector-bool
        row_ok = (hh_w >= 0) & (hh_w < H)
        src_base = (r64 + (i - PAD)) * W  # (n * H + hh) * W, same image since hh is checked against [0, H)
        dst_base = r64 * W
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            ww = offs_w + (j - PAD)
            m_gz = (offs_w < W)[:, None] & mask_c[None, :]
            m_x = (row_ok & (ww >= 0) & (ww < W))[:, None] & m_gz
            gv = tl.load(gz_ptr + (dst_base + offs_w)[:, None] * C + offs_c[None, :], mask=m_gz, other=0.)
            xv = tl.load(x_ptr + (src_base + ww)[:, None] * C + offs_c[None, :], mask=m_x, other=0.)
            acc += gv.to(ACC_DTYPE) * xv.to(ACC_DTYPE)
    # partials [SPLIT, K*K, C]
    out = part_ptr + (pid_s.to(tl.int64) * K * K + tap) * C + offs_c
    tl.store(out, tl.reduce(acc, 0, _sum_combine), mask=mask_c)


_dw_fwd = _Kernel(_dw_fwd_kernel)
_dw_bwd_gz = _Kernel(_dw_bwd_gz_kernel)
_dw_bwd_gx = _Kernel(_dw_bwd_gx_kernel)
_dw_bwd_gw = _Kernel(_dw_bwd_gw_kernel)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW tensor -> contiguous NHWC tensor (free for a ``channels_last`` input)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise weight ``[C, 1, k, k]`` -> ``[k*k, C]``, so each tap's per-channel weights are one coalesced load."""
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
    N, C, H, W = x.shape
    k = weight.shape[-1]
    x_nhwc = _nhwc(x)
    out = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    w_taps = _taps(weight)
    BLOCK_W, BLOCK_C = _block_w(W), _block_c(C)
    grid = (N * H * triton.cdiv(W, BLOCK_W), triton.cdiv(C, BLOCK_C))
    _dw_fwd.launch(
        grid, x_nhwc, w_taps, bias if bias is not None else w_taps, scale.contiguous(), shift.contiguous(),
        out.permute(0, 2, 3, 1), H, W, C,
        K=k, PAD=(k - 1) // 2, ACT=act, HAS_BIAS=bias is not None, ACC_DTYPE=_acc_dtype(x.dtype),
        BLOCK_W=BLOCK_W, BLOCK_C=BLOCK_C, num_warps=4, device=x.device)
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
    pad = (k - 1) // 2
    acc_t = _torch_acc_dtype(x.dtype)
    x_nhwc = _nhwc(x)
    gy_nhwc = _nhwc(grad_out)
    w_taps = _taps(weight)
    BLOCK_W, BLOCK_C = _block_w(W), _block_c(C)
    rows = N * H * triton.cdiv(W, BLOCK_W)
    grid = (rows, triton.cdiv(C, BLOCK_C))
    acc_dtype = _acc_dtype(x.dtype)

    gz = torch.empty((N, H, W, C), dtype=acc_t, device=x.device)
    part = torch.empty((3, rows, C), dtype=acc_t, device=x.device)
    _dw_bwd_gz.launch(
        grid, x_nhwc, w_taps, bias if bias is not None else w_taps, scale.contiguous(), gy_nhwc, gz, part,
        H, W, C, K=k, PAD=pad, ACT=act, HAS_BIAS=bias is not None, ACC_DTYPE=acc_dtype,
        BLOCK_W=BLOCK_W, BLOCK_C=BLOCK_C, num_warps=4, device=x.device)
    g_scale, g_shift, g_bias = part.sum(dim=1).unbind(0)

    gx = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    _dw_bwd_gx.launch(
        grid, gz, w_taps, gy_nhwc, gx.permute(0, 2, 3, 1), H, W, C,
        K=k, PAD=pad, ACC_DTYPE=acc_dtype, BLOCK_W=BLOCK_W, BLOCK_C=BLOCK_C, num_warps=4, device=x.device)

    NH = N * H
    split = max(1, min(NH, 64))
    part_w = torch.empty((split, k * k, C), dtype=acc_t, device=x.device)
    _dw_bwd_gw.launch(
        (k * k, triton.cdiv(C, BLOCK_C), split), gz, x_nhwc, part_w, NH, H, W, C, split,
        K=k, PAD=pad, ACC_DTYPE=acc_dtype, BLOCK_W=BLOCK_W, BLOCK_C=BLOCK_C, num_warps=4, device=x.device)
    g_weight = part_w.sum(dim=0).t().reshape(C, 1, k, k)
    return gx, g_weight, g_bias, g_scale, g_shift


# --------------------------------------------------------------------------------------------------------------------
# pointwise conv epilogue: scale * act(p) + shift on the GEMM output


def _act_affine_fwd_kernel(
        p_ptr, scale_ptr, shift_ptr, out_ptr, M, C,
        ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    m = (offs_m < M)[:, None] & mask_c[None, :]
    offs = offs_m[:, None] * C + offs_c[None, :]
    p = tl.load(p_ptr + offs, mask=m, other=0.).to(ACC_DTYPE)
    if ACT == 1:
        a = 0.5 * p * (1. + tl.erf(p * 0.7071067811865476))
    elif ACT == 2:
        a = tl.maximum(p, 0.)
    else:
        a = p
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    y = a * scale[None, :] + shift[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _act_affine_bwd_kernel(
        p_ptr, scale_ptr, gy_ptr, gp_ptr, part_ptr, M, C,
        ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    m = (offs_m < M)[:, None] & mask_c[None, :]
    offs = offs_m[:, None] * C + offs_c[None, :]
    p = tl.load(p_ptr + offs, mask=m, other=0.).to(ACC_DTYPE)
    gy = tl.load(gy_ptr + offs, mask=m, other=0.).to(ACC_DTYPE)
    if ACT == 1:
        cdf = 0.5 * (1. + tl.erf(p * 0.7071067811865476))
        a = p * cdf
        da = cdf + p * tl.exp(-0.5 * p * p) * 0.3989422804014327
    elif ACT == 2:
        a = tl.maximum(p, 0.)
        da = tl.where(p > 0., 1., 0.).to(ACC_DTYPE)
    else:
        a = p
        da = tl.full((BLOCK_M, BLOCK_C), 1., ACC_DTYPE)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.).to(ACC_DTYPE)
    gp = gy * scale[None, :] * da
    tl.store(gp_ptr + offs, gp.to(gp_ptr.dtype.element_ty), mask=m)
    num_m = tl.num_programs(0)
    part = part_ptr + pid_m.to(tl.int64) * C + offs_c
    tl.store(part, tl.reduce(tl.where(m, gy * a, 0.), 0, _sum_combine), mask=mask_c)
    tl.store(part + num_m * C, tl.reduce(gy, 0, _sum_combine), mask=mask_c)


_act_affine_fwd = _Kernel(_act_affine_fwd_kernel)
_act_affine_bwd = _Kernel(_act_affine_bwd_kernel)

_BLOCK_M = 64


def act_affine_fwd(p: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: int) -> torch.Tensor:
    """``scale * act(p) + shift`` for a row-major ``[M, C]`` ``p``, in ``p``'s dtype (fp32 math)."""
    M, C = p.shape
    p = p.contiguous()
    out = torch.empty_like(p)
    BLOCK_C = _block_c(C)
    BLOCK_M = min(_BLOCK_M, triton.next_power_of_2(M))
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_C))
    _act_affine_fwd.launch(
        grid, p, scale.contiguous(), shift.contiguous(), out, M, C,
        ACT=act, ACC_DTYPE=_acc_dtype(p.dtype), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=4, device=p.device)
    return out


def act_affine_bwd(
        grad_out: torch.Tensor, p: torch.Tensor, scale: torch.Tensor, act: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`act_affine_fwd` wrt ``(p, scale, shift)``; the last two in fp32 (fp64 for fp64)."""
    M, C = p.shape
    p = p.contiguous()
    grad_out = grad_out.contiguous()
    gp = torch.empty_like(p)
    BLOCK_C = _block_c(C)
    BLOCK_M = min(_BLOCK_M, triton.next_power_of_2(M))
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(C, BLOCK_C))
    part = torch.empty((2, grid[0], C), dtype=_torch_acc_dtype(p.dtype), device=p.device)
    _act_affine_bwd.launch(
        grid, p, scale.contiguous(), grad_out, gp, part, M, C,
        ACT=act, ACC_DTYPE=_acc_dtype(p.dtype), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, num_warps=4, device=p.device)
    g_scale, g_shift = part.sum(dim=1).unbind(0)
    return gp, g_scale, g_shift
