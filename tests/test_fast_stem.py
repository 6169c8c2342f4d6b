"""The stem's CPU fast path (patches x weight on our GEMM, the activation and BatchNorm in its epilogue) computes the
eager stem, applies only where it may, and auto checks it like a block's path. Marked ``kernels``: our compiled
kernels' numerics (built once per machine)."""
import pytest
import torch
import torch.nn as nn

from timm_convmixer import fast
from timm_convmixer.fast import checked, cpu_kernels, cpu_stem
from timm_convmixer.fast import cpu as fast_cpu
from timm_convmixer.fast.eligibility import stem_parts

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not cpu_stem.available(), reason='our CPU kernels do not load here')]


@pytest.fixture
def make_model(small_model):
    """A two-block model (dim 24, kernel 5, 7 classes), every BatchNorm randomised (the stem's too), eval mode."""
    def make(patch_size: int = 4, act: str = 'gelu') -> nn.Module:
        return small_model(dim=24, depth=2, kernel_size=5, patch_size=patch_size, act_layer=act, num_classes=7,
                           randomize={})
    return make


def _stem(model, x, backend):
    """``(stem output, which stem ran)``, ``backend`` forced."""
    fast.reset_counters()
    with torch.no_grad(), fast.use_backend(backend):
        out = model.stem(x)
    return out, dict(fast.stem_counters)


@pytest.mark.parametrize('patch_size', [1, 2, 7])
@pytest.mark.parametrize('act', ['relu', 'gelu', 'silu'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_stem_matches_eager(patch_size, act, channels_last, make_model):
    """Every patch order (NCHW, channels_last input), sizes that are no multiple of the patch (cropped as the conv
    crops), batch 2; the output is channels_last with the eager stem's values, and the model's output follows."""
    model = make_model(patch_size, act)
    x = torch.randn(2, 3, 5 * patch_size + patch_size // 2, 3 * patch_size + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref, ref_ran = _stem(model, x, 'eager')
    out, ran = _stem(model, x, 'cpu')
    assert ref_ran == {'eager': 1} and ran == {checked.STEM: 1}
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), fast.use_backend('cpu'):
        fast_model = model(x)
    with torch.no_grad(), fast.use_backend('eager'):
        eager_model = model(x)
    torch.testing.assert_close(fast_model, eager_model, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_stem_other_input_channels(in_chans, small_model):
    """Grey and 4-channel images (timm's ``in_chans``): the patch rows and the weight keep the same order."""
    model = small_model(dim=16, depth=1, kernel_size=5, patch_size=2, in_chans=in_chans, randomize={})
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, in_chans, 9, 11).contiguous(memory_format=memory_format)
        ref, _ = _stem(model, x, 'eager')
        out, ran = _stem(model, x, 'cpu')
        assert ran == {checked.STEM: 1}
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_stem_without_bias_and_after_weight_changes(make_model):
    """A conv without bias; then the stem's weights and BatchNorm changed in place: the folded weights follow."""
    model = make_model()
    model.stem[0].bias = None
    x = torch.randn(1, 3, 16, 20)
    for step in range(3):
        ref, _ = _stem(model, x, 'eager')
        out, ran = _stem(model, x, 'cpu_hybrid')
        assert ran == {checked.STEM: 1}
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            [model.stem[0].weight, model.stem[2].running_var][step % 2].mul_(1.5)


def test_stem_declines_where_it_may_not(make_model):
    """The plain stem runs where the fast one would not compute the same thing or must not run: batch statistics,
    gradients needed, fp64, fp16 autocast, hooks on a child, an overlapping conv, the wrong number of input
    channels."""
    x = torch.randn(1, 3, 16, 16)
    model = make_model()
    model.stem.train()
    assert _stem(model, x, 'cpu')[1] == {'eager': 1}
    model.stem.eval()
    fast.reset_counters()
    with fast.use_backend('cpu'):
        model.stem(x)  # parameters need gradients outside no_grad
    assert fast.stem_counters == {'eager': 1}
    assert _stem(model.double(), x.double(), 'cpu')[1] == {'eager': 1}
    model.float()
    with torch.autocast('cpu', dtype=torch.float16):
        assert _stem(model, x, 'cpu')[1] == {'eager': 1}
    seen = []
    handle = model.stem[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    assert _stem(model, x, 'cpu')[1] == {'eager': 1}  # a child's hook must see the child run
    handle.remove()
    handle = model.stem.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    assert _stem(model, x, 'cpu')[1] == {checked.STEM: 1}  # the stem's own hook runs around the fast path
    handle.remove()
    assert seen == ['GELU', 'Stem']
    assert fast.stem_forward(model.stem, torch.randn(1, 4, 16, 16)) is None
    model.stem[0].stride = (2, 2)  # patches of 4 every 2 pixels: no longer a product of separate patches
    assert stem_parts(model.stem) is None and _stem(model, x, 'cpu')[1] == {'eager': 1}


def _stem_of_bf16_operands(model, x):
    """The stem in float64 on the patches and weight rounded to bf16 (what the bf16 pair GEMM multiplies; its bias,
    activation and BatchNorm in float32, here float64)."""
    conv, act, bn = model.stem
    with torch.no_grad():
        y = nn.functional.conv2d(x.bfloat16().double(), conv.weight.bfloat16().double(), conv.bias.double(),
                                 stride=conv.stride)
        return nn.functional.batch_norm(act(y), bn.running_mean.double(), bn.running_var.double(),
                                        bn.weight.double(), bn.bias.double(), False, 0., bn.eps)


@pytest.mark.parametrize('native', [False, True])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('patch_size', [1, 4])
def test_bf16_autocast_stem(patch_size, channels_last, native, make_model, monkeypatch):
    """Under bf16 autocast the fast stem hands on bf16, within bf16 precision of the plain autocast stem; auto checks
    it against the fp32 stem. Where oneDNN would emulate bf16 (15-20x slower than fp32) it computes in fp32: the fp32
    stem's output rounded once. Where bf16 is native and our kernels have the bf16 dot product it multiplies bf16
    pairs as eager autocast does: the stem of the bf16-rounded patches and weight, rounded once (patch 1: 3 columns,
    padded to 4; patch 4: 48). (The CPU's answer on native bf16 is replaced by our own function's: this CPU may have
    either.)"""
    monkeypatch.setattr(fast_cpu, 'native_bf16', lambda: native)
    model = make_model(patch_size=patch_size)
    x = torch.randn(2, 3, 4 * patch_size, 3 * patch_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref32, _ = _stem(model, x, 'cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, ran = _stem(model, x, 'cpu')
        plain, plain_ran = _stem(model, x, 'eager')
        fast.reset_counters()
        with torch.no_grad(), fast.use_backend('auto'):
            model.stem(x)
    assert ran == {checked.STEM: 1} and plain_ran == {'eager': 1}
    assert out.dtype == plain.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    scale = ref32.abs().max().item()
    if native and cpu_kernels.bf16_dot():
        torch.testing.assert_close(out.double(), _stem_of_bf16_operands(model, x), rtol=2 ** -8, atol=1e-5 * scale)
        assert not torch.equal(out, ref32.bfloat16())
    else:
        assert torch.equal(out, ref32.bfloat16())
    torch.testing.assert_close(out.float(), plain.float(), rtol=0.05, atol=0.05 * scale)
    [d] = checked.decisions.values()  # the check's yardstick is the fp32 stem: within bf16's tolerance of it
    assert d.max_rel_err <= checked.tolerance(torch.bfloat16, 'cpu')


def test_auto_checks_the_stem_once_and_declines_without_grad_caching(make_model):
    """auto records one decision for the stem's case (made by the check's rule), reuses it, and does not cache a
    call on which the path declined (gradients needed) as the case's decision. (The stem alone: no block is decided,
    so its decision alone says which stem runs.)"""
    model = make_model()
    x = torch.randn(1, 3, 32, 32)
    fast.reset_counters()
    with fast.use_backend('auto'):
        model.stem(x)
        assert not checked.decisions and fast.stem_counters == {'eager': 1}
        with torch.no_grad():
            fast.reset_counters()
            model.stem(x)
            decided = dict(checked.decisions)
            model.stem(x)
    [d] = decided.values()
    assert d.max_rel_err <= checked.tolerance(torch.float32, 'cpu')
    assert d.path == (checked.STEM if checked.wins(d.fused_ms, d.eager_ms) else 'eager')
    assert fast.stem_counters == {d.path if d.path == checked.STEM else 'eager': 2}
    assert checked.decisions == decided


def test_plain_stem_where_the_first_block_takes_no_path(make_model):
    """Where auto found no CPU path for the first block on the fast stem's output before the stem's own check, the
    stem's channels_last output would only move the plain blocks to that layout: the plain stem runs, undecided. A
    decision made stands, though the blocks decline after it (they are checked after it on the call that makes it):
    every call of a case computes the same (timm's battery compares two calls at allclose's 1e-8 tolerance)."""
    model = make_model()
    x = torch.randn(1, 3, 32, 32)
    stem_key = checked.case_key(checked.STEM, stem_parts(model.stem), x, torch.float32)
    checked.decisions[stem_key] = checked.Decision(checked.STEM, 'as if faster', 1., 2., 0.)
    fast.reset_counters()
    with torch.no_grad(), fast.use_backend('auto'):
        model(x)
        assert fast.stem_counters == {checked.STEM: 1}
        for key, d in list(checked.decisions.items()):
            if key[0] in fast_cpu.PATHS or key[0] == checked.RACE:
                checked.decisions[key] = d._replace(path='eager')  # as if every block path lost here
        fast.reset_counters()
        model(x)
        assert fast.stem_counters == {checked.STEM: 1}  # the decision stands
        del checked.decisions[stem_key]  # as if the blocks had been checked first
        fast.reset_counters()
        model(x)
    assert fast.stem_counters == {'eager': 1} and stem_key not in checked.decisions
