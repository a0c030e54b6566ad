"""Every script's training iteration and evaluation, run as main runs them on a toy env (conftest.ToyEnv, which compiles
in seconds): the observation statistics follow the data and are the ones the rollout acted with, and each evaluation
draws new episodes from its env step, the same in both modes and whenever that step is evaluated again."""

import jax
import numpy as np
import optax
import pytest
from conftest import ToyEnv

import dppo
import fpo
import gorl_ppo_diffusion
import gorl_ppo_fm
import ppo_continuous

MODULES = (ppo_continuous, gorl_ppo_fm, gorl_ppo_diffusion, fpo, dppo)
GORL = (gorl_ppo_fm, gorl_ppo_diffusion)
EPISODE_LENGTH = 7


def parts(module, env, args, key):
    """The script's networks, initial model (the stage-0 decoder for GoRL), rollout and evaluation, as main makes them,
    and what its training iteration takes besides the state."""
    networks, params = module.make_networks(env, key)
    model = {"params": params, "obs_stats": module.init_running_stats(env.observation_size)}
    policy, decoder_network = networks[0], networks[2:]
    if module in GORL:
        model["decoder"] = module.identity_decoder(*decoder_network, key, env.observation_size, env.action_size)
    rollout = module.make_rollout(env, policy, *decoder_network, args.rollout_length, EPISODE_LENGTH)
    evaluate = module.make_evaluate(env, policy, *decoder_network, args.num_eval_envs, EPISODE_LENGTH)
    extra = (model["decoder"], module.stage_settings(args, 0)) if module in GORL else ()
    return networks, model, rollout, evaluate, extra


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_observation_statistics_follow_the_data_and_are_the_rollouts(module):
    """Two iterations of 2 envs x 5 steps in 7-step episodes: afterwards the statistics hold the observations of both
    rollouts (the toy env's first observation is the step within the episode: 0..4, then 5, 6, 0, 1, 2), and the
    single minibatch of each update, taken before its gradient step, sees ratios of exactly 1 although the statistics
    it normalises with moved in between."""
    args = module.Args(
        env_id="CartpoleSwingup", num_envs=2, num_minibatches=1, batch_size=2, unroll_length=5, update_epochs=1
    )
    module.check_args(args)
    env = ToyEnv()
    (policy, critic, *_), model, (init_rollout, rollout), _, extra = parts(module, env, args, jax.random.key(0))
    optimizer = optax.adam(1e-3)
    train_iteration = jax.jit(module.make_train_iteration(rollout, module.make_update(policy, critic, optimizer, args)))
    state = module.TrainState(
        model["params"], optimizer.init(model["params"]), model["obs_stats"], init_rollout(2), jax.random.key(1)
    )
    seen = []
    for steps in ([0, 1, 2, 3, 4], [5, 6, 0, 1, 2]):
        state, metrics = train_iteration(state, *extra)
        seen += steps * 2
        stats = state.obs_stats
        assert float(stats.count) == len(seen)
        np.testing.assert_allclose(stats.mean[0], np.mean(seen), rtol=1e-6)
        np.testing.assert_allclose(stats.var_sum[0], np.sum((np.array(seen) - np.mean(seen)) ** 2), rtol=1e-5)
        np.testing.assert_allclose(stats.mean[3], 1.0, rtol=1e-6)  # the constant feature
        assert abs(float(metrics["approx_kl"])) < 1e-7 and float(metrics["clipfrac"]) == 0.0


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_each_evaluation_draws_new_episodes_from_its_env_step(module, tmp_path, signal_handlers):
    """The run's evaluation at env steps 0, 1000 and 0 again: new start states (and noise) at another step, the same
    episodes when a step is evaluated again, and in both modes the same start states."""
    args = module.Args(env_id="CartpoleSwingup", run_dir=str(tmp_path), num_eval_envs=4)
    module.check_args(args)
    env = ToyEnv()
    _, model, _, evaluate, _ = parts(module, env, args, jax.random.key(0))
    run = module.Run(args, env, None, 0, None)
    run.start_evaluations(evaluate, model, jax.random.key(1))
    run.log_first_evaluation()
    evaluations = []
    for env_steps in (0, 1000, 0):
        run.env_steps = env_steps
        evaluations.append(jax.device_get(run.evaluate_in_both_modes(model)))
    run.writer.close()

    def start_positions(evaluation):
        return [np.asarray(qpos[0]) for qpos, _, _ in evaluation[1]]  # the first env's start, in each mode

    (returns, _), (other_returns, _), (again_returns, _) = evaluations
    first, other, again = (start_positions(evaluation) for evaluation in evaluations)
    np.testing.assert_array_equal(first[0], first[1])  # the modes share their episodes
    np.testing.assert_array_equal(other[0], other[1])
    assert not np.array_equal(first[0], other[0])  # another env step, other start states
    assert not np.array_equal(returns[1], other_returns[1])
    for mode in (0, 1):  # the same step evaluated again: the same episodes, noise included
        np.testing.assert_array_equal(again[mode], first[mode])
        np.testing.assert_array_equal(again_returns[mode], returns[mode])
