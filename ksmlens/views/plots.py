"""Matplotlib figures of a :class:`~ksmlens.lens.model.Snapshot`.

Every function here draws from plain snapshot data (never drgn objects), so
it works the same on a live walk and on ``Snapshot.load(path)``. Each takes
an optional ``ax`` to draw into (a new Figure sized for the content is made
when it is None) and returns the :class:`matplotlib.figure.Figure` it drew
on. Every figure has a title, labelled axes and a legend.

Artists that carry data have a ``gid`` so a caller (or a test) can find them
again: ``address_space`` marks are PathCollections with gid
``"items:<pgoff_status>:<state>"``; ``stable_tree`` nodes are
``"nodes:<kind>"`` and ``"procs"``, and an aggregated group's label is a Text
with gid ``"group"``; the grids of ``walk_replay`` and ``smartscan_heatmap``
are the Axes' single image.

>>> import ksmlens.views.plots as plots
>>> fig = plots.address_space(snap, pid)          # doctest: +SKIP
>>> fig.savefig("space.png")                      # doctest: +SKIP
"""

from __future__ import annotations

import io
from collections import Counter, defaultdict

import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ksmlens.errors import KsmlensError
from ksmlens.lens.model import Snapshot

from ksmlens.analysis.core import RULES, item_status, smartscan_visit, skip_age

__all__ = ["STATUS_COLORS", "STATE_MARKERS", "address_space", "stable_tree",
           "smartscan_heatmap", "skip_schedule", "walk_replay", "verify_outcome",
           "matrix_figure", "address_axis", "address_axis_timeline", "chain_growth",
           "union_bytes"]

ZERO_COLOR = "#17becf"   # a KSM zero page (the zero pfn, dirty)
STATUS_COLORS = {"ok": "#2ca02c", "moved": "#d62728", "no_vma": "#7f7f7f",
                 "stored_unset": "#9467bd", "stored_stale": "#ff7f0e"}
STATE_MARKERS = {"stable": "o", "unstable": "^", "none": "x"}


# ------------------------------------------------------------------ helpers

class _NotebookFigure(Figure):
    """A Figure made without pyplot (no global state, nothing to close)
    that still shows as a PNG when it is a notebook cell's value."""

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=90)
        return buf.getvalue()


NotebookFigure = _NotebookFigure     # for the other views' modules (costplots)


def _axes(ax, size):
    """(fig, ax): ``ax`` as given, or a new Figure of ``size`` (no pyplot)."""
    if ax is not None:
        return ax.figure, ax
    fig = _NotebookFigure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _get(obj, name):
    if isinstance(obj, dict):
        return obj[name]
    return getattr(obj, name)


def _proc_label(pid, comm):
    return f"pid {pid}" + (f" {comm}" if comm else "") if pid is not None else "exited mm"


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
        pid = None if pid is None or pid != pid else int(pid)
        comm = None if comm is None or comm != comm else comm
        out.setdefault(node, []).append(((pid, comm), int(c)))
    return {k: tuple(sorted(v, key=lambda kv: (kv[0][0] is None, kv[0][0] or 0)))
            for k, v in out.items()}


# ------------------------------------------------------------------ address space

def _segments(intervals, gap_frac=0.12):
    """Compress a page-number axis: merge ``intervals`` ([lo, hi) in pages),
    keep them to scale and replace each gap between them by a fixed width.
    Returns (to_x, segments [(lo, hi, x0)]) with to_x(vpn) -> plot x."""
    merged = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    total = sum(hi - lo for lo, hi in merged) or 1
    gap = max(1.0, total * gap_frac)
    segs, x = [], 0.0
    for lo, hi in merged:
        segs.append((lo, hi, x))
        x += (hi - lo) + gap
    starts = np.array([s[0] for s in segs], dtype=float)

    def to_x(vpn):
        v = np.asarray(vpn, dtype=float)
        k = np.clip(np.searchsorted(starts, v, side="right") - 1, 0, len(segs) - 1)
        lo = starts[k]
        x0 = np.array([s[2] for s in segs])[k]
        return x0 + (v - lo)

    return to_x, segs


def address_space(snap: Snapshot, pid: int, ax=None, vma: int | None = None) -> Figure:
    """Map of one process's address space as KSM sees it.

    Each VMA that holds rmap_items is a band on its own row at its virtual
    page numbers (``vm_start >> PAGE_SHIFT``..``vm_end >> PAGE_SHIFT``); under
    it a hatched bar is the range its ``vm_pgoff`` claims
    (``[vm_pgoff, vm_pgoff + pages)``, the anon_vma interval tree's key).
    When the two differ (a VMA moved by ``mremap()``, a MAP_PRIVATE file
    mapping, the relocated stack) the bars part and the row says by how many
    pages. Each rmap_item is a mark at ``address >> PAGE_SHIFT``, coloured by
    ``pgoff_status`` and shaped by ``state``. Gaps between the ranges are
    cut short (marked ``//``); tick labels are real page numbers in hex.

    ``vma``: only the VMA starting at this address. Returns the Figure.
    """
    shift = snap.kernel.page_shift
    items = snap.items_of(pid)
    zero = [] if vma is not None else sorted(
        a for s in snap.slots() if pid in (s.pids or [s.pid]) for a in s.zero_pages)
    if not items and not zero:
        have = sorted({i.pid for i in snap.items() if i.pid is not None})
        raise KsmlensError(f"pid {pid} has no rmap_items in this snapshot",
                           f"pids with rmap_items: {have or 'none'}")
    if vma is not None:
        items = [i for i in items if i.vma_start == vma]
        if not items:
            raise KsmlensError(f"pid {pid} has no rmap_items in a VMA at {vma:#x}",
                               "pick a vma_start of one of its rmap_items")
    comm = next((i.comm for i in items if i.comm), None)
    vmas = sorted({(i.vma_start, i.vma_end, i.vm_pgoff) for i in items
                   if i.vma_start is not None})
    orphans = [i for i in items if i.vma_start is None]
    rows = {v: k for k, v in enumerate(vmas)}
    if orphans:
        rows[None] = len(vmas)
    if zero:            # KSM zero pages: no rmap_item, no stable node, only a PTE
        rows["zero"] = len(rows)
    intervals = [(a >> shift, (a >> shift) + 1) for a in zero]
    for start, end, pgoff in vmas:
        npages = (end - start) >> shift
        intervals += [(start >> shift, end >> shift), (pgoff, pgoff + npages)]
    intervals += [(i.address >> shift, (i.address >> shift) + 1) for i in orphans]
    to_x, segs = _segments(intervals)

    nrows = len(rows)
    fig, ax = _axes(ax, (11, 2.4 + 1.2 * nrows))
    for (start, end, pgoff), r in ((v, rows[v]) for v in vmas):
        lo, hi = start >> shift, end >> shift
        x0 = float(to_x(lo))
        ax.add_patch(Rectangle((x0, r - 0.3), hi - lo, 0.4, facecolor="#c6dbef",
                               edgecolor="#08519c", zorder=1, gid="vma"))
        px = float(to_x(pgoff))
        moved = pgoff != lo
        ax.add_patch(Rectangle((px, r + 0.14), hi - lo, 0.14, facecolor="none",
                               edgecolor="#d62728" if moved else "#08519c",
                               hatch="////", lw=0.8, zorder=1, gid="pgoff"))
        if moved:
            d = pgoff - lo
            causes = Counter(i.pgoff_cause for i in items if i.vma_start == start
                             and i.pgoff_cause)
            why = f"; cause: {causes.most_common(1)[0][0]}" if causes else ""
            ax.annotate(f"vm_pgoff {pgoff:#x} != vm_start>>{shift} {lo:#x} "
                        f"({'+' if d > 0 else '-'}{abs(d)} pages{why})",
                        (min(x0, px), r + 0.38), ha="left", va="center",
                        fontsize=8, color="#d62728", zorder=4)
    groups = defaultdict(list)
    for it in items:
        groups[(item_status(it), it.state)].append(it)
    for (status, state), its in sorted(groups.items()):
        xs = to_x([i.address >> shift for i in its]) + 0.5
        ys = [rows[(i.vma_start, i.vma_end, i.vm_pgoff)] if i.vma_start is not None
              else rows[None] for i in its]
        m = STATE_MARKERS.get(state, "s")
        kw = {"edgecolors": "black", "linewidths": 0.3} if m != "x" else {"linewidths": 1.0}
        ax.scatter(xs, np.asarray(ys) - 0.1, c=STATUS_COLORS.get(status, "black"),
                   marker=m, s=22, zorder=3, gid=f"items:{status}:{state}", **kw)
    if zero:
        ax.scatter(to_x([a >> shift for a in zero]) + 0.5, [rows["zero"] - 0.1] * len(zero),
                   c=ZERO_COLOR, marker="o", s=14, zorder=3, gid="zero_pages",
                   edgecolors="black", linewidths=0.3)

    ticks, labels = [], []
    width = segs[-1][2] + segs[-1][1] - segs[-1][0]
    for lo, hi, x0 in segs:
        ticks.append(x0)
        labels.append(f"{lo:#x}")
        if hi - lo >= 0.1 * width:    # room for the end's label too
            ticks.append(x0 + hi - lo)
            labels.append(f"{hi:#x}")
    for (lo, hi, x0), nxt in zip(segs, segs[1:]):
        gx = (x0 + hi - lo + nxt[2]) / 2
        ax.text(gx, nrows - 0.5, "//", ha="center", va="center", fontsize=10, color="gray")
    ax.set_xticks(ticks, labels, rotation=30, ha="right", fontsize=7)
    ylab = []
    for v, r in sorted(rows.items(), key=lambda kv: kv[1]):
        if v == "zero":
            ylab.append(f"KSM zero pages\n({len(zero)}, no rmap_item)")
        elif v is None:
            ylab.append("no VMA (item outlived its mapping)")
        else:
            start, end, pgoff = v
            tag = " file" if any(i.vma_file for i in items if i.vma_start == start) else ""
            ylab.append(f"VMA {start:#x}\n{(end - start) >> shift} pages{tag}")
    ax.set_yticks(range(nrows), ylab, fontsize=8)
    last = segs[-1]
    ax.set_xlim(-1, last[2] + last[1] - last[0] + 1)
    ax.set_ylim(nrows - 0.45, -0.6)
    ax.set_xlabel(f"virtual page number (address >> {shift}; gaps cut short)")
    ax.set_ylabel("VMAs holding rmap_items")
    st = Counter(item_status(i) for i in items)
    ss = Counter(i.state for i in items)
    handles: list[Artist] = [Patch(facecolor="#c6dbef", edgecolor="#08519c", label="VMA [vm_start, vm_end)"),
               Patch(facecolor="none", edgecolor="#08519c", hatch="////",
                     label="[vm_pgoff, +pages): what the walk searches")]
    handles += [Line2D([], [], ls="", marker="s", color=STATUS_COLORS[s],
                       label=f"pgoff {s} ({st.get(s, 0)})") for s in STATUS_COLORS]
    handles += [Line2D([], [], ls="", marker=m, color="black", mfc="white",
                       label=f"{s} ({ss.get(s, 0)})") for s, m in STATE_MARKERS.items()]
    if zero:
        handles.append(Line2D([], [], ls="", marker="o", color=ZERO_COLOR,
                              label=f"KSM zero page ({len(zero)})"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              title="rmap_items", title_fontsize=8)
    ax.set_title(f"{_proc_label(pid, comm)}: {len(items)} rmap_items in {len(vmas)} VMA(s)"
                 f" - kernel {snap.kernel.variant or snap.kernel.release}, "
                 f"{st.get('moved', 0)} moved"
                 + (f", {len(zero)} KSM zero pages" if zero else ""), fontsize=10)
    return fig


# ------------------------------------------------------------------ stable tree

_KIND_COLORS = {"regular": "#1f77b4", "chain": "#ff7f0e", "dup": "#e7ba52",
                "proc": "#2ca02c"}


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

    nodes = [n for n in snap.nodes(mappings=False) if not (n.migrate_list and n.kind == "dup")]
    sharers = _sharers_by_node(snap)
    leaves = [n for n in nodes if n.kind != "chain"]
    chains = [n for n in nodes if n.kind == "chain"]
    mode = "grouped" if len(leaves) > max_nodes else \
        "rows" if len(leaves) <= label_nodes else "blocks"
    by_id = {n.id for n in nodes}

    boxes: dict = {}
    for n in leaves:
        sh = sharers.get(n.id, ())
        parent = n.chain if n.kind == "dup" else ("root", n.nid)
        key = (n.kind, parent, n.id) if mode == "rows" else \
            (n.kind, parent, tuple(p for p, _ in sh))
        b = boxes.setdefault(key, {"kind": n.kind, "parent": parent, "nodes": [],
                                   "sharers": Counter()})
        b["nodes"].append(n)
        for p, c in sh:
            b["sharers"][p] += c
    procs = sorted({p for b in boxes.values() for p in b["sharers"]},
                   key=lambda p: (p[0] is None, p[0] or 0))

    def order(b):
        return tuple(sorted((p[0] or 0) for p in b["sharers"])), b["nodes"][0].kpfn or 0
    parents = [("root", nid) for nid in sorted({n.nid for n in leaves if n.kind != "dup"})]
    parents += [c.id for c in chains]
    ordered = []
    for par in parents:
        ordered += sorted((b for b in boxes.values() if b["parent"] == par), key=order)
    ordered += [b for b in boxes.values() if b["parent"] not in parents]  # orphaned dups

    # Vertical layout: a box takes one row, or (blocks) ceil(n / cols) rows.
    cols = 20
    y = 0.0
    for b in ordered:
        h = 1 if mode != "blocks" else -(-len(b["nodes"]) // cols)
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
        (chain_y if par in by_id else root_y)[par] = float(np.mean(ys)) if ys else 0.0
    for c in chains:
        root_y.setdefault(("root", c.nid), chain_y[c.id])

    def right_x(b):
        x = X_DUP if b["kind"] == "dup" else X_TOP
        if mode == "blocks":
            x += 0.04 * (min(len(b["nodes"]), cols) - 1)
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
                for k, n in enumerate(b["nodes"]):
                    xs.append(x0 + 0.04 * (k % cols))
                    ys.append(b["y0"] + k // cols)
                    ss.append(14 + 2 * min(len(n.items), 20))
            else:
                xs.append(x0)
                ys.append(b["y"])
                ss.append(30 + 6 * min(len(b["nodes"]), 40))
            if len(b["nodes"]) > 1:
                ax.text(right_x(b) + 0.05, b["y"], f"{len(b['nodes'])} nodes", fontsize=fs,
                        va="center", gid="group", zorder=4,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7,
                              "pad": 0.5})
            elif mode == "rows" or len(b["nodes"]) == 1:
                k = b["nodes"][0]
                ax.text(right_x(b) + 0.05, b["y"], f"kpfn {k.kpfn:#x} ({len(k.items)})"
                        if k.kpfn is not None else k.id, fontsize=fs, va="center", zorder=4)
        dots(xs, ys, kind, f"nodes:{kind}", ss)
    dots([X_TOP] * len(chains), [chain_y[c.id] for c in chains], "chain", "nodes:chain", 90)
    dots([X_PROC] * len(procs), [proc_y[p] for p in procs], "proc", "procs", 90)
    ax.scatter([X_ROOT] * len(root_y), list(root_y.values()), s=120, c="white",
               edgecolors="black", zorder=3, gid="roots", marker="D")
    for par, yv in root_y.items():
        ax.text(X_ROOT - 0.06, yv, f"root_stable_tree[{par[1]}]", ha="right", va="center",
                fontsize=8)
    for c in chains:
        ax.text(X_TOP - 0.06, chain_y[c.id], f"chain {len(c.dups)} dups", ha="right",
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
    kinds = Counter(n.kind for n in nodes)
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
    agg = f"\n{len(leaves)} nodes > max_nodes={max_nodes}: grouped by sharers" \
        if mode == "grouped" else ""
    ax.set_title(f"stable tree: {kinds.get('regular', 0)} regular nodes, "
                 f"{kinds.get('chain', 0)} chains with {kinds.get('dup', 0)} dups, "
                 f"{len(procs)} sharer processes - kernel "
                 f"{snap.kernel.variant or snap.kernel.release}{agg}", fontsize=10)
    return fig


# ------------------------------------------------------------------ SmartScan

_SMART_FIELDS = ("age", "remaining_skips")


def smartscan_heatmap(frames, ax=None, field: str = "age") -> Figure:
    """SmartScan state over a timeline of snapshots: one row per rmap_item
    (by pid, then address), one column per snapshot (labelled with its
    ``full_scans``), colour = ``age`` or ``remaining_skips``. Grey cells: no
    rmap_item at that address in that snapshot. A dot marks a STABLE item:
    SmartScan leaves its age alone, and on kernels with a stored pgoff
    these bytes are part of the pgoff. Returns the Figure.
    """
    frames = list(frames)
    if not frames:
        raise KsmlensError("smartscan_heatmap needs at least one snapshot",
                           "pass a list of Snapshot objects (a timeline)")
    if field not in _SMART_FIELDS:
        raise KsmlensError(f"field {field!r} is not a SmartScan field",
                           f"use one of {', '.join(_SMART_FIELDS)}")
    keys = sorted({(i.pid if i.pid is not None else -1, i.address)
                   for f in frames for i in f.items()})
    if not keys:
        raise KsmlensError("no rmap_items in these snapshots", "run a scenario first")
    row = {k: r for r, k in enumerate(keys)}
    data = np.full((len(keys), len(frames)), np.nan)
    stable_x, stable_y = [], []
    for c, f in enumerate(frames):
        for i in f.items():
            r = row[(i.pid if i.pid is not None else -1, i.address)]
            data[r, c] = getattr(i, field)
            if i.state == "stable":
                stable_x.append(c)
                stable_y.append(r)
    fig, ax = _axes(ax, (max(7, 3.5 + 1.1 * len(frames)), 6.5))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    vmax = max(1.0, float(np.nanmax(data)))
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest",
                   cmap=cmap, vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax, label=field, fraction=0.05, pad=0.02)
    if stable_x:
        ax.scatter(stable_x, stable_y, s=2, c="white", marker=".", linewidths=0,
                   gid="stable")
    # blocks of rows: by pid, and within a pid by VMA (the last one seen)
    comm, vma_of = {}, {}
    for f in frames:
        for i in f.items():
            comm.setdefault(i.pid, i.comm)
            vma_of[(i.pid if i.pid is not None else -1, i.address)] = i.vma_start
    by_vma = len({(k[0], vma_of[k]) for k in keys}) <= 24
    block = [(k[0], vma_of[k] if by_vma else None) for k in keys]
    ticks, labels = [], []
    start = 0
    for r in range(1, len(keys) + 1):
        if r == len(keys) or block[r] != block[start]:
            ticks.append((start + r - 1) / 2)
            p, v = block[start]
            where = f" VMA {v:#x}" if v is not None else (" no VMA" if by_vma else "")
            labels.append(f"{_proc_label(p if p >= 0 else None, comm.get(p))}{where}\n"
                          f"{r - start} addresses")
            if r < len(keys):
                ax.axhline(r - 0.5, color="white", lw=2.0 if block[r][0] != p else 0.8)
            start = r
    ax.set_yticks(ticks, labels, fontsize=7 if len(ticks) > 8 else 8)
    ax.set_xticks(range(len(frames)), [f"{f.counters.get('full_scans', '?')}"
                                       for f in frames])
    ax.set_xlabel("snapshot (full_scans)")
    ax.set_ylabel("rmap_items (by pid, address)")
    handles = [Patch(facecolor="#d9d9d9", label="no rmap_item there"),
               Line2D([], [], ls="", marker=".", color="black",
                      label="stable (age frozen; union: pgoff bytes)")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8,
              ncols=2)
    k = frames[-1].kernel
    ax.set_title(f"SmartScan {field} of {len(keys)} rmap_items over {len(frames)} "
                 f"snapshots - kernel {k.variant or k.release}", fontsize=10)
    return fig


def _smartscan_visits(n: int):
    """[(age before the visit, processed?)] for an item whose page never
    becomes KSM, over ``n`` visits (ksmlens.analysis.core.smartscan_visit)."""
    age, skips, out = 0, 0, []
    for _ in range(n):
        before = age
        age, skips, skipped = smartscan_visit(age, skips)
        out.append((before, not skipped))
    return out


def skip_schedule(ax=None, max_age: int = 20) -> Figure:
    """The kernel's SmartScan schedule for ages 0..``max_age``: the bars are
    ``skip_age(age)`` (how many visits a processed item skips next), the
    marks below say whether ksmd processes or skips an item that never
    merges on the visit where its age is that value. Returns the Figure."""
    fig, ax = _axes(ax, (9, 4))
    ages = list(range(max_age + 1))
    ax.bar(ages, [skip_age(a) for a in ages], color="#9ecae1", edgecolor="#3182bd",
           label="skip_age(age)", gid="skip_age")
    visits = _smartscan_visits(max_age + 1)
    proc = [a for a, p in visits if p]
    skip = [a for a, p in visits if not p]
    ax.scatter(proc, [-1.0] * len(proc), marker="o", s=60, c="#2ca02c", zorder=3,
               gid="processed", label=f"processed ({len(proc)})")
    ax.scatter(skip, [-1.0] * len(skip), marker="x", s=60, c="#d62728", zorder=3,
               gid="skipped", label=f"skipped ({len(skip)})")
    ax.axvspan(-0.5, 2.5, color="#eeeeee", zorder=0, label="age < 3: never skipped")
    ax.axhline(-0.5, color="gray", lw=0.5)
    ax.set_xticks(ages)
    ax.set_xlim(-0.5, max_age + 0.5)
    ax.set_ylim(-1.7, 9)
    ax.set_yticks([-1, 1, 2, 4, 8], ["visit", "1", "2", "4", "8"])
    ax.set_xlabel("age (ksmd visits while the page is not KSM)")
    ax.set_ylabel("skip_age(age): visits skipped next")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("SmartScan (mm/ksm.c, 6.12): should_skip_rmap_item() for a page "
                 f"that never merges: {len(skip)} of {len(visits)} visits skipped",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------ walk replay

_CELL = {"n/a": 0, "found": 1, "missed": 2, "not found, unmapped": 3}
_CELL_COLORS = ["#d9d9d9", "#2ca02c", "#d62728", "#fdd0a2"]


def _cell(m, rule):
    f = (m.get("found") or {}).get(rule)
    if f is None:
        return _CELL["n/a"]
    if f:
        return _CELL["found"]
    return _CELL["missed"] if m.get("mapped") else _CELL["not found, unmapped"]


def walk_replay(snap: Snapshot, ax=None, max_nodes: int = 60, nodes=None,
                max_rows: int = 160) -> Figure:
    """What each rmap walk rule finds, per stable node: one row per mapping
    an ``rmap_walk_ksm()`` of the node's page can visit (``StableNode.mappings``),
    one column per rule (``stock``, ``v3``, ``stored``); a cell is found,
    missed (a PTE maps the page there, the rule does not find it), not
    found where nothing is mapped, or n/a (the kernel has no stored pgoff).
    Nodes with misses come first; at most ``max_nodes`` nodes are drawn.
    Past ``max_rows`` rows, the mappings of one node that belong to one
    process and fare the same under every rule share a row ("N mappings").
    The column of the rule this kernel uses (``kernel.walk_rule``) is framed.
    ``nodes``: only these node ids. Returns the Figure.
    """
    cand = [n for n in snap.nodes() if n.mappings]
    if nodes is not None:
        want = set(nodes)
        cand = [n for n in cand if n.id in want]
    if not cand:
        raise KsmlensError("no stable node in this snapshot has walk-replay mappings",
                           "take the snapshot with a ksmlens that records "
                           "StableNode.mappings, after a scenario merged pages")

    def misses(n):
        return sum(_cell(m, r) == _CELL["missed"] for m in n.mappings for r in RULES)
    cand.sort(key=lambda n: (-misses(n), -len(n.unmappable_under), n.kpfn or 0))
    shown = cand[:max_nodes]
    compact = sum(len(n.mappings) for n in shown) > max_rows

    def mkey(m):
        return (m.get("pass", 1), m.get("pid") or 0, m.get("address", 0))
    rows, labels, bounds = [], [], []
    for n in shown:
        groups: dict = {}
        for m in sorted(n.mappings, key=mkey):
            cells = tuple(_cell(m, r) for r in RULES)
            key = (m.get("pid"), m.get("pass", 1), cells) if compact else id(m)
            groups.setdefault(key, []).append(m)
        for ms in groups.values():
            m = ms[0]
            rows.append([_cell(m, r) for r in RULES])
            who = _proc_label(m.get("pid"), m.get("comm"))
            p2 = " pass 2" if m.get("pass") == 2 else ""
            tag = "" if m.get("mapped") else " (no PTE)"
            if len(ms) == 1:
                labels.append(f"{who} {m.get('address', 0):#x}{p2}{tag}")
            else:
                labels.append(f"{who}: {len(ms)} mappings {m.get('address', 0):#x}.."
                              f"{ms[-1].get('address', 0):#x}{p2}{tag}")
        bounds.append((len(rows), n))
    data = np.array(rows, dtype=float)
    fig, ax = _axes(ax, (9, min(40, 3.0 + 0.17 * len(rows))))
    ax.imshow(data, aspect="auto", interpolation="nearest", cmap=ListedColormap(_CELL_COLORS),
              vmin=-0.5, vmax=len(_CELL_COLORS) - 0.5)
    prev = 0
    for end, n in bounds:
        ax.axhline(end - 0.5, color="black", lw=0.8)
        ax.text(len(RULES) - 0.4, (prev + end - 1) / 2,
                (f"kpfn {n.kpfn:#x}" if n.kpfn is not None else n.id)
                + (f"\nmissed by {','.join(n.unmappable_under)}" if n.unmappable_under else ""),
                fontsize=7, va="center", color="#d62728" if n.unmappable_under else "black")
        prev = end
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    rule = snap.kernel.walk_rule
    ax.set_xticks(range(len(RULES)), [f"{r}\n(this kernel)" if r == rule else r
                                      for r in RULES])
    if rule in RULES:
        k = RULES.index(rule)
        ax.add_patch(Rectangle((k - 0.5, -0.5), 1, len(rows), fill=False, lw=2.5,
                               edgecolor="black", zorder=3, gid="this_rule"))
    ax.set_xlabel("rmap walk rule")
    ax.set_ylabel("mappings an rmap walk can visit, by stable node (right)")
    cnt = Counter(int(v) for v in data.ravel())
    names = {v: k for k, v in _CELL.items()}
    unit = "rows" if compact else "cells"
    ax.legend(handles=[Patch(facecolor=_CELL_COLORS[v], edgecolor="black",
                             label=f"{names[v]} ({cnt.get(v, 0)} {unit})")
                       for v in (1, 2, 3, 0)],
              loc="upper center", bbox_to_anchor=(0.5, -0.35 / max(1, len(rows)) ** 0.5 - 0.02),
              ncols=2, fontsize=8)
    miss = {r: sum(_cell(m, r) == _CELL["missed"] for n in cand for m in n.mappings)
            for r in RULES}
    ax.set_title(f"walk replay, kernel {snap.kernel.variant or snap.kernel.release}: "
                 f"{len(shown)} of {len(cand)} stable nodes, "
                 f"{sum(len(n.mappings) for n in shown)} mappings\nmapped mappings missed: "
                 + ", ".join(f"{r} {miss[r]}" for r in RULES), fontsize=10)
    return fig


# ------------------------------------------------------------------ verification

_PRED = ("moves", "stays")
_OBS = ("moved", "stayed", "mixed")
# verify --by reclaim: nodes reclaimed/stays, mappings unmapped/mapped/absent
_PRED_RECLAIM = ("reclaimed", "stays", "unmapped", "mapped")
_OBS_RECLAIM = ("reclaimed", "stayed", "swapped", "mapped")


def verify_outcome(result, ax=None) -> Figure:
    """Prediction against the kernel's outcome of the verification
    experiment (a :class:`ksmlens.experiments.verify.VerifyResult`, or anything with
    ``rule``, ``rows`` and ``pages``, or such a dict): rows = predicted
    (moves/stays), columns = observed (moved/stayed/mixed), each cell the
    number of stable nodes and of pages there; agreeing cells green, the
    others red. A reclaim result (``by == "reclaim"``) has its own words:
    nodes reclaimed/stays, mappings unmapped/mapped (swapped/mapped
    observed). Returns the Figure."""
    rule = _get(result, "rule")
    if rule is None:     # a kernel of unknown rule: the rows are judged under rows_rule
        rows_rule = (result.get("rows_rule") if isinstance(result, dict)
                     else getattr(result, "rows_rule", None))
        rule = f"{rows_rule} (kernel's own unknown)" if rows_rule else None
    by = (result.get("by") if isinstance(result, dict) else getattr(result, "by", None)) \
        or "migration"
    base_pred, base_obs = (_PRED_RECLAIM, _OBS_RECLAIM) if by == "reclaim" else (_PRED, _OBS)
    rows = list(_get(result, "rows"))
    pages = list(_get(result, "pages"))
    if not rows and not pages:
        raise KsmlensError("the verification result has no rows and no pages",
                           "run the verification on a VM where pages are merged")
    preds = list(base_pred) + sorted({r["predicted"] for r in rows + pages} - set(base_pred))
    obs = list(base_obs) + sorted({r["observed"] for r in rows + pages} - set(base_obs))
    nodes = Counter((r["predicted"], r["observed"]) for r in rows)
    pcount = Counter((p["predicted"], p["observed"]) for p in pages)
    agree_cell = {}
    for r in rows + pages:
        agree_cell.setdefault((r["predicted"], r["observed"]), bool(r["agree"]))
    fig, ax = _axes(ax, (8, 4))
    green, red, empty = "#a1d99b", "#fc9272", "#f0f0f0"
    for i, pr in enumerate(preds):
        for j, ob in enumerate(obs):
            key = (pr, ob)
            n, p = nodes.get(key, 0), pcount.get(key, 0)
            col = empty if not (n or p) else green if agree_cell.get(key) else red
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=col,
                                   edgecolor="white", lw=2, gid=f"cell:{pr}:{ob}"))
            ax.text(j, i, f"{n} nodes\n{p} pages", ha="center", va="center", fontsize=10,
                    gid=f"count:{pr}:{ob}")
    ax.set_xlim(-0.5, len(obs) - 0.5)
    ax.set_ylim(len(preds) - 0.5, -0.5)
    ax.set_xticks(range(len(obs)), obs)
    ax.set_yticks(range(len(preds)), preds)
    ax.set_xlabel("observed (kernel: did the page move?)" if by != "reclaim" else
                  "observed (kernel: memory.reclaim; did the page / mapping go?)")
    ax.set_ylabel(f"predicted by rule '{rule}'")
    na = sum(1 for r in rows if r["agree"])
    pa = sum(1 for p in pages if p["agree"])
    ax.legend(handles=[Patch(facecolor=green, label=f"agree ({na} nodes, {pa} pages)"),
                       Patch(facecolor=red, label=f"disagree ({len(rows) - na} nodes, "
                                                   f"{len(pages) - pa} pages)"),
                       Patch(facecolor=empty, edgecolor="#bbbbbb", label="none")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    rel = result.get("release") if isinstance(result, dict) else getattr(result, "release", None)
    ax.set_title(f"prediction vs kernel{' ' + rel if rel else ''}, rule '{rule}':\n"
                 f"{na}/{len(rows)} stable nodes and {pa}/{len(pages)} mapped pages agree",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------ ksmlens matrix

_MATRIX_COLORS = {"went": "#a1d99b", "stayed": "#fc9272", "mixed": "#fdd49e"}


def matrix_figure(m, ax=None) -> Figure:
    """The reviewer's matrix (a :class:`ksmlens.experiments.matrix.Matrix`):
    one row per kernel variant, one column per (scenario, proof); each cell
    coloured by what the kernel did to the scenario's KSM pages (moved /
    reclaimed: green; pinned / stayed: red; mixed: orange), labelled with
    the pages that stayed and the walk rules the kernel behaved like; a
    cell whose prediction disagreed is hatched. Cells are Rectangles with
    gid ``"cell:<variant>:<scenario>:<by>"``. Returns the Figure."""
    rows = m.variants
    cols = [(s, b) for s in m.scenarios for b in m.bys      # hwpoison: mremap only
            if any(m.cell(v, s, b) is not None for v in rows)]
    if not cols or not rows:
        raise KsmlensError("the matrix has no cells", "run `ksmlens matrix` first")
    fig, ax = _axes(ax, (max(6.0, 1.9 * len(cols) + 2.5), 1.0 * len(rows) + 2.2))
    for i, v in enumerate(rows):
        for j, (s, b) in enumerate(cols):
            c = m.cell(v, s, b)
            if c is None:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#f0f0f0",
                                       edgecolor="white", lw=2))
                continue
            kind = ("went" if c.outcome in ("moves", "reclaimed", "unmapped") else
                    "mixed" if c.outcome == "mixed" else "stayed")
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=_MATRIX_COLORS[kind],
                                   edgecolor="white", lw=2, hatch=None if c.agree else "xx",
                                   gid=f"cell:{v}:{s}:{b}"))
            like = ("madvise " + c.madvise if c.by == "hwpoison" else
                    "like no rule" if not c.matches else
                    f"like {c.matches[0]}" if len(c.matches) == 1 else
                    "all rules alike" if c.matches == c.candidates else
                    "like " + " = ".join(c.matches))
            stay = (f"{c.mappings_kept}/{c.mappings} mappings kept" if c.by == "hwpoison" else
                    f"{c.pages_stayed}/{c.pages} stay")
            ax.text(j, i, f"{c.outcome}\n{stay}\n{like}",
                    ha="center", va="center", fontsize=8)
    ax.set_xlim(-0.5, len(cols) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks(range(len(cols)), [f"{s}\n{b}" for s, b in cols], fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("scenario and the kernel's proof (move_pages / memory.reclaim / "
                  "MADV_HWPOISON)")
    ax.set_ylabel("kernel variant")
    ax.legend(handles=[Patch(facecolor=_MATRIX_COLORS["went"], label="every KSM page moved / freed / unmapped"),
                       Patch(facecolor=_MATRIX_COLORS["stayed"],
                             label="pinned / never freed / still mapped (a walk missed a "
                             "mapping)"),
                       Patch(facecolor=_MATRIX_COLORS["mixed"], label="some stayed"),
                       Patch(facecolor="white", edgecolor="black", hatch="xx",
                             label="prediction disagreed")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ok = sum(c.agree for c in m.cells)
    ax.set_title(f"What each kernel's rmap_walk_ksm() does: {len(m.cells)} verifications, "
                 f"{ok} agree with the prediction\n(text: outcome, KSM pages that stayed, "
                 "the walk rules the kernel behaved like)", fontsize=10)
    return fig


# ------------------------------------------------------------------ the address axis

AXIS_RULE_COLORS = {"found": "#2ca02c", "missed": "#d62728", "not_stable": "#c7c7c7",
                    "no_vma": "#252525", "n/a": "#f7f7f7"}
AXIS_VISIT_COLORS = {"processed": "#2ca02c", "skipped": "#ff7f0e", "freed": "#252525"}
# whose age / remaining_skips SmartScan reads at the item's next visit
AXIS_AGE_KINDS = {"read": ("#1f77b4", "age read by SmartScan"),
                  "pgoff": ("#d62728", "read from the stored pgoff's bytes (union)"),
                  "ksm": ("#bdbdbd", "not read: the page is KSM"),
                  "freed": ("#636363", "not read: ksmd frees the item")}


def _age_kind(r) -> str:
    if r["freed_why"] is not None and r["freed_why"] == r["freed_why"]:
        return "freed"
    if r["page_ksm"] or not r["smartscan_on"]:
        return "ksm"
    return "pgoff" if r["reads_pgoff"] else "read"


def _axis_space(dfs, shift):
    """(to_x, segs, vmas) for the rows of address_axis_frame(s) ``dfs``: the
    VMAs' [vm_start, vm_end) and [vm_pgoff, +pages) and the VMA-less items,
    in pages, gaps cut short (:func:`_segments`)."""
    vmas, intervals = set(), []
    for d in dfs:
        v = d[d["vma_start"].notna()]
        vmas |= set(zip(v["vma_start"].astype(int), v["vma_end"].astype(int),
                        v["vm_pgoff"].astype(int)))
        intervals += [(int(p), int(p) + 1) for p in d.loc[d["vma_start"].isna(), "vpn"]]
    vmas = sorted(vmas)
    for start, end, pgoff in vmas:
        n = (end - start) >> shift
        intervals += [(start >> shift, end >> shift), (pgoff, pgoff + n)]
    to_x, segs = _segments(intervals)
    return to_x, segs, vmas


def _axis_ticks(axes, segs, label: str):
    """Hex page-number ticks on the shared axis, a grey band over each cut
    gap in every panel, the x label on the bottom panel."""
    ticks, labels = [], []
    width = segs[-1][2] + segs[-1][1] - segs[-1][0]
    for lo, hi, x0 in segs:
        ticks.append(x0)
        labels.append(f"{lo:#x}")
        if hi - lo >= 0.12 * width:
            ticks.append(x0 + hi - lo)
            labels.append(f"{hi:#x}")
    for ax in axes:
        for (lo, hi, x0), nxt in zip(segs, segs[1:]):
            ax.axvspan(x0 + hi - lo + 0.2, nxt[2] - 0.2, color="#f0f0f0", zorder=0, lw=0)
    for (lo, hi, x0), nxt in zip(segs, segs[1:]):
        axes[-1].text((x0 + hi - lo + nxt[2]) / 2, 0.5, "//", transform=axes[-1].get_xaxis_transform(),
                      ha="center", va="center", fontsize=10, color="gray")
    axes[-1].set_xticks(ticks, labels, rotation=30, ha="right", fontsize=7)
    axes[-1].set_xlim(-1, width + 1)
    axes[-1].set_xlabel(label)


def _marker_size(n_x: float, inches: float = 8.5) -> float:
    """Scatter size (points^2) of one page's square on an axis ``n_x`` pages wide."""
    per = inches * 72 / max(n_x, 1.0)
    return float(min(49.0, max(2.0, (0.85 * per) ** 2)))


def _draw_vmas(ax, vmas, to_x, shift, df):
    """One row per VMA: the band [vm_start, vm_end) and, hatched, the pgoff
    range [vm_pgoff, +pages) the anon_vma interval tree files it under."""
    rows = {v: k for k, v in enumerate(vmas)}
    for (start, end, pgoff), r in rows.items():
        lo, hi = start >> shift, end >> shift
        x0, px = float(to_x(lo)), float(to_x(pgoff))
        moved = pgoff != lo
        ax.add_patch(Rectangle((x0, r - 0.32), hi - lo, 0.36, facecolor="#c6dbef",
                               edgecolor="#08519c", zorder=1, gid="vma"))
        ax.add_patch(Rectangle((px, r + 0.08), hi - lo, 0.22, facecolor="none",
                               edgecolor="#d62728" if moved else "#08519c",
                               hatch="////", lw=0.8, zorder=1, gid="pgoff"))
        if moved:
            d = pgoff - lo
            causes = Counter(c for c in df.loc[df["vma_start"] == start, "pgoff_cause"]
                             if isinstance(c, str))
            why = f", {causes.most_common(1)[0][0]}" if causes else ""
            ax.annotate(f"filed at vm_pgoff {pgoff:#x}: {'+' if d > 0 else '-'}{abs(d)} "
                        f"pages from vm_start>>{shift}{why}", (min(x0, px), r - 0.42),
                        ha="left", va="bottom", fontsize=7, color="#d62728", zorder=4,
                        gid="moved")
    n_orphan = int(df["vma_start"].isna().sum())
    labels = [f"VMA {s:#x}\n{(e - s) >> shift} pages" for s, e, _ in vmas]
    if n_orphan:
        orph = df[df["vma_start"].isna()]
        ax.scatter(to_x(orph["vpn"].astype(float)) + 0.5, [len(vmas)] * len(orph), marker="x",
                   c="#252525", s=12, gid="no_vma", zorder=3)
        labels.append(f"no VMA\n({n_orphan} items)")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.45, -0.6)
    ax.set_ylabel("VMAs")
    ax.legend(handles=[Patch(facecolor="#c6dbef", edgecolor="#08519c",
                             label="VMA [vm_start, vm_end): where it is"),
                       Patch(facecolor="none", edgecolor="#d62728", hatch="////",
                             label="[vm_pgoff, +pages): where the tree files it")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, title="address space",
              title_fontsize=7)


def address_axis(snap, pid: int, visits: int = 8, *, rules=None, field: str = "age",
                 fig=None) -> Figure:
    """The central picture: one process's rmap_items on one shared address
    axis (subplots with ``sharex``), from
    :func:`ksmlens.analysis.core.address_axis_frame`:

    1. the address-space map: each VMA's ``[vm_start, vm_end)`` and, hatched,
       the ``[vm_pgoff, +pages)`` it is filed under (apart after ``mremap()``);
    2. one row per rmap walk rule (``stock`` [0, ULONG_MAX], ``v3``
       [address >> PAGE_SHIFT], ``stored`` [the stored index] where the
       kernel has one; ``rules`` picks): each item found / missed / not stable;
       the booted kernel's own rule is marked;
    3. SmartScan: ``age`` and ``remaining_skips`` per item (grey where
       ``should_skip_rmap_item()`` does not read them: a KSM page; red
       where it reads them from the stored pgoff's bytes);
    4. the next ``visits`` visits: processed / skipped / freed.

    ``snap`` may also be a timeline (a list of snapshots or a
    :class:`~ksmlens.experiments.watch.Timeline`): then this is
    :func:`address_axis_timeline` (``field`` its colour). The x axis is
    ``address >> PAGE_SHIFT`` with the gaps between ranges cut short.
    Artists: scatter gids ``"rule:<rule>:<status>"``, ``"age:<kind>"``,
    ``"skips:<kind>"``, ``"visit:<k>:<kind>"``; VMA Rectangles ``"vma"`` /
    ``"pgoff"``. Returns the Figure (``fig``: draw into this empty one).
    """
    if not isinstance(snap, Snapshot):
        return address_axis_timeline(snap, pid, field=field, visits=visits, rules=rules,
                                     fig=fig)
    from ksmlens.analysis.core import address_axis_frame
    df = address_axis_frame(snap, pid, visits)
    a = df.attrs
    shift = a["page_shift"]
    rules = list(rules or [r for r in RULES if r != "stored" or a["has_stored_pgoff"]])
    to_x, segs, vmas = _axis_space([df], shift)
    width = segs[-1][2] + segs[-1][1] - segs[-1][0]
    nmap = len(vmas) + int(df["vma_start"].isna().any())
    heights = [0.55 + 0.5 * nmap, 0.35 + 0.3 * len(rules), 1.9, 0.35 + 0.16 * visits]
    if fig is None:
        fig = _NotebookFigure(figsize=(12, 1.3 + sum(heights)), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": heights})
    xs = to_x(df["vpn"].astype(float).to_numpy()) + 0.5
    s = _marker_size(width)
    df = df.assign(smartscan_on=a["smartscan_on"])

    _draw_vmas(axes[0], vmas, to_x, shift, df)

    ax = axes[1]
    for k, r in enumerate(rules):
        col = df[f"rule_{r}"]
        for status, color in AXIS_RULE_COLORS.items():
            m = (col == status).to_numpy()
            if m.any():
                ax.scatter(xs[m], [k] * int(m.sum()), marker="s", s=s, c=color,
                           edgecolors="#525252", linewidths=0.3, zorder=3,
                           gid=f"rule:{r}:{status}")
    counts = {r: Counter(df[f"rule_{r}"]) for r in rules}
    ax.set_yticks(range(len(rules)), [
        f"{r}{' (this kernel)' if r == a['walk_rule'] else ''}\n"
        f"{counts[r].get('missed', 0)} missed" for r in rules], fontsize=7)
    for k, r in enumerate(rules):
        if r == a["walk_rule"]:
            ax.get_yticklabels()[k].set_fontweight("bold")
    ax.set_ylim(len(rules) - 0.5, -0.5)
    ax.set_ylabel("walk rule")
    tot = Counter(st for r in rules for st in df[f"rule_{r}"])
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#525252",
                             label=f"{st.replace('_', ' ')} ({tot.get(st, 0)})")
                       for st, c in AXIS_RULE_COLORS.items() if tot.get(st)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7,
              title="own mapping, per rule", title_fontsize=7)

    ax = axes[2]
    kinds = np.array([_age_kind(r) for r in df.to_dict("records")])
    age = df["age"].to_numpy(dtype=float)
    skips = df["remaining_skips"].to_numpy(dtype=float)
    for kind, (color, _) in AXIS_AGE_KINDS.items():
        m = kinds == kind
        if m.any():
            ax.scatter(xs[m], age[m], marker="o", s=max(6.0, s * 0.6), c=color,
                       edgecolors="black", linewidths=0.2, zorder=3, gid=f"age:{kind}")
            ax.scatter(xs[m], skips[m], marker="v", s=max(6.0, s * 0.6), c="white",
                       edgecolors=color, linewidths=0.8, zorder=4, gid=f"skips:{kind}")
    hi = max(3.0, float(np.nanmax(np.concatenate([age, skips]))) if len(age) else 3.0)
    ax.axhline(2.5, color="#9ecae1", lw=0.6, ls="--", zorder=1)
    ax.set_ylim(-0.8, hi * 1.12 + 0.5)
    ax.set_ylabel("SmartScan\nage / skips", fontsize=8)
    kc = Counter(kinds)
    ax.legend(handles=[Line2D([], [], ls="", marker="o", color=AXIS_AGE_KINDS[k][0],
                              label=f"age: {AXIS_AGE_KINDS[k][1]} ({kc[k]})")
                       for k in AXIS_AGE_KINDS if kc.get(k)]
              + [Line2D([], [], ls="", marker="v", mfc="white", color="black",
                        label="remaining_skips"),
                 Line2D([], [], ls="--", color="#9ecae1", label="age 3: skipping may start")],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, title="SmartScan state",
              title_fontsize=7)

    ax = axes[3]
    vc = Counter()
    for k in range(visits):
        col = df[f"visit_{k + 1}"]
        for kind, color in AXIS_VISIT_COLORS.items():
            m = (col == kind).to_numpy()
            if m.any():
                vc[kind] += int(m.sum())
                ax.scatter(xs[m], [k + 1] * int(m.sum()), marker="s", s=s * 0.8, c=color,
                           linewidths=0, zorder=3, gid=f"visit:{k + 1}:{kind}")
    ax.set_ylim(visits + 0.6, 0.4)
    ax.set_yticks(range(1, visits + 1), [str(k) for k in range(1, visits + 1)], fontsize=6)
    ax.set_ylabel("next visits", fontsize=8)
    ax.legend(handles=[Patch(facecolor=c, label=f"{kind} ({vc.get(kind, 0)})")
                       for kind, c in AXIS_VISIT_COLORS.items()],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7,
              title=f"ksmd's next {visits} visits", title_fontsize=7)

    _axis_ticks(axes, segs, f"virtual page number (address >> {shift}); the hatched bars "
                "are pgoffs on the same scale; gaps cut short")
    kr = a["walk_rule"]
    miss = counts.get(kr, Counter()).get("missed", 0) if kr in counts else None
    moved = int((df["vma_shift"].fillna(0) != 0).sum())
    nxt = Counter(df["next"])
    axes[0].set_title(
        f"{_proc_label(pid, a['comm'])}: {len(df)} rmap_items in {len(vmas)} VMA(s), "
        f"{moved} in VMAs not at their vm_pgoff - kernel {a['variant'] or a['release']}"
        + (f" (walks {kr}: {miss} missed)" if miss is not None else "")
        + f"\nnext visit: {nxt.get('processed', 0)} processed, {nxt.get('skipped', 0)} "
        f"skipped, {nxt.get('freed', 0)} freed (full_scans={a['full_scans']}"
        + ("" if a["smartscan_on"] else ", SmartScan off") + ")", fontsize=10)
    return fig


def address_axis_timeline(frames, pid: int, field: str = "age", visits: int = 8, *,
                          rules=None, fig=None) -> Figure:
    """The address-axis picture along a timeline (``watch`` frames: a list of
    snapshots or a :class:`~ksmlens.experiments.watch.Timeline`), from
    :func:`ksmlens.analysis.core.address_axis_frames`: on one shared axis of
    ``address >> PAGE_SHIFT``, the VMAs (of every frame), then one row per
    frame for the booted kernel's walk rule (found / missed / not stable),
    for SmartScan's ``field`` (``age`` or ``remaining_skips``, a colour;
    grey: not read, the page is KSM) and for what ksmd's next visit does.
    Scatter gids ``"tl-rule:<status>"``, ``"tl-<field>"``,
    ``"tl-<field>:ksm"``, ``"tl-visit:<kind>"``. Returns the Figure."""
    from ksmlens.analysis.core import address_axis_frames
    if field not in _SMART_FIELDS:
        raise KsmlensError(f"field {field!r} is not a SmartScan field",
                           f"use one of {', '.join(_SMART_FIELDS)}")
    df = address_axis_frames(frames, pid, visits)
    a = df.attrs
    shift, nf = a["page_shift"], a["frames"]
    rule = (list(rules)[0] if rules else None) or a["walk_rule"] or "v3"
    to_x, segs, vmas = _axis_space([df], shift)
    width = segs[-1][2] + segs[-1][1] - segs[-1][0]
    nmap = len(vmas) + int(df["vma_start"].isna().any())
    h = 0.3 + 0.22 * nf
    heights = [0.55 + 0.5 * nmap, h, h + 0.3, h]
    if fig is None:
        fig = _NotebookFigure(figsize=(12, 1.4 + sum(heights)), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": heights})
    xs = to_x(df["vpn"].astype(float).to_numpy()) + 0.5
    ys = df["frame"].to_numpy()
    s = _marker_size(width)
    df = df.assign(smartscan_on=a["smartscan_on"])
    _draw_vmas(axes[0], vmas, to_x, shift, df)
    fl = {}
    for f, fs in zip(df["frame"], df["full_scans"]):
        fl[int(f)] = f"#{int(f)} scans {fs}"
    ylabels = [fl.get(k, f"#{k} (none)") for k in range(nf)]

    def rows(ax, label):
        ax.set_yticks(range(nf), ylabels, fontsize=6)
        ax.set_ylim(nf - 0.5, -0.5)
        ax.set_ylabel(label, fontsize=8)

    ax = axes[1]
    col = df[f"rule_{rule}"]
    for status, color in AXIS_RULE_COLORS.items():
        m = (col == status).to_numpy()
        if m.any():
            ax.scatter(xs[m], ys[m], marker="s", s=s, c=color, edgecolors="#525252",
                       linewidths=0.3, zorder=3, gid=f"tl-rule:{status}")
    rows(ax, f"{rule} walk\n(frame)")
    c = Counter(col)
    ax.legend(handles=[Patch(facecolor=cl, edgecolor="#525252",
                             label=f"{st.replace('_', ' ')} ({c.get(st, 0)})")
                       for st, cl in AXIS_RULE_COLORS.items() if c.get(st)],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7,
              title=f"rule {rule}" + (" (this kernel)" if rule == a["walk_rule"] else ""),
              title_fontsize=7)

    ax = axes[2]
    kinds = np.array([_age_kind(r) for r in df.to_dict("records")])
    val = df[field].to_numpy(dtype=float)
    read = np.isin(kinds, ("read", "pgoff"))
    vmax = max(1.0, float(val[read].max()) if read.any() else 1.0)
    if read.any():
        sc = ax.scatter(xs[read], ys[read], marker="s", s=s, c=val[read], cmap="viridis",
                        vmin=0, vmax=vmax, linewidths=0, zorder=3, gid=f"tl-{field}")
        cax = ax.inset_axes([1.012, 0.0, 0.012, 0.5])
        fig.colorbar(sc, cax=cax, label=field)
    if (~read).any():
        ax.scatter(xs[~read], ys[~read], marker="s", s=s, c=AXIS_AGE_KINDS["ksm"][0],
                   linewidths=0, zorder=3, gid=f"tl-{field}:ksm")
    rows(ax, f"SmartScan {field}\n(frame)")
    ax.legend(handles=[Patch(facecolor=AXIS_AGE_KINDS["ksm"][0],
                             label=f"not read: KSM page / freed ({int((~read).sum())})"),
                       Patch(facecolor=matplotlib.colormaps["viridis"](0.7),
                             label=f"{field} SmartScan reads ({int(read.sum())})")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)

    ax = axes[3]
    vc = Counter(df["next"])
    for kind, color in AXIS_VISIT_COLORS.items():
        m = (df["next"] == kind).to_numpy()
        if m.any():
            ax.scatter(xs[m], ys[m], marker="s", s=s * 0.8, c=color, linewidths=0, zorder=3,
                       gid=f"tl-visit:{kind}")
    rows(ax, "next visit\n(frame)")
    ax.legend(handles=[Patch(facecolor=cl, label=f"{k} ({vc.get(k, 0)})")
                       for k, cl in AXIS_VISIT_COLORS.items()],
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7,
              title="ksmd's next visit", title_fontsize=7)
    _axis_ticks(axes, segs, f"virtual page number (address >> {shift}); gaps cut short")
    fs = [v for v in df["full_scans"] if v is not None]
    axes[0].set_title(
        f"{_proc_label(pid, a['comm'])} over {nf} snapshots (full_scans "
        f"{min(fs) if fs else '?'}..{max(fs) if fs else '?'}): rmap walk rule {rule}, "
        f"SmartScan {field}, next visit - kernel {a['variant'] or a['release']}", fontsize=10)
    return fig


# ------------------------------------------------------------------ chains over time

_NEW_DUP_COLOR = "#8c564b"


def chain_growth(frames, ax=None, regular: bool = True, max_labels: int = 16) -> Figure:
    """Stable node chains and their dups growing, frame by frame (a timeline
    of snapshots, e.g. :func:`ksmlens.experiments.watch.watch_batches` while
    ksmd merges the ``chain`` scenario).

    Top: per frame, one bar per KSM-page node (every dup, and with
    ``regular`` every regular node), as high as its ``rmap_hlist_len`` (the
    rmap_items on it), against the ``max_page_sharing`` line; a dup new in
    that frame is drawn darker. Bars are Rectangles with gid
    ``"node:<frame>:<kind>"`` (kind ``regular``, ``dup`` or ``newdup``).
    Bottom: per frame the walk's counts of chains, dups, full dups and
    regular nodes (Line2D gids ``"count:<column>"``), and where the frames
    carry them, the kernel's ``stable_node_chains`` / ``stable_node_dups``
    read just after each walk (gids ``"sysfs:<counter>"``).

    Data: :func:`ksmlens.analysis.chains.chain_nodes_frame` and
    :func:`~ksmlens.analysis.chains.chain_counts_frame` (live or saved
    snapshots). Past a few dozen nodes a frame's bars lose their edges and
    form one filled profile; at most ``max_labels`` frames are labelled.
    ``ax``: a pair of Axes (top, bottom), or None for a new Figure.
    Returns the Figure. :class:`KsmlensError` for no frames.
    """
    from ksmlens.analysis.chains import chain_counts_frame, chain_nodes_frame
    frames = list(frames)
    nodes = chain_nodes_frame(frames, regular=regular)
    counts = chain_counts_frame(frames)
    n = len(frames)
    if ax is None:
        fig = _NotebookFigure(figsize=(max(8.0, min(16.0, 4.0 + 0.55 * n)), 7.5),
                              layout="constrained")
        top, bot = fig.subplots(2, 1, height_ratios=[3, 2])
    else:
        try:
            top, bot = ax
        except (TypeError, ValueError):
            raise KsmlensError("chain_growth draws two panels", "pass ax=(top, bottom) "
                               "or ax=None") from None
        fig = top.figure

    per_frame = nodes.groupby("frame").size()
    nmax = int(per_frame.max()) if len(per_frame) else 1
    width = 0.84 / max(1, nmax)
    edge = 0.3 if nmax <= 40 else 0.0
    colors = {"regular": _KIND_COLORS["regular"], "dup": _KIND_COLORS["dup"],
              "newdup": _NEW_DUP_COLOR}
    for k, grp in nodes.sort_values(["frame", "order"]).groupby("frame"):
        x0 = k - width * len(grp) / 2          # a frame's bars centred on its tick
        for i, r in enumerate(grp.itertuples(index=False)):
            kind = "newdup" if r.kind == "dup" and r.new and k > 0 else r.kind
            top.add_patch(Rectangle((x0 + i * width, 0), width, r.rmap_hlist_len,
                                    facecolor=colors[kind], edgecolor="black", lw=edge,
                                    gid=f"node:{k}:{kind}"))
    mps = counts["max_page_sharing"]
    if mps.notna().any():
        top.hlines(mps.fillna(0).to_numpy(dtype=float), np.arange(n) - 0.48,
                   np.arange(n) + 0.48, colors="#d62728", linestyles="--", lw=1.2,
                   gid="max_page_sharing")
    hi = max([1] + nodes["rmap_hlist_len"].tolist() + mps.dropna().astype(int).tolist())
    top.set_xlim(-0.6, n - 0.4)
    top.set_ylim(0, hi * 1.18)
    step = max(1, -(-n // max_labels))
    ticks = list(range(0, n, step))

    scanned = counts["pages_scanned"]

    def ticklabels():
        if scanned.isna().any():
            return [f"{k}\nscan {frames[k].counters.get('full_scans', '?')}" for k in ticks]
        return [f"{k}\n+{int(scanned[k] - scanned[0])}" for k in ticks]
    from matplotlib.ticker import MaxNLocator
    for a in (top, bot):
        a.set_xticks(ticks, ticklabels(), fontsize=8)
        a.set_xlabel("frame (below: " + ("full_scans" if scanned.isna().any() else
                                         "pages ksmd scanned since frame 0") + ")")
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel("rmap_items per KSM page\n(rmap_hlist_len)")
    last_mps = mps.dropna().iloc[-1] if mps.notna().any() else None
    handles: list[Artist] = [Patch(facecolor=colors["dup"], edgecolor="black", label="dup of a chain"),
               Patch(facecolor=colors["newdup"], edgecolor="black",
                     label="dup new in this frame")]
    if regular:
        handles.insert(0, Patch(facecolor=colors["regular"], edgecolor="black",
                                label="regular stable node"))
    if last_mps is not None:
        handles.append(Line2D([], [], color="#d62728", ls="--",
                              label=f"max_page_sharing = {int(last_mps)}"))
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    last = counts.iloc[-1]
    k = frames[-1].kernel
    shown = int(last_mps) if last_mps is not None else "?"
    top.set_title(f"A chain growing: {int(last['chains'])} chain(s) with {int(last['dups'])} "
                  f"dups after {n} frames (max_page_sharing={shown}) - kernel "
                  f"{k.variant or k.release}", fontsize=10)

    x = counts["frame"].to_numpy()
    styles = [("chains", "stable node chains", _KIND_COLORS["chain"], "-"),
              ("dups", "dups", "#b8860b", "-"),
              ("full_dups", "dups at max_page_sharing", "#d62728", ":"),
              ("regular", "regular nodes", _KIND_COLORS["regular"], "-")]
    for col, label, color, ls in styles:
        if col == "regular" and not regular:
            continue
        bot.step(x, counts[col].to_numpy(), where="mid", color=color, ls=ls, lw=1.6,
                 label=f"{label} (walk)", gid=f"count:{col}")
    for key, color, marker in (("stable_node_chains", _KIND_COLORS["chain"], "x"),
                               ("stable_node_dups", "#b8860b", "+")):
        col = f"sysfs_after_{key}"
        if col in counts:
            ok = counts[col].notna()
            bot.plot(x[ok], counts.loc[ok, col].to_numpy(dtype=float), ls="", marker=marker,
                     ms=9, color=color, label=f"sysfs {key}", gid=f"sysfs:{key}")
    bot.set_xlim(-0.6, n - 0.4)
    bot.set_ylim(bottom=0)
    bot.set_ylabel("stable nodes")
    bot.set_title("counts per frame: the walk (lines) and the kernel's sysfs (marks)",
                  fontsize=9)
    bot.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


# ------------------------------------------------------------------ the union, drawn

_UNION_COLORS = {"oldchecksum": "#9ecae1", "age": "#fdae6b", "remaining_skips": "#a1d99b",
                 "other": "#e0e0e0"}
_UNION_FIELDS = ("oldchecksum", "age", "remaining_skips")
_STATE_WORDS = {"stable": "STABLE", "unstable": "UNSTABLE", "none": "in neither tree"}


def _union_fields(layout: dict) -> list[str]:
    """Per byte of the word (0..7): the SmartScan field it belongs to, or "other"."""
    out = ["other"] * 8
    for k in range(4):
        out[layout["oldchecksum"] + k] = "oldchecksum"
    out[layout["age"]] = "age"
    out[layout["remaining_skips"]] = "remaining_skips"
    return out


def _union_cell(ax, row, others) -> None:
    """One rmap_item's 8 union bytes at one moment, into ``ax``: the cells
    with hex values, the index reading above, the SmartScan readings below."""
    fields = _union_fields(row["layout"])
    reads = bool(row["next_reads_smartscan"])
    hazard = bool(row["next_reads_pgoff"])
    holds_index = row["holds"] == "index"
    tag = f"{row['panel']}:{row['moment']}"
    for k, (b, f) in enumerate(zip(row["bytes"], fields)):
        read_here = reads and f in ("age", "remaining_skips")
        ax.add_patch(Rectangle((k, 1.5), 1, 1, facecolor=_UNION_COLORS[f],
                               edgecolor="#d62728" if read_here else "white",
                               lw=2.5 if read_here else 1.5,
                               hatch="//" if read_here and hazard else None,
                               gid=f"byte:{tag}:{k}"))
        ax.text(k + 0.5, 2.0, f"{b:02x}", ha="center", va="center", fontsize=11,
                family="monospace", gid=f"hex:{tag}:{k}")
    # above: the whole word as the stored index
    member = row["index_member"] or "stored index"
    if row["index"] is None:
        top = "no stored index on this kernel"
    elif holds_index:
        top = f"{member} = {row['index']:#x}  (STABLE: rmap_walk_ksm() searches it)"
        if row["linear_page_index"] is not None and row["linear_page_index"] != row["index"]:
            top += f"\n!= linear_page_index {row['linear_page_index']:#x}"
    elif row["left_stable"] and row["index"] == row["oldchecksum"]:
        top = (f"as {member}: {row['index']:#x} = oldchecksum alone: left the stable tree\n"
               "with the index reset to 0, then ksmd stored the page's checksum")
    else:
        top = (f"as {member}: {row['index']:#x}  (not an index now: the item is "
               f"{_STATE_WORDS.get(row['state'], row['state'])})")
    ax.plot([0.05, 0.05, 7.95, 7.95], [2.65, 2.8, 2.8, 2.65], color="#6a3d9a",
            lw=2.0 if holds_index else 1.0)
    ax.text(4, 2.9, top, ha="center", va="bottom", fontsize=9,
            color="#6a3d9a" if holds_index else "#777777",
            weight="bold" if holds_index else "normal", gid=f"reading:{tag}:index")
    # below: the same bytes through {oldchecksum, age, remaining_skips}
    spans = {f: [k for k, g in enumerate(fields) if g == f] for f in _UNION_FIELDS}
    vals = {"oldchecksum": f"{row['oldchecksum']:#x}", "age": str(row["age"]),
            "remaining_skips": str(row["remaining_skips"])}
    names = {"oldchecksum": "oldchecksum", "age": "age", "remaining_skips": "skips"}
    live = not holds_index or reads
    for f in _UNION_FIELDS:
        lo, hi = min(spans[f]), max(spans[f]) + 1
        ax.plot([lo + 0.08, lo + 0.08, hi - 0.08, hi - 0.08], [1.35, 1.2, 1.2, 1.35],
                color="#444444", lw=1.0)
        ax.text((lo + hi) / 2, 1.1, f"{names[f]}\n{vals[f]}", ha="center", va="top",
                fontsize=9, color="#d62728" if reads and f != "oldchecksum" else
                ("#222222" if live else "#999999"), gid=f"reading:{tag}:{f}")
    if holds_index:
        note = ("ksmd's next visit reads age/skips\nfrom the stored index's bytes" if hazard
                else "SmartScan leaves this STABLE\nitem alone (not read)" if not reads
                else "")
    else:
        note = "ksmd's next visit reads age/skips" if reads else "not read at the next visit"
    ax.text(8.15, 2.0, note, ha="left", va="center", fontsize=8,
            color="#d62728" if reads else "#555555", gid=f"note:{tag}")
    if others:
        ax.text(8.15, 0.45, others, ha="left", va="center", fontsize=7, color="#555555",
                gid=f"others:{tag}")


def union_bytes(data, *, address: int | None = None, fig=None) -> Figure:
    """The union, drawn: the 8 bytes of one ``struct ksm_rmap_item`` that the
    stored index shares with ``oldchecksum`` / ``age`` / ``remaining_skips``,
    read both ways, at each moment (rows, e.g. before and after ksmd's
    visit) on each kernel (columns, e.g. ``union`` beside ``v8``).

    ``data``: a DataFrame of :func:`ksmlens.analysis.union.union_bytes_frame`
    (several kernels: concatenated, or a list of frames). Per panel the
    item at ``address`` is drawn (default: the first item of the first
    moment, by pid and address); the other items of the frame are
    summarised at the right (their age/skips). Each cell is one byte, in
    memory order, labelled with its offset in the struct (from DWARF) and
    its hex value; above, the word read as the stored index (bold when
    the item is STABLE: the kernel's reading); below, read as
    ``oldchecksum`` / ``age`` / ``remaining_skips``. A red edge marks the
    bytes ksmd's next visit reads in ``should_skip_rmap_item()``, hatched
    when they are the stored index's (xu.xin's objection). Artists: byte
    Rectangles ``gid="byte:<panel>:<moment>:<k>"``, their Texts
    ``"hex:..."``, readings ``"reading:<panel>:<moment>:<index|oldchecksum|
    age|remaining_skips>"``. Raises :class:`KsmlensError` when there is
    nothing to draw or ``address`` is not in a panel. Returns the Figure.
    """
    import pandas as pd
    if isinstance(data, (list, tuple)):
        data = pd.concat(list(data), ignore_index=True) if data else pd.DataFrame()
    if data is None or len(data) == 0:
        raise KsmlensError("union_bytes: no rmap_items to draw",
                           "pass union_bytes_frame(...) of snapshots with STABLE items on "
                           "COW-broken pages (the smartscan scenario's cow-break step)")
    panels = list(dict.fromkeys(data["panel"]))
    moments = list(dict.fromkeys(data.sort_values("moment_index", kind="stable")["moment"]))
    if fig is None:
        fig = _NotebookFigure(figsize=(7.4 * len(panels), 2.5 * len(moments) + 1.4),
                              layout="constrained")
    axes = fig.subplots(len(moments), len(panels), squeeze=False)
    offsets = set()
    for c, p in enumerate(panels):
        d = data[data["panel"] == p]
        first = d[d["moment_index"] == d["moment_index"].min()].sort_values(["pid", "address"])
        if address is not None:
            if not (d["address"] == address).any():
                raise KsmlensError(f"union_bytes: no rmap_item at {address:#x} in panel {p!r}",
                                   "pick an address of the frame (its 'address' column)")
            key = d[d["address"] == address].iloc[0]
        else:
            key = first.iloc[0]
        for r, m in enumerate(moments):
            ax = axes[r][c]
            dm = d[d["moment"] == m]
            one = dm[(dm["mm"] == key["mm"]) & (dm["address"] == key["address"])]
            ax.set_xlim(0, 8)
            ax.set_ylim(0, 3.9)
            ax.set_yticks([])
            for s in ("top", "right", "left"):
                ax.spines[s].set_visible(False)
            if one.empty:
                ax.text(4, 2, f"no rmap_item at {key['address']:#x} ({m})", ha="center",
                        va="center", fontsize=10, color="#777777")
                ax.set_xticks([])
                ax.set_ylabel(m)
                ax.set_xlabel("(no bytes)")
                continue
            row = one.iloc[0]
            if len(dm) > 1:
                cnt = Counter(zip(dm["age"], dm["remaining_skips"]))
                others = (f"all {len(dm)} items here, age,skips: " + ", ".join(
                    f"{a},{s} x{n}" for (a, s), n in sorted(cnt.items())[:4])
                    + (" ..." if len(cnt) > 4 else ""))
            else:
                others = ""
            _union_cell(ax, row, others)
            off = row["offset"]
            offsets.add(off)
            ax.set_xticks([k + 0.5 for k in range(8)],
                          [str(off + k) if off is not None else f"+{k}" for k in range(8)])
            ax.set_xlabel("byte offset in struct ksm_rmap_item (memory order, little-endian)",
                          fontsize=8)
            vis = "" if r == 0 else f"\n{row['visits']} visit{'' if int(row['visits']) == 1 else 's'} later"
            ax.set_ylabel(f"{m}\n{_STATE_WORDS.get(row['state'], row['state'])}\n"
                          f"full_scans {row['full_scans']}"
                          f"{vis}", fontsize=9)
            ax.set_title(f"{p}: pid {row['pid']} address {row['address']:#x}", fontsize=10)
    handles = [Patch(facecolor=_UNION_COLORS[f], label=f"{f} byte(s)") for f in _UNION_FIELDS]
    handles += [Patch(facecolor=_UNION_COLORS["other"], label="the index's upper bytes only"),
                Line2D([], [], color="#6a3d9a", lw=2,
                       label="read as the stored index (bold: the item is STABLE)"),
                Patch(facecolor="white", edgecolor="#d62728", lw=2,
                      label="ksmd's next visit reads it (should_skip_rmap_item)"),
                Patch(facecolor="white", edgecolor="#d62728", hatch="//", lw=2,
                      label="... out of the stored index (xu.xin's objection)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8)
    span = (f"bytes {min(offsets)}..{min(offsets) + 7}" if len(offsets) == 1
            and None not in offsets else "the union's 8 bytes")
    fig.suptitle(f"struct ksm_rmap_item {span}: the stored index and SmartScan's "
                 f"oldchecksum/age/remaining_skips share them ({' | '.join(panels)})",
                 fontsize=11)
    return fig
