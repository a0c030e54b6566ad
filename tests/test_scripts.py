"""Every algorithm script end to end, run as a user runs it: the output contract, the save/load round trip and the
programs compiled (on the learning run of conftest.py), the stop on a non-finite update, and the refusal of bad input:
one line, a nonzero exit, nothing compiled, nothing written or overwritten."""

import ast
import importlib
import json
import os
import re

import flax.serialization
import numpy as np
import pytest
import tyro
from conftest import (
    CPU_ARGS,
    EVAL_INTERVAL,
    ROOT,
    SCRIPTS,
    SCRIPTS_UNDER_TEST,
    N,
    only_run_folder,
    read_json,
    run_script,
)

SUMMARY_FIELDS = {
    "env_id",
    "algo",
    "seed",
    "env_steps",
    "final_eval_return",
    "final_eval_return_std",
    "best_eval_return",
    "eval_mode",
    "wall_time_s",
    "compile_time_s",
    "train_sps",
    "device",
    "peak_device_memory_bytes",
    "peak_resident_memory_bytes",
}
EVAL_STEPS = [i * EVAL_INTERVAL for i in range(6)]  # GoRL's stages end on evaluations too: 8, 12, 16, 20 iterations

pytestmark = pytest.mark.slow  # every test here runs a script


def events_of(run_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_path, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_contract(script, learning_runs):
    run_path, stdout = learning_runs(script)
    algo = script.removesuffix(".py")
    paper_mode, other_mode = importlib.import_module(algo).EVAL_MODES
    # The mode the paper's numbers were made in: PPO and GoRL deterministic, FPO and DPPO stochastic.
    assert paper_mode == (
        "deterministic" if algo in ("ppo_continuous", "gorl_ppo_fm", "gorl_ppo_diffusion") else "stochastic"
    )
    assert os.path.basename(run_path).startswith(f"CartpoleSwingup__{algo}__1__")
    config = read_json(os.path.join(run_path, "config.json"))
    assert config["env_id"] == "CartpoleSwingup" and config["impl"] == "jax" and config["gamma"] == 0.99
    assert set(importlib.import_module(algo).Args.__dataclass_fields__) <= set(config)
    assert {"jax", "jaxlib", "mujoco", "mujoco-mjx", "playground"} <= set(config["versions"]) and config["git_commit"]

    with open(os.path.join(run_path, "eval.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == f"env_steps,eval_return_mean,eval_return_std,{other_mode}_return_mean,{other_mode}_return_std"
    rows = [tuple(map(float, line.split(","))) for line in lines[1:]]
    assert [r[0] for r in rows] == EVAL_STEPS
    assert all(0.0 <= mean <= 1000.0 and std >= 0.0 for _, mean, std, _, _ in rows)
    assert all(0.0 <= mean <= 1000.0 and std >= 0.0 for _, _, _, mean, std in rows)

    summary = read_json(os.path.join(run_path, "summary.json"))
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["algo"] == algo and summary["seed"] == 1 and summary["env_steps"] == EVAL_STEPS[-1]
    assert summary["eval_mode"] == paper_mode
    assert summary[f"final_{other_mode}_eval_return"] == pytest.approx(rows[-1][3], abs=1e-3)
    assert summary[f"final_{other_mode}_eval_return_std"] == pytest.approx(rows[-1][4], abs=1e-3)
    assert summary["final_eval_return"] == pytest.approx(rows[-1][1], abs=1e-3)
    assert summary["final_eval_return_std"] == pytest.approx(rows[-1][2], abs=1e-3)
    assert summary["best_eval_return"] == pytest.approx(max(r[1] for r in rows), abs=1e-3)
    assert summary["train_sps"] > 0 and summary["compile_time_s"] > 0 and summary["wall_time_s"] > 0
    assert (summary["peak_device_memory_bytes"] is None) == (summary["device"] == "cpu")  # a GPU reports its own
    assert 2**28 < summary["peak_resident_memory_bytes"] < 2**35  # a JAX process on this machine: 0.25 to 32 GiB

    events = events_of(run_path)
    tags = set(events.Tags()["scalars"])
    assert {"eval/episodic_return", "charts/SPS", "charts/episodic_return", "losses/policy_loss"} <= tags
    assert {"losses/value_loss", "losses/approx_kl", "losses/clipfrac", "losses/grad_norm"} <= tags
    assert [e.step for e in events.Scalars("eval/episodic_return")] == EVAL_STEPS
    assert [e.value for e in events.Scalars("eval/episodic_return")] == pytest.approx([r[1] for r in rows], abs=1e-3)
    other = events.Scalars(f"eval/{other_mode}_episodic_return")
    assert [e.value for e in other] == pytest.approx([r[3] for r in rows], abs=1e-3)
    assert len(events.Scalars("charts/SPS")) == 20
    assert stdout.count("eval  step") == len(EVAL_STEPS)
    assert not [name for name in os.listdir(run_path) if name.endswith(".tmp")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_saved_model_reproduces_its_evaluation(script, learning_runs, tmp_path):
    run_path, _ = learning_runs(script)
    summary = read_json(os.path.join(run_path, "summary.json"))
    no_training, _ = SCRIPTS_UNDER_TEST[script]
    model = os.path.join(run_path, "model.msgpack")
    result = run_script(script, *CPU_ARGS, *no_training, "--load-model", model, "--run-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = read_json(os.path.join(only_run_folder(tmp_path), "summary.json"))
    # The model knows its env step, and an evaluation's episodes are those of its step: the run's last evaluation again.
    assert reloaded["env_steps"] == summary["env_steps"]
    for name in [name for name in summary if name.startswith("final_")]:  # both modes
        assert reloaded[name] == pytest.approx(summary[name], rel=1e-5, abs=1e-4), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_program_compiles_once(script, learning_runs):
    """Before its first iteration a script compiles its networks' initialisation, its evaluation and its training
    iteration, and no program that only resets the envs (the first training step resets them); across 20 iterations, 6
    evaluations and GoRL's 3 stage changes no program of the script compiles twice (JAX's compile log of the learning
    run: a cache hit is logged as a compilation too)."""
    _, log = learning_runs(script)
    with open(os.path.join(ROOT, script)) as f:
        defined = {node.name for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.FunctionDef)}
    compilation = re.compile(r"Finished XLA compilation of jit\((\w+)\)")
    before_training = [name for name in compilation.findall(log[: log.index("compiled in")]) if name in defined]
    assert sorted(before_training) == ["evaluate", "init", "train_iteration"]
    programs = [name for name in compilation.findall(log) if name in defined]
    assert sorted(programs) == sorted(set(programs)), programs


@pytest.mark.parametrize("script", [script for script in SCRIPTS if script.startswith("gorl")])
def test_gorl_logs_its_stages(script, learning_runs):
    run_path, stdout = learning_runs(script)
    summary = read_json(os.path.join(run_path, "summary.json"))
    stages = summary["stages"]
    assert [(s["stage"], s["env_steps"]) for s in stages] == [(0, 8 * N), (1, 12 * N), (2, 16 * N), (3, 20 * N)]
    collected = 3 * N  # 40,000 pairs take three 15,360-step rollouts
    assert [s["collection_env_steps"] for s in stages[1:]] == [collected] * 3
    assert summary["collection_env_steps"] == 3 * collected
    for stage in stages[1:]:
        assert (
            1 <= stage["decoder_epochs"] <= 15 and stage["transition_time_s"] > 0 and stage["decoder_pairs_per_s"] > 0
        )
        assert stage["final_eval_return"] >= 0 and np.isfinite(stage["decoder_validation_loss"])

    events = events_of(run_path)
    tags = set(events.Tags()["scalars"])
    assert {
        "stage/index",
        "stage/warm_start_return",
        "stage/stochastic_return_before",
        "stage/decoder_validation_loss",
        "stage/dataset_size",
        "stage/total_collection_env_steps",
        "decoder/train_loss",
        "decoder/validation_loss",
        "losses/latent_reg",
        "losses/latent_kl",
        "stage/distilled_iteration",
    } <= tags
    # Each stage's updates ran with that stage's settings (the paper's: clip 0.15, then 0.3; ...), as every training
    # iteration reports them, and each stage's record holds them.
    stage_starts = [0, 8 * N, 12 * N, 16 * N]
    for name, values in (("clip_eps", (0.15, 0.3)), ("max_grad_norm", (0.5, 1.0)), ("latent_reg_coef", (5e-4, 1e-3))):
        logged = events.Scalars(f"stage/{name}")
        assert [e.step for e in logged] == [i * N for i in range(1, 21)]
        assert [e.value for e in logged] == pytest.approx([values[0]] * 8 + [values[1]] * 12), name
        assert [s[name] for s in stages] == pytest.approx([values[0]] + [values[1]] * 3), name
    # The next decoder's data came from the stage's best encoder by deterministic evaluation (ties to the later).
    with open(os.path.join(run_path, "eval.csv")) as f:
        rows = [tuple(map(float, line.split(","))) for line in f.read().splitlines()[1:]]
    # Stage k's decoder is fitted to the best encoder of stage k - 1 by eval.csv (ties to the later evaluation); stage 0's
    # candidates include its step-0 evaluation.
    for previous_end, finished, stage in zip([-1] + [s["env_steps"] for s in stages], stages[:-1], stages[1:]):
        candidates = [row for row in rows if previous_end < row[0] <= finished["env_steps"]]
        best_steps, best_return = max(candidates, key=lambda row: (row[1], row[0]))[:2]
        start = max(previous_end, 0)
        assert stage["distilled_env_steps"] == best_steps and stage["distilled_iteration"] == (best_steps - start) // N
        assert stage["distilled_eval_return"] == pytest.approx(best_return, abs=1e-3)
    assert [e.step for e in events.Scalars("stage/warm_start_return")] == [8 * N, 12 * N, 16 * N]
    index = events.Scalars("stage/index")  # logged where each stage begins
    assert [(e.step, e.value) for e in index] == list(zip(stage_starts, [0, 1, 2, 3]))
    epochs = [e.step for e in events.Scalars("decoder/validation_loss")]
    assert epochs == [
        15 * fit + e for fit, stage in enumerate(stages[1:]) for e in range(1, stage["decoder_epochs"] + 1)
    ]
    histograms = events.Histograms("stage/action_first_principal_component")
    assert [h.step for h in histograms] == [8 * N, 12 * N, 16 * N, 20 * N]
    assert all(h.histogram_value.num == 10_000 for h in histograms)
    assert "decoder epoch   1/15" in stdout and stdout.count("warm start") == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_update_stops_and_keeps_what_was_written(script, learning_runs, tmp_path):
    """A policy whose parameters are blown up to 1e30 makes the first update non-finite: training stops with a message
    naming the iteration, and what was written before (logs, the model saved at the first evaluation) stays."""
    run_path, _ = learning_runs(script)
    with open(os.path.join(run_path, "model.msgpack"), "rb") as f:
        saved = flax.serialization.msgpack_restore(f.read())
    header = json.loads(saved["header"])
    saved["arrays"] = {k: x * np.float32(1e30) if k.startswith("['params']") else x for k, x in saved["arrays"].items()}
    blown_up = tmp_path / "blown_up.msgpack"
    blown_up.write_bytes(flax.serialization.msgpack_serialize(saved))
    budget = ("--stage-timesteps", 2 * N) if script.startswith("gorl") else ("--total-timesteps", 2 * N)
    run_dir = tmp_path / "runs"
    result = run_script(script, *CPU_ARGS, *budget, "--load-model", blown_up, "--save-model", "--run-dir", run_dir)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: non-finite loss or parameters at ") and "iteration 1 " in last_line
    failed_run = only_run_folder(run_dir)
    with open(os.path.join(failed_run, "eval.csv")) as f:
        # The loaded model's own evaluation, at the step it was saved at (a loaded model counts env steps on).
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == [str(header["env_steps"])]
    with open(os.path.join(failed_run, "model.msgpack"), "rb") as f:
        assert json.loads(flax.serialization.msgpack_restore(f.read())["header"])["env_id"] == "CartpoleSwingup"
    assert not os.path.exists(os.path.join(failed_run, "summary.json"))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def refusal(script, *args):
    """The one-line message with which the script's argument check refuses `args` (in process: nothing to compile)."""
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as refused:
        module.check_args(tyro.cli(module.Args, args=list(map(str, args))))
    message = str(refused.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


COMMON_REFUSALS = [
    (("--env-id", "CheetahRunn"), "unknown --env-id 'CheetahRunn'; choose one of: AcrobotSwingup, "),
    (("--num-envs", 3), "must be a multiple of --num-envs (3)"),
    (("--batch-size", 0), "--batch-size must be positive"),
    (("--gamma", 1.5), "--gamma must be in (0, 1]"),
    (("--learning-rate", -1e-3), "must be positive"),
    (("--load-model", "/nonexistent/model.msgpack"), "no such file"),
    (("--video-width", 321), "--video-width and --video-height must be positive and even, got 321 x 240"),
    (("--video-frame-stride", 0), "--video-frame-stride must be positive"),
]
GORL_REFUSALS = [
    (("--stage-timesteps",), "--stage-timesteps needs one number per stage"),
    (("--stage-timesteps", 60_000_000, -5), "needs at least one iteration (983040 env steps"),
    (("--stage-timesteps", 60_000_000, 0), "needs at least one iteration"),
    (("--decoder-dataset-size", 1000), "--decoder-batch-size 8192 is larger than the decoder's training split (900"),
    (("--decoder-epochs", 0), "--decoder-epochs must be positive"),
    (("--latent-reg-coef", -1, 0), "--latent-reg-coef must be >= 0"),
]
BUDGET_REFUSALS = [
    (("--total-timesteps", -5), "--total-timesteps must be >= 0"),
    (("--total-timesteps", 1000), "less than one iteration (983040 env steps"),
]


@pytest.mark.parametrize(
    "script, args, message",
    [
        (script, *case)
        for script in SCRIPTS
        for case in COMMON_REFUSALS + (GORL_REFUSALS if script.startswith("gorl") else BUDGET_REFUSALS)
    ],
)
def test_bad_arguments_are_refused(script, args, message):
    assert message in refusal(script, *args)


@pytest.fixture
def populated_run_dir(tmp_path):
    earlier = tmp_path / "CartpoleSwingup__earlier__1__1"
    earlier.mkdir()
    (earlier / "summary.json").write_text('{"final_eval_return": 123.0}')
    return tmp_path


def assert_refused(result, run_dir, *fragments):
    """A nonzero exit whose last line names the problem, before compiling, with the run folder untouched."""
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last_line
    assert "compiling" not in result.stdout
    assert os.listdir(run_dir) == ["CartpoleSwingup__earlier__1__1"]
    assert (run_dir / "CartpoleSwingup__earlier__1__1" / "summary.json").read_text() == '{"final_eval_return": 123.0}'


@pytest.mark.parametrize("script", SCRIPTS)
def test_corrupt_model_file_is_refused_before_anything_is_written(script, populated_run_dir, tmp_path_factory):
    corrupt = tmp_path_factory.mktemp("models") / "model.msgpack"
    corrupt.write_bytes(b"\x93 certainly not a model")
    result = run_script(script, *CPU_ARGS, "--load-model", corrupt, "--run-dir", populated_run_dir, timeout=300)
    assert_refused(result, populated_run_dir, "not a readable model file")
    assert corrupt.read_bytes() == b"\x93 certainly not a model"


def load_refusal(script, model, env_id):
    """The one-line message with which the script's load_model refuses `model` for `env_id` (in process: the file's
    algorithm and task are checked before any network is needed)."""
    module = importlib.import_module(script.removesuffix(".py"))
    args = tyro.cli(module.Args, args=["--env-id", env_id, "--load-model", model])
    with pytest.raises(SystemExit) as refused:
        module.load_model(model, args, None)
    return str(refused.value.code)


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_of_another_task_or_algorithm_is_refused(script, learning_runs):
    algo = script.removesuffix(".py")
    model = os.path.join(learning_runs(script)[0], "model.msgpack")
    message = load_refusal(script, model, "CartpoleBalance")
    assert message.startswith("error: ") and "\n" not in message
    assert f"holds a {algo} model for CartpoleSwingup, not a {algo} model for CartpoleBalance" in message
    other = next(s for s in SCRIPTS if s != script)
    message = load_refusal(other, model, "CartpoleSwingup")
    assert f"holds a {algo} model for CartpoleSwingup, not a {other.removesuffix('.py')} model for" in message
