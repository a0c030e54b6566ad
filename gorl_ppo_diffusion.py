"""GoRL with a diffusion (DDPM) decoder on MuJoCo Playground's DeepMind Control Suite (MJX).

GoRL (Zhang, Wan et al., "Generative Online Reinforcement Learning", arXiv 2512.02581) factorises the policy as
pi(a | s) = integral of g(a | s, z) pi_theta(z | s) dz: a Gaussian latent policy (the encoder) is trained with PPO in
latent space while a frozen generative decoder maps (state, latent) to the pre-tanh action. Training alternates
    encoder stage k (PPO, decoder frozen) -> collect (state, action) pairs with it -> fit decoder k+1 as a DDPM
    noise predictor whose deterministic DDIM chain carries samples of the fixed N(0, I) prior to those actions ->
    restart the encoder at N(0, I).
The new decoder turns prior samples into the actions the old policy took, so the restarted policy behaves like the
old one (the behavioural warm start) while its latent space is free again to explore. Stage 0's decoder is an exact
identity, so stage 0 is Gaussian PPO in form, though not ppo_continuous.py's: its clip, gradient clip, latent
regulariser, entropy (without the tanh term) and start at N(0, I) are GoRL's. The whole stage loop runs in one process
and one JAX runtime.

    python gorl_ppo_diffusion.py --env-id HopperStand      # the paper's configuration: 60M + 60M + 30M + 30M steps

Fixed against the authors' code (docs/implementation_details.md says why): everything ppo_continuous.py fixes; the
encoder restarts at exactly N(0, I) (theirs was re-created from the seed); data collection keeps the time limit (theirs
ran 9,600-step episodes); the final stage's unused collection and decoder fit are skipped; every random draw is seeded;
the decoder trains only on the noise levels its sampler visits (theirs drew a level with alpha-bar exactly 1, an
unlearnable target); stage 0's decoder is the identity exactly (theirs scaled the latent by 1.052).

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
from functools import partial
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

ALGO = "gorl_ppo_diffusion"
# How the paper evaluated this algorithm (its headline: eval.csv's eval_return_mean, summary.json's final_eval_return),
# then the other mode, measured beside it on the same episodes.
EVAL_MODES = ("deterministic", "stochastic")
# Per-task discounts of the paper's configuration (Playground's published Brax PPO settings); others use 0.995.
TASK_GAMMA = {"BallInCup": 0.95, "FingerSpin": 0.95}
# Per-task latent regulariser coefficients (stage 0, later stages) of the authors' runs; others use (5e-4, 1e-3).
TASK_LATENT_REG_COEF = {"BallInCup": (0.0, 1e-3)}
NUM_DIFFUSION_LEVELS = 10  # K of the cosine schedule: the DDIM chain runs from level K - 1 down to level 0
NUM_NOISE_PAIRS = 8  # (noise, level) pairs drawn per (state, action) in the decoder's loss
NUM_HISTOGRAM_ACTIONS = 10_000  # actions sampled at one fixed state at the end of each stage (the paper's Figure 7)


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
    `--stage-timesteps 0` it is only evaluated (on the episodes its own run evaluated it on). Trained, it is stage 0:
    its encoder (not the prior), critic, observation statistics and decoder go on with stage 0's settings, a fresh
    optimiser and freshly reset envs, and every stage of --stage-timesteps follows"""
    capture_video: bool = False
    """at every evaluation, render the first episode of the evaluated policy (in the mode its return is reported in)
    to videos/{env steps}.mp4 in the run folder and to TensorBoard, and at each stage change the policy before and
    after it, side by side; with `--load-model` and no training, render that model"""
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
    stage_timesteps: tuple[int, ...] = (60_000_000, 60_000_000, 30_000_000, 30_000_000)
    """env steps of encoder training per stage, each rounded down to whole iterations; a decoder is fitted between
    consecutive stages"""
    num_envs: int = 2048
    """parallel training environments"""
    num_eval_envs: int = 128
    """episodes per evaluation, one per parallel environment"""
    eval_interval: int = 6_000_000
    """evaluate each time training crosses a multiple of this many env steps (and at step 0 and every stage's end)"""
    learning_rate: float = 1e-3
    """Adam's learning rate (constant)"""
    gamma: Optional[float] = None
    """discount factor; default per task: 0.995, 0.95 on FingerSpin and BallInCup"""
    gae_lambda: float = 0.95
    """lambda of the advantage estimate"""
    clip_eps: tuple[float, float] = (0.15, 0.3)
    """PPO's surrogate clipping epsilon in stage 0 and in later stages"""
    ent_coef: float = 0.01
    """coefficient of the latent Gaussian's entropy bonus"""
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
    max_grad_norm: tuple[float, float] = (0.5, 1.0)
    """global gradient-norm clip in stage 0 and in later stages"""
    latent_reg: Literal["l2", "kl"] = "l2"
    """the encoder's regulariser (GoRL Eq. 3): `l2` = mean(mu^2) + mean(sigma^2) (the authors' code, which the paper's
    numbers came from), smallest at sigma -> 0, so it shrinks the latent std as well as the mean; `kl` = KL(pi(z | s) ||
    N(0, I)) summed over latent dimensions (the paper's text), a pull toward the prior. `l2` averages over the A latent
    dimensions where `kl` sums them, so at one --latent-reg-coef `kl` pulls the mean A/2 times as hard"""
    latent_reg_coef: Optional[tuple[float, float]] = None
    """coefficient of the latent regulariser in stage 0 and in later stages; default per task: 5e-4 and 1e-3, 0 and 1e-3
    on BallInCup"""
    decoder_data_policy: Literal["best", "final"] = "best"
    """the encoder whose (state, action) pairs the next decoder is fitted to: the stage's best by deterministic
    evaluation (ties to the later; the authors' choice, behind the paper's numbers) or its final one"""
    decoder_dataset_size: int = 10_000_000
    """(state, action) pairs collected after each stage but the last to fit the next decoder (10% held out)"""
    decoder_batch_size: int = 8192
    """(state, action) pairs per decoder gradient step"""
    decoder_epochs: int = 50
    """most passes over the decoder's training pairs"""
    decoder_patience: int = 20
    """stop fitting the decoder after this many epochs without a better held-out loss"""
    decoder_learning_rate: float = 3e-4
    """Adam's learning rate for the decoder (--learning-rate: the latent policy's and critic's)"""

    rollout_length: int = field(default=0, init=False)
    """steps per env per iteration (filled at runtime: num_minibatches * batch_size * unroll_length / num_envs)"""
    stage_iterations: tuple[int, ...] = field(default=(), init=False)
    """training iterations per stage (filled at runtime)"""
    collection_rollouts: int = field(default=0, init=False)
    """rollouts collected before each decoder fit (filled at runtime)"""


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


def policy_distribution(policy_output):
    """Mean and std of the diagonal Gaussian from a policy's outputs: the first half, softplus(the second) + 1e-3."""
    mean, raw_std = jnp.split(policy_output, 2, axis=-1)
    return mean, jnp.minimum(nn.softplus(raw_std) + 1e-3, 10.0)


def gaussian_log_prob(x, mean, std):
    return jnp.sum(-0.5 * ((x - mean) / std) ** 2 - 0.5 * jnp.log(2 * jnp.pi) - jnp.log(std), axis=-1)


def gaussian_entropy(std):
    return jnp.sum(0.5 + 0.5 * jnp.log(2 * jnp.pi) + jnp.log(std), axis=-1)


def latent_regularizer(mean, std, kind):
    """The latent regulariser (GoRL Eq. 3): `kl`, the latent policy's KL from the N(0, I) prior the decoder was trained
    on; `l2`, the authors' mean(mu^2) + mean(sigma^2), which is smallest at sigma -> 0, not at the prior."""
    if kind == "kl":
        return jnp.mean(jnp.sum(0.5 * (mean**2 + std**2 - 1.0) - jnp.log(std), axis=-1))
    return jnp.mean(mean**2) + jnp.mean(std**2)


def prior_params(latent_policy, key, obs_size):
    """Latent policy parameters that give exactly N(0, I) in every state: zero output weights, and output biases of
    0 for the mean and softplus^-1(1 - 1e-3) for the std."""
    params = latent_policy.init(key, jnp.zeros((1, obs_size)))
    last = f"Dense_{len(latent_policy.layer_sizes) - 1}"
    output = params["params"][last]
    latent_size = output["bias"].shape[0] // 2
    std_bias = jnp.log(jnp.expm1(1.0 - 1e-3))
    output = {
        "kernel": jnp.zeros_like(output["kernel"]),
        "bias": jnp.concatenate([jnp.zeros(latent_size), jnp.full(latent_size, std_bias)]),
    }
    return {"params": {**params["params"], last: output}}


def time_embedding(t):
    """[cos(t 2^k), sin(t 2^k)] for k = 0..3: the decoder's 8 time features."""
    frequencies = 2.0 ** jnp.arange(4)
    return jnp.concatenate([jnp.cos(t * frequencies), jnp.sin(t * frequencies)], axis=-1)


class ConditionalField(nn.Module):
    """f(s, x, t): an MLP on [normalised state, x, time features]; the decoder's noise predictor eps(s, x_k, k / K)."""

    hidden_sizes: Sequence[int]
    output_size: int

    @nn.compact
    def __call__(self, obs, x, t):
        t = jnp.broadcast_to(t, x.shape[:-1] + (1,))
        return MLP((*self.hidden_sizes, self.output_size))(jnp.concatenate([obs, x, time_embedding(t)], axis=-1))


def cosine_alpha_bars(num_levels, s=0.008):
    """Nichol and Dhariwal's cosine schedule at levels k = 0..K-1: alpha_bar_k = f(k / K) / f(0) with
    f(u) = cos^2((u + s) / (1 + s) * pi / 2). Level 0 is the clean action (alpha_bar = 1); the noisiest level, K - 1,
    keeps sqrt(alpha_bar) = 0.155 of it, so the first DDIM step stays well conditioned (level K would keep none)."""
    f = jnp.cos((jnp.arange(num_levels) / num_levels + s) / (1 + s) * jnp.pi / 2) ** 2
    return f / f[0]


def ddim_step(x, predicted_noise, alpha_bar, next_alpha_bar):
    """One deterministic DDIM step (eta = 0): estimate the clean action from x at a level, then noise it back to the
    next, lower level with the same predicted noise."""
    clean = (x - jnp.sqrt(1.0 - alpha_bar) * predicted_noise) / jnp.sqrt(alpha_bar)
    return jnp.sqrt(next_alpha_bar) * clean + jnp.sqrt(1.0 - next_alpha_bar) * predicted_noise


class Decoder(NamedTuple):
    params: Any
    obs_stats: Any  # RunningStats of the states it was fitted on
    identity: jax.Array  # () bool: stage 0's decoder, which returns the latent itself


def identity_decoder(decoder_network, key, obs_size, action_size):
    """Stage 0's decoder. A zero network would not do: its DDIM chain scales the latent by 1 / sqrt(alpha_bar_{K-1}).
    The flag selects the latent exactly (to the bit), and one compiled program serves every stage."""
    params = decoder_network.init(key, jnp.zeros((1, obs_size)), jnp.zeros((1, action_size)), jnp.zeros((1, 1)))
    return Decoder(jax.tree.map(jnp.zeros_like, params), init_running_stats(obs_size), jnp.array(True))


def decode(decoder_network, decoder, obs, latent):
    """The pre-tanh action for each (raw observation, latent): the deterministic DDIM chain from x = latent at the
    noisiest level down to level 0."""
    obs = normalize(decoder.obs_stats, obs)
    alpha_bars = cosine_alpha_bars(NUM_DIFFUSION_LEVELS)

    def step(x, level):
        predicted_noise = decoder_network.apply(decoder.params, obs, x, level / NUM_DIFFUSION_LEVELS)
        return ddim_step(x, predicted_noise, alpha_bars[level], alpha_bars[level - 1]), None

    x, _ = lax.scan(step, latent, jnp.arange(NUM_DIFFUSION_LEVELS - 1, 0, -1))
    return jnp.where(decoder.identity, latent, x)


def make_networks(env, key):
    """The latent policy (2A outputs: the mean and raw std of a latent with the action's dimension), the critic and the
    decoder's network, and the initial parameters of the first two: the latent policy's give exactly the prior."""
    policy_key, critic_key = jax.random.split(key)
    latent_policy, critic = MLP((32,) * 4 + (2 * env.action_size,)), MLP((256,) * 5 + (1,))
    decoder_network = ConditionalField((64,) * 4, env.action_size)

    def init(policy_key, critic_key):
        # The encoder starts every stage at the prior (the authors' code re-created it from the seed instead).
        return {
            "latent_policy": prior_params(latent_policy, policy_key, env.observation_size),
            "critic": critic.init(critic_key, jnp.zeros((1, env.observation_size))),
        }

    return (latent_policy, critic, decoder_network), jax.jit(init)(policy_key, critic_key)  # one program, not many


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
    obs: jax.Array  # (T, B, O) raw observation the latent was chosen from
    latent: jax.Array  # (T, B, D) latent sampled by the latent policy
    log_prob: jax.Array  # (T, B) log-probability of `latent` under the latent policy that acted
    action: jax.Array  # (T, B, A) pre-tanh action the decoder made of it: the next decoder's training target
    reward: jax.Array  # (T, B) raw reward
    termination: jax.Array  # (T, B) 1.0 where the env ended the episode: no bootstrap
    truncation: jax.Array  # (T, B) 1.0 where the time limit cut it: the step is left out of the losses


def make_rollout(env, latent_policy, decoder_network, num_steps, episode_length):
    def init(num_envs):
        """The carry before the first step: no episode has begun, so the first step resets every env (a reset program
        of its own would be one more copy of the physics to compile). Until then the env state is zeros of the reset's
        shapes; MJX-Warp's buffers without an env axis are scratch that every step rewrites."""
        shapes = jax.eval_shape(jax.vmap(env.reset), jax.random.split(jax.random.key(0), num_envs))
        env_state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        return RolloutCarry(env_state, np.zeros(num_envs, np.int32), np.zeros(num_envs, np.float32))

    def rollout(policy_params, obs_stats, decoder, carry, key):
        """Step every env `num_steps` times with the stochastic latent policy through the frozen decoder; returns
        time-major (T, B) transitions."""

        def step(carry, keys):
            key, reset_key = keys
            env_state = auto_reset(carry.steps == 0, carry.env_state, reset_key)
            obs = env_state.obs
            mean, std = policy_distribution(latent_policy.apply(policy_params, normalize(obs_stats, obs)))
            latent = mean + std * jax.random.normal(key, mean.shape)
            action = decode(decoder_network, decoder, obs, latent)
            env_state = jax.vmap(env.step)(env_state, jnp.tanh(action))
            steps = carry.steps + 1
            episode_return = carry.episode_return + env_state.reward
            termination = env_state.done
            truncation = jnp.where(steps >= episode_length, 1.0 - termination, 0.0)
            done = (termination + truncation) > 0
            transition = Transition(
                obs, latent, gaussian_log_prob(latent, mean, std), action, env_state.reward, termination, truncation
            )
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
    params: dict  # {"latent_policy": ..., "critic": ...}
    opt_state: Any
    obs_stats: RunningStats
    rollout_carry: RolloutCarry
    key: jax.Array


class StageSettings(NamedTuple):
    """The hyper-parameters that change between stages, passed as arrays so that one program serves every stage."""

    clip_eps: jax.Array
    max_grad_norm: jax.Array
    latent_reg_coef: jax.Array


def stage_settings(args, stage):
    later = min(stage, 1)
    return StageSettings(*(jnp.float32(v[later]) for v in (args.clip_eps, args.max_grad_norm, args.latent_reg_coef)))


def make_update(latent_policy, critic, optimizer, args):
    def loss_fn(params, obs_stats, settings, batch, bootstrap_obs, key):
        obs = normalize(obs_stats, batch.obs)  # (U, N, O)
        mean, std = policy_distribution(latent_policy.apply(params["latent_policy"], obs))
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

        # Ratios of latent likelihoods: with the decoder fixed, they give the policy gradient of the action policy.
        log_ratio = gaussian_log_prob(batch.latent, mean, std) - batch.log_prob
        ratio = jnp.exp(log_ratio)
        clipped_ratio = jnp.clip(ratio, 1.0 - settings.clip_eps, 1.0 + settings.clip_eps)
        # PPO's clipped surrogate on latent likelihoods (GoRL Eq. 5); value and entropy terms as in Brax's PPO losses.
        policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))
        value_loss = jnp.mean((value_targets - values) ** 2)
        entropy = jnp.mean(gaussian_entropy(std))
        latent_reg = latent_regularizer(mean, std, args.latent_reg)
        loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy + settings.latent_reg_coef * latent_reg
        return loss, {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
            "latent_reg": latent_reg,
            "latent_kl": latent_regularizer(mean, std, "kl"),  # how far the encoder has moved from the prior
            "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
            "clipfrac": jnp.mean(jnp.abs(ratio - 1.0) > settings.clip_eps),
        }

    def update(params, opt_state, obs_stats, settings, transitions, last_obs, key):
        """`update_epochs` passes over one rollout, each cutting it into freshly shuffled minibatches of sequences."""
        unroll, num_minibatches, batch_size = args.unroll_length, args.num_minibatches, args.batch_size
        # (T, B, ...) -> (B * T / U, U, ...): every env's rollout cut into consecutive sequences of U steps.
        sequences = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1, unroll) + x.shape[2:]), transitions)
        # A sequence bootstraps from the observation after its last step (unused where that step ended an episode).
        bootstrap_obs = jnp.concatenate([transitions.obs, last_obs[None]])[unroll::unroll]  # (T / U, B, O)
        bootstrap_obs = jnp.swapaxes(bootstrap_obs, 0, 1).reshape(-1, last_obs.shape[-1])  # (B * T / U, O)

        def minibatch_step(carry, minibatch):
            params, opt_state = carry
            batch, batch_bootstrap_obs, key = minibatch
            grads, metrics = jax.grad(loss_fn, has_aux=True)(
                params, obs_stats, settings, batch, batch_bootstrap_obs, key
            )
            metrics["grad_norm"] = optax.global_norm(grads)
            grads, _ = optax.clip_by_global_norm(settings.max_grad_norm).update(grads, optax.EmptyState())
            updates, opt_state = optimizer.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), metrics

        def epoch(carry, key):
            permutation_key, key = jax.random.split(key)
            permutation = jax.random.permutation(permutation_key, bootstrap_obs.shape[0])
            # (B * T / U, U, ...) -> (num_minibatches, U, batch_size, ...): time-major inside a minibatch.
            batches = jax.tree.map(
                lambda x: jnp.swapaxes(x[permutation].reshape((num_minibatches, batch_size) + x.shape[1:]), 1, 2),
                sequences,
            )
            batch_bootstrap_obs = bootstrap_obs[permutation].reshape(num_minibatches, batch_size, -1)
            return lax.scan(
                minibatch_step, carry, (batches, batch_bootstrap_obs, jax.random.split(key, num_minibatches))
            )

        (params, opt_state), metrics = lax.scan(epoch, (params, opt_state), jax.random.split(key, args.update_epochs))
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    return update


def make_train_iteration(rollout, update):
    def train_iteration(state, decoder, settings):
        key, rollout_key, update_key = jax.random.split(state.key, 3)
        carry, transitions, finished_returns = rollout(
            state.params["latent_policy"], state.obs_stats, decoder, state.rollout_carry, rollout_key
        )
        params, opt_state, metrics = update(
            state.params, state.opt_state, state.obs_stats, settings, transitions, carry.env_state.obs, update_key
        )
        # The update normalised with the statistics the rollout used, so its first ratios are exactly 1; the new
        # observations are folded in afterwards.
        obs_stats = update_running_stats(state.obs_stats, transitions.obs)
        metrics["train_episode_return"] = jnp.nanmean(finished_returns)
        metrics["settings"] = settings._asdict()  # what the logs report: the settings this update received
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])
        )
        return TrainState(params, opt_state, obs_stats, carry, key), metrics

    return train_iteration


# ---------------------------------------------------------------------------------------------------------------------
# The decoder: data collection and denoising diffusion


def diffusion_loss(decoder_network, params, obs, actions, noise, levels):
    """DDPM's noise-prediction loss (Ho et al., arXiv 2006.11239, Eq. 14; GoRL's Eq. 6 for a diffusion decoder) at
    x_k = sqrt(alpha_bar_k) * action + sqrt(1 - alpha_bar_k) * noise. obs (N, O) normalised, actions (N, A),
    noise (M, N, A), levels (M, N, 1) integers in 1..K-1."""
    alpha_bar = cosine_alpha_bars(NUM_DIFFUSION_LEVELS)[levels]
    x_k = jnp.sqrt(alpha_bar) * actions + jnp.sqrt(1.0 - alpha_bar) * noise
    obs = jnp.broadcast_to(obs, x_k.shape[:-1] + obs.shape[-1:])
    return jnp.mean((decoder_network.apply(params, obs, x_k, levels / NUM_DIFFUSION_LEVELS) - noise) ** 2)


def make_decoder_data_collector(collect_rollout, args):
    def collect_decoder_data(model, carry, key):
        """`decoder_dataset_size` (raw observation, pre-tanh action) pairs of the model's stochastic policy, each action
        with the observation it was taken in, drawn without replacement from `collection_rollouts` rollouts that
        continue the episodes of `carry`. Returns the pairs ((N, O), (N, A)) and the carry after the rollouts."""
        policy_params, obs_stats, decoder = model["params"]["latent_policy"], model["obs_stats"], model["decoder"]
        rollout_key, subsample_key = jax.random.split(key)
        print(f"  collecting {args.decoder_dataset_size:,} (state, action) pairs for the next decoder")
        collected = []
        for i in range(args.collection_rollouts):
            carry, transitions, _ = collect_rollout(
                policy_params, obs_stats, decoder, carry, jax.random.fold_in(rollout_key, i)
            )
            collected.append((transitions.obs, transitions.action))
            carry.steps.block_until_ready()
            print(f"  collected rollout {i + 1}/{args.collection_rollouts}")
        obs, actions = (jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs]) for xs in zip(*collected))
        keep = jax.random.permutation(subsample_key, obs.shape[0])[: args.decoder_dataset_size]
        return (obs[keep], actions[keep]), carry

    return collect_decoder_data


def held_out_size(num_pairs):
    """How many of the decoder's (state, action) pairs are held out to pick its best epoch: one in ten."""
    return num_pairs // 10


def make_decoder_trainer(decoder_network, args):
    optimizer = optax.adam(args.decoder_learning_rate)

    def loss_fn(params, obs, actions, key):
        # Fresh draws from the fixed N(0, I) prior, never the encoder's latents (GoRL Eq. 4): the decoder learns a
        # transport from the prior to the actions the stage's whole stochastic policy took.
        noise_key, level_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, (NUM_NOISE_PAIRS,) + actions.shape)
        # Only the levels the sampler evaluates: at level 0 x_k is the action itself and the noise is unlearnable.
        levels = jax.random.randint(level_key, (NUM_NOISE_PAIRS,) + actions.shape[:-1] + (1,), 1, NUM_DIFFUSION_LEVELS)
        return diffusion_loss(decoder_network, params, obs, actions, noise, levels)

    @jax.jit
    def train_epoch(params, opt_state, obs, actions, key):
        """One pass over the training pairs in freshly shuffled batches; the data never leaves the device."""
        permutation_key, key = jax.random.split(key)
        num_batches = obs.shape[0] // args.decoder_batch_size
        batches = jax.random.permutation(permutation_key, obs.shape[0])[: num_batches * args.decoder_batch_size]

        def step(carry, xs):
            params, opt_state = carry
            indices, key = xs
            loss, grads = jax.value_and_grad(loss_fn)(params, obs[indices], actions[indices], key)
            updates, opt_state = optimizer.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss

        xs = (batches.reshape(num_batches, -1), jax.random.split(key, num_batches))
        (params, opt_state), losses = lax.scan(step, (params, opt_state), xs)
        return params, opt_state, jnp.mean(losses)

    @jax.jit
    def validation_loss(params, obs, actions, key):
        """The held-out loss, in batches, with the same noise every epoch so that epochs compare fairly."""
        batch_size = min(args.decoder_batch_size, obs.shape[0])
        num_batches = obs.shape[0] // batch_size
        batches = jax.tree.map(
            lambda x: x[: num_batches * batch_size].reshape((num_batches, batch_size) + x.shape[1:]), (obs, actions)
        )
        return jnp.mean(lax.map(lambda xs: loss_fn(params, *xs), (*batches, jax.random.split(key, num_batches))))

    def train_decoder(obs, actions, key, report):
        """A new decoder fitted to raw observations (N, O) and pre-tanh actions (N, A), `held_out_size` of them held
        out; returns the parameters of the epoch with the best held-out loss, and that loss, the epochs run and the
        training pairs per second."""
        fit_start = time.time()
        split_key, init_key, epoch_key, validation_key = jax.random.split(key, 4)
        permutation = jax.random.permutation(split_key, obs.shape[0])
        num_validation = held_out_size(obs.shape[0])
        obs_stats = update_running_stats(init_running_stats(obs.shape[-1]), obs[permutation[num_validation:]])
        obs = normalize(obs_stats, obs)
        train = (obs[permutation[num_validation:]], actions[permutation[num_validation:]])
        validation = (obs[permutation[:num_validation]], actions[permutation[:num_validation]])

        params = decoder_network.init(init_key, obs[:1], actions[:1], jnp.zeros((1, 1)))
        opt_state = optimizer.init(params)
        best_loss, best_params, best_epoch = np.inf, params, 0
        for epoch in range(1, args.decoder_epochs + 1):
            params, opt_state, train_loss = train_epoch(params, opt_state, *train, jax.random.fold_in(epoch_key, epoch))
            loss = float(validation_loss(params, *validation, validation_key))
            if loss < best_loss:
                best_loss, best_params, best_epoch = loss, params, epoch
            report(epoch, float(train_loss), loss, best_epoch == epoch)
            if epoch - best_epoch >= args.decoder_patience:
                break
        fit = {
            # Measured on the parameters returned, not remembered: the held-out loss of the decoder that is kept.
            "decoder_validation_loss": float(validation_loss(best_params, *validation, validation_key)),
            "decoder_epochs": epoch,
            "decoder_pairs_per_s": epoch * train[0].shape[0] / (time.time() - fit_start),
        }
        return Decoder(best_params, obs_stats, jnp.array(False)), fit

    return train_decoder


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def make_evaluate(env, latent_policy, decoder_network, num_eval_envs, episode_length):
    def evaluate(model, key, deterministic):
        """Raw returns in `num_eval_envs` fresh episodes of `episode_length` steps, without auto-reset, of the model's
        deterministic policy (the latent policy's mean through the decoder) or of its stochastic one; and the first
        episode."""
        policy_params, obs_stats, decoder = model["params"]["latent_policy"], model["obs_stats"], model["decoder"]
        reset_key, latent_key = jax.random.split(key)
        env_state = jax.vmap(env.reset)(jax.random.split(reset_key, num_eval_envs))

        def step(carry, key):
            env_state, alive, returns = carry
            mean, std = policy_distribution(latent_policy.apply(policy_params, normalize(obs_stats, env_state.obs)))
            latent = jnp.where(deterministic, mean, mean + std * jax.random.normal(key, mean.shape))
            action = decode(decoder_network, decoder, env_state.obs, latent)
            env_state = jax.vmap(env.step)(env_state, jnp.tanh(action))
            returns = returns + jnp.where(alive, env_state.reward, 0.0)
            # An episode the env ends (its physics went NaN) scores nothing more.
            return (env_state, alive & (env_state.done == 0), returns), first_env_pose(env_state)

        init = (env_state, jnp.ones(num_eval_envs, bool), jnp.zeros(num_eval_envs))
        (_, _, returns), poses = lax.scan(step, init, jax.random.split(latent_key, episode_length))
        # The first episode from its start, for --capture-video: (T + 1, ...) per pose array.
        episode = jax.tree.map(
            lambda start, rest: jnp.concatenate([start[None], rest]), first_env_pose(env_state), poses
        )
        return returns, episode

    return evaluate


def make_action_sampler(latent_policy, decoder_network):
    @jax.jit
    def sample_actions(model, obs, key):
        """NUM_HISTOGRAM_ACTIONS env actions the model's stochastic policy takes in the state with raw observation obs
        (O,)."""
        policy_params, obs_stats, decoder = model["params"]["latent_policy"], model["obs_stats"], model["decoder"]
        obs = jnp.broadcast_to(obs, (NUM_HISTOGRAM_ACTIONS, obs.shape[-1]))
        mean, std = policy_distribution(latent_policy.apply(policy_params, normalize(obs_stats, obs)))
        latent = mean + std * jax.random.normal(key, mean.shape)
        return jnp.tanh(decode(decoder_network, decoder, obs, latent))

    return sample_actions


# ---------------------------------------------------------------------------------------------------------------------
# GoRL's stage change: the finished stage's best encoder collects the data, the decoder is fitted to it, the encoder
# restarts at the prior


def model_of(state, decoder):
    """The model of a training state acting through `decoder`: what the evaluation takes and --save-model saves."""
    return {"params": state.params, "obs_stats": state.obs_stats, "decoder": decoder}


def restart_encoder(state, prior, carry, optimizer):
    """The next stage's training state: the encoder at the prior (`prior`: its parameters, hidden layers drawn by
    prior_params' key; GoRL Eq. 2) with a fresh optimiser. The critic and the observation statistics of `state`, the
    finished stage's last, carry over: the critic was last fitted to the stage's final policy, which the warm-started
    one imitates only where the distilled encoder was that final one. The envs go on from `carry`, where the data
    collection left them."""
    params = {**state.params, "latent_policy": prior}
    return TrainState(params, optimizer.init(params), state.obs_stats, carry, state.key)


class StageLog:
    """GoRL's record of its stages, checkpointed with the run: each stage's figures, and the candidate for the next
    decoder's data (the stage's best evaluated model by deterministic return, ties to the later; with
    --decoder-data-policy final, its last)."""

    def __init__(self, args, run, model, sample_actions, env, histogram_key):
        self.args, self.run, self.sample_actions, self.histogram_key = args, run, sample_actions, histogram_key
        # The Figure-7 histograms' state, the same at every stage's end: a start state of its own, made meanwhile.
        self.histogram_obs = run.workers.submit(lambda: env.reset(histogram_key).obs)
        self.records, self.distilled = run.progress.get("records", [{"stage": 0}]), run.progress.get("distilled")
        self.candidate = model
        if not args.resume:  # stage 0's evaluation at its first step is a candidate too, as in the authors' loop
            self.consider(0, run.eval_rows[-1][1], model)
            run.log_scalars("stage", {"index": 0})

    def consider(self, iteration, eval_return, model):
        """Keep the model just evaluated as the candidate if it is the stage's best so far (or with
        --decoder-data-policy final, its last); copied, since the next iteration overwrites the training state."""
        best = self.distilled is None or eval_return >= self.distilled["eval_return"]
        if best or self.args.decoder_data_policy == "final":
            self.distilled = {"iteration": iteration, "env_steps": self.run.env_steps, "eval_return": eval_return}
            self.candidate = jax.tree.map(jnp.copy, model)

    def progress(self):
        return {"records": self.records, "distilled": self.distilled}

    def record_settings(self, metrics):
        """The stage's record keeps the settings its updates ran with, as the training iteration's metrics report them
        (never worked out again here)."""
        self.records[-1].update({name: float(value) for name, value in metrics["settings"].items()})

    def report_decoder_epoch(self, stage, epoch, train_loss, validation_loss, improved):
        step = (stage - 1) * self.args.decoder_epochs + epoch
        self.run.writer.add_scalar("decoder/train_loss", train_loss, step)
        self.run.writer.add_scalar("decoder/validation_loss", validation_loss, step)
        print(
            f"  decoder epoch {epoch:>3}/{self.args.decoder_epochs} | train loss {train_loss:.5f} | held-out loss "
            f"{validation_loss:.5f}{' (best)' if improved else ''}"
        )
        self.run.stop_if_requested()  # the last checkpoint is at the finished stage's end: a resumed run redoes this

    def log_change(self, stage, restarted, fit, key, start_time):
        """Log the change to `stage`: the model the decoder was fitted to, the fit, and the behavioural warm start (the
        distilled model's stochastic return and the restarted one's, on the same episodes and noise; with
        --capture-video, their first episodes side by side). The new stage has no candidate yet."""
        (before, before_episode), (after, after_episode) = (
            self.run.evaluate_compiled(model, key, False) for model in (self.candidate, restarted)
        )
        change = {
            **{f"distilled_{name}": value for name, value in self.distilled.items()},
            "stochastic_return_before": float(np.mean(before)),
            "warm_start_return": float(np.mean(after)),
            **fit,
            "collection_env_steps": self.args.collection_rollouts * self.args.num_envs * self.args.rollout_length,
            "transition_time_s": time.time() - start_time,
        }
        self.records.append({"stage": stage, **change})
        totals = {"dataset_size": self.args.decoder_dataset_size, "total_collection_env_steps": self.collected()}
        self.run.log_scalars("stage", {"index": stage, **change, **totals})
        print(
            f"stage {stage}: warm start: stochastic return {change['stochastic_return_before']:.2f} before the "
            f"restart, {change['warm_start_return']:.2f} after; decoder fitted to the stage-{stage - 1} encoder of "
            f"iteration {self.distilled['iteration']} (return {self.distilled['eval_return']:.2f}), held-out loss "
            f"{fit['decoder_validation_loss']:.5f}; transition {change['transition_time_s']:.1f} s"
        )
        self.run.log_video([before_episode, after_episode], "_stage_change")  # the distilled left, the restarted right
        self.distilled = None

    def end(self, stage, model):
        """At a stage's end: the Figure-7 histogram (the first principal component of 10,000 actions the stochastic
        policy takes at one fixed state) and the stage's record."""
        actions = self.sample_actions(model, self.histogram_obs.result(), jax.random.fold_in(self.histogram_key, stage))
        centered = np.asarray(actions) - np.mean(actions, axis=0)
        first_axis = np.linalg.svd(centered, full_matrices=False)[2][0]
        projected = centered @ first_axis
        self.run.writer.add_histogram("stage/action_first_principal_component", projected, self.run.env_steps)
        self.records[-1].update(env_steps=self.run.env_steps, final_eval_return=self.run.eval_rows[-1][1])

    def collected(self):
        return sum(record.get("collection_env_steps", 0) for record in self.records)


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
        "decoder_dataset_size",
        "decoder_batch_size",
        "decoder_epochs",
        "decoder_patience",
    ):
        if getattr(args, name) <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if (args.num_minibatches * args.batch_size) % args.num_envs:
        sys.exit(
            f"error: --num-minibatches x --batch-size ({args.num_minibatches} x {args.batch_size}) must be a multiple "
            f"of --num-envs ({args.num_envs}), so that every env's rollout cuts into whole unrolls"
        )
    if args.gamma is not None and not 0.0 < args.gamma <= 1.0:
        sys.exit(f"error: --gamma must be in (0, 1], got {args.gamma}")
    if args.learning_rate <= 0 or args.decoder_learning_rate <= 0 or min(args.clip_eps + args.max_grad_norm) <= 0:
        sys.exit("error: --learning-rate, --decoder-learning-rate, --clip-eps and --max-grad-norm must be positive")
    if args.latent_reg_coef is not None and min(args.latent_reg_coef) < 0:
        sys.exit(f"error: --latent-reg-coef must be >= 0, got {args.latent_reg_coef}")
    num_decoder_train = args.decoder_dataset_size - held_out_size(args.decoder_dataset_size)
    if args.decoder_batch_size > num_decoder_train:
        sys.exit(
            f"error: --decoder-batch-size {args.decoder_batch_size} is larger than the decoder's training split "
            f"({num_decoder_train} of --decoder-dataset-size)"
        )
    check_run_args(args)
    args.rollout_length = args.num_minibatches * args.batch_size * args.unroll_length // args.num_envs
    steps_per_iteration = args.num_envs * args.rollout_length
    if not args.stage_timesteps:
        sys.exit("error: --stage-timesteps needs one number per stage, e.g. --stage-timesteps 60000000 60000000")
    if args.stage_timesteps != (0,) and min(args.stage_timesteps) < steps_per_iteration:
        sys.exit(
            f"error: every stage of --stage-timesteps {' '.join(map(str, args.stage_timesteps))} needs at least one "
            f"iteration ({steps_per_iteration} env steps = --num-envs x rollout length); --stage-timesteps 0 only "
            f"evaluates"
        )
    args.stage_iterations = tuple(steps // steps_per_iteration for steps in args.stage_timesteps)
    args.collection_rollouts = -(-args.decoder_dataset_size // steps_per_iteration)
    if args.gamma is None:
        args.gamma = TASK_GAMMA.get(args.env_id, 0.995)
    if args.latent_reg_coef is None:
        args.latent_reg_coef = TASK_LATENT_REG_COEF.get(args.env_id, (5e-4, 1e-3))


def main(args):
    args, checkpoint = read_checkpoint(args.resume) if args.resume else (args, None)
    check_args(args)
    use_compilation_cache(args.compilation_cache_dir)
    network_key, eval_key, train_key, decoder_key, histogram_key = jax.random.split(jax.random.key(args.seed), 5)
    env, episode_length = make_env(args.env_id, args.impl)
    renderer = open_renderer(env, args)
    (latent_policy, critic, decoder_network), params = make_networks(env, network_key)
    decoder = identity_decoder(decoder_network, decoder_key, env.observation_size, env.action_size)
    model = {"params": params, "obs_stats": init_running_stats(env.observation_size), "decoder": decoder}
    model, start_steps = load_model(args.load_model, args, model) if args.load_model else (model, 0)
    optimizer = optax.adam(args.learning_rate)
    init_rollout, rollout = make_rollout(env, latent_policy, decoder_network, args.rollout_length, episode_length)
    update = make_update(latent_policy, critic, optimizer, args)
    evaluate = make_evaluate(env, latent_policy, decoder_network, args.num_eval_envs, episode_length)
    train_decoder = make_decoder_trainer(decoder_network, args)
    run = Run(args, env, renderer, start_steps, checkpoint)
    steps_per_iteration, stage_sizes = args.num_envs * args.rollout_length, ", ".join(map(str, args.stage_iterations))
    print(f"{args.env_id} ({args.impl}): stages of {stage_sizes} iterations x {steps_per_iteration:,} env steps")

    # The model is evaluated at the first step as soon as the evaluation has compiled, while training compiles.
    run.start_evaluations(evaluate, model, eval_key)
    if sum(args.stage_iterations) == 0:  # --stage-timesteps 0: the model is only evaluated
        run.finish({"collection_env_steps": 0, "stages": []})
        return
    opt_state = optimizer.init(model["params"])
    state = TrainState(model["params"], opt_state, model["obs_stats"], init_rollout(args.num_envs), train_key)
    train_iteration = run.compile_training(
        make_train_iteration(rollout, update), state, model["decoder"], stage_settings(args, 0)
    )
    if len(args.stage_iterations) > 1:  # needed from the first stage change on: compiled while stage 0 trains
        policy_inputs = (model["params"]["latent_policy"], model["obs_stats"], model["decoder"])
        collect_rollout = run.compile_in_background(rollout, *policy_inputs, state.rollout_carry, train_key)
        collect_decoder_data = make_decoder_data_collector(collect_rollout, args)
    stages = StageLog(args, run, model, make_action_sampler(latent_policy, decoder_network), env, histogram_key)
    state, decoder, stages.candidate = run.resume((state, model["decoder"], stages.candidate), **stages.progress())

    first_stage = run.progress.get("stage") or 0  # a resumed run goes on in the stage of its checkpoint
    for stage in range(first_stage, len(args.stage_iterations)):
        if stage > first_stage:
            # Algorithm 1 between stages: the finished stage's best encoder, acting through its decoder, collects the
            # next decoder's data; the new decoder learns to carry samples of the N(0, I) prior to those actions; the
            # encoder restarts at the prior and, through the new decoder, acts as the distilled one did.
            change_start = time.time()
            collect_key, fit_key, warm_start_key = jax.random.split(jax.random.fold_in(decoder_key, stage), 3)
            (obs, actions), carry = collect_decoder_data(stages.candidate, state.rollout_carry, collect_key)
            decoder, fit = train_decoder(obs, actions, fit_key, partial(stages.report_decoder_epoch, stage))
            prior = prior_params(latent_policy, jax.random.fold_in(network_key, stage), env.observation_size)
            state = restart_encoder(state, prior, carry, optimizer)
            stages.log_change(stage, model_of(state, decoder), fit, warm_start_key, change_start)
        settings = stage_settings(args, stage)
        for iteration in run.iterations(args.stage_iterations[stage], stage):
            state, metrics = train_iteration(state, decoder, settings)  # a rollout, then update_epochs passes over it
            stages.record_settings(run.log_iteration(metrics))
            if run.evaluation_due():
                evaluated = model_of(state, decoder)
                stages.consider(iteration, run.evaluate(evaluated), evaluated)
            run.checkpoint_if_due((state, decoder, stages.candidate), **stages.progress())
        stages.end(stage, model_of(state, decoder))
    run.finish({"collection_env_steps": stages.collected(), "stages": stages.records})


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
