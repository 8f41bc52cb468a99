"""The stable tree as layers (:func:`stable_tree`): tree roots, chain
heads and regular nodes, dups, and the processes sharing them. Re-exported
by :mod:`ksmlens.views.plots`.

Nodes are put in boxes by what they share: each node its own row (up to
``label_nodes``), a block of dots per box (up to ``max_nodes``), or past
that one dot per box, counted in the tables with pandas
(:func:`_grouped_boxes`: no Python object per node), so a stable tree of a
million rmap_items draws as fast as one of a thousand.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ksmlens.lens.model import Snapshot, column_values, positions
from ksmlens.views.figure import KIND_COLORS as _KIND_COLORS, new_axes as _axes, \
    proc_label as _proc_label

__all__ = ["stable_tree"]


class _Chain(NamedTuple):
    id: str
    nid: int
    dups: int       # dups on the chain's hlist (the walk's dup nodes naming it)


def _leaf_table(snap: Snapshot) -> pd.DataFrame:
    """The nodes drawn (a dup on migrate_nodes is not), with ``dups``: per
    chain head, the dups naming it (every one, migrate_nodes' too)."""
    sn = snap.stable_nodes
    is_dup = (sn["kind"] == "dup").to_numpy(dtype=bool)
    tab = sn.loc[~(sn["migrate_list"].to_numpy(bool) & is_dup),
                 ["id", "kind", "chain", "kpfn", "nid"]].copy()
    chain_pos = positions(sn["chain"][is_dup], tab["id"])
    tab["dups"] = np.bincount(chain_pos[chain_pos >= 0], minlength=len(tab))
    return tab


def _proc_key(pid, comm) -> tuple:
    """``(pid, comm)`` with None for a missing value (None, NaN or pd.NA:
    an exited process's rmap_items have none)."""
    return (None if pd.isna(pid) else int(pid), None if pd.isna(comm) else comm)


def _by_pid(p: tuple) -> tuple:
    return (p[0] is None, p[0] or 0)


def _sharers_by_node(snap: Snapshot) -> dict:
    """node id -> sorted ((pid, comm), n_items) of its rmap_items (one
    groupby over the rmap_items table)."""
    it = snap.rmap_items
    it = it[it["stable_node"].notna()]
    if not len(it):
        return {}
    cnt = it.groupby(["stable_node", "pid", "comm"], dropna=False, sort=False,
                     observed=True).size()
    cnt = cnt[cnt > 0]
    out: dict = {}
    for (node, pid, comm), c in cnt.items():
        out.setdefault(node, []).append((_proc_key(pid, comm), int(c)))
    return {k: tuple(sorted(v, key=lambda kv: (kv[0][0] is None, kv[0][0] or 0)))
            for k, v in out.items()}


def _box(kind, parent, sharers, n, kpfn0, id0, items0, node_items=None) -> dict:
    return {"kind": kind, "parent": parent, "sharers": sharers, "n": n, "kpfn0": kpfn0,
            "id0": id0, "items0": items0, "node_items": node_items or []}


def _node_boxes(snap: Snapshot, mode: str) -> list[dict]:
    """Boxes node by node (rows and blocks: at most ``max_nodes`` nodes):
    one per node (rows) or per (kind, parent, sharers) (blocks)."""
    nodes = [n for n in snap.nodes(mappings=False) if not (n.migrate_list and n.kind == "dup")]
    sharers = _sharers_by_node(snap)
    boxes: dict = {}
    for n in nodes:
        if n.kind == "chain":
            continue
        sh = sharers.get(n.id, ())
        parent = n.chain if n.kind == "dup" else ("root", n.nid)
        key = (n.kind, parent, n.id) if mode == "rows" else \
            (n.kind, parent, tuple(p for p, _ in sh))
        b = boxes.get(key)
        if b is None:
            b = boxes[key] = _box(n.kind, parent, Counter(), 0, n.kpfn, n.id, len(n.items))
        b["n"] += 1
        b["node_items"].append(len(n.items))
        for p, c in sh:
            b["sharers"][p] += c
    return list(boxes.values())


def _grouped_boxes(snap: Snapshot, tab: pd.DataFrame) -> list[dict]:
    """One box per (kind, parent, set of sharer processes), from the tables
    with integer codes: each rmap_item's node (one index lookup) and
    process, the sharer set of each node a bit mask over the processes,
    then one grouping of the nodes. The boxes :func:`_node_boxes` would give
    in blocks mode, in the same order (tested)."""
    leaves = tab[tab["kind"] != "chain"]
    nl = len(leaves)
    it = snap.rmap_items
    node = positions(it["stable_node"], leaves["id"])
    on = node >= 0
    node = node[on]
    proc = it.loc[on, ["pid", "comm"]].groupby(["pid", "comm"], dropna=False, sort=False,
                                                observed=True).ngroup().to_numpy()
    at = np.unique(proc, return_index=True)[1]
    first_rows = it.loc[on].iloc[at]
    keys = [_proc_key(p, c) for p, c in zip(column_values(first_rows, "pid"),
                                            column_values(first_rows, "comm"))]
    procs = sorted(set(keys), key=_by_pid)
    if len(procs) > 62:       # no bit mask: node by node (at most ~1 row per sharer)
        return _node_boxes(snap, "blocks")
    rank = np.array([procs.index(k) for k in keys], dtype=np.int64)[proc]
    P = len(procs)
    pair, count = np.unique(node.astype(np.int64) * P + rank, return_counts=True)
    pn, pr = pair // P, pair % P
    mask = np.zeros(nl, np.int64)
    if pair.size:
        starts = np.flatnonzero(np.r_[True, pn[1:] != pn[:-1]])
        mask[pn[starts]] = np.bitwise_or.reduceat(np.left_shift(np.int64(1), pr), starts)
    n_items = np.bincount(node, minlength=nl)
    dup = (leaves["kind"] == "dup").to_numpy(dtype=bool)
    chain_pos = positions(leaves["chain"], tab["id"])
    parent = np.where(dup, chain_pos, -1 - leaves["nid"].to_numpy(dtype=np.int64))
    box = pd.DataFrame({"k": dup, "p": parent, "m": mask}).groupby(
        ["k", "p", "m"], sort=False).ngroup().to_numpy()
    nb = int(box.max()) + 1 if nl else 0
    first = np.unique(box, return_index=True)[1]
    size = np.bincount(box, minlength=nb)
    per = np.bincount(box[pn] * P + pr, weights=count, minlength=nb * P).reshape(nb, P)
    tab_ids = column_values(tab, "id")
    leaf_ids, kpfn = column_values(leaves, "id"), column_values(leaves, "kpfn")
    out = []
    for b in range(nb):
        k = int(first[b])
        par = int(parent[k])
        pk = (tab_ids[par] if par >= 0 else None) if dup[k] else ("root", -1 - par)
        sharers = Counter({procs[r]: int(per[b, r]) for r in np.flatnonzero(per[b]).tolist()})
        out.append(_box("dup" if dup[k] else "regular", pk, sharers, int(size[b]), kpfn[k],
                        leaf_ids[k], int(n_items[k])))
    return out


def stable_tree(snap: Snapshot, ax=None, max_nodes: int = 300, label_nodes: int = 40
                ) -> Figure:
    """The stable tree as layers: tree roots (one per NUMA node id), chain
    heads and regular nodes, the dups of each chain, and the sharers
    (processes). An edge to a process is as thick as the number of that
    process's rmap_items on the node(s) it comes from.

    Up to ``label_nodes`` regular nodes and dups, each is a labelled row
    (kpfn, rmap_items). Up to ``max_nodes``, nodes with the same sharers
    (and, for dups, the same chain) form a block with one dot per node,
    labelled "N nodes". Past ``max_nodes`` each such group is one dot
    labelled "N nodes". Returns the Figure.
    """
    from matplotlib.collections import LineCollection

    tab = _leaf_table(snap)
    n_leaves = int((tab["kind"] != "chain").sum())
    mode = "grouped" if n_leaves > max_nodes else \
        "rows" if n_leaves <= label_nodes else "blocks"
    ch = tab[(tab["kind"] == "chain").to_numpy(dtype=bool)]
    chains = [_Chain(i, int(nid), int(d)) for i, nid, d in
              zip(*(column_values(ch, c) for c in ("id", "nid", "dups")))]
    chain_ids = {c.id for c in chains}
    kinds = Counter({str(k): int(v) for k, v in tab["kind"].value_counts().items() if v})
    leaf_nids = set(tab["nid"][(tab["kind"] == "regular")].tolist())
    boxes = _grouped_boxes(snap, tab) if mode == "grouped" else _node_boxes(snap, mode)
    procs = sorted({p for b in boxes for p in b["sharers"]},
                   key=lambda p: (p[0] is None, p[0] or 0))

    def order(b):
        return tuple(sorted((p[0] or 0) for p in b["sharers"])), b["kpfn0"] or 0
    parents: list = [("root", nid) for nid in sorted(leaf_nids)]
    parents += [c.id for c in chains]
    ordered = []
    for par in parents:
        ordered += sorted((b for b in boxes if b["parent"] == par), key=order)
    ordered += [b for b in boxes if b["parent"] not in parents]  # orphaned dups

    # Vertical layout: a box takes one row, or (blocks) ceil(n / cols) rows.
    cols = 20
    y = 0.0
    for b in ordered:
        h = 1 if mode != "blocks" else -(-b["n"] // cols)
        b["y0"], b["h"] = y, h
        b["y"] = y + (h - 1) / 2
        y += h + (0.6 if mode == "blocks" else 0)
    height = max(1.0, y)
    fig, ax = _axes(ax, (11, min(40, max(4.5, 2.0 + 0.17 * height))))

    X_ROOT, X_TOP, X_DUP, X_PROC = 0.0, 1.0, 2.0, 3.2
    proc_y = dict(zip(procs, np.linspace(0, height - 1, len(procs)) if len(procs) > 1
                      else [(height - 1) / 2] * len(procs)))
    chain_y, root_y = {}, {}
    for par in parents:
        ys = [b["y"] for b in ordered if b["parent"] == par]
        (chain_y if par in chain_ids else root_y)[par] = float(np.mean(ys)) if ys else 0.0
    for c in chains:
        root_y.setdefault(("root", c.nid), chain_y[c.id])

    def right_x(b):
        x = X_DUP if b["kind"] == "dup" else X_TOP
        if mode == "blocks":
            x += 0.04 * (min(b["n"], cols) - 1)
        return x

    segs, widths = [], []
    maxc = max((c for b in ordered for c in b["sharers"].values()), default=1)
    for b in ordered:
        for p, c in b["sharers"].items():
            segs.append([(right_x(b), b["y"]), (X_PROC, proc_y[p])])
            widths.append(0.4 + 3.0 * c / maxc)
        x = X_DUP if b["kind"] == "dup" else X_TOP
        if b["kind"] == "dup" and b["parent"] in chain_y:
            segs.append([(X_TOP, chain_y[b["parent"]]), (x, b["y"])])
            widths.append(0.6)
        elif b["kind"] != "dup" and b["parent"] in root_y:
            segs.append([(X_ROOT, root_y[b["parent"]]), (x, b["y"])])
            widths.append(0.4)
    for c in chains:
        segs.append([(X_ROOT, root_y[("root", c.nid)]), (X_TOP, chain_y[c.id])])
        widths.append(0.8)
    ax.add_collection(LineCollection(segs, linewidths=widths, colors="#555555", alpha=0.35,
                                     zorder=1, gid="edges"))

    def dots(xs, ys, kind, gid, size):
        if len(xs):
            ax.scatter(xs, ys, s=size, c=_KIND_COLORS[kind], edgecolors="black",
                       linewidths=0.4, zorder=3, gid=gid, marker="s" if kind == "proc" else "o")

    fs = 8 if height <= 60 else 7
    for kind in ("regular", "dup"):
        xs, ys, ss = [], [], []
        for b in (b for b in ordered if b["kind"] == kind):
            x0 = X_DUP if kind == "dup" else X_TOP
            if mode == "blocks":
                for k, n_items in enumerate(b["node_items"]):
                    xs.append(x0 + 0.04 * (k % cols))
                    ys.append(b["y0"] + k // cols)
                    ss.append(14 + 2 * min(n_items, 20))
            else:
                xs.append(x0)
                ys.append(b["y"])
                ss.append(30 + 6 * min(b["n"], 40))
            if b["n"] > 1:
                ax.text(right_x(b) + 0.05, b["y"], f"{b['n']} nodes", fontsize=fs,
                        va="center", gid="group", zorder=4,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7,
                              "pad": 0.5})
            else:
                ax.text(right_x(b) + 0.05, b["y"], f"kpfn {b['kpfn0']:#x} ({b['items0']})"
                        if b["kpfn0"] is not None else b["id0"], fontsize=fs, va="center",
                        zorder=4)
        dots(xs, ys, kind, f"nodes:{kind}", ss)
    dots([X_TOP] * len(chains), [chain_y[c.id] for c in chains], "chain", "nodes:chain", 90)
    dots([X_PROC] * len(procs), [proc_y[p] for p in procs], "proc", "procs", 90)
    ax.scatter([X_ROOT] * len(root_y), list(root_y.values()), s=120, c="white",
               edgecolors="black", zorder=3, gid="roots", marker="D")
    for par, yv in root_y.items():
        ax.text(X_ROOT - 0.06, yv, f"root_stable_tree[{par[1]}]", ha="right", va="center",
                fontsize=8)
    for c in chains:
        ax.text(X_TOP - 0.06, chain_y[c.id], f"chain {c.dups} dups", ha="right",
                va="center", fontsize=8, color="#a05000", zorder=4)
    for p in procs:
        n = sum(b["sharers"].get(p, 0) for b in ordered)
        ax.text(X_PROC + 0.06, proc_y[p], f"{_proc_label(*p)}\n{n} rmap_items", fontsize=8,
                va="center", zorder=4)
    ax.set_xlim(-0.9, 4.1)
    ax.set_ylim(height, -1.0)
    ax.set_xticks([X_ROOT, X_TOP, X_DUP, X_PROC],
                  ["tree roots", "chains / regular nodes", "dups", "sharers"])
    ax.set_yticks([])
    ax.set_xlabel("layer (edge width: rmap_items of that process on the node)")
    how = {"rows": "one row each", "blocks": "a dot each, in blocks by sharers",
           "grouped": "grouped by sharers"}[mode]
    ax.set_ylabel(f"stable nodes ({how})")
    handles = [Line2D([], [], ls="", marker="o", mfc=_KIND_COLORS["regular"], mec="black",
                      label=f"regular node ({kinds.get('regular', 0)})"),
               Line2D([], [], ls="", marker="o", mfc=_KIND_COLORS["chain"], mec="black",
                      label=f"chain head ({kinds.get('chain', 0)})"),
               Line2D([], [], ls="", marker="o", mfc=_KIND_COLORS["dup"], mec="black",
                      label=f"dup ({kinds.get('dup', 0)})"),
               Line2D([], [], ls="", marker="s", mfc=_KIND_COLORS["proc"], mec="black",
                      label=f"process ({len(procs)})"),
               Line2D([], [], color="#555555", alpha=0.6, lw=2,
                      label="sharing (width: rmap_items)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    agg = f"\n{n_leaves} nodes > max_nodes={max_nodes}: grouped by sharers" \
        if mode == "grouped" else ""
    ax.set_title(f"stable tree: {kinds.get('regular', 0)} regular nodes, "
                 f"{kinds.get('chain', 0)} chains with {kinds.get('dup', 0)} dups, "
                 f"{len(procs)} sharer processes - kernel "
                 f"{snap.kernel.variant or snap.kernel.release}{agg}", fontsize=10)
    return fig
