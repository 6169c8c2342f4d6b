""" ``timm-convmixer convert``: any ConvMixer checkpoint to a Hub-ready folder (and, if asked, to the Hub)

Takes what users actually have: ``.safetensors``; ``.pth``/``.pth.tar`` in timm's layout or the authors'
``nn.Sequential`` layout; train.py checkpoints (``state_dict``/``state_dict_ema``/``model`` wrappers, DDP's
``module.`` and torch.compile's ``_orig_mod.`` prefixes). Writes what timm's ``hf-hub:``/``local-dir:`` loaders read:
``model.safetensors`` and ``config.json`` through timm's own ``save_for_hf``, plus a model card ``README.md`` from
timm's ``generate_readme``.

Order of work, so that a bad input never leaves anything behind: check the name and the output path, read the file
safely (``weights_only``), load it strictly into the named model (our ``load_state_dict`` checks every key and shape
before copying), write into a temporary folder beside OUT, reload that folder through timm's ``local-dir:`` loader
and compare every tensor, and only then rename it to OUT. ``--push`` uploads exactly that verified folder with
huggingface_hub (``create_repo`` + ``upload_folder``, the calls timm's ``push_to_hf_hub`` makes).

Weights holding NaN or Inf (a diverged run) are refused before anything is written, unless ``--allow-nonfinite``.

The folder is for every client people use around timm, not only timm: transformers' ``TimmWrapper`` classes
(``AutoModelForImageClassification``, ``pipeline('image-classification')``) read the same ``config.json`` and call
``timm.create_model(architecture, num_classes=num_labels, **model_args)``. timm 1.0.31's ``save_for_hf`` always
records ``num_classes`` in ``model_args`` too, which makes that call fail ("multiple values for keyword argument"),
so :func:`hub_config` keeps ``num_classes`` only at the top level, where timm (every supported release) and
transformers both read it; class names go at the top level as ``label_names`` for the same reason.
"""
import argparse
import hashlib
import json
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import timm
import torch
from huggingface_hub import HfApi
from timm.models import get_pretrained_cfg, save_for_hf, split_model_name_tag
from timm.models._hub import generate_readme

from ..convmixer import ConvMixer
from ..weights import (
    EMA_KEYS, CheckpointError, NonFiniteWeightsError, NonFiniteWeightsWarning, UnpackedWeights, check_finite,
    read_checkpoint, unpack_checkpoint)
from .args import add_model_kwargs
from .atomic import atomic_write_dir

__all__ = ['convert_checkpoint', 'push_folder', 'hub_config', 'add_parser', 'run']

PathLike = Union[str, Path]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _check_model_name(model_name: str) -> None:
    """Fail before reading a byte when the name or its tag is unknown, or names no ConvMixer (built on the meta device
    to tell: a variant registered by the user is accepted, any other timm model is not)."""
    arch, tag = split_model_name_tag(model_name)
    if not timm.is_model(arch):
        known = ', '.join(timm.list_models('convmixer*'))
        raise ValueError(f'unknown model {arch!r}; expected one of: {known}')
    if tag and get_pretrained_cfg(model_name) is None:
        raise ValueError(f'unknown pretrained tag {tag!r} for {arch}')
    with torch.device('meta'):
        model = timm.create_model(arch, pretrained=False)
    if not isinstance(model, ConvMixer):
        raise ValueError(f'{arch} builds a {type(model).__name__}; convert handles ConvMixer variants only')


def _infer_io(state_dict: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """``num_classes``/``in_chans`` as the weights have them (a fine-tuned head, a 1-channel stem)."""
    out = {}
    head = state_dict.get('head.weight')
    out['num_classes'] = int(head.shape[0]) if head is not None and head.ndim == 2 else 0
    stem = state_dict.get('stem.0.weight')
    if stem is not None and stem.ndim == 4:
        out['in_chans'] = int(stem.shape[1])
    return out


def _model_card(model, model_name: str, src: Path, digest: str, source_desc: str) -> Dict[str, Any]:
    cfg = model.pretrained_cfg
    params = sum(p.numel() for p in model.parameters()) / 1e6
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': f'{params:.2f}',
            'Image size': 'x'.join(str(s) for s in cfg.get('input_size', (3, 224, 224))[1:]),
            'Classes': model.num_classes,
        },
        'Papers': {'Patches Are All You Need?': 'https://arxiv.org/abs/2201.09792'},
        'Original': cfg.get('origin_url') or 'https://github.com/locuslab/convmixer',
        'Converted from': f'`{src.name}` (sha256 `{digest}`), {source_desc}',
    }
    if cfg.get('tag', '') and 'in1k' in cfg.get('tag', ''):
        details['Dataset'] = 'ImageNet-1k'
    usage = (
        '```python\n'
        'import timm  # with timm-convmixer installed (pip install timm-convmixer)\n'
        'model = timm.create_model("hf-hub:<this repo id>", pretrained=True).eval()\n'
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**data_config, is_training=False)\n'
        '```\n'
        '\n'
        'From transformers (`timm` and `timm-convmixer` installed):\n'
        '\n'
        '```python\n'
        'from transformers import pipeline\n'
        'classify = pipeline("image-classification", model="<this repo id>")\n'
        '```\n'
    )
    return dict(
        tags=['image-classification', 'timm', 'convmixer'],
        license=cfg.get('license', 'mit'),
        description=f'A ConvMixer ({model_name}) in timm\'s format, converted with `timm-convmixer convert`.',
        details=details,
        usage=usage,
        citation=(
            '@article{trockman2023patches,\n  title={Patches Are All You Need?},\n'
            '  author={Trockman, Asher and Kolter, J. Zico},\n  journal={Transactions on Machine Learning Research},\n'
            '  year={2023}\n}'),
    )


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes: unlike ``torch.equal``, a NaN equals the same NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _verify_folder(folder: Path, expected: Dict[str, torch.Tensor]) -> None:
    """Reload ``folder`` the way users will (``local-dir:``) and demand bit-identical tensors."""
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).state_dict()
    if set(reloaded) != set(expected):
        raise RuntimeError(f'verification failed: the written folder reloads with different keys '
                           f'(missing {sorted(set(expected) - set(reloaded))[:4]}, '
                           f'extra {sorted(set(reloaded) - set(expected))[:4]})')
    for k, v in expected.items():
        if not _bitwise_equal(reloaded[k], v):
            raise RuntimeError(f'verification failed: {k} differs after reloading the written folder')


def hub_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """``config.json`` as written by timm's ``save_for_hf``, made loadable by transformers as well as timm.

    transformers' ``TimmWrapperForImageClassification`` passes ``num_classes=config.num_labels`` beside
    ``**model_args`` (``TimmWrapperModel`` passes ``num_classes=0``), so ``num_classes`` must not be in
    ``model_args``; timm builds the head from the top-level ``num_classes`` (its pretrained cfg's), so nothing is
    lost. transformers reads class names only from a top-level ``label_names``.
    """
    config = json.loads(json.dumps(config))  # a deep copy
    model_args = config.get('model_args') or {}
    num_classes = model_args.pop('num_classes', config.get('num_classes'))
    if config.get('num_classes') != num_classes:
        raise ValueError(f'config.json disagrees with itself: num_classes {config.get("num_classes")} at the top '
                         f'level, {num_classes} in model_args')
    if 'model_args' in config:
        config['model_args'] = model_args
    label_names = config.get('label_names') or (config.get('pretrained_cfg') or {}).get('label_names')
    if isinstance(label_names, (list, tuple)) and len(label_names) == num_classes:
        config['label_names'] = list(label_names)
    return config


def convert_checkpoint(
        src: PathLike,
        out: PathLike,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        force: bool = False,
        use_ema: bool = False,
        unsafe_pickle: bool = False,
        allow_nonfinite: bool = False,
        push_to: Optional[str] = None,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: Optional[str] = None,
        verbose: bool = False,
) -> Path:
    """Convert ``src`` into a Hub-ready folder ``out`` for ``model_name``; optionally push it.

    Args:
        src: a weight file (see module docstring for the layouts understood).
        out: folder to create; an existing one is replaced only with ``force`` (and only once all checks passed).
        model_name: registered ConvMixer name, optionally with a tag for its pretrained cfg (mean/std, input size),
            e.g. ``convmixer_768_32.authors_in1k``.
        model_kwargs: architecture overrides (``depth=2``); ``num_classes``/``in_chans`` default to the weights'.
        force: replace an existing ``out``.
        use_ema: take ``state_dict_ema``/``model_ema`` from a train.py checkpoint instead of ``state_dict``.
        unsafe_pickle: allow arbitrary pickled objects (``torch.load(weights_only=False)``): trusted files only.
        allow_nonfinite: write weights holding NaN/Inf (with a warning) instead of raising
            :class:`NonFiniteWeightsError`.
        push_to: Hub repo id to publish the verified folder to.
        token, private, commit_message: passed to huggingface_hub when pushing.
        verbose: print progress.

    Returns:
        The path of the written folder.
    """
    src, out = Path(src), Path(out)
    _check_model_name(model_name)
    _check_out(out, force)
    weights = _read_weights(src, use_ema, unsafe_pickle, allow_nonfinite)
    model, kwargs = _load_strictly(weights.state_dict, model_name, model_kwargs)
    if verbose:
        print(f'loaded {src} ({weights.describe()}) strictly into {model_name} {kwargs}')
    label_names = _prepare_hub_cfg(model)
    card = _model_card(model, model_name, src, _sha256(src), weights.describe())
    name = push_to.split('/')[-1] if push_to else out.resolve().name
    atomic_write_dir(str(out), partial(_write_folder, model=model, kwargs=kwargs, label_names=label_names,
                                       card=card, name=name), replace=force)
    if verbose:
        print(f'wrote {out}: ' + ', '.join(sorted(p.name for p in out.iterdir())))
    if push_to:
        url = push_folder(out, push_to, token=token, private=private, commit_message=commit_message)
        if verbose:
            print(f'pushed to {url}')
    return out


# what a convert writes: the only entries a folder that --force replaces may hold
WRITTEN = frozenset({'config.json', 'model.safetensors', 'README.md'})


def _check_out(out: Path, force: bool) -> None:
    """Fail before reading a byte when OUT is there and may not be replaced. ``--force`` replaces an earlier
    convert's output only: a folder holding anything else (``.``, a project, the source checkpoint) is the user's."""
    if not out.exists():
        return
    if not force:
        raise FileExistsError(f'{out} already exists; pass --force (force=True) to replace it')
    if not out.is_dir():
        raise FileExistsError(f'{out} exists and is not a folder; refusing to replace it')
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise FileExistsError(f'{out} is the current folder or holds it; refusing to replace it')
    others = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN)
    if others:
        raise FileExistsError(f'{out} holds files convert did not write ({", ".join(others[:5])}); --force '
                              'replaces only an earlier convert output: choose another OUT')


def _read_weights(src: Path, use_ema: bool, unsafe_pickle: bool, allow_nonfinite: bool) -> UnpackedWeights:
    """The weights in ``src`` in timm's layout, through the package's one weights pipeline, refusing non-finite
    values unless ``allow_nonfinite``."""
    checkpoint = read_checkpoint(src, weights_only=not unsafe_pickle)
    weights = unpack_checkpoint(checkpoint, use_ema=use_ema)
    if use_ema and weights.key not in EMA_KEYS:
        raise CheckpointError(f'{src}: --use-ema asked for EMA weights, but the checkpoint has no state_dict_ema/'
                              f'model_ema (keys: {", ".join(list(checkpoint)[:8])})')
    if not weights.state_dict:
        raise CheckpointError(f'{src}: no tensors found (keys: {", ".join(list(checkpoint)[:8])})')
    try:
        check_finite(weights.state_dict, what=f'{src}: the weights')
    except NonFiniteWeightsError as e:
        if not allow_nonfinite:
            raise NonFiniteWeightsError(f'{e}. Nothing was written; pass --allow-nonfinite (allow_nonfinite=True) '
                                        f'to convert them anyway') from None
        warnings.warn(f'{e}; converting them anyway (allow_nonfinite)', NonFiniteWeightsWarning, stacklevel=3)
    return weights


def _load_strictly(
        state_dict: Dict[str, torch.Tensor],
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]],
) -> Tuple[ConvMixer, Dict[str, Any]]:
    """``model_name`` built for the weights (their ``num_classes``/``in_chans`` unless overridden) with them loaded
    strictly, in eval mode; and the kwargs it was built with."""
    kwargs = dict(_infer_io(state_dict))
    kwargs.update(model_kwargs or {})
    model = timm.create_model(model_name, pretrained=False, **kwargs)  # a ConvMixer: _check_model_name said so
    with warnings.catch_warnings():  # non-finite weights were reported already, once
        warnings.simplefilter('ignore', NonFiniteWeightsWarning)
        model.load_state_dict(state_dict, strict=True)  # every key and shape checked before a tensor is copied
    return model.eval(), kwargs


def _prepare_hub_cfg(model: ConvMixer) -> Optional[List[str]]:
    """Set the pretrained cfg the folder will carry; returns the class names that still apply (or None)."""
    cfg = dict(model.pretrained_cfg)
    # exports always hold native timm tensors: never ask loaders for the custom (authors' file) path
    cfg['custom_load'] = False
    label_names = cfg.get('label_names')
    if label_names is not None and len(label_names) != model.num_classes:
        # a new head (fine-tuned on other classes): the variant's class names no longer apply
        cfg.pop('label_names', None)
        cfg.pop('label_descriptions', None)
        label_names = None
    model.pretrained_cfg = cfg
    return list(label_names) if label_names else None


def _write_folder(
        tmp: str,
        model: ConvMixer,
        kwargs: Dict[str, Any],
        label_names: Optional[List[str]],
        card: Dict[str, Any],
        name: str,
) -> None:
    """Write the Hub folder into ``tmp`` (timm's ``save_for_hf``, :func:`hub_config`, the model card), then reload
    it as users will and compare every tensor."""
    folder = Path(tmp)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # model_args in config.json rebuild this exact architecture on `local-dir:`/`hf-hub:` loads (recent timm
    # infers them from the model; older releases write only what is passed)
    save_for_hf(model, tmp, model_args=kwargs, safe_serialization=True,
                model_config=dict(label_names=label_names) if label_names else None)
    config_path = folder / 'config.json'
    config = hub_config(json.loads(config_path.read_text(encoding='utf-8')))
    config_path.write_text(json.dumps(config, indent=2), encoding='utf-8')
    (folder / 'README.md').write_text(generate_readme(card, name), encoding='utf-8')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NonFiniteWeightsWarning)
        _verify_folder(folder, expected)


def push_folder(
        folder: PathLike,
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: Optional[str] = None,
) -> str:
    """Publish a converted folder as it is: ``create_repo(exist_ok=True)`` then ``upload_folder``."""
    folder = Path(folder)
    missing = [n for n in ('model.safetensors', 'config.json') if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f'{folder} is not a converted folder: missing {", ".join(missing)}')
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=str(folder),
        commit_message=commit_message or 'Add ConvMixer weights (timm-convmixer convert)',
        allow_patterns=['model.safetensors', 'config.json', 'README.md'],
    )
    return getattr(info, 'commit_url', None) or str(info)


def run(args: argparse.Namespace) -> int:
    """(Errors are said in one line by the command line's :func:`..main`.)"""
    out = convert_checkpoint(
        args.src, args.out, args.model,
        model_kwargs=args.model_kwargs,
        force=args.force,
        use_ema=args.use_ema,
        unsafe_pickle=args.unsafe_pickle,
        allow_nonfinite=args.allow_nonfinite,
        push_to=args.push,
        token=args.token,
        private=args.private,
        verbose=True,
    )
    print(f'done: {out}')
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``convert`` on the ``timm-convmixer`` command line."""
    parser = subparsers.add_parser(
        'convert',
        help='turn a ConvMixer checkpoint into a Hub-ready folder (model.safetensors, config.json, README.md)',
        description='Turn a ConvMixer checkpoint into a Hub-ready folder (and, if asked, publish it to the Hub).',
    )
    parser.add_argument('src', help='checkpoint: .safetensors, .pth/.pth.tar (timm or authors\' layout, train.py)')
    parser.add_argument('out', help='folder to write (must not exist unless --force)')
    parser.add_argument('--model', required=True, help='ConvMixer name, optionally name.tag (e.g. convmixer_768_32)')
    add_model_kwargs(
        parser, help='architecture overrides, e.g. depth=2 (num_classes/in_chans default to the weights\')')
    parser.add_argument('--force', action='store_true', help='replace an existing OUT folder')
    parser.add_argument('--use-ema', action='store_true', help='take the EMA weights of a train.py checkpoint')
    parser.add_argument('--push', metavar='REPO_ID', default=None, help='publish the folder to this Hub repo')
    parser.add_argument('--private', action='store_true', help='create the Hub repo as private')
    parser.add_argument('--token', default=None, help='Hub token (default: huggingface_hub\'s, e.g. HF_TOKEN)')
    parser.add_argument('--unsafe-pickle', action='store_true',
                        help='allow arbitrary pickled objects (torch.load weights_only=False); trusted files only')
    parser.add_argument('--allow-nonfinite', action='store_true',
                        help='convert weights holding NaN/Inf (refused by default: a diverged run)')
    parser.set_defaults(func=run)
    return parser
