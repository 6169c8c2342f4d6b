"""Print the README's CPU table from the ``bench --engines`` JSONs under ``benchmarks/results/``.

    python benchmarks/engines_table.py benchmarks/results/cpu_engines_*.json

One row per model: img/s of each engine (median of one interleaved run), ours' best against the best peer and
against the built-in's best eager layout, and the fraction of the fp32 peak ours and the best peer reach.
"""
import json
import sys

COLUMNS = ('ours_nchw', 'ours_channels_last', 'builtin_nchw', 'builtin_channels_last', 'builtin_compile',
           'onnxruntime', 'openvino')


def _cell(engine):
    if engine is None:
        return '-'
    if engine['status'] != 'measured':
        return engine['status']
    mark = '' if engine['correctness']['pass'] else ' (wrong)'
    return f"{engine['img_s']:.3g}{mark}"


def main(paths):
    print('| model (batch, px) | ' + ' | '.join(COLUMNS) + ' | ours best / best peer | ours best / built-in eager '
          'best | fraction of fp32 peak: ours / best peer |')
    print('|' + '---|' * (len(COLUMNS) + 4))
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        meta, engines, summary = doc['meta'], doc['engines'], doc['summary']
        ours, peer = engines[summary['ours_best']], engines[summary['best_peer']]

        def pct(e):
            return f"{100 * e['fraction_of_peak']:.0f}%" if e.get('fraction_of_peak') else '-'
        cells = [_cell(engines.get(name)) for name in COLUMNS]
        print(f"| {meta['model']} (b{meta['batch_size']}, {meta['img_size']}) | " + ' | '.join(cells) +
              f" | **{summary['ours_best_vs_best_peer']:.2f}x** ({summary['best_peer']}) | "
              f"{summary['ours_best_vs_builtin_eager_best']:.2f}x | {pct(ours)} / {pct(peer)} |")


if __name__ == '__main__':
    main(sys.argv[1:])
