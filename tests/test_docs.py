"""The documentation points at the code: every line range docs/implementation_details.md names is still the definition
it names, and every local file the README and the docs link to exists."""

import ast
import functools
import os
import re

from conftest import ROOT

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


def test_local_links_of_the_readme_and_the_docs_exist():
    for page in ["README.md"] + [os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))]:
        if page.endswith(".md"):
            for target in LOCAL_LINK.findall(read(page)):
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
                assert os.path.exists(path), f"{page} links to {target}, which does not exist"
