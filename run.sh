#!/usr/bin/env bash
# Set-up and the two jobs, from a clean clone (Python 3.9+ and the package registry are all it needs):
#
#   ./run.sh demo [flags]      the main job: train a ConvMixer with timm on a generated dataset, reload, evaluate
#   ./run.sh test [flags]      the test suite (pytest flags pass through)
#   ./run.sh test-min [flags]  the plugin's tests against the lowest supported timm (installed beside, not over;
#                              the kernels' numerics (Triton, the CPU fast paths) and the benchmark scripts'
#                              end-to-end runs are left out, and timm's battery runs its slowest contract on the
#                              quick variants only)
#
# The first run creates .venv (override with VENV=...) and installs the package editable with its test extras;
# later runs reinstall only when pyproject.toml changed. Tests run on two pytest-xdist workers, a file per worker
# at a time (TEST_WORKERS=0 runs them in this process; pytest's own -n in the flags also wins).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TIMM_MIN=1.0.26  # keep in step with pyproject.toml's "timm>=" and the README's "Supported versions"
WORKERS="-n ${TEST_WORKERS:-2} --dist loadfile --no-loadscope-reorder"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.timm-convmixer-installed"
  local want
  want=$(cat pyproject.toml | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/timm-convmixer" demo "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest $WORKERS "$@"
    ;;
  test-min)
    setup
    target=.cache/timm-$TIMM_MIN
    if [ ! -f "$target/timm/__init__.py" ]; then
      rm -rf "$target.tmp"
      "$VENV/bin/python" -m pip install --quiet --no-deps --target "$target.tmp" "timm==$TIMM_MIN"
      rm -rf "$target" && mv "$target.tmp" "$target"
    fi
    # timm $TIMM_MIN shadows the venv's newer timm; torch, huggingface_hub and the rest are the venv's
    PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -c \
      "import timm, sys; assert timm.__version__ == '$TIMM_MIN', timm.__version__; print('testing against timm', timm.__version__, 'from', timm.__file__)"
    # the kernels' numerics (marker "kernels": Triton, the CPU fast paths) do not depend on timm's version, and
    # the benchmark scripts' end-to-end runs (GPU check smoke, engine comparison, bench's CLI) test the scripts: run
    # once, by ./run.sh test; timm's battery runs its prune-intermediate-layers contract on the quick variants only
    # (tests/test_timm_battery.py)
    TIMM_BATTERY_QUICK=1 PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}" \
      exec "$VENV/bin/python" -m pytest $WORKERS -m "not kernels" --ignore=tests/test_gpu_check.py \
      --ignore=tests/test_bench_engines.py --deselect tests/test_bench.py::test_cli_writes_json_and_chart "$@"
    ;;
  *)
    echo "usage: $0 demo [demo flags] | test [pytest flags] | test-min [pytest flags]" >&2
    exit 2
    ;;
esac
