"""The union, byte by byte: the 8 bytes of one ``struct ksm_rmap_item`` that
the stored index shares with SmartScan's fields, read both ways.

On the ``union`` and ``v8`` lab kernels (and mainline after v8) those bytes
are (mm/ksm.c)::

    union {
        struct {
            unsigned int oldchecksum;   /* when unstable */
            rmap_age_t age;             /* SmartScan */
            rmap_age_t remaining_skips; /* SmartScan */
        };
        pgoff_t pgoff;                  /* union; v8: linear_page_index */
    };

:func:`union_bytes_frame` returns, for chosen rmap_items at several moments
(snapshots, e.g. before and after ksmd's visit), the bytes in memory order
and both readings: the stored index (the u64) and ``oldchecksum`` / ``age``
/ ``remaining_skips`` (:class:`ksmlens.kernel.rules.UnionLayout`, offsets from
the kernel's DWARF), with which reading the kernel holds at that moment and
whether ksmd's next visit reads age/remaining_skips there
(``should_skip_rmap_item()``). Plain data: it works on saved snapshots
(:mod:`ksmlens.lens.store`) and feeds :func:`ksmlens.views.plots.union_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from ksmlens.analysis.core import (smartscan_next, smartscan_on, union_hazard,
                                   visits_between)
from ksmlens.errors import KsmlensError
from ksmlens.kernel.rules import UnionLayout
from ksmlens.lens.model import Snapshot

__all__ = ["UNION_COLUMNS", "union_bytes_frame", "union_word_bytes"]

UNION_COLUMNS = ("panel", "variant", "release", "moment", "moment_index", "full_scans",
                 "visits", "item", "pid", "comm", "mm", "address", "state", "offset",
                 "raw", "bytes", "index_member", "index", "stored_pgoff",
                 "linear_page_index", "oldchecksum", "age", "remaining_skips", "holds",
                 "next_reads_smartscan", "next_reads_pgoff", "left_stable", "layout")


def union_word_bytes(raw: int) -> list[int]:
    """The 8 bytes of the u64 ``raw`` in memory order (x86-64 is
    little-endian: byte 0 is the lowest address, the index's least
    significant byte)."""
    return list(int(raw & ((1 << 64) - 1)).to_bytes(8, "little"))


def _moments(moments) -> list[tuple[str, Snapshot]]:
    if isinstance(moments, Mapping):
        out = list(moments.items())
    else:
        out = [tuple(m) for m in moments]
    if not out or not all(isinstance(s, Snapshot) for _, s in out):
        raise KsmlensError("union_bytes_frame needs moments: {label: Snapshot, ...}",
                           "pass e.g. {'before': res.before, 'after': res.after} of a "
                           "verify_smartscan result")
    return out


def union_bytes_frame(moments, *, addresses: Iterable[int] | None = None,
                      pid: int | None = None, panel: str | None = None) -> pd.DataFrame:
    """The union's 8 bytes of chosen rmap_items at each moment, read both ways.

    ``moments``: ``{label: Snapshot}`` (or ``[(label, Snapshot)]``) in time
    order, snapshots of one kernel, e.g. ``{"before": r.before, "after":
    r.after}`` of :func:`ksmlens.experiments.verify.verify_smartscan`.
    The rmap_items: those at ``addresses`` (ints, user addresses) of
    ``pid``; by default the union-hazard candidates of the first moment
    (:func:`ksmlens.analysis.core.union_hazard`: STABLE items whose page is
    no longer KSM and that ksmd's next pass visits), narrowed to ``pid``
    if given. An item is followed through the moments by ``(mm, address)``,
    as ``verify_smartscan`` does (a moment where none is there has no row).
    ``panel``: a label for the kernel (default: its variant, else release).

    One row per (moment, item), columns :data:`UNION_COLUMNS`:
    ``offset`` (``offsetof(struct ksm_rmap_item, oldchecksum)`` from DWARF;
    None in snapshots from before ksmlens recorded it), ``raw`` (the u64,
    int), ``bytes`` (8 ints, memory order), ``index`` (the u64 read as the
    stored index; None on a kernel without one), ``stored_pgoff`` (what
    the walk reports as stored: STABLE items only), ``linear_page_index``
    (the mapping's index now), ``oldchecksum`` / ``age`` /
    ``remaining_skips`` (the same bytes through the DWARF layout),
    ``holds`` (``"index"``: a STABLE item on a kernel with a stored index,
    ``"smartscan"`` otherwise), ``next_reads_smartscan`` (ksmd's next visit
    runs ``should_skip_rmap_item()`` past the ``PageKsm()`` test and reads
    age/remaining_skips here), ``next_reads_pgoff`` (... and they are the
    stored index's bytes: xu.xin's hazard), ``visits`` (ksmd's visits to
    the item since the first moment, :func:`visits_between`),
    ``left_stable`` (the item was STABLE at the previous moment and is not
    now: it left its stable node in between), ``full_scans``, ``layout``
    (the :class:`UnionLayout` offsets).

    Raises :class:`KsmlensError` for no moments, snapshots of different
    kernels, or a kernel without SmartScan (no union to read two ways).
    """
    ms = _moments(moments)
    first = ms[0][1]
    k = first.kernel
    if any(s.kernel.release != k.release for _, s in ms):
        raise KsmlensError("union_bytes_frame: the moments are snapshots of different "
                           "kernels", "call it once per kernel and concatenate the frames")
    if not k.smartscan:
        raise KsmlensError(f"kernel {k.release} has no SmartScan fields: the 8 bytes are "
                           "oldchecksum and padding only",
                           "use a 6.12 lab kernel (union or v8)")
    layout = UnionLayout(**k.union_layout)
    label = panel or k.variant or k.release
    if addresses is None:
        keys = [(h["pid"], first.item(h["item"]).mm, h["address"]) for h in union_hazard(first)]
    else:
        want = {int(a) for a in addresses}
        keys = [(i.pid, i.mm, i.address) for i in first.items() if i.address in want]
    keys = sorted({key for key in keys if pid is None or key[0] == pid},
                  key=lambda t: (t[0] if t[0] is not None else -1, t[2]))
    start = {(i.mm, i.address): i for i in first.items()}
    rows = []
    prev_state: dict = {}
    for n, (mlabel, snap) in enumerate(ms):
        by_key = {(i.mm, i.address): i for i in snap.items()}
        sk = snap.kernel
        for p, mm, addr in keys:
            it = by_key.get((mm, addr))
            if it is None:
                continue
            raw = int(it.raw_union)
            old, age, skips = layout.decode(raw)
            nxt = smartscan_next(snap, it, 1)
            reads = (smartscan_on(snap) and not nxt["page_is_ksm"]
                     and nxt["reads"] is not None)
            a0 = start.get((mm, addr))
            rows.append({
                "panel": label, "variant": sk.variant, "release": sk.release,
                "moment": mlabel, "moment_index": n,
                "full_scans": snap.counters.get("full_scans"),
                "visits": 0 if n == 0 or a0 is None else visits_between(first, snap, a0),
                "item": it.id, "pid": it.pid, "comm": it.comm, "mm": mm, "address": addr,
                "state": it.state, "offset": sk.union_offset, "raw": raw,
                "bytes": union_word_bytes(raw), "index_member": sk.stored_index_member,
                "index": raw if sk.has_stored_pgoff else None,
                "stored_pgoff": it.stored_pgoff, "linear_page_index": it.linear_page_index,
                "oldchecksum": int(old), "age": int(age), "remaining_skips": int(skips),
                "holds": "index" if sk.has_stored_pgoff and it.state == "stable"
                else "smartscan",
                "next_reads_smartscan": reads, "next_reads_pgoff": bool(nxt["reads_pgoff"]),
                "left_stable": prev_state.get((mm, addr)) == "stable" and it.state != "stable",
                "layout": dict(k.union_layout)})
            prev_state[(mm, addr)] = it.state
    df = pd.DataFrame(rows, columns=list(UNION_COLUMNS), dtype=object)
    # whole numbers stay Python ints (a u64 may not fit int64) and None
    # stays None in the nullable ones; the rest get their natural dtypes
    return df.astype({c: dtype for c, dtype in _DTYPES.items()})


_DTYPES = {"moment_index": "int64", "visits": "int64", "address": "int64",
           "oldchecksum": "int64", "age": "int64", "remaining_skips": "int64",
           "next_reads_smartscan": bool, "next_reads_pgoff": bool, "left_stable": bool}
