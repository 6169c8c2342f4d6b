"""timm-convmixer: the ConvMixer family as a timm plugin.

Importing this package registers every variant with timm's model registry (``timm.create_model``); installed with
pip, the package also arms a start-up hook so that a plain ``import timm`` registers them (see the top-level
``_timm_convmixer_autoload`` module).
"""
from .version import __version__
from .convmixer import ConvMixer, MixerBlock, checkpoint_filter_fn, default_cfgs
from .weights import NonFiniteWeightsError, NonFiniteWeightsWarning, check_finite, find_nonfinite

__all__ = [
    'ConvMixer', 'MixerBlock', 'checkpoint_filter_fn', 'default_cfgs', 'list_variants', 'check_finite',
    'find_nonfinite', 'NonFiniteWeightsError', 'NonFiniteWeightsWarning', '__version__',
]


def list_variants() -> list:
    """Names of every ConvMixer entrypoint this package registers."""
    return sorted(default_cfgs.keys())
