"""Long runs survive: a run stopped by SIGTERM writes a checkpoint and continues with --resume exactly as if it had not
stopped (bit-identical parameters, identical eval.csv), inside a GoRL stage and across a stage change; a bad checkpoint
or run folder is refused with one line; every task the scripts accept loads."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.serialization
import jax
import pytest
import tyro
from conftest import CPU_ARGS, ROOT, N, only_run_folder
from mujoco_playground import dm_control_suite

import gorl_ppo_fm
import ppo_continuous

# Small and quick: 2 epochs, 8 evaluation episodes, an evaluation every 2 iterations.
FAST = (*CPU_ARGS, "--update-epochs", 2, "--num-eval-envs", 8, "--eval-interval", 2 * N, "--save-model")
PPO_ARGS = (*FAST, "--total-timesteps", 6 * N)
GORL_ARGS = (
    *FAST,
    "--stage-timesteps",
    3 * N,
    3 * N,
    "--decoder-dataset-size",
    20_000,
    "--decoder-batch-size",
    1000,
    "--decoder-epochs",
    3,
)


def start(script, *args):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def stop_when(process, line_start, timeout=600):
    """Send SIGTERM once the process prints a line starting with `line_start`; returns (exit code, console)."""
    console, deadline = [], time.time() + timeout
    for line in process.stdout:
        console.append(line)
        if line.startswith(line_start):
            process.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(console[-20:])
    rest, _ = process.communicate(timeout=timeout)
    return process.returncode, "".join(console) + rest


def finish(script, *args):
    process = start(script, *args)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    return output


def read(path):
    with open(path, "rb") as f:
        return f.read()


# What may differ between a straight run and a stopped-and-resumed one: clocks and the process's memory.
TIMINGS = (
    "wall_time_s",
    "compile_time_s",
    "train_sps",
    "transition_time_s",
    "decoder_pairs_per_s",
    "peak_resident_memory_bytes",
)


def without_timings(summary):
    summary = {name: value for name, value in summary.items() if name not in TIMINGS}
    if "stages" in summary:  # GoRL's stage records
        summary["stages"] = [{k: v for k, v in stage.items() if k not in TIMINGS} for stage in summary["stages"]]
    return summary


def assert_same_run(straight, resumed):
    """Bit-identical final parameters and observation statistics (the saved model), the same eval.csv, and the same
    summary.json but for its clocks."""
    for name in ("model.msgpack", "eval.csv"):
        assert read(os.path.join(resumed, name)) == read(os.path.join(straight, name)), name
    summaries = [json.loads(read(os.path.join(path, "summary.json"))) for path in (straight, resumed)]
    assert without_timings(summaries[1]) == without_timings(summaries[0])


def assert_stopped(code, console):
    assert code == 128 + signal.SIGTERM, console[-3000:]
    hint = console.strip().splitlines()[-1]
    assert hint.startswith("stopped by SIGTERM at env step ") and " --resume " in hint, hint
    return hint.split(" --resume ")[1]


@pytest.mark.slow
def test_ppo_stopped_and_resumed_is_bit_identical_to_a_straight_run(tmp_path):
    finish("ppo_continuous.py", *PPO_ARGS, "--run-dir", tmp_path / "straight")
    code, console = stop_when(start("ppo_continuous.py", *PPO_ARGS, "--run-dir", tmp_path / "stopped"), "iter    2/6")
    run_path = assert_stopped(code, console)
    assert not os.path.exists(os.path.join(run_path, "summary.json"))
    assert "iter    6/6" not in console  # stopped part-way
    resumed = finish("ppo_continuous.py", "--resume", run_path)
    assert "(resumed at env step " in resumed and "iter    1/6" not in resumed
    assert_same_run(only_run_folder(tmp_path / "straight"), run_path)


@pytest.mark.slow
def test_gorl_stopped_inside_a_stage_and_in_a_stage_change_resumes_bit_identically(tmp_path):
    finish("gorl_ppo_fm.py", *GORL_ARGS, "--run-dir", tmp_path / "straight")
    code, console = stop_when(
        start("gorl_ppo_fm.py", *GORL_ARGS, "--run-dir", tmp_path / "stopped"), "stage 0 iter    1"
    )
    run_path = assert_stopped(code, console)
    assert "stage 1" not in console
    # Resumed inside stage 0, then stopped again while the decoder is being fitted: the change is redone on resume.
    code, console = stop_when(start("gorl_ppo_fm.py", "--resume", run_path), "  decoder epoch   1")
    assert assert_stopped(code, console) == run_path
    assert "stage 0 iter    1/" not in console and "warm start" not in console
    resumed = finish("gorl_ppo_fm.py", "--resume", run_path)
    assert "stage 1: warm start" in resumed and "stage 0 iter" not in resumed
    assert_same_run(only_run_folder(tmp_path / "straight"), run_path)


@pytest.mark.slow
def test_benchmark_grid_resumes_an_interrupted_run(tmp_path):
    """A run of the grid stopped part-way is continued, not restarted, by the next `benchmark.py returns`."""
    import benchmark

    args = benchmark.PRESETS["smoke"]["args"]["ppo_continuous"]
    script = benchmark.script_at(os.path.join(ROOT, "ppo_continuous.py"))
    command = benchmark.cell_command("smoke", script, "CartpoleSwingup", 1, str(tmp_path))
    assert "--resume" not in command and list(map(str, args)) == command[8:-2]
    runs = tmp_path / "runs"
    code, console = stop_when(start("ppo_continuous.py", *PPO_ARGS, "--seed", 1, "--run-dir", runs), "iter    1/6")
    run_path = assert_stopped(code, console)
    command = benchmark.cell_command("smoke", script, "CartpoleSwingup", 1, str(tmp_path))
    assert command[1:] == [os.path.join(ROOT, "ppo_continuous.py"), "--resume", run_path]


# ---------------------------------------------------------------------------------------------------------------------
# Signals and bad input, in process


def test_first_signal_asks_for_a_checkpoint_and_a_second_ends_the_process(tmp_path, monkeypatch):
    args = tyro.cli(ppo_continuous.Args, args=["--env-id", "CartpoleSwingup", "--run-dir", str(tmp_path)])
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run = ppo_continuous.Run(args, None, None, 0, None)
        assert signal.getsignal(signal.SIGTERM) == run.request_stop
        run.request_stop(signal.SIGTERM, None)
        assert run.stop_signal == signal.SIGTERM
        # The default action of either signal ends the process at once, without Python's help.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        with pytest.raises(SystemExit) as stopped:
            run.stop_if_requested()
        assert stopped.value.code == 128 + signal.SIGTERM
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def refusal(call, *args):
    with pytest.raises(SystemExit) as refused:
        call(*args)
    message = str(refused.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def fake_run(tmp_path, module, env_id="CartpoleSwingup", tree=None):
    """A run folder with a config.json and a checkpoint of `module` for `env_id` holding `tree`."""
    run_path = tmp_path / f"{env_id}__x__1__1"
    run_path.mkdir()
    (run_path / "config.json").write_text(json.dumps({"env_id": env_id, "seed": 1}))
    header = {"algo": module.ALGO, "env_id": env_id, "kind": "checkpoint", "progress": {"iteration": 3}}
    module.save_arrays(str(run_path / "checkpoint.msgpack"), header, tree or {"x": jax.numpy.zeros(3)})
    return str(run_path)


def test_checkpoint_of_another_script_or_task_is_refused(tmp_path):
    gorl_run = fake_run(tmp_path, gorl_ppo_fm)
    message = refusal(ppo_continuous.read_checkpoint, gorl_run)
    assert "holds a gorl_ppo_fm checkpoint for CartpoleSwingup, not a ppo_continuous checkpoint for" in message
    args, (progress, arrays) = gorl_ppo_fm.read_checkpoint(gorl_run)
    assert (args.resume, args.env_id, progress) == (gorl_run, "CartpoleSwingup", {"iteration": 3})
    # Arrays that do not fit this configuration's networks.
    message = refusal(gorl_ppo_fm.restore_arrays, arrays, {"x": jax.numpy.zeros(4)}, f"--resume {gorl_run}")
    assert "does not match the networks and sizes of this configuration (at ['x'])" in message


def test_corrupt_truncated_missing_or_finished_checkpoint_is_refused_and_kept(tmp_path):
    run_path = fake_run(tmp_path, ppo_continuous)
    checkpoint = os.path.join(run_path, "checkpoint.msgpack")
    whole = read(checkpoint)
    with open(checkpoint, "wb") as f:
        f.write(whole[: len(whole) // 2])
    assert "is not a readable checkpoint file" in refusal(ppo_continuous.read_checkpoint, run_path)
    assert read(checkpoint) == whole[: len(whole) // 2]
    os.remove(checkpoint)
    assert "checkpoint.msgpack: no such file" in refusal(ppo_continuous.read_checkpoint, run_path)
    with open(os.path.join(run_path, "summary.json"), "w") as f:
        f.write("{}")
    assert "that run has finished" in refusal(ppo_continuous.read_checkpoint, run_path)
    assert "not a run folder" in refusal(ppo_continuous.read_checkpoint, str(tmp_path / "nowhere"))
    # A model file is not a checkpoint, nor the other way round.
    model = str(tmp_path / "model.msgpack")
    ppo_continuous.save_model(model, ppo_continuous.Args(env_id="CartpoleSwingup"), 0, {"x": jax.numpy.zeros(3)})
    header = {"algo": "ppo_continuous", "env_id": "CartpoleSwingup", "kind": "model", "env_steps": 0}
    assert json.loads(flax.serialization.msgpack_restore(read(model))["header"]) == header
    message = refusal(ppo_continuous.read_arrays, model, "--resume", "CartpoleSwingup", "checkpoint")
    assert "holds a ppo_continuous model for CartpoleSwingup, not a ppo_continuous checkpoint" in message


def test_unwritable_or_clashing_run_dir_is_refused_and_nothing_is_overwritten(tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    args = tyro.cli(ppo_continuous.Args, args=["--env-id", "CartpoleSwingup", "--run-dir", str(a_file / "runs")])
    message = refusal(ppo_continuous.check_args, args)
    assert f"--run-dir {a_file / 'runs'}: cannot write there ({a_file} is not a writable folder)" in message
    assert a_file.read_text() == "keep me"
    # Two runs of one task, name and seed started in the same second would share a folder: the second is refused.
    monkeypatch.setattr(ppo_continuous.time, "time", lambda: 1234.0)
    clash = tmp_path / "runs" / "CartpoleSwingup__ppo_continuous__1__1234"
    clash.mkdir(parents=True)
    (clash / "eval.csv").write_text("earlier")
    args = tyro.cli(ppo_continuous.Args, args=["--env-id", "CartpoleSwingup", "--run-dir", str(tmp_path / "runs")])
    assert "cannot make the run folder" in refusal(ppo_continuous.Run, args, None, None, 0, None)
    assert os.listdir(clash) == ["eval.csv"] and (clash / "eval.csv").read_text() == "earlier"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["jax", "warp"])
def test_every_task_the_scripts_accept_loads(impl):
    """Every DeepMind Control Suite task builds and traces a reset (ReacherEasy and ReacherHard need make_env's
    compatibility line on mujoco 3.17)."""
    for env_id in dm_control_suite.ALL_ENVS:
        env, episode_length = ppo_continuous.make_env(env_id, impl)
        state = jax.eval_shape(env.reset, jax.random.key(0))
        assert state.obs.shape == (env.observation_size,) and episode_length > 0, env_id


@pytest.mark.slow
def test_compiled_programs_are_cached_where_asked_and_not_when_turned_off(tmp_path):
    """The persistent compilation cache is on by default ($JAX_COMPILATION_CACHE_DIR, else a per-user folder); the
    option moves it, and "" turns it off even where the environment variable is set."""
    environment = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "from_environment")}
    for cache, expected in ((tmp_path / "asked", tmp_path / "asked"), ("", None)):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "ppo_continuous.py"), *map(str, CPU_ARGS), "--total-timesteps", "0"]
            + ["--run-dir", str(tmp_path / "runs"), "--compilation-cache-dir", str(cache)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=environment,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        if expected is not None:
            assert os.listdir(expected), "nothing was cached"
    assert not os.path.exists(tmp_path / "from_environment")
