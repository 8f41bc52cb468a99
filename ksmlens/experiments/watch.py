"""KSM state over time: a snapshot per full scan (or per N seconds), and diffs.

    tl = watch(prog, vm, count=5, scans=1)       # 5 paused snapshots, one per scan
    for d in tl.diffs(): print(d.summary())
    tl.save("run1/")                              # frame-0000.json ...

A :class:`SnapshotDiff` says which rmap_items appeared, were dropped,
merged (became STABLE), were unmerged, moved to another KSM page, and how
many visits SmartScan skipped (per the kernel's schedule, replayed from the
first snapshot by :func:`ksmlens.analysis.core.smartscan_next`; the kernel's own
``pages_skipped`` increase is beside it). Items are matched by (mm,
address): the kernel frees and reallocates ``ksm_rmap_item``\\s.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from ksmlens.analysis.core import (require_smartscan, smartscan_next, smartscan_on,
                                   visits_between)
from ksmlens.errors import KsmlensError
from ksmlens.lens.model import Snapshot

__all__ = ["SnapshotDiff", "diff", "Timeline", "watch", "watch_batches"]


@dataclasses.dataclass
class SnapshotDiff:
    full_scans: tuple[int | None, int | None]   # None: a snapshot without a scan cursor
    appeared: list[tuple]          # (pid, address)
    dropped: list[tuple]
    merged: list[tuple]            # became STABLE
    unmerged: list[tuple]          # were STABLE, are not
    moved: list[tuple]             # STABLE in both, on another stable node / pfn
    skipped: dict                  # (pid, address) -> skipped visits (SmartScan model)
    pgoff_changed: list[tuple]     # pgoff_status changed
    counters: dict                 # counter deltas (pages_shared, pages_skipped, ...)

    def summary(self) -> str:
        c = self.counters
        return (f"full_scans {self.full_scans[0]}->{self.full_scans[1]}: "
                f"+{len(self.appeared)} -{len(self.dropped)} rmap_items, "
                f"{len(self.merged)} merged, {len(self.unmerged)} unmerged, "
                f"{len(self.moved)} moved, {sum(self.skipped.values())} skips "
                f"(pages_skipped +{c.get('pages_skipped', 0)}), "
                f"{len(self.pgoff_changed)} pgoff status changes; "
                f"pages_shared {c.get('pages_shared', 0):+d}, "
                f"pages_sharing {c.get('pages_sharing', 0):+d}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skipped"] = [[list(k), v] for k, v in self.skipped.items()]
        return d


def diff(a: Snapshot, b: Snapshot) -> SnapshotDiff:
    """What changed from snapshot ``a`` to snapshot ``b`` (``b`` later)."""
    if a.kernel.release != b.kernel.release:
        raise KsmlensError(f"snapshots of two kernels ({a.kernel.release} vs "
                           f"{b.kernel.release})", "diff two snapshots of one VM")
    cols = ["id", "mm", "address", "pid", "state", "stable_node", "pgoff_status", "page_ksm"]

    def frame(s: Snapshot):
        f = s.rmap_items[cols].copy()
        for c in ("mm", "state", "pgoff_status"):
            f[c] = f[c].astype(object)
        kp = dict(zip(s.stable_nodes["id"], s.stable_nodes["kpfn"]))
        f["kpfn"] = f["stable_node"].map(kp)
        return f
    m = frame(a).merge(frame(b), on=["mm", "address"], how="outer", suffixes=("_a", "_b"),
                       indicator=True, sort=True)

    def keys(rows, side) -> list[tuple]:
        pid = rows[f"pid_{side}"].astype(object).where(rows[f"pid_{side}"].notna(), None)
        return list(zip(pid.tolist(), rows["address"].astype(int).tolist()))
    both = m[m["_merge"] == "both"]
    sa, sb = both["state_a"] == "stable", both["state_b"] == "stable"
    moved_mask = sa & sb & ((both["stable_node_a"] != both["stable_node_b"])
                            | (both["kpfn_a"].astype(object) != both["kpfn_b"].astype(object)))
    skipped = {}
    if smartscan_on(b):
        # SmartScan never skips a KSM page (smartscan_next): only the others
        # are replayed one by one
        maybe = both[both["page_ksm_a"].fillna(False) != True]  # noqa: E712
        for iid, key in zip(maybe["id_a"].tolist(), keys(maybe, "b")):
            x = a.item(iid)
            v = visits_between(a, b, x)
            if v > 0:
                n = smartscan_next(a, x, v)["skipped"]
                if n:
                    skipped[key] = n
    counters = {k: b.counters[k] - a.counters[k] for k in b.counters
                if isinstance(b.counters.get(k), int) and isinstance(a.counters.get(k), int)}
    return SnapshotDiff(full_scans=(a.scan.get("seqnr"), b.scan.get("seqnr")),
                        appeared=sorted(keys(m[m["_merge"] == "right_only"], "b"), key=str),
                        dropped=sorted(keys(m[m["_merge"] == "left_only"], "a"), key=str),
                        merged=keys(both[~sa & sb], "b"), unmerged=keys(both[sa & ~sb], "b"),
                        moved=keys(both[moved_mask], "b"),
                        skipped=skipped, pgoff_changed=keys(
                            both[both["pgoff_status_a"] != both["pgoff_status_b"]], "b"),
                        counters=counters)


@dataclasses.dataclass
class Timeline:
    """Snapshots in time order (``frames``), with their diffs."""
    frames: list[Snapshot] = dataclasses.field(default_factory=list)

    def diffs(self) -> list[SnapshotDiff]:
        return [diff(a, b) for a, b in zip(self.frames, self.frames[1:])]

    def save(self, directory, suffix: str = ".json") -> Path:
        """Write ``frame-NNNN<suffix>`` per frame: JSON, or the columnar
        form with any other suffix (``.ksm``: large snapshots)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for k, f in enumerate(self.frames):
            f.save(d / f"frame-{k:04d}{suffix}")
        return d

    @classmethod
    def load(cls, directory) -> "Timeline":
        files = sorted(p for p in Path(directory).glob("frame-*") if p.is_file())
        if not files:
            raise KsmlensError(f"no frame-* files in {directory}",
                               "record one with `ksmlens watch -o DIR`")
        return cls([Snapshot.load(f) for f in files])


def watch(prog, vm, *, count: int = 5, scans: int | None = 1, seconds: float | None = None,
          on_frame: Callable[[Snapshot, SnapshotDiff | None], None] | None = None,
          pace_ms: int | None = None, timeout: float = 120.0) -> Timeline:
    """Take ``count`` paused snapshots of ``vm`` (each while ksmd is idle,
    see :func:`ksmlens.lens.snapshot.take_idle_snapshot`): the first now, then one
    after every ``scans`` full scans of ksmd (or every ``seconds``).
    ``on_frame(snapshot, diff_from_previous)`` is called as each arrives.

    A fast-scanning ksmd can finish several passes while the host polls
    ``full_scans``; ``pace_ms`` sets ksmd's ``sleep_millisecs`` to that for
    the watch (and puts it back after), so each frame lands in the sleep
    right after the pass it waits for: frames exactly ``scans`` apart.
    :class:`KsmlensError` for ``pace_ms`` on a kernel without SmartScan."""
    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.lens.snapshot import take_idle_snapshot
    if count < 1:
        raise KsmlensError("watch needs --count >= 1", "")
    if pace_ms:
        # pacing lands each frame exactly --scans passes apart, for SmartScan's
        # replayed skips: refused where there is no SmartScan
        from ksmlens.lens.helpers import ksm_kernel
        require_smartscan(ksm_kernel(prog).smartscan, "watch --pace")
    tl = Timeline()
    with ksmsys.knobs_set(vm, **({"sleep_millisecs": pace_ms} if pace_ms else {})):
        for k in range(count):
            if k:
                if seconds is not None:
                    time.sleep(seconds)
                else:
                    ksmsys.wait_full_scans(vm, scans or 1, timeout=timeout,
                                           poll=0.05 if pace_ms else 0.5)
            s = take_idle_snapshot(prog, vm)
            d = diff(tl.frames[-1], s) if tl.frames else None
            tl.frames.append(s)
            if on_frame:
                on_frame(s, d)
    return tl


def watch_batches(prog, vm, pages, *, until: Callable[[Snapshot], bool] | None = None,
                  on_frame: Callable[[Snapshot, SnapshotDiff | None], None] | None = None,
                  timeout: float = 60.0) -> Timeline:
    """ksmd one batch at a time: a paused snapshot with ksmd held (``run=0``)
    now, then one after each batch of ``pages`` (a list: ``pages_to_scan``
    for each batch in turn). Per batch: write ``pages_to_scan``, release
    ksmd (``run=1``), wait until the kernel's ``pages_scanned`` grows (ksmd
    did a batch: ``ksm_do_scan()``, which ends early at the end of a full
    scan), hold it again (``run=0``: the write waits for ksmd's mutex), and
    walk. Give ksmd a ``sleep_millisecs`` well above a guest read (e.g. 500)
    so that it sleeps, not scans, while the hold is written: then each frame
    is one batch.

    Each snapshot's ``meta["sysfs_before"]`` / ``meta["sysfs_after"]`` hold
    ``/sys/kernel/mm/ksm`` as the guest read it just before and after the
    walk, ksmd held: the kernel's own counts for that frame (saved with it).
    ``until(snapshot)`` True stops early. ``run`` and ``pages_to_scan`` are
    put back on return (also on error). :class:`KsmlensError` on a kernel without
    ``pages_scanned`` (before 6.7) or if ksmd does not scan within
    ``timeout`` s.
    """
    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.kernel.sysfs import RUN_MERGE, RUN_STOP
    from ksmlens.lens.snapshot import take_snapshot
    pages = list(pages)
    tl = Timeline()

    def frame():
        before = ksmsys.read_counters(vm)
        s = take_snapshot(prog, vm=vm)
        s.meta["sysfs_before"] = before
        s.meta["sysfs_after"] = ksmsys.read_counters(vm)
        d = diff(tl.frames[-1], s) if tl.frames else None
        tl.frames.append(s)
        if on_frame:
            on_frame(s, d)
        return s

    with ksmsys.held(vm):
        c = ksmsys.read_counters(vm)
        if "pages_scanned" not in c:
            raise KsmlensError("this kernel has no /sys/kernel/mm/ksm/pages_scanned "
                               "(added in 6.7): a batch cannot be seen",
                               "run it on a kernel that has it (the 6.12 lab kernels)")
        old_pages = c["pages_to_scan"]
        try:
            s = frame()
            for n in pages:
                if until and until(s):
                    break
                ksmsys.set_knobs(vm, pages_to_scan=n)
                last = c["pages_scanned"]
                ksmsys.set_run(vm, RUN_MERGE)
                try:
                    ksmsys.wait_until(vm, lambda c: c["pages_scanned"] > last,
                                      timeout=timeout, what=f"a batch of {n} pages", poll=0.05)
                finally:
                    ksmsys.set_run(vm, RUN_STOP)
                s = frame()
                c = s.meta["sysfs_after"]
        finally:
            ksmsys.set_knobs(vm, pages_to_scan=old_pages)
    return tl
