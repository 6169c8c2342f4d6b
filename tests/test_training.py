"""Training behaviours through timm's own machinery, verified on CPU with small ConvMixers.

Mixed precision, channels_last, torch.compile, gradient checkpointing, stochastic depth, exact resume with timm's
CheckpointSaver/resume_checkpoint, two-process DDP, SyncBatchNorm conversion, the authors' onecycle schedule, the
embedded shapes dataset and the demo job; and timm's real train.py when ``TIMM_TRAIN_PY`` points to one.
"""
import argparse
import copy
import csv
import functools
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.layers import convert_sync_batchnorm
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3

from helpers import SMALL_VARIANT as VARIANT
from timm_convmixer.cli import onecycle, shapes
from timm_convmixer.convmixer import ConvMixer

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


@pytest.fixture
def small(small_model):
    """This file's model: dim 32, depth 2, 4 classes, as timm builds it (train mode); any of them overridable."""
    return functools.partial(small_model, VARIANT, dim=32, num_classes=4)


def _batch(seed: int, n: int = 8, size: int = 16, num_classes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)


def _assert_grads_close(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, msg=lambda m: f'{name}: {m}', **tol)


def test_bf16_autocast_cpu_trains(small):
    model = small()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=0.)
    x, y = _batch(0, n=16)
    losses = []
    for _ in range(8):
        with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16  # autocast really ran the convolutions/linear in bf16
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0], losses


def _one_path(paths, calls: int) -> str:
    """The single path that answered all ``calls`` block calls (training mode has more than one candidate)."""
    assert len(paths) == 1 and sum(paths.values()) == calls, paths
    return next(iter(paths))


def test_channels_last_matches_eager_forward_and_backward(small, run_counted):
    eager = small()
    cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    x, y = _batch(1)
    out_e, eager_paths = run_counted(eager, x, backend='eager')
    out_c, cl_paths = run_counted(cl, x.contiguous(memory_format=torch.channels_last))
    assert eager_paths == {'eager': 2}
    _one_path(cl_paths, 2)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    F.cross_entropy(out_e, y).backward()
    F.cross_entropy(out_c, y).backward()
    _assert_grads_close(cl, eager, rtol=1e-4, atol=1e-5)
    for m in (eager, cl):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    for (name, pe), (_, pc) in zip(eager.named_parameters(), cl.named_parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5, msg=lambda m: f'{name}: {m}')


@pytest.mark.slow
def test_torch_compile_matches_eager(small, run_counted):
    if shutil.which(os.environ.get('CXX', 'g++')) is None and shutil.which('c++') is None:
        pytest.skip('torch.compile (inductor on CPU) needs a C++ compiler; none on PATH')
    model = small(dim=16).eval()
    x, _ = _batch(2, n=4)
    with torch.no_grad():
        expected, eager_paths = run_counted(model, x, backend='eager')
        got, compiled_paths = run_counted(torch.compile(model), x)
    assert eager_paths == {'eager': 2}
    # on CPU, under compile, the dispatcher steps aside (the CPU fast path would answer these calls otherwise),
    # Inductor compiles the plain modules, and no call is counted (see test_torch_compile_compiles_once; the GPU's
    # compiled nodes: test_compile_node.py)
    assert compiled_paths == {}
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('train', [False, True])
def test_torch_compile_compiles_once(small, train):
    """Repeated calls reuse one compiled graph: nothing the dispatcher does under tracing is guarded on (a counter it
    once bumped made every call recompile until the recompile limit, then run uncompiled)."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model = small(dim=16).train(train)
    backend = CompileCounter()
    compiled = torch.compile(model, backend=backend)
    x, _ = _batch(2, n=4)
    for _ in range(4):
        out = compiled(x)
        if train:
            out.sum().backward()
    assert backend.frame_count == 1


def test_gradient_checkpointing_same_loss_and_grads(small, run_counted):
    """Same loss and gradients, and the blocks really are recomputed: each runs its forward again in backward."""
    depth = 3
    plain = small(depth=depth)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing
    x, y = _batch(3)
    loss_p, paths = run_counted(lambda: F.cross_entropy(plain(x), y), backend='eager')
    assert paths == {'eager': depth}
    _, paths = run_counted(loss_p.backward)
    assert paths == {}  # without checkpointing, backward calls no block
    loss_c, paths = run_counted(lambda: F.cross_entropy(ckpt(x), y))
    _one_path(paths, depth)
    torch.testing.assert_close(loss_c, loss_p, rtol=0, atol=0)
    _, paths = run_counted(loss_c.backward)
    _one_path(paths, depth)  # the recomputation
    _assert_grads_close(ckpt, plain, rtol=1e-5, atol=1e-6)


def test_stochastic_depth_schedule_and_modes(small):
    rate, depth = 0.3, 4
    model = small(depth=depth, drop_path_rate=rate)
    # per-block rate rises linearly from 0 (first block) to the given rate (last block), timm's convention
    rates = [getattr(blk[0].drop_path, 'drop_prob', 0.) for blk in model.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, rate, depth))
    assert isinstance(model.blocks[0][0].drop_path, nn.Identity)  # rate 0: no DropPath module at all

    x, _ = _batch(4)
    model.train()
    assert not torch.equal(model(x), model(x)), 'drop path inactive in train mode'

    reference = small(depth=depth, drop_path_rate=0.)
    reference.load_state_dict(model.state_dict())
    model.eval()
    reference.eval()
    with torch.no_grad():
        first = model(x)
        assert torch.equal(first, model(x))
        torch.testing.assert_close(first, reference(x), rtol=0, atol=0)


def _train_epochs(model, optimizer, scheduler, model_ema, start_epoch: int, end_epoch: int, steps: int = 2):
    """A train.py-shaped loop on deterministic per-(epoch, step) batches."""
    if start_epoch > 0:
        scheduler.step(start_epoch)  # as train.py does after a resume
    model.train()
    for epoch in range(start_epoch, end_epoch):
        for step in range(steps):
            x, y = _batch(10_000 + epoch * 100 + step)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model_ema.update(model, step=epoch * steps + step + 1)
        scheduler.step(epoch + 1)


def _fresh_run(small, seed: int, epochs: int = 4):
    model = small(seed=seed)
    optimizer = create_optimizer_v2(model, 'adamw', lr=5e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=epochs, warmup_epochs=1, warmup_lr=1e-4)
    model_ema = ModelEmaV3(model, decay=0.9)
    return model, optimizer, scheduler, model_ema


def test_resume_is_exact(tmp_path, small):
    total, split = 4, 2
    ref = _fresh_run(small, seed=0, epochs=total)
    _train_epochs(*ref, 0, total)

    first = _fresh_run(small, seed=0, epochs=total)
    _train_epochs(*first, 0, split)
    saver = CheckpointSaver(first[0], first[1], model_ema=first[3], checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(split - 1)
    path = str(tmp_path / 'last.pth.tar')

    # a different initialisation: everything must come from the checkpoint
    resumed = _fresh_run(small, seed=123, epochs=total)
    start = resume_checkpoint(resumed[0], path, optimizer=resumed[1], log_info=False)  # weights_only=True
    load_checkpoint(resumed[3].module, path, use_ema=True)
    assert start == split
    _train_epochs(*resumed, start, total)

    for (name, a), (_, b) in zip(ref[0].state_dict().items(), resumed[0].state_dict().items()):
        assert torch.equal(a, b), f'{name} differs after resume'
    for (name, a), (_, b) in zip(ref[3].module.state_dict().items(), resumed[3].module.state_dict().items()):
        assert torch.equal(a, b), f'EMA {name} differs after resume'
    assert ref[1].param_groups[0]['lr'] == resumed[1].param_groups[0]['lr']


@pytest.mark.slow
def test_ddp_two_processes_keep_replicas_identical(tmp_path, run_python):
    run_python(os.path.join(TESTS_DIR, '_train_ddp.py'), str(tmp_path), '3', timeout=600, cwd=tmp_path)
    r0 = torch.load(tmp_path / 'rank0.pt', weights_only=True)
    r1 = torch.load(tmp_path / 'rank1.pt', weights_only=True)
    # the ranks started from different weights and saw different data...
    assert not torch.equal(r0['initial']['stem.0.weight'], r1['initial']['stem.0.weight'])
    assert not torch.equal(r0['losses'], r1['losses'])
    # ...yet DDP broadcast rank 0's weights and all-reduced every gradient; BN statistics were averaged
    # across ranks with timm's distribute_bn, as train.py does at the end of every epoch
    for name, v0 in r0['state_dict'].items():
        assert torch.equal(v0, r1['state_dict'][name]), f'replicas differ at {name}'
    assert not torch.equal(r0['state_dict']['head.weight'], r0['initial']['head.weight'])  # it did train


@pytest.mark.parametrize('convert', [nn.SyncBatchNorm.convert_sync_batchnorm, convert_sync_batchnorm],
                         ids=['torch', 'timm'])
def test_sync_batchnorm_reaches_every_norm_layer(convert, small):
    depth = 3
    model = small(depth=depth)
    before = model.state_dict()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 1 + 2 * depth  # the stem's, then the depthwise and pointwise norms of every block
    model = convert(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_onecycle_schedule_matches_authors_points(small):
    onecycle.register()
    onecycle.register()  # idempotent
    model = small()
    optimizer = create_optimizer_v2(model, 'adamw', lr=0.01, weight_decay=0.05, layer_decay=0.5)
    import timm.scheduler
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched='onecycle', num_epochs=10, step_on_epochs=False, updates_per_epoch=10)
    assert num_epochs == 10 and isinstance(scheduler, onecycle.OneCycleLRScheduler)
    scales = [g.get('lr_scale', 1.) for g in optimizer.param_groups]
    assert len(set(scales)) > 1  # layer decay gave the groups different scales
    for t, factor in ((0, 0.), (20, 0.5), (40, 1.), (60, 0.525), (80, 0.05), (90, 0.025), (100, 0.)):
        scheduler.step_update(t)
        for g, s in zip(optimizer.param_groups, scales):
            assert g['lr'] == pytest.approx(0.01 * factor * s), (t, factor)
    # bad arguments are named with the values given
    with pytest.raises(ValueError, match=r'updates_per_epoch >= 1, got 0'):
        timm.scheduler.create_scheduler_v2(optimizer, sched='onecycle', num_epochs=10, step_on_epochs=False)
    with pytest.raises(ValueError, match=r'non-decreasing .* got milestones \[0.5, 0.2\] and lr_factors \[1.0, 0.0\]'):
        onecycle.OneCycleLRScheduler(optimizer, t_initial=10, milestones=(0.5, 0.2), lr_factors=(1., 0.))
    # every other name still reaches timm's own factory
    other, _ = timm.scheduler.create_scheduler_v2(optimizer, sched='cosine', num_epochs=10)
    assert type(other).__name__ == 'CosineLRScheduler'


def _tree_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def test_shapes_dataset_is_deterministic_imagefolder(tmp_path):
    kw = dict(train_per_class=2, val_per_class=1, image_size=16)
    a = _tree_bytes(tmp_path / 'a') if shapes.generate(str(tmp_path / 'a'), **kw) else None
    b = _tree_bytes(tmp_path / 'b') if shapes.generate(str(tmp_path / 'b'), **kw) else None
    assert a == b and len(a) == len(shapes.CLASSES) * 3 + 1
    c = _tree_bytes(tmp_path / 'c') if shapes.generate(str(tmp_path / 'c'), seed=1, **kw) else None
    assert c != a
    _, made = shapes.ensure_dataset(str(tmp_path / 'a'), **kw)
    assert not made  # same spec: reused
    ds = timm.data.create_dataset('', root=str(tmp_path / 'a'), split='train')
    assert len(ds) == 2 * len(shapes.CLASSES)
    assert sorted(ds.reader.class_to_idx) == sorted(shapes.CLASSES)
    _, made = shapes.ensure_dataset(str(tmp_path / 'a'), seed=2, **kw)
    assert made  # another spec: regenerated in place
    mine = tmp_path / 'mine'  # a folder of the user's where the dataset would go: never replaced
    (mine / 'train').mkdir(parents=True)
    with pytest.raises(FileExistsError, match='no generated shapes dataset'):
        shapes.ensure_dataset(str(mine), **kw)
    assert (mine / 'train').is_dir()
    # a generation that fails part-way (an unknown class, after the others were drawn) leaves the dataset there as it
    # was, and no temporary folder beside it
    before = _tree_bytes(tmp_path / 'a')
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        shapes.ensure_dataset(str(tmp_path / 'a'), classes=('circle', 'hexagon'), **kw)
    assert _tree_bytes(tmp_path / 'a') == before
    assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c', 'mine']


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    """The demo's whole path (generate, train, save, plot, reload) on a tiny budget; min-accuracy gate fails."""
    from timm_convmixer.cli import main
    out = tmp_path / 'demo'
    code = main(['demo', '--output', str(out), '--epochs', '2', '--shapes-per-class', '8', '--batch-size', '16',
                 '--model-kwargs', 'dim=16', 'depth=1', '--workers', '0', '--no-progress', '--amp',
                 '--min-accuracy', '101'])
    assert code == 1  # nothing reaches 101%: the gate must fail the run
    import json
    with open(out / 'results.json') as f:
        res = json.load(f)
    assert res['epochs'] == 2 and len(res['history']) == 2 and res['amp']
    assert os.path.getsize(res['plot']) > 1000
    # the reloaded model is the best EMA checkpoint: same weights, same data, same number
    assert res['reloaded_top1'] == pytest.approx(res['best_ema_top1'], abs=1e-9)
    assert all(math.isfinite(h['train_loss']) for h in res['history'])


def test_timm_train_py(tmp_path, run_python):
    """timm's own train.py (unchanged) trains a ConvMixer with drop path, EMA, channels_last, AMP and mixup."""
    train_py = os.environ.get('TIMM_TRAIN_PY')
    if not train_py:
        pytest.skip('set TIMM_TRAIN_PY=/path/to/pytorch-image-models/train.py to run timm\'s train.py')
    if not os.path.isfile(train_py):
        pytest.skip(f'TIMM_TRAIN_PY={train_py!r} is not a file')
    data = tmp_path / 'data'
    shapes.generate(str(data), train_per_class=16, val_per_class=4, image_size=32)
    out = tmp_path / 'out'
    flags = [
        '--data-dir', str(data), '--train-split', 'train', '--val-split', 'val',
        '--model', VARIANT, '--model-kwargs', 'dim=32', 'depth=2', '--num-classes', str(len(shapes.CLASSES)),
        '--img-size', '32', '-b', '16', '--epochs', '2', '--sched', 'cosine', '--warmup-epochs', '0',
        '--lr', '1e-3', '--drop-path', '0.1', '--model-ema', '--channels-last', '--amp', '--amp-dtype', 'bfloat16',
        '--device', 'cpu', '--mixup', '0.2', '--workers', '1', '--output', str(out), '--experiment', 'run',
        '--log-interval', '1000',
    ]
    # cwd outside the timm checkout, so its timm/ folder does not shadow the installed package
    run_python(train_py, *flags, timeout=840, cwd=tmp_path)
    with open(out / 'run' / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert all(math.isfinite(float(r['train_loss'])) and math.isfinite(float(r['eval_loss'])) for r in rows)
    # top-1 over the whole val split: a whole number of its images (a partial or wrong split would not be)
    n_val = 4 * len(shapes.CLASSES)
    for r in rows:
        correct = float(r['eval_top1']) * n_val / 100
        assert abs(correct - round(correct)) < 1e-3 and 0 <= round(correct) <= n_val, (r['eval_top1'], n_val)
    # model_best is the best epoch's (train.py saves it only on a strict improvement), with that epoch's metric
    with torch.serialization.safe_globals([argparse.Namespace]):
        best = torch.load(out / 'run' / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    top1 = [float(r['eval_top1']) for r in rows]
    assert best['epoch'] == top1.index(max(top1)) and best['metric'] == pytest.approx(max(top1))
    model = timm.create_model(VARIANT, dim=32, depth=2, num_classes=len(shapes.CLASSES),
                              checkpoint_path=str(out / 'run' / 'model_best.pth.tar'))
    assert isinstance(model, ConvMixer)
