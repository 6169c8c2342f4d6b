"""Shared test set-up: a CPU thread count that fits the cores beside pytest-xdist's other worker (subprocesses
inherit it), the plugin imported, deterministic seeds, no cached fast-path decisions, and the shared fixtures.

Fixtures (the functions behind them live in ``tests/helpers.py``, importable by scripts and module-level code):

* ``randomize_bn(model, seed=1, mean=..., var=..., weight=..., bias=...)``: non-trivial BatchNorm statistics and
  affine parameters; negative scales by default, other distributions (``Normal``/``Uniform``) as arguments.
* ``small_model(name, depth=2, seed=None, randomize=None, **create_model_kwargs)``: a cut-down registered variant,
  BatchNorms randomised and in eval mode when ``randomize`` is given.
* ``run_counted(fn, *args, backend=None)``: the result and ``timm_convmixer.fast.counters`` (which path answered
  each block call), counters reset first.
* ``auto_choice(records, **case)``: the path ``auto`` takes for a case, from ``checked.decision_records()``: the
  fused path its check accepted (the race's winner where it accepted several), else ``'eager'``.
* ``auto_paths_from_nchw(records)``: ``(stem fast, first block's path, second block's path)`` that auto took for a
  two-block model on an NCHW image.
* ``run_python(*args, code=None, env=None, unset=(), cwd=None, timeout=300, check=True)``: a fresh interpreter of
  this environment; a non-zero exit fails with its output.
* ``interpreter``: ``TRITON_INTERPRET=1`` for the test (CPU tensors count as a Triton device, so the Triton paths
  run through Triton's CPU interpreter); skips where triton is not importable.
"""
import os

import pytest
import torch


def _threads_per_process() -> int:
    """Up to 2 threads, fewer where pytest-xdist's workers would otherwise ask for more threads than there are cores.
    torch's OpenMP threads spin while they wait; with two workers of two threads each on two cores (and a
    subprocess of two more at times) timm's battery took 2.6x its time alone."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


THREADS = _threads_per_process()
torch.set_num_threads(THREADS)
# the subprocesses tests start run on as many threads as this process: logits compared bit for bit across processes
# need the same thread count on both sides
os.environ['OMP_NUM_THREADS'] = str(THREADS)

import timm  # noqa: E402  (the start-up hook registers our variants on this import)
import timm_convmixer  # noqa: E402,F401  (explicit import registers too; harmless twice)

import helpers  # noqa: E402  (tests/ is on sys.path: pytest puts a rootdir conftest's folder there)


def pytest_collection_modifyitems(config, items):
    """timm's battery (one test of ~2.5 minutes) first: ``./run.sh test`` runs files on two pytest-xdist workers
    (``--dist loadfile --no-loadscope-reorder``: handed out in collection order, not by test count, which put this
    file last), so it runs beside the rest rather than after it."""
    items.sort(key=lambda item: item.get_closest_marker('timm_battery') is None)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts seeded and with no fast-path decision cached (auto's decisions are process-global)."""
    from timm_convmixer.fast import checked
    torch.manual_seed(0)
    checked.forget()
    yield


@pytest.fixture
def randomize_bn():
    return helpers.randomize_bn


@pytest.fixture
def small_model():
    return helpers.small_model


@pytest.fixture
def run_counted():
    return helpers.run_counted


@pytest.fixture
def auto_choice():
    return helpers.auto_choice


@pytest.fixture
def auto_paths_from_nchw():
    return helpers.auto_paths_from_nchw


@pytest.fixture
def run_python():
    return helpers.run_python


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip('triton', reason='triton is not importable')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    yield
