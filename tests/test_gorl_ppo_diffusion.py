"""gorl_ppo_diffusion.py: the DDPM decoder's maths and its expressiveness (the rest is gorl_ppo_fm.py's, tested there
and, end to end, in test_scripts.py and test_learning.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gorl_ppo_diffusion as gorl

# The cosine schedule at T = 10 (Nichol and Dhariwal, s = 0.008), levels 0..9, as the authors' code computes it.
COSINE_ALPHA_BARS = [1.0, 0.97209, 0.89871, 0.78691, 0.64748, 0.49384, 0.34081, 0.20312, 0.09405, 0.02409]


def test_cosine_alpha_bars():
    np.testing.assert_allclose(gorl.cosine_alpha_bars(10), COSINE_ALPHA_BARS, atol=1e-5)


def test_identity_decoder_returns_the_latent_exactly():
    network = gorl.ConditionalField((64,) * 4, 3)
    obs, latent = jax.random.normal(jax.random.key(0), (50, 5)) * 4, jax.random.normal(jax.random.key(1), (50, 3)) * 3
    decoder = gorl.identity_decoder(network, jax.random.key(2), 5, 3)
    assert np.array_equal(np.asarray(gorl.decode(network, decoder, obs, latent)), np.asarray(latent))
    # Why the flag: the zero network's chain scales the latent by 1 / sqrt(alpha_bar_9) instead.
    scaled = gorl.decode(network, decoder._replace(identity=jnp.array(False)), obs, latent)
    np.testing.assert_allclose(scaled, latent / math.sqrt(COSINE_ALPHA_BARS[-1]), rtol=1e-4)


def test_ddim_step_matches_numpy():
    rng = np.random.default_rng(0)
    x, noise = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    a, a_next = 0.34081, 0.49384
    clean = (x - np.sqrt(1 - a) * noise) / np.sqrt(a)
    expected = np.sqrt(a_next) * clean + np.sqrt(1 - a_next) * noise
    np.testing.assert_allclose(gorl.ddim_step(jnp.asarray(x), jnp.asarray(noise), a, a_next), expected, rtol=1e-5)


def test_ddim_chain_with_the_exact_noise_recovers_the_action():
    """For a single target action a, the best noise prediction at x_k is (x_k - sqrt(alpha_bar_k) a) divided by
    sqrt(1 - alpha_bar_k); with it, the chain lands on a from any start."""
    action = jnp.array([0.7, -1.2])
    alpha_bars = gorl.cosine_alpha_bars(10)
    x = jax.random.normal(jax.random.key(0), (16, 2))
    for level in range(9, 0, -1):
        noise = (x - jnp.sqrt(alpha_bars[level]) * action) / jnp.sqrt(1 - alpha_bars[level])
        x = gorl.ddim_step(x, noise, alpha_bars[level], alpha_bars[level - 1])
    np.testing.assert_allclose(x, jnp.broadcast_to(action, x.shape), atol=1e-4)


def test_diffusion_loss_matches_numpy():
    network = gorl.ConditionalField((16,) * 2, 2)
    rng = np.random.default_rng(1)
    obs, actions = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
    noise, levels = rng.normal(size=(3, 6, 2)).astype(np.float32), rng.integers(1, 10, size=(3, 6, 1))
    params = network.init(jax.random.key(0), obs, actions, levels[0] / 10)
    alpha_bar = np.asarray(COSINE_ALPHA_BARS, np.float32)[levels]
    x_k = np.sqrt(alpha_bar) * actions + np.sqrt(1 - alpha_bar) * noise
    predicted = np.asarray(network.apply(params, np.broadcast_to(obs, (3, 6, 4)), x_k, levels / 10))
    expected = np.mean((predicted - noise) ** 2)
    np.testing.assert_allclose(gorl.diffusion_loss(network, params, obs, actions, noise, levels), expected, rtol=1e-4)


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
