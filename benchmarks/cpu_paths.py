"""Each CPU fast path forced on whole models, against each other and the plain modules, in one interleaved run.

    python benchmarks/cpu_paths.py [--rounds 7] [--models ...] [--bf16] [--out benchmarks/results/cpu_paths.json]

What ``auto`` chooses between, measured where it matters (the whole model, not one block): ``cpu`` (oneDNN's two
convolutions), ``cpu_compiled`` (our two kernels), ``cpu_hybrid`` (our depthwise kernel, oneDNN's pointwise conv,
the pointwise BatchNorm carried from block to block), each with the stem's fast path (``fast.cpu_stem``), and
``eager`` (the plain modules, the stem's too), same weights and input,
fp32, no grad, channels_last input, one batch of each path per round with the order rotating (medians; ratios within
the run). Each path's output is checked against eager's first. Which path wins depends on the CPU (our GEMM beat
oneDNN's on an AVX2 Zen 3 and lost to it on an AVX-512 Xeon), so the CPU model and vector flags go with the figures.
With ``--bf16`` (a CPU with native bf16 only) every path runs under ``torch.autocast('cpu', dtype=torch.bfloat16)``,
as auto races them there, each checked against eager fp32 to bf16 precision (5% of the logits' scale).
"""
import contextlib
import statistics

import timm
import torch

from timm_convmixer import fast
from timm_convmixer.fast import cpu as fast_cpu
from timm_convmixer.cli.measure import cpu_script_finish, cpu_script_start, time_interleaved

PATHS = ('eager', 'cpu', 'cpu_compiled', 'cpu_hybrid')
# variant -> (batch, image size), as the engines sweep runs them
MODELS = {
    'convmixer_768_32': (8, 224), 'convmixer_1536_20': (8, 224), 'convmixer_1024_20_ks9_p14': (8, 224),
    'convmixer_1536_24_ks9_p14': (8, 224), 'convmixer_1024_16_ks9_p7': (8, 224), 'convmixer_512_16_ks8_p7': (8, 224),
    'convmixer_256_8_ks5_p2': (64, 32), 'convmixer_256_8_ks9_p1': (64, 32),
}


def _case(name: str, rounds: int, depth=None, bf16=False):
    batch, size = MODELS[name]
    model = timm.create_model(name, **({} if depth is None else {'depth': depth})).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)

    def runner(path, autocast=bf16):
        def run():
            with torch.no_grad(), fast.use_backend(path), (
                    torch.autocast('cpu', dtype=torch.bfloat16) if autocast else contextlib.nullcontext()):
                return model(x)
        return run
    runs = {path: runner(path) for path in PATHS}
    want = runner('eager', autocast=False)()
    limit = 5e-2 if bf16 else 1e-4
    errors = {}
    for path, run in runs.items():
        fast.reset_counters()
        got = run()
        stem = 'eager' if path == 'eager' else 'cpu_stem'
        if dict(fast.counters) != {path: len(model.blocks)} or dict(fast.stem_counters) != {stem: 1}:
            raise SystemExit(f'{name}: backend {path} ran {dict(fast.counters)}, stem {dict(fast.stem_counters)}')
        errors[path] = ((got.float() - want).abs().max() / want.abs().max()).item()
        if errors[path] > limit:
            raise SystemExit(f'{name}: {path} differs from eager by {errors[path]:.1e} of the logits\' scale')
    times = time_interleaved(runs, rounds, torch.device('cpu'))
    ms = {path: statistics.median(t) * 1e3 for path, t in times.items()}
    best = min(ms, key=ms.get)
    return {'batch': batch, 'img_size': size, 'dtype': 'bf16 autocast' if bf16 else 'fp32',
            'median_ms': {k: round(v, 2) for k, v in ms.items()},
            'times_ms': {k: [round(s * 1e3, 2) for s in t] for k, t in times.items()},
            'max_rel_err': errors, 'fastest': best,
            'hybrid_over': {k: round(ms[k] / ms['cpu_hybrid'], 3) for k in PATHS if k != 'cpu_hybrid'}}


def main(argv=None):
    def options(parser):
        parser.add_argument('--depth', type=int, help='cut the models to this many blocks (a quick look)')
        parser.add_argument('--bf16', action='store_true', help='every path under CPU bf16 autocast')
    args, doc = cpu_script_start(__doc__, MODELS, 7, 'ms per batch', argv, extra=options)
    if args.bf16 and not fast_cpu.native_bf16():
        raise SystemExit('--bf16: this CPU has no native bf16 (oneDNN would emulate it, 15-20x slower than fp32)')
    doc['depth'], doc['bf16'] = args.depth, args.bf16
    print(f"{'model':28} " + ' '.join(f'{p:>12}' for p in PATHS) + '   cpu_hybrid vs cpu_compiled / cpu')
    for name in args.models:
        res = doc['results'][name] = _case(name, args.rounds, args.depth, args.bf16)
        print(f'{name:28} ' + ' '.join(f"{res['median_ms'][p]:12.1f}" for p in PATHS) +
              f"   {res['hybrid_over']['cpu_compiled']:.3f}x / {res['hybrid_over']['cpu']:.3f}x", flush=True)
    cpu_script_finish(doc, args.out)


if __name__ == '__main__':
    main()
