"""``timm-convmixer bench --engines``: what runs this model fastest on this CPU?

A deploying user can run a ConvMixer several ways; this puts them side by side on the same weights and input:

* ``ours_nchw`` / ``ours_channels_last``: our registered model with the ``timm_convmixer.fast`` backend (``auto``:
  the fastest CPU path per case: oneDNN's, our compiled kernels, or ours and oneDNN's), NCHW or channels_last input;
  ``ours_bf16``: the same under bf16 autocast (channels_last), only where oneDNN has native bf16 kernels on this
  CPU (elsewhere bf16 is emulated, 15-20x slower, and the engine is reported as skipped with that reason);
* ``builtin_nchw`` / ``builtin_channels_last``: timm's own ``timm.models.convmixer.ConvMixer``, eager;
* ``builtin_compile``: the built-in under ``torch.compile`` with Inductor ``freezing`` (weights folded as constants,
  the setting Inductor's CPU inference guide recommends), NCHW input; ``builtin_compile_bf16``: the same under bf16
  autocast;
* ``onnxruntime`` / ``openvino``: our ONNX export (:func:`timm_convmixer.cli.export.export_onnx`, batch fixed to the
  benchmark's) run by onnxruntime's CPU execution provider (all graph optimisations) and by OpenVINO's CPU plugin
  (fp32 precision hint, latency hint), each with ``torch.get_num_threads()`` intra-op threads; ``openvino_bf16``:
  OpenVINO with the bf16 precision hint, which is OpenVINO's default on a CPU with native bf16 (what a user who sets
  no hint gets there).

The bf16 engines (``ours_bf16``, ``builtin_compile_bf16``, ``openvino_bf16``) run only where the CPU has native bf16,
and are compared with each other as well as with everything (``summary['by_dtype']``): a bf16 engine ahead of fp32
peers has only shown what bf16 buys, and a deploying user who accepts bf16 can have it from the peers too.

An engine whose package is missing is reported as ``not installed`` (never an error). All engines are timed in
ONE interleaved run (one batch of each engine in turn, repeated ``iters`` times) so that load on a shared machine
hits them alike; medians are reported, and every ratio is taken within that run. Set-up costs (export, session
creation, compilation) are reported separately and never timed with the steps.

Correctness: each engine's output against the built-in model's eager fp32 NCHW output on the same input:
``max_abs_err`` and ``max_rel_err = max_abs_err / max|reference|`` (relative to the logits' scale; element-wise
relative errors blow up on logits near zero), passing at ``max_rel_err <= TOLERANCE[dtype]``. An engine that fails
is still timed, but is never the "best peer" nor the fastest.

Speed: img/s (median), ms per batch, the ratio to the built-in's best eager layout and to the best peer (every
engine that is not ours; for ours' best also the median of its per-round ratios to that peer,
:func:`paired_speedup`), GFLOP/s (FLOPs of the forward from torch's FLOP counter on the built-in model) and the
fraction of the CPU's fp32 peak: ``--peak-gflops`` when given, else measured on the same threads by our FMA probe
(:func:`measured_peak`; an sgemm yardstick where our CPU kernels cannot be built, which reads lower than the real
peak). The peak's source is recorded with it.

Python API: :func:`run_engines` returns the result dict, :func:`save_engines_chart` draws it.
"""
import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .. import fast
from ..fast import cpu_kernels
from ..fast.cpu import native_bf16
from .atomic import atomic_write
from .measure import build_pair, count_flops, hardware, make_step, prepare, time_interleaved, write_outputs

__all__ = ['ENGINES', 'PEERS', 'TOLERANCE', 'add_arguments', 'measured_sgemm_gflops', 'paired_speedup', 'run_engines',
           'save_engines_chart', 'main']

ENGINES = ('ours_nchw', 'ours_channels_last', 'ours_bf16', 'builtin_nchw', 'builtin_channels_last',
           'builtin_compile', 'builtin_compile_bf16', 'onnxruntime', 'openvino', 'openvino_bf16')
PEERS = ('builtin_nchw', 'builtin_channels_last', 'builtin_compile', 'builtin_compile_bf16', 'onnxruntime',
         'openvino', 'openvino_bf16')
BF16 = ('ours_bf16', 'builtin_compile_bf16', 'openvino_bf16')
BUILTIN_EAGER = ('builtin_nchw', 'builtin_channels_last')
# max |engine - reference| / max |reference| allowed, per compute dtype. fp32: every engine reorders sums (oneDNN
# blocking, folded BatchNorms, Winograd-free but differently tiled convolutions), which over 20-32 blocks costs
# ~1e-6..1e-5 of the logits' scale; 1e-4 leaves room for that and still catches any real mistake (a wrong pad or
# a missed BatchNorm is O(1)). bf16: 8 mantissa bits, ~4e-3 per rounding, compounding over the blocks.
TOLERANCE = {'fp32': 1e-4, 'bf16': 5e-2}
REFERENCE = 'builtin eager fp32, NCHW'


class _Unavailable(Exception):
    """An engine that cannot run here for a reason that is not a failure (package missing, no native bf16)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise _Unavailable('not installed', f'{name} is not installed ({e}); pip install {name}') from None


def _version(name: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(name), '__version__', 'unknown')
    except ImportError:
        return None


def measured_peak() -> Dict[str, Any]:
    """The CPU's fp32 peak on the current threads, and how it was had: our FMA probe
    (:func:`timm_convmixer.fast.cpu_kernels.fma_peak_gflops`, the arithmetic ceiling itself) where our CPU kernels
    load, else the sgemm yardstick (which read 50-90% of the probe on a 2-core AVX-512 VM)."""
    threads = torch.get_num_threads()
    if cpu_kernels.load() is not None:
        return {'gflops': cpu_kernels.fma_peak_gflops(),
                'method': f'measured fp32 FMA peak (independent vector FMAs from registers, best of 12, {threads} '
                          'threads)'}
    return {'gflops': measured_sgemm_gflops(),
            'method': f'measured sgemm peak (torch.mm fp32 2048x2048, best of 5, {threads} threads; reads low under '
                      'load; our CPU kernels, whose FMA probe reads the real peak, are unavailable here)'}


def measured_sgemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GFLOP/s of ``torch.mm`` on two ``n x n`` matrices (current thread count): a practical ceiling for
    fp32 FMA throughput on this CPU. On a loaded machine it reads low, so fractions of it read high."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


class _Engine:
    """One way of running the model: ``run()`` returns its output (tensor or array) for the shared input."""

    def __init__(self, name: str, description: str, dtype: str = 'fp32', peer: bool = True):
        self.name, self.description, self.dtype, self.peer = name, description, dtype, peer
        self.run: Optional[Callable[[], Any]] = None
        self.setup_s: Dict[str, float] = {}
        self.info: Dict[str, Any] = {}


def _ours(name: str, model: nn.Module, x: torch.Tensor, layout: str, dtype: str, backend: str) -> _Engine:
    engine = _Engine(name, f'timm_convmixer (fast backend {backend!r}), {layout} input' +
                     (', bf16 autocast' if dtype == 'bf16' else ''), dtype, peer=False)
    model, x = prepare(model, x, layout)
    step = make_step(model, x, 'infer', dtype)

    def run():
        with fast.use_backend(backend):
            return step()
    engine.run = run
    engine.info['backend'] = backend
    return engine


def _builtin_eager(name: str, model: nn.Module, x: torch.Tensor, layout: str) -> _Engine:
    engine = _Engine(name, f'timm built-in ConvMixer, eager, {layout} input')
    engine.run = make_step(*prepare(model, x, layout), 'infer', 'fp32')
    return engine


def _builtin_compile(name: str, model: nn.Module, x: torch.Tensor, dtype: str) -> _Engine:
    engine = _Engine(name, 'timm built-in ConvMixer, torch.compile (Inductor, freezing=True), NCHW input' +
                     (', bf16 autocast' if dtype == 'bf16' else ''), dtype)
    try:
        from torch._inductor import config as inductor_config
    except ImportError as e:
        raise _Unavailable('not installed', f'torch.compile/Inductor unavailable in this torch ({e})') from None
    step = make_step(*prepare(model, x, 'compile'), 'infer', dtype)
    # freezing is read when the graph is compiled, i.e. on the first call; it is set for that call only
    with inductor_config.patch(freezing=True):
        t0 = time.perf_counter()
        step()
        engine.setup_s['compile'] = time.perf_counter() - t0
    engine.run = step
    engine.info['inductor_config'] = {'freezing': True}
    return engine


def _export(model: nn.Module, x: torch.Tensor, folder: str, cache: Dict[str, Any]) -> str:
    """Our ONNX export with the batch fixed to the benchmark's (shared by the ONNX engines, made once)."""
    if 'path' not in cache:
        _import('onnx')
        from .export import export_onnx
        path = os.path.join(folder, 'model.onnx')
        t0 = time.perf_counter()
        export_onnx(model, path, input_size=tuple(x.shape[1:]), dynamic_batch=False, batch_size=x.shape[0])
        cache['path'], cache['export_s'] = path, time.perf_counter() - t0
    return cache['path']


def _onnxruntime(model: nn.Module, x: torch.Tensor, folder: str, cache: Dict[str, Any]) -> _Engine:
    engine = _Engine('onnxruntime', 'onnxruntime on our ONNX export, CPUExecutionProvider, ORT_ENABLE_ALL')
    ort = _import('onnxruntime')
    path = _export(model, x, folder, cache)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t0 = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    engine.setup_s.update({'onnx_export': cache['export_s'], 'session': time.perf_counter() - t0})
    feed = {session.get_inputs()[0].name: x.numpy()}
    engine.run = lambda: session.run(None, feed)[0]
    engine.info.update({'intra_op_num_threads': options.intra_op_num_threads, 'providers': session.get_providers()})
    return engine


def _openvino(name: str, model: nn.Module, x: torch.Tensor, folder: str, cache: Dict[str, Any],
              dtype: str) -> _Engine:
    precision = {'fp32': 'f32', 'bf16': 'bf16'}[dtype]
    engine = _Engine(name, f'OpenVINO CPU plugin on our ONNX export, {precision} precision hint, latency hint', dtype)
    ov = _import('openvino')
    core_cls = getattr(ov, 'Core', None) or importlib.import_module('openvino.runtime').Core
    path = _export(model, x, folder, cache)
    # without a hint OpenVINO computes in bf16 on CPUs that have it natively (openvino_bf16), else in fp32
    config = {'INFERENCE_PRECISION_HINT': precision, 'PERFORMANCE_HINT': 'LATENCY',
              'INFERENCE_NUM_THREADS': torch.get_num_threads()}
    core = core_cls()
    t0 = time.perf_counter()
    compiled = core.compile_model(core.read_model(path), 'CPU', config)
    engine.setup_s.update({'onnx_export': cache['export_s'], 'compile': time.perf_counter() - t0})
    request = compiled.create_infer_request()
    x_np = x.numpy()

    def run():
        request.infer({0: x_np})
        return request.get_output_tensor(0).data.copy()
    engine.run = run
    engine.info['config'] = {k: str(v) for k, v in config.items()}
    # what the plugin computes in, which is not always the hint: without native bf16 it may fall back to f32, and the
    # engine is then an fp32 one, whatever its name (a forced bf16 run, run_engines(bf16=True), on such a CPU)
    effective = compiled.get_property('INFERENCE_PRECISION_HINT')
    effective = getattr(effective, 'get_type_name', lambda: str(effective))()
    engine.info['inference_precision'] = effective
    if effective != precision:
        engine.dtype = {'f32': 'fp32', 'bf16': 'bf16'}.get(effective, effective)
        engine.description += f' (computes in {effective} on this CPU)'
    return engine


def _as_tensor(y: Any) -> torch.Tensor:
    return y.detach().float().cpu() if isinstance(y, torch.Tensor) else torch.from_numpy(y).float()


def _correctness(y: Any, reference: torch.Tensor, dtype: str) -> Dict[str, Any]:
    y = _as_tensor(y)
    if y.shape != reference.shape:
        return {'max_abs_err': None, 'max_rel_err': None, 'rel_tol': TOLERANCE[dtype], 'pass': False,
                'error': f'output shape {tuple(y.shape)} != reference {tuple(reference.shape)}'}
    abs_err = (y - reference).abs().max().item()
    rel_err = abs_err / max(reference.abs().max().item(), 1e-12)
    return {'max_abs_err': abs_err, 'max_rel_err': rel_err, 'rel_tol': TOLERANCE[dtype],
            'pass': bool(rel_err <= TOLERANCE[dtype])}


def _build(name: str, ours: nn.Module, builtin: nn.Module, x: torch.Tensor, backend: str, folder: str,
           cache: Dict[str, Any], bf16: Optional[bool]) -> _Engine:
    if name == 'ours_nchw':
        return _ours(name, ours, x, 'nchw', 'fp32', backend)
    if name == 'ours_channels_last':
        return _ours(name, ours, x, 'channels_last', 'fp32', backend)
    dtype = 'bf16' if name in BF16 else 'fp32'
    if dtype == 'bf16':
        if bf16 is False:
            raise _Unavailable('skipped', 'bf16 not requested')
        if bf16 is None and not native_bf16():
            raise _Unavailable('skipped', 'no native bf16 on this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported() '
                                          'is False): bf16 would be emulated, 15-20x slower than fp32')
    if name == 'ours_bf16':
        return _ours(name, ours, x, 'channels_last', 'bf16', backend)
    if name in BUILTIN_EAGER:
        return _builtin_eager(name, builtin, x, name.split('_', 1)[1])
    if name.startswith('builtin_compile'):
        return _builtin_compile(name, builtin, x, dtype)
    if name == 'onnxruntime':
        return _onnxruntime(ours, x, folder, cache)
    return _openvino(name, ours, x, folder, cache, dtype)


def run_engines(
        model_name: str = 'convmixer_768_32',
        model_kwargs: Optional[Dict[str, Any]] = None,
        batch_size: int = 8,
        img_size: int = 224,
        iters: int = 10,
        warmup: int = 2,
        engines: Optional[Sequence[str]] = None,
        backend: str = 'auto',
        peak_gflops: Optional[float] = None,
        measure_peak: bool = True,
        bf16: Optional[bool] = None,
        progress: bool = True,
) -> Dict[str, Any]:
    """Time every engine (default all of :data:`ENGINES`) on one model, interleaved; returns a JSON-ready dict.

    ``bf16``: None measures the bf16 engines (:data:`BF16`) only where the CPU has native bf16; True measures them
    anyway (emulated), False never. ``peak_gflops``: the CPU's fp32 peak; without it (and with ``measure_peak``)
    :func:`measured_peak`. ``warmup``: untimed rounds before the timed ones (at least one, which also checks
    correctness).
    """
    engines = list(ENGINES if not engines else engines)
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise ValueError(f'engines: unknown {bad}, choose from {list(ENGINES)}')
    for label, value in (('batch_size', batch_size), ('img_size', img_size), ('iters', iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{label}: expected a positive integer, got {value!r}')
    if peak_gflops is not None and not peak_gflops > 0:
        raise ValueError(f'peak_gflops: expected a positive number, got {peak_gflops!r}')
    fast.check_backend(backend)
    device = torch.device('cpu')

    ours, builtin = build_pair(model_name, model_kwargs, 'cpu', training=False)
    ours.eval()
    builtin.eval()
    torch.manual_seed(0)
    x = torch.randn(batch_size, ours.in_chans, img_size, img_size)
    with torch.inference_mode():
        reference = builtin(x).float()
    flops = count_flops(builtin, x, 'infer')

    meta = hardware(device)
    meta.update({
        'model': model_name, 'model_kwargs': model_kwargs or {}, 'batch_size': batch_size, 'img_size': img_size,
        'iters': iters, 'warmup': warmup, 'backend': backend, 'reference': REFERENCE, 'tolerance_rel': TOLERANCE,
        'onnx': _version('onnx'), 'onnxruntime': _version('onnxruntime'), 'openvino': _version('openvino'),
        'loadavg_start': _loadavg(),
    })
    if peak_gflops:
        peak = {'gflops': float(peak_gflops), 'method': 'user (--peak-gflops)'}
    elif measure_peak:
        peak = measured_peak()
    else:
        peak = {'gflops': None, 'method': 'unknown'}

    out: Dict[str, Dict[str, Any]] = {}
    built: Dict[str, _Engine] = {}
    with tempfile.TemporaryDirectory(prefix='timm-convmixer-engines-') as folder:
        cache: Dict[str, Any] = {}
        for name in engines:
            try:
                built[name] = _build(name, ours, builtin, x, backend, folder, cache, bf16)
            except _Unavailable as e:
                out[name] = {'status': e.status, 'reason': e.reason}
            except Exception as e:  # an engine that breaks is a result to report, not a reason to stop the others
                out[name] = {'status': 'failed', 'reason': f'set-up failed: {type(e).__name__}: {e}'}
        for name in list(built):
            try:
                for _ in range(max(1, warmup)):
                    built[name].run()
            except Exception as e:
                out[name] = {'status': 'failed', 'reason': f'run failed: {type(e).__name__}: {e}'}
                del built[name]

        bar = _progress(len(built) * iters) if progress else None
        try:
            times = time_interleaved({n: e.run for n, e in built.items()}, iters, device, bar)
        finally:
            if bar is not None:
                bar.close()

        for name, engine in built.items():
            fast.reset_counters()
            y = engine.run()
            entry = {'status': 'measured', 'description': engine.description, 'dtype': engine.dtype,
                     'peer': engine.peer, **engine.info}
            if not engine.peer:
                entry['block_paths'] = dict(fast.counters)
                entry['stem_paths'] = dict(fast.stem_counters)
            fast.reset_counters()
            ts = times[name]
            median = statistics.median(ts)
            entry.update({
                'img_s': batch_size / median, 'median_ms': 1e3 * median,
                'times_ms': [round(1e3 * t, 3) for t in ts], 'setup_s': engine.setup_s,
                'correctness': _correctness(y, reference, engine.dtype),
            })
            gflops_s = flops / median / 1e9 if flops else None
            entry['gflops_s'] = gflops_s
            entry['fraction_of_peak'] = (gflops_s / peak['gflops'] if gflops_s and peak['gflops']
                                         and engine.dtype == 'fp32' else None)
            out[name] = entry
    for name, entry in out.items():
        entry.setdefault('description', name)
        entry.setdefault('peer', name in PEERS)
    engines_out = {name: out[name] for name in engines}
    summary = _ratios(engines_out)
    meta['loadavg_end'] = _loadavg()
    meta['peak'] = peak
    return {'meta': meta, 'gflops_per_img': flops / batch_size / 1e9 if flops else None,
            'engines': engines_out, 'summary': summary}


def paired_speedup(ours_ms: Sequence[float], peer_ms: Sequence[float]) -> float:
    """The median over rounds of ``peer / ours`` within each round (``times_ms[i]`` is round ``i`` for every engine).

    Why beside the ratio of medians: on a shared VM the speed moves by 2-3x within a run (this project's AVX-512 VM:
    one engine's five rounds from 325 to 761 ms), and an engine's median can land in a fast stretch while another's
    lands in a slow one; the engines of one round run seconds apart, in the same stretch. Neither is the truth; where
    the two disagree, the run cannot tell the engines apart."""
    return statistics.median(p / o for o, p in zip(ours_ms, peer_ms))


def _ratios(engines: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Ratios among engines that passed correctness: each engine against the built-in's best eager layout and the
    best peer computing in its dtype; ours' best against the best peer of any dtype (what is fastest here), and per
    compute dtype against the peers computing in it (``by_dtype``)."""
    ok = {n: e for n, e in engines.items() if e['status'] == 'measured' and e['correctness']['pass']}

    def best(names):
        names = [n for n in names if n in ok]
        return max(names, key=lambda n: ok[n]['img_s']) if names else None

    builtin_best = best(BUILTIN_EAGER)
    best_peer = best([n for n in ok if ok[n]['peer']])
    ours_best = best([n for n in ok if not ok[n]['peer']])
    by_dtype = {}
    for dtype in sorted({e['dtype'] for e in ok.values()}):
        ours_d = best([n for n in ok if not ok[n]['peer'] and ok[n]['dtype'] == dtype])
        peer_d = best([n for n in ok if ok[n]['peer'] and ok[n]['dtype'] == dtype])
        both = ours_d and peer_d
        by_dtype[dtype] = {
            'ours_best': ours_d, 'best_peer': peer_d,
            'ours_best_vs_best_peer': ok[ours_d]['img_s'] / ok[peer_d]['img_s'] if both else None,
            'ours_best_vs_best_peer_paired': (
                paired_speedup(ok[ours_d]['times_ms'], ok[peer_d]['times_ms']) if both else None)}
    for e in engines.values():
        if e['status'] != 'measured':
            continue
        e['vs_builtin_eager_best'] = e['img_s'] / ok[builtin_best]['img_s'] if builtin_best else None
        same = by_dtype.get(e['dtype'], {}).get('best_peer')  # (an fp32 engine against a bf16 peer says little)
        e['vs_best_peer'] = e['img_s'] / ok[same]['img_s'] if same else None
    return {
        'fastest': best(ok), 'best_peer': best_peer, 'builtin_eager_best': builtin_best, 'ours_best': ours_best,
        'ours_best_vs_best_peer': ok[ours_best]['img_s'] / ok[best_peer]['img_s'] if ours_best and best_peer else None,
        'ours_best_vs_best_peer_paired': (paired_speedup(ok[ours_best]['times_ms'], ok[best_peer]['times_ms'])
                                          if ours_best and best_peer else None),
        'ours_best_vs_builtin_eager_best': engines[ours_best]['vs_builtin_eager_best'] if ours_best else None,
        'failed_correctness': sorted(n for n, e in engines.items()
                                     if e['status'] == 'measured' and not e['correctness']['pass']),
        'by_dtype': by_dtype,
    }


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc='bench --engines', unit='step')


def save_engines_chart(result: Dict[str, Any], path: str) -> None:
    """Horizontal bars: img/s per engine (ours blue, peers grey), ratio to the best peer at the end of each bar;
    engines that did not run are listed with their status."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(result['engines'])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
    top = max([e.get('img_s', 0) for e in result['engines'].values()] + [1e-9])
    for i, name in enumerate(names):
        e = result['engines'][name]
        if e['status'] != 'measured':
            ax.text(0, i, f'  {e["status"]}', va='center', fontsize=8, color='#777777')
            continue
        color = ('#1f77b4' if not e['peer'] else '#999999') if e['correctness']['pass'] else '#d62728'
        ax.barh(i, e['img_s'], color=color)
        ratio = e.get('vs_best_peer')
        note = f'{e["img_s"]:.2f}' + (f'  ({ratio:.2f}x best {e["dtype"]} peer)' if ratio else '')
        if not e['correctness']['pass']:
            note += '  WRONG OUTPUT'
        ax.text(e['img_s'] + top * 0.01, i, note, va='center', fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.45)
    ax.set_xlabel('images / s (median of one interleaved run)')
    meta = result['meta']
    load = meta.get('loadavg_start'), meta.get('loadavg_end')
    load = f', load avg {load[0][0]:g} -> {load[1][0]:g}' if all(load) else ''
    ax.set_title(f"{meta['model']} b{meta['batch_size']} {meta['img_size']}px, {meta['cpu_model']} "
                 f"({meta['threads']} threads{load}), torch {meta['torch']}", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``bench`` gains for ``--engines`` (the rest of bench's options keep their meaning)."""
    parser.add_argument('--engines', nargs='*', default=None, choices=list(ENGINES), metavar='ENGINE',
                        help='CPU: time our model against the built-in (eager, torch.compile), onnxruntime and '
                             'OpenVINO on the same weights; optionally a subset of ' + ', '.join(ENGINES))
    parser.add_argument('--peak-gflops', type=float, default=None,
                        help='--engines: the CPU\'s fp32 peak for the fraction-of-peak column (default: measured '
                             'by our FMA probe)')


def _single(parser_defaults: Dict[str, Any], args: argparse.Namespace) -> Optional[str]:
    """The first bench option given that --engines cannot honour, as an error message (None if all fine)."""
    for name in ('models', 'batch_size', 'img_size'):
        if len(getattr(args, name)) != 1:
            return f'--{name.replace("_", "-")}: --engines takes exactly one value, got {getattr(args, name)}'
    if args.task != ['infer']:
        return f'--task {" ".join(args.task)}: --engines measures inference only'
    if args.dtype != ['fp32']:
        return '--dtype: --engines measures fp32, and bf16 engines where the CPU has native bf16'
    if args.modes != parser_defaults['modes']:
        return '--modes: --engines picks its own layouts (see --engines ENGINE ... to choose a subset)'
    if args.device != parser_defaults['device'] and torch.device(args.device).type != 'cpu':
        return f'--device {args.device}: --engines measures CPU engines only'
    return None


def main(args: argparse.Namespace, parser_defaults: Dict[str, Any]) -> int:
    """``bench --engines``: run, print a table, write ``--out`` (JSON) and ``--chart`` (PNG). Exit 1 when an engine
    that ran failed (set-up, run, or its correctness check)."""
    problem = _single(parser_defaults, args)
    if problem:
        print(f'timm-convmixer bench: error: {problem}', file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = args.peak_gflops or (args.peak_tflops * 1e3 if args.peak_tflops else None)
    result = run_engines(
        model_name=args.models[0], model_kwargs=args.model_kwargs, batch_size=args.batch_size[0],
        img_size=args.img_size[0], iters=args.iters, warmup=args.warmup, engines=args.engines or None,
        backend=args.backend, peak_gflops=peak, progress=not args.no_progress)
    result['meta']['command'] = 'timm-convmixer ' + ' '.join(getattr(args, 'argv', ['bench']))
    _print(result)
    write_outputs(result, args.out, args.chart, save_engines_chart)
    failed = [n for n, e in result['engines'].items() if e['status'] == 'failed']
    return 1 if failed or result['summary']['failed_correctness'] else 0


def _print(result: Dict[str, Any]) -> None:
    meta, summary = result['meta'], result['summary']
    print(f"{meta['model']} b{meta['batch_size']} {meta['img_size']}px on {meta['cpu_model']} ({meta['threads']} "
          f"threads, native bf16: {meta['cpu_native_bf16']}); peak {meta['peak']['gflops'] or 'unknown'} GFLOP/s "
          f"({meta['peak']['method']})")
    print(f"{'engine':22s} {'img/s':>8s} {'ms/batch':>9s} {'vs builtin':>10s} {'vs peer':>8s} {'GFLOP/s':>8s} "
          f"{'of peak':>7s} {'rel err':>9s}")
    for name, e in result['engines'].items():
        if e['status'] != 'measured':
            print(f'{name:22s} {e["status"]}: {e["reason"]}')
            continue

        def fmt(v, spec):
            return format(v, spec) if v is not None else '-'
        c = e['correctness']
        print(f"{name:22s} {e['img_s']:8.2f} {e['median_ms']:9.1f} {fmt(e['vs_builtin_eager_best'], '9.2f')}x "
              f"{fmt(e['vs_best_peer'], '7.2f')}x {fmt(e['gflops_s'], '8.1f')} "
              f"{fmt(e['fraction_of_peak'] and 100 * e['fraction_of_peak'], '6.1f')}% "
              f"{fmt(c['max_rel_err'], '9.2e')} {'ok' if c['pass'] else 'FAIL (tol %g)' % c['rel_tol']}")
    print(f"fastest: {summary['fastest']}; best peer: {summary['best_peer']}; ours best: {summary['ours_best']} = "
          f"{summary['ours_best_vs_best_peer'] and round(summary['ours_best_vs_best_peer'], 3)}x best peer, "
          f"{summary['ours_best_vs_builtin_eager_best'] and round(summary['ours_best_vs_builtin_eager_best'], 3)}x "
          'built-in eager best')
    for dtype, d in summary['by_dtype'].items():
        ratio, paired = d['ours_best_vs_best_peer'], d['ours_best_vs_best_peer_paired']
        print(f"{dtype}: ours best {d['ours_best']}, best {dtype} peer {d['best_peer']}: "
              f"{'-' if ratio is None else round(ratio, 3)}x (median of per-round ratios "
              f"{'-' if paired is None else round(paired, 3)}x)")
