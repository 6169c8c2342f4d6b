"""Print the README's CPU table from the ``bench --engines`` JSONs under ``benchmarks/results/``.

    python benchmarks/engines_table.py benchmarks/results/cpu_engines_*.json

One row per model: img/s of each engine (median of one interleaved run); per compute dtype, ours' best against the
best peer computing in that dtype (a bf16 engine is only compared with bf16 peers here: against fp32 ones it shows
what bf16 buys, which the peers offer too), as the ratio of the medians and as the median of the per-round ratios
(``bench_engines.paired_speedup``: where the two disagree the run cannot tell the engines apart); ours' best against
the built-in's best eager layout; and the fraction of the fp32 peak ours and the best fp32 peer reach.
"""
import json
import sys

from timm_convmixer.cli.bench_engines import paired_speedup

COLUMNS = ('ours_nchw', 'ours_channels_last', 'ours_bf16', 'builtin_nchw', 'builtin_channels_last', 'builtin_compile',
           'builtin_compile_bf16', 'onnxruntime', 'openvino', 'openvino_bf16')


def _cell(engine):
    if engine is None:
        return '-'
    if engine['status'] != 'measured':
        return engine['status']
    mark = '' if engine['correctness']['pass'] else ' (wrong)'
    return f"{engine['img_s']:.3g}{mark}"


def _versus(engines, by_dtype, dtype):
    """Ours' best against the best peer of ``dtype``: the ratio of medians, and the median of the per-round ratios."""
    d = by_dtype.get(dtype)
    if not d or d['ours_best_vs_best_peer'] is None:
        return '-'
    paired = paired_speedup(engines[d['ours_best']]['times_ms'], engines[d['best_peer']]['times_ms'])
    return f"**{d['ours_best_vs_best_peer']:.2f}x** / {paired:.2f}x ({d['best_peer']})"


def main(paths):
    print('| model (batch, px) | ' + ' | '.join(COLUMNS) + ' | fp32: ours best / best fp32 peer (medians / paired) | '
          'bf16: ours / best bf16 peer (medians / paired) | ours best / built-in eager best | fraction of fp32 peak: '
          'ours / best fp32 peer |')
    print('|' + '---|' * (len(COLUMNS) + 5))
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        meta, engines, summary = doc['meta'], doc['engines'], doc['summary']
        by_dtype = summary.get('by_dtype', {})
        fp32 = by_dtype.get('fp32', {})

        def pct(name):
            e = engines.get(name) if name else None
            return f"{100 * e['fraction_of_peak']:.0f}%" if e and e.get('fraction_of_peak') else '-'
        cells = [_cell(engines.get(name)) for name in COLUMNS]
        print(f"| {meta['model']} (b{meta['batch_size']}, {meta['img_size']}) | " + ' | '.join(cells) +
              f" | {_versus(engines, by_dtype, 'fp32')} | {_versus(engines, by_dtype, 'bf16')} | "
              f"{summary['ours_best_vs_builtin_eager_best']:.2f}x | {pct(fp32.get('ours_best'))} / "
              f"{pct(fp32.get('best_peer'))} |")


if __name__ == '__main__':
    main(sys.argv[1:])
