"""The parts the scripts share are textually identical (README.md promises it: `diff ppo_continuous.py gorl_ppo_fm.py`
shows only what GoRL adds), compared by the source of each top-level definition."""

import ast
import functools
import os

import pytest
from conftest import ROOT

ALL = ("ppo_continuous", "gorl_ppo_fm", "gorl_ppo_diffusion", "fpo", "dppo")
GORL = ("gorl_ppo_fm", "gorl_ppo_diffusion")
# definition: the scripts that hold it word for word
SHARED = {
    **{
        name: ALL
        for name in (
            "MLP",
            "make_env",
            "RunningStats",
            "init_running_stats",
            "update_running_stats",
            "normalize",
            "RolloutCarry",
            "compute_advantages",
            "normalize_advantages",
            # the run: files, checkpoints, the loop over iterations
            "write_atomic",
            "is_key",
            "save_arrays",
            "read_arrays",
            "restore_arrays",
            "save_model",
            "load_model",
            "read_checkpoint",
            "run_metadata",
            "Run",
            "check_run_args",
            # videos
            "first_env_pose",
            "open_renderer",
            "render_episode",
        )
    },
    "gaussian_log_prob": ("ppo_continuous", *GORL),
    "gaussian_entropy": ("ppo_continuous", *GORL),
    **{name: ("ppo_continuous", "fpo", "dppo") for name in ("TrainState", "make_train_iteration")},
    "time_embedding": ("fpo", "dppo"),
    "euler_integrate": ("gorl_ppo_fm", "fpo"),
}
# The two GoRL scripts differ only in their decoder.
GORL_DECODER = {
    "ConditionalField",
    "euler_integrate",
    "cosine_alpha_bars",
    "ddim_step",
    "Decoder",
    "identity_decoder",
    "decode",
    "flow_matching_loss",
    "diffusion_loss",
    "make_decoder_trainer",
}


@functools.cache
def definitions(script):
    with open(os.path.join(ROOT, f"{script}.py")) as f:
        source = f.read()
    return {
        node.name: ast.get_source_segment(source, node)
        for node in ast.parse(source).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_definition_is_identical_in_every_script_that_holds_it(name):
    sources = {script: definitions(script).get(name) for script in SHARED[name]}
    assert all(sources.values()), f"{name} is missing from {[s for s, src in sources.items() if src is None]}"
    reference = sources[SHARED[name][0]]
    differing = [script for script, source in sources.items() if source != reference]
    assert not differing, f"{name} in {differing} differs from {SHARED[name][0]}.py"


def test_gorl_scripts_differ_only_in_the_decoder():
    fm, diffusion = definitions("gorl_ppo_fm"), definitions("gorl_ppo_diffusion")
    shared = (set(fm) | set(diffusion)) - GORL_DECODER
    assert not shared - (set(fm) & set(diffusion)), "a definition outside the decoder exists in one GoRL script only"
    assert sorted(name for name in shared if fm[name] != diffusion[name]) == []
