"""The README's assignments: each grading command rejects the blank and every recorded wrong answer, and accepts a
correct answer written unlike modsquad.py's (tests/assignment_mistakes.py). Slow: one pytest subprocess per answer."""
import os

import pytest

import assignment_mistakes as am

README = open(os.path.join(am.ROOT, "README.md")).read()
COMMANDS = am.grading_commands(README)  # {assignment: (-k expression, number of tests)}


@pytest.fixture(scope="module")
def selected():
    """{assignment: nodeids} that its README grading command selects."""
    by_expr = am.collect([expr for expr, _ in COMMANDS.values()])
    return {n: by_expr[expr] for n, (expr, _) in COMMANDS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("assignment", sorted(am.BLANKS))
def test_every_selected_test_fails_on_the_blank(assignment, selected):
    outcomes = am.grade(f"blank_{assignment}", selected[assignment])
    assert sorted(outcomes) == sorted(selected[assignment]) and set(outcomes.values()) == {"failed"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(am.MISTAKES))
def test_the_grading_command_rejects_the_wrong_answer(name, selected):
    outcomes = am.grade(name, selected[am.MISTAKES[name][0]])
    assert "failed" in outcomes.values(), f"{name} ({am.MISTAKES[name][1]}) passes every test: {outcomes}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(am.CONTROLS))
def test_the_grading_command_accepts_another_correct_answer(name, selected):
    outcomes = am.grade(name, selected[am.CONTROLS[name][0]])
    assert set(outcomes.values()) == {"passed"}, outcomes
