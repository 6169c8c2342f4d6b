"""The pointwise half of a block on this CPU: our GEMM (``fast/csrc/pw_block.cpp``) against what ``cpu`` runs.

    python benchmarks/cpu_pointwise.py [--rounds 7] [--out benchmarks/results/cpu_pointwise.json]

For each ConvMixer variant's pointwise shape (batch 8 at 224px, or 64 at 32px for the CIFAR ones), in one
interleaved run (one call of each in turn per round, medians): ``ours`` (``pw_block``: GEMM, bias, activation and
BatchNorm affine in one pass), ``onednn`` (the ``cpu`` path's oneDNN 1x1 convolution with the activation fused, on
weights pre-packed for the shape, plus its ``addcmul`` for the affine) and ``sgemm`` (``torch.mm`` alone: MKL's
GEMM without any epilogue, for scale). Where our GEMM has the bf16 dot product (AVX512-BF16) and oneDNN native
bf16, the same in bf16 as ``cpu_compiled`` and ``cpu`` run it under bf16 autocast: ``ours_bf16`` (bf16 ``u`` and
weight pairs, float32 sums and epilogue, bf16 output) and ``onednn_bf16`` (its bf16 convolution and ``addcmul``).
GFLOP/s count the GEMM's 2*M*K*N only; ratios are ours over the others in the same run. Every ``ours`` output is
checked against float64 (of the same bf16 operands for ``ours_bf16``) first. The CPU model and vector flags go with the
figures (a speed-up on one CPU can be a slow-down on another).
"""
import statistics
import time

import torch
import torch.nn.functional as F

from timm_convmixer.cli.measure import cpu_script_finish, cpu_script_start
from timm_convmixer.fast import cpu, cpu_kernels

# variant -> (pixels per batch, channels, activation): batch 8 at 224px (64 at 32px), the patch size's grid
SHAPES = {
    'convmixer_768_32': (8 * 32 * 32, 768, 'relu'),
    'convmixer_1536_20': (8 * 32 * 32, 1536, 'gelu'),
    'convmixer_1024_20_ks9_p14': (8 * 16 * 16, 1024, 'gelu'),
    'convmixer_1536_24_ks9_p14': (8 * 16 * 16, 1536, 'gelu'),
    'convmixer_1024_16_ks9_p7': (8 * 32 * 32, 1024, 'gelu'),
    'convmixer_512_16_ks8_p7': (8 * 32 * 32, 512, 'gelu'),
    'convmixer_256_8_ks5_p2': (64 * 16 * 16, 256, 'gelu'),
    'convmixer_256_8_ks9_p1': (64 * 32 * 32, 256, 'gelu'),
}
_POST_OP = {'relu': ('relu', ''), 'gelu': ('gelu', 'none')}


def _case(pixels, dim, act, rounds):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, dim, 1, pixels, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(dim, dim, generator=g) / dim ** 0.5
    bias, scale, shift = (torch.randn(dim, generator=g) for _ in range(3))
    panels = cpu_kernels.pw_pack(weight)
    out = torch.empty_like(u)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.view(dim, dim, 1, 1).to_mkldnn(), [0, 0], [1, 1], [1, 1], 1, list(u.shape))
    post_op, algorithm = _POST_OP[act]
    rows, w_t = u.view(dim, pixels).t(), weight.t()

    def onednn(u, packed, bias, scale, shift):
        y = torch.ops.mkldnn._convolution_pointwise(
            u, packed, bias, [0, 0], [1, 1], [1, 1], 1, post_op, [], algorithm)
        return torch.addcmul(shift.view(1, dim, 1, 1), y, scale.view(1, dim, 1, 1), out=y)

    runs = {
        'ours': lambda: cpu_kernels.pw_block(u, panels, bias, scale, shift, act, out),
        'onednn': lambda: onednn(u, packed, bias, scale, shift),
        'sgemm': lambda: torch.mm(rows, w_t),
    }
    checks = {'ours': (u, weight)}
    if cpu_kernels.bf16_dot() and cpu.native_bf16():
        u16, w16 = u.bfloat16(), weight.bfloat16()
        panels16, out16 = cpu_kernels.pw_pack(w16), torch.empty_like(u16)
        packed16 = torch._C._nn.mkldnn_reorder_conv2d_weight(
            w16.view(dim, dim, 1, 1).to_mkldnn(), [0, 0], [1, 1], [1, 1], 1, list(u.shape))
        runs['ours_bf16'] = lambda: cpu_kernels.pw_block(u16, panels16, bias, scale, shift, act, out16)
        runs['onednn_bf16'] = lambda: onednn(u16, packed16, *(t.bfloat16() for t in (bias, scale, shift)))
        checks['ours_bf16'] = (u16, w16)
    error = 0.0
    for name, (x, w) in checks.items():
        z = F.conv2d(x.double(), w.double()[:, :, None, None], bias.double())
        want = (F.relu(z) if act == 'relu' else F.gelu(z)) * scale.double().view(1, -1, 1, 1) + shift.double().view(
            1, -1, 1, 1)
        # (a bf16 output is rounded once: half a bf16 unit of the largest output)
        limit = 1e-5 if name == 'ours' else 2 ** -8
        error = (runs[name]().double() - want).abs().max().item() / want.abs().max().item()
        if error > limit:
            raise SystemExit(f'pw_block ({name}) is wrong at {pixels}x{dim}: max relative error {error:.1e}')
        if name == 'ours':
            fp32_error = error
    times = {name: [] for name in runs}
    for name, fn in runs.items():
        fn()  # warm-up
    for r in range(rounds):
        for name in list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    flops = 2 * pixels * dim * dim
    gflops = {name: flops / statistics.median(t) / 1e9 for name, t in times.items()}
    res = {'pixels': pixels, 'channels': dim, 'act': act, 'max_rel_error': fp32_error,
           'gflop_s': {k: round(v, 1) for k, v in gflops.items()},
           'ours_over_onednn': round(gflops['ours'] / gflops['onednn'], 3),
           'ours_over_sgemm': round(gflops['ours'] / gflops['sgemm'], 3)}
    if 'ours_bf16' in runs:
        res['bf16_max_rel_error'] = error
        res['bf16_ours_over_onednn'] = round(gflops['ours_bf16'] / gflops['onednn_bf16'], 3)
    return res


def main(argv=None):
    args, doc = cpu_script_start(__doc__, SHAPES, 7, 'GFLOP/s', argv)
    print(f"{'model':28} {'M x C':>13} {'ours':>7} {'onednn':>7} {'sgemm':>7} {'ours/onednn':>12} {'ours/sgemm':>11}"
          f" {'bf16: ours':>11} {'onednn':>7} {'ours/onednn':>12}")
    for name in args.models:
        res = doc['results'][name] = _case(*SHAPES[name], args.rounds)
        g = res['gflop_s']
        bf16 = (f" {g['ours_bf16']:11.1f} {g['onednn_bf16']:7.1f} {res['bf16_ours_over_onednn']:11.2f}x"
                if 'ours_bf16' in g else '')
        print(f"{name:28} {res['pixels']:>6}x{res['channels']:<6} {g['ours']:7.1f} {g['onednn']:7.1f} "
              f"{g['sgemm']:7.1f} {res['ours_over_onednn']:11.2f}x {res['ours_over_sgemm']:10.2f}x{bf16}", flush=True)
    cpu_script_finish(doc, args.out)


if __name__ == '__main__':
    main()
