"""``timm-convmixer`` command line: one entry, one sub-command per module.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``; the module is imported only when the
command line is parsed, so ``timm-convmixer --help`` stays light.
"""
import argparse
import ast
import importlib
import sys
from typing import List, Optional

# sub-command name -> module that defines it (module.add_parser(subparsers) sets ``func`` on its parser)
COMMANDS = {
    'variants': 'timm_convmixer.variants',
    'convert': 'timm_convmixer.convert',
    'bench': 'timm_convmixer.bench',
    'demo': 'timm_convmixer.demo',
    'export': 'timm_convmixer.export',
}


class ModelKwargs(argparse.Action):
    """``--model-kwargs key=value ...`` as train.py reads it (timm's ``ParseKwargs``: values as Python literals, else
    strings), shared by every sub-command; an item without ``key=`` is a usage error naming it, not a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key:
                parser.error(f'argument {option_string}: expected key=value, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-convmixer', description=__doc__.splitlines()[0])
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
