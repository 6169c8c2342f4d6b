"""The benchmark harness runs end to end on a tiny model and writes JSON whose numbers agree with each other and
with the model (timings themselves are not asserted)."""
import json
import statistics
from collections import Counter

import pytest
import torch

from timm_convmixer import cli
from timm_convmixer.cli import bench
from timm_convmixer.fast import checked

TINY = ['--models', 'convmixer_256_8_ks5_p2', '--model-kwargs', 'depth=2', 'dim=16', '--img-size', '16',
        '--batch-size', '2', '--iters', '2', '--warmup', '0', '--no-progress', '--device', 'cpu']


def _forward_flops(batch, dim, depth, img, patch, kernel, classes, in_chans=3):
    """Multiply-adds x 2 of the convolutions and the head (what torch's FLOP counter counts), and the stem's share."""
    tokens = (img // patch) ** 2
    stem = 2 * batch * tokens * dim * in_chans * patch * patch
    block = 2 * batch * tokens * dim * (kernel * kernel + dim)  # depthwise kxk, then pointwise 1x1
    return stem + depth * block + 2 * batch * dim * classes, stem


def _check_timings(entry, batch_size):
    """img/s and the median follow from the recorded times (rounded to the microsecond)."""
    assert entry['median_ms'] == pytest.approx(statistics.median(entry['times_ms']), abs=1e-3)
    assert entry['img_s'] == pytest.approx(batch_size * 1e3 / entry['median_ms'], rel=1e-9)


def test_cli_writes_json_and_chart(tmp_path, auto_choice, auto_paths_from_nchw):
    pytest.importorskip('matplotlib')
    out, chart = tmp_path / 'r.json', tmp_path / 'r.png'
    rc = cli.main(['bench', *TINY, '--task', 'infer', 'train', '--out', str(out), '--chart', str(chart)])
    assert rc == 0
    result = json.loads(out.read_text())
    meta = result['meta']
    for key in ('torch', 'timm', 'cpu_model', 'threads', 'device', 'memory_method'):
        assert key in meta
    assert [(c['task'], c['dtype']) for c in result['results']] == [('infer', 'fp32'), ('train', 'fp32')]
    forward, stem = _forward_flops(batch=2, dim=16, depth=2, img=16, patch=2, kernel=5, classes=10)
    # training: forward, then both gradients of every convolution and of the head, except the stem's input gradient
    step_flops = {'infer': forward, 'train': 3 * forward - stem}
    activation_bytes = 2 * 16 * 8 * 8 * 4  # one fp32 block activation at batch 2
    peaks = {}
    for case in result['results']:
        assert set(case['modes']) == {'nchw', 'channels_last'}
        assert case['best']['builtin_mode'] in case['modes']
        assert case['fraction_of_peak'] == 'unknown'  # CPU without --peak-tflops
        assert case['gflops_per_img'] == pytest.approx(step_flops[case['task']] / 2 / 1e9, rel=1e-12)
        for mode, entry in case['modes'].items():
            for impl in ('ours', 'builtin'):
                assert len(entry[impl]['times_ms']) == 2
                _check_timings(entry[impl], batch_size=2)
                # allocated during one step: at least one activation, far less than a megabyte for this model
                assert activation_bytes <= entry[impl]['peak_mem_mb'] * 2 ** 20 < 2 ** 20, entry[impl]
                peaks[case['task'], mode, impl] = entry[impl]['peak_mem_mb']
            assert entry['ratio'] == pytest.approx(entry['ours']['img_s'] / entry['builtin']['img_s'])
        best = case['best']
        assert best['ours_img_s'] == max(e['ours']['img_s'] for e in case['modes'].values())
        assert best['builtin_img_s'] == case['modes'][best['builtin_mode']]['builtin']['img_s']
    for mode in ('nchw', 'channels_last'):
        for impl in ('ours', 'builtin'):  # a training step keeps its activations for backward; inference does not
            assert peaks['train', mode, impl] > peaks['infer', mode, impl], (mode, impl, peaks)
    infer = result['results'][0]['modes']
    # auto checked the CPU paths on the first block of each case and every block took the path decided for its case;
    # the stem's path, checked too, decides the first block's case on an NCHW image
    blocks = [r for r in result['decisions'] if r['fused_path'] != checked.STEM]
    on_channels_last = auto_choice(blocks, block_mode='eval', channels_last=True)
    assert infer['nchw']['ours_block_paths'] == dict(Counter(auto_paths_from_nchw(result['decisions'])[1:]))
    assert infer['channels_last']['ours_block_paths'] == {on_channels_last: 2}
    assert infer['nchw']['max_abs_diff'] < 1e-4 and infer['channels_last']['max_abs_diff'] < 1e-4
    # training: auto timed the lean implementations against the plain modules on the stem and the first block of
    # each case and every block took its case's decision; the lean stem's and lean_cpu's outputs are channels_last,
    # so after them on an NCHW image the next block is a case of its own (torch's lean block and the plain modules
    # keep the input's layout)
    train = result['results'][1]['modes']
    stem = {cl: auto_choice(result['decisions'], fused_path=checked.STEM, block_mode='train', channels_last=cl)
            for cl in (False, True)}
    assert train['nchw']['ours_stem_paths'] == {stem[False]: 1}
    assert train['channels_last']['ours_stem_paths'] == {stem[True]: 1}
    on_channels_last = auto_choice(blocks, block_mode='train', channels_last=True)
    first = on_channels_last if stem[False] == checked.STEM else auto_choice(blocks, block_mode='train',
                                                                              channels_last=False)
    second = on_channels_last if first == 'lean_cpu' else first
    assert train['nchw']['ours_block_paths'] == dict(Counter([first, second]))
    assert train['channels_last']['ours_block_paths'] == {on_channels_last: 2}
    for entry in train.values():
        ours_mb, builtin_mb = entry['ours']['saved_mb'], entry['builtin']['saved_mb']
        if set(entry['ours_block_paths']) | set(entry['ours_stem_paths']) == {'eager'}:
            # the plain modules: the very same tensors as the built-in's
            assert ours_mb == builtin_mb > 0
        else:  # a lean block keeps fewer activations for backward than the built-in's modules (same stem and head)
            assert 0 < ours_mb < builtin_mb
    assert 'saved_mb' not in infer['nchw']['ours']
    assert chart.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_api_peak_fraction_and_validation():
    result = bench.run_benchmark(
        models=['convmixer_256_8_ks5_p2'], model_kwargs=dict(depth=1, dim=8), img_sizes=[8], batch_sizes=[1],
        modes=['nchw'], iters=1, warmup=0, peak_tflops=1.0, backend='eager', progress=False)
    case = result['results'][0]
    assert case['modes']['nchw']['ours_block_paths'] == {'eager': 1}
    assert case['peak_tflops'] == 1.0
    assert case['gflops_per_img'] == pytest.approx(
        _forward_flops(batch=1, dim=8, depth=1, img=8, patch=2, kernel=5, classes=10)[0] / 1e9, rel=1e-12)
    # achieved FLOP/s over the peak, from the JSON's own FLOPs, throughput and peak
    for impl in ('ours', 'builtin'):
        achieved = case['best'][f'{impl}_img_s'] * case['gflops_per_img'] * 1e9
        assert case['fraction_of_peak'][impl] == pytest.approx(achieved / (case['peak_tflops'] * 1e12), rel=1e-9)
    with pytest.raises(ValueError, match=r"modes: unknown \['nhwc'\]"):
        bench.run_benchmark(modes=['nhwc'], progress=False)


def test_time_interleaved_rotates_the_order():
    """One call of each runner per round, each round starting one runner later: nobody always follows the same one
    (an engine that keeps its threads spinning after it returns would slow its follower in every round)."""
    from timm_convmixer.cli.measure import time_interleaved
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in 'abc'}
    times = time_interleaved(runners, iters=4, device=torch.device('cpu'))
    assert {k: len(v) for k, v in times.items()} == {'a': 4, 'b': 4, 'c': 4}
    rounds = [calls[i:i + 3] for i in range(0, 12, 3)]
    assert rounds == [list('abc'), list('bca'), list('cab'), list('abc')]


@pytest.mark.parametrize('backend', ['eager', 'lean'])
def test_saved_for_backward_bytes_frees_the_graph(backend):
    """Counting what autograd keeps leaves nothing alive and the gradients as they were: its pack hook hands every
    tensor back as itself, so outputs saved by their own node form cycles inside autograd's graph that only a
    backward breaks (the whole forward's activations once leaked per call: an H200 ran out of memory)."""
    import weakref
    import timm
    from timm_convmixer import fast
    from timm_convmixer.cli import measure
    model = timm.create_model('convmixer_256_8_ks5_p2', dim=16, depth=2, num_classes=5).train()
    outputs = []
    model.blocks[0].register_forward_hook(lambda m, args, out: outputs.append(weakref.ref(out)))
    x = torch.randn(2, 3, 16, 16)
    with fast.use_backend(backend):
        n = measure.saved_for_backward_bytes(measure.make_loss(model, x, 'fp32'), model)
    assert n > 0 and len(outputs) == 1
    assert outputs[0]() is None
    assert all(p.grad is None for p in model.parameters())


def test_the_pair_computes_one_function_or_is_refused():
    """The built-in gets ours' pooling, head dropout and BatchNorm eps/momentum (it compared a max-pooled model with
    an average-pooled one, and other eps, as if the same); a drop-path rate, which it cannot take, is refused."""
    from timm_convmixer.cli.measure import build_pair
    kwargs = dict(dim=16, depth=2, global_pool='max', bn_eps=0.5, bn_momentum=0.3, drop_rate=0.2)
    ours, builtin = build_pair('convmixer_256_8_ks5_p2', kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), builtin.eval()(x), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    ours.train()(x)
    torch.manual_seed(0)
    builtin.train()(x)
    for a, b in zip(ours.state_dict().values(), builtin.state_dict().values()):  # running stats, same momentum
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='drop_path_rate'):
        build_pair('convmixer_256_8_ks5_p2', dict(dim=16, depth=2, drop_path_rate=0.1))
    ours, builtin = build_pair('convmixer_256_8_ks5_p2', dict(dim=16, depth=2, drop_path_rate=0.1), training=False)
    with torch.no_grad():  # inference: drop path does nothing, the same function
        torch.testing.assert_close(ours.eval()(x), builtin.eval()(x), rtol=1e-5, atol=1e-6)


def test_bad_input_fails_before_the_benchmark_runs(tmp_path, capsys):
    """An unwritable --out or a chart format matplotlib does not write is said at once, in one line, not after every
    measurement (whose results were lost); counts below 1 are usage errors."""
    blocked = tmp_path / 'file'
    blocked.write_text('')
    for extra, message in ((['--out', str(blocked / 'r.json')], 'cannot write'),
                           (['--chart', str(tmp_path / 'c.txt')], "not 'txt'"),
                           (['--out', str(tmp_path)], 'is a folder')):
        checked.forget()
        assert cli.main(['bench', *TINY, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and err.startswith('timm-convmixer bench: error:') and not checked.decisions, err
    for bad in (['--iters', '0'], ['--batch-size', '0']):
        with pytest.raises(SystemExit):
            cli.main(['bench', *TINY, *bad])


def test_cpu_peak_memory_is_the_steps_own():
    """torch.profiler's running total keeps what an earlier profiled step allocated and was freed outside a profile
    (a step's pooled buffers, given back before the next step is measured): the figure counts from where the step
    began, so it is what the step itself allocates."""
    from timm_convmixer.cli import bench
    kept = []
    bench._peak_memory(lambda: kept.append(torch.ones(2_000_000)), torch.device('cpu'))  # 8 MB, freed outside
    kept.clear()
    peak_mb = bench._peak_memory(lambda: torch.ones(250_000), torch.device('cpu'))['peak_mem_mb']  # 1e6 bytes
    assert peak_mb == pytest.approx(1e6 / 2 ** 20, rel=0.01)
