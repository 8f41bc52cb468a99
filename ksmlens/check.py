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

from .errors import KsmlensError
from .model import Snapshot

__all__ = ["Row", "walk_counts", "compare", "check_vm", "check_live", "format_rows",
           "LIVE_NOTE"]


@dataclasses.dataclass
class Row:
    what: str
    walk: int
    kernel: int | None      # sysfs / ksm_stat as read in the guest
    globals: int | None     # the kernel's variables, read by drgn during the walk

    @property
    def ok(self) -> bool:
        return self.walk == self.kernel and (self.globals is None or self.globals == self.walk)


def walk_counts(snap: Snapshot) -> dict:
    """The kernel's counters, recomputed from the walked structures alone.

    * ``pages_shared``: stable nodes holding a page (regular nodes and dups,
      in the trees or on ``migrate_nodes``) with at least one rmap_item;
    * ``pages_sharing``: stable rmap_items beyond the first of each such node;
    * ``pages_unshared``: rmap_items with UNSTABLE_FLAG, whatever their seqnr:
      ``remove_rmap_item_from_tree()`` decrements the counter for an item of
      the previous pass too (age 1), so it still counts;
    * ``rmap_items``: every rmap_item on every mm slot.
    """
    page_nodes = [n for n in snap.stable_nodes if n.kind in ("regular", "dup") and n.items]
    stable_items = sum(len(n.items) for n in page_nodes)
    return {
        "pages_shared": len(page_nodes),
        "pages_sharing": stable_items - len(page_nodes),
        "pages_unshared": sum(1 for i in snap.rmap_items if i.state == "unstable"),
        "rmap_items": len(snap.rmap_items),
        "stable_node_chains": sum(1 for n in snap.stable_nodes if n.kind == "chain"),
        "stable_node_dups": sum(1 for n in snap.stable_nodes if n.kind == "dup"),
    }


def per_pid_counts(snap: Snapshot) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for slot in snap.mm_slots:
        if slot.pid is None:
            continue
        items = [snap.item(i) for i in slot.items]
        out[slot.pid] = {"ksm_rmap_items": len(items),
                         "ksm_merging_pages": sum(1 for i in items if i.state == "stable")}
    return out


def compare(snap: Snapshot, sysfs: dict, ksm_stat: dict[int, dict]) -> list[Row]:
    w = walk_counts(snap)
    g = snap.counters
    rows = []
    for k in ("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains",
              "stable_node_dups"):
        rows.append(Row(k, w[k], sysfs.get(k), g.get(k)))
    # sysfs has no rmap_items; pages_volatile_show() derives from it.
    vol = sysfs.get("pages_volatile")
    kern_items = None if vol is None else (vol + sysfs["pages_shared"] + sysfs["pages_sharing"]
                                           + sysfs["pages_unshared"])
    rows.append(Row("ksm_rmap_items", w["rmap_items"], kern_items, g.get("rmap_items")))
    per = per_pid_counts(snap)
    slots = {s.pid: s for s in snap.mm_slots if s.pid is not None}
    for pid in sorted(ksm_stat):
        st = ksm_stat[pid]
        if not st:
            continue
        mine = per.get(pid, {"ksm_rmap_items": 0, "ksm_merging_pages": 0})
        slot = slots.get(pid)
        rows.append(Row(f"pid {pid} ksm_rmap_items", mine["ksm_rmap_items"],
                        st.get("ksm_rmap_items"),
                        slot.mm_ksm_rmap_items if slot else None))
        rows.append(Row(f"pid {pid} ksm_merging_pages", mine["ksm_merging_pages"],
                        st.get("ksm_merging_pages"),
                        slot.mm_ksm_merging_pages if slot else None))
    return rows


_STABLE_KEYS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                "stable_node_chains", "stable_node_dups")


def check_vm(vm, prog, *, attempts: int = 20) -> tuple[list[Row], Snapshot, dict]:
    """Walk ``vm`` (paused) between two reads of its sysfs and ksm_stat.

    The comparison only means something if the kernel's state at the pause
    is the state sysfs showed: retry while the counters differ between the
    read before, the paused globals and the read after (ksmd was mid-scan).
    Returns (rows, snapshot, info).
    """
    import random
    import time
    from . import ksmsys
    from .snapshot import take_snapshot
    last = None
    for attempt in range(1, attempts + 1):
        pids = ksmsys.ksm_pids(vm)
        before = ksmsys.read_counters(vm)
        stat_before = ksmsys.read_ksm_stat(vm, pids)
        snap = take_snapshot(prog, mode="consistent", vm=vm)
        after = ksmsys.read_counters(vm)
        stat_after = ksmsys.read_ksm_stat(vm, pids)
        paused = {k: snap.counters.get(k) for k in _STABLE_KEYS}
        if (all(before[k] == after[k] == paused[k] for k in _STABLE_KEYS)
                and stat_before == stat_after):
            return compare(snap, before, stat_before), snap, {"attempts": attempt}
        last = (before, after, paused)
        time.sleep(random.uniform(0, 0.05))
    changed = [k for k in _STABLE_KEYS if not last[0][k] == last[1][k] == last[2][k]]
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
    from .snapshot import take_snapshot
    from .walk import ksm_counters
    keys = ("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains",
            "stable_node_dups", "rmap_items")
    last = None
    for attempt in range(1, attempts + 1):
        before = ksm_counters(prog)
        snap = take_snapshot(prog, mode="live")
        after = ksm_counters(prog)
        races = snap.meta.get("races") or {}
        if not races and all(before[k] == after[k] == snap.counters[k] for k in keys):
            w = walk_counts(snap)
            rows = [Row(k if k != "rmap_items" else "ksm_rmap_items", w[k], before[k], after[k])
                    for k in keys]
            for pid, mine in sorted(per_pid_counts(snap).items()):
                slot = next(s for s in snap.mm_slots if s.pid == pid)
                rows.append(Row(f"pid {pid} ksm_rmap_items", mine["ksm_rmap_items"],
                                slot.mm_ksm_rmap_items, None))
                rows.append(Row(f"pid {pid} ksm_merging_pages", mine["ksm_merging_pages"],
                                slot.mm_ksm_merging_pages, None))
            return rows, snap, {"attempts": attempt}
        last = [k for k in keys if not before[k] == after[k] == snap.counters[k]]
        last += [f"race: {k}" for k in races]
        time.sleep(0.05 * attempt)
    raise KsmlensError(f"KSM kept changing during {attempts} unpaused walks "
                       f"({', '.join(last)})",
                       "stop ksmd (echo 0 > /sys/kernel/mm/ksm/run) or use `ksmlens check`, "
                       "which pauses the guest")


def format_rows(rows: list[Row], *, kernel: str = "kernel", globals: str = "globals") -> str:
    w = max(len(r.what) for r in rows)
    out = [f"{'counter':{w}}  {'walk':>8}  {kernel:>8}  {globals:>8}  ok"]
    for r in rows:
        g = "-" if r.globals is None else r.globals
        k = "-" if r.kernel is None else r.kernel
        out.append(f"{r.what:{w}}  {r.walk:>8}  {k:>8}  {g:>8}  {'ok' if r.ok else 'MISMATCH'}")
    return "\n".join(out)
