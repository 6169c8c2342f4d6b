"""CPU fast paths for an eval-mode ConvMixer block: fused oneDNN convolutions, or our compiled kernels.

Where timm's eager block spends its CPU time (torch.profiler, 768/32, batch 8, channels_last): convolutions ~57%,
then five full passes over the activations: BN, activation, residual add, activation, BN (~42%). This path:

1. runs the block in channels_last (NHWC) whatever the input layout; the output stays channels_last, so only the
   first block converts (values are identical; pooling, the head and timm accept any memory format);
2. calls oneDNN's convolution with the activation fused as a post-op (``mkldnn._convolution_pointwise``, the op
   Inductor's CPU backend emits), with weights pre-packed in oneDNN's blocked layout for the input's exact shape;
3. applies each eval-mode BatchNorm as a per-channel ``scale * a + shift``, in one ``addcmul`` pass that also does
   the residual add: ``u = x + s1 * act(dw(x))``; the depthwise BN's shift ``t1`` only ever reaches the pointwise
   conv, so it is folded into that conv's bias (``b' = b + W @ t1``) instead of costing a pass;
4. so a block is: conv+act, addcmul, conv+act, addcmul (in place) instead of conv, act, BN, add, conv, act, BN;
5. path ``'cpu_compiled'`` runs the block as two passes of our own kernels (:mod:`.cpu_kernels`): the depthwise
   half (conv, bias, activation, BN scale, residual), where oneDNN's channels_last depthwise conv is slow, and the
   pointwise half as a GEMM with bias, activation and BN affine applied in registers;
6. path ``'cpu_hybrid'`` runs our depthwise kernel and oneDNN's pointwise conv (whose GEMM is the faster one on some
   CPUs: 35.4 against our 45.0 ms at a 768-channel block's shape on an AVX-512 Xeon; ours was the faster
   on an AVX2 Zen 3), then the pointwise BN as an ``addcmul``.
   Between consecutive blocks of a model that both run it, that BN is not written out at all but carried into the
   next block's depthwise kernel, which applies it as it reads its input (``fast.blocks_forward``): two passes a
   block. Which path is faster on a CPU, ``auto`` measures (:func:`timm_convmixer.fast.block_forward`).

Numerics: fp32 by default; the BN folds are done in float64, so results match eager to ~1e-6 relative (the
summation order inside the 1x1 conv differs by one bias term). Under CPU autocast with bfloat16, oneDNN's path
(``'cpu'``, where the CPU has native bf16) computes in bf16 like eager autocast does: activations, conv weights and
the folded BN scale/shift in bf16, with oneDNN's fp32 accumulation and the activation fused before rounding; it
matches eager autocast to bf16 precision. There ``'cpu_hybrid'`` reads and writes bf16 around oneDNN's bf16
pointwise conv, as eager autocast runs it, our depthwise kernel widening on load and rounding once on store (where
the CPU has AVX512-BF16, at kernel sizes 5/7/8/9, multiplying bf16 pairs of input and taps into fp32 sums with
``vdpbf16ps``, the taps rounded to bf16 as eager autocast rounds the conv's weight; fp32 otherwise);
``'cpu_compiled'`` there (where the CPU has AVX512-BF16) likewise, its GEMM multiplying bf16 pairs too, each
epilogue in fp32 and the output rounded once.
Elsewhere our kernels compute all of it in fp32, reading a bf16 input and rounding the output to bf16 as they store
it: autocast promises bf16 precision, not bf16 arithmetic, and fp32 can be the only fast choice (without native
bf16, oneDNN emulates bf16 15-20x slower than fp32); ``auto`` checks each against an fp32 run and races it with
oneDNN's bf16.
fp16 autocast runs the eager modules.

It applies only in eval mode (BN on running statistics, drop_path inactive), fp32 or bf16 autocast, and when no
gradient is needed; otherwise ``None`` and the eager modules run. Folded and packed weights are kept per block
while every parameter and buffer they derive from stays the same (:mod:`.kept`'s rule: ``load_state_dict``,
optimizer steps, ``.to()``, in-place edits and BatchNorm training steps make them stale). The cache holds one extra
copy of the block's weights per path and compute dtype in use (auto's check runs every path, then keeps those it
chose, :func:`chosen`); :func:`clear_cache` drops it.
"""
from collections import OrderedDict
import math
import threading
import warnings
import weakref
from typing import Dict, List, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from . import cpu_kernels, kept
from .eligibility import BlockParts, StemParts, bn_scale_shift
from .runtime import autocast_state, conv_dtype

__all__ = ['PATHS', 'POST_OPS', 'Carried', 'applies', 'available', 'block_forward', 'chosen', 'clear_cache',
           'compute_dtypes', 'hybrid_forward', 'materialize', 'native_bf16', 'paths', 'warn_if_bf16_is_emulated']


def available() -> bool:
    """oneDNN present, enabled, and exposing the fused-convolution op this path calls."""
    return (
        torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, '_convolution_pointwise'))


class _Folded(NamedTuple):
    """One path's weights for one block: oneDNN's packed convolution weights, or what our kernels read."""
    b_dw: torch.Tensor
    s_dw: torch.Tensor  # (1, C, 1, 1) BN scale of the depthwise branch
    b_pw: torch.Tensor  # pointwise bias with the depthwise BN shift folded in
    s_pw: torch.Tensor  # (1, C, 1, 1) BN scale / shift of the pointwise output
    t_pw: torch.Tensor
    w_dw: Optional[torch.Tensor] = None  # 'cpu': packed in oneDNN's layout for the input's shape (or plain)
    w_pw: Optional[torch.Tensor] = None  # 'cpu', 'cpu_hybrid': likewise
    taps: Optional[torch.Tensor] = None  # 'cpu_compiled', 'cpu_hybrid': the depthwise weight as (k * k, C)
    panels: Optional[torch.Tensor] = None  # 'cpu_compiled': the pointwise weight as our GEMM reads it (pw_pack)


class Carried(NamedTuple):
    """A block output not yet written: ``scale * a + shift`` per channel (``(1, C, 1, 1)`` each), ``a`` the
    pointwise conv's activation (channels_last). :func:`materialize` writes it; a ``'cpu_hybrid'`` block takes it as
    its input as it is."""
    a: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


# block's depthwise conv -> {(path, compute dtype): that path's weights, as kept.kept keeps them}
_cache = kept.store()
# block's depthwise conv -> the paths auto chose for it, over every case it ran (see chosen)
_chosen: 'weakref.WeakKeyDictionary[nn.Module, Set[str]]' = weakref.WeakKeyDictionary()


# each thread's compiled-path depthwise output buffer, of the last shape it ran (see _scratch_like); thread-local, so
# a buffer goes with its thread (a server that starts a thread per request keeps none for threads that ended)
_scratch = threading.local()


# (user, shape, dtype) -> the buffers the compiled path's block outputs (or the stem's) live on (see output_buffer),
# the key used last at the end; at most OUTPUT_SHAPES keys: a process meeting ever new input sizes must not keep
# buffers for each
_outputs: 'OrderedDict[Tuple, List[torch.Tensor]]' = OrderedDict()
_outputs_lock = threading.Lock()
# per key: in a chain of blocks, one block's input and its output; the stem's output, which the model's forward holds
# while the blocks run (taken from the blocks' two, it left them one: every block's output was fresh pages and
# 256_8_ks9_p1 ran 0.91x); the lean training block's activations (see training_buffer): as many as a step holds
OUTPUT_BUFFERS = {'blocks': 2, 'stem': 1, 'train': None}
OUTPUT_SHAPES = 6
# per key of an uncapped user: [hand-outs since its pool was last trimmed, the highest position handed out since];
# every TRIM_AFTER hand-outs per pooled buffer, the buffers past that position go back (see _trim)
_reach: Dict[Tuple, List[int]] = {}
TRIM_AFTER = 32

# glibc's largest mmap threshold (32 MiB on 64-bit): a larger allocation is mapped anew on every call, its pages
# faulted in as they are first written
FRESH_PAGES_BYTES = 32 * 2**20


def clear_cache() -> None:
    """Drop the folded weights and the compiled path's scratch and output buffers."""
    _cache.clear()
    _chosen.clear()
    release_buffers()


def release_buffers() -> None:
    """Give back every pooled buffer (scratch, block and stem outputs, the lean training block's activations),
    keeping the folded weights: the next step allocates them anew (as ``bench`` does before the step whose memory
    it reports)."""
    global _scratch
    _scratch = threading.local()  # (every thread's: the old one, and its buffers, go)
    with _outputs_lock:
        _outputs.clear()
        _reach.clear()


def _scratch_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of ``x``'s shape and ``dtype`` for the depthwise half's output, which only the pointwise conv of
    the same call reads.

    Why reuse: a fresh activation-sized tensor beyond glibc's mmap threshold is new pages each time, and touching
    them costs more than the pass that fills them (32 MiB: 11.8 ms of page faults against a 3.2 ms fill on this
    project's Zen 3 VM). One buffer per thread (blocks on two threads must not share one), of the last shape run.
    """
    buf = getattr(_scratch, 'buf', None)
    if buf is None or buf.shape != x.shape or buf.dtype != dtype:
        buf = _scratch.buf = torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)
    return buf


def output_buffer(shape: Tuple[int, int, int, int], dtype: torch.dtype, user: str = 'blocks') -> torch.Tensor:
    """A channels_last tensor of ``shape`` and ``dtype`` for a block's output (``user='stem'``: the stem's), on the
    memory of an earlier output of the same user nobody holds.

    Why: beyond glibc's mmap threshold (32 MiB at most) every fresh tensor is new pages, and touching them costs more
    than the pass that fills them (see :func:`_scratch_like`); a 1536-channel ImageNet activation at batch 8 is 50
    MiB, and pooling made convmixer_1536_20 7% faster (measured; no change at 768 channels, 25 MiB). Each pooled
    buffer is handed out as a new tensor on its storage (not a view of it); every tensor, view or storage object
    anyone keeps of an output holds a reference to that storage, so a storage whose only reference is the pool's is
    free (as with a caching allocator, only its memory is reused, never anything someone can still see). In a chain
    of blocks two buffers take turns; when both are held (say, by ``forward_intermediates``) the output is a fresh
    tensor. The ``'train'`` user's buffers are not counted (:func:`training_buffer`).
    """
    key = (user, tuple(shape), dtype)
    with _outputs_lock:
        buffers = _outputs.setdefault(key, [])
        _outputs.move_to_end(key)
        if len(_outputs) > OUTPUT_SHAPES:
            _reach.pop(_outputs.popitem(last=False)[0], None)  # (a buffer in use lives on with its user)
        index = next((i for i, b in enumerate(buffers) if cpu_kernels.storage_use_count(b) == 1), None)
        cap = OUTPUT_BUFFERS[user]
        if index is None:
            buf = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
            if cap is not None and len(buffers) >= cap:
                return buf
            buffers.append(buf)
            index = len(buffers) - 1
        buf = buffers[index]
        if cap is None:
            _trim(key, buffers, index)
        # created under the lock: from here on the storage has a second holder, so no other thread takes it
        return buf.new_empty(0).set_(buf)  # not buf.untyped_storage(): a Python storage object is a lasting holder


def _trim(key: Tuple, buffers: List[torch.Tensor], index: int) -> None:
    """An uncapped pool grows to as many buffers as were held at once; where that falls (outputs kept over many steps
    let go, a smaller model on the same shape), what it no longer reaches goes back: every :data:`TRIM_AFTER`
    hand-outs per pooled buffer, the buffers past the highest position handed out meanwhile. (A training step hands
    out about 12 per block and holds about one per block, so a window spans steps and its peak.) Called under the
    lock with the position just handed out."""
    reach = _reach.setdefault(key, [0, 0])
    reach[0] += 1
    reach[1] = max(reach[1], index)
    if reach[0] >= TRIM_AFTER * len(buffers):
        del buffers[reach[1] + 1:]  # (a buffer in use lives on with its user)
        reach[0] = reach[1] = 0


def training_buffer(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A channels_last tensor of ``shape`` and ``dtype`` for one of the activations or gradients our kernels write
    in the lean training block (:mod:`.lean_cpu`): from the pool of :func:`output_buffer` where it has at least
    :data:`FRESH_PAGES_BYTES`, a fresh tensor below.

    Why: a training step writes about a dozen activation-sized tensors a block, each new pages beyond glibc's mmap
    threshold (64 x 256 x 32 x 32 fp32, 256_8_ks9_p1 at batch 64: 16385 minor faults a tensor, 934k a step at depth
    4). Below the threshold glibc reuses freed memory itself, and a pool would only hold memory. The pool grows to as
    many buffers as a step holds at once (the pointwise pre-activation each block keeps for backward, and the few in
    flight), and keeps them between steps, as a caching allocator does (what it no longer reaches goes back,
    :func:`_trim`; :func:`release_buffers` gives back all)."""
    if math.prod(shape) * dtype.itemsize < FRESH_PAGES_BYTES:
        return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    return output_buffer(shape, dtype, user='train')


def native_bf16() -> bool:
    """oneDNN has native bf16 kernels on this CPU (AVX512-BF16/AMX); without them bf16 is emulated, 15-20x slower."""
    probe = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


_warned_slow_bf16 = False


def warn_if_bf16_is_emulated(x: torch.Tensor) -> None:
    """Say once when a block runs under CPU bf16 autocast on a CPU without native bf16.

    There oneDNN emulates bf16 and a ConvMixer runs 15-20x slower than in fp32 (measured on an AVX2-only Zen 3:
    0.13 vs ~2.9 img/s for convmixer_768_32), which nobody asking for "mixed precision" expects.
    """
    global _warned_slow_bf16
    if _warned_slow_bf16 or x.device.type != 'cpu':
        return
    _, enabled, dtype = autocast_state('cpu')
    if not enabled or dtype != torch.bfloat16 or native_bf16():
        return
    _warned_slow_bf16 = True
    warnings.warn(
        'timm_convmixer: bfloat16 autocast on a CPU without native bf16 support '
        '(torch.ops.mkldnn._is_mkldnn_bf16_supported() is False): its bf16 convolutions are emulated and run 15-20x '
        'slower than float32. The blocks and the stem take our float32 kernels where auto finds them within '
        'bf16 precision (and faster; in training the lean_cpu path), but everything else (the head, any plain '
        'module) runs emulated. Drop the CPU autocast (train.py: no --amp on CPU) unless you need bf16 numerics.',
        RuntimeWarning, stacklevel=4)


# oneDNN post-op (name, scalars, algorithm) of each activation the eligibility check accepts
POST_OPS = {
    'identity': ('none', [], ''),
    'relu': ('relu', [], ''),
    'gelu': ('gelu', [], 'none'),  # erf, as nn.GELU()
    'gelu_tanh': ('gelu', [], 'tanh'),
    'silu': ('swish', [], ''),
}


def _pack(weight: torch.Tensor, padding: List[int], groups: int, input_size: List[int]) -> torch.Tensor:
    """Weight in oneDNN's blocked layout for this input size (oneDNN would reorder it on every call otherwise)."""
    try:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), padding, [1, 1], [1, 1], groups, input_size)
    except (RuntimeError, AttributeError, NotImplementedError):
        return weight.contiguous()


def _fold(parts: BlockParts, input_size: List[int], dtype: torch.dtype, path: str) -> _Folded:
    """Folded (in float64) and packed weights for one of :data:`PATHS`: our kernels read taps and panels, oneDNN's
    convolutions its packed weights. oneDNN's weights and biases are stored in the compute ``dtype`` (fp32, or bf16
    under autocast); what our kernels read, and the per-channel BatchNorm factors of a path with our kernels in it
    (which they may apply: the carried BatchNorm), in fp32; our GEMM's panels in ``dtype`` (bf16 pairs under native
    bf16)."""
    conv_dw, conv_pw = parts.conv_dw, parts.conv_pw
    dim = parts.dim
    with torch.inference_mode(False), torch.no_grad():
        s_dw, t_dw = bn_scale_shift(parts.bn_dw, torch.float64)
        s_pw, t_pw = bn_scale_shift(parts.bn_pw, torch.float64)
        w_pw = conv_pw.weight.double().reshape(dim, dim)
        b_pw = w_pw @ t_dw
        if conv_pw.bias is not None:
            b_pw = b_pw + conv_pw.bias.double()
        b_dw = conv_dw.bias if conv_dw.bias is not None else conv_dw.weight.new_zeros(dim)
        k = conv_dw.kernel_size[0]
        factors = dtype if path == 'cpu' else torch.float32
        folded = _Folded(
            b_dw=b_dw.detach().to(factors).contiguous(),
            s_dw=s_dw.to(factors).view(1, dim, 1, 1),
            b_pw=b_pw.to(factors if path == 'cpu_compiled' else dtype).contiguous(),
            s_pw=s_pw.to(factors).view(1, dim, 1, 1),
            t_pw=t_pw.to(factors).view(1, dim, 1, 1),
        )
        if path in ('cpu_compiled', 'cpu_hybrid'):
            folded = folded._replace(taps=cpu_kernels.dw_taps(conv_dw.weight))
        else:
            folded = folded._replace(w_dw=_pack(conv_dw.weight.detach().to(dtype), [k // 2, k // 2], dim, input_size))
        if path == 'cpu_compiled':
            return folded._replace(panels=cpu_kernels.pw_pack(conv_pw.weight.detach().reshape(dim, dim).to(dtype)))
        return folded._replace(w_pw=_pack(conv_pw.weight.detach().to(dtype), [0, 0], 1, input_size))


def applies(parts: Union[BlockParts, StemParts], x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype oneDNN's path computes in on ``x`` (fp32, or bf16 under CPU bf16 autocast where the CPU has native
    bf16); ``None`` where it does not apply. What it reads: the convolutions' weights and biases and the BatchNorms'
    affine parameters and running statistics."""
    return compute_dtypes(parts, x)[0]


def compute_dtypes(parts: Union[BlockParts, StemParts],
                   x: torch.Tensor) -> Tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """The dtypes oneDNN's path and our compiled kernels compute in on ``x`` (:func:`applies`' answer, and fp32 for
    ours, under bf16 autocast too, native bf16 or not; ``None`` each where it does not apply; the stem's path asks
    too), from one pass of the checks (asked on every block's call, more than once before: ~9 us each on a 2-core
    Xeon)."""
    none = None, None
    if parts.mode != 'eval' or x.device.type != 'cpu' or x.layout != torch.strided or x.dim() != 4:
        return none
    if x.is_quantized or x.is_mkldnn or x.numel() == 0 or not available():
        return none
    _, autocast, autocast_dtype = autocast_state('cpu')
    if autocast:
        # eager autocast runs the convs in the autocast dtype; oneDNN's path follows it for bf16 where oneDNN has
        # native bf16 kernels, our kernels compute in fp32
        if autocast_dtype != torch.bfloat16 or x.dtype not in (torch.float32, torch.bfloat16):
            return none
        dtypes = (torch.bfloat16 if native_bf16() else None), torch.float32
    elif x.dtype == torch.float32:
        dtypes = torch.float32, torch.float32
    else:
        return none
    # (kept.sources reads them as getattr would, ~4x faster)
    tensors = kept.sources(parts, num_batches_tracked=False)
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype != torch.float32 or type(t) not in (
                torch.Tensor, nn.Parameter)):
            return none
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        return none  # the fused ops have no autograd; training/grad-needing calls run eagerly
    return dtypes


def _cached(parts: BlockParts, x: torch.Tensor, dtype: torch.dtype, path: str) -> _Folded:
    """The block's folded weights for one path and compute dtype, kept while nothing they derive from changes
    (:mod:`.kept`'s rule). Kept per path, since auto may run one path for NCHW input and another for channels_last,
    alternately; and per dtype, since a model serving bf16-autocast and fp32 calls in turn would otherwise refold
    (and repack) every block's weights on every call."""
    # oneDNN's packed layout depends on the full input shape, batch included: a layout chosen for batch 1 made the
    # 1024-channel pointwise conv ~1.4x slower at batch 8 (measured), so a new shape repacks; our kernels' do not
    input_size = list(x.shape)
    key = None if path == 'cpu_compiled' else tuple(input_size)
    return kept.kept(_cache.setdefault(parts.conv_dw, {}), (path, dtype), parts, key,
                     lambda: _fold(parts, input_size, dtype, path))


PATHS = ('cpu', 'cpu_compiled', 'cpu_hybrid')


def chosen(parts: BlockParts, path: Optional[str]) -> None:
    """Auto ran ``path`` for this block (``None``: the plain modules) after its check: keep the folded weights of the
    paths it chose for this block in any case, drop the others'. Why: auto's first call for a case runs every path,
    and each folds its own copy of the block's weights (9 MiB a block of pointwise weights alone at 1536 channels)."""
    keep = _chosen.setdefault(parts.conv_dw, set())
    if path is not None:
        keep.add(path)
    entries = _cache.get(parts.conv_dw, {})
    for dropped in [(p, dtype) for p, dtype in list(entries) if p not in keep]:
        entries.pop(dropped, None)  # (two threads deciding the same case at once may both drop it)


def paths(parts: BlockParts, x: torch.Tensor) -> Tuple[str, ...]:
    """The CPU paths that can run this block and input (cheap: no folding, no packing; empty where none applies):
    ``'cpu'`` (both convolutions on oneDNN) wherever :func:`applies`; ``'cpu_compiled'`` and ``'cpu_hybrid'`` (our
    depthwise kernel, and our GEMM or oneDNN's) when the kernels load (the first call may build them), also under
    bf16 autocast (:func:`_hybrid_dtype`, :func:`_compiled_dtype`)."""
    onednn_dtype, dtype = compute_dtypes(parts, x)
    onednn = ('cpu',) if onednn_dtype is not None else ()
    return onednn + PATHS[1:] if dtype is not None and _kernels_apply(parts) else onednn


def raced_paths(parts: BlockParts, x: torch.Tensor) -> Tuple[str, ...]:
    """The paths ``auto`` races (:func:`paths`), less ``'cpu_hybrid'`` where its pointwise output, which oneDNN's
    convolution allocates afresh each call, is at least :data:`FRESH_PAGES_BYTES`: there every block's output is new
    pages (measured at 256_8_ks9_p1's 64 x 256 x 32 x 32 fp32: 16385 minor faults a block, 75 against 63 ms for
    ``'cpu_compiled'``, which writes into a pooled buffer; whole model 657-664 against 514 ms a batch), yet whether the
    race saw them depended on the process's history (a whole-model run after other engines: raced 60.8 against 61.3
    ms, then ran 660 ms a batch). Where the faults did not come, ``'cpu_hybrid'`` ran 1.000x-1.008x ``'cpu_compiled'``
    at those sizes (fp32, 1536_20, 1024_16_ks9_p7, 256_8_ks9_p1; bf16 256_8_ks9_p1 0.871x; Zen 4)."""
    candidates = paths(parts, x)  # cpu_compiled and cpu_hybrid come together or not at all
    dtype = _hybrid_dtype(parts, x) if 'cpu_hybrid' in candidates else None
    if dtype is not None and x.numel() * dtype.itemsize >= FRESH_PAGES_BYTES:
        return tuple(path for path in candidates if path != 'cpu_hybrid')
    return candidates


def _kernels_apply(parts: BlockParts) -> bool:
    """Our kernels take this block: kernel sizes up to the depthwise window's limit, once built."""
    return parts.kernel_size <= cpu_kernels.MAX_KERNEL_SIZE and cpu_kernels.load() is not None


def _compiled_dtype(parts: BlockParts, x: torch.Tensor) -> Optional[torch.dtype]:
    """What ``'cpu_compiled'``'s GEMM multiplies: bf16 under bf16 autocast where oneDNN's bf16 is native and our GEMM
    has the bf16 dot product (AVX512-BF16; the block's input, its depthwise half's output and the pointwise weight in
    bf16, as eager autocast's; an even number of channels, as every ConvMixer has), else fp32 (the depthwise
    kernel's output and the GEMM in fp32, under autocast too); ``None`` where the path does not apply."""
    onednn, ours = compute_dtypes(parts, x)
    if ours is None or not _kernels_apply(parts):
        return None
    return pairs_dtype(onednn, ours) if parts.dim % 2 == 0 else ours


def pairs_dtype(onednn: Optional[torch.dtype], ours: torch.dtype) -> torch.dtype:
    """What our GEMM multiplies, given :func:`compute_dtypes`' answer: bf16 pairs where oneDNN would compute in bf16
    (bf16 autocast, native bf16) and our kernels have the bf16 dot product, else ``ours`` (fp32). The kernels must be
    loaded."""
    return torch.bfloat16 if onednn == torch.bfloat16 and cpu_kernels.bf16_dot() else ours


def _hybrid_dtype(parts: BlockParts, x: torch.Tensor) -> Optional[torch.dtype]:
    """What ``'cpu_hybrid'`` reads and writes: bf16 under bf16 autocast where oneDNN's bf16 is native (its pointwise
    conv in bf16, as eager autocast's; our depthwise kernel reading and writing bf16, see the module docstring), else
    fp32 (under autocast without native bf16 too: all of it in fp32, the output rounded); ``None`` where the path does
    not apply."""
    onednn, ours = compute_dtypes(parts, x)
    if ours is None or not _kernels_apply(parts):
        return None
    return onednn if onednn == torch.bfloat16 else ours


def block_forward(parts: BlockParts, x: torch.Tensor, path: str = 'cpu') -> Optional[torch.Tensor]:
    """Eval-mode block output by one of :data:`PATHS` (channels_last), or ``None`` when that path does not apply.

    ``parts`` as :func:`.eligibility.block_parts` returns them (the structural and mode checks are done).
    ``'cpu_compiled'`` runs each half as one pass of our kernels (:mod:`.cpu_kernels`): conv, bias, activation,
    BatchNorm scale and residual of the depthwise half; GEMM, bias, activation and BatchNorm affine of the pointwise
    half. ``'cpu'`` runs each half as a oneDNN convolution with the activation fused and an ``addcmul``;
    ``'cpu_hybrid'`` the depthwise half as ``'cpu_compiled'`` does, the pointwise half as ``'cpu'`` does.
    """
    if path not in PATHS:
        raise ValueError(f'path: expected one of {PATHS}, got {path!r}')
    out_dtype = conv_dtype(x)
    if path == 'cpu_hybrid':
        carried = hybrid_forward(parts, x)
        return None if carried is None else materialize(carried).to(out_dtype)
    compiled = path == 'cpu_compiled'
    dtype = _compiled_dtype(parts, x) if compiled else applies(parts, x)
    if dtype is None:
        return None
    f = _cached(parts, x, dtype, path)
    k = parts.kernel_size
    dim = x.shape[1]
    with torch.no_grad():
        if compiled:
            # under bf16 autocast the kernels read a bf16 x and write the bf16 output themselves: no pass of its
            # own converts either (two such passes cost 86 against 74 ms a block at 8 x 768 x 32 x 32, AVX2)
            x = _kernel_input(x, dtype)
            u = cpu_kernels.dw_block(x, f.taps, f.b_dw, f.s_dw.view(dim), k, parts.act, _scratch_like(x, dtype))
            return cpu_kernels.pw_block(u, f.panels, f.b_pw, f.s_pw.view(dim), f.t_pw.view(dim), parts.act,
                                        output_buffer(u.shape, out_dtype))
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        a = _conv(parts, x, f.w_dw, f.b_dw, dim)
        if k % 2 == 0:
            # PyTorch's "same" for even k pads (k-1)//2 before and k//2 after: pad k//2 on both sides and drop the
            # first row/column, which is exactly that window
            a = a[:, :, 1:, 1:]
            u = torch.addcmul(x, a, f.s_dw)
        else:
            u = torch.addcmul(x, a, f.s_dw, out=a)  # x + s1 * act(dw(x)); BN shift t1 lives in b_pw
        return materialize(Carried(_conv(parts, u, f.w_pw, f.b_pw, 1), f.s_pw, f.t_pw))


def _kernel_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as our depthwise kernel reads it for output in ``dtype``: channels_last, and in ``dtype`` unless it is
    bf16 (which the kernel widens as it reads, for a float32 output too)."""
    if x.dtype != dtype and x.dtype != torch.bfloat16:
        x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


def _conv(parts: BlockParts, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """oneDNN's convolution with the block's activation fused: the depthwise one ("same", padded k // 2 each side)
    when ``groups`` > 1, else the pointwise one."""
    attr, scalars, algorithm = POST_OPS[parts.act]
    pad = parts.kernel_size // 2 if groups > 1 else 0
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, [pad, pad], [1, 1], [1, 1], groups, attr, scalars, algorithm)


def materialize(carried: Carried) -> torch.Tensor:
    """The block output ``carried`` stands for, written over its ``a`` (which nothing else holds). In ``a``'s dtype:
    a bf16 ``a`` with fp32 factors (``'cpu_hybrid'`` under bf16 autocast) made ``addcmul`` cast element by element,
    ~8x the time of the pass (38 against ~4.5 ms at 8 x 768 x 32 x 32)."""
    a, dtype = carried.a, carried.a.dtype
    return torch.addcmul(carried.shift.to(dtype), a, carried.scale.to(dtype), out=a)


def hybrid_forward(parts: BlockParts, x: torch.Tensor, carried: Optional[Carried] = None) -> Optional[Carried]:
    """The ``'cpu_hybrid'`` block's output, its pointwise BatchNorm not yet applied, or ``None`` where the path does
    not apply. The input is ``x``, or, given ``carried``, the previous block's output that ``carried`` stands for
    (``x`` is then ignored): our depthwise kernel applies its affine as it reads ``carried.a``, so that output is
    never written."""
    if carried is not None:
        x = carried.a
    dtype = _hybrid_dtype(parts, x)
    if dtype is None:
        return None
    f = _cached(parts, x, dtype, 'cpu_hybrid')
    dim = x.shape[1]
    in_affine = None if carried is None else (carried.scale.view(dim), carried.shift.view(dim))
    with torch.no_grad():
        x = _kernel_input(x, dtype)
        u = cpu_kernels.dw_block(x, f.taps, f.b_dw, f.s_dw.view(dim), parts.kernel_size, parts.act,
                                 _scratch_like(x, dtype), in_affine)
        return Carried(_conv(parts, u, f.w_pw, f.b_pw, 1), f.s_pw, f.t_pw)
