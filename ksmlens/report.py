"""Readable tables from a :class:`~ksmlens.model.Snapshot` (``ksmlens report``)."""

from __future__ import annotations

from collections import Counter, defaultdict

from .model import Snapshot

__all__ = ["stable_table", "process_table", "summary"]


def summary(snap: Snapshot) -> str:
    k, c = snap.kernel, snap.counters
    mode = snap.meta.get("mode", "?")
    pause = snap.meta.get("paused_seconds")
    lines = [f"kernel {k.release} (variant {k.variant or '-'}, stored pgoff: "
             f"{'yes' if k.has_stored_pgoff else 'no'}, {k.nr_node_ids} tree root(s))",
             f"walk: {len(snap.rmap_items)} rmap_items, {len(snap.stable_nodes)} stable nodes, "
             f"{len(snap.mm_slots)} mm slots in {snap.meta.get('walk_seconds', 0):.3f} s "
             f"({mode}" + (f", guest paused {pause:.3f} s" if pause else "") + ")",
             "counters: " + "  ".join(f"{n}={c.get(n)}" for n in
                                      ("pages_shared", "pages_sharing", "pages_unshared",
                                       "pages_volatile", "full_scans", "stable_node_chains",
                                       "stable_node_dups"))]
    races = snap.meta.get("races") or {}
    if races:
        lines.append("raced with the kernel: " + ", ".join(f"{k} x{v}" for k, v in races.items()))
    return "\n".join(lines)


def stable_table(snap: Snapshot, limit: int | None = 50) -> str:
    """One row per stable node: kind, kpfn, mapcount, sharers (pid:count)."""
    rows = [f"{'node':18}  {'kind':7}  {'chain':18}  {'kpfn':>8}  {'nid':>3}  {'maps':>4}  "
            f"{'items':>5}  sharers"]
    shown = 0
    for n in snap.stable_nodes:
        if limit is not None and shown >= limit:
            rows.append(f"... {len(snap.stable_nodes) - shown} more (use --all)")
            break
        if n.kind == "chain":
            sharers = f"{len(n.dups)} dups"
        else:
            cnt = Counter(snap.item(i).pid for i in n.items)
            sharers = " ".join(f"{pid}:{c}" for pid, c in sorted(cnt.items(), key=str))
        rows.append(f"{n.id:18}  {n.kind:7}  {n.chain or '':18}  "
                    f"{'' if n.kpfn is None else n.kpfn:>8}  {n.nid:>3}  "
                    f"{'' if n.mapcount is None else n.mapcount:>4}  {len(n.items):>5}  {sharers}")
        shown += 1
    return "\n".join(rows)


def process_table(snap: Snapshot) -> str:
    """One row per mm slot: pid, comm, items by state, and pgoff mismatches."""
    rows = [f"{'pid':>7}  {'comm':16}  {'items':>6}  {'stable':>6}  {'unstable':>8}  "
            f"{'none':>5}  {'no_vma':>6}  {'addr_pgoff!=lpi':>15}  ksm_stat(items/merging)"]
    for s in snap.mm_slots:
        items = [snap.item(i) for i in s.items]
        st = Counter(i.state for i in items)
        no_vma = sum(1 for i in items if i.linear_page_index is None)
        moved = sum(1 for i in items if i.linear_page_index is not None
                    and i.linear_page_index != i.addr_pgoff)
        rows.append(f"{s.pid if s.pid is not None else '-':>7}  {(s.comm or '-'):16}  "
                    f"{len(items):>6}  {st['stable']:>6}  {st['unstable']:>8}  {st['none']:>5}  "
                    f"{no_vma:>6}  {moved:>15}  {s.mm_ksm_rmap_items}/{s.mm_ksm_merging_pages}")
    return "\n".join(rows)
