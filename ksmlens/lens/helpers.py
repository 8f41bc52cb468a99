"""drgn helpers for KSM (``mm/ksm.c``), in the style of ``drgn.helpers.linux``.

Generators yield :class:`drgn.Object` values; functions that need no object
take ``prog`` first. Kernel features are detected by the presence of struct
members (``struct ksm_rmap_item`` has ``pgoff`` on the ``union`` and ``v8``
lab kernels), never by version numbers.

``#define``s are not in DWARF; mm/ksm.c's are hard-coded here, once.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

from drgn import Object, Program, TypeKind, offsetof
from drgn.helpers.linux.list import hlist_for_each_entry, list_for_each_entry
from drgn.helpers.linux.rbtree import rb_parent, rbtree_inorder_for_each_entry

from ksmlens.kernel import sysfs as ksm_sysfs
from ksmlens.kernel.constants import STORED_INDEX_MEMBERS
from ksmlens.kernel.itree import interval_tree_foreach

__all__ = [
    "SEQNR_MASK", "UNSTABLE_FLAG", "STABLE_FLAG", "STABLE_NODE_CHAIN",
    "PAGE_MAPPING_ANON", "PAGE_MAPPING_KSM", "PAGE_MAPPING_FLAGS", "VM_GROWSDOWN",
    "VM_MERGEABLE",
    "ksm_has_stored_pgoff", "ksm_stored_index_member", "ksm_stable_tree_roots",
    "for_each_stable_tree_node",
    "for_each_stable_node", "is_stable_node_chain", "is_stable_node_dup",
    "for_each_stable_node_dup", "for_each_stable_node_rmap_item",
    "for_each_migrate_node", "stable_node_page", "for_each_ksm_mm_slot",
    "for_each_mm_slot_rmap_item", "for_each_rmap_item", "rmap_item_state",
    "rmap_item_address", "rmap_item_seqnr", "rmap_item_in_unstable_tree",
    "rmap_item_stored_pgoff", "rmap_item_addr_pgoff", "linear_page_index",
    "rmap_item_vma", "rmap_item_tasks", "ksm_scan_cursor",
    "for_each_unstable_rmap_item", "anon_vma_interval_tree_foreach",
    "avc_start_pgoff", "avc_last_pgoff", "ksm_settings", "ksm_counters",
    "folio_stable_node", "ksm_unstable_tree_seqnr", "KsmKernel", "ksm_kernel",
]

# mm/ksm.c
SEQNR_MASK = 0x0FF       # low bits of unstable tree seqnr
UNSTABLE_FLAG = 0x100    # is a node of the unstable tree
STABLE_FLAG = 0x200      # is listed from the stable tree
STABLE_NODE_CHAIN = -1024
# include/linux/page-flags.h
PAGE_MAPPING_ANON = 0x1
PAGE_MAPPING_MOVABLE = 0x2
PAGE_MAPPING_KSM = PAGE_MAPPING_ANON | PAGE_MAPPING_MOVABLE
PAGE_MAPPING_FLAGS = PAGE_MAPPING_ANON | PAGE_MAPPING_MOVABLE
# include/linux/mm.h
VM_GROWSDOWN = 0x00000100
VM_MERGEABLE = 1 << 31   # KSM may merge identical pages


def _page_shift(prog: Program) -> int:
    return prog["PAGE_SHIFT"].value_()


# ------------------------------------------------------------------ what this kernel has

@dataclasses.dataclass(frozen=True)
class KsmKernel:
    """What the running kernel's KSM has, found in its DWARF and symbols
    (never from the version): :func:`ksm_kernel` detects it once per program.

    ``rmap_item``, ``stable_node``, ``mm_slot``: the C type names (``"struct
    ksm_rmap_item"`` ...); without the ``ksm_`` prefix (``"struct rmap_item"``)
    before commit 21fbd59136e0 ("ksm: add the ksm prefix to the names of the
    ksm private structures", merged for 6.1).
    ``generic_mm_slot``: the mm slot embeds the generic ``struct mm_slot`` as
    ``slot`` (``slot.mm_node``, ``slot.mm``), since commit 58730ab6c7ca ("ksm:
    convert to use common struct mm_slot", merged for 6.1); before, KSM's own
    ``struct mm_slot`` has ``mm_list`` and ``mm``. (So every 6.1 has the new
    names and slot; the old ones are 6.0 and older, which ksmlens does not
    build: that path is untested.)
    ``slot_list``, ``slot_mm``: the member paths of the scan-list link and the
    mm within the slot type.
    ``smartscan``: the rmap_item has ``age``/``remaining_skips`` and the kernel
    ``ksm_smart_scan``: commit 5e924ff54d08 ("mm/ksm: add smart page scanning
    mode", 6.7).
    ``zero_pages``: the ``ksm_zero_pages`` counter and ``mm->ksm_zero_pages``,
    with KSM's zero-page PTEs marked dirty: commit e2942062e01d ("ksm: count
    all zero pages placed by KSM", 6.6) and 6080d19f0704 ("ksm: add ksm zero
    pages for each process"). Without it a KSM zero page cannot be told from a
    read fault's.
    ``process_profit``: ``ksm_process_profit()`` and ``general_profit``
    (sysfs) / ``ksm_merging_pages`` + ``ksm_process_profit`` in
    ``/proc/PID/ksm_stat``: commit d21077fbc2fc ("mm: add new KSM process and
    sysfs knobs", 6.4); ``prctl(PR_SET_MEMORY_MERGE)`` came beside it
    (d7597f59d1d3, "mm: add new api to enable ksm per process").
    ``pages_scanned``: the ``ksm_pages_scanned`` counter: commit b348b5fe2b5f
    ("mm/ksm: add pages scanned metric", 6.6).
    ``advisor``: ``ksm_advisor``: commits 4e5fa4f5eff6 ("mm/ksm: add ksm
    advisor") and 66790e9a735b ("mm/ksm: add sysfs knobs for advisor"), 6.8.
    """

    rmap_item: str
    stable_node: str
    mm_slot: str
    generic_mm_slot: bool
    smartscan: bool
    zero_pages: bool
    process_profit: bool
    pages_scanned: bool
    advisor: bool

    @property
    def slot_list(self) -> str:
        return "slot.mm_node" if self.generic_mm_slot else "mm_list"

    @property
    def slot_mm(self) -> str:
        return "slot.mm" if self.generic_mm_slot else "mm"


def _ksm_type(prog: Program, name: str) -> str:
    """``"struct ksm_<name>"`` if the kernel has it, else ``"struct <name>"``
    (the names before commit 21fbd59136e0, 6.1)."""
    for t in (f"struct ksm_{name}", f"struct {name}"):
        try:
            prog.type(t)
            return t
        except LookupError:
            continue
    raise LookupError(f"neither struct ksm_{name} nor struct {name} in this kernel's "
                      "debug info (is CONFIG_KSM set, and is the vmlinux the kernel's?)")


def _has_object(prog: Program, name: str) -> bool:
    try:
        prog[name]
        return True
    except KeyError:
        return False


def ksm_kernel(prog: Program) -> KsmKernel:
    """The :class:`KsmKernel` of ``prog``, detected on first use and kept in
    ``prog.cache``. Raises LookupError if the kernel has no KSM structures."""
    k = prog.cache.get("ksmlens.ksm_kernel")
    if k is not None:
        return k
    item = _ksm_type(prog, "rmap_item")
    # the old KSM-private slot was named plain "struct mm_slot"; since 6.1 that
    # name is the generic one and KSM's is "struct ksm_mm_slot"
    slot = "struct ksm_mm_slot" if item == "struct ksm_rmap_item" else "struct mm_slot"
    k = KsmKernel(
        rmap_item=item, stable_node=_ksm_type(prog, "stable_node"), mm_slot=slot,
        generic_mm_slot=prog.type(slot).has_member("slot"),
        smartscan=prog.type(item).has_member("age") and _has_object(prog, "ksm_smart_scan"),
        zero_pages=_has_object(prog, "ksm_zero_pages"),
        process_profit=_has_object(prog, "ksm_process_profit"),
        pages_scanned=_has_object(prog, "ksm_pages_scanned"),
        advisor=_has_object(prog, "ksm_advisor"))
    prog.cache["ksmlens.ksm_kernel"] = k
    return k


def ksm_stored_index_member(prog: Program) -> Optional[str]:
    """The member of ``struct ksm_rmap_item`` holding the stored page index
    (one of :data:`ksmlens.kernel.constants.STORED_INDEX_MEMBERS`:
    ``linear_page_index`` on v8 and mainline, ``vm_pgoff`` on v4, ``pgoff``
    on the union kernel), or None."""
    it = prog.type(ksm_kernel(prog).rmap_item)
    return next((m for m in STORED_INDEX_MEMBERS if it.has_member(m)), None)


def ksm_has_stored_pgoff(prog: Program) -> bool:
    """Whether ``struct ksm_rmap_item`` stores a page index, under any of its
    posted names (union/v8 kernels, mainline)."""
    return ksm_stored_index_member(prog) is not None


# ------------------------------------------------------------------ stable tree

def ksm_stable_tree_roots(prog: Program) -> Iterator[tuple[int, Object]]:
    """Yield ``(nid, struct rb_root *)`` for every stable tree root.

    There is one root per NUMA node (``ksm_nr_node_ids``) once
    ``merge_across_nodes`` is 0, else just one.
    """
    roots = prog["root_stable_tree"]
    for nid in range(prog["ksm_nr_node_ids"].value_()):
        yield nid, roots + nid


def for_each_stable_tree_node(prog: Program) -> Iterator[Object]:
    """Yield every ``struct ksm_stable_node *`` linked in a stable tree.

    These are chain heads and regular nodes; a chain's dups hang off the head
    (see :func:`for_each_stable_node_dup`).
    """
    for _, root in ksm_stable_tree_roots(prog):
        yield from rbtree_inorder_for_each_entry(ksm_kernel(prog).stable_node, root, "node")


def is_stable_node_chain(node: Object) -> bool:
    """Whether a ``struct ksm_stable_node *`` is a chain head."""
    return node.rmap_hlist_len.value_() == STABLE_NODE_CHAIN


def _dup_head(prog: Program) -> int:
    # #define STABLE_NODE_DUP_HEAD ((struct list_head *)&migrate_nodes.prev)
    return prog["migrate_nodes"].prev.address_


def is_stable_node_dup(node: Object) -> bool:
    """Whether a ``struct ksm_stable_node *`` is a dup of a chain."""
    return node.head.value_() == _dup_head(node.prog_)


def for_each_stable_node_dup(chain: Object) -> Iterator[Object]:
    """Yield the dups (``struct ksm_stable_node *``) of a chain head."""
    return hlist_for_each_entry(ksm_kernel(chain.prog_).stable_node,
                                chain.hlist.address_of_(), "hlist_dup")


def for_each_migrate_node(prog: Program) -> Iterator[Object]:
    """Yield stable nodes parked on ``migrate_nodes`` (their page moved nid)."""
    return list_for_each_entry(ksm_kernel(prog).stable_node,
                               prog["migrate_nodes"].address_of_(), "list")


def for_each_stable_node(prog: Program) -> Iterator[Object]:
    """Yield every stable node that holds a KSM page: regular nodes and dups,
    in the trees and on ``migrate_nodes`` (chain heads are not yielded)."""
    for node in for_each_stable_tree_node(prog):
        if is_stable_node_chain(node):
            yield from for_each_stable_node_dup(node)
        else:
            yield node
    yield from for_each_migrate_node(prog)


def for_each_stable_node_rmap_item(node: Object) -> Iterator[Object]:
    """Yield the ``struct ksm_rmap_item *`` mapping a (non-chain) stable node's page."""
    return hlist_for_each_entry(ksm_kernel(node.prog_).rmap_item, node.hlist.address_of_(),
                                "hlist")


def stable_node_page(node: Object) -> Object:
    """The ``struct page *`` of a stable node's KSM page (from ``kpfn``)."""
    from drgn.helpers.linux.mm import pfn_to_page
    return pfn_to_page(node.prog_, node.kpfn)


def folio_stable_node(page: Object) -> Optional[Object]:
    """The ``struct ksm_stable_node *`` a KSM page points to, or None."""
    mapping = page.mapping.value_()
    if mapping & PAGE_MAPPING_FLAGS != PAGE_MAPPING_KSM:
        return None
    return Object(page.prog_, ksm_kernel(page.prog_).stable_node + " *",
                  mapping & ~PAGE_MAPPING_FLAGS)


# ------------------------------------------------------------------ mm slots, items

def for_each_ksm_mm_slot(prog: Program) -> Iterator[Object]:
    """Yield every ``struct ksm_mm_slot *`` on ``ksm_mm_head`` (the scan list).

    ``ksm_mm_head`` itself is the list head and is not yielded. (``struct
    mm_slot *`` with ``mm_list`` on kernels before commit 58730ab6c7ca, 6.4:
    see :class:`KsmKernel`.)
    """
    k = ksm_kernel(prog)
    head = prog["ksm_mm_head"]
    yield from list_for_each_entry(k.mm_slot, head.subobject_(k.slot_list).address_of_(),
                                   k.slot_list)


def for_each_mm_slot_rmap_item(slot: Object) -> Iterator[Object]:
    """Yield a ``struct ksm_mm_slot *``'s rmap_items, sorted by address."""
    item = slot.rmap_list
    while item:
        yield item
        item = item.rmap_list


def for_each_rmap_item(prog: Program) -> Iterator[Object]:
    """Yield every ``struct ksm_rmap_item *`` of every mm slot."""
    for slot in for_each_ksm_mm_slot(prog):
        yield from for_each_mm_slot_rmap_item(slot)


def rmap_item_address(item: Object) -> int:
    """The page-aligned user address of a ``struct ksm_rmap_item *``."""
    return item.address.value_() & ~((1 << _page_shift(item.prog_)) - 1)


def rmap_item_seqnr(item: Object) -> int:
    return item.address.value_() & SEQNR_MASK


def rmap_item_state(item: Object) -> str:
    """``"stable"``, ``"unstable"`` or ``"none"`` from the address flags."""
    a = item.address.value_()
    if a & STABLE_FLAG:
        return "stable"
    if a & UNSTABLE_FLAG:
        return "unstable"
    return "none"


def rmap_item_in_unstable_tree(item: Object) -> bool:
    """Whether an UNSTABLE item is in the *current* unstable tree.

    ``root_unstable_tree`` is reset every pass; an item from an older pass
    keeps UNSTABLE_FLAG (and still counts in ``pages_unshared``) but is not
    in the tree. The tree's items carry the seqnr of the pass that built it
    (:func:`ksm_unstable_tree_seqnr`).
    """
    a = item.address.value_()
    if not a & UNSTABLE_FLAG:
        return False
    return (a & SEQNR_MASK) == ksm_unstable_tree_seqnr(item.prog_)


def ksm_unstable_tree_seqnr(prog: Program) -> int:
    """The seqnr (``& SEQNR_MASK``) of the items in ``root_unstable_tree``.

    During a pass it is ``ksm_scan.seqnr``. A pass ends with
    ``ksm_scan.seqnr++`` but the roots are only reset when the next pass
    starts (``scan_get_next_rmap_item()`` with ``ksm_scan.mm_slot ==
    &ksm_mm_head``): between passes the tree still holds the previous pass's
    items, ``seqnr - 1``."""
    scan = prog["ksm_scan"]
    seqnr = scan.seqnr.value_()
    if scan.mm_slot.value_() == prog["ksm_mm_head"].address_ and seqnr:
        seqnr -= 1
    return seqnr & SEQNR_MASK


def rmap_item_vma(item: Object) -> Optional[Object]:
    """The ``struct vm_area_struct *`` of ``item->mm`` covering its address,
    or None (the item outlived its mapping and waits for ksmd)."""
    from drgn.helpers.linux.mm import vma_find
    vma = vma_find(item.mm, rmap_item_address(item))
    return vma if vma else None


def rmap_item_tasks(item: Object) -> Iterator[Object]:
    """Yield the thread-group leaders (``struct task_struct *``) using ``item->mm``."""
    from drgn.helpers.linux.pid import for_each_task
    mm = item.mm.value_()
    for task in for_each_task(item.prog_):
        if task.mm.value_() == mm and task.pid.value_() == task.tgid.value_():
            yield task


def rmap_item_stored_pgoff(item: Object) -> Optional[int]:
    """The stored page index (``rmap_item->linear_page_index``, ``->vm_pgoff``
    or ``->pgoff``) where the running kernel has one, else None."""
    member = ksm_stored_index_member(item.prog_)
    if member is None:
        return None
    return item.member_(member).value_()


def rmap_item_addr_pgoff(item: Object) -> int:
    """``rmap_item->address >> PAGE_SHIFT``: the pgoff the v3 walk searches."""
    return item.address.value_() >> _page_shift(item.prog_)


def linear_page_index(vma: Object, address: int) -> int:
    """``linear_page_index(vma, address)`` for an anonymous/private mapping."""
    shift = _page_shift(vma.prog_)
    return ((address - vma.vm_start.value_()) >> shift) + vma.vm_pgoff.value_()


def ksm_scan_cursor(prog: Program) -> Object:
    """``ksm_scan`` (``struct ksm_scan``): ksmd's cursor; ``seqnr`` counts full scans."""
    return prog["ksm_scan"]


def for_each_unstable_rmap_item(prog: Program) -> Iterator[Object]:
    """Yield the ``struct ksm_rmap_item *`` in the current unstable tree(s)."""
    roots = prog["root_unstable_tree"]
    for nid in range(prog["ksm_nr_node_ids"].value_()):
        yield from rbtree_inorder_for_each_entry(ksm_kernel(prog).rmap_item, roots + nid,
                                                 "node")


# ------------------------------------------------------------------ anon_vma interval tree

def avc_start_pgoff(avc: Object) -> int:
    """``vma->vm_pgoff`` of an ``struct anon_vma_chain *``'s VMA."""
    return avc.vma.vm_pgoff.value_()


def avc_last_pgoff(avc: Object) -> int:
    """``vm_pgoff + vma_pages(vma) - 1`` (mm/interval_tree.c)."""
    vma = avc.vma
    shift = _page_shift(avc.prog_)
    return vma.vm_pgoff.value_() + ((vma.vm_end.value_() - vma.vm_start.value_()) >> shift) - 1


class _AvcTree:
    """:class:`ksmlens.kernel.itree.Tree` over live ``struct anon_vma_chain``
    (handles are the avc addresses)."""

    def __init__(self, prog: Program):
        self.prog = prog
        self.shift = _page_shift(prog)
        self.rb_off = offsetof(prog.type("struct anon_vma_chain"), "rb")

    def obj(self, a: int) -> Object:
        return Object(self.prog, "struct anon_vma_chain *", a)

    def _rb(self, rb) -> Optional[int]:
        v = rb.value_()
        return v - self.rb_off if v else None

    def left(self, a):
        return self._rb(self.obj(a).rb.rb_left)

    def right(self, a):
        return self._rb(self.obj(a).rb.rb_right)

    def parent(self, a):
        p = rb_parent(self.obj(a).rb.address_of_())
        return self._rb(p)

    def subtree_last(self, a):
        return self.obj(a).rb_subtree_last.value_()

    def start(self, a):
        return avc_start_pgoff(self.obj(a))

    def last(self, a):
        return avc_last_pgoff(self.obj(a))


def anon_vma_interval_tree_foreach(root: Object, start: int, last: int) -> Iterator[Object]:
    """Yield each ``struct anon_vma_chain *`` whose VMA's pgoff range meets
    ``[start, last]``, in the kernel's order.

    ``anon_vma_interval_tree_iter_first()`` / ``_iter_next()``
    (include/linux/interval_tree_generic.h), pruning with ``rb_subtree_last``
    as the kernel does (the one port is :mod:`ksmlens.kernel.itree`), so a walk over
    any pgoff range can be replayed on a real tree. ``root`` is a
    ``struct rb_root_cached *`` (``&anon_vma->rb_root``).
    """
    t = _AvcTree(root.prog_)
    for a in interval_tree_foreach(t, t._rb(root.rb_root.rb_node), t._rb(root.rb_leftmost),
                                   start, last):
        yield t.obj(a)


# ------------------------------------------------------------------ globals

# file name -> the global its *_show() prints (ksmlens.kernel.sysfs): the
# numeric knobs, and the counters that are one plain global each
# (full_scans and ksm_zero_pages, an atomic that older kernels lack, are read
# in ksm_counters(); pages_volatile and general_profit computed there)
_SETTINGS = {f.name: f.variable for f in ksm_sysfs.FILES
             if f.kind == "knob" and f.variable and not f.text}
_COUNTERS = {f.name: f.variable for f in ksm_sysfs.FILES
             if f.kind == "counter" and f.variable and "." not in f.variable
             and f.name != "ksm_zero_pages"}


def _value(prog: Program, name: str):
    try:
        obj = prog[name]
    except KeyError:
        return None
    if obj.type_.unaliased().kind == TypeKind.STRUCT:  # atomic_long_t / atomic_t
        return obj.counter.value_()
    v = obj.value_()
    return int(v) if isinstance(v, bool) else v


def ksm_settings(prog: Program) -> dict:
    """KSM knobs as named in /sys/kernel/mm/ksm, read from the kernel's globals."""
    return {k: _value(prog, v) for k, v in _SETTINGS.items() if _value(prog, v) is not None}


def ksm_counters(prog: Program) -> dict:
    """KSM counters as named in /sys/kernel/mm/ksm (plus ``rmap_items``), read
    from the globals exactly as ``mm/ksm.c``'s ``*_show()`` functions do. A
    counter the kernel does not have (its variable is not in the debug info,
    see :class:`KsmKernel`) is left out."""
    c = {k: _value(prog, v) for k, v in _COUNTERS.items()}
    c = {k: v for k, v in c.items() if v is not None}
    c["full_scans"] = prog["ksm_scan"].seqnr.value_()
    zp = _value(prog, "ksm_zero_pages")
    if zp is not None:
        c["ksm_zero_pages"] = zp
    # pages_volatile_show()
    vol = c["rmap_items"] - c["pages_shared"] - c["pages_sharing"] - c["pages_unshared"]
    c["pages_volatile"] = max(vol, 0)
    # general_profit_show(): commit d21077fbc2fc (6.4), with ksm_process_profit()
    if ksm_kernel(prog).process_profit:
        page_size = 1 << _page_shift(prog)
        item_size = prog.type(ksm_kernel(prog).rmap_item).size
        c["general_profit"] = ((c["pages_sharing"] + c.get("ksm_zero_pages", 0)) * page_size
                               - c["rmap_items"] * item_size)
    return c
