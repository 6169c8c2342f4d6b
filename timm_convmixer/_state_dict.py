"""State-dict layouts ConvMixer weights come in, and an all-or-nothing check before anything is copied.

Two layouts exist in the wild:

* timm's (``stem.0``, ``stem.2``, ``blocks.{i}.0.fn.0``, ..., ``head``): timm's Hub weights, timm checkpoints and
  ours. Our model uses exactly this layout, so checkpoints move between timm's built-in model and ours unchanged.
* the authors' (locuslab) single ``nn.Sequential``: ``0.*`` stem conv, ``2.*`` stem BN, ``{3+i}.0.fn.{0,2}.*``
  depthwise conv and BN, ``{3+i}.{1,3}.*`` pointwise conv and BN, ``{depth+5}.*`` the Linear head.
"""
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    'is_authors_layout', 'authors_to_timm', 'unwrap_checkpoint', 'to_timm_layout', 'check_state_dict',
    'describe_state_dict', 'find_nonfinite', 'describe_nonfinite', 'check_finite', 'NonFiniteWeightsError',
    'NonFiniteWeightsWarning',
]

_AUTHORS_KEY = re.compile(r'^(\d+)\.(.*)$')


def unwrap_checkpoint(checkpoint: Mapping[str, object], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Return the tensor dict inside a checkpoint (``state_dict_ema``/``state_dict``/``model`` wrappers, DDP's
    ``module.`` prefix), the way timm's ``load_state_dict`` does, for checkpoints handed over as objects."""
    state_dict = checkpoint
    keys = ('state_dict_ema', 'model_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
    for key in keys:
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping):
            state_dict = inner
            break
    if not isinstance(state_dict, Mapping):
        raise TypeError(f'expected a mapping of parameter names to tensors, found {type(state_dict).__name__}')
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer state, epoch counters and the like riding along in a train.py checkpoint
        out[k[7:] if k.startswith('module.') else k] = v
    return out


def is_authors_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys are the authors' bare ``nn.Sequential`` indices (``0.weight``, ``3.0.fn.0.weight``...)."""
    return '0.weight' in state_dict and all(_AUTHORS_KEY.match(k) for k in state_dict)


def authors_to_timm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the authors' ``nn.Sequential`` keys to timm's layout. Depth is read from the keys themselves."""
    indices = sorted({int(_AUTHORS_KEY.match(k).group(1)) for k in state_dict})
    head_index = indices[-1]
    depth = head_index - 5
    if depth < 1:
        raise ValueError(f'authors-layout checkpoint has too few entries (top index {head_index}) to be a ConvMixer')
    out = {}
    for key, value in state_dict.items():
        index_str, rest = _AUTHORS_KEY.match(key).groups()
        index = int(index_str)
        if index in (0, 2):
            new_key = f'stem.{index}.{rest}'
        elif 3 <= index < 3 + depth:
            new_key = f'blocks.{index - 3}.{rest}'
        elif index == head_index:
            new_key = f'head.{rest}'
        else:
            raise ValueError(f'unexpected key {key!r} in an authors-layout ConvMixer checkpoint of depth {depth}')
        out[new_key] = value
    return out


def _strip_wrapper_prefixes(key: str) -> str:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` (in either order), as timm's clean_state_dict does
    in newer releases; timm 1.0.26's (our floor) leaves ``module.`` on compiled-DDP keys (``_orig_mod.module.*``)."""
    for prefix in ('_orig_mod.', 'module.', '_orig_mod.'):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def to_timm_layout(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Any supported layout (timm's, the authors', DDP- or torch.compile-prefixed) to timm's layout."""
    state_dict = {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    if is_authors_layout(state_dict):
        return authors_to_timm(state_dict)
    return state_dict


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A one-line summary of the architecture a timm-layout state dict encodes, for error messages."""
    parts = []
    stem = state_dict.get('stem.0.weight')
    if stem is not None and stem.ndim == 4:
        parts.append(f'dim={stem.shape[0]} in_chans={stem.shape[1]} patch_size={stem.shape[-1]}')
    depth = len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
    if depth:
        parts.append(f'depth={depth}')
    dw = state_dict.get('blocks.0.0.fn.0.weight')
    if dw is not None and dw.ndim == 4:
        parts.append(f'kernel_size={dw.shape[-1]}')
    head = state_dict.get('head.weight')
    if head is not None and head.ndim == 2:
        parts.append(f'num_classes={head.shape[0]}')
    return ' '.join(parts) if parts else f'{len(state_dict)} tensors, none of them ConvMixer-shaped'


def check_state_dict(
        expected: Mapping[str, torch.Tensor],
        found: Mapping[str, torch.Tensor],
        strict: bool,
        what: Optional[str] = None,
) -> None:
    """Raise one clear RuntimeError listing every missing/unexpected key and shape mismatch, before any copy.

    ``torch.nn.Module.load_state_dict`` copies the tensors that fit and only then raises for the rest, which leaves
    a model half-loaded. Checking first keeps a failed load from touching the model at all.
    """
    mismatched: List[Tuple[str, tuple, tuple]] = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in found.items()
        if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in found] if strict else []
    unexpected = [k for k in found if k not in expected] if strict else []
    if not (mismatched or missing or unexpected):
        return
    lines = [f'checkpoint does not fit {what or "this model"}:']
    lines.append(f'  model expects:   {describe_state_dict(expected)}')
    lines.append(f'  checkpoint has:  {describe_state_dict(found)}')
    for k, got, want in mismatched[:8]:
        lines.append(f'  shape of {k}: checkpoint {list(got)}, model {list(want)}')
    if len(mismatched) > 8:
        lines.append(f'  ... and {len(mismatched) - 8} more shape mismatches')
    if missing:
        lines.append(f'  missing from checkpoint ({len(missing)}): {", ".join(missing[:6])}' +
                     (' ...' if len(missing) > 6 else ''))
    if unexpected:
        lines.append(f'  not in model ({len(unexpected)}): {", ".join(unexpected[:6])}' +
                     (' ...' if len(unexpected) > 6 else ''))
    lines.append('  nothing was loaded; the model is unchanged')
    raise RuntimeError('\n'.join(lines))


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or Inf (a diverged training run), refused where they would be published."""


class NonFiniteWeightsWarning(UserWarning):
    """Weights holding NaN or Inf were loaded into a model (allowed, to debug a diverged run)."""


def find_nonfinite(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, int]]:
    """``{name: (NaN count, Inf count)}`` for every floating-point tensor holding a NaN or an Inf, in key order.

    Integer tensors (BatchNorm's ``num_batches_tracked``) cannot hold either; tensors without data (meta device)
    are skipped.
    """
    found = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or value.is_meta:
            continue
        if not (value.is_floating_point() or value.is_complex()):
            continue
        if bool(torch.isfinite(value).all()):
            continue
        found[name] = (int(torch.isnan(value).sum()), int(torch.isinf(value).sum()))
    return found


def describe_nonfinite(found: Mapping[str, Tuple[int, int]], total: int, limit: int = 4) -> str:
    """``2 of 37 tensors: blocks.3.1.weight (12 NaN), head.bias (1 Inf)``, naming the first ``limit``."""
    def counts(nan: int, inf: int) -> str:
        return ', '.join(f'{n} {what}' for n, what in ((nan, 'NaN'), (inf, 'Inf')) if n)
    names = [f'{k} ({counts(*v)})' for k, v in list(found.items())[:limit]]
    more = f' and {len(found) - limit} more' if len(found) > limit else ''
    return f'{len(found)} of {total} tensors: {", ".join(names)}{more}'


def check_finite(state_dict: Mapping[str, torch.Tensor], what: str = 'the weights') -> None:
    """Raise :class:`NonFiniteWeightsError` naming the tensors (first few) that hold NaN or Inf.

    The check ``timm-convmixer convert`` makes before writing anything: a diverged run's weights would otherwise be
    published, and every forward pass of them returns NaN.
    """
    found = find_nonfinite(state_dict)
    if found:
        raise NonFiniteWeightsError(
            f'{what} hold non-finite values (NaN/Inf) in {describe_nonfinite(found, len(state_dict))}; '
            f'the training run that made them probably diverged')
