"""The lens against real guests: every walk is checked against the kernel's
own counters (/sys/kernel/mm/ksm, /proc/PID/ksm_stat) and page flags."""

import json
import subprocess
import sys

import pytest

from ksmlens.lab.attach import attach
from ksmlens.experiments.check import check_vm, walk_counts
from ksmlens.views.tables import check_table
from ksmlens.errors import KsmlensError
from ksmlens.lens.model import SCHEMA, Snapshot
from ksmlens.lab.scenarios import SCENARIOS, ScenarioRun, workload_binary
from ksmlens.lens.snapshot import take_snapshot

from conftest import boot, walks_agree

pytestmark = pytest.mark.vm      # every test here boots a guest


@pytest.fixture(scope="module", params=["stock", "union"])
def vm(request):
    return boot(request.param)


def _run_all_steps(run):
    for st in run.scenario.steps:
        run.step(st.name)


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.core])
def test_check_agrees_with_kernel_after_scenario(vm, name):
    with ScenarioRun(vm, name) as run:
        _run_all_steps(run)
        prog = attach(f"vm:{vm.name}")
        rows, snap, info = check_vm(vm, prog)
        assert all(r.ok for r in rows), check_table(rows)
        # the walk by a copy of the slabs reads what the pointer walk does
        walks_agree(vm, prog)
        # Every row compares something real: the scenario's pids are there.
        for pid in run.pids():
            if run.pages_of(pid):
                row = next(r for r in rows if r.what == f"pid {pid} ksm_merging_pages")
                assert row.kernel >= run.pages_of(pid)
        assert snap.meta["paused_seconds"] > 0
        # Each page node's KSM page points back to it (folio->mapping).
        for n in snap.nodes():
            if n.kind != "chain" and n.items:
                assert n.page_is_ksm and n.page_stable_node == n.id, n
        # Each stable rmap_item's page, as /proc/PID/pagemap has it, is its
        # stable node's KSM page (kpfn).
        pfn_at = {}
        for reg in run.page_states():
            for k, pg in enumerate(reg["pages"]):
                pfn_at[(reg["pid"], reg["start"] + k * 4096)] = pg["pfn"]
        checked = 0
        for i in snap.items():
            if i.state == "stable" and (i.pid, i.address) in pfn_at:
                assert pfn_at[(i.pid, i.address)] == snap.node(i.stable_node).kpfn, i
                checked += 1
        assert checked >= sum(run.pages_of(p) for p in run.pids()) // 2
        if name == "file-cow":
            items = [i for p in run.pids() for i in snap.items_of(p) if i.state == "stable"]
            assert items and {(i.pgoff_status, i.pgoff_cause) for i in items} == \
                {("moved", "file")}
            assert all(i.vm_pgoff == 16 for i in items)   # --offset-pages default
        if name == "chain":
            chains = [n for n in snap.nodes() if n.kind == "chain"]
            assert chains
            mps = snap.counters["max_page_sharing"]
            for c in chains:
                for d in c.dups:
                    assert 0 < len(snap.node(d).items) <= mps
        if name == "mremap":
            pid = run.history[2]["result"]["pid"]
            moved = [i for i in snap.items_of(pid) if i.state == "stable"]
            assert moved and all(i.addr_pgoff != i.linear_page_index for i in moved)
            assert {(i.pgoff_status, i.pgoff_cause) for i in moved} == {("moved", "mremap")}
            other = [i for i in snap.items() if i.pid != pid and i.state == "stable"]
            assert other and all(i.addr_pgoff == i.linear_page_index for i in other)
            assert {i.pgoff_status for i in other} == {"ok"}
            for i in snap.items():
                if snap.kernel.has_stored_pgoff and i.state == "stable":
                    # set by try_to_merge_with_ksm_page() from the VMA
                    assert i.stored_pgoff == i.linear_page_index
                elif not snap.kernel.has_stored_pgoff:
                    assert i.stored_pgoff is None


def test_snapshot_json_contract_and_schema(vm, tmp_path):
    with ScenarioRun(vm, "merge") as run:
        _run_all_steps(run)
        out = tmp_path / "snap.json"
        r = subprocess.run([sys.executable, "-m", "ksmlens", "snapshot", "--name", vm.name,
                            "-o", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        d = json.loads(out.read_text())
        assert d["schema"] == SCHEMA
        assert d["kernel"]["variant"] == vm.state["variant"]
        assert d["kernel"]["has_stored_pgoff"] == (vm.state["variant"] in ("union", "v8"))
        for k in ("pages_shared", "pages_sharing", "pages_unshared", "full_scans"):
            assert k in d["counters"]
        item = next(i for i in d["rmap_items"] if i["pid"] in run.pids())
        for k in ("pid", "comm", "address", "state", "stable_node", "vma_start", "vma_end",
                  "vm_pgoff", "addr_pgoff", "linear_page_index", "stored_pgoff", "age",
                  "remaining_skips"):
            assert k in item
        assert item["comm"].startswith("ksmlens-worklo")
        node = d["stable_nodes"][0]
        for k in ("id", "kind", "chain", "kpfn", "nid", "rmap_hlist_len", "items"):
            assert k in node
        snap = Snapshot.load(out)
        assert walk_counts(snap)["pages_shared"] == d["counters"]["pages_shared"]
        d["schema"] = "ksmlens-snapshot/0"
        bad = tmp_path / "old.json"
        bad.write_text(json.dumps(d))
        with pytest.raises(KsmlensError, match="schema 'ksmlens-snapshot/0' is not"):
            Snapshot.load(bad)


def test_live_walk_while_ksmd_runs_and_vmcore(vm, tmp_path):
    with ScenarioRun(vm, "smartscan") as run:   # volatile pages keep ksmd busy
        _run_all_steps(run)
        prog = attach(f"vm:{vm.name}")
        live = take_snapshot(prog, mode="live")
        assert live.meta["mode"] == "live" and live.meta["paused_seconds"] == 0
        assert {i.pid for i in live.items()} >= set(run.pids())
        # A vmcore of a paused guest walks to the same state as a consistent walk.
        with vm.qmp(timeout=600) as q:
            q.stop()
            try:
                core = tmp_path / "vm.core"
                q.command("dump-guest-memory", paging=False, protocol=f"file:{core}")
                cprog = attach(str(core), vmlinux=vm.state["vmlinux"])
                # an arm64 ELF (the workload cross-built for the arm64 lab, a
                # real aarch64 binary with a build ID) for this x86-64 core
                arm64_elf = workload_binary(arch="arm64")
                with pytest.raises(KsmlensError, match=r"is an arm64 vmlinux; vmcore .* x86_64"):
                    attach(str(core), vmlinux=arm64_elf)
                from_core = take_snapshot(cprog)
                same = take_snapshot(prog, mode="live")   # guest is paused: same state
                from ksmlens.lens.helpers import for_each_unstable_rmap_item
                tree = {f"0x{o.value_():x}" for o in for_each_unstable_rmap_item(prog)}
            finally:
                q.cont()
        assert from_core.meta["mode"] == "static"
        assert sorted(i.id for i in from_core.items()) == sorted(i.id for i in same.items())
        assert walk_counts(from_core) == walk_counts(same)
        # in_unstable_tree (by seqnr, minding the window between passes when
        # the tree still holds the previous pass's items) == the tree itself
        assert {i.id for i in same.items() if i.in_unstable_tree} == tree


def test_wrong_vmlinux_is_refused(vm):
    import ksmlens.lab.kbuild as kbuild
    other = "union" if vm.state["variant"] == "stock" else "stock"
    k = kbuild.build(other)
    with pytest.raises(KsmlensError, match="is not the running kernel's vmlinux"):
        attach(f"vm:{vm.name}", vmlinux=k.vmlinux)
    with pytest.raises(KsmlensError, match="no VM named 'gone' is up"):
        attach("vm:gone")
    with pytest.raises(KsmlensError, match="no such vmcore"):
        attach("/nonexistent.core")


def test_helpers_agree_with_the_fast_walk_and_cli(vm):
    """The drgn-Object helpers and the byte-level snapshot see the same state;
    `ksmlens check` and `ksmlens report` print it."""
    import ksmlens.lens.helpers as walk
    with ScenarioRun(vm, "fork") as run:
        _run_all_steps(run)
        prog = attach(f"vm:{vm.name}")
        with vm.qmp() as q:
            q.stop()
            try:
                snap = take_snapshot(prog, mode="live")
                nodes = {hex(n.value_()): sorted(hex(i.value_()) for i in
                                                 walk.for_each_stable_node_rmap_item(n))
                         for n in walk.for_each_stable_node(prog)}
                items = list(walk.for_each_rmap_item(prog))
                sample = {}
                for i in items[:40]:
                    vma = walk.rmap_item_vma(i)
                    tasks = [t.pid.value_() for t in walk.rmap_item_tasks(i)]
                    sample[hex(i.value_())] = (
                        walk.rmap_item_state(i), walk.rmap_item_address(i),
                        vma.vm_start.value_() if vma else None,
                        walk.linear_page_index(vma, walk.rmap_item_address(i)) if vma else None,
                        tasks[0] if tasks else None)
            finally:
                q.cont()
        assert {n.id: sorted(n.items) for n in snap.nodes() if n.kind != "chain"} == nodes
        assert [i.id for i in snap.items()] == [hex(i.value_()) for i in items]
        for iid, (state, addr, vstart, lpi, pid) in sample.items():
            it = snap.item(iid)
            assert (it.state, it.address, it.vma_start, it.linear_page_index, it.pid) == \
                (state, addr, vstart, lpi, pid)
        forked = [p["pid"] for p in run.info["procs"] if p["role"] == "forked"]
        assert forked and snap.items_of(forked[0])
    for args, needle in ((["check"], "agree"), (["report"], "sharers")):
        r = subprocess.run([sys.executable, "-m", "ksmlens", *args, "--name", vm.name],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert needle in r.stdout
