"""gorl_ppo_fm.py: the decoder and latent-policy maths, the decoder's expressiveness, then the script end to end."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gorl_ppo_fm as gorl


def test_identity_decoder_returns_the_latent_exactly():
    network = gorl.ConditionalField((64,) * 4, 3)
    obs, latent = jax.random.normal(jax.random.key(0), (50, 5)) * 4, jax.random.normal(jax.random.key(1), (50, 3)) * 3
    decoder = gorl.identity_decoder(network, jax.random.key(2), 5, 3)
    assert np.array_equal(np.asarray(gorl.decode(network, decoder, obs, latent)), np.asarray(latent))


def test_euler_integration_of_a_linear_field_matches_a_hand_integration():
    a, b, z = -0.7, 2.0, np.array([1.5, -0.3])
    x = z.copy()
    for k in range(10):  # t runs 1.0, 0.9, ..., 0.1 with dt = -0.1
        x = x - 0.1 * (a * x + b * (1 - k / 10))
    out = gorl.euler_integrate(lambda x, t: a * x + b * t, jnp.asarray(z, jnp.float32), 10)
    np.testing.assert_allclose(out, x, rtol=1e-5)
    # A constant velocity c carries x(1) = z to x(0) = z - c exactly.
    np.testing.assert_allclose(
        gorl.euler_integrate(lambda x, t: jnp.full_like(x, 0.25), jnp.zeros(3), 10), -0.25, rtol=1e-6
    )


def test_flow_matching_loss_matches_numpy():
    network = gorl.ConditionalField((16,) * 2, 2)
    rng = np.random.default_rng(0)
    obs, actions = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
    noise, t = rng.normal(size=(3, 6, 2)).astype(np.float32), rng.uniform(size=(3, 6, 1)).astype(np.float32)
    params = network.init(jax.random.key(0), obs, actions, t[0])
    x_t = t * noise + (1 - t) * actions  # t = 1: pure noise, t = 0: the action
    predicted = np.asarray(network.apply(params, np.broadcast_to(obs, (3, 6, 4)), x_t, t))
    expected = np.mean((predicted - (noise - actions)) ** 2)
    np.testing.assert_allclose(gorl.flow_matching_loss(network, params, obs, actions, noise, t), expected, rtol=1e-5)


def test_latent_regularizers_against_closed_forms():
    rng = np.random.default_rng(1)
    mean, std = rng.normal(size=(4, 3)), rng.uniform(0.3, 2.0, size=(4, 3))
    l2 = gorl.latent_regularizer(jnp.asarray(mean), jnp.asarray(std), "l2")
    np.testing.assert_allclose(l2, np.mean(mean**2) + np.mean(std**2), rtol=1e-6)
    # KL(N(mean, std^2) || N(0, I)) = E_q[log q(z) - log p(z)], estimated by sampling.
    z = mean + std * rng.normal(size=(200_000, 4, 3))
    log_q = -0.5 * ((z - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    log_p = -0.5 * z**2 - 0.5 * np.log(2 * np.pi)
    monte_carlo = np.mean(np.sum(log_q - log_p, axis=-1))
    kl = gorl.latent_regularizer(jnp.asarray(mean), jnp.asarray(std), "kl")
    np.testing.assert_allclose(kl, monte_carlo, rtol=0.02)
    assert float(gorl.latent_regularizer(jnp.zeros((2, 3)), jnp.ones((2, 3)), "kl")) == pytest.approx(0.0, abs=1e-6)


def test_prior_params_give_a_standard_normal_in_every_state():
    policy = gorl.MLP((32,) * 4 + (2 * 3,))
    params = gorl.prior_params(policy, jax.random.key(0), 7)
    obs = jax.random.normal(jax.random.key(1), (20, 7)) * 5
    mean, std = gorl.policy_distribution(policy.apply(params, obs))
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_allclose(std, 1.0, atol=1e-6)


@pytest.mark.slow
def test_decoder_learns_two_modes_a_gaussian_cannot():
    """Actions at each state are one of two modes, +-(1.5 + 0.5 s_0); the fitted decoder carries N(0, 1) samples to
    both, with little mass between them, where the best single Gaussian puts over a third of its mass."""
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, size=(20_000, 2)).astype(np.float32)
    centres = 1.5 + 0.5 * obs[:, :1]
    signs = np.where(rng.uniform(size=(20_000, 1)) < 0.5, 1.0, -1.0)
    actions = (signs * centres + 0.1 * rng.normal(size=(20_000, 1))).astype(np.float32)
    args = gorl.Args(decoder_batch_size=512, decoder_epochs=25, decoder_patience=25, decoder_learning_rate=1e-3)
    network = gorl.ConditionalField((64,) * 4, 1)
    train_decoder = gorl.make_decoder_trainer(network, args)
    decoder, _ = train_decoder(jnp.asarray(obs), jnp.asarray(actions), jax.random.key(0), lambda *_: None)
    for s0 in (-0.8, 0.0, 0.8):
        state = jnp.tile(jnp.array([[s0, 0.3]], jnp.float32), (4000, 1))
        latent = jax.random.normal(jax.random.key(1), (4000, 1))
        samples = np.asarray(gorl.decode(network, decoder, state, latent))[:, 0]
        centre = 1.5 + 0.5 * s0
        upper, lower = np.mean(np.abs(samples - centre) < 0.4), np.mean(np.abs(samples + centre) < 0.4)
        between = np.mean(np.abs(samples) < 0.5 * centre)
        gaussian_between = math.erf(0.5 * centre / math.sqrt(2 * (centre**2 + 0.01)))  # N(0, centre^2 + 0.1^2)
        print(f"s0={s0}: upper {upper:.2f} lower {lower:.2f} between {between:.3f} (Gaussian {gaussian_between:.2f})")
        assert upper > 0.3 and lower > 0.3
        assert between < 0.06 < gaussian_between / 3
