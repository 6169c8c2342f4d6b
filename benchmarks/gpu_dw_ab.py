"""The depthwise kernels of this checkout against an earlier version of them, in one process on one GPU.

bf16, batch 64, the block shapes of convmixer_1536_20, _768_32 and _1024_20_ks9_p14 at 224 px: each op (the eval
block's fused ``dw_fwd``, the training block's bare ``dw_conv``, the fused block's backward, the input gradient
alone) timed old vs new in interleaved rounds with CUDA events (median of 9 rounds of 5 calls), cuDNN's depthwise
convolution beside them, the outputs compared; then a sweep of strip widths and channel blocks for the new forward.
``benchmarks/results/gpu_dw_strip_ab_nvidia_h100.json`` came from this script (as it ran then, it imported the old
module from beside itself rather than by ``--old``; otherwise the same code)::

    git show a55c558:timm_convmixer/fast/triton_kernels.py > /tmp/old_triton_kernels.py
    python benchmarks/gpu_dw_ab.py --old /tmp/old_triton_kernels.py --out benchmarks/results/gpu_dw_strip_ab.json

``SMOKE=1`` runs it on the CPU at toy sizes through Triton's interpreter (a check of the script, not a timing).
"""
import argparse
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F

from timm_convmixer.cli.atomic import atomic_write_json
from timm_convmixer.fast import triton_kernels as NEW

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--old', required=True, help="an earlier timm_convmixer/fast/triton_kernels.py (git show REV:PATH)")
p.add_argument('--out')
p.add_argument('--budget-s', type=float, default=150, help='no sweep point starts after this many seconds')
args = p.parse_args()
# named inside the package, so that a version importing its siblings (``from .runtime import rows``) loads too
_spec = importlib.util.spec_from_file_location('timm_convmixer.fast._old_triton_kernels', args.old)
OLD = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(OLD)
T0 = time.time()
SMOKE = os.environ.get('SMOKE') == '1'
dev = torch.device('cpu' if SMOKE else 'cuda')
SHAPES = [('convmixer_1536_20', 1536, 32, 9, OLD.ACT_GELU), ('convmixer_768_32', 768, 32, 7, OLD.ACT_RELU),
          ('convmixer_1024_20_ks9_p14', 1024, 16, 9, OLD.ACT_GELU)]
N = 64
if SMOKE:
    SHAPES = [(n, 16, 6, 3, a) for n, _, _, _, a in SHAPES[:2]]
    N = 1
dt = torch.bfloat16


def _taps(module, weight):
    """The weight in a kernels module's tap layout (``taps`` since the inference constants; ``_taps`` before)."""
    return (getattr(module, 'taps', None) or getattr(module, '_taps'))(weight)


def timeit(fn, reps=5):
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps

def ab(fns, rounds=9):
    rounds = 1 if SMOKE else rounds
    for f in fns.values():
        f(); f()
    if not SMOKE:
        torch.cuda.synchronize()
    t = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t[k].append(timeit(f))
    return {k: statistics.median(v) for k, v in t.items()}

def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

doc = {'gpu': 'cpu' if SMOKE else torch.cuda.get_device_name(), 'torch': torch.__version__,
       'triton': __import__('triton').__version__,
       'dtype': 'bf16', 'batch': N, 'shapes': {}, 'sweep': {}}
def save():  # after each shape, so a run cut short keeps what it measured; atomic, so never a half-written file
    if args.out:
        atomic_write_json(args.out, doc)
g = torch.Generator(device=dev).manual_seed(0)
for name, C, HW, k, act in SHAPES:
    r = {}
    x = torch.randn(N, C, HW, HW, device=dev, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, k, k, device=dev, generator=g) / k).to(dt)
    b = torch.randn(C, device=dev, generator=g).to(dt)
    sc = torch.rand(C, device=dev, generator=g) + 0.5
    sh = torch.randn(C, device=dev, generator=g)
    gy = torch.randn_like(x)
    gres = torch.randn_like(x, dtype=torch.float32)
    # correctness new vs old (and vs an fp32 cuDNN reference for the bare conv)
    ref = F.conv2d(x.float(), w.float(), b.float(), padding='same', groups=C)
    r['err_conv_new_vs_fp32'] = rel(NEW.dw_conv(x, w, b), ref)
    r['err_conv_old_vs_fp32'] = rel(OLD.dw_conv(x, w, b), ref)
    r['err_fwd_new_vs_old'] = rel(NEW.dw_fwd(x, w, b, sc, sh, act), OLD.dw_fwd(x, w, b, sc, sh, act))
    gn, go = NEW.dw_bwd(gy, x, w, b, sc, act), OLD.dw_bwd(gy, x, w, b, sc, act)
    r['err_bwd_new_vs_old'] = [rel(a, c) for a, c in zip(gn, go)]
    cn = NEW.dw_conv_bwd(gy, x, w, gres, (True, True, True))
    co = OLD.dw_conv_bwd(gy, x, w, gres, (True, True, True))
    r['err_conv_bwd_new_vs_old'] = [rel(a, c) for a, c in zip(cn, co)]
    xn = x.contiguous()
    ops = {
        'fwd': {'old': lambda: OLD.dw_fwd(x, w, b, sc, sh, act), 'new': lambda: NEW.dw_fwd(x, w, b, sc, sh, act)},
        'conv': {'old': lambda: OLD.dw_conv(x, w, b), 'new': lambda: NEW.dw_conv(x, w, b),
                 'cudnn_cl': lambda: F.conv2d(x, w, b, padding='same', groups=C),
                 'cudnn_nchw': lambda: F.conv2d(xn, w, b, padding='same', groups=C)},
        'bwd': {'old': lambda: OLD.dw_bwd(gy, x, w, b, sc, act), 'new': lambda: NEW.dw_bwd(gy, x, w, b, sc, act)},
        'gx': {'old': lambda: OLD._dw_grad_input(gres, _taps(OLD, w), k, gres, x),
               'new': lambda: NEW._dw_grad_input(gres, _taps(NEW, w), k, gres, x)},
    }
    for op, fns in ops.items():
        t = ab(fns)
        r[op] = {kk: round(v, 4) for kk, v in t.items()}
        r[op]['old_over_new'] = round(t['old'] / t['new'], 3)
        print(name, op, r[op], flush=True)
    flops = 2 * N * C * HW * HW * k * k
    r['conv_new_tflops'] = round(flops / r['conv']['new'] / 1e9, 2)
    r['conv_new_gbs'] = round(2 * x.numel() * 2 / r['conv']['new'] / 1e6, 1)
    print(name, {kk: v for kk, v in r.items() if kk.startswith('err') or 'tflops' in kk or 'gbs' in kk}, flush=True)
    doc['shapes'][name] = r
    save()
# strip / channel-block sweep, forward conv only
for name, C, HW, k, act in SHAPES:
    x = torch.randn(N, C, HW, HW, device=dev, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, k, k, device=dev, generator=g) / k).to(dt)
    b = torch.randn(C, device=dev, generator=g).to(dt)
    res = {}
    for strip, bc in [(8, 256), (4, 256), (8, 128), (8, 512), (16, 256), (6, 256)][:2 if SMOKE else 6]:
        if time.time() - T0 > args.budget_s:
            res['cut'] = 'budget'; break
        NEW._STRIP, NEW._STRIP_C = strip, bc
        try:
            t = ab({'new': lambda: NEW.dw_conv(x, w, b)}, rounds=5)['new']
            res[f'{strip}x{bc}'] = round(t, 4)
        except Exception as e:
            res[f'{strip}x{bc}'] = repr(e)[:200]
    NEW._STRIP, NEW._STRIP_C = 8, 256
    print('sweep', name, res, flush=True)
    doc['sweep'][name] = res
    save()
doc['wall_s'] = round(time.time() - T0, 1)
save()
print('done', doc['wall_s'])
