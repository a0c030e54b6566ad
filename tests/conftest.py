"""Shared test set-up: the persistent compilation cache, and helpers to run the scripts as users do."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MJX programs take tens of seconds to compile on a CPU; the cache lets later tests (and subprocesses) reuse them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, ROOT)

# The CPU configuration every script is tested with (also the README's quick start): CartpoleSwingup steps fast on a
# CPU, and a learner leaves the random policy (about 25) far behind within a few hundred thousand steps.
CPU_ARGS = (
    "--env-id",
    "CartpoleSwingup",
    "--num-envs",
    32,
    "--num-minibatches",
    16,
    "--batch-size",
    32,
    "--update-epochs",
    8,
    "--gamma",
    0.99,
    "--num-eval-envs",
    32,
)
STEPS_PER_ITERATION = 32 * 480  # --num-envs x (16 minibatches x 32 sequences x 30 steps / 32 envs)


def run_script(script, *args, timeout=900):
    """Run `python script args...` from the repository root; MJX-Warp can hang a failing process, hence the timeout."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def only_run_folder(run_dir):
    """The single run folder a script wrote under `run_dir`."""
    folders = [os.path.join(run_dir, name) for name in os.listdir(run_dir)]
    assert len(folders) == 1, folders
    return folders[0]


def read_json(path):
    with open(path) as f:
        return json.load(f)
