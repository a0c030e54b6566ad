"""The parts the scripts share are textually identical (README.md promises it: `diff ppo_continuous.py gorl_ppo_fm.py`
shows only what GoRL adds): the appendix of the run's plumbing byte for byte, and the method's shared definitions by
their source."""

import ast
import functools
import os

import pytest
from conftest import ROOT

ALL = ("ppo_continuous", "gorl_ppo_fm", "gorl_ppo_diffusion", "fpo", "dppo")
GORL = ("gorl_ppo_fm", "gorl_ppo_diffusion")
# The run's plumbing, from this banner to the main guard that ends every script, is word for word the same in all five.
APPENDIX_BANNER = "# Appendix: the run's plumbing."
MAIN_GUARD = 'if __name__ == "__main__":\n    main(tyro.cli(Args))\n'
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


def read(script):
    with open(os.path.join(ROOT, f"{script}.py")) as f:
        return f.read()


def appendix(script):
    """The text from the appendix's banner to the main guard, which must end the script."""
    source = read(script)
    assert source.endswith("\n\n\n" + MAIN_GUARD), f"{script}.py does not end with its main guard"
    banner = source.index(APPENDIX_BANNER)
    return source[source.rindex("\n", 0, banner) + 1 : -len(MAIN_GUARD)]


def test_appendix_is_byte_identical_in_every_script_and_follows_main():
    appendices = {script: appendix(script) for script in ALL}
    assert appendices[ALL[0]].count("\n") > 300, "the appendix is missing or cut short"
    assert [script for script, text in appendices.items() if text != appendices[ALL[0]]] == []
    for script in ALL:
        source = read(script)
        main = next(node for node in ast.parse(source).body if getattr(node, "name", None) == "main")
        assert main.end_lineno < source[: source.index(APPENDIX_BANNER)].count("\n") + 1, f"{script}.py: main is late"


@functools.cache
def definitions(script):
    source = read(script)
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
