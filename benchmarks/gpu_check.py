"""The project's GPU evidence in one command: correctness, training parity, speed, memory and train.py, as one JSON.

On one H100/H200 the default run is meant to finish in under 10 minutes (``--budget-s``; what does not fit is
reported as skipped, never guessed). It measures, for timm_convmixer against timm's own ``timm.models.convmixer``
classes with identical weights:

* ``correctness``: every fused op (``dw_block``, ``act_affine``), the fused eval-mode block and the memory-lean
  training-mode block, at full size (the block shapes of each model at ``--img-size``, batch ``--batch``), in
  fp32/bf16/fp16, forward and backward (input and every parameter gradient; running statistics in training mode),
  channels_last and NCHW. Each is compared, with eager PyTorch computing the same function in the same dtype, to a
  float64 reference: the fused error must be within ``max(tolerance, 2 x eager's own error)``.
* ``parity``: a few whole-model SGD steps, built-in vs ours (lean blocks forced, each implementation: ``lean`` on
  torch's kernels, ``lean_triton`` on the fused ones), loss, gradients, weight updates and BatchNorm statistics,
  each against a float64 run of the built-in, with the same rule.
* ``peak``: the bf16 tensor-core peak, measured here as the best cuBLAS bf16 matmul TFLOP/s.
* ``kernels``: the depthwise op and the pointwise epilogue alone vs their eager ops, and the depthwise op's
  bandwidth against its one-read-one-write floor.
* ``throughput``: img/s and memory (peak allocated in a step, and the bytes autograd keeps for backward) of each
  model, inference and training, bf16 autocast, in each mode (NCHW, channels_last, torch.compile), ours (backend
  ``auto`` after ``fast.checked.forget()``) vs the built-in, timed interleaved with CUDA events
  (``timm-convmixer bench``'s machinery); the fraction of the measured peak; the auto-dispatch decisions and which
  path every block took. Under torch.compile ours runs an eval block as one node dispatching at run time
  (``fast/compiled.py``: counted, so its paths show too); a training step compiles the plain modules on both sides.
  ``forced``: the same with each fused path forced (``triton`` and ``triton_gemm`` for inference, ``lean`` and
  ``lean_triton`` for training), where auto did not already take that path.
* ``host``: per model, inference in channels_last, ours and the built-in: a step's time, the host's time to issue it,
  and the same step replayed as a CUDA graph (the GPU's own time): how much of a step is Python and dispatch.
* ``train_py``: timm's ``train.py --amp`` for a few steps on a generated ImageFolder (``--train-py``).
* ``targets``: the project's targets for convmixer_1536_20, each ratio computed from the numbers above.

    python benchmarks/gpu_check.py --train-py ~/pytorch-image-models/train.py
    python benchmarks/gpu_check.py --models convmixer_1536_20 --modes nchw channels_last --budget-s 300
    python benchmarks/gpu_check.py --modes channels_last compile --compile-tasks infer --skip correctness forced host
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke.json     # no GPU: tiny sizes, Triton interpreter

Run it where ``timm_convmixer`` is installed (``pip install -e .`` in this checkout): train.py finds the variants
through the package's start-up hook. ``--cpu-smoke`` runs every section's code on the CPU at tiny sizes (the Triton
kernels through Triton's interpreter, ``TRITON_INTERPRET=1``; torch.compile left out unless ``--modes`` asks for it):
it checks the script, and its numbers say nothing about speed. The JSON is rewritten after every section, so a run
cut short keeps what it measured.

Exit status: 0 when every check passed; 1 when a correctness or parity check failed, train.py failed, or a section
raised (its error is in the JSON); 2 when there is no CUDA device (unless ``--cpu-smoke``).
"""
import argparse
import copy
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
MODELS = ('convmixer_1536_20', 'convmixer_768_32', 'convmixer_1024_20_ks9_p14')
TARGET_MODEL = 'convmixer_1536_20'
TARGET_GPUS = ('H100', 'H200')
EAGER_MODES = ('nchw', 'channels_last')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
ERROR_FACTOR = 2.  # a fused result may be at most this many times further from float64 than eager's own
# --cpu-smoke: every model keeps its activation and patch; kernel 3 because the interpreter's cost grows with k*k
SMOKE_MODEL_KWARGS = {'dim': 16, 'depth': 2, 'kernel_size': 3}
# seconds a section needs to be worth starting; a section that does not fit the time left is skipped, not cut
# the fused paths forced one by one after auto's run, per task: both Triton eval paths, the lean training block
FORCED = {'infer': ('triton', 'triton_gemm'), 'train': ('lean', 'lean_triton')}
# the lean block's two implementations of its normalisations: torch's kernels, the fused Triton ones
LEAN_BACKENDS = ('lean', 'lean_triton')
# (compile: ours and the built-in each compiled and timed; an H100 took 28-45 s for inference, 85 s for training)
NEEDS_S = {'correctness': 60., 'parity': 30., 'kernels': 15., 'eager': 30., 'forced': 20., 'compile/infer': 60.,
           'compile/train': 120., 'train_py': 60., 'host': 15.}
# sections that --skip may leave out (the throughput runs and train.py have their own switches: --modes, --train-py)
SKIPPABLE = ('correctness', 'parity', 'kernels', 'forced', 'host')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=list(MODELS), help='in priority order (the first gets compile '
                   'and train.py before the others are measured)')
    p.add_argument('--batch', type=int, default=64, help='batch size of the throughput and correctness runs')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES), help='correctness dtypes')
    p.add_argument('--bench-dtype', choices=list(DTYPES), default='bf16', help='autocast dtype of the timings')
    p.add_argument('--modes', nargs='+', choices=['nchw', 'channels_last', 'compile'], default=None,
                   help='default: all three (without compile under --cpu-smoke)')
    p.add_argument('--compile-tasks', nargs='+', choices=['infer', 'train'], default=['infer', 'train'],
                   help='the tasks timed under torch.compile when --modes has compile')
    p.add_argument('--skip', nargs='+', choices=list(SKIPPABLE), default=[],
                   help='sections to leave out (reported as skipped)')
    p.add_argument('--iters', type=int, default=10, help='timed steps per model and mode')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--parity-model', default=TARGET_MODEL)
    p.add_argument('--parity-batch', type=int, default=8)
    p.add_argument('--parity-steps', type=int, default=2)
    p.add_argument('--parity-dtypes', nargs='+', choices=list(DTYPES), default=['fp32', 'bf16'])
    p.add_argument('--train-py', default=os.environ.get('TIMM_TRAIN_PY') or None,
                   help="timm's train.py (a pytorch-image-models checkout; default $TIMM_TRAIN_PY); else skipped")
    p.add_argument('--train-py-model', default=TARGET_MODEL)
    p.add_argument('--budget-s', type=float, default=540., help='wall-clock budget: no section starts that would '
                   'not fit in what is left (compile ~60-120 s), so the run ends within about this')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/gpu_check_<gpu>.json)')
    p.add_argument('--cpu-smoke', action='store_true',
                   help='no GPU: every section on CPU at tiny sizes, Triton through its interpreter')
    args = p.parse_args(argv)
    for name in ('batch', 'img_size', 'iters', 'parity_batch', 'parity_steps'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    import timm
    import timm_convmixer  # noqa: F401  (registers the variants)
    unknown = [m for m in set(args.models + [args.parity_model, args.train_py_model]) if not timm.is_model(m)]
    if unknown:
        p.error(f'unknown model(s) {sorted(unknown)}; see timm-convmixer variants')
    args.model_kwargs = {}
    if args.cpu_smoke:
        args.model_kwargs = dict(SMOKE_MODEL_KWARGS)
        args.batch, args.img_size, args.parity_batch = min(args.batch, 1), min(args.img_size, 28), 2
        args.iters, args.warmup = min(args.iters, 2), 0  # auto's first-use check then falls in the timed steps
        if args.modes is None:
            args.modes = list(EAGER_MODES)
    if args.modes is None:
        args.modes = list(EAGER_MODES) + ['compile']
    return args


def slug(name: str) -> str:
    """A file-name-safe lower-case form of a device name ('NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3')."""
    return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_') or 'unknown'


def default_out_path(device_name: str) -> str:
    return os.path.join(RESULTS_DIR, f'gpu_check_{slug(device_name)}.json')


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to a half dtype, as ``train.py --amp`` runs; fp32/fp64 run as they are."""
    half = dtype in (torch.float16, torch.bfloat16)
    return torch.autocast(device.type, dtype=dtype if half else torch.bfloat16, enabled=half)


# ----------------------------------------------------------------------------------------------------------------
# environment and peak


def _nvidia_smi(fields: str) -> Optional[List[str]]:
    exe = shutil.which('nvidia-smi')
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f'--query-gpu={fields}', '--format=csv,noheader'], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return [v.strip() for v in lines[0].split(',')] if out.returncode == 0 and lines else None


def environment(device: torch.device) -> Dict[str, Any]:
    """Hardware and versions: ``timm-convmixer bench``'s set, plus the GPU's and triton's."""
    from timm_convmixer.cli import bench
    env = bench.hardware(device)
    try:
        import triton
        env['triton'] = triton.__version__
    except ImportError:
        env['triton'] = None
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update({
            'gpu': props.name, 'capability': list(torch.cuda.get_device_capability(device)),
            'sm_count': props.multi_processor_count, 'memory_gib': round(props.total_memory / 2 ** 30, 1),
            'cudnn': torch.backends.cudnn.version(), 'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
            'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32,
        })
        smi = _nvidia_smi('driver_version,clocks.max.sm,power.limit')
        env['driver'], env['max_sm_clock_mhz'], env['power_limit'] = smi if smi and len(smi) == 3 else (None,) * 3
    else:
        env['gpu'] = None
    return env


def measure_peak(device: torch.device, sizes: Sequence[int], iters: int = 20) -> Dict[str, Any]:
    """The bf16 tensor-core ceiling as measured: the best median TFLOP/s of square cuBLAS bf16 matmuls."""
    from timm_convmixer.cli import bench
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        run = lambda: torch.mm(a, b, out=c)  # noqa: E731
        for _ in range(3):
            run()
        ts = bench.time_interleaved({'mm': run}, iters, device)['mm']
        by_size[str(n)] = 2 * n ** 3 / statistics.median(ts) / 1e12
        del a, b, c
    best = max(by_size, key=by_size.get)
    return {
        'method': 'median time of torch.mm on square bf16 matrices, CUDA events; the best size counts',
        'tflops_by_size': by_size, 'bf16_tflops': by_size[best],
        'table_tflops': bench.default_peak_tflops(device, 'bf16'),
    }


# ----------------------------------------------------------------------------------------------------------------
# correctness: each fused unit vs eager vs float64, at full size

# eager torch for each activation the kernels compute (eligibility.ACT_NAMES)
_ACT_FNS = {'identity': lambda t: t, 'relu': F.relu, 'gelu': F.gelu, 'silu': F.silu,
            'gelu_tanh': lambda t: F.gelu(t, approximate='tanh')}
_PARAM_NAMES = {'0.fn.0': 'conv_dw', '0.fn.2': 'bn_dw', '1': 'conv_pw', '3': 'bn_pw'}


def _readable(name: str) -> str:
    module, _, leaf = name.rpartition('.')
    return f'{_PARAM_NAMES.get(module, module)}.{leaf}'


def block_config(model_name: str, model_kwargs: Dict[str, Any], img_size: int) -> Dict[str, Any]:
    """The block shape of a model at ``img_size``: dim, kernel, activation, feature map side."""
    import timm
    model = timm.create_model(model_name, **{**model_kwargs, 'depth': 1})
    return {'dim': model.num_features, 'kernel_size': model.kernel_size, 'act_layer': type(model.stem[1]),
            'hw': img_size // model.patch_size}


def _random_block(cfg: Dict[str, Any], device: torch.device, gen: torch.Generator) -> nn.Module:
    """A block with non-trivial BatchNorm statistics and affine, so folding mistakes show."""
    from timm_convmixer.convmixer import MixerBlock
    block = MixerBlock(cfg['dim'], cfg['kernel_size'], act_layer=cfg['act_layer'])
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen) * 0.2 + 1.)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return block.to(device)


def compare(names: Sequence[str], fused: Sequence[torch.Tensor], eager: Sequence[torch.Tensor],
            ref: Sequence[torch.Tensor], floor: float) -> Dict[str, Any]:
    """Norm-wise errors of ``fused`` and ``eager`` against ``ref``, all relative to ``ref``'s norm (so the three
    numbers obey the triangle inequality), and the verdict ``fused <= max(floor, ERROR_FACTOR * eager)``."""
    per, ok = {}, True
    for name, f, e, r in zip(names, fused, eager, ref):
        r = r.detach().double()
        denom = r.norm().clamp_min(1e-30)
        f, e = f.detach().double(), e.detach().double()
        entry = {
            'fused_err': ((f - r).norm() / denom).item(), 'eager_err': ((e - r).norm() / denom).item(),
            'fused_vs_eager': ((f - e).norm() / denom).item(), 'finite': bool(torch.isfinite(f).all()),
        }
        entry['limit'] = max(floor, ERROR_FACTOR * entry['eager_err'])
        entry['ok'] = entry['finite'] and entry['fused_err'] <= entry['limit']
        ok = ok and entry['ok']
        per[name] = entry
    worst = max(per, key=lambda n: per[n]['fused_err'] / per[n]['limit']) if per else None
    return {'ok': ok, 'floor': floor, 'worst': worst, 'tensors': per}


def _grads(out: torch.Tensor, wrt: Sequence[torch.Tensor], gy: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return (out,) + torch.autograd.grad(out, list(wrt), gy.to(out.dtype))


def _leaf(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def _dw_eager(x, w, b, scale, shift, act: str) -> torch.Tensor:
    """What ``dw_block`` computes, in plain torch ops (the same dtypes as the op gets)."""
    z = F.conv2d(x, w, b, padding='same', groups=x.shape[1])
    y = x + _ACT_FNS[act](z) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return y.to(x.dtype)


def _act_affine_eager(p, scale, shift, act: str) -> torch.Tensor:
    return (_ACT_FNS[act](p) * scale + shift).to(p.dtype)


def _pw_eager(x, w, b, scale, shift, act: str) -> torch.Tensor:
    """What ``pw_block`` computes: the 1x1 conv as a GEMM on NHWC rows, then the epilogue."""
    return _act_affine_eager(F.linear(x, w, b), scale, shift, act)


def check_ops(block: nn.Module, x: torch.Tensor, dtype: torch.dtype, gy: torch.Tensor, floor: float):
    """``dw_block``, ``act_affine`` and ``pw_block`` alone, forward and every input's gradient."""
    from timm_convmixer.fast import triton_kernels as K
    from timm_convmixer.fast import triton_ops
    from timm_convmixer.fast.eligibility import block_parts, bn_scale_shift
    parts = block_parts(block)
    codes = K.ACT_BY_NAME
    results = {}
    with torch.no_grad():
        s1, t1 = bn_scale_shift(parts.bn_dw, torch.float32)
        s2, t2 = bn_scale_shift(parts.bn_pw, torch.float32)
    # depthwise branch: x, weight, bias in the compute dtype, scale/shift fp32 (what triton_block_forward passes)
    names = ['out', 'x', 'weight', 'bias', 'scale', 'shift']
    leaves = [_leaf(x, dtype), _leaf(parts.conv_dw.weight, dtype), _leaf(parts.conv_dw.bias, dtype), _leaf(s1),
              _leaf(t1)]
    fused = _grads(torch.ops.timm_convmixer.dw_block(*leaves, codes[parts.act]), leaves, gy)
    eager = _grads(_dw_eager(*leaves, parts.act), leaves, gy)
    ref_leaves = [_leaf(t, torch.float64) for t in leaves]
    ref = _grads(_dw_eager(*ref_leaves, parts.act), ref_leaves, gy.to(dtype).double())
    results['dw_block'] = compare(names, fused, eager, ref, floor)
    del fused, eager, ref, leaves, ref_leaves
    # pointwise epilogue on the GEMM output [N*H*W, C]
    gen = torch.Generator(device=x.device).manual_seed(1)
    p = torch.randn(x.shape[0] * x.shape[2] * x.shape[3], x.shape[1], generator=gen, device=x.device)
    g2 = torch.randn(p.shape, generator=gen, device=x.device).to(dtype)
    names = ['out', 'p', 'scale', 'shift']
    leaves = [_leaf(p, dtype), _leaf(s2), _leaf(t2)]
    fused = _grads(torch.ops.timm_convmixer.act_affine(*leaves, codes[parts.act]), leaves, g2)
    eager = _grads(_act_affine_eager(*leaves, parts.act), leaves, g2)
    ref_leaves = [_leaf(t, torch.float64) for t in leaves]
    ref = _grads(_act_affine_eager(*ref_leaves, parts.act), ref_leaves, g2.double())
    results['act_affine'] = compare(names, fused, eager, ref, floor)
    del fused, eager, ref, leaves, ref_leaves
    # the pointwise conv and its epilogue as one Triton GEMM, on NHWC rows of the block's input
    rows = K.rows(x)
    names = ['out', 'x', 'weight', 'bias', 'scale', 'shift']
    leaves = [_leaf(rows, dtype), _leaf(parts.conv_pw.weight.reshape(x.shape[1], -1), dtype),
              _leaf(parts.conv_pw.bias, dtype), _leaf(s2), _leaf(t2)]
    fused = _grads(triton_ops.pw_block(*leaves, codes[parts.act]), leaves, g2)
    eager = _grads(_pw_eager(*leaves, parts.act), leaves, g2)
    ref_leaves = [_leaf(t, torch.float64) for t in leaves]
    ref = _grads(_pw_eager(*ref_leaves, parts.act), ref_leaves, g2.double())
    results['pw_block'] = compare(names, fused, eager, ref, floor)
    return results


def _block_step(block: nn.Module, forward: Callable[[nn.Module, torch.Tensor], Optional[torch.Tensor]],
                x: torch.Tensor, gy: torch.Tensor, dtype: torch.dtype):
    """``(names, tensors)``: the output, the gradients of the input and every parameter, and (training mode) the
    running statistics after the step; ``None`` when ``forward`` declined."""
    named = [(n, p) for n, p in block.named_parameters()]
    xl = x.detach().clone().requires_grad_()
    with _autocast(x.device, dtype):
        out = forward(block, xl)
    if out is None:
        return None
    tensors = list(_grads(out, [xl] + [p for _, p in named], gy))
    names = ['out', 'x'] + [_readable(n) + '.grad' for n, _ in named]
    if block.training:
        for n, buf in block.named_buffers():
            if buf.is_floating_point():
                names.append(_readable(n))
                tensors.append(buf.detach().clone())
    return names, tensors


def check_blocks(block: nn.Module, x: torch.Tensor, dtype: torch.dtype, gy: torch.Tensor, floor: float):
    """The fused eval-mode block (Triton, pointwise on cuBLAS and as the fused Triton GEMM) and the lean training-mode
    block (normalisations on torch's kernels and on the fused Triton ones), channels_last and NCHW input."""
    from timm_convmixer.fast.eligibility import block_parts
    from timm_convmixer.fast.lean import lean_block_forward
    from timm_convmixer.fast.lean_triton import TritonNorm
    from timm_convmixer.fast.triton_ops import triton_block_forward

    def eager(b, t):
        return nn.Sequential.forward(b, t)  # the plain modules, no fast seam

    units = {'block_eval': (False, lambda b, t: triton_block_forward(b, t)),
             'block_eval_gemm': (False, lambda b, t: triton_block_forward(b, t, pointwise='triton')),
             'block_train_lean': (True, lambda b, t: lean_block_forward(block_parts(b), t)),
             'block_train_lean_triton': (True, lambda b, t: lean_block_forward(block_parts(b), t, TritonNorm))}
    results = {}
    xd = x.to(dtype)
    for unit, (training, fused_fn) in units.items():
        base = copy.deepcopy(block).train(training)
        ref_block = copy.deepcopy(base).double()
        ref = _block_step(ref_block, eager, xd.double(), gy.to(dtype).double(), torch.float64)
        del ref_block
        for layout in ('channels_last', 'nchw'):
            xi = xd.contiguous(memory_format=torch.channels_last if layout == 'channels_last' else
                               torch.contiguous_format)
            fused = _block_step(copy.deepcopy(base), fused_fn, xi, gy, dtype)
            if fused is None:
                results[f'{unit}_{layout}'] = {'ok': False, 'error': 'the fused path declined this block'}
                continue
            names, fused_t = fused
            _, eager_t = _block_step(copy.deepcopy(base), eager, xi, gy, dtype)
            results[f'{unit}_{layout}'] = compare(names, fused_t, eager_t, ref[1], floor)
            del fused, fused_t, eager_t
    return results


def run_correctness(args, device: torch.device, out_of_time: Callable[[float], bool], model_name: str,
                    section: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """One model's cases (each dtype), appended to ``section`` (a new one when None): each model's correctness runs
    just before its throughput, so a run cut short has both for the models it reached."""
    from timm_convmixer.fast import checked
    if section is None:
        section = {
            'rule': f'fused error vs float64 <= max(tolerance(dtype), {ERROR_FACTOR} x eager error vs float64); '
                    'errors are norm-wise, relative to the reference norm',
            'input_layouts': ['channels_last', 'nchw'], 'cases': []}
    cfg = block_config(model_name, args.model_kwargs, args.img_size)
    shape = (args.batch, cfg['dim'], cfg['hw'], cfg['hw'])
    for dtype_name in args.dtypes:
        case = {'model': model_name, 'dtype': dtype_name, 'shape': list(shape), 'kernel_size': cfg['kernel_size'],
                'act': cfg['act_layer'].__name__}
        section['cases'].append(case)
        if out_of_time(NEEDS_S['correctness'] / 4):
            case['skipped'] = 'time budget'
            continue
        block = _random_block(cfg, device, torch.Generator().manual_seed(args.seed))
        gen = torch.Generator(device).manual_seed(args.seed)  # drawn where they live: 100M numbers at full size
        x = torch.randn(shape, generator=gen, device=device)
        gy = torch.randn(shape, generator=gen, device=device)
        dtype = DTYPES[dtype_name]
        floor = checked.tolerance(dtype, device.type)
        t0 = time.perf_counter()
        try:
            case['units'] = {**check_ops(block, x, dtype, gy, floor), **check_blocks(block, x, dtype, gy, floor)}
            case['ok'] = all(u['ok'] for u in case['units'].values())
        except Exception as e:  # one failing case must not hide the others
            case.update(ok=False, error=_error_text(e))
        case['seconds'] = time.perf_counter() - t0
        del block, x, gy
        _empty_cache(device)
    done = [c for c in section['cases'] if 'skipped' not in c]
    section['ok'] = all(c['ok'] for c in done) if done else None
    return section


# ----------------------------------------------------------------------------------------------------------------
# the kernels alone: where a block's time goes


def run_kernel_timing(args, device: torch.device, deadline: float) -> Dict[str, Any]:
    """Each fused op against the eager ops it replaces, at each model's block shape in the timing dtype (channels_last,
    i.e. NHWC rows), forward and forward+backward: ``dw_block`` vs the depthwise branch ``Residual(conv, act, BN)``;
    the pointwise half as ``pw_block`` (one Triton GEMM) and as cuBLAS ``addmm`` + ``act_affine`` (what the fused
    block runs) vs ``conv_pw, act, BN``; ``act_affine`` vs its eager ops. Also the depthwise op's bandwidth against
    its floor (read ``x`` once, write ``y`` once)."""
    from timm_convmixer.cli import bench
    from timm_convmixer.fast import triton_kernels as K
    from timm_convmixer.fast import triton_ops
    from timm_convmixer.fast.eligibility import block_parts, bn_scale_shift
    dtype = DTYPES[args.bench_dtype]
    section: Dict[str, Any] = {'dtype': args.bench_dtype, 'layout': 'channels_last', 'iters': args.iters,
                               'timer': 'CUDA events' if device.type == 'cuda' else 'perf_counter', 'models': {}}
    for model_name in args.models:
        if time.perf_counter() > deadline:
            section['models'][model_name] = {'skipped': 'time budget'}
            continue
        cfg = block_config(model_name, args.model_kwargs, args.img_size)
        shape = (args.batch, cfg['dim'], cfg['hw'], cfg['hw'])
        C = shape[1]
        block = _random_block(cfg, device, torch.Generator().manual_seed(args.seed)).eval()
        parts = block_parts(block)
        code = K.ACT_BY_NAME[parts.act]
        gen = torch.Generator(device).manual_seed(args.seed)
        x = torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(shape, generator=gen, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            s1, t1 = bn_scale_shift(parts.bn_dw, torch.float32)
            s2, t2 = bn_scale_shift(parts.bn_pw, torch.float32)
        w_dw, b_dw = parts.conv_dw.weight.detach().to(dtype), parts.conv_dw.bias.detach().to(dtype)
        w_pw, b_pw = parts.conv_pw.weight.detach().reshape(C, C).to(dtype), parts.conv_pw.bias.detach().to(dtype)

        def eager_modules(modules):
            def run(t):
                with _autocast(device, dtype):
                    for m in modules:
                        t = m(t)
                return t
            return run

        ops = {
            'dw': ({'fused': lambda t: torch.ops.timm_convmixer.dw_block(t, w_dw, b_dw, s1, t1, code),
                    'eager': eager_modules([block[0]])}, x, gy),
            'pw': ({'fused': lambda t: triton_ops.pw_block(K.rows(t), w_pw, b_pw, s2, t2, code),
                    'cublas_act_affine': lambda t: torch.ops.timm_convmixer.act_affine(
                        torch.addmm(b_pw, K.rows(t), w_pw.t()), s2, t2, code),
                    'eager': eager_modules([block[1], block[2], block[3]])}, x, gy),
            'act_affine': ({'fused': lambda t: torch.ops.timm_convmixer.act_affine(K.rows(t), s2, t2, code),
                            'eager': lambda t: _act_affine_eager(K.rows(t), s2, t2, parts.act)}, x, gy),
        }
        fwd, both, op_of = {}, {}, {}
        for op, (impls, inp, grad) in ops.items():
            leaf = inp.detach().requires_grad_()
            for impl, fn in impls.items():
                op_of[f'{op}_{impl}'] = op
                fwd[f'{op}_{impl}'] = lambda fn=fn, inp=inp: fn(inp)
                # a flat gradient of the output's shape, whatever the output's layout
                both[f'{op}_{impl}'] = lambda fn=fn, leaf=leaf, grad=grad: (
                    lambda out: out.backward(grad if out.shape == grad.shape else K.rows(grad)))(fn(leaf))
        with torch.no_grad():
            for run in list(fwd.values()) * args.warmup:
                run()
            t_fwd = bench.time_interleaved(fwd, args.iters, device, deadline=deadline)
        for run in list(both.values()) * args.warmup:
            run()
        t_both = bench.time_interleaved(both, args.iters, device, deadline=deadline)
        ms = {'fwd': {k: 1e3 * statistics.median(v) for k, v in t_fwd.items()},
              'fwd_bwd': {k: 1e3 * statistics.median(v) for k, v in t_both.items()}}
        floor_bytes = 2 * x.numel() * x.element_size()
        section['models'][model_name] = {
            'shape': list(shape), 'kernel_size': cfg['kernel_size'], 'act': parts.act, 'median_ms': ms,
            # eager's time / each other implementation's, per pass
            'speedup_vs_eager': {
                pass_: {k: t[f'{op_of[k]}_eager'] / v for k, v in t.items() if not k.endswith('_eager')}
                for pass_, t in ms.items()},
            'dw_fwd_floor_bytes': floor_bytes,
            'dw_fused_fwd_gbps': floor_bytes / (ms['fwd']['dw_fused'] * 1e-3) / 1e9,
        }
        del block, x, gy, fwd, both, ops
        _empty_cache(device)
    return section


# ----------------------------------------------------------------------------------------------------------------
# training-step parity: whole models, a few SGD steps


def _train_steps(model: nn.Module, batches, dtype: torch.dtype, steps: int) -> Dict[str, Any]:
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses, first_grads = [], None
    for step in range(steps):
        x, y = batches[step]
        x = x.to(next(model.parameters()).dtype)
        opt.zero_grad(set_to_none=True)
        with _autocast(x.device, dtype):
            out = model(x)
            loss = F.cross_entropy(out if out.dtype == torch.float64 else out.float(), y)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    return {
        'loss': losses,
        'grad': first_grads,
        'update': {n: p.detach() - start[n] for n, p in model.named_parameters()},
        'buffer': {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()},
        'steps_tracked': {n: int(b) for n, b in model.named_buffers() if not b.is_floating_point()},
    }


def run_parity(args, device: torch.device) -> Dict[str, Any]:
    from timm_convmixer import fast
    from timm_convmixer.cli import bench
    from timm_convmixer.fast import checked
    ours, builtin = bench.build_pair(args.parity_model, args.model_kwargs, str(device))
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [(torch.randn(args.parity_batch, 3, args.img_size, args.img_size, generator=gen).to(device),
                torch.randint(0, ours.num_classes, (args.parity_batch,), generator=gen).to(device))
               for _ in range(args.parity_steps)]
    ref = _train_steps(copy.deepcopy(builtin).double(), batches, torch.float64, args.parity_steps)
    section: Dict[str, Any] = {
        'model': args.parity_model, 'batch': args.parity_batch, 'img_size': args.img_size,
        'steps': args.parity_steps, 'optimizer': 'SGD lr 0.01 momentum 0.9',
        'rule': f'per tensor: ours error vs float64 built-in <= max(tolerance(dtype), {ERROR_FACTOR} x the '
                'built-in\'s own error in that dtype)', 'backends': {}}
    for dtype_name in args.parity_dtypes:
        dtype = DTYPES[dtype_name]
        floor = checked.tolerance(dtype, device.type)
        got_builtin = _train_steps(copy.deepcopy(builtin), batches, dtype, args.parity_steps)
        for backend in LEAN_BACKENDS:
            fast.reset_counters()
            with fast.use_backend(backend):
                got_ours = _train_steps(copy.deepcopy(ours), batches, dtype, args.parity_steps)
            entry = _parity_entry(args, got_ours, got_builtin, ref, floor)
            depth = len(ours.blocks)
            entry['block_paths'] = dict(fast.counters)
            entry['lean_ran_every_block'] = entry['block_paths'] == {backend: depth * args.parity_steps}
            entry['ok'] = entry['ok'] and entry['lean_ran_every_block']
            section['backends'].setdefault(backend, {'dtypes': {}})['dtypes'][dtype_name] = entry
            del got_ours
        del got_builtin
    for b in section['backends'].values():
        b['ok'] = all(e['ok'] for e in b['dtypes'].values())
    section['ok'] = all(b['ok'] for b in section['backends'].values())
    return section


def _parity_entry(args, got_ours, got_builtin, ref, floor: float) -> Dict[str, Any]:
    """One parity run's comparison: losses, and the worst loss, gradient, update and buffer against float64."""
    entry: Dict[str, Any] = {'losses': {'ours': [v.item() for v in got_ours['loss']],
                                        'builtin': [v.item() for v in got_builtin['loss']],
                                        'float64': [v.item() for v in ref['loss']]}}
    ok = got_ours['steps_tracked'] == got_builtin['steps_tracked']
    entry['steps_tracked_equal'] = ok
    for what in ('loss', 'grad', 'update', 'buffer'):
        if what == 'loss':
            names = [f'step{i}' for i in range(args.parity_steps)]
            o, b, r = got_ours['loss'], got_builtin['loss'], ref['loss']
        else:
            names = list(ref[what])
            o, b, r = ([d[what][n] for n in names] for d in (got_ours, got_builtin, ref))
        res = compare(names, o, b, r, floor)
        worst = res['worst']
        entry[what] = {'ok': res['ok'], 'tensors': len(names), 'worst': worst,
                       **({k: res['tensors'][worst][k] for k in ('fused_err', 'eager_err', 'fused_vs_eager',
                                                                 'limit')} if worst else {}),
                       'failed': [n for n, t in res['tensors'].items() if not t['ok']]}
        ok = ok and res['ok']
    entry['ok'] = ok
    return entry


# ----------------------------------------------------------------------------------------------------------------
# throughput, memory, decisions


class Measurements:
    """The throughput section, filled job by job: one pair of models alive at a time."""

    def __init__(self, args, device: torch.device, peak_tflops: Optional[float]):
        self.args, self.device, self.peak = args, device, peak_tflops
        self.results: Dict[str, Dict[str, Any]] = {}  # model -> task -> entry
        self.forced: Dict[str, Dict[str, Any]] = {}
        self._pair: Optional[Tuple[str, nn.Module, nn.Module, torch.Tensor]] = None

    def pair(self, model_name: str):
        from timm_convmixer.cli import bench
        if self._pair is None or self._pair[0] != model_name:
            self._pair = None
            _empty_cache(self.device)
            ours, builtin = bench.build_pair(model_name, self.args.model_kwargs, str(self.device))
            gen = torch.Generator().manual_seed(self.args.seed + 2)
            x = torch.randn(self.args.batch, ours.in_chans, self.args.img_size, self.args.img_size,
                            generator=gen).to(self.device)
            self._pair = (model_name, ours, builtin, x)
        return self._pair[1:]

    def release(self) -> None:
        self._pair = None
        _empty_cache(self.device)

    def _entry(self, model_name: str, task: str) -> Dict[str, Any]:
        from timm_convmixer.cli import bench
        tasks = self.results.setdefault(model_name, {})
        if task not in tasks:
            ours, builtin, x = self.pair(model_name)
            # FLOPs are linear in the batch: count one image (a full fp32 training batch may not fit beside the rest)
            flops = bench.count_flops(builtin, x[:1], task)
            tasks[task] = {'flops_per_img': flops, 'modes': {}, 'runs': [], 'missing_modes': self._asked(task)}
        return tasks[task]

    def _asked(self, task: str) -> List[str]:
        """The modes asked for ``task`` (compile only where --compile-tasks has it)."""
        return [m for m in self.args.modes if m != 'compile' or task in self.args.compile_tasks]

    def _summarize(self, model_name: str, task: str) -> None:
        from timm_convmixer.cli import bench
        e = self.results[model_name][task]
        if e['modes']:
            flops = e['flops_per_img'] * self.args.batch if e['flops_per_img'] else None
            e['summary'] = bench.summarize_case(model_name, task, self.args.bench_dtype, self.args.batch,
                                                self.args.img_size, flops, e['modes'], self.peak)
            e['summary'].pop('modes')
            e['missing_modes'] = [m for m in self._asked(task) if m not in e['modes']]

    def run(self, model_name: str, task: str, modes: Sequence[str], deadline: float) -> None:
        """Ours (backend auto, decisions forgotten first) vs the built-in, interleaved, in ``modes``."""
        from timm_convmixer.cli import bench
        from timm_convmixer.fast import checked
        entry = self._entry(model_name, task)
        ours, builtin, x = self.pair(model_name)
        checked.forget()
        t0 = time.perf_counter()
        by_mode = bench._bench_case(ours, builtin, x, task, self.args.bench_dtype, modes, self.args.iters,
                                    self.args.warmup, None, 'auto', deadline)
        entry['modes'].update(by_mode)
        entry['runs'].append({'modes': list(modes), 'seconds': time.perf_counter() - t0,
                              'decisions': checked.decision_records()})
        self._summarize(model_name, task)

    def run_forced(self, model_name: str, task: str, deadline: float) -> None:
        """Each fused path of the task forced (:data:`FORCED`) where auto did not already take it everywhere."""
        from timm_convmixer.cli import bench
        auto = self.results.get(model_name, {}).get(task, {}).get('modes', {})
        ours, builtin, x = self.pair(model_name)
        depth = len(ours.blocks)
        for backend in FORCED[task]:
            entry = {'backend': backend, 'modes': {}, 'same_as_auto': {}}
            todo = []
            for mode in (m for m in self.args.modes if m != 'compile'):  # compilers are handed the plain modules
                if auto.get(mode, {}).get('ours_block_paths') == {backend: depth}:
                    entry['same_as_auto'][mode] = f'auto already took {backend} for every block: see throughput'
                else:
                    todo.append(mode)
            if todo:
                entry['modes'] = bench._bench_case(ours, builtin, x, task, self.args.bench_dtype, todo,
                                                   self.args.iters, self.args.warmup, None, backend, deadline)
            self.forced.setdefault(model_name, {}).setdefault(task, {})[backend] = entry


# ----------------------------------------------------------------------------------------------------------------
# host overhead: how much of a step is Python and dispatch rather than GPU work


def _step_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median ms of ``fn`` as every timing here takes it (``time_interleaved``: CUDA events around the call)."""
    from timm_convmixer.cli import bench
    return 1e3 * statistics.median(bench.time_interleaved({'step': fn}, iters, device)['step'])


def _issue_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median host time of the call alone, synchronized before but not after: what Python and the dispatcher take to
    issue the work."""
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


def run_host_overhead(args, device: torch.device, meas: 'Measurements', deadline: float,
                      models: Sequence[str]) -> Dict[str, Any]:
    """Inference, channels_last, bf16 autocast, ours (auto) and the built-in: a step's time (CUDA events), the host's
    time to issue it, and the same step replayed as a CUDA graph (no host work: the GPU's own time). A step whose
    event time is near its issue time and well above its graph time is host-bound."""
    from timm_convmixer import fast
    from timm_convmixer.cli.measure import make_step, prepare
    section: Dict[str, Any] = {'task': 'infer', 'layout': 'channels_last', 'dtype': args.bench_dtype,
                               'iters': args.iters, 'models': {}}
    for model_name in models:
        if time.perf_counter() > deadline:
            section['models'][model_name] = {'skipped': 'time budget'}
            continue
        ours, builtin, x = meas.pair(model_name)
        entry: Dict[str, Any] = {}
        for name, model in (('ours', ours), ('builtin', builtin)):
            m, inp = prepare(model.eval(), x, 'channels_last')
            step = make_step(m, inp, 'infer', args.bench_dtype)
            for _ in range(max(2, args.warmup)):
                step()  # auto's checks, Triton's compiles, cuBLAS's heuristics: before anything is timed
            fast.reset_counters()
            step()
            r = {'block_paths': dict(fast.counters),
                 'event_ms': _step_ms(step, device, args.iters),
                 'issue_ms': _issue_ms(step, device, args.iters)}
            if device.type == 'cuda':
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream(device).wait_stream(side)
                with torch.cuda.graph(graph):
                    step()
                r['graph_ms'] = _step_ms(graph.replay, device, args.iters)
                r['host_bound_share'] = max(0., 1. - r['graph_ms'] / r['event_ms'])
                del graph
            entry[name] = r
            del m, inp, step
        section['models'][model_name] = entry
        _empty_cache(device)
    return section


# ----------------------------------------------------------------------------------------------------------------
# timm's train.py

_LOSS_RE = re.compile(r'Loss:\s*([-+0-9.eE]+|nan|inf)', re.IGNORECASE)


def run_train_py(args, device: torch.device, timeout_s: float) -> Dict[str, Any]:
    if not args.train_py:
        return {'skipped': "no --train-py given (nor TIMM_TRAIN_PY): timm's train.py is in no package; pass the "
                           "train.py of a pytorch-image-models checkout"}
    if not os.path.isfile(args.train_py):
        return {'ok': False, 'error': f'--train-py {args.train_py!r} is not a file'}
    from timm_convmixer.cli import shapes
    n_classes, per_class, batch = len(shapes.CLASSES), 8, 16
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, 'data'), os.path.join(tmp, 'out')
        shapes.generate(data, train_per_class=per_class, val_per_class=2, image_size=64)
        cmd = [sys.executable, os.path.abspath(args.train_py), '--data-dir', data, '--train-split', 'train',
               '--val-split', 'val', '--model', args.train_py_model, '--num-classes', str(n_classes),
               '--img-size', str(args.img_size), '-b', str(batch), '--epochs', '1', '--warmup-epochs', '0',
               '--amp', '--device', device.type, '--workers', '2', '--log-interval', '1', '--output', out,
               '--experiment', 'run',
               # timm's built-in ConvMixer cannot take a drop-path rate: this also proves train.py built ours
               '--drop-path', '0.1']
        if args.model_kwargs:
            cmd += ['--model-kwargs'] + [f'{k}={v}' for k, v in args.model_kwargs.items()]
        if device.type == 'cpu':
            cmd += ['--amp-dtype', 'bfloat16']
        env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
        t0 = time.perf_counter()
        try:
            # cwd outside the checkout, so its timm/ folder does not shadow the installed package
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=tmp, env=env)
        except subprocess.TimeoutExpired:
            return {'ok': False, 'error': f'train.py did not finish in {timeout_s:.0f} s', 'command': cmd}
        output = proc.stdout + proc.stderr
        loss_lines = [line.strip() for line in output.splitlines() if 'Loss:' in line]

        def losses(prefix):
            return [float(m.group(1)) for line in loss_lines if line.startswith(prefix)
                    for m in [_LOSS_RE.search(line)] if m]
        summary = os.path.join(out, 'run', 'summary.csv')
        summary_text = open(summary).read() if os.path.isfile(summary) else None
    result = {
        'command': cmd, 'returncode': proc.returncode, 'seconds': time.perf_counter() - t0,
        'steps_expected': n_classes * per_class // batch, 'loss_lines': loss_lines,
        'train_losses': losses('Train:'), 'eval_losses': losses('Test:'), 'summary_csv': summary_text,
    }
    train_losses = result['train_losses']
    result['ok'] = proc.returncode == 0 and bool(train_losses) and all(math.isfinite(v) for v in train_losses)
    if not result['ok']:
        result['output_tail'] = output[-4000:]
    return result


# ----------------------------------------------------------------------------------------------------------------
# targets


def _target(name: str, value: Optional[float], op: str, required: float, informational: bool = False,
            **details) -> Dict[str, Any]:
    """One check: ``pass`` is None when ``value`` was not measured; informational checks are not targets."""
    passed = None if value is None else (value >= required if op == '>=' else value <= required)
    return {'name': name, 'required': f'{op} {required}', 'value': value, 'pass': passed,
            'informational': informational, **details}


def compute_targets(args, env: Dict[str, Any], results: Dict[str, Dict[str, Any]],
                    peak: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The project's targets for convmixer_1536_20, from the measured numbers only (``None``: not measured)."""
    gpu = env.get('gpu') or ''
    scope = {'model': TARGET_MODEL, 'dtype': args.bench_dtype, 'img_size': args.img_size, 'batch': args.batch}
    applies = {
        'gpu_is_h100_or_h200': any(g in gpu for g in TARGET_GPUS),
        'bf16_224px': args.bench_dtype == 'bf16' and args.img_size == 224,
        'builtin_modes_asked': (sorted(args.modes) == sorted(EAGER_MODES + ('compile',))
                                and sorted(args.compile_tasks) == ['infer', 'train']),
    }
    doc: Dict[str, Any] = {'scope': scope, 'applies': applies, 'checks': []}
    tasks = results.get(TARGET_MODEL, {})

    def best(task: str) -> Optional[Dict[str, Any]]:
        e = tasks.get(task)
        if not e or 'summary' not in e or e['missing_modes']:
            return None  # the built-in's best mode needs every asked mode measured
        return e['summary']['best']

    for task, required in (('train', 1.8), ('infer', 2.5)):
        b = best(task)
        doc['checks'].append(_target(
            f'{task}_vs_builtin_best', b['ratio'] if b else None, '>=', required,
            how='ours img/s in its best mode / the built-in\'s img/s in its best mode (fastest of the asked modes)',
            **({'ours': {'mode': b['ours_mode'], 'img_s': b['ours_img_s']},
                'builtin': {'mode': b['builtin_mode'], 'img_s': b['builtin_img_s']}} if b else {})))
    b = best('infer')
    e = tasks.get('infer', {})
    fraction = None
    if b and e.get('flops_per_img') and peak and peak.get('bf16_tflops'):
        fraction = b['ours_img_s'] * e['flops_per_img'] / (peak['bf16_tflops'] * 1e12)
    doc['checks'].append(_target(
        'infer_fraction_of_bf16_peak', fraction, '>=', 0.5,
        how='ours best-mode img/s x FLOPs per image (torch.utils.flop_counter) / measured bf16 matmul peak',
        ours_img_s=b['ours_img_s'] if b else None, flops_per_img=e.get('flops_per_img'),
        peak_tflops=peak.get('bf16_tflops') if peak else None))
    t = tasks.get('train')
    for metric, label in (('saved_mb', 'bytes autograd keeps for backward (not measured under compile)'),
                          ('step_mem_mb', 'CUDA peak allocated during a step, above what was allocated before')):
        value, detail = None, {}
        if best('train'):
            modes = t['modes']
            ours = {m: e['ours'][metric] for m, e in modes.items() if e['ours'].get(metric) is not None}
            builtin = {m: e['builtin'][metric] for m, e in modes.items() if e['builtin'].get(metric) is not None}
            if ours and builtin:
                o_mode = max(ours, key=lambda m: modes[m]['ours']['img_s'])
                b_mode = min(builtin, key=builtin.get)
                value = ours[o_mode] / builtin[b_mode]
                detail = {'ours': {'mode': o_mode, metric: ours[o_mode]},
                          'builtin': {'mode': b_mode, metric: builtin[b_mode]}}
        # the project's memory metric is what autograd keeps; the allocator's peak is reported beside it
        doc['checks'].append(_target(
            f'train_memory_{metric}_ratio', value, '<=', 0.4, **detail, informational=metric != 'saved_mb',
            how=f'{label}: ours in its fastest mode where measured / the built-in in its leanest mode'))
    for model_name in [TARGET_MODEL] + [m for m in results if m != TARGET_MODEL]:
        per_mode, worst = {}, None
        for task, e in results.get(model_name, {}).items():
            for mode, m in e['modes'].items():
                per_mode[f'{task}/{mode}'] = m['ratio']
        complete = bool(per_mode) and all(not e['missing_modes'] for e in results.get(model_name, {}).values()) \
            and len(results.get(model_name, {})) == 2
        if per_mode:
            worst = min(per_mode, key=per_mode.get)
        check = _target(f'every_mode_at_least_builtin{"" if model_name == TARGET_MODEL else "/" + model_name}',
                        per_mode[worst] if worst and complete else None, '>=', 1.0,
                        how='the lowest ours/built-in img/s ratio over tasks and modes (same mode each side)',
                        worst=worst, ratios=per_mode, informational=model_name != TARGET_MODEL)
        doc['checks'].append(check)
    main = [c for c in doc['checks'] if not c['informational']]
    doc['all_measured'] = all(c['pass'] is not None for c in main)
    doc['all_pass'] = all(c['pass'] for c in main) if doc['all_measured'] else None
    return doc


# ----------------------------------------------------------------------------------------------------------------
# driver


def _error_text(e: BaseException) -> str:
    return f'{type(e).__name__}: {e}\n' + ''.join(traceback.format_exc(limit=8))[-3000:]


def _empty_cache(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _write(path: str, doc: Dict[str, Any]) -> None:
    import json
    from timm_convmixer.cli.atomic import atomic_write_json
    atomic_write_json(path, json.loads(json.dumps(doc, default=str)))


def _log(msg: str) -> None:
    print(f'[gpu_check] {msg}', file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    if args.cpu_smoke:
        os.environ['TRITON_INTERPRET'] = '1'  # read at call time: CPU tensors count as a Triton device
        device = torch.device('cpu')
    elif not torch.cuda.is_available():
        print('gpu_check: no CUDA device, nothing measured (use --cpu-smoke to check the script on a CPU)',
              file=sys.stderr)
        return 2
    else:
        device = torch.device('cuda')
    torch.manual_seed(args.seed)

    env = environment(device)
    out = args.out or default_out_path('cpu_smoke' if args.cpu_smoke else env['gpu'])
    doc: Dict[str, Any] = {
        'kind': 'cpu-smoke (script check only: no number here is a GPU measurement)' if args.cpu_smoke
        else 'gpu', 'complete': False, 'env': env,
        'args': dict(vars(args)), 'command': ' '.join([sys.argv[0]] + (argv or sys.argv[1:])),
        'sections_s': {}, 'allocated_mib_at_start': {}, 'skipped': {}, 'errors': {},
    }
    meas: Optional[Measurements] = None

    def remaining() -> float:
        return deadline - time.perf_counter()

    def out_of_time(need: float) -> bool:
        return remaining() < need

    def save() -> None:
        """Rewrite the JSON with everything so far (after every section: a run cut short keeps its numbers)."""
        if meas is not None:
            doc['throughput'], doc['forced'] = meas.results, meas.forced
        doc['targets'] = compute_targets(args, env, doc.get('throughput', {}), doc.get('peak'))
        doc['elapsed_s'] = time.perf_counter() - start
        _write(out, doc)

    def job(name: str, need: float, fn: Callable[[], Any]) -> None:
        if name.split('/')[0] in args.skip:
            doc['skipped'][name] = 'left out (--skip)'
        elif out_of_time(need):
            doc['skipped'][name] = f'time budget: {max(0., remaining()):.0f} s left, needs ~{need:.0f} s'
            _log(f'skip {name}: {doc["skipped"][name]}')
        else:
            _log(f'{name} ({remaining():.0f} s left)')
            if device.type == 'cuda':  # what the sections before left allocated: a leak shows here
                doc['allocated_mib_at_start'][name] = torch.cuda.memory_allocated(device) / 2 ** 20
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # keep going: one section's failure must not lose the others
                doc['errors'][name] = _error_text(e)
                _log(f'{name} raised {type(e).__name__}: {e}')
                _empty_cache(device)
            doc['sections_s'][name] = time.perf_counter() - t0
        save()

    def peak_job():
        doc['peak'] = measure_peak(device, (128,) if args.cpu_smoke else (4096, 8192), 3 if args.cpu_smoke else 20)

    def correctness_job(model_name: str):
        doc['correctness'] = run_correctness(args, device, out_of_time, model_name, doc.get('correctness'))

    def parity_job():
        doc['parity'] = run_parity(args, device)

    def kernels_job():
        doc['kernels'] = run_kernel_timing(args, device, deadline)

    def train_py_job():
        doc['train_py'] = run_train_py(args, device, max(30., min(300., remaining() - 10)))

    def host_job(model_name: str):
        section = run_host_overhead(args, device, meas, deadline, [model_name])
        doc.setdefault('host', dict(section, models={}))['models'].update(section['models'])

    job('peak', 5., peak_job)
    meas = Measurements(args, device, (doc.get('peak') or {}).get('bf16_tflops'))
    eager_modes = [m for m in args.modes if m != 'compile']
    late: List[Tuple[str, float, Callable[[], Any]]] = []
    for i, model_name in enumerate(args.models):
        job(f'correctness/{model_name}', NEEDS_S['correctness'], lambda m=model_name: correctness_job(m))
        if i == 0:
            job('parity', NEEDS_S['parity'], parity_job)
            job('kernels', NEEDS_S['kernels'], kernels_job)
        for task in ('infer', 'train'):
            if eager_modes:
                job(f'throughput/{model_name}/{task}/eager', NEEDS_S['eager'],
                    lambda m=model_name, t=task: meas.run(m, t, eager_modes, deadline))
                job(f'forced/{model_name}/{task}', NEEDS_S['forced'],
                    lambda m=model_name, t=task: meas.run_forced(m, t, deadline))
        compile_jobs = [(f'throughput/{model_name}/{task}/compile', NEEDS_S[f'compile/{task}'],
                         lambda m=model_name, t=task: meas.run(m, t, ['compile'], deadline))
                        for task in args.compile_tasks if 'compile' in args.modes]
        if i == 0:  # the targets' model: complete it first (train.py before the compilers, which take longest)
            meas.release()
            job('train_py', NEEDS_S['train_py'] if args.train_py else 0., train_py_job)
            for name, need, fn in compile_jobs:
                job(name, need, fn)
        else:
            late += compile_jobs
    for model_name in args.models:  # last but the compilers: a CUDA graph capture that fails can spoil the context
        job(f'host/{model_name}', NEEDS_S['host'], lambda m=model_name: host_job(m))
    for name, need, fn in late:
        job(name, need, fn)
    meas.release()

    failures = []
    if doc.get('correctness', {}).get('ok') is False:
        failures.append('correctness')
    if doc.get('parity', {}).get('ok') is False:
        failures.append('parity')
    if doc.get('train_py', {}).get('ok') is False:
        failures.append('train_py')
    failures += [f'error in {name}' for name in doc['errors']]
    doc['decisions'] = [dict(d, model=m, task=t) for m, tasks in meas.results.items() for t, e in tasks.items()
                        for run in e['runs'] for d in run['decisions']]
    doc['failures'] = failures
    doc['complete'] = not doc['skipped']
    save()
    _print_summary(doc, out)
    return 1 if failures else 0


def _print_summary(doc: Dict[str, Any], path: str) -> None:
    print(f"gpu_check ({doc['kind']}) on {doc['env'].get('gpu') or doc['env'].get('cpu_model')}, "
          f"{doc['elapsed_s']:.0f} s -> {path}")
    for name in ('correctness', 'parity', 'train_py'):
        s = doc.get(name)
        print(f"  {name:12s} {'not run' if s is None else s.get('skipped') or ('ok' if s.get('ok') else 'FAILED')}")
    for model, tasks in doc.get('throughput', {}).items():
        for task, e in tasks.items():
            cells = '  '.join(f"{mode} {m['ours']['img_s']:.1f}/{m['builtin']['img_s']:.1f}"
                              for mode, m in e['modes'].items())
            print(f'  {model} {task}: img/s ours/built-in  {cells}')
    for model, e in doc.get('host', {}).get('models', {}).items():
        cells = '  '.join(f"{who} {r['event_ms']:.2f}/{r['issue_ms']:.2f}/{r.get('graph_ms', float('nan')):.2f}"
                          for who, r in e.items() if isinstance(r, dict))
        print(f'  {model} infer ms step/issue/graph: {cells}')
    for c in doc.get('targets', {}).get('checks', []):
        value = 'not measured' if c['value'] is None else f"{c['value']:.3f}"
        verdict = {True: 'pass', False: 'FAIL', None: '-'}[c['pass']]
        print(f"  target {c['name']}: {value} (needs {c['required']}) {verdict}")
    for name, reason in doc['skipped'].items():
        print(f'  skipped {name}: {reason}')
    for name in doc['errors']:
        print(f'  ERROR in {name} (see the JSON)')


if __name__ == '__main__':
    sys.exit(main())
