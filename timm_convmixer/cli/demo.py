""" The main job: train a ConvMixer end to end with timm's own components, then reload and re-evaluate it

``timm-convmixer demo`` (or ``python -m timm_convmixer demo``) with no arguments needs no download: it generates
the embedded shapes dataset (:mod:`timm_convmixer.cli.shapes`, six classes, 32px), trains a small ConvMixer on it and
checks the saved checkpoint by loading it back through ``timm.create_model(..., checkpoint_path=...)``.

Everything on the way is timm's: ``create_dataset``/``create_loader`` (RandAugment, random-resized crop), ``Mixup``
(mixup + cutmix with label smoothing), ``create_optimizer_v2`` (AdamW), ``create_scheduler_v2`` (the authors'
piecewise-linear ``onecycle``, registered into timm's factory, or any timm schedule), ``NativeScaler`` (fp16 AMP on
CUDA; bf16 autocast needs no scaler), ``ModelEmaV3`` and ``CheckpointSaver``. The checkpoint kept is the best EMA
top-1, as train.py keeps it, and ``create_model(checkpoint_path=...)`` loads the EMA weights from it, so the
reloaded accuracy must equal the best EMA accuracy printed during training.

Default model: ``convmixer_256_8_ks5_p2`` (the CIFAR-10 ConvMixer: kernel 5, patch 2) narrowed to ``dim=128,
depth=4`` so that it trains in a few minutes on two CPU cores; ``--model-kwargs dim=256 depth=8`` gives the full one.
With the defaults (24 epochs, 1200 training images) it reached 98.7% val top-1 in about 110 s on a 2-core CPU; the
job exits 1 if the reloaded checkpoint scores below 90% on the generated data (``--min-accuracy`` to change).
"""
import argparse
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import timm
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import scheduler_factory
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, accuracy, random_seed

from . import onecycle, shapes
from .args import add_model_kwargs, nonnegative_int, positive_int
from .atomic import atomic_write, atomic_write_json

__all__ = ['add_parser', 'run', 'train_and_reload', 'train_one_epoch', 'evaluate']

_logger = logging.getLogger(__name__)

DEFAULT_MODEL = 'convmixer_256_8_ks5_p2'
DEFAULT_MODEL_KWARGS = {'dim': 128, 'depth': 4}
# the accuracy the default job states and checks on the generated dataset (measured: 98.7% after 24 epochs)
SHAPES_MIN_ACCURACY = 90.0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group('data (default: the generated shapes dataset)')
    data.add_argument('--data-dir', default=None,
                      help='an ImageFolder root with train/ and val/ (or validation/) sub-folders, or the root of '
                           'a --dataset')
    data.add_argument('--dataset', default='',
                      help="timm create_dataset name, e.g. 'torch/cifar10' (torchvision); empty = folder")
    data.add_argument('--download', action='store_true', help='let torchvision datasets download (off by default)')
    data.add_argument('--train-split', default='train')
    data.add_argument('--val-split', default='validation')
    data.add_argument('--shapes-per-class', type=positive_int, default=200,
                      help='generated shapes: training images per class (val gets a quarter)')
    data.add_argument('--img-size', type=positive_int, default=None, help='input size (default: the model\'s, 32)')
    data.add_argument('--workers', type=nonnegative_int, default=2)

    model = parser.add_argument_group('model')
    model.add_argument('--model', default=DEFAULT_MODEL)
    add_model_kwargs(model, help=f'architecture overrides, key=value (default for {DEFAULT_MODEL}: dim=128 depth=4)',
                     none_if_absent=True)
    model.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth rate of the last block')
    model.add_argument('--channels-last', action='store_true')

    train = parser.add_argument_group('training')
    train.add_argument('--epochs', type=positive_int, default=24)
    train.add_argument('--batch-size', '-b', type=positive_int, default=64)
    train.add_argument('--opt', default='adamw')
    train.add_argument('--lr', type=float, default=5e-3)
    train.add_argument('--weight-decay', type=float, default=0.05)
    train.add_argument('--sched', default='onecycle',
                       help="any timm create_scheduler_v2 name, or 'onecycle' (the authors' piecewise schedule)")
    train.add_argument('--clip-grad', type=float, default=1.0)
    train.add_argument('--aa', default='rand-m6-mstd0.5', help="RandAugment policy ('' for none)")
    train.add_argument('--scale', type=float, nargs=2, default=(0.75, 1.0), help='random-resized-crop scale')
    train.add_argument('--mixup', type=float, default=0.1)
    train.add_argument('--cutmix', type=float, default=0.)
    train.add_argument('--smoothing', type=float, default=0.1)
    train.add_argument('--model-ema-decay', type=float, default=0.99)
    train.add_argument('--seed', type=int, default=0)
    train.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1'... (default: cuda if available)")
    train.add_argument('--amp', action='store_true', help='mixed precision: bfloat16 on CPU, float16 on CUDA')

    out = parser.add_argument_group('output')
    out.add_argument('--output', default=os.path.join('output', 'demo'),
                     help='folder for the generated data, checkpoints, metrics and the plot')
    out.add_argument('--min-accuracy', type=float, default=None,
                     help='exit 1 if the reloaded checkpoint\'s top-1 (percent) is below this (default: '
                          f'{SHAPES_MIN_ACCURACY:g} on the generated dataset, none on other data)')
    out.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``timm-convmixer`` command line."""
    parser = subparsers.add_parser('demo', help='train a ConvMixer on a generated dataset with timm, then reload it',
                                   description=__doc__.splitlines()[0])
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _datasets(args: argparse.Namespace) -> Tuple[Any, Any, str]:
    """The train and val datasets, and a line saying what they are."""
    if args.dataset or args.data_dir:
        if args.data_dir and not args.dataset and not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f'--data-dir {args.data_dir}: no such folder')
        root = args.data_dir or os.path.join(args.output, 'data')
        kw = dict(download=args.download) if args.dataset else {}
        train = create_dataset(args.dataset, root=root, split=args.train_split, is_training=True, **kw)
        val = create_dataset(args.dataset, root=root, split=args.val_split, is_training=False, **kw)
        return train, val, f'{args.dataset or "folder"} at {root}'
    root = os.path.join(args.output, 'shapes')
    spec, made = shapes.ensure_dataset(
        root, train_per_class=args.shapes_per_class, val_per_class=max(1, args.shapes_per_class // 4),
        seed=args.seed)
    train = create_dataset('', root=root, split='train', is_training=True)
    val = create_dataset('', root=root, split='val', is_training=False)
    what = 'generated' if made else 'reused'
    return train, val, f'shapes ({len(spec["classes"])} classes, {what}) at {root}'


def _num_classes(dataset: Any) -> int:
    reader = getattr(dataset, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return len(reader.class_to_idx)
    inner = getattr(reader, 'dataset', None)  # torchvision datasets wrapped by timm's ReaderTorch... fallbacks
    for obj in (inner, dataset):
        classes = getattr(obj, 'classes', None)
        if classes:
            return len(classes)
    return len({int(t) for _, t in dataset})


def _autocast(device: torch.device, amp: bool) -> Callable[[], Any]:
    if not amp:
        return nullcontext
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, channels_last: bool = False) -> Dict[str, float]:
    """Top-1 (percent) and mean cross-entropy over a whole loader."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    total, correct, loss_sum = 0, 0., 0.
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = model(x)
        out = out.float()
        loss_sum += loss_fn(out, y).item()
        correct += accuracy(out, y, topk=(1,))[0].item() * y.shape[0] / 100.
        total += y.shape[0]
    return {'top1': 100. * correct / max(total, 1), 'loss': loss_sum / max(total, 1)}


def _plot(history: List[Dict[str, float]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    epochs = [h['epoch'] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h['train_loss'] for h in history], 'o-', label='train (mixup targets)')
    ax_loss.plot(epochs, [h['val_loss'] for h in history], 'o-', label='val')
    ax_loss.plot(epochs, [h['val_loss_ema'] for h in history], 'o-', label='val, EMA')
    ax_loss.set_xlabel('epoch')
    ax_loss.set_ylabel('cross-entropy')
    ax_loss.legend()
    ax_acc.plot(epochs, [h['val_top1'] for h in history], 'o-', label='val')
    ax_acc.plot(epochs, [h['val_top1_ema'] for h in history], 'o-', label='val, EMA')
    ax_acc.set_xlabel('epoch')
    ax_acc.set_ylabel('top-1 (%)')
    ax_acc.set_ylim(0, 100)
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


@dataclass
class _Training:
    """Everything one training step touches, built by :func:`_training_setup`."""
    model: nn.Module
    model_ema: ModelEmaV3
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    num_epochs: int
    loss_fn: nn.Module
    mixup_fn: Optional[Mixup]
    loss_scaler: Optional[NativeScaler]
    autocast: Callable[[], Any]
    clip_grad: float
    channels_last: bool
    num_updates: int = 0


def _build_model(args: argparse.Namespace, num_classes: int, device: torch.device):
    """The model on ``device``, the kwargs it was built with and its data config (``--img-size`` applied)."""
    model_kwargs = dict(args.model_kwargs) if args.model_kwargs is not None else (
        dict(DEFAULT_MODEL_KWARGS) if args.model == DEFAULT_MODEL else {})
    model = timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path, **model_kwargs)
    data_config = resolve_data_config({}, model=model)
    if args.img_size:
        data_config['input_size'] = (3, args.img_size, args.img_size)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, model_kwargs, data_config


def _loaders(args: argparse.Namespace, dataset_train: Any, dataset_val: Any, data_config: Dict[str, Any],
             device: torch.device):
    """timm's loaders: RandAugment and random-resized crop for training, a full-image resize for validation."""
    loader_kw = dict(
        input_size=data_config['input_size'], batch_size=args.batch_size, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], num_workers=args.workers, device=device,
        use_prefetcher=device.type == 'cuda', persistent_workers=False)
    loader_train = create_loader(
        dataset_train, is_training=True, auto_augment=args.aa or None, scale=tuple(args.scale), color_jitter=0.,
        **loader_kw)
    loader_val = create_loader(dataset_val, is_training=False, crop_pct=1.0, **loader_kw)
    return loader_train, loader_val


def _training_setup(args: argparse.Namespace, model: nn.Module, num_classes: int, updates_per_epoch: int,
                    device: torch.device) -> _Training:
    """Mixup and its loss, AdamW, the LR schedule, AMP's scaler and the EMA copy, all timm's."""
    mixup_active = args.mixup > 0 or args.cutmix > 0
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                     num_classes=num_classes) if mixup_active else None
    optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler, num_epochs = scheduler_factory.create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=0 if args.sched == 'onecycle' else 1,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return _Training(
        model=model,
        model_ema=ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=True),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        num_epochs=num_epochs,
        loss_fn=SoftTargetCrossEntropy() if mixup_active else LabelSmoothingCrossEntropy(args.smoothing),
        mixup_fn=mixup_fn,
        loss_scaler=NativeScaler(device=device.type) if args.amp and device.type == 'cuda' else None,
        autocast=_autocast(device, args.amp),
        clip_grad=args.clip_grad,
        channels_last=args.channels_last,
    )


def _checkpoint_saver(args: argparse.Namespace, training: _Training, model_kwargs: Dict[str, Any],
                      num_classes: int, ckpt_dir: str) -> CheckpointSaver:
    """train.py's saver, keeping the best EMA top-1."""
    # a plain Namespace of plain values: checkpoints stay loadable with torch.load(weights_only=True)
    saved_args = argparse.Namespace(
        model=args.model, model_kwargs=model_kwargs, num_classes=num_classes, epochs=training.num_epochs,
        batch_size=args.batch_size, lr=args.lr, sched=args.sched, seed=args.seed)
    return CheckpointSaver(
        training.model, training.optimizer, args=saved_args, model_ema=training.model_ema,
        amp_scaler=training.loss_scaler, checkpoint_dir=ckpt_dir, recovery_dir=ckpt_dir, decreasing=False,
        max_history=1)


def train_one_epoch(training: _Training, loader, device: torch.device, epoch: int, progress: Any = None) -> float:
    """One epoch of updates (LR stepped per update, EMA updated after each); returns the mean training loss."""
    model, optimizer = training.model, training.optimizer
    model.train()
    loss_sum, seen = 0., 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if training.mixup_fn is not None:
            x, y = training.mixup_fn(x, y)
        if training.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with training.autocast():
            loss = training.loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if training.loss_scaler is not None:
            training.loss_scaler(loss, optimizer, clip_grad=training.clip_grad, parameters=model.parameters())
        else:
            loss.backward()
            if training.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip_grad)
            optimizer.step()
        training.num_updates += 1
        training.model_ema.update(model, step=training.num_updates)
        training.lr_scheduler.step_update(num_updates=training.num_updates)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'loss is {loss.item()} at update {training.num_updates}')
        loss_sum += loss.item() * x.shape[0]
        seen += x.shape[0]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f'{loss.item():.3f}',
                                 lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
    training.lr_scheduler.step(epoch + 1)
    return loss_sum / max(seen, 1)


def _min_accuracy_exit_code(args: argparse.Namespace, top1: float) -> int:
    """1 when the reloaded checkpoint's top-1 is below ``--min-accuracy`` (default: the generated data's bar)."""
    min_accuracy = args.min_accuracy
    if min_accuracy is None and not (args.dataset or args.data_dir):
        min_accuracy = SHAPES_MIN_ACCURACY
    if min_accuracy is None:
        return 0
    if top1 < min_accuracy:
        print(f'FAILED: reloaded top-1 {top1:.2f}% < --min-accuracy {min_accuracy:g}%', file=sys.stderr)
        return 1
    print(f'OK: reloaded top-1 {top1:.2f}% >= {min_accuracy:g}%')
    return 0


def train_and_reload(args: argparse.Namespace) -> Dict[str, Any]:
    """Train, checkpoint, plot, reload and evaluate; returns the measured numbers (and ``exit_code``)."""
    t_start = time.time()
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    os.makedirs(args.output, exist_ok=True)
    random_seed(args.seed)
    onecycle.register()

    dataset_train, dataset_val, data_what = _datasets(args)
    num_classes = _num_classes(dataset_train)
    model, model_kwargs, data_config = _build_model(args, num_classes, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f'data: {data_what}; {len(dataset_train)} train / {len(dataset_val)} val images, {num_classes} classes')
    print(f'model: {args.model} {model_kwargs or ""} ({n_params / 1e6:.2f}M params), input {data_config["input_size"]}'
          f', device {device}, amp {"off" if not args.amp else ("fp16" if device.type == "cuda" else "bf16")}')
    loader_train, loader_val = _loaders(args, dataset_train, dataset_val, data_config, device)
    training = _training_setup(args, model, num_classes, len(loader_train), device)
    ckpt_dir = os.path.join(args.output, 'checkpoints')
    os.makedirs(ckpt_dir, exist_ok=True)
    saver = _checkpoint_saver(args, training, model_kwargs, num_classes, ckpt_dir)

    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=training.num_epochs * len(loader_train), desc='training', unit='step',
                        dynamic_ncols=True)
    history: List[Dict[str, float]] = []
    best_metric, best_epoch = None, None
    for epoch in range(training.num_epochs):
        train_loss = train_one_epoch(training, loader_train, device, epoch, progress)
        val = evaluate(model, loader_val, device, training.autocast, args.channels_last)
        val_ema = evaluate(training.model_ema.module, loader_val, device, training.autocast, args.channels_last)
        row = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=val['loss'], val_top1=val['top1'],
                   val_loss_ema=val_ema['loss'], val_top1_ema=val_ema['top1'])
        history.append(row)
        best_metric, best_epoch = saver.save_checkpoint(epoch, metric=val_ema['top1'])
        msg = (f'epoch {epoch + 1}/{training.num_epochs}: train loss {row["train_loss"]:.3f}, val top-1 '
               f'{val["top1"]:.2f}%, EMA val top-1 {val_ema["top1"]:.2f}%')
        (progress.write if progress is not None else print)(msg)
    if progress is not None:
        progress.close()
    train_seconds = time.time() - t_start

    best_path = os.path.join(ckpt_dir, 'model_best.pth.tar')
    plot_path = os.path.join(args.output, 'curves.png')
    _plot(history, plot_path, f'{args.model} {model_kwargs or ""} on {data_what.split(" at ")[0]}')

    # the acceptance check: a fresh model built by timm from the checkpoint file alone
    reloaded = timm.create_model(args.model, num_classes=num_classes, checkpoint_path=best_path, **model_kwargs)
    reloaded.to(device)
    reloaded_val = evaluate(reloaded, loader_val, device, training.autocast)
    print(f'best EMA val top-1 {best_metric:.2f}% (epoch {best_epoch + 1}); checkpoint {best_path}')
    print(f'reloaded with timm.create_model(checkpoint_path=...): val top-1 {reloaded_val["top1"]:.2f}% '
          f'on {len(dataset_val)} images; total time {time.time() - t_start:.0f}s')
    print(f'plot: {plot_path}')
    result = dict(
        model=args.model, model_kwargs=model_kwargs, num_classes=num_classes, data=data_what, device=str(device),
        amp=bool(args.amp), epochs=training.num_epochs, history=history, best_ema_top1=best_metric,
        best_epoch=best_epoch + 1, reloaded_top1=reloaded_val['top1'], train_seconds=train_seconds,
        total_seconds=time.time() - t_start, checkpoint=best_path, plot=plot_path,
        exit_code=_min_accuracy_exit_code(args, reloaded_val['top1']))
    atomic_write_json(os.path.join(args.output, 'results.json'), result)
    return result


def run(args: argparse.Namespace) -> int:
    """The ``demo`` sub-command: :func:`train_and_reload`, exit code 1 below the accuracy bar."""
    return train_and_reload(args)['exit_code']
