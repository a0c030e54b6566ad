"""Every script's training iteration and evaluation, run as main runs them on a toy env (conftest.ToyEnv, which compiles
in seconds): the observation statistics follow the data and are the ones the rollout acted with, and each evaluation
draws new episodes from its env step, the same in both modes and whenever that step is evaluated again; GoRL's rollout
and deterministic policy act through the decoder. Then the core the scripts share, on toy rollouts: auto-reset and the
time limit, the sequences' bootstrap, the minibatches' reshuffle, the one donated program per iteration, the evaluation
of raw returns and the policy's mode, main's schedule of evaluations and checkpoints, and the shared defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ToyEnv, acting_gorl_model
from test_ppo_continuous import lambda_return_reference

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


# ---------------------------------------------------------------------------------------------------------------------
# The rollout, the update's minibatches and the iteration, on toy rollouts


def toy_args(module, **sizes):
    args = module.Args(**{"env_id": "CartpoleSwingup", "num_minibatches": 1, "update_epochs": 1, **sizes})
    module.check_args(args)
    return args


def toy_rollouts(module, args, count, key=jax.random.key(0)):
    """`count` consecutive rollouts of the script's own rollout on the toy env, from its initial model: the model, the
    networks, the transitions and finished returns of each, and the carry after the last."""
    env = ToyEnv()
    networks, model, (init_rollout, rollout), _, extra = parts(module, env, args, key)
    name = "latent_policy" if module in GORL else "policy"
    policy_inputs = (model["params"][name], model["obs_stats"], *extra[:1])  # GoRL acts through its decoder
    rollout, carry, results = jax.jit(rollout), init_rollout(args.num_envs), []
    for rollout_key in jax.random.split(jax.random.fold_in(key, 1), count):
        carry, transitions, finished_returns = rollout(*policy_inputs, carry, rollout_key)
        results.append((transitions, np.asarray(finished_returns)))
    return model, networks, extra, results, carry


def pre_tanh_actions(module, transitions):
    """The (T, B, A) pre-tanh actions the env received the tanh of."""
    return transitions.chain[..., -1, :] if module is dppo else transitions.action


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_rollout_resets_each_episode_fresh_and_truncates_it_at_the_time_limit(module):
    """Two rollouts of 3 envs x 10 steps in 7-step episodes: every env's first step resets it, and only the steps where
    an episode begins reset (the toy env's step counter runs 0..6, 0..6, ... across the two rollouts), each env and
    each episode from a start state of its own; the 7th step of an episode is a truncation, never a termination; the
    env receives tanh of the stored action; and a finished episode's return is the sum of its raw rewards."""
    args = toy_args(module, num_envs=3, batch_size=3, unroll_length=10)
    *_, results, carry = toy_rollouts(module, args, 2)
    transitions = jax.tree.map(lambda *x: np.concatenate(x), *(t for t, _ in results))  # (20, 3, ...)
    finished_returns = np.concatenate([f for _, f in results])
    obs, actions = transitions.obs, np.asarray(pre_tanh_actions(module, transitions))
    step_in_episode = np.arange(20) % EPISODE_LENGTH
    np.testing.assert_array_equal(obs[:, :, 0], np.broadcast_to(step_in_episode[:, None], (20, 3)))
    np.testing.assert_array_equal(transitions.truncation, (step_in_episode == EPISODE_LENGTH - 1)[:, None] * np.ones(3))
    assert not np.any(transitions.termination)
    np.testing.assert_array_equal(carry.steps, 20 % EPISODE_LENGTH)

    starts = obs[step_in_episode == 0][:, :, 1:3]  # (episodes, envs, 2): every start position differs from the others
    assert len(np.unique(starts.reshape(-1, 2), axis=0)) == starts.shape[0] * starts.shape[1]
    position = obs[:, :, 1:3]
    moved = position[:-1] + 0.1 * np.tanh(actions[:-1])  # ToyEnv: the action moves the point by a tenth of it
    within_episode = step_in_episode[1:] > 0
    np.testing.assert_allclose(position[1:][within_episode], moved[within_episode], atol=1e-5)
    # The reward is the env's own (raw), and an episode's return is their sum, across the rollouts' boundary.
    rewards = np.asarray(transitions.reward)
    all_moved = position + 0.1 * np.tanh(actions)
    np.testing.assert_allclose(rewards, -np.sum(all_moved**2, axis=-1), rtol=1e-5)
    for end in np.nonzero(step_in_episode == EPISODE_LENGTH - 1)[0]:
        np.testing.assert_allclose(finished_returns[end], rewards[end - EPISODE_LENGTH + 1 : end + 1].sum(0), rtol=1e-5)
    assert np.isnan(finished_returns[step_in_episode < EPISODE_LENGTH - 1]).all()


def latent_distribution(module, latent_policy, model, obs):
    """The mean and std of the model's latent policy at raw observations `obs`."""
    obs = module.normalize(model["obs_stats"], obs)
    return module.policy_distribution(latent_policy.apply(model["params"]["latent_policy"], obs))


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_gorl_rollout_acts_through_the_decoder_and_stores_the_latent_and_the_action(module):
    """A rollout of 8 envs x 20 steps through a decoder that is not the identity: each stored latent is a draw of the
    encoder (not its mean) with its log-likelihood under the encoder, the stored action is the decoder's pre-tanh action
    for that latent, and the env moved by tanh of it (the toy env's point moves by 0.1 x its action)."""
    env = ToyEnv()
    (latent_policy, _, decoder_network), model = acting_gorl_model(module, env, jax.random.key(0))
    init_rollout, rollout = module.make_rollout(env, latent_policy, decoder_network, 20, EPISODE_LENGTH)
    _, transitions, _ = jax.jit(rollout)(
        model["params"]["latent_policy"], model["obs_stats"], model["decoder"], init_rollout(8), jax.random.key(2)
    )
    obs, latent, action = transitions.obs, transitions.latent, transitions.action

    mean, std = latent_distribution(module, latent_policy, model, obs)
    standardised = np.asarray((latent - mean) / std)
    assert 0.8 < standardised.std() < 1.2 and abs(standardised.mean()) < 0.2, "the latent is not a draw of the encoder"
    np.testing.assert_allclose(transitions.log_prob, module.gaussian_log_prob(latent, mean, std), rtol=1e-5, atol=1e-5)
    decoded = module.decode(decoder_network, model["decoder"], obs, latent)
    np.testing.assert_allclose(action, decoded, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(action - latent))) > 0.1  # the decoder is not the identity, so the test can tell
    # Within an episode, the next observation shows the env's action: the position moved by 0.1 x tanh(action).
    within = np.asarray(transitions.truncation[:-1] == 0)
    moved = np.asarray(obs[1:, :, 1:3] - obs[:-1, :, 1:3])[within]
    np.testing.assert_allclose(moved, 0.1 * np.tanh(np.asarray(action[:-1]))[within], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_gorl_deterministic_policy_is_the_mean_latent_through_the_decoder(module):
    """The evaluation's first episode, step by step: in deterministic mode the point moves by 0.1 x tanh of the
    decoder's action for the encoder's mean latent in every step; in stochastic mode it does not (a sampled latent)."""
    env = ToyEnv()
    (latent_policy, _, decoder_network), model = acting_gorl_model(module, env, jax.random.key(0))
    evaluate = jax.jit(module.make_evaluate(env, latent_policy, decoder_network, 4, EPISODE_LENGTH))
    for deterministic in (True, False):
        _, (qpos, _, _) = evaluate(model, jax.random.key(2), deterministic)  # qpos (T + 1, 3) of the first episode
        obs = jnp.concatenate([qpos, jnp.ones((qpos.shape[0], 1))], axis=-1)[:-1]  # the toy env's observations
        mean, _ = latent_distribution(module, latent_policy, model, obs)
        mean_action = jnp.tanh(module.decode(decoder_network, model["decoder"], obs, mean))
        moved = np.asarray(qpos[1:, 1:] - qpos[:-1, 1:])
        if deterministic:
            np.testing.assert_allclose(moved, 0.1 * np.asarray(mean_action), rtol=1e-4, atol=1e-6)
        else:
            assert np.max(np.abs(moved - 0.1 * np.asarray(mean_action))) > 1e-3


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_each_sequence_bootstraps_from_the_observation_after_its_last_step(module):
    """One env's rollout of 4 steps cut into two 2-step sequences: the update's value loss (its one minibatch, before
    the gradient step) is that of TD(lambda) targets over the scaled rewards (x10) in which the first sequence
    bootstraps from the value of the rollout's third observation and the second from the observation after the
    rollout, each computed with the current critic."""
    args = toy_args(module, num_envs=1, batch_size=2, unroll_length=2)
    model, (policy, critic, *_), extra, [(transitions, _)], carry = toy_rollouts(module, args, 1)
    optimizer = optax.adam(1e-3)
    update = jax.jit(module.make_update(policy, critic, optimizer, args))
    _, _, metrics = update(
        model["params"], optimizer.init(model["params"]), model["obs_stats"], *extra[1:], transitions,
        carry.env_state.obs, jax.random.key(2),
    )  # fmt: skip

    def value(obs):
        return np.asarray(critic.apply(model["params"]["critic"], module.normalize(model["obs_stats"], obs))[..., 0])

    values = value(transitions.obs[:, 0])  # (4,)
    bootstrap = value(np.stack([transitions.obs[2, 0], carry.env_state.obs[0]]))
    rewards = 10.0 * np.asarray(transitions.reward[:, 0]).reshape(2, 2).T  # (U, sequences)
    no_ends = np.zeros((2, 2))
    targets, _ = lambda_return_reference(
        rewards, values.reshape(2, 2).T, bootstrap, no_ends, no_ends, args.gamma, args.gae_lambda
    )
    expected = np.mean((targets - values.reshape(2, 2).T) ** 2)
    np.testing.assert_allclose(float(metrics["value_loss"]), expected, rtol=1e-5)


def gradient_recorder(num_steps):
    """An optax 'optimiser' that leaves the parameters where they are and records, at every step, the gradient of the
    critic's output bias: with the parameters fixed, a function of the minibatch alone."""

    def init(params):
        return jnp.zeros((), jnp.int32), jnp.zeros(num_steps)

    def update(grads, state, params=None):
        count, record = state
        layers = grads["critic"]["params"]
        bias = layers[max(layers, key=lambda layer: int(layer.split("_")[1]))]["bias"][0]
        return jax.tree.map(jnp.zeros_like, grads), (count + 1, record.at[count].set(bias))

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_every_epoch_passes_over_every_sequence_in_a_new_order(module):
    """Three epochs over 2 envs x 8 steps cut into 8 two-step sequences, minibatches of one sequence: each epoch's
    minibatches are the same 8 sequences (what the critic's gradient says about each), in an order of its own."""
    args = toy_args(module, num_envs=2, batch_size=1, unroll_length=2, num_minibatches=8, update_epochs=3)
    model, (policy, critic, *_), extra, [(transitions, _)], carry = toy_rollouts(module, args, 1)
    optimizer = gradient_recorder(3 * 8)
    update = jax.jit(module.make_update(policy, critic, optimizer, args))
    _, (_, record), _ = update(
        model["params"], optimizer.init(model["params"]), model["obs_stats"], *extra[1:], transitions,
        carry.env_state.obs, jax.random.key(2),
    )  # fmt: skip
    by_epoch = np.asarray(record).reshape(3, 8)
    assert len(np.unique(by_epoch[0])) == 8, "the sequences' gradients should tell them apart"
    for epoch in by_epoch[1:]:
        np.testing.assert_allclose(np.sort(epoch), np.sort(by_epoch[0]), rtol=1e-6)
    assert not np.array_equal(by_epoch[1], by_epoch[0]) and not np.array_equal(by_epoch[2], by_epoch[1])


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_training_iteration_is_one_program_that_updates_its_state_in_place(module, tmp_path, signal_handlers):
    """The run compiles the whole iteration (rollout, advantages, every epoch and minibatch) as one program, whose
    training state is donated: calling it consumes the state's buffers, which the new state reuses."""
    args = toy_args(module, num_envs=2, batch_size=2, unroll_length=5, run_dir=str(tmp_path), num_eval_envs=2)
    env = ToyEnv()
    (policy, critic, *_), model, (init_rollout, rollout), evaluate, extra = parts(module, env, args, jax.random.key(0))
    optimizer = optax.adam(1e-3)
    train_iteration = module.make_train_iteration(rollout, module.make_update(policy, critic, optimizer, args))
    state = jax.device_put(
        module.TrainState(
            model["params"], optimizer.init(model["params"]), model["obs_stats"], init_rollout(2), jax.random.key(1)
        )
    )
    run = module.Run(args, env, None, 0, None)
    run.start_evaluations(evaluate, model, jax.random.key(2))
    program = run.compile_training(train_iteration, state, *extra)
    run.writer.close()
    assert isinstance(program, jax.stages.Compiled)
    new_state, metrics = program(state, *extra)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state)), "the training state was copied, not donated"
    assert np.isfinite(float(metrics["loss"])) and float(new_state.obs_stats.count) == 10


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation and the loop of main


def positions_and_moves(episode):
    """The toy env's observations (T, 4) along the first evaluated episode (qpos (T + 1, 3) from its start) and the
    env actions it received (tanh of the pre-tanh action: the point moves by a tenth of it)."""
    qpos = np.asarray(episode[0])
    obs = np.concatenate([qpos, np.ones((qpos.shape[0], 1))], axis=-1)[:-1]
    return qpos, obs, (qpos[1:, 1:] - qpos[:-1, 1:]) / 0.1


class StillToyEnv(ToyEnv):
    """The toy env whose point stays where it started: an episode's return, -EPISODE_LENGTH x its squared distance
    from the origin, tells its start state."""

    def step(self, state, action):
        return super().step(state, 0.0 * action)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_evaluation_sums_the_raw_rewards_of_whole_fresh_episodes(module):
    """In both modes, 5 episodes of EPISODE_LENGTH steps from 5 different start states (the still toy env's returns
    differ), never reset on the way (the step counter runs 0..7), each return the sum of the env's raw rewards (the
    first episode's, from its positions)."""
    args = module.Args(env_id="CartpoleSwingup", num_eval_envs=5)
    module.check_args(args)
    _, model, _, evaluate, _ = parts(module, StillToyEnv(), args, jax.random.key(0))
    evaluate = jax.jit(evaluate)
    for deterministic in (True, False):
        returns, episode = evaluate(model, jax.random.key(1), deterministic)
        qpos, _, _ = positions_and_moves(episode)
        np.testing.assert_array_equal(qpos[:, 0], np.arange(EPISODE_LENGTH + 1))
        assert returns.shape == (5,) and len(np.unique(np.asarray(returns))) == 5
        np.testing.assert_allclose(returns[0], -np.sum(qpos[1:, 1:] ** 2), rtol=1e-5)


def mode_action(module, networks, model, obs):
    """The pre-tanh action of the deterministic policy: the Gaussian's mean (PPO), the flow from zero noise (FPO)."""
    policy, params, obs = networks[0], model["params"]["policy"], module.normalize(model["obs_stats"], obs)
    if module is ppo_continuous:
        return module.policy_distribution(policy.apply(params, obs))[0]
    return fpo.flow_action(policy, params, obs, jnp.zeros((obs.shape[0], policy.output_size)))


@pytest.mark.parametrize("module", (ppo_continuous, fpo, dppo), ids=lambda m: m.ALGO)
def test_deterministic_evaluation_acts_with_the_policys_mode(module):
    """The evaluation's first episode, step by step, with parameters moved off their start (actions away from 0) and
    observation statistics of data: in deterministic mode the env receives tanh of the policy's mode in every step
    (PPO: the Gaussian's mean; FPO: the flow from zero noise); in stochastic mode it does not. DPPO's two modes both
    draw noise (test_dppo.py checks its deterministic chain): they act differently on the same start state."""
    args = module.Args(env_id="CartpoleSwingup", num_eval_envs=2)
    module.check_args(args)
    env = ToyEnv()
    networks, model, _, evaluate, _ = parts(module, env, args, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(3), 100))
    model["params"] = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), model["params"])
    model["obs_stats"] = module.update_running_stats(
        model["obs_stats"], 2.0 + 3.0 * jax.random.normal(jax.random.key(1), (50, env.observation_size))
    )
    evaluate = jax.jit(evaluate)
    moves = {}
    for deterministic in (True, False):
        qpos, obs, moves[deterministic] = positions_and_moves(evaluate(model, jax.random.key(2), deterministic)[1])
        if module is not dppo:
            expected = np.tanh(np.asarray(mode_action(module, networks, model, obs)))
            if deterministic:
                np.testing.assert_allclose(moves[deterministic], expected, rtol=1e-3, atol=1e-4)
            else:
                assert np.max(np.abs(moves[deterministic] - expected)) > 1e-2
    assert np.max(np.abs(moves[True] - moves[False])) > 1e-2


@pytest.mark.parametrize("module", (ppo_continuous, fpo, dppo), ids=lambda m: m.ALGO)
def test_main_evaluates_at_the_start_at_every_crossed_interval_and_at_the_end(
    module, tmp_path, monkeypatch, signal_handlers
):
    """The script's own main on the toy env, 6 iterations of 10 env steps with --eval-interval 25: it evaluates at step
    0, in the iterations that cross 25 and 50, and after the last (60), and checkpoints before the first iteration and
    at every evaluation."""
    args = module.Args(
        env_id="CartpoleSwingup", num_envs=2, num_minibatches=1, batch_size=2, unroll_length=5, update_epochs=1,
        num_eval_envs=2, total_timesteps=60, eval_interval=25, run_dir=str(tmp_path),
    )  # fmt: skip
    checkpoint_steps = []
    checkpoint = module.Run.checkpoint

    def recorded_checkpoint(run, tree, **progress):
        checkpoint_steps.append(run.env_steps)
        checkpoint(run, tree, **progress)

    monkeypatch.setattr(module, "make_env", lambda env_id, impl: (ToyEnv(), EPISODE_LENGTH))
    monkeypatch.setattr(module.Run, "checkpoint", recorded_checkpoint)
    module.main(args)
    (run_path,) = tmp_path.iterdir()
    with open(run_path / "eval.csv") as f:
        assert [int(line.split(",")[0]) for line in f.read().splitlines()[1:]] == [0, 30, 50, 60]
    assert checkpoint_steps == [0, 30, 50, 60]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.ALGO)
def test_every_script_defaults_to_the_papers_batches_and_evaluation(module):
    """What every script shares by default: 16 epochs x 32 minibatches of 1024 sequences of 30 steps per 2048-env x
    480-step rollout, rewards scaled by 10 in the losses, lambda 0.95, and 128 evaluation episodes every 6M env steps,
    headlined in the mode the paper's numbers were made in (PPO and GoRL deterministic, FPO and DPPO stochastic)."""
    args = module.Args()
    module.check_args(args)
    sizes = (args.update_epochs, args.num_minibatches, args.batch_size, args.unroll_length)
    assert sizes + (args.num_envs, args.rollout_length) == (16, 32, 1024, 30, 2048, 480)
    assert (args.reward_scaling, args.gae_lambda) == (10.0, 0.95)
    assert (args.num_eval_envs, args.eval_interval) == (128, 6_000_000)
    paper_mode = "stochastic" if module in (fpo, dppo) else "deterministic"
    assert module.EVAL_MODES[0] == paper_mode and set(module.EVAL_MODES) == {"deterministic", "stochastic"}
