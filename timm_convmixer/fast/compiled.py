"""Our inference paths inside ``torch.compile`` graphs: an eval block as one opaque node that dispatches at run time.

Why: Inductor, handed the plain modules, compiles the depthwise convolution to cuDNN's, which on a GPU can be far
slower than our kernels (convmixer_1536_20 on an H100: 100 img/s compiled against 1948 for ours uncompiled), so
compiling the model threw our speed away. Yet ``auto`` may only use a fused path for a case after checking it on a
real input of that case, which tracing (fake tensors) cannot do.

So while ``torch.compile`` traces, :func:`block_node` puts one custom op, ``timm_convmixer::block``, where the block
would be, and that op's implementation calls the ordinary dispatcher (:func:`..block_forward`) on the real tensors
at run time: ``auto``'s check on first use, its cached decision after, a forced backend, or the plain modules. The
tensors the block's output derives from (its convolutions' and BatchNorms' parameters and buffers) are the op's
inputs, so the graph orders them as it would the modules' own reads, and they are how the op finds its module when
the graph runs: the live block that holds those very tensors (every block registers itself when made or copied:
:func:`register`). The only other constant in the graph is the block's architecture (activation, kernel, BatchNorm
eps, mode, which tensors it has; both from :func:`_signature`), the same for every instance, so one graph serves
every instance of an architecture, as it does for the plain modules (a graph holding a module's ``id()`` was traced
again for each instance, and Dynamo stops compiling after 8). The holding block must have that architecture
(mode included: an eval graph never runs a block put in training mode since, even one sharing storage with its own).
Where no block holds the op's inputs (Inductor's freezing may hand it copies, or ``torch.func.functional_call``
swapped them), a private copy of a live block of that architecture, made once per architecture and shapes, runs its
forward, fast paths included, on them (``torch.func.functional_call``, one call at a time): never another model's
module, whose parameters another thread could be using, and never a block with hooks of its own. A search that found
no holder is not repeated on every call (``_misses``).

Not under CUDA graphs: a replay would skip the node's Python, and with it the staleness check of the constants the
fused paths keep (weights changed in place would be read stale), so the op is tagged ``cudagraph_unsafe`` (Inductor
then leaves its graph partition to ordinary launches). Needs ``torch.library.custom_op`` (torch >= 2.4); an older
torch traces the plain modules.

The op's output has the plain modules' dtype and is channels_last whatever its input: the fused GPU paths work in
channels_last, and an NCHW graph would otherwise pay a transpose each way in every block. Measured on an H100 with
nodes that kept NCHW (``benchmarks/results/gpu_check_nvidia_h100_compile_node_nchw.json``): those transposes took
convmixer_768_32's compiled inference to 0.57x the built-in's compiled (1610 against 2805 img/s; its block ran 1.26
ms in NCHW, 0.54 ms in channels_last), while convmixer_1536_20 went to 10.2x. So the first node converts its input
once and every later one gets channels_last; only the layout of the blocks' outputs differs from the plain modules',
never a value. The autocast state of the traced call is passed in and restored around the dispatch: the node's
implementation must see what the traced code saw, whatever Inductor's code does with autocast.
"""
import copy
import threading
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .eligibility import BlockParts, block_parts, has_hooks
from .kept import slots, sources
from .runtime import conv_dtype

__all__ = ['block_node', 'register']

# every MixerBlock alive (made, deep-copied or unpickled: __init__ and __setstate__ register; read and written under
# _lock: a WeakSet iterated while another thread adds to it raises); for each block found holding an op's inputs, by
# the address of its first tensor, the block (checked again on every use); and the fallback's private blocks with
# their tensors' names, by architecture and tensor shapes (kept for the process: one block's weights each), run one
# call at a time
_blocks: 'weakref.WeakSet[nn.Module]' = weakref.WeakSet()
_holder: 'weakref.WeakValueDictionary[int, nn.Module]' = weakref.WeakValueDictionary()
_stand_ins: Dict[Tuple, Tuple[nn.Module, List[str]]] = {}
_lock = threading.Lock()
_stand_in_lock = threading.Lock()
# the searches of every live block that found none holding an op's inputs, by the address of the first input and the
# architecture: [registrations then, the calls since]. Inductor's freezing hands every node copies, so without this
# every node call searched every live block (~0.8 ms for convmixer_1536_20's 20 blocks on a 2-core Xeon, 20 times a
# forward). A later registration (a model made or copied) searches again at once; anything else that could make a
# live block hold them (a block put back in eval mode, a tensor assigned) within RESCAN_EVERY calls. Until then the
# stand-in runs: the same output on the same tensors, only not the holder's kept constants.
_misses: Dict[Tuple[int, str], List[int]] = {}
_registrations = 0
RESCAN_EVERY = 64
_making_stand_in = threading.local()  # set while a stand-in is copied: nobody's block, so never registered


def register(block: nn.Module) -> None:
    """Make ``block`` findable by the op (``MixerBlock`` calls this when it is made or copied)."""
    global _registrations
    if getattr(_making_stand_in, 'on', False):
        return
    with _lock:
        _blocks.add(block)
        _registrations += 1


def _assume_constant_result(fn):
    compiler = getattr(torch, 'compiler', None)
    mark = getattr(compiler, 'assume_constant_result', None) or torch._dynamo.assume_constant_result
    return mark(fn)


@_assume_constant_result
def _exporting() -> bool:
    """``torch.export`` (strict or not, and the ONNX exporter on it): the graph must stand alone, so it gets the plain
    modules. Run for real by the tracer (``assume_constant_result``): torch 2.11's Dynamo itself answers
    ``is_exporting()`` with True under torch.compile too (2.14's does not). A torch without the flag (< 2.7) counts
    as exporting."""
    is_exporting = getattr(getattr(torch, 'compiler', None), 'is_exporting', None)
    return is_exporting is None or is_exporting()


def _signature(parts: BlockParts) -> Tuple[str, List[Tensor]]:
    """The op's constant and inputs for a block, from one read of its tensors (:func:`.kept.sources`, the same the
    fast paths' kept constants are checked against).

    The architecture: what, besides its tensors' values, decides the block's output (its activation, kernel,
    BatchNorm eps and mode, and which of its tensors it has). Traceable: the node's only constant besides the
    autocast state (the mode is there so that a block standing in for another is in eval mode too). The tensors:
    those the block's output derives from, in the op's order, without the absent ones (a conv without bias, say)."""
    tensors = sources(parts)
    present = ''.join('1' if t is not None else '0' for t in tensors)
    architecture = (f'{parts.act} k{parts.kernel_size} eps {parts.bn_dw.eps!r} {parts.bn_pw.eps!r} {parts.mode} '
                    f'{present}')
    return architecture, [t for t in tensors if t is not None]


def _live_blocks() -> List[nn.Module]:
    with _lock:
        return list(_blocks)


def _find(tensors: List[Tensor], architecture: str) -> Tuple[Optional[nn.Module], Optional[BlockParts]]:
    """The live block of ``architecture`` that holds ``tensors`` and its parts, else ``(None, None)``."""
    address = tensors[0].data_ptr()
    block = _holder.get(address)
    parts = None if block is None else _parts_if(block, tensors, architecture, Tensor.data_ptr)
    if parts is not None:
        return block, parts
    miss = _misses.get((address, architecture))
    if miss is not None and miss[0] == _registrations and miss[1] < RESCAN_EVERY:
        miss[1] += 1
        return None, None
    registrations = _registrations
    for block in _live_blocks():
        parts = _parts_if(block, tensors, architecture, Tensor.data_ptr)
        if parts is not None:
            _holder[address] = block
            _misses.pop((address, architecture), None)
            return block, parts
    if len(_misses) >= 4096:  # (addresses of freed tensors: bounded, not tracked)
        _misses.clear()
    _misses[(address, architecture)] = [registrations, 0]
    return None, None


def _stand_in(tensors: List[Tensor], architecture: str) -> Tuple[nn.Module, List[str]]:
    """A private block of ``architecture`` with ``tensors``' shapes, copied from a live one the first time, and the
    names of its tensors in the op's order."""
    key = (architecture,) + tuple(tuple(t.shape) for t in tensors)
    found = _stand_ins.get(key)
    if found is not None:
        return found
    for source in _live_blocks():
        if has_hooks(source) or _parts_if(source, tensors, architecture, Tensor.size) is None:
            continue
        _making_stand_in.on = True  # (nobody's block: never a holder, and no reason to search for holders again)
        try:
            block = copy.deepcopy(source)
        finally:
            _making_stand_in.on = False
        parts = _parts_if(block, tensors, architecture, Tensor.size)  # (the source may have changed since)
        if parts is not None:
            return _stand_ins.setdefault(key, (block, _names(block, parts)))
    raise RuntimeError(f'timm_convmixer::block: no live ConvMixer block holds the op\'s tensors or has its '
                       f'architecture ({architecture}, dim {tensors[0].shape[0]}): the compiled graph outlived its '
                       'model, or the block was made without MixerBlock.__init__ or unpickling (a DataParallel '
                       'replica, say)')


def _block_op(x: Tensor, tensors: List[Tensor], architecture: str, autocast: bool,
              autocast_dtype: torch.dtype) -> Tensor:
    from . import _eager, block_forward
    block, parts = _find(tensors, architecture)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast):
        if block is not None:
            out = block_forward(block, x, parts)
            if out is None:
                out = _eager(block, x)
        else:
            stand_in, names = _stand_in(tensors, architecture)
            with _stand_in_lock:
                out = torch.func.functional_call(stand_in, dict(zip(names, tensors)), (x,))
    out = out.to(conv_dtype(x, (autocast, autocast_dtype)))
    if out.stride() != _channels_last_strides(out):  # (size-1 dims: contiguous() may keep other strides)
        out = out.clone(memory_format=torch.channels_last)
    return out


def _block_op_fake(x, tensors, architecture, autocast, autocast_dtype):
    return torch.empty_like(x, dtype=conv_dtype(x, (autocast, autocast_dtype)), memory_format=torch.channels_last)


def _channels_last_strides(t: Tensor):
    n, c, h, w = t.shape
    return (h * w * c, 1, w * c, c)


_custom_op = getattr(torch.library, 'custom_op', None)  # torch >= 2.4
if _custom_op is not None:
    _unsafe = getattr(torch.Tag, 'cudagraph_unsafe', None)  # (a torch without the tag has no such partitioning)
    _op = _custom_op('timm_convmixer::block', _block_op, mutates_args=(),
                     **({'tags': (_unsafe,)} if _unsafe is not None else {}))
    _op.register_fake(_block_op_fake)


def _names(block: nn.Module, parts: BlockParts) -> List[str]:
    """The names ``torch.func.functional_call`` knows the block's op inputs (:func:`_signature`) by: by where they
    are read, so that a weight held as a plain attribute has a name too, though no parameter's."""
    qualified = {id(module): name for name, module in block.named_modules()}
    return [f'{qualified[id(module)]}.{attr}' for (module, attr), t in zip(slots(parts), sources(parts))
            if t is not None]


def _parts_if(block: nn.Module, tensors: List[Tensor], architecture: str, key) -> Optional[BlockParts]:
    """The block's parts where it has ``architecture`` and its tensors, in the op's order, equal ``tensors`` by
    ``key`` (``Tensor.data_ptr``: it holds the op's inputs, so its own dispatch computes the op), else ``None``.
    The op asks it of its cached holder on every call (of every live block only on a miss not searched lately:
    ``_misses``), so it costs one :func:`.block_parts` (~10 us on a 2-core Xeon; walking
    ``named_parameters``/``named_buffers`` and ``block_parts`` again, as before, ~60 us)."""
    parts = block_parts(block)
    if parts is None:
        return None
    own_architecture, own = _signature(parts)
    if own_architecture != architecture:
        return None
    return parts if len(own) == len(tensors) and all(key(a) == key(b) for a, b in zip(own, tensors)) else None


def block_node(parts: BlockParts, x: Tensor, autocast: bool, autocast_dtype: torch.dtype) -> Optional[Tensor]:
    """The traced block (its parts) as one ``timm_convmixer::block`` node (called while ``torch.compile`` traces), or
    ``None`` under ``torch.export``."""
    if _custom_op is None or _exporting():
        return None
    architecture, tensors = _signature(parts)
    return torch.ops.timm_convmixer.block(x, tensors, architecture, autocast, autocast_dtype)
