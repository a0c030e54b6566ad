"""GoRL's stage change, checked on what it computes (both GoRL scripts): the restarted encoder is exactly the N(0, I)
prior while the critic, the observation statistics and the envs carry over; the decoder's data goes on with the training
envs' episodes and keeps distinct pairs, its loss draws the prior's noise, and a fit returns its epoch with the lowest
held-out loss. Run whole, on a toy env: every stage begins at the prior and trains with its own settings, each stage
change fits the next decoder to the stage's best model and measures the warm start, each stage ends with the paper's
Figure-7 histogram, and the last stage fits no decoder."""

import json
import os
import signal
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tyro
from conftest import ToyEnv, acting_gorl_model
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
    returns has, measured again, the lowest of the held-out losses the fit reported, not its last epoch's, and
    standardises states with statistics of its training split alone (nine pairs in ten)."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3000, OBS_SIZE)).astype(np.float32)
    actions = (np.tanh(obs[:, :ACTION_SIZE]) + 0.3 * rng.normal(size=(3000, ACTION_SIZE))).astype(np.float32)
    args = module.Args(decoder_batch_size=256, decoder_epochs=30, decoder_patience=2, decoder_learning_rate=3e-2)
    network = module.ConditionalField((64,) * 4, ACTION_SIZE)
    reported = []
    decoder, fit = module.make_decoder_trainer(network, args)(
        jnp.asarray(obs), jnp.asarray(actions), jax.random.key(0), lambda *epoch: reported.append(epoch)
    )
    assert float(decoder.obs_stats.count) == 3000 - module.held_out_size(3000) == 2700
    losses = [validation_loss for _, _, validation_loss, _ in reported]
    best_epoch = 1 + int(np.argmin(losses))
    print(f"{module.ALGO}: held-out losses {np.round(losses, 4)}")
    assert fit["decoder_epochs"] == len(reported) == best_epoch + args.decoder_patience < args.decoder_epochs
    assert [improved for *_, improved in reported].count(True) >= 2
    assert fit["decoder_validation_loss"] == pytest.approx(min(losses), rel=1e-6)
    assert fit["decoder_validation_loss"] != pytest.approx(losses[-1], rel=1e-6)


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_decoder_data_continues_the_episodes_and_keeps_distinct_pairs(module):
    """The collection of 25 pairs on the toy env (2 envs, 5-step rollouts: 3 rollouts, 30 pairs) through a decoder that
    is not the identity: it goes on from the training envs' carry (5 steps into their 7-step episodes), time limit and
    auto-reset included; each pair is an observation and the pre-tanh action taken in it (the next observation of its
    episode shows the point moved by 0.1 x tanh of it); the 25 kept are distinct pairs of the 30 (no replacement)."""
    env = ToyEnv()
    args = module.Args(
        env_id="CartpoleSwingup", num_envs=2, num_minibatches=1, batch_size=2, unroll_length=5, update_epochs=1
    )
    args.decoder_dataset_size, args.decoder_batch_size = 25, 8
    module.check_args(args)
    assert args.collection_rollouts == 3  # enough rollouts for every pair asked for
    (latent_policy, _, decoder_network), model = acting_gorl_model(module, env, jax.random.key(0))
    init_rollout, rollout = module.make_rollout(env, latent_policy, decoder_network, args.rollout_length, 7)
    rollout = jax.jit(rollout)
    policy_inputs = (model["params"]["latent_policy"], model["obs_stats"], model["decoder"])
    carry = rollout(*policy_inputs, init_rollout(2), jax.random.key(1))[0]  # where training left the envs
    key = jax.random.key(2)
    (obs, actions), end = module.make_decoder_data_collector(rollout, args)(model, carry, key)
    every_pair = SimpleNamespace(collection_rollouts=3, decoder_dataset_size=30)  # the same rollouts, all kept
    (all_obs, all_actions), _ = module.make_decoder_data_collector(rollout, every_pair)(model, carry, key)
    obs, actions, all_obs, all_actions = (np.asarray(x) for x in (obs, actions, all_obs, all_actions))
    pairs, all_pairs = (np.concatenate(pair, axis=1) for pair in ((obs, actions), (all_obs, all_actions)))

    assert pairs.shape == (25, 6) and len(np.unique(pairs, axis=0)) == 25
    assert len(np.unique(all_pairs, axis=0)) == 30 and {tuple(p) for p in pairs} <= {tuple(p) for p in all_pairs}
    # The envs went on from the carry: their steps within the episode run 5, 6, 0, ..., 6, 0, ..., 5; then 6 at the end.
    for env_obs in np.asarray(carry.env_state.obs):
        assert any(np.array_equal(env_obs, o) for o in all_obs)
    np.testing.assert_array_equal(np.sort(all_obs[:, 0]), np.sort(np.tile((5 + np.arange(15)) % 7, 2)))
    np.testing.assert_array_equal(end.steps, 6)
    # Each action within an episode leads to a collected observation, but for the last step of each env.
    successors = np.concatenate(
        [all_obs[:, :1] + 1, all_obs[:, 1:3] + 0.1 * np.tanh(all_actions), all_obs[:, 3:]], axis=1
    )
    found = [np.min(np.abs(all_obs - successor).sum(-1)) < 1e-5 for successor in successors]
    within_episode = all_obs[:, 0] < 6
    assert np.sum(within_episode & ~np.array(found)) == 2
    assert np.max(np.abs(all_actions)) > 1.0  # pre-tanh: the decoder's action itself


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_decoder_loss_carries_prior_noise_at_the_times_its_sampler_visits(module, monkeypatch):
    """One epoch of a fit, its loss watched: each batch draws 8 (noise, time) pairs per (state, action) pair, the noise
    from the fixed N(0, I) prior, the times uniform in [0, 1) (flow matching) or the levels 1 to 9 that the DDIM chain
    steps from, never level 0 (where the noise is unlearnable)."""
    fm = module is gorl_ppo_fm
    loss_name = "flow_matching_loss" if fm else "diffusion_loss"
    loss, draws = getattr(module, loss_name), []

    def watched_loss(network, params, obs, actions, noise, t):
        jax.debug.callback(lambda *x: draws.append([np.asarray(y) for y in x]), noise, t)
        return loss(network, params, obs, actions, noise, t)

    monkeypatch.setattr(module, loss_name, watched_loss)
    rng = np.random.default_rng(0)
    obs, actions = rng.normal(size=(600, OBS_SIZE)), 0.1 * rng.normal(size=(600, ACTION_SIZE))
    args = module.Args(decoder_batch_size=128, decoder_epochs=1)
    train_decoder = module.make_decoder_trainer(module.ConditionalField((64,) * 4, ACTION_SIZE), args)
    train_decoder(jnp.asarray(obs, jnp.float32), jnp.asarray(actions, jnp.float32), jax.random.key(0), lambda *_: None)
    assert {noise.shape[:2] for noise, _ in draws} == {(8, 128), (8, 60)}  # 4 training batches, the held-out 60 pairs
    noise, t = (np.concatenate([x.reshape(-1) for x in xs]) for xs in zip(*draws))
    print(f"{module.ALGO}: noise mean {noise.mean():.4f} std {noise.std():.4f}; times {np.unique(t)[:10]}")
    assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1.0) < 0.03
    if fm:
        assert 0.0 <= t.min() < 0.01 and 0.99 < t.max() < 1.0 and abs(t.mean() - 0.5) < 0.02
    else:
        np.testing.assert_array_equal(np.unique(t), np.arange(1, 10))


# Three stages of 3, 3 and 2 iterations on the toy env, evaluated after every iteration (--eval-interval 10), with each
# evaluation's paper-mode return set by hand: stage 0's best is its step-0 evaluation, stage 1's best a tie between two
# (the later wins), neither the stage's last.
WATCHED_RUN = (
    "--env-id CartpoleSwingup --num-envs 2 --num-minibatches 1 --batch-size 2 --unroll-length 5 --update-epochs 1 "
    "--num-eval-envs 2 --eval-interval 10 --stage-timesteps 30 30 20 --decoder-dataset-size 20 --decoder-batch-size 8 "
    "--decoder-epochs 2"
)
SET_RETURNS = {0: 9.0, 10: 5.0, 20: 6.0, 30: 4.0, 40: 3.0, 50: 3.0, 60: 1.0, 70: 0.0, 80: 0.0}  # env step: return
STAGE_ENDS, DISTILLED_STEPS = (30, 60, 80), (0, 50)


def on_host(tree):
    return jax.tree.map(np.array, tree)


def watch_main(module, arguments, run_dir, set_returns):
    """(summary.json, TensorBoard events, seen) of GoRL's own `main` run whole on the toy env with `arguments`, each
    evaluation's paper-mode return at an env step of `set_returns` set to its value there, and what main handed to its
    parts, copied to the host: `evaluated` {env step: model}, `collected` [(model, obs, actions)], `fitted` [(obs,
    actions, decoder)], `trained` [(env step before the iteration, decoder)], `settings` [(env step before the
    iteration, the stage settings it was given)], `warm_starts` [each stage change's evaluations: [(model, key data,
    deterministic, returns)]], `sampled` [(model, obs, actions)] of the Figure-7 histograms."""
    seen = {name: [] for name in ("collected", "fitted", "trained", "settings", "warm_starts", "sampled")}
    seen["evaluated"], in_stage_change = {}, []
    evaluate_in_both_modes, evaluate_compiled = module.Run.evaluate_in_both_modes, module.Run.evaluate_compiled
    compile_training, log_change = module.Run.compile_training, module.StageLog.log_change
    make_collector, make_trainer, make_sampler = (
        module.make_decoder_data_collector,
        module.make_decoder_trainer,
        module.make_action_sampler,
    )

    def watched_evaluate_in_both_modes(run, model):
        returns, episodes = evaluate_in_both_modes(run, model)
        seen["evaluated"][run.env_steps] = on_host(model)
        if run.env_steps in set_returns:
            returns = [np.full_like(returns[0], set_returns[run.env_steps]), returns[1]]
        return returns, episodes

    def watched_evaluate_compiled(run, model, key, deterministic):
        returns, episode = evaluate_compiled(run, model, key, deterministic)
        if in_stage_change:
            in_stage_change[-1].append((on_host(model), np.array(jax.random.key_data(key)), deterministic, returns))
        return returns, episode

    def watched_log_change(stages, *args):
        in_stage_change.append([])
        log_change(stages, *args)
        seen["warm_starts"].append(in_stage_change.pop())

    def watched_compile_training(run, *args):
        train_iteration = compile_training(run, *args)

        def watched(state, decoder, settings):
            seen["trained"].append((run.env_steps, on_host(decoder)))
            seen["settings"].append((run.env_steps, {name: float(value) for name, value in settings._asdict().items()}))
            return train_iteration(state, decoder, settings)

        return watched

    def watched_collector(*args):
        collect = make_collector(*args)

        def watched(model, carry, key):
            (obs, actions), carry = collect(model, carry, key)
            seen["collected"].append((on_host(model), np.array(obs), np.array(actions)))
            return (obs, actions), carry

        return watched

    def watched_trainer(*args):
        train_decoder = make_trainer(*args)

        def watched(obs, actions, key, report):
            decoder, fit = train_decoder(obs, actions, key, report)
            seen["fitted"].append((np.array(obs), np.array(actions), on_host(decoder)))
            return decoder, fit

        return watched

    def watched_sampler(*args):
        sample_actions = make_sampler(*args)

        def watched(model, obs, key):
            actions = sample_actions(model, obs, key)
            seen["sampled"].append((on_host(model), np.array(obs), np.array(actions)))
            return actions

        return watched

    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    args = tyro.cli(module.Args, args=[*arguments.split(), "--run-dir", str(run_dir), "--compilation-cache-dir", cache])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # main's Run installs its own
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "make_env", lambda env_id, impl: (ToyEnv(), 7))
        patch.setattr(module.Run, "evaluate_in_both_modes", watched_evaluate_in_both_modes)
        patch.setattr(module.Run, "evaluate_compiled", watched_evaluate_compiled)
        patch.setattr(module.Run, "compile_training", watched_compile_training)
        patch.setattr(module.StageLog, "log_change", watched_log_change)
        patch.setattr(module, "make_decoder_data_collector", watched_collector)
        patch.setattr(module, "make_decoder_trainer", watched_trainer)
        patch.setattr(module, "make_action_sampler", watched_sampler)
        module.main(args)
    for s, handler in handlers.items():
        signal.signal(s, handler)
    (run_path,) = run_dir.iterdir()
    events = EventAccumulator(str(run_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    with open(run_path / "summary.json") as f:
        summary = json.load(f)
    return summary, events, seen


@pytest.fixture(scope="module", params=GORL, ids=lambda m: m.ALGO)
def watched_run(request, tmp_path_factory):
    """(module, summary.json, TensorBoard events, seen) of WATCHED_RUN with the returns of SET_RETURNS (watch_main)."""
    module = request.param
    return module, *watch_main(module, WATCHED_RUN, tmp_path_factory.mktemp(module.ALGO), SET_RETURNS)


# Two stages of two iterations with one minibatch each, on the toy env; each stage with settings of its own (the clip,
# the gradient-norm clip and the latent regulariser's coefficient), and a learning rate high enough to carry stage 0's
# encoder well away from the prior.
TOY_RUN = (
    "--env-id CartpoleSwingup --num-envs 2 --num-minibatches 1 --batch-size 2 --unroll-length 5 --update-epochs 1 "
    "--num-eval-envs 2 --stage-timesteps 20 20 --decoder-dataset-size 20 --decoder-batch-size 8 --decoder-epochs 2 "
    "--learning-rate 0.05 --clip-eps 0.11 0.23 --max-grad-norm 0.7 0.9 --latent-reg-coef 0.002 0.004"
)
SETTINGS_BY_STAGE = [
    {"clip_eps": 0.11, "max_grad_norm": 0.7, "latent_reg_coef": 0.002},
    {"clip_eps": 0.23, "max_grad_norm": 0.9, "latent_reg_coef": 0.004},
]


@pytest.fixture(scope="module", params=GORL, ids=lambda m: m.ALGO)
def toy_run(request, tmp_path_factory):
    """(module, summary.json, TensorBoard events, seen) of TOY_RUN (watch_main)."""
    module = request.param
    return module, *watch_main(module, TOY_RUN, tmp_path_factory.mktemp(module.ALGO), {})


def test_each_stage_starts_from_the_prior(toy_run):
    """The first update of each stage measures the encoder's KL from the prior before its gradient step, so it is 0
    where the stage began at the prior, although the high learning rate carried stage 0's encoder well away from it."""
    module, _, events, _ = toy_run
    kl = {event.step: event.value for event in events.Scalars("losses/latent_kl")}
    print(f"{module.ALGO}: KL from the prior by env step {kl}")
    assert kl[10] < 1e-9 and kl[30] < 1e-9  # the first iteration of each stage
    assert kl[20] > 1e-4 and kl[40] > 1e-4


def test_each_stage_trains_with_its_own_settings(toy_run):
    """Every training iteration received its stage's settings, and the logs say so from what the iteration reports:
    the stage/* scalars (one per iteration) and the stage records in summary.json."""
    _, summary, events, seen = toy_run
    stage_of_step = {10: 0, 20: 0, 30: 1, 40: 1}  # env steps at the end of each iteration
    received = {steps + 10: settings for steps, settings in seen["settings"]}  # (env step before the iteration, ...)
    assert received == {step: pytest.approx(SETTINGS_BY_STAGE[stage]) for step, stage in stage_of_step.items()}
    for name in SETTINGS_BY_STAGE[0]:
        logged = {event.step: event.value for event in events.Scalars(f"stage/{name}")}
        assert logged == pytest.approx({step: SETTINGS_BY_STAGE[stage][name] for step, stage in stage_of_step.items()})
    for record, settings in zip(summary["stages"], SETTINGS_BY_STAGE, strict=True):
        assert {name: record[name] for name in settings} == pytest.approx(settings), record["stage"]


def test_stage_loop_collects_fits_restarts_then_trains(watched_run):
    """Algorithm 1 in main: at each stage change the data collected is the data the new decoder is fitted to, and the
    next stage's every iteration acts through that decoder (stage 0's: the identity it started with)."""
    _, _, _, seen = watched_run
    assert len(seen["collected"]) == len(seen["fitted"]) == 2
    for (_, obs, actions), (fit_obs, fit_actions, _) in zip(seen["collected"], seen["fitted"]):
        np.testing.assert_array_equal(fit_obs, obs)
        np.testing.assert_array_equal(fit_actions, actions)
    decoders = [seen["evaluated"][0]["decoder"]] + [decoder for *_, decoder in seen["fitted"]]
    assert [steps for steps, _ in seen["trained"]] == [0, 10, 20, 30, 40, 50, 60, 70]
    for steps, decoder in seen["trained"]:
        stage = sum(steps >= end for end in STAGE_ENDS)
        assert trees_equal(decoder, decoders[stage]), f"the iteration from env step {steps} of stage {stage}"
    assert not trees_equal(decoders[1], decoders[2])


def test_next_decoder_learns_from_the_stages_best_encoder(watched_run):
    """The model whose data the next decoder is fitted to is the stage's best by deterministic return, whole (its
    encoder, observation statistics and decoder, as evaluated): stage 0's evaluation at step 0, which no later one beat,
    and in stage 1 the later of two tied evaluations; the stage records say which."""
    _, summary, _, seen = watched_run
    for (model, _, _), steps in zip(seen["collected"], DISTILLED_STEPS, strict=True):
        assert trees_equal(model, seen["evaluated"][steps]), f"not the model evaluated at env step {steps}"
    assert not trees_equal(seen["evaluated"][50], seen["evaluated"][40])
    records = summary["stages"][1:]
    assert [(r["distilled_env_steps"], r["distilled_iteration"]) for r in records] == [(0, 0), (50, 2)]
    assert [r["distilled_eval_return"] for r in records] == [9.0, 3.0]


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
@pytest.mark.parametrize("policy, chosen", [("best", 2), ("final", 3)])
def test_candidate_is_the_best_evaluation_ties_to_the_later_or_with_final_the_last(module, policy, chosen):
    """StageLog.consider over four evaluations returning 5, 7, 7 and 6: --decoder-data-policy best keeps the third (a
    tie with the second, the later wins), final the fourth; the candidate is a copy of the model it was given."""
    stages = object.__new__(module.StageLog)  # consider needs only these of a StageLog
    stages.args, stages.run, stages.distilled = SimpleNamespace(decoder_data_policy=policy), SimpleNamespace(), None
    models = [{"params": jnp.full(3, float(iteration))} for iteration in range(4)]
    for iteration, (eval_return, model) in enumerate(zip([5.0, 7.0, 7.0, 6.0], models)):
        stages.run.env_steps = 10 * iteration
        stages.consider(iteration, eval_return, model)
    assert stages.distilled == {"iteration": chosen, "env_steps": 10 * chosen, "eval_return": [5, 7, 7, 6][chosen]}
    assert trees_equal(stages.candidate, models[chosen]) and stages.candidate["params"] is not models[chosen]["params"]


def test_restarted_encoder_has_new_hidden_layers_and_the_last_critic_and_statistics(watched_run):
    """The encoder each stage change restarts (the model of its warm-start evaluation) is the N(0, I) prior with hidden
    layers drawn for the stage (unlike stage 0's and the other restart's), beside the critic and the observation
    statistics of the finished stage's last model (not the distilled one's) and the new decoder."""
    _, _, _, seen = watched_run
    restarted = [calls[1][0] for calls in seen["warm_starts"]]
    initial_layers = seen["evaluated"][0]["params"]["latent_policy"]["params"]
    hidden_layers = []
    for model, finished, distilled, (*_, decoder) in zip(
        restarted, STAGE_ENDS[:-1], DISTILLED_STEPS, seen["fitted"], strict=True
    ):
        last_critic = seen["evaluated"][finished]["params"]["critic"]
        assert not trees_equal(seen["evaluated"][distilled]["params"]["critic"], last_critic)  # the test can tell
        layers = dict(model["params"]["latent_policy"]["params"])
        output = layers.pop("Dense_4")
        np.testing.assert_array_equal(output["kernel"], 0.0)
        np.testing.assert_array_equal(output["bias"], initial_layers["Dense_4"]["bias"])
        hidden_layers.append(layers)
        assert trees_equal(model["params"]["critic"], last_critic)
        assert trees_equal(model["obs_stats"], seen["evaluated"][finished]["obs_stats"])
        assert trees_equal(model["decoder"], decoder)
    initial_hidden = {name: layer for name, layer in initial_layers.items() if name != "Dense_4"}
    for a, b in ((hidden_layers[0], initial_hidden), (hidden_layers[1], initial_hidden), tuple(hidden_layers)):
        assert not np.array_equal(a["Dense_0"]["kernel"], b["Dense_0"]["kernel"])


def test_warm_start_is_measured_on_the_same_episodes_before_and_after(watched_run):
    """At each stage change, two stochastic evaluations on one key (the same episodes and noise): the distilled model,
    through its own decoder, then the restarted one through the new decoder; the stage record holds their returns."""
    _, summary, _, seen = watched_run
    changes = zip(seen["warm_starts"], seen["collected"], seen["fitted"], summary["stages"][1:], strict=True)
    for calls, (distilled, *_), (*_, decoder), record in changes:
        (before, key, deterministic, returns), (after, after_key, after_deterministic, after_returns) = calls
        assert not deterministic and not after_deterministic
        np.testing.assert_array_equal(key, after_key)
        assert trees_equal(before, distilled) and trees_equal(after["decoder"], decoder)
        assert record["stochastic_return_before"] == pytest.approx(float(np.mean(returns)))
        assert record["warm_start_return"] == pytest.approx(float(np.mean(after_returns)))


def test_each_stage_ends_with_the_figure_7_histogram(watched_run):
    """At each stage's end, 10,000 actions of the stage's final stochastic policy at one start state, the same every
    time; their projection on the first principal component is the histogram TensorBoard holds at that step."""
    _, _, events, seen = watched_run
    histograms = events.Histograms("stage/action_first_principal_component")
    assert [h.step for h in histograms] == list(STAGE_ENDS)
    assert len(seen["sampled"]) == len(STAGE_ENDS)
    for (model, obs, actions), end, histogram in zip(seen["sampled"], STAGE_ENDS, histograms):
        assert trees_equal(model, seen["evaluated"][end])
        np.testing.assert_array_equal(obs, seen["sampled"][0][1])
        assert obs[0] == 0  # the toy env's step within the episode: a start state
        assert actions.shape == (10_000, 2) and np.max(np.abs(actions)) <= 1.0  # the env's actions, after tanh
        centered = actions.astype(np.float64) - actions.mean(axis=0)
        singular_values = np.linalg.svd(centered, compute_uv=False)
        print(f"stage end {end}: singular values {singular_values}")
        assert singular_values[1] > 0.1  # a stochastic policy, whose actions spread in both dimensions
        value = histogram.histogram_value
        assert value.num == 10_000 and abs(value.sum) < 1e-2
        assert value.sum_squares == pytest.approx(singular_values[0] ** 2, rel=1e-3)


def test_final_stage_is_neither_collected_for_nor_fitted(watched_run):
    """Three stages, two stage changes: the last stage's end collects no data and fits no decoder, and the collection's
    env steps are counted apart from the x-axis."""
    _, summary, _, seen = watched_run
    assert len(seen["collected"]) == len(seen["fitted"]) == len(STAGE_ENDS) - 1
    assert summary["env_steps"] == STAGE_ENDS[-1]
    assert summary["collection_env_steps"] == 2 * 20  # 20 pairs: two rollouts of 2 envs x 5 steps per change


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_loaded_model_trains_as_stage_0(module, tmp_path):
    """--load-model of a model saved at env step 500 (an encoder off the prior, a decoder that is not the identity),
    then two stages: the model is evaluated at its step; stage 0 trains its encoder, not the prior (the first update's
    KL from the prior is not 0), through its own decoder with stage 0's settings; env steps count on from 500."""
    _, model = acting_gorl_model(module, ToyEnv(), jax.random.key(0))
    path = tmp_path / "model.msgpack"
    module.save_model(str(path), SimpleNamespace(env_id="CartpoleSwingup"), 500, model)
    arguments = WATCHED_RUN.replace("--stage-timesteps 30 30 20", "--stage-timesteps 20 20") + f" --load-model {path}"
    summary, events, seen = watch_main(module, arguments, tmp_path / "runs", {})
    assert trees_equal(seen["evaluated"][500], on_host(model))
    assert [steps for steps, _ in seen["trained"]] == [500, 510, 520, 530] and summary["env_steps"] == 540
    for _, decoder in seen["trained"][:2]:
        assert trees_equal(decoder, on_host(model["decoder"]))
    kl = {event.step: event.value for event in events.Scalars("losses/latent_kl")}
    clip = {event.step: event.value for event in events.Scalars("stage/clip_eps")}
    print(f"{module.ALGO}: KL from the prior {kl}, clip {clip}")
    assert kl[510] > 1e-3 and kl[530] < 1e-9  # stage 1 starts at the prior, stage 0 at the loaded encoder
    assert [clip[steps] for steps in (510, 520, 530, 540)] == pytest.approx([0.15, 0.15, 0.3, 0.3])
