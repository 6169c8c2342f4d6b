""" ConvMixer weights, one pipeline: read safely -> select -> strip wrapper prefixes -> timm's layout -> check

Each step lives here once, and every loader goes through here: ``ConvMixer.load_state_dict`` (timm's
``load_checkpoint``, train.py ``--initial-checkpoint``), the pretrained filter ``checkpoint_filter_fn`` (timm's
``load_pretrained``), the ``custom_load`` hook of the authors' release files (:func:`load_pretrained_file`), and
``timm-convmixer convert``/``export``.

* :func:`read_checkpoint`: ``.safetensors`` and torch pickles, never unpickling arbitrary objects unless asked
  (``weights_only=True``; ``argparse.Namespace``, which every train.py checkpoint carries in ``args``, is the one class
  allowed, as timm's own ``load_state_dict`` allows it); a missing, empty, truncated or corrupt file is named with
  its problem.
* :func:`select_weights`: which tensors inside a checkpoint to take (``state_dict_ema``/``model_ema`` when EMA is
  asked for, then ``state_dict``, ``model``, else the checkpoint itself), the order timm's ``load_state_dict`` uses.
* :func:`strip_wrapper_prefixes`: DDP's ``module.`` and torch.compile's ``_orig_mod.``, in either order. timm's
  ``clean_state_dict`` does the same in newer releases (1.0.31), but our floor 1.0.26's strips ``module.`` before
  ``_orig_mod.`` and so leaves ``module.`` on compiled-DDP keys (``_orig_mod.module.*``): not used for that reason.
* :func:`authors_to_timm`: two layouts exist in the wild. timm's (``stem.0``, ``stem.2``, ``blocks.{i}.0.fn.0``,
  ..., ``head``): timm's Hub weights, timm checkpoints and ours; our model uses exactly this layout, so checkpoints
  move between timm's built-in model and ours unchanged. The authors' (locuslab) single ``nn.Sequential``: ``0.*``
  stem conv, ``2.*`` stem BN, ``{3+i}.0.fn.{0,2}.*`` depthwise conv and BN, ``{3+i}.{1,3}.*`` pointwise conv and BN,
  ``{depth+5}.*`` the Linear head.
* :func:`unpack_checkpoint` runs select -> strip -> layout on a checkpoint held in memory;
  :func:`check_state_dict` and :func:`check_finite`/:func:`find_nonfinite` are the checks.

The authors' release files need :func:`load_pretrained_file`: timm's plain url path hands downloads to
``torch.hub.load_state_dict_from_url(weights_only=True)``, which is safe but refuses the ``argparse.Namespace``
inside train.py-style ``.pth.tar`` files. Their tags set ``custom_load=True``, so timm downloads the file into
torch.hub's cache and calls ``ConvMixer.load_pretrained``, which comes here: the file is read with
:func:`read_checkpoint` and handed back to timm's ``load_pretrained`` as an in-memory state dict, so the filter,
classifier reset and stem adaptation are timm's.
"""
import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import safetensors.torch
import torch
import torch.nn as nn
from timm.models import load_pretrained

__all__ = [
    'CheckpointError', 'read_checkpoint', 'select_weights', 'strip_wrapper_prefixes', 'is_authors_layout',
    'authors_to_timm', 'UnpackedWeights', 'unpack_checkpoint', 'load_checkpoint_file', 'load_pretrained_file',
    'check_state_dict', 'describe_state_dict', 'find_nonfinite', 'describe_nonfinite', 'check_finite',
    'NonFiniteWeightsError', 'NonFiniteWeightsWarning', 'EMA_KEYS',
]

PathLike = Union[str, 'os.PathLike[str]']

EMA_KEYS = ('state_dict_ema', 'model_ema')
_WEIGHTS_KEYS = ('state_dict', 'model')
_WRAPPER_PREFIXES = ('_orig_mod.', 'module.', '_orig_mod.')  # torch.compile around DDP, DDP, torch.compile
_AUTHORS_KEY = re.compile(r'^(\d+)\.(.*)$')


# --- read ----------------------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A weight file that cannot be read (missing, truncated, corrupt, or needing an unsafe unpickle)."""


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except Exception as e:  # SafetensorsError / OSError: a header or a data span that does not add up
        raise CheckpointError(
            f'{path}: expected a safetensors file, but it cannot be read ({type(e).__name__}: {e}); '
            f'the file is probably truncated or corrupt ({path.stat().st_size} bytes)') from e


def _torch_load(path: Path, weights_only: bool) -> Any:
    if weights_only and hasattr(torch.serialization, 'safe_globals'):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    return torch.load(str(path), map_location='cpu', weights_only=weights_only)


def _unsafe_globals(path: Path) -> str:
    """The globals a refused pickle needs (``''`` when torch cannot say), for the error message."""
    if not hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint'):
        return ''
    try:
        return ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        return ''


def _read_pickle(path: Path, weights_only: bool) -> Any:
    try:
        return _torch_load(path, weights_only)
    except pickle.UnpicklingError as e:
        found = _unsafe_globals(path) if weights_only else ''
        if found:
            raise CheckpointError(
                f'{path}: refusing to unpickle objects other than tensors and plain containers '
                f'(weights_only=True); the file needs: {found}. Only if you trust where it comes from, '
                f'pass --unsafe-pickle (unsafe_pickle=True)') from e
        raise CheckpointError(
            f'{path}: expected a PyTorch checkpoint (zip or legacy pickle), but it cannot be unpickled '
            f'({e}); the file is probably truncated or corrupt ({path.stat().st_size} bytes)') from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f'{path}: expected a PyTorch checkpoint (zip or legacy pickle), but reading it failed '
            f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); the file is probably truncated or '
            f'corrupt ({path.stat().st_size} bytes)') from e


def read_checkpoint(path: PathLike, weights_only: bool = True) -> Mapping[str, Any]:
    """Read a weight file: ``.safetensors`` by its header, anything else as a torch checkpoint.

    Args:
        path: file to read.
        weights_only: refuse to unpickle anything but tensors, plain containers and ``argparse.Namespace``
            (train.py's ``args``). ``False`` runs arbitrary code from the file: only for files you trust.

    Returns:
        What the file holds: a state dict or a train.py checkpoint dict (see :func:`select_weights`).
        A whole pickled ``nn.Module`` (possible only with ``weights_only=False``) is returned as its state dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if not path.is_file():
        raise CheckpointError(f'{path}: expected a checkpoint file, found a directory or special file')
    if path.stat().st_size == 0:
        raise CheckpointError(f'{path}: the file is empty (0 bytes), expected a checkpoint')
    with path.open('rb') as f:
        head = f.read(16)
    # safetensors: 8-byte little-endian header length, then a JSON object
    is_safetensors = path.suffix == '.safetensors' or (len(head) > 9 and head[8:9] == b'{')
    if is_safetensors:
        return _read_safetensors(path)
    checkpoint = _read_pickle(path, weights_only)
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f'{path}: expected a state dict or a checkpoint dict, found a {type(checkpoint).__name__}')
    return checkpoint


# --- select, strip, convert ----------------------------------------------------------------------------------------

def select_weights(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    """The tensors inside ``checkpoint`` and the key they were found under (``''``: the checkpoint itself).

    Looks in ``state_dict_ema``/``model_ema`` first when ``use_ema``, then ``state_dict``, ``model``: the order of
    timm's ``load_state_dict``. Entries that are not tensors (optimizer state, epoch counters and the like riding
    along in a train.py checkpoint) are dropped.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f'expected a mapping of parameter names to tensors, found {type(checkpoint).__name__}')
    keys = (EMA_KEYS if use_ema else ()) + _WEIGHTS_KEYS
    found = next((k for k in keys if isinstance(checkpoint.get(k), Mapping)), '')
    weights = checkpoint[found] if found else checkpoint
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}, found


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys without DDP's ``module.`` and torch.compile's ``_orig_mod.`` (in either order)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
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


class UnpackedWeights(NamedTuple):
    """What :func:`unpack_checkpoint` found: timm-layout tensors, and where they came from (for messages)."""
    state_dict: Dict[str, torch.Tensor]
    key: str  # the checkpoint key the weights were under ('' for a bare state dict)
    authors_layout: bool  # converted from the authors' nn.Sequential layout

    def describe(self) -> str:
        """``the authors' nn.Sequential layout, weights from `state_dict_ema```, as convert's model card says it."""
        layout = "the authors' nn.Sequential layout" if self.authors_layout else "timm's layout"
        return layout + (f', weights from `{self.key}`' if self.key else '')


def unpack_checkpoint(checkpoint: Mapping[str, Any], use_ema: bool = False) -> UnpackedWeights:
    """Select -> strip -> timm's layout, for a checkpoint in memory (any supported wrapper, prefix and layout)."""
    state_dict, key = select_weights(checkpoint, use_ema=use_ema)
    state_dict = strip_wrapper_prefixes(state_dict)
    authors = is_authors_layout(state_dict)
    return UnpackedWeights(authors_to_timm(state_dict) if authors else state_dict, key, authors)


def load_checkpoint_file(model: nn.Module, path: PathLike, use_ema: bool = True, weights_only: bool = True) -> None:
    """timm's ``load_checkpoint`` (strict, EMA weights first) with :func:`read_checkpoint`'s safe reading and clear
    errors; ``model.load_state_dict`` does the rest of the pipeline and its checks."""
    state_dict, _ = select_weights(read_checkpoint(path, weights_only=weights_only), use_ema=use_ema)
    model.load_state_dict(state_dict, strict=True)


def load_pretrained_file(model: nn.Module, path: PathLike, filter_fn: Callable[..., Dict[str, Any]]) -> None:
    """Load a downloaded release file into ``model`` through timm's ``load_pretrained`` (filter, head, stem).

    Called by ``ConvMixer.load_pretrained`` (timm's ``custom_load`` hook) with its ``checkpoint_filter_fn``.
    The EMA weights are taken when the file has them, as timm's loaders take them.
    """
    state_dict, _ = select_weights(read_checkpoint(path, weights_only=True), use_ema=True)
    if not state_dict:
        raise CheckpointError(f'{path}: the checkpoint holds no tensors')
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    # the same cfg (num_classes, input_size, first_conv, classifier), the weights handed over in memory
    cfg.update(state_dict=state_dict, file=None, url='', hf_hub_id=None, source='', custom_load=False)
    load_pretrained(
        model,
        pretrained_cfg=cfg,
        num_classes=model.num_classes,
        in_chans=getattr(model, 'in_chans', 3),
        filter_fn=filter_fn,
        strict=True,
    )


# --- check ---------------------------------------------------------------------------------------------------------

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
        shapes: bool = True,
        meta_ok: bool = False,
) -> None:
    """Raise one clear RuntimeError listing every missing/unexpected key and shape mismatch, before any copy.

    ``torch.nn.Module.load_state_dict`` copies the tensors that fit and only then raises for the rest, which leaves
    a model half-loaded. Checking first keeps a failed load from touching the model at all. A BatchNorm's
    ``num_batches_tracked`` that torch fills in itself (a checkpoint that predates it: no version metadata, as in a
    safetensors file) is not missing, as it is not for plain timm. ``shapes=False``: keys only (timm's pretrained
    loading adapts the stem to ``in_chans`` after its filter has run). A tensor without data (meta device) cannot be
    copied into a tensor with data, so it fails the check too, unless ``meta_ok`` (``load_state_dict(assign=True)``
    takes it as it is).
    """
    mismatched: List[Tuple[str, tuple, tuple]] = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in found.items()
        if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    ] if shapes else []
    missing = [k for k in expected if k not in found and not _filled_in_by_torch(k, found)] if strict else []
    unexpected = [k for k in found if k not in expected] if strict else []
    dataless = [] if meta_ok else [k for k, v in found.items() if k in expected and isinstance(v, torch.Tensor)
                                   and v.is_meta and not expected[k].is_meta]
    if not (mismatched or missing or unexpected or dataless):
        return
    lines = [f'checkpoint does not fit {what or "this model"}:']
    lines.append(f'  model expects:   {describe_state_dict(expected)}')
    lines.append(f'  checkpoint has:  {describe_state_dict(found)}')
    for k, got, want in mismatched[:8]:
        lines.append(f'  shape of {k}: checkpoint {list(got)}, model {list(want)}')
    if len(mismatched) > 8:
        lines.append(f'  ... and {len(mismatched) - 8} more shape mismatches')
    for label, keys in (('missing from checkpoint', missing), ('not in model', unexpected),
                        ('without data (meta device)', dataless)):
        if keys:
            lines.append(f'  {label} ({len(keys)}): {", ".join(keys[:6])}' + (' ...' if len(keys) > 6 else ''))
    lines.append('  nothing was loaded; the model is unchanged')
    raise RuntimeError('\n'.join(lines))


def _filled_in_by_torch(key: str, found: Mapping[str, torch.Tensor]) -> bool:
    """``nn.BatchNorm2d._load_from_state_dict`` adds a missing ``num_batches_tracked`` where the checkpoint's
    version metadata for the module is absent or below 2."""
    if not key.endswith('.num_batches_tracked'):
        return False
    metadata = getattr(found, '_metadata', None)
    version = None if metadata is None else metadata.get(key[:-len('.num_batches_tracked')], {}).get('version')
    return version is None or version < 2


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
