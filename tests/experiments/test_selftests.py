"""The kernel's own KSM selftests as a peer suite, and the mremap selftest.

``ksmlens selftests`` runs ``ksm_functional_tests`` and ``ksm_tests`` (built
from Debian's linux-source-6.12) in a union guest and pauses it at random
moments while they run: every paused walk must agree with the kernel's own
counters read in that pause (or be a classified mid-update state), at least
30 times per suite, and the kernel's tests themselves must pass.

``migrate.ksm_and_mremap`` (the merged series' rmap.c test, written here from
its description) must fail on v3 and pass on stock, union and v8, and
``ksmlens verify`` on the same merged page must predict exactly that.
"""

import json
import re
import subprocess
import sys

import pytest

from ksmlens.experiments.selftests import (KSM_TESTS_MODES, SuiteResult, SelftestsResult, SelftestRun,
                               PausedCheck, parse_tap, run_mremap_selftest)

SUMMARY = re.compile(
    r"(?P<suite>ksm_functional_tests|ksm_tests) (?P<ok>ok|FAILED) \((?P<what>[^)]*)\), "
    r"(?:(?P<agree>\d+) paused checks agree|(?P<total>\d+) paused checks: (?P<agree2>\d+) "
    r"agree, (?P<disagree>\d+) DISAGREE)(?:, (?P<mid>\d+) mid-update \(classified\))?")


def test_parse_tap_counts_kselftest_output():
    lines = ["TAP version 13", "1..4", "# [RUN] test_unmerge", "ok 1 Pages were unmerged",
             "ok 2 # SKIP PR_SET_MEMORY_MERGE not supported", "not ok 3 Merging memory failed",
             "ok 4 Setting/clearing PR_SET_MEMORY_MERGE works",
             "# Totals: pass:2 fail:1 xfail:0 xpass:0 skip:1 error:0"]
    assert parse_tap(lines) == {"passed": 2, "failed": 1, "skipped": 1, "planned": 4}
    # A run that ended before its plan is not ok even with exit code 0.
    r = SelftestRun("ksm_functional_tests", None, [], 0, 2, 0, 0, 4, 1.0, [])
    assert not r.ok


def test_summary_line_shows_classified_states_apart():
    runs = [SelftestRun("ksm_tests", m, [], 0, 1, 0, 0, 1, 1.0, []) for m in ("merge", "prctl")]
    checks = ([PausedCheck("ksm_tests", "merge", 0.1, "agree")] * 31
              + [PausedCheck("ksm_tests", "merge", 0.2, "mid-update")])
    res = SelftestsResult("r", [SuiteResult("ksm_tests", runs, checks)], 30, 1.0)
    assert res.ok
    line = res.summary()
    assert line == ("selftests: ksm_tests ok (2 modes: 2 pass), 31 paused checks agree, "
                    "1 mid-update (classified)")
    m = SUMMARY.search(line)
    assert m and m["agree"] == "31" and m["mid"] == "1"
    # One disagreement fails the whole run, and is not hidden.
    checks.append(PausedCheck("ksm_tests", "prctl", 0.3, "disagree"))
    assert not res.ok and "33 paused checks: 31 agree, 1 DISAGREE" in res.summary()
    # Too few checks fail it too.
    res2 = SelftestsResult("r", [SuiteResult("ksm_tests", runs, checks[:5])], 30, 1.0)
    assert not res2.ok and "(fewer than 30)" in res2.summary()


@pytest.mark.vm
def test_selftests_on_union_agree_at_every_pause(lab):
    vm = lab("union")
    # Every ksm_tests mode: both suites take well under a minute of guest time.
    argv = [sys.executable, "-m", "ksmlens", "selftests", "--name", vm.name, "--json",
            "--seed", "9"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1500)
    print(p.stderr[-3000:])
    doc = json.loads(p.stdout)
    print(doc["summary"])
    assert p.returncode == 0, doc["summary"]
    found = {m["suite"]: m for m in SUMMARY.finditer(doc["summary"])}
    assert set(found) == {"ksm_functional_tests", "ksm_tests"}, doc["summary"]
    suites = {s["name"]: s for s in doc["suites"]}
    for name, m in found.items():
        s = suites[name]
        assert m["ok"] == "ok" and m["disagree"] is None
        assert int(m["agree"]) >= 30
        # The summary's figures are the checks' own.
        outcomes = [c["outcome"] for c in s["checks"]]
        assert outcomes.count("agree") == int(m["agree"])
        assert outcomes.count("mid-update") == int(m["mid"] or 0)
        assert outcomes.count("disagree") == 0
        # A classified state says what it saw, with the kernel's numbers.
        for c in s["checks"]:
            if c["outcome"] == "mid-update":
                assert c["detail"], c
        # The pauses saw KSM at work, not an idle kernel: rmap_items and
        # stable nodes were there to compare in some of them.
        assert max(c["rmap_items"] for c in s["checks"]) > 0
        assert max(c["stable_nodes"] for c in s["checks"]) > 0
        # The kernel's own tests passed, every planned result reported.
        for r in s["runs"]:
            assert r["rc"] in (0, 4) and r["failed"] == 0, r["output"][-10:]
            assert r["passed"] + r["skipped"] == r["planned"]
    ft = suites["ksm_functional_tests"]["runs"][0]
    assert ft["passed"] >= 8, ft["output"]      # 9 planned; uffd-wp may skip
    modes = [r["mode"] for r in suites["ksm_tests"]["runs"]]
    assert modes[:len(KSM_TESTS_MODES)] == list(KSM_TESTS_MODES)
    # Two NUMA nodes: -N -m 0 really ran (a one-node guest would skip it).
    numa = next(r for r in suites["ksm_tests"]["runs"] if r["mode"] == "numa0")
    assert numa["passed"] == 1, numa["output"]
    # The knobs are back as they were (the suites set their own).
    assert vm.read_file("/sys/kernel/mm/ksm/merge_across_nodes").strip() == "1"


@pytest.mark.vm
@pytest.mark.parametrize("variant", ["union", "stock", "v8", "v3"])
def test_mremap_selftest_fails_only_on_v3(lab, variant):
    vm = lab(variant)
    res = run_mremap_selftest(vm)
    print("\n".join(res.output))
    print(res.summary())
    assert res.variant == variant
    # The test's page: 16 mappings of one KSM page.
    assert res.merged["pages"] == 16 and res.merged["pfn"] > 0
    v = res.verify
    assert v is not None and v["mappings"] == 16, v
    want = "fail" if variant == "v3" else "pass"
    assert res.outcome == want, res.output
    # ksmlens predicted it from the paused walk, and the kernel agreed.
    assert v["predicted"] == ("stays" if variant == "v3" else "moves"), v
    assert v["misses"] == (16 if variant == "v3" else 0), v
    assert v["agree"], v


def _replace_page_state():
    """16 mappings of one KSM page plus ksmd's cursor on a 17th page whose
    PTE it has cleared: the mapcount already counts it (as seen on guests)."""
    from smallsnap import item, node, snapshot
    vma = (0x7f0000000000, 0x7f0000020000, 0x7f0000000)
    merged = [item(7, 0x7f0000000000 + k * 4096, vma=vma, node="0xn1") for k in range(16)]
    cur = item(7, 0x7f0000010000, state="none", vma=vma)
    cur.pte = "none"
    n = node("0xn1", merged, kpfn=0x4242)
    n.page_is_ksm, n.mapcount, n.ptes = True, 17, 16
    snap = snapshot(merged + [cur], [n])
    snap.scan["rmap_list"] = cur.id
    snap.meta["ksmd"] = {"pid": 35, "state": 0, "in_scan": None, "idle": False}
    for sl in snap.slots():
        sl.mm_ksm_rmap_items, sl.mm_ksm_merging_pages = 17, 16
    snap.counters.update(pages_sharing=15, pages_unshared=0, stable_node_chains=0,
                         stable_node_dups=0, rmap_items=17)
    return snap, n, cur


def test_replace_page_window_is_classified_only_with_its_evidence():
    from ksmlens.experiments.selftests import compare_paused, exit_mmap_window, replace_page_window
    snap, n, cur = _replace_page_state()
    bad = [r for r in compare_paused(snap) if not r.ok]
    assert [r.what for r in bad] == ["KSM pages: PTEs vs mapcount"]
    why = replace_page_window(snap, bad)
    assert why and "replace_page()" in why and "0x4242" in why
    assert exit_mmap_window(snap, bad) is None          # no exiting mm
    # ksmd idle: nobody is installing a PTE, so it is a real disagreement.
    snap.meta["ksmd"]["idle"] = True
    assert replace_page_window(snap, bad) is None
    snap.meta["ksmd"]["idle"] = False
    # Two mappings missing is not one replace_page().
    n.mapcount = 18
    bad2 = [r for r in compare_paused(snap) if not r.ok]
    assert replace_page_window(snap, bad2) is None
    n.mapcount = 17
    # The cursor's PTE already maps the KSM page: the window is over.
    cur.pte, cur.pfn = "present", 0x4242
    assert replace_page_window(snap, bad) is None
    cur.pte, cur.pfn = "none", None
    # The cursor is not the item being merged (still in a tree).
    cur.state = "unstable"
    assert replace_page_window(snap, bad) is None
    cur.state = "none"
    # Any other mismatch alongside: not classified.
    from ksmlens.experiments.check import Row
    assert replace_page_window(snap, bad + [Row("pages_shared", 1, 2, None)]) is None


def test_exit_mmap_window_needs_an_exiting_mm_on_the_page():
    from ksmlens.experiments.selftests import compare_paused, exit_mmap_window
    snap, n, cur = _replace_page_state()
    snap.meta["ksmd"]["idle"] = True
    n.mapcount, n.ptes = 16, 14        # two PTEs of pid 7 already zapped... or not read
    bad = [r for r in compare_paused(snap) if not r.ok]
    assert exit_mmap_window(snap, bad) is None        # pid 7's mm is alive
    snap.slots()[0].mm_users = 0
    why = exit_mmap_window(snap, bad)
    assert why and "exit_mmap()" in why and "2 mapping" in why
    n.mapcount = 40                    # more than its items in the exiting mm
    bad = [r for r in compare_paused(snap) if not r.ok]
    assert exit_mmap_window(snap, bad) is None


def test_rmap_list_window_is_one_item_at_the_cursor_mm():
    from ksmlens.experiments.check import Row
    from ksmlens.experiments.selftests import rmap_list_window
    snap, n, cur = _replace_page_state()
    slot = snap.slots()[0]
    snap.scan["mm_slot"] = slot.id
    bad = [Row("ksm_rmap_items", 17, 18, None), Row("pid 7 ksm_rmap_items", 17, 18, None),
           Row("general_profit", 1000, 936, None)]
    ksmd_cpu = [{"cpu": 1, "pid": 35, "tid": 35, "comm": "ksmd", "mm": None}]
    assert "get_next_rmap_item()" in rmap_list_window(snap, bad, ksmd_cpu)
    assert rmap_list_window(snap, bad, []) is None               # ksmd not on a CPU
    snap.scan["mm_slot"] = "0xother"                             # another mm's list
    assert rmap_list_window(snap, bad, ksmd_cpu) is None
    snap.scan["mm_slot"] = slot.id
    two = [Row("ksm_rmap_items", 17, 19, None), Row("pid 7 ksm_rmap_items", 17, 19, None)]
    assert rmap_list_window(snap, two, ksmd_cpu) is None         # two items


def test_pte_update_window_needs_a_running_task_of_a_mapping_mm():
    from ksmlens.experiments.selftests import compare_paused, pte_update_window
    snap, n, cur = _replace_page_state()
    bad = [r for r in compare_paused(snap) if not r.ok]
    writer = [{"cpu": 0, "pid": 7, "tid": 7, "comm": "ksm_tests", "mm": n_mm(snap)}]
    assert "COW break" in pte_update_window(snap, bad, writer)
    assert pte_update_window(snap, bad, []) is None
    other = [{"cpu": 0, "pid": 8, "tid": 8, "comm": "sh", "mm": "0xmm8"}]
    assert pte_update_window(snap, bad, other) is None           # not a mapping mm
    n.mapcount = 18                                              # two ahead, one task
    bad = [r for r in compare_paused(snap) if not r.ok]
    assert pte_update_window(snap, bad, writer) is None


def n_mm(snap):
    return snap.slots()[0].mm


def test_munmap_window_needs_items_without_a_vma_of_a_running_mm():
    from ksmlens.experiments.selftests import compare_paused, munmap_window
    snap, n, cur = _replace_page_state()
    for i in snap.items()[:3]:
        i.vma_start = i.vma_end = i.vm_pgoff = None          # their VMA is detached
    n.mapcount, n.ptes = 16, 13
    bad = [r for r in compare_paused(snap) if not r.ok]
    task = [{"cpu": 1, "pid": 7, "tid": 7, "comm": "ksm_tests", "mm": n_mm(snap)}]
    assert "munmap()" in munmap_window(snap, bad, task)
    assert munmap_window(snap, bad, []) is None
    n.ptes = 12                                              # 4 missing, 3 detached
    bad = [r for r in compare_paused(snap) if not r.ok]
    assert munmap_window(snap, bad, task) is None
