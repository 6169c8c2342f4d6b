"""Argument types shared by the ``timm-convmixer`` sub-commands."""
import argparse
import ast
from typing import Any

__all__ = ['ModelKwargs', 'add_model_kwargs', 'nonnegative_int', 'positive_int']


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


def add_model_kwargs(parser: Any, help: str, none_if_absent: bool = False) -> None:
    """``--model-kwargs KEY=VALUE ...`` on ``parser`` (or an argument group): architecture overrides for
    ``timm.create_model``, ``{}`` when absent, or ``None`` with ``none_if_absent`` (for a command whose default
    model has defaults of its own, to tell "not given" from "given empty")."""
    parser.add_argument('--model-kwargs', nargs='*', default=None if none_if_absent else {}, action=ModelKwargs,
                        metavar='KEY=VALUE', help=help)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a batch size, an iteration count), else a usage error naming it."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (warm-up iterations)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
    if value < low:
        raise argparse.ArgumentTypeError(f'expected an integer >= {low}, got {value}')
    return value
