"""The patch stem on this CPU: its fast path (``fast/cpu_stem.py``) against the plain modules.

    python benchmarks/cpu_stem.py [--rounds 9] [--out benchmarks/results/cpu_stem.json]

For each ConvMixer variant's stem (batch 8 at 224px, or 64 at 32px for the CIFAR ones; BatchNorm statistics
randomised), fp32, no grad, an NCHW image (what a data loader gives) and a channels_last one, in one interleaved run
(one call of each in turn per round, order rotating, medians): ``ours`` (the patches as one GEMM of ours with the
activation and BatchNorm in its epilogue; channels_last out) and ``plain`` (the stem's modules, then the turn to
channels_last that the first block's CPU paths make of their output; what ``auto``'s check compares it with).
Where oneDNN's bf16 is native, the same again under bf16 autocast (``<layout>_bf16``: ours multiplying bf16 pairs where
the CPU has AVX512-BF16, against the plain stem's bf16 modules). Every output is checked against the stem in float64
first. The CPU model and vector flags go with the figures.
"""
import itertools
import statistics

import timm
import torch

from timm_convmixer.cli.measure import cpu_script_finish, cpu_script_start, time_interleaved
from timm_convmixer.fast import checked, cpu, cpu_stem
from timm_convmixer.fast.eligibility import stem_parts

# variant -> (batch, image size), as the engines sweep runs them
MODELS = {
    'convmixer_768_32': (8, 224), 'convmixer_1536_20': (8, 224), 'convmixer_1024_20_ks9_p14': (8, 224),
    'convmixer_1536_24_ks9_p14': (8, 224), 'convmixer_1024_16_ks9_p7': (8, 224), 'convmixer_512_16_ks8_p7': (8, 224),
    'convmixer_256_8_ks5_p2': (64, 32), 'convmixer_256_8_ks9_p1': (64, 32),
}
LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def _case(name, rounds):
    batch, size = MODELS[name]
    stem = timm.create_model(name, depth=1).stem.eval()
    g = torch.Generator().manual_seed(0)
    bn = stem[2]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))
    parts = stem_parts(stem)
    image = torch.randn(batch, 3, size, size, generator=g)
    with torch.no_grad():
        want = stem.double()(image.double())
        stem.float()
    res = {'batch': batch, 'img_size': size, 'patch_size': parts.kernel_size}
    for (layout, memory_format), bf16 in itertools.product(LAYOUTS.items(), (False, True)):
        if bf16 and not cpu.native_bf16():
            continue
        x = image.contiguous(memory_format=memory_format)
        runs = {'ours': lambda x=x: cpu_stem.forward(parts, x), 'plain': lambda x=x: cpu_stem.eager(stem, x)}
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            errors = {n: ((fn().double() - want).norm() / want.norm()).item() for n, fn in runs.items()}
            limit = checked.tolerance(torch.bfloat16 if bf16 else torch.float32, 'cpu')
            if errors['ours'] > limit:
                raise SystemExit(f'{name}: the fast stem is wrong on {layout} input{" under bf16" * bf16}: '
                                 f'relative error {errors["ours"]:.1e}')
            times = time_interleaved(runs, rounds, torch.device('cpu'))
        ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        res[layout + '_bf16' * bf16] = {'median_ms': {n: round(v, 3) for n, v in ms.items()}, 'rel_error': errors,
                                         'ours_over_plain': round(ms['plain'] / ms['ours'], 3)}
    return res


def main(argv=None):
    args, doc = cpu_script_start(__doc__, MODELS, 9, 'ms', argv)
    if not cpu_stem.available():
        raise SystemExit('our CPU kernels do not load here')
    columns = [c for c in ('nchw', 'channels_last', 'nchw_bf16', 'channels_last_bf16')
               if c in LAYOUTS or cpu.native_bf16()]
    print(f"{'model':28} {'batch, px, patch':>17} " + ' '.join(f"{c + ': ours / plain':>34}" for c in columns))
    for name in args.models:
        res = doc['results'][name] = _case(name, args.rounds)
        cells = [f"{res[c]['median_ms']['ours']:8.2f} / {res[c]['median_ms']['plain']:8.2f} "
                 f"({res[c]['ours_over_plain']:.2f}x)" for c in columns]
        print(f"{name:28} {res['batch']:>5}, {res['img_size']:>3}, {res['patch_size']:>3}  " + ' '.join(
            f'{c:>34}' for c in cells), flush=True)
    cpu_script_finish(doc, args.out)


if __name__ == '__main__':
    main()
