"""Register entrypoints with timm, replacing timm's own entries of the same name on purpose.

timm ships ``convmixer_1536_20``, ``convmixer_768_32`` and ``convmixer_1024_20_ks9_p14``. Registering those names
again through ``timm.models.register_model`` works, but timm then warns ("Overwriting ... in registry") and, worse,
keeps the old entry's tags beside the new ones (``list_models(pretrained=True)`` would list ``.in1k`` twice).
We therefore take the old entry out of every registry table first, then register through timm's own function, so
timm's behaviour (module filing, pretrained cfgs, tags) stays exactly timm's.
"""
from typing import Any, Callable, TypeVar

from timm.models import _registry as timm_registry
from timm.models import register_model

__all__ = ['register_model_replacing', 'forget_model']

F = TypeVar('F', bound=Callable[..., Any])


def forget_model(model_name: str) -> None:
    """Remove every trace of ``model_name`` (and its ``name.tag`` entries) from timm's registry tables."""
    reg = timm_registry
    getattr(reg, '_model_entrypoints', {}).pop(model_name, None)
    getattr(reg, '_model_to_module', {}).pop(model_name, None)
    for models in getattr(reg, '_module_to_models', {}).values():
        models.discard(model_name)
    getattr(reg, '_model_default_cfgs', {}).pop(model_name, None)
    getattr(reg, '_model_with_tags', {}).pop(model_name, None)
    prefix = model_name + '.'
    pretrained_cfgs = getattr(reg, '_model_pretrained_cfgs', {})
    for key in [k for k in pretrained_cfgs if k == model_name or k.startswith(prefix)]:
        del pretrained_cfgs[key]
    has_pretrained = getattr(reg, '_model_has_pretrained', set())
    for key in [k for k in has_pretrained if k == model_name or k.startswith(prefix)]:
        has_pretrained.discard(key)


def register_model_replacing(fn: F) -> F:
    """``timm.models.register_model`` for a name that timm (or an earlier import of ours) may already hold."""
    forget_model(fn.__name__)
    return register_model(fn)
