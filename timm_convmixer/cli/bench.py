"""``timm-convmixer bench``: throughput and memory of this package's ConvMixer vs timm's built-in one.

Both models get identical weights (the state_dict layouts are the same), run the same input, and are timed
*interleaved* (one step of each, in turn) so that load on a shared machine hits both alike; medians are reported,
and every ratio ours/builtin is measured within the same run. The built-in model's "best" is the fastest of the
modes asked for (e.g. NCHW vs channels_last), which is the honest baseline: a user would pick it.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step (absolute, weights included). On CPU there is
no allocator high-water mark, so the peak of "Total Allocated" in torch.profiler's memory events over one step is
used: bytes allocated *during* the step through PyTorch's CPU allocator (activations, workspaces, any cache
built in that step), excluding what existed before it (weights). Our CPU paths' pooled buffers (block outputs, the
lean training block's activations) are given back first, so the step allocates them and they count. oneDNN's
internal scratchpads are not seen.
Training cases also report ``saved_mb`` on every device: the bytes autograd keeps for backward after one forward
(unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``, the model's own parameters and buffers
excluded since they exist anyway), the number a memory-lean training block lowers; not measured under compile.

Timing: on CUDA each step is bracketed by CUDA events; elsewhere by ``time.perf_counter`` after a synchronize.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the built-in model (the same function; the fused
ops of the fast path are not in its table). The fraction of the hardware ceiling needs a peak: ``--peak-tflops``,
else a small table for known CUDA devices (bf16/fp16 dense matmul), else 'unknown'.

Python API: :func:`run_benchmark` returns the result dict; :func:`save_chart` draws it.
"""
import argparse
import json
import os
import statistics
import tempfile
from contextlib import nullcontext
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .. import fast
from ..fast import checked, cpu as fast_cpu
from . import bench_engines
from .args import add_model_kwargs, nonnegative_int, positive_int
from .atomic import atomic_write
from .measure import (
    DTYPES, MODES, TASKS, build_pair, check_outputs, count_flops, default_peak_tflops, hardware, make_loss, make_step,
    prepare, saved_for_backward_bytes, sync, time_interleaved, write_outputs)

__all__ = ['add_parser', 'run', 'run_benchmark', 'save_chart', 'build_pair', 'summarize_case',
           'saved_for_backward_bytes', 'time_interleaved']

def _peak_memory(step: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        # absolute (everything alive in the process), and above what was allocated when the step began
        return {'peak_mem_mb': peak / 2 ** 20, 'step_mem_mb': (peak - before) / 2 ** 20}
    from torch.profiler import ProfilerActivity, profile
    fast_cpu.release_buffers()  # what our paths pool is memory of the step: allocated in it, so counted
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix='.json')
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get('traceEvents', [])
    finally:
        os.remove(path)
    memory = [e['args'] for e in events if e.get('name') == '[memory]' and 'args' in e]
    if not memory:
        return {'peak_mem_mb': 0.}
    # the profiler's running total carries what an earlier profiled step allocated and was freed outside a profile
    # (seen: a step's pooled buffers, given back before the next step's profile, raised it by their size): counted
    # from where this step's first allocation found it
    start = memory[0].get('Total Allocated', 0) - memory[0].get('Bytes', 0)
    return {'peak_mem_mb': max(m.get('Total Allocated', 0) - start for m in memory) / 2 ** 20}


def _bench_case(
        ours: nn.Module, builtin: nn.Module, x: torch.Tensor, task: str, dtype: str, modes: Sequence[str],
        iters: int, warmup: int, progress: Any, backend: str, deadline: Optional[float] = None) -> Dict[str, Any]:
    device = x.device
    runners, prepared = {}, {}
    for mode in modes:
        for impl, model in (('ours', ours), ('builtin', builtin)):
            m, xm = prepare(model, x, mode)
            m.train(task == 'train')
            prepared[(mode, impl)] = (m, xm)
            runners[(mode, impl)] = make_step(m, xm, task, dtype)

    def run(key):
        if key[1] == 'ours':
            with fast.use_backend(backend):
                return runners[key]()
        return runners[key]()

    out: Dict[str, Any] = {}
    n_warm = warmup + (2 if 'compile' in modes else 0)
    for _ in range(n_warm):
        for key in runners:
            run(key)
    sync(device)
    times = time_interleaved({key: (lambda key=key: run(key)) for key in runners}, iters, device, progress, deadline)
    # which path our blocks took, and output equality, outside the timed loop
    for mode in modes:
        fast.reset_counters()
        y_ours = run((mode, 'ours'))
        paths = dict(fast.counters)
        stem_paths = dict(fast.stem_counters)
        fast.reset_counters()
        y_builtin = run((mode, 'builtin'))
        fast.reset_counters()
        entry = {}
        for impl in ('ours', 'builtin'):
            ts = times[(mode, impl)]
            entry[impl] = {
                'img_s': x.shape[0] / statistics.median(ts), 'median_ms': 1e3 * statistics.median(ts),
                'times_ms': [round(1e3 * t, 3) for t in ts],
            }
            with (fast.use_backend(backend) if impl == 'ours' else nullcontext()):
                entry[impl].update(_peak_memory(runners[(mode, impl)], device))
                if task == 'train':
                    m, xm = prepared[(mode, impl)]
                    entry[impl]['saved_mb'] = None if mode == 'compile' else \
                        saved_for_backward_bytes(make_loss(m, xm, dtype), m) / 2 ** 20
        entry['ratio'] = entry['ours']['img_s'] / entry['builtin']['img_s']
        entry['ours_block_paths'] = paths
        entry['ours_stem_paths'] = stem_paths
        entry['max_abs_diff'] = (y_ours.float() - y_builtin.float()).abs().max().item() if task == 'infer' else None
        out[mode] = entry
    return out


def run_benchmark(
        models: Sequence[str] = ('convmixer_768_32',),
        batch_sizes: Sequence[int] = (8,),
        img_sizes: Sequence[int] = (224,),
        device: str = 'cpu',
        dtypes: Sequence[str] = ('fp32',),
        modes: Sequence[str] = ('nchw', 'channels_last'),
        tasks: Sequence[str] = ('infer',),
        iters: int = 10,
        warmup: int = 2,
        peak_tflops: Optional[float] = None,
        backend: str = 'auto',
        model_kwargs: Optional[Dict[str, Any]] = None,
        progress: bool = True,
) -> Dict[str, Any]:
    """Benchmark every combination; returns a JSON-serialisable dict (``meta`` + one entry per case)."""
    for name, values, allowed in (('modes', modes, MODES), ('dtypes', dtypes, DTYPES), ('tasks', tasks, TASKS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f'{name}: unknown {bad}, choose from {list(allowed)}')
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('device cuda requested but torch.cuda.is_available() is False')
    meta = hardware(dev)
    meta.update({'iters': iters, 'warmup': warmup, 'backend': backend, 'model_kwargs': model_kwargs or {},
                 'memory_method': 'torch.cuda.max_memory_allocated (absolute)' if dev.type == 'cuda' else
                 'torch.profiler memory events: peak bytes allocated during one step (weights excluded)'})
    n_cases = len(models) * len(batch_sizes) * len(img_sizes) * len(dtypes) * len(tasks)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_cases * iters * 2 * len(modes), desc='bench', unit='step')
        except ImportError:
            bar = None
    results = []
    checked.forget()  # auto decides afresh, as in a new process, and the decisions it takes are reported
    try:
        for model_name in models:
            ours, builtin = build_pair(model_name, model_kwargs, device, training='train' in tasks)
            for task in tasks:
                for dtype in dtypes:
                    for bs in batch_sizes:
                        for img in img_sizes:
                            if bar is not None:
                                bar.set_postfix_str(f'{model_name} {task} {dtype} b{bs} {img}px')
                            torch.manual_seed(0)
                            x = torch.randn(bs, ours.in_chans, img, img, device=dev)
                            flops = count_flops(builtin, x, task)
                            by_mode = _bench_case(ours, builtin, x, task, dtype, modes, iters, warmup, bar, backend)
                            peak = peak_tflops if peak_tflops else default_peak_tflops(dev, dtype)
                            results.append(summarize_case(model_name, task, dtype, bs, img, flops, by_mode, peak))
            del ours, builtin
    finally:
        if bar is not None:
            bar.close()
    return {'meta': meta, 'results': results, 'decisions': checked.decision_records()}


def summarize_case(
        model_name: str, task: str, dtype: str, batch_size: int, img_size: int, flops: Optional[int],
        by_mode: Dict[str, Any], peak_tflops: Optional[float]) -> Dict[str, Any]:
    """One result entry: the per-mode measurements, each model's best mode, their ratio and the fraction of peak.

    ``flops`` is for one step on the whole batch; ``peak_tflops`` the ceiling (None: fraction 'unknown').
    """
    best_ours = max(by_mode, key=lambda m: by_mode[m]['ours']['img_s'])
    best_builtin = max(by_mode, key=lambda m: by_mode[m]['builtin']['img_s'])
    o_ips = by_mode[best_ours]['ours']['img_s']
    b_ips = by_mode[best_builtin]['builtin']['img_s']
    per_img = flops / batch_size if flops else None
    return {
        'model': model_name, 'task': task, 'dtype': dtype, 'batch_size': batch_size, 'img_size': img_size,
        'gflops_per_img': per_img / 1e9 if per_img else None,
        'modes': by_mode,
        'best': {'ours_mode': best_ours, 'ours_img_s': o_ips, 'builtin_mode': best_builtin, 'builtin_img_s': b_ips,
                 'ratio': o_ips / b_ips},
        'peak_tflops': peak_tflops,
        'fraction_of_peak': (
            {'ours': o_ips * per_img / (peak_tflops * 1e12), 'builtin': b_ips * per_img / (peak_tflops * 1e12)}
            if peak_tflops and per_img else 'unknown'),
    }


def save_chart(result: Dict[str, Any], path: str) -> None:
    """Grouped bars: img/s of ours vs built-in per case and mode, ratio written above each pair."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels, ours, builtin, ratios = [], [], [], []
    for case in result['results']:
        for mode, entry in case['modes'].items():
            labels.append(f"{case['model'].replace('convmixer_', '')}\n{case['task']} {case['dtype']} "
                          f"b{case['batch_size']}\n{mode}")
            ours.append(entry['ours']['img_s'])
            builtin.append(entry['builtin']['img_s'])
            ratios.append(entry['ratio'])
    fig, ax = plt.subplots(figsize=(max(6., 1.3 * len(labels) + 2), 4.5))
    idx = range(len(labels))
    w = 0.38
    ax.bar([i - w / 2 for i in idx], builtin, w, label='timm built-in', color='#999999')
    ax.bar([i + w / 2 for i in idx], ours, w, label='timm-convmixer', color='#1f77b4')
    for i, r in enumerate(ratios):
        ax.text(i, max(ours[i], builtin[i]) * 1.02, f'{r:.2f}x', ha='center', va='bottom', fontsize=8)
    ax.set_xticks(list(idx))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel('images / s (median)')
    meta = result['meta']
    where = meta['cuda_device'] or f"{meta['cpu_model']}, {meta['threads']} threads"
    ax.set_title(f"ConvMixer throughput, {where}, torch {meta['torch']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.set_ylim(0, max(ours + builtin + [1e-9]) * 1.15)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


# the defaults --engines compares against to tell an option the user gave from one left alone
_DEFAULTS = {'modes': ['nchw', 'channels_last'], 'device': 'cuda' if torch.cuda.is_available() else 'cpu'}


def run(args: argparse.Namespace) -> int:
    check_outputs(args.out, args.chart)
    if args.engines is not None:
        return bench_engines.main(args, _DEFAULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(
        models=args.models, batch_sizes=args.batch_size, img_sizes=args.img_size, device=args.device,
        dtypes=args.dtype, modes=args.modes, tasks=args.task, iters=args.iters, warmup=args.warmup,
        peak_tflops=args.peak_tflops, backend=args.backend, model_kwargs=args.model_kwargs,
        progress=not args.no_progress)
    result['meta']['command'] = 'timm-convmixer ' + ' '.join(getattr(args, 'argv', ['bench']))
    for case in result['results']:
        print(f"{case['model']} {case['task']} {case['dtype']} b{case['batch_size']} {case['img_size']}px:")
        for mode, e in case['modes'].items():
            saved = ''
            if e['ours'].get('saved_mb') is not None:
                saved = f"  saved for backward {e['ours']['saved_mb']:.1f} / {e['builtin']['saved_mb']:.1f} MB"
            print(f"  {mode:14s} ours {e['ours']['img_s']:9.2f} img/s  builtin {e['builtin']['img_s']:9.2f} img/s"
                  f"  ratio {e['ratio']:.2f}  paths {e['ours_block_paths']}{saved}")
        b = case['best']
        print(f"  best: ours {b['ours_img_s']:.2f} ({b['ours_mode']}) / builtin {b['builtin_img_s']:.2f} "
              f"({b['builtin_mode']}) = {b['ratio']:.2f}x; fraction of peak: {case['fraction_of_peak']}")
    write_outputs(result, args.out, args.chart, save_chart)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'bench', help='throughput/memory of timm-convmixer vs timm\'s built-in ConvMixer',
        description=__doc__.split('\n\n')[1])
    p.add_argument('--models', nargs='+', default=['convmixer_768_32'])
    p.add_argument('--batch-size', nargs='+', type=positive_int, default=[8])
    p.add_argument('--img-size', nargs='+', type=positive_int, default=[224])
    p.add_argument('--device', default=_DEFAULTS['device'])
    p.add_argument('--dtype', nargs='+', default=['fp32'], choices=list(DTYPES),
                   help='fp32, or autocast to bf16/fp16')
    p.add_argument('--modes', nargs='+', default=_DEFAULTS['modes'], choices=list(MODES),
                   help='compile = torch.compile (slow to warm up on CPU)')
    p.add_argument('--task', nargs='+', default=['infer'], choices=list(TASKS))
    p.add_argument('--iters', type=positive_int, default=10)
    p.add_argument('--warmup', type=nonnegative_int, default=2)
    p.add_argument('--threads', type=nonnegative_int, default=0, help='torch.set_num_threads (0: leave as is)')
    p.add_argument('--peak-tflops', type=float, default=None,
                   help='hardware ceiling for the fraction-of-peak column (default: CUDA table, else unknown)')
    p.add_argument('--backend', default='auto', choices=list(fast.BACKENDS),
                   help="timm_convmixer.fast backend for our model ('lean': the memory-lean training block on "
                        "torch's kernels, 'lean_cpu': on our CPU kernels)")
    add_model_kwargs(p, help='key=value overrides, e.g. depth=4 dim=256')
    p.add_argument('--out', default=None, help='JSON output path')
    p.add_argument('--chart', default=None, help='PNG chart path (matplotlib)')
    p.add_argument('--no-progress', action='store_true')
    bench_engines.add_arguments(p)
    p.set_defaults(func=run)
    return p
