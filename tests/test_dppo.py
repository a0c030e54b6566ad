"""dppo.py: the denoising chain's schedule, step likelihoods and ratios against closed forms."""

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
    betas, alpha_bars = (np.asarray(a, np.float64) for a in dppo.cosine_schedule(10))
    x = np.asarray(jax.random.normal(jax.random.key(5), (6, 3)))
    for level in (10, 5, 1):
        mean, std = dppo.step_distribution(policy, params, obs, jnp.asarray(x, jnp.float32), level)
        noise = np.asarray(policy.apply(params, obs, jnp.asarray(x, jnp.float32), level / 10))
        a, a_prev, b = alpha_bars[level], alpha_bars[level - 1], betas[level - 1]
        x0 = np.clip((x - np.sqrt(1 - a) * noise) / np.sqrt(a), -3, 3)
        expected_mean = (b * np.sqrt(a_prev) * x0 + (1 - a_prev) * np.sqrt(1 - b) * x) / (1 - a)
        expected_std = max(np.sqrt(b * (1 - a_prev) / (1 - a)), 0.1)
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(std, expected_std, rtol=1e-5)
    assert float(dppo.step_distribution(policy, params, obs, jnp.asarray(x, jnp.float32), 1)[1]) == np.float32(0.1)


def test_step_log_probs_are_closed_form_gaussians_averaged_over_dimensions():
    policy, params, obs = make_policy(2)
    chain = dppo.sample_chain(policy, params, obs, jax.random.key(3), 1.0)
    assert chain.shape == (6, 11, 3)
    log_probs = np.asarray(dppo.chain_log_probs(policy, params, obs, chain))
    for i, level in enumerate(range(10, 0, -1)):
        mean, std = dppo.step_distribution(policy, params, obs, chain[:, i], level)
        expected = np.mean(jax.scipy.stats.norm.logpdf(chain[:, i + 1], mean, std), axis=-1)
        np.testing.assert_allclose(log_probs[:, i], expected, rtol=1e-5, atol=1e-5)


def test_ratio_is_exactly_one_for_the_policy_that_acted():
    policy, params, obs = make_policy(4)
    chain = dppo.sample_chain(policy, params, obs, jax.random.key(5), 1.0)
    stored = dppo.chain_log_probs(policy, params, obs, chain)
    assert np.all(np.asarray(jnp.exp(dppo.chain_log_probs(policy, params, obs, chain) - stored)) == 1.0)


def test_zero_noise_gives_the_mean_path():
    policy, params, obs = make_policy(6)
    chain = dppo.sample_chain(policy, params, obs, jax.random.key(7), 0.0)
    np.testing.assert_array_equal(chain[:, 0], 0.0)
    for i, level in enumerate(range(10, 0, -1)):
        mean, _ = dppo.step_distribution(policy, params, obs, chain[:, i], level)
        np.testing.assert_allclose(chain[:, i + 1], mean, rtol=1e-6, atol=1e-6)
