""" The ConvMixer authors' piecewise-linear "onecycle" LR schedule, as a timm scheduler

The paper's ImageNet runs used a timm fork with one extra schedule: the LR rises linearly from 0 to its peak at 2/5
of training, falls linearly to peak/20 at 4/5, then to 0 at the end (locuslab/convmixer README; the CIFAR script
does the same per iteration). timm's factory cannot express it: ``cosine``/``poly``/``tanh`` give one decay curve
after warm-up and ``wsd`` holds the LR flat in the middle, none has two linear decay segments.

:func:`register` adds ``sched='onecycle'`` to ``timm.scheduler.create_scheduler_v2`` at runtime (every other name is
passed through untouched), so an unchanged ``train.py`` runs it as ``--sched onecycle`` when launched by
``examples/train_onecycle.py``. Step it per update (``--sched-on-updates``), as the authors did: stepped per epoch
the whole first epoch runs at LR 0.
"""
import functools
from typing import List, Sequence, Tuple

import numpy as np
import torch

import timm.scheduler
import timm.scheduler.scheduler_factory as scheduler_factory
from timm.scheduler.scheduler import Scheduler

__all__ = ['OneCycleLRScheduler', 'register', 'AUTHORS_MILESTONES', 'AUTHORS_LR_FACTORS']

# fractions of training and the LR (as a fraction of the peak) at each of them
AUTHORS_MILESTONES: Tuple[float, ...] = (0., 0.4, 0.8, 1.)
AUTHORS_LR_FACTORS: Tuple[float, ...] = (0., 1., 1. / 20., 0.)


class OneCycleLRScheduler(Scheduler):
    """Piecewise-linear LR through (milestone fraction, LR factor) points; the authors' by default.

    ``t`` counts epochs (``t_in_epochs=True``) or optimizer updates; ``t_initial`` is the length of training in the
    same unit. Per-group ``lr_scale`` (layer-wise decay) is applied by timm's ``Scheduler.update_groups``.
    """

    def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            t_initial: int,
            milestones: Sequence[float] = AUTHORS_MILESTONES,
            lr_factors: Sequence[float] = AUTHORS_LR_FACTORS,
            t_in_epochs: bool = True,
            initialize: bool = True,
    ) -> None:
        if t_initial < 1:
            raise ValueError(f't_initial: expected a positive length of training, got {t_initial}')
        if len(milestones) != len(lr_factors) or list(milestones) != sorted(milestones):
            raise ValueError(f'milestones must be non-decreasing and match lr_factors one to one, got milestones '
                             f'{list(milestones)} and lr_factors {list(lr_factors)}')
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=t_in_epochs, initialize=initialize)
        self.t_initial = t_initial
        self.milestones = [float(m) for m in milestones]
        self.lr_factors = [float(f) for f in lr_factors]
        # the LR before the first step is the schedule's start, not the optimizer's configured peak
        self.update_groups(self._get_lr(0))

    def _get_lr(self, t: int) -> List[float]:
        factor = float(np.interp(t / self.t_initial, self.milestones, self.lr_factors))
        return [v * factor for v in self.base_values]


@functools.wraps(scheduler_factory.create_scheduler_v2)
def _create_scheduler_v2(optimizer, sched: str = 'cosine', *args, _orig=scheduler_factory.create_scheduler_v2,
                         **kwargs):
    if sched != 'onecycle':
        return _orig(optimizer, sched, *args, **kwargs)
    num_epochs = kwargs.get('num_epochs', args[0] if args else 300)
    step_on_epochs = kwargs.get('step_on_epochs', True)
    updates_per_epoch = kwargs.get('updates_per_epoch', 0)
    if step_on_epochs:
        t_initial = num_epochs
    else:
        if updates_per_epoch < 1:
            raise ValueError(f'onecycle stepped per update needs updates_per_epoch >= 1, got {updates_per_epoch!r}')
        t_initial = num_epochs * updates_per_epoch
    return OneCycleLRScheduler(optimizer, t_initial=t_initial, t_in_epochs=step_on_epochs), num_epochs


def register() -> None:
    """Make ``create_scheduler_v2(..., sched='onecycle')`` build :class:`OneCycleLRScheduler` (idempotent).

    Patches the attribute in both ``timm.scheduler`` and its factory module; scripts that import the function by
    name (``from timm.scheduler import create_scheduler_v2``, as ``train.py`` does) must be imported afterwards.
    """
    if getattr(timm.scheduler.create_scheduler_v2, '_convmixer_onecycle', False):
        return
    _create_scheduler_v2._convmixer_onecycle = True
    timm.scheduler.create_scheduler_v2 = _create_scheduler_v2
    scheduler_factory.create_scheduler_v2 = _create_scheduler_v2
