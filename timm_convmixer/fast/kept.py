"""Constants a fast path derives from a block's parameters and buffers (folded BatchNorm, cast or packed weights),
kept between inference calls, with one rule, for every path, for when they are stale.

Why keep them: deriving them is a dozen small ops per block and call, and at small images or on a GPU that host
time is what the block costs (convmixer_1024_20_ks9_p14 on an H100: ~1 ms of host time per block against 0.2 ms of
depthwise kernel). Folded weights are not new numbers: they are exactly what each call would derive.

Stale means any source changed: each of the block's parameters and BatchNorm buffers (``num_batches_tracked``
included) is compared by identity (a weak reference: a freed tensor never matches its successor, even at the same
address), storage address and version counter, plus the BatchNorms' ``eps`` and the caller's key (dtype, input
shape where a layout depends on it). In-place writes through the tensor bump its version counter (optimizer steps,
``load_state_dict``, ``copy_``, ``torch.nn.init``); ``.to()``, ``.half()``, assigning a new parameter change its
identity or storage. BatchNorm's own running-statistics update writes inside its kernel without bumping the
counters of ``running_mean``/``running_var``; ``num_batches_tracked``, advanced on every training-mode call, is what
shows it. Not seen: writes through ``param.data`` (a separate version counter by design); call
:func:`timm_convmixer.fast.forget_kept` after such a write.

Tensors made under ``torch.inference_mode`` keep no version counter: for them nothing is kept and each call derives
afresh.
"""
import weakref
from typing import Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple, TypeVar, Union

import torch
import torch.nn as nn

from .eligibility import BlockParts, StemParts

__all__ = ['forget', 'kept', 'slots', 'sources', 'store']

T = TypeVar('T')

# block -> {what: entry}, one store per fast path module; weak keys: a dropped model takes its entries along
_stores: 'list[weakref.WeakKeyDictionary]' = []


class _Entry(NamedTuple):
    refs: Tuple[Optional['weakref.ref[torch.Tensor]'], ...]
    stamp: Tuple
    value: object


def store() -> 'weakref.WeakKeyDictionary[nn.Module, Dict[Hashable, _Entry]]':
    """A new store (module -> kept entries), emptied by :func:`forget` with every other."""
    s: 'weakref.WeakKeyDictionary[nn.Module, Dict[Hashable, _Entry]]' = weakref.WeakKeyDictionary()
    _stores.append(s)
    return s


def forget() -> None:
    """Drop every kept constant of every path (the next call of each block derives them again)."""
    for s in _stores:
        s.clear()


_CONV = ('weight', 'bias')
_NORM = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')  # the step counter last: see sources


def slots(parts: Union[BlockParts, StemParts]) -> List[Tuple[nn.Module, str]]:
    """Where :func:`sources` reads each of its tensors: ``(module, attribute name)``, in its order."""
    return [(conv, name) for conv in parts.convs for name in _CONV] + [
        (bn, name) for bn in parts.norms for name in _NORM]


def sources(parts: Union[BlockParts, StemParts], num_batches_tracked: bool = True
            ) -> Tuple[Optional[torch.Tensor], ...]:
    """Every tensor a block's (or the stem's) constants derive from, and (unless ``num_batches_tracked`` is false, as
    for what the paths compute from) the BatchNorms' step counters (see the module docstring); in :func:`slots`'
    order."""
    norm = _NORM if num_batches_tracked else _NORM[:-1]
    tensors = []
    for conv in parts.convs:
        for name in _CONV:
            tensors.append(_attr(conv, name))
    for bn in parts.norms:
        for name in norm:
            tensors.append(_attr(bn, name))
    return tuple(tensors)


def _attr(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``getattr(module, name)`` for a parameter or buffer, from its dict: every fast path's call asks for 14 of
    them, and ``nn.Module.__getattr__`` takes ~1.5 us each against ~0.25 (a 2-core Xeon). Equal wherever attributes
    are set through ``nn.Module.__setattr__``, which never lets a registered name be an instance attribute too (a
    plain tensor attribute, as after ``del conv.weight; conv.weight = t``, is read by ``getattr``)."""
    registered = module._parameters
    if name in registered:
        return registered[name]
    registered = module._buffers
    if name in registered:
        return registered[name]
    return getattr(module, name)


def kept(entries: Dict[Hashable, _Entry], what: Hashable, parts: Union[BlockParts, StemParts], key: Tuple,
         derive: Callable[[], T]) -> T:
    """``entries[what]``'s value when it was derived from the same sources with the same ``key``, else ``derive()``
    (then kept as ``entries[what]``). ``entries`` is one block's dict of a :func:`store`."""
    tensors = sources(parts)
    if any(t is not None and t.is_inference() for t in tensors):
        return derive()
    stamp = (key,) + tuple(bn.eps for bn in parts.norms) + tuple(
        None if t is None else (t.data_ptr(), t._version) for t in tensors)
    entry = entries.get(what)
    if entry is not None and entry.stamp == stamp and all(
            (ref is None) if t is None else (ref is not None and ref() is t) for ref, t in zip(entry.refs, tensors)):
        return entry.value  # type: ignore[return-value]
    value = derive()
    entries[what] = _Entry(tuple(None if t is None else weakref.ref(t) for t in tensors), stamp, value)
    return value
