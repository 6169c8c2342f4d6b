"""Triton kernels and custom ops for the ConvMixer block, checked through Triton's CPU interpreter.

The kernel launchers run CPU tensors through an ``InterpretedFunction`` of the same kernel source (see
``triton_kernels._Kernel``), so no environment variable has to be set before triton is imported and no subprocess is
needed. References are the eager torch functions, in float64 where the interpreter computes in float64 too, so any
indexing or formula error shows up far above rounding. Shapes are tiny: the interpreter costs ~0.1 ms per tile op.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

triton = pytest.importorskip('triton', reason='triton is not importable')

pytestmark = pytest.mark.kernels  # timm plays no part: ./run.sh test-min leaves these out

from helpers import Normal, Uniform, randomize_bn  # noqa: E402
from timm_convmixer.convmixer import MixerBlock  # noqa: E402
from timm_convmixer.fast.eligibility import block_parts  # noqa: E402
from timm_convmixer.fast import triton_ops as ops  # noqa: E402
from timm_convmixer.fast import triton_kernels as K  # noqa: E402
from timm_convmixer.fast.triton_kernels import ACT_GELU, ACT_GELU_TANH, ACT_IDENTITY, ACT_RELU, ACT_SILU  # noqa: E402

F64 = torch.float64
ACTS = {ACT_IDENTITY: lambda z: z, ACT_GELU: F.gelu, ACT_RELU: F.relu}
ACTS.update({ACT_SILU: F.silu, ACT_GELU_TANH: lambda z: F.gelu(z, approximate='tanh')})


def _ref_dw_conv(x, w, b):
    # pad by hand, as PyTorch's "same" does (extra row/column bottom/right for even k), to not rely on the warning path
    k = w.shape[-1]
    lo = (k - 1) // 2
    return F.conv2d(F.pad(x, (lo, k - 1 - lo, lo, k - 1 - lo)), w, b, groups=x.shape[1])


def _ref_dw_block(x, w, b, scale, shift, act):
    return x + ACTS[act](_ref_dw_conv(x, w, b)) * scale[:, None, None] + shift[:, None, None]


def _rand_dw_args(N, C, H, W, k, dtype=F64, bias=True):
    x = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, dtype=dtype) / k
    b = torch.randn(C, dtype=dtype) if bias else None
    return x, w, b, torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _poisoned(x):
    """An NCHW input filled with NaN outside the values, to catch a kernel reading outside its tensor's elements."""
    big = torch.full((x.shape[0], x.shape[1], x.shape[2] + 2, x.shape[3] + 2), float('nan'), dtype=x.dtype)
    big[:, :, 1:-1, 1:-1] = x
    return big[:, :, 1:-1, 1:-1]  # a strided view: the op has to gather it, never touching the NaN border


@pytest.mark.parametrize('k,shape,act', [
    (3, (2, 5, 6, 7), ACT_GELU),
    (5, (1, 3, 7, 4), ACT_RELU),
    (8, (1, 4, 5, 9), ACT_GELU),  # even: asymmetric "same" padding
    (9, (1, 3, 4, 6), ACT_IDENTITY),  # kernel larger than the image
])
def test_dw_block_forward(k, shape, act):
    x, w, b, s, t = _rand_dw_args(*shape, k)
    y = ops.dw_block(x, w, b, s, t, act)
    ref = _ref_dw_block(x, w, b, s, t, act)
    assert y.shape == ref.shape and y.dtype == F64
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_dw_block_nchw_input_and_no_bias():
    x, w, _, s, t = _rand_dw_args(2, 3, 4, 5, 3, bias=False)
    x_nchw = _poisoned(x.contiguous())
    y = ops.dw_block(x_nchw, w, None, s, t, ACT_GELU)
    torch.testing.assert_close(y, _ref_dw_block(x, w, None, s, t, ACT_GELU), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('k,shape,act,bias', [
    (3, (2, 5, 6, 7), ACT_GELU, True),
    (8, (1, 3, 5, 6), ACT_RELU, False),
])
def test_dw_block_backward(k, shape, act, bias):
    x, w, b, s, t = _rand_dw_args(*shape, k, bias=bias)
    leaves = [v for v in (x, w, b, s, t) if v is not None]
    for v in leaves:
        v.requires_grad_()
    gy = torch.randn(shape, dtype=F64)
    got = torch.autograd.grad(ops.dw_block(x, w, b, s, t, act), leaves, gy)
    want = torch.autograd.grad(_ref_dw_block(x, w, b, s, t, act), leaves, gy)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_dw_block_gradcheck():
    x, w, b, s, t = _rand_dw_args(1, 2, 3, 4, 3)
    args = [v.requires_grad_() for v in (x, w, b, s, t)]
    assert torch.autograd.gradcheck(lambda *a: ops.dw_block(*a, ACT_GELU), args, fast_mode=True)


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
def test_dw_block_low_precision(dtype, tol):
    x, w, b, s, t = _rand_dw_args(1, 4, 5, 6, 5, dtype=torch.float32)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    y = ops.dw_block(x, w, b, s, t, ACT_GELU)  # fp32 BN affine with low-precision activations, as autocast has it
    assert y.dtype == dtype
    assert _rel(y, _ref_dw_block(x.double(), w.double(), b.double(), s.double(), t.double(), ACT_GELU)) < tol
    gy = torch.randn_like(y)
    x.requires_grad_()
    w.requires_grad_()
    gx, gw = torch.autograd.grad(ops.dw_block(x, w, b, s, t, ACT_GELU), (x, w), gy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rgx, rgw = torch.autograd.grad(
        _ref_dw_block(xd, wd, b.double(), s.double(), t.double(), ACT_GELU), (xd, wd), gy.double())
    assert gx.dtype == dtype and gw.dtype == dtype
    assert _rel(gx, rgx) < tol and _rel(gw, rgw) < 4 * tol  # gw: fp32 sums of bf16 products, rounded once


@pytest.mark.parametrize('k,shape,bias,needs', [
    (3, (2, 5, 4, 6), True, (True, True, True)), (4, (1, 3, 5, 5), False, (True, True, False)),
    (5, (1, 4, 3, 7), True, (False, True, True)), (3, (1, 2, 4, 4), True, (True, False, False))])
def test_dw_conv_forward_backward(k, shape, bias, needs, monkeypatch):
    """The training block's bare depthwise conv and its gradients (the input's with the residual's added), against
    autograd in float64; even k pads as "same" does. Few weight-gradient programs, so its loop runs several times."""
    monkeypatch.setattr(K, '_GW_SPLIT', 3)
    x, w, b, _, _ = _rand_dw_args(*shape, k, bias=bias)
    x = _poisoned(x)  # an NCHW view
    z = K.dw_conv(x, w, b)
    assert z.dtype == F64 and z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, _ref_dw_conv(x, w, b), rtol=1e-10, atol=1e-10)
    gz = torch.randn(shape, dtype=F64).contiguous(memory_format=torch.channels_last)
    g_res = torch.randn(shape, dtype=F64).contiguous(memory_format=torch.channels_last)
    gx, gw, gb = K.dw_conv_bwd(gz, x, w, g_res, needs)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    want = torch.autograd.grad(_ref_dw_conv(*leaves, *(() if bias else (None,))), leaves, gz)
    for got, ref, need in zip((gx, gw, gb), (want[0] + g_res, want[1], want[2] if bias else None), needs):
        if not need:
            assert got is None
            continue
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_dw_conv_low_precision():
    """bf16 in, bf16 out, fp32 accumulation: within bf16 rounding of float64; gradients in fp32 (weight, bias) and
    the residual gradient's dtype (input)."""
    x, w, b, _, _ = _rand_dw_args(2, 8, 5, 6, 5, dtype=torch.float32)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    z = K.dw_conv(xb, wb, bb)
    assert z.dtype == torch.bfloat16
    assert _rel(z, _ref_dw_conv(xb.double(), wb.double(), bb.double())) < 8e-3
    gz = torch.randn(z.shape).bfloat16().contiguous(memory_format=torch.channels_last)
    g_res = torch.randn(z.shape).contiguous(memory_format=torch.channels_last)
    gx, gw, gb = K.dw_conv_bwd(gz, xb, wb, g_res, (True, True, True))
    assert (gx.dtype, gw.dtype, gb.dtype) == (torch.float32, torch.float32, torch.float32)
    leaves = [t.double().requires_grad_() for t in (xb, wb, bb)]
    rx, rw, rb = torch.autograd.grad(_ref_dw_conv(*leaves), leaves, gz.double())
    assert _rel(gx, rx + g_res) < 1e-5 and _rel(gw, rw) < 1e-5 and _rel(gb, rb) < 1e-5


@pytest.mark.parametrize('act', [ACT_GELU, ACT_RELU, ACT_IDENTITY, ACT_SILU, ACT_GELU_TANH])
def test_act_affine_forward_backward(act):
    p = torch.randn(37, 6, dtype=F64, requires_grad=True)  # 37 rows: a partial tile
    s = torch.randn(6, dtype=F64, requires_grad=True)
    t = torch.randn(6, dtype=F64, requires_grad=True)
    y = ops.act_affine(p, s, t, act)
    ref = ACTS[act](p) * s + t
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, (p, s, t), gy), torch.autograd.grad(ref, (p, s, t), gy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_opcheck_fake_and_autograd_registration():
    """The fake implementations and autograd registration pass torch's own custom-op checks (what compile needs)."""
    x, w, b, s, t = _rand_dw_args(1, 3, 4, 4, 3)
    res = torch.library.opcheck(
        torch.ops.timm_convmixer.dw_block.default,
        (x.requires_grad_(), w.requires_grad_(), b, s.requires_grad_(), t, ACT_RELU),
        test_utils=('test_schema', 'test_faketensor', 'test_autograd_registration'))
    assert all(v == 'SUCCESS' for v in res.values()), res
    res = torch.library.opcheck(
        torch.ops.timm_convmixer.act_affine.default,
        (torch.randn(9, 3, requires_grad=True), torch.randn(3, requires_grad=True), torch.randn(3), ACT_GELU))
    assert all(v == 'SUCCESS' for v in res.values()), res


def test_ops_reject_bad_shapes():
    x, w, b, s, t = _rand_dw_args(1, 3, 4, 4, 3)
    with pytest.raises(ValueError, match='weight'):
        ops.dw_block(x, w[:2], b, s, t, ACT_GELU)
    with pytest.raises(ValueError, match='act'):
        ops.dw_block(x, w, b, s, t, 7)


# --------------------------------------------------------------------------------------------------------------------
# block level


def _eval_block(dim, k, act_layer=nn.GELU, dtype=F64, **kwargs):
    block = MixerBlock(dim, k, act_layer=act_layer, **kwargs).to(dtype)
    # non-trivial running stats and affine, so the folding is tested
    randomize_bn(block, seed=None, mean=Normal(), var=Uniform(0.5, 2.), weight=Normal(), bias=Normal())
    return block.eval()


def _eager(block, x):
    return nn.Sequential.forward(block, x)  # the plain modules, whatever the fast seam does


@pytest.mark.parametrize('k,act_layer,shape', [
    (9, nn.GELU, (1, 6, 4, 5)),
    (8, nn.ReLU, (2, 4, 3, 6)),
])
def test_block_forward_backward_matches_eager(k, act_layer, shape):
    block = _eval_block(shape[1], k, act_layer)
    x = torch.randn(shape, dtype=F64).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = ops.triton_block_forward(block, x, allow_interpreter=True)
    assert y is not None
    ref = _eager(block, x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)
    leaves = [x] + list(block.parameters())
    gy = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_block_nchw_input_keeps_layout():
    block = _eval_block(4, 3, nn.GELU)
    x = torch.randn(1, 4, 3, 5, dtype=F64)
    y = ops.triton_block_forward(block, x, allow_interpreter=True)
    assert y is not None and y.is_contiguous()
    torch.testing.assert_close(y, _eager(block, x), rtol=1e-12, atol=1e-12)


def test_block_under_autocast_matches_eager_autocast():
    block = _eval_block(8, 3, nn.GELU, dtype=torch.float32)
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = ops.triton_block_forward(block, x, allow_interpreter=True)
        ref = _eager(block, x)
    assert y is not None and y.dtype == ref.dtype == torch.bfloat16
    exact = _eager(block.double(), x.double())
    # both round at bf16 (eager after every op, fused once); each is within bf16 error of the exact function
    assert _rel(y, exact) < 1e-2 and _rel(ref, exact) < 1e-2


@pytest.mark.parametrize('pointwise', ops.POINTWISE)
def test_inference_path_keeps_constants_until_the_block_changes(pointwise):
    """Without gradients the block's folded constants are kept between calls; every way a block's parameters or
    running statistics change (in-place update, a BatchNorm training step, load_state_dict, a dtype change, a
    replaced parameter) must give a result computed from the new values, equal to the differentiable path's."""
    block = _eval_block(6, 3, nn.GELU)
    x = torch.randn(2, 6, 4, 5, dtype=F64).contiguous(memory_format=torch.channels_last)
    parts = block_parts(block)

    def check():
        with torch.no_grad():
            got = ops.triton_block_forward(block, x, allow_interpreter=True, pointwise=pointwise)
        with_grad = ops.triton_block_forward(block, x, allow_interpreter=True, pointwise=pointwise)
        assert got is not None and with_grad.requires_grad
        torch.testing.assert_close(got, with_grad.detach(), rtol=0, atol=0)  # same kernels, same constants
        torch.testing.assert_close(got, _eager(block, x), rtol=1e-12, atol=1e-12)

    check()
    kept = ops.inference_constants(block, block_parts(block), F64, F64)
    assert ops.inference_constants(block, block_parts(block), F64, F64) is kept  # nothing changed: reused
    with torch.no_grad():
        block[1].weight.mul_(-2.)  # an optimizer step's kind of write
    check()
    assert ops.inference_constants(block, block_parts(block), F64, F64) is not kept
    block.train()
    _eager(block, torch.randn(3, 6, 4, 5, dtype=F64))  # BatchNorm running statistics advance in place
    block.eval()
    check()
    other = _eval_block(6, 3, nn.GELU)
    block.load_state_dict(other.state_dict())
    check()
    block[0].fn[0].weight = nn.Parameter(torch.randn_like(block[0].fn[0].weight))
    check()
    block[0].fn[2].eps = 0.5
    check()
    block.float()
    x = x.float()
    with torch.no_grad():
        got = ops.triton_block_forward(block, x, allow_interpreter=True, pointwise=pointwise)
    torch.testing.assert_close(got, _eager(block, x), rtol=1e-5, atol=1e-5)
    assert parts.conv_dw is block[0].fn[0]


def test_inference_path_for_a_model_made_in_inference_mode():
    """Tensors made under inference_mode keep no version counter: nothing to key the kept constants on, so they are
    computed per call, and the result is still right."""
    with torch.inference_mode():
        block = _eval_block(4, 3, nn.ReLU)
        x = torch.randn(1, 4, 3, 5, dtype=F64)
        y = ops.triton_block_forward(block, x, allow_interpreter=True)
        torch.testing.assert_close(y, _eager(block, x), rtol=1e-12, atol=1e-12)
    assert not ops._inference_constants.get(block)  # nothing kept


def test_block_interpreter_gate_reads_env(monkeypatch):
    block = _eval_block(4, 3)
    x = torch.randn(1, 4, 3, 3, dtype=F64)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    assert ops.triton_block_forward(block, x) is None  # CPU tensors need the interpreter asked for
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    y = ops.triton_block_forward(block, x)
    assert y is not None
    torch.testing.assert_close(y, _eager(block, x), rtol=1e-12, atol=1e-12)



def test_model_blocks_take_the_triton_path_under_the_interpreter(monkeypatch, small_model, run_counted):
    """The wiring a GPU run relies on, ``MixerBlock.forward`` -> ``fast.block_forward`` -> ``triton_block_forward``,
    driven through a whole model with Triton's interpreter: every block answered by Triton, forward and gradients
    equal to the eager modules in float64."""
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    model = small_model(dim=8, depth=2, kernel_size=5, patch_size=4, num_classes=3, randomize={}).double()
    x = torch.randn(2, 3, 16, 12, dtype=F64)  # 4x3 tokens
    out, paths = run_counted(model, x, backend='triton')
    ref, ref_paths = run_counted(model, x, backend='eager')
    assert paths == {'triton': 2} and ref_paths == {'eager': 2}
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(out, params, gy)
    want = torch.autograd.grad(ref, params, gy)
    for (name, _), g, r in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m: f'{name}: {m}')

def test_block_declines_what_it_does_not_compute():
    x = torch.randn(1, 4, 3, 3, dtype=F64)
    fwd = lambda b, inp=x: ops.triton_block_forward(b, inp, allow_interpreter=True)  # noqa: E731

    block = _eval_block(4, 3)
    block[3].train()  # batch statistics + running-stat update: not fused
    assert fwd(block) is None

    assert fwd(_eval_block(4, 3, act_layer=nn.Hardswish)) is None  # no kernel for it

    block = _eval_block(4, 3, drop_path=0.5)
    assert fwd(block) is not None  # drop path inactive in eval
    block[0].drop_path.train()
    assert fwd(block) is None

    block = _eval_block(4, 3)
    handle = block[1].register_forward_hook(lambda m, i, o: None)
    assert fwd(block) is None
    handle.remove()
    assert fwd(block) is not None

    assert fwd(_eval_block(4, 3), x.float()) is None  # dtype mismatch without autocast: eager decides
    assert fwd(_eval_block(4, 3), x[:, :2]) is None


# --------------------------------------------------------------------------------------------------------------------
# every activation code, even kernels


@pytest.mark.parametrize('act,k,shape', [
    (ACT_SILU, 8, (1, 5, 6, 7)),  # even kernel: "same" pads 3 before, 4 after
    (ACT_GELU_TANH, 7, (2, 3, 5, 4)),
    (ACT_RELU, 8, (1, 4, 9, 5)),  # 9 rows: more than one row chunk in the backward
    (ACT_IDENTITY, 5, (1, 3, 4, 6)),
    (ACT_GELU, 9, (1, 4, 5, 5)),
])
def test_dw_block_every_activation_forward_backward(act, k, shape):
    x, w, b, s, t = _rand_dw_args(*shape, k)
    leaves = [v.requires_grad_() for v in (x, w, b, s, t)]
    y = ops.dw_block(x, w, b, s, t, act)
    ref = _ref_dw_block(x, w, b, s, t, act)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(shape, dtype=F64)
    for g, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_dw_block_wide_image_and_many_channels():
    """A row of several strips (8 pixels each), the last one partial, in half precision."""
    x, w, b, s, t = _rand_dw_args(1, 20, 3, 21, 8, dtype=torch.float32)
    x, w, b = x.half(), w.half(), b.half()
    leaves = [v.requires_grad_() for v in (x, w)]
    y = ops.dw_block(x, w, b, s, t, ACT_SILU)
    args64 = [v.detach().double().requires_grad_() for v in (x, w)]
    ref = _ref_dw_block(*args64[:1], args64[1], b.double(), s.double(), t.double(), ACT_SILU)
    assert _rel(y, ref) < 1e-3
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, gy.half())
    want = torch.autograd.grad(ref, args64, gy)
    assert _rel(got[0], want[0]) < 1e-3 and _rel(got[1], want[1]) < 4e-3


@pytest.mark.parametrize('k', [9, 4])
def test_dw_kernels_partial_strips_and_channel_blocks(k, monkeypatch):
    """Strips of 3 pixels (rows of 7: the last strip partial, so its missing outputs are masked while their source
    pixels are still read for the others) and blocks of 4 channels (10 channels: the last block partial), a kernel
    wider than the image: forward, backward of the fused block (each gz program over several rows) and of the bare
    conv, through every strip and channel-block combination."""
    monkeypatch.setattr(K, '_STRIP', 3)
    monkeypatch.setattr(K, '_GZ_STRIP', 2)
    monkeypatch.setattr(K, '_STRIP_C', 4)
    x, w, b, s, t = _rand_dw_args(1, 10, 5, 7, k)
    leaves = [v.requires_grad_() for v in (x, w, b, s, t)]
    y = ops.dw_block(x, w, b, s, t, ACT_GELU)
    ref = _ref_dw_block(x, w, b, s, t, ACT_GELU)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(x.shape, dtype=F64)
    for g, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    xd, wd = x.detach(), w.detach()
    torch.testing.assert_close(K.dw_conv(xd, wd, None), _ref_dw_conv(xd, wd, None), rtol=1e-12, atol=1e-12)
    gz = gy.contiguous(memory_format=torch.channels_last)
    gx, _, _ = K.dw_conv_bwd(gz, xd, wd, torch.zeros_like(gz), (True, False, False))
    xr = xd.clone().requires_grad_()
    torch.testing.assert_close(gx, torch.autograd.grad(_ref_dw_conv(xr, wd, None), xr, gz)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings('ignore:overflow encountered in exp:RuntimeWarning')  # numpy, in the interpreter: meant
def test_activations_far_from_zero():
    """Large |z| saturates exp() to inf or 0 in the sigmoid forms; values and gradients stay finite and right."""
    p = torch.tensor([[-800., -60., -3., 0., 3., 60., 800.]], dtype=F64).repeat(3, 1).requires_grad_()
    s, t = torch.ones(7, dtype=F64), torch.zeros(7, dtype=F64)
    for act in (ACT_SILU, ACT_GELU_TANH, ACT_GELU):
        y = ops.act_affine(p, s, t, act)
        ref = ACTS[act](p)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        g, = torch.autograd.grad(y.sum(), p)
        r, = torch.autograd.grad(ref.sum(), p)
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('k,act_layer,shape', [
    (5, nn.SiLU, (1, 4, 4, 5)),
    (8, lambda: nn.GELU(approximate='tanh'), (1, 3, 5, 4)),
])
def test_block_new_activations_match_eager(k, act_layer, shape):
    block = _eval_block(shape[1], k, act_layer)
    x = torch.randn(shape, dtype=F64).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = ops.triton_block_forward(block, x, allow_interpreter=True)
    assert y is not None
    ref = _eager(block, x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    leaves = [x] + list(block.parameters())
    gy = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_act_code_covers_every_activation_name():
    from timm_convmixer.fast.eligibility import ACT_NAMES
    assert set(K.ACT_BY_NAME) == set(ACT_NAMES)
    assert set(K.ACT_BY_NAME.values()) == set(K.ACT_CODES)
    assert ops._act_code(nn.GELU(approximate='tanh')) == ACT_GELU_TANH
    assert ops._act_code(nn.SiLU()) == ACT_SILU
    assert ops._act_code(nn.GELU()) == ACT_GELU
    assert ops._act_code(nn.Hardswish()) is None


# --------------------------------------------------------------------------------------------------------------------
# fused pointwise GEMM + epilogue


def _ref_pw(x, w, b, s, t, act):
    return ACTS[act](F.linear(x, w, b)) * s + t


def _rand_pw_args(M, C_in, C_out, dtype=F64, bias=True):
    return (torch.randn(M, C_in, dtype=dtype), torch.randn(C_out, C_in, dtype=dtype) / C_in ** 0.5,
            torch.randn(C_out, dtype=dtype) if bias else None, torch.randn(C_out, dtype=dtype),
            torch.randn(C_out, dtype=dtype))


@pytest.mark.parametrize('act,bias', [
    (ACT_GELU, True), (ACT_RELU, False), (ACT_SILU, True), (ACT_GELU_TANH, True), (ACT_IDENTITY, False),
])
def test_pw_block_forward_backward(act, bias):
    x, w, b, s, t = _rand_pw_args(37, 40, 20, bias=bias)  # partial tiles in M, N and K (K: two steps of 16 + 8)
    leaves = [v.requires_grad_() for v in (x, w, b, s, t) if v is not None]
    y = ops.pw_block(x, w, b, s, t, act)
    ref = _ref_pw(x, w, b, s, t, act)
    assert y.shape == ref.shape and y.dtype == F64
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_pw_block_keeps_preactivation_only_for_autograd():
    x, w, b, s, t = _rand_pw_args(9, 16, 16)
    with torch.no_grad():
        y, p = torch.ops.timm_convmixer.pw_block(x, w, b, s, t, ACT_GELU, False)
    assert p.numel() == 0
    y2, p2 = torch.ops.timm_convmixer.pw_block(x, w, b, s, t, ACT_GELU, True)
    torch.testing.assert_close(p2, F.linear(x, w, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    # a direct call without the saved p still differentiates (recomputing it)
    x.requires_grad_()
    y3, _ = torch.ops.timm_convmixer.pw_block(x, w, b, s, t, ACT_GELU, False)
    g, = torch.autograd.grad(y3.sum(), x)
    r, = torch.autograd.grad(_ref_pw(x, w, b, s, t, ACT_GELU).sum(), x)
    torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_pw_block_conv_weight_and_nhwc_rows():
    """The block's own tensors: a [C, C, 1, 1] conv weight and the rows of a channels_last activation."""
    conv = nn.Conv2d(12, 12, 1).double()
    a = torch.randn(2, 12, 3, 5, dtype=F64).contiguous(memory_format=torch.channels_last)
    rows = a.permute(0, 2, 3, 1).reshape(-1, 12)
    s, t = torch.randn(12, dtype=F64), torch.randn(12, dtype=F64)
    y = ops.pw_block(rows, conv.weight, conv.bias, s, t, ACT_RELU)
    ref = F.relu(conv(a)) * s[:, None, None] + t[:, None, None]
    torch.testing.assert_close(y, ref.permute(0, 2, 3, 1).reshape(-1, 12), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_pw_block_low_precision(dtype, tol):
    x, w, b, s, t = _rand_pw_args(33, 32, 24, dtype=torch.float32)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    y = ops.pw_block(x, w, b, s, t, ACT_GELU)  # fp32 BN affine with low-precision activations, as autocast has it
    assert y.dtype == dtype
    exact = _ref_pw(x.double(), w.double(), b.double(), s.double(), t.double(), ACT_GELU)
    assert _rel(y, exact) < tol
    x.requires_grad_()
    w.requires_grad_()
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(ops.pw_block(x, w, b, s, t, ACT_GELU), (x, w), gy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rgx, rgw = torch.autograd.grad(_ref_pw(xd, wd, b.double(), s.double(), t.double(), ACT_GELU), (xd, wd),
                                   gy.double())
    assert gx.dtype == dtype and gw.dtype == dtype
    assert _rel(gx, rgx) < 2 * tol and _rel(gw, rgw) < 2 * tol


def test_pw_block_opcheck_and_errors():
    x, w, b, s, t = _rand_pw_args(9, 16, 16)
    res = torch.library.opcheck(
        torch.ops.timm_convmixer.pw_block.default,
        (x.requires_grad_(), w.requires_grad_(), b, s.requires_grad_(), t, ACT_SILU, True),
        test_utils=('test_schema', 'test_faketensor', 'test_autograd_registration'))
    assert all(v == 'SUCCESS' for v in res.values()), res
    with pytest.raises(ValueError, match='weight'):
        ops.pw_block(x, w[:, :8], b, s, t, ACT_GELU)
    with pytest.raises(ValueError, match='dtype'):
        ops.pw_block(x, w.float(), b, s, t, ACT_GELU)
    with pytest.raises(ValueError, match='act'):
        ops.pw_block(x, w, b, s, t, 9)


# --------------------------------------------------------------------------------------------------------------------
# launch recording (what the ahead-of-time compile test builds on)


def test_meta_tensors_record_launches_and_launch_nothing():
    x = torch.empty(2, 64, 8, 8, device='meta').contiguous(memory_format=torch.channels_last)
    w = torch.empty(64, 1, 7, 7, device='meta')
    s = torch.empty(64, device='meta')
    with K.record_launches() as launches:
        y = K.dw_fwd(x, w, s, s, s, ACT_SILU)
    assert y.device.type == 'meta' and y.shape == x.shape
    (launch,) = launches
    assert launch.kernel.name == '_dw_fwd_kernel' and launch.kwargs['K'] == 7
    assert launch.grid == (2 * 8 * 1, 1)  # rows of 8 pixels in one strip each, the 64 channels in one block
    with K.record_launches() as launches:
        K.dw_bwd(x, x, w, s, s, ACT_SILU)
    assert [la.kernel.name for la in launches] == ['_dw_bwd_gz_kernel', '_dw_bwd_gx_kernel', '_dw_bwd_gw_kernel']
    with pytest.raises(RuntimeError, match='record_launches'):
        K.dw_fwd(x, w, s, s, s, ACT_SILU)



def test_dw_block_backward_loops_run_more_than_once(monkeypatch):
    """Rows per weight-gradient program (64 programs on real inputs) and a partial last chunk of the 8-row programs
    that produce gz: with fewer programs than rows, every loop of the backward kernels runs more than once."""
    monkeypatch.setattr(K, '_GW_SPLIT', 3)
    x, w, b, s, t = _rand_dw_args(1, 3, 10, 4, 3)
    leaves = [v.requires_grad_() for v in (x, w, b, s, t)]
    gy = torch.randn(x.shape, dtype=F64)
    got = torch.autograd.grad(ops.dw_block(x, w, b, s, t, ACT_GELU_TANH), leaves, gy)
    want = torch.autograd.grad(_ref_dw_block(x, w, b, s, t, ACT_GELU_TANH), leaves, gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_act_affine_backward_several_programs(monkeypatch):
    """Several backward programs (each walks _BWD_TILES row tiles), the last one partial."""
    monkeypatch.setattr(K, '_BWD_TILES', 2)
    p = torch.randn(45, 4, dtype=F64, requires_grad=True)  # 4 channels: 8-row tiles, 6 of them, 3 programs
    s = torch.randn(4, dtype=F64, requires_grad=True)
    t = torch.randn(4, dtype=F64, requires_grad=True)
    gy = torch.randn(45, 4, dtype=F64)
    with K.record_launches() as launches:
        K.act_affine_bwd(gy.to('meta'), p.detach().to('meta'), s.detach().to('meta'), ACT_SILU)
    assert launches[0].grid == (3, 1)
    got = torch.autograd.grad(ops.act_affine(p, s, t, ACT_SILU), (p, s, t), gy)
    want = torch.autograd.grad(F.silu(p) * s + t, (p, s, t), gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('act', [ACT_GELU, ACT_RELU, ACT_SILU])
def test_training_batch_norm_kernels_match_autograd(act, monkeypatch):
    """The lean block's fused training-mode BatchNorm: ``bn_batch_stats`` (batch statistics), ``act_affine_fwd`` with
    the drop-path mask and the residual, ``bn_train_bwd`` (gradients wrt input, weight, bias) against F.batch_norm's
    autograd in float64; several row programs (partial statistics combined) and a partial channel tile."""
    monkeypatch.setattr(K, '_BWD_TILES', 2)  # 300 rows -> 10 programs of 2 tiles
    M, C, hw = 300, 20, 25
    t = (torch.randn(M, C, dtype=F64) * 2 + 3).requires_grad_()
    w, b = torch.randn(C, dtype=F64).requires_grad_(), torch.randn(C, dtype=F64).requires_grad_()
    mask = (torch.rand(M // hw, dtype=F64) > 0.3).to(F64) / 0.7
    res, grad = torch.randn(M, C, dtype=F64), torch.randn(M, C, dtype=F64)
    a = ACTS[act](t)
    expected = res + F.batch_norm(a, None, None, w, b, True, 0., 1e-5) * mask.repeat_interleave(hw)[:, None]

    mean, var = K.bn_batch_stats(t.detach(), act, None, None, 1e-5)[:2]
    torch.testing.assert_close(mean, a.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, a.var(0, unbiased=False), rtol=1e-12, atol=1e-12)
    invstd = (var + 1e-5).rsqrt()
    scale = w.detach() * invstd
    out = K.act_affine_fwd(t.detach(), scale, b.detach() - mean * scale, act, residual=res, mask=mask,
                           rows_per_sample=hw)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    want = torch.autograd.grad(expected, (t, w, b), grad)
    got = K.bn_train_bwd(grad, t.detach(), act, mean, invstd, w.detach(), mask, hw)
    for g, e, name in zip(got, want, ('input', 'weight', 'bias')):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize('affine', [True, False])
def test_batch_norm_stats_and_backward_coefficients(affine, monkeypatch):
    """``bn_batch_stats``: the statistics and everything training-mode BatchNorm derives from them in one combining
    launch (invstd, scale, shift, unbiased variance), against torch's ops in float64, with more partials than one
    step of the combining loop (10 programs, steps of 3) and a partial channel block; ``bn_train_bwd``'s summed
    coefficients likewise, weight or no weight. eps and the unbiasing factor arrive as float32 pairs: exact here."""
    monkeypatch.setattr(K, '_BWD_TILES', 2)
    monkeypatch.setattr(K, '_COMBINE_P', 4)
    monkeypatch.setattr(K, '_COMBINE_C', 16)
    M, C, eps = 300, 20, 1e-3
    t = torch.randn(M, C, dtype=F64) * 2 + 3
    w, b = (torch.randn(C, dtype=F64), torch.randn(C, dtype=F64)) if affine else (None, None)
    a = F.gelu(t)
    s = K.bn_batch_stats(t, ACT_GELU, w, b, eps)
    invstd = (a.var(0, unbiased=False) + eps).rsqrt()
    scale = invstd * (w if affine else 1.)
    shift = -a.mean(0) * scale + (b if affine else 0.)
    want = (a.mean(0), a.var(0, unbiased=False), invstd, scale, shift, a.var(0, unbiased=True))
    for got, exp, name in zip(s, want, K.BatchNormStats._fields):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12, msg=name)
    grad = torch.randn(M, C, dtype=F64)
    tl_ = t.clone().requires_grad_()
    wl = None if w is None else w.clone().requires_grad_()
    bl = None if b is None else b.clone().requires_grad_()
    y = F.batch_norm(F.gelu(tl_), None, None, wl, bl, True, 0., eps)
    expected = torch.autograd.grad(y, [tl_] + ([wl, bl] if affine else []), grad)
    got = K.bn_train_bwd(grad, t, ACT_GELU, s.mean, s.invstd, w)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-10)
    if affine:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[2], expected[2], rtol=1e-10, atol=1e-10)


def test_batch_statistics_free_of_cancellation():
    """A large mean against a small spread (``E[a^2] - E[a]^2`` in fp32 would lose every digit): shifted sums keep
    the fp32 variance accurate."""
    t = (torch.randn(512, 16) * 1e-2 + 1e3)
    mean, var = K.bn_batch_stats(t, ACT_IDENTITY, None, None, 1e-5)[:2]
    torch.testing.assert_close(mean.double(), t.double().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), t.double().var(0, unbiased=False), rtol=2e-2, atol=0)
