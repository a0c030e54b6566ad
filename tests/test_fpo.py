"""fpo.py: the flow policy's sampler, its per-pair losses and ratios against plain references."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

import fpo


def make_policy_and_batch(seed=0):
    policy = fpo.ConditionalField((32,) * 4, 3, output_scale=0.25)
    rng = np.random.default_rng(seed)
    obs, actions = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    noise, t = fpo.sample_pairs(jax.random.key(seed), actions.shape, True)
    params = policy.init(jax.random.key(seed), obs, actions, jnp.zeros((5, 1)))
    return policy, params, obs, actions, noise, t


def test_pairs_are_drawn_on_the_sampler_time_grid_or_uniformly():
    noise, t = fpo.sample_pairs(jax.random.key(0), (1000, 3), True)
    assert noise.shape == (1000, 8, 3) and t.shape == (1000, 8, 1)
    np.testing.assert_allclose(np.unique(np.round(np.asarray(t), 6)), np.round(np.arange(1, 11) / 10, 6))
    _, t = fpo.sample_pairs(jax.random.key(0), (1000, 3), False)  # the FPO paper's form: U[0, 1)
    t = np.asarray(t)
    assert t.min() >= 0.0 and t.max() < 1.0 and len(np.unique(t)) > 7000
    assert abs(t.mean() - 0.5) < 0.01 and abs(np.mean(t < 0.1) - 0.1) < 0.01


def test_cfm_losses_match_numpy_and_the_one_minus_t_squared_form():
    policy, params, obs, actions, noise, t = make_policy_and_batch()
    noise, t = np.asarray(noise), np.asarray(t)
    x_t = t * noise + (1 - t) * actions[:, None, :]
    velocity = np.asarray(policy.apply(params, np.broadcast_to(obs[:, None], (5, 8, 4)), x_t, t))
    implied_noise = x_t + (1 - t) * velocity
    expected = np.mean((noise - implied_noise) ** 2, axis=-1)
    losses = np.asarray(fpo.cfm_losses(policy, params, obs, actions, noise, t))
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-7)
    # The same loss as a velocity regression weighted by (1 - t)^2: pairs at t = 1 carry no signal.
    weighted = (1 - t[..., 0]) ** 2 * np.mean((noise - actions[:, None, :] - velocity) ** 2, axis=-1)
    np.testing.assert_allclose(losses, weighted, rtol=1e-4, atol=1e-6)


def test_euler_integration_of_a_linear_field_matches_a_hand_integration():
    a, b, z = -0.7, 2.0, np.array([1.5, -0.3])
    x = z.copy()
    for k in range(10):  # t runs 1.0, 0.9, ..., 0.1 with dt = -0.1
        x = x - 0.1 * (a * x + b * (1 - k / 10))
    np.testing.assert_allclose(
        fpo.euler_integrate(lambda x, t: a * x + b * t, jnp.asarray(z, jnp.float32), 10), x, rtol=1e-5
    )


def test_policy_is_a_quarter_scaled_field_integrated_in_ten_euler_steps():
    """The script's policy (make_networks) is the 4 x 32 field with its output scaled by 0.25, and its action is the
    Euler integration of that field from the noise at t = 1 in 10 steps of 0.1, written out here."""
    (policy, _), params = fpo.make_networks(SimpleNamespace(observation_size=4, action_size=3), jax.random.key(2))
    assert policy.hidden_sizes == (32,) * 4
    params = params["policy"]
    obs = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)
    unscaled = fpo.ConditionalField((32,) * 4, 3, output_scale=1.0)
    x, t = jnp.ones((5, 3)), jnp.full((5, 1), 0.5)
    np.testing.assert_allclose(policy.apply(params, obs, x, t), 0.25 * unscaled.apply(params, obs, x, t), rtol=1e-6)
    noise = jax.random.normal(jax.random.key(3), (5, 3))
    x = noise
    for k in range(10):
        x = x - 0.1 * policy.apply(params, obs, x, jnp.full((5, 1), 1.0 - k / 10))
    np.testing.assert_allclose(fpo.flow_action(policy, params, obs, noise), x, rtol=1e-5, atol=1e-6)


def test_defaults_are_the_configuration_the_gorl_authors_ran():
    """Adam at 3e-4 without gradient clipping, no entropy term, the discount 0.995 on every task (FingerSpin and
    BallInCup included), clip 0.05, one ratio per (noise, time) pair, 8 pairs, log-ratios clipped to +-3."""
    for env_id in ("CheetahRun", "FingerSpin", "BallInCup"):
        args = fpo.Args(env_id=env_id)
        fpo.check_args(args)
        assert args.gamma == 0.995, env_id
    assert (args.learning_rate, args.max_grad_norm, args.clip_eps, args.ratio) == (3e-4, float("inf"), 0.05, "per_pair")
    assert "ent_coef" not in fpo.Args.__dataclass_fields__
    assert (fpo.NUM_NOISE_PAIRS, fpo.NUM_FLOW_STEPS, fpo.LOG_RATIO_CLIP) == (8, 10, 3.0)
