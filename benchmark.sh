#!/usr/bin/env bash
# The project's benchmarks, one command each (details: python benchmark.py --help, and README.md):
#   bash benchmark.sh returns --preset {paper,cpu,smoke} [--algos ... | --scripts PATH ...] [--env-ids ...]
#                             [--seeds ...] [--out DIR] [--jobs N] [--dry-run] [--slurm [--submit]]
#       run the grid of algorithms (or of scripts and copies of them, labelled by file name) x tasks x seeds (finished
#       runs are skipped), then write results.md, results.json and one learning-curve plot per task
#   bash benchmark.sh summarize DIR            the same summary for any folder of runs
#   bash benchmark.sh speed [--scripts ...] [--env-ids ...] [--impls jax warp] [--measure ...] [--out FILE]
#       env steps per second of every script: training, rollout alone, pure MJX stepping (256 envs), and the
#       start-up to the end of iteration 2, cold and with a warm cache (--measure stepping training startup: the default)
#   bash benchmark.sh estimate --preset {paper,cpu,smoke} [--algos ...] [--env-ids ...] [--seeds ...] [--jobs N]
#       run each script of the preset for 3 iterations at the preset's sizes here, then print (and write to
#       OUT/estimate.json) start-up, env steps/s, GoRL's stage change, peak memory, hours per run and the grid's hours
# It runs the active virtual environment's Python, else the repository's .venv's, else python3, so that it works without
# the environment activated. JAX's persistent compilation cache is on (MJX programs take tens of seconds to compile on
# a CPU).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"  # the repository; paths given on the command line stay relative to where you are
if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    python="$VIRTUAL_ENV/bin/python"
elif [[ -x "$here/.venv/bin/python" ]]; then
    python="$here/.venv/bin/python"
else
    python=python3
fi
if ! "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("jax") is None)' 2>/dev/null; then
    echo "error: $python cannot import jax: activate the project's environment (. .venv/bin/activate) or install it" \
        "(README.md, Setup: pip install -r requirements.txt)" >&2
    exit 1
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$here/.cache/jax}"
export PYTHONUNBUFFERED=1
exec "$python" "$here/benchmark.py" "$@"
