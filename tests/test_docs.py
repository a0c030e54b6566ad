"""The documentation points at the code: every line range docs/implementation_details.md names is still the definition
it names, every local file the README and the docs link to exists, every option their commands pass is one the script
takes, and the README's quick start is the smoke preset."""

import ast
import contextlib
import functools
import importlib
import io
import itertools
import os
import re
import shlex

import tyro
from conftest import ROOT, SCRIPTS_UNDER_TEST, documented_commands

import benchmark

# [`name`](../script.py#L10-L20): a function or class, dotted for one defined inside another (Run.evaluate).
CODE_LINK = re.compile(r"\[`([\w.]+)`\]\(\.\./(\w+\.py)#L(\d+)-L(\d+)\)")
LOCAL_LINK = re.compile(r"\]\((?!https?://)([^)#\s]+)")


@functools.cache
def definition_lines(script):
    """{name: (first line, last line)} of every function and class in `script`, nested ones as outer.inner."""
    lines = {}

    def visit(nodes, prefix):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                lines[prefix + node.name] = (node.lineno, node.end_lineno)
                visit(node.body, f"{prefix}{node.name}.")

    with open(os.path.join(ROOT, script)) as f:
        visit(ast.parse(f.read()).body, "")
    return lines


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_every_line_range_in_the_implementation_details_is_the_definition_it_names():
    links = CODE_LINK.findall(read("docs/implementation_details.md"))
    assert len(links) > 50
    moved = []
    for name, script, first, last in links:
        actual = definition_lines(script).get(name)
        if actual != (int(first), int(last)):
            moved.append(f"{name} in {script}: the page says lines {first}-{last}, the script has {actual}")
    assert not moved, "\n".join(moved)


# 7. **A detail.** ... (test: [`test_name`](../tests/test_file.py)): the tests that fail when the detail is broken.
DETAIL = re.compile(r"^ {0,3}\d+\. \*\*", re.MULTILINE)
TEST_LINK = re.compile(r"\[`(test_\w+)`\]\(\.\./tests/(test_\w+\.py)\)")
NUM_DETAILS = 39  # core 10, PPO 4, GoRL 14, FPO 5, DPPO 6


@functools.cache
def functions_in(test_file):
    """The names of the functions defined in tests/`test_file`."""
    tree = ast.parse(read(os.path.join("tests", test_file)))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def numbered_details(page):
    """[(first line, text)] of every numbered detail of `page`: from its number to the next detail or heading."""
    text = read(page)
    starts = [match.start() for match in DETAIL.finditer(text)]
    ends = starts[1:] + [len(text)]
    details = []
    for start, end in zip(starts, ends, strict=True):
        body = text[start:end].split("\n#", 1)[0]
        details.append((text[:start].count("\n") + 1, body))
    return details


def test_every_implementation_detail_names_a_test_that_exists():
    """Each numbered detail links, beside its function, the test that fails when the detail is broken; the test is a
    function of that file (parametrised or not)."""
    details = numbered_details("docs/implementation_details.md")
    assert len(details) == NUM_DETAILS
    problems = []
    for line, body in details:
        title = body.split("**")[1]
        links = TEST_LINK.findall(body)
        if not re.search(r"\(tests?:\s", body) or not links:
            problems.append(f"line {line} ({title}) names no test as (test: [`test_...`](../tests/test_....py))")
        for name, test_file in links:
            if name not in functions_in(test_file):
                problems.append(f"line {line} ({title}): {test_file} has no {name}")
    assert not problems, "\n".join(problems)


def test_local_links_of_the_readme_and_the_docs_exist():
    for page in ["README.md"] + [os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))]:
        if page.endswith(".md"):
            for target in LOCAL_LINK.findall(read(page)):
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
                assert os.path.exists(path), f"{page} links to {target}, which does not exist"


PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")))
PAGES = [page for page in PAGES if page.endswith(".md")]
SCRIPTS_WITH_HELP = (*SCRIPTS_UNDER_TEST, "benchmark.py")
# An option's own line in a --help text (argparse's, and tyro's, boxed on a terminal): its description's continuation
# lines are indented further.
OPTION_LINE = re.compile(r"^│? {1,2}(-\S.*)")


@functools.cache
def help_options(script, subcommand=None):
    """The options `python script --help` (benchmark.py: `python benchmark.py SUBCOMMAND --help`) lists, its help text
    rendered in this process; None where benchmark.py has no such subcommand."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        if script == "benchmark.py":
            benchmark.main([subcommand, "--help"] if subcommand else ["--help"])
        else:
            tyro.cli(importlib.import_module(script.removesuffix(".py")).Args, args=["--help"], prog=script)
    if not text.getvalue().startswith("usage:"):
        return None
    options = set()
    for line in text.getvalue().splitlines():
        if match := OPTION_LINE.match(line):  # "--name TYPE   description": the part before the description
            options.update(re.findall(r"--\w[\w-]*", re.split(r"\s{2,}", match.group(1))[0]))
    return options


def script_commands(page):
    """(the command line, script, benchmark.py's subcommand or None, the tokens after the script) of every `python
    SCRIPT.py ...` and `[bash] benchmark.sh SUBCOMMAND ...` the page shows, up to the end of the command (a comment,
    `|`, `&&`, `;`)."""
    commands = []
    for line in documented_commands(page):
        if not re.search(r"benchmark\.sh|python[\d.]*\s+\S+\.py", line):  # prose in a code span may not parse as shell
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if os.path.basename(token) == "benchmark.sh":
                script, rest = "benchmark.py", tokens[i + 1 :]
            elif (
                re.fullmatch(r"python[\d.]*", os.path.basename(token))
                and tokens[i + 1 : i + 2]
                and (os.path.basename(tokens[i + 1]) in SCRIPTS_WITH_HELP)
            ):
                script, rest = os.path.basename(tokens[i + 1]), tokens[i + 2 :]
            else:
                continue
            # The shell's operators end the command, except `|` between [alternatives] of a usage line.
            depths = itertools.accumulate(t.count("[") - t.count("]") for t in rest)
            ends = [j for (j, t), depth in zip(enumerate(rest), depths) if set(t) <= set("();<>|&") and depth == 0]
            rest = rest[: ends[0]] if ends else rest
            subcommand = rest[0] if script == "benchmark.py" and rest and not rest[0].startswith("-") else None
            commands.append((" ".join(line.split()), script, subcommand, rest))
    return commands


def test_every_option_a_documented_command_passes_is_in_its_scripts_help():
    """Each `--option` of every command line in the README and docs/*.md (fenced blocks and inline code) that runs one
    of the five scripts or benchmark.sh is listed by that script's --help (benchmark.sh: by `python benchmark.py
    SUBCOMMAND --help`); `[--option ...]` brackets, `--option=value`, and placeholders (`...`, `{a,b}`, `N`) as values
    are read as a reader would."""
    commands = [(page, *command) for page in PAGES for command in script_commands(page)]
    assert len(commands) > 20
    wrong = []
    for page, line, script, subcommand, tokens in commands:
        known = help_options(script, subcommand)
        if known is None:
            wrong.append(f"{page}: `{line}`: benchmark.py has no subcommand {subcommand}")
            continue
        for token in tokens:
            option = token.strip("[]").split("=")[0]
            if option.startswith("--") and option not in known:
                wrong.append(f"{page}: `{line}`: {' '.join(filter(None, (script, subcommand)))} has no {option}")
    assert not wrong, "\n".join(wrong)


def options_of(tokens):
    """{option: its values} of a command line's tokens after the script."""
    options, option = {}, None
    for token in map(str, tokens):
        if token.startswith("--"):
            option = token
            options[option] = ()
        else:
            options[option] += (token,)
    return options


def test_readme_quick_start_is_the_smoke_preset_and_saves_the_model_the_readme_watches():
    """The README's quick-start commands pass exactly the options of the smoke preset's runs (the tests' learning runs,
    --save-model included: the run folder then holds the model.msgpack that "Watching a policy" loads), FPO's and DPPO's
    those of PPO's command, GoRL(Diff)'s those of GoRL(FM)'s; docs/runs.md's command for watching that model is the
    README's."""
    quick_start = {
        script: options_of(tokens)
        for _, script, _, tokens in script_commands("README.md")
        if tokens[:2] == ["--env-id", "CartpoleSwingup"] and "--load-model" not in tokens
    }
    assert sorted(quick_start) == ["gorl_ppo_fm.py", "ppo_continuous.py"]
    for algo, smoke in benchmark.PRESETS["smoke"]["args"].items():
        like = "gorl_ppo_fm.py" if algo.startswith("gorl") else "ppo_continuous.py"
        assert options_of(["--env-id", "CartpoleSwingup", *smoke]) == quick_start[like], algo
    readme, runs = (
        [line for line, _, _, tokens in script_commands(page) if "--load-model" in tokens]
        for page in ("README.md", "docs/runs.md")
    )
    assert len(readme) == 1 and runs == readme
