"""rmap_walk_ksm()'s cost, predicted from a paused snapshot, counted by the kernel.

On the many-vmas scenario (2,000 VMAs in one anon_vma, both shapes, an
mremap'd VMA among them), every walk the kernel runs is counted with
tracefs kprobes: interval-tree calls and NULL returns, VMAs yielded,
rmap_one calls. Each must equal the prediction under the kernel's own rule,
and only that rule's (the counts tell the rules apart: they are not all the
same number). The walks: migration (try_to_migrate, then
remove_migration_ptes), reclaim (folio_referenced each round, try_to_unmap:
both stop early, at the mapcount and once unmapped) and memory failure
(collect_procs_ksm, memory-failure's own loop, then try_to_unmap).
"""

import pytest

from ksmlens.analysis.core import anon_vma_query
from ksmlens.analysis.cost import walk_cost
from ksmlens.experiments.cost import measure_cost
from ksmlens.experiments.verify import collect_rule
from ksmlens.kernel.constants import mce_early_kill
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


@pytest.mark.vm
@pytest.mark.parametrize("variant,shape", [("stock", "split"), ("v3", "fork"),
                                           ("v8", "split")])
def test_reclaim_walks_counted_equal_the_prediction(variant, shape):
    vm = boot(variant)
    with _many(vm, shape) as run:
        for st in run.scenario.steps:
            run.step(st.name)
        res = measure_cost(vm, by="reclaim")
    text = cost_measure_text(res, limit=None)
    assert res.agree, text
    assert res.rule_matches == [RULE[variant]], text
    w = res.walks
    # every KSM page was aged by folio_referenced() and unmapped by try_to_unmap()
    for walk in ("folio_referenced", "try_to_unmap"):
        assert set(w[w["walk"] == walk]["node"]) == set(res.cost["node"]), text
    c = res.cost
    mine = c[c["rule"] == RULE[variant]]
    if variant == "stock":
        # both walks stop early: the last mapping found before the tree's end
        ref = mine[mine["walk"] == "folio_referenced"]
        assert ref["stopped"].all() and (ref["returned"] < 4 * N).all(), text
    if variant == "v3":
        # the mremap'd page: v3 misses its moved mapping, try_to_unmap runs to
        # its end and leaves the page mapped
        tu = mine[mine["walk"] == "try_to_unmap"]
        assert (~tu["stopped"] & (tu["missed"] > 0)).any(), text


@pytest.mark.vm
@pytest.mark.parametrize("variant,shape,early_kill", [("stock", "fork", False),
                                                      ("v3", "split", False),
                                                      ("v8", "fork", True)])
def test_memory_failure_walks_counted_equal_the_prediction(fresh, variant, shape, early_kill):
    """collect_procs_ksm() and try_to_unmap() of one poisoned KSM page (a
    fresh guest each: the page stays poisoned)."""
    vm = fresh(variant)
    run = _many(vm, shape)
    run.start()
    try:
        for st in run.scenario.steps:
            run.step(st.name)
        if early_kill:
            # processes the snapshot sees and the poisoning may not (early kill
            # collects every process): CI once saw a fresh guest's boot-time
            # helpers exit in between; collect_procs_ksm() collects who is alive
            for s in (2, 4, 6, 8):
                vm.spawn(["sleep", str(s)])
        res = measure_cost(vm, by="hwpoison", run=run, early_kill=early_kill)
    finally:
        run.stop()
    text = cost_measure_text(res, limit=None)
    print(text)
    assert res.agree, text
    assert not res.extra["hwpoison"].get("tasks_raced"), text
    assert res.rule_matches == [RULE[variant]], text
    crule = collect_rule(res.snapshot.kernel)
    assert crule == ("stored" if variant == "v8" else "stock")
    assert res.collect_matches == [crule], text
    w = res.walks
    assert w["walk"].tolist() == ["collect_procs_ksm", "try_to_unmap"], text
    # madvise succeeds iff try_to_unmap() reaches every mapping (the walk
    # stops once the page is unmapped); on v3 pair 0's moved mapping is missed
    c = res.cost
    tu = c[(c["node"] == w.iloc[1]["node"]) & (c["walk"] == "try_to_unmap")
           & (c["rule"] == RULE[variant])].iloc[0]
    assert bool(tu["stopped"]) == (variant != "v3"), text
    assert res.extra["hwpoison"]["madvise"] == ("ok" if tu["stopped"] else "EBUSY"), text
    col = w.iloc[0]
    # one tree query per rmap_item per collected process: the poisoning
    # process, or every process with an mm when early kill is on
    mce = res.extra["hwpoison"]["tasks"]      # the processes alive at the poisoning
    procs = sum(mce_early_kill(f, 1) for _, _, f in mce["processes"]) if early_kill else 1
    assert col["m_first"] == 2 * procs, text
    if crule == "stock":
        # the whole tree each time, and add_to_kill_ksm() for every VMA of the
        # poisoning process in it: no address check
        assert col["m_returned"] == 2 * N, text
        per_proc = N // 5 if shape == "fork" else N
        assert col["m_rmap_one"] == 2 * per_proc, text


@pytest.mark.vm
def test_measure_hwpoison_cli(fresh):
    """`ksmlens cost --measure --by hwpoison --json` starts its own many-vmas
    run (HWPOISON_ARGS: an mremap'd pair 0), poisons pair 0's page and
    exits 0 only if every count equals the prediction."""
    import json
    import subprocess
    import sys
    vm = fresh("union")
    r = subprocess.run([sys.executable, "-m", "ksmlens", "cost", "--measure", "--by",
                        "hwpoison", "--json", "--name", vm.name],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    d = json.loads(r.stdout)
    assert d["agree"] and d["by"] == "hwpoison" and d["rule"] == "stored"
    # union's walk stores the index; its collect_procs_ksm() still searches it all
    assert d["collect_rule"] == "stock" and d["collect_matches"] == ["stock"]
    # the moved mapping tells stored from v3
    assert d["rule_matches"] == ["stored"], d["rule_matches"]
    assert d["hwpoison"]["madvise"] == "ok" and [w["walk"] for w in d["walks"]] == [
        "collect_procs_ksm", "try_to_unmap"]
