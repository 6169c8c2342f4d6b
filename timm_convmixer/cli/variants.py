"""The variants table: parameters and GMACs measured with torch's own FLOP counter, never typed in by hand.

``timm-convmixer variants`` prints the README's table. Models are built on the meta device, so even the largest (62M
parameters) costs no memory and almost no time; ``torch.utils.flop_counter.FlopCounterMode`` counts the convolutions and
the classifier (multiply-adds x 2), so GMACs = FLOPs / 2 / 1e9, the convention timm's results tables use.
"""
import argparse
import json
import warnings
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

import timm

from ..convmixer import EVEN_KERNEL_SPEED_NOTE, default_cfgs

__all__ = ['variant_stats', 'variants_table', 'add_parser', 'run']

# accuracy is quoted only with its source; variants without a sourced number get none
SOURCED_TOP1 = {
    'convmixer_1536_20': ('81.37 (IN-1k, 150 ep)', 'locuslab/convmixer README; timm results 81.382'),
    'convmixer_768_32': ('80.16 (IN-1k, 300 ep)', 'locuslab/convmixer README; timm results 80.158'),
    'convmixer_1024_20_ks9_p14': ('76.94 (IN-1k)', 'locuslab/convmixer README; timm results 76.944'),
    'convmixer_512_16_ks8_p7': ('73.76 (IN-1k, paper as quoted)', 'keras-cv issue 1325'),
    'convmixer_256_8_ks5_p2': ('92.6 (CIFAR-10, 25 ep)', 'locuslab/convmixer-cifar10 README'),
    'convmixer_256_8_ks9_p1': ('96.03 (CIFAR-10)', "paper's CIFAR table, quoted in locuslab/convmixer issue 15"),
}


def variant_stats(name: str, input_size: Optional[int] = None) -> Dict[str, object]:
    """Params, GMACs and architecture of one registered variant at its default (or the given) input size."""
    cfg = timm.get_pretrained_cfg(name).to_dict()
    size = input_size or cfg['input_size'][-1]
    with torch.device('meta'):
        model = timm.create_model(name).eval()
        x = torch.empty(1, cfg['input_size'][0], size, size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), warnings.catch_warnings():
            # eager's speed note for even kernels, nothing to do with counting
            warnings.filterwarnings('ignore', message=EVEN_KERNEL_SPEED_NOTE)
            model(x)
    act = type(model.stem[1]).__name__
    return {
        'model': name,
        'dim': model.num_features,
        'depth': len(model.blocks),
        'kernel_size': model.kernel_size,
        'patch_size': model.patch_size,
        'act': act,
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'gmacs': counter.get_total_flops() / 2 / 1e9,
        'input_size': size,
        'num_classes': cfg['num_classes'],
        'weights': sorted(t for t in timm.list_pretrained(name + '.*')),
        'top1': SOURCED_TOP1.get(name, ('', ''))[0],
        'top1_source': SOURCED_TOP1.get(name, ('', ''))[1],
    }


def variants_table(names: Optional[List[str]] = None) -> str:
    """Markdown table of every variant (the README's)."""
    names = names or list(default_cfgs.keys())
    rows = [variant_stats(n) for n in names]
    lines = [
        '| model | dim/depth | kernel | patch | act | params (M) | GMACs | input | classes | pretrained tags '
        '| top-1 (source) |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        tags = ', '.join('`.' + t.split('.', 1)[1] + '`' for t in r['weights']) or 'none'
        top1 = f"{r['top1']} ({r['top1_source']})" if r['top1'] else '-'
        lines.append(
            f"| `{r['model']}` | {r['dim']}/{r['depth']} | {r['kernel_size']} | {r['patch_size']} | {r['act']} | "
            f"{r['params_m']:.2f} | {r['gmacs']:.2f} | {r['input_size']} | {r['num_classes']} | {tags} | {top1} |")
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([variant_stats(n) for n in default_cfgs.keys()], indent=2))
    else:
        print(variants_table())
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``variants`` on the ``timm-convmixer`` command line."""
    parser = subparsers.add_parser('variants', help='list every registered ConvMixer with params and GMACs')
    parser.add_argument('--json', action='store_true', help='machine-readable output')
    parser.set_defaults(func=run)
    return parser
