"""Scenario workloads: small C programs, run in the guest, driven step by step.

Each scenario is one mode of ``vm/scenarios/ksmlens-workload.c`` (built on
the host, run in the guest through the shared root) plus a list of named
steps. A step either sends a command to the workload (``mremap``, ``fork``,
``write ...``) or waits on the kernel (``merged``: until the kernel's own
counters say KSM merged what it should). Every scenario checks its outcome
against ``/sys/kernel/mm/ksm/*`` and ``/proc/PID/ksm_stat`` and raises
:class:`~ksmlens.errors.KsmlensError` if KSM did not do what it expected.

    run = ScenarioRun(vm, "mremap"); run.start()
    run.step("merged"); run.step("mremap"); run.step("remerged")
    ...
    run.stop()          # quits the workload, puts the KSM knobs back
"""

from __future__ import annotations

import json
import sys

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.errors import KsmlensError
from ksmlens.kernel.pgtable import PAGE_SIZE
from ksmlens.kernel.sysfs import RUN_MERGE, RUN_STOP
from ksmlens.lab.manyvmas import MANY_VMAS
from ksmlens.lab.scenario_run import (CGROUP, MERGE_TIMEOUT, SCENARIOS, WORKLOAD_SOURCE,
                                      Scenario, ScenarioRun, Step, get_scenario, missing_need,
                                      static_binary, static_binary_path, workload_binary)
from ksmlens.lab.scenario_run import check as _check, go as _go, hold as _hold, \
    wait_for as _wait_for

__all__ = ["SCENARIOS", "Scenario", "Step", "ScenarioRun", "get_scenario", "run_scenario",
           "workload_binary", "static_binary", "static_binary_path", "WORKLOAD_SOURCE",
           "CGROUP", "missing_need"]

# ------------------------------------------------------------------ steps

def _merged_all(run: ScenarioRun) -> dict:
    run.refresh()
    expect = {pid: run.pages_of(pid) for pid in run.pids() if run.pages_of(pid)}
    got = run.wait_merging(expect)
    return {"ksm_merging_pages": got, "counters": ksmsys.read_counters(run.vm)}




def _merge_check(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    c = res["counters"]
    distinct = int(_opt(run, "--distinct", 16))
    _check(c["pages_shared"] >= distinct,
           f"merge: pages_shared={c['pages_shared']} < {distinct} distinct patterns")
    total = sum(run.pages_of(p) for p in run.pids())
    _check(c["pages_shared"] + c["pages_sharing"] >= total,
           f"merge: shared+sharing={c['pages_shared'] + c['pages_sharing']} < {total} pages")
    return res


def _chain_check(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    c = res["counters"]
    mps = run.scenario.knobs["max_page_sharing"]
    total = sum(run.pages_of(p) for p in run.pids())
    _check(c["stable_node_chains"] >= 1, f"chain: no stable node chain "
           f"(stable_node_chains={c['stable_node_chains']})")
    need = -(-total // mps)
    _check(c["stable_node_dups"] >= need, f"chain: stable_node_dups="
           f"{c['stable_node_dups']}, expected >= {need} for {total} sharers / {mps}")
    return res


def _mremap(run: ScenarioRun) -> dict:
    pid = run.pids("sharer")[0]
    # Hold ksmd (run=0 keeps merged pages) so the moved, unmerged state can be
    # seen: with fast scanning ksmd re-merges within one pass otherwise.
    ksmsys.set_run(run.vm, RUN_STOP)
    r = run.command(f"mremap {pid}")
    run.refresh()
    # move_vma() broke the KSM pages of the old range before moving it
    # (ksm_madvise(MADV_UNMERGEABLE) keeps VM_MERGEABLE): at the new address
    # no page is KSM until ksmd merges them again.
    ksm = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    r["ksm_pages_after_move"] = ksm
    _check(ksm < run.pages_of(pid),
           f"mremap: {ksm} of pid {pid}'s moved pages are still KSM pages right after "
           "the move (move_vma() should have broken them)")
    r["pid"] = pid
    return r


def _remerge(run: ScenarioRun) -> dict:
    ksmsys.set_run(run.vm, RUN_MERGE)
    return _merged_all(run)


def _fork(run: ScenarioRun) -> dict:
    r = run.command("fork")
    run.refresh()
    return r


def _smartscan_check(run: ScenarioRun) -> dict:
    before = ksmsys.read_counters(run.vm)
    res = _merged_all(run)
    after = ksmsys.wait_full_scans(run.vm, 8, timeout=MERGE_TIMEOUT)
    res["counters"] = after
    res["pages_skipped_delta"] = after["pages_skipped"] - before["pages_skipped"]
    _check(after["smart_scan"] == 1, "smartscan: smart_scan is off in the guest")
    _check(res["pages_skipped_delta"] > 0,
           f"smartscan: pages_skipped did not grow over 8 full scans "
           f"({before['pages_skipped']} -> {after['pages_skipped']})")
    return res


COW_BREAK_PAGES = 8


def _cow_break(run: ScenarioRun) -> dict:
    pid = run.pids("sharer")[0]
    before = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    # Hold ksmd: the written pages' rmap_items stay STABLE, on pages that are
    # no longer KSM, until ksmd's next visit (should_skip_rmap_item()).
    ksmsys.set_run(run.vm, RUN_STOP)
    idx = list(range(COW_BREAK_PAGES))
    r = run.command(f"write {pid} data {' '.join(map(str, idx))}")
    run.refresh()
    after = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    _check(before - after == COW_BREAK_PAGES,
           f"cow-break: pid {pid} maps {before} -> {after} KSM pages, expected "
           f"{COW_BREAK_PAGES} fewer after writing into them")
    start = next(reg["start"] for p, reg in run.regions() if p == pid and reg["name"] == "data")
    addrs = [start + k * PAGE_SIZE for k in idx]
    run.written.setdefault(pid, set()).update(addrs)
    r.update(pid=pid, addresses=addrs, ksm_pages_before=before, ksm_pages_after=after)
    return r


def _resume(run: ScenarioRun) -> dict:
    ksmsys.set_run(run.vm, RUN_MERGE)
    # two increments of full_scans: every item was visited at least once, so the
    # written pages' rmap_items have left their stable nodes
    c = ksmsys.wait_full_scans(run.vm, 2, timeout=MERGE_TIMEOUT)
    return {"run": 1, "full_scans": c["full_scans"]}


def _opt(run: ScenarioRun, name: str, default):
    args = list(run.scenario.args) + list(run.extra_args)
    if name in args:
        return args[args.index(name) + 1]
    return default


# ------------------------------------------------ issue 9: the field states
#
# Each follows a program of shared/field/ (same sizes, same order of
# operations) and checks the values the kernel itself reports:
# /sys/kernel/mm/ksm, /proc/PID/ksm_stat, smaps(_rollup), pagemap and
# kpageflags. These scenarios start from a clean KSM state (run=2 first), so
# sysfs counters are checked as deltas from the counters at start.





def _delta(run: ScenarioRun, c: dict, *keys) -> dict:
    return {k: c[k] - run.before.get(k, 0) for k in keys}


SHARING = ("pages_shared", "pages_sharing", "pages_unshared")




def _stat_is(run: ScenarioRun, want: dict[int, dict], extra=None):
    """A probe: every pid's ksm_stat has the wanted values (and ``extra(c)``
    holds on the sysfs counters, if given)."""
    def probe():
        st = ksmsys.read_ksm_stat(run.vm, list(want))
        ok = all(st[p].get(k) == v for p, kv in want.items() for k, v in kv.items())
        val = {"ksm_stat": st}
        if ok and extra is not None:
            c = ksmsys.read_counters(run.vm)
            ok = extra(c)
            val["counters"] = {k: c[k] for k in ksmsys.COUNTERS if k in c}
        return ok, val
    return probe


def _region(run: ScenarioRun, pid: int, name: str) -> dict:
    for p, r in run.regions(mergeable_only=False):
        if p == pid and r["name"] == name:
            return r
    raise KsmlensError(f"pid {pid} has no region {name!r}", "protocol mismatch")


# zero-pages: 02-zero-pages (Z 64, R 16, D 8) and 01-fork-counters' parent
ZERO_PAGES, ZERO_LEFT, FORK_ZERO, FORK_PAIRS = 64, 40, 16, 16


def _zero_merged(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    z, f = run.pids()
    st = _wait_for(run, f"{ZERO_PAGES} + {FORK_ZERO} KSM zero pages", _stat_is(run, {
        z: {"ksm_zero_pages": ZERO_PAGES, "ksm_merging_pages": 8},
        f: {"ksm_zero_pages": FORK_ZERO, "ksm_merging_pages": 2 * FORK_PAIRS}}))
    c = ksmsys.read_counters(run.vm)
    d = _delta(run, c, "ksm_zero_pages")
    _check(d["ksm_zero_pages"] == ZERO_PAGES + FORK_ZERO,
           f"zero-pages: global ksm_zero_pages grew by {d['ksm_zero_pages']}, the processes "
           f"say {ZERO_PAGES + FORK_ZERO}")
    # The merged pages (Z) and the read-faulted ones (R) both map the zero
    # page now; only the dirty bit of Z's PTEs (is_ksm_zero_pte()) and the
    # counters tell KSM's from the others.
    zero = {reg["name"]: sum(pg["kpf_zero"] for pg in reg["pages"])
            for reg in run.page_states(z, "zero") + run.page_states(z, "read")}
    _check(zero == {"zero": ZERO_PAGES, "read": 16},
           f"zero-pages: pages mapping the zero page (kpageflags KPF_ZERO_PAGE): {zero}")
    res.update(ksm_stat=st["ksm_stat"], zero_page_mapped=zero, counters=c)
    return res


def _zero_unmerge(run: ScenarioRun) -> dict:
    z = run.pids()[0]
    run.command(f"madvise {z} zero unmergeable 0 8")
    run.command(f"write {z} zero {' '.join(map(str, range(8, 16)))}")
    run.command(f"madvise {z} zero dontneed 16 8")
    # break_ksm(), wp_page_copy() and zap_present_ptes() decrement at once
    st = ksmsys.read_ksm_stat(run.vm, run.pids())
    c = ksmsys.read_counters(run.vm)
    got = st[z]["ksm_zero_pages"]
    _check(got == ZERO_LEFT, f"zero-pages: ksm_zero_pages {got} after unmerging 8, writing "
           f"8 and discarding 8 of {ZERO_PAGES}; expected {ZERO_LEFT}")
    d = _delta(run, c, "ksm_zero_pages")["ksm_zero_pages"]
    _check(d == ZERO_LEFT + FORK_ZERO, f"zero-pages: global ksm_zero_pages +{d}, expected "
           f"+{ZERO_LEFT + FORK_ZERO}")
    return {"pid": z, "ksm_stat": st[z], "ksm_zero_pages": c["ksm_zero_pages"]}


def _zero_settled(run: ScenarioRun) -> dict:
    z = run.pids()[0]
    # Two passes later: no rmap_item for a KSM zero page; D (8) and the 8
    # written pages keep theirs.
    v = _wait_for(run, "ksm_rmap_items 16, merging 8", _stat_is(run, {z: {
        "ksm_rmap_items": 16, "ksm_merging_pages": 8, "ksm_zero_pages": ZERO_LEFT}}))
    return {"pid": z, "ksm_stat": v["ksm_stat"][z]}


def _zero_fork(run: ScenarioRun) -> dict:
    parent = run.pids()[1]
    _hold(run)
    c0 = ksmsys.read_counters(run.vm)
    run.marks["fork_counters"] = c0
    child = run.command(f"fork {parent}")["forked"]
    run.refresh()
    st = ksmsys.read_ksm_stat(run.vm, [parent, child])
    c = ksmsys.read_counters(run.vm)
    want = {"ksm_rmap_items": 0, "ksm_merging_pages": 0, "ksm_zero_pages": FORK_ZERO}
    got = {k: st[child].get(k) for k in want}
    _check(got == want, f"zero-pages: the forked child's ksm_stat is {got}, expected {want} "
           "(ksm_fork(): no rmap_items yet, the zero pages copied)")
    d = c["ksm_zero_pages"] - c0["ksm_zero_pages"]
    _check(d == FORK_ZERO, f"zero-pages: fork raised the global ksm_zero_pages by {d}, "
           f"expected {FORK_ZERO}")
    for k in ("pages_shared", "pages_sharing"):
        _check(c[k] == c0[k], f"zero-pages: {k} {c0[k]} -> {c[k]} across the fork (run=0)")
    return {"parent": parent, "child": child, "ksm_stat": st,
            "ksm_zero_pages": c["ksm_zero_pages"], "ksm_zero_pages_before": c0["ksm_zero_pages"]}


def _zero_resume(run: ScenarioRun) -> dict:
    child = run.pids("forked")[0]
    c0 = run.marks["fork_counters"]
    _go(run)
    n = 2 * FORK_PAIRS
    v = _wait_for(run, f"the child's {n} rmap_items", _stat_is(run, {child: {
        "ksm_rmap_items": n, "ksm_merging_pages": n, "ksm_zero_pages": FORK_ZERO}},
        extra=lambda c: c["pages_sharing"] - c0["pages_sharing"] == n))
    c = v["counters"]
    # stable_tree_search() finds the forked page itself: no new KSM page
    _check(c["pages_shared"] == c0["pages_shared"],
           f"zero-pages: pages_shared {c0['pages_shared']} -> {c['pages_shared']} "
           "after ksmd scanned the child")
    return {"child": child, "ksm_stat": v["ksm_stat"][child], "counters": c}


# unmerge: 05-unmerge-stale (16 contents x 2, 8 unmerged, 4 written, run=0)
def _pairs_merged(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    d = _delta(run, res["counters"], "pages_shared", "pages_sharing")
    _check(d == {"pages_shared": 16, "pages_sharing": 16},
           f"unmerge: 16 contents x 2 pages merged as {d}")
    return res


def _unmerge_frozen(run: ScenarioRun) -> dict:
    pid = run.pids()[0]
    _hold(run)
    c0, st0 = ksmsys.read_counters(run.vm), ksmsys.read_ksm_stat(run.vm, [pid])[pid]
    run.command(f"madvise {pid} pairs unmergeable 0 8")
    run.command(f"madvise {pid} pairs unmergeable 16 8")
    run.command(f"write {pid} pairs 8 9 10 11")
    run.written.setdefault(pid, set()).update(
        _region(run, pid, "pairs")["start"] + k * PAGE_SIZE for k in range(8, 12))
    c, st = ksmsys.read_counters(run.vm), ksmsys.read_ksm_stat(run.vm, [pid])[pid]
    # unmerge_ksm_pages() and COW rewrite PTEs only: counters and
    # rmap_items wait for ksmd.
    for k in SHARING:
        _check(c[k] == c0[k], f"unmerge: {k} {c0[k]} -> {c[k]} with ksmd stopped")
    for k in ("ksm_rmap_items", "ksm_merging_pages"):
        _check(st[k] == st0[k], f"unmerge: {k} {st0[k]} -> {st[k]} with ksmd stopped")
    ksm = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    _check(ksm == 12, f"unmerge: {ksm} KSM pages mapped (smaps), expected 12 "
           "(contents 12-15 twice, 8-11 once)")
    return {"pid": pid, "ksm_stat": st, "smaps_ksm": ksm,
            "counters": {k: c[k] for k in SHARING}}


def _unmerge_resume(run: ScenarioRun) -> dict:
    pid = run.pids()[0]
    _go(run)
    want = {"pages_shared": 8, "pages_sharing": 4, "pages_unshared": 4}
    v = _wait_for(run, f"{want}", _stat_is(
        run, {pid: {"ksm_merging_pages": 12, "ksm_rmap_items": 16}},
        extra=lambda c: _delta(run, c, *SHARING) == want))
    return {"pid": pid, "ksm_stat": v["ksm_stat"][pid], "counters": v["counters"]}


# exit: 06-exited-sharer (P: X 16; C1, C2: X 16 + Y 8; run=0; C1, C2 killed)
def _exit_merged(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    d = _delta(run, res["counters"], "pages_shared", "pages_sharing")
    _check(d == {"pages_shared": 24, "pages_sharing": 40}, f"exit: merged as {d}")
    return res


def _exit_kill(run: ScenarioRun) -> dict:
    p, c1, c2 = run.pids()
    _hold(run)
    c0 = ksmsys.read_counters(run.vm)
    killed = run.command(f"kill {c1}")["killed"] + run.command(f"kill {c2}")["killed"]
    run.refresh()
    c = ksmsys.read_counters(run.vm)
    for k in SHARING:
        _check(c[k] == c0[k], f"exit: {k} {c0[k]} -> {c[k]} after the kills, ksmd stopped")
    gone = run.vm.sh(f"for p in {c1} {c2}; do test -e /proc/$p && echo $p; done; true").split()
    _check(not gone, f"exit: killed pids {gone} still in /proc")
    ksm = ksmsys.read_smaps_ksm(run.vm, [p])[p]
    _check(ksm == 16, f"exit: the survivor maps {ksm} KSM pages, expected 16")
    return {"killed": killed, "survivor": p, "counters": {k: c[k] for k in SHARING}}


def _exit_resume(run: ScenarioRun) -> dict:
    p = run.pids()[0]
    _go(run)
    # ksmd frees the dead mms' slots: P's 16 pages keep one rmap_item each
    v = _wait_for(run, "pages_shared 16, pages_sharing 0", _stat_is(
        run, {p: {"ksm_merging_pages": 16}},
        extra=lambda c: _delta(run, c, "pages_shared", "pages_sharing") ==
        {"pages_shared": 16, "pages_sharing": 0}))
    return {"survivor": p, "counters": v["counters"]}


# prot-none: the mremap scenario, then mprotect(PROT_NONE) on the moved VMA
def _moved(run: ScenarioRun) -> tuple[int, dict]:
    for pid, r in run.regions():
        if r.get("moved_from"):
            return pid, r
    raise KsmlensError("no moved region: run the mremap step first", "")


def _prot_none(run: ScenarioRun) -> dict:
    pid, r = _moved(run)
    before = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    pfns = [pg["pfn"] for pg in run.page_states(pid, r["name"])[0]["pages"]]
    run.command(f"mprotect {pid} {r['name']} none 0 {r['pages']}")
    run.refresh()
    # A PROT_NONE PTE is present (x86 pte_present() counts _PAGE_PROTNONE):
    # the pages stay mapped and KSM, whatever ksmd does next.
    c = ksmsys.wait_full_scans(run.vm, 2, timeout=MERGE_TIMEOUT)
    pages = run.page_states(pid, r["name"])[0]["pages"]
    _check(all(pg["present"] for pg in pages) and [pg["pfn"] for pg in pages] == pfns,
           "prot-none: pagemap changed for PROT_NONE pages (not present, or other pfns)")
    after = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    _check(after == before, f"prot-none: KSM pages (smaps) {before} -> {after} under "
           "PROT_NONE")
    st = ksmsys.read_ksm_stat(run.vm, [pid])[pid]
    return {"pid": pid, "region": r["name"], "smaps_ksm": after, "ksm_stat": st,
            "full_scans": c["full_scans"]}


# swap: 13-swap-ksm, paged out through memory.reclaim of the workload's cgroup
def _swap_out(run: ScenarioRun) -> dict:
    swap = ksmsys.ensure_swap(run.vm)
    pid = run.pids()[0]
    _hold(run)
    data, pinned = _region(run, pid, "data"), _region(run, pid, "pinned")
    kpfn = run.page_states(pid, "pinned")[0]["pages"][0]["pfn"]
    # MADV_PAGEOUT takes only folios mapped once (madvise_cold_or_pageout_
    # pte_range()): the data region's KSM pages, mapped 4 times each, stay.
    run.command(f"madvise {pid} data pageout 0 {data['pages']}")
    left = sum(pg["present"] for pg in run.page_states(pid, "data")[0]["pages"])
    _check(left == data["pages"], f"swap: MADV_PAGEOUT paged out {data['pages'] - left} "
           "KSM pages mapped 4 times")
    c0, st0 = ksmsys.read_counters(run.vm), ksmsys.read_ksm_stat(run.vm, [pid])[pid]
    # A pipe reference (vmsplice) makes pageout() keep the pinned KSM page
    # in the swap cache: zram, a synchronous device, frees the others at once.
    run.command(f"pin {pid} pinned 0")
    res = ksmsys.reclaim_pages(run.vm, [(pid, data["start"], data["pages"]),
                                        (pid, pinned["start"], pinned["pages"])])
    pages = [pg for r in res["ranges"] for pg in r["pages"]]
    swapped = sum(pg["swapped"] and not pg["present"] for pg in pages)
    _check(swapped == len(pages), f"swap: {swapped} of {len(pages)} KSM-mapped pages "
           f"swapped out after {res['rounds']} memory.reclaim rounds")
    c, st = ksmsys.read_counters(run.vm), ksmsys.read_ksm_stat(run.vm, [pid])[pid]
    # The rmap_items stay STABLE over swap PTEs until ksmd passes.
    for k in ("ksm_rmap_items", "ksm_merging_pages"):
        _check(st[k] == st0[k], f"swap: {k} {st0[k]} -> {st[k]} with ksmd stopped")
    for k in ("pages_shared", "pages_sharing"):
        _check(c[k] == c0[k], f"swap: {k} {c0[k]} -> {c[k]} with ksmd stopped")
    roll = ksmsys.read_smaps_rollup(run.vm, [pid])[pid]
    _check(roll.get("KSM") == 0 and roll.get("Swap", 0) >= 4 * len(pages),
           f"swap: smaps_rollup KSM {roll.get('KSM')} kB, Swap {roll.get('Swap')} kB")
    pf = ksmsys.read_pfns(run.vm, [kpfn])[kpfn]
    _check(pf["kpf_swapcache"] and pf["mapcount"] == 0,
           f"swap: the pinned KSM page (pfn {kpfn:#x}) is not an unmapped swap-cache page: "
           f"{pf}")
    run.marks["swap_kpfn"] = kpfn
    return {"pid": pid, "swap": swap, "pageout_left_mapped": left, "rounds": res["rounds"],
            "swapped_per_round": res["swapped_per_round"], "ksm_stat": st,
            "smaps_rollup": {k: roll.get(k) for k in ("KSM", "Swap", "Rss")},
            "kpfn": kpfn, "kpfn_flags": pf}


def _swap_resume(run: ScenarioRun) -> dict:
    pid = run.pids()[0]
    kpfn = run.marks["swap_kpfn"]
    _go(run)
    # ksmd frees the items of not-present PTEs; the pinned page's stable
    # node stays (its folio is a valid KSM page in the swap cache) with
    # rmap_hlist_len 0, counted by neither pages_shared nor pages_sharing.
    v = _wait_for(run, "every rmap_item over a swap PTE freed", _stat_is(
        run, {pid: {"ksm_rmap_items": 0, "ksm_merging_pages": 0}},
        extra=lambda c: _delta(run, c, "pages_shared", "pages_sharing") ==
        {"pages_shared": 0, "pages_sharing": 0}))
    pf = ksmsys.read_pfns(run.vm, [kpfn])[kpfn]
    _check(pf["kpf_swapcache"] and pf["mapcount"] == 0,
           f"swap: pfn {kpfn:#x} left the swap cache: {pf}")
    return {"pid": pid, "ksm_stat": v["ksm_stat"][pid], "counters": v["counters"],
            "kpfn": kpfn, "kpfn_flags": pf}


def _swap_in(run: ScenarioRun) -> dict:
    pid = run.pids()[0]
    kpfn = run.marks["swap_kpfn"]
    _hold(run)
    run.command(f"read {pid} pinned 0 1")
    # do_swap_page() finds the KSM folio in the swap cache and maps it again
    # without a copy (ksm_might_need_to_copy()): a KSM page mapped once, no
    # rmap_item reaching it.
    pages = run.page_states(pid, "pinned")[0]["pages"]
    st = ksmsys.read_ksm_stat(run.vm, [pid])[pid]
    ksm = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    _check(pages[0]["present"] and pages[0]["pfn"] == kpfn and pages[1]["swapped"],
           f"swap: after the swap-in, pagemap says {pages}, expected pfn {kpfn:#x} and a "
           "swap entry")
    _check(ksm == 1 and st["ksm_rmap_items"] == 0,
           f"swap: after the swap-in {ksm} KSM page(s) mapped, ksm_stat {st}")
    run.command(f"unpin {pid}")
    return {"pid": pid, "kpfn": kpfn, "smaps_ksm": ksm, "ksm_stat": st}


# numa-nodes: 08-numa-migrate (merge_across_nodes=0, N0 on node 0, N1 on 1)
def _where(run: ScenarioRun) -> dict[str, list]:
    return {e["region"]: e["status"] for e in run.command("where")["where"]}


def _numa_merged(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    w = _where(run)
    _check(set(w["n0"]) == {0} and set(w["n1"]) == {1},
           f"numa-nodes: the regions are not on their nodes: {w}")
    d = _delta(run, res["counters"], "pages_shared", "pages_sharing")
    # one stable tree per node: the same 8 contents merged on each
    _check(d == {"pages_shared": 16, "pages_sharing": 16}, f"numa-nodes: merged as {d}")
    res["nodes"] = w
    return res


def _numa_migrate(run: ScenarioRun) -> dict:
    pid = run.pids()[0]
    _hold(run)
    c0 = ksmsys.read_counters(run.vm)
    run.command(f"migrate 1 {pid}")
    w = _where(run)
    c = ksmsys.read_counters(run.vm)
    _check(set(w["n0"]) == {1}, f"numa-nodes: N0's KSM pages did not move to node 1: {w}")
    for k in SHARING + ("stable_node_chains", "stable_node_dups"):
        _check(c[k] == c0[k], f"numa-nodes: {k} {c0[k]} -> {c[k]} with ksmd stopped")
    return {"pid": pid, "nodes": w, "counters": {k: c[k] for k in SHARING}}


def _numa_resume(run: ScenarioRun) -> dict:
    pid = run.pids()[0]
    _go(run)
    # The moved nodes go through migrate_nodes; stable_tree_search() in tree
    # 1 meets a node of the same content and, the moved folio having
    # mapcount 2, chains both (chain_append): chains without max_page_sharing.
    want = {"stable_node_chains": 8, "stable_node_dups": 16, "pages_shared": 16,
            "pages_sharing": 16}
    v = _wait_for(run, f"{want}", _stat_is(
        run, {pid: {"ksm_merging_pages": 32}},
        extra=lambda c: _delta(run, c, *want) == want))
    return {"pid": pid, "counters": v["counters"], "nodes": _where(run)}


# prctl: PR_SET_MEMORY_MERGE, no madvise
def _vmflags(run: ScenarioRun, pid: int) -> dict[int, list[str]]:
    """VmFlags of each VMA of /proc/PID/smaps, by start address."""
    out, start = {}, None
    for line in run.vm.read_file(f"/proc/{pid}/smaps").splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and ":" not in head:
            start = int(head.split("-")[0], 16)
        elif head == "VmFlags:":
            out[start] = line.split()[1:]
    return out


def _prctl_merged(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    flags = {}
    for pid in run.pids():
        vf = _vmflags(run, pid)
        data = _region(run, pid, "data")["start"]
        # ksm_enable_merge_any() set VM_MERGEABLE ("mg") on every VMA
        _check("mg" in vf.get(data, []), f"prctl: pid {pid}'s data VMA has VmFlags "
               f"{vf.get(data)}, no mg (VM_MERGEABLE)")
        flags[pid] = {"vmas": len(vf), "mergeable": sum("mg" in f for f in vf.values())}
    res["vmflags"] = flags
    return res


# thp: one PMD-mapped THP per process, split by KSM when it merges
def _thp_huge(run: ScenarioRun) -> dict:
    run.refresh()
    roll = ksmsys.read_smaps_rollup(run.vm, run.pids())
    huge = {p: roll[p].get("AnonHugePages") for p in run.pids()}
    _check(all(v == 2048 for v in huge.values()),
           f"thp: AnonHugePages (kB) per process {huge}, expected one 2048 kB THP each "
           "(is /sys/kernel/mm/transparent_hugepage/enabled 'never'?)")
    thp = {reg["pid"]: sum(pg["kpf_thp"] for pg in reg["pages"]) for reg in run.page_states()}
    run.marks["thp_split"] = ksmsys.read_vmstat(run.vm).get("thp_split_page", 0)
    return {"AnonHugePages": huge, "kpf_thp": thp}


def _thp_merged(run: ScenarioRun) -> dict:
    _go(run)
    res = _merged_all(run)
    roll = ksmsys.read_smaps_rollup(run.vm, run.pids())
    huge = {p: roll[p].get("AnonHugePages") for p in run.pids()}
    split = ksmsys.read_vmstat(run.vm).get("thp_split_page", 0) - run.marks["thp_split"]
    _check(all(v == 0 for v in huge.values()) and split >= len(huge),
           f"thp: after merging AnonHugePages {huge} kB, thp_split_page +{split}")
    res.update(AnonHugePages=huge, thp_split_page=split)
    return res


# clone-vm: a clone(CLONE_VM) child that is not a thread
def _clone_vm(run: ScenarioRun) -> dict:
    pid = run.pids()[0]
    r = run.command(f"clone-vm {pid}")
    cpid = r["clone_vm"]
    run.refresh()
    f = run.vm.read_files(paths=[f"/proc/{cpid}/status", f"/proc/{pid}/ksm_stat",
                                 f"/proc/{cpid}/ksm_stat"], globs=[f"/proc/{pid}/task/*/stat"])
    tgid = int(next(l.split()[1] for l in f[f"/proc/{cpid}/status"].splitlines()
                    if l.startswith("Tgid:")))
    threads = {int(p.split("/")[4]) for p in f if "/task/" in p}
    _check(tgid == cpid and cpid not in threads,
           f"clone-vm: pid {cpid} has Tgid {tgid}, threads of {pid}: {sorted(threads)}")
    a, b = (ksmsys.parse_kv(f[f"/proc/{p}/ksm_stat"]) for p in (pid, cpid))
    _check(a == b and a.get("ksm_merging_pages", 0) >= run.pages_of(pid),
           f"clone-vm: ksm_stat of {pid} {a} and of its CLONE_VM child {cpid} {b}")
    return {"pid": pid, "clone_vm": cpid, "ksm_stat": a}


MERGED = Step("merged", "wait until every process's pages are merged "
              "(/proc/PID/ksm_stat ksm_merging_pages)", _merged_all)

SCENARIOS.update({s.name: s for s in [
    Scenario("merge", "identical pages in 3 processes (16 distinct patterns x 64 pages)",
             (), (Step("merged", MERGED.help + "; check pages_shared/pages_sharing",
                       _merge_check),)),
    Scenario("chain", "6 processes x 64 identical pages, max_page_sharing=16: "
             "a stable node chain with dups", (),
             (Step("merged", MERGED.help + "; check stable_node_chains/dups", _chain_check),),
             knobs={"max_page_sharing": 16}),
    Scenario("mremap", "merge, move one process's VMA with mremap(MAYMOVE|FIXED), "
             "let ksmd re-merge it at the new address", (),
             (MERGED,
              Step("mremap", "hold ksmd (run=0), move the first sharer's region >= 1 GiB "
                   "away (move_vma() breaks its KSM pages, VM_MERGEABLE stays)", _mremap),
              Step("remerged", "let ksmd run again; wait until it merged the moved "
                   "pages at their new address", _remerge))),
    Scenario("smartscan", "unique and volatile pages beside mergeable ones: "
             "ages and skips build up", (),
             (Step("merged", "wait for the mergeable pages, then 8 more full scans; "
                   "check pages_skipped grew", _smartscan_check),
              Step("cow-break", f"hold ksmd (run=0), write into {COW_BREAK_PAGES} merged "
                   "pages of the first sharer: COW breaks them, their rmap_items stay "
                   "STABLE until ksmd's next visit (the union hazard)", _cow_break),
              Step("resume", "let ksmd run again (run=1) for two full scans: the "
                   "written pages' rmap_items leave their stable nodes", _resume)),
             knobs={"smart_scan": 1}, needs=("smart_scan",)),
    Scenario("fork", "merge, then fork: the child shares KSM pages through the "
             "anon_vma hierarchy", (),
             (MERGED, Step("fork", "the first sharer forks a child that keeps the "
                           "mapping", _fork),
              Step("child-merged", "wait until ksmd has an rmap_item for each "
                   "of the child's pages", _merged_all))),
    Scenario("file-cow", "MAP_PRIVATE file mapping at a file offset, written (COW) "
             "then merged: vm_pgoff is the file offset", (),
             (MERGED,)),
    # issue 9: states from shared/field/, the kernel's own values checked
    Scenario("zero-pages", "use_zero_pages=1: 64 zero-filled pages merged with the zero "
             "page beside 16 read-faulted ones and 8 equal pages; a second process with "
             "16 pairs and 16 KSM zero pages forks with ksmd stopped", (),
             (Step("merged", "wait for 64 + 16 KSM zero pages (ksm_stat ksm_zero_pages) "
                   "and the equal pages; check the global ksm_zero_pages", _zero_merged),
              Step("unmerge", "MADV_UNMERGEABLE 8, write 8, MADV_DONTNEED 8 of the 64: "
                   "ksm_zero_pages 40 at once", _zero_unmerge),
              Step("settled", "two passes later: ksm_rmap_items 16, merging 8 (a KSM "
                   "zero page keeps no rmap_item)", _zero_settled),
              Step("fork", "hold ksmd (run=0); the second process forks: the child's "
                   "ksm_stat says rmap_items 0, merging 0, zero_pages 16; the global "
                   "ksm_zero_pages +16", _zero_fork),
              Step("resume", "run=1: the child's 32 rmap_items join the same stable nodes "
                   "(pages_sharing +32, pages_shared unchanged)", _zero_resume)),
             knobs={"use_zero_pages": 1, "smart_scan": 0}, core=False,
             needs=("ksm_zero_pages",)),
    Scenario("unmerge", "16 contents x 2 pages merged; with ksmd stopped 8 contents "
             "MADV_UNMERGEABLE and 4 pages written (COW): counters lag", (),
             (Step("merged", MERGED.help + "; check pages_shared 16, pages_sharing 16",
                   _pairs_merged),
              Step("unmerge", "hold ksmd (run=0), unmerge contents 0-7, write into 4 "
                   "pages: counters and ksm_stat unchanged, 12 KSM pages mapped (smaps)",
                   _unmerge_frozen),
              Step("resume", "run=1: pages_shared 8, pages_sharing 4, pages_unshared 4, "
                   "merging 12, rmap_items 16", _unmerge_resume)),
             knobs={"smart_scan": 0}, core=False),
    Scenario("exit", "3 processes share 16 pages, two of them 8 more; with ksmd "
             "stopped the two are killed: mm slots of dead mms", (),
             (Step("merged", MERGED.help + "; check pages_shared 24, pages_sharing 40",
                   _exit_merged),
              Step("kill", "hold ksmd (run=0), SIGKILL and reap two sharers: counters "
                   "unchanged, the survivor maps 16 KSM pages", _exit_kill),
              Step("resume", "run=1: the dead mms' slots go, pages_shared 16, "
                   "pages_sharing 0", _exit_resume)),
             knobs={"smart_scan": 0}, core=False),
    Scenario("prot-none", "the mremap scenario, then mprotect(PROT_NONE) on the moved "
             "VMA: present PTEs, still KSM", (),
             (MERGED,
              Step("mremap", "hold ksmd (run=0), move the first sharer's region >= 1 GiB "
                   "away", _mremap),
              Step("remerged", "let ksmd run again; wait until it merged the moved "
                   "pages at their new address", _remerge),
              Step("prot-none", "mprotect(PROT_NONE) the moved region; after 2 full scans "
                   "the same pfns are mapped (pagemap) and still KSM (smaps)", _prot_none)),
             core=False),
    Scenario("swap", "a KSM page paged out through memory.reclaim of the workload's "
             "cgroup (swap on zram): STABLE rmap_items over swap PTEs, a stable node "
             "whose page sits in the swap cache", (),
             (Step("merged", MERGED.help, _merged_all),
              Step("swap-out", "swap on zram (set up once), hold ksmd (run=0); "
                   "MADV_PAGEOUT leaves the 4-times-mapped KSM pages alone; pin one "
                   "KSM page with a pipe (vmsplice), memory.reclaim until every page is a "
                   "swap entry (pagemap); ksm_stat and counters unchanged; the pinned KSM "
                   "page stays in the swap cache (kpageflags), mapcount 0", _swap_out),
              Step("resume", "run=1: ksmd frees every rmap_item over a swap PTE "
                   "(ksm_stat 0/0, pages_shared +0); the pinned page's node keeps "
                   "rmap_hlist_len 0 while the page is swap-cached", _swap_resume),
              Step("swap-in", "hold ksmd, read the pinned page: do_swap_page() maps the "
                   "swap-cached KSM page again without a copy, with no rmap_item; unpin",
                   _swap_in)),
             knobs={"smart_scan": 0}, core=False),
    Scenario("numa-nodes", "merge_across_nodes=0: the same 8 contents merged on node 0 "
             "and on node 1, then node 0's KSM pages migrated to node 1", (),
             (Step("merged", MERGED.help + "; N0 on node 0, N1 on node 1 (move_pages); "
                   "pages_shared 16 (one tree per node)", _numa_merged),
              Step("migrate", "hold ksmd (run=0), move_pages(MPOL_MF_MOVE_ALL) N0 to "
                   "node 1: counters unchanged", _numa_migrate),
              Step("resume", "run=1: the moved nodes are re-filed in tree 1 as chains "
                   "(8 chains, 16 dups, pages_shared 16, pages_sharing 16)", _numa_resume)),
             knobs={"merge_across_nodes": 0, "smart_scan": 0}, core=False, numa=2),
    Scenario("prctl", "2 processes x 64 pattern pages merged through "
             "prctl(PR_SET_MEMORY_MERGE), no madvise", (),
             (Step("merged", MERGED.help + "; every VMA VM_MERGEABLE (smaps VmFlags mg)",
                   _prctl_merged),), core=False, needs=("ksym:ksm_enable_merge_any",)),
    Scenario("thp", "one 2 MiB THP of pattern pages per process (2 processes); KSM "
             "splits it to merge", (),
             (Step("huge", "ksmd held (run=0): each process maps one THP "
                   "(AnonHugePages 2048 kB)", _thp_huge),
              Step("merged", "run=1: " + MERGED.help + "; AnonHugePages 0, "
                   "thp_split_page grew (KSM split the THPs)", _thp_merged)),
             knobs={"run": 0, "smart_scan": 0}, core=False),
    Scenario("clone-vm", "a merged process makes a clone(CLONE_VM) child that is not a "
             "thread: one mm, two thread groups", (),
             (MERGED, Step("clone-vm", "clone(CLONE_VM) child of the sharer: own Tgid, "
                           "the same /proc/PID/ksm_stat as its mm's owner", _clone_vm)),
             core=False),
    MANY_VMAS,
]})




def _fmt_counters(c: dict) -> str:
    keys = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared",
            "pages_volatile", "pages_skipped", "stable_node_chains", "stable_node_dups")
    return "  ".join(f"{k}={c.get(k)}" for k in keys)


def run_scenario(vm, scenario: Scenario | str, *, keep: bool = False, out=sys.stdout,
                 extra_args: tuple = ()) -> ScenarioRun:
    """Run every step of a scenario (its program given ``extra_args`` too),
    printing the kernel's counters."""
    run = ScenarioRun(vm, scenario, extra_args=extra_args)
    print(f"before: {_fmt_counters(ksmsys.read_counters(vm))}", file=out)
    run.start()
    try:
        print(f"{run.scenario.name}: started, pids {run.pids()}", file=out)
        for st in run.scenario.steps:
            res = run.step(st.name)
            brief = {k: v for k, v in res.items() if k != "counters"}
            print(f"{run.scenario.name}: step {st.name} done in {run.timings[st.name]} s "
                  f"{json.dumps(brief) if brief else ''}", file=out)
        print(f"after:  {_fmt_counters(ksmsys.read_counters(vm))}", file=out)
        stat = run.ksm_stat()
        for pid, s in stat.items():
            print(f"  pid {pid}: " + "  ".join(f"{k}={v}" for k, v in s.items()), file=out)
    except BaseException:
        run.stop()
        raise
    if not keep:
        run.stop()
    return run
