"""Shared test set-up: the persistent compilation cache, the CPU configuration, and one learning run per script (from
benchmark.sh's smoke preset) that the learning, end-to-end and benchmark tests all read."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MJX programs take tens of seconds to compile on a CPU; the cache lets later tests (and subprocesses) reuse them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, ROOT)

import benchmark  # noqa: E402  (the repository root is on the path only from here)

# The CPU configuration every script is tested with (the README's quick start and benchmark.sh's smoke preset):
# CartpoleSwingup steps fast on a CPU, and a learner leaves the random policy (about 25) far behind within a few
# hundred thousand steps.
CPU_ARGS = ("--env-id", "CartpoleSwingup", *benchmark.CPU_SIZES, "--gamma", 0.99, "--num-eval-envs", 32)
N = 32 * 480  # env steps per iteration: --num-envs x (16 minibatches x 32 sequences x 30 steps / 32 envs)
EVAL_INTERVAL = 4 * N
# script: (the arguments that ask for no training, the learning threshold). The learning runs are the smoke preset's
# (20 iterations; GoRL in stages of 8, 4, 4 and 4); each threshold sits well below the final returns of seeds 1, 2 and 3
# in the algorithm's paper evaluation mode (in the comment) and far above the random policy's 25.
SCRIPTS_UNDER_TEST = {
    "ppo_continuous.py": (("--total-timesteps", 0), 120.0),  # deterministic: 201.5, 272.5, 228.1
    "gorl_ppo_fm.py": (("--stage-timesteps", 0), 120.0),  # deterministic: 205.9, 180.7, 224.4
    "gorl_ppo_diffusion.py": (("--stage-timesteps", 0), 120.0),  # deterministic: 209.9, 253.7, 230.4
    "fpo.py": (("--total-timesteps", 0), 120.0),  # stochastic: 254.6, 231.4, 255.6
    "dppo.py": (("--total-timesteps", 0), 120.0),  # stochastic: 221.4, 186.0, 180.2
}
SCRIPTS = [script for script in SCRIPTS_UNDER_TEST if os.path.exists(os.path.join(ROOT, script))]


def run_script(script, *args, timeout=900, env=None):
    """Run `python script args...` from the repository root; MJX-Warp can hang a failing process, hence the timeout."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )


def only_run_folder(run_dir):
    """The single run folder a script wrote under `run_dir`."""
    folders = [os.path.join(run_dir, name) for name in os.listdir(run_dir)]
    assert len(folders) == 1, folders
    return folders[0]


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def learning_runs(tmp_path_factory):
    """learning_runs(script) -> (run folder, console log) of the script's run in benchmark.sh's smoke preset (seed 1,
    --save-model), made once per session in one results folder, as `benchmark.py returns --preset smoke` makes it; the
    log also holds JAX's line for every program compiled (JAX_LOG_COMPILES)."""
    out = tmp_path_factory.mktemp("smoke")
    runs = {}

    def get(script):
        algo = script.removesuffix(".py")
        if script not in runs:
            result = run_benchmark(
                "returns", "--preset", "smoke", "--algos", algo, "--out", out, timeout=1500, log_compiles=True
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            (run_path,) = glob.glob(os.path.join(out, "runs", f"CartpoleSwingup__{algo}__1__*"))
            with open(os.path.join(out, "logs", f"CartpoleSwingup__{algo}__1.log")) as f:
                runs[script] = run_path, f.read()
        return runs[script]

    get.out = out
    return get


def run_benchmark(*args, timeout=900, log_compiles=False):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **({"JAX_LOG_COMPILES": "1"} if log_compiles else {})},
    )
