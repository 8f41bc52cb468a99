"""SmartScan forecasts and the union hazard, against the kernel.

A forecast is made from a paused snapshot (ksmd held), then ksmd runs and
the kernel's own ``pages_skipped`` and every rmap_item's age /
remaining_skips (read back from the kernel) must be what was predicted.
The ``cow-break`` step writes into merged pages: their rmap_items stay
STABLE on pages that are no longer KSM, and on the ``union`` kernel
SmartScan then reads its age / remaining_skips out of the stored pgoff.
"""

import pytest

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.analysis.core import smartscan_forecast, union_hazard
from ksmlens.lab.attach import attach
from ksmlens.lab.scenarios import COW_BREAK_PAGES, ScenarioRun
from ksmlens.lens.snapshot import take_snapshot
from ksmlens.experiments.verify import verify_smartscan
from ksmlens.views.tables import smartscan_verify_table

from conftest import boot


@pytest.fixture(scope="module", params=["stock", "v3", "union", "v8"])
def vm(request):
    return boot(request.param)


@pytest.mark.vm
def test_forecast_and_union_hazard(vm):
    variant = vm.state["variant"]
    with ScenarioRun(vm, "smartscan") as run:
        run.step("merged")
        # 1. steady state: every skip ksmd makes over a few scans is predicted
        r = verify_smartscan(vm, 4)
        print(smartscan_verify_table(r, 8))
        assert r.observed > 0 and r.predicted == r.observed
        assert r.agree, smartscan_verify_table(r)
        # the forecast table from the first snapshot agrees on its own too
        fc = smartscan_forecast(r.before, r.full_scans)
        assert fc["pages_skipped_delta"][r.full_scans] == r.observed

        # 2. write into merged pages with ksmd held: STABLE items on non-KSM pages
        res = run.step("cow-break")
        snap = take_snapshot(attach(f"vm:{vm.name}"))
        hz = union_hazard(snap)
        assert sorted(h["address"] for h in hz) == sorted(res["addresses"])
        assert {h["pid"] for h in hz} == {res["pid"]}
        # the kernel agrees the pages are no longer the stable nodes' KSM pages
        pfn = {}
        for reg in run.page_states(res["pid"], "data"):
            for k, pg in enumerate(reg["pages"]):
                pfn[reg["start"] + k * 4096] = pg["pfn"]
        for h in hz:
            assert pfn[h["address"]] != snap.node(h["stable_node"]).kpfn
        # the snapshot's own page-table walk ("mapped") agrees with drgn's follow_pfn()
        from drgn import Object
        from drgn.helpers.linux.mm import follow_pfn
        prog = attach(f"vm:{vm.name}")
        seen = {True: 0, False: 0}
        for n in snap.nodes():
            for m in n.mappings:
                pfn = follow_pfn(Object(prog, "struct mm_struct *", int(m["mm"], 16)),
                                 m["address"]).value_()
                assert (pfn == n.kpfn) == m["mapped"], (n.id, m)
                seen[m["mapped"]] += 1
        assert seen[False] == COW_BREAK_PAGES and seen[True] > 0
        by_id = {i.id: i for i in snap.items()}
        for h in hz:
            it = by_id[h["item"]]
            if variant == "union":
                # SmartScan's bytes are the stored pgoff's: age = byte 4, skips = byte 5
                assert h["hazard"] and it.stored_pgoff == it.linear_page_index
                assert h["age"] == (it.stored_pgoff >> 32) & 0xFF
                assert h["remaining_skips"] == (it.stored_pgoff >> 40) & 0xFF
                assert h["age"] >= 3   # user addresses: pgoff bits 32-39 are not 0
            elif variant == "v8":
                assert not h["hazard"] and h["smartscan_reads_stable"] is False
            else:
                assert not h["hazard"] and it.stored_pgoff is None

        # 3. let ksmd visit them: the forecast from that snapshot holds
        r = verify_smartscan(vm, 6)
        print(smartscan_verify_table(r, 12))
        assert r.predicted == r.observed, smartscan_verify_table(r)
        assert r.agree, smartscan_verify_table(r)
        written = [x for x in r.items if x["address"] in res["addresses"]]
        assert len(written) == COW_BREAK_PAGES
        # they left their stable nodes at the first visit
        after = {(i.pid, i.address): i for i in r.after.items()}
        assert all(after[(res["pid"], a)].state != "stable" for a in res["addresses"])
        if variant == "union":
            # ages continue from the pgoff's byte: far above what r.full_scans visits give
            assert all(x["reads_pgoff"] for x in written)
            assert min(x["observed_age"] for x in written) > r.full_scans + 5
        elif variant == "v8":
            # v8: not read; the removal zeroes the union, ages restart at 0
            assert not any(x["reads_pgoff"] for x in written)
            assert all(x["observed_age"] == x["visits"] - 1 for x in written), written
        else:
            # stock / v3: the real age, frozen when the page merged (a few visits)
            assert all(x["observed_age"] < r.full_scans + 5 for x in written), written


@pytest.mark.vm
def test_watch_and_diff(vm, tmp_path):
    """A timeline across the cow-break: the diff names the written pages as
    unmerged, and its SmartScan skip count is the kernel's pages_skipped."""
    import subprocess
    import sys
    from ksmlens.lens.snapshot import take_idle_snapshot
    from ksmlens.experiments.watch import Timeline, diff, watch
    if vm.state["variant"] not in ("union", "v8"):
        pytest.skip("checked on the kernels with a stored pgoff")
    with ScenarioRun(vm, "smartscan") as run:
        run.step("merged")
        res = run.step("cow-break")                 # ksmd held
        prog = attach(f"vm:{vm.name}")
        first = take_idle_snapshot(prog, vm)
        run.step("resume")
        frames = []
        before = ksmsys.read_counters(vm)["sleep_millisecs"]
        tl = watch(prog, vm, count=3, scans=1, on_frame=lambda s, d: frames.append(d),
                   pace_ms=3000)     # slack for a loaded host: one scan per frame
        assert ksmsys.read_counters(vm)["sleep_millisecs"] == before   # pace put back
        assert len(tl.frames) == 3 and frames[0] is None
        d = diff(first, tl.frames[0])
        written = sorted((res["pid"], a) for a in res["addresses"])
        assert sorted(set(d.unmerged) & set(written)) == written
        assert sum(d.skipped.values()) == d.counters["pages_skipped"]
        for x in tl.diffs():
            assert x.full_scans[1] == x.full_scans[0] + 1, x.summary()   # paced: one scan
            assert sum(x.skipped.values()) == x.counters["pages_skipped"], x.summary()
        tl.save(tmp_path / "tl")
        again = Timeline.load(tmp_path / "tl")
        assert [f.scan["seqnr"] for f in again.frames] == [f.scan["seqnr"] for f in tl.frames]
        first.save(tmp_path / "a.json")
        r = subprocess.run([sys.executable, "-m", "ksmlens", "diff", str(tmp_path / "a.json"),
                            str(tmp_path / "tl" / "frame-0000.json")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"{len(d.unmerged)} unmerged" in r.stdout
        r = subprocess.run([sys.executable, "-m", "ksmlens", "smartscan", "-s",
                            str(tmp_path / "a.json"), "--scans", "4"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"{COW_BREAK_PAGES} STABLE rmap_items on pages that are no longer KSM" in r.stdout
        src = ("the stored pgoff's bytes" if vm.state["variant"] == "union"
               else "SmartScan does not read a STABLE item (v8)")
        assert r.stdout.count(src) == COW_BREAK_PAGES
