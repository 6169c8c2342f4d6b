"""What every benchmark here measures with: the same-weights model pair, interleaved timing, hardware and versions,
FLOPs (with the grouped-conv weight-gradient fix) and one training or inference step.

``bench`` (ours vs the built-in) and ``bench --engines`` (every way to run one model on this CPU) both build on it,
as does ``benchmarks/gpu_check.py``.
"""
import argparse
import copy
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..fast import cpu_kernels
from ..fast.cpu import native_bf16
from .args import positive_int
from .atomic import atomic_write_json

__all__ = ['CUDA_PEAK_TFLOPS', 'DTYPES', 'MODES', 'TASKS', 'build_pair', 'check_outputs', 'count_flops',
           'cpu_script_finish', 'cpu_script_start', 'default_peak_tflops', 'hardware', 'make_loss', 'make_step',
           'prepare', 'saved_for_backward_bytes', 'sync', 'time_interleaved', 'write_outputs']

MODES = ('nchw', 'channels_last', 'compile')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
TASKS = ('infer', 'train')

# dense bf16/fp16 matmul TFLOP/s. H200: measured with PyTorch matmuls in this workplace (vendor: 989); H100 SXM has
# the same tensor cores and clocks, so the same measured figure (an H100 PCIe is slower: pass --peak-tflops);
# the others are vendor figures. gpu_check.py measures the peak on the machine itself instead.
CUDA_PEAK_TFLOPS = {'H200': 790., 'H100': 790., 'A100': 312., 'L40S': 362., 'L4': 121., 'RTX 4090': 165.,
                    'RTX 3090': 71., 'A10': 125., 'V100': 125., 'T4': 65.}


def build_pair(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None, device: str = 'cpu',
               training: bool = True):
    """(ours, builtin): our registered model and timm's built-in ConvMixer class with the same weights and the same
    function: pooling, head dropout and BatchNorm eps/momentum follow ours; a drop-path rate, which the built-in
    cannot take, is refused rather than compared where the pair will train (``training``; in eval mode drop path
    does nothing)."""
    import timm
    import timm_convmixer  # noqa: F401  (registers our variants)
    from timm.models.convmixer import ConvMixer as BuiltinConvMixer

    ours = timm.create_model(model_name, pretrained=False, **(model_kwargs or {}))
    if training and any(b[0].drop_path.__class__ is not nn.Identity for b in ours.blocks):
        raise ValueError('model kwarg drop_path_rate: timm\'s built-in ConvMixer has no drop path, so the two '
                         'models would compute different functions; benchmark without it')
    builtin = BuiltinConvMixer(
        dim=ours.num_features, depth=len(ours.blocks), kernel_size=ours.kernel_size, patch_size=ours.patch_size,
        in_chans=ours.in_chans, num_classes=ours.num_classes, global_pool=ours.global_pool.pool_type,
        drop_rate=ours.drop_rate, act_layer=type(ours.stem[1]))
    norms = lambda m: [n for n in m.modules() if isinstance(n, nn.BatchNorm2d)]  # noqa: E731
    for mine, theirs in zip(norms(ours), norms(builtin)):
        theirs.eps, theirs.momentum = mine.eps, mine.momentum
    builtin.load_state_dict(ours.state_dict())
    return ours.to(device), builtin.to(device)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def source() -> Dict[str, Any]:
    """Which code made a result: the git commit of the checkout this package runs from (None when installed from a
    wheel or without git), whether the package's own files differed from it (result files a benchmark writes into
    the checkout do not count), and the CPU kernels' build name (a digest of their sources, flags and torch
    version), so that a committed JSON names what it measured."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.dirname(package)
    commit, changed = None, None
    try:
        git = subprocess.run(['git', '-C', root, 'rev-parse', '--show-toplevel', 'HEAD'], capture_output=True,
                             text=True, timeout=10)
        top, head = (git.stdout.split('\n') + ['', ''])[:2]
        if git.returncode == 0 and os.path.samefile(top, root):
            commit = head or None
            changed = bool(subprocess.run(['git', '-C', root, 'status', '--porcelain', '--', package],
                                          capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {'git_commit': commit, 'package_changed': changed, 'cpu_kernels': cpu_kernels.build_id()}


def hardware(device: torch.device) -> Dict[str, Any]:
    import timm
    from ..version import __version__
    cpu_model = platform.processor() or platform.machine()
    cpu_flags = []
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu_model = line.split(':', 1)[1].strip()
                elif line.startswith('flags'):
                    # the vector extensions that decide CPU speed-ups (a win on AVX-512 can be a loss on AVX2)
                    cpu_flags = sorted(f for f in line.split(':', 1)[1].split()
                                       if f.startswith(('avx', 'amx', 'fma')) or f == 'f16c')
                    break
    except OSError:
        pass
    info = {
        'torch': torch.__version__, 'timm': timm.__version__, 'timm_convmixer': __version__,
        'python': platform.python_version(), 'platform': platform.platform(), 'cpu_model': cpu_model,
        'cpu_flags': cpu_flags, 'cpu_native_bf16': native_bf16(),
        'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(), 'device': str(device),
        'cuda_device': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        'cuda_version': torch.version.cuda, 'mkldnn': torch.backends.mkldnn.is_available(), 'source': source(),
    }
    return info


def default_peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    if device.type != 'cuda' or dtype == 'fp32':
        return None  # CPU peaks vary with SKU/clocks; fp32 on GPU depends on TF32 settings: ask the user
    name = torch.cuda.get_device_name(device)
    for key, value in CUDA_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """``aten.convolution_backward``: the weight gradient and the input gradient each take as many multiply-adds as
    the forward convolution. torch's own formula (at least to 2.14) counts the weight gradient of a grouped
    convolution ``groups`` times over: for a depthwise 1536-channel layer that is 1536x, which would inflate a
    training step's FLOPs (and its fraction of peak) 26.6x for ConvMixer-1536/20 (8.1 TFLOP for 0.31)."""
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]  # the forward's output positions
    forward = 2 * x_shape[0] * _prod(spatial) * _prod(w_shape)  # w_shape already holds in_channels / groups
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def count_flops(model: nn.Module, x: torch.Tensor, task: str) -> Optional[int]:
    """FLOPs of one step on the whole batch (forward, or forward+backward for 'train')."""
    try:
        from torch.utils import flop_counter
    except ImportError:
        return None
    # formulas take shapes since torch's shape_wrapper; an older torch keeps its own formula
    fixes = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    counter = flop_counter.FlopCounterMode(
        display=False, custom_mapping=fixes if hasattr(flop_counter, 'shape_wrapper') else None)
    was_training = model.training
    model.train(task == 'train')
    try:
        with counter:
            if task == 'train':
                model(x).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _autocast(device_type: str, dtype: str):
    return (lambda: torch.autocast(device_type, dtype=DTYPES[dtype])) if dtype != 'fp32' else nullcontext


def make_loss(model: nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], Any]:
    """``() -> (output, loss)``: the forward half of a training step, as timm's train.py runs it under ``--amp``."""
    autocast = _autocast(x.device.type, dtype)
    target = torch.randint(0, max(1, getattr(model, 'num_classes', 1) or 1), (x.shape[0],), device=x.device)
    loss_fn = nn.CrossEntropyLoss()

    def forward():
        with autocast():
            out = model(x)
            loss = loss_fn(out.float(), target) if out.ndim == 2 else out.float().mean()
        return out, loss
    return forward


def prepare(model: nn.Module, x: torch.Tensor, mode: str):
    """Each mode gets its own copy: ``.to(memory_format=...)`` converts in place, and modes must not leak."""
    if mode == 'channels_last':
        return copy.deepcopy(model).to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    if mode == 'compile':
        return torch.compile(copy.deepcopy(model)), x
    return model, x


def make_step(model: nn.Module, x: torch.Tensor, task: str, dtype: str) -> Callable[[], torch.Tensor]:
    if task == 'infer':
        autocast = _autocast(x.device.type, dtype)

        def step():
            with torch.inference_mode(), autocast():
                return model(x)
    else:
        forward = make_loss(model, x, dtype)

        def step():
            model.zero_grad(set_to_none=True)
            out, loss = forward()
            loss.backward()
            return out.detach()
    return step


def saved_for_backward_bytes(forward: Callable[[], Any], model: nn.Module) -> int:
    """Bytes autograd keeps for backward after ``forward()`` (unique storages, ``model``'s parameters and buffers
    excluded: they exist whether or not anything is saved).

    Counted at the end of the forward, while the whole graph is alive, so every storage seen is distinct (none can
    have been freed and its address reused); backward's own recomputations are not counted.
    """
    exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t  # itself: what autograd would keep (an alias would change which tensors stay alive)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    total = sum(seen.values())
    _release_graph(result, model)
    return total


def _release_graph(result: Any, model: nn.Module) -> None:
    """Free the graph of a forward run under a pack hook that returns its tensor as itself.

    An output saved by the node that made it, handed back to autograd with its ``grad_fn``, forms a reference cycle
    inside autograd's C++ graph that neither ``del`` nor Python's collector frees: the whole forward's activations
    leaked per call (~24 GB at batch 64 on convmixer_1536_20; an H200 ran out of memory). A backward releases every
    saved tensor; the parameters' gradients are put back as they were.
    """
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    losses = [t for t in outputs if torch.is_tensor(t) and t.requires_grad and t.numel() == 1]
    if not losses:
        return
    before = [(p, p.grad) for p in model.parameters()]
    losses[-1].backward()
    for p, grad in before:
        p.grad = grad


def time_interleaved(
        runners: Dict[Any, Callable[[], Any]], iters: int, device: torch.device, progress: Any = None,
        deadline: Optional[float] = None, min_iters: int = 3) -> Dict[Any, List[float]]:
    """Seconds per call of each runner, timed interleaved (one call of each per round, in turn).

    Each round starts one runner later than the last, so no runner always follows the same one: an engine whose
    threads keep spinning after it returns (onnxruntime's default) slows whichever runs next, and a fixed order
    would charge that to one runner every round.

    CUDA: CUDA events around each call (the GPU's time for it); elsewhere ``time.perf_counter`` after a
    synchronize. ``deadline`` (a ``time.perf_counter()`` value): stop after the round in which it passes, once every
    runner has ``min_iters`` samples.
    """
    times: Dict[Any, List[float]] = {key: [] for key in runners}
    order = list(runners.items())
    for i in range(iters):
        shift = i % len(order) if order else 0
        for key, run in order[shift:] + order[:shift]:
            if device.type == 'cuda':
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times[key].append(start.elapsed_time(end) / 1e3)
            else:
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                times[key].append(time.perf_counter() - t0)
            if progress is not None:
                progress.update(1)
        if deadline is not None and i + 1 >= min_iters and time.perf_counter() > deadline:
            break
    return times


def check_outputs(out: Optional[str], chart: Optional[str]) -> None:
    """Fail before a benchmark runs, not after, where ``--out`` or ``--chart`` could not be written: a folder that
    cannot be made or written, or a chart format matplotlib does not write."""
    for path in (p for p in (out, chart) if p):
        if os.path.isdir(path):
            raise OSError(f'{path} is a folder; name a file')
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise OSError(f'{path}: cannot write in {folder}')
    if chart:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return  # (write_outputs says so; the JSON is still written)
        suffix = os.path.splitext(chart)[1].lstrip('.').lower()
        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            raise ValueError(f'--chart {chart}: matplotlib writes {", ".join(sorted(formats))}, not {suffix!r}')


def write_outputs(result: Dict[str, Any], out: Optional[str], chart: Optional[str],
                  draw: Callable[[Dict[str, Any], str], None]) -> None:
    """Write a benchmark's JSON to ``out`` and its chart to ``chart`` (each when given, atomically); a missing
    matplotlib costs the chart only."""
    if out:
        atomic_write_json(out, result)
        print(f'wrote {out}')
    if chart:
        try:
            draw(result, chart)
            print(f'wrote {chart}')
        except ImportError:
            print('matplotlib not installed: no chart (pip install timm-convmixer[plot])')


def cpu_script_start(doc: str, models: Sequence[str], rounds: int, unit: str, argv: Optional[List[str]] = None,
                     extra: Optional[Callable[[argparse.ArgumentParser], None]] = None
                     ) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """The command line and JSON skeleton the CPU scripts in ``benchmarks/`` share (``cpu_paths``, ``cpu_pointwise``,
    ``cpu_depthwise``, ``cpu_stem``): ``--rounds`` (default ``rounds``), ``--models`` (of ``models``), ``--out`` and
    what ``extra`` adds; our CPU kernels built (or a clear error); this CPU's model and flags printed first, since a
    speed-up on one CPU can be a slow-down on another. Returns the arguments and the document, its ``results`` empty."""
    parser = argparse.ArgumentParser(description=doc.split('\n\n')[0])
    parser.add_argument('--rounds', type=positive_int, default=rounds)
    parser.add_argument('--models', nargs='+', default=list(models), choices=list(models))
    parser.add_argument('--out', help='write the results as JSON here')
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    cpu_kernels.build()
    result = {'command': ' '.join(['python', *sys.argv]), 'hardware': hardware(torch.device('cpu')),
              'rounds': args.rounds, 'results': {}}
    print(f"{result['hardware']['cpu_model']} ({' '.join(result['hardware']['cpu_flags'])}), "
          f"{torch.get_num_threads()} threads; {unit} (median of {args.rounds} interleaved rounds)")
    return args, result


def cpu_script_finish(result: Dict[str, Any], out: Optional[str]) -> None:
    """Write a CPU script's document where ``--out`` says (atomically), and say so."""
    if out:
        atomic_write_json(out, result)
        print('wrote', out)
