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

from ksmlens.analysis.core import smartscan_next, visits_between
from ksmlens.errors import KsmlensError
from ksmlens.lens.model import Snapshot

__all__ = ["SnapshotDiff", "diff", "Timeline", "watch"]


@dataclasses.dataclass
class SnapshotDiff:
    full_scans: tuple[int, int]
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


def _key(snap: Snapshot, it) -> tuple:
    return (it.pid, it.address)


def diff(a: Snapshot, b: Snapshot) -> SnapshotDiff:
    """What changed from snapshot ``a`` to snapshot ``b`` (``b`` later)."""
    if a.kernel.release != b.kernel.release:
        raise KsmlensError(f"snapshots of two kernels ({a.kernel.release} vs "
                           f"{b.kernel.release})", "diff two snapshots of one VM")
    ia = {(i.mm, i.address): i for i in a.items()}
    ib = {(i.mm, i.address): i for i in b.items()}
    both = ia.keys() & ib.keys()
    kpfn_a = {n.id: n.kpfn for n in a.nodes()}
    kpfn_b = {n.id: n.kpfn for n in b.nodes()}
    merged, unmerged, moved, pg, skipped = [], [], [], [], {}
    for k in sorted(both):
        x, y = ia[k], ib[k]
        key = _key(b, y)
        if x.state != "stable" and y.state == "stable":
            merged.append(key)
        elif x.state == "stable" and y.state != "stable":
            unmerged.append(key)
        elif x.state == y.state == "stable" and (
                x.stable_node != y.stable_node
                or kpfn_a.get(x.stable_node) != kpfn_b.get(y.stable_node)):
            moved.append(key)
        if x.pgoff_status != y.pgoff_status:
            pg.append(key)
        v = visits_between(a, b, x)
        if v > 0 and b.counters.get("smart_scan", 1):
            s = smartscan_next(a, x, v)["skipped"]
            if s:
                skipped[key] = s
    counters = {k: b.counters[k] - a.counters[k] for k in b.counters
                if isinstance(b.counters.get(k), int) and isinstance(a.counters.get(k), int)}
    return SnapshotDiff(full_scans=(a.scan.get("seqnr"), b.scan.get("seqnr")),
                        appeared=sorted(_key(b, ib[k]) for k in ib.keys() - ia.keys()),
                        dropped=sorted(_key(a, ia[k]) for k in ia.keys() - ib.keys()),
                        merged=merged, unmerged=unmerged, moved=moved, skipped=skipped,
                        pgoff_changed=pg, counters=counters)


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
    right after the pass it waits for: frames exactly ``scans`` apart."""
    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.lens.snapshot import take_idle_snapshot
    if count < 1:
        raise KsmlensError("watch needs --count >= 1", "")
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
