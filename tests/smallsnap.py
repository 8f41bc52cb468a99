"""Small hand-made :class:`ksmlens.lens.model.Snapshot` objects for rendering unit
tests of plots and widgets (the claims about kernels are made on real
guests, in the ``vm``-marked tests)."""

from ksmlens.analysis.core import pgoff_status, stored_status
from ksmlens.lens.model import KernelInfo, MmSlot, RmapItem, Snapshot, StableNode

PAGE = 4096


def item(pid, address, *, state="stable", vma=None, node=None, age=0, skips=0,
         stored="lpi", file=False, comm=None):
    """An RmapItem; ``vma`` = (vm_start, vm_end, vm_pgoff) or None (no VMA);
    ``stored`` defaults to the linear page index for a STABLE item (what
    try_to_merge_with_ksm_page() sets on a stored-pgoff kernel)."""
    start, end, pgoff = vma if vma else (None, None, None)
    lpi = ((address - start) >> 12) + pgoff if vma else None
    if stored == "lpi":
        stored = lpi if state == "stable" else None
    it = RmapItem(id=f"0xffff8880{pid:04x}{address >> 12 & 0xffff:04x}", mm=f"0xmm{pid}",
                  pid=pid, comm=comm or f"proc{pid}", address=address, flags=0, state=state,
                  seqnr=0, in_unstable_tree=state == "unstable", stable_node=node,
                  anon_vma=None, nid=None, vma_start=start, vma_end=end, vm_pgoff=pgoff,
                  vma_anon_vma=None, vma_file=file if vma else None, addr_pgoff=address >> 12,
                  linear_page_index=lpi, stored_pgoff=stored, oldchecksum=0, age=age,
                  remaining_skips=skips, raw_union=0)
    return it


def snapshot(items, nodes=(), *, variant="union", walk_rule="stored", full_scans=10):
    has = variant in ("union", "v8")
    for it in items:
        it.pgoff_status, it.pgoff_cause = pgoff_status(it, has)
        it.stored_status = stored_status(it, has)
    slots = {}
    for it in items:
        s = slots.setdefault(it.pid, MmSlot(id=f"slot{it.pid}", mm=it.mm, pid=it.pid,
                                            comm=it.comm, rmap_items=0, mm_ksm_rmap_items=0,
                                            mm_ksm_merging_pages=0))
        s.items.append(it.id)
        s.rmap_items += 1
    return Snapshot(kernel=KernelInfo(release=f"6.12.117-ksmlens-{variant}", variant=variant,
                                      has_stored_pgoff=has, walk_rule=walk_rule),
                    counters={"full_scans": full_scans, "pages_shared": len(nodes)},
                    stable_nodes=list(nodes), rmap_items=list(items), mm_slots=list(slots.values()))


def node(nid, items=(), *, kind="regular", kpfn=None, chain=None, dups=(), mappings=(),
         unmappable=()):
    return StableNode(id=nid, kind=kind, chain=chain, kpfn=kpfn, nid=0,
                      rmap_hlist_len=-1024 if kind == "chain" else len(items),
                      items=[i.id for i in items], dups=list(dups), mappings=list(mappings),
                      unmappable_under=list(unmappable))


def mapping(pid, address, *, found, mapped=True, pass_=1):
    return {"mm": f"0xmm{pid}", "pid": pid, "comm": f"proc{pid}", "address": address,
            "vma_start": address, "vma_end": address + PAGE, "vm_pgoff": address >> 12,
            "item": None, "pass": pass_, "mapped": mapped, "found": dict(found)}
