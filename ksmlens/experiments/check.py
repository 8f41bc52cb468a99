"""``ksmlens check``: prove a walk against what the kernel itself reports.

The walk's own counts (stable nodes holding a page, stable and unstable
rmap_items, chains, dups, items per mm) are compared with the kernel's
counters: ``/sys/kernel/mm/ksm/*`` and ``/proc/PID/ksm_stat`` read in the
guest just before and just after a consistent (paused) walk, and the same
globals read by drgn while the guest was paused. A counter that moved between
the two sysfs reads makes the check retry: KSM was busy, not wrong.
"""

from __future__ import annotations

import dataclasses

from ksmlens.errors import KsmlensError
from ksmlens.kernel import sysfs as ksm_sysfs
from ksmlens.lens.model import Snapshot

__all__ = ["Row", "walk_counts", "per_pid_counts", "page_checks", "unreachable_note",
           "compare", "check_vm", "check_live", "format_rows", "LIVE_NOTE"]


@dataclasses.dataclass
class Row:
    what: str
    walk: int
    kernel: int | None      # sysfs / ksm_stat as read in the guest
    globals: int | None     # the kernel's variables, read by drgn during the walk
    # "equal": walk == kernel (== globals); "between": a counter that only
    # grows while ksmd runs (pages_scanned, ...): kernel (read before the
    # pause) <= walk (the variable, read paused) <= globals (read after)
    rule: str = "equal"

    @property
    def ok(self) -> bool:
        if self.rule == "between":
            return (self.kernel is not None and self.globals is not None
                    and self.kernel <= self.walk <= self.globals)
        return self.walk == self.kernel and (self.globals is None or self.globals == self.walk)


def walk_counts(snap: Snapshot) -> dict:
    """The kernel's counters, recomputed from the walked structures alone.

    * ``pages_shared``: stable nodes holding a page (regular nodes and dups,
      in the trees or on ``migrate_nodes``) with at least one rmap_item;
    * ``pages_sharing``: stable rmap_items beyond the first of each such node;
    * ``pages_unshared``: rmap_items with UNSTABLE_FLAG, whatever their seqnr:
      ``remove_rmap_item_from_tree()`` decrements the counter for an item of
      the previous pass too (age 1), so it still counts;
    * ``rmap_items``: every rmap_item on every mm slot;
    * ``ksm_zero_pages``: KSM zero pages decoded from the page tables
      (the zero pfn with the dirty bit, include/linux/ksm.h), all mm slots;
    * ``general_profit``: ``general_profit_show()`` on those counts.
    """
    page_nodes = [n for n in snap.nodes() if n.kind in ("regular", "dup") and n.items]
    stable_items = sum(len(n.items) for n in page_nodes)
    c = {
        "pages_shared": len(page_nodes),
        "pages_sharing": stable_items - len(page_nodes),
        "pages_unshared": sum(1 for i in snap.items() if i.state == "unstable"),
        "rmap_items": len(snap.rmap_items),
        "stable_node_chains": sum(1 for n in snap.nodes() if n.kind == "chain"),
        "stable_node_dups": sum(1 for n in snap.nodes() if n.kind == "dup"),
    }
    # a kernel without KSM zero-page counting (before e2942062e01d, 6.6) has
    # no ksm_zero_pages to compare, one without general_profit (before
    # d21077fbc2fc, 6.4) no profit: the counters drgn read say which
    if snap.kernel.zero_pages and all(s.ksm_zero_pages is not None for s in snap.slots()):
        c["ksm_zero_pages"] = sum(s.ksm_zero_pages for s in snap.slots())
    if "general_profit" in snap.counters and (c.get("ksm_zero_pages") is not None
                                              or not snap.kernel.zero_pages):
        c["general_profit"] = ((c["pages_sharing"] + c.get("ksm_zero_pages", 0))
                               * (1 << snap.kernel.page_shift)
                               - c["rmap_items"] * snap.kernel.rmap_item_size)
    return c


def per_pid_counts(snap: Snapshot) -> dict[int, dict]:
    """``/proc/PID/ksm_stat`` recomputed from the walk, for every process
    using each mm (``proc_pid_ksm_stat()``, ``ksm_process_profit()``)."""
    out: dict[int, dict] = {}
    page = 1 << snap.kernel.page_shift
    for slot in snap.slots():
        items = [snap.item(i) for i in slot.items]
        c = {"ksm_rmap_items": len(items),
             "ksm_merging_pages": sum(1 for i in items if i.state == "stable")}
        if slot.ksm_zero_pages is not None:
            c["ksm_zero_pages"] = slot.ksm_zero_pages
            c["ksm_process_profit"] = ((c["ksm_merging_pages"] + slot.ksm_zero_pages) * page
                                       - c["ksm_rmap_items"] * snap.kernel.rmap_item_size)
        for pid in slot.pids or ([slot.pid] if slot.pid is not None else []):
            out[pid] = c
    return out


def page_checks(snap: Snapshot) -> list[Row]:
    """Each KSM page's folio against the walk: ``rmap_hlist_len`` against
    its hlist, and its mapcount against the PTEs of the KSM mms' mergeable
    VMAs that map it (stale nodes, whose page is no longer KSM, are left
    out: their kpfn may have been reused)."""
    nodes = [n for n in snap.nodes() if n.kind in ("regular", "dup")]
    rows = [Row("stable nodes: rmap_hlist_len", sum(len(n.items) for n in nodes),
                sum(n.rmap_hlist_len for n in nodes), None)]
    ksm = [n for n in nodes if n.page_is_ksm and n.ptes is not None and n.mapcount is not None]
    if ksm:
        rows.append(Row("KSM pages: PTEs vs mapcount", sum(n.ptes for n in ksm),
                        sum(n.mapcount for n in ksm), None))
    return rows


def unreachable_note(snap: Snapshot) -> str | None:
    """A line on KSM pages whose mapcount exceeds what any rmap walk reaches."""
    un = [n for n in snap.nodes() if n.unreachable]
    if not un:
        return None
    return (f"{len(un)} KSM page(s) have {sum(n.unreachable for n in un)} mapping(s) that no "
            "rmap_item leads to (mapcount > what the stock walk reaches): no kernel can "
            "unmap them until ksmd scans their mm")


def compare(snap: Snapshot, sysfs: dict, ksm_stat: dict[int, dict],
            after: dict | None = None) -> list[Row]:
    """Rows of the walk against ``sysfs`` (read before the pause) and
    ``ksm_stat``, and against the globals drgn read while paused;
    ``after`` (sysfs read after the pause) bounds the counters that only
    grow."""
    w = walk_counts(snap)
    g = snap.counters
    rows = []
    for k in ksm_sysfs.COUNTERS:
        if k in w and not ksm_sysfs.BY_NAME[k].monotonic:
            rows.append(Row(k, w[k], sysfs.get(k), g.get(k)))
    # sysfs has no rmap_items; pages_volatile_show() derives from it.
    vol = sysfs.get("pages_volatile")
    kern_items = None if vol is None else (vol + sysfs["pages_shared"] + sysfs["pages_sharing"]
                                           + sysfs["pages_unshared"])
    rows.append(Row("ksm_rmap_items", w["rmap_items"], kern_items, g.get("rmap_items")))
    if after is not None:
        # only grow while ksmd runs: between the reads before and after the pause
        for k in (k for k in ksm_sysfs.COUNTERS if ksm_sysfs.BY_NAME[k].monotonic):
            if k in g and k in sysfs and k in after:
                rows.append(Row(k, g[k], sysfs[k], after[k], rule="between"))
    per = per_pid_counts(snap)
    slots = {p: s for s in snap.slots() for p in (s.pids or [s.pid]) if p is not None}
    zero = {"ksm_rmap_items": 0, "ksm_merging_pages": 0, "ksm_zero_pages": 0,
            "ksm_process_profit": 0}
    mm_field = {"ksm_rmap_items": "mm_ksm_rmap_items",
                "ksm_merging_pages": "mm_ksm_merging_pages",
                "ksm_zero_pages": "mm_ksm_zero_pages"}
    for pid in sorted(ksm_stat):
        st = ksm_stat[pid]
        if not st:
            continue
        mine = per.get(pid, zero)
        slot = slots.get(pid)
        for k in ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages",
                  "ksm_process_profit"):
            if k not in mine or k not in st:
                continue
            f = mm_field.get(k)
            rows.append(Row(f"pid {pid} {k}", mine[k], st.get(k),
                            getattr(slot, f) if slot is not None and f else None))
    rows += page_checks(snap)
    return rows


# sysfs counters that hold still while ksmd does (general_profit is derived
# from them and rmap_items)
_STABLE_KEYS = tuple(f.name for f in ksm_sysfs.FILES if f.kind == "counter" and f.in_sysfs
                     and not f.monotonic and f.name != "general_profit")


def check_vm(vm, prog, *, attempts: int = 20,
             mode: str = "consistent") -> tuple[list[Row], Snapshot, dict]:
    """Walk ``vm`` (paused) between two reads of its sysfs and ksm_stat.

    ``vm`` is a lab VM, or :class:`ksmlens.lab.host.LocalKernel` for
    /proc/kcore with ``mode="live"``: the running kernel cannot be paused, so
    the walk is unpaused, and a walk that raced (``meta["races"]``) or
    disagreed is taken again like a paused walk that met a half-done update.

    The comparison only means something if the kernel's state at the pause
    is the state sysfs showed: retry while the counters differ between the
    read before, the paused globals and the read after (ksmd was mid-scan).
    Returns (rows, snapshot, info). If KSM never holds still, the last
    settled walk is compared with the kernel's variables read in its pause
    (``info["settled"]`` False, ``info["note"]`` says so); only walks that
    all landed in half-done updates raise.
    """
    import random
    import time
    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.lens.midupdate import classify
    from ksmlens.lens.snapshot import take_snapshot
    last = None
    windows: list[str] = []      # half-done updates met (ksmlens.lens.midupdate) and retried
    settled = None               # the last walk that met no half-done update
    for attempt in range(1, attempts + 1):
        pids = ksmsys.ksm_pids(vm)
        before = ksmsys.read_counters(vm)
        stat_before = ksmsys.read_ksm_stat(vm, pids)
        snap = take_snapshot(prog, mode=mode, vm=vm if mode == "consistent" else None)
        after = ksmsys.read_counters(vm)
        stat_after = ksmsys.read_ksm_stat(vm, pids)
        paused = {k: snap.counters.get(k) for k in _STABLE_KEYS}
        mid = snap.meta.get("mid_update")
        if mode == "live" and snap.meta.get("races"):
            races = snap.meta["races"]
            mid = {"what": dict(races), "busy": [f"the unpaused walk raced: {k}" for k in races]}
        if not mid:
            settled = snap
        if (not mid and all(before.get(k) == after.get(k) == paused[k] for k in _STABLE_KEYS)
                and stat_before == stat_after):
            rows = compare(snap, before, stat_before, after)
            bad = [r for r in rows if not r.ok]
            # a count a task on a CPU had half updated in this pause: pause again
            why = classify(snap, bad, snap.meta.get("on_cpu")) if bad else None
            if bad and not why and mode == "live":
                why = "the unpaused walk disagreed (KSM changed under it)"
            if not why:
                return rows, snap, {
                    "attempts": attempt, "windows": windows,
                    "mid_update_seen": len(snap.meta.get("mid_update_seen") or ()) + len(windows)}
            windows.append(why)
            mid = {"what": {why: 1}, "busy": [why]}
        last = (before, after, paused, mid)
        time.sleep(random.uniform(0, 0.05))
    if settled is not None:
        # KSM never held still between the sysfs reads, but a paused walk
        # settled: compare it with the variables sysfs and ksm_stat print
        # (mm/ksm.c *_show(), proc_pid_ksm_stat()), read in the same pause.
        snap = settled
        page = 1 << snap.kernel.page_shift
        stat = {}
        for s in snap.slots():
            st = {"ksm_rmap_items": s.mm_ksm_rmap_items,
                  "ksm_merging_pages": s.mm_ksm_merging_pages}
            if s.mm_ksm_zero_pages is not None:
                st["ksm_zero_pages"] = s.mm_ksm_zero_pages
                st["ksm_process_profit"] = ((s.mm_ksm_merging_pages + s.mm_ksm_zero_pages) * page
                                            - s.mm_ksm_rmap_items * snap.kernel.rmap_item_size)
            for pid in s.pids:
                stat[pid] = st
        moved = [k for k in _STABLE_KEYS if not last[0].get(k) == last[1].get(k) == last[2][k]]
        rows = compare(snap, dict(snap.counters), stat, last[1])
        bad = [r for r in rows if not r.ok]
        why = classify(snap, bad, snap.meta.get("on_cpu")) if bad else None
        if why:
            raise KsmlensError(f"KSM kept changing during {attempts} attempts, and the last "
                               f"settled walk met a half-done update ({why})",
                               "slow ksmd down (sleep_millisecs) or stop it (run=0) and "
                               "check again")
        return rows, snap, {
            "attempts": attempts, "settled": False,
            "mid_update_seen": len(snap.meta.get("mid_update_seen") or ()),
            "note": f"KSM kept changing during {attempts} attempts ({', '.join(moved) or 'ksm_stat'}"
                    " moved between the sysfs reads): the kernel column is the variables "
                    "sysfs and ksm_stat print, read by drgn "
                    + ("during the unpaused walk" if mode == "live"
                       else "in the same pause as the walk")}
    changed = [k for k in _STABLE_KEYS if not last[0].get(k) == last[1].get(k) == last[2][k]]
    if last[3]:
        changed.append("paused walks landed in half-done updates: "
                       + "; ".join(last[3]["busy"]))
    raise KsmlensError(f"KSM kept changing during {attempts} attempts "
                       f"({', '.join(changed) or 'ksm_stat'} moved between reads)",
                       "slow ksmd down (sleep_millisecs) or stop it (run=0) and check again")


LIVE_NOTE = ("from drgn alone there is no /sys/kernel/mm/ksm nor /proc/PID/ksm_stat to read: "
             "'before'/'after' are the kernel variables those files print (ksm_pages_shared, "
             "... via mm/ksm.c's *_show(); mm->ksm_rmap_items and mm->ksm_merging_pages via "
             "proc_pid_ksm_stat()), read by drgn around an unpaused walk. `ksmlens check` "
             "on the host also reads sysfs in the guest and pauses it for the walk.")


def check_live(prog, *, attempts: int = 10) -> tuple[list[Row], Snapshot, dict]:
    """``check`` from inside drgn: compare an unpaused walk of ``prog`` with
    the kernel's own variables (the ones sysfs and ksm_stat print), read
    before and after the walk; retry while they moved (ksmd was busy).

    Rows: ``kernel`` is the variable read before the walk, ``globals`` after
    (for per-process rows, ``mm->ksm_*`` read during the walk). See
    :data:`LIVE_NOTE` for what this cannot see.
    """
    import time
    from ksmlens.lens.snapshot import take_snapshot
    from ksmlens.lens.helpers import ksm_counters
    keys = ("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains",
            "stable_node_dups", "rmap_items")
    last: list[str] = []
    for attempt in range(1, attempts + 1):
        before = ksm_counters(prog)
        snap = take_snapshot(prog, mode="live")
        after = ksm_counters(prog)
        races = snap.meta.get("races") or {}
        if not races and all(before[k] == after[k] == snap.counters[k] for k in keys):
            w = walk_counts(snap)
            rows = [Row(k if k != "rmap_items" else "ksm_rmap_items", w[k], before[k], after[k])
                    for k in keys + ("ksm_zero_pages",) if k in w and k in before]
            slots = {p: s for s in snap.slots() for p in (s.pids or [s.pid]) if p is not None}
            for pid, mine in sorted(per_pid_counts(snap).items()):
                slot = slots[pid]
                for k, f in (("ksm_rmap_items", "mm_ksm_rmap_items"),
                             ("ksm_merging_pages", "mm_ksm_merging_pages"),
                             ("ksm_zero_pages", "mm_ksm_zero_pages")):
                    if k in mine:
                        rows.append(Row(f"pid {pid} {k}", mine[k], getattr(slot, f), None))
            rows += page_checks(snap)
            return rows, snap, {"attempts": attempt}
        last = [k for k in keys if not before[k] == after[k] == snap.counters[k]]
        last += [f"race: {k}" for k in races]
        time.sleep(0.05 * attempt)
    raise KsmlensError(f"KSM kept changing during {attempts} unpaused walks "
                       f"({', '.join(last)})",
                       "stop ksmd (echo 0 > /sys/kernel/mm/ksm/run) or use `ksmlens check`, "
                       "which pauses the guest")


def format_rows(rows, **kw):
    """Moved to :func:`ksmlens.views.tables.check_table` (views format, experiments measure)."""
    raise KsmlensError("ksmlens.experiments.check.format_rows moved",
                       "use ksmlens.views.tables.check_table(rows)")
