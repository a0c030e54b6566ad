"""--capture-video: the episodes the evaluation ran, rendered to MP4 files in the run folder and to TensorBoard."""

import os
import shlex
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
from conftest import (
    CPU_ARGS,
    ROOT,
    SCRIPTS,
    SCRIPTS_UNDER_TEST,
    N,
    documented_commands,
    only_run_folder,
    read_json,
    run_script,
)

# Small frames, and every tenth step of CartpoleSwingup's 1000-step episodes: 101 frames from the start state on.
VIDEO_ARGS = ("--capture-video", "--video-width", 64, "--video-height", 48, "--video-frame-stride", 10)
EPISODE_FRAMES = 1000 // 10 + 1


def read_video(path):
    """The frames (F, H, W, 3) of an MP4 file, decoded by ffmpeg."""
    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])


def assert_episode_video(path, width=64, height=48):
    frames = read_video(path)
    assert frames.shape == (EPISODE_FRAMES, height, width, 3), frames.shape
    # The pole swings and the cart moves: the picture changes over the episode, by more than the codec's noise (0.15 when
    # every frame is drawn from the same pose).
    assert np.abs(frames.astype(float) - frames[0]).mean(axis=(1, 2, 3)).max() > 1.0
    return frames


def tensorboard_videos(run_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_path, size_guidance={"images": 0})
    events.Reload()
    return {tag: [image.step for image in events.Images(tag)] for tag in events.Tags()["images"]}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_readmes_command_renders_the_saved_model_of_the_quick_start_run(script, learning_runs, tmp_path):
    """The README's command that watches the quick-start run's saved model, run by bash as written (the other scripts
    under their own name, with their own no-training option) in the folder whose runs/ holds the smoke preset's run (the
    quick start with --save-model, as tests/test_docs.py checks), at small video sizes and into a folder of its own:
    it evaluates the model on the episodes of the run's last evaluation, whose returns it reproduces, and renders the
    first to videos/ and to TensorBoard."""
    run_path, _ = learning_runs(script)
    summary = read_json(os.path.join(run_path, "summary.json"))
    readme = documented_commands("README.md")
    (watching,) = [line for line in readme if line.startswith("python") and "--load-model" in line]
    assert watching.startswith("python gorl_ppo_fm.py ") and " --stage-timesteps 0 " in watching
    no_training, _ = SCRIPTS_UNDER_TEST[script]
    command = watching.replace("gorl_ppo_fm", script.removesuffix(".py"))
    command = command.replace("--stage-timesteps 0", shlex.join(map(str, no_training)))
    command = command.replace(f"python {script}", shlex.join([sys.executable, os.path.join(ROOT, script)]), 1)
    command += " " + shlex.join(map(str, (*VIDEO_ARGS, "--run-dir", tmp_path)))
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=learning_runs.out,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rendered = only_run_folder(tmp_path)
    reloaded = read_json(os.path.join(rendered, "summary.json"))
    assert reloaded["env_steps"] == summary["env_steps"]
    for name in [name for name in summary if name.startswith("final_")]:  # both modes
        assert reloaded[name] == pytest.approx(summary[name], rel=1e-5, abs=1e-4), name
    steps = summary["env_steps"]
    assert os.listdir(os.path.join(rendered, "videos")) == [f"{steps}.mp4"]
    assert_episode_video(os.path.join(rendered, "videos", f"{steps}.mp4"))
    assert tensorboard_videos(rendered) == {"videos/evaluation": [steps]}


@pytest.mark.slow
def test_training_run_records_every_evaluation_and_gorl_its_stage_change(tmp_path):
    """PPO: a video at each of its two evaluations. GoRL: besides those, its stage change side by side (the policy
    before the restart and after it), twice as wide."""
    result = run_script(
        "ppo_continuous.py", *CPU_ARGS, "--total-timesteps", N, *VIDEO_ARGS, "--run-dir", tmp_path / "p"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_path = only_run_folder(tmp_path / "p")
    assert sorted(os.listdir(os.path.join(run_path, "videos"))) == ["0.mp4", f"{N}.mp4"]
    first, last = (assert_episode_video(os.path.join(run_path, "videos", name)) for name in ("0.mp4", f"{N}.mp4"))
    assert not np.array_equal(first, last)  # another policy, other start states
    assert tensorboard_videos(run_path) == {"videos/evaluation": [0, N]}

    gorl_args = ("--stage-timesteps", N, N, "--decoder-dataset-size", 2000, "--decoder-batch-size", 256)
    result = run_script("gorl_ppo_fm.py", *CPU_ARGS, *gorl_args, *VIDEO_ARGS, "--run-dir", tmp_path / "g")
    assert result.returncode == 0, result.stderr[-3000:]
    run_path = only_run_folder(tmp_path / "g")
    names = ["0.mp4", f"{N}.mp4", f"{N}_stage_change.mp4", f"{2 * N}.mp4"]
    assert sorted(os.listdir(os.path.join(run_path, "videos"))) == sorted(names)
    change = assert_episode_video(os.path.join(run_path, "videos", f"{N}_stage_change.mp4"), width=128)
    # Left the distilled policy, right the restarted one, from the same start state: the first frames agree.
    assert np.abs(change[0, :, :64].astype(float) - change[0, :, 64:]).mean() < 2.0
    assert tensorboard_videos(run_path) == {"videos/evaluation": [0, N, 2 * N], "videos/evaluation_stage_change": [N]}


@pytest.mark.slow
def test_no_opengl_gives_one_line_and_writes_nothing(tmp_path):
    """MUJOCO_GL=glfw without a display: the run stops before compiling, with one line that says what to set, and
    leaves the run folder as it was."""
    (tmp_path / "earlier_run").mkdir()
    (tmp_path / "earlier_run" / "eval.csv").write_text("kept\n")
    env = {name: value for name, value in os.environ.items() if name != "DISPLAY"}
    result = run_script(
        "ppo_continuous.py",
        *CPU_ARGS,
        *VIDEO_ARGS,
        "--run-dir",
        tmp_path,
        env={**env, "MUJOCO_GL": "glfw"},
        timeout=120,
    )
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --capture-video: MuJoCo cannot render with MUJOCO_GL='glfw' (FatalError: "), line
    assert line.endswith(
        "set MUJOCO_GL=egl (on a machine without a GPU, with EGL_PLATFORM=surfaceless "
        "LIBGL_ALWAYS_SOFTWARE=1) or MUJOCO_GL=osmesa"
    )
    assert "compiling" not in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["earlier_run"]
    assert (tmp_path / "earlier_run" / "eval.csv").read_text() == "kept\n"


SIMULATED_MISSING_EGL = """
import ctypes, ctypes.util
_find_library, _load = ctypes.util.find_library, ctypes.CDLL.__init__
ctypes.util.find_library = lambda name: None if "EGL" in name else _find_library(name)
def _no_egl(self, name, *args, **kwargs):
    if name and "EGL" in str(name):
        raise OSError(f"{name}: cannot open shared object file")
    return _load(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = _no_egl
"""


@pytest.mark.slow
def test_without_egl_a_run_still_starts_and_only_a_video_is_refused(tmp_path):
    """A machine without libEGL and without a display (simulated: the library cannot be found or loaded): mujoco's EGL
    backend would fail on import, so the scripts leave MUJOCO_GL alone; a run works, and --capture-video says in one
    line what to set."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SIMULATED_MISSING_EGL)
    env = {name: value for name, value in os.environ.items() if name not in ("DISPLAY", "MUJOCO_GL")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    result = run_script("ppo_continuous.py", *CPU_ARGS, "--total-timesteps", 0, "--run-dir", tmp_path / "r", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("ppo_continuous.py", *CPU_ARGS, *VIDEO_ARGS, "--run-dir", tmp_path / "v", env=env, timeout=120)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --capture-video: MuJoCo cannot render with MUJOCO_GL=''")
    )
    assert not os.path.exists(tmp_path / "v")
