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

from collections import Counter, defaultdict
from typing import NamedTuple

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ksmlens.errors import KsmlensError
from ksmlens.lens.model import Snapshot, column_values, mapping_dicts, positions
from ksmlens.views.figure import KIND_COLORS as _KIND_COLORS, SMART_FIELDS as _SMART_FIELDS
from ksmlens.views.figure import NotebookFigure, new_axes as _axes, proc_label as _proc_label, \
    page_segments as _segments

from ksmlens.analysis.core import RULES, item_status, smartscan_visit, skip_age
# the other figures, one module each, named here too (plots.address_axis ...)
from ksmlens.views.axisplots import (AXIS_AGE_KINDS, AXIS_RULE_COLORS,  # noqa: F401
                                     AXIS_VISIT_COLORS, address_axis, address_axis_timeline)
from ksmlens.views.chainplots import chain_growth
from ksmlens.views.treeplots import stable_tree
from ksmlens.views.unionplots import union_bytes

__all__ = ["STATUS_COLORS", "STATE_MARKERS", "address_space", "stable_tree",
           "smartscan_heatmap", "skip_schedule", "walk_replay", "verify_outcome",
           "matrix_figure", "address_axis", "address_axis_timeline", "chain_growth",
           "union_bytes"]

ZERO_COLOR = "#17becf"   # a KSM zero page (the zero pfn, dirty)
STATUS_COLORS = {"ok": "#2ca02c", "moved": "#d62728", "no_vma": "#7f7f7f",
                 "stored_unset": "#9467bd", "stored_stale": "#ff7f0e"}
STATE_MARKERS = {"stable": "o", "unstable": "^", "none": "x"}


# ------------------------------------------------------------------ helpers



def _get(obj, name):
    if isinstance(obj, dict):
        return obj[name]
    return getattr(obj, name)


# ------------------------------------------------------------------ address space

def _zero_pages_of(snap: Snapshot, pid: int) -> list[int]:
    """Addresses of the KSM zero pages in the mm slots ``pid`` uses (from
    the mm_slots table: no record per rmap_item)."""
    out: list[int] = []
    sl = snap.mm_slots
    for pids, p, z in zip(column_values(sl, "pids"), column_values(sl, "pid"),
                          column_values(sl, "zero_pages")):
        pids = [int(x) for x in pids] if pids is not None and len(pids) else [p]
        if pid in pids and z is not None:
            out += [int(a) for a in z]
    return sorted(out)


def _item_statuses(items) -> np.ndarray:
    """:func:`ksmlens.analysis.core.item_status` of every row of an
    rmap_items table, column-wise."""
    stored = items["stored_status"].astype(object).to_numpy()
    pg = items["pgoff_status"].astype(object).to_numpy()
    out = np.where(pd.isna(pg) | (pg == ""), "ok", pg).astype(object)
    bad = (stored == "stale") | (stored == "unset")
    out[bad] = np.array(["stored_" + str(x) for x in stored[bad]], dtype=object)
    return out


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
    it = snap.rmap_items
    items = it[(it["pid"] == pid).fillna(False).to_numpy(dtype=bool)]
    zero = [] if vma is not None else _zero_pages_of(snap, pid)
    if not len(items) and not zero:
        have = sorted(int(p) for p in it["pid"].dropna().unique())
        raise KsmlensError(f"pid {pid} has no rmap_items in this snapshot",
                           f"pids with rmap_items: {have or 'none'}")
    if vma is not None:
        items = items[(items["vma_start"] == vma).fillna(False).to_numpy(dtype=bool)]
        if not len(items):
            raise KsmlensError(f"pid {pid} has no rmap_items in a VMA at {vma:#x}",
                               "pick a vma_start of one of its rmap_items")
    comm = next(iter(items["comm"].dropna().tolist()[:1]), None)
    has_vma = items["vma_start"].notna().to_numpy(dtype=bool)
    vk = items.loc[has_vma, ["vma_start", "vma_end", "vm_pgoff"]].drop_duplicates()
    vmas = sorted(tuple(int(x) for x in t) for t in vk.itertuples(index=False))
    addr = items["address"].to_numpy(dtype=np.uint64)
    orphans = addr[~has_vma]
    rows: dict = {v: k for k, v in enumerate(vmas)}
    if orphans.size:
        rows[None] = len(vmas)
    if zero:            # KSM zero pages: no rmap_item, no stable node, only a PTE
        rows["zero"] = len(rows)
    # each item's row: its VMA's (vma_start, vma_end, vm_pgoff)
    row_of = np.full(len(items), rows.get(None, -1), np.int64)
    if vmas:
        key = pd.DataFrame(vmas, columns=["vma_start", "vma_end", "vm_pgoff"], dtype="UInt64")
        key["row"] = np.arange(len(vmas))
        mine = items.loc[has_vma, ["vma_start", "vma_end", "vm_pgoff"]].astype("UInt64")
        row_of[has_vma] = mine.merge(key, how="left")["row"].to_numpy(dtype=np.int64)
    status = _item_statuses(items)
    state = items["state"].astype(str).to_numpy(dtype=object)
    cause = items["pgoff_cause"].astype(object).to_numpy()
    file_ = items["vma_file"].fillna(False).to_numpy(dtype=bool)
    intervals = [(a >> shift, (a >> shift) + 1) for a in zero]
    for start, end, pgoff in vmas:
        npages = (end - start) >> shift
        intervals += [(start >> shift, end >> shift), (pgoff, pgoff + npages)]
    intervals += [(a >> shift, (a >> shift) + 1) for a in orphans.tolist()]
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
            mine = cause[row_of == rows[(start, end, pgoff)]]
            causes = Counter(c for c in mine.tolist() if c is not None and c == c and c)
            why = f"; cause: {causes.most_common(1)[0][0]}" if causes else ""
            ax.annotate(f"vm_pgoff {pgoff:#x} != vm_start>>{shift} {lo:#x} "
                        f"({'+' if d > 0 else '-'}{abs(d)} pages{why})",
                        (min(x0, px), r + 0.38), ha="left", va="center",
                        fontsize=8, color="#d62728", zorder=4)
    vpn = addr >> np.uint64(shift)
    for (st_, sa) in sorted(set(zip(status.tolist(), state.tolist()))):
        sel = (status == st_) & (state == sa)
        xs = to_x(vpn[sel].astype(np.int64)) + 0.5
        ys = row_of[sel]
        status_, state_ = st_, sa
        m = STATE_MARKERS.get(state_, "s")
        kw = {"edgecolors": "black", "linewidths": 0.3} if m != "x" else {"linewidths": 1.0}
        ax.scatter(xs, np.asarray(ys) - 0.1, c=STATUS_COLORS.get(status_, "black"),
                   marker=m, s=22, zorder=3, gid=f"items:{status_}:{state_}", **kw)
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
            tag = " file" if file_[row_of == r].any() else ""
            ylab.append(f"VMA {start:#x}\n{(end - start) >> shift} pages{tag}")
    ax.set_yticks(range(nrows), ylab, fontsize=8)
    last = segs[-1]
    ax.set_xlim(-1, last[2] + last[1] - last[0] + 1)
    ax.set_ylim(nrows - 0.45, -0.6)
    ax.set_xlabel(f"virtual page number (address >> {shift}; gaps cut short)")
    ax.set_ylabel("VMAs holding rmap_items")
    st = Counter(status.tolist())
    ss = Counter(state.tolist())
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


# ------------------------------------------------------------------ SmartScan



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


class _Shown(NamedTuple):
    id: str
    kpfn: int | None
    unmappable_under: list
    mappings: list


def _replay_nodes(snap: Snapshot, nodes, max_nodes: int) -> tuple[list, dict, int]:
    """The nodes :func:`walk_replay` draws, from the tables: every node with
    mappings (only ``nodes``, if given) ranked by misses (a mapped mapping a
    rule does not find), then rules that miss one, then kpfn; the first
    ``max_nodes`` with their mappings (the only records built). Returns
    ``(shown, {rule: misses over every candidate}, candidates)``."""
    m, sn = snap.mappings, snap.stable_nodes
    ns = len(sn)
    pos = positions(m["node"], sn["id"])
    mapped = m["mapped"].fillna(False).to_numpy(dtype=bool)
    missed = {r: mapped & (m[f"found_{r}"] == False).fillna(False).to_numpy(dtype=bool)  # noqa: E712
              for r in RULES}
    on = pos >= 0
    has = np.bincount(pos[on], minlength=ns) > 0
    if nodes is not None:
        has &= sn["id"].isin(list(nodes)).to_numpy(dtype=bool)
    misses = np.zeros(ns, np.int64)
    for r in RULES:
        misses += np.bincount(pos[on & missed[r]], minlength=ns)
    unm = sum(sn[f"unmappable_{r}"].to_numpy(dtype=bool).astype(np.int64) for r in RULES)
    kpfn = sn["kpfn"].fillna(0).to_numpy(dtype=np.int64)
    cand = np.flatnonzero(has)
    order = cand[np.lexsort((kpfn[cand], -unm[cand], -misses[cand]))][:max_nodes]
    in_cand = has[np.where(on, pos, 0)] & on
    miss = {r: int((missed[r] & in_cand).sum()) for r in RULES}
    rows = np.flatnonzero(np.isin(pos, order))
    dicts = mapping_dicts(m.iloc[rows])
    by: dict = {}
    for p, d in zip(pos[rows].tolist(), dicts):
        by.setdefault(p, []).append(d)
    ids, kp = column_values(sn, "id"), column_values(sn, "kpfn")
    shown = [_Shown(ids[k], kp[k], [r for r in RULES if sn[f"unmappable_{r}"].iat[k]],
                    by.get(k, [])) for k in order.tolist()]
    return shown, miss, int(cand.size)


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
    cand, miss, n_cand = _replay_nodes(snap, nodes, max_nodes)
    if not n_cand:
        raise KsmlensError("no stable node in this snapshot has walk-replay mappings",
                           "take the snapshot with a ksmlens that records "
                           "StableNode.mappings, after a scenario merged pages")
    shown = cand
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
    ax.set_title(f"walk replay, kernel {snap.kernel.variant or snap.kernel.release}: "
                 f"{len(shown)} of {n_cand} stable nodes, "
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
    one row per kernel (variant; ``ARCH variant`` where the matrix has more
    than one architecture), one column per (scenario, proof); each cell
    coloured by what the kernel did to the scenario's KSM pages (moved /
    reclaimed: green; pinned / stayed: red; mixed: orange), labelled with
    the pages that stayed and the walk rules the kernel behaved like; a
    cell whose prediction disagreed is hatched. Cells are Rectangles with
    gid ``"cell:<variant>:<scenario>:<by>"`` (``"cell:<arch>:<variant>:..."``
    off x86-64). Returns the Figure."""
    rows = m.kernels
    cols = [(s, b) for s in m.scenarios for b in m.bys      # hwpoison: mremap only
            if any(m.cell(v, s, b, a) is not None for a, v in rows)]
    if not cols or not rows:
        raise KsmlensError("the matrix has no cells", "run `ksmlens matrix` first")
    fig, ax = _axes(ax, (max(6.0, 1.9 * len(cols) + 2.5), 1.0 * len(rows) + 2.2))
    for i, (a, v) in enumerate(rows):
        gid = f"{v}" if a == "x86_64" else f"{a}:{v}"
        for j, (s, b) in enumerate(cols):
            c = m.cell(v, s, b, a)
            if c is None:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#f0f0f0",
                                       edgecolor="white", lw=2))
                continue
            kind = ("went" if c.outcome in ("moves", "reclaimed", "unmapped") else
                    "mixed" if c.outcome == "mixed" else "stayed")
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=_MATRIX_COLORS[kind],
                                   edgecolor="white", lw=2, hatch=None if c.agree else "xx",
                                   gid=f"cell:{gid}:{s}:{b}"))
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
    ax.set_yticks(range(len(rows)), [v if len(m.archs) == 1 else f"{a} {v}" for a, v in rows])
    ax.set_xlabel("scenario and the kernel's proof (move_pages / memory.reclaim / "
                  "MADV_HWPOISON)")
    ax.set_ylabel("kernel variant" if len(m.archs) == 1 else "kernel (architecture, variant)")
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
