"""The exercise convention (ksmlens.views.notebook): answers checked against
a truth the notebook works out from the kernel; the notebooks themselves run
with their solutions in tests/views/test_notebooks.py."""

import nbformat
import pytest

from ksmlens.errors import KsmlensError
from ksmlens.views.notebook import check_answer, exercises, notebook_paths


def test_check_answer_says_unanswered_correct_and_not_yet(capsys, monkeypatch):
    monkeypatch.delenv("KSMLENS_EXERCISES", raising=False)
    assert check_answer("x-1", ..., {1, 2}) is None
    assert "not answered yet" in capsys.readouterr().out
    assert check_answer("x-1", [2, 1], {1, 2}, explain="both") is True
    assert capsys.readouterr().out.strip() == "Exercise x-1: correct. both"
    assert check_answer("x-1", [1], {1, 2}, hint="two of them") is False
    out = capsys.readouterr().out
    assert "not yet" in out and "two of them" in out and "{1, 2}" not in out
    assert check_answer("x-2", 16, 16) is True and check_answer("x-2", 15, 16) is False


def test_strict_mode_fails_a_wrong_or_missing_answer(monkeypatch):
    monkeypatch.setenv("KSMLENS_EXERCISES", "strict")
    with pytest.raises(AssertionError):
        check_answer("x-1", [1], {1, 2})
    with pytest.raises(AssertionError):
        check_answer("x-1", ..., {1, 2})
    assert check_answer("x-1", (1, 2), {1, 2}) is True


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_exercises_finds_pairs_and_refuses_half_ones():
    ex = nbformat.v4.new_code_cell("answer = ...", metadata={
        "tags": ["exercise"], "ksmlens": {"exercise": "9-1", "solution": "answer = 3"}})
    chk = nbformat.v4.new_code_cell("check_answer('9-1', answer, 3)",
                                    metadata={"tags": ["exercise-check", "hide-input"]})
    assert exercises(_nb(ex, chk)) == [{"exercise": "9-1", "solution": "answer = 3",
                                        "cell": 0, "check": 1}]
    with pytest.raises(KsmlensError, match="no exercise-check"):
        exercises(_nb(ex))
    bare = nbformat.v4.new_code_cell("answer = ...", metadata={"tags": ["exercise"]})
    with pytest.raises(KsmlensError, match="no metadata.ksmlens"):
        exercises(_nb(bare, chk))


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_every_notebook_teaches_goals_and_ends_with_exercises(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "You will learn" in first.source, \
        f"{path.name}: the first cell says what the reader will learn"
    found = exercises(nb)
    assert 1 <= len(found) <= 2, f"{path.name}: one or two exercises"
    for ex in found:
        assert ex["exercise"].startswith(path.stem[:2] + "-")
        check = nb.cells[ex["check"]]
        assert "check_answer(" in check.source
        assert check.metadata.get("jupyter", {}).get("source_hidden") is True
        assert "hide-input" in check.metadata["tags"]
        assert nb.cells[ex["cell"]].source.strip().endswith("answer = ...")
    # exercises come last (the clean-up may follow them)
    assert found[-1]["check"] >= len(nb.cells) - 3
