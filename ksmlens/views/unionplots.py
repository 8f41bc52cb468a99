"""The union, drawn (:func:`union_bytes`): the bytes of ``struct
ksm_rmap_item``'s union as each member reads them. Re-exported by
:mod:`ksmlens.views.plots`."""

from __future__ import annotations

from collections import Counter

from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ksmlens.errors import KsmlensError
from ksmlens.views.figure import NotebookFigure

__all__ = ["union_bytes"]

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
        fig = NotebookFigure(figsize=(7.4 * len(panels), 2.5 * len(moments) + 1.4),
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
