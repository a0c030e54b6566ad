"""Diffusion Policy Policy Optimization (DPPO) on MuJoCo Playground's DeepMind Control Suite (MJX): a GoRL baseline.

DPPO (Ren et al., 2024, arXiv 2409.00588) makes the policy a conditional diffusion model and treats its denoising
chain as an inner MDP: each of the 20 DDPM steps from N(0, I) noise to the pre-tanh action is a Gaussian,
x_{k-1} ~ N(mu_theta(s, x_k, k), sigma_k^2), with the posterior standard deviation of a cosine schedule floored at 0.1
(for sampling and likelihoods alike, DPPO's minimum). The whole chain is stored, and PPO runs on the denoising steps:
one likelihood ratio and one clipped surrogate per step, each step sharing its env step's advantage times a denoising
discount 0.99^(K - 1 - i) for step i of K (the last step, which makes the action, weighs most). Each element's old and
new step log-likelihood is clamped to [-5, 2] before the mean over action dimensions, as DPPO's loss does. Settings
from DPPO's own from-scratch configuration (its gym `ppo_diffusion_mlp` fine-tuning configs without pre-training): 20
denoising steps, all fine-tuned, denoising discount 0.99, actor learning rate 1e-4 (critic 1e-3), clip 0.1 on every
step, no entropy term; critic, Brax-form advantages, minibatching and observation statistics are ppo_continuous.py's.

    python dppo.py --env-id CheetahRun      # the paper's configuration: 180M steps, made for a GPU

How this differs from DPPO's code (github.com/irom-lab/dppo): the denoised estimate is clipped to +-3 pre-tanh (DPPO
clips it to its +-1 action box; tanh(3) = 0.995); the networks, reward scaling and advantages are the other scripts'
(DPPO: residual MLPs of 512 x 3, rewards scaled by a running std, textbook GAE); no epoch stops early at an approximate
KL of 1 (DPPO's `target_kl`). The GoRL authors ran a simplified "denoising MDP" in its place: a 10-step flow chain with a
fixed noise of 0.05, no likelihood clamp, no denoising discount, clip 0.2.

Evaluation, as the paper's numbers were made: the stochastic policy (the chain as sampled in training); DPPO's own
"deterministic" mode is measured beside it: x_K is still drawn from N(0, I) and every step but the last still adds
noise, with the step std floored at 1e-3 instead of 0.1.

Fixed against the authors' code (see README.md): the running observation variance (theirs dropped the old
variance at every update), fresh random start states for every episode (theirs replayed one start per env), and
advantage normalisation over the steps that have an advantage; the stored likelihoods are computed with the
statistics the update uses, so every ratio starts at exactly 1.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Literal, NamedTuple, Optional, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from jax import lax
from mujoco_playground import dm_control_suite, registry
from tensorboardX import SummaryWriter

ALGO = "dppo"
# How the paper evaluated this algorithm (its headline: eval.csv's eval_return_mean, summary.json's final_eval_return),
# then the other mode, measured beside it on the same episodes.
EVAL_MODES = ("stochastic", "deterministic")
NUM_DENOISING_STEPS = 20  # K: Gaussian steps from x_K ~ N(0, I) to the pre-tanh action x_0
MIN_STD = 0.1  # DPPO's floor on every step's standard deviation, for sampling and for likelihoods
DETERMINISTIC_MIN_STD = 1e-3  # its floor in "deterministic" sampling, whose last step adds no noise
LOG_PROB_CLIP = (-5.0, 2.0)  # DPPO clamps each element of a step's log-likelihood, old and new, to this range
NOISE_CLIP = 3.0  # DPPO clips each step's standard-normal draw to +-3
DENOISED_CLIP = 3.0  # clip of the denoised estimate of x_0 (pre-tanh)


@dataclass
class Args:
    exp_name: str = ALGO
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the experiment: every random draw of the run derives from it"""
    env_id: str = "CheetahRun"
    """a MuJoCo Playground DeepMind Control Suite task"""
    impl: Literal["jax", "warp"] = "jax"
    """the MJX physics implementation (the paper's numbers came from `jax`)"""
    run_dir: str = "runs"
    """the folder that receives one sub-folder per run"""
    save_model: bool = False
    """save the policy to `model.msgpack` in the run folder (at every evaluation, so a crash keeps the last one)"""
    load_model: Optional[str] = None
    """start from a `model.msgpack` saved by this script, counting env steps on from the step it was saved at; with
    `--total-timesteps 0` it is only evaluated (on the episodes its own run evaluated it on)"""
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
    learning_rate: float = 1e-4
    """Adam's learning rate for the diffusion policy (constant)"""
    critic_learning_rate: float = 1e-3
    """Adam's learning rate for the critic (constant)"""
    gamma: float = 0.995
    """discount factor (0.995 on every task, FingerSpin included, as the authors ran DPPO)"""
    gae_lambda: float = 0.95
    """lambda of the advantage estimate"""
    clip_eps: float = 0.1
    """PPO's surrogate clipping epsilon, applied to every denoising step's ratio"""
    denoising_gamma: float = 0.99
    """the advantage of denoising step i of K is weighted by denoising_gamma^(K - 1 - i)"""
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
    """global gradient-norm clip (inf: none)"""

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
    """f(s, x, t): an MLP on [normalised state, x, time features]; the policy's noise predictor eps(s, x_k, k / K)."""

    hidden_sizes: Sequence[int]
    output_size: int

    @nn.compact
    def __call__(self, obs, x, t):
        t = jnp.broadcast_to(t, x.shape[:-1] + (1,))
        return MLP((*self.hidden_sizes, self.output_size))(jnp.concatenate([obs, x, time_embedding(t)], axis=-1))


def cosine_schedule(num_steps, s=0.008):
    """DDPM's betas (K,) and alpha_bars (K + 1,) for Nichol and Dhariwal's cosine schedule: alpha_bar_0 = 1 is the
    action, and betas are clipped at 0.999 (so alpha_bar_K is tiny but not zero)."""
    f = jnp.cos((jnp.arange(num_steps + 1) / num_steps + s) / (1 + s) * jnp.pi / 2) ** 2
    betas = jnp.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    return betas, jnp.concatenate([jnp.ones(1), jnp.cumprod(1.0 - betas)])


def step_distribution(policy, params, obs, x, level, min_std=MIN_STD):
    """Mean and std of the Gaussian step x_{k-1} | x_k at level k = 1..K: DDPM's posterior around the denoised estimate
    of x_0, with the std floored at min_std. obs normalised, x (..., A), level broadcastable to (..., 1)."""
    betas, alpha_bars = cosine_schedule(NUM_DENOISING_STEPS)
    beta, alpha_bar, previous_alpha_bar = betas[level - 1], alpha_bars[level], alpha_bars[level - 1]
    predicted_noise = policy.apply(params, obs, x, level / NUM_DENOISING_STEPS)
    x0 = jnp.clip(
        (x - jnp.sqrt(1.0 - alpha_bar) * predicted_noise) / jnp.sqrt(alpha_bar), -DENOISED_CLIP, DENOISED_CLIP
    )
    mean = (beta * jnp.sqrt(previous_alpha_bar) * x0 + (1.0 - previous_alpha_bar) * jnp.sqrt(1.0 - beta) * x) / (
        1.0 - alpha_bar
    )
    std = jnp.maximum(jnp.sqrt(beta * (1.0 - previous_alpha_bar) / (1.0 - alpha_bar)), min_std)
    return mean, std


def sample_chain(policy, params, obs, key, deterministic):
    """The denoising chain x_K, ..., x_0 (..., K + 1, A) from x_K ~ N(0, I), in DPPO's sampling mode or its
    "deterministic" one (step std floored at DETERMINISTIC_MIN_STD, none on the last step). obs (..., O) normalised;
    x_0 is the pre-tanh action."""

    def step(x, inputs):
        level, key = inputs
        mean, std = step_distribution(
            policy, params, obs, x, level, jnp.where(deterministic, DETERMINISTIC_MIN_STD, MIN_STD)
        )
        std = jnp.where(deterministic & (level == 1), 0.0, std)
        x = mean + std * jnp.clip(jax.random.normal(key, x.shape), -NOISE_CLIP, NOISE_CLIP)
        return x, x

    start_key, key = jax.random.split(key)
    x = jax.random.normal(start_key, obs.shape[:-1] + (policy.output_size,))
    levels = jnp.arange(NUM_DENOISING_STEPS, 0, -1)
    _, xs = lax.scan(step, x, (levels, jax.random.split(key, NUM_DENOISING_STEPS)))
    return jnp.concatenate([x[..., None, :], jnp.moveaxis(xs, 0, -2)], axis=-2)


def chain_log_probs(policy, params, obs, chain):
    """Each denoising step's log-likelihood, clamped per element and averaged over action dimensions as DPPO's ratio
    does: (..., K + 1, A) chain -> (..., K). obs (..., O) normalised."""
    levels = jnp.arange(NUM_DENOISING_STEPS, 0, -1)[:, None]  # (K, 1): the level each step starts from
    obs = jnp.broadcast_to(obs[..., None, :], chain.shape[:-2] + (NUM_DENOISING_STEPS, obs.shape[-1]))
    mean, std = step_distribution(policy, params, obs, chain[..., :-1, :], levels)
    return jnp.mean(jnp.clip(gaussian_log_prob_per_dim(chain[..., 1:, :], mean, std), *LOG_PROB_CLIP), axis=-1)


def gaussian_log_prob_per_dim(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - 0.5 * jnp.log(2 * jnp.pi) - jnp.log(std)


# ---------------------------------------------------------------------------------------------------------------------
# Environment


def make_env(env_id, impl):
    """The Playground env with the chosen physics implementation, and its episode length (time limit)."""
    config = registry.get_default_config(env_id)
    config.impl = impl
    return registry.load(env_id, config=config), config.episode_length


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
    steps: jax.Array  # (B,) steps taken in the current episode
    episode_return: jax.Array  # (B,) raw reward summed over the current episode


class Transition(NamedTuple):
    obs: jax.Array  # (T, B, O) raw observation the action was chosen from
    chain: jax.Array  # (T, B, K + 1, A) the denoising chain x_K, ..., x_0; x_0 is the pre-tanh action
    log_prob: jax.Array  # (T, B, K) each denoising step's log-likelihood under the policy that acted
    reward: jax.Array  # (T, B) raw reward
    termination: jax.Array  # (T, B) 1.0 where the env ended the episode: no bootstrap
    truncation: jax.Array  # (T, B) 1.0 where the time limit cut it: the step is left out of the losses


def make_rollout(env, policy, num_steps, episode_length):
    # MJX-Warp keeps some buffers shared by all envs (no env axis); auto-reset must leave those leaves alone.
    single_state = jax.eval_shape(env.reset, jax.random.key(0))

    def reset_where(done, reset_state, state):
        def select(single, reset_leaf, leaf):
            if leaf.shape != done.shape + single.shape:
                return leaf
            return jnp.where(done.reshape(done.shape + (1,) * len(single.shape)), reset_leaf, leaf)

        return jax.tree.map(select, single_state, reset_state, state)

    def auto_reset(done, env_state, key):
        """Fresh start states for the envs whose episode ended (`done`), so that every episode begins from a new random
        state. They are made only in the steps where an episode ends (at the time limit, all envs at once): a reset can
        cost many physics steps (CheetahRun's settles for 200)."""

        def reset(env_state):
            reset_state = jax.vmap(env.reset)(jax.random.split(key, done.shape[0]))
            return reset_where(done, reset_state, env_state)

        return lax.cond(jnp.any(done), reset, lambda env_state: env_state, env_state)

    def init(key, num_envs):
        env_state = jax.vmap(env.reset)(jax.random.split(key, num_envs))
        # Reset leaves `data.time` weak-typed where env.step makes it strong: cast once so the iteration compiles once.
        env_state = jax.tree.map(lambda x: x.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.number) else x, env_state)
        return RolloutCarry(env_state, jnp.zeros(num_envs, jnp.int32), jnp.zeros(num_envs))

    def rollout(policy_params, obs_stats, carry, key):
        """Step every env `num_steps` times with the stochastic policy; returns time-major (T, B) transitions."""

        def step(carry, keys):
            key, reset_key = keys
            obs = carry.env_state.obs
            normalized_obs = normalize(obs_stats, obs)
            chain = sample_chain(policy, policy_params, normalized_obs, key, False)
            # Likelihoods from the function the loss uses, so that the first ratios are 1.
            log_prob = chain_log_probs(policy, policy_params, normalized_obs, chain)
            env_state = jax.vmap(env.step)(carry.env_state, jnp.tanh(chain[:, -1]))
            steps = carry.steps + 1
            episode_return = carry.episode_return + env_state.reward
            termination = env_state.done
            truncation = jnp.where(steps >= episode_length, 1.0 - termination, 0.0)
            done = (termination + truncation) > 0
            transition = Transition(obs, chain, log_prob, env_state.reward, termination, truncation)
            carry = RolloutCarry(
                auto_reset(done, env_state, reset_key),
                jnp.where(done, 0, steps),
                jnp.where(done, 0.0, episode_return),
            )
            return carry, (transition, jnp.where(done, episode_return, jnp.nan))

        reset_key, key = jax.random.split(key)
        keys = (jax.random.split(key, num_steps), jax.random.split(reset_key, num_steps))
        carry, (transitions, finished_returns) = lax.scan(step, carry, keys)
        return carry, transitions, finished_returns

    return init, rollout


# ---------------------------------------------------------------------------------------------------------------------
# Losses and the update


def compute_advantages(rewards, values, bootstrap_value, termination, truncation, gamma, gae_lambda):
    """Brax-form advantages over time-major (U, N) sequences.

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

        # One ratio per denoising step; each step gets its env step's advantage, discounted along the chain.
        log_ratio = chain_log_probs(policy, params["policy"], obs, batch.chain) - batch.log_prob  # (U, N, K)
        ratio = jnp.exp(log_ratio)
        clipped_ratio = jnp.clip(ratio, 1.0 - args.clip_eps, 1.0 + args.clip_eps)
        advantages = advantages[..., None] * args.denoising_gamma ** jnp.arange(NUM_DENOISING_STEPS - 1, -1, -1)
        policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))
        value_loss = jnp.mean((value_targets - values) ** 2)
        loss = policy_loss + args.vf_coef * value_loss
        return loss, {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
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
    def evaluate(policy_params, obs_stats, key, deterministic):
        """Raw returns in `num_eval_envs` fresh episodes of `episode_length` steps, without auto-reset, of the
        stochastic policy or of DPPO's "deterministic" mode (see sample_chain)."""
        reset_key, noise_key = jax.random.split(key)
        env_state = jax.vmap(env.reset)(jax.random.split(reset_key, num_eval_envs))

        def step(carry, key):
            env_state, alive, returns = carry
            chain = sample_chain(policy, policy_params, normalize(obs_stats, env_state.obs), key, deterministic)
            env_state = jax.vmap(env.step)(env_state, jnp.tanh(chain[:, -1]))
            returns = returns + jnp.where(alive, env_state.reward, 0.0)
            # An episode the env ends (its physics went NaN) scores nothing more.
            return (env_state, alive & (env_state.done == 0), returns), None

        init = (env_state, jnp.ones(num_eval_envs, bool), jnp.zeros(num_eval_envs))
        (_, _, returns), _ = lax.scan(step, init, jax.random.split(noise_key, episode_length))
        return returns

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
    if args.total_timesteps < 0:
        sys.exit(f"error: --total-timesteps must be >= 0, got {args.total_timesteps}")
    if (args.num_minibatches * args.batch_size) % args.num_envs:
        sys.exit(
            f"error: --num-minibatches x --batch-size ({args.num_minibatches} x {args.batch_size}) must be a multiple "
            f"of --num-envs ({args.num_envs}), so that every env's rollout cuts into whole unrolls"
        )
    if not 0.0 < args.gamma <= 1.0:
        sys.exit(f"error: --gamma must be in (0, 1], got {args.gamma}")
    if min(args.learning_rate, args.critic_learning_rate, args.clip_eps, args.max_grad_norm) <= 0:
        sys.exit("error: --learning-rate, --critic-learning-rate, --clip-eps and --max-grad-norm must be positive")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        sys.exit(f"error: --load-model {args.load_model}: no such file")
    args.rollout_length = args.num_minibatches * args.batch_size * args.unroll_length // args.num_envs
    args.num_iterations = args.total_timesteps // (args.num_envs * args.rollout_length)
    if args.total_timesteps > 0 and args.num_iterations == 0:
        sys.exit(
            f"error: --total-timesteps {args.total_timesteps} is less than one iteration "
            f"({args.num_envs * args.rollout_length} env steps = --num-envs x rollout length)"
        )


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_model(path, args, env_steps, params, obs_stats):
    payload = {"algo": ALGO, "env_id": args.env_id, "env_steps": env_steps, "params": params, "obs_stats": obs_stats}
    with open(path + ".tmp", "wb") as f:
        f.write(flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(payload)))
    os.replace(path + ".tmp", path)


def load_model(path, args, params, obs_stats):
    """The (env_steps, params, obs_stats) saved in `path`, checked against this task's networks; exits with one line if
    not."""
    try:
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
        if not isinstance(saved, dict) or "params" not in saved:
            raise ValueError("not a model saved by --save-model")
    except Exception as e:
        sys.exit(f"error: --load-model {path} is not a readable model file ({e})")
    if saved.get("algo") != ALGO or saved.get("env_id") != args.env_id:
        sys.exit(
            f"error: --load-model {path} holds a {saved.get('algo')} model for {saved.get('env_id')}, "
            f"not {ALGO} for {args.env_id}"
        )
    target = {"params": params, "obs_stats": obs_stats}
    try:
        restored = flax.serialization.from_state_dict(target, {k: saved[k] for k in target})
        mismatch = jax.tree.leaves(jax.tree.map(lambda a, b: np.shape(a) != np.shape(b), target, restored))
        if any(mismatch):
            raise ValueError("array shapes differ")
    except Exception as e:
        sys.exit(f"error: --load-model {path} does not match the networks of this configuration ({e})")
    return int(saved.get("env_steps", 0)), restored["params"], restored["obs_stats"]


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


def main(args):
    start_time = time.time()
    check_args(args)
    key = jax.random.key(args.seed)
    policy_key, critic_key, env_key, eval_key, train_key = jax.random.split(key, 5)
    env, episode_length = make_env(args.env_id, args.impl)
    policy = ConditionalField((32,) * 4, env.action_size)
    critic = MLP((256,) * 5 + (1,))
    dummy_obs, dummy_action = jnp.zeros((1, env.observation_size)), jnp.zeros((1, env.action_size))
    params = {
        "policy": policy.init(policy_key, dummy_obs, dummy_action, jnp.zeros((1, 1))),
        "critic": critic.init(critic_key, dummy_obs),
    }
    obs_stats = init_running_stats(env.observation_size)
    start_steps = 0
    if args.load_model:
        start_steps, params, obs_stats = load_model(args.load_model, args, params, obs_stats)
    optimizer = optax.chain(
        optax.clip_by_global_norm(args.max_grad_norm),
        optax.multi_transform(
            {"policy": optax.adam(args.learning_rate), "critic": optax.adam(args.critic_learning_rate)},
            {"policy": "policy", "critic": "critic"},
        ),
    )

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_path = os.path.join(args.run_dir, run_name)
    os.makedirs(run_path)
    write_atomic(os.path.join(run_path, "config.json"), json.dumps({**asdict(args), **run_metadata()}, indent=2))
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            name=run_name,
            config=asdict(args),
            sync_tensorboard=True,
            save_code=True,
        )
    writer = SummaryWriter(run_path)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
    )
    print(f"run folder: {run_path}")

    init_rollout, rollout = make_rollout(env, policy, args.rollout_length, episode_length)
    update = make_update(policy, critic, optimizer, args)
    evaluate = make_evaluate(env, policy, args.num_eval_envs, episode_length)

    steps_per_iteration = args.num_envs * args.rollout_length
    print(f"{args.env_id} ({args.impl}): {args.num_iterations} iterations x {steps_per_iteration:,} env steps")
    print("compiling...")
    compile_start = time.time()
    evaluate = jax.jit(evaluate).lower(params["policy"], obs_stats, eval_key, True).compile()
    if args.num_iterations > 0:
        state = TrainState(
            params,
            optimizer.init(params),
            obs_stats,
            jax.jit(init_rollout, static_argnums=1)(env_key, args.num_envs),
            train_key,
        )
        train_iteration = jax.jit(make_train_iteration(rollout, update), donate_argnums=0).lower(state).compile()
    compile_time = time.time() - compile_start
    print(f"compiled in {compile_time:.1f} s")

    eval_rows, train_time = [], 0.0

    def run_evaluation(env_steps, params, obs_stats):
        # New start states at every evaluation, from a key of its env step; both modes on the same ones (paired).
        key = jax.random.fold_in(eval_key, env_steps)
        returns = [
            np.asarray(evaluate(params["policy"], obs_stats, key, mode == "deterministic")) for mode in EVAL_MODES
        ]
        eval_rows.append((env_steps, *(float(f(r)) for r in returns for f in (np.mean, np.std))))
        writer.add_scalar("eval/episodic_return", returns[0].mean(), env_steps)
        writer.add_scalar("eval/episodic_return_std", returns[0].std(), env_steps)
        writer.add_scalar(f"eval/{EVAL_MODES[1]}_episodic_return", returns[1].mean(), env_steps)
        write_atomic(
            os.path.join(run_path, "eval.csv"),
            f"env_steps,eval_return_mean,eval_return_std,{EVAL_MODES[1]}_return_mean,{EVAL_MODES[1]}_return_std\n"
            + "".join(f"{row[0]}," + ",".join(f"{x:.4f}" for x in row[1:]) + "\n" for row in eval_rows),
        )
        if args.save_model:
            save_model(os.path.join(run_path, "model.msgpack"), args, env_steps, params, obs_stats)
        sps = (env_steps - start_steps) / train_time if train_time > 0 else 0.0
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.time() - start_time))
        print(f"eval  step {env_steps:>12,} | return {returns[0].mean():8.2f} +- {returns[0].std():7.2f} | ", end="")
        print(f"{EVAL_MODES[1]} {returns[1].mean():8.2f} | SPS {sps:9,.0f} | {elapsed}")

    run_evaluation(start_steps, params, obs_stats)
    for iteration in range(1, args.num_iterations + 1):
        iteration_start = time.time()
        state, metrics = train_iteration(state)
        metrics = jax.device_get(metrics)  # the one host sync of the iteration
        iteration_time = time.time() - iteration_start
        train_time += iteration_time
        env_steps = start_steps + iteration * steps_per_iteration
        if not metrics["finite"]:
            writer.close()
            sys.exit(
                f"error: non-finite loss or parameters at iteration {iteration} (env step {env_steps:,}); "
                f"training stopped, the logs and the last saved model in {run_path} are kept"
            )
        for name, value in metrics.items():
            if name not in ("finite", "train_episode_return"):
                writer.add_scalar(f"losses/{name}", value, env_steps)
        if np.isfinite(metrics["train_episode_return"]):
            writer.add_scalar("charts/episodic_return", metrics["train_episode_return"], env_steps)
        writer.add_scalar("charts/SPS", steps_per_iteration / iteration_time, env_steps)
        print(
            f"iter {iteration:>4}/{args.num_iterations} | step {env_steps:>12,} | loss {metrics['loss']:8.4f} | "
            f"SPS {steps_per_iteration / iteration_time:9,.0f}"
        )
        if (
            iteration == args.num_iterations
            or env_steps // args.eval_interval > (env_steps - steps_per_iteration) // args.eval_interval
        ):
            run_evaluation(env_steps, state.params, state.obs_stats)

    final_steps, final_mean, final_std, other_mean, other_std = eval_rows[-1]
    summary = {
        "env_id": args.env_id,
        "algo": ALGO,
        "seed": args.seed,
        "env_steps": final_steps,
        "eval_mode": EVAL_MODES[0],
        "final_eval_return": final_mean,
        "final_eval_return_std": final_std,
        "best_eval_return": max(row[1] for row in eval_rows),
        f"final_{EVAL_MODES[1]}_eval_return": other_mean,
        f"final_{EVAL_MODES[1]}_eval_return_std": other_std,
        "wall_time_s": time.time() - start_time,
        "compile_time_s": compile_time,
        "train_sps": (final_steps - start_steps) / train_time if train_time > 0 else 0.0,
    }
    write_atomic(os.path.join(run_path, "summary.json"), json.dumps(summary, indent=2))
    writer.close()
    print(f"final return {final_mean:.2f} +- {final_std:.2f}; results in {run_path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
