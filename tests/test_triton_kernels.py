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

from helpers import Normal, Uniform, randomize_bn  # noqa: E402
from timm_convmixer.convmixer import MixerBlock  # noqa: E402
from timm_convmixer.fast import triton_ops as ops  # noqa: E402
from timm_convmixer.fast.triton_kernels import ACT_GELU, ACT_IDENTITY, ACT_RELU  # noqa: E402

F64 = torch.float64
ACTS = {ACT_IDENTITY: lambda z: z, ACT_GELU: F.gelu, ACT_RELU: F.relu}


def _ref_dw_block(x, w, b, scale, shift, act):
    # pad by hand, as PyTorch's "same" does (extra row/column bottom/right for even k), to not rely on the warning path
    k = w.shape[-1]
    lo = (k - 1) // 2
    z = F.conv2d(F.pad(x, (lo, k - 1 - lo, lo, k - 1 - lo)), w, b, groups=x.shape[1])
    return x + ACTS[act](z) * scale[:, None, None] + shift[:, None, None]


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


@pytest.mark.parametrize('act', [ACT_GELU, ACT_RELU, ACT_IDENTITY])
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

    assert fwd(_eval_block(4, 3, act_layer=nn.SiLU)) is None
    assert fwd(_eval_block(4, 3, act_layer=lambda: nn.GELU(approximate='tanh'))) is None

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
