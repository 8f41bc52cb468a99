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
import time

import pytest

from ksmlens.lab import ksmsys
from ksmlens.lens.midupdate import cpu_stacks

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


def _disagreements(doc) -> str:
    """The summary, the last lines of every failed run of the kernel's
    tests, and every disagreeing pause whole: rows, ksmd, and what each CPU
    ran with its kernel stack, so a failure says what it saw."""
    lines = [doc["summary"]]
    for s in doc["suites"]:
        for r in s["runs"]:
            if r["rc"] not in (0, 4) or r["failed"]:
                lines.append(f"{s['name']} {r['mode']}: rc {r['rc']}: "
                             + " | ".join(r["output"][-8:]))
        for c in s["checks"]:
            if c["outcome"] == "disagree":
                lines.append(json.dumps({k: c.get(k) for k in (
                    "suite", "mode", "at", "mismatches", "ksmd", "on_cpu", "evidence")}))
    return "\n".join(lines)


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
    assert p.returncode == 0, _disagreements(doc)
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


def test_in_flight_window_needs_a_stack_inside_an_updater():
    from ksmlens.experiments.check import Row
    from ksmlens.experiments.selftests import compare_paused, in_flight_window
    snap, n, cur = _replace_page_state()
    bad = [r for r in compare_paused(snap) if not r.ok]
    mm = n_mm(snap)

    def cpu(stack, tid=7, mm=mm):
        return [{"cpu": 0, "pid": tid, "tid": tid, "comm": "t", "mm": mm,
                 "mode": "kernel", "ip": "0x0", "stack": stack}]
    zap = cpu(["_raw_spin_lock", "zap_pte_range", "unmap_page_range", "do_exit"])
    why = in_flight_window(snap, bad, zap)
    assert why and "CPU 0 in zap_pte_range()" in why
    # in user mode, or in a function that changes no PTE: nothing in flight
    assert in_flight_window(snap, bad, cpu([])) is None
    assert in_flight_window(snap, bad, cpu(["memcmp_pages", "cmp_and_merge_page"])) is None
    # a task whose mm has no item on the page cannot be changing its PTEs...
    assert in_flight_window(snap, bad, cpu(zap[0]["stack"], tid=8, mm="0xmm8")) is None
    # ...but ksmd can (replace_page() on any page)
    ksmd = cpu(["flush_tlb_mm_range", "replace_page", "try_to_merge_one_page",
                "ksm_scan_thread", "kthread"], tid=35, mm=None)
    assert "replace_page()" in in_flight_window(snap, bad, ksmd)
    # a stack that could not be unwound explains nothing
    assert in_flight_window(snap, bad, [dict(zap[0], stack=None)]) is None
    # two mappings apart is more than one CPU holds
    n.mapcount = 18
    assert in_flight_window(snap, [r for r in compare_paused(snap) if not r.ok], zap) is None
    n.mapcount = 17
    # counters: one item per CPU inside mm/ksm.c's list updaters, general_profit to match
    rows = [Row("ksm_rmap_items", 17, 18, None), Row("pid 7 ksm_rmap_items", 17, 18, None),
            Row("general_profit", 1000, 1000 - snap.kernel.rmap_item_size, None)]
    alloc = cpu(["kmem_cache_alloc_noprof", "alloc_rmap_item", "get_next_rmap_item",
                 "scan_get_next_rmap_item", "ksm_do_scan"], tid=35, mm=None)
    assert "alloc_rmap_item" in in_flight_window(snap, rows, alloc)
    assert in_flight_window(snap, rows, zap) is None        # zapping does not count items
    rows[2] = Row("general_profit", 1000, 999, None)        # profit off by something else
    assert in_flight_window(snap, rows, alloc) is None


# `info registers -a` as QEMU 7.2 printed it for a 2-vCPU guest (6.12, TCG)
REGS = """CPU#0
RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RSI=ffffffff819a90c1 RDI=0000000000040b14 RBP=ffffffff81c0a040 RSP=ffffffff81c03e98
R8 =0000000000040b14 R9 =0000000000000000 R10=0000000000000015 R11=0000000000000000
R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000
RIP=ffffffff815d00a3 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CPU#1
RAX=0000000000000001 RBX=00007ffd1c2e3f40 RCX=0000000000000000 RDX=0000000000000000
RSI=0000000000000000 RDI=0000000000000000 RBP=00007ffd1c2e3f90 RSP=00007ffd1c2e3f20
R8 =0000000000000000 R9 =0000000000000000 R10=0000000000000000 R11=0000000000000246
R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000
RIP=0000555555555189 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
"""


def test_parse_registers_reads_every_vcpu():
    from ksmlens.errors import KsmlensError
    from ksmlens.lab.qmp import parse_registers
    regs = parse_registers(REGS)
    assert [r["cpu"] for r in regs] == [0, 1]
    assert regs[0]["rip"] == 0xffffffff815d00a3 and regs[0]["r8"] == 0x40b14
    assert regs[1]["rsp"] == 0x7ffd1c2e3f20 and regs[1]["rfl"] == 0x202
    assert len(regs[0]) == 1 + 18
    with pytest.raises(KsmlensError, match="no CPU"):
        parse_registers("unknown command")


@pytest.mark.vm
def test_paused_stacks_are_the_running_tasks_own(lab):
    """The stacks unwound from QEMU's registers are the kernel's: whenever
    cpu_curr() says ksmd, kept busy by a workload, is on a CPU in kernel
    mode, its unwound stack is ksmd's own (ksm_scan_thread() under kthread()),
    and an idle vCPU's runs through do_idle(). A vCPU caught where drgn
    cannot unwind (entry code) says so (``stack`` None, ``error``), never a
    made-up stack."""
    from ksmlens.lab.attach import attach
    from ksmlens.lab.scenarios import ScenarioRun
    from ksmlens.lens.midupdate import on_cpu
    vm = lab("union")
    prog = attach(f"vm:{vm.name}")
    ksmd_stacks, idle, failed = [], 0, []
    with ScenarioRun(vm, "chain"):
        saved = ksmsys.set_knobs(vm, pages_to_scan=5000, sleep_millisecs=0)
        try:
            for _ in range(200):
                with vm.paused():
                    regs = vm.cpu_registers()
                    cpus = on_cpu(prog, regs)
                    stacks = cpu_stacks(prog, regs)
                assert len(regs) == 2
                idle += sum(1 for st in stacks if st["stack"] and "do_idle" in st["stack"])
                failed += [st for st in stacks if st["stack"] is None]
                ksmd_stacks += [c["stack"] for c in cpus
                                if c["comm"] == "ksmd" and c["mode"] == "kernel"
                                and c["stack"] is not None]
                if len(ksmd_stacks) >= 5 and idle:
                    break
                time.sleep(0.01)
        finally:
            ksmsys.set_knobs(vm, **saved)
    print(f"ksmd seen {len(ksmd_stacks)} times, idle {idle}, not unwound {len(failed)}: "
          f"{[f.get('error') for f in failed][:3]}")
    assert ksmd_stacks and idle, (len(ksmd_stacks), idle, failed[:3])
    for st in ksmd_stacks:
        assert "ksm_scan_thread" in st and st.index("ksm_scan_thread") < st.index("kthread"), st
    assert all(f.get("error") for f in failed)



def test_munmap_window_counts_the_detached_ptes_page_by_page():
    """As a union guest showed it (ksm_tests -H, seed 18): ksmd had already
    freed the rmap_items of the munmapped range, the pid was in
    zap_present_folio_ptes() under do_vmi_align_munmap(), and 18 KSM pages
    were still mapped 256 times each by PTEs no VMA covered."""
    from ksmlens.experiments.selftests import compare_paused, munmap_window
    snap, n, cur = _replace_page_state()
    mm = n_mm(snap)
    n.mapcount, n.ptes = 16 + 256, 16
    stack = ["zap_present_folio_ptes", "zap_present_ptes", "zap_pte_range", "unmap_page_range",
             "unmap_single_vma", "unmap_vmas", "vms_clear_ptes", "vms_complete_munmap_vmas",
             "do_vmi_align_munmap", "__vm_munmap", "entry_SYSCALL_64"]
    task = [{"cpu": 1, "pid": 7, "tid": 7, "comm": "ksm_tests", "mm": mm,
             "mode": "kernel", "ip": "0x0", "stack": stack}]
    bad = [r for r in compare_paused(snap) if not r.ok]
    snap.meta["unwalked_ptes"] = {mm: {n.kpfn: 256, 0x9999: 3}}
    why = munmap_window(snap, bad, task)
    assert why and "pid 7 (ksm_tests) in vms_clear_ptes()" in why and "256 time(s)" in why
    # one mapping more than the detached PTEs: not explained
    snap.meta["unwalked_ptes"] = {mm: {n.kpfn: 255}}
    assert munmap_window(snap, bad, task) is None
    # the PTEs are detached, but nobody is zapping them (user mode)
    snap.meta["unwalked_ptes"] = {mm: {n.kpfn: 256}}
    assert munmap_window(snap, bad, [dict(task[0], stack=[])]) is None
    # detached PTEs of an mm no CPU is unmapping explain nothing
    snap.meta["unwalked_ptes"] = {"0xmm8": {n.kpfn: 256}}
    assert munmap_window(snap, bad, task) is None
