"""The files of ``/sys/kernel/mm/ksm``: one table of KSM's counters and knobs.

Each row names a file as ``mm/ksm.c`` (6.12) registers it in ``ksm_attrs[]``
(``KSM_ATTR`` = read-write knob, ``KSM_ATTR_RO`` = read-only counter), the
kernel variable its ``*_show()`` prints (what drgn reads in place of the
file), and what writing it does. Documentation/admin-guide/mm/ksm.rst
describes the same files. ``rmap_items`` is not a file: it is the variable
``pages_volatile_show()`` derives from, listed here so the drgn side has one
table too.

Not every kernel has every file: ``since`` names the commit that added a
file (empty: every kernel ksmlens builds has it, 6.1 included). A kernel
without a file is found by its absence (the guest lists the directory; drgn
looks the variable up), never by version.

Everything that names a KSM counter or knob (the guest reads in
:mod:`ksmlens.lab.ksmsys`, the drgn reads in :mod:`ksmlens.lens.helpers`,
the tables of :mod:`ksmlens.views.report`, ``ksmlens check``) reads it from
here.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Final

from ksmlens.errors import KsmlensError

__all__ = ["KSM_SYSFS", "KsmFile", "FILES", "BY_NAME", "COUNTERS", "KNOBS", "WRITE_ORDER",
           "RUN_STOP", "RUN_MERGE", "RUN_UNMERGE", "knob"]

KSM_SYSFS = "/sys/kernel/mm/ksm"

# include/linux/ksm.h / mm/ksm.c: the values of ``run`` (ksm_run)
RUN_STOP = 0      # KSM_RUN_STOP: ksmd sleeps; merged pages stay merged
RUN_MERGE = 1     # KSM_RUN_MERGE: ksmd scans and merges
RUN_UNMERGE = 2   # KSM_RUN_UNMERGE: break every merged page, free every rmap_item


@dataclasses.dataclass(frozen=True)
class KsmFile:
    """One file of ``/sys/kernel/mm/ksm`` (or, with ``in_sysfs`` False, a
    kernel variable the files derive from).

    ``name``: the file name. ``kind``: ``"counter"`` (``KSM_ATTR_RO``) or
    ``"knob"`` (``KSM_ATTR``, writable by root). ``variable``: the C
    expression its ``*_show()`` prints (a global, or ``ksm_scan.seqnr``);
    None where the show function computes the value (``show`` says how).
    ``text``: the file shows a word (``[none] scan-time``), not the number the
    variable holds. ``monotonic``: a counter that only grows while ksmd runs.
    ``needs_unmerged``: the store refuses (-EBUSY) while anything is merged,
    so it is written after ``run=2``. ``write_order``: knobs are written in
    this order (lower first) by :func:`ksmlens.lab.ksmsys.set_knobs`.
    ``notes``: one line, what the kernel does with it.
    ``since``: the mainline commit that added the file ("" : 6.1 has it).
    ``absent_as``: what a kernel without the file behaves like, as the value
    a write would set (``smart_scan`` 0: no SmartScan; ``advisor_mode``
    ``none``): writing that value to a kernel without the file is a no-op,
    any other value an error. None: no such value.
    """

    name: str
    kind: Literal["counter", "knob"]
    variable: str | None
    notes: str = ""
    show: str = ""
    text: bool = False
    monotonic: bool = False
    needs_unmerged: bool = False
    write_order: int = 50
    in_sysfs: bool = True
    since: str = ""
    absent_as: int | str | None = None

    @property
    def writable(self) -> bool:
        return self.kind == "knob"


_C: Final = "counter"   # Final: mypy reads them as the Literal kinds
_K: Final = "knob"
_SMART_SCAN = '5e924ff54d08 ("mm/ksm: add \"smart\" page scanning mode", 6.7)'
_ADVISOR = '66790e9a735b ("mm/ksm: add sysfs knobs for advisor", 6.8)'
FILES: tuple[KsmFile, ...] = (
    # knobs, mm/ksm.c *_store()
    KsmFile("run", _K, "ksm_run", "0 stops ksmd (merged pages stay), 1 merges, 2 unmerges "
            "everything and frees every rmap_item", write_order=99),
    KsmFile("pages_to_scan", _K, "ksm_thread_pages_to_scan",
            "pages per batch; -EINVAL unless advisor_mode is none", write_order=60),
    KsmFile("sleep_millisecs", _K, "ksm_thread_sleep_millisecs", "ksmd's sleep between batches",
            write_order=70),
    KsmFile("max_page_sharing", _K, "ksm_max_page_sharing",
            "rmap_items per stable node before a chain; -EBUSY while anything is merged",
            needs_unmerged=True, write_order=10),
    KsmFile("merge_across_nodes", _K, "ksm_merge_across_nodes",
            "0: one stable tree per NUMA node; -EBUSY while anything is merged",
            needs_unmerged=True, write_order=20),
    KsmFile("use_zero_pages", _K, "ksm_use_zero_pages",
            "merge zero-filled pages with the zero page (ksm_zero_pages)", write_order=40),
    KsmFile("smart_scan", _K, "ksm_smart_scan",
            "skip pages that did not merge for a while (should_skip_rmap_item())",
            write_order=30, since=_SMART_SCAN, absent_as=0),
    KsmFile("stable_node_chains_prune_millisecs", _K, "ksm_stable_node_chains_prune_millisecs",
            "how often stale dups of a chain are pruned", write_order=80),
    KsmFile("advisor_mode", _K, "ksm_advisor", "none or scan-time (then the advisor sets "
            "pages_to_scan)", text=True, write_order=0, since=_ADVISOR, absent_as="none"),
    KsmFile("advisor_max_cpu", _K, "ksm_advisor_max_cpu", "the advisor's CPU budget in %",
            write_order=5, since=_ADVISOR),
    KsmFile("advisor_min_pages_to_scan", _K, "ksm_advisor_min_pages_to_scan",
            "the advisor's lower bound", write_order=5, since=_ADVISOR),
    KsmFile("advisor_max_pages_to_scan", _K, "ksm_advisor_max_pages_to_scan",
            "the advisor's upper bound", write_order=5, since=_ADVISOR),
    KsmFile("advisor_target_scan_time", _K, "ksm_advisor_target_scan_time",
            "the advisor's target seconds per full scan", write_order=5, since=_ADVISOR),
    # counters, mm/ksm.c *_show()
    KsmFile("pages_shared", _C, "ksm_pages_shared", "stable nodes holding a KSM page"),
    KsmFile("pages_sharing", _C, "ksm_pages_sharing",
            "mappings of KSM pages beyond the first of each"),
    KsmFile("pages_unshared", _C, "ksm_pages_unshared", "rmap_items in the unstable tree"),
    KsmFile("pages_volatile", _C, None, "rmap_items in no tree",
            show="ksm_rmap_items - ksm_pages_shared - ksm_pages_sharing - ksm_pages_unshared, "
                 "0 if negative"),
    KsmFile("pages_scanned", _C, "ksm_pages_scanned", "pages ksmd visited", monotonic=True,
            since='b348b5fe2b5f ("mm/ksm: add pages scanned metric", 6.6)'),
    KsmFile("pages_skipped", _C, "ksm_pages_skipped", "pages SmartScan skipped",
            monotonic=True, since='e5a689912689 ("mm/ksm: add pages_skipped metric", 6.7)'),
    KsmFile("full_scans", _C, "ksm_scan.seqnr", "completed passes over every mm slot",
            monotonic=True),
    KsmFile("stable_node_chains", _C, "ksm_stable_node_chains", "chain heads"),
    KsmFile("stable_node_dups", _C, "ksm_stable_node_dups", "dups hanging off chains"),
    KsmFile("ksm_zero_pages", _C, "ksm_zero_pages",
            "PTEs mapping the zero page through use_zero_pages (atomic_long_t)",
            since='e2942062e01d ("ksm: count all zero pages placed by KSM", 6.6)'),
    KsmFile("general_profit", _C, None, "bytes saved minus the rmap_items' cost",
            show="(ksm_pages_sharing + ksm_zero_pages) * PAGE_SIZE - "
                 "ksm_rmap_items * sizeof(struct ksm_rmap_item)",
            since='d21077fbc2fc ("mm: add new KSM process and sysfs knobs", 6.4)'),
    KsmFile("rmap_items", _C, "ksm_rmap_items", "every rmap_item (not a file: "
            "pages_volatile and general_profit derive from it)", in_sysfs=False),
)
BY_NAME: dict[str, KsmFile] = {f.name: f for f in FILES}
# file names, as /sys/kernel/mm/ksm has them
COUNTERS: tuple[str, ...] = tuple(f.name for f in FILES if f.kind == _C and f.in_sysfs)
KNOBS: tuple[str, ...] = tuple(f.name for f in FILES if f.kind == _K)
WRITE_ORDER: tuple[str, ...] = tuple(sorted(KNOBS, key=lambda k: BY_NAME[k].write_order))


def knob(name: str) -> KsmFile:
    """The row of writable file ``name``; :class:`KsmlensError` for a counter
    or an unknown name."""
    f = BY_NAME.get(name)
    if f is None or not f.writable:
        raise KsmlensError(f"{name!r} is not a KSM knob" + (" (a read-only counter)" if f else ""),
                           f"knobs of {KSM_SYSFS}: {', '.join(KNOBS)}")
    return f
