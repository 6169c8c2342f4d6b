"""Check and time the Triton ConvMixer block against eager PyTorch on a CUDA GPU; prints one JSON document.

For each (kernel size, dtype, activation): a full-size ``MixerBlock`` (default dim 1536, 32x32, batch 64, the
ConvMixer-1536/20 block at 224px) in eval mode with random BatchNorm statistics, channels_last input, run under
autocast as timm's ``--amp`` does. It checks the fused output (and, with ``--backward``, the input and parameter
gradients) against a float64 reference next to eager's own error, then times fused and eager with
``triton.testing.do_bench`` (CUDA events, median). It also times the depthwise op alone against the eager
depthwise branch and reports its achieved bandwidth against the one-read-one-write floor.

    python benchmarks/gpu_check.py                      # bf16 + fp16, kernel 9, GELU, forward
    python benchmarks/gpu_check.py --kernel-sizes 7 9 --acts relu gelu --backward --out results/h200.json
    python benchmarks/gpu_check.py --cpu-smoke --backward --dtypes bf16   # no GPU: script logic only, interpreter

Exit status 1 when a correctness check fails, 2 when there is no CUDA device.
"""
import argparse
import json
import platform
import sys
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
_ACTS = {'gelu': nn.GELU, 'relu': nn.ReLU}


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dim', type=int, default=1536)
    p.add_argument('--size', type=int, default=32, help='feature map height = width')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--kernel-sizes', type=int, nargs='+', default=[9])
    p.add_argument('--dtypes', nargs='+', choices=sorted(_DTYPES), default=['bf16', 'fp16'])
    p.add_argument('--acts', nargs='+', choices=sorted(_ACTS), default=['gelu'])
    p.add_argument('--backward', action='store_true', help='also check gradients and time forward+backward')
    p.add_argument('--tol', type=float, default=2e-2, help='max relative error of the fused output vs float64')
    p.add_argument('--warmup-ms', type=int, default=50)
    p.add_argument('--rep-ms', type=int, default=300)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='', help='also write the JSON here')
    p.add_argument('--cpu-smoke', action='store_true',
                   help='no GPU: run the correctness part on CPU through the Triton interpreter, tiny shapes, no timing')
    return p.parse_args(argv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _make_block(dim: int, k: int, act: str, device: torch.device) -> nn.Module:
    from timm_convmixer.convmixer import MixerBlock
    block = MixerBlock(dim, k, act_layer=_ACTS[act]).to(device)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0., 0.2)
                m.running_var.uniform_(0.5, 2.)
                m.weight.normal_(1., 0.2)
                m.bias.normal_(0., 0.2)
    return block.eval()


def _env() -> Dict[str, Any]:
    import timm
    import triton
    props = torch.cuda.get_device_properties(0)
    return {
        'gpu': torch.cuda.get_device_name(0),
        'capability': list(torch.cuda.get_device_capability(0)),
        'sm_count': props.multi_processor_count,
        'memory_gib': round(props.total_memory / 2 ** 30, 1),
        'torch': torch.__version__, 'cuda': torch.version.cuda, 'triton': triton.__version__,
        'timm': timm.__version__, 'python': platform.python_version(),
    }


def _bench(fn: Callable[[], Any], args: argparse.Namespace) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode='median')


def run_config(args: argparse.Namespace, k: int, dtype_name: str, act: str) -> Dict[str, Any]:
    from timm_convmixer.fast import triton_ops as ops
    device = torch.device('cpu' if args.cpu_smoke else 'cuda')
    dtype = _DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    block = _make_block(args.dim, k, act, device)
    shape = (args.batch, args.dim, args.size, args.size)
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    eager = lambda inp: nn.Sequential.forward(block, inp)  # noqa: E731  (the plain modules, no fast seam)
    fused = lambda inp: ops.triton_block_forward(block, inp)  # noqa: E731
    amp = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    res: Dict[str, Any] = {'kernel_size': k, 'dtype': dtype_name, 'act': act, 'shape': list(shape)}

    # correctness against float64 (on a slice of the batch: the float64 eager conv is slow)
    xs = x[:8].clone().requires_grad_(args.backward)
    with torch.autocast(**amp):
        y_f = fused(xs)
        y_e = eager(xs)
    if y_f is None:
        res['error'] = 'triton_block_forward declined the block'
        return res
    block64 = _make_block(args.dim, k, act, device)
    block64.load_state_dict(block.state_dict())
    block64 = block64.double()
    x64 = xs.detach().double().requires_grad_(args.backward)
    y64 = nn.Sequential.forward(block64, x64)
    res['rel_err_fused'] = _rel(y_f, y64)
    res['rel_err_eager'] = _rel(y_e, y64)
    res['finite'] = bool(torch.isfinite(y_f).all())
    ok = res['finite'] and res['rel_err_fused'] < args.tol
    if args.backward:
        gy = torch.randn_like(y64)
        leaves = [xs] + list(block.parameters())
        g_f = torch.autograd.grad(y_f, leaves, gy.to(y_f.dtype))
        g_e = torch.autograd.grad(y_e, leaves, gy.to(y_e.dtype))
        g_64 = torch.autograd.grad(y64, [x64] + list(block64.parameters()), gy)
        res['grad_rel_err_fused'] = [_rel(a, b) for a, b in zip(g_f, g_64)]
        res['grad_rel_err_eager'] = [_rel(a, b) for a, b in zip(g_e, g_64)]
        # gradients: within 4x of eager's own error or the tolerance, whichever is looser
        ok = ok and all(f < max(args.tol, 4 * e) for f, e in zip(res['grad_rel_err_fused'], res['grad_rel_err_eager']))
    res['ok'] = bool(ok)
    del block64, x64, y64
    if args.cpu_smoke:
        return res

    # timing: whole block, forward
    with torch.no_grad(), torch.autocast(**amp):
        res['fwd_ms_fused'] = _bench(lambda: fused(x), args)
        res['fwd_ms_eager'] = _bench(lambda: eager(x), args)
        # depthwise residual branch alone: op vs eager modules
        dw, bn1 = block[0].fn[0], block[0].fn[2]
        s1, t1 = ops._bn_scale_shift(bn1, torch.float32)
        w, b = dw.weight.to(dtype), dw.bias.to(dtype)
        act_code = ops._act_code(block[0].fn[1])
        res['dw_ms_fused'] = _bench(lambda: torch.ops.timm_convmixer.dw_block(x, w, b, s1, t1, act_code), args)
        res['dw_ms_eager'] = _bench(lambda: block[0](x), args)
    floor_bytes = 2 * x.numel() * x.element_size()  # read x once, write y once
    res['dw_fused_gbps'] = floor_bytes / (res['dw_ms_fused'] * 1e-3) / 1e9
    res['fwd_speedup'] = res['fwd_ms_eager'] / res['fwd_ms_fused']
    res['dw_speedup'] = res['dw_ms_eager'] / res['dw_ms_fused']

    if args.backward:
        xg = x.detach().requires_grad_()
        gy = torch.randn_like(x)

        def step(fn):
            def run():
                with torch.autocast(**amp):
                    y = fn(xg)
                y.backward(gy)
            return run
        res['fwd_bwd_ms_fused'] = _bench(step(fused), args)
        res['fwd_bwd_ms_eager'] = _bench(step(eager), args)
        res['fwd_bwd_speedup'] = res['fwd_bwd_ms_eager'] / res['fwd_bwd_ms_fused']
    return res


def main(argv: List[str] = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        import os
        os.environ['TRITON_INTERPRET'] = '1'  # read by triton_block_forward's CPU gate, at call time
        args.dim, args.size, args.batch = min(args.dim, 8), min(args.size, 5), min(args.batch, 2)
    elif not torch.cuda.is_available():
        print(json.dumps({'error': 'no CUDA device: nothing checked or timed'}))
        return 2
    doc = {'env': {'torch': torch.__version__, 'device': 'cpu (interpreter smoke)'} if args.cpu_smoke else _env(),
           'args': vars(args), 'results': []}
    for k in args.kernel_sizes:
        for dt in args.dtypes:
            for act in args.acts:
                doc['results'].append(run_config(args, k, dt, act))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    doc['all_ok'] = all(r.get('ok', False) for r in doc['results'])
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')
    return 0 if doc['all_ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
