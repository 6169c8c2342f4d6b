""" ConvMixer, the whole family, as a timm plugin

Paper: `Patches Are All You Need?` - https://arxiv.org/abs/2201.09792 (Trockman & Kolter, TMLR 2023)
Authors' code: https://github.com/locuslab/convmixer

The model is the paper's figure, written with timm's interface around it::

    stem:   Conv(k=p, stride=p) -> act -> BN
    block:  x = x + BN(act(DepthwiseConv(k x k, "same")(x)))     (x depth)
            x = BN(act(PointwiseConv(x)))
    head:   global pool -> Linear

Modules and their names are exactly timm's built-in ConvMixer (``stem.0``, ``blocks.{i}.0.fn.0``, ``head``...), so
Hub weights and fine-tuned checkpoints load strictly into either. Everything a timm ``train.py`` flag asks of a
model is accepted: stochastic depth (``drop_path_rate``, on the depthwise residual, the only residual ConvMixer has),
``bn_momentum``/``bn_eps``, head dropout, every ``global_pool``; ``drop_block_rate`` is refused with a reason.

Speed lives behind one seam: ``MixerBlock.forward`` first offers the block to :mod:`timm_convmixer.fast`, which
answers with a fused computation of the same function or ``None`` (then the plain modules run). The block's
parameters stay in ordinary ``nn.Conv2d``/``nn.BatchNorm2d`` modules whatever path runs, so ``state_dict`` layout,
``convert_sync_batchnorm``, fusing tools and hooks all see a plain ConvMixer.
"""
import warnings
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d, get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from ._registry import register_model_replacing as register_model
from .weights import (
    NonFiniteWeightsWarning, check_state_dict, describe_nonfinite, find_nonfinite, load_pretrained_file,
    unpack_checkpoint)
from . import fast

__all__ = ['ConvMixer', 'MixerBlock', 'checkpoint_filter_fn']

# the locuslab CIFAR-10 training script's normalisation (github.com/locuslab/convmixer-cifar10, train.py)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4471)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
# CIFAR-10's classes in label order (its batches.meta), for pipelines and model cards
CIFAR10_CLASSES = (
    'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

ActLayer = Union[str, Type[nn.Module], Callable[..., nn.Module]]
_ACT_BY_NAME = {'gelu': nn.GELU, 'relu': nn.ReLU}  # torch's own classes, as timm's built-in model uses

# The start of the UserWarning PyTorch's eager conv gives for padding='same' with an even kernel (it pads a copy of the
# input): a speed note, for a ``warnings`` filter in tools that run a variant for anything but its speed
EVEN_KERNEL_SPEED_NOTE = r"Using padding='same' with even kernel lengths"


def _resolve_act_layer(act_layer: ActLayer) -> Callable[..., nn.Module]:
    """Accept an activation class/factory or a name (``train.py --model-kwargs act_layer=relu``)."""
    if isinstance(act_layer, str):
        name = act_layer.lower()
        if name in _ACT_BY_NAME:
            return _ACT_BY_NAME[name]
        try:
            resolved = get_act_layer(name)
        except (KeyError, ValueError, AttributeError):
            resolved = None
        if resolved is None:
            raise ValueError(f'act_layer: unknown activation {act_layer!r} (try gelu, relu, silu, hard_swish...)')
        return resolved
    if not callable(act_layer):
        raise ValueError(f'act_layer: expected an activation name or nn.Module class, got {act_layer!r}')
    return act_layer


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name}: expected a positive integer, got {value!r}')
    return value


def _check_rate(name: str, value: Any) -> float:
    if value is None:
        return 0.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0. <= float(value) < 1.:
        raise ValueError(f'{name}: expected a probability in [0, 1), got {value!r}')
    return float(value)


def _norm_layer(bn_momentum: Optional[float], bn_eps: Optional[float]) -> Callable[..., nn.Module]:
    """``nn.BatchNorm2d`` with train.py's ``--bn-momentum``/``--bn-eps`` where given (PyTorch's defaults otherwise)."""
    norm_kwargs = {}
    if bn_momentum is not None:
        if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0 <= bn_momentum <= 1:
            raise ValueError(f'bn_momentum: expected a number in [0, 1], got {bn_momentum!r}')
        norm_kwargs['momentum'] = float(bn_momentum)
    if bn_eps is not None:
        if not isinstance(bn_eps, (int, float)) or isinstance(bn_eps, bool) or bn_eps <= 0:
            raise ValueError(f'bn_eps: expected a positive number, got {bn_eps!r}')
        norm_kwargs['eps'] = float(bn_eps)
    return partial(nn.BatchNorm2d, **norm_kwargs)


class Residual(nn.Module):
    """``x + drop_path(fn(x))``. Named and nested as timm's ``Residual`` so parameters keep the ``.fn.`` keys."""

    def __init__(self, fn: nn.Module, drop_path: float = 0.):
        super().__init__()
        self.fn = fn
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.fn(x)) + x


@register_notrace_module
class Stem(nn.Sequential):
    """The patch stem: ``Conv(kernel = stride = patch)``, act, BN; children ``0`` to ``2`` as timm's ``stem``.

    A leaf for timm's FX feature extraction, as :class:`MixerBlock` is: a traced graph calls the stem, so it keeps
    the fast-path dispatch (:func:`timm_convmixer.fast.stem_forward`) and computes exactly what the model does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            out = fast.stem_forward(self, x)
            if out is not None:
                return out
        for layer in self:
            x = layer(x)
        return x


@register_notrace_module
class MixerBlock(nn.Sequential):
    """One ConvMixer block: depthwise mixing (spatial, residual) then pointwise mixing (channels).

    Children ``0`` to ``3`` are timm's: ``Residual(Sequential(conv_dw, act, bn))``, ``conv_pw``, ``act``, ``bn``.

    A leaf for timm's FX feature extraction (``register_notrace_module``): a traced graph calls the block, so it
    keeps the fast-path dispatch instead of baking in the eager modules, and computes exactly what the model does.
    Under ``torch.compile`` an eval block on a GPU that wants no gradients is one graph node that dispatches when it
    runs (:mod:`.fast.compiled`, with ``auto`` or a Triton backend).
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding='same', **dd),
                act_layer(),
                norm_layer(dim, **dd),
            ), drop_path=drop_path),
            nn.Conv2d(dim, dim, kernel_size=1, **dd),
            act_layer(),
            norm_layer(dim, **dd),
        )
        fast.compiled.register(self)

    def __setstate__(self, state):
        """Copies (``copy.deepcopy``, unpickling) register too: a compiled graph's nodes find their block among them."""
        super().__setstate__(state)
        fast.compiled.register(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            out = fast.block_forward(self, x)
            if out is not None:
                return out
        for layer in self:
            x = layer(x)
        return x


class ConvMixer(nn.Module):
    """ConvMixer with timm's full model interface (features, intermediates, pruning, heads, checkpointing)."""

    def __init__(
            self,
            dim: int,
            depth: int,
            kernel_size: int = 9,
            patch_size: int = 7,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: ActLayer = nn.GELU,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            drop_block_rate: Optional[float] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: channels, the same at every block ("hidden dimension" h in the paper).
            depth: number of mixer blocks.
            kernel_size: depthwise kernel size; even sizes pad "same" asymmetrically, as PyTorch does.
            patch_size: stem kernel and stride, the one and only downsampling.
            in_chans: input image channels.
            num_classes: classifier outputs; 0 leaves the pooled features.
            global_pool: any timm ``SelectAdaptivePool2d`` type ('avg', 'max', 'avgmax', 'catavgmax', '' for none).
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth of the depthwise residual branches, rising linearly from 0 at the
                first block to this value at the last (timm's convention); inactive in eval mode.
            act_layer: activation class or its name ('gelu', 'relu', any of timm's).
            bn_momentum: BatchNorm momentum in PyTorch's convention (default 0.1), train.py's --bn-momentum.
            bn_eps: BatchNorm epsilon (default 1e-5), train.py's --bn-eps.
            drop_block_rate: not supported (ConvMixer has no DropBlock); a positive value raises.
        """
        super().__init__()
        if drop_block_rate:
            raise ValueError(
                f'drop_block_rate={drop_block_rate!r}: ConvMixer has no DropBlock layers; '
                'use drop_path_rate (--drop-path) for stochastic depth instead')
        dim = _check_positive_int('dim', dim)
        depth = _check_positive_int('depth', depth)
        kernel_size = _check_positive_int('kernel_size', kernel_size)
        patch_size = _check_positive_int('patch_size', patch_size)
        in_chans = _check_positive_int('in_chans', in_chans)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'num_classes: expected an integer >= 0, got {num_classes!r}')
        drop_rate = _check_rate('drop_rate', drop_rate)
        drop_path_rate = _check_rate('drop_path_rate', drop_path_rate)
        act_layer = _resolve_act_layer(act_layer)
        norm_layer = _norm_layer(bn_momentum, bn_eps)
        dd = {'device': device, 'dtype': dtype}

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = dim
        self.kernel_size = kernel_size
        self.patch_size = patch_size
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = Stem(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, **dd),
            act_layer(),
            norm_layer(dim, **dd),
        )
        # stochastic depth rises linearly over the blocks (pure Python: works under a meta-device context too)
        dpr = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path_rate]
        self.blocks = nn.Sequential(*[
            MixerBlock(dim, kernel_size, act_layer=act_layer, norm_layer=norm_layer, drop_path=dpr[i], **dd)
            for i in range(depth)
        ])
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise LR decay: the stem, then one group per block."""
        return dict(stem=r'^stem', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        ref = next(self.parameters(), None)
        dd = {'device': ref.device, 'dtype': ref.dtype} if ref is not None else {}
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
            self.global_pool.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning block outputs too (index i is the output of block i), as timm's models do.

        Args:
            x: input images.
            indices: last n blocks if an int, all if None, else the listed block indices (negative allowed).
            norm: unused, ConvMixer has no final norm (accepted for the shared interface).
            stop_early: stop after the last requested block.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        if not torch.jit.is_scripting():
            _check_input(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        intermediates = []
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last kept intermediate (and the head) so no parameter goes unused."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            out = None
            if not torch.jit.is_scripting():
                out = fast.blocks_forward(self.blocks, x)
            x = self.blocks(x) if out is None else out
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_input(x, self.in_chans)
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x

    @torch.jit.ignore
    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes the authors' layout and never half-loads.

        timm's ``load_checkpoint`` (train.py ``--initial-checkpoint``, ``create_model(checkpoint_path=...)``) applies
        no pretrained filter, so the layout conversion lives here. Shapes and (when strict) keys are checked
        against the model before a single tensor is copied.
        """
        metadata = getattr(state_dict, '_metadata', None)
        state_dict = unpack_checkpoint(state_dict).state_dict
        if metadata is not None:
            state_dict = OrderedDict(state_dict)
            state_dict._metadata = metadata  # per-module versions, e.g. BatchNorm's num_batches_tracked
        check_state_dict(self.state_dict(), state_dict, strict=strict, what=f'{type(self).__name__}', meta_ok=assign)
        nonfinite = find_nonfinite(state_dict)
        if nonfinite:  # allowed (debugging a diverged run), but never silently
            warnings.warn(
                f'loading non-finite weights (NaN/Inf) into {type(self).__name__}: '
                f'{describe_nonfinite(nonfinite, len(state_dict))}; its outputs will not be finite',
                NonFiniteWeightsWarning, stacklevel=2)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook (the ``.authors_in1k`` release files): read safely, load via timm's
        ``load_pretrained`` with :func:`checkpoint_filter_fn` (see :mod:`timm_convmixer.weights`)."""
        load_pretrained_file(self, checkpoint_path, filter_fn=checkpoint_filter_fn)


def _check_input(x: torch.Tensor, in_chans: int) -> None:
    """Fail fast, with the shape in the message, instead of deep inside a convolution.

    Tracers (torch.fx proxies, TorchScript tracing) pass through unchecked: they must record the plain graph.
    """
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'ConvMixer expects a torch.Tensor of shape (N, {in_chans}, H, W), got {type(x).__name__}')
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f'ConvMixer expects input of shape (N, {in_chans}, H, W), got {tuple(x.shape)}')


def checkpoint_filter_fn(
        state_dict: Dict[str, Any], model: ConvMixer, strict: bool = True) -> Dict[str, torch.Tensor]:
    """Pretrained filter: unwrap train.py/DDP checkpoints and rename the authors' layout to timm's, and refuse one
    whose keys, the classifier's aside, are not the model's (unless ``strict`` is False: ``pretrained_strict=False``
    asked for a partial load). Why here: for a new head (``num_classes`` other than the checkpoint's) timm's
    ``load_pretrained`` drops the classifier and loads ``strict=False``, which would leave blocks a checkpoint of
    another depth lacks at their random initialisation without a word."""
    state_dict = unpack_checkpoint(state_dict).state_dict
    if not strict:
        return state_dict
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
    body = lambda sd: {k: v for k, v in sd.items() if k.split('.')[0] != classifier}  # noqa: E731
    check_state_dict(body(model.state_dict()), body(state_dict), strict=True, what=type(model).__name__, shapes=False)
    return state_dict


def _create_convmixer(variant: str, pretrained: bool = False, **kwargs) -> ConvMixer:
    # the last 3 blocks' outputs, or every block's in a shallower model (depth 2 asked for 3 and failed)
    out_indices = kwargs.pop('out_indices', min(3, kwargs['depth']) if isinstance(kwargs.get('depth'), int) else 3)
    return build_model_with_cfg(
        ConvMixer,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, strict=kwargs.get('pretrained_strict', True)),
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(url: str = '', patch_size: int = 7, **kwargs) -> Dict[str, Any]:
    input_size = kwargs.pop('input_size', (3, 224, 224))
    return {
        'url': url,
        'num_classes': 1000, 'input_size': input_size,
        'pool_size': (input_size[1] // patch_size, input_size[2] // patch_size),
        'crop_pct': .96, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head',
        'license': 'mit', 'paper_ids': 'arXiv:2201.09792', 'paper_name': 'Patches Are All You Need?',
        'origin_url': 'https://github.com/locuslab/convmixer',
        **kwargs
    }


def _cifar_cfg(patch_size: int, **kwargs) -> Dict[str, Any]:
    return _cfg(
        patch_size=patch_size, input_size=(3, 32, 32), num_classes=10, crop_pct=1.0, interpolation='bilinear',
        mean=CIFAR10_MEAN, std=CIFAR10_STD, label_names=CIFAR10_CLASSES,
        origin_url='https://github.com/locuslab/convmixer-cifar10', **kwargs)


_AUTHORS_RELEASE = 'https://github.com/tmp-iclr/convmixer/releases/download/v1.0/'
# The authors' files are train.py checkpoints (``args`` is an argparse.Namespace), which the plain url path's
# torch.hub loader refuses with weights_only=True: custom_load routes them through ConvMixer.load_pretrained, which
# reads them safely and loads them through timm's load_pretrained and checkpoint_filter_fn (timm_convmixer/weights.py).
_AUTHORS = dict(custom_load=True)

default_cfgs = generate_default_cfgs({
    'convmixer_1536_20.in1k': _cfg(hf_hub_id='timm/'),
    'convmixer_1536_20.authors_in1k': _cfg(url=_AUTHORS_RELEASE + 'convmixer_1536_20_ks9_p7.pth.tar', **_AUTHORS),
    'convmixer_768_32.in1k': _cfg(hf_hub_id='timm/'),
    'convmixer_768_32.authors_in1k': _cfg(
        url=_AUTHORS_RELEASE + 'convmixer_768_32_ks7_p7_relu.pth.tar', **_AUTHORS),
    'convmixer_1024_20_ks9_p14.in1k': _cfg(hf_hub_id='timm/', patch_size=14),
    'convmixer_1024_20_ks9_p14.authors_in1k': _cfg(
        url=_AUTHORS_RELEASE + 'convmixer_1024_20_ks9_p14.pth.tar', patch_size=14, **_AUTHORS),
    'convmixer_1536_24_ks9_p14': _cfg(patch_size=14),
    'convmixer_1024_16_ks9_p7': _cfg(),
    'convmixer_512_16_ks8_p7': _cfg(),
    'convmixer_256_8_ks5_p2': _cifar_cfg(patch_size=2),
    'convmixer_256_8_ks9_p1': _cifar_cfg(patch_size=1),
})


def _variant(variant: str, pretrained: bool, arch: Dict[str, Any], kwargs: Dict[str, Any]) -> ConvMixer:
    """A variant's own architecture, overridable by any kwarg (``--model-kwargs depth=8 kernel_size=5``)."""
    return _create_convmixer(variant, pretrained, **{**arch, **kwargs})


@register_model
def convmixer_1536_20(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1536/20, kernel 9, patch 7, GELU: the paper's largest ImageNet model (81.4% top-1)."""
    return _variant('convmixer_1536_20', pretrained, dict(dim=1536, depth=20, kernel_size=9, patch_size=7), kwargs)


@register_model
def convmixer_768_32(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-768/32, kernel 7, patch 7, ReLU (80.2% top-1)."""
    arch = dict(dim=768, depth=32, kernel_size=7, patch_size=7, act_layer=nn.ReLU)
    return _variant('convmixer_768_32', pretrained, arch, kwargs)


@register_model
def convmixer_1024_20_ks9_p14(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1024/20, kernel 9, patch 14, GELU (76.9% top-1, 5.6 GMACs)."""
    arch = dict(dim=1024, depth=20, kernel_size=9, patch_size=14)
    return _variant('convmixer_1024_20_ks9_p14', pretrained, arch, kwargs)


@register_model
def convmixer_1536_24_ks9_p14(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1536/24, kernel 9, patch 14, GELU (configuration from KerasCV's legacy ConvMixer)."""
    arch = dict(dim=1536, depth=24, kernel_size=9, patch_size=14)
    return _variant('convmixer_1536_24_ks9_p14', pretrained, arch, kwargs)


@register_model
def convmixer_1024_16_ks9_p7(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-1024/16, kernel 9, patch 7, GELU (configuration from KerasCV's legacy ConvMixer)."""
    arch = dict(dim=1024, depth=16, kernel_size=9, patch_size=7)
    return _variant('convmixer_1024_16_ks9_p7', pretrained, arch, kwargs)


@register_model
def convmixer_512_16_ks8_p7(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-512/16, kernel 8 (even: "same" padding is one pixel more on the bottom/right), patch 7, GELU."""
    arch = dict(dim=512, depth=16, kernel_size=8, patch_size=7)
    return _variant('convmixer_512_16_ks8_p7', pretrained, arch, kwargs)


@register_model
def convmixer_256_8_ks5_p2(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-256/8, kernel 5, patch 2: locuslab's CIFAR-10 model (92.6% after 25 epochs), 32px, 10 classes."""
    arch = dict(dim=256, depth=8, kernel_size=5, patch_size=2)
    return _variant('convmixer_256_8_ks5_p2', pretrained, arch, kwargs)


@register_model
def convmixer_256_8_ks9_p1(pretrained: bool = False, **kwargs) -> ConvMixer:
    """ConvMixer-256/8, kernel 9, patch 1: the paper's CIFAR-10 configuration at full resolution, 32px."""
    arch = dict(dim=256, depth=8, kernel_size=9, patch_size=1)
    return _variant('convmixer_256_8_ks9_p1', pretrained, arch, kwargs)
