"""The benchmark harness runs end to end on a tiny model and writes valid JSON (timings are not asserted)."""
import json

import pytest

from timm_convmixer import bench, cli

TINY = ['--models', 'convmixer_256_8_ks5_p2', '--model-kwargs', 'depth=2', 'dim=16', '--img-size', '16',
        '--batch-size', '2', '--iters', '2', '--warmup', '0', '--no-progress', '--device', 'cpu']


def test_cli_writes_json_and_chart(tmp_path):
    pytest.importorskip('matplotlib')
    out, chart = tmp_path / 'r.json', tmp_path / 'r.png'
    rc = cli.main(['bench', *TINY, '--task', 'infer', 'train', '--out', str(out), '--chart', str(chart)])
    assert rc == 0
    result = json.loads(out.read_text())
    meta = result['meta']
    for key in ('torch', 'timm', 'cpu_model', 'threads', 'device', 'memory_method'):
        assert key in meta
    assert [(c['task'], c['dtype']) for c in result['results']] == [('infer', 'fp32'), ('train', 'fp32')]
    for case in result['results']:
        assert set(case['modes']) == {'nchw', 'channels_last'}
        assert case['best']['builtin_mode'] in case['modes']
        assert case['fraction_of_peak'] == 'unknown'  # CPU without --peak-tflops
        assert case['gflops_per_img'] > 0
        for entry in case['modes'].values():
            for impl in ('ours', 'builtin'):
                assert len(entry[impl]['times_ms']) == 2 and entry[impl]['img_s'] > 0
                assert entry[impl]['peak_mem_mb'] >= 0
    infer = result['results'][0]['modes']
    assert infer['nchw']['ours_block_paths'] == {'cpu': 2}  # our model really took the fast path
    assert infer['nchw']['max_abs_diff'] < 1e-4 and infer['channels_last']['max_abs_diff'] < 1e-4
    # training: auto timed the lean block against the plain modules on first use and kept one for both blocks
    assert result['results'][1]['modes']['nchw']['ours_block_paths'] in ({'eager': 2}, {'lean': 2})
    assert chart.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_api_peak_fraction_and_validation():
    result = bench.run_benchmark(
        models=['convmixer_256_8_ks5_p2'], model_kwargs=dict(depth=1, dim=8), img_sizes=[8], batch_sizes=[1],
        modes=['nchw'], iters=1, warmup=0, peak_tflops=1.0, backend='eager', progress=False)
    case = result['results'][0]
    assert case['modes']['nchw']['ours_block_paths'] == {'eager': 1}
    assert 0 < case['fraction_of_peak']['ours'] < 1
    with pytest.raises(ValueError):
        bench.run_benchmark(modes=['nhwc'], progress=False)
