#!/usr/bin/env bash
# The GPU kit in two verbs (README: "Performance on a GPU").
#   scripts/gpu-kit.sh prepare   here, on a CPU machine with .venv: the wheels the GPU machine lacks, into .gpukit/
#   scripts/gpu-kit.sh run       on the GPU machine, with .gpukit carried: every stage, results packed into $OUT
#   scripts/gpu-kit.sh run --cpu the same stages as a dry run on a CPU with the tiny model (what CI runs)
# Options after the verb go to `python -m benchmarks.gpu_kit <verb>` (--stages, --budget-s, --no-pack, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
verb=${1:-}
[ $# -gt 0 ] && shift
case "$verb" in
  prepare)
    exec "${PYTHON:-.venv/bin/python}" -m benchmarks.gpu_kit prepare "$@"
    ;;
  run)
    py=${PYTHON:-python3}
    # The dry run (--cpu) uses the environment it is started in, as CI does; the wheels are for the GPU machine's
    # Python and would not install elsewhere.
    if [[ " $* " != *" --cpu "* ]] && compgen -G ".gpukit/wheels/*.whl" >/dev/null; then
      # The machine's own torch stays; everything else we test with goes first on the path.
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpukit-site .gpukit/wheels/*.whl
      export PYTHONPATH="/tmp/gpukit-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    # One compile cache for every stage's process: the same graphs compile once.
    export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/gpukit-inductor}"
    exec "$py" -m benchmarks.gpu_kit run "$@"
    ;;
  *)
    echo "usage: scripts/gpu-kit.sh prepare|run [options]" >&2
    exit 2
    ;;
esac
