"""benchmark.py (behind benchmark.sh): the summary on fabricated run folders, the grid's commands for every preset and
for Slurm, resuming, the smoke preset end to end, the speed mode's table and its hold on every script's rollout, and the
interpreter benchmark.sh runs."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPTS, read_json, run_benchmark

import benchmark


def fabricate_run(root, algo, env_id, seed, final, curve_steps=(0, 100, 200)):
    """A run folder as the scripts write it, with a linear learning curve ending at `final` (the other evaluation
    mode's at half of it)."""
    path = os.path.join(root, "runs", f"{env_id}__{algo}__{seed}__{1700000000 + seed}")
    os.makedirs(path)
    rows = [(step, final * step / curve_steps[-1]) for step in curve_steps]
    with open(os.path.join(path, "eval.csv"), "w") as f:
        f.write(
            "env_steps,eval_return_mean,eval_return_std,stochastic_return_mean,stochastic_return_std\n"
            + "".join(f"{s},{m},1.0,{m / 2},1.0\n" for s, m in rows)
        )
    mode, other = ("stochastic", "deterministic") if algo in ("fpo", "dppo") else ("deterministic", "stochastic")
    summary = {"env_id": env_id, "algo": algo, "seed": seed, "env_steps": curve_steps[-1], "final_eval_return": final}
    summary.update({"eval_mode": mode, f"final_{other}_eval_return": final / 2})
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({**summary, "final_eval_return_std": 1.0, "best_eval_return": final, "train_sps": 1.0}, f)
    return path


def test_summary_of_fabricated_runs(tmp_path):
    finals = {
        ("ppo_continuous", "CheetahRun"): [100.0, 200.0, 300.0],
        ("gorl_ppo_fm", "CheetahRun"): [500.0, 700.0],  # seed 3 is missing
        ("ppo_continuous", "HopperStand"): [50.0, 50.0, 50.0],
        ("gorl_ppo_fm", "HopperStand"): [10.0, 20.0, 30.0],
    }
    for (algo, env_id), values in finals.items():
        for seed, final in enumerate(values, start=1):
            fabricate_run(tmp_path, algo, env_id, seed, final)
    benchmark.summarize_folder(str(tmp_path), str(tmp_path / "summary"))

    results = read_json(tmp_path / "summary" / "results.json")
    ppo_cheetah = results["table"]["ppo_continuous"]["CheetahRun"]
    assert ppo_cheetah["mean"] == pytest.approx(200.0) and ppo_cheetah["std"] == pytest.approx((20000 / 3) ** 0.5)
    assert ppo_cheetah["n"] == 3 and ppo_cheetah["seeds"] == [1, 2, 3] and ppo_cheetah["env_steps"] == [200]
    assert (ppo_cheetah["paper_mean"], ppo_cheetah["paper_std"]) == (724.83, 155.67)
    gorl_cheetah = results["table"]["gorl_ppo_fm"]["CheetahRun"]
    assert (gorl_cheetah["mean"], gorl_cheetah["std"], gorl_cheetah["n"]) == (600.0, 100.0, 2)
    assert results["missing"] == [{"algo": "gorl_ppo_fm", "env_id": "CheetahRun", "seed": 3}]
    assert len(results["runs"]) == 11
    assert (ppo_cheetah["eval_mode"], ppo_cheetah["other_mode_mean"]) == ("deterministic", pytest.approx(100.0))

    markdown = (tmp_path / "summary" / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | CheetahRun | HopperStand |"
    assert table[1].startswith("| PPO (deterministic) | 200.0 +- 81.6 [n=3] (paper 724.8 +- 155.7) | **50.0 +- 0.0**")
    assert table[2].startswith("| GoRL(FM) (deterministic) | **600.0 +- 100.0** [n=2] (paper 883.4 +- 19.9) |")
    assert "Missing runs (1): gorl_ppo_fm on CheetahRun, seed 3" in markdown
    for env_id in ("CheetahRun", "HopperStand"):
        assert (tmp_path / "summary" / f"curves_{env_id}.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_names_each_rows_mode_bolds_no_tie_and_gives_no_std_for_one_seed(tmp_path):
    for seed in (1, 2):
        fabricate_run(tmp_path, "ppo_continuous", "FishSwim", seed, 40.0)
        fabricate_run(tmp_path, "fpo", "FishSwim", seed, 40.0)
    fabricate_run(tmp_path, "dppo", "WalkerWalk", 1, 123.0)
    benchmark.summarize_folder(str(tmp_path), str(tmp_path / "summary"))
    table = [line for line in (tmp_path / "summary" / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert table[1] == "| PPO (deterministic) | 40.0 +- 0.0 [n=2] (paper 433.7 +- 73.6) | missing |"
    assert table[2] == "| FPO (stochastic) | 40.0 +- 0.0 [n=2] (paper 204.7 +- 191.5) | missing |"
    assert table[3] == "| DPPO (stochastic) | missing | **123.0** [n=1] (paper 345.6 +- 64.5) |"


def test_summary_keeps_the_newest_run_of_a_cell(tmp_path):
    older = fabricate_run(tmp_path, "fpo", "CheetahRun", 1, 10.0)
    newer = os.path.join(tmp_path, "runs", "CheetahRun__fpo__1__1800000000")
    os.makedirs(newer)
    for name in ("eval.csv", "summary.json"):
        with open(os.path.join(older, name)) as f:
            text = f.read().replace("10.0", "90.0")
        with open(os.path.join(newer, name), "w") as f:
            f.write(text)
    os.utime(os.path.join(older, "summary.json"), (1, 1))
    benchmark.summarize_folder(str(tmp_path), str(tmp_path))
    assert read_json(tmp_path / "results.json")["table"]["fpo"]["CheetahRun"]["mean"] == 90.0


@pytest.mark.parametrize("preset, runs", [("paper", 5 * 6 * 5), ("cpu", 5 * 2 * 3), ("smoke", 5)])
def test_every_preset_builds_its_grid(preset, runs, tmp_path):
    scripts = [benchmark.script_at(os.path.join(ROOT, f"{algo}.py")) for algo in benchmark.ALGOS]
    cells = benchmark.grid(
        preset, scripts, benchmark.PRESETS[preset]["env_ids"], benchmark.PRESETS[preset]["seeds"], str(tmp_path)
    )
    assert len(cells) == runs and len({tuple(cell[:3]) for cell in cells}) == runs
    for algo, env_id, seed, command in cells:
        assert command[1] == os.path.join(ROOT, f"{algo}.py")
        assert command[2:8] == ["--env-id", env_id, "--seed", str(seed), "--exp-name", algo]
        assert command[-2:] == ["--run-dir", os.path.join(str(tmp_path), "runs")]
        if preset == "paper":  # the scripts' defaults are the paper's configuration; its long runs keep their models
            assert command[8:-2] == ["--save-model"]
        else:
            assert "--num-envs" in command and ("--stage-timesteps" in command) == algo.startswith("gorl")


def test_smoke_preset_runs_the_tests_learning_configuration():
    from conftest import CPU_ARGS

    for algo in benchmark.ALGOS:
        arguments = list(map(str, benchmark.PRESETS["smoke"]["args"][algo]))
        assert ["--env-id", "CartpoleSwingup", *arguments[: len(CPU_ARGS) - 2]] == list(map(str, CPU_ARGS))


# Where the interpreter benchmark.sh should run lies ({repo}: its folder), and that interpreter's arguments: this test's
# own Python, or the same without site-packages (so without jax). None: no interpreter anywhere.
INTERPRETERS = {
    "active environment": ("{tmp}/venv", ()),
    "repository .venv": ("{repo}/.venv", ()),
    "active environment without jax": ("{tmp}/venv", ("-S",)),
    "none": (None, ()),
}


@pytest.mark.parametrize("where", INTERPRETERS)
def test_benchmark_sh_runs_the_projects_python_though_none_is_on_the_path(where, tmp_path):
    """benchmark.sh, in a folder of its own with a PATH that holds no Python, runs $VIRTUAL_ENV's python, else the
    repository's .venv's, as far as benchmark.py's --help; where that interpreter cannot import jax (or python3, the
    last resort, is missing) it says in one line what to activate, and fails."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(os.path.join(ROOT, "benchmark.sh"), repo)
    os.symlink(os.path.join(ROOT, "benchmark.py"), repo / "benchmark.py")
    (tmp_path / "tools").mkdir()  # the PATH: only the one other program benchmark.sh calls
    os.symlink(shutil.which("dirname"), tmp_path / "tools" / "dirname")
    environment = {"PATH": str(tmp_path / "tools")}
    folder, python_args = INTERPRETERS[where]
    if folder is not None:
        folder = folder.format(tmp=tmp_path, repo=repo)
        os.makedirs(os.path.join(folder, "bin"))
        with open(os.path.join(folder, "bin", "python"), "w") as f:
            f.write(f'#!/bin/sh\necho ran {folder} >&2\nexec {shlex.join([sys.executable, *python_args])} "$@"\n')
        os.chmod(os.path.join(folder, "bin", "python"), 0o755)
        if where.startswith("active environment"):
            environment["VIRTUAL_ENV"] = folder
    result = subprocess.run(
        [shutil.which("bash"), repo / "benchmark.sh", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    if where in ("active environment", "repository .venv"):
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: benchmark.py") and f"ran {folder}\n" in result.stderr
    else:
        python = "python3" if folder is None else f"{folder}/bin/python"
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.splitlines()[-1] == (
            f"error: {python} cannot import jax: activate the project's environment (. .venv/bin/activate) or install"
            " it (README.md, Setup: pip install -r requirements.txt)"
        )


@pytest.mark.slow
def test_dry_run_lists_only_unfinished_runs(tmp_path):
    fabricate_run(tmp_path, "ppo_continuous", "CartpoleSwingup", 1, 100.0)
    result = run_benchmark("returns", "--preset", "smoke", "--out", tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{len(SCRIPTS)} runs in the grid, 1 already finished, {len(SCRIPTS) - 1} to run"
    commands = [shlex.split(line) for line in lines[1:]]
    assert sorted(os.path.basename(c[1]) for c in commands) == sorted(s for s in SCRIPTS if s != "ppo_continuous.py")
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.slow
def test_slurm_array_has_one_task_per_unfinished_run(tmp_path):
    fabricate_run(tmp_path, "ppo_continuous", "CheetahRun", 3, 100.0)
    result = run_benchmark(
        "returns",
        "--preset",
        "paper",
        "--algos",
        "ppo_continuous",
        "fpo",
        "--env-ids",
        "CheetahRun",
        "HopperStand",
        "--seeds",
        1,
        2,
        3,
        "--out",
        tmp_path,
        "--slurm",
        "--slurm-option=--partition=gpu",
    )
    assert result.returncode == 0, result.stderr
    commands = (tmp_path / "slurm" / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 * 2 * 3 - 1
    # Each task works out its command when it starts (a new run, or --resume of its own after a requeue).
    cells = [shlex.split(c)[2:] for c in commands]
    assert all(cell[0] == "_cell" and cell[1] == "paper" and cell[-1] == str(tmp_path) for cell in cells)
    assert ["ppo_continuous", "CheetahRun", "3"] not in [cell[2:5] for cell in cells]
    sbatch = (tmp_path / "slurm" / "grid.sbatch").read_text()
    assert "#SBATCH --array=0-10\n" in sbatch and "#SBATCH --partition=gpu\n" in sbatch
    assert 'sed -n "$((SLURM_ARRAY_TASK_ID + 1))p"' in sbatch and str(tmp_path / "slurm" / "commands.txt") in sbatch


@pytest.mark.slow
def test_smoke_preset_end_to_end(learning_runs):
    """Every algorithm's smoke run (made through the same command by the other tests), then the whole preset again:
    everything has finished, so it only summarises."""
    for script in SCRIPTS:
        learning_runs(script)
    result = run_benchmark("returns", "--preset", "smoke", "--out", learning_runs.out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(SCRIPTS)} runs in the grid, {len(SCRIPTS)} already finished, 0 to run" in result.stdout
    results = read_json(learning_runs.out / "results.json")
    assert set(results["table"]) == {s.removesuffix(".py") for s in SCRIPTS} and results["missing"] == []
    assert "CartpoleSwingup" in (learning_runs.out / "results.md").read_text()
    assert (learning_runs.out / "curves_CartpoleSwingup.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_speed_builds_every_scripts_rollout(script):
    """`benchmark.sh speed` builds each script's rollout from the script's own functions: trace it (no compile) at the
    speed configuration, so that a change to a script's API fails here rather than an hour into a sweep."""
    import importlib

    import jax

    module = importlib.import_module(script.removesuffix(".py"))
    env, episode_length = module.make_env("CartpoleBalance", "jax")
    init, rollout, inputs = benchmark.rollout_alone(module, env, episode_length)
    carry = init(benchmark.SPEED_NUM_ENVS)
    _, transitions, _ = jax.eval_shape(rollout, *inputs, carry, jax.random.key(1))
    assert transitions.obs.shape == (benchmark.SPEED_ROLLOUT_LENGTH, benchmark.SPEED_NUM_ENVS, env.observation_size)
    assert transitions.reward.shape == (benchmark.SPEED_ROLLOUT_LENGTH, benchmark.SPEED_NUM_ENVS)


def test_speed_table():
    ppo = {"script": "ppo_continuous.py", "env_id": "CheetahRun", "impl": "jax"}
    gorl = {"script": "gorl_ppo_fm.py", "env_id": "CheetahRun", "impl": "warp"}
    rows = [
        {**ppo, "train_sps": 1200.0, "rollout_sps": 8000.0, "pure_step_sps": 10000.0},
        {**gorl, "train_sps": 500.0, "rollout_sps": 2000.0, "pure_step_sps": 4000.0},
    ]
    for row, cold, warm in zip(rows, (81.4, 120.6), (30.2, 41.5)):
        row.update(startup_cold_s=cold, startup_warm_s=warm)
    rows[1].update(decoder_pairs_per_s=42000.0, transition_time_s=31.3)
    rows.append({**ppo, "impl": "warp", "startup_cold_s": 95.2, "startup_warm_s": 50.7})  # speed --measure startup
    lines = benchmark.speed_table(rows).splitlines()
    assert lines[2].count("|") == lines[3].count("|") == lines[-1].count("|") == 13
    # rollout / pure stepping time = pure rate / rollout rate; rollout share of an iteration = training / rollout rate
    assert lines[-3] == "| ppo_continuous.py | CheetahRun | jax | 1,200 | 8,000 | 10,000 | 1.25 | 15% |  |  | 81 | 30 |"
    assert lines[-2] == (
        "| gorl_ppo_fm.py | CheetahRun | warp | 500 | 2,000 | 4,000 | 2.00 | 25% | 42,000 | 31.3 | 121 | 42 |"
    )
    assert lines[-1] == "| ppo_continuous.py | CheetahRun | warp |  |  |  |  |  |  |  | 95 | 51 |"


def test_jobs_get_one_gpu_each_round_robin_and_no_preallocation():
    assert benchmark.job_environment(0, 1, ["0", "1"]) == {}  # one job: JAX's defaults
    environments = [benchmark.job_environment(slot, 3, ["0", "1"]) for slot in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in environments] == ["0", "1", "0"]
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for e in environments)
    assert benchmark.job_environment(1, 2, []) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # one GPU or none: shared


def test_slurm_tasks_requeue_when_stopped_and_pick_their_command_when_they_start(tmp_path):
    script = benchmark.slurm_script(str(tmp_path), str(tmp_path / "commands.txt"), 3, [])
    assert "#SBATCH --requeue\n" in script and "#SBATCH --signal=TERM@300\n" in script
    assert (
        'if [ "$status" -eq 143 ]; then scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi' in script
    )


# The aggregate over tasks. Final returns on two tasks, chosen so that hand-computed statistics tell rliable's choices
# apart: trim_mean's int(n / 4) cut where a quarter of the runs is fractional, tasks weighed equally in the mean and the
# profile where their run counts differ, tasks resampled apart (Cheetah's runs all above Hopper's), one run per task.
AGGREGATE_FINALS = {
    "ppo_continuous": {"CheetahRun": [700, 800, 900, 1000, 600], "HopperStand": [0, 50, 100, 150, 200]},
    "gorl_ppo_fm": {"CheetahRun": [800, 600, 700, 900], "HopperStand": [200, 300, 1000]},
    "fpo": {"CheetahRun": [400], "HopperStand": [100, 300, 900]},
    "dppo": {"CheetahRun": [400], "HopperStand": [100]},
}


@pytest.fixture(scope="module")
def aggregate_summary(tmp_path_factory):
    """The summary folder of runs with AGGREGATE_FINALS as final returns."""
    root = tmp_path_factory.mktemp("aggregate")
    for algo, finals_by_task in AGGREGATE_FINALS.items():
        for env_id, finals in finals_by_task.items():
            for seed, final in enumerate(finals, start=1):
                fabricate_run(root, algo, env_id, seed, float(final))
    benchmark.summarize_folder(str(root), str(root / "summary"))
    return root / "summary"


def plain_stratified_interval(scores_by_task, resamples, rng):
    """The 95% percentile bounds of [IQM, mean] under a stratified bootstrap written out with numpy alone: each task's
    runs redrawn with replacement on their own; the IQM by sorting the pooled runs and cutting n // 4 at each end."""
    import numpy as np

    redrawn = [scores[rng.integers(0, len(scores), (resamples, len(scores)))] for scores in scores_by_task]
    pooled = np.sort(np.concatenate(redrawn, axis=1), axis=1)
    cut = pooled.shape[1] // 4
    iqm = pooled[:, cut : pooled.shape[1] - cut].mean(axis=1)
    mean = np.mean([scores.mean(axis=1) for scores in redrawn], axis=0)
    return np.percentile(np.stack([iqm, mean], axis=1), [2.5, 97.5], axis=0)  # [[low IQM, low mean], [high ...]]


def test_aggregate_iqm_and_mean_match_hand_computation_and_a_plain_stratified_bootstrap(aggregate_summary):
    import numpy as np

    aggregate = read_json(aggregate_summary / "results.json")["aggregate"]
    assert aggregate["tasks"] == ["CheetahRun", "HopperStand"]
    algos = aggregate["algos"]
    # PPO, 10 runs: 0, 50, 100, 150, 200, 600, 700, 800, 900, 1000. A quarter of 10 is 2.5, and trim_mean (rliable's
    # IQM) cuts int(2.5) = 2 at each end: 425, where a fractional cut (half of 100 and of 800) would give 420.
    assert algos["ppo_continuous"]["iqm"] == pytest.approx((100 + 150 + 200 + 600 + 700 + 800) / 6 / 1000)
    assert algos["ppo_continuous"]["mean"] == pytest.approx((800 + 100) / 2 / 1000)
    # GoRL(FM), 7 runs: 200, 300, 600, 700, 800, 900, 1000, int(1.75) = 1 cut at each end. The mean weighs each task
    # the same, (750 + 500) / 2, where the runs pooled would give 4500 / 7.
    assert algos["gorl_ppo_fm"]["iqm"] == pytest.approx((300 + 600 + 700 + 800 + 900) / 5 / 1000)
    assert algos["gorl_ppo_fm"]["mean"] == pytest.approx((750 + 500) / 2 / 1000)
    assert algos["gorl_ppo_fm"]["runs_per_task"] == {"CheetahRun": 4, "HopperStand": 3}
    # FPO, 4 runs: 100, 300, 400, 900, one cut at each end.
    assert algos["fpo"]["iqm"] == pytest.approx((300 + 400) / 2 / 1000)
    # DPPO, one run per task: under 4 runs nothing is cut, and there is nothing to resample.
    assert algos["dppo"]["iqm"] == algos["dppo"]["mean"] == pytest.approx((400 + 100) / 2 / 1000)
    assert algos["dppo"]["iqm_ci"] == algos["dppo"]["mean_ci"] == pytest.approx([0.25, 0.25])

    # The intervals agree with an independent bootstrap. These scores take few values, so the percentiles of 50,000
    # resamples land on the same values every time; 0.01 is far below the gap to a bootstrap that pools the tasks.
    for algo in ("ppo_continuous", "gorl_ppo_fm", "fpo"):
        scores_by_task = [np.array(finals) / 1000 for finals in AGGREGATE_FINALS[algo].values()]
        low, high = plain_stratified_interval(scores_by_task, 50_000, np.random.default_rng(1))
        assert algos[algo]["iqm_ci"] == pytest.approx([low[0], high[0]], abs=0.01), algo
        assert algos[algo]["mean_ci"] == pytest.approx([low[1], high[1]], abs=0.01), algo


def test_aggregate_performance_profile_matches_hand_counted_fractions(aggregate_summary):
    aggregate = read_json(aggregate_summary / "results.json")["aggregate"]
    taus = aggregate["taus"]

    def profile(algo, tau):
        index = round(tau * 100)
        assert taus[index] == pytest.approx(tau)
        entry = aggregate["algos"][algo]
        return entry["profile"][index], entry["profile_ci"][0][index], entry["profile_ci"][1][index]

    # PPO: Cheetah's 0.6..1.0 and Hopper's 0..0.2; "above" is strict, so Hopper's 0 does not count at tau = 0.
    assert profile("ppo_continuous", 0.0)[0] == pytest.approx((5 / 5 + 4 / 5) / 2)
    assert profile("ppo_continuous", 0.25)[0] == pytest.approx((5 / 5 + 0 / 5) / 2)
    assert profile("ppo_continuous", 1.0)[0] == 0.0
    # At 0.75, 3 of Cheetah's 5 runs are above and none of Hopper's: 0.3. A stratified resample holds k ~ Binomial(5,
    # 0.6) of Cheetah's above (and still none of Hopper's): P(k = 0) = 1% and P(k <= 1) = 8.7%, P(k = 5) = 7.8%, so the
    # 95% band is k = 1 to 5, [0.1, 0.5].
    assert profile("ppo_continuous", 0.75) == pytest.approx((0.3, 0.1, 0.5))
    # GoRL(FM): each task weighs the same, (4/4 + 1/3) / 2, where the runs pooled would give 5/7.
    assert profile("gorl_ppo_fm", 0.5)[0] == pytest.approx((4 / 4 + 1 / 3) / 2)
    assert profile("gorl_ppo_fm", 0.75)[0] == pytest.approx((2 / 4 + 1 / 3) / 2)
    # DPPO, one run per task: 400 and 100, and no band.
    assert profile("dppo", 0.3) == pytest.approx((0.5, 0.5, 0.5))


def test_aggregate_section_and_performance_profile_plot(aggregate_summary, tmp_path):
    markdown = (aggregate_summary / "results.md").read_text()
    heading = "\n## Aggregate over tasks: IQM and mean of normalised final returns, with 95% bootstrap intervals\n"
    section = markdown.split(heading)[1]
    assert "on the 2 tasks every algorithm ran (CheetahRun, HopperStand)" in section
    assert "Runs per task differ" in section
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | runs | IQM [95% CI] | mean [95% CI] |"
    assert rows[1].startswith("| PPO | 10 (5 per task) | 0.425 [")
    assert rows[2].startswith("| FPO | 4 (1, 3 per task) | 0.350 [")
    assert rows[3] == "| DPPO | 2 (1 per task) | 0.250 (no interval) | 0.250 (no interval) |"
    assert rows[4].startswith("| GoRL(FM) | 7 (4, 3 per task) | 0.660 [")
    plot = (aggregate_summary / "performance_profile.png").read_bytes()
    assert plot[:4] == b"\x89PNG" and len(plot) > 10_000
    # The bootstrap is seeded: the same runs give the same results.md, and the same profile bands (whose 2,000
    # resamples, unlike the intervals' 50,000, give other bounds under another seed).
    benchmark.summarize_folder(str(aggregate_summary.parent), str(tmp_path))
    assert (tmp_path / "results.md").read_text() == markdown
    again, before = (read_json(path / "results.json")["aggregate"] for path in (tmp_path, aggregate_summary))
    assert again == before


def test_aggregate_needs_a_task_every_algorithm_ran(tmp_path):
    fabricate_run(tmp_path, "ppo_continuous", "FishSwim", 1, 40.0)
    fabricate_run(tmp_path, "dppo", "WalkerWalk", 1, 123.0)
    benchmark.summarize_folder(str(tmp_path), str(tmp_path / "summary"))
    markdown = (tmp_path / "summary" / "results.md").read_text()
    assert "No task has runs of every algorithm, so there is no aggregate." in markdown
    assert read_json(tmp_path / "summary" / "results.json")["aggregate"]["algos"] == {}
    assert not (tmp_path / "summary" / "performance_profile.png").exists()


def test_the_cpu_preset_gives_every_algorithm_the_same_sizes_discount_and_steps():
    """The cpu preset compares like with like: every algorithm gets the same envs, minibatches, epochs, evaluation and
    discount, and as many env steps; GoRL's stages have the paper's shape (1/3, 1/3, 1/6, 1/6 of the run)."""

    def flags(args):
        parsed, flag = {}, None
        for arg in map(str, args):
            if arg.startswith("--"):
                flag = arg
                parsed[flag] = []
            else:
                parsed[flag].append(arg)
        return parsed

    preset = benchmark.PRESETS["cpu"]
    assert len(preset["seeds"]) >= 3 and "CartpoleSwingup" in preset["env_ids"] and len(preset["env_ids"]) >= 2
    runs = {algo: flags(preset["args"][algo]) for algo in benchmark.ALGOS}
    shared = ["--num-envs", "--num-minibatches", "--batch-size", "--update-epochs", "--gamma"]
    shared += ["--num-eval-envs", "--eval-interval"]
    ppo = runs["ppo_continuous"]
    for algo, parsed in runs.items():
        assert [parsed[flag] for flag in shared] == [ppo[flag] for flag in shared], algo
        if algo.startswith("gorl"):
            stages = [int(steps) for steps in parsed["--stage-timesteps"]]
            assert sum(stages) == int(ppo["--total-timesteps"][0]), algo
            assert [6 * steps / sum(stages) for steps in stages] == [2, 2, 1, 1], algo
        else:
            assert parsed["--total-timesteps"] == ppo["--total-timesteps"], algo


# estimate: the projection of a preset's runs from a few measured iterations


@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
def test_estimate_counts_the_evaluations_the_scripts_make(preset):
    """The projection's count of evaluations follows the scripts' own rule (Run.evaluation_due: a multiple of
    --eval-interval crossed, or a stage's last iteration), at every preset's sizes: GoRL's stages end between the
    paper's 6M-step evaluations."""
    import types

    import ppo_continuous

    for algo in benchmark.ALGOS:
        sizes = benchmark.run_sizes(preset, algo, "CartpoleSwingup")
        run = types.SimpleNamespace(args=types.SimpleNamespace(eval_interval=sizes["eval_interval"]), env_steps=0)
        run.args.num_envs, run.args.rollout_length = 1, sizes["steps_per_iteration"]
        evaluations = 0
        for iterations in sizes["stage_iterations"]:
            run.last_iteration = iterations
            for run.iteration in range(1, iterations + 1):
                run.env_steps += sizes["steps_per_iteration"]
                evaluations += ppo_continuous.Run.evaluation_due(run)
        assert benchmark.evaluations_after_start(sizes) == evaluations, algo
    if preset == "smoke":  # the learning runs' eval.csv: 6 rows, the first at step 0
        assert evaluations == 5


def test_estimate_takes_the_gorl_sizes_from_the_script():
    sizes = benchmark.run_sizes("paper", "gorl_ppo_fm", "CheetahRun")
    assert sizes["steps_per_iteration"] == 2048 * 480 and sizes["stage_iterations"] == [61, 61, 30, 30]
    assert sizes["collection_rollouts"] == 11 and sizes["decoder_dataset_size"] == 10_000_000
    assert sizes["decoder_epochs"] == 50
    assert benchmark.run_sizes("paper", "ppo_continuous", "CheetahRun")["stage_iterations"] == [183]


def test_projection_adds_every_phase_and_the_grid_packs_its_runs_longest_first():
    sizes = {"steps_per_iteration": 10, "stage_iterations": [4, 2], "eval_interval": 20}
    cost = {"startup_s": 100.0, "iteration_s": 5.0, "evaluation_s": 3.0, "stage_change_s": 50.0}
    # 6 iterations, evaluations at steps 20, 40 (stage 0's end) and 60 (stage 1's end), one stage change
    assert benchmark.projected_run_s(sizes, cost) == 100.0 + 6 * 5.0 + 3 * 3.0 + 50.0
    assert benchmark.wall_hours([2.0, 3.0, 2.0, 3.0, 2.0], 2) == 7.0  # longest first: 3 + 2 + 2 and 3 + 2
    assert benchmark.wall_hours([3.0, 3.0, 2.0, 2.0, 2.0], 1) == 12.0
    assert benchmark.wall_hours([5.0, 1.0], 4) == 5.0
    assert benchmark.duration(100.5) == "100:30:00 (4.2 days)" and benchmark.duration(0.0125) == "0:00:45"


@pytest.mark.slow
def test_estimate_of_the_smoke_preset_matches_the_smoke_runs(learning_runs, tmp_path):
    """The smoke preset's estimate, made here from 3 iterations (GoRL: and a stage change on a smaller dataset), against
    the same runs made in full (the learning runs): what follows start-up (iterations, evaluations, stage changes)
    within a factor of 1.5 either way of the run's wall time after its compilation. Start-up itself is compared with
    nothing: it depends on whether the compilation cache holds the programs (the learning runs may start cold)."""
    algos = [a for a in ("ppo_continuous", "gorl_ppo_fm") if f"{a}.py" in SCRIPTS]
    result = run_benchmark(
        "estimate", "--preset", "smoke", "--algos", *algos, "--out", tmp_path, "--timeout", 1200, timeout=1500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    estimate = read_json(tmp_path / "estimate.json")
    assert estimate["complete"] and [row["algo"] for row in estimate["rows"]] == algos
    for row in estimate["rows"]:
        summary = read_json(os.path.join(learning_runs(f"{row['algo']}.py")[0], "summary.json"))
        measured = summary["wall_time_s"] - summary["compile_time_s"]
        projected = row["run_hours"] * 3600 - row["cost"]["startup_s"]
        assert measured / 1.5 < projected < measured * 1.5, (row["algo"], projected, measured, row["cost"])
        assert row["cost"]["device"] == "cpu" and row["cost"]["peak_memory_bytes"] > 2**28
        assert row["cost"]["startup_s"] > 0 and row["cost"]["iteration_s"] > 0
    gorl = [row for row in estimate["rows"] if row["algo"] == "gorl_ppo_fm"]
    if gorl:  # 3 collection rollouts of 15,360 steps and 15 epochs on 40,000 pairs, projected from 2 and 2 on 30,720
        cost = gorl[0]["cost"]
        assert cost["stage_change_s"] == pytest.approx(
            3 * cost["collection_rollout_s"] + 15 * cost["decoder_epoch_s"] + cost["stage_change_rest_s"]
        )
    assert estimate["grid_run_hours"] == pytest.approx(sum(row["run_hours"] for row in estimate["rows"]))
    table = (tmp_path / "estimate.md").read_text()
    assert "| PPO | CartpoleSwingup |" in table and "run-hours" in table


@pytest.mark.slow
def test_estimate_past_its_timeout_says_what_it_left_unmeasured(tmp_path):
    result = run_benchmark(
        "estimate", "--preset", "smoke", "--algos", "ppo_continuous", "--out", tmp_path, "--timeout", 2, timeout=120
    )
    assert result.returncode != 0 and "1 rows were not measured" in result.stderr
    estimate = read_json(tmp_path / "estimate.json")
    assert not estimate["complete"] and "run_hours" not in estimate["rows"][0]
    assert "ran past" in estimate["rows"][0]["error"] or "was spent" in estimate["rows"][0]["error"]
    assert "not measured" in (tmp_path / "estimate.md").read_text()


@pytest.mark.slow
def test_estimate_refuses_a_bad_task_before_measuring_anything(tmp_path):
    result = run_benchmark("estimate", "--preset", "smoke", "--env-ids", "CartpoleSwingup", "Nope", "--out", tmp_path)
    assert result.returncode != 0 and "unknown --env-id 'Nope'" in result.stderr
    assert "measuring" not in result.stderr and not os.listdir(tmp_path)
