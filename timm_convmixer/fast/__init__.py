"""Fast paths for a ConvMixer block, behind one seam: ``block_forward(block, x)``.

``MixerBlock.forward`` calls :func:`block_forward` first; it returns the block's output computed by a faster route,
or ``None`` when no fast route applies (then the plain modules run). A fast route must compute the same function
as the eager modules, so this dispatcher only offers a block to one when it is a *plain* ConvMixer block: exactly
``nn.Conv2d``/``nn.BatchNorm2d`` children (not SyncBatchNorm, FrozenBatchNorm, parametrized or quantized
modules), a supported activation, no hooks anywhere in it, and no tracer, compiler or functorch transform
watching (those must see the plain modules). Each backend then adds its own conditions (device, dtype, mode).

Backends: ``'auto'`` (default: CUDA tensors -> Triton kernels when importable and applicable, CPU tensors -> the
oneDNN path of :mod:`.cpu`), ``'eager'`` (never a fast path), ``'cpu'`` or ``'triton'`` (only that one, still
only where it applies). Choose with :func:`set_backend`, the :func:`use_backend` context manager or the
``TIMM_CONVMIXER_BACKEND`` environment variable (read at import). The choice is process-global.

:data:`counters` counts which path answered each block call (``'cpu'``, ``'triton'``, ``'eager'``), which is how
tests and benchmarks check what actually ran.
"""
import contextlib
import os
import warnings
from collections import Counter
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import DropPath

__all__ = [
    'BACKENDS', 'block_forward', 'counters', 'get_backend', 'plain_block_parts', 'reset_counters', 'set_backend',
    'use_backend',
]

BACKENDS = ('auto', 'eager', 'cpu', 'triton')
ENV_VAR = 'TIMM_CONVMIXER_BACKEND'

# which path answered each MixerBlock call since the last reset_counters()
counters: Counter = Counter()

# activations the fast paths know how to fuse; anything else runs eagerly
SUPPORTED_ACTS = (nn.ReLU, nn.GELU, nn.SiLU)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f'backend: expected one of {BACKENDS}, got {name!r}')
    return name.lower()


def _backend_from_env() -> str:
    value = os.environ.get(ENV_VAR, '').strip()
    if not value:
        return 'auto'
    try:
        return _check_name(value)
    except ValueError:
        # never break ``import timm`` (the autoload hook imports us) over a typo in the environment
        warnings.warn(f'{ENV_VAR}={value!r} is not one of {BACKENDS}; using "auto"')
        return 'auto'


_backend = _backend_from_env()


def set_backend(name: str) -> None:
    """Select the fast path for all ConvMixer blocks: 'auto', 'eager', 'cpu' or 'triton'."""
    global _backend
    _backend = _check_name(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend (process-global, so not meant for concurrent threads choosing differently)."""
    global _backend
    previous = _backend
    _backend = _check_name(name)
    try:
        yield
    finally:
        _backend = previous


def reset_counters() -> None:
    counters.clear()


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or getattr(module, '_backward_pre_hooks', None))


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return any(bool(getattr(m, name, None)) for name in (
        '_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
        '_global_backward_pre_hooks'))


def plain_block_parts(block: nn.Module) -> Optional[Tuple[nn.Module, ...]]:
    """``(conv_dw, act_dw, bn_dw, drop_path, conv_pw, act_pw, bn_pw)`` if ``block`` is a plain ConvMixer block
    that a fused path may replace, else ``None``.

    Exact type checks on purpose: a subclass (SyncBatchNorm is not one, but FrozenBatchNorm2d-like or user classes
    may be) can change the forward, and a hook on any child must see that child run.
    """
    if len(block) != 4:
        return None
    residual, conv_pw, act_pw, bn_pw = block[0], block[1], block[2], block[3]
    fn = getattr(residual, 'fn', None)
    drop_path = getattr(residual, 'drop_path', None)
    if not isinstance(fn, nn.Sequential) or len(fn) != 3 or drop_path is None:
        return None
    conv_dw, act_dw, bn_dw = fn[0], fn[1], fn[2]
    if type(conv_dw) is not nn.Conv2d or type(conv_pw) is not nn.Conv2d:
        return None
    if type(bn_dw) is not nn.BatchNorm2d or type(bn_pw) is not nn.BatchNorm2d:
        return None
    if type(act_dw) not in SUPPORTED_ACTS or type(act_pw) is not type(act_dw):
        return None
    if type(drop_path) is not nn.Identity and type(drop_path) is not DropPath:
        return None
    dim = conv_dw.in_channels
    if (conv_dw.out_channels != dim or conv_dw.groups != dim or conv_dw.padding != 'same'
            or conv_dw.stride != (1, 1) or conv_dw.dilation != (1, 1) or conv_dw.padding_mode != 'zeros'
            or conv_dw.kernel_size[0] != conv_dw.kernel_size[1]):
        return None
    if (conv_pw.in_channels != dim or conv_pw.out_channels != dim or conv_pw.kernel_size != (1, 1)
            or conv_pw.groups != 1 or conv_pw.stride != (1, 1) or conv_pw.padding != (0, 0)
            or conv_pw.padding_mode != 'zeros'):
        return None
    if bn_dw.num_features != dim or bn_pw.num_features != dim:
        return None
    modules = (block, residual, fn, conv_dw, act_dw, bn_dw, drop_path, conv_pw, act_pw, bn_pw)
    # the block's own hooks run around this forward anyway; its children's must see the children run
    if any(_has_hooks(m) for m in modules[1:]):
        return None
    return conv_dw, act_dw, bn_dw, drop_path, conv_pw, act_pw, bn_pw


def _is_compiling() -> bool:
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):
        return compiler.is_compiling()
    dynamo = getattr(torch, '_dynamo', None)  # torch < 2.3
    return bool(dynamo is not None and dynamo.is_compiling())


def _watched() -> bool:
    """True under anything that must see the plain modules: TorchScript tracing, torch.compile/export tracing
    (Inductor does its own fusion), functorch transforms (vmap, grad), global module hooks."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if _is_compiling():
        return True
    are_active = getattr(torch._C, '_are_functorch_transforms_active', None)
    if are_active is not None and are_active():
        return True
    return _global_hooks()


def _triton_forward(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    try:
        from .triton_ops import triton_block_forward
    except ImportError:  # the module, triton, or a GPU toolchain missing: the eager modules run
        return None
    return triton_block_forward(block, x)


def block_forward(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The block's output by a fast path, or ``None`` to let the plain modules run."""
    backend = _backend
    if backend == 'eager' or type(x) is not torch.Tensor or _watched():
        counters['eager'] += 1
        return None
    out = None
    parts = plain_block_parts(block)
    if parts is not None:
        device = x.device.type
        # 'triton' also offers CPU tensors: triton_block_forward takes them only under Triton's interpreter
        # (TRITON_INTERPRET=1, how the tests drive this wiring without a GPU) and answers None otherwise
        if backend == 'triton' or (device == 'cuda' and backend == 'auto'):
            out = _triton_forward(block, x)
            if out is not None:
                counters['triton'] += 1
                return out
        elif device == 'cpu' and backend in ('auto', 'cpu'):
            from . import cpu
            out = cpu.block_forward(parts, x)
            if out is not None:
                counters['cpu'] += 1
                return out
    counters['eager'] += 1
    return None
