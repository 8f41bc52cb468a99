"""Figures of ``rmap_walk_ksm()``'s cost (:mod:`ksmlens.analysis.cost`).

Both draw plain data: :func:`page_cost` a :func:`~ksmlens.analysis.cost.walk_cost`
frame (a live walk or a saved snapshot), :func:`cost_vs_vmas` a
:func:`~ksmlens.experiments.cost.cost_sweep` frame. Each returns the
:class:`matplotlib.figure.Figure` it drew on; data artists carry a ``gid``
(``"predicted:<rule>"`` lines, ``"measured:<rule>"`` points, ``"pages:<rule>"``
bars).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ksmlens.errors import KsmlensError
from ksmlens.views.figure import NotebookFigure

__all__ = ["RULE_COLORS", "cost_vs_vmas", "page_cost"]

RULE_COLORS = {"stock": "#d62728", "v3": "#1f77b4", "stored": "#2ca02c"}


def cost_vs_vmas(sweep: pd.DataFrame, walk: str = "remove_migration_ptes") -> Figure:
    """VMAs the interval tree yields per walk against N (left), predicted
    per rule (lines) and counted by the kernel for its own rule (points);
    the longest walk in ms (right, with the probes on). Log scales."""
    d = sweep[sweep["walk"] == walk]
    if not len(d):
        raise KsmlensError(f"the sweep has no {walk} walks",
                           f"walks in it: {', '.join(map(str, sweep['walk'].unique()))}")
    fig = NotebookFigure(figsize=(11, 4.2), layout="constrained")
    a, b = fig.subplots(1, 2)
    for rule, g in d.groupby("rule", observed=True):
        c = RULE_COLORS.get(str(rule), "k")
        # the prediction depends on the state, not on the kernel: one line per rule
        line = g.groupby("vmas")["predicted"].first()
        a.plot(line.index, line.values, "--" if rule == "stored" else "-", color=c,
               label=f"{rule}: predicted", gid=f"predicted:{rule}")
        m = g[g["measured"].notna()].sort_values("vmas")
        if len(m):
            kernels = ", ".join(map(str, m["variant"].unique()))
            a.plot(m["vmas"], m["measured"], "o", color=c, ms=8, mfc="none", mew=2,
                   label=f"{rule}: counted by {kernels}", gid=f"measured:{rule}")
            b.plot(m["vmas"], m["max_ms"], "o-", color=c, label=f"{rule} ({kernels})",
                   gid=f"duration:{rule}")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("VMAs in the anon_vma (N)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    a.set_ylabel(f"VMAs yielded per {walk} walk")
    a.set_title("rmap_walk_ksm(): interval-tree iterations")
    b.set_ylabel("longest walk, ms (kprobes on)")
    b.set_title("the walk's duration, measured")
    return fig


def page_cost(cost: pd.DataFrame, walk: str = "full", top: int = 30) -> Figure:
    """Where the cost sits: per KSM page (the ``top`` worst), the VMAs its
    ``walk`` yields under each rule, side by side (log scale)."""
    d = cost[cost["walk"] == walk]
    if not len(d):
        raise KsmlensError(f"no {walk} walks in this cost frame",
                           "walk_cost(snap, kinds=(...)) with that walk's kind")
    t = d.pivot_table(index="kpfn", columns="rule", values="returned", aggfunc="sum",
                      observed=True)
    t = t.loc[t.max(axis=1).sort_values(ascending=False).index[:top]]
    fig = NotebookFigure(figsize=(max(7, 0.35 * len(t) + 3), 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(t))
    w = 0.8 / max(1, len(t.columns))
    for k, rule in enumerate(t.columns):
        ax.bar(x + k * w, t[rule].clip(lower=0.8), w, color=RULE_COLORS.get(str(rule), "k"),
               label=str(rule), gid=f"pages:{rule}")
    ax.set_yscale("log")
    ax.set_xticks(x + w * (len(t.columns) - 1) / 2, [str(v) for v in t.index], rotation=90,
                  fontsize=7)
    ax.set_xlabel("KSM page (kpfn)")
    ax.set_ylabel(f"VMAs yielded per {walk} walk")
    ax.set_title("the pages that would hold the anon_vma lock longest, per rule")
    ax.legend()
    return fig
