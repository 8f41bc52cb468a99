"""The address axis: one process's address space as SmartScan and each
walk rule see it, one visit ahead (:func:`address_axis`), and over saved
frames (:func:`address_axis_timeline`). Re-exported by
:mod:`ksmlens.views.plots`; drawn from plain snapshot data."""

from __future__ import annotations

from collections import Counter

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ksmlens.analysis.core import RULES
from ksmlens.errors import KsmlensError
from ksmlens.lens.model import Snapshot
from ksmlens.views.figure import SMART_FIELDS as _SMART_FIELDS
from ksmlens.views.figure import NotebookFigure, page_segments as _segments, \
    proc_label as _proc_label

__all__ = ["address_axis", "address_axis_timeline", "AXIS_RULE_COLORS", "AXIS_VISIT_COLORS",
           "AXIS_AGE_KINDS"]

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
        fig = NotebookFigure(figsize=(12, 1.3 + sum(heights)), layout="constrained")
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
        fig = NotebookFigure(figsize=(12, 1.4 + sum(heights)), layout="constrained")
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
