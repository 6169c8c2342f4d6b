""" Reading weight files safely, and the ``custom_load`` hook for the authors' release files

Every weight source ends in timm's own loader (``load_pretrained`` with :func:`checkpoint_filter_fn`), so head
resetting (``num_classes=N``) and stem adaptation (``in_chans=1/2/4+``) behave exactly as for any timm model. This
module only adds what timm's paths lack for ConvMixer's files:

* :func:`read_checkpoint`: one reader for ``.safetensors`` and torch pickles that never unpickles arbitrary objects
  unless asked (``weights_only=True``; ``argparse.Namespace``, which every train.py checkpoint carries in ``args``, is
  the one class allowed, as timm's own ``load_state_dict`` allows it), and that names the file and the problem when
  a file is missing, empty, truncated or corrupt.
* :func:`load_pretrained_file`: the ``.authors_in1k`` tags set ``custom_load=True``. timm's plain url path hands the
  download to ``torch.hub.load_state_dict_from_url(weights_only=True)``, which is safe but refuses the
  ``argparse.Namespace`` inside train.py-style ``.pth.tar`` files; with ``custom_load`` timm downloads the file into
  torch.hub's cache and calls ``ConvMixer.load_pretrained``, which comes here: the file is read with
  :func:`read_checkpoint` and handed back to timm's ``load_pretrained`` as an in-memory state dict, so the filter,
  classifier reset and stem adaptation are timm's.
"""
import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
import torch.nn as nn

__all__ = ['CheckpointError', 'read_checkpoint', 'load_pretrained_file']

PathLike = Union[str, 'os.PathLike[str]']


class CheckpointError(ValueError):
    """A weight file that cannot be read (missing, truncated, corrupt, or needing an unsafe unpickle)."""


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    import safetensors.torch
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except Exception as e:  # SafetensorsError / OSError: a header or a data span that does not add up
        raise CheckpointError(
            f'{path}: expected a safetensors file, but it cannot be read ({type(e).__name__}: {e}); '
            f'the file is probably truncated or corrupt ({path.stat().st_size} bytes)') from e


def _read_pickle(path: Path, weights_only: bool) -> Any:
    try:
        if weights_only:
            if hasattr(torch.serialization, 'safe_globals'):
                with torch.serialization.safe_globals([argparse.Namespace]):
                    return torch.load(str(path), map_location='cpu', weights_only=True)
            return torch.load(str(path), map_location='cpu', weights_only=True)
        return torch.load(str(path), map_location='cpu', weights_only=False)
    except pickle.UnpicklingError as e:
        if weights_only:
            found = ''
            if hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint'):
                try:
                    found = ', '.join(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
                except Exception:
                    found = ''
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
        What the file holds: a state dict or a train.py checkpoint dict (see ``_state_dict.unwrap_checkpoint``).
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


def _select_weights(checkpoint: Mapping[str, Any], use_ema: bool = True) -> Mapping[str, Any]:
    """The weights timm's ``load_state_dict`` would pick: EMA first when asked, then ``state_dict``, ``model``."""
    keys = ('state_dict_ema', 'model_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
    for key in keys:
        if isinstance(checkpoint.get(key, None), Mapping):
            return checkpoint[key]
    return checkpoint


def load_pretrained_file(model: nn.Module, path: PathLike) -> None:
    """Load a downloaded release file into ``model`` through timm's ``load_pretrained`` (filter, head, stem).

    Called by ``ConvMixer.load_pretrained`` when a pretrained cfg has ``custom_load=True``.
    """
    from timm.models import load_pretrained
    from .convmixer import checkpoint_filter_fn

    state_dict = dict(_select_weights(read_checkpoint(path, weights_only=True)))
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
        filter_fn=checkpoint_filter_fn,
        strict=True,
    )
