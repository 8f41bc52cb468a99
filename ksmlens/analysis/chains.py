"""Stable node chains and their dups along a timeline of snapshots.

``max_page_sharing`` (``ksm_max_page_sharing``) caps the rmap_items one KSM
page takes. When a full node meets another page of its content,
``stable_tree_insert()`` turns it into a **chain** (``alloc_stable_node_chain()``:
the node stays, now a *dup* under a new chain head whose ``rmap_hlist_len``
is ``STABLE_NODE_CHAIN``) and adds the new KSM page as a second dup
(``stable_node_chain_add_dup()``); ``stable_node_dup()`` later picks a dup with
room. The counters ``stable_node_chains`` / ``stable_node_dups``
(``ksm_stable_node_chains`` / ``ksm_stable_node_dups``) count them.

Plain data for :func:`ksmlens.views.plots.chain_growth` and for text views,
from live or saved snapshots (``Timeline.load`` / ``Snapshot.load``):

>>> nodes = chain_nodes_frame(tl.frames)     # doctest: +SKIP
>>> counts = chain_counts_frame(tl.frames)   # doctest: +SKIP
"""

from __future__ import annotations

import pandas as pd

from ksmlens.errors import KsmlensError
from ksmlens.lens.model import Snapshot

__all__ = ["NODE_FRAME_COLUMNS", "COUNT_FRAME_COLUMNS", "chain_nodes_frame",
           "chain_counts_frame"]

NODE_FRAME_COLUMNS = ["frame", "full_scans", "pages_scanned", "node", "kind", "chain",
                      "kpfn", "rmap_hlist_len", "items", "max_page_sharing", "new", "order"]
COUNT_FRAME_COLUMNS = ["frame", "full_scans", "pages_scanned", "max_page_sharing",
                       "regular", "chains", "dups", "pages_shared", "pages_sharing",
                       "rmap_items", "full_dups"]
# the kernel's counters the lab read around each frame's pause (watch_batches)
SYSFS_KEYS = ("stable_node_chains", "stable_node_dups", "pages_shared", "pages_sharing")


def _frames(frames) -> list[Snapshot]:
    frames = list(frames)
    if not frames:
        raise KsmlensError("no snapshots given", "pass a list of Snapshot objects "
                           "(a Timeline's frames, or Timeline.load(DIR).frames)")
    return frames


def _mps(snap: Snapshot) -> int | None:
    v = snap.counters.get("max_page_sharing")
    return int(v) if v is not None else None


def chain_nodes_frame(frames, *, regular: bool = True) -> pd.DataFrame:
    """One row per (frame, stable node that holds a KSM page): every dup, and
    with ``regular`` every regular node (a full regular node is what becomes
    the first dup of a chain). Nodes on ``migrate_nodes`` are left out.

    Columns (:data:`NODE_FRAME_COLUMNS`): ``frame`` (index in ``frames``),
    ``full_scans`` and ``pages_scanned`` (the kernel's counters as drgn read
    them during the walk; ``pages_scanned`` is None before 6.7), ``node``
    (the ``ksm_stable_node`` address), ``kind`` ("regular" / "dup"),
    ``chain`` (the chain head of a dup), ``kpfn``, ``rmap_hlist_len`` (the
    kernel's count), ``items`` (rmap_items the walk found on its hlist),
    ``max_page_sharing``, ``new`` (the node was not in the previous frame),
    ``order`` (a node keeps its place from frame to frame: by first
    appearance, then kpfn).

    Stable nodes are matched across frames by address: the kernel frees a
    dup only when its page goes (``chain_prune()``, unmerging), so within a
    timeline of one workload an address is one node.
    Raises :class:`KsmlensError` for no frames.
    """
    frames = _frames(frames)
    kinds = ("regular", "dup") if regular else ("dup",)
    rows, order, prev = [], {}, set()
    for k, snap in enumerate(frames):
        sn = snap.stable_nodes
        sn = sn[sn["kind"].isin(kinds) & ~sn["migrate_list"].astype(bool)]
        it = snap.rmap_items
        per = it[it["stable_node"].notna()].groupby("stable_node", observed=True).size()
        sn = sn.assign(_k=sn["kpfn"].fillna(-1)).sort_values("_k")
        seen = set()
        for r in sn.itertuples(index=False):
            order.setdefault(r.id, len(order))
            seen.add(r.id)
            rows.append({"frame": k, "full_scans": snap.counters.get("full_scans"),
                         "pages_scanned": snap.counters.get("pages_scanned"),
                         "node": r.id, "kind": str(r.kind),
                         "chain": r.chain if isinstance(r.chain, str) else None,
                         "kpfn": None if pd.isna(r.kpfn) else int(r.kpfn),
                         "rmap_hlist_len": int(r.rmap_hlist_len),
                         "items": int(per.get(r.id, 0)), "max_page_sharing": _mps(snap),
                         "new": r.id not in prev, "order": order[r.id]})
        prev = seen
    return pd.DataFrame(rows, columns=NODE_FRAME_COLUMNS)


def chain_counts_frame(frames) -> pd.DataFrame:
    """One row per frame: what the walk counts. Columns
    (:data:`COUNT_FRAME_COLUMNS`): ``frame``, ``full_scans``,
    ``pages_scanned``, ``max_page_sharing``; ``regular``, ``chains``,
    ``dups`` (stable nodes of each kind, as ``stable_node_chains`` /
    ``stable_node_dups`` count them: migrate_nodes included);
    ``pages_shared`` / ``pages_sharing`` (nodes holding a page with at least
    one rmap_item, and their further rmap_items: ``ksmlens.experiments.check``'s
    rule); ``rmap_items``; ``full_dups`` (dups at ``max_page_sharing``).

    A frame taken by :func:`ksmlens.experiments.watch.watch_batches` also
    carries the guest's ``/sys/kernel/mm/ksm`` read just before and after
    the walk (ksmd held): columns ``sysfs_before_<counter>`` and
    ``sysfs_after_<counter>`` for ``stable_node_chains``, ``stable_node_dups``,
    ``pages_shared``, ``pages_sharing`` (absent where no frame has them).
    """
    frames = _frames(frames)
    rows = []
    for k, snap in enumerate(frames):
        sn = snap.stable_nodes
        it = snap.rmap_items
        per = it[it["stable_node"].notna()].groupby("stable_node", observed=True).size()
        page = sn[sn["kind"].isin(("regular", "dup"))]
        held = per.reindex(page["id"]).fillna(0).astype(int)
        mps = _mps(snap)
        dups = sn[sn["kind"] == "dup"]
        row = {"frame": k, "full_scans": snap.counters.get("full_scans"),
               "pages_scanned": snap.counters.get("pages_scanned"), "max_page_sharing": mps,
               "regular": int((sn["kind"] == "regular").sum()),
               "chains": int((sn["kind"] == "chain").sum()), "dups": len(dups),
               "pages_shared": int((held > 0).sum()),
               "pages_sharing": int(held[held > 0].sum() - (held > 0).sum()),
               "rmap_items": len(it),
               "full_dups": int((dups["rmap_hlist_len"] >= mps).sum()) if mps else 0}
        for when in ("before", "after"):
            got = snap.meta.get(f"sysfs_{when}") or {}
            for key in SYSFS_KEYS:
                if key in got:
                    row[f"sysfs_{when}_{key}"] = got[key]
        rows.append(row)
    return pd.DataFrame(rows)
