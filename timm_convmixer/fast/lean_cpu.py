"""The lean training block's normalisations and both convolutions in our compiled CPU kernels.

The lean block (:mod:`.lean`) keeps what it keeps whichever implementation runs its two ``residual + mask *
bn(act(t))`` steps; this one changes how many times a CPU reads and writes memory for them, and whose GEMM runs the
pointwise convolution. Per step:

* forward: one read of ``t`` for the per-channel batch statistics of ``act(t)`` (:func:`.cpu_kernels.bn_act_stats`),
  then one pass applying activation, normalisation, drop path's per-image factor and the residual add
  (:func:`.cpu_kernels.bn_act_apply`), where torch's kernels make an activation pass, BatchNorm's two, a drop-path
  multiply and a residual add; the recomputation in backward is one more apply pass;
* backward: two passes (:func:`.cpu_kernels.bn_act_backward`: the per-channel sums, then the gradient wrt ``t`` with
  the activation's slope and the mask folded in) instead of BatchNorm's backward and the activation's; the pointwise
  half's second pass also sums its gradient per channel (the convolution's bias gradient) and writes it in the
  dtype the GEMMs take (:class:`GemmGrad`);
* the pointwise convolution's forward and its input gradient on our GEMM (:func:`.cpu_kernels.pw_block`, 135-155
  GFLOP/s at 8 x 768 x 32 x 32 and 64 x 256 x 16 x 16 where oneDNN's 1x1 convolution ran 119-130 and MKL's sgemm
  101-109); its weight gradient, a GEMM over all rows, is MKL's; under bf16 autocast on a CPU with native bf16 pairs
  the three GEMMs take bf16 operands, as eager autocast's convolution (:func:`bf16_gemms`);
* the depthwise convolution, forward and recomputed, and its input gradient (the transposed convolution) on
  :func:`.cpu_kernels.dw_block` without its residual (1.2x-3.7x oneDNN's channels_last forward at ConvMixer's
  shapes, fp32, Zen 4), its weight gradient on :func:`.cpu_kernels.dw_weight_grad`;
* every activation-sized tensor these kernels write from :func:`.cpu.training_buffer`: beyond glibc's mmap
  threshold a pooled buffer rather than new pages each time (at 256_8_ks9_p1's 64 x 256 x 32 x 32, one step with
  fresh tensors took 1.36x as long, the same process, Zen 4).

Measured on an AVX2 Zen 3 (2 threads, interleaved medians): a normalisation step alone 2.1x torch's forward and
backward at 8 x 768 x 32 x 32 with ReLU, 1.3x / 1.8x at 64 x 256 x 16 x 16 with GELU; whole training steps in
the README. Activations are kept channels_last, the kernels' row layout: an NCHW input is converted once, at the
first block (its output stays channels_last, like the CPU inference paths'; values are unchanged). Everything is
float32, under bf16 autocast too (:func:`computes`: a bf16 input widened as it is first read, float32 handed on),
but for the pointwise GEMMs' operands where :func:`bf16_gemms`.

Statistics are summed in float over runs of 8 rows and in double beyond, the running statistics advanced with
eager's rule (momentum or cumulative average, unbiased variance, ``num_batches_tracked``); results are not eager's
bit for bit, and against a float64 step they came out as close as eager's fp32 or closer. Whether this beats
torch's kernels on a given CPU is not assumed: ``auto`` checks it against the plain modules (and races it against
the torch-kernel lean block) on first use, like every fast path.
"""
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import cpu_kernels
from .cpu import training_buffer
from .eligibility import BlockParts, scale_shift
from .lean import SavedNorm, TorchNorm, check_batch_size, lean_applies, update_running_stats
from .runtime import autocast_state, rows

__all__ = ['CpuNorm', 'GemmGrad', 'applies', 'bf16_gemms', 'computes', 'gemm', 'takes']


def _is_rows(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``t`` is already as the kernels take it: ``dtype``, channels_last."""
    return t.dtype == dtype and t.is_contiguous(memory_format=torch.channels_last)


def _rows(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``t`` as the kernels take it, channels_last ``dtype`` (a copy where it is not, from
    :func:`.cpu.training_buffer`: under bf16 autocast a bf16 input or gradient is widened to float32, a GEMM's
    float32 operand rounded to bf16)."""
    return t if _is_rows(t, dtype) else training_buffer(t.shape, dtype).copy_(t)


def _mask_vector(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.reshape(-1).float().contiguous()


def gemm(u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv1x1(u, weight) + bias`` (``weight`` as ``(C_out, C_in)`` or ``(C_out, C_in, 1, 1)``) on our GEMM, into a
    pooled float32 buffer (the lean stem's patches times its weight too). A channels_last bfloat16 ``u`` (from
    :func:`_gemm_operand`) is multiplied in bf16 pairs with the weight rounded to bf16, float32 sums; anything else
    in float32."""
    c_out = weight.shape[0]
    if not _is_rows(u, torch.bfloat16):
        u = _rows(u)
    panels = cpu_kernels.pw_pack(weight.detach().reshape(c_out, -1).to(u.dtype).contiguous())
    ones, zeros = weight.new_ones(c_out, dtype=torch.float32), weight.new_zeros(c_out, dtype=torch.float32)
    b = zeros if bias is None else bias.detach().float()
    out = training_buffer((u.shape[0], c_out) + tuple(u.shape[2:]), torch.float32)
    return cpu_kernels.pw_block(u, panels, b, ones, zeros, 'identity', out)


def bf16_gemms(channels: int) -> bool:
    """Whether the pointwise convolution's three GEMMs (forward, input and weight gradients) multiply bf16 pairs:
    under CPU bf16 autocast, as eager autocast's convolution does (bf16 operands, float32 sums), where the CPU does
    that natively (:func:`.cpu_kernels.bf16_dot`: twice the float32 rate; our GEMM 353-425 GFLOP/s against 191-219,
    oneDNN's bf16 weight gradient 374-407 against MKL's float32 174-203, at 64 x 256 x 16 x 16 and 8 x 768 x 32 x 32,
    Zen 4) and the channels pair up (even). Elsewhere, and for everything else a block computes, float32."""
    _, enabled, dtype = autocast_state('cpu')
    return enabled and dtype == torch.bfloat16 and channels % 2 == 0 and cpu_kernels.bf16_dot()


def _gemm_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a GEMM of the pointwise convolution takes it (:func:`_rows`): bf16 where :func:`bf16_gemms`, else
    float32."""
    return _rows(t, torch.bfloat16 if bf16_gemms(t.shape[1]) else torch.float32)


def _depthwise(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], k: int,
               pad: Optional[int] = None, addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``depthwise_conv(x) + bias (+ addend)`` on our kernel (``taps`` as ``(k * k, C)``; "same" padding unless
    ``pad``)."""
    c = x.shape[1]
    b = taps.new_zeros(c) if bias is None else bias.detach().contiguous()
    return cpu_kernels.dw_block(_rows(x), taps, b, taps.new_ones(c), k, 'identity',
                                training_buffer(x.shape, torch.float32), residual=False, pad=pad,
                                addend=None if addend is None else _rows(addend))


def _transposed(weight: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """The taps and padding whose convolution is the transpose of ``weight``'s "same" one (what carries an output
    gradient back to the input): the window turned half a turn, padded ``k // 2`` before. "Same" padding puts
    ``(k - 1) // 2`` before, so an even window's transpose has its extra row and column before rather than after
    (a zero row and column around an odd window would do the same sums, but turn an infinite gradient into NaN
    where eager's stays infinite, and cost 27% more taps at k = 8)."""
    return cpu_kernels.dw_taps(weight.detach().flip(-2, -1)), weight.shape[-1] // 2


class GemmGrad(NamedTuple):
    """The pointwise convolution's output gradient as :meth:`CpuNorm.backward` hands it to
    :meth:`CpuNorm.pointwise_backward`: ``operand``, channels_last in the dtype the GEMMs take, and ``column_sums``,
    its float32 values summed per channel (the convolution's bias gradient)."""
    operand: torch.Tensor
    column_sums: torch.Tensor


class CpuNorm(TorchNorm):
    """:class:`.lean.TorchNorm`'s interface with the normalisation steps, the depthwise convolution (forward, its
    recomputation and both its gradients) and the pointwise convolution in :mod:`.cpu_kernels` (channels_last in,
    channels_last out)."""
    name = 'lean_cpu'

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        return _rows(x)

    @staticmethod
    def conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution on :func:`.cpu_kernels.dw_block` (without its residual): 1.2x-3.7x oneDNN's
        channels_last convolution at ConvMixer's shapes (fp32, Zen 4), into a pooled buffer."""
        return _depthwise(x, cpu_kernels.dw_taps(conv.weight), conv.bias, conv.kernel_size[0])

    @staticmethod
    def conv_again(conv: nn.Conv2d, x, weight, bias, needs):
        return _depthwise(x, cpu_kernels.dw_taps(weight), bias, conv.kernel_size[0]), (x, weight, conv.kernel_size[0])

    @staticmethod
    def conv_backward(saved, grad_z, grad_residual, needs):
        """The input's gradient as the transposed convolution on our kernel, plus ``grad_residual`` as it stores (not
        an add pass after it); the weight's and bias's from :func:`.cpu_kernels.dw_weight_grad`."""
        x, weight, k = saved
        grad_z = _rows(grad_z)
        grad_x = grad_w = grad_b = None
        if needs[0]:
            taps, pad = _transposed(weight)
            grad_x = _depthwise(grad_z, taps, None, k, pad, addend=grad_residual)
        if needs[1] or needs[2]:
            grad_w, grad_b = cpu_kernels.dw_weight_grad(_rows(x), grad_z, k)
        return grad_x, grad_w if needs[1] else None, grad_b if needs[2] else None

    @staticmethod
    def pointwise(conv: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
        """``conv1x1(u) + bias`` on our GEMM (:func:`.cpu_kernels.pw_block`, the weight packed anew each step; in bf16
        pairs where :func:`bf16_gemms`)."""
        return gemm(_gemm_operand(u), conv.weight, conv.bias)

    @staticmethod
    def pointwise_backward(grad_p: GemmGrad, u, dtype, weight, bias, needs):
        """The input's gradient on our GEMM too (``grad_p.operand`` times the weight is a 1x1 convolution with the
        transposed weight); the weight's is torch's GEMM over the rows (MKL's in float32, oneDNN's in bf16 where
        :func:`bf16_gemms`, its bf16 result widened as eager autocast's is); the bias's the column sums
        :meth:`backward` took of the float32 gradient as it wrote it."""
        need_w, need_b = needs
        g = grad_p.operand
        w = weight.detach()
        grad_u = gemm(g, w.reshape(w.shape[0], w.shape[1]).t(), None)
        grad_w = grad_b = None
        if need_w:
            u = _gemm_operand(u)
            with torch.autocast('cpu', enabled=False):  # (backward runs under the forward's autocast)
                grad_w = torch.mm(rows(g).t(), rows(u)).to(weight.dtype).view_as(weight)
        if need_b and bias is not None:
            grad_b = grad_p.column_sums.to(bias.dtype)
        return grad_u, grad_w, grad_b

    @staticmethod
    def forward(bn: nn.BatchNorm2d, t, act: str, weight, bias, mask=None,
                residual=None) -> Tuple[torch.Tensor, SavedNorm]:
        check_batch_size(bn, t)
        t = _rows(t)
        mean, var = cpu_kernels.bn_act_stats(t, act)  # float64, biased
        invstd = (var + bn.eps).rsqrt()
        rows = t.numel() // t.shape[1]
        update_running_stats(bn, mean, var * (rows / (rows - 1)))
        out = CpuNorm._apply(t, act, weight, bias, mean, invstd, mask, residual)
        mean, invstd = mean.float(), invstd.float()
        return out, SavedNorm(None, mean, invstd, mean.new_empty(0), -1)

    @staticmethod
    def again(bn, t, act: str, weight, bias, mean, invstd, mask=None, residual=None):
        return CpuNorm._apply(_rows(t), act, weight, bias, mean, invstd, mask, residual), None

    @staticmethod
    def _apply(t, act: str, weight, bias, mean, invstd, mask, residual) -> torch.Tensor:
        """``residual + mask * bn(act(t))`` with the statistics ``mean``/``invstd``, in one pass. The one with a
        residual is the depthwise half's output ``u``, which feeds the pointwise GEMMs and nothing else: where those
        take bf16 (:func:`bf16_gemms`) it is rounded as it is stored, the value :func:`_gemm_operand` would round it
        to, without the copy (two passes a block saved, forward and recomputation)."""
        scale, shift = scale_shift(weight, bias, mean.double(), invstd.double())
        dtype = torch.float32
        if residual is not None:
            residual = _rows(residual)
            if bf16_gemms(t.shape[1]):
                dtype = torch.bfloat16
        return cpu_kernels.bn_act_apply(t, act, scale.float(), shift.float(), _mask_vector(mask), residual,
                                        training_buffer(t.shape, dtype))

    @staticmethod
    def backward(bn, norm: SavedNorm, t, act: str, grad, weight, needs, mask=None, act_out=None, into_gemm=False):
        """``into_gemm`` (the pointwise half): the gradient wrt ``t`` as a :class:`GemmGrad`, written in the dtype the
        GEMMs take (bf16 where :func:`bf16_gemms`, rounded once on store) with its column sums, the convolution's
        bias gradient, taken on the same pass: a bf16 copy and a column-sum pass saved per block."""
        w = None if weight is None else weight.detach().float().contiguous()
        t = _rows(t)
        dtype = torch.bfloat16 if into_gemm and bf16_gemms(t.shape[1]) else torch.float32
        grad_t, grad_w, grad_b, sums = cpu_kernels.bn_act_backward(
            _rows(grad), t, act, norm.save_mean, norm.save_var, w, _mask_vector(mask), training_buffer(t.shape, dtype),
            out_sums=into_gemm)
        grad_w = grad_w.to(weight.dtype) if weight is not None and needs[0] else None
        grad_b = grad_b.to(bn.bias.dtype) if bn.bias is not None and needs[1] else None
        return (GemmGrad(grad_t, sums) if into_gemm else grad_t), grad_w, grad_b


def computes(x: torch.Tensor) -> bool:
    """Whether these kernels compute a layer on ``x``: float32 with autocast off, or float32 or bf16 under CPU bf16
    autocast. Under bf16 autocast they compute in float32 all the same and hand on float32 (autocast promises bf16
    precision, not bf16 arithmetic; ``auto`` judges the result against an fp32 step, as every path under autocast),
    but for the pointwise GEMMs, in bf16 pairs where the CPU has them (:func:`bf16_gemms`). On a CPU without native
    bf16, eager's bf16 convolutions are emulated 15-20x slower than fp32; where it is native, ``auto``'s check
    decides per case (Zen 4, with the bf16 GEMMs: taken at 256_8_ks5_p2 and 768_32, 1.41x-1.70x the built-in's bf16
    step). fp16 autocast: not taken."""
    _, enabled, dtype = autocast_state('cpu')
    if not enabled:
        return x.dtype == torch.float32
    return dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)


def takes(x: torch.Tensor, modules: Sequence[nn.Module]) -> bool:
    """Whether these kernels take a layer with ``modules``' parameters on ``x`` (the blocks' and the stem's one rule):
    a CPU input they compute on (:func:`computes`), every parameter float32 on the CPU, the kernels loaded (built on
    first use; never where the build is off or failed)."""
    if x.device.type != 'cpu' or not computes(x):
        return False
    for module in modules:
        for t in module.parameters():
            if t.device.type != 'cpu' or t.dtype != torch.float32:
                return False
    return cpu_kernels.load() is not None


def applies(parts: BlockParts, x: torch.Tensor) -> bool:
    """Where these kernels may run: what the lean block needs, a layer they take (:func:`takes`), a window within
    theirs."""
    if not lean_applies(parts, x) or parts.kernel_size > cpu_kernels.MAX_KERNEL_SIZE:
        return False
    return takes(x, (parts.conv_dw, parts.bn_dw, parts.conv_pw, parts.bn_pw))
