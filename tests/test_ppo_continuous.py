"""ppo_continuous.py: the maths against plain numpy references, then the script end to end."""

import importlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_continuous as ppo
from conftest import CPU_ARGS, N, only_run_folder, read_json, run_script

jax.config.update("jax_enable_x64", False)


def lambda_return_reference(rewards, values, bootstrap, termination, truncation, gamma, lam):
    """TD(lambda) targets and advantages by the textbook recursion, one sequence at a time.

    G_t = r_t + gamma_t * ((1 - lam) * V_{t+1} + lam * G_{t+1}), with G_U = V_U (the bootstrap); the recursion does not
    cross a truncated step, which has no target error and no advantage. A_t = r_t + gamma_t * G_{t+1} - V_t."""
    U, N = rewards.shape
    targets, advantages = np.zeros((U, N)), np.zeros((U, N))
    for n in range(N):
        v = np.append(values[:, n], bootstrap[n])
        g_next = v[U]  # the lambda-return of the step after t
        for t in reversed(range(U)):
            if truncation[t, n]:
                targets[t, n], advantages[t, n] = values[t, n], 0.0
                g_next = values[t, n]  # what a step before t bootstraps from: V of the truncated step's state
                continue
            discount = gamma * (1.0 - termination[t, n])
            lam_next = lam if t + 1 < U and not truncation[t + 1, n] else 1.0
            g = rewards[t, n] + discount * ((1 - lam_next) * v[t + 1] + lam_next * g_next)
            targets[t, n] = g
            advantages[t, n] = rewards[t, n] + discount * g_next - values[t, n]
            g_next = g
    return targets, advantages


def test_advantages_match_lambda_returns_with_truncation_and_termination():
    rng = np.random.default_rng(0)
    U, N = 9, 6
    rewards, values, bootstrap = rng.normal(size=(U, N)), rng.normal(size=(U, N)), rng.normal(size=N)
    termination, truncation = np.zeros((U, N)), np.zeros((U, N))
    termination[3, 1] = termination[8, 2] = termination[0, 4] = 1.0
    truncation[5, 1] = truncation[8, 3] = truncation[2, 4] = truncation[0, 5] = 1.0
    targets, advantages = ppo.compute_advantages(
        *map(jnp.asarray, (rewards, values, bootstrap, termination, truncation)), gamma=0.9, gae_lambda=0.8
    )
    ref_targets, ref_advantages = lambda_return_reference(rewards, values, bootstrap, termination, truncation, 0.9, 0.8)
    np.testing.assert_allclose(targets, ref_targets, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(advantages, ref_advantages, rtol=1e-5, atol=1e-5)


def test_advantages_with_lambda_one_are_discounted_returns():
    rewards = jnp.array([[1.0], [2.0], [3.0]])
    values = jnp.array([[0.5], [-1.0], [4.0]])
    targets, advantages = ppo.compute_advantages(
        rewards, values, jnp.array([10.0]), jnp.zeros((3, 1)), jnp.zeros((3, 1)), gamma=0.5, gae_lambda=1.0
    )
    np.testing.assert_allclose(targets[:, 0], [1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 10, 2 + 0.5 * 3 + 0.25 * 10, 3 + 5.0])
    np.testing.assert_allclose(advantages[:, 0], targets[:, 0] - values[:, 0])


def test_normalized_advantages_ignore_masked_entries():
    advantages = jnp.array([1.0, 2.0, 3.0, 100.0])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    out = np.asarray(ppo.normalize_advantages(advantages, mask))
    np.testing.assert_allclose(out[:3], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]), rtol=1e-5)
    assert out[3] == 0.0


def test_running_stats_match_numpy_over_several_batches():
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=3.0, scale=s, size=(n, 4)) for s, n in ((0.5, 7), (2.0, 300), (10.0, 1), (1.0, 64))]
    stats = ppo.init_running_stats(4)
    for batch in batches:
        stats = ppo.update_running_stats(stats, jnp.asarray(batch, jnp.float32))
    everything = np.concatenate(batches)
    assert float(stats.count) == len(everything)
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.var_sum / stats.count, everything.var(0), rtol=1e-4)
    np.testing.assert_allclose(
        ppo.normalize(stats, jnp.asarray(everything[:5], jnp.float32)),
        (everything[:5] - everything.mean(0)) / everything.std(0),
        rtol=1e-4,
        atol=1e-5,
    )


def test_normalize_is_identity_before_data_and_clips_outliers():
    stats = ppo.init_running_stats(3)
    obs = jnp.array([0.5, -2.0, 7.0])
    np.testing.assert_array_equal(ppo.normalize(stats, obs), obs)
    constant_so_far = ppo.update_running_stats(stats, jnp.zeros((10, 3)))
    assert np.all(np.abs(ppo.normalize(constant_so_far, obs)) == 10.0)


def test_gaussian_log_prob_and_entropy_against_closed_forms():
    rng = np.random.default_rng(2)
    x, mean = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    std = rng.uniform(0.1, 3.0, size=(5, 3))
    expected = jax.scipy.stats.norm.logpdf(x, mean, std).sum(-1)
    np.testing.assert_allclose(ppo.gaussian_log_prob(x, mean, std), expected, rtol=1e-5)
    np.testing.assert_allclose(ppo.gaussian_entropy(std), (0.5 * np.log(2 * np.pi * np.e * std**2)).sum(-1), rtol=1e-5)


def test_tanh_log_det_jacobian_is_exact_and_finite_for_large_inputs():
    x = np.linspace(-4, 4, 17)[:, None]
    np.testing.assert_allclose(ppo.tanh_log_det_jacobian(x), np.log(1 - np.tanh(x) ** 2)[:, 0], rtol=1e-5, atol=1e-6)
    far = np.asarray(ppo.tanh_log_det_jacobian(jnp.array([[30.0], [-30.0]])))
    np.testing.assert_allclose(far, 2 * math.log(2) - 60.0, rtol=1e-6)  # log(4) - 2|x|, where 1 - tanh^2 underflows


def test_policy_distribution_starts_near_unit_scale():
    output = jnp.zeros((2, 6))
    mean, std = ppo.policy_distribution(output)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_allclose(std, math.log(2) + 1e-3, rtol=1e-6)
    assert float(ppo.policy_distribution(jnp.full((1, 2), 100.0))[1].max()) == 10.0


# ---------------------------------------------------------------------------------------------------------------------
# What only this script checks end to end (the output contract of every script is in test_scripts.py)


@pytest.mark.slow
def test_rollout_truncates_resets_and_carries_episodes_over():
    """Episodes of 10 steps in 25-step rollouts: the time limit truncates (never terminates) every 10th step, the
    finished return is the sum of the episode's rewards, every episode starts from a fresh start state made in its
    first step (the run's first episodes too: the carry begins without any), and an episode cut by the end of a rollout
    goes on in the next."""
    env, _ = ppo.make_env("CartpoleBalance", "jax")
    policy = ppo.MLP((32,) * 4 + (2 * env.action_size,))
    params = policy.init(jax.random.key(0), jnp.zeros((1, env.observation_size)))
    init, rollout = ppo.make_rollout(env, policy, 25, 10)
    rollout = jax.jit(rollout)
    carry = init(4)
    stats = ppo.init_running_stats(env.observation_size)
    key = jax.random.key(2)
    carry, transitions, finished_returns = rollout(params, stats, carry, key)

    truncation_steps = np.nonzero(np.asarray(transitions.truncation[:, 0]))[0]
    np.testing.assert_array_equal(truncation_steps, [9, 19])
    np.testing.assert_array_equal(transitions.truncation, np.repeat(transitions.truncation[:, :1], 4, axis=1))
    assert not np.any(transitions.termination)
    rewards, finished = np.asarray(transitions.reward), np.asarray(finished_returns)
    np.testing.assert_allclose(finished[9], rewards[:10].sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(finished[19], rewards[10:20].sum(axis=0), rtol=1e-5)
    assert np.isnan(np.delete(finished, [9, 19], axis=0)).all()

    # An episode's first step acts from the states reset with that step's key.
    reset_keys = jax.random.split(jax.random.split(key)[0], 25)
    reset = jax.jit(lambda key: jax.vmap(env.reset)(jax.random.split(key, 4)).obs)
    for first_step in (0, 10, 20):
        np.testing.assert_allclose(transitions.obs[first_step], reset(reset_keys[first_step]), atol=1e-5)
    assert not np.allclose(transitions.obs[10], transitions.obs[0])
    assert not np.allclose(transitions.obs[20], transitions.obs[10])
    np.testing.assert_array_equal(carry.steps, 5)

    _, transitions, _ = rollout(params, stats, carry, jax.random.key(3))
    np.testing.assert_array_equal(np.nonzero(np.asarray(transitions.truncation[:, 0]))[0], [4, 14, 24])


@pytest.mark.parametrize("script", ["ppo_continuous", "gorl_ppo_fm", "gorl_ppo_diffusion", "fpo", "dppo"])
def test_make_env_loads_the_physics_asked_for_and_jits_its_step(script):
    """Every script's make_env builds the task with the MJX implementation asked for (Playground 0.2.0's own default is
    Warp), with the suite's 1000-step episodes, and jits its step so that the physics is traced once per process."""
    module = importlib.import_module(script)
    for impl in ("jax", "warp"):
        env, episode_length = module.make_env("CartpoleSwingup", impl)
        assert env.mjx_model.impl.name.lower() == impl and episode_length == 1000
        assert isinstance(env.step, type(jax.jit(abs))), "the env's step is not jitted"


def test_defaults_follow_the_paper_per_task():
    """Playground's published Brax PPO settings: Adam at 1e-3 without gradient clipping, clip 0.1, value loss 0.25,
    entropy 0.01, 180M env steps of 2048 envs x 480 steps; the discount 0.995, 0.95 on FingerSpin and BallInCup."""
    args = ppo.Args()
    ppo.check_args(args)
    assert (args.gamma, args.num_envs, args.rollout_length, args.num_iterations) == (0.995, 2048, 480, 183)
    assert (args.learning_rate, args.max_grad_norm, args.total_timesteps) == (1e-3, float("inf"), 180_000_000)
    assert (args.clip_eps, args.vf_coef, args.ent_coef) == (0.1, 0.25, 0.01)
    for env_id in ("FingerSpin", "BallInCup"):
        task = ppo.Args(env_id=env_id)
        ppo.check_args(task)
        assert task.gamma == 0.95, env_id


@pytest.mark.slow
def test_warp_physics_runs_the_same_contract(tmp_path):
    """The rollout, auto-reset included, also runs with MuJoCo Warp, whose state holds leaves without an env axis."""
    result = run_script("ppo_continuous.py", *CPU_ARGS, "--impl", "warp", "--total-timesteps", N, "--run-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_path = only_run_folder(tmp_path)
    assert read_json(os.path.join(run_path, "config.json"))["impl"] == "warp"
    summary = read_json(os.path.join(run_path, "summary.json"))
    assert summary["env_steps"] == N and 0.0 <= summary["final_eval_return"] <= 1000.0
