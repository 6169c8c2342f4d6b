"""``bench --engines`` end to end on a tiny model: every engine is either measured (with a correctness check against
the built-in's eager fp32 output) or reported as not installed/skipped with a reason, and the JSON's ratios, FLOP
rates and summary follow from its own measurements (timings themselves are not asserted)."""
import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from timm_convmixer import cli
from timm_convmixer.cli import bench_engines
from timm_convmixer.fast import cpu_kernels
from timm_convmixer.fast.cpu import native_bf16

BATCH, IMG, DIM, DEPTH, KERNEL, PATCH, CLASSES = 2, 32, 32, 2, 5, 2, 10
TINY = ['--models', 'convmixer_256_8_ks5_p2', '--model-kwargs', f'depth={DEPTH}', f'dim={DIM}',
        '--img-size', str(IMG), '--batch-size', str(BATCH), '--iters', '3', '--warmup', '1', '--no-progress']
TINY_API = dict(model_name='convmixer_256_8_ks5_p2', model_kwargs={'depth': DEPTH, 'dim': DIM}, batch_size=BATCH,
                img_size=IMG, iters=2, warmup=1, measure_peak=False, progress=False)


def _forward_gflops_per_img():
    """2 x multiply-adds of the stem, the depthwise and pointwise convolutions and the head, per image."""
    tokens = (IMG // PATCH) ** 2
    per_img = 2 * tokens * DIM * 3 * PATCH * PATCH + DEPTH * 2 * tokens * DIM * (KERNEL * KERNEL + DIM)
    return (per_img + 2 * DIM * CLASSES) / 1e9


def _check_consistent(result):
    """Ratios are quotients of the engines' own img/s, img/s follows from the times, and the summary's choices are
    the fastest among the engines that passed their correctness check."""
    engines, summary = result['engines'], result['summary']
    passed = {n: e for n, e in engines.items() if e['status'] == 'measured' and e['correctness']['pass']}
    peers = {n: e['img_s'] for n, e in passed.items() if e['peer']}
    builtin = {n: passed[n]['img_s'] for n in bench_engines.BUILTIN_EAGER if n in passed}
    assert summary['best_peer'] == (max(peers, key=peers.get) if peers else None)
    assert summary['builtin_eager_best'] == (max(builtin, key=builtin.get) if builtin else None)
    assert summary['fastest'] == max(passed, key=lambda n: passed[n]['img_s'])
    for name, e in engines.items():
        if e['status'] != 'measured':
            assert e['status'] in ('not installed', 'skipped') and e['reason'], (name, e)
            continue
        assert e['median_ms'] == pytest.approx(statistics.median(e['times_ms']), abs=1e-3)
        assert e['img_s'] == pytest.approx(result['meta']['batch_size'] * 1e3 / e['median_ms'], rel=1e-9)
        same = summary['by_dtype'].get(e['dtype'], {}).get('best_peer')  # against the best peer of its dtype
        assert e['vs_best_peer'] == (pytest.approx(e['img_s'] / passed[same]['img_s'], rel=1e-12) if same else None)
        if builtin:
            assert e['vs_builtin_eager_best'] == pytest.approx(
                e['img_s'] / builtin[summary['builtin_eager_best']], rel=1e-12)
        c = e['correctness']
        assert c['rel_tol'] == bench_engines.TOLERANCE[e['dtype']]
        assert c['pass'] == (c['max_rel_err'] <= c['rel_tol'])
        assert e['gflops_s'] == pytest.approx(result['gflops_per_img'] * e['img_s'], rel=1e-9)
    if summary['ours_best']:
        best = engines[summary['ours_best']]
        assert summary['ours_best_vs_best_peer'] == (
            pytest.approx(best['img_s'] / peers[summary['best_peer']], rel=1e-12) if peers else None)
    assert set(summary['by_dtype']) == {e['dtype'] for e in passed.values()}
    for dtype, d in summary['by_dtype'].items():  # like against like: bf16 engines against bf16 peers
        same = {n: e['img_s'] for n, e in passed.items() if e['dtype'] == dtype}
        ours = {n: v for n, v in same.items() if not passed[n]['peer']}
        peers_d = {n: v for n, v in same.items() if passed[n]['peer']}
        assert d['ours_best'] == (max(ours, key=ours.get) if ours else None)
        assert d['best_peer'] == (max(peers_d, key=peers_d.get) if peers_d else None)
        assert d['ours_best_vs_best_peer'] == (
            pytest.approx(ours[d['ours_best']] / peers_d[d['best_peer']], rel=1e-12) if ours and peers_d else None)
        if ours and peers_d:  # the same rounds' times, peer over ours, their median
            rounds = [p / o for o, p in zip(passed[d['ours_best']]['times_ms'], passed[d['best_peer']]['times_ms'])]
            assert d['ours_best_vs_best_peer_paired'] == pytest.approx(statistics.median(rounds), rel=1e-12)


def _check_source(recorded):
    """A result names the code that made it: this checkout's commit (when it is one) and the CPU kernels' build."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(bench_engines.__file__))))
    git = subprocess.run(['git', '-C', checkout, 'rev-parse', '--show-toplevel', 'HEAD'], capture_output=True,
                         text=True)
    top, head = (git.stdout.split() + [None, None])[:2] if git.returncode == 0 else (None, None)
    if top and os.path.samefile(top, checkout):  # the package runs from a git checkout (as the README installs it)
        assert recorded['git_commit'] == head and isinstance(recorded['package_changed'], bool)
    else:
        assert recorded['git_commit'] is None
    assert recorded['cpu_kernels'] == cpu_kernels.build_id()


def test_cli_every_engine_measured_or_explained(tmp_path):
    pytest.importorskip('matplotlib')
    pytest.importorskip('onnxruntime')
    out, chart = tmp_path / 'engines.json', tmp_path / 'engines.png'
    # the CPU path forced: under auto a tiny model's path is a timing call, and the test checks it really ran
    rc = cli.main(['bench', '--engines', *TINY, '--backend', 'cpu', '--peak-gflops', '100', '--out', str(out),
                   '--chart', str(chart)])
    assert rc == 0
    result = json.loads(out.read_text())
    meta, engines = result['meta'], result['engines']
    assert list(engines) == list(bench_engines.ENGINES)
    for key in ('cpu_model', 'cpu_flags', 'cpu_native_bf16', 'torch', 'timm', 'onnxruntime', 'openvino', 'command'):
        assert key in meta
    _check_source(meta['source'])
    assert (meta['threads'], meta['batch_size'], meta['img_size']) == (torch.get_num_threads(), BATCH, IMG)
    assert meta['peak'] == {'gflops': 100., 'method': 'user (--peak-gflops)'}
    assert result['gflops_per_img'] == pytest.approx(_forward_gflops_per_img(), rel=1e-12)
    _check_consistent(result)
    assert not any(e['status'] == 'failed' for e in engines.values())

    for name in ('ours_nchw', 'ours_channels_last'):  # our model really took its CPU fast path
        assert engines[name]['block_paths'] == {'cpu': DEPTH}
    for name, e in engines.items():
        if e['status'] == 'measured' and e['dtype'] == 'fp32':
            assert e['fraction_of_peak'] == pytest.approx(e['gflops_s'] / 100., rel=1e-12)
    # the peers a CPU user would pick instead compute the built-in's function
    compiled = engines['builtin_compile']
    assert compiled['status'] == 'measured' and compiled['correctness']['pass'], compiled
    assert compiled['setup_s']['compile'] > 0 and compiled['inductor_config'] == {'freezing': True}
    ort = engines['onnxruntime']
    assert ort['status'] == 'measured' and ort['correctness']['max_rel_err'] <= bench_engines.TOLERANCE['fp32']
    assert ort['intra_op_num_threads'] == torch.get_num_threads()
    if importlib.util.find_spec('openvino') is not None:
        assert engines['openvino']['status'] == 'measured' and engines['openvino']['correctness']['pass']
    else:
        assert engines['openvino']['status'] == 'not installed' and meta['openvino'] is None
    for name in bench_engines.BF16:  # ours and the peers in bf16 (OpenVINO's default there), where it is native
        if name == 'openvino_bf16' and importlib.util.find_spec('openvino') is None:
            continue
        if native_bf16():
            assert engines[name]['status'] == 'measured' and engines[name]['correctness']['pass'], name
            assert engines[name]['dtype'] == 'bf16' and engines[name]['fraction_of_peak'] is None
        else:
            assert engines[name]['status'] == 'skipped' and 'native bf16' in engines[name]['reason']
    if native_bf16() and importlib.util.find_spec('openvino') is not None:
        assert 'bf16 precision hint' in engines['openvino_bf16']['description']
        assert engines['openvino_bf16']['config']['INFERENCE_PRECISION_HINT'] == 'bf16'
        assert engines['openvino_bf16']['inference_precision'] == 'bf16'  # what the plugin says it computes in
    if importlib.util.find_spec('openvino') is not None:
        assert engines['openvino']['inference_precision'] == 'f32'
    assert torch._inductor.config.freezing is False  # set for the compilation only, then restored
    assert chart.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_missing_packages_are_reported_not_raised(monkeypatch):
    # None in sys.modules makes ``import`` raise ImportError, exactly as for a package that is not installed
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    monkeypatch.setitem(sys.modules, 'openvino', None)
    result = bench_engines.run_engines(engines=['builtin_nchw', 'onnxruntime', 'openvino'], **TINY_API)
    engines = result['engines']
    for name in ('onnxruntime', 'openvino'):
        assert engines[name]['status'] == 'not installed' and name in engines[name]['reason']
        assert result['meta'][name] is None
    assert engines['builtin_nchw']['status'] == 'measured'
    assert engines['builtin_nchw']['correctness']['max_abs_err'] == 0  # it is the reference itself
    assert result['meta']['peak'] == {'gflops': None, 'method': 'unknown'}
    assert engines['builtin_nchw']['fraction_of_peak'] is None
    _check_consistent(result)


@pytest.mark.filterwarnings('ignore:timm_convmixer. bfloat16 autocast on a CPU without native bf16')
def test_bf16_forced_checks_against_fp32_with_bf16_tolerance():
    """Forced (the CLI only measures it on native-bf16 CPUs): bf16 autocast is compared with the fp32 reference at
    the bf16 tolerance, and no fraction of the fp32 peak is claimed for it."""
    result = bench_engines.run_engines(engines=['ours_bf16', 'builtin_channels_last'], bf16=True,
                                       peak_gflops=50., **TINY_API)
    e = result['engines']['ours_bf16']
    assert e['status'] == 'measured' and e['dtype'] == 'bf16' and e['fraction_of_peak'] is None
    assert 0 < e['correctness']['max_rel_err'] <= bench_engines.TOLERANCE['bf16']  # bf16 rounding shows, within tol
    assert result['summary']['ours_best'] == 'ours_bf16'
    _check_consistent(result)
    skipped = bench_engines.run_engines(engines=['ours_bf16', 'builtin_nchw'], bf16=False, **TINY_API)
    assert skipped['engines']['ours_bf16'] == {'status': 'skipped', 'reason': 'bf16 not requested',
                                               'description': 'ours_bf16', 'peer': False}
    assert skipped['summary']['ours_best'] is None


@pytest.mark.parametrize('extra, message', [
    (['--models', 'convmixer_768_32', 'convmixer_1536_20'], '--models: --engines takes exactly one value'),
    (['--task', 'train'], '--engines measures inference only'),
    (['--dtype', 'bf16'], '--dtype'),
    (['--modes', 'compile'], '--modes'),
    (['--device', 'meta'], '--device meta'),
])
def test_cli_rejects_options_engines_cannot_honour(extra, message, capsys):
    assert cli.main(['bench', '--engines', *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_api_validation():
    with pytest.raises(ValueError, match='engines: unknown'):
        bench_engines.run_engines(engines=['tensorrt'], **TINY_API)
    with pytest.raises(ValueError, match='batch_size'):
        bench_engines.run_engines(**{**TINY_API, 'batch_size': 0})
    with pytest.raises(ValueError, match='peak_gflops'):
        bench_engines.run_engines(peak_gflops=-1., **TINY_API)
    with pytest.raises(SystemExit):  # argparse: not one of the engines
        cli.main(['bench', '--engines', 'tensorrt', *TINY])
