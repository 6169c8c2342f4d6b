"""The patch stem on CPU as one matrix product: patches x weight, the activation fused, BatchNorm in place.

Why: the stem is the one layer no block path covers, and eager runs it as three passes over its output (conv, act,
BN), on the NCHW image, through oneDNN's direct convolution for 3 input channels; the first block then turns that
output into channels_last. At convmixer_256_8_ks9_p1's CIFAR shape that was 143 ms of a ~740 ms batch on an
AVX-512 Xeon. A convolution whose kernel equals its stride reads each input pixel once: it is the product of the
image's non-overlapping ``p x p`` patches, one row each, with the weight flattened to ``(dim, 3 * p * p)``. So:

1. gather the patches into a ``(tokens, 3 * p * p)`` matrix (a copy of the image, whose 3 channels make it the
   smallest tensor of the model; rows in (kh, kw, c) order for a channels_last image, (c, kh, kw) for NCHW, so the
   gather reads in memory order; the weight is flattened to match);
2. one oneDNN GEMM with the bias and activation fused (``mkldnn._linear_pointwise``, the op Inductor's CPU backend
   emits for a linear layer): its ``(tokens, dim)`` output *is* the channels_last feature map the blocks read;
3. the eval-mode BatchNorm as ``scale * y + shift``, one in-place ``addcmul`` (folded in float64).

Measured against the eager stem plus the first block's conversion (same process, ad hoc, 2 threads, AVX-512 Xeon):
1.2x-1.3x at patch 14, 1.8x-3.6x at patches 7 and 8, 2.4x-4.4x at patches 1 and 2. Whether it wins on a CPU, auto
checks per case (:func:`timm_convmixer.fast.stem_forward`). It computes in fp32, for fp32 input and under bf16
autocast, rounding its output to bf16 there once (within autocast's precision, as the blocks' kernels give theirs,
and closer to the fp32 stem than the plain bf16 stem). Without native bf16 the plain stem's bf16 convolution is
emulated (15-20x slower than fp32: convmixer_768_32's stem at batch 8, 224px, on an AVX2 Zen 3 ran 787 ms from an
NCHW image and 262 ms from a channels_last one, this path 30 and 24 ms). With native bf16 (an AVX-512 Zen 4) the plain
stem's three bf16 passes cost more than this path's fp32 GEMM where the stem's output is large (patch 1, 64 CIFAR
images: 81 against 41 ms) and less at patch 14 (10 against 13 ms): auto's timing decides. Elsewhere (fp16
autocast, other dtypes) the plain modules run. An input whose size is not a multiple of ``p`` is cropped as the
convolution crops it.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from . import cpu, kept
from .eligibility import StemParts, bn_scale_shift
from .runtime import conv_dtype

__all__ = ['applies', 'available', 'eager', 'forward', 'output_shape']


class _Folded(NamedTuple):
    weight: torch.Tensor  # (dim, 3 * p * p), columns in the patch rows' order
    bias: Optional[torch.Tensor]
    scale: torch.Tensor  # (dim,) the BatchNorm as scale * y + shift
    shift: torch.Tensor


# stem conv -> {patch order: that order's weights, as kept.kept keeps them} (emptied by kept.forget)
_cache = kept.store()


def available() -> bool:
    """oneDNN's fused linear op is present (besides what every CPU path needs)."""
    return cpu.available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


def _channels_last_order(x: torch.Tensor) -> bool:
    """Gather patches in (kh, kw, c) order: the image's memory order when it is channels_last."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _fold(parts: StemParts, channels_last: bool) -> _Folded:
    conv = parts.conv
    with torch.inference_mode(False), torch.no_grad():
        weight = conv.weight.detach()
        if channels_last:
            weight = weight.permute(0, 2, 3, 1)
        scale, shift = bn_scale_shift(parts.bn, torch.float64)
        return _Folded(
            weight=weight.reshape(conv.out_channels, -1).float().contiguous(),
            bias=None if conv.bias is None else conv.bias.detach().float().contiguous(),
            scale=scale.float(), shift=shift.float())


def _patches(x: torch.Tensor, p: int, channels_last: bool) -> torch.Tensor:
    """``(n * h * w, 3 * p * p)``: one row per output pixel, the image cropped to whole patches as the conv does."""
    n, c, height, width = x.shape
    h, w = height // p, width // p
    x = x[:, :, :h * p, :w * p]
    if channels_last:
        return x.permute(0, 2, 3, 1).reshape(n, h, p, w, p, c).permute(0, 1, 3, 2, 4, 5).reshape(n * h * w, -1)
    return x.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n * h * w, -1)


def applies(parts: StemParts, x: torch.Tensor) -> bool:
    """Whether this path computes the stem on ``x`` (cheap; decided per call, as grad mode may change): in fp32
    wherever our fp32 kernels would compute a block (fp32 input; bf16 autocast, native or not)."""
    _, ours = cpu.compute_dtypes(parts, x)
    if ours != torch.float32 or not available():
        return False
    p = parts.kernel_size
    return x.shape[1] == parts.conv.in_channels and x.shape[2] >= p and x.shape[3] >= p


def output_shape(parts: StemParts, x: torch.Tensor) -> Tuple[int, int, int, int]:
    """The shape of this path's output for ``x`` (channels_last; bf16 under bf16 autocast, else fp32)."""
    p = parts.kernel_size
    return x.shape[0], parts.conv.out_channels, x.shape[2] // p, x.shape[3] // p


def forward(parts: StemParts, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The stem's output (channels_last), or ``None`` where this path does not apply (then the plain modules run,
    and raise whatever a wrong input deserves)."""
    if not applies(parts, x):
        return None
    conv = parts.conv
    n, c, height, width = x.shape
    p = parts.kernel_size
    channels_last = _channels_last_order(x)
    f = kept.kept(_cache.setdefault(conv, {}), channels_last, parts, (),
                  lambda: _fold(parts, channels_last))
    attr, scalars, algorithm = cpu.POST_OPS[parts.act]
    out_dtype = conv_dtype(x)
    with torch.no_grad(), torch.autocast('cpu', enabled=False):
        y = torch.ops.mkldnn._linear_pointwise(_patches(x.float(), p, channels_last), f.weight, f.bias, attr,
                                               scalars, algorithm)
        torch.addcmul(f.shift, y, f.scale, out=y)
        return y.to(out_dtype).view(n, height // p, width // p, conv.out_channels).permute(0, 3, 1, 2)


def eager(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain stem as auto's check compares and times it: with the conversion to channels_last that the first
    block's CPU paths would make of its output anyway."""
    with torch.no_grad():  # its modules, not the stem's forward (which would ask for this path again)
        return nn.Sequential.forward(stem, x).contiguous(memory_format=torch.channels_last)
