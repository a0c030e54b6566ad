"""Every script's update, run on hand-made batches: the surrogate pushes each action the way its advantage says, GoRL's
stage settings reach the update, and a rollout's stored likelihoods (or losses) give ratios of exactly 1 in the first
minibatch of the update that follows it.

The batches hold two samples taken in one state, one rewarded and one not. Every step terminates, so the advantage is
reward - value, and after normalisation the rewarded sample's is +1, the other's -1."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dppo
import fpo
import gorl_ppo_diffusion
import gorl_ppo_fm
import ppo_continuous

OBS_SIZE, ACTION_SIZE = 5, 3
GORL = (gorl_ppo_fm, gorl_ppo_diffusion)


def tiny_args(module, **overrides):
    """One minibatch of two one-step sequences, one epoch: a single gradient step."""
    args = module.Args(
        env_id="CartpoleSwingup", num_envs=2, num_minibatches=1, batch_size=2, unroll_length=1, update_epochs=1
    )
    args.gamma = 0.99
    for name, value in overrides.items():
        setattr(args, name, value)
    module.check_args(args)
    return args


def two_sample_batch(module, params, networks, key):
    """Transitions (T=1, B=2) of two samples taken in one state, the rewarded one first, and `likelihoods(params)`:
    what the script's ratio compares for each sample (Gaussian log-likelihoods; for FPO minus the mean flow-matching
    loss over the stored pairs; for DPPO the chain's summed step log-likelihoods)."""
    policy = networks[0]
    obs = jnp.broadcast_to(jax.random.normal(key, (OBS_SIZE,)), (1, 2, OBS_SIZE))
    reward, termination, truncation = jnp.array([[1.0, 0.0]]), jnp.ones((1, 2)), jnp.zeros((1, 2))
    if module is fpo:
        actions = jnp.array([[[0.5] * ACTION_SIZE, [-0.5] * ACTION_SIZE]])
        noise, t = fpo.sample_pairs(jax.random.fold_in(key, 1), (1, 1, ACTION_SIZE), True)
        noise, t = (jnp.broadcast_to(x, (1, 2) + x.shape[2:]) for x in (noise, t))  # the same pairs for both
        cfm_loss = fpo.cfm_losses(policy, params["policy"], obs, actions, noise, t)
        transitions = fpo.Transition(obs, actions, noise, t, cfm_loss, reward, termination, truncation)

        def likelihoods(params):
            return -jnp.mean(fpo.cfm_losses(policy, params["policy"], obs, actions, noise, t), axis=-1)[0]

    elif module is dppo:
        chain = dppo.sample_chain(policy, params["policy"], obs, jax.random.fold_in(key, 1), False)
        log_prob = dppo.chain_log_probs(policy, params["policy"], obs, chain)
        transitions = dppo.Transition(obs, chain, log_prob, reward, termination, truncation)

        def likelihoods(params):
            return jnp.sum(dppo.chain_log_probs(policy, params["policy"], obs, chain), axis=-1)[0]

    else:  # PPO's actions, GoRL's latents
        name = "policy" if module is ppo_continuous else "latent_policy"
        mean, std = module.policy_distribution(policy.apply(params[name], obs))
        # One std to either side of the mean: the std's gradients cancel, so only the mean can tell them apart.
        sample = mean + jnp.array([1.0, -1.0])[None, :, None] * std
        log_prob = module.gaussian_log_prob(sample, mean, std)
        if module is ppo_continuous:
            transitions = module.Transition(obs, sample, log_prob, reward, termination, truncation)
        else:  # an action the decoder made of the latent, not the latent itself: the update must read the latent
            action = 2.0 * sample + 1.0
            transitions = module.Transition(obs, sample, log_prob, action, reward, termination, truncation)

        def likelihoods(params):
            mean, std = module.policy_distribution(policy.apply(params[name], obs))
            return module.gaussian_log_prob(sample, mean, std)[0]

    return transitions, likelihoods, module.init_running_stats(OBS_SIZE)


@functools.cache
def networks_and_params(module, seed, obs_size=OBS_SIZE, action_size=ACTION_SIZE):
    """The script's own networks, from its make_networks: (policy, critic) or GoRL's (latent policy, critic, decoder
    network), and their initial parameters."""
    return module.make_networks(
        SimpleNamespace(observation_size=obs_size, action_size=action_size), jax.random.key(seed)
    )


# (script, its arguments, its networks) -> (optimizer, its update compiled once for all the tests that share them)
UPDATES = {}


def one_update(module, args, networks, params, transitions, stats, settings=None):
    key = (module.ALGO, repr(args), repr(networks))
    if key not in UPDATES:
        optimizer = optax.adam(1e-3)
        UPDATES[key] = optimizer, jax.jit(module.make_update(networks[0], networks[1], optimizer, args))
    optimizer, update = UPDATES[key]
    extra = () if settings is None else (settings,)
    return update(params, optimizer.init(params), stats, *extra, transitions, transitions.obs[-1], jax.random.key(7))


CASES = [
    (ppo_continuous, {"ent_coef": 0.0}),
    (gorl_ppo_fm, {"ent_coef": 0.0}),
    (gorl_ppo_diffusion, {"ent_coef": 0.0}),
    (fpo, {}),
    (fpo, {"ratio": "per_action"}),
    (dppo, {}),
]


@pytest.mark.parametrize("module, overrides", CASES, ids=lambda c: getattr(c, "ALGO", None) or str(c))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_makes_the_advantaged_action_more_likely_and_the_other_less(module, overrides, seed):
    args = tiny_args(module, **overrides)
    networks, params = networks_and_params(module, seed)
    transitions, likelihoods, stats = two_sample_batch(module, params, networks, jax.random.key(100 + seed))
    settings = module.stage_settings(args, 1) if module in GORL else None
    new_params, _, _ = one_update(module, args, networks, params, transitions, stats, settings)
    before, after = np.asarray(likelihoods(params)), np.asarray(likelihoods(new_params))
    print(f"{module.ALGO} {overrides}: {before} -> {after}")
    assert after[0] > before[0], "the action with a positive advantage became less likely"
    assert after[1] < before[1], "the action with a negative advantage became more likely"


@pytest.mark.parametrize("module", GORL)
def test_gorl_update_applies_the_stage_settings(module):
    """The same batch, whose rewarded latent has a ratio of 1.2: stage 0's clip (0.15) cuts it, stage 1's (0.3) does
    not; and the loss carries the stage's latent regulariser coefficient (5e-4 in stage 0, 1e-3 later)."""
    args = tiny_args(module)
    networks, params = networks_and_params(module, 0)
    transitions, _, stats = two_sample_batch(module, params, networks, jax.random.key(1))
    transitions = transitions._replace(log_prob=transitions.log_prob - jnp.log(jnp.array([[1.2, 1.0]])))
    for stage, clipped, coef in ((0, 0.5, 5e-4), (1, 0.0, 1e-3), (3, 0.0, 1e-3)):
        settings = module.stage_settings(args, stage)
        _, _, metrics = one_update(module, args, networks, params, transitions, stats, settings)
        assert float(metrics["clipfrac"]) == clipped
        unregularised = (
            metrics["policy_loss"] + args.vf_coef * metrics["value_loss"] - args.ent_coef * metrics["entropy"]
        )
        np.testing.assert_allclose(metrics["loss"] - unregularised, coef * metrics["latent_reg"], rtol=1e-2)


@pytest.mark.parametrize("module", GORL)
def test_gorl_update_clips_the_gradient_norm_at_the_stages_setting(module):
    """With plain gradient descent at rate 1 in place of Adam (whose first step would hide a uniform scaling), one
    update moves the parameters by exactly the gradient clipped to the stage's norm: 0.5 in stage 0, 1.0 later."""
    args = tiny_args(module)
    networks, params = networks_and_params(module, 0)
    transitions, _, stats = two_sample_batch(module, params, networks, jax.random.key(1))
    optimizer = optax.sgd(1.0)
    update = jax.jit(module.make_update(networks[0], networks[1], optimizer, args))
    for stage, max_grad_norm in ((0, 0.5), (1, 1.0)):
        settings = module.stage_settings(args, stage)
        new_params, _, metrics = update(
            params, optimizer.init(params), stats, settings, transitions, transitions.obs[-1], jax.random.key(7)
        )
        step = optax.global_norm(jax.tree.map(jnp.subtract, new_params, params))
        assert float(metrics["grad_norm"]) > 2.0  # the gradient before the clip, above both
        assert float(step) == pytest.approx(max_grad_norm, rel=1e-4)


def test_ballincup_runs_stage_zero_without_the_latent_regulariser():
    for module in GORL:
        assert tiny_args(module, env_id="BallInCup").latent_reg_coef == (0.0, 1e-3)
        assert tiny_args(module).latent_reg_coef == (5e-4, 1e-3)
        assert float(module.stage_settings(tiny_args(module, env_id="BallInCup"), 0).latent_reg_coef) == 0.0


@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_gorl_defaults_follow_the_authors_code(module):
    """The defaults are the configuration behind the paper's Table 1 (the authors' code): per stage, the encoder's
    settings and budget; the latent regulariser; the decoder's data, network, schedule and fit."""
    args = module.Args()
    module.check_args(args)
    assert args.stage_timesteps == (60_000_000, 60_000_000, 30_000_000, 30_000_000)
    assert args.stage_iterations == (61, 61, 30, 30)
    assert (args.learning_rate, args.clip_eps, args.max_grad_norm) == (1e-3, (0.15, 0.3), (0.5, 1.0))
    assert (args.latent_reg, args.latent_reg_coef, args.ent_coef) == ("l2", (5e-4, 1e-3), 0.01)
    assert args.decoder_data_policy == "best"
    assert (args.decoder_dataset_size, args.collection_rollouts) == (10_000_000, 11)
    assert module.held_out_size(args.decoder_dataset_size) == 1_000_000
    assert (args.decoder_batch_size, args.decoder_epochs, args.decoder_patience) == (8192, 50, 20)
    assert (args.decoder_learning_rate, module.NUM_NOISE_PAIRS) == (3e-4, 8)
    # 10 Euler steps of the flow; 10 levels of the cosine schedule
    assert (module.NUM_FLOW_STEPS if module is gorl_ppo_fm else module.NUM_DIFFUSION_LEVELS) == 10
    (latent_policy, critic, decoder_network), _ = networks_and_params(module, 0)
    assert latent_policy.layer_sizes == (32,) * 4 + (2 * ACTION_SIZE,) and critic.layer_sizes == (256,) * 5 + (1,)
    assert decoder_network.hidden_sizes == (64,) * 4 and module.NUM_HISTOGRAM_ACTIONS == 10_000


# ---------------------------------------------------------------------------------------------------------------------
# Every term of every loss: its formula, its sign and its coefficient


def with_ratios(module, transitions, ratios):
    """The batch with its stored likelihoods moved so that the update's first minibatch sees `ratios`: per sample, per
    denoising step for DPPO, per (noise, time) pair for FPO (whose ratio is exp(loss_old - loss_new))."""
    if module is fpo:
        return transitions._replace(cfm_loss=transitions.cfm_loss + jnp.log(ratios))
    return transitions._replace(log_prob=transitions.log_prob - jnp.log(ratios))


RATIOS = np.array([1.3, 0.95])  # the rewarded sample's (advantage +1) and the other's (advantage -1)
SURROGATE_CASES = [
    (ppo_continuous, {}),
    (gorl_ppo_fm, {}),
    (gorl_ppo_diffusion, {}),
    (fpo, {}),
    (fpo, {"ratio": "per_action"}),
    (dppo, {"denoising_gamma": 0.5}),
]


@pytest.mark.parametrize("module, overrides", SURROGATE_CASES, ids=lambda c: getattr(c, "ALGO", None) or str(c))
def test_surrogate_is_the_clipped_objective_of_the_paper(module, overrides):
    """The policy loss of a batch whose ratios are set by hand, against PPO's clipped surrogate written out in numpy,
    -mean(min(r A, clip(r, 1 - eps, 1 + eps) A)): with the stage's clip for GoRL, one ratio per (noise, time) pair for
    FPO (or per action, from the pairs' mean log-ratio), and for DPPO one per denoising step, the step that makes the
    action weighted 1 and each earlier one denoising_gamma times less."""
    args = tiny_args(module, **overrides)
    networks, params = networks_and_params(module, 0)
    transitions, _, stats = two_sample_batch(module, params, networks, jax.random.key(1))
    per_step = {fpo: fpo.NUM_NOISE_PAIRS, dppo: dppo.NUM_DENOISING_STEPS}.get(module)
    if per_step:  # from 1 outward, across the clip: 1.01 to 1.2 for the rewarded sample, 0.99 to 0.8 for the other
        ratios = 1.0 + np.array([0.2, -0.2])[:, None] * (1 + np.arange(per_step)) / per_step
    else:
        ratios = RATIOS
    if module is fpo and args.ratio == "per_action":  # one ratio per action: its pairs' mean log-ratio
        ratios = np.broadcast_to(RATIOS[:, None], (2, per_step))
    settings = module.stage_settings(args, 1) if module in GORL else None
    transitions = with_ratios(module, transitions, jnp.asarray(ratios[None], jnp.float32))
    _, _, metrics = one_update(module, args, networks, params, transitions, stats, settings)

    clip = float(settings.clip_eps) if settings else args.clip_eps
    advantages = np.array([1.0, -1.0]).reshape((2,) + (1,) * (ratios.ndim - 1))
    if module is dppo:  # the chain's last step (which makes the action) is its last entry
        advantages = advantages * args.denoising_gamma ** np.arange(per_step - 1, -1, -1)
    if module is fpo and args.ratio == "per_action":
        ratios = ratios[:, 0]
        advantages = advantages[:, 0]
    expected = -np.mean(np.minimum(ratios * advantages, np.clip(ratios, 1 - clip, 1 + clip) * advantages))
    np.testing.assert_allclose(float(metrics["policy_loss"]), expected, rtol=1e-4)


@pytest.mark.parametrize("module, overrides", SURROGATE_CASES, ids=lambda c: getattr(c, "ALGO", None) or str(c))
def test_a_truncated_step_is_left_out_of_the_losses(module, overrides):
    """The two-sample batch with a third sample cut by the time limit (rewarded 5): it has neither an advantage nor a
    value target error, and the other two are normalised among themselves, so with the ratios of RATIOS the policy
    loss and the value loss are 2/3 of the two-sample batch's (a mean over three samples, not two)."""
    networks, params = networks_and_params(module, 0)
    transitions, _, stats = two_sample_batch(module, params, networks, jax.random.key(1))
    ratios = RATIOS[None, :, None] if module in (fpo, dppo) else RATIOS[None]  # the same for each pair or step
    transitions = with_ratios(module, transitions, jnp.asarray(ratios, jnp.float32))
    truncated = jax.tree.map(lambda x: x[:, :1], transitions)._replace(
        reward=jnp.array([[5.0]]), termination=jnp.zeros((1, 1)), truncation=jnp.ones((1, 1))
    )
    with_truncated = jax.tree.map(lambda *x: jnp.concatenate(x, axis=1), transitions, truncated)
    losses = []
    for batch, size in ((transitions, 2), (with_truncated, 3)):
        args = tiny_args(module, num_envs=size, batch_size=size, **overrides)
        settings = module.stage_settings(args, 1) if module in GORL else None
        _, _, metrics = one_update(module, args, networks, params, batch, stats, settings)
        losses.append(np.array([metrics["policy_loss"], metrics["value_loss"]]))
    np.testing.assert_allclose(losses[1], 2 / 3 * losses[0], rtol=1e-5)
    assert np.all(np.abs(losses[0]) > 1e-3)


def test_fpo_clips_each_pairs_log_ratio_to_three():
    """FPO's per-pair ratio is exp of loss_old - loss_new clipped to +-3: a pair of the unrewarded sample (advantage
    -1) whose loss fell by 5 enters the surrogate's min unclipped by the surrogate's clip, so its ratio shows the
    log-ratio clip (e^3, not e^5); pairs of either sample at log-ratios +-5 and 0.5 are checked beside it."""
    args = tiny_args(fpo)
    networks, params = networks_and_params(fpo, 0)
    transitions, _, stats = two_sample_batch(fpo, params, networks, jax.random.key(1))
    log_ratios = np.zeros((2, fpo.NUM_NOISE_PAIRS), np.float32)
    log_ratios[:, :3] = [[5.0, -5.0, 0.5], [5.0, -5.0, 0.5]]
    transitions = with_ratios(fpo, transitions, jnp.exp(jnp.asarray(log_ratios))[None])
    _, _, metrics = one_update(fpo, args, networks, params, transitions, stats)
    ratios, advantages = np.exp(np.clip(log_ratios, -3.0, 3.0)), np.array([[1.0], [-1.0]])
    clipped = np.clip(ratios, 1 - args.clip_eps, 1 + args.clip_eps)
    expected = -np.mean(np.minimum(ratios * advantages, clipped * advantages))
    np.testing.assert_allclose(float(metrics["policy_loss"]), expected, rtol=1e-4)


def one_sample_update(module, overrides, params=None):
    """One update on the rewarded sample alone: its normalised advantage is 0, so the surrogate is 0 with no gradient
    and only the other terms move the networks. Returns the networks, the parameters before and after, the batch and
    the metrics."""
    args = tiny_args(module, num_envs=1, batch_size=1, **overrides)
    networks, initial = networks_and_params(module, 0)
    params = initial if params is None else params(initial)
    transitions, _, stats = two_sample_batch(module, params, networks, jax.random.key(1))
    transitions = jax.tree.map(lambda x: x[:, :1], transitions)
    settings = module.stage_settings(args, 1) if module in GORL else None
    new_params, _, metrics = one_update(module, args, networks, params, transitions, stats, settings)
    return networks, params, new_params, transitions, metrics


# The terms besides the surrogate and the value loss (FPO and DPPO have no others), turned off.
OTHER_TERMS_OFF = {
    ppo_continuous: {"ent_coef": 0.0},
    **{module: {"ent_coef": 0.0, "latent_reg_coef": (0.0, 0.0)} for module in GORL},
}


@pytest.mark.parametrize("module", [ppo_continuous, *GORL, fpo, dppo], ids=lambda m: m.ALGO)
def test_value_term_pulls_the_critic_toward_its_target(module):
    """With every other term off, the loss is vf_coef times the squared error to the value target (here the scaled
    reward of a terminating step), and one update moves the value toward that target."""
    overrides = {"vf_coef": 0.5, **OTHER_TERMS_OFF.get(module, {})}
    (_, critic, *_), params, new_params, batch, metrics = one_sample_update(module, overrides)
    obs = module.normalize(module.init_running_stats(OBS_SIZE), batch.obs)
    before, after = (float(critic.apply(p["critic"], obs)[0, 0, 0]) for p in (params, new_params))
    target = float(batch.reward[0, 0]) * 10.0  # --reward-scaling 10
    np.testing.assert_allclose(float(metrics["value_loss"]), (target - before) ** 2, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), 0.5 * float(metrics["value_loss"]), rtol=1e-6)
    assert abs(after - target) < abs(before - target), f"the value moved from {before} to {after}, away from {target}"


def policy_std(module, networks, params, obs):
    name = "policy" if module is ppo_continuous else "latent_policy"
    return module.policy_distribution(networks[0].apply(params[name], obs))


def output_bias(mean, std):
    """Parameters whose policy outputs (mean, std) in every state: the output layer's weights zeroed, its biases set."""

    def set_output(params):
        name = "policy" if "policy" in params else "latent_policy"
        layers = params[name]["params"]
        last = sorted(layers, key=lambda layer: int(layer.split("_")[1]))[-1]
        size = layers[last]["bias"].shape[0] // 2
        raw_std = np.log(np.expm1(std - 1e-3))  # policy_distribution: softplus(raw) + 1e-3
        bias = jnp.concatenate([jnp.full(size, mean), jnp.full(size, raw_std)]).astype(jnp.float32)
        output = {"kernel": jnp.zeros_like(layers[last]["kernel"]), "bias": bias}
        return {**params, name: {"params": {**layers, last: output}}}

    return set_output


@pytest.mark.parametrize("module", [ppo_continuous, *GORL], ids=lambda m: m.ALGO)
def test_entropy_bonus_widens_the_policy(module):
    """With every other term off, the loss is -ent_coef times the entropy (PPO's: of the tanh-squashed Gaussian), and
    one update widens the policy (a narrow one, std 0.1, where the Gaussian's entropy dominates the tanh correction)."""
    overrides = {**OTHER_TERMS_OFF[module], "vf_coef": 0.0, "ent_coef": 0.5}
    networks, params, new_params, batch, metrics = one_sample_update(module, overrides, output_bias(0.0, 0.1))
    obs = module.normalize(module.init_running_stats(OBS_SIZE), batch.obs)
    (_, before), (_, after) = (policy_std(module, networks, p, obs) for p in (params, new_params))
    np.testing.assert_allclose(float(metrics["loss"]), -0.5 * float(metrics["entropy"]), rtol=1e-6)
    if module in GORL:  # the latent Gaussian's entropy, in closed form
        expected = np.sum(0.5 * np.log(2 * np.pi * np.e * np.asarray(before) ** 2))
        np.testing.assert_allclose(float(metrics["entropy"]), expected, rtol=1e-5)
    assert float(jnp.sum(jnp.log(after))) > float(jnp.sum(jnp.log(before))), "the entropy bonus narrowed the policy"


def test_ppo_entropy_is_the_squashed_policys():
    """PPO's entropy term is the tanh-squashed Gaussian's: the Gaussian's entropy plus log |d tanh / dx| at a sample
    (Brax's PPO). At a mean of 3 and std 0.1 the tanh term, about -4.6 per dimension, outweighs the Gaussian's."""
    overrides = {**OTHER_TERMS_OFF[ppo_continuous], "vf_coef": 0.0, "ent_coef": 0.5}
    *_, metrics = one_sample_update(ppo_continuous, overrides, output_bias(3.0, 0.1))
    gaussian = ACTION_SIZE * 0.5 * np.log(2 * np.pi * np.e * 0.1**2)
    tanh_term = ACTION_SIZE * np.log(1.0 - np.tanh(3.0) ** 2)  # at the mean; a sample's spreads by about 0.35
    assert abs(float(metrics["entropy"]) - (gaussian + tanh_term)) < 1.0, float(metrics["entropy"])


@pytest.mark.parametrize("kind", ["l2", "kl"])
@pytest.mark.parametrize("module", GORL, ids=lambda m: m.ALGO)
def test_latent_regularizer_pulls_the_encoder_toward_the_prior(module, kind):
    """With every other term off, the loss is the stage's coefficient times the regulariser, and one update moves an
    encoder at N(0.5, 2^2) toward N(0, I): the regulariser, computed here in numpy, falls. The KL from the prior is
    logged with either regulariser."""
    overrides = {"vf_coef": 0.0, "ent_coef": 0.0, "latent_reg": kind, "latent_reg_coef": (0.0, 0.25)}
    networks, params, new_params, batch, metrics = one_sample_update(module, overrides, output_bias(0.5, 2.0))
    obs = module.normalize(module.init_running_stats(OBS_SIZE), batch.obs)

    def regularizer(params, kind=kind):
        mean, std = (np.asarray(x, np.float64) for x in policy_std(module, networks, params, obs))
        if kind == "kl":
            return np.mean(np.sum(0.5 * (mean**2 + std**2 - 1.0) - np.log(std), axis=-1))
        return np.mean(mean**2) + np.mean(std**2)

    np.testing.assert_allclose(float(metrics["latent_reg"]), regularizer(params), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["latent_kl"]), regularizer(params, "kl"), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), 0.25 * float(metrics["latent_reg"]), rtol=1e-6)
    assert regularizer(new_params) < regularizer(params), "the update pushed the encoder away from the prior"


# ---------------------------------------------------------------------------------------------------------------------
# A real rollout, then the update: its first ratios are exactly 1


@pytest.fixture(scope="module")
def env():
    return ppo_continuous.make_env("CartpoleSwingup", "jax")


@pytest.mark.slow
@pytest.mark.parametrize("module, overrides", CASES, ids=lambda c: getattr(c, "ALGO", None) or str(c))
def test_first_ratios_of_the_update_after_a_rollout_are_one(module, overrides, env):
    """The rollout stores what the loss recomputes (log-likelihoods, flow-matching losses) with the same observation
    statistics, so a single gradient step sees ratios of 1: no clipping, no KL."""
    env, episode_length = env
    args = tiny_args(module, unroll_length=4, **overrides)  # rollouts of 4 steps in 2 envs
    key = jax.random.key(3)
    obs_size, action_size = env.observation_size, env.action_size
    (policy, critic, *decoder_network), params = networks_and_params(module, 3, obs_size, action_size)
    # Statistics that are far from the identity, so a rollout normalising differently from the loss would show.
    stats = module.update_running_stats(
        module.init_running_stats(obs_size), 3.0 + 2.0 * jax.random.normal(key, (50, obs_size))
    )
    if module in GORL:
        decoder = module.identity_decoder(*decoder_network, key, obs_size, action_size)
        init, rollout = module.make_rollout(env, policy, *decoder_network, args.rollout_length, episode_length)
        policy_inputs = (params["latent_policy"], stats, decoder)
    elif module is fpo:
        init, rollout = fpo.make_rollout(env, policy, args.rollout_length, episode_length, args.ratio == "per_pair")
        policy_inputs = (params["policy"], stats)
    else:
        init, rollout = module.make_rollout(env, policy, args.rollout_length, episode_length)
        policy_inputs = (params["policy"], stats)
    carry = init(args.num_envs)
    carry, transitions, _ = jax.jit(rollout)(*policy_inputs, carry, key)
    settings = (module.stage_settings(args, 0),) if module in GORL else ()
    optimizer = optax.adam(1e-3)
    update = module.make_update(policy, critic, optimizer, args)
    _, _, metrics = jax.jit(update)(
        params, optimizer.init(params), stats, *settings, transitions, carry.env_state.obs, key
    )
    assert float(metrics["clipfrac"]) == 0.0
    assert abs(float(metrics["approx_kl"])) < 1e-7


@pytest.mark.slow
@pytest.mark.parametrize("module", GORL)
def test_decoder_data_pairs_each_pre_tanh_action_with_the_observation_it_was_taken_in(module, env):
    """Replaying the collected pairs reproduces the collection: from the states it starts in, each env is stepped with
    tanh(action) of the pair whose observation is its current one, and ends where the collection's carry ended."""
    env, episode_length = env
    key = jax.random.key(4)
    obs_size, action_size = env.observation_size, env.action_size
    (latent_policy, _, decoder_network), params = networks_and_params(module, 4, obs_size, action_size)
    decoder = module.identity_decoder(decoder_network, key, obs_size, action_size)
    init, rollout = module.make_rollout(env, latent_policy, decoder_network, 5, episode_length)
    rollout = jax.jit(rollout)
    stats = module.init_running_stats(obs_size)
    start = rollout(params["latent_policy"], stats, decoder, init(3), key)[0]  # begun
    args = SimpleNamespace(collection_rollouts=2, decoder_dataset_size=30)
    model = {"params": params, "obs_stats": stats, "decoder": decoder}
    (obs, actions), end = module.make_decoder_data_collector(rollout, args)(model, start, key)
    obs, actions = np.asarray(obs), np.asarray(actions)
    assert obs.shape == (30, obs_size) and actions.shape == (30, action_size)
    # The identity decoder passes the prior's N(0, I) latents through: pre-tanh actions leave [-1, 1].
    assert np.abs(actions).max() > 1.0
    step = jax.jit(jax.vmap(env.step))
    env_state = start.env_state
    for _ in range(10):
        nearest = np.argmin(np.abs(np.asarray(env_state.obs)[:, None] - obs[None]).sum(-1), axis=1)
        np.testing.assert_allclose(obs[nearest], env_state.obs, atol=1e-5)
        env_state = step(env_state, jnp.tanh(actions[nearest]))
    np.testing.assert_allclose(env_state.obs, end.env_state.obs, atol=1e-4)
