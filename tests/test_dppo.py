"""dppo.py: the denoising chain's schedule, step likelihoods and ratios against closed forms."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

import dppo


def make_policy(seed=0, action_size=3, obs_size=4):
    policy = dppo.ConditionalField((32,) * 4, action_size)
    obs = jax.random.normal(jax.random.key(seed), (6, obs_size))
    params = policy.init(jax.random.key(seed + 1), obs, jnp.zeros((6, action_size)), jnp.zeros((6, 1)))
    return policy, params, obs


def test_cosine_schedule():
    betas, alpha_bars = dppo.cosine_schedule(10)
    s = 0.008
    f = np.cos((np.arange(11) / 10 + s) / (1 + s) * np.pi / 2) ** 2
    expected = f / f[0]
    np.testing.assert_allclose(alpha_bars[:10], expected[:10], rtol=1e-5)  # the last beta is clipped at 0.999
    np.testing.assert_allclose(alpha_bars[10], expected[9] * 0.001, rtol=1e-4)
    np.testing.assert_allclose(np.cumprod(1 - betas), alpha_bars[1:], rtol=1e-6)
    assert alpha_bars[0] == 1.0 and float(betas.max()) == np.float32(0.999)


def test_step_distribution_is_ddpm_posterior_with_floored_std():
    policy, params, obs = make_policy()
    num_steps = dppo.NUM_DENOISING_STEPS
    assert num_steps == 20  # DPPO's from-scratch configuration
    betas, alpha_bars = (np.asarray(a, np.float64) for a in dppo.cosine_schedule(num_steps))
    x = np.asarray(jax.random.normal(jax.random.key(5), (6, 3)))
    for level in (num_steps, 10, 1):
        mean, std = dppo.step_distribution(policy, params, obs, jnp.asarray(x, jnp.float32), level)
        noise = np.asarray(policy.apply(params, obs, jnp.asarray(x, jnp.float32), level / num_steps))
        a, a_prev, b = alpha_bars[level], alpha_bars[level - 1], betas[level - 1]
        x0 = np.clip((x - np.sqrt(1 - a) * noise) / np.sqrt(a), -3, 3)
        expected_mean = (b * np.sqrt(a_prev) * x0 + (1 - a_prev) * np.sqrt(1 - b) * x) / (1 - a)
        expected_std = max(np.sqrt(b * (1 - a_prev) / (1 - a)), 0.1)
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(std, expected_std, rtol=1e-5)
    assert float(dppo.step_distribution(policy, params, obs, jnp.asarray(x, jnp.float32), 1)[1]) == np.float32(0.1)


def test_step_log_probs_are_closed_form_gaussians_averaged_over_dimensions():
    policy, params, obs = make_policy(2)
    chain = dppo.sample_chain(policy, params, obs, jax.random.key(3), False)
    assert chain.shape == (6, dppo.NUM_DENOISING_STEPS + 1, 3)
    log_probs = np.asarray(dppo.chain_log_probs(policy, params, obs, chain))
    for i, level in enumerate(range(dppo.NUM_DENOISING_STEPS, 0, -1)):
        mean, std = dppo.step_distribution(policy, params, obs, chain[:, i], level)
        expected = np.mean(np.clip(jax.scipy.stats.norm.logpdf(chain[:, i + 1], mean, std), -5, 2), axis=-1)
        np.testing.assert_allclose(log_probs[:, i], expected, rtol=1e-5, atol=1e-5)


def test_step_log_probs_are_clamped_per_element_as_dppo_does():
    policy, params, obs = make_policy(8)
    chain = dppo.sample_chain(policy, params, obs, jax.random.key(9), False)
    far = chain.at[:, 1::2, 0].add(5.0)  # every other state shifted in the first action dimension
    log_probs = np.asarray(dppo.chain_log_probs(policy, params, obs, far))
    clamped = 0
    for i, level in enumerate(range(dppo.NUM_DENOISING_STEPS, 0, -1)):
        mean, std = dppo.step_distribution(policy, params, obs, far[:, i], level)
        per_dim = np.asarray(jax.scipy.stats.norm.logpdf(far[:, i + 1], mean, std))
        clamped += np.sum(per_dim < -5.0)
        np.testing.assert_allclose(log_probs[:, i], np.mean(np.clip(per_dim, -5.0, 2.0), axis=-1), rtol=1e-5, atol=1e-5)
    assert clamped > 50  # the clamp was exercised


def test_deterministic_mode_is_dppos():
    """DPPO's "deterministic" sampling still draws x_K from N(0, I) and noises every step but the last, with the step
    std floored at 1e-3 instead of 0.1."""
    policy, params, obs = make_policy(6)
    key = jax.random.key(7)
    chain = np.asarray(dppo.sample_chain(policy, params, obs, key, True))
    stochastic = np.asarray(dppo.sample_chain(policy, params, obs, key, False))
    np.testing.assert_array_equal(chain[:, 0], stochastic[:, 0])  # the same random x_K
    assert np.abs(chain[:, 0]).min() > 0
    _, key = jax.random.split(key)
    step_keys = jax.random.split(key, dppo.NUM_DENOISING_STEPS)
    for i, level in enumerate(range(dppo.NUM_DENOISING_STEPS, 0, -1)):
        mean, std = dppo.step_distribution(policy, params, obs, jnp.asarray(chain[:, i]), level, 1e-3)
        noise = np.clip(np.asarray(jax.random.normal(step_keys[i], chain[:, i].shape)), -3, 3)
        expected = np.asarray(mean) + (0.0 if level == 1 else np.asarray(std) * noise)
        np.testing.assert_allclose(chain[:, i + 1], expected, rtol=1e-5, atol=1e-6)
    assert float(std.min()) < 0.1  # the posterior std below DPPO's sampling floor is kept


def test_defaults_are_dppos_own_from_scratch_configuration():
    """Adam at 1e-4 for the policy and 1e-3 for the critic, no gradient clipping, no entropy term, the discount 0.995 on
    every task, clip 0.1 on every denoising step, denoising discount 0.99 over 20 steps; the other scripts' networks
    (a 4 x 32 denoiser, a 5 x 256 critic), not DPPO's residual MLPs."""
    for env_id in ("CheetahRun", "FingerSpin", "BallInCup"):
        args = dppo.Args(env_id=env_id)
        dppo.check_args(args)
        assert args.gamma == 0.995, env_id
    assert (args.learning_rate, args.critic_learning_rate, args.max_grad_norm) == (1e-4, 1e-3, float("inf"))
    assert (args.clip_eps, args.denoising_gamma, dppo.NUM_DENOISING_STEPS) == (0.1, 0.99, 20)
    assert "ent_coef" not in dppo.Args.__dataclass_fields__
    (policy, critic), _ = dppo.make_networks(SimpleNamespace(observation_size=4, action_size=3), jax.random.key(0))
    assert policy.hidden_sizes == (32,) * 4 and critic.layer_sizes == (256,) * 5 + (1,)
