"""``rmap_walk_ksm()`` replayed for every KSM page at once (numpy).

mm/ksm.c ``rmap_walk_ksm()``, for one stable node::

    again:
        hlist_for_each_entry(rmap_item, &stable_node->hlist, hlist) {
            anon_vma_interval_tree_foreach(vmac, &anon_vma->rb_root, START, LAST) {
                addr = rmap_item->address & PAGE_MASK;
                if (addr < vma->vm_start || addr >= vma->vm_end) continue;
                if ((rmap_item->mm == vma->vm_mm) == search_new_forks) continue;
                rmap_one(folio, vma, addr, arg);
            }
        }
        if (!search_new_forks++) goto again;

``[START, LAST]`` is the rule: ``[0, ULONG_MAX]`` (stock), ``[address >>
PAGE_SHIFT]`` (v3) or ``[stored index]`` (union, v8; see
:mod:`ksmlens.kernel.rules`). The interval tree returns exactly the VMAs
whose pgoff range ``[vm_pgoff, vma_last_pgoff()]`` meets ``[START, LAST]``,
in its in-order (by start pgoff), so one join of rmap_items with the
anon_vma_chains of their anon_vma answers every rule: a pair is visited
under a rule iff the address filter passes and the rule's range meets the
VMA's. (:func:`ksmlens.analysis.anon_vma_query` replays the tree itself,
node by node, for one query; a test holds the two equal on real guests.)
"""

from __future__ import annotations

import numpy as np

from ksmlens.kernel.rules import vma_last_pgoff

__all__ = ["candidates", "WALKS", "WALK_KINDS", "STOP_UNMAPPED", "STOP_REFERENCED",
           "COLLECT", "walk_of_rmap_one"]

# How each rmap_walk_ksm() caller ends its walk early (mm/ksm.c: the walk
# returns when ``rwc->rmap_one()`` returns false, or when ``rwc->done()``
# says so after a call):
# STOP_UNMAPPED: ``rwc->done = folio_not_mapped`` (mm/rmap.c try_to_migrate(),
#   try_to_unmap()): after the call that unmapped the folio's last PTE;
# STOP_REFERENCED: folio_referenced_one() returns false once ``pra->mapcount``
#   (folio_mapcount() at the start, less one per PTE each call finds) is 0;
#   a mapping visited twice is counted twice;
# None: remove_migration_ptes() (mm/migrate.c) restores every migration entry,
#   no early stop.
STOP_UNMAPPED, STOP_REFERENCED = "unmapped", "referenced"

# walk -> (its rmap_one callback, how it stops, the caller in the kernel)
WALKS = {
    "full": (None, None, "a walk that never stops early: the worst case"),
    "try_to_migrate": ("try_to_migrate_one", STOP_UNMAPPED, "mm/rmap.c try_to_migrate()"),
    "remove_migration_ptes": ("remove_migration_pte", None,
                              "mm/migrate.c remove_migration_ptes()"),
    "folio_referenced": ("folio_referenced_one", STOP_REFERENCED, "mm/rmap.c folio_referenced()"),
    "try_to_unmap": ("try_to_unmap_one", STOP_UNMAPPED, "mm/rmap.c try_to_unmap()"),
    # not rmap_walk_ksm(): memory failure's own loop (see COLLECT)
    "collect_procs_ksm": ("add_to_kill_ksm", None,
                          "mm/ksm.c collect_procs_ksm(), from mm/memory-failure.c "
                          "collect_procs()"),
}
# mm/ksm.c collect_procs_ksm(), for one KSM page (6.12)::
#
#     hlist_for_each_entry(rmap_item, &stable_node->hlist, hlist) {
#         anon_vma_lock_read(av);
#         for_each_process(tsk) {
#             t = task_early_kill(tsk, force_early);   /* mm/memory-failure.c */
#             if (!t) continue;
#             anon_vma_interval_tree_foreach(vmac, &av->rb_root, START, LAST)
#                 if (vmac->vma->vm_mm == t->mm)
#                     add_to_kill_ksm(t, page, vma, to_kill, addr);
#         }
#     }
#
# one pass, no address check, the whole tree once per early-kill process;
# [START, LAST] is [0, ULONG_MAX], or [linear_page_index] with the merged
# follow-up (ksmlens.experiments.verify.collect_rule). task_early_kill():
# a process whose leader has an mm, and either is the poisoning task's
# (force_early: MF_ACTION_REQUIRED, as madvise(MADV_HWPOISON) and a real
# machine check on access pass it) or has an early-kill thread
# (ksmlens.kernel.constants.mce_early_kill).
COLLECT = "collect_procs_ksm"
# what each kind of work walks, in order (mm/migrate.c migrate_folio_unmap()
# then migrate_folio_move() or the undo; mm/vmscan.c shrink_folio_list():
# folio_check_references() then try_to_unmap())
WALK_KINDS = {
    "full": ("full",),
    "migrate": ("try_to_migrate", "remove_migration_ptes"),
    "reclaim": ("folio_referenced", "try_to_unmap"),
    # mm/memory-failure.c hwpoison_user_mappings(): collect_procs(), then
    # unmap_poisoned_folio() -> try_to_unmap()
    "hwpoison": ("collect_procs_ksm", "try_to_unmap"),
}


def walk_of_rmap_one(fn: str) -> str | None:
    """The walk (a :data:`WALKS` key) whose ``rwc->rmap_one`` is ``fn``."""
    return next((w for w, (f, _, _) in WALKS.items() if f == fn), None)

_MAX_ROWS = 20_000_000   # item x avc pairs per chunk before the address filter


def candidates(item_av: np.ndarray, item_mm: np.ndarray, item_addr: np.ndarray,
               item_stored: np.ndarray | None, avc_av: np.ndarray, avc_mm: np.ndarray,
               avc_start: np.ndarray, avc_end: np.ndarray, avc_pgoff: np.ndarray,
               page_shift: int = 12) -> dict[str, np.ndarray]:
    """Every (rmap_item, anon_vma_chain) pair ``rmap_walk_ksm()`` can visit.

    Items: ``item_av`` / ``item_mm`` integer codes of their anon_vma and mm
    (-1: no anon_vma, never visited), ``item_addr`` the page address
    (uint64), ``item_stored`` the stored index (uint64) or None when the
    kernel stores none (then the ``stored`` rule answers nothing). AVCs:
    codes of their anon_vma and VMA's mm, the VMA's range and pgoff. The
    avcs must be given in each tree's in-order.

    Returns arrays, one element per pair that passes the address filter:
    ``item``, ``avc`` (indices), ``pass`` (1: the item's own mm, 2:
    ``search_new_forks``), ``v3`` and ``stored`` (bool: the rule's range
    meets the VMA's pgoff range; stock always does).
    """
    order = np.argsort(avc_av, kind="stable")          # keeps in-order within a tree
    sav = avc_av[order]
    valid = item_av >= 0
    lo = np.searchsorted(sav, item_av, side="left")
    hi = np.searchsorted(sav, item_av, side="right")
    cnt = np.where(valid, hi - lo, 0).astype(np.int64)
    parts = []
    idx = np.nonzero(cnt)[0]
    # chunk the items so that the pairs before the address filter stay bounded
    csum = np.cumsum(cnt[idx])
    cuts = (np.searchsorted(csum, np.arange(_MAX_ROWS, int(csum[-1]), _MAX_ROWS)) + 1
            if idx.size else np.zeros(0, dtype=np.int64))
    for sel in np.split(idx, cuts):
        if not sel.size:
            continue
        c = cnt[sel]
        it = np.repeat(sel, c)
        step = np.arange(it.size, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
        av = order[np.repeat(lo[sel], c) + step]
        addr = item_addr[it]
        keep = (addr >= avc_start[av]) & (addr < avc_end[av])
        parts.append((it[keep], av[keep]))
    if parts:
        it = np.concatenate([p[0] for p in parts])
        av = np.concatenate([p[1] for p in parts])
    else:
        it = np.zeros(0, dtype=np.int64)
        av = np.zeros(0, dtype=np.int64)
    addr = item_addr[it]
    first_pg = avc_pgoff[av]
    last_pg = vma_last_pgoff(avc_start[av], avc_end[av], avc_pgoff[av], page_shift)
    pg = addr >> np.uint64(page_shift)
    v3 = (first_pg <= pg) & (pg <= last_pg)
    if item_stored is None:
        stored = np.zeros(it.size, dtype=bool)
    else:
        st = item_stored[it]
        stored = (first_pg <= st) & (st <= last_pg)
    passno = np.where(item_mm[it] == avc_mm[av], 1, 2).astype(np.uint8)
    return {"item": it, "avc": av, "pass": passno, "v3": v3, "stored": stored}
