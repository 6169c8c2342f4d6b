"""The CPU fast paths compute the eager function, apply only where they may, and the backend switch works. Marked
``kernels``: oneDNN's and our kernels' numerics, which timm's version plays no part in (test-min leaves them out)."""
import gc
import threading
import weakref
from collections import Counter

import pytest
import torch
import torch.nn as nn

from timm_convmixer import fast
from timm_convmixer.fast import checked, cpu_kernels
from timm_convmixer.fast import cpu as fast_cpu
from timm_convmixer.fast.eligibility import block_parts, stem_parts

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not fast_cpu.available(), reason='oneDNN fused convolution not available')]


@pytest.fixture(params=fast_cpu.PATHS)
def path(request):
    """Each CPU path: oneDNN's convolutions (``cpu``), our compiled kernels (``cpu_compiled``), and ours with
    oneDNN's pointwise conv (``cpu_hybrid``; these two skipped where our kernels cannot be built)."""
    if request.param != 'cpu' and cpu_kernels.load() is None:
        pytest.skip(f'the CPU kernels cannot be built here: {cpu_kernels.build_error()}')
    return request.param


@pytest.fixture
def make_model(small_model):
    """This file's model: dim 24, patch 4, 7 classes, BatchNorms randomised (negative scales included) and eval
    mode; kernel, activation, width and depth per test."""
    def make(kernel_size: int = 5, act: str = 'gelu', dim: int = 24, depth: int = 2) -> nn.Module:
        return small_model(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=4, act_layer=act, num_classes=7,
                           randomize={})
    return make


@pytest.fixture
def infer(run_counted):
    """``model(x)`` under no_grad with ``backend`` forced: ``(output, {path: block calls})``."""
    def infer(model: nn.Module, x: torch.Tensor, backend: str):
        with torch.no_grad():
            return run_counted(model, x, backend=backend)
    return infer


@pytest.mark.parametrize('kernel_size', [5, 8, 9])
@pytest.mark.parametrize('act', ['relu', 'gelu', 'silu'])
def test_model_matches_eager(kernel_size, act, path, make_model, infer):
    model = make_model(kernel_size, act)
    x = torch.randn(2, 3, 36, 52)  # non-square; 9x13 tokens
    fast_out, fast_paths = infer(model, x, path)
    eager_out, eager_paths = infer(model, x, 'eager')
    assert fast_paths == {path: 2}
    assert eager_paths == {'eager': 2}
    torch.testing.assert_close(fast_out, eager_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel_size', [5, 8, 9])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape', [(1, 7, 5), (3, 6, 11)])
def test_block_matches_eager(kernel_size, channels_last, shape, path, make_model, infer):
    """Block level, odd/even spatial sizes and batch 1, both input layouts; the output keeps the values."""
    block = make_model(kernel_size).blocks[0]
    n, h, w = shape
    x = torch.randn(n, 24, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref, ref_paths = infer(block, x, 'eager')
    out, paths = infer(block, x, path)
    assert ref_paths == {'eager': 1} and paths == {path: 1}
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_inference_mode_and_auto(make_model, infer, run_counted, auto_paths_from_nchw):
    """auto checks each CPU path on first use of a case (here under inference_mode), keeps the fastest of those
    that match the plain modules and are faster than them, and every block then takes the path decided for its
    case. The stem's path is checked the same way, and decides the first block's case (its output's layout)."""
    model = make_model(9)
    x = torch.randn(1, 3, 32, 32)
    ref, ref_paths = infer(model, x, 'eager')
    assert ref_paths == {'eager': 2}
    with torch.inference_mode():
        out, paths = run_counted(model, x, backend='auto')
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    records = checked.decision_records()
    compiled = cpu_kernels.load() is not None
    stem_fast, *choices = auto_paths_from_nchw(records)
    assert fast.stem_counters == {checked.STEM if stem_fast else 'eager': 1}
    [stem] = [r for r in records if r['fused_path'] == checked.STEM]
    assert stem['shape'] == [1, 3, 32, 32] and stem['kernel_size'] == 4
    blocks = [r for r in records if r['fused_path'] != checked.STEM]
    first = [r for r in blocks if r['channels_last'] == stem_fast]  # the first block's case: the stem's output
    checks = [r for r in records if r['fused_path'] != checked.RACE]
    assert sorted(r['fused_path'] for r in first if r in checks) == (list(fast_cpu.PATHS) if compiled else ['cpu'])
    for r in blocks:
        assert r['shape'] == [1, 24, 8, 8]
    for r in checks:
        assert r['max_rel_err'] <= checked.tolerance(torch.float32, 'cpu')
        assert r['path'] == (r['fused_path'] if checked.wins(r['fused_ms'], r['eager_ms']) else 'eager')
    assert paths == dict(Counter(choices))
    with torch.inference_mode():
        _, again = run_counted(model, x, backend='auto')
        decided = len(checked.decisions)
        _, third = run_counted(model, x, backend='auto')
    # decided once: later calls take the same paths without checking again (the stem's decision stands even where
    # the first block then took no path on its channels_last output)
    assert third == again == paths and len(checked.decisions) == decided == len(records)


def test_race_times_what_a_path_costs_in_a_model(make_model):
    """A trial may name what the race times apart from what is checked (``cpu_hybrid``: the block as a chain runs it,
    its output not written): the check runs ``fused`` only, the race the fourth callable only. Both candidates return
    the right answer at once, so both beat the plain modules and race."""
    block = make_model(kernel_size=7, dim=32).blocks[0].eval()
    x = torch.randn(2, 32, 24, 24)
    calls = Counter()

    def counted(name, value=None):
        def run():
            calls[name] += 1
            return want if value is None else value
        return run
    def plain():
        with fast.use_backend('eager'):
            return block(x)
    want = plain()
    trials = {'cpu_compiled': (counted('compiled'), plain, None),
              'cpu_hybrid': (counted('hybrid checked'), plain, None, counted('hybrid raced', 'carried'))}
    with torch.no_grad():
        winner = checked.fastest(trials, block_parts(block), block, x, torch.float32)
    assert winner in trials
    race = [r for r in checked.decision_records() if r['fused_path'] == checked.RACE]
    assert len(race) == 1 and calls['hybrid raced'] == checked.RACE_ROUNDS
    assert calls['compiled'] > checked.RACE_ROUNDS
    assert 0 < calls['hybrid checked'] == calls['compiled'] - checked.RACE_ROUNDS


def test_race_leaves_out_hybrid_where_its_output_is_fresh_pages(make_model, kernels):
    """oneDNN's pointwise conv allocates ``cpu_hybrid``'s output afresh each call; from glibc's largest mmap threshold
    on, that is new pages every block, so auto's race takes ``cpu_compiled`` (pooled output) there instead; below it,
    the race is :func:`paths`' own."""
    parts = block_parts(make_model(kernel_size=5, dim=256).blocks[0].eval())
    limit = fast_cpu.FRESH_PAGES_BYTES
    below = torch.empty(1, 256, 16, 16).contiguous(memory_format=torch.channels_last)
    at_limit = torch.empty(limit // (256 * 32 * 32 * 4), 256, 32, 32).contiguous(memory_format=torch.channels_last)
    assert at_limit.numel() * 4 == limit
    with torch.no_grad():
        assert 'cpu_hybrid' in fast_cpu.raced_paths(parts, below) == fast_cpu.paths(parts, below)
        assert 'cpu_hybrid' in fast_cpu.paths(parts, at_limit)
        raced = fast_cpu.raced_paths(parts, at_limit)
        assert raced == tuple(p for p in fast_cpu.paths(parts, at_limit) if p != 'cpu_hybrid')
    assert 'cpu_compiled' in raced


def test_auto_keeps_only_the_chosen_paths_weights(make_model, run_counted, auto_paths_from_nchw):
    """auto's check folds each CPU path's own copy of a block's weights; afterwards only the chosen path's stay."""
    model = make_model(9)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        run_counted(model, x, backend='auto')
    for block, path in zip(model.blocks, auto_paths_from_nchw(checked.decision_records())[1:]):
        kept = {p for p, _ in fast_cpu._cache.get(block[0].fn[0], {})}
        assert kept == (set() if path == 'eager' else {path}), (path, kept)


def test_auto_does_not_cache_a_case_the_path_declines(make_model, run_counted):
    """With gradients needed the CPU path declines per call; that must not become the case's cached decision."""
    model = make_model()
    x = torch.randn(1, 3, 16, 16)
    _, paths = run_counted(model, x, backend='auto')
    assert paths == {'eager': 2} and not checked.decisions
    with torch.no_grad():
        run_counted(model, x, backend='auto')
    assert checked.decisions


def test_grad_needed_runs_eager(make_model, run_counted):
    """Outside no_grad the parameters need gradients; the fused ops have none, so eager runs."""
    model = make_model()
    out, paths = run_counted(model, torch.randn(1, 3, 16, 16), backend='cpu')
    out.sum().backward()
    assert paths == {'eager': 2}
    assert model.blocks[0][1].weight.grad is not None


def test_train_mode_runs_eager_and_updates_stats(make_model, infer):
    model = make_model()
    model.train()
    before = model.blocks[1][3].running_mean.clone()
    _, paths = infer(model, torch.randn(2, 3, 16, 16), 'cpu')
    assert paths == {'eager': 2}
    assert not torch.equal(before, model.blocks[1][3].running_mean)


def test_not_after_convert_sync_batchnorm(make_model, infer):
    model = make_model()
    x = torch.randn(1, 3, 16, 16)
    ref, ref_paths = infer(model, x, 'eager')
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert type(synced.blocks[0][3]) is nn.SyncBatchNorm
    out, paths = infer(synced, x, 'auto')
    assert ref_paths == paths == {'eager': 2}
    torch.testing.assert_close(out, ref)


def test_hooks_disable_fast_path(make_model, infer):
    model = make_model()
    seen = []
    handle = model.blocks[0][1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _, paths = infer(model, torch.randn(1, 3, 16, 16), 'cpu')
    handle.remove()
    assert seen and paths == {'eager': 1, 'cpu': 1}  # only the hooked block ran its modules


def test_fp16_autocast_and_tracing_run_eager(make_model, infer):
    model = make_model()
    x = torch.randn(1, 3, 16, 16)
    with torch.autocast('cpu', dtype=torch.float16):
        _, paths = infer(model, x, 'cpu')
    assert paths == {'eager': 2}
    # the trace's own check would re-run the model eagerly, so it is off
    traced, paths = infer(lambda inp: torch.jit.trace(model, inp, check_trace=False), x, 'cpu')
    assert paths == {'eager': 2}
    ref, ref_paths = infer(model, x, 'eager')
    assert ref_paths == {'eager': 2}
    torch.testing.assert_close(traced(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel_size', [8, 9])
def test_bf16_autocast_matches_eager_autocast(kernel_size, path, make_model, infer):
    """Under bf16 autocast oneDNN's path computes in bf16 as eager does, our kernels in fp32 rounded to bf16 at the
    end; each gives autocast's output dtype and is at least as close to fp32 as eager's bf16."""
    if path == 'cpu' and not fast_cpu.native_bf16():
        pytest.skip('oneDNN has no bf16 kernels on this CPU')
    if path != 'cpu' and cpu_kernels.load() is None:
        pytest.skip('our CPU kernels are not built here')
    model = make_model(kernel_size=kernel_size, dim=32, depth=3)
    x = torch.randn(2, 3, 20, 16)
    ref32, ref_paths = infer(model, x, 'eager')
    assert ref_paths == {'eager': 3}
    outs = {}
    for backend in (path, 'eager'):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs[backend], paths = infer(model, x, backend)
        assert paths == {backend: 3}
        assert outs[backend].dtype == torch.bfloat16  # autocast's output dtype, as eager gives it
    err_fast = (outs[path].float() - ref32).abs().max().item()
    err_eager = (outs['eager'].float() - ref32).abs().max().item()
    scale = ref32.abs().max().item()
    assert err_fast < 0.05 * scale, (err_fast, scale)
    assert err_fast <= 1.5 * err_eager + 1e-3 * scale, (err_fast, err_eager)
    torch.testing.assert_close(outs[path].float(), outs['eager'].float(), rtol=0.05, atol=0.05 * scale)


def test_alternating_bf16_autocast_and_fp32_keeps_both_foldings(path, make_model, infer):
    """A model serving bf16-autocast and fp32 calls in turn keeps one folding of each block's weights per compute
    dtype: each call finds its own, rather than refolding (and repacking) every block on every call."""
    if path == 'cpu' and not fast_cpu.native_bf16():
        pytest.skip('oneDNN has no bf16 kernels on this CPU')
    model = make_model(kernel_size=7, dim=32)
    x = torch.randn(2, 3, 16, 16)
    entries = fast_cpu._cache.get  # block's depthwise conv -> {(path, compute dtype): kept entry}

    def serve_both():
        infer(model, x, path)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            infer(model, x, path)
    serve_both()
    first = {conv: dict(entries(conv)) for conv in (b[0].fn[0] for b in model.blocks)}
    serve_both()
    for conv, kept in first.items():  # (our kernels compute in fp32 under autocast too: one folding serves both)
        assert kept and {dtype for _, dtype in kept} <= {torch.float32, torch.bfloat16}
        assert all(entries(conv)[what] is entry for what, entry in kept.items())  # found again, not refolded


def test_hybrid_under_native_bf16_autocast_reads_and_writes_bf16(make_model, infer):
    """Where oneDNN's bf16 is native, ``cpu_hybrid`` under bf16 autocast is a bf16 path: our depthwise kernel reads
    and writes bf16 (fp32 inside), oneDNN's pointwise conv runs in bf16 as eager autocast's does, and the pointwise
    BatchNorm is carried to the next block in fp32 -- the chain runs under autocast too."""
    if not fast_cpu.native_bf16() or cpu_kernels.load() is None:
        pytest.skip('needs native bf16 and our CPU kernels')
    model = make_model(kernel_size=7, dim=32, depth=3)
    x = torch.randn(2, 3, 16, 16)
    ref32, _ = infer(model, x, 'eager')
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        carried = fast_cpu.hybrid_forward(block_parts(model.blocks[0]), model.stem(x))
        out, paths = infer(model, x, 'cpu_hybrid')
    assert carried.a.dtype == torch.bfloat16 and carried.scale.dtype == carried.shift.dtype == torch.float32
    assert fast_cpu.materialize(carried).dtype == torch.bfloat16
    assert paths == {'cpu_hybrid': 3} and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref32, rtol=0.05, atol=0.05 * ref32.abs().max().item())


def test_compiled_under_native_bf16_autocast_multiplies_bf16_pairs(make_model, infer):
    """Where oneDNN's bf16 is native and the CPU has AVX512-BF16, ``cpu_compiled`` under bf16 autocast runs its GEMM on
    bf16 operands, as eager autocast's convolution (the depthwise half writes bf16, the weight is packed as bf16
    pairs), with fp32 sums and epilogue: the answer is eager's fp32 to bf16 precision. Channels in a whole vector and
    a partial one (40)."""
    if not fast_cpu.native_bf16() or cpu_kernels.load() is None or not cpu_kernels.bf16_dot():
        pytest.skip('needs native bf16 and our CPU kernels with the bf16 dot product')
    model = make_model(kernel_size=9, dim=40, depth=3)
    x = torch.randn(2, 3, 16, 16)
    ref32, _ = infer(model, x, 'eager')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, paths = infer(model, x, 'cpu_compiled')
    assert paths == {'cpu_compiled': 3} and out.dtype == torch.bfloat16
    for block in model.blocks:
        (what, entry), = fast_cpu._cache.get(block[0].fn[0]).items()
        assert what == ('cpu_compiled', torch.bfloat16) and entry.value.panels.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref32, rtol=0.05, atol=0.05 * ref32.abs().max().item())


def test_bf16_autocast_without_native_bf16_offers_our_fp32_kernels(make_model, infer, monkeypatch):
    """Where oneDNN would emulate bf16 (15-20x slower than fp32), its path declines and our fp32 kernels are what
    auto can weigh: an answer within bf16 precision, without the emulation. (The CPU's answer is what is replaced,
    by our own function's: this CPU may well have native bf16.)"""
    if cpu_kernels.load() is None:
        pytest.skip('our CPU kernels are not built here')
    monkeypatch.setattr(fast_cpu, 'native_bf16', lambda: False)
    model = make_model(kernel_size=7, dim=32, depth=2)
    x = torch.randn(2, 3, 16, 16)
    ref32, _ = infer(model, x, 'eager')
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        xb = model.stem(x)
        assert fast_cpu.paths(block_parts(model.blocks[0]), xb) == ('cpu_compiled', 'cpu_hybrid')
        _, declined = infer(model, x, 'cpu')
        out, paths = infer(model, x, 'cpu_hybrid')
        features, _ = infer(model.forward_features, x, 'cpu_hybrid')
    assert declined == {'eager': 2} and paths == {'cpu_hybrid': 2} and out.dtype == torch.bfloat16
    assert features.dtype == torch.bfloat16  # each block's output rounded, as alone (no fp32 chain)
    torch.testing.assert_close(out.float(), ref32, rtol=0.05, atol=0.05 * ref32.abs().max().item())


@pytest.mark.parametrize('kernel_size', [5, 8])
def test_compiled_path_under_bf16_autocast_is_fp32_rounded_after_each_block(kernel_size, make_model, infer,
                                                                             monkeypatch):
    """Under bf16 autocast without native bf16 the compiled path reads each block's bf16 input and writes its bf16
    output inside its kernels (no pass of its own converts either), and the stem computes in fp32 too: bit for bit
    the fp32 stem and blocks with every output rounded to bf16 by torch. Channels in whole vectors and a partial one
    (20)."""
    if cpu_kernels.load() is None:
        pytest.skip('our CPU kernels are not built here')
    monkeypatch.setattr(fast_cpu, 'native_bf16', lambda: False)
    model = make_model(kernel_size=kernel_size, dim=20, depth=3)
    x = torch.randn(2, 3, 24, 20)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got, paths = infer(model.forward_features, x, 'cpu_compiled')
    assert paths == {'cpu_compiled': 3} and got.dtype == torch.bfloat16
    with torch.no_grad(), fast.use_backend('cpu_compiled'):
        want = model.stem(x).bfloat16()
        for block in model.blocks:
            want = block(want.float()).bfloat16()
    assert torch.equal(got, want)


def test_kept_weights_follow_batch_norm_recalibration(path, make_model, infer):
    """BatchNorm's training-mode forward updates the running statistics inside its kernel without bumping their
    version counters; with the weights unchanged (a BN recalibration pass, frozen weights) the folded weights must
    still be re-derived (num_batches_tracked, advanced on every such call, is what shows it)."""
    model = make_model()
    x = torch.randn(1, 3, 16, 16)
    infer(model, x, path)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16) * 3 + 1)
    model.eval()
    out, paths = infer(model, x, path)
    ref, _ = infer(model, x, 'eager')
    assert paths == {path: 2}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a write through .data is invisible to version counters: forget_kept() is the documented way out
    with torch.no_grad():
        model.blocks[0][3].running_mean.data.add_(1.)
    fast.forget_kept()
    out, _ = infer(model, x, path)
    ref, _ = infer(model, x, 'eager')
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cache_follows_weight_changes_and_state_dict_unchanged(make_model, infer):
    model = make_model()
    x = torch.randn(1, 3, 16, 16)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    _, paths = infer(model, x, 'cpu')
    assert paths == {'cpu': 2}
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k]), k
    # in-place edits (an optimizer step, load_state_dict) must invalidate the folded weights
    with torch.no_grad():
        model.blocks[0][0].fn[2].running_var.mul_(3)
        model.blocks[1][1].weight.add_(0.1)
    out, paths = infer(model, x, 'cpu')
    ref, ref_paths = infer(model, x, 'eager')
    assert paths == {'cpu': 2} and ref_paths == {'eager': 2}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model.load_state_dict(make_model().state_dict())
    out, paths = infer(model, x, 'cpu')
    ref, ref_paths = infer(model, x, 'eager')
    assert paths == {'cpu': 2} and ref_paths == {'eager': 2}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_changing_batch_and_size_repacks_and_stays_exact(make_model, infer):
    """Weights are packed for the input's exact shape; a new batch size or image size must repack, not misuse."""
    model = make_model(kernel_size=9)
    for shape in ((2, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16), (1, 3, 20, 12)):
        x = torch.randn(*shape)
        out, paths = infer(model, x, 'cpu')
        ref, ref_paths = infer(model, x, 'eager')
        assert paths == {'cpu': 2} and ref_paths == {'eager': 2}, shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    entry = fast_cpu._cache[model.blocks[0][0].fn[0]]['cpu', torch.float32]
    assert entry.stamp[0] == (1, 24, 5, 3)  # key: the last shape seen


def test_backend_switch(make_model, infer, monkeypatch):
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'cuda-magic'"):
        fast.set_backend('cuda-magic')
    previous = fast.get_backend()
    with fast.use_backend('eager'):
        assert fast.get_backend() == 'eager'
    assert fast.get_backend() == previous
    try:
        fast.set_backend('CPU')  # case-insensitive, kept lower-case
        assert fast.get_backend() == 'cpu'
    finally:
        fast.set_backend(previous)
    assert fast.get_backend() == previous
    # 'triton' takes CPU tensors only under Triton's interpreter (tests/test_triton_kernels.py drives that case)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    _, paths = infer(make_model(), torch.randn(1, 3, 16, 16), 'triton')
    assert paths == {'eager': 2}


def test_env_var_selects_backend(run_python):
    """TIMM_CONVMIXER_BACKEND is read at import (re-read here by reloading the module): unset means 'auto', a typo
    warns and keeps 'auto' rather than breaking ``import timm``."""
    code = '''
        import importlib, os, warnings
        import timm_convmixer.fast as f
        for value in (None, 'eager', ' Triton ', 'cuda-magic'):
            if value is not None:
                os.environ['TIMM_CONVMIXER_BACKEND'] = value
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                importlib.reload(f)
            print(f.get_backend(), [str(w.message) for w in caught])
    '''
    lines = run_python(code=code, unset=[fast.ENV_VAR]).stdout.strip().splitlines()[-4:]
    assert lines[:3] == ['auto []', 'eager []', 'triton []']
    assert lines[3].startswith('auto [') and "TIMM_CONVMIXER_BACKEND=\\'cuda-magic\\' is not one of" in lines[3]


@pytest.fixture
def materialized(monkeypatch):
    """The shapes of the carried block outputs written out (:func:`fast.cpu.materialize` calls) in this test."""
    if cpu_kernels.load() is None:
        pytest.skip(f'the CPU kernels cannot be built here: {cpu_kernels.build_error()}')
    calls = []
    write = fast_cpu.materialize

    def counted(carried):
        calls.append(tuple(carried.a.shape))
        return write(carried)
    monkeypatch.setattr(fast_cpu, 'materialize', counted)
    return calls


def test_hybrid_blocks_hand_on_their_output_unwritten(make_model, infer, materialized):
    """A chain of ``cpu_hybrid`` blocks writes only its last output: each block's pointwise BatchNorm is applied by
    the next block's depthwise kernel as it reads its input. Same function as eager, and as the blocks one by one
    (which write every output)."""
    model = make_model(7, depth=3)
    x = torch.randn(2, 3, 36, 44)
    out, paths = infer(model, x, 'cpu_hybrid')
    assert paths == {'cpu_hybrid': 3} and materialized == [(2, 24, 9, 11)]
    ref, _ = infer(model, x, 'eager')
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), fast.use_backend('cpu_hybrid'):
        feats = model.stem(x)
        for block in model.blocks:
            feats = block(feats)
        torch.testing.assert_close(model.forward_head(feats), out, rtol=1e-6, atol=1e-6)
    assert len(materialized) == 1 + 3


def test_hooks_see_the_chain_run_block_by_block(make_model, infer, materialized):
    """A hook on one block sees that block called with its real input; a hook on the chain of blocks sees it
    called (the blocks then run one by one). Outputs stay eager's."""
    model = make_model(5, depth=3)
    x = torch.randn(1, 3, 32, 32)
    ref, _ = infer(model, x, 'eager')
    with torch.no_grad(), fast.use_backend('eager'):
        want_input = model.blocks[0](model.stem(x))
    seen = []
    handle = model.blocks[1].register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    out, paths = infer(model, x, 'cpu_hybrid')
    handle.remove()
    assert paths == {'cpu_hybrid': 3} and len(seen) == 1
    torch.testing.assert_close(seen[0], want_input, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    handle = model.blocks.register_forward_hook(lambda m, i, o: seen.append(o))
    out, paths = infer(model, x, 'cpu_hybrid')
    handle.remove()
    assert paths == {'cpu_hybrid': 3} and len(seen) == 2 and len(materialized) == 3 + 3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_chains_blocks_only_once_decided_for_hybrid(make_model, run_counted, materialized):
    """auto carries a block's output into the next only where both blocks' cases are decided and the decision is
    ``cpu_hybrid``; an undecided case runs alone first (its check needs the real input). Decisions are written
    here so that the plain stem won (the first block's case is then its NCHW output) and ``cpu_hybrid`` the race (on
    a real run that is the timing's to say)."""
    model = make_model(9, depth=3)
    x = torch.randn(1, 3, 32, 32)
    stem_key = checked.case_key(checked.STEM, stem_parts(model.stem), x, torch.float32)
    checked.decisions[stem_key] = checked.Decision('eager', 'as if slower', 2., 1., 0.)
    parts, feats = block_parts(model.blocks[0]), model.stem(x).detach()  # the first block's case: its NCHW input
    assert checked.settled(fast_cpu.PATHS, parts, feats, torch.float32) is None  # nothing decided yet
    ref, _ = run_counted(model, x, backend='eager')
    with torch.no_grad():
        first, _ = run_counted(model, x, backend='auto')
    # both cases the blocks meet: the stem's NCHW output, and a fused block's channels_last output (which the first
    # run decided only where the first block took a fused path)
    for case in (feats, feats.contiguous(memory_format=torch.channels_last)):
        for path in (*fast_cpu.PATHS, checked.RACE):
            won = 'cpu_hybrid' if path == checked.RACE else path
            checked.decisions[checked.case_key(path, parts, case, torch.float32)] = checked.Decision(
                won, 'as if faster', 1., 10., 0.)
    assert checked.settled(fast_cpu.PATHS, parts, feats, torch.float32) == 'cpu_hybrid'
    del materialized[:]
    with torch.no_grad():
        out, paths = run_counted(model, x, backend='auto')
    assert paths == {'cpu_hybrid': 3} and materialized == [(1, 24, 8, 8)]
    for got in (first, out):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_intermediates_are_each_blocks_output(make_model, infer):
    """``forward_intermediates`` calls the blocks one by one, so each intermediate is written (not carried)."""
    if cpu_kernels.load() is None:
        pytest.skip(f'the CPU kernels cannot be built here: {cpu_kernels.build_error()}')
    model = make_model(5, depth=3)
    x = torch.randn(1, 3, 32, 32)
    (_, want), _ = infer(model.forward_intermediates, x, 'eager')
    (_, got), paths = infer(model.forward_intermediates, x, 'cpu_hybrid')
    assert paths == {'cpu_hybrid': 3} and len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_blocks_swapped_or_subclassed_run_as_they_are(make_model, infer):
    """A block replaced by another module (pruned to ``nn.Identity``, say) is called, not taken apart (the chain of
    blocks raised TypeError on it), and a subclass that overrides ``forward`` computes what it says (the chain ran
    the parts and skipped its forward): neither is a plain block, so both run as modules."""
    from timm_convmixer.convmixer import MixerBlock

    class Halved(MixerBlock):
        def forward(self, x):
            return 0.5 * super().forward(x) + 0.5 * x
    model = make_model(5, depth=4)
    model.blocks[1] = nn.Identity()
    model.blocks[2].__class__ = Halved
    block = model.blocks[3]  # a forward set on the instance, as accelerate's hooks do
    block.forward = lambda x, forward=block.forward: 2 * forward(x)
    x = torch.randn(2, 3, 16, 16)
    want, _ = infer(model, x, 'eager')
    for backend in ('cpu_hybrid', 'auto'):
        got, paths = infer(model, x, backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert paths.get('eager') == 2 and sum(paths.values()) == 3, (backend, paths)


def test_a_model_made_under_inference_mode_takes_auto_under_no_grad(make_model, infer):
    """Its buffers are inference tensors, which may not be written outside inference mode: auto's check of an eval
    block writes back only what a trial can change (training-mode modules' buffers), so it no longer raises."""
    with torch.inference_mode():
        model = make_model(5)
    x = torch.randn(2, 3, 16, 16)
    checked.forget()
    got, _ = infer(model, x, 'auto')
    want, _ = infer(model, x, 'eager')
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert checked.decision_records()


def test_forward_mode_ad_gets_the_plain_modules(path, make_model, run_counted):
    """Dual tensors' tangents: the fused paths would drop them, so inside ``forward_ad.dual_level`` nothing is
    offered."""
    import torch.autograd.forward_ad as fwAD
    model = make_model(5)
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    tangents = {}
    for backend in ('eager', path):
        with torch.no_grad(), fwAD.dual_level():
            out, paths = run_counted(model, fwAD.make_dual(x, t), backend=backend)
            tangents[backend] = fwAD.unpack_dual(out).tangent
        assert paths == {'eager': 2}
    assert tangents['eager'] is not None
    torch.testing.assert_close(tangents[path], tangents['eager'], rtol=0, atol=0)


def test_output_buffers_are_kept_for_a_few_shapes_only(make_model, infer):
    """A process meeting ever new input sizes must not keep two activation-sized buffers for each of them."""
    if cpu_kernels.load() is None:
        pytest.skip(f'the CPU kernels cannot be built here: {cpu_kernels.build_error()}')
    model = make_model(5)
    for size in range(8, 8 + 4 * (fast_cpu.OUTPUT_SHAPES + 3), 4):
        x = torch.randn(1, 3, size, size)
        got, paths = infer(model, x, 'cpu_compiled')
        torch.testing.assert_close(got, infer(model, x, 'eager')[0], rtol=1e-5, atol=1e-5)
        assert paths == {'cpu_compiled': 2}
    assert len(fast_cpu._outputs) <= fast_cpu.OUTPUT_SHAPES


def test_a_thread_that_ends_leaves_no_scratch_buffer(make_model, infer):
    """The compiled path's depthwise buffer is per thread: a server starting a thread per request must not keep one
    for every thread that has ended."""
    if cpu_kernels.load() is None:
        pytest.skip(f'the CPU kernels cannot be built here: {cpu_kernels.build_error()}')
    model, x = make_model(5), torch.randn(1, 3, 16, 16)
    buffers = []

    def serve():
        infer(model, x, 'cpu_compiled')
        buffers.append(weakref.ref(fast_cpu._scratch.buf))
    worker = threading.Thread(target=serve)
    worker.start()
    worker.join()
    gc.collect()
    assert len(buffers) == 1 and buffers[0]() is None
