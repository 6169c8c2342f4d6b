"""The patch stem in training on our CPU kernels, as lean as the :mod:`.lean_cpu` blocks after it.

Why: with the blocks on our kernels, the stem was the one layer of a CPU training step left to the plain modules:
oneDNN's direct convolution for 3 input channels, the activation and a batch-statistics BatchNorm, each a pass over
a map as large as a block's, with the convolution's and the activation's outputs kept for backward, and the first
block keeping the stem's output as its input. At convmixer_256_8_ks9_p1's CIFAR shape (batch 64, Zen 4) it took
~0.29 s of a 2.5 s ``lean_cpu`` step. Here:

* forward: the image's patches (:func:`.cpu_stem.patches`, one copy of the image) times the weight on the blocks'
  GEMM (:func:`.cpu_kernels.pw_block`, the bias in its epilogue) give the pre-activation ``t``; the activation and
  BatchNorm are :class:`.lean_cpu.CpuNorm`'s two passes (batch statistics, then apply), the running statistics
  advanced by eager's rule;
* kept for backward: the patches (the image's size) and ``t``, plus per-channel statistics; the output carries the
  lean blocks' link (:func:`.lean.link_output`), so a lean first block rebuilds its input from ``t`` instead of
  keeping it;
* backward: :class:`.lean_cpu.CpuNorm`'s normalisation backward (two passes), then the weight's gradient as one GEMM
  over the patch rows and the bias's as a column sum. No gradient for the image: where the image asks for one (an
  adversarial step), the plain modules run.

Float32 on a CPU, as :mod:`.lean_cpu`; the output is channels_last, as the CPU paths' are. ``auto`` checks it against
the plain stem on first use (a training step's output and gradients, judged against a float64 one) like a block's
path (:func:`timm_convmixer.fast.stem_forward`); ``set_backend('lean_cpu')`` forces it.
"""
from typing import Any, Dict, Optional

import torch

from . import cpu_stem
from .eligibility import StemParts
from .lean import SavedNorm, link_output, records_training, refuse_double_backward
from .lean_cpu import CpuNorm, gemm, takes
from .runtime import autocast_state, rows

__all__ = ['applies', 'forward']


# rows of the weight gradient's GEMM per call (see _weight_grad)
WEIGHT_GRAD_ROWS = 2048


def _weight_grad(rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g.t() @ rows`` (the ``(dim, K)`` weight gradient from ``(R, dim)`` output gradients and ``(R, K)`` patch
    rows) as ``rows.t() @ g`` summed over chunks of :data:`WEIGHT_GRAD_ROWS` rows. At patch 1 (K = 3) MKL took 68 ms
    for ``g.t() @ rows`` at 65536 x 256, 23 ms for ``rows.t() @ g`` whole and 12 ms in chunks of 2048 rows; at
    patches 2, 7 and 14 the chunks ran within 0.2 ms of the whole product (Zen 4, 2 threads, 9 rounds)."""
    out = rows.new_zeros(rows.shape[1], g.shape[1])
    with torch.autocast('cpu', enabled=False):  # (under bf16 autocast too: these are float32 tensors)
        for i in range(0, rows.shape[0], WEIGHT_GRAD_ROWS):
            out.addmm_(rows[i:i + WEIGHT_GRAD_ROWS].t(), g[i:i + WEIGHT_GRAD_ROWS])
    return out.t()


class _LeanStem(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, parts: StemParts, holder: Dict[str, Any], conv_w, conv_b, bn_w, bn_b):
        channels_last = cpu_stem.channels_last_order(x)
        width = parts.conv.in_channels * parts.kernel_size ** 2
        patch_rows = cpu_stem.patches(x, parts.kernel_size, channels_last, torch.float32, width)
        t = gemm(patch_rows, cpu_stem.flat_weight(conv_w.detach(), channels_last), conv_b)
        out, norm = CpuNorm.forward(parts.bn, t, parts.act, bn_w, bn_b)
        ctx.parts = parts
        ctx.channels_last = channels_last
        ctx.save_for_backward(patch_rows, t, norm.save_mean, norm.save_var, conv_w, bn_w)
        holder['t'] = t
        holder['stats'] = (norm.save_mean, norm.save_var)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward('the lean training stem')
        parts: StemParts = ctx.parts
        patch_rows, t, mean, invstd, conv_w, bn_w = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (x, parts, holder, conv_w, conv_b, bn_w, bn_b)
        norm = SavedNorm(None, mean, invstd, mean.new_empty(0), -1)
        grad_t, grad_bn_w, grad_bn_b = CpuNorm.backward(parts.bn, norm, t, parts.act, grad_out, bn_w, needs[5:7])
        grad_w = grad_b = None
        if needs[3] or needs[4]:
            g = rows(grad_t)  # channels_last: the rows as they lie
            if needs[3]:
                flat = _weight_grad(rows(patch_rows), g)
                # back from the patch rows' column order to the conv's (dim, c, p, p)
                p, c = parts.kernel_size, parts.conv.in_channels
                grad_w = (flat.view(-1, p, p, c).permute(0, 3, 1, 2) if ctx.channels_last else flat.view_as(conv_w))
                grad_w = grad_w.contiguous()
            if needs[4]:
                grad_b = g.sum(0)
        return None, None, None, grad_w, grad_b, grad_bn_w, grad_bn_b


def applies(parts: StemParts, x: torch.Tensor) -> bool:
    """Where the lean stem may run (cheap; asked on every call): what a lean block needs
    (:func:`.lean.records_training`) for an image that wants no gradient, a layer :mod:`.lean_cpu`'s kernels take
    (:func:`.lean_cpu.takes`), an image with the conv's channels and at least one patch, the stem's kernels
    loaded."""
    conv, bn = parts.conv, parts.bn
    if x.requires_grad or not records_training(parts.mode, x, list(conv.parameters()) + list(bn.parameters())):
        return False
    if not takes(x, (conv, bn)) or x.shape[1] != conv.in_channels:
        return False
    if x.shape[2] < parts.kernel_size or x.shape[3] < parts.kernel_size:
        return False
    return cpu_stem.available()


def forward(parts: StemParts, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The training stem's output (channels_last, linked for the first lean block), or ``None`` where it does not
    apply (then the plain modules run)."""
    if not applies(parts, x):
        return None
    holder: Dict[str, Any] = {}
    conv, bn = parts.conv, parts.bn
    out = _LeanStem.apply(x, parts, holder, conv.weight, conv.bias, bn.weight, bn.bias)
    link_output(out, holder.pop('t'), parts.act, bn, *holder.pop('stats'), autocast_state('cpu'))
    return out
