"""The memory-lean training block (``fast.lean``) and auto's check-before-trust (``fast.checked``).

Lean vs eager: the same model (deep copy), the same input and seed, one side forced to the plain modules, the other to
the lean block; ``fast.counters`` proves which path ran on each side. In fp32 on CPU the forward (losses, running
statistics) is exactly eager's and gradients agree to ~1e-6 relative (backward re-applies saved statistics); under
bf16 autocast everything agrees within bf16 precision.

Memory: bytes autograd keeps for backward in one training step, unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``, not counting the model's own parameters and buffers (they exist
whether or not a step runs); ours against timm's built-in class with the same weights.
"""
import copy
import importlib
import statistics
import time
import warnings

import pytest
import torch
import torch.nn as nn

import timm
from timm.models.convmixer import ConvMixer as BuiltinConvMixer

from helpers import small_model
from timm_convmixer import fast
from timm_convmixer.fast import checked, lean_cpu
from timm_convmixer.fast.eligibility import block_parts


def _step(model, x, backend, steps=1):
    """``steps`` training steps' loss, gradients and buffers with ``backend`` forced, and the paths that ran."""
    fast.reset_counters()
    losses = []
    with fast.use_backend(backend):
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            loss = model(x).float().logsumexp(1).mean()
            loss.backward()
            losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return torch.stack(losses), grads, buffers, dict(fast.counters)


def _pair(name='convmixer_256_8_ks5_p2', channels_last=False, depth=2, **kwargs):
    model = small_model(name, depth=depth, **kwargs).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, copy.deepcopy(model)


def _decisions_said(caught):
    """The ``FastPathDecision`` warnings that say a decision (the CPU kernels' first load is said under the same
    category, in whichever test first needs them)."""
    return [w for w in caught if issubclass(w.category, checked.FastPathDecision) and 'loading' not in str(w.message)]


def _input(n, size, channels_last=False):
    x = torch.randn(n, 3, size, size)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# fp32 gradients summed in another order (the lean backward's reductions against oneDNN's, whose blocking depends on
# the CPU's ISA): under 2e-6 of a gradient's largest magnitude on an AVX2 Zen 3, up to 5.7e-6 on an AVX-512 Xeon
GRAD_ATOL = 2e-5


def _assert_same_step(eager, lean, depth, steps, rtol=1e-5, atol=GRAD_ATOL, forward_exact=True, path='lean'):
    """Forward (losses, running statistics) equal eager's exactly; gradients to ``rtol`` and ``atol`` times each
    gradient's largest magnitude (backward re-applies saved statistics, within an ulp of forward's)."""
    loss_e, grads_e, bufs_e, paths_e = eager
    loss_l, grads_l, bufs_l, paths_l = lean
    assert paths_e == {'eager': depth * steps}
    assert paths_l == {path: depth * steps}
    assert grads_e.keys() == grads_l.keys() and grads_e
    close = dict(rtol=0., atol=0.) if forward_exact else dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(loss_l, loss_e, **close)
    for n in bufs_e:
        torch.testing.assert_close(bufs_l[n], bufs_e[n], **close, msg=n)
    for n in grads_e:
        scale = grads_e[n].abs().max().item()
        torch.testing.assert_close(grads_l[n], grads_e[n], rtol=rtol, atol=atol * scale, msg=n)


ACT_LAYERS = {'gelu': nn.GELU, 'relu': nn.ReLU, 'silu': nn.SiLU, 'gelu_tanh': lambda: nn.GELU(approximate='tanh')}
# training-step cases for each lean implementation on a CPU: every activation, kernel sizes 3/5/7/8, drop path,
# both momentum rules, both layouts
STEP_CASES = [
    ('gelu', 5, 0., 0.1, False),  # NCHW input (lean_cpu turns it channels_last at the first block)
    ('relu', 7, 0.3, None, True),  # drop path masks, the cumulative running average
    ('silu', 8, 0.2, 0.1, False),  # even kernel: asymmetric "same" padding
    ('gelu_tanh', 3, 0., None, True),
]


@pytest.mark.parametrize('act,kernel,drop_path,momentum,channels_last', STEP_CASES)
def test_lean_training_steps_match_eager(act, kernel, drop_path, momentum, channels_last):
    act_layer = ACT_LAYERS[act]
    depth = 3
    eager, lean = _pair(dim=16, depth=depth, kernel_size=kernel, act_layer=act_layer, drop_path_rate=drop_path,
                        bn_momentum=momentum, channels_last=channels_last)
    x = _input(4, 32, channels_last)
    torch.manual_seed(1)
    ref = _step(eager, x, 'eager', steps=2)
    torch.manual_seed(1)
    got = _step(lean, x, 'lean', steps=2)
    _assert_same_step(ref, got, depth, steps=2)
    assert int(lean.blocks[0][3].num_batches_tracked) == 2


def test_lean_on_cpu_takes_the_depthwise_weight_gradient_from_our_kernel(monkeypatch, kernels):
    """In float32 on a CPU whose kernels build, the depthwise conv's weight and bias gradients come from
    ``cpu_kernels.dw_weight_grad`` (ATen's took 3.7x-18x the conv's forward there), one call per block and step, and
    agree with eager's (the steps above check every kernel size); under bf16 autocast, where the conv runs in bf16,
    and beyond the kernels' largest kernel size, autograd computes them as before."""
    from timm_convmixer.fast import cpu_kernels
    calls = []
    real = cpu_kernels.dw_weight_grad

    def counted(x, grad, k):
        calls.append((tuple(x.shape), k))
        return real(x, grad, k)

    monkeypatch.setattr(cpu_kernels, 'dw_weight_grad', counted)
    eager, lean = _pair(dim=16, depth=2, kernel_size=7)
    x = _input(2, 32)
    ref = _step(eager, x, 'eager')
    got = _step(lean, x, 'lean')
    assert calls == [((2, 16, 16, 16), 7)] * 2  # patch 2: 16 x 16 tokens
    _assert_same_step(ref, got, depth=2, steps=1)
    calls.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _step(lean, x, 'lean')
    assert calls == []
    # a kernel size beyond what our kernels take: autograd's weight gradient, as before the kernel
    eager, lean = _pair(dim=8, depth=1, kernel_size=cpu_kernels.MAX_KERNEL_SIZE + 1)
    _assert_same_step(_step(eager, x, 'eager'), _step(lean, x, 'lean'), depth=1, steps=1)
    assert calls == []


# the lean block with its normalisations and pointwise GEMMs in our compiled CPU kernels (``lean_cpu``); marked
# ``kernels``: timm's version plays no part

@pytest.mark.kernels
@pytest.mark.parametrize('act,kernel,drop_path,momentum,channels_last', STEP_CASES)
def test_lean_cpu_training_steps_match_eager(act, kernel, drop_path, momentum, channels_last, kernels):
    act_layer = ACT_LAYERS[act]
    depth = 3
    eager, lean = _pair(dim=16, depth=depth, kernel_size=kernel, act_layer=act_layer, drop_path_rate=drop_path,
                        bn_momentum=momentum, channels_last=channels_last)
    fp64 = copy.deepcopy(eager).double()
    x = _input(4, 32, channels_last)
    steps = []
    for model, inp, backend in ((fp64, x.double(), 'eager'), (eager, x, 'eager'), (lean, x, 'lean_cpu')):
        torch.manual_seed(1)  # the same drop-path draws
        steps.append(_step(model, inp, backend, steps=2))
    assert fast.stem_counters == {checked.STEM: 2}  # the lean stem too (lean_stem): its gradients judged below
    _assert_as_accurate_as_eager(*steps, depth=depth, steps=2, path='lean_cpu')
    assert int(lean.blocks[0][3].num_batches_tracked) == int(lean.stem[2].num_batches_tracked) == 2


def _assert_as_accurate_as_eager(fp64, eager, ours, depth, steps, path):
    """For a path that sums in another order than eager (so float32 results differ by rounding), the fair test:
    against the same steps in float64, each of our gradients is as close as eager's (within 2x, or 2e-5 of its
    largest magnitude: eager's own error reached 2.4e-4 on these small models, ours was below it), and the losses and
    running statistics agree with eager's to float32 rounding."""
    assert eager[3] == {'eager': depth * steps} and ours[3] == {path: depth * steps}
    torch.testing.assert_close(ours[0], eager[0], rtol=1e-5, atol=1e-6)
    for n in eager[2]:
        torch.testing.assert_close(ours[2][n], eager[2][n], rtol=1e-5, atol=1e-6, msg=n)
    assert ours[1].keys() == eager[1].keys() == fp64[1].keys()
    for n, ref in fp64[1].items():
        def error(grads):
            return ((grads[n].double() - ref).abs().max() / ref.abs().max()).item()
        assert error(ours[1]) <= max(2 * error(eager[1]), 2e-5), (n, error(ours[1]), error(eager[1]))


@pytest.mark.kernels
def test_lean_cpu_steps_reuse_pooled_activations_and_keep_held_ones(monkeypatch, kernels):
    """Where its activations pass glibc's mmap threshold (lowered here to this small model's size), lean_cpu writes
    them into pooled buffers: a step takes new ones only for what someone still holds (here the last block's output
    of the first step, which keeps its values), the steps give the same bits as with fresh tensors."""
    from timm_convmixer.fast import cpu as fast_cpu
    model = small_model('convmixer_256_8_ks5_p2', depth=2, dim=16, seed=0).train()
    x = _input(4, 32)  # activations 4 x 16 x 16 x 16 float32
    activation_bytes = 4 * 16 * 16 * 16 * 4

    def pooled():
        return sum(len(buffers) for key, buffers in fast_cpu._outputs.items() if key[0] == 'train')

    def steps(threshold):
        fast_cpu.clear_cache()
        monkeypatch.setattr(fast_cpu, 'FRESH_PAGES_BYTES', threshold)
        m = copy.deepcopy(model)
        held = []
        m.blocks[-1].register_forward_hook(lambda module, args, out: held.append(out))
        first = _step(m, x, 'lean_cpu')
        kept, counts = held[0].clone(), [pooled()]
        second = _step(m, x, 'lean_cpu')
        assert torch.equal(held[0], kept)  # the pool never hands out what someone holds
        held.clear()
        counts.append(pooled())
        third = _step(m, x, 'lean_cpu')
        return first, second, third, counts + [pooled()]

    fresh = steps(threshold=activation_bytes + 1)
    reused = steps(threshold=activation_bytes)
    fast_cpu.clear_cache()
    assert fresh[3] == [0, 0, 0]
    first, second, third = reused[3]
    assert first > 0 and second == first + 1 and third == second, reused[3]  # + 1: the held output
    for a, b in zip(fresh[:3], reused[:3]):
        assert a[3] == b[3] == {'lean_cpu': 2}
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
        assert a[1].keys() == b[1].keys()
        for n in a[1]:
            torch.testing.assert_close(b[1][n], a[1][n], rtol=0, atol=0, msg=n)


@pytest.mark.kernels
def test_lean_cpu_without_batchnorm_affine_or_running_statistics(kernels):
    """BatchNorm without weight and bias, or without running statistics (always batch statistics): as eager."""
    for bn_kwargs in (dict(affine=False), dict(track_running_stats=False)):
        eager, lean = _pair(dim=16, depth=2)
        for model in (eager, lean):
            for block in model.blocks:
                block[0].fn[2], block[3] = nn.BatchNorm2d(16, **bn_kwargs), nn.BatchNorm2d(16, **bn_kwargs)
        x = _input(2, 32)
        fp64 = _step(copy.deepcopy(eager).double(), x.double(), 'eager')
        _assert_as_accurate_as_eager(fp64, _step(eager, x, 'eager'), _step(lean, x, 'lean_cpu'), depth=2, steps=1,
                                     path='lean_cpu')


@pytest.mark.kernels
def test_lean_cpu_declines_what_its_kernels_do_not_take(kernels):
    """Its kernels compute in float32: forced on a float64 model, on bf16 parameters or under fp16 autocast, the
    plain modules run (the stem's too)."""
    eager, lean = _pair(dim=16, depth=2)
    x = _input(2, 32)
    assert _step(lean.double(), x.double(), 'lean_cpu')[3] == {'eager': 2}
    assert fast.stem_counters == {'eager': 1}
    assert _step(eager.bfloat16(), x.bfloat16(), 'lean_cpu')[3] == {'eager': 2}
    eager.float()
    with torch.autocast('cpu', dtype=torch.float16):
        assert _step(eager, x, 'lean_cpu')[3] == {'eager': 2}
    assert fast.stem_counters == {'eager': 1}


@pytest.mark.kernels
@pytest.mark.parametrize('channels_last', [False, True])
def test_lean_cpu_under_bf16_autocast_computes_in_float32_but_its_pointwise_gemms(channels_last, kernels):
    """Under CPU bf16 autocast the lean block and stem on our kernels hand on float32 and compute in float32 (where
    the CPU lacks native bf16, eager's bf16 convolutions run 15-20x slower than fp32), but for the pointwise
    convolution's GEMMs, in bf16 pairs as eager autocast's where the CPU has them natively (``bf16_gemms``). Against
    the same step in fp32 with autocast off: the loss within bf16's reach through the head's bf16 linear; the running
    statistics as fp32's where every GEMM ran in float32, else as close as eager autocast's; the gradients as close as
    eager autocast's (the median over parameters within ERROR_FACTOR of eager's; each within 25%, where a wrong one is
    off by its own size). Not each within 2x of eager's own: both pass through the head's bf16 linear, whose rounding
    gives every gradient 3%-10% of noise, ours and eager's different draws of it (6 seeds: ours 0.8x-1.6x eager's
    median, single small tensors up to 2.7x either way)."""
    eager, lean = _pair(dim=16, depth=2, drop_path_rate=0.2, channels_last=channels_last)
    fp32 = copy.deepcopy(eager)
    x = _input(4, 32, channels_last)
    torch.manual_seed(1)
    ref = _step(fp32, x, 'eager')
    outputs = []
    handle = lean.blocks[-1].register_forward_hook(lambda m, args, out: outputs.append(out.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        torch.manual_seed(1)
        plain = _step(eager, x, 'eager')
        torch.manual_seed(1)
        ours = _step(lean, x, 'lean_cpu')
        bf16_gemms = lean_cpu.bf16_gemms(16)
    handle.remove()
    assert ours[3] == {'lean_cpu': 2} and fast.stem_counters == {checked.STEM: 1} and outputs == [torch.float32]
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-3, atol=0)  # through the head's bf16 linear (seen: 1.7e-5)

    def errors(got, want):
        return [((got[n].double() - w.double()).norm() / w.double().norm().clamp_min(1e-12)).item()
                for n, w in want.items() if w.is_floating_point()]

    if bf16_gemms:
        assert statistics.median(errors(ours[2], ref[2])) <= checked.ERROR_FACTOR * statistics.median(
            errors(plain[2], ref[2]))
    else:
        for n, want in ref[2].items():  # computed in float32: as the fp32 step's
            torch.testing.assert_close(ours[2][n], want, rtol=1e-4, atol=1e-5, msg=n)
    assert max(errors(ours[1], ref[1])) < 0.25
    assert statistics.median(errors(ours[1], ref[1])) <= checked.ERROR_FACTOR * statistics.median(
        errors(plain[1], ref[1]))


@pytest.mark.kernels
def test_lean_cpu_pointwise_gemms_round_their_operands_to_bf16_where_the_cpu_multiplies_bf16_pairs(kernels):
    """Where ``bf16_gemms``, the pointwise convolution's forward, input gradient and weight gradient take bf16
    operands (as eager autocast's convolution) with float32 sums: each equals the float64 product of the operands
    rounded to bf16 within float32's summation error, and stands off the unrounded product by bf16's rounding.
    Without native bf16 pairs (or with autocast off) they are float32 GEMMs: within float32's error of the
    unrounded product."""
    torch.manual_seed(0)
    n, c, h = 2, 64, 6
    u = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
    grad_p = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(c, c, 1)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, c).double()  # noqa: E731
    w = conv.weight.detach().reshape(c, c).double()
    bf = lambda t: t.bfloat16().double()  # noqa: E731

    def expected(r):
        return (rows(r(u)) @ r(w).t() + conv.bias.double(), rows(r(grad_p)) @ r(w), rows(r(grad_p)).t() @ rows(r(u)))

    for autocast in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            rounded = lean_cpu.bf16_gemms(c)
            p = lean_cpu.CpuNorm.pointwise(conv, u)
            # the output gradient as the normalisation's backward hands it: in the GEMMs' dtype, with its column sums
            operand = grad_p.to(torch.bfloat16 if rounded else torch.float32)
            grad_u, grad_w, _ = lean_cpu.CpuNorm.pointwise_backward(
                lean_cpu.GemmGrad(operand, grad_p.sum((0, 2, 3))), u, torch.float32, conv.weight, conv.bias,
                (True, True))
        assert rounded == (autocast and fast.cpu_kernels.bf16_dot())
        got = (rows(p), rows(grad_u), grad_w.reshape(c, c).double())
        exact, as_rounded = expected(lambda t: t.double()), expected(bf if rounded else lambda t: t.double())
        for name, g, want, unrounded in zip(('forward', 'input gradient', 'weight gradient'), got, as_rounded, exact):
            scale = want.abs().max().item()
            # the weight gradient leaves oneDNN's bf16 GEMM rounded to bf16, as eager autocast's does
            tol = (2 ** -8 if rounded and name == 'weight gradient' else 1e-5) * scale
            assert (g - want).abs().max().item() <= tol, (autocast, name)
            if rounded:
                assert (g - unrounded).abs().max().item() > 1e-4 * scale, (autocast, name)


def _kept_storages(model, x, backend):
    """Which storages a training forward keeps for backward (``saved_tensors_hooks``), the stem's output, and the
    loss."""
    kept, outputs = set(), []
    handle = model.stem.register_forward_hook(lambda m, args, out: outputs.append(out))  # (the stem's own hook)

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    fast.reset_counters()
    with fast.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(1).mean()
    handle.remove()
    return kept, outputs[0], loss


@pytest.mark.kernels
@pytest.mark.parametrize('patch_size,channels_last', [(2, False), (1, True), (4, True)])
def test_lean_stem_keeps_its_pre_activation_and_the_first_block_rebuilds_its_output(patch_size, channels_last,
                                                                                     kernels):
    """In training with ``lean_cpu`` the stem runs on our kernels (:mod:`timm_convmixer.fast.lean_stem`) and keeps
    its pre-activation; nothing keeps its output, which the first lean block rebuilds from that pre-activation (with
    the plain stem the first block keeps it). The step is judged in the steps above; here, patch sizes and layouts
    (the weight's gradient maps back from the patch rows' column order) against float64."""
    eager, lean = _pair(dim=16, depth=2, patch_size=patch_size, channels_last=channels_last)
    x = _input(2, 32, channels_last)
    kept, stem_out, loss = _kept_storages(lean, x, 'lean_cpu')
    assert fast.stem_counters == {checked.STEM: 1} and fast.counters == {'lean_cpu': 2}
    assert stem_out.is_contiguous(memory_format=torch.channels_last)
    assert stem_out.untyped_storage().data_ptr() not in kept
    loss.backward()
    kept, stem_out, _ = _kept_storages(eager, x, 'eager')
    assert stem_out.untyped_storage().data_ptr() in kept  # the plain stem's output, kept by the first block
    lean.zero_grad(set_to_none=True)
    fp64 = _step(copy.deepcopy(eager).double(), x.double(), 'eager')
    eager.load_state_dict(lean.state_dict())  # (the counted forward above advanced lean's running statistics)
    _assert_as_accurate_as_eager(fp64, _step(copy.deepcopy(eager), x, 'eager'), _step(lean, x, 'lean_cpu'),
                                 depth=2, steps=1, path='lean_cpu')


@pytest.mark.kernels
def test_lean_stem_declines_where_it_may_not(kernels):
    """The plain stem runs in training where the lean one would not compute the same thing or must not: an image
    that wants a gradient (none is computed for it), fp16 autocast and float64 (float32 kernels; bf16 autocast
    computes in float32, as the lean blocks), no gradients recorded, the torch-kernel lean backend; a second
    differentiation through it is refused by name."""
    _, model = _pair(dim=16, depth=1)
    x = _input(2, 32)

    def stem_path(inp, backend='lean_cpu'):
        fast.reset_counters()
        with fast.use_backend(backend):
            model.stem(inp)
        return dict(fast.stem_counters)

    assert stem_path(x) == {checked.STEM: 1}
    assert stem_path(x.clone().requires_grad_()) == {'eager': 1}
    with torch.autocast('cpu', dtype=torch.float16):
        assert stem_path(x) == {'eager': 1}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert stem_path(x) == {checked.STEM: 1}
    with torch.no_grad():
        assert stem_path(x) == {'eager': 1}
    assert stem_path(x, 'lean') == {'eager': 1}
    model.double()
    assert stem_path(x.double()) == {'eager': 1}
    model.float()
    with fast.use_backend('lean_cpu'):
        out = model.stem(x)
        with pytest.raises(RuntimeError, match='lean training stem has no double backward.*eager'):
            torch.autograd.grad(out.square().sum(), model.stem[0].weight, create_graph=True)


@pytest.mark.kernels
def test_auto_checks_lean_cpu_and_the_lean_stem_under_bf16_autocast(kernels):
    """Under bf16 autocast ``auto`` checks our float32 kernels (blocks and stem) beside the torch-kernel lean block,
    on any CPU (where bf16 is emulated they are the fast path; where it is native the check decides)."""
    _, model = _pair(dim=16, depth=2)
    with warnings.catch_warnings(), torch.autocast('cpu', dtype=torch.bfloat16):
        warnings.simplefilter('ignore')
        _step(model, _input(2, 32), 'auto')
    assert {'lean', 'lean_cpu', checked.STEM} <= {key[0] for key in checked.decisions}


@pytest.mark.parametrize('channels_last', [False, True])
def test_training_check_hands_each_trial_the_gradient_in_its_outputs_layout(channels_last):
    """auto's training check gives every trial the same output gradient in the output's memory format, as the next
    layer would: drawn NCHW for a channels_last output it cost the plain modules a mixed-layout backward that the
    model never runs (a plain bf16 block at 8 x 768 x 32 x 32 checked 267 ms against 204, Zen 4), which once made
    ``auto`` take a path that ran the whole step slower."""
    block = _pair(dim=16, depth=1, channels_last=channels_last)[1].blocks[0]
    x = torch.randn(2, 16, 8, 8)
    x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    seen = []

    def probe(t):
        out = nn.Sequential.forward(block, t)
        out.register_hook(lambda g: seen.append((g.is_contiguous(memory_format=torch.channels_last),
                                                 g.is_contiguous(), g.sum().item())))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fast._fastest_step(block, block_parts(block), x, {'probe': probe})
    assert len(seen) >= 2 and len(set(seen)) == 1  # the same gradient for every run of the probe
    assert seen[0][:2] == ((True, False) if channels_last else (False, True))


def test_lean_takes_a_float32_input_under_bf16_autocast():
    """An input handed on in float32 (as ``lean_cpu`` hands it on) under bf16 autocast: the torch-kernel lean block's
    backward hands the sum's gradient to its bf16 branch in bf16, as autograd does (it raised a dtype error), and the
    step equals eager's."""
    eager, lean = _pair(dim=16, depth=1, drop_path_rate=0.3)
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    results = []
    for model, backend in ((eager, 'eager'), (lean, 'lean')):
        inp = x.clone().requires_grad_()
        torch.manual_seed(1)
        with torch.autocast('cpu', dtype=torch.bfloat16), fast.use_backend(backend):
            fast.reset_counters()
            out = model.blocks[0](inp)
            assert fast.counters == {backend: 1}
        out.float().square().sum().backward()
        results.append((out, inp.grad, [p.grad for p in model.blocks.parameters()]))
    (out_e, gx_e, gp_e), (out_l, gx_l, gp_l) = results
    assert out_l.dtype == out_e.dtype == torch.bfloat16 and torch.equal(out_l, out_e)
    torch.testing.assert_close(gx_l, gx_e, rtol=0, atol=0)
    for a, b in zip(gp_l, gp_e):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


@pytest.mark.kernels
def test_forcing_lean_cpu_without_its_kernels_runs_the_plain_modules(run_python):
    code = """
import torch, timm, timm_convmixer
from timm_convmixer import fast
m = timm.create_model('convmixer_256_8_ks5_p2', depth=2, dim=16).train()
fast.reset_counters()
with fast.use_backend('lean_cpu'):
    m(torch.randn(2, 3, 32, 32)).sum().backward()
print(dict(fast.counters))
"""
    out = run_python(code=code, env={'TIMM_CONVMIXER_CPU_BUILD': '0'})
    assert "{'eager': 2}" in out.stdout


def test_auto_checks_the_lean_block_on_first_use_and_keeps_it_only_if_clearly_faster(monkeypatch):
    from timm_convmixer.fast import lean_cpu, lean_stem
    monkeypatch.setattr(lean_cpu, 'applies', lambda parts, x: False)  # the torch-kernel lean block alone
    monkeypatch.setattr(lean_stem, 'applies', lambda parts, x: False)
    eager, model = _pair(dim=16, depth=2)
    x = _input(2, 32)
    checked.forget()
    try:
        ref = _step(eager, x, 'eager')
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            got = _step(model, x, 'auto')
        (key, decision), = checked.decisions.items()
    finally:
        checked.forget()
    said = _decisions_said(caught)
    assert len(said) == 1 and decision.path in str(said[0].message)
    assert key[:2] == ('lean', 'cpu') and key[7] == 'train'
    assert decision.fused_ms is not None and decision.eager_ms is not None
    assert decision.path == ('lean' if checked.wins(decision.fused_ms, decision.eager_ms) else 'eager')
    assert decision.max_rel_err <= decision.limit  # against a float64 step
    assert got[3] == {decision.path: 2}  # both blocks took the chosen path
    # the trial's running-statistics updates were rolled back: exactly one step's worth
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    for n in ref[2]:
        assert torch.equal(got[2][n], ref[2][n]), n
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-5, atol=1e-5 * ref[1][n].abs().max().item())


@pytest.mark.kernels
def test_auto_checks_each_lean_implementation_on_a_cpu_and_keeps_the_fastest_correct_one(kernels):
    """On a CPU whose kernels build, both lean implementations are checked against the plain modules (and race if
    both pass); whichever runs, the step is eager's within float32 rounding, with one step's statistics.
    channels_last: lean_cpu's output is channels_last, so after an NCHW input the second block would be a case of its
    own whenever lean_cpu won the first, and the decisions below would depend on which path the timing favoured."""
    eager, model = _pair(dim=16, depth=2, channels_last=True)
    x = _input(2, 32, channels_last=True)
    ref = _step(eager, x, 'eager')
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        got = _step(model, x, 'auto')
    made = {key[0]: d for key, d in checked.decisions.items() if key[0] != checked.RACE}
    assert set(made) == {'lean', 'lean_cpu', checked.STEM}  # the stem's lean path checked as a block's
    assert fast.stem_counters == {made[checked.STEM].path: 1}
    for path, decision in made.items():
        # judged against a float64 step: within max(floor, 2x the plain modules' own error)
        assert 'from the plain modules in float64' in decision.reason, path
        assert decision.max_rel_err <= decision.limit and decision.limit >= checked.FLOAT64_REFERENCE_FLOOR, path
        assert decision.path == (path if checked.wins(decision.fused_ms, decision.eager_ms) else 'eager')
    accepted = [path for path, d in made.items() if d.path != 'eager' and path != checked.STEM]
    race = [d for key, d in checked.decisions.items() if key[0] == checked.RACE]
    chosen = race[0].path if len(accepted) > 1 else (accepted[0] if accepted else 'eager')
    assert len(race) == (len(accepted) > 1)
    assert got[3] == {chosen: 2}
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-6, msg=n)
    assert int(model.blocks[0][3].num_batches_tracked) == int(model.stem[2].num_batches_tracked) == 1  # no trace


def test_lean_under_bf16_autocast_matches_eager_autocast():
    eager, lean = _pair(dim=16, depth=2)
    x = _input(2, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref = _step(eager, x, 'eager')
        got = _step(lean, x, 'lean')
    # the same bf16 kernels in the same order: equal to bf16 precision at worst
    _assert_same_step(ref, got, depth=2, steps=1, rtol=2e-2, atol=1e-2, forward_exact=False)


@pytest.mark.parametrize('name,kwargs,size,channels_last,backend', [
    ('convmixer_768_32', dict(depth=4), 112, False, 'lean'),  # ReLU, kernel 7, patch 7
    ('convmixer_768_32', dict(depth=4), 112, True, 'lean'),
    ('convmixer_256_8_ks5_p2', dict(depth=4), 32, False, 'lean'),  # GELU, kernel 5, patch 2
    ('convmixer_256_8_ks5_p2', dict(depth=4), 32, True, 'lean'),
    # our compiled normalisations keep what the torch-kernel lean block keeps (an NCHW input converted once)
    pytest.param('convmixer_768_32', dict(depth=4), 112, False, 'lean_cpu', marks=pytest.mark.kernels),
    pytest.param('convmixer_256_8_ks5_p2', dict(depth=4), 32, True, 'lean_cpu', marks=pytest.mark.kernels),
    # the fused normalisations (through the interpreter) keep what the torch-kernel lean block keeps
    # 32 channels at 16px: the interpreter is slow (what is kept scales with the width for every path alike)
    pytest.param('convmixer_256_8_ks5_p2', dict(depth=4, dim=32), 16, True, 'lean_triton', marks=pytest.mark.kernels),
])
def test_saved_for_backward_at_most_04x_builtin(name, kwargs, size, channels_last, backend, request):
    if backend == 'lean_triton':
        request.getfixturevalue('interpreter')
    if backend == 'lean_cpu':
        request.getfixturevalue('kernels')
    ours = timm.create_model(name, **kwargs).train()
    cfg = dict(dim=ours.num_features, depth=len(ours.blocks), kernel_size=ours.kernel_size,
               patch_size=ours.patch_size, num_classes=ours.num_classes,
               act_layer=type(ours.stem[1]))
    builtin = BuiltinConvMixer(**cfg).train()
    builtin.load_state_dict(ours.state_dict())
    if channels_last:
        ours, builtin = ours.to(memory_format=torch.channels_last), builtin.to(memory_format=torch.channels_last)
    x = _input(2, size, channels_last)

    def saved_bytes(model):
        own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).logsumexp(1).mean()
        loss.backward()
        return sum(seen.values())

    fast.reset_counters()
    with fast.use_backend(backend):  # the memory-saving path, asked for
        ours_bytes = saved_bytes(ours)
    assert fast.counters == {backend: len(ours.blocks)}
    builtin_bytes = saved_bytes(builtin)
    ratio = ours_bytes / builtin_bytes
    print(f'\n{name} {kwargs} {size}px {"channels_last" if channels_last else "NCHW"}: saved for backward '
          f'{ours_bytes / 2**20:.2f} MiB (ours, {backend}) vs {builtin_bytes / 2**20:.2f} MiB (built-in) '
          f'= {ratio:.3f}x')
    assert ratio <= 0.4
    # the model's gradients all the same: each within 1% (norm-wise) of a float64 step's. Not tighter: with ReLU,
    # pre-activations within fp32 rounding of zero fall on either side in two correct fp32 implementations, and one
    # such element moves every gradient upstream of it (the built-in's own error here reached 2.8e-3 on some seeds,
    # ours 6.5e-3); the lean paths' accuracy is held to eager's by the float64 step tests above
    reference = copy.deepcopy(builtin).double()
    reference(x.double()).logsumexp(1).mean().backward()
    for p_ours, p64 in zip(ours.parameters(), reference.parameters()):
        assert ((p_ours.grad.double() - p64.grad).norm() / p64.grad.norm()).item() < 1e-2


def test_link_declined_when_the_block_output_was_modified():
    eager, lean = _pair(dim=16, depth=3)
    for model in (eager, lean):  # an in-place edit between blocks: the next block must keep its own input
        model.blocks[1].register_forward_pre_hook(lambda m, args: (args[0].mul_(1.5),))
        model.blocks[1].register_forward_pre_hook(lambda m, args: None)
    x = _input(2, 32)
    ref = _step(eager, x, 'eager')
    got = _step(lean, x, 'lean')
    _assert_same_step(ref, got, depth=3, steps=1)


def test_forward_intermediates_keep_their_values():
    eager, lean = _pair(dim=16, depth=3)
    x = _input(2, 32)
    with fast.use_backend('eager'):
        ref_final, ref_inter = eager.forward_intermediates(x)
    fast.reset_counters()
    with fast.use_backend('lean'):
        final, inter = lean.forward_intermediates(x)
    assert fast.counters == {'lean': 3}
    for a, b in zip(inter, ref_inter):
        assert torch.equal(a, b)
    trunk = lambda m: list(m.stem.parameters()) + list(m.blocks.parameters())  # noqa: E731 (the head is unused)
    weights = [torch.randn_like(t) for t in inter + [final]]  # a plain sum of BN outputs has zero gradient
    loss = lambda outs: sum((w * t).sum() for w, t in zip(weights, outs))  # noqa: E731
    grads = torch.autograd.grad(loss(inter + [final]), trunk(lean))
    ref_grads = torch.autograd.grad(loss(ref_inter + [ref_final]), trunk(eager))
    for a, b in zip(grads, ref_grads):  # gradients of one output from several consumers: summed in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=GRAD_ATOL * b.abs().max().item())


def test_double_backward_through_the_lean_block_is_refused_by_name():
    """A gradient penalty differentiates gradients again (``create_graph=True``); the lean block computes its
    gradients without a graph, so the second-order terms through it were silently missing. It says so instead, and
    the plain modules compute the penalty's gradients."""
    model = _pair(dim=16, depth=2)[1]
    x = _input(2, 32).requires_grad_(True)
    with fast.use_backend('lean'):
        out = model(x)
        with pytest.raises(RuntimeError, match='no double backward.*eager'):
            torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with fast.use_backend('eager'):
        g, = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        grads = torch.autograd.grad(g.square().sum(), list(model.blocks.parameters()), allow_unused=True)
    assert all(t is not None for t in grads)


def test_grad_checkpointing_runs_the_plain_modules_inside_checkpoints():
    eager, lean = _pair(dim=16, depth=3)
    lean.set_grad_checkpointing()
    x = _input(2, 32)
    ref = _step(eager, x, 'eager')
    got = _step(lean, x, 'lean')
    assert got[3] == {'eager': 6}  # each block twice (forward, recomputation), never the lean block
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-5, atol=1e-7)


def test_no_grad_training_mode_and_sync_batchnorm_take_the_plain_modules():
    model = timm.create_model('convmixer_256_8_ks5_p2', dim=16, depth=2).train()
    x = _input(2, 32)
    fast.reset_counters()
    with torch.no_grad():
        model(x)
    assert fast.counters == {'eager': 2}
    assert int(model.blocks[0][3].num_batches_tracked) == 1  # running statistics updated once
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert block_parts(synced.blocks[0]) is None


# ---------------------------------------------------------------------------------------------------------------
# auto's check before trust


def _eval_model(dim=8, depth=2):
    """Eval mode with non-trivial BatchNorm statistics (the shared randomiser), kernel 3 to keep the interpreter
    fast."""
    return small_model(dim=dim, depth=depth, kernel_size=3, randomize={})


def test_auto_checks_triton_on_first_use_and_keeps_the_faster(interpreter):
    model = _eval_model()
    x = _input(1, 16)
    with torch.no_grad(), fast.use_backend('eager'):
        expected = model(x)
    fast.reset_counters()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), fast.use_backend('auto'):
        warnings.simplefilter('always')
        first = model(x)
        second = model(x)
    said = [w for w in caught if issubclass(w.category, checked.FastPathDecision)]
    # said once per Triton path (cuBLAS pointwise + epilogue pass, and the fused GEMM), for the case both blocks share
    assert len(said) == 2, [str(w.message) for w in caught]
    assert [key[0] for key in checked.decisions] == list(fast.TRITON_PATHS) == ['triton', 'triton_gemm']
    for (key, decision), message in zip(checked.decisions.items(), said):
        assert key[1:4] == ('cpu', None, (1, 8, 8, 8)) and key[7:] == ('eval', 'gelu', 3)
        # the interpreter is orders of magnitude slower than oneDNN/ATen: auto must keep the plain modules
        assert decision.path == 'eager' and decision.fused_ms > decision.eager_ms, decision
        assert decision.max_rel_err <= checked.tolerance(torch.float32, 'cpu')
        assert 'eager' in str(message.message) and 'ms' in str(message.message)
    assert fast.counters == {'eager': 4}
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_auto_falls_back_with_a_warning_when_the_fused_result_differs(interpreter, monkeypatch):
    from timm_convmixer.fast import triton_ops
    real = triton_ops.triton_block_forward

    def off_by_a_bit(block, x, **kwargs):
        out = real(block, x, **kwargs)
        return None if out is None else out * 1.01

    monkeypatch.setattr(triton_ops, 'triton_block_forward', off_by_a_bit)
    model = _eval_model()
    x = _input(1, 16)
    fast.reset_counters()
    with pytest.warns(RuntimeWarning, match=r'fused triton path gave a different result.*eval blocks on cpu'), \
            torch.no_grad(), fast.use_backend('auto'):
        model(x)
    assert len(checked.decisions) == len(fast.TRITON_PATHS)  # each Triton path checked, each rejected
    for decision in checked.decisions.values():
        assert decision.path == 'eager' and decision.max_rel_err > 1e-3
    assert fast.counters == {'eager': 2}


@pytest.mark.parametrize('backend', ['triton', 'triton_gemm'])
def test_forcing_triton_skips_the_check(interpreter, backend):
    model = _eval_model()
    x = _input(1, 16)
    with torch.no_grad(), fast.use_backend('eager'):
        expected = model(x)
    fast.reset_counters()
    with torch.no_grad(), fast.use_backend(backend):
        got = model(x)
    assert fast.counters == {backend: 2} and not checked.decisions
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_without_native_bf16_is_said_once():
    from timm_convmixer.fast import cpu
    if cpu.native_bf16():
        pytest.skip('this CPU has native bf16: nothing to warn about')
    model = timm.create_model('convmixer_256_8_ks5_p2', dim=8, depth=2).eval()
    cpu._warned_slow_bf16 = False
    with pytest.warns(RuntimeWarning, match='without native bf16 support.*15-20x slower') as caught, \
            torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model(_input(1, 16))
        model(_input(1, 16))
    assert sum('native bf16' in str(w.message) for w in caught) == 1


def test_auto_falls_back_when_the_fused_path_raises(interpreter, monkeypatch):
    from timm_convmixer.fast import triton_ops

    def broken(block, x, **kwargs):
        raise RuntimeError('no kernel image is available for execution on the device')

    monkeypatch.setattr(triton_ops, 'triton_block_forward', broken)
    model = _eval_model()
    x = _input(1, 16)
    with torch.no_grad(), fast.use_backend('eager'):
        expected = model(x)
    fast.reset_counters()
    with pytest.warns(RuntimeWarning, match='fused triton path failed.*no kernel image'), torch.no_grad(), \
            fast.use_backend('auto'):
        got = model(x)
    assert fast.counters == {'eager': 2} and torch.equal(got, expected)
    assert len(checked.decisions) == len(fast.TRITON_PATHS)
    for decision in checked.decisions.values():
        assert decision.path == 'eager' and 'RuntimeError' in decision.reason


@pytest.mark.parametrize('gemm_accepted, race_winner', [
    (True, 'triton_gemm'), (True, 'triton'), (False, None), (True, None)])
def test_auto_takes_the_triton_path_that_won_the_race(interpreter, gemm_accepted, race_winner):
    """Of the Triton paths the check accepted, auto runs the only one, or, where it accepted both, the winner of
    the race between them: run on first use and recorded (here through the interpreter), or placed in the cache as
    a first use on a GPU would leave it (times from the paths' own checks are not compared). The checks' decisions
    are placed too (the interpreter always loses to the plain modules)."""
    model = _eval_model()
    x = _input(1, 16)
    with torch.no_grad(), fast.use_backend('eager'):
        expected_out = model(x)
    parts = block_parts(model.blocks[0])

    def key(path):
        return checked.case_key(path, parts, x.new_empty(1, 8, 8, 8), torch.float32)
    for path in fast.TRITON_PATHS:
        accepted = gemm_accepted or path == 'triton'
        checked.decisions[key(path)] = checked.Decision(
            path if accepted else 'eager', 'placed by the test', 5.0 if accepted else None, 10.0, 0.0)
    if race_winner is not None:
        checked.decisions[key(checked.RACE)] = checked.Decision(race_winner, 'placed by the test', 1.0, 10.0, 0.0)
    fast.reset_counters()
    with torch.no_grad(), fast.use_backend('auto'):
        got = model(x)
    race = checked.decisions.get(key(checked.RACE))
    if not gemm_accepted:
        assert race is None and fast.counters == {'triton': 2}
    else:
        assert race is not None and fast.counters == {race.path: 2}
        if race_winner is None:  # raced here: both timed, the faster kept
            assert race.path in fast.TRITON_PATHS and 'fastest of triton' in race.reason
            times = dict(part.rsplit(' ', 2)[:2] for part in race.reason.split('fastest of ')[1].split(' (')[0]
                         .split(', '))
            assert float(times[race.path]) == min(float(t) for t in times.values())
            assert race.fused_ms == pytest.approx(float(times[race.path]), abs=1e-3)
        else:
            assert race.path == race_winner
    torch.testing.assert_close(got, expected_out, rtol=1e-5, atol=1e-5)


# the lean block with its normalisations fused in Triton kernels (``lean_triton``), through Triton's interpreter

@pytest.mark.kernels
@pytest.mark.parametrize('dtype,act,kernel,drop_path,momentum,channels_last,size', [
    (torch.float64, 'gelu', 5, 0.3, None, False, 12),  # drop path masks, the cumulative running average, NCHW input
    (torch.float64, 'silu', 8, 0., 0.1, True, 12),  # even kernel, larger than the 6x6 tokens
    (torch.float32, 'relu', 3, 0.2, 0.1, True, 16),
])
def test_lean_triton_training_steps_match_eager(interpreter, dtype, act, kernel, drop_path, momentum,
                                                channels_last, size):
    act_layer = ACT_LAYERS[act]
    depth = 2
    eager, lean = _pair(dim=16, depth=depth, kernel_size=kernel, act_layer=act_layer, drop_path_rate=drop_path,
                        bn_momentum=momentum, channels_last=channels_last)
    eager, lean = eager.to(dtype), lean.to(dtype)
    x = _input(2, size, channels_last).to(dtype)  # the interpreter's cost grows with pixels x k x k
    torch.manual_seed(1)
    ref = _step(eager, x, 'eager', steps=2)
    torch.manual_seed(1)
    got = _step(lean, x, 'lean_triton', steps=2)
    # fused kernels round once where eager rounds after each op: exact in fp64 up to rounding, fp32 within fp32
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    _assert_same_step(ref, got, depth, steps=2, forward_exact=False, path='lean_triton', **tol)
    assert int(lean.blocks[0][3].num_batches_tracked) == 2


@pytest.mark.kernels
def test_lean_triton_under_bf16_autocast_is_as_accurate_as_eager_autocast(interpreter):
    """Under bf16 autocast both round differently (eager after every op, the kernels once, from fp32 sums), so each
    is held to an fp32 step instead: every gradient of ours is as close to it as eager's is (eager's bf16 BatchNorm
    backward is the less accurate one: some of its bias gradients are off by more than 100%)."""
    eager, lean = _pair(dim=16, depth=2)
    fp32 = copy.deepcopy(eager)
    x = _input(2, 16, channels_last=True)
    ref = _step(fp32, x, 'eager')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16_eager = _step(eager, x, 'eager')
        ours = _step(lean, x, 'lean_triton')
    assert ours[3] == {'lean_triton': 2}

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    torch.testing.assert_close(ours[0], ref[0], rtol=2e-2, atol=1e-2)
    for n in ref[2]:
        if ref[2][n].is_floating_point():
            assert rel(ours[2][n], ref[2][n]) <= max(1.25 * rel(bf16_eager[2][n], ref[2][n]), 2e-2), n
    for n in ref[1]:
        assert rel(ours[1][n], ref[1][n]) <= max(1.25 * rel(bf16_eager[1][n], ref[1][n]), 6e-2), n


@pytest.mark.kernels  # auto's choice runs lean_triton through the interpreter; timm's version plays no part
def test_auto_checks_both_lean_paths_and_keeps_the_fastest_correct_one(interpreter, monkeypatch):
    from timm_convmixer.fast import lean_cpu
    monkeypatch.setattr(lean_cpu, 'applies', lambda parts, x: False)  # torch's kernels against the Triton ones
    eager, model = _pair(dim=16, depth=2)
    x = _input(2, 16)
    ref = _step(eager, x, 'eager')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got = _step(model, x, 'auto')
    said = _decisions_said(caught)
    assert [key[0] for key in checked.decisions] == ['lean', 'lean_triton'] and len(said) == 2
    triton_decision = checked.decisions[next(k for k in checked.decisions if k[0] == 'lean_triton')]
    # correct, but the interpreter is far slower than torch's kernels: auto must not take it
    assert triton_decision.max_rel_err <= triton_decision.limit
    assert triton_decision.path == 'eager' and triton_decision.fused_ms > triton_decision.eager_ms
    lean_decision = checked.decisions[next(k for k in checked.decisions if k[0] == 'lean')]
    assert got[3] == {lean_decision.path: 2}
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)  # the trials left no trace in the step
    for n in ref[2]:
        assert torch.equal(got[2][n], ref[2][n]), n


@pytest.mark.kernels  # timm's version plays no part
@pytest.mark.parametrize('path,size', [('lean_cpu', 32), ('lean_triton', 16)])
def test_auto_rejects_a_lean_result_that_differs(path, size, monkeypatch, request):
    """An output 1% off is refused, by name: judged against a float64 step (fp32 on a CPU), the floor that lets
    correct fp32 paths through still catches a wrong one."""
    request.getfixturevalue('kernels' if path == 'lean_cpu' else 'interpreter')
    norm = getattr(importlib.import_module(f'timm_convmixer.fast.{path}'),
                   {'lean_cpu': 'CpuNorm', 'lean_triton': 'TritonNorm'}[path])
    real = norm.forward

    def off_by_a_bit(*args, **kwargs):
        out, saved = real(*args, **kwargs)
        return out * 1.01, saved

    monkeypatch.setattr(norm, 'forward', staticmethod(off_by_a_bit))
    _, model = _pair(dim=16, depth=2)
    with pytest.warns(RuntimeWarning, match=rf'fused {path} path gave a different result from the plain modules in '
                                            r'float64'):
        _step(model, _input(2, size), 'auto')
    decision = checked.decisions[next(k for k in checked.decisions if k[0] == path)]
    assert decision.path == 'eager' and decision.max_rel_err > checked.FLOAT64_REFERENCE_FLOOR


def test_forcing_lean_triton_without_a_triton_device_runs_the_plain_modules(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    _, model = _pair(dim=16, depth=2)
    assert _step(model, _input(2, 16), 'lean_triton')[3] == {'eager': 2}


def test_check_under_16_bit_autocast_judges_each_tensor_against_fp32():
    """With an fp32 reference, each result tensor of the fused path may be off by max(tolerance, 2x the plain
    modules' own error on that tensor): a tensor the plain modules get right must stay right."""
    block, x = nn.BatchNorm2d(2), torch.zeros(1, 2, 1, 1)
    exact = (torch.ones(100), torch.ones(100))
    plain = (torch.ones(100), torch.full((100,), 1.3))  # 30% off on the second tensor (say, a bias gradient)
    tol = checked.tolerance(torch.bfloat16, 'cpu')

    def decide(case, fused):
        key = ('fused', 'cpu', None, (1, 2, 1, 1), torch.float32, torch.bfloat16, False, 'eval', 'gelu', case)
        return checked.decide(key, 'fused', block, x, lambda: fused, lambda: plain, torch.bfloat16, lambda: exact)

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        close = decide(1, (torch.ones(100), torch.full((100,), 1.5)))  # 50% <= 2 x 30%
        assert close.max_rel_err == pytest.approx(0.5) and close.limit == pytest.approx(0.6)
        assert close.fused_ms is not None  # accepted, then timed
        with pytest.warns(RuntimeWarning, match='different result from the plain modules in fp32'):
            far = decide(2, (torch.full((100,), 1.1), torch.ones(100)))  # 10% where the plain modules are exact
    assert far.path == 'eager' and far.fused_ms is None
    assert far.max_rel_err == pytest.approx(0.1) and far.limit == tol


def test_check_keeps_the_plain_modules_on_a_tie():
    """A fused path is taken only where its check ran it more than FASTER_BY faster than the plain modules: a tie
    (here both sleep as long) keeps the plain modules, a clear win (half the time) takes the fused path. Sleeps of
    100 ms: both of the plain modules' timed runs would have to wake 3 ms late to flip the tie."""
    block, x, out = nn.BatchNorm2d(2), torch.zeros(1, 2, 1, 1), torch.ones(4)

    def sleeping(ms):
        return lambda: time.sleep(ms / 1e3) or out

    def decide(case, fused_ms):
        key = ('fused', 'cpu', None, (1, 2, 1, 1), torch.float32, torch.float32, False, 'eval', 'gelu', case)
        return checked.decide(key, 'fused', block, x, sleeping(fused_ms), sleeping(100), torch.float32)

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        tie, win = decide(1, 100), decide(2, 50)
    assert tie.path == 'eager' and tie.fused_ms is not None and not checked.wins(tie.fused_ms, tie.eager_ms), tie
    assert win.path == 'fused' and checked.wins(win.fused_ms, win.eager_ms), win
    assert checked.wins(96., 100.) and not checked.wins(98., 100.) and not checked.wins(101., 100.)


def test_check_without_an_fp32_run_judges_against_the_plain_modules():
    """A bf16 model under bf16 autocast cannot run in fp32 (its weights are bf16): the check still decides, against
    the plain modules with bf16's tolerance, instead of failing the user's step."""
    eager, model = _pair(dim=16, depth=2)
    eager, model = eager.bfloat16(), model.bfloat16()
    x = _input(2, 16).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = _step(eager, x, 'eager')
        got = _step(model, x, 'auto')
    (key, decision), = checked.decisions.items()
    assert key[0] == 'lean' and decision.limit == checked.tolerance(torch.bfloat16, 'cpu')
    assert decision.max_rel_err <= decision.limit and got[3] == {decision.path: 2}
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
