"""The patch stem on CPU as one matrix product: patches x weight, with the activation and BatchNorm in its epilogue.

Why: the stem is the one layer no block path covers, and eager runs it as three passes over its output (conv, act,
BN), on the NCHW image, through oneDNN's direct convolution for 3 input channels; the first block then turns that
output into channels_last. At convmixer_256_8_ks9_p1's CIFAR shape that was 143 ms of a ~740 ms batch on an
AVX-512 Xeon. A convolution whose kernel equals its stride reads each input pixel once: it is the product of the
image's non-overlapping ``p x p`` patches, one row each, with the weight flattened to ``(dim, 3 * p * p)``. So:

1. gather the patches into a ``(tokens, 3 * p * p)`` matrix (one copy of the image, whose 3 channels make it the
   smallest tensor of the model; rows in (kh, kw, c) order for a channels_last image, (c, kh, kw) for NCHW, so the
   gather reads in memory order; the weight is flattened to match);
2. the blocks' pointwise GEMM (:func:`.cpu_kernels.pw_block`, ``K = 3 * p * p`` input channels) with the bias,
   activation and eval-mode BatchNorm affine (folded in float64) applied to each tile: its ``(tokens, dim)`` output,
   written once, *is* the channels_last feature map the blocks read.

Under bf16 autocast on a CPU with AVX512-BF16 it multiplies bf16 pairs as the blocks' GEMM does (the patches and the
weight rounded to bf16 as eager autocast rounds them; K padded to even with a zero column at patches 1 and 7) and
rounds its output to bf16 once; elsewhere (fp32 input, or bf16 autocast without native bf16, where oneDNN's bf16 is
emulated 15-20x slower than fp32) it computes in fp32, under autocast handing on bf16. It replaced oneDNN's fused
linear op with an ``addcmul`` and a cast after it (2 and 3 passes over the output). Against that (Zen 4,
AVX512-BF16, 2 threads, channels_last, same process, 9 rounds, before the output buffer below): fp32 1.06x-1.16x at
patches 7 and 14, 1.11x at patch 1, 2.97x at patch 2 (6.29 -> 2.12 ms); under bf16 autocast 1.5x-2.8x the plain bf16
stem, which auto had kept there. Its output lives in a pooled buffer of its own (:func:`.cpu.output_buffer`): the
model's forward holds it while the blocks run, and taken from the blocks' pool it left them one buffer, every other
block's output then fresh pages (256_8_ks9_p1 ran 0.91x). ``benchmarks/cpu_stem.py`` times it against the plain
stem. Whether it wins on a CPU, auto checks per case (:func:`timm_convmixer.fast.stem_forward`). Elsewhere (fp16
autocast, other dtypes) the plain modules run. An input whose size is not a multiple of ``p`` is cropped as the
convolution crops it.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from . import cpu, cpu_kernels, kept
from .eligibility import StemParts, bn_scale_shift
from .runtime import conv_dtype

__all__ = ['applies', 'available', 'channels_last_order', 'eager', 'flat_weight', 'forward', 'output_shape', 'patches']


class _Folded(NamedTuple):
    panels: torch.Tensor  # the weight (dim, K) as pw_pack packs it, columns in the patch rows' order
    bias: torch.Tensor  # (dim,) float32, zeros for a conv without bias
    scale: torch.Tensor  # (dim,) the BatchNorm as scale * y + shift
    shift: torch.Tensor


# stem conv -> {(patch order, dtype): that order's weights, as kept.kept keeps them} (emptied by kept.forget)
_cache = kept.store()


def available() -> bool:
    """Our compiled CPU kernels load here (besides what every CPU path needs)."""
    return cpu.available() and cpu_kernels.load() is not None


def channels_last_order(x: torch.Tensor) -> bool:
    """Gather patches in (kh, kw, c) order: the image's memory order when it is channels_last."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _width(parts: StemParts, dtype: torch.dtype) -> int:
    """The GEMM's K: ``c * p * p``, made even for bf16 pairs."""
    k = parts.conv.in_channels * parts.kernel_size ** 2
    return k + k % 2 if dtype == torch.bfloat16 else k


def flat_weight(weight: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The conv's weight ``(dim, c, p, p)`` as ``(dim, c * p * p)``, columns in :func:`patches`' row order."""
    return (weight.permute(0, 2, 3, 1) if channels_last else weight).reshape(weight.shape[0], -1)


def _fold(parts: StemParts, channels_last: bool, dtype: torch.dtype) -> _Folded:
    conv = parts.conv
    with torch.inference_mode(False), torch.no_grad():
        weight = flat_weight(conv.weight.detach(), channels_last)
        padded = weight.new_zeros(conv.out_channels, _width(parts, dtype))
        padded[:, :weight.shape[1]] = weight
        scale, shift = bn_scale_shift(parts.bn, torch.float64)
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(conv.out_channels)
        return _Folded(panels=cpu_kernels.pw_pack(padded.to(dtype)), bias=bias.float().contiguous(),
                       scale=scale.float(), shift=shift.float())


def patches(x: torch.Tensor, p: int, channels_last: bool, dtype: torch.dtype, width: int) -> torch.Tensor:
    """The patch rows as a channels_last ``(n, width, h, w)`` tensor in ``dtype`` (one copy of the image, cropped to
    whole patches as the conv crops it; columns past ``c * p * p`` zero)."""
    n, c, height, width_px = x.shape
    h, w = height // p, width_px // p
    x = x[:, :, :h * p, :w * p]
    if channels_last:  # (n, h, w, kh, kw, c)
        rows = x.permute(0, 2, 3, 1).reshape(n, h, p, w, p, c).permute(0, 1, 3, 2, 4, 5)
    else:  # (n, h, w, c, kh, kw)
        rows = x.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
    out = torch.empty(n, h, w, width, dtype=dtype)
    out[..., c * p * p:] = 0
    out[..., :c * p * p].unflatten(-1, rows.shape[3:]).copy_(rows)
    return out.permute(0, 3, 1, 2)


def _compute_dtype(parts: StemParts, x: torch.Tensor) -> Optional[torch.dtype]:
    """What the GEMM multiplies on ``x``: bf16 pairs under bf16 autocast where oneDNN's bf16 is native and our
    kernels have the bf16 dot product (as the blocks' GEMM, :func:`.cpu.pairs_dtype`), else fp32; ``None`` where
    this path does not apply (asking for our kernels, which the first call may build, only where it might)."""
    onednn, ours = cpu.compute_dtypes(parts, x)
    if ours is None or not available():
        return None
    p = parts.kernel_size
    if x.shape[1] != parts.conv.in_channels or x.shape[2] < p or x.shape[3] < p:
        return None
    return cpu.pairs_dtype(onednn, ours)


def applies(parts: StemParts, x: torch.Tensor) -> bool:
    """Whether this path computes the stem on ``x`` (cheap; decided per call, as grad mode may change): wherever our
    kernels would compute a block (fp32 input; bf16 autocast, native or not), once they load."""
    return _compute_dtype(parts, x) is not None


def output_shape(parts: StemParts, x: torch.Tensor) -> Tuple[int, int, int, int]:
    """The shape of this path's output for ``x`` (channels_last; bf16 under bf16 autocast, else fp32)."""
    p = parts.kernel_size
    return x.shape[0], parts.conv.out_channels, x.shape[2] // p, x.shape[3] // p


def forward(parts: StemParts, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The stem's output (channels_last), or ``None`` where this path does not apply (then the plain modules run,
    and raise whatever a wrong input deserves)."""
    dtype = _compute_dtype(parts, x)
    if dtype is None:
        return None
    channels_last = channels_last_order(x)
    f = kept.kept(_cache.setdefault(parts.conv, {}), (channels_last, dtype), parts, (),
                  lambda: _fold(parts, channels_last, dtype))
    with torch.no_grad():
        u = patches(x, parts.kernel_size, channels_last, dtype, _width(parts, dtype))
        return cpu_kernels.pw_block(u, f.panels, f.bias, f.scale, f.shift, parts.act,
                                    cpu.output_buffer(output_shape(parts, x), conv_dtype(x), 'stem'))


def eager(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain stem as auto's check compares and times it: with the conversion to channels_last that the first
    block's CPU paths would make of its output anyway."""
    with torch.no_grad():  # its modules, not the stem's forward (which would ask for this path again)
        return nn.Sequential.forward(stem, x).contiguous(memory_format=torch.channels_last)
