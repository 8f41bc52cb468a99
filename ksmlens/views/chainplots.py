"""Stable-node chains over time (:func:`chain_growth`): chains, dups and
regular nodes across saved frames. Re-exported by :mod:`ksmlens.views.plots`."""

from __future__ import annotations

import numpy as np
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ksmlens.errors import KsmlensError
from ksmlens.views.figure import KIND_COLORS as _KIND_COLORS, NotebookFigure

__all__ = ["chain_growth"]

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
        fig = NotebookFigure(figsize=(max(8.0, min(16.0, 4.0 + 0.55 * n)), 7.5),
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
