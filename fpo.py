"""Flow Policy Optimization (FPO) on MuJoCo Playground's DeepMind Control Suite (MJX): a GoRL paper baseline.

FPO (McAllister et al., 2025, "Flow Matching Policy Gradients") makes the policy a flow: a velocity field v(s, x, t)
carries N(0, I) noise at t = 1 to the pre-tanh action at t = 0 in 10 Euler steps. Its likelihood is intractable, so
PPO's ratio is replaced by one per (noise, time) pair drawn at rollout time: exp(loss_old - loss_new) of the
conditional flow-matching loss at the taken action, whose decrease lower-bounds a rise in the action's likelihood.
Everything else (critic, Brax-form advantages, minibatching, observation statistics) is ppo_continuous.py's.

The default is the configuration the GoRL paper (Zhang, Wan et al., arXiv 2512.02581) ran FPO in, the authors' fork
of the FPO code: one ratio per (noise, time) pair (8 pairs per action, times on the sampler's grid, log-ratios clipped
to +-3), the `u_but_supervise_as_eps` loss form, surrogate clip 0.05, learning rate 3e-4, no entropy term.
`--ratio per_action` is the FPO paper's form instead: one ratio per action, from the pairs' losses averaged before the
exponential, times drawn from U[0, 1).

    python fpo.py --env-id CheetahRun      # the paper's configuration: 180M steps, made for a GPU

Evaluation, as the paper's numbers were made: the stochastic policy (noise drawn from N(0, I)); the deterministic one
(the flow from zero noise, the noise distribution's mode) is measured beside it.

Fixed against the authors' code (docs/implementation_details.md says why): the running observation variance (theirs
dropped the old variance at every update), fresh random start states for every episode (theirs replayed one start per
env), and advantage normalisation over the steps that have an advantage; the stored losses are computed with the
statistics the update uses, so every ratio starts at exactly 1.

Shapes in comments: B envs stepped in parallel, T steps per env in one rollout, U steps per sequence (the unroll),
N sequences in a minibatch (or pairs in a decoder batch), O observation size, A action size (GoRL's latent has it
too), M (noise, time) pairs per action, K denoising steps or diffusion levels.

Sources: GoRL, arXiv 2512.02581, and its authors' code, github.com/bennidict23/GoRL; FPO, arXiv 2507.21053,
github.com/akanazawa/fpo; DPPO, arXiv 2409.00588, github.com/irom-lab/dppo; PPO, arXiv 1707.06347, in the form of
Brax's PPO (github.com/google/brax, brax/training/agents/ppo/losses.py); MuJoCo Playground,
github.com/google-deepmind/mujoco_playground.
"""

import ctypes.util
import json
import os
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from typing import Any, Literal, NamedTuple, Optional, Sequence

# MuJoCo chooses its OpenGL backend when it is imported: --capture-video renders off-screen, through EGL where there is
# no display (MUJOCO_GL chooses another). Only where EGL is installed: without it, mujoco's EGL backend fails to import.
if not os.environ.get("DISPLAY") and ctypes.util.find_library("EGL"):
    os.environ.setdefault("MUJOCO_GL", "egl")

import flax.linen as nn
import flax.serialization
import imageio_ffmpeg
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import optax
import tyro
from jax import lax
from mujoco_playground import dm_control_suite, registry
from tensorboardX import SummaryWriter

ALGO = "fpo"
# How the paper evaluated this algorithm (its headline: eval.csv's eval_return_mean, summary.json's final_eval_return),
# then the other mode, measured beside it on the same episodes.
EVAL_MODES = ("stochastic", "deterministic")
NUM_FLOW_STEPS = 10  # Euler steps of the policy's flow
NUM_NOISE_PAIRS = 8  # (noise, time) pairs drawn per action, each with its own ratio
LOG_RATIO_CLIP = 3.0  # per-pair clip of loss_old - loss_new before the exponential


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__).removesuffix(".py")
    """the name of this experiment (part of the run folder's name): by default the script's file name, so that the runs
    of a copy stand apart from its original's"""
    seed: int = 1
    """seed of the experiment: every random draw of the run derives from it"""
    env_id: str = "CheetahRun"
    """a MuJoCo Playground DeepMind Control Suite task"""
    impl: Literal["jax", "warp"] = "jax"
    """the MJX physics implementation (the paper's numbers came from `jax`)"""
    run_dir: str = "runs"
    """the folder that receives one sub-folder per run"""
    save_model: bool = False
    """save the model (its networks and observation statistics) to `model.msgpack` in the run folder at every
    evaluation"""
    resume: Optional[str] = None
    """continue the interrupted run in this run folder from its last checkpoint, exactly as if it had not stopped
    (every other option is the run's own, from its config.json)"""
    checkpoint_interval: float = 10.0
    """minutes between checkpoints besides the one at every evaluation (SIGTERM and SIGINT also write one)"""
    load_model: Optional[str] = None
    """start from a `model.msgpack` saved by this script, counting env steps on from the step it was saved at; with
    `--total-timesteps 0` it is only evaluated (on the episodes its own run evaluated it on)"""
    capture_video: bool = False
    """at every evaluation, render the first episode of the evaluated policy (in the mode its return is reported in)
    to videos/{env steps}.mp4 in the run folder and to TensorBoard; with `--load-model` and no training, render that
    model"""
    video_width: int = 320
    """width of the videos in pixels (even)"""
    video_height: int = 240
    """height of the videos in pixels (even)"""
    video_frame_stride: int = 2
    """draw every n-th control step (2: 50 frames per second of simulated time on most tasks)"""
    compilation_cache_dir: str = os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/gorl/jax")
    """where compiled XLA programs are kept, so that the next start of the same configuration loads them instead of
    compiling again; default $JAX_COMPILATION_CACHE_DIR, else ~/.cache/gorl/jax; "" turns the cache off"""
    track: bool = False
    """also log to Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "gorl"
    """the Weights and Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights and Biases entity (team)"""

    # Algorithm specific arguments
    total_timesteps: int = 180_000_000
    """env steps of training, rounded down to whole iterations"""
    num_envs: int = 2048
    """parallel training environments"""
    num_eval_envs: int = 128
    """episodes per evaluation, one per parallel environment"""
    eval_interval: int = 6_000_000
    """evaluate each time training crosses a multiple of this many env steps (and before and after training)"""
    learning_rate: float = 3e-4
    """Adam's learning rate (constant)"""
    gamma: float = 0.995
    """discount factor (0.995 on every task, FingerSpin included, as the authors ran FPO)"""
    gae_lambda: float = 0.95
    """lambda of the advantage estimate"""
    clip_eps: float = 0.05
    """PPO's surrogate clipping epsilon, applied to every ratio"""
    ratio: Literal["per_pair", "per_action"] = "per_pair"
    """`per_pair`: one ratio per (noise, time) pair, times on the sampler's grid, log-ratios clipped to +-3 (the
    configuration GoRL ran FPO in); `per_action`: the FPO paper's one ratio per action, from its pairs' losses averaged
    before the exponential, times drawn from U[0, 1)"""
    vf_coef: float = 0.25
    """coefficient of the value loss"""
    reward_scaling: float = 10.0
    """rewards are multiplied by this inside the losses only; logged returns are raw"""
    num_minibatches: int = 32
    """minibatches per epoch"""
    batch_size: int = 1024
    """unroll-length sequences per minibatch"""
    unroll_length: int = 30
    """steps per sequence; advantages are computed within a sequence"""
    update_epochs: int = 16
    """passes over each rollout"""
    max_grad_norm: float = float("inf")
    """global gradient-norm clip (inf: none, as the paper's FPO)"""

    rollout_length: int = field(default=0, init=False)
    """steps per env per iteration (filled at runtime: num_minibatches * batch_size * unroll_length / num_envs)"""
    num_iterations: int = field(default=0, init=False)
    """training iterations (filled at runtime)"""


# ---------------------------------------------------------------------------------------------------------------------
# Networks


class MLP(nn.Module):
    """Dense layers with SiLU between them and a linear output; LeCun-uniform weights, zero biases."""

    layer_sizes: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for i, size in enumerate(self.layer_sizes):
            x = nn.Dense(size, kernel_init=nn.initializers.lecun_uniform())(x)
            if i < len(self.layer_sizes) - 1:
                x = nn.silu(x)
        return x


def time_embedding(t):
    """[cos(t 2^k), sin(t 2^k)] for k = 0..3: the policy's 8 time features."""
    frequencies = 2.0 ** jnp.arange(4)
    return jnp.concatenate([jnp.cos(t * frequencies), jnp.sin(t * frequencies)], axis=-1)


class ConditionalField(nn.Module):
    """f(s, x, t): an MLP on [normalised state, x, time features], its output scaled; the policy's velocity field."""

    hidden_sizes: Sequence[int]
    output_size: int
    output_scale: float

    @nn.compact
    def __call__(self, obs, x, t):
        t = jnp.broadcast_to(t, x.shape[:-1] + (1,))
        mlp = MLP((*self.hidden_sizes, self.output_size))
        return self.output_scale * mlp(jnp.concatenate([obs, x, time_embedding(t)], axis=-1))


def euler_integrate(velocity, x, num_steps):
    """Integrate dx/dt = velocity(x, t) from t = 1 down to t = 0 in `num_steps` Euler steps."""

    def euler_step(x, t):
        return x - velocity(x, t) / num_steps, None

    x, _ = lax.scan(euler_step, x, 1.0 - jnp.arange(num_steps) / num_steps)
    return x


def flow_action(policy, params, obs, noise):
    """The pre-tanh action the flow carries `noise` (at t = 1) to; obs normalised."""
    return euler_integrate(lambda x, t: policy.apply(params, obs, x, t), noise, NUM_FLOW_STEPS)


def cfm_losses(policy, params, obs, actions, noise, t):
    """Per-pair conditional flow-matching losses on the path x_t = t * noise + (1 - t) * action, in FPO's
    `u_but_supervise_as_eps` form: the noise the velocity implies, x_t + (1 - t) v, against the true noise. That is
    (1 - t)^2 mean_d (noise - action - v)^2. obs (..., O) normalised, actions (..., A), noise (..., M, A),
    t (..., M, 1); returns (..., M)."""
    x_t = t * noise + (1.0 - t) * actions[..., None, :]
    obs = jnp.broadcast_to(obs[..., None, :], x_t.shape[:-1] + obs.shape[-1:])
    implied_noise = x_t + (1.0 - t) * policy.apply(params, obs, x_t, t)
    return jnp.mean((noise - implied_noise) ** 2, axis=-1)


def sample_pairs(key, shape, times_on_grid):
    """NUM_NOISE_PAIRS (noise, time) pairs per action of `shape` (..., A), times on the sampler's grid 1.0, ..., 0.1 or
    drawn from U[0, 1)."""
    noise_key, time_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, shape[:-1] + (NUM_NOISE_PAIRS, shape[-1]))
    if times_on_grid:
        steps = jax.random.randint(time_key, shape[:-1] + (NUM_NOISE_PAIRS, 1), 0, NUM_FLOW_STEPS)
        return noise, 1.0 - steps / NUM_FLOW_STEPS
    return noise, jax.random.uniform(time_key, shape[:-1] + (NUM_NOISE_PAIRS, 1))


def make_networks(env, key):
    """The policy's velocity field v(s, x, t) and the critic, and their initial parameters."""
    policy_key, critic_key = jax.random.split(key)
    policy = ConditionalField((32,) * 4, env.action_size, output_scale=0.25)
    critic = MLP((256,) * 5 + (1,))

    def init(policy_key, critic_key):
        dummy_obs, dummy_action = jnp.zeros((1, env.observation_size)), jnp.zeros((1, env.action_size))
        return {
            "policy": policy.init(policy_key, dummy_obs, dummy_action, jnp.zeros((1, 1))),
            "critic": critic.init(critic_key, dummy_obs),
        }

    return (policy, critic), jax.jit(init)(policy_key, critic_key)  # one program, not one compile per operation


# ---------------------------------------------------------------------------------------------------------------------
# Environment


def make_env(env_id, impl):
    """The Playground env with the chosen physics implementation, and its episode length (time limit)."""
    if not hasattr(mujoco.MjSpec, "find_body"):  # playground 0.2.0's Reacher calls what mujoco 3.17 calls MjSpec.body
        mujoco.MjSpec.find_body = mujoco.MjSpec.body
    config = registry.get_default_config(env_id)
    config.impl = impl
    env = registry.load(env_id, config=config)
    # Jitted, the physics is traced once per process and its trace reused by every program that steps or resets it
    # (tracing CheetahRun's reset, 200 settling steps, takes two seconds). Playground's `observation_size` resets with a
    # raw key (uint32[2]) where the scripts pass typed ones: a typed key becomes its raw data, so both share one trace.
    reset = jax.jit(env.reset)
    env.reset, env.step = (lambda key: reset(jax.random.key_data(key) if is_key(key) else key)), jax.jit(env.step)
    return env, config.episode_length


class RunningStats(NamedTuple):
    count: jax.Array  # ()
    mean: jax.Array  # (O,)
    var_sum: jax.Array  # (O,) sum of squared deviations from the mean


def init_running_stats(size):
    return RunningStats(jnp.zeros(()), jnp.zeros(size), jnp.zeros(size))


def update_running_stats(stats, batch):
    """Fold a batch of observations (..., O) into the statistics (Chan et al.'s parallel algorithm)."""
    batch = batch.reshape(-1, batch.shape[-1])
    count = stats.count + batch.shape[0]
    batch_mean = jnp.mean(batch, axis=0)
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * batch.shape[0] / count
    # The authors' update replaced var_sum instead of adding to it, so their std shrank as 1/sqrt(updates).
    var_sum = (
        stats.var_sum + jnp.sum((batch - batch_mean) ** 2, axis=0) + delta**2 * stats.count * batch.shape[0] / count
    )
    return RunningStats(count, mean, var_sum)


def normalize(stats, obs):
    """Standardise observations; the identity before any data. The clip keeps a feature that was constant so far
    (an idle touch sensor) from exploding the first time it moves."""
    std = jnp.sqrt(jnp.clip(stats.var_sum / jnp.maximum(stats.count, 1.0), 1e-12, 1e12))
    std = jnp.where(stats.count > 0, std, 1.0)
    return jnp.clip((obs - stats.mean) / std, -10.0, 10.0)


class RolloutCarry(NamedTuple):
    env_state: Any  # Playground State, every leaf with a leading env axis (B, ...)
    steps: jax.Array  # (B,) steps taken in the current episode; 0: it has not begun, its env is reset before acting
    episode_return: jax.Array  # (B,) raw reward summed over the current episode


class Transition(NamedTuple):
    obs: jax.Array  # (T, B, O) raw observation the action was chosen from
    action: jax.Array  # (T, B, A) pre-tanh action
    noise: jax.Array  # (T, B, M, A) the noise of each of the action's M (noise, time) pairs
    t: jax.Array  # (T, B, M, 1) the time of each pair
    cfm_loss: jax.Array  # (T, B, M) each pair's flow-matching loss under the policy that acted
    reward: jax.Array  # (T, B) raw reward
    termination: jax.Array  # (T, B) 1.0 where the env ended the episode: no bootstrap
    truncation: jax.Array  # (T, B) 1.0 where the time limit cut it: the step is left out of the losses


def make_rollout(env, policy, num_steps, episode_length, times_on_grid=True):
    def init(num_envs):
        """The carry before the first step: no episode has begun, so the first step resets every env (a reset program
        of its own would be one more copy of the physics to compile). Until then the env state is zeros of the reset's
        shapes; MJX-Warp's buffers without an env axis are scratch that every step rewrites."""
        shapes = jax.eval_shape(jax.vmap(env.reset), jax.random.split(jax.random.key(0), num_envs))
        env_state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        return RolloutCarry(env_state, np.zeros(num_envs, np.int32), np.zeros(num_envs, np.float32))

    def rollout(policy_params, obs_stats, carry, key):
        """Step every env `num_steps` times with the stochastic policy; returns time-major (T, B) transitions."""

        def step(carry, keys):
            key, reset_key = keys
            env_state = auto_reset(carry.steps == 0, carry.env_state, reset_key)
            obs = env_state.obs
            normalized_obs = normalize(obs_stats, obs)
            action_key, pair_key = jax.random.split(key)
            action_noise = jax.random.normal(action_key, (obs.shape[0], policy.output_size))
            action = flow_action(policy, policy_params, normalized_obs, action_noise)
            noise, t = sample_pairs(pair_key, action.shape, times_on_grid)
            cfm_loss = cfm_losses(policy, policy_params, normalized_obs, action, noise, t)
            env_state = jax.vmap(env.step)(env_state, jnp.tanh(action))
            steps = carry.steps + 1
            episode_return = carry.episode_return + env_state.reward
            termination = env_state.done
            truncation = jnp.where(steps >= episode_length, 1.0 - termination, 0.0)
            done = (termination + truncation) > 0
            transition = Transition(obs, action, noise, t, cfm_loss, env_state.reward, termination, truncation)
            carry = RolloutCarry(env_state, jnp.where(done, 0, steps), jnp.where(done, 0.0, episode_return))
            return carry, (transition, jnp.where(done, episode_return, jnp.nan))

        reset_key, key = jax.random.split(key)
        keys = (jax.random.split(key, num_steps), jax.random.split(reset_key, num_steps))
        carry, (transitions, finished_returns) = lax.scan(step, carry, keys)
        return carry, transitions, finished_returns

    def auto_reset(begin, env_state, key):
        """Fresh start states for the envs whose episode begins (`begin`), so that every episode starts from a new
        random state. They are made only in the steps where an episode begins (after the time limit, all envs at once):
        a reset can cost many physics steps (CheetahRun's settles for 200)."""

        def reset(env_state):
            reset_state = jax.vmap(env.reset)(jax.random.split(key, begin.shape[0]))
            return reset_where(begin, reset_state, env_state)

        return lax.cond(jnp.any(begin), reset, lambda env_state: env_state, env_state)

    # MJX-Warp keeps some buffers shared by all envs (no env axis): auto-reset leaves those leaves alone.
    single_state = jax.eval_shape(env.reset, jax.random.key(0))

    def reset_where(begin, reset_state, state):
        def select(single, reset_leaf, leaf):
            if leaf.shape != begin.shape + single.shape:
                return leaf
            return jnp.where(begin.reshape(begin.shape + (1,) * len(single.shape)), reset_leaf, leaf)

        return jax.tree.map(select, single_state, reset_state, state)

    return init, rollout


# ---------------------------------------------------------------------------------------------------------------------
# Losses and the update


def compute_advantages(rewards, values, bootstrap_value, termination, truncation, gamma, gae_lambda):
    """Brax-form advantages over time-major (U, N) sequences (brax/training/agents/ppo/losses.py, compute_gae).

    The value targets are TD(lambda) returns; the advantage is r_t + gamma * target_{t+1} - V_t. Termination stops
    bootstrapping; a truncated step (its successor is already a reset state) gets neither target error nor advantage,
    and the lambda-recursion does not cross it."""
    not_truncated = 1.0 - truncation
    discounts = gamma * (1.0 - termination)
    next_values = jnp.concatenate([values[1:], bootstrap_value[None]])
    deltas = (rewards + discounts * next_values - values) * not_truncated

    def backward(acc, xs):
        delta, discount, mask = xs
        acc = delta + discount * gae_lambda * mask * acc
        return acc, acc

    _, targets_minus_values = lax.scan(
        backward, jnp.zeros_like(bootstrap_value), (deltas, discounts, not_truncated), reverse=True
    )
    value_targets = targets_minus_values + values
    next_targets = jnp.concatenate([value_targets[1:], bootstrap_value[None]])
    advantages = (rewards + discounts * next_targets - values) * not_truncated
    return lax.stop_gradient(value_targets), lax.stop_gradient(advantages)


def normalize_advantages(advantages, mask):
    """Zero mean, unit std over the entries where mask is 1; masked entries stay 0."""
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(advantages * mask) / count
    std = jnp.sqrt(jnp.sum(((advantages - mean) * mask) ** 2) / count)
    return (advantages - mean) / (std + 1e-8) * mask


class TrainState(NamedTuple):
    params: dict  # {"policy": ..., "critic": ...}
    opt_state: Any
    obs_stats: RunningStats
    rollout_carry: RolloutCarry
    key: jax.Array


def make_update(policy, critic, optimizer, args):
    def loss_fn(params, obs_stats, batch, bootstrap_obs):
        obs = normalize(obs_stats, batch.obs)  # (U, N, O)
        values = critic.apply(params["critic"], obs)[..., 0]  # (U, N)
        bootstrap_value = critic.apply(params["critic"], normalize(obs_stats, bootstrap_obs))[..., 0]  # (N,)
        value_targets, advantages = compute_advantages(
            batch.reward * args.reward_scaling,
            values,
            bootstrap_value,
            batch.termination,
            batch.truncation,
            args.gamma,
            args.gae_lambda,
        )
        advantages = normalize_advantages(advantages, 1.0 - batch.truncation)

        # FPO's ratio exp(loss_old - loss_new) of the conditional flow-matching loss at the taken action.
        cfm_loss = cfm_losses(policy, params["policy"], obs, batch.action, batch.noise, batch.t)  # (U, N, M)
        if args.ratio == "per_pair":  # one ratio per (noise, time) pair, each with the action's advantage
            log_ratio = jnp.clip(batch.cfm_loss - cfm_loss, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)  # (U, N, M)
            advantages = advantages[..., None]
        else:  # one ratio per action, from the mean of its pairs' losses
            log_ratio = jnp.mean(batch.cfm_loss, axis=-1) - jnp.mean(cfm_loss, axis=-1)  # (U, N)
        ratio = jnp.exp(log_ratio)
        clipped_ratio = jnp.clip(ratio, 1.0 - args.clip_eps, 1.0 + args.clip_eps)
        # PPO's clipped surrogate with FPO's ratio exp(L_CFM,old - L_CFM,new) (arXiv 2507.21053) in place of the
        # likelihood ratio; the value term as in Brax's PPO losses.
        policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))
        value_loss = jnp.mean((value_targets - values) ** 2)
        loss = policy_loss + args.vf_coef * value_loss
        return loss, {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "cfm_loss": jnp.mean(cfm_loss),
            "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
            "clipfrac": jnp.mean(jnp.abs(ratio - 1.0) > args.clip_eps),
        }

    def update(params, opt_state, obs_stats, transitions, last_obs, key):
        """`update_epochs` passes over one rollout, each cutting it into freshly shuffled minibatches of sequences."""
        unroll, num_minibatches, batch_size = args.unroll_length, args.num_minibatches, args.batch_size
        # (T, B, ...) -> (B * T / U, U, ...): every env's rollout cut into consecutive sequences of U steps.
        sequences = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1, unroll) + x.shape[2:]), transitions)
        # A sequence bootstraps from the observation after its last step (unused where that step ended an episode).
        bootstrap_obs = jnp.concatenate([transitions.obs, last_obs[None]])[unroll::unroll]  # (T / U, B, O)
        bootstrap_obs = jnp.swapaxes(bootstrap_obs, 0, 1).reshape(-1, last_obs.shape[-1])  # (B * T / U, O)

        def minibatch_step(carry, minibatch):
            params, opt_state = carry
            batch, batch_bootstrap_obs = minibatch
            grads, metrics = jax.grad(loss_fn, has_aux=True)(params, obs_stats, batch, batch_bootstrap_obs)
            updates, opt_state = optimizer.update(grads, opt_state)
            metrics["grad_norm"] = optax.global_norm(grads)
            return (optax.apply_updates(params, updates), opt_state), metrics

        def epoch(carry, key):
            permutation = jax.random.permutation(key, bootstrap_obs.shape[0])
            # (B * T / U, U, ...) -> (num_minibatches, U, batch_size, ...): time-major inside a minibatch.
            batches = jax.tree.map(
                lambda x: jnp.swapaxes(x[permutation].reshape((num_minibatches, batch_size) + x.shape[1:]), 1, 2),
                sequences,
            )
            batch_bootstrap_obs = bootstrap_obs[permutation].reshape(num_minibatches, batch_size, -1)
            return lax.scan(minibatch_step, carry, (batches, batch_bootstrap_obs))

        (params, opt_state), metrics = lax.scan(epoch, (params, opt_state), jax.random.split(key, args.update_epochs))
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    return update


def make_train_iteration(rollout, update):
    def train_iteration(state):
        key, rollout_key, update_key = jax.random.split(state.key, 3)
        carry, transitions, finished_returns = rollout(
            state.params["policy"], state.obs_stats, state.rollout_carry, rollout_key
        )
        params, opt_state, metrics = update(
            state.params, state.opt_state, state.obs_stats, transitions, carry.env_state.obs, update_key
        )
        # The update normalised with the statistics the rollout used, so its first ratios are exactly 1; the new
        # observations are folded in afterwards.
        obs_stats = update_running_stats(state.obs_stats, transitions.obs)
        metrics["train_episode_return"] = jnp.nanmean(finished_returns)
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])
        )
        return TrainState(params, opt_state, obs_stats, carry, key), metrics

    return train_iteration


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def make_evaluate(env, policy, num_eval_envs, episode_length):
    def evaluate(model, key, deterministic):
        """Raw returns in `num_eval_envs` fresh episodes of `episode_length` steps, without auto-reset, of the model's
        deterministic policy (the flow from zero noise, the noise distribution's mode) or of its stochastic one (from
        noise drawn from N(0, I)); and the first episode."""
        policy_params, obs_stats = model["params"]["policy"], model["obs_stats"]
        reset_key, noise_key = jax.random.split(key)
        env_state = jax.vmap(env.reset)(jax.random.split(reset_key, num_eval_envs))

        def step(carry, key):
            env_state, alive, returns = carry
            noise = jnp.where(deterministic, 0.0, jax.random.normal(key, (num_eval_envs, policy.output_size)))
            action = flow_action(policy, policy_params, normalize(obs_stats, env_state.obs), noise)
            env_state = jax.vmap(env.step)(env_state, jnp.tanh(action))
            returns = returns + jnp.where(alive, env_state.reward, 0.0)
            # An episode the env ends (its physics went NaN) scores nothing more.
            return (env_state, alive & (env_state.done == 0), returns), first_env_pose(env_state)

        init = (env_state, jnp.ones(num_eval_envs, bool), jnp.zeros(num_eval_envs))
        (_, _, returns), poses = lax.scan(step, init, jax.random.split(noise_key, episode_length))
        # The first episode from its start, for --capture-video: (T + 1, ...) per pose array.
        episode = jax.tree.map(
            lambda start, rest: jnp.concatenate([start[None], rest]), first_env_pose(env_state), poses
        )
        return returns, episode

    return evaluate


# ---------------------------------------------------------------------------------------------------------------------
# main


def check_args(args):
    """Exit with one line naming the problem, before anything is compiled or written."""
    if args.env_id not in dm_control_suite.ALL_ENVS:
        sys.exit(f"error: unknown --env-id {args.env_id!r}; choose one of: {', '.join(dm_control_suite.ALL_ENVS)}")
    for name in (
        "num_envs",
        "num_eval_envs",
        "eval_interval",
        "num_minibatches",
        "batch_size",
        "unroll_length",
        "update_epochs",
    ):
        if getattr(args, name) <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if (args.num_minibatches * args.batch_size) % args.num_envs:
        sys.exit(
            f"error: --num-minibatches x --batch-size ({args.num_minibatches} x {args.batch_size}) must be a multiple "
            f"of --num-envs ({args.num_envs}), so that every env's rollout cuts into whole unrolls"
        )
    if not 0.0 < args.gamma <= 1.0:
        sys.exit(f"error: --gamma must be in (0, 1], got {args.gamma}")
    if args.learning_rate <= 0 or args.clip_eps <= 0 or args.max_grad_norm <= 0:
        sys.exit("error: --learning-rate, --clip-eps and --max-grad-norm must be positive")
    check_run_args(args)
    args.rollout_length = args.num_minibatches * args.batch_size * args.unroll_length // args.num_envs
    steps_per_iteration = args.num_envs * args.rollout_length
    if args.total_timesteps < 0:
        sys.exit(f"error: --total-timesteps must be >= 0, got {args.total_timesteps}")
    if 0 < args.total_timesteps < steps_per_iteration:
        sys.exit(
            f"error: --total-timesteps {args.total_timesteps} is less than one iteration ({steps_per_iteration} env "
            f"steps = --num-envs x rollout length)"
        )
    args.num_iterations = args.total_timesteps // steps_per_iteration


def main(args):
    args, checkpoint = read_checkpoint(args.resume) if args.resume else (args, None)
    check_args(args)
    use_compilation_cache(args.compilation_cache_dir)
    network_key, eval_key, train_key = jax.random.split(jax.random.key(args.seed), 3)
    env, episode_length = make_env(args.env_id, args.impl)
    renderer = open_renderer(env, args)
    (policy, critic), params = make_networks(env, network_key)
    model = {"params": params, "obs_stats": init_running_stats(env.observation_size)}
    model, start_steps = load_model(args.load_model, args, model) if args.load_model else (model, 0)
    optimizer = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.learning_rate))
    init_rollout, rollout = make_rollout(env, policy, args.rollout_length, episode_length, args.ratio == "per_pair")
    update = make_update(policy, critic, optimizer, args)
    evaluate = make_evaluate(env, policy, args.num_eval_envs, episode_length)
    run = Run(args, env, renderer, start_steps, checkpoint)
    steps_per_iteration = args.num_envs * args.rollout_length
    print(f"{args.env_id} ({args.impl}): {args.num_iterations} iterations x {steps_per_iteration:,} env steps")

    # The model is evaluated at the first step as soon as the evaluation has compiled, while training compiles.
    run.start_evaluations(evaluate, model, eval_key)
    if args.num_iterations == 0:  # --total-timesteps 0: the model is only evaluated
        run.finish({})
        return
    opt_state = optimizer.init(model["params"])
    state = TrainState(model["params"], opt_state, model["obs_stats"], init_rollout(args.num_envs), train_key)
    train_iteration = run.compile_training(make_train_iteration(rollout, update), state)
    state = run.resume(state)

    for iteration in run.iterations(args.num_iterations):
        state, metrics = train_iteration(state)  # a rollout, then update_epochs passes over it
        run.log_iteration(metrics)
        if run.evaluation_due():
            run.evaluate({"params": state.params, "obs_stats": state.obs_stats})
        run.checkpoint_if_due(state)
    run.finish({})


# =====================================================================================================================
# Appendix: the run's plumbing. Nothing below is the algorithm: the run folder and its logs, model and checkpoint files,
# resume, stop signals, videos, compilation in threads and the checks of the run options. It is word for word the same
# in every script (tests/test_shared_text.py holds it so); a reader of the method can stop at the end of main.
# =====================================================================================================================


def use_compilation_cache(cache_dir):
    """MJX programs take tens of seconds to compile: later runs load them from the cache in `cache_dir` ("": none)
    instead, the small programs too (JAX keeps only those that took a second; dozens of small ones take seconds)."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir) or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def check_run_args(args):
    """The options every script shares: exit with one line naming the problem, before anything is written."""
    if args.checkpoint_interval <= 0:
        sys.exit(f"error: --checkpoint-interval must be positive, got {args.checkpoint_interval}")
    if min(args.video_width, args.video_height) <= 0 or (args.video_width | args.video_height) % 2:
        sys.exit(
            f"error: --video-width and --video-height must be positive and even, got {args.video_width} x "
            f"{args.video_height}"
        )
    if args.video_frame_stride <= 0:
        sys.exit(f"error: --video-frame-stride must be positive, got {args.video_frame_stride}")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        sys.exit(f"error: --load-model {args.load_model}: no such file")
    if not args.resume:
        existing = os.path.abspath(args.run_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            sys.exit(f"error: --run-dir {args.run_dir}: cannot write there ({existing} is not a writable folder)")


# ---------------------------------------------------------------------------------------------------------------------
# Files: written atomically, models and checkpoints as flax msgpack (never pickle)


def write_atomic(path, data):
    """Replace the file `path` with `data` (text or bytes) in one step: a crash leaves the old file or the new one."""
    with open(path + ".tmp", "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def is_key(x):
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def save_arrays(path, header, tree):
    """One msgpack file: a JSON header and every array of `tree`, named by its place in the tree (keys as raw data)."""
    arrays = {
        jax.tree_util.keystr(place): np.asarray(jax.random.key_data(x) if is_key(x) else x)
        for place, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    write_atomic(path, flax.serialization.msgpack_serialize({"header": json.dumps(header), "arrays": arrays}))


def read_arrays(path, option, env_id, kind):
    """The header and arrays of a file save_arrays wrote for this script and task; exits with one line if it is not."""
    try:
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
        header, arrays = json.loads(saved["header"]), saved["arrays"]
    except FileNotFoundError:
        sys.exit(f"error: {option} {path}: no such file")
    except Exception as e:
        sys.exit(f"error: {option} {path} is not a readable {kind} file ({type(e).__name__}: {e})")
    if (header.get("algo"), header.get("env_id"), header.get("kind")) != (ALGO, env_id, kind):
        sys.exit(
            f"error: {option} {path} holds a {header.get('algo')} {header.get('kind')} for {header.get('env_id')}, "
            f"not a {ALGO} {kind} for {env_id}"
        )
    return header, arrays


def restore_arrays(arrays, target, option):
    """A tree shaped like `target` with the saved arrays; exits with one line if they do not fit its shapes."""
    leaves = []
    places, structure = jax.tree_util.tree_flatten_with_path(target)
    for place, x in places:
        name, expected = jax.tree_util.keystr(place), jax.random.key_data(x) if is_key(x) else x
        saved = arrays.get(name)
        if saved is None or saved.shape != expected.shape or saved.dtype != expected.dtype:
            sys.exit(f"error: {option} does not match the networks and sizes of this configuration (at {name})")
        leaves.append(jax.random.wrap_key_data(saved) if is_key(x) else jnp.asarray(saved))
    return jax.tree.unflatten(structure, leaves)


def save_model(path, args, env_steps, model):
    save_arrays(path, {"algo": ALGO, "env_id": args.env_id, "kind": "model", "env_steps": env_steps}, model)


def load_model(path, args, model):
    """(model, env_steps) from a file of --save-model, shaped like `model`; exits with one line if it does not fit."""
    header, arrays = read_arrays(path, "--load-model", args.env_id, "model")
    return restore_arrays(arrays, model, f"--load-model {path}"), header["env_steps"]


def read_checkpoint(run_path):
    """The arguments of the interrupted run in `run_path` (its config.json) and its checkpoint (progress, arrays);
    exits with one line if there is nothing of this script's there to continue."""
    if os.path.exists(os.path.join(run_path, "summary.json")):
        sys.exit(f"error: --resume {run_path}: that run has finished (it wrote summary.json); nothing to continue")
    try:
        with open(os.path.join(run_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --resume {run_path}: not a run folder with a readable config.json ({e})")
    saved = {f.name: config[f.name] for f in fields(Args) if f.init and f.name in config}
    args = Args(**{name: tuple(value) if isinstance(value, list) else value for name, value in saved.items()})
    args.resume, args.load_model = run_path, None  # the checkpoint holds whatever the run had loaded
    header, arrays = read_arrays(os.path.join(run_path, "checkpoint.msgpack"), "--resume", args.env_id, "checkpoint")
    return args, (header["progress"], arrays)


def run_metadata():
    versions = {
        p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "mujoco", "mujoco-mjx", "playground")
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"versions": versions, "git_commit": commit}


# ---------------------------------------------------------------------------------------------------------------------
# Videos: the episodes the evaluation ran, drawn by MuJoCo's renderer


def first_env_pose(env_state):
    """What it takes to draw the first env: its joint positions and the poses of its mocap bodies."""
    return env_state.data.qpos[0], env_state.data.mocap_pos[0], env_state.data.mocap_quat[0]


def open_renderer(env, args):
    """MuJoCo's off-screen renderer for --capture-video (None without it); exits with one line, before anything is
    written or compiled, where there is no OpenGL to render with."""
    if not args.capture_video:
        return None
    visual = env.mj_model.vis.global_
    visual.offwidth, visual.offheight = max(visual.offwidth, args.video_width), max(visual.offheight, args.video_height)
    try:
        return mujoco.Renderer(env.mj_model, args.video_height, args.video_width)
    except Exception as error:  # each backend fails its own way (FatalError, AttributeError, ImportError)
        sys.exit(
            f"error: --capture-video: MuJoCo cannot render with MUJOCO_GL={os.environ.get('MUJOCO_GL', '')!r} "
            f"({type(error).__name__}: {error}); set MUJOCO_GL=egl (on a machine without a GPU, with "
            "EGL_PLATFORM=surfaceless LIBGL_ALWAYS_SOFTWARE=1) or MUJOCO_GL=osmesa"
        )


def render_episode(renderer, env, episode, stride):
    """Frames (F, H, W, 3) of an episode the jitted evaluation ran, from every `stride`-th pose of `episode` (tuples of
    first_env_pose, stacked over time: nothing is simulated again), seen by the model's first camera (in the DeepMind
    Control Suite, the one that follows the body), and their frame rate in real time."""
    model, data = env.mj_model, mujoco.MjData(env.mj_model)
    frames = []
    for qpos, mocap_pos, mocap_quat in zip(*(np.asarray(x)[::stride] for x in episode)):
        data.qpos, data.mocap_pos, data.mocap_quat = qpos, mocap_pos, mocap_quat
        mujoco.mj_forward(model, data)
        renderer.update_scene(data, camera=0 if model.ncam else -1)
        frames.append(renderer.render())
    return np.stack(frames), 1.0 / (env.dt * stride)


# ---------------------------------------------------------------------------------------------------------------------
# The run: its folder, programs, evaluations, iterations, checkpoints and stop signals


class Run:
    """The host side of a run: its folder (config.json, eval.csv, TensorBoard, model.msgpack, checkpoint.msgpack,
    summary.json, videos), the compilation of its programs, the evaluations and iterations it logs, its checkpoints and
    the signals that stop it with one."""

    def __init__(self, args, env, renderer, start_steps, checkpoint):
        """A new run folder, or with `checkpoint` (from read_checkpoint) the interrupted run's, continued."""
        self.args, self.env, self.renderer = args, env, renderer
        self.start_time, self.compile_time, self.stop_signal = time.time(), 0.0, None
        self.progress, self.saved_arrays = checkpoint or ({}, None)  # the checkpoint's progress (empty in a new run)
        self.stage, self.iteration = None, self.progress.get("iteration", 0)
        self.env_steps = self.progress.get("env_steps", start_steps)
        self.start_steps = self.progress.get("start_steps", start_steps)
        self.train_time = self.progress.get("train_time", 0.0)
        self.previous_time = self.progress.get("elapsed", 0.0)
        self.eval_rows = self.progress.get("eval_rows", [])
        # XLA compiles a program on about one core: each compiles in a thread of its own while the next is traced.
        self.workers = ThreadPoolExecutor()
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        self.path = args.resume or os.path.join(args.run_dir, run_name)
        if not args.resume:
            try:
                os.makedirs(self.path)
            except OSError as e:
                sys.exit(f"error: cannot make the run folder {self.path} ({e.strerror}); nothing was written")
            write_atomic(
                os.path.join(self.path, "config.json"), json.dumps({**asdict(args), **run_metadata()}, indent=2)
            )
        if args.track:
            import wandb

            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                name=os.path.basename(self.path),
                id=os.path.basename(self.path),
                resume="allow",
                config=asdict(args),
                sync_tensorboard=True,
                save_code=True,
            )
        # A resumed run hides what the interrupted one logged after its checkpoint, so no step is shown twice.
        self.writer = SummaryWriter(self.path, purge_step=self.env_steps + 1 if args.resume else None)
        if not args.resume:
            self.writer.add_text(
                "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
            )
        self.checkpoint_time = time.time()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request_stop)
        print(f"run folder: {self.path}" + (f" (resumed at env step {self.env_steps:,})" if args.resume else ""))

    # Compilation, and the evaluation at the first step while the training iteration compiles

    def start_evaluations(self, evaluate, model, key):
        """Trace `evaluate(model, key, deterministic) -> (returns, first episode)` here and compile it in a thread; in a
        new run, evaluate `model` at this env step in another as soon as it is compiled."""
        print("compiling...")
        self.compile_start, self.eval_key = time.time(), key
        self.evaluate_program = self.workers.submit(jax.jit(evaluate).lower(model, key, True).compile)
        self.first_evaluation = None
        if not self.args.resume:
            self.first_evaluation = self.workers.submit(lambda: (model, *self.evaluate_in_both_modes(model)))

    def compile_training(self, train_iteration, *example_args):
        """`train_iteration` jitted, its first argument (the training state) donated, so that each iteration updates it
        in place; traced here, compiled in a thread, and returned once compiled and once the evaluation at the first
        step is logged (the first iteration donates the buffers that evaluation reads)."""
        program = self.workers.submit(jax.jit(train_iteration, donate_argnums=0).lower(*example_args).compile)
        self.log_first_evaluation()
        compiled = program.result()
        self.log_compile_time()
        return compiled

    def compile_in_background(self, function, *example_args):
        """`function` jitted, then traced and compiled in a thread while training goes on, from the shapes of the
        example arguments (training donates their buffers meanwhile); calling the result waits for the program."""
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), example_args)
        program = self.workers.submit(lambda: jax.jit(function).lower(*shapes).compile())
        return lambda *inputs: program.result()(*inputs)

    def log_first_evaluation(self):
        if self.first_evaluation is not None:
            self.log_evaluation(*self.first_evaluation.result())
            self.first_evaluation = None

    def log_compile_time(self):
        """Start-up is over: from the first trace to the training program compiled (or the run's one evaluation)."""
        self.compile_time = time.time() - self.compile_start
        print(f"compiled in {self.compile_time:.1f} s")

    # Evaluations

    def evaluate_compiled(self, model, key, deterministic):
        """The script's evaluation, compiled: `model`'s returns in the episodes of `key`, and its first episode."""
        return self.evaluate_program.result()(model, key, deterministic)

    def evaluate_in_both_modes(self, model):
        """`model`'s returns in each mode of EVAL_MODES, and its first episode in each: on new start states and noise at
        every evaluation, from a key of its env step, the same for both modes (paired) and in every run of this seed."""
        key = jax.random.fold_in(self.eval_key, self.env_steps)
        returns, episodes = zip(*(self.evaluate_compiled(model, key, mode == "deterministic") for mode in EVAL_MODES))
        return [np.asarray(r) for r in returns], episodes

    def evaluate(self, model):
        """Evaluate `model` at this env step and log it; returns its mean return in the paper's mode."""
        self.log_evaluation(model, *self.evaluate_in_both_modes(model))
        return self.eval_rows[-1][1]

    def log_evaluation(self, model, returns, episodes):
        """Log the returns (one array per mode of EVAL_MODES) of `model` evaluated at this env step: eval.csv,
        TensorBoard, the console, with --save-model the model and with --capture-video its first episode."""
        self.eval_rows.append((self.env_steps, *(float(f(r)) for r in returns for f in (np.mean, np.std))))
        self.writer.add_scalar("eval/episodic_return", returns[0].mean(), self.env_steps)
        self.writer.add_scalar("eval/episodic_return_std", returns[0].std(), self.env_steps)
        self.writer.add_scalar(f"eval/{EVAL_MODES[1]}_episodic_return", returns[1].mean(), self.env_steps)
        write_atomic(
            os.path.join(self.path, "eval.csv"),
            f"env_steps,eval_return_mean,eval_return_std,{EVAL_MODES[1]}_return_mean,{EVAL_MODES[1]}_return_std\n"
            + "".join(f"{row[0]}," + ",".join(f"{x:.4f}" for x in row[1:]) + "\n" for row in self.eval_rows),
        )
        if self.args.save_model:
            save_model(os.path.join(self.path, "model.msgpack"), self.args, self.env_steps, model)
        self.log_video(episodes[:1])
        sps = (self.env_steps - self.start_steps) / self.train_time if self.train_time > 0 else 0.0
        elapsed = time.strftime("%H:%M:%S", time.gmtime(self.previous_time + time.time() - self.start_time))
        print(
            f"eval  step {self.env_steps:>12,} | return {returns[0].mean():8.2f} +- {returns[0].std():7.2f} | "
            f"{EVAL_MODES[1]} {returns[1].mean():8.2f} | SPS {sps:9,.0f} | {elapsed}"
        )

    def log_video(self, episodes, suffix=""):
        """With --capture-video, render `episodes` (side by side) to videos/{env steps}{suffix}.mp4 in the run folder,
        and a preview (every fourth frame at half the size: TensorBoard stores videos as GIFs, 10 MB for a whole 320 x
        240 episode) to TensorBoard."""
        if self.renderer is None:
            return
        rendered = [
            render_episode(self.renderer, self.env, episode, self.args.video_frame_stride) for episode in episodes
        ]
        frames, fps = np.concatenate([frames for frames, _ in rendered], axis=2), rendered[0][1]
        os.makedirs(os.path.join(self.path, "videos"), exist_ok=True)
        path = os.path.join(self.path, "videos", f"{self.env_steps}{suffix}.mp4")
        video = imageio_ffmpeg.write_frames(path + ".part.mp4", frames.shape[2:0:-1], fps=fps, macro_block_size=2)
        video.send(None)
        for frame in frames:
            video.send(np.ascontiguousarray(frame))
        video.close()
        os.replace(path + ".part.mp4", path)
        preview = frames[None, ::4, ::2, ::2].transpose(0, 1, 4, 2, 3)  # (1, F / 4, 3, H / 2, W / 2)
        self.writer.add_video(f"videos/evaluation{suffix}", preview, self.env_steps, fps / 4)

    # Training iterations and checkpoints

    def resume(self, tree, **progress):
        """The training state to start from: with --resume the checkpoint's, shaped like `tree`; in a new run `tree`
        itself, checkpointed with the script's `progress` (a stop signal during compilation stops the run there)."""
        if self.args.resume:
            return restore_arrays(self.saved_arrays, tree, f"--resume {self.path}")
        self.checkpoint(tree, **progress)
        self.stop_if_requested()
        return tree

    def iterations(self, num_iterations, stage=None):
        """The numbers of the training iterations 1..num_iterations (of GoRL's `stage`) still to run: in the stage of
        the checkpoint a resumed run goes on after it. Each is timed from here to log_iteration."""
        done = self.progress.get("iteration", 0) if (stage or 0) == (self.progress.get("stage") or 0) else 0
        self.stage, self.last_iteration = stage, num_iterations
        for self.iteration in range(done + 1, num_iterations + 1):
            self.iteration_start = time.time()
            yield self.iteration

    def log_iteration(self, metrics):
        """Log the iteration's metrics (their copy to the host is the one sync of an iteration) and its speed; stop the
        run where a loss or a parameter is not finite. Returns the metrics, on the host."""
        metrics = jax.device_get(metrics)
        steps_per_iteration = self.args.num_envs * self.args.rollout_length
        iteration_time = time.time() - self.iteration_start
        self.train_time += iteration_time
        self.env_steps += steps_per_iteration
        label = "" if self.stage is None else f"stage {self.stage} "
        if not metrics["finite"]:
            self.writer.close()
            sys.exit(
                f"error: non-finite loss or parameters at {label}iteration {self.iteration} (env step "
                f"{self.env_steps:,}); training stopped, the logs and the last saved model in {self.path} are kept"
            )
        skipped = ("finite", "train_episode_return", "settings")
        self.log_scalars("losses", {k: v for k, v in metrics.items() if k not in skipped})
        # GoRL's stage settings, as this iteration's update received them: the logs say what ran.
        self.log_scalars("stage", metrics.get("settings", {}))
        if np.isfinite(metrics["train_episode_return"]):
            self.writer.add_scalar("charts/episodic_return", metrics["train_episode_return"], self.env_steps)
        self.writer.add_scalar("charts/SPS", steps_per_iteration / iteration_time, self.env_steps)
        print(
            f"{label}iter {self.iteration:>4}/{self.last_iteration} | step {self.env_steps:>12,} | loss "
            f"{metrics['loss']:8.4f} | SPS {steps_per_iteration / iteration_time:9,.0f}"
        )
        return metrics

    def log_scalars(self, prefix, values):
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, self.env_steps)

    def evaluation_due(self):
        """Whether the iteration just logged crossed a multiple of --eval-interval or ended its stage."""
        interval, steps_per_iteration = self.args.eval_interval, self.args.num_envs * self.args.rollout_length
        crossed = self.env_steps // interval > (self.env_steps - steps_per_iteration) // interval
        return crossed or self.iteration == self.last_iteration

    def checkpoint_if_due(self, tree, **progress):
        """Replace the checkpoint with `tree` and the script's `progress` after every evaluation, every
        --checkpoint-interval minutes and on a stop signal; then stop if one came."""
        evaluated = self.eval_rows[-1][0] == self.env_steps
        overdue = time.time() - self.checkpoint_time > 60 * self.args.checkpoint_interval
        if evaluated or overdue or self.stop_signal is not None:
            self.checkpoint(tree, **progress)
        self.stop_if_requested()

    def checkpoint(self, tree, **progress):
        """Replace the run's checkpoint with everything --resume needs to continue exactly from here."""
        progress = {
            **progress,
            "stage": self.stage,
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "start_steps": self.start_steps,
            "train_time": self.train_time,
            "elapsed": self.previous_time + time.time() - self.start_time,
            "eval_rows": self.eval_rows,
        }
        header = {"algo": ALGO, "env_id": self.args.env_id, "kind": "checkpoint", "progress": progress}
        save_arrays(os.path.join(self.path, "checkpoint.msgpack"), header, tree)
        self.checkpoint_time = time.time()

    def request_stop(self, signum, frame):
        """The first SIGTERM or SIGINT stops the run at the end of the iteration, with a checkpoint; a second ends the
        process at once."""
        self.stop_signal = signum
        for other in (signal.SIGTERM, signal.SIGINT):
            signal.signal(other, signal.SIG_DFL)

    def stop_if_requested(self):
        if self.stop_signal is not None:
            self.writer.close()
            print(
                f"stopped by {signal.Signals(self.stop_signal).name} at env step {self.env_steps:,}; continue with: "
                f"python {sys.argv[0]} --resume {self.path}"
            )
            sys.exit(128 + self.stop_signal)

    def finish(self, summary):
        """Write summary.json: the final evaluation's figures, the run's clocks and the script's own `summary`."""
        if self.first_evaluation is not None:  # no training: the run was its evaluation
            self.log_first_evaluation()
            self.log_compile_time()
        final_steps, final_mean, final_std, other_mean, other_std = self.eval_rows[-1]
        device = jax.devices()[0]
        summary = {
            "env_id": self.args.env_id,
            "algo": ALGO,
            "seed": self.args.seed,
            "env_steps": final_steps,
            "eval_mode": EVAL_MODES[0],
            "final_eval_return": final_mean,
            "final_eval_return_std": final_std,
            "best_eval_return": max(row[1] for row in self.eval_rows),
            f"final_{EVAL_MODES[1]}_eval_return": other_mean,
            f"final_{EVAL_MODES[1]}_eval_return_std": other_std,
            "wall_time_s": self.previous_time + time.time() - self.start_time,
            "compile_time_s": self.compile_time,
            "train_sps": (final_steps - self.start_steps) / self.train_time if self.train_time > 0 else 0.0,
            "device": device.device_kind,  # "cpu" or the GPU's name
            "peak_device_memory_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use"),  # None on a CPU
            "peak_resident_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # of this process
            **summary,
        }
        write_atomic(os.path.join(self.path, "summary.json"), json.dumps(summary, indent=2))
        self.writer.close()
        print(f"final return {final_mean:.2f} +- {final_std:.2f}; results in {self.path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
