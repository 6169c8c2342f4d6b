"""``timm-convmixer`` command line: one entry, one sub-command per module.

The tools around the plugin live here, apart from what ``import timm`` loads (``convmixer``, ``weights``, ``fast``).
Every sub-command module has the same two functions: ``add_parser(subparsers)`` adds its parser and sets
``run`` as the handler (``func``), and ``run(args) -> int`` does the work and returns the exit code. :func:`main`
also records the command line it parsed in ``args.argv`` (the bench writes it into its results). Shared argument
types are in :mod:`timm_convmixer.cli.args`. A module is imported only when the command line is built, so a plain
``import timm_convmixer`` never loads this package.

The tools' modules: ``variants``, ``convert``, ``bench``, ``demo``, ``export`` (the sub-commands); ``shapes`` (the
demo's generated dataset), ``onecycle`` (the authors' LR schedule for the demo and ``examples/train_onecycle.py``),
``atomic`` (atomic writes of every output), ``measure`` (the timing, memory and results-file helpers ``bench`` and
the scripts in ``benchmarks/`` share), ``bench_engines`` (``bench --engines``: ours against the other CPU engines).
"""
import argparse
import importlib
import os
import sys
from typing import List, Optional

TRACEBACK_ENV = 'TIMM_CONVMIXER_TRACEBACK'

# sub-command name -> module that defines it
COMMANDS = {
    'variants': 'timm_convmixer.cli.variants',
    'convert': 'timm_convmixer.cli.convert',
    'bench': 'timm_convmixer.cli.bench',
    'demo': 'timm_convmixer.cli.demo',
    'export': 'timm_convmixer.cli.export',
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-convmixer', description=__doc__.splitlines()[0].replace('``', ''))
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # a command whose module is not part of this build
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    args.argv = argv
    try:
        return int(args.func(args))
    except (ValueError, OSError, TypeError, RuntimeError, ImportError) as e:
        # bad input (an unknown model, a missing file, kwargs the model does not take, a Hub that cannot be
        # reached, a missing optional package) is said in one line; TIMM_CONVMIXER_TRACEBACK=1 shows where it was
        # raised. Errors of other kinds (IndexError, KeyError...) are bugs: their traceback is printed.
        if os.environ.get(TRACEBACK_ENV, '').strip().lower() not in ('', '0', 'false', 'no', 'off'):
            raise
        message = str(e) or type(e).__name__
        if not isinstance(e, (ValueError, OSError)):  # (these may also be a bug's: say how to see where)
            message += f' ({TRACEBACK_ENV}=1 shows where it was raised)'
        print(f'timm-convmixer {args.command}: error: {message}', file=sys.stderr)
        return 1
