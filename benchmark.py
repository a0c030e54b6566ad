"""The measurements behind benchmark.sh.

    python benchmark.py returns --preset {paper,cpu,smoke} [--algos ... | --scripts PATH ...] [--env-ids ...]
                                [--seeds ...] [--out DIR] [--jobs N] [--dry-run] [--slurm [--submit]]
    python benchmark.py summarize DIR [--out DIR]
    python benchmark.py speed [--scripts ...] [--env-ids ...] [--impls ...]
    python benchmark.py estimate --preset {paper,cpu,smoke} [--algos ...] [--env-ids ...] [--seeds ...] [--jobs N]
                                 [--out DIR] [--timeout SECONDS]

`returns` runs a grid of algorithms x tasks x seeds (skipping runs that already finished, so an interrupted grid
resumes), locally or as a Slurm job array, then summarises it; --scripts runs copies of the scripts (forks) beside the
originals, each labelled by its file name. `summarize` turns any folder of run folders into
results.md (the paper's Table 1 layout, the paper's numbers beside ours), results.json and one learning-curve plot per
task. `speed` reports, for every algorithm script present, task and physics implementation, at 256 envs x 480 steps
per iteration: the training env steps per second of the script itself (from its summary.json), the env steps per
second of its jitted rollout alone, and of pure MJX stepping (a jitted scan of vmap(env.step) with random actions,
same env, impl and batch); so the share of an iteration spent in the rollout and the rollout's overhead over the
physics. For the GoRL scripts it adds the decoder's training throughput and the time of a whole stage transition.
`estimate` runs every script of a preset for a few iterations at the preset's own sizes, on this machine, and projects
each run's hours and the grid's, before a grid is started.
"""

import argparse
import glob
import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("ppo_continuous.py", "gorl_ppo_fm.py", "gorl_ppo_diffusion.py", "fpo.py", "dppo.py")
SPEED_NUM_ENVS, SPEED_ROLLOUT_LENGTH = 256, 480
# 16 minibatches x 256 sequences x 30 steps = 256 envs x 480 steps; 4 epochs keep a CPU iteration under a minute.
SPEED_ARGS = (
    "--num-envs",
    256,
    "--num-minibatches",
    16,
    "--batch-size",
    256,
    "--update-epochs",
    4,
    "--num-eval-envs",
    8,
)
SPEED_STEPS = SPEED_NUM_ENVS * SPEED_ROLLOUT_LENGTH
# GoRL: three one-iteration stages, so the second decoder fit runs on compiled programs.
GORL_SPEED_ARGS = (
    "--stage-timesteps",
    SPEED_STEPS,
    SPEED_STEPS,
    SPEED_STEPS,
    "--decoder-dataset-size",
    2 * SPEED_STEPS,
    "--decoder-batch-size",
    8192,
    "--decoder-epochs",
    5,
)


# ---------------------------------------------------------------------------------------------------------------------
# returns: the grid of runs, and its summary

ALGOS = ("ppo_continuous", "fpo", "dppo", "gorl_ppo_diffusion", "gorl_ppo_fm")  # the paper's row order
ALGO_NAMES = {
    "ppo_continuous": "PPO",
    "fpo": "FPO",
    "dppo": "DPPO",
    "gorl_ppo_diffusion": "GoRL(Diff)",
    "gorl_ppo_fm": "GoRL(FM)",
}
PAPER_TASKS = ("CheetahRun", "FingerSpin", "FingerTurnHard", "FishSwim", "HopperStand", "WalkerWalk")
# The paper's Table 1: final return, mean and std over five seeds, after 180M env steps.
PAPER_TABLE = {
    "ppo_continuous": (
        (724.83, 155.67),
        (539.03, 146.63),
        (738.70, 114.45),
        (433.70, 73.63),
        (286.09, 273.07),
        (825.65, 79.70),
    ),
    "fpo": ((599.15, 297.45), (56.05, 124.53), (752.08, 55.39), (204.66, 191.49), (3.94, 1.79), (29.00, 4.32)),
    "dppo": ((559.79, 99.97), (694.06, 191.59), (633.84, 88.21), (143.52, 26.25), (2.14, 0.81), (345.59, 64.45)),
    "gorl_ppo_diffusion": (
        (902.24, 2.20),
        (844.74, 59.43),
        (884.59, 26.95),
        (608.61, 22.07),
        (874.63, 38.79),
        (908.96, 30.45),
    ),
    "gorl_ppo_fm": (
        (883.40, 19.94),
        (903.92, 104.08),
        (860.83, 14.93),
        (641.01, 13.10),
        (733.66, 223.76),
        (919.61, 60.86),
    ),
}


# The CPU configuration of the tests and the cpu and smoke presets: 32 envs, 16 minibatches of 32 sequences of 30
# steps (15,360 env steps per iteration), 8 epochs, where every learner leaves the random policy far behind on
# CartpoleSwingup.
CPU_SIZES = ("--num-envs", 32, "--num-minibatches", 16, "--batch-size", 32, "--update-epochs", 8)
CPU_ITERATION_STEPS = 32 * 480  # --num-envs x rollout length (16 x 32 x 30 / 32 = 480 steps per env)
CPU_EVAL_INTERVAL = 4 * CPU_ITERATION_STEPS


def cpu_budget(algo, stage_iterations, decoder_pairs, decoder_epochs):
    """The arguments that give `algo` sum(stage_iterations) training iterations: GoRL in those stages, fitting its
    decoders to `decoder_pairs` pairs for `decoder_epochs` epochs; every other algorithm in one run as long."""
    if algo.startswith("gorl"):
        return (
            "--stage-timesteps",
            *(n * CPU_ITERATION_STEPS for n in stage_iterations),
            "--decoder-dataset-size",
            decoder_pairs,
            "--decoder-batch-size",
            1024,
            "--decoder-epochs",
            decoder_epochs,
        )
    return ("--total-timesteps", sum(stage_iterations) * CPU_ITERATION_STEPS)


PRESETS = {
    # The paper's protocol: every script's defaults are the paper's configuration (180M steps; GoRL 60/60/30/30M);
    # hours of GPU time per run, so each keeps its final model.
    "paper": {"env_ids": PAPER_TASKS, "seeds": (1, 2, 3, 4, 5), "args": {algo: ("--save-model",) for algo in ALGOS}},
    # A grid a 2-core CPU runs in about 1.5 hours, where learning shows (README: its results). Measured on such a
    # machine at these sizes, two runs at a time:
    # - tasks: on CartpoleSwingup PPO reached 829 at 1.23M steps (845 at 3.07M), from under 100 at step 0; on
    #   ReacherHard (at its default discount, 0.995) PPO reached 812 and FPO 903 at 1.47M steps while GoRL(FM) ended
    #   at 14 on one seed and 833 on another: the algorithms separate. PendulumSwingup (PPO 0 to 33, GoRL(FM) 2 to 52,
    #   seeds 1 to 3, seed 1 at 3.07M steps) and AcrobotSwingup (PPO 13, untrained 18) stayed near their untrained
    #   return; the paper's six tasks need a GPU.
    # - 3 seeds, the fewest that give an interval: one task's seeds went from 14 to 833.
    "cpu": {
        "env_ids": ("CartpoleSwingup", "ReacherHard"),
        "seeds": (1, 2, 3),
        "args": {
            algo: (
                *CPU_SIZES,
                # the quick start's discount on both tasks: at the tasks' default 0.995, PPO's CartpoleSwingup runs
                # ended at 219, 376 and 257 after these 1.1M steps (seeds 1 to 3), at 0.99 at 688, 588 and 842.
                "--gamma",
                0.99,
                # 32 episodes, one per env, as in the quick start and the tests.
                "--num-eval-envs",
                32,
                # every 4 iterations: 19 points per curve.
                "--eval-interval",
                CPU_EVAL_INTERVAL,
                # 72 iterations, 1,105,920 env steps, so that the 30 runs take under 2 hours: they took 4.0 to 9.4
                # minutes each (96 iterations took 5.4 to 9.2), 95 minutes in all. PPO has not reached its plateau on
                # CartpoleSwingup by then (588 to 842). GoRL in the paper's shape, 1/3, 1/3, 1/6 and 1/6, with 61,440
                # decoder pairs (four collection rollouts) and 15 epochs: at 20 epochs a fit took 29-33 s and its
                # held-out loss moved by under 0.1% after epoch 15; at 15 the three stage changes took 17-20% of a run.
                *cpu_budget(algo, (24, 24, 12, 12), 61_440, 15),
            )
            for algo in ALGOS
        },
    },
    # One cheap task, one seed, every algorithm: proves the pipeline (the tests' learning runs, so they share it).
    "smoke": {
        "env_ids": ("CartpoleSwingup",),
        "seeds": (1,),
        "args": {
            algo: (
                *CPU_SIZES,
                "--gamma",
                0.99,
                "--num-eval-envs",
                32,
                "--eval-interval",
                CPU_EVAL_INTERVAL,
                "--save-model",
                *cpu_budget(algo, (8, 4, 4, 4), 40_000, 15),
            )
            for algo in ALGOS
        },
    },
}


class Script(NamedTuple):
    """A script the grid runs: one of the five, or a copy of one (a fork) anywhere on disk."""

    path: str  # absolute
    label: str  # its file name without .py: its runs' --exp-name, which names them in the run folders and the summary
    algo: str  # its ALGO, that of the script it was copied from: it takes that script's arguments in a preset


ALGO_LINE = re.compile(r'^ALGO = "(\w+)"$', re.MULTILINE)


def script_at(path):
    """The Script at `path`; exits with one line where it is neither one of the five scripts nor a copy of one."""
    path = os.path.abspath(path)
    label = os.path.basename(path).removesuffix(".py")
    try:
        with open(path) as f:
            algo = ALGO_LINE.search(f.read())
    except OSError as error:
        sys.exit(f"error: --scripts {path}: {error.strerror}")
    if not path.endswith(".py") or algo is None or algo.group(1) not in ALGOS:
        sys.exit(
            f"error: --scripts {path} is neither an algorithm script nor a copy of one: a copy keeps the line "
            f'ALGO = "..." of its original, one of {", ".join(ALGOS)}'
        )
    if not re.fullmatch(r"[\w-]+", label):
        sys.exit(f"error: --scripts {path}: name a copy with letters, digits, '_' and '-' only (it labels its runs)")
    if label in ALGOS and path != os.path.join(ROOT, f"{label}.py"):
        sys.exit(f"error: --scripts {path}: give the copy a file name of its own; {label} labels the original's runs")
    return Script(path, label, algo.group(1))


def selected_scripts(args):
    """The Scripts of --scripts, else of --algos, else every algorithm script present; labels must differ."""
    if args.scripts:
        scripts = [script_at(path) for path in args.scripts]
    else:
        paths = [os.path.join(ROOT, f"{algo}.py") for algo in args.algos or ALGOS]
        scripts = [script_at(path) for path in paths if os.path.exists(path)]
    labels = [script.label for script in scripts]
    if len(set(labels)) < len(labels):
        sys.exit(f"error: --scripts: two scripts share a file name ({', '.join(labels)}), so their runs would mix")
    return scripts


def cell_command(preset, script, env_id, seed, out):
    """The command that runs one cell of the grid under out/runs: the interrupted run's --resume where one left a
    checkpoint, else a new run with the preset's arguments of the script's ALGO."""
    interrupted = [
        os.path.dirname(path)
        for path in glob.glob(os.path.join(out, "runs", f"{env_id}__{script.label}__{seed}__*", "checkpoint.msgpack"))
        if not os.path.exists(os.path.join(os.path.dirname(path), "summary.json"))
    ]
    if interrupted:
        return [sys.executable, script.path, "--resume", max(interrupted, key=os.path.getmtime)]
    command = [sys.executable, script.path, "--env-id", env_id, "--seed", str(seed), "--exp-name", script.label]
    return command + [*map(str, PRESETS[preset]["args"][script.algo]), "--run-dir", os.path.join(out, "runs")]


def grid(preset, scripts, env_ids, seeds, out):
    """[(label, env_id, seed, command)] for every cell of the grid."""
    cells = []
    for env_id in env_ids:
        for script in scripts:
            for seed in seeds:
                cells.append((script.label, env_id, seed, cell_command(preset, script, env_id, seed, out)))
    return cells


def finished(out, label, env_id, seed):
    return bool(glob.glob(os.path.join(out, "runs", f"{env_id}__{label}__{seed}__*", "summary.json")))


def visible_gpus():
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES where set, else those nvidia-smi lists (none without it)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]


def job_environment(slot, jobs, gpus):
    """Environment variables of the run in job slot `slot` of `jobs`: with several jobs, each slot gets one GPU
    (round-robin), and JAX allocates GPU memory as it needs it instead of taking 75% of it up front, so that jobs
    sharing a GPU do not run each other out of memory."""
    if jobs == 1:
        return {}
    environment = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if gpus:
        environment["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return environment


def slurm_script(out, commands_file, num_tasks, options):
    """A job array, one task per unfinished run. A task stopped by preemption or by its time limit (Slurm sends SIGTERM,
    the run writes a checkpoint and exits with 143) is requeued, and its command then resumes the run."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=gorl-benchmark",
        f"#SBATCH --array=0-{num_tasks - 1}",
        f"#SBATCH --output={os.path.join(out, 'slurm', '%A_%a.log')}",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=48:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=TERM@300",
        *(f"#SBATCH {option}" for option in options),
        "# One run of the grid per array task; when all have finished: python benchmark.py summarize " + out,
        "set -uo pipefail",
        f"cd {shlex.quote(ROOT)}",
        f"export JAX_COMPILATION_CACHE_DIR={shlex.quote(os.path.join(ROOT, '.cache', 'jax'))}",
        f'srun bash -c "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(commands_file)})"',
        "status=$?",
        'if [ "$status" -eq 143 ]; then scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def returns(args):
    preset = PRESETS[args.preset]
    scripts = selected_scripts(args)
    env_ids, seeds = args.env_ids or preset["env_ids"], args.seeds or preset["seeds"]
    out = os.path.abspath(args.out or os.path.join(ROOT, "benchmark_results", args.preset))
    cells = grid(args.preset, scripts, env_ids, seeds, out)
    todo = [cell for cell in cells if not finished(out, *cell[:3])]
    print(f"{len(cells)} runs in the grid, {len(cells) - len(todo)} already finished, {len(todo)} to run", flush=True)
    if args.dry_run:
        for *_, command in todo:
            print(shlex.join(command))
        return
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    if args.slurm:
        os.makedirs(os.path.join(out, "slurm"), exist_ok=True)
        commands_file = os.path.join(out, "slurm", "commands.txt")
        with open(commands_file, "w") as f:
            # Each task works out its command when it starts, so that a requeued task resumes its run.
            path_of = {script.label: script.path for script in scripts}
            f.writelines(
                shlex.join(
                    [sys.executable, os.path.abspath(__file__), "_cell", args.preset, path_of[label], env_id, str(seed)]
                    + [out]
                )
                + "\n"
                for label, env_id, seed, _ in todo
            )
        sbatch = os.path.join(out, "slurm", "grid.sbatch")
        with open(sbatch, "w") as f:
            f.write(slurm_script(out, commands_file, max(len(todo), 1), args.slurm_option))
        print(f"wrote {sbatch} ({len(todo)} array tasks) and {commands_file}")
        if args.submit and todo:
            subprocess.run(["sbatch", sbatch], check=True)
        return
    failed = run_locally(todo, out, args.jobs)
    summarize_folder(out, out, expected=[cell[:3] for cell in cells])
    if failed:
        sys.exit(f"error: {len(failed)} runs failed; their logs: " + ", ".join(failed))


def run_locally(cells, out, jobs):
    """Run the commands, `jobs` at a time (each on its own GPU where there are several), each logging to out/logs;
    returns the logs of the runs that failed."""
    pending, running, failed, gpus = list(cells), {}, [], visible_gpus()
    while pending or running:
        for slot in [slot for slot in range(jobs) if slot not in running][: len(pending)]:
            algo, env_id, seed, command = pending.pop(0)
            log_path = os.path.join(out, "logs", f"{env_id}__{algo}__{seed}.log")
            log = open(log_path, "a")
            environment = job_environment(slot, jobs, gpus)
            device = f", GPU {environment['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in environment else ""
            resumed = " (resumed)" if "--resume" in command else ""
            print(f"start  {algo} on {env_id}, seed {seed}{resumed}{device} (log: {log_path})", flush=True)
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **environment}
            )
            running[slot] = process, log, log_path
        time.sleep(1.0)
        for slot, (process, log, log_path) in [(s, r) for s, r in running.items() if r[0].poll() is not None]:
            del running[slot]
            log.close()
            print(f"{'done ' if process.returncode == 0 else 'FAILED'} {log_path}", flush=True)
            if process.returncode != 0:
                failed.append(log_path)
    return failed


def read_runs(folder):
    """Every finished run under `folder` (a summary.json beside an eval.csv); the newest per (label, env, seed). A run's
    label is its --exp-name (config.json), by default its script's file name: a fork's runs stand apart from its
    original's."""
    runs = {}
    for summary_path in sorted(glob.glob(os.path.join(folder, "**", "summary.json"), recursive=True)):
        path = os.path.dirname(summary_path)
        with open(summary_path) as f:
            summary = json.load(f)
        with open(os.path.join(path, "eval.csv")) as f:
            rows = [tuple(map(float, line.split(","))) for line in f.read().splitlines()[1:] if line]
        label = summary["algo"]
        if os.path.exists(os.path.join(path, "config.json")):
            with open(os.path.join(path, "config.json")) as f:
                label = json.load(f).get("exp_name", label)
        run = {**summary, "label": label, "path": path, "curve": rows}
        cell = (label, summary["env_id"], summary["seed"])
        if cell not in runs or os.path.getmtime(summary_path) > os.path.getmtime(
            os.path.join(runs[cell]["path"], "summary.json")
        ):
            runs[cell] = run
    return runs


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize_folder(folder, out, expected=None):
    """Write results.md, results.json and curves_{task}.png for the runs under `folder` into `out`."""
    runs = read_runs(folder)
    algos = [a for a in ALGOS if any(cell[0] == a for cell in runs)] + sorted({c[0] for c in runs} - set(ALGOS))
    env_ids = sorted(
        {cell[1] for cell in runs},
        key=lambda e: (e not in PAPER_TASKS, PAPER_TASKS.index(e) if e in PAPER_TASKS else e),
    )
    seeds = sorted({cell[2] for cell in runs})
    expected = expected if expected is not None else [(a, e, s) for a in algos for e in env_ids for s in seeds]
    missing = [cell for cell in expected if tuple(cell) not in runs]

    table = {}
    for algo in algos:
        for env_id in env_ids:
            cell_runs = {s: r for (a, e, s), r in runs.items() if a == algo and e == env_id}
            if not cell_runs:
                continue
            mean, std = mean_std([r["final_eval_return"] for r in cell_runs.values()])
            entry = {"mean": mean, "std": std, "n": len(cell_runs), "seeds": sorted(cell_runs)}
            # Runs older than the evaluation modes reported the deterministic policy.
            entry["eval_mode"] = "/".join(sorted({r.get("eval_mode", "deterministic") for r in cell_runs.values()}))
            other = [
                r.get(f"final_{mode}_eval_return")
                for r in cell_runs.values()
                for mode in ("deterministic", "stochastic")
                if mode != r.get("eval_mode", "deterministic")
            ]
            if None not in other:
                entry["other_mode_mean"], entry["other_mode_std"] = mean_std(other)
            entry["env_steps"] = sorted({r["env_steps"] for (a, e, _), r in runs.items() if a == algo and e == env_id})
            if algo in PAPER_TABLE and env_id in PAPER_TASKS:
                entry["paper_mean"], entry["paper_std"] = PAPER_TABLE[algo][PAPER_TASKS.index(env_id)]
            table.setdefault(algo, {})[env_id] = entry
    # The best mean per task, bolded only where one algorithm holds it alone.
    best = {}
    for env_id in env_ids:
        means = [(table[a][env_id]["mean"], a) for a in table if env_id in table[a]]
        top = max(mean for mean, _ in means)
        winners = [a for mean, a in means if mean == top]
        best[env_id] = winners[0] if len(winners) == 1 else None

    lines = [
        "# Final evaluation return (mean +- std over seeds; best per task in bold) beside the paper's Table 1",
        "",
        "Each algorithm in the mode the paper's numbers were made in (in brackets): PPO and GoRL deterministic, FPO and "
        "DPPO stochastic. results.json holds the other mode's returns too.",
        "",
        "| method | " + " | ".join(env_ids) + " |",
        "|---|" + "---|" * len(env_ids),
    ]
    for algo in algos:
        cells = []
        for env_id in env_ids:
            entry = table.get(algo, {}).get(env_id)
            if entry is None:
                cells.append("missing")
                continue
            ours = f"{entry['mean']:.1f} +- {entry['std']:.1f}" if entry["n"] > 1 else f"{entry['mean']:.1f}"
            ours = f"**{ours}**" if best[env_id] == algo else ours
            paper = f" (paper {entry['paper_mean']:.1f} +- {entry['paper_std']:.1f})" if "paper_mean" in entry else ""
            cells.append(f"{ours} [n={entry['n']}]{paper}")
        modes = sorted({entry["eval_mode"] for entry in table.get(algo, {}).values()})
        lines.append(f"| {ALGO_NAMES.get(algo, algo)} ({', '.join(modes)}) | " + " | ".join(cells) + " |")
    steps = sorted({s for algo in table for entry in table[algo].values() for s in entry["env_steps"]})
    lines += ["", f"Env steps per run: {', '.join(f'{s:,}' for s in steps)}. Runs read from {folder}."]
    if missing:
        lines += ["", f"Missing runs ({len(missing)}): " + "; ".join(f"{a} on {e}, seed {s}" for a, e, s in missing)]
    aggregate = aggregate_over_tasks(runs, algos, env_ids)
    lines += aggregate_lines(aggregate)
    lines += warm_start_lines(runs, algos, env_ids)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {
                "table": table,
                "missing": [{"algo": a, "env_id": e, "seed": s} for a, e, s in missing],
                "aggregate": aggregate,
                "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs.values()],
            },
            f,
            indent=2,
        )
    for env_id in env_ids:
        plot_curves(runs, algos, env_id, os.path.join(out, f"curves_{env_id}.png"))
    if aggregate["algos"]:
        plot_performance_profiles(aggregate, os.path.join(out, "performance_profile.png"))
    print("\n".join(lines))


def warm_start_lines(runs, algos, env_ids):
    """results.md's section on GoRL's stage changes: at each, the stochastic return of the encoder the new decoder was
    fitted to and of the restarted encoder through the new decoder, on the same episodes (the warm start)."""
    changes = [
        (algo, env_id, seed, run["stages"][1:])
        for algo in algos
        for env_id in env_ids
        for (a, e, seed), run in sorted(runs.items())
        if (a, e) == (algo, env_id) and len(run.get("stages", ())) > 1
    ]
    if not changes:
        return []
    columns = max(len(stages) for *_, stages in changes)
    lines = [
        "",
        "## GoRL's stage changes: the behavioural warm start",
        "",
        "At each change, the stochastic return of the encoder the new decoder was fitted to (through its own decoder) "
        "-> that of the encoder restarted at the prior, through the new decoder, on the same episodes and noise. "
        "The learning curves mark the changes with dotted lines.",
        "",
        "| method | task | seed | " + " | ".join(f"stage {i}" for i in range(1, columns + 1)) + " |",
        "|---|---|---|" + "---|" * columns,
    ]
    for algo, env_id, seed, stages in changes:
        cells = [f"{s['stochastic_return_before']:.1f} -> {s['warm_start_return']:.1f}" for s in stages]
        cells += [""] * (columns - len(cells))
        lines.append(f"| {ALGO_NAMES.get(algo, algo)} | {env_id} | {seed} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(runs, algos, env_id, path):
    """Eval return against env steps for one task: the mean over seeds and a band of one std, per algorithm; GoRL's
    stage changes as dotted lines in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for algo in algos:
        curves = [r["curve"] for (a, e, _), r in runs.items() if a == algo and e == env_id]
        if not curves:
            continue
        steps = sorted(set.intersection(*({row[0] for row in curve} for curve in curves)))
        by_step = [[dict((row[0], row[1]) for row in curve)[step] for curve in curves] for step in steps]
        means, stds = zip(*(mean_std(values) for values in by_step), strict=True) if steps else ((), ())
        line = axes.plot(steps, means, label=f"{ALGO_NAMES.get(algo, algo)} ({len(curves)} seeds)")[0]
        axes.fill_between(
            steps,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
        stages = [stage for (a, e, _), r in runs.items() if (a, e) == (algo, env_id) for stage in r.get("stages", [])]
        for change in sorted({stage["env_steps"] for stage in stages})[:-1]:  # every stage's end but the run's
            axes.axvline(change, color=line.get_color(), linestyle=":", alpha=0.7)
    axes.set(title=env_id, xlabel="env steps", ylabel="eval return")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# The aggregate over tasks of rliable (Agarwal et al., "Deep RL at the Edge of the Statistical Precipice", NeurIPS 2021),
# computed with scipy rather than rliable itself, which brings arch, pandas and seaborn along: rliable's IQM is
# scipy.stats.trim_mean(scores, 0.25) over all runs of all tasks, and its stratified bootstrap, which resamples each
# task's runs on their own, is scipy.stats.bootstrap given one sample per task (paired=False).
DMC_RETURN_RANGE = (0.0, 1000.0)  # 1000 steps, each rewarded in [0, 1]
AGGREGATE_RESAMPLES = 50_000  # rliable's default for interval estimates
PROFILE_RESAMPLES = 2_000  # rliable's default for performance profiles, whose statistic is a whole curve
PROFILE_TAUS = 101  # thresholds 0, 0.01, ..., 1
BOOTSTRAP_SEED = 0  # the same resamples every time, so results.md does not change unless the runs do


def iqm_and_mean(scores_by_task):
    """[IQM, mean] of normalised scores given one array per task (runs on the last axis, any axes before it broadcast),
    as rliable defines them: the IQM pools all runs of all tasks and drops the int(n / 4) lowest and highest of the n
    (trim_mean's cut, rliable's too: below 4 runs nothing is dropped); the mean is the mean over tasks of each task's
    mean, so that every task weighs the same. rliable needs as many runs on every task; where counts differ, a task
    with more runs weighs more in the pooled IQM."""
    import numpy as np
    from scipy import stats

    iqm = stats.trim_mean(np.concatenate(scores_by_task, axis=-1), 0.25, axis=-1)
    mean = np.mean([np.mean(scores, axis=-1) for scores in scores_by_task], axis=0)
    return np.stack([iqm, mean], axis=-1)


def performance_profile(scores_by_task, taus):
    """For each tau, the fraction of runs whose normalised score exceeds it, averaged over tasks (one array per task,
    as in iqm_and_mean): rliable's score distribution, which takes the fraction of all runs x tasks and so weighs tasks
    equally only because it needs as many runs on every task; averaging per task keeps that weighting when counts
    differ."""
    import numpy as np

    return np.mean([np.mean(scores[..., None, :] > taus[:, None], axis=-1) for scores in scores_by_task], axis=0)


def stratified_bootstrap(scores_by_task, statistic, resamples):
    """statistic(scores_by_task) and the bounds of its 95% interval: the 2.5 and 97.5 percentiles of the statistic over
    `resamples` stratified resamples, each of which redraws every task's runs with replacement, task by task, so that it
    keeps every task and its number of runs (rliable's get_interval_estimates, method "percentile"). It measures the
    uncertainty of having run only these seeds on these tasks. `statistic` broadcasts over the axes before the runs."""
    import numpy as np
    from scipy import stats

    point = statistic(scores_by_task)
    # scipy refuses a sample of one run; resampling it could only give it back, so such a task stays as it is.
    varying = [i for i, scores in enumerate(scores_by_task) if len(scores) > 1]
    if not varying:
        return point, point, point  # one run per task: nothing to resample, the interval shrinks to the point

    def resampled_statistic(*resampled, axis=-1):  # scipy's batches: (resamples, runs), so axis is always -1
        tasks = list(scores_by_task)
        for i, scores in zip(varying, resampled, strict=True):
            tasks[i] = scores
        batch = resampled[0].shape[:-1]
        # scipy wants the resamples on the statistic's last axis.
        return np.moveaxis(statistic([np.broadcast_to(s, (*batch, s.shape[-1])) for s in tasks]), 0, -1)

    result = stats.bootstrap(
        [scores_by_task[i] for i in varying],
        resampled_statistic,
        n_resamples=resamples,
        vectorized=True,
        paired=False,  # each task resampled on its own: the stratified bootstrap
        method="percentile",
        confidence_level=0.95,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return point, result.confidence_interval.low, result.confidence_interval.high


def aggregate_over_tasks(runs, algos, env_ids):
    """The tasks on which every algorithm has runs and, over those tasks, each algorithm's IQM and mean normalised final
    return with their 95% stratified-bootstrap intervals and its performance profile with its 95% band. Only tasks
    that every algorithm ran enter, so that each algorithm's aggregate is over the same tasks."""
    import numpy as np

    tasks = [e for e in env_ids if all(any(cell[:2] == (algo, e) for cell in runs) for algo in algos)]
    taus = np.linspace(0.0, 1.0, PROFILE_TAUS)
    low, high = DMC_RETURN_RANGE
    aggregate = {
        "tasks": tasks,
        "return_range": [low, high],
        "resamples": AGGREGATE_RESAMPLES,
        "profile_resamples": PROFILE_RESAMPLES,
        "taus": taus.tolist(),
        "algos": {},
    }
    for algo in algos if tasks else ():
        scores_by_task = []
        for env_id in tasks:
            returns = [r["final_eval_return"] for (a, e, _), r in sorted(runs.items()) if (a, e) == (algo, env_id)]
            scores_by_task.append((np.array(returns) - low) / (high - low))
        point, lower, upper = stratified_bootstrap(scores_by_task, iqm_and_mean, AGGREGATE_RESAMPLES)
        profile, profile_lower, profile_upper = stratified_bootstrap(
            scores_by_task, lambda scores: performance_profile(scores, taus), PROFILE_RESAMPLES
        )
        aggregate["algos"][algo] = {
            "runs_per_task": {env_id: len(scores) for env_id, scores in zip(tasks, scores_by_task, strict=True)},
            "iqm": float(point[0]),
            "iqm_ci": [float(lower[0]), float(upper[0])],
            "mean": float(point[1]),
            "mean_ci": [float(lower[1]), float(upper[1])],
            "profile": profile.tolist(),
            "profile_ci": [profile_lower.tolist(), profile_upper.tolist()],
        }
    return aggregate


def aggregate_lines(aggregate):
    """The aggregate's section of results.md."""
    tasks, low, high = aggregate["tasks"], *aggregate["return_range"]
    lines = ["", "## Aggregate over tasks: IQM and mean of normalised final returns, with 95% bootstrap intervals", ""]
    if not aggregate["algos"]:
        return lines + ["No task has runs of every algorithm, so there is no aggregate."]
    lines += [
        f"The table's final returns on the {len(tasks)} task{'s' * (len(tasks) > 1)} every algorithm ran "
        f"({', '.join(tasks)}), normalised by the DMC return range [{low:g}, {high:g}]. IQM: rliable's interquartile "
        "mean (Agarwal et al., NeurIPS 2021), the mean of all tasks' runs pooled without the int(n / 4) lowest and "
        "highest (under 4 runs, the plain mean): an outlier seed moves it little, and it is less noisy than the median. "
        "Mean: over tasks, of each task's mean (the optimality gap at 1 is 1 - mean). [a, b]: the 95% stratified "
        f"bootstrap interval ({aggregate['resamples']:,} resamples, each redrawing every task's runs with replacement, "
        "task by task): the uncertainty from the seeds, not from the choice of tasks; a task with one run adds none, "
        "and with one run per task there is none. performance_profile.png: the fraction of runs above each normalised "
        f"score, averaged over tasks, with its 95% band ({aggregate['profile_resamples']:,} resamples).",
    ]
    if any(len(set(entry["runs_per_task"].values())) > 1 for entry in aggregate["algos"].values()):
        lines[-1] += " Runs per task differ: the IQM pools runs, so there a task with more runs weighs more."
    lines += [
        "",
        "| method | runs | IQM [95% CI] | mean [95% CI] |",
        "|---|---|---|---|",
    ]
    for algo, entry in aggregate["algos"].items():
        counts = list(entry["runs_per_task"].values())
        per_task = f"{counts[0]} per task" if len(set(counts)) == 1 else f"{', '.join(map(str, counts))} per task"
        if max(counts) == 1:
            iqm, mean = f"{entry['iqm']:.3f} (no interval)", f"{entry['mean']:.3f} (no interval)"
        else:
            iqm = f"{entry['iqm']:.3f} [{entry['iqm_ci'][0]:.3f}, {entry['iqm_ci'][1]:.3f}]"
            mean = f"{entry['mean']:.3f} [{entry['mean_ci'][0]:.3f}, {entry['mean_ci'][1]:.3f}]"
        lines.append(f"| {ALGO_NAMES.get(algo, algo)} | {sum(counts)} ({per_task}) | {iqm} | {mean} |")
    return lines


def plot_performance_profiles(aggregate, path):
    """rliable's performance profile: per algorithm, the fraction of runs whose normalised final return exceeds tau,
    against tau, with its 95% stratified-bootstrap band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for algo, entry in aggregate["algos"].items():
        runs = sum(entry["runs_per_task"].values())
        label = f"{ALGO_NAMES.get(algo, algo)} ({runs} runs)"
        line = axes.plot(aggregate["taus"], entry["profile"], label=label)[0]
        axes.fill_between(aggregate["taus"], *entry["profile_ci"], color=line.get_color(), alpha=0.2)
    low, high = aggregate["return_range"]
    axes.set(
        title=f"Performance profile, runs of {len(aggregate['tasks'])} task{'s' * (len(aggregate['tasks']) > 1)}",
        xlabel=rf"final return normalised by [{low:g}, {high:g}], $\tau$",
        ylabel=r"fraction of runs with score > $\tau$",
        xlim=(0.0, 1.0),
        ylim=(0.0, 1.02),
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# speed


def mean_time(fn, state, next_state, warmup=2, calls=5):
    """Mean wall time of `calls` calls of fn(state, key), each starting from the state the previous one ended in (so
    that episodes end, and the envs reset, at their natural rate), after `warmup` calls (the first compiles)."""
    import jax

    for call in range(warmup + calls):
        if call == warmup:
            start = time.perf_counter()
        state = next_state(jax.block_until_ready(fn(state, jax.random.key(call))))
    return (time.perf_counter() - start) / calls


def rollout_alone(module, env, episode_length):
    """The script's rollout, the function that makes its first carry, and the network inputs its main() builds (from
    the script's own make_networks) for rollout(*inputs, carry, key). The inputs are arguments, not constants baked
    into the program, so that XLA cannot fold them (GoRL(Diff)'s stage-0 decoder would skip its whole chain)."""
    import jax

    key = jax.random.key(0)
    (policy, _, *decoder_network), params = module.make_networks(env, key)
    obs_stats = module.init_running_stats(env.observation_size)
    if decoder_network:  # GoRL: the latent policy acts through the stage-0 decoder
        decoder = module.identity_decoder(*decoder_network, key, env.observation_size, env.action_size)
        init, rollout = module.make_rollout(env, policy, *decoder_network, SPEED_ROLLOUT_LENGTH, episode_length)
        return init, rollout, (params["latent_policy"], obs_stats, decoder)
    init, rollout = module.make_rollout(env, policy, SPEED_ROLLOUT_LENGTH, episode_length)
    return init, rollout, (params["policy"], obs_stats)


def measure_stepping(script, env_id, impl):
    """Env steps per second of the script's rollout alone and of pure stepping, in this process."""
    import jax
    from jax import lax

    module = importlib.import_module(script.removesuffix(".py"))
    env, episode_length = module.make_env(env_id, impl)
    init, rollout, inputs = rollout_alone(module, env, episode_length)
    carry = init(SPEED_NUM_ENVS)

    @jax.jit
    def pure_stepping(env_state, key):
        def step(env_state, key):
            actions = jax.random.uniform(key, (SPEED_NUM_ENVS, env.action_size), minval=-1.0, maxval=1.0)
            return jax.vmap(env.step)(env_state, actions), None

        return lax.scan(step, env_state, jax.random.split(key, SPEED_ROLLOUT_LENGTH))[0]

    rollout = jax.jit(rollout)
    rollout_time = mean_time(lambda carry, key: rollout(*inputs, carry, key), carry, lambda outputs: outputs[0])
    env_state = rollout(*inputs, carry, jax.random.key(1))[0].env_state  # begun episodes (the first carry has none)
    stepping_time = mean_time(pure_stepping, env_state, lambda env_state: env_state)
    return {"rollout_sps": SPEED_STEPS / rollout_time, "pure_step_sps": SPEED_STEPS / stepping_time}


def speed_command(script, env_id, impl, *args):
    """The script's command line at the speed configuration, evaluating only before and after training."""
    command = [sys.executable, os.path.join(ROOT, script), "--env-id", env_id, "--impl", impl, *SPEED_ARGS]
    return [*map(str, command), *map(str, args), "--eval-interval", str(10**12)]


def measure_training(script, env_id, impl, timeout):
    """Training env steps per second (and GoRL's stage transitions) of the script run as a user runs it."""
    is_gorl = script.startswith("gorl")
    budget = GORL_SPEED_ARGS if is_gorl else ("--total-timesteps", 3 * SPEED_STEPS)
    with tempfile.TemporaryDirectory() as run_dir:
        command = speed_command(script, env_id, impl, *budget, "--run-dir", run_dir)
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        (run_name,) = os.listdir(run_dir)
        with open(os.path.join(run_dir, run_name, "summary.json")) as f:
            summary = json.load(f)
    measured = {"train_sps": summary["train_sps"]}
    if is_gorl:
        last_transition = summary["stages"][-1]  # the second fit: its programs were already compiled
        measured["decoder_pairs_per_s"] = last_transition["decoder_pairs_per_s"]
        measured["transition_time_s"] = last_transition["transition_time_s"]
    return measured


def measure_startup(script, env_id, impl, timeout):
    """Seconds from the start of the script's process to the end of its second training iteration, first with an empty
    compilation cache (cold), then with the cache that run filled (warm): what a user waits before the first results,
    its two iterations included (GoRL: in one stage)."""
    budget = ("--stage-timesteps" if script.startswith("gorl") else "--total-timesteps", 2 * SPEED_STEPS)
    startup = {}
    with tempfile.TemporaryDirectory() as folder:
        for start in ("cold", "warm"):
            cache = os.path.join(folder, "cache")
            command = speed_command(
                script, env_id, impl, *budget, "--run-dir", folder, "--compilation-cache-dir", cache
            )
            begin = time.perf_counter()
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for line in process.stdout:
                if re.search(r"\biter +2/", line):
                    startup[f"startup_{start}_s"] = time.perf_counter() - begin
            if process.wait(timeout) != 0 or f"startup_{start}_s" not in startup:
                raise RuntimeError(f"{' '.join(command)} failed or printed no second iteration")
    return startup


def speed(args):
    scripts = [s for s in args.scripts if os.path.exists(os.path.join(ROOT, s))]
    rows = []
    for script in scripts:
        for env_id in args.env_ids:
            for impl in args.impls:
                print(f"measuring {script} on {env_id} ({impl})...", file=sys.stderr, flush=True)
                row = {"script": script, "env_id": env_id, "impl": impl}
                if "stepping" in args.measure:
                    command = [sys.executable, __file__, "_stepping", script, env_id, impl]
                    # One process per measurement: MJX-Warp can hang a process that fails, hence the timeout.
                    stepping = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
                    if stepping.returncode != 0:
                        raise RuntimeError(f"stepping measurement failed:\n{stepping.stderr[-2000:]}")
                    row.update(json.loads(stepping.stdout.splitlines()[-1]))
                if "training" in args.measure:
                    row.update(measure_training(script, env_id, impl, args.timeout))
                if "startup" in args.measure:
                    row.update(measure_startup(script, env_id, impl, args.timeout))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(speed_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


SPEED_MEASUREMENTS = ("stepping", "training", "startup")  # what `speed --measure` can choose
SPEED_COLUMNS = (  # (header, row key, format) after script, task and impl
    ("training", "train_sps", ",.0f"),
    ("rollout alone", "rollout_sps", ",.0f"),
    ("pure stepping", "pure_step_sps", ",.0f"),
    ("rollout / pure stepping time", "pure_step_time_ratio", ".2f"),
    ("rollout share of an iteration", "rollout_share", ".0%"),
    ("decoder pairs/s", "decoder_pairs_per_s", ",.0f"),
    ("stage transition (s)", "transition_time_s", ".1f"),
    ("start-up to iteration 2, cold (s)", "startup_cold_s", ".0f"),
    ("warm (s)", "startup_warm_s", ".0f"),
)


def speed_table(rows):
    lines = [
        f"Env steps per second at {SPEED_NUM_ENVS} envs x {SPEED_ROLLOUT_LENGTH} steps per iteration "
        f"({' '.join(map(str, SPEED_ARGS))}).",
        "",
        "| script | task | impl | " + " | ".join(header for header, _, _ in SPEED_COLUMNS) + " |",
        "|---|---|---|" + "---:|" * len(SPEED_COLUMNS),
    ]
    for r in rows:
        r = {
            **r,
            "pure_step_time_ratio": r["pure_step_sps"] / r["rollout_sps"] if "pure_step_sps" in r else None,
            "rollout_share": r["train_sps"] / r["rollout_sps"] if {"train_sps", "rollout_sps"} <= set(r) else None,
        }
        cells = [r["script"], r["env_id"], r["impl"]]
        for _, key, spec in SPEED_COLUMNS:  # a blank where --measure left it out (or for a script without it)
            cells.append("" if r.get(key) is None else format(r[key], spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# estimate: what a preset's runs will cost, measured on this machine at the preset's own sizes

ESTIMATE_DECODER_ROLLOUTS = 2  # GoRL's measured collection: two rollouts (the second timed), at most the preset's


def run_sizes(preset, algo, env_id):
    """The script's arguments in the preset, as the script checks and completes them: env steps per iteration,
    iterations per stage (one stage for PPO, FPO, DPPO), evaluations and, for GoRL, collection and decoder sizes."""
    import tyro

    module = importlib.import_module(algo)
    arguments = ["--env-id", env_id, *map(str, PRESETS[preset]["args"][algo])]
    args = tyro.cli(module.Args, args=arguments)
    module.check_args(args)
    sizes = {
        "steps_per_iteration": args.num_envs * args.rollout_length,
        "stage_iterations": list(getattr(args, "stage_iterations", (getattr(args, "num_iterations", 0),))),
        "eval_interval": args.eval_interval,
    }
    if algo.startswith("gorl"):
        sizes.update(
            collection_rollouts=args.collection_rollouts,
            decoder_dataset_size=args.decoder_dataset_size,
            decoder_epochs=args.decoder_epochs,
        )
    return sizes


def evaluations_after_start(sizes):
    """How many evaluations a run makes after the one at its first step: one where an iteration crosses a multiple of
    --eval-interval or ends its stage (the scripts' rule)."""
    evaluations, steps, per_iteration = 0, 0, sizes["steps_per_iteration"]
    for iterations in sizes["stage_iterations"]:
        for iteration in range(1, iterations + 1):
            steps += per_iteration
            crossed = steps // sizes["eval_interval"] > (steps - per_iteration) // sizes["eval_interval"]
            evaluations += crossed or iteration == iterations
    return evaluations


def measurement_arguments(algo, sizes):
    """What the measured run changes in the preset's arguments: three iterations (the first, then two timed), an
    evaluation after the second; GoRL then changes stage once, on a dataset of at most two rollouts and two decoder
    epochs, and trains one iteration of stage 1."""
    steps = sizes["steps_per_iteration"]
    arguments = ["--eval-interval", 2 * steps]
    if not algo.startswith("gorl"):
        return [*arguments, "--total-timesteps", 3 * steps]
    return [
        *arguments,
        *("--stage-timesteps", 3 * steps, steps),
        *("--decoder-dataset-size", measured_dataset(sizes), "--decoder-epochs", 2, "--decoder-patience", 2),
    ]


def measured_dataset(sizes):
    """The (state, action) pairs GoRL's measured stage change collects and fits: the preset's, at most two rollouts."""
    return min(sizes["decoder_dataset_size"], ESTIMATE_DECODER_ROLLOUTS * sizes["steps_per_iteration"])


def time_lines(command, timeout):
    """Run `command`, echoing its progress lines; returns [(seconds since it started, line)] of its console, and its
    exit status (None where it ran past `timeout` seconds and was killed)."""
    begin, lines = time.perf_counter(), []
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timer = threading.Timer(timeout, process.kill)  # MJX-Warp can hang a failing process: never wait forever
    timer.start()
    for line in process.stdout:
        lines.append((time.perf_counter() - begin, line.rstrip("\n")))
        if re.match(r"(stage \d+ )?iter |eval |compiled in |stage \d+: |  (collected|decoder epoch)", line):
            print(f"  {lines[-1][0]:7.1f} s  {line.strip()}", file=sys.stderr, flush=True)
    returncode = process.wait()
    timer.cancel()
    return lines, None if time.perf_counter() - begin >= timeout else returncode


def time_of(lines, pattern):
    """The time of the first console line that matches `pattern`."""
    matches = [t for t, line in lines if re.search(pattern, line)]
    if not matches:
        raise RuntimeError(
            f"no line matched {pattern!r}; the run's console ended:\n" + "\n".join(line for _, line in lines[-20:])
        )
    return matches[0]


def measure_cost(algo, env_id, preset, sizes, timeout):
    """Run the script at the preset's sizes for the measurement's few iterations and time its phases from its console:
    start-up (process start to the end of the first iteration, less one iteration), the two timed iterations, an
    evaluation with its checkpoint, and GoRL's stage change, which is projected to the preset's dataset and epochs."""
    per_iteration = sizes["steps_per_iteration"]
    with tempfile.TemporaryDirectory() as run_dir:
        script = script_at(os.path.join(ROOT, f"{algo}.py"))
        command = [*cell_command(preset, script, env_id, 1, run_dir)[:-2], "--run-dir", run_dir]
        command += map(str, measurement_arguments(algo, sizes))
        lines, returncode = time_lines(command, timeout)
        if returncode != 0:
            reason = f"ran past {timeout:.0f} s" if returncode is None else f"exited with {returncode}"
            raise RuntimeError(f"{shlex.join(command)} {reason}:\n" + "\n".join(line for _, line in lines[-20:]))
        (run_name,) = os.listdir(run_dir)
        with open(os.path.join(run_dir, run_name, "summary.json")) as f:
            summary = json.load(f)
    # (when its line was printed, its own seconds from its SPS) for each of the first three iterations: its own time
    # leaves out the evaluation and checkpoint that may follow it.
    iterations = [
        (t, per_iteration / float(match.group(1).replace(",", "")))
        for t, match in ((t, re.match(r"(?:stage 0 )?iter .* SPS +([\d,]+)", line)) for t, line in lines)
        if match
    ]
    (end_1, own_1), (end_2, own_2), (end_3, own_3) = iterations[:3]
    mean_iteration = (own_2 + own_3) / 2
    cost = {
        "device": summary["device"],
        "startup_s": end_1 - own_1,
        "iteration_s": mean_iteration,
        "iteration_spread": abs(own_2 - own_3) / mean_iteration,
        "train_sps": per_iteration / mean_iteration,
        # The evaluation after iteration 2 and the checkpoint after it: what lies between two iterations' ends
        "evaluation_s": end_3 - end_2 - own_3,
        "peak_memory_bytes": summary["peak_device_memory_bytes"] or summary["peak_resident_memory_bytes"],
        "memory_of": "the device's" if summary["peak_device_memory_bytes"] else "the process's resident memory",
    }
    if algo.startswith("gorl"):
        collected = [time_of(lines, rf"collected rollout {i}/") for i in (1, 2)]
        epochs = [time_of(lines, rf"decoder epoch +{i}/") for i in (1, 2)]
        change_end = time_of(lines, r"^stage 1: warm start")
        cost.update(
            collection_rollout_s=collected[1] - collected[0],
            # the second epoch (the first compiles), scaled to the preset's pairs: an epoch is one pass over them
            decoder_epoch_s=(epochs[1] - epochs[0]) * sizes["decoder_dataset_size"] / measured_dataset(sizes),
            # what follows the last epoch: the kept decoder's held-out loss, the restart, the two warm-start evaluations
            stage_change_rest_s=change_end - epochs[1],
            measured_stage_change_s=summary["stages"][1]["transition_time_s"],
        )
        cost["stage_change_s"] = (
            sizes["collection_rollouts"] * cost["collection_rollout_s"]
            + sizes["decoder_epochs"] * cost["decoder_epoch_s"]
            + cost["stage_change_rest_s"]
        )
    return cost


def projected_run_s(sizes, cost):
    """A whole run's seconds at the measured rates: start-up, every iteration, every evaluation after the first and
    GoRL's stage changes (each with every decoder epoch: early stopping can only shorten it)."""
    seconds = cost["startup_s"] + sum(sizes["stage_iterations"]) * cost["iteration_s"]
    seconds += evaluations_after_start(sizes) * cost["evaluation_s"]
    return seconds + (len(sizes["stage_iterations"]) - 1) * cost.get("stage_change_s", 0.0)


def wall_hours(run_hours, jobs):
    """The grid's wall hours with `jobs` runs at a time, longest runs first (each job at the measured rate)."""
    slots = [0.0] * jobs
    for hours in sorted(run_hours, reverse=True):
        slots[slots.index(min(slots))] += hours
    return max(slots)


def estimate(args):
    algos = [a for a in (args.algos or ALGOS) if os.path.exists(os.path.join(ROOT, f"{a}.py"))]
    env_ids, seeds = args.env_ids or PRESETS[args.preset]["env_ids"], args.seeds or PRESETS[args.preset]["seeds"]
    sys.path.insert(0, ROOT)
    # Every cell's sizes first, as its script checks them: a bad argument stops the estimate before anything runs.
    rows = [
        {"algo": algo, "env_id": env_id, "sizes": run_sizes(args.preset, algo, env_id), "runs": len(seeds)}
        for env_id in env_ids
        for algo in algos
    ]
    deadline = time.perf_counter() + args.timeout
    for row in rows:
        algo, env_id = row["algo"], row["env_id"]
        left = deadline - time.perf_counter()
        print(f"measuring {algo} on {env_id} ({left:.0f} s left)...", file=sys.stderr, flush=True)
        try:
            if left < 1:
                raise RuntimeError(f"not measured: --timeout {args.timeout} s was spent")
            row["cost"] = measure_cost(algo, env_id, args.preset, row["sizes"], left)
            row["run_hours"] = projected_run_s(row["sizes"], row["cost"]) / 3600
        except (RuntimeError, ValueError) as error:
            row["error"] = str(error)
            print(f"error: {algo} on {env_id}: {error}", file=sys.stderr, flush=True)
        print(json.dumps(row), file=sys.stderr, flush=True)
    run_hours = [row["run_hours"] for row in rows if "run_hours" in row for _ in seeds]
    result = {
        "preset": args.preset,
        "seeds": list(seeds),
        "jobs": args.jobs,
        "rows": rows,
        "grid_run_hours": sum(run_hours),
        "grid_wall_hours": wall_hours(run_hours, args.jobs),
        "complete": all("run_hours" in row for row in rows),
    }
    out = os.path.abspath(args.out or os.path.join(ROOT, "benchmark_results", f"estimate_{args.preset}"))
    os.makedirs(out, exist_ok=True)
    table = estimate_table(result)
    for name, text in (("estimate.json", json.dumps(result, indent=2)), ("estimate.md", table + "\n")):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    print(table)
    print(f"\nwritten: {os.path.join(out, 'estimate.md')} and estimate.json")
    if not result["complete"]:
        sys.exit(f"error: {sum('error' in row for row in rows)} rows were not measured; the totals leave them out")


ESTIMATE_COLUMNS = (  # (header, cost key, format) after algorithm and task
    ("start-up (s)", "startup_s", ".0f"),
    ("training env steps/s", "train_sps", ",.0f"),
    ("iteration (s)", "iteration_s", ".1f"),
    ("two iterations differ by", "iteration_spread", ".1%"),
    ("evaluation + checkpoint (s)", "evaluation_s", ".1f"),
    ("GoRL stage change (s)", "stage_change_s", ".0f"),
    ("peak memory (GiB)", "peak_memory_gib", ".2f"),
)


def duration(hours):
    """Hours as h:mm:ss (and in days from two days on): what a run or a grid takes."""
    seconds = round(hours * 3600)
    text = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return text + (f" ({hours / 24:.1f} days)" if hours >= 48 else "")


def estimate_table(result):
    measured = [row for row in result["rows"] if "cost" in row]
    devices = sorted({row["cost"]["device"] for row in measured})
    memory = sorted({row["cost"]["memory_of"] for row in measured})
    lines = [
        f"Estimate of the {result['preset']} preset on {', '.join(devices) or 'no device'}: each script run at the "
        f"preset's sizes for 3 iterations (the first, then two timed) and an evaluation; GoRL also one stage change on "
        f"at most {ESTIMATE_DECODER_ROLLOUTS} rollouts of data and 2 decoder epochs, projected linearly to the "
        f"preset's dataset and every epoch. A run's time assumes the measured rates hold for all of it. Peak memory: "
        f"{' / '.join(memory)} (GoRL's with the measured, smaller dataset).",
        "",
        "| algorithm | task | "
        + " | ".join(header for header, _, _ in ESTIMATE_COLUMNS)
        + " | per run (h:mm:ss) | runs |",
        "|---|---|" + "---:|" * (len(ESTIMATE_COLUMNS) + 2),
    ]
    for row in result["rows"]:
        if "cost" in row:
            cost = {**row["cost"], "peak_memory_gib": row["cost"]["peak_memory_bytes"] / 2**30}
            cells = ["" if cost.get(key) is None else format(cost[key], spec) for _, key, spec in ESTIMATE_COLUMNS]
            cells.append(duration(row["run_hours"]))
        else:
            cells = ["not measured"] * len(ESTIMATE_COLUMNS) + [""]
        lines.append(f"| {ALGO_NAMES[row['algo']]} | {row['env_id']} | " + " | ".join(cells) + f" | {row['runs']} |")
    lines += [
        "",
        f"Grid: {result['grid_run_hours']:.1f} run-hours; {duration(result['grid_wall_hours'])} of wall time with "
        f"--jobs {result['jobs']} (longest runs first, each job at the measured rate: one device per job)"
        + ("" if result["complete"] else "; rows not measured are left out"),
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    returns_parser = commands.add_parser("returns", help="run a grid of algorithms x tasks x seeds, then summarise it")
    returns_parser.add_argument("--preset", choices=list(PRESETS), required=True)
    chosen = returns_parser.add_mutually_exclusive_group()
    chosen.add_argument("--algos", nargs="+", choices=ALGOS, help="default: every algorithm script present")
    chosen.add_argument(
        "--scripts",
        nargs="+",
        metavar="PATH",
        help="scripts to run instead of --algos: any of the five or a copy of one (it runs at the preset's arguments "
        "of the script it was copied from, and its runs are labelled by its file name)",
    )
    returns_parser.add_argument("--env-ids", nargs="+", help="default: the preset's tasks")
    returns_parser.add_argument("--seeds", nargs="+", type=int, help="default: the preset's seeds")
    returns_parser.add_argument("--out", help="default: benchmark_results/PRESET")
    returns_parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine")
    returns_parser.add_argument("--dry-run", action="store_true", help="print the commands still to run, and stop")
    returns_parser.add_argument("--slurm", action="store_true", help="write a Slurm job array instead of running")
    returns_parser.add_argument("--submit", action="store_true", help="with --slurm: submit it with sbatch")
    returns_parser.add_argument("--slurm-option", action="append", default=[], help="an extra #SBATCH line")
    summarize_parser = commands.add_parser("summarize", help="results.md, results.json and plots of a folder of runs")
    summarize_parser.add_argument("folder")
    summarize_parser.add_argument("--out", help="default: the folder itself")
    speed_parser = commands.add_parser("speed", help="throughput of every script: training, rollout, pure stepping")
    speed_parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS))
    speed_parser.add_argument("--env-ids", nargs="+", default=["CheetahRun", "CartpoleBalance"])
    speed_parser.add_argument("--impls", nargs="+", default=["jax", "warp"], choices=["jax", "warp"])
    speed_parser.add_argument(
        "--measure",
        nargs="+",
        default=list(SPEED_MEASUREMENTS),
        choices=SPEED_MEASUREMENTS,
        help="which columns to measure (default: all); the others are left blank",
    )
    speed_parser.add_argument("--out", help="also write the measurements to this JSON file")
    speed_parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per measurement")
    estimate_parser = commands.add_parser(
        "estimate", help="measure a preset's runs for a few iterations here and project the grid's hours"
    )
    estimate_parser.add_argument("--preset", choices=list(PRESETS), required=True)
    estimate_parser.add_argument("--algos", nargs="+", choices=ALGOS, help="default: every algorithm script present")
    estimate_parser.add_argument("--env-ids", nargs="+", help="default: the preset's tasks")
    estimate_parser.add_argument("--seeds", nargs="+", type=int, help="default: the preset's seeds (runs per cell)")
    estimate_parser.add_argument("--jobs", type=int, default=1, help="runs at a time, for the grid's wall hours")
    estimate_parser.add_argument("--out", help="default: benchmark_results/estimate_PRESET")
    estimate_parser.add_argument(
        "--timeout", type=float, default=600, help="seconds for the whole estimate (default 600); rows left unmeasured"
    )
    cell_parser = commands.add_parser("_cell")  # one run of a grid, new or resumed (used by --slurm's array tasks)
    for name in ("preset", "script", "env_id", "seed", "out"):
        cell_parser.add_argument(name, type=int if name == "seed" else str)
    stepping_parser = commands.add_parser("_stepping")  # one measurement, in its own process (used by `speed`)
    stepping_parser.add_argument("script")
    stepping_parser.add_argument("env_id")
    stepping_parser.add_argument("impl")
    args = parser.parse_args(argv)
    if args.command == "returns":
        if args.jobs < 1 or (args.submit and not args.slurm):
            parser.error("--jobs must be positive, and --submit needs --slurm")
        returns(args)
    elif args.command == "summarize":
        summarize_folder(args.folder, args.out or args.folder)
    elif args.command == "speed":
        speed(args)
    elif args.command == "estimate":
        if args.jobs < 1 or args.timeout <= 0:
            parser.error("--jobs and --timeout must be positive")
        estimate(args)
    elif args.command == "_cell":
        command = cell_command(args.preset, script_at(args.script), args.env_id, args.seed, args.out)
        os.execv(command[0], command)
    else:
        sys.path.insert(0, ROOT)
        print(json.dumps(measure_stepping(args.script, args.env_id, args.impl)))


if __name__ == "__main__":
    main()
