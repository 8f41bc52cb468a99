"""What the walked state means for the rmap walk: stale pgoffs.

``pgoff_status(item, kernel)`` says whether the pgoff an rmap walk would use
for a ``struct ksm_rmap_item`` is right:

* ``ok``           ``address >> PAGE_SHIFT == linear_page_index(vma, address)``
* ``moved``        they differ, so a walk at ``address >> PAGE_SHIFT`` (the
                   series' v3) misses this mapping; ``pgoff_cause`` says why
                   where it can be told: ``mremap`` (an anonymous VMA kept its
                   ``vm_pgoff`` when it moved), ``file`` (a MAP_PRIVATE file
                   mapping: ``vm_pgoff`` is the file offset), ``stack`` (the
                   exec stack, relocated by ``relocate_vma_down()``)
* ``no_vma``       the item outlived its mapping and waits for ksmd
* ``stored_unset`` a STABLE item on a kernel with a stored pgoff whose pgoff
                   is 0 while the mapping's index is not
* ``stored_stale`` a STABLE item whose stored pgoff differs from the current
                   ``linear_page_index`` (the ``stored`` walk misses it)
"""

from __future__ import annotations

from .model import RmapItem

__all__ = ["pgoff_status", "VM_GROWSDOWN", "STATUSES"]

VM_GROWSDOWN = 0x100  # include/linux/mm.h
STATUSES = ("ok", "moved", "no_vma", "stored_unset", "stored_stale")


def pgoff_status(item: RmapItem, has_stored_pgoff: bool, page_shift: int = 12
                 ) -> tuple[str, str | None]:
    """``(status, cause)`` for one rmap_item (see the module doc)."""
    lpi = item.linear_page_index
    if lpi is None:
        return "no_vma", None
    if has_stored_pgoff and item.state == "stable" and item.stored_pgoff != lpi:
        if item.stored_pgoff == 0:
            return "stored_unset", None
        return "stored_stale", _cause(item, page_shift) if item.addr_pgoff != lpi else None
    if item.addr_pgoff != lpi:
        return "moved", _cause(item, page_shift)
    return "ok", None


def _cause(item: RmapItem, page_shift: int) -> str | None:
    if item.vma_file:
        return "file"
    if item.vm_flags is not None and item.vm_flags & VM_GROWSDOWN:
        return "stack"
    if item.vma_start is not None and item.vm_pgoff != item.vma_start >> page_shift:
        return "mremap"
    return None
