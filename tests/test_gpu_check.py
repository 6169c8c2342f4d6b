"""benchmarks/gpu_check.py, the one-command GPU evidence, run in its CPU smoke mode.

No GPU here: ``--cpu-smoke`` runs every section's code on the CPU at tiny sizes (Triton through its interpreter), and
these tests check that the JSON it writes has every section, with numbers that agree with each other: errors obey
the triangle inequality, ratios are the quotients of the img/s beside them, the targets are recomputed from the
throughput section, the dispatch decisions match the paths the blocks took. No timing is asserted.
"""
import importlib.util
import json
import math
import os
import statistics

import pytest
import torch

import timm

from helpers import auto_choice, run_python
from timm_convmixer.fast import checked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'gpu_check.py')
MODEL = 'convmixer_1536_20'
# one model (the targets' one), 2x2 feature maps: the interpreter costs ~0.1 s per kernel program
SMOKE = ['--cpu-smoke', '--models', MODEL, '--img-size', '14']


def _load_script():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, tmp_path, timeout=600):
    pythonpath = REPO + os.pathsep + os.environ.get('PYTHONPATH', '')  # this checkout's timm_convmixer
    return run_python(SCRIPT, *args, unset=('TIMM_TRAIN_PY', 'TRITON_INTERPRET'), env={'PYTHONPATH': pythonpath},
                      cwd=tmp_path, timeout=timeout, check=False)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    pytest.importorskip('triton', reason='the smoke mode runs the Triton kernels through the interpreter')
    tmp = tmp_path_factory.mktemp('gpu_check')
    out = tmp / 'smoke.json'
    proc = _run([*SMOKE, '--out', str(out)], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def _close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def test_smoke_env_and_status(smoke):
    import triton
    doc, stdout = smoke
    assert doc['kind'].startswith('cpu-smoke') and doc['complete'] and not doc['skipped']
    assert doc['errors'] == {} and doc['failures'] == []
    env = doc['env']
    assert (env['torch'], env['timm'], env['triton']) == (torch.__version__, timm.__version__, triton.__version__)
    assert env['device'] == 'cpu' and env['gpu'] is None
    assert doc['args']['model_kwargs'] == {'dim': 16, 'depth': 2, 'kernel_size': 3}
    peak = doc['peak']
    assert peak['bf16_tflops'] == max(peak['tflops_by_size'].values()) > 0
    assert MODEL in stdout and 'target' in stdout


def _check_compare(result, floor):
    """One compare() result: the rule applied as stated, and errors consistent with each other."""
    assert result['floor'] == floor
    for name, t in result['tensors'].items():
        assert t['finite'], name
        # all three are norms relative to the same reference norm: the triangle inequality must hold
        assert abs(t['fused_err'] - t['eager_err']) <= t['fused_vs_eager'] * (1 + 1e-9) + 1e-12, name
        assert t['fused_vs_eager'] <= (t['fused_err'] + t['eager_err']) * (1 + 1e-9) + 1e-12, name
        assert _close(t['limit'], max(floor, 2 * t['eager_err']))
        assert t['ok'] == (t['fused_err'] <= t['limit'])
    assert result['ok'] == all(t['ok'] for t in result['tensors'].values())


def test_smoke_correctness(smoke):
    doc, _ = smoke
    sec = doc['correctness']
    assert sec['ok'] is True
    assert [(c['model'], c['dtype']) for c in sec['cases']] == [(MODEL, d) for d in ('fp32', 'bf16', 'fp16')]
    n_params = 8  # conv_dw, bn_dw, conv_pw, bn_pw: weight and bias each
    for case in sec['cases']:
        dtype = getattr(torch, {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}[case['dtype']])
        floor = checked.tolerance(dtype, 'cpu')
        assert case['shape'] == [1, 16, 2, 2] and case['kernel_size'] == 3 and case['act'] == 'GELU'
        units = case['units']
        assert set(units) == {'dw_block', 'act_affine', 'pw_block', 'block_eval_channels_last', 'block_eval_nchw',
                              'block_eval_gemm_channels_last', 'block_eval_gemm_nchw',
                              'block_train_lean_channels_last', 'block_train_lean_nchw',
                              'block_train_lean_triton_channels_last', 'block_train_lean_triton_nchw'}
        assert set(units['dw_block']['tensors']) == set(units['pw_block']['tensors']) == {
            'out', 'x', 'weight', 'bias', 'scale', 'shift'}
        assert set(units['act_affine']['tensors']) == {'out', 'p', 'scale', 'shift'}
        for name, unit in units.items():
            _check_compare(unit, floor)
            if name.startswith('block_'):
                grads = [t for t in unit['tensors'] if t.endswith('.grad')]
                stats = [t for t in unit['tensors'] if 'running' in t]
                assert len(grads) == n_params and {'out', 'x'} <= set(unit['tensors'])
                # training mode also compares both BatchNorms' running statistics after the step
                assert len(stats) == (4 if 'train' in name else 0)
        out_err = units['block_eval_channels_last']['tensors']['out']['eager_err']
        if case['dtype'] == 'fp32':
            assert out_err < 1e-5
        else:  # the eager side really computed in the half dtype: its rounding shows against float64
            assert 1e-5 < out_err < 0.1


def test_smoke_kernels(smoke):
    doc, _ = smoke
    k = doc['kernels']['models'][MODEL]
    assert k['shape'] == [1, 16, 2, 2] and k['act'] == 'gelu'
    impls = {'dw': ('fused', 'eager'), 'pw': ('fused', 'cublas_act_affine', 'eager'), 'act_affine': ('fused', 'eager')}
    names = {f'{op}_{impl}' for op, these in impls.items() for impl in these}
    for pass_, ms in k['median_ms'].items():
        assert set(ms) == names and all(v > 0 for v in ms.values())
        speedups = k['speedup_vs_eager'][pass_]
        assert set(speedups) == {n for n in names if not n.endswith('_eager')}
        for name, speedup in speedups.items():
            op = next(op for op in impls if name.startswith(op + '_') and name[len(op) + 1:] in impls[op])
            assert _close(speedup, ms[f'{op}_eager'] / ms[name])
    assert set(k['median_ms']) == {'fwd', 'fwd_bwd'}
    assert k['dw_fwd_floor_bytes'] == 2 * 1 * 16 * 2 * 2 * 2  # read and write one bf16 activation
    assert _close(k['dw_fused_fwd_gbps'], k['dw_fwd_floor_bytes'] / k['median_ms']['fwd']['dw_fused'] / 1e6)


def test_smoke_host_overhead(smoke):
    """The host section times ours and the built-in per step, and their issue time; CUDA graphs need a GPU, so on
    the CPU there is no graph time and no host-bound share (never a made-up one)."""
    doc, stdout = smoke
    h = doc['host']
    assert (h['task'], h['layout'], h['dtype']) == ('infer', 'channels_last', 'bf16')
    entry = h['models'][MODEL]
    assert set(entry) == {'ours', 'builtin'}
    for r in entry.values():
        assert r['event_ms'] > 0 and r['issue_ms'] > 0 and 'graph_ms' not in r and 'host_bound_share' not in r
    assert sum(entry['ours']['block_paths'].values()) == 2  # one counted step of the smoke model's two blocks
    assert f'{MODEL} infer ms step/issue/graph: ours' in stdout


def test_smoke_parity(smoke):
    doc, _ = smoke
    sec = doc['parity']
    assert sec['ok'] is True and sec['model'] == MODEL and sec['steps'] == 2
    n_params = len(list(timm.create_model(MODEL, dim=16, depth=2, kernel_size=3).parameters()))
    assert set(sec['backends']) == {'lean', 'lean_triton'}
    entries = [(backend, e) for backend, b in sec['backends'].items() for e in b['dtypes'].values()]
    assert len(entries) == 2 * 2  # fp32, bf16
    for backend, entry in entries:
        assert entry['block_paths'] == {backend: 2 * 2}  # 2 blocks x 2 steps, all through that lean block
        assert entry['lean_ran_every_block'] and entry['steps_tracked_equal']
        assert entry['grad']['tensors'] == entry['update']['tensors'] == n_params
        assert entry['buffer']['tensors'] == 2 * (1 + 2 * 2)  # mean and var of the stem's and each block's 2 BNs
        losses = entry['losses']
        assert len(losses['ours']) == len(losses['builtin']) == len(losses['float64']) == 2
        for ours, builtin, ref in zip(losses['ours'], losses['builtin'], losses['float64']):
            assert math.isfinite(ours) and abs(ours - ref) <= 0.05 * abs(ref)
            assert abs(builtin - ref) <= 0.05 * abs(ref)
        assert entry['loss']['limit'] >= checked.tolerance(torch.float32, 'cpu')
    assert all(set(b['dtypes']) == {'fp32', 'bf16'} for b in sec['backends'].values())


def test_smoke_throughput_decisions_and_forced(smoke):
    doc, _ = smoke
    tasks = doc['throughput'][MODEL]
    assert set(tasks) == {'infer', 'train'}
    iters, depth, peak = doc['args']['iters'], 2, doc['peak']['bf16_tflops']
    for task, e in tasks.items():
        assert set(e['modes']) == {'nchw', 'channels_last'} and e['missing_modes'] == []
        for mode, m in e['modes'].items():
            for impl in ('ours', 'builtin'):
                r = m[impl]
                assert len(r['times_ms']) == iters
                assert _close(r['median_ms'], statistics.median(r['times_ms']), 1e-3)
                assert _close(r['img_s'], 1e3 / r['median_ms'], 1e-9)  # batch 1
            assert _close(m['ratio'], m['ours']['img_s'] / m['builtin']['img_s'])
            assert sum(m['ours_block_paths'].values()) == depth
            if task == 'train':
                _check_saved(m, depth)
            else:
                assert 'saved_mb' not in m['ours'] and m['max_abs_diff'] < 0.1
        s = e['summary']
        assert s['best']['ours_mode'] == max(e['modes'], key=lambda k: e['modes'][k]['ours']['img_s'])
        assert s['best']['builtin_mode'] == max(e['modes'], key=lambda k: e['modes'][k]['builtin']['img_s'])
        assert _close(s['best']['ratio'], s['best']['ours_img_s'] / s['best']['builtin_img_s'])
        assert _close(s['gflops_per_img'] * 1e9, e['flops_per_img'])
        assert _close(s['fraction_of_peak']['ours'], s['best']['ours_img_s'] * e['flops_per_img'] / (peak * 1e12))
    # a training step costs about three forwards (forward, and two GEMMs per conv in backward)
    assert 2.5 < tasks['train']['flops_per_img'] / tasks['infer']['flops_per_img'] < 3.5

    # auto checked each fused path once per case (task, layout), and the blocks then took the path it decided
    decisions = [d for d in doc['decisions'] if d['model'] == MODEL]
    races = [d for d in decisions if d['fused_path'] == checked.RACE]
    decisions = [d for d in decisions if d not in races]
    assert sorted((d['task'], d['fused_path'], d['channels_last']) for d in decisions) == [
        ('infer', 'triton', False), ('infer', 'triton', True), ('infer', 'triton_gemm', False),
        ('infer', 'triton_gemm', True), ('train', 'lean', False), ('train', 'lean', True),
        ('train', 'lean_triton', False), ('train', 'lean_triton', True)]
    for d in decisions:
        assert d['block_mode'] == {'infer': 'eval', 'train': 'train'}[d['task']]
        assert d['shape'] == [1, 16, 2, 2] and d['kernel_size'] == 3 and d['compute_dtype'] == 'bfloat16'
        # bf16 autocast: judged against the plain modules in fp32, within max(tolerance, 2 x their own error)
        assert d['limit'] >= checked.tolerance(torch.bfloat16, 'cpu') and d['max_rel_err'] <= d['limit']
        assert d['path'] == (d['fused_path'] if checked.wins(d['fused_ms'], d['eager_ms']) else 'eager')
    for task in ('infer', 'train'):
        for channels_last, mode in ((False, 'nchw'), (True, 'channels_last')):
            # the blocks took the fused path the check accepted for their case (where several, the race's
            # winner), else the plain modules
            taken = auto_choice(decisions + races, task=task, channels_last=channels_last)
            assert tasks[task]['modes'][mode]['ours_block_paths'] == {taken: depth}

    # the forced paths ran wherever auto had not already taken them
    forced = doc['forced'][MODEL]
    for task, backend in (('infer', 'triton'), ('infer', 'triton_gemm'), ('train', 'lean'), ('train', 'lean_triton')):
        f = forced[task][backend]
        assert f['backend'] == backend
        for mode in ('nchw', 'channels_last'):
            auto_paths = tasks[task]['modes'][mode]['ours_block_paths']
            assert (mode in f['same_as_auto']) == (auto_paths == {backend: depth}) != (mode in f['modes'])
            if mode in f['modes']:
                m = f['modes'][mode]
                assert m['ours_block_paths'] == {backend: depth}
                if task == 'train':
                    _check_saved(m, depth)
                else:
                    assert m['max_abs_diff'] < 0.1
    assert 'skipped' in doc['train_py'] and '--train-py' in doc['train_py']['skipped']


def _check_saved(entry, depth):
    """What autograd keeps: less than the built-in's through lean blocks, the very same through the plain modules."""
    ours, builtin = entry['ours']['saved_mb'], entry['builtin']['saved_mb']
    if entry['ours_block_paths'] in ({'lean': depth}, {'lean_triton': depth}):
        assert 0 < ours < builtin
    else:
        assert entry['ours_block_paths'] == {'eager': depth} and ours == builtin > 0


def test_smoke_targets_recomputed(smoke):
    doc, _ = smoke
    t = doc['targets']
    assert t['applies'] == {'gpu_is_h100_or_h200': False, 'bf16_224px': False, 'builtin_modes_asked': False}
    checks = {c['name']: c for c in t['checks']}
    assert set(checks) == {'train_vs_builtin_best', 'infer_vs_builtin_best', 'infer_fraction_of_bf16_peak',
                           'train_memory_saved_mb_ratio', 'train_memory_step_mem_mb_ratio',
                           'every_mode_at_least_builtin'}
    tasks = doc['throughput'][MODEL]
    for task in ('train', 'infer'):
        assert _close(checks[f'{task}_vs_builtin_best']['value'], tasks[task]['summary']['best']['ratio'])
    assert _close(checks['infer_fraction_of_bf16_peak']['value'], tasks['infer']['summary']['fraction_of_peak']['ours'])
    mem = checks['train_memory_saved_mb_ratio']
    modes = tasks['train']['modes']
    assert mem['ours']['mode'] == tasks['train']['summary']['best']['ours_mode']  # no compile: measured everywhere
    assert mem['builtin']['saved_mb'] == min(m['builtin']['saved_mb'] for m in modes.values())
    assert _close(mem['value'], modes[mem['ours']['mode']]['ours']['saved_mb'] / mem['builtin']['saved_mb'])
    assert checks['train_memory_step_mem_mb_ratio']['value'] is None  # a CUDA-only number: not measured, no guess
    every = checks['every_mode_at_least_builtin']
    ratios = {f'{task}/{mode}': m['ratio'] for task in tasks for mode, m in tasks[task]['modes'].items()}
    assert every['ratios'] == pytest.approx(ratios) and _close(every['value'], min(ratios.values()))
    for c in checks.values():
        op, required = c['required'].split()
        if c['value'] is None:
            assert c['pass'] is None
        else:
            assert c['pass'] == (c['value'] >= float(required) if op == '>=' else c['value'] <= float(required))
    main = [c for c in checks.values() if not c['informational']]
    assert {c['name'] for c in main} == set(checks) - {'train_memory_step_mem_mb_ratio'}
    assert t['all_measured'] is True and t['all_pass'] == all(c['pass'] for c in main)


def test_no_cuda_exit_status_and_budget_skips(tmp_path, monkeypatch, capsys):
    gc = _load_script()
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present')
    assert gc.main(['--out', str(tmp_path / 'none.json')]) == 2
    assert 'no CUDA device' in capsys.readouterr().err and not (tmp_path / 'none.json').exists()
    # a budget too small for anything: every section is skipped with its reason, and the JSON is still written
    monkeypatch.setenv('TRITON_INTERPRET', '0')  # the smoke mode sets it; restored after the test
    out = tmp_path / 'partial.json'
    assert gc.main([*SMOKE, '--budget-s', '0', '--out', str(out)]) == 0
    doc = json.loads(out.read_text())
    assert not doc['complete'] and f'correctness/{MODEL}' in doc['skipped'] and 'parity' in doc['skipped']
    assert all('time budget' in reason for reason in doc['skipped'].values())
    # peak, correctness, parity, kernels, host, 2 x (eager, forced), train_py
    assert len(doc['skipped']) == 5 + 2 * 2 + 1 and f'host/{MODEL}' in doc['skipped']
    assert doc['targets']['all_measured'] is False and doc['errors'] == {}


def test_skip_and_compile_tasks(tmp_path, monkeypatch):
    """``--skip`` leaves sections out (and says so), ``--compile-tasks`` picks the tasks timed under torch.compile."""
    gc = _load_script()
    monkeypatch.setenv('TRITON_INTERPRET', '0')  # the smoke mode sets it; restored after the test
    out = tmp_path / 'skip.json'
    assert gc.main([*SMOKE, '--modes', 'channels_last', 'compile', '--compile-tasks', 'infer', '--skip', 'forced',
                    'host', '--budget-s', '0', '--out', str(out)]) == 0
    skipped = json.loads(out.read_text())['skipped']
    assert skipped[f'forced/{MODEL}/infer'] == skipped[f'host/{MODEL}'] == 'left out (--skip)'
    assert 'time budget' in skipped[f'correctness/{MODEL}'] and 'time budget' in skipped['parity']
    assert f'throughput/{MODEL}/infer/compile' in skipped and f'throughput/{MODEL}/train/compile' not in skipped


def test_train_py_section(tmp_path):
    """timm's own train.py through the script's runner (only where TIMM_TRAIN_PY points to one, as in
    test_training)."""
    train_py = os.environ.get('TIMM_TRAIN_PY')
    if not train_py or not os.path.isfile(train_py):
        pytest.skip('set TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py to run timm\'s train.py')
    gc = _load_script()
    args = gc.parse_args([*SMOKE, '--train-py', train_py])
    result = gc.run_train_py(args, torch.device('cpu'), timeout_s=600)
    assert result['ok'], result.get('output_tail')
    assert result['returncode'] == 0 and len(result['train_losses']) == result['steps_expected'] == 3
    assert all(0 < v < 10 for v in result['train_losses'] + result['eval_losses'])
    assert result['summary_csv'].startswith('epoch,train_loss')
    cmd = result['command']
    assert '--amp' in cmd and cmd[cmd.index('--model') + 1] == MODEL


def test_compare_rule_and_output_name():
    gc = _load_script()
    ref = torch.randn(1000, dtype=torch.float64)
    noise = torch.randn(1000, dtype=torch.float64)
    eager = ref + 1e-3 * noise
    good = gc.compare(['t'], [ref + 1.5e-3 * noise], [eager], [ref], floor=1e-4)
    bad = gc.compare(['t'], [ref + 1e-2 * noise], [eager], [ref], floor=1e-4)
    assert good['ok'] and not bad['ok'] and bad['worst'] == 't'
    nan = gc.compare(['t'], [torch.full_like(ref, float('nan'))], [eager], [ref], floor=1.)
    assert not nan['ok'] and not nan['tensors']['t']['finite']
    assert gc.default_out_path('NVIDIA H100 80GB HBM3').endswith(
        os.path.join('benchmarks', 'results', 'gpu_check_nvidia_h100_80gb_hbm3.json'))
