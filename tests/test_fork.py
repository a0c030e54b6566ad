"""Fork, change, compare: `benchmark.sh returns --scripts PATH ...` runs a copy of a script at the preset's arguments of
the script it was copied from, labels its runs by its file name, and the summary sets it beside its original; every
preset's arguments pass every script's own checks on every task of the preset."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import matplotlib.axes
import pytest
from conftest import ROOT, read_json, run_benchmark

import benchmark
from test_benchmark import fabricate_run


def copy_script(original, path, change=None):
    """A copy of the script `original` at `path`, with `change` = (old line, new line) applied if given."""
    with open(os.path.join(ROOT, original)) as f:
        text = f.read()
    if change is not None:
        assert text.count(change[0]) == 1, change
        text = text.replace(change[0], change[1])
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("preset", list(benchmark.PRESETS))
def test_every_presets_arguments_pass_every_scripts_checks_on_every_task(preset):
    """The arguments a preset gives each script, with each of its tasks, as the script itself parses and checks them
    (no compilation): a preset that a script would refuse fails here, not an hour into a grid."""
    for algo in benchmark.ALGOS:
        for env_id in benchmark.PRESETS[preset]["env_ids"]:
            sizes = benchmark.run_sizes(preset, algo, env_id)  # exits with the script's one line where it refuses
            assert sum(sizes["stage_iterations"]) > 0, (preset, algo, env_id)


def test_a_fork_runs_at_its_originals_preset_arguments_under_its_own_name(tmp_path):
    epochs = ("decoder_epochs: int = 50", "decoder_epochs: int = 9")
    fork = copy_script("gorl_ppo_fm.py", tmp_path / "my_gorl.py", epochs)
    scripts = [benchmark.script_at(os.path.join(ROOT, "gorl_ppo_fm.py")), benchmark.script_at(fork)]
    assert scripts[1] == benchmark.Script(fork, "my_gorl", "gorl_ppo_fm")
    cells = benchmark.grid("smoke", scripts, ["CartpoleSwingup"], [1], str(tmp_path))
    (_, _, _, original), (label, _, _, command) = cells
    assert label == "my_gorl" and command[1] == fork and command[6:8] == ["--exp-name", "my_gorl"]
    assert command[8:] == original[8:]  # the original's preset arguments, the same run folder


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("notes.py", "print('no algorithm')\n", "is neither an algorithm script nor a copy of one"),
        ("mine.py", 'ALGO = "sac"\n', "is neither an algorithm script nor a copy of one"),
        ("fpo.py", 'ALGO = "fpo"\n', "give the copy a file name of its own; fpo labels the original's runs"),
        ("my fpo.py", 'ALGO = "fpo"\n', "name a copy with letters, digits, '_' and '-' only"),
        ("missing.py", None, "No such file or directory"),
    ],
)
def test_a_script_that_is_no_copy_or_takes_its_originals_name_is_refused_in_one_line(name, text, message, tmp_path):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    result = run_benchmark("returns", "--preset", "smoke", "--scripts", path, "--out", tmp_path / "out", timeout=60)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: --scripts {path}") and message in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_two_copies_with_one_file_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    copies = [copy_script("fpo.py", tmp_path / folder / "my_fpo.py") for folder in "ab"]
    result = run_benchmark("returns", "--preset", "smoke", "--scripts", *copies, "--out", tmp_path / "out", timeout=60)
    assert result.returncode == 1 and "two scripts share a file name (my_fpo, my_fpo)" in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_summary_sets_a_fork_beside_its_original_and_shows_gorls_stage_changes(tmp_path, monkeypatch):
    """Runs labelled by their --exp-name (config.json) stand apart though their summaries name one algorithm; GoRL's
    warm starts are listed per change, and its curves mark the stage changes."""
    for label, finals in (("gorl_ppo_fm", (500.0, 700.0)), ("my_gorl", (100.0, 300.0))):
        for seed, final in enumerate(finals, start=1):
            path = fabricate_run(tmp_path, label, "CartpoleSwingup", seed, final)
            with open(os.path.join(path, "summary.json")) as f:
                summary = json.load(f)
            stages = [{"stage": 0, "env_steps": 100}, {"stage": 1, "env_steps": 150}, {"stage": 2, "env_steps": 200}]
            for stage in stages[1:]:
                stage.update(stochastic_return_before=10.0 * stage["stage"] + seed, warm_start_return=final / 100)
            with open(os.path.join(path, "summary.json"), "w") as f:
                json.dump({**summary, "algo": "gorl_ppo_fm", "stages": stages}, f)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({"exp_name": label}, f)
    marked = []
    original_axvline = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(
        matplotlib.axes.Axes, "axvline", lambda axes, x, **kw: marked.append(x) or original_axvline(axes, x, **kw)
    )
    benchmark.summarize_folder(str(tmp_path), str(tmp_path / "summary"))

    results = read_json(tmp_path / "summary" / "results.json")
    assert results["table"]["gorl_ppo_fm"]["CartpoleSwingup"]["mean"] == 600.0
    assert results["table"]["my_gorl"]["CartpoleSwingup"]["mean"] == 200.0
    assert set(results["aggregate"]["algos"]) == {"gorl_ppo_fm", "my_gorl"}
    markdown = (tmp_path / "summary" / "results.md").read_text()
    assert "| my_gorl (deterministic) | 200.0 +- 100.0 [n=2] |" in markdown
    assert "| GoRL(FM) | CartpoleSwingup | 2 | 12.0 -> 7.0 | 22.0 -> 7.0 |" in markdown
    assert "| my_gorl | CartpoleSwingup | 1 | 11.0 -> 1.0 | 21.0 -> 1.0 |" in markdown
    assert marked == [100, 150, 100, 150]  # each algorithm's two changes, not the runs' end


@pytest.mark.slow
def test_an_unchanged_copy_reproduces_its_original_and_a_changed_one_is_labelled_apart(learning_runs, tmp_path):
    """PPO's smoke run (the learning tests'), then `returns --scripts` with the original, an unchanged copy and a copy
    with another clip: the original is not run again, the unchanged copy's evaluations and model are its original's
    bit for bit, and the summary sets all three side by side."""
    original_run, _ = learning_runs("ppo_continuous.py")
    out = tmp_path / "out"
    shutil.copytree(original_run, out / "runs" / os.path.basename(original_run))
    same = copy_script("ppo_continuous.py", tmp_path / "ppo_copy.py")
    wider_clip = ("clip_eps: float = 0.1", "clip_eps: float = 0.2")
    changed = copy_script("ppo_continuous.py", tmp_path / "ppo_clip02.py", wider_clip)
    scripts = (os.path.join(ROOT, "ppo_continuous.py"), same, changed)
    result = run_benchmark("returns", "--preset", "smoke", "--scripts", *scripts, "--out", out, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 runs in the grid, 1 already finished, 2 to run" in result.stdout

    runs = {name.split("__")[1]: out / "runs" / name for name in os.listdir(out / "runs")}  # env__label__seed__time
    assert sorted(runs) == ["ppo_clip02", "ppo_continuous", "ppo_copy"]
    for name in ("eval.csv", "model.msgpack"):
        assert (runs["ppo_copy"] / name).read_bytes() == (runs["ppo_continuous"] / name).read_bytes(), name
    assert read_json(runs["ppo_clip02"] / "config.json")["clip_eps"] == 0.2
    results = read_json(out / "results.json")
    finals = {label: results["table"][label]["CartpoleSwingup"]["mean"] for label in runs}
    assert finals["ppo_copy"] == finals["ppo_continuous"] != finals["ppo_clip02"]
    markdown = (out / "results.md").read_text()
    assert "| PPO (deterministic) |" in markdown and "| ppo_copy (deterministic) |" in markdown
    assert "| ppo_clip02 (deterministic) |" in markdown


def test_a_forks_path_is_taken_from_where_benchmark_sh_is_run(tmp_path):
    """`bash benchmark.sh returns --scripts PATH` run from another folder reads a relative PATH (and --out) from there,
    not from the repository."""
    (tmp_path / "forks").mkdir()
    fork = copy_script("ppo_continuous.py", tmp_path / "forks" / "my_ppo.py")
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmark.sh"), "returns", "--preset", "smoke"]
        + ["--scripts", "forks/my_ppo.py", "--out", "out", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VIRTUAL_ENV": sys.prefix},
    )
    assert result.returncode == 0, result.stderr
    (command,) = [shlex.split(line) for line in result.stdout.splitlines()[1:]]
    assert command[1] == fork and command[-1] == str(tmp_path / "out" / "runs")
