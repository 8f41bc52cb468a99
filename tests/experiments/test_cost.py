"""rmap_walk_ksm()'s cost, predicted from a paused snapshot, counted by the kernel.

On the many-vmas scenario (2,000 VMAs in one anon_vma, both shapes, an
mremap'd VMA among them), every walk the kernel runs to migrate each KSM
page (try_to_migrate, then remove_migration_ptes) is counted with tracefs
kprobes: interval-tree calls and NULL returns, VMAs yielded, rmap_one calls.
Each must equal the prediction under the kernel's own rule, and only that
rule's (the counts tell the rules apart: they are not all the same number).
"""

import pytest

from ksmlens.analysis.core import anon_vma_query
from ksmlens.analysis.cost import walk_cost
from ksmlens.experiments.cost import measure_cost
from ksmlens.lab.attach import attach, dump_vmcore
from ksmlens.lab.scenarios import ScenarioRun
from ksmlens.lens.snapshot import take_snapshot
from ksmlens.views.tables import cost_measure_text

from conftest import boot

N = 2000
RULE = {"stock": "stock", "v3": "v3", "v8": "stored"}


def _many(vm, shape, mremap=1):
    return ScenarioRun(vm, "many-vmas", extra_args=(
        "--vmas", str(N), "--shape", shape, "--pages", "4", "--forks", "4",
        "--mremap", str(mremap)))


@pytest.mark.vm
@pytest.mark.parametrize("variant,shape", [("stock", "split"), ("stock", "fork"),
                                           ("v3", "split"), ("v3", "fork"),
                                           ("v8", "split"), ("v8", "fork")])
def test_every_walk_counted_equals_the_prediction(variant, shape):
    vm = boot(variant)
    with _many(vm, shape) as run:
        for st in run.scenario.steps:
            run.step(st.name)
        res = measure_cost(vm)
    text = cost_measure_text(res, limit=None)
    assert res.agree, text
    # the counts single out the kernel's own rule
    assert res.rule_matches == [RULE[variant]], text
    w = res.walks
    assert set(w["walk"]) == {"try_to_migrate", "remove_migration_ptes"}
    # every KSM page was walked, each walk is a real one
    assert set(w["node"]) == set(res.cost["node"])
    full = w[w["walk"] == "remove_migration_ptes"]
    if variant == "stock":
        # the series' reason: each loop yields the whole tree, 2 items x 2 passes
        assert (full["m_returned"] == 4 * N).all(), text
    else:
        # a point query: the one VMA per process that holds the index, at most
        procs = 5 if shape == "fork" else 1
        assert (full["m_returned"] <= 4 * procs).all(), text
    # the iteration count is the recorded tree's, node by node (the kernel's
    # interval-tree query replayed independently of the cost model)
    snap = res.snapshot
    it = snap.rmap_items[snap.rmap_items["state"] == "stable"]
    c = res.cost
    for node, g in it.groupby("stable_node"):
        want = 0
        for r in g.to_dict("records"):
            q = r["addr_pgoff"] if RULE[variant] == "v3" else r["stored_pgoff"]
            lo, hi = (0, 2**64 - 1) if RULE[variant] == "stock" else (q, q)
            want += 2 * len(anon_vma_query(snap, r["anon_vma"], lo, hi))
        row = c[(c["node"] == node) & (c["walk"] == "remove_migration_ptes")
                & (c["rule"] == RULE[variant])]
        assert int(row["returned"].iloc[0]) == want


@pytest.mark.vm
def test_cost_from_a_vmcore_equals_live(tmp_path):
    vm = boot("v8")
    with _many(vm, "split") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        live = walk_cost(take_snapshot(attach(f"vm:{vm.name}")), kinds=("full", "migrate"))
        core = tmp_path / "vm.core"
        dump_vmcore(vm, core)
    static = walk_cost(take_snapshot(attach(str(core), vmlinux=vm.state["vmlinux"])),
                       kinds=("full", "migrate"))
    assert len(live) == 4 * 3 * 3           # pages x rules x walks
    assert live.equals(static)
