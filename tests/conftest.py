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
* ``kernels``: our compiled CPU kernels loaded (built on first use); skips where they cannot be built here.
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


# The files that take minutes on a 2-core machine with empty caches (CI's case: the AOT compiles alone are ~3
# minutes cold): `./run.sh test --durations=80` with empty extension, Triton and Inductor caches, 2026-11-28:
# battery 204 s (one test: first), lean training 278, AOT 226, Triton kernels 142, compile node 118; the rest <= 80.
SLOWEST_FILES = ('test_timm_battery.py', 'test_lean_training.py', 'test_triton_aot.py', 'test_triton_kernels.py',
                 'test_compile_node.py')


def pytest_collection_modifyitems(config, items):
    """The slowest files first: ``./run.sh test`` runs files on two pytest-xdist workers (``--dist loadfile
    --no-loadscope-reorder``: handed out in collection order; xdist's own order, by test count, put timm's one-test
    battery last), so the long files run beside the short ones rather than after them. Empty caches, 2-core AVX2 VM, one
    run each: 13:04 with the battery alone first (the AOT file then came 16th of 19), 12:23 in this order."""
    def rank(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)
    items.sort(key=rank)


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


@pytest.fixture(scope='session')
def kernels():
    from timm_convmixer.fast import cpu_kernels
    if cpu_kernels.load() is None:
        pytest.skip(f'the CPU kernels cannot be built here: {cpu_kernels.build_error()}')


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip('triton', reason='triton is not importable')
    monkeypatch.setenv('TRITON_INTERPRET', '1')
    yield
