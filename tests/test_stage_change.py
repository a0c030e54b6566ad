"""GoRL's stage change, checked on what it computes (both GoRL scripts): the restarted encoder is exactly the N(0, I)
prior while the critic, the observation statistics and the envs carry over, and the decoder a fit returns is its epoch
with the lowest held-out loss; and run whole, on a toy env, every stage begins at the prior."""

import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tyro
from conftest import ToyEnv
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gorl_ppo_diffusion
import gorl_ppo_fm

GORL = (gorl_ppo_fm, gorl_ppo_diffusion)
OBS_SIZE, ACTION_SIZE = 5, 3


def trees_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_restart_puts_the_encoder_at_the_prior_and_carries_the_rest_over(module):
    env = SimpleNamespace(observation_size=OBS_SIZE, action_size=ACTION_SIZE)
    (latent_policy, _, _), params = module.make_networks(env, jax.random.key(0))
    # A trained state: parameters moved off their start, an optimiser that has taken a step, statistics of data.
    keys = iter(jax.random.split(jax.random.key(1), 100))
    trained = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), params)
    optimizer = optax.adam(1e-3)
    _, opt_state = optimizer.update(jax.tree.map(jnp.ones_like, trained), optimizer.init(trained))
    stats = module.update_running_stats(
        module.init_running_stats(OBS_SIZE), 3.0 + jax.random.normal(next(keys), (50, 5))
    )
    state = module.TrainState(trained, opt_state, stats, {"envs": jnp.zeros(2)}, jax.random.key(2))
    prior = module.prior_params(latent_policy, jax.random.key(3), OBS_SIZE)
    mean, std = module.policy_distribution(latent_policy.apply(state.params["latent_policy"], jnp.ones((1, OBS_SIZE))))
    assert float(jnp.max(jnp.abs(mean))) > 0.1, "the trained encoder should be away from the prior"

    restarted = module.restart_encoder(state, prior, {"envs": jnp.ones(2)}, optimizer)
    assert trees_equal(restarted.params["latent_policy"], prior)
    obs = 5.0 * jax.random.normal(next(keys), (64, OBS_SIZE))
    mean, std = module.policy_distribution(latent_policy.apply(restarted.params["latent_policy"], obs))
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_allclose(std, 1.0, atol=1e-6)  # N(0, I) in every state
    assert trees_equal(restarted.params["critic"], trained["critic"])
    assert trees_equal(restarted.obs_stats, stats)
    assert trees_equal(restarted.opt_state, optimizer.init(restarted.params))  # a fresh optimiser
    assert trees_equal(restarted.rollout_carry, {"envs": jnp.ones(2)})  # the envs go on where the collection left them
    assert trees_equal(jax.random.key_data(restarted.key), jax.random.key_data(state.key))


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_decoder_fit_keeps_the_epoch_with_the_lowest_held_out_loss(module):
    """A fit that stops early (patience 2, a learning rate high enough for the held-out loss to wander): the decoder it
    returns has, measured again, the lowest of the held-out losses the fit reported, not its last epoch's."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3000, OBS_SIZE)).astype(np.float32)
    actions = (np.tanh(obs[:, :ACTION_SIZE]) + 0.3 * rng.normal(size=(3000, ACTION_SIZE))).astype(np.float32)
    args = module.Args(decoder_batch_size=256, decoder_epochs=30, decoder_patience=2, decoder_learning_rate=3e-2)
    network = module.ConditionalField((64,) * 4, ACTION_SIZE)
    reported = []
    _, fit = module.make_decoder_trainer(network, args)(
        jnp.asarray(obs), jnp.asarray(actions), jax.random.key(0), lambda *epoch: reported.append(epoch)
    )
    losses = [validation_loss for _, _, validation_loss, _ in reported]
    best_epoch = 1 + int(np.argmin(losses))
    print(f"{module.ALGO}: held-out losses {np.round(losses, 4)}")
    assert fit["decoder_epochs"] == len(reported) == best_epoch + args.decoder_patience < args.decoder_epochs
    assert [improved for *_, improved in reported].count(True) >= 2
    assert fit["decoder_validation_loss"] == pytest.approx(min(losses), rel=1e-6)
    assert fit["decoder_validation_loss"] != pytest.approx(losses[-1], rel=1e-6)


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_each_stage_starts_from_the_prior(module, tmp_path, monkeypatch, signal_handlers):
    """The whole script on the toy env, two stages of two iterations with one minibatch each: the first update of each
    stage measures the encoder's KL from the prior before its gradient step, so it is 0 where the stage began at the
    prior, although a high learning rate carried stage 0's encoder well away from it."""
    monkeypatch.setattr(module, "make_env", lambda env_id, impl: (ToyEnv(), 7))
    sizes = "--num-envs 2 --num-minibatches 1 --batch-size 2 --unroll-length 5 --update-epochs 1 --num-eval-envs 2"
    decoder = "--decoder-dataset-size 20 --decoder-batch-size 8 --decoder-epochs 2"
    arguments = f"--env-id CartpoleSwingup {sizes} --stage-timesteps 20 20 {decoder} --learning-rate 0.05"
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    args = tyro.cli(
        module.Args, args=[*arguments.split(), "--run-dir", str(tmp_path), "--compilation-cache-dir", cache]
    )
    module.main(args)
    (run_path,) = tmp_path.iterdir()
    events = EventAccumulator(str(run_path), size_guidance={"scalars": 0})
    events.Reload()
    kl = {event.step: event.value for event in events.Scalars("losses/latent_kl")}
    print(f"{module.ALGO}: KL from the prior by env step {kl}")
    assert kl[10] < 1e-9 and kl[30] < 1e-9  # the first iteration of each stage
    assert kl[20] > 1e-4 and kl[40] > 1e-4
