"""The depthwise half of a block on this CPU: our kernel (``fast/csrc/dw_block.cpp``) against oneDNN's.

    python benchmarks/cpu_depthwise.py [--rounds 9] [--out benchmarks/results/cpu_depthwise.json]

For each ConvMixer variant's depthwise shape (batch 8 at 224px, or 64 at 32px for the CIFAR ones), channels_last
fp32, in one interleaved run (one call of each in turn per round, order rotating, medians): ``ours`` (``dw_block``:
conv, bias, activation, BatchNorm scale and residual in one pass), ``onednn`` (``F.conv2d(..., groups=C)``, the bare
depthwise conv with nothing fused, which is less work than ours) and ``copy`` (one read and one write of the
tensor: the floor for any pass over it). GFLOP/s count the conv's 2*k*k MACs per output only. Every ``ours``
output is checked against float64 first. The CPU model and vector flags go with the figures: on an AVX2 Zen 3
oneDNN's was the slow one, on an AVX-512 Xeon ours was at small kernels.
"""
import statistics

import torch
import torch.nn.functional as F

from timm_convmixer.cli.measure import cpu_script_finish, cpu_script_start, time_interleaved
from timm_convmixer.fast import cpu_kernels

# variant -> (batch, channels, tokens a side, kernel size, activation)
SHAPES = {
    'convmixer_768_32': (8, 768, 32, 7, 'relu'),
    'convmixer_1536_20': (8, 1536, 32, 9, 'gelu'),
    'convmixer_1024_20_ks9_p14': (8, 1024, 16, 9, 'gelu'),
    'convmixer_1536_24_ks9_p14': (8, 1536, 16, 9, 'gelu'),
    'convmixer_1024_16_ks9_p7': (8, 1024, 32, 9, 'gelu'),
    'convmixer_512_16_ks8_p7': (8, 512, 32, 8, 'gelu'),
    'convmixer_256_8_ks5_p2': (64, 256, 16, 5, 'gelu'),
    'convmixer_256_8_ks9_p1': (64, 256, 32, 9, 'gelu'),
}
_ACT = {'relu': F.relu, 'gelu': F.gelu}


def _case(batch, dim, side, k, act, rounds):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(dim, 1, k, k, generator=g) / k
    bias, scale = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    taps = cpu_kernels.dw_taps(weight)
    out, copy = torch.empty_like(x), torch.empty_like(x)
    runs = {
        'ours': lambda: cpu_kernels.dw_block(x, taps, bias, scale, k, act, out),
        'onednn': lambda: F.conv2d(x, weight, None, padding='same', groups=dim),
        'copy': lambda: copy.copy_(x),
    }
    xd = x.double()
    z = F.conv2d(xd, weight.double(), bias.double(), padding='same', groups=dim)
    want = xd + scale.double().view(1, -1, 1, 1) * _ACT[act](z)
    error = (runs['ours']().double() - want).abs().max().item() / want.abs().max().item()
    if error > 1e-5:
        raise SystemExit(f'dw_block is wrong at {batch}x{dim}x{side}x{side}, k={k}: max relative error {error:.1e}')
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        times = time_interleaved(runs, rounds, torch.device('cpu'))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    flops = 2 * batch * dim * side * side * k * k
    return {'shape': [batch, dim, side, side], 'kernel_size': k, 'act': act, 'max_rel_error': error,
            'median_ms': {n: round(v, 3) for n, v in ms.items()},
            'conv_gflop_s': {n: round(flops / v / 1e6, 1) for n, v in ms.items() if n != 'copy'},
            'ours_over_onednn': round(ms['onednn'] / ms['ours'], 3),
            'ours_in_copies': round(ms['ours'] / ms['copy'], 2)}


def main(argv=None):
    args, doc = cpu_script_start(__doc__, SHAPES, 9, 'ms', argv)
    print(f"{'model':28} {'N x C x HW, k':>20} {'ours':>8} {'onednn':>8} {'copy':>7} {'ours GF/s':>10} "
          f"{'ours/onednn':>12} {'ours in copies':>15}")
    for name in args.models:
        res = doc['results'][name] = _case(*SHAPES[name], args.rounds)
        n, c, h, _ = res['shape']
        ms, label = res['median_ms'], f"{n}x{c}x{h}^2, {res['kernel_size']}"
        print(f"{name:28} {label:>20} {ms['ours']:8.2f} {ms['onednn']:8.2f} {ms['copy']:7.2f} "
              f"{res['conv_gflop_s']['ours']:10.1f} {res['ours_over_onednn']:11.2f}x {res['ours_in_copies']:14.2f}x",
              flush=True)
    cpu_script_finish(doc, args.out)


if __name__ == '__main__':
    main()
