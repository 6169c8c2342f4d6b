"""The Triton kernels as torch custom ops, with autograd, and the block-level entry ``triton_block_forward``.

Ops (namespace ``timm_convmixer``), each with a fake (meta) implementation so ``torch.compile``/``torch.export``
trace them as single nodes, and a backward that is itself a custom op running Triton kernels:

* ``dw_block(x, weight, bias, scale, shift, act) -> y``: ``x + scale * act(dwconv_kxk(x) + bias) + shift``, the
  depthwise residual branch with eval-mode BatchNorm as a per-channel affine. ``y`` is channels_last.
* ``act_affine(p, scale, shift, act) -> y``: ``scale * act(p) + shift`` on a 2-D ``[M, C]`` tensor, the pointwise
  conv's epilogue after a cuBLAS ``addmm`` (bias included there, for free).
* ``pw_block(x, weight, bias, scale, shift, act, save_preact) -> (y, p)``: the pointwise conv and that epilogue as one
  Triton GEMM, ``y = scale * act(x @ weight.T + bias) + shift`` on NHWC rows; ``p = x @ weight.T + bias`` is written
  too when ``save_preact`` (what its backward needs). :func:`pw_block` is the Python entry that asks for ``p`` exactly
  when autograd will want it. ``triton_block_forward(..., pointwise='triton')`` uses it; whether it beats cuBLAS +
  ``act_affine`` is for a timing on the GPU at hand to decide (``auto`` times both).

``act``: ``triton_kernels.ACT_*`` -- 0 identity, 1 GELU (exact erf form, as ``nn.GELU()``), 2 ReLU, 3 SiLU, 4 GELU
with the tanh approximation (``nn.GELU(approximate='tanh')``); ``triton_kernels.ACT_BY_NAME`` maps
``eligibility.ACT_NAMES`` to them.

dtypes and autocast: the ops compute in the dtype of ``x``/``p`` (fp16, bf16, fp32, fp64) with fp32 accumulation
(fp64 for fp64), reading weights/scale/shift of any float dtype; they have no autocast rule, so autocast passes them
through untouched (as it does ``batch_norm``). ``triton_block_forward`` applies autocast's own casts the way the eager
convolutions would: activations and conv weights/biases to the autocast dtype, BatchNorm's affine kept in fp32.

BatchNorm in training mode (batch statistics, running-stat updates) is not fused: ``triton_block_forward`` answers
``None`` for it and the eager modules run. Eval-mode BatchNorm is fused whether or not gradients are wanted: scale and
shift are computed from weight/bias/running stats with ordinary torch ops, so autograd carries their gradients back to
the BatchNorm parameters. Double backward is not supported. A call that wants no gradients (``no_grad``,
``inference_mode``) skips the custom ops and that arithmetic: the kernels run directly on the block's constants, kept
between calls (:func:`inference_constants`, :mod:`.kept`'s staleness rule).
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import kept
from . import triton_kernels as K
from .eligibility import BlockParts, act_name, block_parts, bn_scale_shift
from .runtime import TRITON_DTYPES, autocast_state, triton_device

__all__ = ['dw_block', 'act_affine', 'pw_block', 'triton_block_forward']

_LIB = 'timm_convmixer'


# --------------------------------------------------------------------------------------------------------------------
# depthwise residual branch


@torch.library.custom_op(f'{_LIB}::dw_block', mutates_args=())
def dw_block(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor, act: int) -> Tensor:
    """``x + scale * act(dwconv(x, weight, bias, padding="same")) + shift`` for NCHW ``x`` (channels_last is the
    fast layout), ``weight`` ``[C, 1, k, k]``; returns a channels_last tensor of ``x``'s dtype."""
    _check_dw_args(x, weight, bias, scale, shift, act)
    return K.dw_fwd(x, weight, bias, scale, shift, act)


@dw_block.register_fake
def _dw_block_fake(x, weight, bias, scale, shift, act):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op(f'{_LIB}::dw_block_backward', mutates_args=())
def dw_block_backward(
        grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, act: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``dw_block`` wrt ``(x, weight, bias, scale, shift)``, each in its input's dtype (the bias
    gradient in ``weight``'s dtype when there is no bias). Recomputes the conv from ``x``: nothing else is saved."""
    gx, gw, gb, gs, gt = K.dw_bwd(grad_out, x, weight, bias, scale, act)
    b_dtype = bias.dtype if bias is not None else weight.dtype
    # fresh tensors: custom op outputs may not alias each other (gb/gs/gt are slices of one partial-sum buffer)
    return gx, gw.to(weight.dtype), gb.to(b_dtype, copy=True), gs.to(scale.dtype, copy=True), \
        gt.to(scale.dtype, copy=True)


@dw_block_backward.register_fake
def _dw_block_backward_fake(grad_out, x, weight, bias, scale, act):
    C = x.shape[1]
    b_dtype = bias.dtype if bias is not None else weight.dtype
    return (
        torch.empty_like(x, memory_format=torch.channels_last),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        x.new_empty((C,), dtype=b_dtype),
        x.new_empty((C,), dtype=scale.dtype),
        x.new_empty((C,), dtype=scale.dtype),
    )


def _dw_block_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, act = inputs
    ctx.save_for_backward(x, weight, bias, scale)
    ctx.act = act


def _dw_block_bwd(ctx, grad_out):
    x, weight, bias, scale = ctx.saved_tensors
    gx, gw, gb, gs, gt = torch.ops.timm_convmixer.dw_block_backward(grad_out, x, weight, bias, scale, ctx.act)
    return gx, gw, (gb if bias is not None else None), gs, gt, None


torch.library.register_autograd(
    f'{_LIB}::dw_block', _dw_block_bwd, setup_context=_dw_block_setup_context)


def _check_dw_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor, act: int):
    """Shape errors here, readable, rather than out-of-bounds reads in a kernel."""
    if x.dim() != 4:
        raise ValueError(f'dw_block: x must be NCHW, got shape {tuple(x.shape)}')
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'dw_block: weight must be [{C}, 1, k, k], got {tuple(weight.shape)}')
    for name, t in (('bias', bias), ('scale', scale), ('shift', shift)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f'dw_block: {name} must be [{C}], got {tuple(t.shape)}')
    _check_act('dw_block', act)


def _check_act(op: str, act: int):
    if act not in K.ACT_CODES:
        names = ', '.join(f'{code} ({name})' for name, code in K.ACT_BY_NAME.items())
        raise ValueError(f'{op}: act must be one of {names}; got {act}')


# --------------------------------------------------------------------------------------------------------------------
# pointwise conv epilogue


@torch.library.custom_op(f'{_LIB}::act_affine', mutates_args=())
def act_affine(p: Tensor, scale: Tensor, shift: Tensor, act: int) -> Tensor:
    """``scale * act(p) + shift`` for a 2-D ``[M, C]`` ``p``, in ``p``'s dtype (fp32 math)."""
    if p.dim() != 2 or tuple(scale.shape) != (p.shape[1],) or tuple(shift.shape) != (p.shape[1],):
        raise ValueError(f'act_affine: p must be [M, C] with [C] scale/shift, got {tuple(p.shape)}, '
                         f'{tuple(scale.shape)}, {tuple(shift.shape)}')
    _check_act('act_affine', act)
    return K.act_affine_fwd(p, scale, shift, act)


@act_affine.register_fake
def _act_affine_fake(p, scale, shift, act):
    return torch.empty_like(p, memory_format=torch.contiguous_format)


@torch.library.custom_op(f'{_LIB}::act_affine_backward', mutates_args=())
def act_affine_backward(grad_out: Tensor, p: Tensor, scale: Tensor, act: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``act_affine`` wrt ``(p, scale, shift)``; recomputes ``act(p)``."""
    gp, gs, gt = K.act_affine_bwd(grad_out, p, scale, act)
    return gp, gs.to(scale.dtype, copy=True), gt.to(scale.dtype, copy=True)


@act_affine_backward.register_fake
def _act_affine_backward_fake(grad_out, p, scale, act):
    C = p.shape[1]
    return (
        torch.empty_like(p, memory_format=torch.contiguous_format),
        p.new_empty((C,), dtype=scale.dtype),
        p.new_empty((C,), dtype=scale.dtype),
    )


def _act_affine_setup_context(ctx, inputs, output):
    p, scale, shift, act = inputs
    ctx.save_for_backward(p, scale)
    ctx.act = act


def _act_affine_bwd(ctx, grad_out):
    p, scale = ctx.saved_tensors
    gp, gs, gt = torch.ops.timm_convmixer.act_affine_backward(grad_out, p, scale, ctx.act)
    return gp, gs, gt, None


torch.library.register_autograd(
    f'{_LIB}::act_affine', _act_affine_bwd, setup_context=_act_affine_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# pointwise conv with its epilogue, one GEMM


@torch.library.custom_op(f'{_LIB}::pw_block', mutates_args=())
def pw_block_op(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor, act: int, save_preact: bool,
) -> Tuple[Tensor, Tensor]:
    """``(scale * act(x @ weight.T + bias) + shift, p)`` for NHWC rows ``x`` ``[M, C_in]`` and ``weight``
    ``[C_out, C_in]`` of ``x``'s dtype; ``p = x @ weight.T + bias`` (in ``x``'s dtype) when ``save_preact``, else an
    empty tensor. fp32 accumulation (fp64 for fp64); fp32 inputs use TF32 exactly when PyTorch's matmuls would."""
    _check_pw_args(x, weight, bias, scale, shift, act)
    return K.pw_fwd(x, weight, bias, scale, shift, act, store_p=save_preact)


@pw_block_op.register_fake
def _pw_block_fake(x, weight, bias, scale, shift, act, save_preact):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, N) if save_preact else (0,))


@torch.library.custom_op(f'{_LIB}::pw_block_backward', mutates_args=())
def pw_block_backward(
        grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: Tensor, scale: Tensor, act: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``pw_block``'s ``y`` wrt ``(x, weight, bias, scale, shift)``, each in its input's dtype (the bias
    gradient in ``weight``'s dtype when there is no bias). ``p`` is the saved pre-activation; an empty ``p`` is
    recomputed (one more GEMM)."""
    if p.numel() == 0 and x.shape[0] * weight.shape[0]:
        p = torch.addmm(bias.to(x.dtype), x, weight.t()) if bias is not None else x.mm(weight.t())
    gx, gw, gb, gs, gt = K.pw_bwd(grad_out, x, weight, p, scale, act)
    b_dtype = bias.dtype if bias is not None else weight.dtype
    return gx, gw.to(weight.dtype), gb.to(b_dtype, copy=True), gs.to(scale.dtype, copy=True), \
        gt.to(scale.dtype, copy=True)


@pw_block_backward.register_fake
def _pw_block_backward_fake(grad_out, x, weight, bias, p, scale, act):
    N = weight.shape[0]
    b_dtype = bias.dtype if bias is not None else weight.dtype
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        x.new_empty((N,), dtype=b_dtype),
        x.new_empty((N,), dtype=scale.dtype),
        x.new_empty((N,), dtype=scale.dtype),
    )


def _pw_block_setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, act, save_preact = inputs
    _, p = output
    ctx.mark_non_differentiable(p)
    ctx.save_for_backward(x, weight, bias, p, scale)
    ctx.act = act


def _pw_block_bwd(ctx, grad_out, _grad_p):
    x, weight, bias, p, scale = ctx.saved_tensors
    gx, gw, gb, gs, gt = torch.ops.timm_convmixer.pw_block_backward(grad_out, x, weight, bias, p, scale, ctx.act)
    return gx, gw, (gb if bias is not None else None), gs, gt, None, None


torch.library.register_autograd(
    f'{_LIB}::pw_block', _pw_block_bwd, setup_context=_pw_block_setup_context)


def _check_pw_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor, act: int):
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f'pw_block: x must be [M, C_in] and weight [C_out, C_in], got {tuple(x.shape)} and '
                         f'{tuple(weight.shape)}')
    if weight.dtype != x.dtype:
        raise ValueError(f'pw_block: weight dtype {weight.dtype} differs from x dtype {x.dtype}')
    N = weight.shape[0]
    for name, t in (('bias', bias), ('scale', scale), ('shift', shift)):
        if t is not None and tuple(t.shape) != (N,):
            raise ValueError(f'pw_block: {name} must be [{N}], got {tuple(t.shape)}')
    _check_act('pw_block', act)


def pw_block(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor, act: int) -> Tensor:
    """``scale * act(x @ weight.T + bias) + shift`` as one fused GEMM: the pointwise conv of a block and its
    activation and eval-mode BatchNorm, on NHWC rows ``x`` ``[M, C_in]`` (``y.permute(0, 2, 3, 1).reshape(-1, C)`` of a
    channels_last ``y``). ``weight`` is the conv's ``[C_out, C_in, 1, 1]`` or ``[C_out, C_in]``. Differentiable; the
    pre-activation is kept for the backward only when autograd will run one."""
    weight = weight.reshape(weight.shape[0], -1)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, scale, shift))
    y, _ = torch.ops.timm_convmixer.pw_block(x, weight, bias, scale, shift, act, save)
    return y


# --------------------------------------------------------------------------------------------------------------------
# inference: the block's constants kept between calls


class InferenceConstants(NamedTuple):
    """What an eval-mode block's kernels read besides its input, in the compute dtype and the kernels' layouts."""
    w_taps: Tensor  # depthwise weight as [k*k, C]
    dw_bias: Optional[Tensor]
    s1: Tensor  # the depthwise BatchNorm as scale/shift (fp32; fp64 for fp64)
    t1: Tensor
    w_pw: Tensor  # pointwise weight as [C_out, C_in]
    pw_bias: Optional[Tensor]
    s2: Tensor
    t2: Tensor


# block -> {'triton': its InferenceConstants, as kept.kept keeps them}
_inference_constants = kept.store()


def inference_constants(block: nn.Module, parts: BlockParts, dtype: torch.dtype,
                        affine_dtype: torch.dtype) -> InferenceConstants:
    """The block's :class:`InferenceConstants` for ``dtype``, derived once and kept while the parameters and
    BatchNorm buffers they come from stay the same (:mod:`.kept`'s rule). Only for calls that want no gradients:
    the constants carry no autograd history."""
    return kept.kept(_inference_constants.setdefault(block, {}), 'triton', parts, (dtype, affine_dtype),
                     lambda: _compute_inference_constants(parts, dtype, affine_dtype))


def _compute_inference_constants(parts: BlockParts, dtype: torch.dtype,
                                 affine_dtype: torch.dtype) -> InferenceConstants:
    dw, pw = parts.conv_dw, parts.conv_pw
    with torch.inference_mode(False), torch.no_grad():  # kept tensors stay ordinary ones, whatever mode made them
        s1, t1 = bn_scale_shift(parts.bn_dw, affine_dtype)
        s2, t2 = bn_scale_shift(parts.bn_pw, affine_dtype)
        return InferenceConstants(
            K.taps(dw.weight.to(dtype)), None if dw.bias is None else dw.bias.to(dtype), s1.contiguous(),
            t1.contiguous(), pw.weight.to(dtype).reshape(pw.out_channels, -1).contiguous(),
            None if pw.bias is None else pw.bias.to(dtype), s2.contiguous(), t2.contiguous())


def _inference_forward(block: nn.Module, parts: BlockParts, x: Tensor, dtype: torch.dtype,
                       affine_dtype: torch.dtype, pointwise: str) -> Tensor:
    """:func:`triton_block_forward` without gradients: the kernels called directly (no custom-op dispatch, no
    autograd bookkeeping) with the block's kept constants."""
    c = inference_constants(block, parts, dtype, affine_dtype)
    y = K.dw_fwd_taps(x.to(dtype), c.w_taps, c.dw_bias, c.s1, c.t1, _act_code(parts.act_dw))
    y2d = K.rows(y)  # a view: y is channels_last
    act = _act_code(parts.act_pw)
    if pointwise == 'triton':
        out, _ = K.pw_fwd(y2d, c.w_pw, c.pw_bias, c.s2, c.t2, act, store_p=False)
    else:
        p = torch.addmm(c.pw_bias, y2d, c.w_pw.t()) if c.pw_bias is not None else torch.mm(y2d, c.w_pw.t())
        out = K.act_affine_fwd(p, c.s2, c.t2, act)
    out = K.image(out, x)
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


# --------------------------------------------------------------------------------------------------------------------
# block-level entry

POINTWISE = ('cublas', 'triton')  # triton_block_forward's ways to run the pointwise conv and its epilogue


def _act_code(m: nn.Module) -> Optional[int]:
    """The kernels' code for an activation module (``None``: no kernel computes it)."""
    return K.ACT_BY_NAME.get(act_name(m))


def triton_block_forward(
        block: nn.Module,
        x: Tensor,
        allow_interpreter: Optional[bool] = None,
        parts: Optional[BlockParts] = None,
        pointwise: str = 'cublas',
) -> Optional[Tensor]:
    """The fused forward of a ConvMixer ``MixerBlock``, or ``None`` when the fused ops do not reproduce it.

    ``pointwise``: how the 1x1 conv and its epilogue (activation, BatchNorm affine) run: ``'cublas'`` (a cuBLAS
    ``addmm``, bias included, then the ``act_affine`` kernel: one extra pass over the activations) or ``'triton'``
    (the ``pw_block`` GEMM with the epilogue fused, no extra pass). Which is faster depends on the GPU and the shape,
    so ``auto`` times both on first use.

    Applies to: CUDA tensors (CPU tensors only through Triton's interpreter, when ``allow_interpreter`` is true or,
    by default, ``TRITON_INTERPRET=1`` is set), fp16/bf16/fp32/fp64, a plain block in eval mode (as
    :func:`..eligibility.block_parts` decides; ``parts`` passes its answer when the caller has it) whose activation
    has a kernel. Gradients flow to the input and every parameter.

    The result has the eager block's values and memory format (channels_last in, channels_last out; the fast path is
    channels_last input, an NCHW input costs a transpose each way).
    """
    if pointwise not in POINTWISE:
        raise ValueError(f'pointwise: expected one of {POINTWISE}, got {pointwise!r}')
    if not isinstance(x, Tensor) or x.dim() != 4 or x.numel() == 0 or not triton_device(x, allow_interpreter):
        return None
    if parts is None:
        parts = block_parts(block)
    if parts is None or parts.mode != 'eval' or _act_code(parts.act_dw) is None:
        return None
    dw, act1, bn1, pw, act2, bn2 = parts.conv_dw, parts.act_dw, parts.bn_dw, parts.conv_pw, parts.act_pw, parts.bn_pw
    N, C, H, W = x.shape
    if C != parts.dim:
        return None

    _, autocast, autocast_dtype = autocast_state(x.device.type)
    if autocast:
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None  # autocast leaves fp64 alone and the eager conv would then see mixed dtypes
        dtype = autocast_dtype  # what autocast gives a conv
    else:
        dtype = x.dtype
        if dw.weight.dtype != dtype or pw.weight.dtype != dtype:
            return None  # eager would raise (or promote); let it
    if dtype not in TRITON_DTYPES:
        return None
    affine_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    if not torch.is_grad_enabled():
        return _inference_forward(block, parts, x, dtype, affine_dtype, pointwise)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(dtype)

    s1, t1 = bn_scale_shift(bn1, affine_dtype)
    s2, t2 = bn_scale_shift(bn2, affine_dtype)
    y = torch.ops.timm_convmixer.dw_block(
        x.to(dtype), cast(dw.weight), cast(dw.bias), s1, t1, _act_code(act1))  # channels_last [N, C, H, W]

    y2d = K.rows(y)  # a view: y is channels_last
    w_pw = cast(pw.weight).reshape(C, C)
    if pointwise == 'triton':
        out = pw_block(y2d, w_pw, cast(pw.bias), s2, t2, _act_code(act2))
    else:
        p = torch.addmm(cast(pw.bias), y2d, w_pw.t()) if pw.bias is not None else torch.mm(y2d, w_pw.t())
        out = torch.ops.timm_convmixer.act_affine(p, s2, t2, _act_code(act2))
    out = K.image(out, x)
    if not x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous()  # the eager block keeps an NCHW input's layout
    return out
