"""The memory-lean training block: the eager block's computation, keeping a third of its activations or less.

What autograd keeps for backward is what limits ConvMixer's batch size (locuslab/convmixer issue 13). A training
block through the plain modules keeps four (ReLU) to six (GELU) full activation tensors: the conv inputs ``x`` and
``u``, the activation inputs, the BatchNorm inputs. This block keeps one or two:

* the pointwise pre-activation ``p`` (recomputing it would cost the block's GEMM again);
* its input ``x``, unless ``x`` is the untouched output of the previous lean block: then ``x`` is
  ``BN(act(p_prev))`` with that block's batch statistics, rebuilt in backward from the ``p_prev`` it keeps anyway;
* per-channel batch statistics, the per-sample drop-path mask (``N`` numbers), and references to the parameters
  (so autograd's in-place checks still apply).

Forward is the eager block's, op for op (the module's convolutions, the kernel ``F.batch_norm`` picks, the same
running-statistics update: ``momentum`` or the cumulative average when it is ``None``, ``num_batches_tracked``, the
unbiased variance; drop path's own random draw), so outputs and running statistics equal eager's exactly. Backward
recomputes the depthwise branch from ``x`` and re-applies the saved statistics (one elementwise pass each; the
result is within an ulp of forward's), then runs the kernels autograd itself would run (BatchNorm, activation and
convolution backward); the pointwise convolution's gradients come from ``aten.convolution_backward`` (on a CPU
from two BLAS GEMMs, which oneDNN's convolution backward ran at 0.75x-0.95x of), so its GEMM is never repeated.
Autocast is restored in backward as it was in forward, so the recomputed casts are eager's. One exception, on a CPU
in float32: the depthwise conv's weight and bias gradients come from our compiled kernel
(``cpu_kernels.dw_weight_grad``; ATen's took 3.7x-18x the conv's forward at ConvMixer's shapes), which more than pays
for the recomputation there. :mod:`.lean_cpu` runs the normalisations and the pointwise convolution on our CPU
kernels too.

The price is the recomputation: a depthwise convolution and a few elementwise passes per block. This is plain
torch (and that one CPU kernel, where it builds) and runs on every device; ``auto`` times it against the plain
modules on first use (:mod:`.checked`) and keeps it only where it ran clearly faster, ``set_backend('lean')``
asks for the memory saving whatever it costs, and ``torch.compile`` never sees it (the dispatcher hands tracers the
plain modules).
"""
import contextlib
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .eligibility import BlockParts
from .runtime import autocast_state, conv_dtype, rows

__all__ = ['SavedNorm', 'TorchNorm', 'advance_running_stats', 'check_batch_size', 'lean_applies', 'lean_block_forward',
           'link_output', 'pointwise_backward_gemm', 'records_training', 'refuse_double_backward', 'under_checkpoint',
           'update_running_stats']

# attribute on a lean block's output: how to rebuild it from the previous block's pre-activation
_LINK = '_timm_convmixer_lean_link'

_ACT_FNS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'identity': lambda t: t,
    'relu': torch.relu,
    'gelu': F.gelu,
    'gelu_tanh': lambda t: F.gelu(t, approximate='tanh'),
    'silu': F.silu,
}


class _Link(NamedTuple):
    """A lean block's output ``out = bn(act(p))`` (batch statistics), enough to rebuild ``out`` from ``p``."""
    p: 'weakref.ref[torch.Tensor]'
    p_version: int
    out_version: int
    act: str
    bn: nn.BatchNorm2d
    mean: torch.Tensor  # the batch statistics ``out`` was normalised with ([C] each)
    invstd: torch.Tensor
    autocast: Tuple


def under_checkpoint() -> bool:
    """True while ``torch.utils.checkpoint`` (non-reentrant) packs or recomputes saved tensors.

    Checkpointing already bounds what a block keeps, and it requires a recomputation to save exactly what the
    original forward saved, which a link to another segment's tensor cannot promise: blocks run the plain modules.
    """
    top = getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)
    hooks = top(False) if top is not None else None
    if not hooks:
        return False
    name = getattr(hooks[0], '__qualname__', '')
    return name.startswith(('_checkpoint_hook', '_recomputation_hook'))


def _autocast(state: Tuple):
    device_type, enabled, dtype = state
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def _act_backward(name: str, grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """The activation's gradient by the very kernel autograd would use (``pre``: its input, ``post``: its output)."""
    if name == 'relu':
        return torch.ops.aten.threshold_backward(grad, post, 0)
    if name in ('gelu', 'gelu_tanh'):
        return torch.ops.aten.gelu_backward(grad, pre, approximate='tanh' if name == 'gelu_tanh' else 'none')
    if name == 'silu':
        return torch.ops.aten.silu_backward(grad, pre)
    return grad


class SavedNorm(NamedTuple):
    """A batch-statistics normalisation's output and what its backward needs (``impl`` and ``reserve``: torch's
    kernel choice and workspace; the Triton implementation leaves them empty)."""
    out: torch.Tensor
    save_mean: torch.Tensor
    save_var: torch.Tensor  # the kernel's own form (inverse std for the native and cuDNN kernels)
    reserve: torch.Tensor
    impl: int


def advance_running_stats(bn: nn.BatchNorm2d, update: bool) -> float:
    """The momentum a batch-statistics normalisation updates ``bn``'s running statistics with, advancing
    ``num_batches_tracked`` first when ``update`` (and ``bn`` tracks them) exactly as ``nn.BatchNorm2d.forward`` does:
    ``momentum``, or the cumulative average ``1 / num_batches_tracked`` when it is ``None``."""
    momentum = 0. if bn.momentum is None else bn.momentum
    if update and bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1. / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return momentum


def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """Advance ``bn``'s running statistics with a batch's ``mean`` and unbiased variance by eager's rule
    (:func:`advance_running_stats`), for the implementations that compute the statistics themselves (one fused
    ``lerp`` for both buffers, in their dtype)."""
    momentum = advance_running_stats(bn, update=True)
    if bn.running_mean is not None and momentum:
        torch._foreach_lerp_([bn.running_mean, bn.running_var], [
            mean.to(bn.running_mean.dtype), var_unbiased.to(bn.running_var.dtype)], momentum)


def _batch_norm(bn: nn.BatchNorm2d, t: torch.Tensor, weight, bias, update: bool) -> SavedNorm:
    """``bn.forward`` on batch statistics through the kernel ``F.batch_norm`` picks, keeping its saved statistics.

    ``update``: advance the running statistics (``num_batches_tracked``, ``momentum`` or the cumulative average when
    it is ``None``) exactly as ``nn.BatchNorm2d.forward`` does; otherwise leave the module untouched (recomputation).
    """
    check_batch_size(bn, t)
    momentum = advance_running_stats(bn, update)
    running_mean, running_var = bn.running_mean, bn.running_var
    if not update and running_mean is not None:
        running_mean, running_var = running_mean.clone(), running_var.clone()  # same kernel, nothing updated
    return SavedNorm(*torch._batch_norm_impl_index(
        t, weight, bias, running_mean, running_var, True, momentum, bn.eps, torch.backends.cudnn.enabled))


def check_batch_size(bn: nn.BatchNorm2d, t: torch.Tensor) -> None:
    if t.numel() // t.shape[1] <= 1:  # F.batch_norm's own check
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {t.size()}')


def _normalize(bn: nn.BatchNorm2d, t: torch.Tensor, weight, bias, mean, invstd) -> torch.Tensor:
    """Recompute a batch-statistics normalisation from its saved statistics: one elementwise pass.

    The statistics pass is the expensive half of ``batch_norm`` on a CPU; the inference kernel applies saved
    statistics in one pass. It takes a variance, so ``invstd`` goes back through ``1/invstd^2 - eps``: the result
    matches the forward's within an ulp or two.
    """
    var = invstd.double().pow(-2).sub(bn.eps).to(invstd.dtype)
    return torch.batch_norm(t, weight, bias, mean, var, False, 0., bn.eps, torch.backends.cudnn.enabled)


def _batch_norm_backward(bn: nn.BatchNorm2d, norm: SavedNorm, t: torch.Tensor, grad: torch.Tensor, weight,
                         needs):
    """Gradients wrt (input, weight, bias) of a :func:`_batch_norm` of ``t``, by autograd's own kernel."""
    return torch.ops.aten._batch_norm_impl_index_backward(
        norm.impl, t, grad, weight, bn.running_mean, bn.running_var, norm.save_mean, norm.save_var, True, bn.eps,
        [True, weight is not None and needs[0], weight is not None and needs[1]], norm.reserve)


class TorchNorm:
    """A block's two ``out = residual + mask * bn(act(t))`` steps (batch statistics) through torch's own kernels:
    what every device runs. :class:`.lean_triton.TritonNorm` is the same interface with fused Triton kernels; the
    autograd function below is written against it once."""
    name = 'lean'

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """The block's input as this implementation computes on it (as it is: torch's kernels take any layout)."""
        return x

    @staticmethod
    def conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """The depthwise convolution's forward (the module's own)."""
        return conv(x)

    @staticmethod
    def conv_again(conv: nn.Conv2d, x, weight, bias, needs) -> Tuple[torch.Tensor, Any]:
        """The depthwise convolution recomputed in backward: ``(z, saved)``, ``saved`` for :meth:`conv_backward`
        (here the recomputation's own autograd graph; ``needs``: gradients wanted for x, weight, bias). Where the
        conv computes in float32 on a CPU and our compiled kernels load, its weight and bias gradients are left to
        :func:`.cpu_kernels.dw_weight_grad` (ATen's weight gradient took 3.7x-18x the conv's forward at ConvMixer's
        shapes on an AVX2 Zen 3; ours ran 2.7x-10.3x faster), and autograd computes only x's."""
        ours = needs[1] and _cpu_weight_grad_applies(x, weight, conv.kernel_size[0])
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(needs[0])
            w_ = weight.detach().requires_grad_(needs[1] and not ours)
            b_ = None if bias is None else bias.detach().requires_grad_(needs[2] and not ours)
            z = F.conv2d(x_, w_, b_, conv.stride, conv.padding, conv.dilation, conv.groups)
        return z.detach(), (z, (x_, w_, b_), x if ours else None, conv.kernel_size[0])

    @staticmethod
    def conv_backward(saved, grad_z, grad_residual, needs) -> Tuple[Optional[torch.Tensor], ...]:
        """Gradients wrt ``(x, weight, bias)``; ``x``'s includes ``grad_residual``, what it gets past the conv."""
        z, inputs, x_for_weight_grad, k = saved
        wrt = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(z, wrt, grad_z) if wrt else ())
        grad_x, grad_w, grad_b = (next(grads) if t is not None and t.requires_grad else None for t in inputs)
        if x_for_weight_grad is not None:
            cl = torch.channels_last
            grad_w, grad_b = cpu_kernels.dw_weight_grad(
                x_for_weight_grad.contiguous(memory_format=cl), grad_z.contiguous(memory_format=cl), k)
            grad_b = grad_b if needs[2] else None
        if not needs[0]:
            return None, grad_w, grad_b
        if grad_x.dtype == grad_residual.dtype:  # grad_x is the conv's own new tensor: no second activation-sized one
            return grad_x.add_(grad_residual), grad_w, grad_b
        return grad_residual + grad_x, grad_w, grad_b

    @staticmethod
    def pointwise(conv: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
        """The pointwise convolution's forward (the module's own)."""
        return conv(u)

    @staticmethod
    def pointwise_backward(grad_p, u, dtype, weight, bias, needs) -> Tuple[Optional[torch.Tensor], ...]:
        """Gradients wrt ``(u, weight, bias)`` of ``p = conv1x1(u, weight, bias)`` (computed in ``dtype``, as autocast
        ran it) for ``grad_p``, without repeating its forward."""
        return _pointwise_backward(grad_p, u, dtype, weight, bias, needs)

    @staticmethod
    def forward(bn, t, act: str, weight, bias, mask=None, residual=None) -> Tuple[torch.Tensor, SavedNorm]:
        """The training forward: batch statistics of ``act(t)``, running statistics advanced as eager does; returns
        the output and the statistics backward needs."""
        norm = _batch_norm(bn, _ACT_FNS[act](t), weight, bias, update=True)
        out = norm.out
        if mask is not None:
            out = out * mask
        if residual is not None:
            out = out + residual
        return out, norm._replace(out=None)  # the statistics only: BN's own output may be freed now

    @staticmethod
    def again(bn, t, act: str, weight, bias, mean, invstd, mask=None, residual=None):
        """``forward``'s output recomputed from its saved statistics: ``(out, act(t))`` (the second for
        ``backward``)."""
        a = _ACT_FNS[act](t)
        out = _normalize(bn, a, weight, bias, mean, invstd)
        if mask is not None:
            out = out * mask
        if residual is not None:
            out = out + residual
        return out, a

    @staticmethod
    def backward(bn, norm: SavedNorm, t, act: str, grad, weight, needs, mask=None, act_out=None, into_gemm=False):
        """Gradients wrt ``(t, weight, bias)`` for the output's gradient ``grad`` (``act_out``: ``act(t)`` if known).
        ``into_gemm``: ``t`` is the pointwise convolution's output and its gradient goes to :meth:`pointwise_backward`
        alone, which takes it in whatever form this implementation hands it (here a tensor, as ever;
        :class:`.lean_cpu.CpuNorm` hands the GEMMs' operand with its column sums)."""
        a = _ACT_FNS[act](t) if act_out is None else act_out
        # in the normalisation's dtype, as autograd hands a sum's gradient to each term: under bf16 autocast a float32
        # residual (an input handed on in float32) makes the block's sum float32 and its gradient too
        grad = grad.to(a.dtype)
        if mask is not None:
            grad = grad * mask
        grad_a, grad_w, grad_b = _batch_norm_backward(bn, norm, a, grad, weight, needs)
        return _act_backward(act, grad_a, t, a), grad_w, grad_b


def _cpu_weight_grad_applies(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> bool:
    """Whether :func:`.cpu_kernels.dw_weight_grad` computes this depthwise conv's weight gradient: a float32 conv
    (not one autocast runs in bf16) on a CPU, a kernel size our kernels take, with the kernels loaded (built on first
    use; never where the build is off or failed)."""
    return (x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32 and conv_dtype(x) == torch.float32
            and kernel_size <= cpu_kernels.MAX_KERNEL_SIZE and cpu_kernels.load() is not None)


def _params(parts: BlockParts) -> List[Optional[torch.Tensor]]:
    return [
        parts.conv_dw.weight, parts.conv_dw.bias, parts.bn_dw.weight, parts.bn_dw.bias,
        parts.conv_pw.weight, parts.conv_pw.bias, parts.bn_pw.weight, parts.bn_pw.bias,
    ]


def _live_link(x: torch.Tensor) -> Optional[Tuple[_Link, torch.Tensor]]:
    link = getattr(x, _LINK, None)
    if link is None or x._version != link.out_version:
        return None
    p = link.p()
    if p is None or p._version != link.p_version:
        return None
    return link, p


class _LeanBlock(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, parts: BlockParts, holder: Dict[str, Any], *params):
        norm_ops = holder['norm']
        x = norm_ops.prepare(x)
        z = norm_ops.conv(parts.conv_dw, x)
        mask = None
        if type(parts.drop_path) is not nn.Identity and parts.drop_path.training and parts.drop_path.drop_prob > 0.:
            # the module's own draw on a ones tensor: exactly the mask (and random stream) eager would use
            mask = parts.drop_path(z.new_ones((z.shape[0],) + (1,) * (z.dim() - 1)))
        u, norm_dw = norm_ops.forward(parts.bn_dw, z, parts.act, params[2], params[3], mask, x)
        del z
        p = norm_ops.pointwise(parts.conv_pw, u)
        del u
        out, norm = norm_ops.forward(parts.bn_pw, p, parts.act, params[6], params[7])

        ctx.parts = parts
        ctx.norm_ops = norm_ops
        ctx.autocast = holder['autocast']
        ctx.impl = norm.impl
        linked = holder.get('link')
        ctx.link = None if linked is None else linked[0]
        source = x if linked is None else linked[1]  # what rebuilds the input in backward
        prev_bn = (None, None) if linked is None else (linked[0].bn.weight, linked[0].bn.bias)
        prev_stats = (None, None) if linked is None else (linked[0].mean, linked[0].invstd)
        ctx.save_for_backward(source, p, mask, norm.save_mean, norm.save_var, norm.reserve, norm_dw.save_mean,
                              norm_dw.save_var, norm_dw.reserve, *prev_bn, *prev_stats, *params)
        ctx.impl_dw = norm_dw.impl
        holder['p'] = p
        holder['stats'] = (norm.save_mean, norm.save_var)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward('the memory-lean training block')
        parts: BlockParts = ctx.parts
        norm_ops = ctx.norm_ops
        (source, p, mask, mean_pw, var_pw, reserve_pw, mean_dw, var_dw, reserve_dw, prev_w, prev_b, prev_mean,
         prev_invstd, *params) = ctx.saved_tensors
        w_dw, b_dw, g_dw, beta_dw, w_pw, b_pw, g_pw, beta_pw = params
        needs = ctx.needs_input_grad  # (x, parts, holder, *params)
        with torch.no_grad(), _autocast(ctx.autocast):
            # pointwise half, out = bn_pw(act(p))
            norm_pw = SavedNorm(None, mean_pw, var_pw, reserve_pw, ctx.impl)
            grad_p, grad_g_pw, grad_beta_pw = norm_ops.backward(
                parts.bn_pw, norm_pw, p, parts.act, grad_out, g_pw, needs[9:11], into_gemm=True)

            # the block's input: kept, or rebuilt from the previous lean block's pre-activation
            if ctx.link is None:
                x = source
            else:
                with _autocast(ctx.link.autocast):
                    x, _ = norm_ops.again(ctx.link.bn, source, ctx.link.act, prev_w, prev_b, prev_mean, prev_invstd)

            # depthwise half recomputed: u = x + drop_path(bn_dw(act(conv_dw(x))))
            needs_dw = (needs[0], needs[3], needs[4] and b_dw is not None)
            z, conv_saved = norm_ops.conv_again(parts.conv_dw, x, w_dw, b_dw, needs_dw)
            u, a1 = norm_ops.again(parts.bn_dw, z, parts.act, g_dw, beta_dw, mean_dw, var_dw, mask, x)

            # pointwise convolution's gradients from grad_p, without repeating its forward
            grad_u, grad_w_pw, grad_b_pw = norm_ops.pointwise_backward(grad_p, u, p.dtype, w_pw, b_pw, needs[7:9])
            del u, grad_p
            norm_dw = SavedNorm(None, mean_dw, var_dw, reserve_dw, ctx.impl_dw)
            grad_z, grad_g_dw, grad_beta_dw = norm_ops.backward(
                parts.bn_dw, norm_dw, z, parts.act, grad_u, g_dw, needs[5:7], mask, a1)
            del a1, z
            grad_x, grad_w_dw, grad_b_dw = norm_ops.conv_backward(conv_saved, grad_z, grad_u, needs_dw)
        bn_grads = lambda g, beta, need: (g if need[0] and g is not None else None,  # noqa: E731
                                          beta if need[1] and beta is not None else None)
        return (grad_x, None, None, grad_w_dw, grad_b_dw, *bn_grads(grad_g_dw, grad_beta_dw, needs[5:7]),
                grad_w_pw, grad_b_pw, *bn_grads(grad_g_pw, grad_beta_pw, needs[9:11]))


def refuse_double_backward(what: str) -> None:
    """Raise, naming ``what``, where a lean backward is asked to build a graph (``create_graph=True``, as a gradient
    penalty asks): its gradients are computed without one, so a second differentiation would silently miss every term
    through them (torch's ``once_differentiable`` would not catch it: its error is reached only where gradients flow
    back into the function's own inputs)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f'timm_convmixer: {what} has no double backward (create_graph=True, as a gradient penalty asks); train '
            "such a model with the plain modules: timm_convmixer.fast.set_backend('eager') or "
            'TIMM_CONVMIXER_BACKEND=eager')


def _pointwise_backward(grad_p, u, dtype, weight, bias, needs):
    """Gradients of ``p = conv1x1(u, weight, bias)`` (computed in ``dtype``, as autocast ran it) for ``grad_p``."""
    need_w, need_b = needs
    u_c = u.to(dtype)
    w_c = weight.detach().to(dtype)
    if grad_p.device.type == 'cpu':
        grad_u, grad_w, grad_b = pointwise_backward_gemm(grad_p, u_c, w_c, need_w)
    else:
        grad_u, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_p, u_c, w_c, None if bias is None else [bias.shape[0]],
            [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, need_w, bias is not None and need_b])
    grad_u = grad_u.to(u.dtype)
    grad_w = grad_w.to(weight.dtype).view_as(weight) if need_w else None
    grad_b = grad_b.to(bias.dtype) if bias is not None and need_b else None
    return grad_u, grad_w, grad_b


def pointwise_backward_gemm(grad_p, u, weight, need_w: bool):
    """A 1x1 convolution's ``(grad_u, grad_weight, grad_bias)`` as two BLAS GEMMs on views of the activations.

    Why: on a CPU, oneDNN's convolution backward ran these at 0.75x-0.95x of the GEMMs' speed at ConvMixer's
    shapes (AVX2 Zen 3, 2 threads; 8x768x32x32 and 64x256x16x16, both layouts, interleaved medians). Channels_last
    activations are ``(N*H*W, C)`` matrices as they lie (:func:`.runtime.rows`); NCHW ones ``N`` matrices ``(C,
    H*W)``, so the weight's gradient there is a batched GEMM summed over the batch.
    """
    n, c_out, h, w = grad_p.shape
    c_in = u.shape[1]
    w2 = weight.view(c_out, c_in)
    cl = torch.channels_last
    if grad_p.is_contiguous(memory_format=cl) and u.is_contiguous(memory_format=cl) and not grad_p.is_contiguous():
        g = rows(grad_p)
        grad_u = torch.mm(g, w2).view(n, h, w, c_in).permute(0, 3, 1, 2)
        grad_w = torch.mm(g.t(), rows(u)) if need_w else None
        return grad_u, grad_w, g.sum(0)
    g = grad_p.contiguous().view(n, c_out, h * w)
    grad_u = torch.matmul(w2.t(), g).view(n, c_in, h, w)
    grad_w = torch.bmm(g, u.contiguous().view(n, c_in, h * w).transpose(1, 2)).sum(0) if need_w else None
    return grad_u, grad_w, g.sum((0, 2))


def records_training(mode: str, x: torch.Tensor, params: Sequence[Optional[torch.Tensor]]) -> bool:
    """Where keeping less for backward can matter, for a block or the stem: training mode (batch statistics), a
    non-empty strided 4-d input, autograd recording with something wanting a gradient (the input or one of
    ``params``; otherwise nothing is kept anyway), and no checkpoint packing."""
    if mode != 'train' or x.dim() != 4 or x.layout != torch.strided or x.numel() == 0:
        return False
    if not torch.is_grad_enabled() or under_checkpoint():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for t in params)


def lean_applies(parts: BlockParts, x: torch.Tensor) -> bool:
    """Where the lean block may run: :func:`records_training` over the block's parameters."""
    return records_training(parts.mode, x, _params(parts))


def lean_block_forward(parts: BlockParts, x: torch.Tensor, norm=TorchNorm) -> Optional[torch.Tensor]:
    """The training-mode block through :class:`_LeanBlock`, or ``None`` where it does not apply (then eager runs).

    ``norm``: which implementation runs the block's normalisations (:class:`TorchNorm`, or
    :class:`.lean_triton.TritonNorm` where :func:`.lean_triton.applies`). The output carries a link so that the next
    lean block need not keep it.
    """
    if not lean_applies(parts, x):
        return None
    params = _params(parts)
    holder: Dict[str, Any] = {'autocast': autocast_state(x.device.type), 'link': _live_link(x), 'norm': norm}
    out = _LeanBlock.apply(x, parts, holder, *params)
    link_output(out, holder.pop('p'), parts.act, parts.bn_pw, *holder.pop('stats'), holder['autocast'])
    return out


def link_output(out: torch.Tensor, p: torch.Tensor, act: str, bn: nn.BatchNorm2d, mean: torch.Tensor,
                invstd: torch.Tensor, autocast: Tuple) -> None:
    """Mark ``out = bn(act(p))`` (batch statistics ``mean``/``invstd``, ``p`` kept for backward by whoever made
    ``out``) so that a lean block reading ``out`` rebuilds it from ``p`` in backward instead of keeping it; the link
    lapses if either tensor is modified in place, or ``p`` is freed."""
    setattr(out, _LINK, _Link(weakref.ref(p), p._version, out._version, act, bn, mean, invstd, autocast))
