"""Shared test set-up: the persistent compilation cache, the CPU configuration, and one learning run per script (from
benchmark.sh's smoke preset) that the learning, end-to-end and benchmark tests all read."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MJX programs take tens of seconds to compile on a CPU; the cache lets later tests (and subprocesses) reuse them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, ROOT)

import jax  # noqa: E402  (after the cache settings, which JAX reads when it is imported)
import jax.numpy as jnp  # noqa: E402

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
    "ppo_continuous.py": (("--total-timesteps", 0), 120.0),  # deterministic: 208.7, 224.6, 218.2
    "gorl_ppo_fm.py": (("--stage-timesteps", 0), 120.0),  # deterministic: 195.9, 212.7, 231.6
    "gorl_ppo_diffusion.py": (("--stage-timesteps", 0), 120.0),  # deterministic: 243.0, 220.2, 245.8
    "fpo.py": (("--total-timesteps", 0), 120.0),  # stochastic: 229.0, 223.3, 236.7
    "dppo.py": (("--total-timesteps", 0), 120.0),  # stochastic: 199.7, 217.0, 197.7
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


def documented_commands(page):
    """The command lines a markdown page shows, backslash-continued lines joined: every line of its fenced code blocks,
    then every inline code span of the rest (a span may wrap across lines)."""
    with open(os.path.join(ROOT, page)) as f:
        text = f.read().replace("\\\n", " ")
    fence = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
    lines = [line for block in fence.findall(text) for line in block.splitlines()]
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", fence.sub("", text))]


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


@pytest.fixture
def signal_handlers():
    """A script's Run installs its stop handlers in the process that makes it: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run_benchmark(*args, timeout=900, log_compiles=False):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **({"JAX_LOG_COMPILES": "1"} if log_compiles else {})},
    )


class ToyData(NamedTuple):
    qpos: jax.Array  # (3,) the step within the episode and the point's position
    mocap_pos: jax.Array  # (0, 3)
    mocap_quat: jax.Array  # (0, 4)


class ToyState(NamedTuple):
    data: ToyData
    obs: jax.Array  # (4,) [step within the episode, position, 1]
    reward: jax.Array  # ()
    done: jax.Array  # ()


class ToyEnv:
    """A stand-in for a Playground env with its API (reset, step, the State's fields the scripts read), for tests that
    run the scripts' own programs without physics, so that they compile in seconds: a point in the plane, started at a
    random position and pushed by the action, rewarded for staying near the origin. Its first observation is the step
    within the episode, so the observation statistics of a rollout are known in advance."""

    observation_size, action_size = 4, 2

    def reset(self, key):
        return self.state(jnp.zeros(()), jax.random.normal(key, (2,)), jnp.zeros(()))

    def step(self, state, action):
        position = state.data.qpos[1:] + 0.1 * action
        return self.state(state.data.qpos[0] + 1.0, position, -jnp.sum(position**2))

    def state(self, step, position, reward):
        qpos = jnp.concatenate([step[None], position])
        obs = jnp.concatenate([qpos, jnp.ones(1)])
        return ToyState(ToyData(qpos, jnp.zeros((0, 3)), jnp.zeros((0, 4))), obs, reward, jnp.zeros(()))


def acting_gorl_model(module, env, key):
    """A GoRL script's networks for `env` and a model away from every special case: an encoder moved off the prior (its
    mean and std vary with the state), observation statistics of data, and a decoder that is not the identity (random
    weights and statistics of its own), so that the latent, the pre-tanh action and the env's action all differ."""
    keys = iter(jax.random.split(key, 100))
    networks, params = module.make_networks(env, next(keys))
    decoder_network = networks[2]
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), params)
    obs_size, action_size = env.observation_size, env.action_size
    stats = module.update_running_stats(
        module.init_running_stats(obs_size), 2.0 + 3.0 * jax.random.normal(next(keys), (50, obs_size))
    )
    decoder_stats = module.update_running_stats(
        module.init_running_stats(obs_size), jax.random.normal(next(keys), (50, obs_size))
    )
    decoder = module.identity_decoder(decoder_network, next(keys), obs_size, action_size)
    decoder_params = decoder_network.init(
        next(keys), jnp.zeros((1, obs_size)), jnp.zeros((1, action_size)), jnp.zeros((1, 1))
    )
    decoder = decoder._replace(params=decoder_params, obs_stats=decoder_stats)
    if hasattr(decoder, "identity"):  # GoRL(Diff): a fitted decoder's flag is off
        decoder = decoder._replace(identity=jnp.array(False))
    return networks, {"params": params, "obs_stats": stats, "decoder": decoder}
