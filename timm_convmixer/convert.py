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
"""
import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ._state_dict import is_authors_layout, to_timm_layout, unwrap_checkpoint
from .cli import ModelKwargs
from .hub import CheckpointError, read_checkpoint

__all__ = ['convert_checkpoint', 'push_folder', 'add_parser']

PathLike = Union[str, Path]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _check_model_name(model_name: str) -> None:
    """Fail before reading a byte when the name or its tag is unknown."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(model_name)
    if not timm.is_model(arch):
        known = ', '.join(timm.list_models('convmixer*'))
        raise ValueError(f'unknown model {arch!r}; expected one of: {known}')
    if tag and get_pretrained_cfg(model_name) is None:
        raise ValueError(f'unknown pretrained tag {tag!r} for {arch}')


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


def _verify_folder(folder: Path, expected: Dict[str, torch.Tensor]) -> None:
    """Reload ``folder`` the way users will (``local-dir:``) and demand bit-identical tensors."""
    import timm
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).state_dict()
    if set(reloaded) != set(expected):
        raise RuntimeError(f'verification failed: the written folder reloads with different keys '
                           f'(missing {sorted(set(expected) - set(reloaded))[:4]}, '
                           f'extra {sorted(set(reloaded) - set(expected))[:4]})')
    for k, v in expected.items():
        if not torch.equal(reloaded[k], v):
            raise RuntimeError(f'verification failed: {k} differs after reloading the written folder')


def convert_checkpoint(
        src: PathLike,
        out: PathLike,
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        force: bool = False,
        use_ema: bool = False,
        unsafe_pickle: bool = False,
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
        push_to: Hub repo id to publish the verified folder to.
        token, private, commit_message: passed to huggingface_hub when pushing.
        verbose: print progress.

    Returns:
        The path of the written folder.
    """
    import timm
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme
    from .convmixer import ConvMixer

    src, out = Path(src), Path(out)
    log = print if verbose else (lambda *a, **k: None)
    _check_model_name(model_name)
    if out.exists() and not force:
        raise FileExistsError(f'{out} already exists; pass --force (force=True) to replace it')
    if out.exists() and not out.is_dir():
        raise FileExistsError(f'{out} exists and is not a folder; refusing to replace it')

    checkpoint = read_checkpoint(src, weights_only=not unsafe_pickle)
    if use_ema and not any(isinstance(checkpoint.get(k), dict) for k in ('state_dict_ema', 'model_ema')):
        raise CheckpointError(f'{src}: --use-ema asked for EMA weights, but the checkpoint has no state_dict_ema/'
                              f'model_ema (keys: {", ".join(list(checkpoint)[:8])})')
    state_dict = unwrap_checkpoint(checkpoint, use_ema=use_ema)
    if not state_dict:
        raise CheckpointError(f'{src}: no tensors found (keys: {", ".join(list(checkpoint)[:8])})')
    wrapper = next((k for k in (('state_dict_ema', 'model_ema') if use_ema else ()) + ('state_dict', 'model')
                    if isinstance(checkpoint.get(k), dict)), None)
    layout = 'the authors\' nn.Sequential layout' if is_authors_layout(to_timm_layout_keys(state_dict)) \
        else 'timm\'s layout'
    state_dict = to_timm_layout(state_dict)
    source_desc = layout + (f', weights from `{wrapper}`' if wrapper else '')

    kwargs = dict(_infer_io(state_dict))
    kwargs.update(model_kwargs or {})
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if not isinstance(model, ConvMixer):
        raise ValueError(f'{model_name} builds a {type(model).__name__}; convert handles ConvMixer variants only')
    model.load_state_dict(state_dict, strict=True)  # every key and shape checked before a tensor is copied
    model.eval()
    log(f'loaded {src} ({source_desc}) strictly into {model_name} {kwargs}')
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # exports always hold native timm tensors: never ask loaders for the custom (authors' file) path
    model.pretrained_cfg = {**model.pretrained_cfg, 'custom_load': False}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        # model_args in config.json rebuild this exact architecture on `local-dir:`/`hf-hub:` loads (recent timm
        # infers them from the model; older releases write only what is passed)
        save_for_hf(model, str(tmp), model_args=kwargs, safe_serialization=True)
        card = _model_card(model, model_name, src, _sha256(src), source_desc)
        (tmp / 'README.md').write_text(generate_readme(card, out.name if not push_to else push_to.split('/')[-1]),
                                       encoding='utf-8')
        _verify_folder(tmp, expected)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
            out.replace(old / out.name)
            tmp.replace(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f'wrote {out}: ' + ', '.join(sorted(p.name for p in out.iterdir())))
    if push_to:
        url = push_folder(out, push_to, token=token, private=private, commit_message=commit_message)
        log(f'pushed to {url}')
    return out


def to_timm_layout_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys with wrapper prefixes dropped (to tell the layout apart before renaming)."""
    from ._state_dict import _strip_wrapper_prefixes
    return {_strip_wrapper_prefixes(k): v for k, v in state_dict.items()}


def push_folder(
        folder: PathLike,
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: Optional[str] = None,
) -> str:
    """Publish a converted folder as it is: ``create_repo(exist_ok=True)`` then ``upload_folder``."""
    from huggingface_hub import HfApi

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


def _run(args: argparse.Namespace) -> int:
    try:
        out = convert_checkpoint(
            args.src, args.out, args.model,
            model_kwargs=args.model_kwargs,
            force=args.force,
            use_ema=args.use_ema,
            unsafe_pickle=args.unsafe_pickle,
            push_to=args.push,
            token=args.token,
            private=args.private,
            verbose=True,
        )
    except (ValueError, RuntimeError, OSError) as e:
        print(f'timm-convmixer convert: error: {e}', file=sys.stderr)
        return 1
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
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='KEY=VALUE',
                        help='architecture overrides, e.g. depth=2 (num_classes/in_chans default to the weights\')')
    parser.add_argument('--force', action='store_true', help='replace an existing OUT folder')
    parser.add_argument('--use-ema', action='store_true', help='take the EMA weights of a train.py checkpoint')
    parser.add_argument('--push', metavar='REPO_ID', default=None, help='publish the folder to this Hub repo')
    parser.add_argument('--private', action='store_true', help='create the Hub repo as private')
    parser.add_argument('--token', default=None, help='Hub token (default: huggingface_hub\'s, e.g. HF_TOKEN)')
    parser.add_argument('--unsafe-pickle', action='store_true',
                        help='allow arbitrary pickled objects (torch.load weights_only=False); trusted files only')
    parser.set_defaults(func=_run)
    return parser
