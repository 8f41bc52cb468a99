"""What every ksmlens figure shares: a Figure that shows itself in a
notebook without pyplot, the new-or-given Axes, a process's label and the
compressed page-number axis. The figures are in :mod:`ksmlens.views.plots`
(snapshot views, the matrix), :mod:`~ksmlens.views.axisplots` (the address
axis), :mod:`~ksmlens.views.chainplots` (chains over time),
:mod:`~ksmlens.views.unionplots` (the union's bytes) and
:mod:`~ksmlens.views.costplots` (the walk's cost)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

__all__ = ["NotebookFigure", "new_axes", "proc_label", "page_segments", "KIND_COLORS",
           "SMART_FIELDS"]

# a stable node's kind (stable_tree, chain_growth), and a process
KIND_COLORS = {"regular": "#1f77b4", "chain": "#ff7f0e", "dup": "#e7ba52", "proc": "#2ca02c"}
# the SmartScan fields of struct ksm_rmap_item a view can show
SMART_FIELDS = ("age", "remaining_skips")


class _NotebookFigure(Figure):
    """A Figure made without pyplot (no global state, nothing to close)
    that still shows as a PNG when it is a notebook cell's value."""

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=90)
        return buf.getvalue()


NotebookFigure = _NotebookFigure


def new_axes(ax, size):
    """(fig, ax): ``ax`` as given, or a new Figure of ``size`` (no pyplot)."""
    if ax is not None:
        return ax.figure, ax
    fig = _NotebookFigure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def proc_label(pid, comm):
    return f"pid {pid}" + (f" {comm}" if comm else "") if pid is not None else "exited mm"


def page_segments(intervals, gap_frac=0.12):
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
