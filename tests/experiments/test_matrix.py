"""``ksmlens matrix``: the README's table of what the kernels do is generated.

The non-vm tests hold the README's marked block to the rendering of the
committed ``docs/matrix.json`` (a full run on real guests), and the JSON,
table and picture code to a hand-made matrix. The vm test runs a small
matrix (mremap on stock and v3, by migration and by reclaim) on x86-64 and
on arm64, and its cells must repeat the committed run's: what the kernel
did, not what ksmlens expects, is the reference.
"""

import dataclasses
import json
from types import SimpleNamespace
from pathlib import Path

import pytest

from ksmlens.errors import KsmlensError
from ksmlens.experiments.matrix import (COMPARED_FIELDS, HWPOISON_SCENARIOS, SCHEMA, Cell,
                                       Matrix, run_matrix)
from ksmlens.views.plots import matrix_figure
from ksmlens.views.tables import (MATRIX_BEGIN, MATRIX_END, marked_block, matrix_markdown,
                                  matrix_table, replace_marked_block)

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "matrix.json"


def _cell(variant, scenario, by, outcome, stayed, **kw):
    d = dict(variant=variant, scenario=scenario, by=by, release=f"6.12.117-ksmlens-{variant}",
             rule=variant if variant in ("stock", "v3") else "stored",
             candidates=["stock", "v3"], matches=[variant], outcome=outcome, pages=16,
             pages_stayed=stayed, predicted_stay=stayed, mappings=128,
             mappings_unmapped=128 - 4 * stayed, mappings_kept=4 * stayed, agree=True,
             seconds=1.0)
    d.update(kw)
    return Cell(**d)


def _small():
    return Matrix([_cell("stock", "mremap", "migration", "moves", 0),
                   _cell("stock", "mremap", "reclaim", "reclaimed", 0),
                   _cell("v3", "mremap", "migration", "pinned", 16),
                   _cell("v3", "mremap", "reclaim", "stays", 16, agree=False),
                   _cell("stock", "fork", "migration", "moves", 0, matches=["stock", "v3"])],
                  {"seconds": 9.0})


def test_readme_block_is_the_committed_matrix():
    m = Matrix.load(COMMITTED)
    readme = (ROOT / "README.md").read_text()
    assert marked_block(readme) == matrix_markdown(m)
    # the committed run is a full one: every built-in variant, every cell agrees
    assert set(m.variants) >= {"stock", "v3", "union", "v8"} and m.agree
    assert m.archs == ["x86_64", "arm64"]
    assert {(a, v) for a in m.archs for v in ("stock", "v3", "union", "v8")} <= set(m.kernels)
    assert len(m.cells) == len(m.kernels) * sum(
        len(m.scenarios) if b != "hwpoison" else len(set(m.scenarios) & set(HWPOISON_SCENARIOS))
        for b in m.bys)


def test_matrix_round_trip_and_rendering(tmp_path):
    m = _small()
    again = Matrix.load(m.save(tmp_path / "m.json"))
    assert again.cells == m.cells and again.meta == m.meta
    assert json.loads((tmp_path / "m.json").read_text())["schema"] == SCHEMA
    md = matrix_markdown(m).splitlines()
    assert md[0] == "| arch | variant | mremap | fork |"
    assert md[1] == "|---|---|---|---|"
    stock, v3 = md[2], md[3]
    assert stock.startswith("| x86_64 | `stock` | migrates; swapped out; like stock |")
    assert "every rule alike here" in stock          # fork: stock and v3 both matched
    assert "**pinned**: 16 of 16 KSM pages stay, 64 mappings keep them" in v3
    assert "64 become swap entries (**prediction disagreed**); like v3" in v3
    assert v3.endswith("|  |")                        # v3 fork not run
    t = matrix_table(m)
    assert "1 DISAGREE" in t and "(9.0 s)" in t
    # the marked block: replaced between the markers, refused without them
    text = f"a\n{MATRIX_BEGIN}\nold\n{MATRIX_END}\nb\n"
    new = replace_marked_block(text, "| new |")
    assert new == f"a\n{MATRIX_BEGIN}\n| new |\n{MATRIX_END}\nb\n"
    assert marked_block(new) == "| new |"
    with pytest.raises(KsmlensError, match="marked matrix block"):
        replace_marked_block("no markers", "x")


def test_arch_rows_and_merge(tmp_path):
    """The same variant on two architectures: two rows, each its own cells;
    merged() replaces a cell of the same (arch, variant, scenario, proof)
    and adds the rest; a file from before ksmlens ran arm64 is x86-64's."""
    x86 = _small()
    x86.meta = {"seconds": 9.0, "seconds_per_kernel": {"x86_64 stock": 5.0, "x86_64 v3": 4.0}}
    arm = Matrix([dataclasses.replace(c, arch="arm64", seconds=2.0) for c in x86.cells[:2]]
                 + [dataclasses.replace(x86.cells[2], outcome="moves", pages_stayed=0)],
                 {"seconds_per_kernel": {"arm64 stock": 7.0}})
    m = x86.merged(arm)
    assert m.kernels == [("x86_64", "stock"), ("x86_64", "v3"), ("arm64", "stock")]
    assert m.cell("v3", "mremap", "migration").outcome == "moves"         # replaced
    assert m.cell("stock", "mremap", "migration", "arm64").seconds == 2.0
    assert m.cell("v3", "mremap", "migration", "arm64") is None
    assert len(m.cells) == len(x86.cells) + 2
    assert m.meta["seconds_per_kernel"]["arm64 stock"] == 7.0 and m.meta["seconds"] == 16.0
    md = matrix_markdown(m).splitlines()
    assert [r.split(" | ")[:2] for r in md[2:]] == [["| x86_64", "`stock`"], ["| x86_64", "`v3`"],
                                                    ["| arm64", "`stock`"]]
    gids = {p.get_gid() for p in matrix_figure(m).axes[0].patches if p.get_gid()}
    assert "cell:arm64:stock:mremap:migration" in gids and "cell:stock:mremap:migration" in gids
    assert Matrix.load(m.save(tmp_path / "m.json")).cells == m.cells
    # a variant that reads the same on both architectures is one row
    same = Matrix(x86.cells + [dataclasses.replace(c, arch="arm64", seconds=3.0)
                               for c in x86.cells if c.variant == "stock"])
    md = matrix_markdown(same).splitlines()
    assert len(md) == 4 and md[2].startswith("| x86_64, arm64 | `stock` | migrates")
    assert md[3].startswith("| x86_64 | `v3` |")
    # written before the arch field: every cell x86-64's, seconds per kernel
    old = m.to_dict()
    for c in old["cells"]:
        c.pop("arch")
    old["meta"] = {"seconds": 3.0, "seconds_per_variant": {"stock": 3.0}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = Matrix.load(tmp_path / "old.json")
    assert back.archs == ["x86_64"] and back.meta["seconds_per_kernel"] == {"x86_64 stock": 3.0}
    with pytest.raises(KsmlensError, match="arch"):
        run_matrix(["stock"], ["mremap"], arch="sparc")


def _hwpoison_result(kept: int, signals: dict, madvise: str):
    """A verify_hwpoison() result of the shape Cell.of reads: 8 mappings, the
    last ``kept`` still mapped, pid 10 the poisoner."""
    pages = [{"observed": "mapped" if i >= 8 - kept else "unmapped"} for i in range(8)]
    pages.append({"observed": "gone"})
    row = {"injector": 10, "predicted": "stays" if kept else "unmapped",
           "observed_signals": signals, "observed_madvise": madvise}
    return SimpleNamespace(by="hwpoison", rows=[row], pages=pages, release="r", rule="v3",
                           agree=True, seconds={"total": 3.0})


def test_hwpoison_cells():
    v3 = Cell.of("v3", "mremap", _hwpoison_result(4, {10: 4, 11: 5}, "EBUSY"))
    assert (v3.outcome, v3.mappings, v3.mappings_kept, v3.mappings_unmapped) == ("kept", 8, 4, 4)
    assert v3.signalled == ["other:AO", "poisoner:AR"] and v3.madvise == "EBUSY"
    assert (v3.pages_stayed, v3.predicted_stay, v3.matches, v3.candidates) == (1, 1, [], [])
    stock = Cell.of("stock", "mremap", _hwpoison_result(0, {10: 4}, "ok"))
    assert (stock.outcome, stock.mappings_unmapped, stock.signalled) == ("unmapped", 8, ["poisoner:AR"])
    m = Matrix(_small().cells + [stock, v3])
    md = matrix_markdown(m).splitlines()
    assert ("memory failure: all 8 mappings unmapped, madvise ok; SIGBUS the poisoning "
            "process (AR); like stock |") in md[2]
    assert ("memory failure: **4 of 8 mappings stay mapped**, madvise EBUSY; SIGBUS the other "
            "(AO), the poisoning process (AR); like v3") in md[3]
    fig = matrix_figure(m)
    gids = {p.get_gid(): p for p in fig.axes[0].patches if p.get_gid()}
    assert gids["cell:v3:mremap:hwpoison"].get_facecolor() != \
        gids["cell:stock:mremap:hwpoison"].get_facecolor()
    assert "cell:stock:fork:hwpoison" not in gids
    with pytest.raises(KsmlensError, match="mremap scenario only"):
        run_matrix(["stock"], ["fork"], ["hwpoison"])


def test_matrix_figure():
    m = _small()
    fig = matrix_figure(m)
    ax = fig.axes[0]
    cells = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    assert set(cells) == {f"cell:{c.variant}:{c.scenario}:{c.by}" for c in m.cells}
    assert cells["cell:v3:mremap:reclaim"].get_hatch() == "xx"      # disagreed
    assert cells["cell:stock:mremap:migration"].get_hatch() is None
    assert cells["cell:v3:mremap:migration"].get_facecolor() != \
        cells["cell:stock:mremap:migration"].get_facecolor()
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel() and ax.get_legend()


def test_matrix_load_refuses(tmp_path):
    with pytest.raises(KsmlensError, match="no matrix file"):
        Matrix.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    with pytest.raises(KsmlensError, match="schema 'other'"):
        Matrix.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{")
    with pytest.raises(KsmlensError, match="not a matrix JSON"):
        Matrix.load(tmp_path / "y.json")
    with pytest.raises(KsmlensError, match="unknown kernel variant"):
        run_matrix(["v99"], ["mremap"])
    with pytest.raises(KsmlensError, match="unknown scenario|no scenario"):
        run_matrix(["stock"], ["nothing"])


@pytest.mark.vm
def test_small_matrix_repeats_the_committed_cells(tmp_path):
    """mremap on stock and v3, both proofs, on real guests: each cell's
    kernel outcome, counts, rule matches and agreement equal the committed
    full run's for the same cells."""
    committed = Matrix.load(COMMITTED)
    import os
    name = f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-matrix-{os.getpid()}"
    m = run_matrix(["stock", "v3"], ["mremap"], name=name)
    assert len(m.cells) == 4
    for c in m.cells:
        want = committed.cell(c.variant, c.scenario, c.by)
        assert want is not None
        assert c.compared() == want.compared(), (c, want)
    assert m.cell("v3", "mremap", "migration").matches == ["v3"]
    assert "stock" in m.cell("stock", "mremap", "reclaim").matches
    assert set(COMPARED_FIELDS) <= {f.name for f in dataclasses.fields(Cell)}


@pytest.mark.vm
@pytest.mark.arm64
def test_small_arm64_matrix_repeats_the_committed_cells():
    """The same small matrix on arm64 guests (cross-built kernels, TCG):
    each cell equals the committed full run's arm64 cell, and the kernel
    does on arm64 what it does on x86-64."""
    committed = Matrix.load(COMMITTED)
    import os
    name = f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-matrix-{os.getpid()}"
    m = run_matrix(["stock", "v3"], ["mremap"], name=name, arch="arm64")
    assert len(m.cells) == 4 and m.archs == ["arm64"]
    for c in m.cells:
        want = committed.cell(c.variant, c.scenario, c.by, "arm64")
        assert want is not None
        assert c.compared() == want.compared(), (c, want)
        x86 = committed.cell(c.variant, c.scenario, c.by)
        assert (c.outcome, c.matches, c.agree) == (x86.outcome, x86.matches, x86.agree)
    assert m.cell("v3", "mremap", "migration", "arm64").outcome == "pinned"


def test_rules_judged_on_one_observation():
    """verify's judging without a guest: one observation (two KSM pages, the
    kernel moved one and kept the other) judged under three rules; only the
    rule that predicted exactly that matches, and a kernel of unknown rule
    shows its rows under the match."""
    from ksmlens.experiments.verify import VerifyResult, _judge_rules
    from ksmlens.views.tables import rule_match_line
    observed = {"a": "moved", "b": "stayed"}
    predicted = {"stock": {"a": "moves", "b": "moves"}, "v3": {"a": "moves", "b": "stays"},
                 "stored": {"a": "stays", "b": "stays"}}

    def judge(r):
        rows = [{"node": n, "predicted": predicted[r][n], "observed": o,
                 "misses_by": {x: int(predicted[x][n] == "stays") for x in predicted},
                 "agree": (predicted[r][n] == "moves") == (o == "moved")}
                for n, o in observed.items()]
        return rows, []
    rules = ["stock", "v3", "stored"]
    got = _judge_rules(None, rules, rules, judge, "stays")
    assert got["matches"] == ["v3"] and got["rows_rule"] == "v3"
    assert got["by_rule"]["stock"] == {"predicted_stay": 0, "misses": 0, "disagree": 1,
                                       "agree": False}
    res = VerifyResult(variant="mine", release="r", rule=None, seconds={}, **got)
    assert res.agree and res.distinguished
    assert rule_match_line(res).startswith("this kernel unmaps like rule v3 (stock: 0 stay, "
                                           "1 disagree; v3: 1 stay, 0 disagree;")
    # the kernel's known rule stays the rows' rule even where it is not the match
    got = _judge_rules("stock", rules, rules, judge, "stays")
    assert got["rows_rule"] == "stock" and got["matches"] == ["v3"]
    # nothing compared (every page gone): no rule matches
    observed = {"a": "gone"}
    predicted = {r: {"a": "moves"} for r in rules}

    def judge_gone(r):
        return [{"node": "a", "predicted": "moves", "observed": "gone",
                 "misses_by": dict.fromkeys(rules, 0), "agree": None}], []
    got = _judge_rules(None, rules, rules, judge_gone, "stays")
    assert got["matches"] == [] and got["rows_rule"] == "stock"
    res = VerifyResult(variant="mine", release="r", rule=None, seconds={}, **got)
    assert not res.agree and "like none of the rules stock, v3, stored" in rule_match_line(res)
