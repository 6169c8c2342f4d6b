"""The one question every fast path asks first: is this a plain ConvMixer block, and in which mode does it run?

A fast path replaces the block's modules with a fused computation, so it may only do so when the fused computation
is *the same function*. That is decided here, once, for every backend (oneDNN on CPU, Triton on CUDA, the lean
training block everywhere); a backend then only adds what it alone cares about (device, dtype, activation kernels).

A block is plain when it is exactly timm's layout (``Residual(Sequential(conv_dw, act, bn)), conv_pw, act, bn``), run
by ``MixerBlock``'s and ``Residual``'s own forwards (a subclass that overrides one computes something else), with
``nn.Conv2d``/``nn.BatchNorm2d`` of exactly those types (not SyncBatchNorm, frozen, parametrized or quantized
subclasses, whose forward may differ), a depthwise "same" convolution (explicit symmetric padding counts for odd
kernels: it is the same window), a 1x1 pointwise convolution, one of the known activations on both convolutions, and
no hooks on any child (a hook must see its module run). Its mode is:

* ``'eval'``: both BatchNorms normalise with running statistics and drop path is inactive; the block is then a
  fixed function of its input (what the inference paths fuse);
* ``'train'``: both BatchNorms normalise with batch statistics (training mode, or no running statistics); drop path
  may be active (what the lean training block computes);
* anything else (one BatchNorm in each mode) has no fast path.

:func:`bn_scale_shift` is the one place where an eval-mode BatchNorm becomes ``scale * x + shift`` (:func:`scale_shift`
the fold itself, which the lean block's Triton normalisations apply to batch statistics).
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath

__all__ = ['ACT_NAMES', 'BlockParts', 'StemParts', 'act_name', 'block_parts', 'bn_scale_shift',
           'bn_uses_batch_stats', 'has_hooks', 'scale_shift', 'stem_parts']

# what each supported activation is called by the backends (each maps these names to its own kernels)
ACT_NAMES = ('identity', 'relu', 'gelu', 'gelu_tanh', 'silu')


class BlockParts(NamedTuple):
    """The children of a plain block, with the facts every backend needs."""
    conv_dw: nn.Conv2d
    act_dw: nn.Module
    bn_dw: nn.BatchNorm2d
    drop_path: nn.Module
    conv_pw: nn.Conv2d
    act_pw: nn.Module
    bn_pw: nn.BatchNorm2d
    act: str  # one of ACT_NAMES, the same for both activations
    kernel_size: int
    mode: str  # 'eval' or 'train'

    @property
    def dim(self) -> int:
        return self.conv_dw.in_channels

    @property
    def convs(self) -> Tuple[nn.Conv2d, ...]:
        return self.conv_dw, self.conv_pw

    @property
    def norms(self) -> Tuple[nn.BatchNorm2d, ...]:
        return self.bn_dw, self.bn_pw


class StemParts(NamedTuple):
    """The children of a plain patch stem (``Sequential(conv, act, bn)``, the conv's kernel equal to its stride)."""
    conv: nn.Conv2d
    act_module: nn.Module
    bn: nn.BatchNorm2d
    act: str  # one of ACT_NAMES
    kernel_size: int  # the patch size: the conv's kernel and stride
    mode: str  # 'eval' (cpu_stem) or 'train' (lean_stem)

    @property
    def convs(self) -> Tuple[nn.Conv2d, ...]:
        return (self.conv,)

    @property
    def norms(self) -> Tuple[nn.BatchNorm2d, ...]:
        return (self.bn,)


def act_name(module: nn.Module) -> Optional[str]:
    """The backends' name for an activation module, or ``None`` when no fast path computes it."""
    t = type(module)
    if t is nn.ReLU:
        return 'relu'
    if t is nn.GELU:
        return {'none': 'gelu', 'tanh': 'gelu_tanh'}.get(module.approximate)
    if t is nn.SiLU:
        return 'silu'
    if t is nn.Identity:
        return 'identity'
    return None


def has_hooks(module: nn.Module) -> bool:
    """Whether hooks watch this module run (then a fast path must not run its work without calling it)."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or getattr(module, '_backward_pre_hooks', None))


def _is_same_depthwise(conv: nn.Module, dim: int) -> bool:
    if type(conv) is not nn.Conv2d:
        return False
    k = conv.kernel_size[0]
    if conv.kernel_size != (k, k) or conv.in_channels != dim or conv.out_channels != dim or conv.groups != dim:
        return False
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != 'zeros':
        return False
    # "same" pads (k-1)//2 before and the rest after; for odd k explicit symmetric padding is that very window
    return conv.padding == 'same' or (k % 2 == 1 and conv.padding == ((k - 1) // 2, (k - 1) // 2))


def _is_pointwise(conv: nn.Module, dim: int) -> bool:
    return (
        type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.in_channels == dim
        and conv.out_channels == dim and conv.groups == 1 and conv.stride == (1, 1) and conv.dilation == (1, 1)
        and conv.padding in ('same', 'valid', (0, 0)) and conv.padding_mode == 'zeros')


def bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """What ``nn.BatchNorm2d.forward`` normalises with: batch statistics in training mode or without running ones."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _drop_path_active(m: nn.Module) -> bool:
    return type(m) is DropPath and m.training and m.drop_prob > 0.


def _mode(bn_dw: nn.BatchNorm2d, bn_pw: nn.BatchNorm2d, drop_path: nn.Module) -> Optional[str]:
    batch_dw, batch_pw = bn_uses_batch_stats(bn_dw), bn_uses_batch_stats(bn_pw)
    if batch_dw and batch_pw:
        return 'train'
    if not batch_dw and not batch_pw and not _drop_path_active(drop_path):
        return 'eval'
    return None


_forwards: Tuple = ()


def _runs_our_forwards(block: nn.Module, residual: nn.Module) -> bool:
    """Whether ``block`` and ``residual`` compute what ``MixerBlock`` and ``Residual`` do: a subclass that overrides
    ``forward`` computes something else, and a model's chain of blocks (:func:`..blocks_forward`) runs a block's
    parts without calling it."""
    global _forwards
    if not _forwards:
        from ..convmixer import MixerBlock, Residual  # (convmixer imports this package)
        _forwards = (MixerBlock.forward, Residual.forward)
    return (type(block).forward is _forwards[0] and type(residual).forward is _forwards[1]
            and 'forward' not in vars(block) and 'forward' not in vars(residual))  # (nor one set on the instance)


def block_parts(block: nn.Module) -> Optional[BlockParts]:
    """The block's parts if it is a plain ConvMixer block in a mode some fast path computes, else ``None``."""
    if not isinstance(block, nn.Sequential):  # (a block swapped for nn.Identity, say)
        return None
    # (unpacked by iterating, as a Sequential runs its children: indexing one costs ~3 us an item, and every fast
    # path's call asks this)
    children = tuple(block)
    if len(children) != 4:
        return None
    residual, conv_pw, act_pw, bn_pw = children
    if not _runs_our_forwards(block, residual):
        return None
    fn = getattr(residual, 'fn', None)
    drop_path = getattr(residual, 'drop_path', None)
    if not isinstance(fn, nn.Sequential) or len(fn) != 3 or drop_path is None:
        return None
    if type(drop_path) is not nn.Identity and type(drop_path) is not DropPath:
        return None
    conv_dw, act_dw, bn_dw = fn
    dim = getattr(conv_dw, 'in_channels', None)
    if dim is None or not _is_same_depthwise(conv_dw, dim) or not _is_pointwise(conv_pw, dim):
        return None
    if type(bn_dw) is not nn.BatchNorm2d or type(bn_pw) is not nn.BatchNorm2d:
        return None
    if bn_dw.num_features != dim or bn_pw.num_features != dim:
        return None
    act = act_name(act_dw)
    if act is None or act_name(act_pw) != act:
        return None
    # the block's own hooks run around any path; its children's must see the children run
    if any(has_hooks(m) for m in (residual, fn, conv_dw, act_dw, bn_dw, drop_path, conv_pw, act_pw, bn_pw)):
        return None
    mode = _mode(bn_dw, bn_pw, drop_path)
    if mode is None:
        return None
    return BlockParts(conv_dw, act_dw, bn_dw, drop_path, conv_pw, act_pw, bn_pw, act, conv_dw.kernel_size[0], mode)


def stem_parts(stem: nn.Module) -> Optional[StemParts]:
    """The stem's parts if it is a plain patch stem, else ``None``; its mode ``'eval'`` (BatchNorm on running
    statistics) or ``'train'`` (batch statistics).

    Plain: a ``Sequential`` of exactly ``nn.Conv2d``, an activation and ``nn.BatchNorm2d`` (the model's ``Stem``,
    whose forward asks), the conv non-overlapping (kernel = stride, no padding or dilation, one group), so that it is
    a matrix product of image patches; no hooks on its children (the stem's own run around any path, its children's
    must see them run).
    """
    if not isinstance(stem, nn.Sequential) or len(stem) != 3 or any(has_hooks(m) for m in stem):
        return None
    conv, act_module, bn = stem[0], stem[1], stem[2]
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels:
        return None
    p = conv.kernel_size[0]
    if conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding not in ((0, 0), 'valid'):
        return None
    if conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != 'zeros':
        return None
    act = act_name(act_module)
    if act is None:
        return None
    return StemParts(conv, act_module, bn, act, p, 'train' if bn_uses_batch_stats(bn) else 'eval')


def bn_scale_shift(bn: nn.BatchNorm2d, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``y = scale * x + shift`` (per channel), computed in ``dtype``.

    Differentiable with respect to ``bn.weight``/``bn.bias`` when gradients are enabled, so a fused path that uses
    it still trains the affine parameters. The CPU path folds in float64 (under ``no_grad``) and stores the result
    in its compute dtype; the Triton path keeps fp32 (fp64 for fp64).
    """
    rstd = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    return scale_shift(bn.weight, bn.bias, bn.running_mean.to(dtype), rstd)


def scale_shift(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], mean: torch.Tensor,
                rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``weight * (x - mean) * rstd + bias`` as ``scale * x + shift``, in ``rstd``'s dtype: the fold itself, for
    running statistics (:func:`bn_scale_shift`) or a batch's (the lean block's Triton normalisations)."""
    scale = weight.to(rstd.dtype) * rstd if weight is not None else rstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(rstd.dtype)
    return scale, shift
