"""The README's references into the code must stay true: every `file.py:Lx-Ly` range, wrapped onto a new line or
not; every name the reading guide and the assignments cite; each grading command's number of tests; and the list of
wrong answers each grading command rejects (tests/assignment_mistakes.py, graded by tests/test_model_assignments.py)."""
import ast
import os
import re

import pytest

import assignment_mistakes as am
import modsquad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def spans(path):
    """name -> (first line, last line) of every top-level class, function and assignment, and of class methods."""
    tree = ast.parse(open(path).read())
    out = {"__doc__": (tree.body[0].lineno, tree.body[0].end_lineno)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = (node.lineno, node.end_lineno)
            for sub in getattr(node, "body", []):
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = (sub.lineno, sub.end_lineno)
                    out.setdefault(sub.name, (sub.lineno, sub.end_lineno))
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = (node.lineno, node.end_lineno)
    return out


def section(title):
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else len(README)]


def test_every_line_range_in_the_readme_is_the_span_of_what_it_names():
    """Each `file.py:Lx-Ly` follows "`name` (" or "the module docstring (" (a line break may come between) and is
    exactly that name's lines in that file of this repository; no other form of line reference is used."""
    refs = list(re.finditer(r"([\w/]+\.py):L(\d+)-L(\d+)", README))
    assert len(refs) >= 20 and len(refs) == len(re.findall(r"\.py:L\d", README))
    wrong = []
    for ref in refs:
        path, first, last = ref.group(1), int(ref.group(2)), int(ref.group(3))
        before = README[: ref.start()]
        named = re.search(r"`([\w.]+)`\s*\(\s*$", before)
        name = named.group(1) if named else "__doc__" if re.search(r"module docstring\s*\(\s*$", before) else None
        actual = spans(os.path.join(ROOT, path)).get(name) if os.path.isfile(os.path.join(ROOT, path)) else None
        if actual != (first, last):
            wrong.append((path, name, (first, last), actual))
    assert not wrong, f"README ranges out of date (file, name, README, actual): {wrong}"


def test_names_cited_by_the_reading_guide_and_the_assignments_exist():
    """Every backticked name there (`extract`, `TaskRouter.keep_`, `ModSquadConfig.kept_experts`, `train.py`, ...)
    is defined in modsquad.py, is a file of this repository, or is a word of modsquad.py's source."""
    source = open(os.path.join(ROOT, "modsquad.py")).read()

    def exists(name):
        if name.endswith(".py"):
            return os.path.isfile(os.path.join(ROOT, name))
        obj, missing = modsquad, object()
        for part in name.split("."):
            obj = getattr(obj, part, missing)
        return obj is not missing or re.search(rf"(?<![\w]){re.escape(name)}(?!\w)", source) is not None

    names = re.findall(r"`([A-Za-z_][\w.]*)`", section("Reading guide") + section("Assignments"))
    assert len(names) >= 30
    assert not [n for n in names if not exists(n)]


@pytest.mark.slow  # one pytest collection in a subprocess per grading command
def test_each_grading_command_selects_the_number_of_tests_it_states():
    """The Assignments table's `python -m pytest -q -k "..."` (N tests): the expression selects N tests, as pytest
    itself collects them (in a subprocess)."""
    commands = am.grading_commands(README)
    assert sorted(commands) == [1, 2, 3, 4, 5, 6]
    selected = am.collect([expr for expr, _ in commands.values()])
    assert {n: len(selected[expr]) for n, (expr, _) in commands.items()} == {n: c for n, (_, c) in commands.items()}


def test_the_readme_lists_the_wrong_answers_each_grading_command_rejects():
    """The Assignments section's "- **N** rejects: ...; ...." lists are the blank plus exactly the wrong answers of
    tests/assignment_mistakes.py for assignment N."""
    items = re.findall(r"^- \*\*(\d)\*\* rejects: (.*?)\.\n(?=- \*\*|\n)", section("Assignments"), flags=re.M | re.S)
    listed = {int(n): sorted(s.strip() for s in " ".join(body.split()).split("; ")) for n, body in items}
    recorded = {n: sorted(["the blank"] + [what for a, what, _ in am.MISTAKES.values() if a == n]) for n in range(1, 7)}
    assert listed == recorded
