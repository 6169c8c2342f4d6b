"""Run an unchanged timm ``train.py`` with the ConvMixer authors' ``--sched onecycle`` available.

The authors trained ConvMixer with a timm fork whose extra schedule is piecewise linear (0 -> peak LR at 2/5 of
training -> peak/20 at 4/5 -> 0 at the end). timm's scheduler factory has no equivalent (``cosine``/``poly``/``tanh``
decay along one curve after warm-up; ``wsd`` holds the LR flat in the middle), so this launcher registers
:class:`timm_convmixer.cli.onecycle.OneCycleLRScheduler` into timm's ``create_scheduler_v2`` and then executes the given
train.py as ``__main__`` with :mod:`runpy`: no copy and no edit of train.py, every other flag unchanged.

Usage (single process, or under torchrun exactly like train.py itself)::

    python examples/train_onecycle.py /path/to/pytorch-image-models/train.py --sched onecycle --sched-on-updates ...
    torchrun --nproc_per_node=8 examples/train_onecycle.py /path/to/train.py --sched onecycle --sched-on-updates ...

timm is imported here, before train.py runs, so train.py uses the installed timm package (the one this plugin
registers into) even though it sits next to a ``timm/`` folder in its checkout.
"""
import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].endswith('.py'):
        sys.exit(f'usage: {sys.argv[0]} /path/to/train.py [train.py arguments...]')
    train_py = os.path.abspath(sys.argv[1])
    import timm  # noqa: F401  (installed timm; the plugin's start-up hook registers the ConvMixer variants)
    from timm_convmixer.cli import onecycle
    onecycle.register()
    sys.argv = [train_py] + sys.argv[2:]
    runpy.run_path(train_py, run_name='__main__')


if __name__ == '__main__':
    main()
