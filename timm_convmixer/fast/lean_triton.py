"""The lean training block's normalisations and depthwise convolution as Triton kernels: fewer passes over the
activations on a GPU, and no cuDNN depthwise kernel in the channels_last layout.

The lean block (:mod:`.lean`) keeps what it keeps whichever implementation runs its two ``residual + mask *
bn(act(t))`` steps; this one changes how many times they read and write memory. Per step, on ``[N*H*W, C]`` rows in
channels_last order:

* forward: one read of ``t`` for the batch statistics of ``act(t)`` (:func:`.triton_kernels.bn_batch_stats`: shifted
  sums, combined exactly by one more small launch that also derives invstd, scale, shift and the unbiased variance,
  so the host issues a handful of launches per step rather than ~35 ops on ``[C]`` vectors), then one pass that
  applies activation, normalisation, the per-sample drop-path factor and the residual add
  (:func:`.triton_kernels.act_affine_fwd`). torch's kernels make an activation pass, BatchNorm's two,
  a drop-path multiply and a residual add: 5-6 reads or writes of a full tensor more per step;
* backward: two passes (:func:`.triton_kernels.bn_train_bwd`: the per-channel sums, then the input gradient with the
  activation's derivative and the drop-path factor folded in) instead of an activation recompute, BatchNorm's
  backward and the activation's backward as separate kernels; the recomputed ``u`` is one more pass of
  ``act_affine_fwd``.

The depthwise convolution runs on the Triton kernels too (:func:`.triton_kernels.dw_conv` forward and again in
backward; :func:`.triton_kernels.dw_conv_bwd`: the input gradient with the residual's added in the same pass, and
the weight gradient); the pointwise one stays cuBLAS's. The running statistics are advanced in torch ops on ``[C]``
vectors with eager's rule (momentum or cumulative average, unbiased variance, ``num_batches_tracked``).
Statistics accumulate in fp32 whatever the activations' dtype, as cuDNN's BatchNorm does; results match eager
within the dtype's precision, not bit for bit (one rounding instead of several).

Whether this beats torch's kernels on a given GPU is not assumed: ``auto`` times it against the plain modules (and
against the torch-ops lean block) on first use, like every fused path. Under ``TRITON_INTERPRET=1`` it runs on CPU
tensors, which is how the tests check it.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import triton_kernels as K
from .eligibility import BlockParts, scale_shift
from .lean import SavedNorm, TorchNorm, check_batch_size, lean_applies, update_running_stats
from .runtime import TRITON_DTYPES, conv_dtype, triton_device

__all__ = ['TritonNorm', 'applies']


def _out_dtype(t: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
    """What eager's ``residual + bn(act(t))`` gives: BatchNorm keeps ``t``'s dtype, the add promotes."""
    return t.dtype if residual is None else torch.promote_types(t.dtype, residual.dtype)


def _mask_vector(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if mask is None else mask.reshape(-1)


class TritonNorm:
    """:class:`.lean.TorchNorm`'s interface on the Triton kernels (channels_last in, channels_last out): the
    normalisations and the depthwise convolution."""
    name = 'lean_triton'
    # the pointwise convolution stays cuBLAS's, as torch runs it
    pointwise = staticmethod(TorchNorm.pointwise)
    pointwise_backward = staticmethod(TorchNorm.pointwise_backward)

    @staticmethod
    def conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution (a "same" one: :func:`.eligibility.block_parts` checked) on the Triton kernel,
        in the dtype autocast would run it in. With cuDNN's depthwise convolution in channels_last, the layout these
        steps keep, this block was 3x slower than the plain modules on an H200 (bf16, k9, 1536 channels at 32x32);
        with this kernel it is 2x faster."""
        return TritonNorm.conv_again(conv, x, conv.weight, conv.bias, (False,) * 3)[0]

    @staticmethod
    def conv_again(conv: nn.Conv2d, x, weight, bias, needs):
        """``(z, saved)``: the convolution recomputed, and its inputs in the compute dtype for the gradients."""
        dtype = conv_dtype(x)
        x_c, w_c = x.to(dtype), weight.detach().to(dtype)
        b_c = None if bias is None else bias.detach().to(dtype)
        return K.dw_conv(x_c, w_c, b_c), (x_c, w_c, weight, bias)

    @staticmethod
    def conv_backward(saved, grad_z, grad_residual, needs):
        x_c, w_c, weight, bias = saved
        grad_x, grad_w, grad_b = K.dw_conv_bwd(grad_z, x_c, w_c, grad_residual, needs)
        return (grad_x, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype))

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """channels_last, the kernels' row layout: an NCHW input is converted once, at the first block (its output
        stays channels_last, like the CPU fast path's; values are unchanged)."""
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def forward(bn: nn.BatchNorm2d, t, act: str, weight, bias, mask=None,
                residual=None) -> Tuple[torch.Tensor, SavedNorm]:
        check_batch_size(bn, t)
        t = t.contiguous(memory_format=torch.channels_last)
        code = K.ACT_BY_NAME[act]
        stats = K.bn_batch_stats(K.rows(t), code, weight, bias, bn.eps)
        update_running_stats(bn, stats.mean, stats.var_unbiased)
        out = TritonNorm._normalize(t, code, stats.scale, stats.shift, mask, residual)
        return out, SavedNorm(None, stats.mean, stats.invstd, stats.mean.new_empty(0), -1)

    @staticmethod
    def again(bn, t, act: str, weight, bias, mean, invstd, mask=None, residual=None):
        t = t.contiguous(memory_format=torch.channels_last)
        return TritonNorm._apply(t, K.ACT_BY_NAME[act], weight, bias, mean, invstd, mask, residual), None

    @staticmethod
    def _apply(t, code: int, weight, bias, mean, invstd, mask, residual) -> torch.Tensor:
        scale, shift = scale_shift(weight, bias, mean.to(invstd.dtype), invstd)
        return TritonNorm._normalize(t, code, scale, shift, mask, residual)

    @staticmethod
    def _normalize(t, code: int, scale, shift, mask, residual) -> torch.Tensor:
        """``residual + mask * (scale * act(t) + shift)`` in one pass."""
        res = None if residual is None else K.rows(residual.contiguous(memory_format=torch.channels_last))
        out = K.act_affine_fwd(K.rows(t), scale, shift, code, residual=res, mask=_mask_vector(mask),
                               rows_per_sample=t.shape[2] * t.shape[3], out_dtype=_out_dtype(t, residual))
        return K.image(out, t)

    @staticmethod
    def backward(bn, norm: SavedNorm, t, act: str, grad, weight, needs, mask=None, act_out=None, into_gemm=False):
        t = t.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_t, grad_w, grad_b = K.bn_train_bwd(
            K.rows(grad), K.rows(t), K.ACT_BY_NAME[act], norm.save_mean, norm.save_var, weight,
            _mask_vector(mask), t.shape[2] * t.shape[3])
        grad_w = grad_w.to(weight.dtype) if weight is not None and needs[0] else None
        grad_b = grad_b.to(bn.bias.dtype) if bn.bias is not None and needs[1] else None
        return K.image(grad_t, t), grad_w, grad_b


def applies(parts: BlockParts, x: torch.Tensor) -> bool:
    """Where the fused normalisations may run: what the lean block needs, on a Triton device (CUDA, or CPU tensors
    under ``TRITON_INTERPRET=1``), in a floating dtype the kernels take, images within 32-bit offsets."""
    if not lean_applies(parts, x):
        return False
    if not triton_device(x):
        return False
    dtype = conv_dtype(x)
    if dtype not in TRITON_DTYPES or x.dtype not in TRITON_DTYPES:
        return False
    for bn in (parts.bn_dw, parts.bn_pw):
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if t is not None and (t.device != x.device or t.dtype not in (torch.float32, torch.float64)):
                return False
    _, C, H, W = x.shape
    return H * W * C < 2 ** 31
