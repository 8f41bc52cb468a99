"""Plain data between the drgn walk and everything that reads it.

A :class:`Snapshot` holds no drgn objects: analysis, reports, plots and
notebooks work the same on a live walk and on a file saved with
``ksmlens snapshot -o FILE.json``. Kernel pointers are kept as hex strings
(``"0xffff8880..."``): they are ids, and JSON numbers lose them past 2**53.

The JSON contract (extend freely, do not rename): top level ``schema``,
``kernel`` (``release``, ``variant``, ``has_stored_pgoff``), ``counters``
(named as in /sys/kernel/mm/ksm), ``stable_nodes``, ``rmap_items``,
``mm_slots``. See :class:`RmapItem` and :class:`StableNode` for the fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ksmlens.errors import KsmlensError

__all__ = ["SCHEMA", "KernelInfo", "RmapItem", "StableNode", "MmSlot", "Snapshot"]

SCHEMA = "ksmlens-snapshot/3"  # 2: anon_vma trees, walk replay, walk_rule
                               # 3: page tables per item (pte, pfn, page_ksm,
                               #    will_visit), KSM zero pages, per-rule walk
                               #    answers, stored_status, unreachable mappings


@dataclass
class KernelInfo:
    release: str
    variant: str | None          # ksmlens variant from the release, None if not ours
    has_stored_pgoff: bool       # struct ksm_rmap_item has a pgoff member
    nr_node_ids: int = 1         # ksm_nr_node_ids: stable/unstable tree roots
    page_shift: int = 12
    rmap_item_size: int = 64     # sizeof(struct ksm_rmap_item): the profit formulas
    source: str = ""             # "qmp:PATH", "vmcore:PATH" or "kcore"
    walk_rule: str | None = None  # the rule this kernel's rmap_walk_ksm() uses:
                                  # "stock", "v3" or "stored" (see ksmlens.analysis.core.RULES)


@dataclass(slots=True)
class RmapItem:
    """One ``struct ksm_rmap_item`` (one scanned virtual page of one mm)."""
    id: str                      # kernel address of the ksm_rmap_item
    mm: str
    pid: int | None              # thread-group leader owning mm (None: exited)
    comm: str | None
    address: int                 # page-aligned user address
    flags: int                   # address & ~PAGE_MASK: STABLE/UNSTABLE/seqnr
    state: str                   # "stable", "unstable" or "none"
    seqnr: int                   # address & SEQNR_MASK
    in_unstable_tree: bool       # UNSTABLE and its seqnr is the current pass's
    stable_node: str | None      # the stable node (a dup or regular node) if stable
    anon_vma: str | None         # when stable
    nid: int | None              # unstable tree nid (NUMA) when unstable
    vma_start: int | None
    vma_end: int | None
    vm_pgoff: int | None
    vma_anon_vma: str | None
    vma_file: bool | None        # VMA maps a file (MAP_PRIVATE COW pages)
    addr_pgoff: int              # address >> PAGE_SHIFT (what the v3 walk uses)
    linear_page_index: int | None  # ((address - vm_start) >> PAGE_SHIFT) + vm_pgoff
    stored_pgoff: int | None     # the stored index (rmap_item->pgoff / linear_page_index),
                                 # only for STABLE items on kernels that have one: for
                                 # other items those bytes are oldchecksum/age/skips
    oldchecksum: int
    age: int
    remaining_skips: int
    raw_union: int               # bytes 32..39 as one u64 (pgoff/SmartScan union)
    vm_flags: int | None = None
    pgoff_status: str = ""       # ok / moved / no_vma: address >> PAGE_SHIFT against
                                 # linear_page_index (ksmlens.analysis.core.pgoff_status)
    pgoff_cause: str | None = None
    stored_status: str | None = None  # STABLE items on kernels with a stored index:
                                 # ok / stale / unset (None elsewhere)
    # Does each rule's interval query find this item's own mapping? {"stock",
    # "v3", "stored": bool | None}: for STABLE items from the walk replay, for
    # others from the VMA's pgoff range (stored: None, nothing is stored yet)
    walk: dict | None = None
    # The page table at address, read while the guest was paused: "none",
    # "present", "prot_none" (present to the kernel), "swap" (swap or
    # migration entry), "zero" (the zero page), "ksm_zero" (zero page,
    # dirty: KSM put it there), "unread" (mm exited, or not walked)
    pte: str = "unread"
    pfn: int | None = None       # the page mapped there (present / prot_none)
    page_ksm: bool | None = None  # PageKsm() of that page (None: no page)
    # Will ksmd's next pass visit this item (scan_get_next_rmap_item(),
    # ksm_next_page_pmd_entry())? If not it frees it unread, and
    # not_visited says why: mm_exited, no_vma, not_mergeable, no_anon_vma,
    # no_page, swapped, zero_page, special, not_anon
    will_visit: bool | None = None
    not_visited: str | None = None


@dataclass
class StableNode:
    """One ``struct ksm_stable_node``: a regular node, a chain head, or a dup."""
    id: str
    kind: str                    # "regular", "chain" or "dup"
    chain: str | None            # the chain head's id, for a dup
    kpfn: int | None             # the KSM page's pfn (None for a chain head)
    nid: int
    rmap_hlist_len: int          # STABLE_NODE_CHAIN (-1024) for a chain head
    items: list[str] = field(default_factory=list)   # rmap_item ids (dups for a chain)
    dups: list[str] = field(default_factory=list)    # for a chain head
    mapcount: int | None = None  # folio mapcount of kpfn
    page_is_ksm: bool | None = None   # page->mapping & 3 == PAGE_MAPPING_KSM
    page_stable_node: str | None = None  # stable node the page points back to
    migrate_list: bool = False   # on migrate_nodes, not in a tree
    # Walk replay: every (mm, address) an rmap_walk_ksm() of this page can
    # visit, in the kernel's order, each {"mm", "pid", "comm", "address",
    # "vma_start", "vma_end", "vm_pgoff", "item" (the rmap_item whose
    # anon_vma led there), "pass" (1, or 2 = search_new_forks), "mapped" (a
    # PTE of mm maps kpfn there), "found": {rule: bool | None}}
    mappings: list[dict] = field(default_factory=list)
    unmappable_under: list[str] = field(default_factory=list)  # rules missing a mapped one
    ptes: int | None = None      # PTEs of the KSM mms' mergeable VMAs that map kpfn
    reachable: int | None = None  # mapped mappings the widest (stock) walk reaches
    unreachable: int = 0         # mapcount - reachable: mappings no rmap_item leads to
                                 # (no kernel can unmap them: the page stays)
    # where those are: [{"pid", "comm", "mm", "address"}], found by reading the
    # page tables of every live mm's anonymous VMAs (only when unreachable)
    orphan_mappings: list[dict] = field(default_factory=list)


@dataclass
class MmSlot:
    """One ``struct ksm_mm_slot``: an mm registered with KSM."""
    id: str
    mm: str
    pid: int | None
    comm: str | None
    rmap_items: int              # walked from the slot's rmap_list
    mm_ksm_rmap_items: int       # mm->ksm_rmap_items, what /proc/PID/ksm_stat shows
    mm_ksm_merging_pages: int    # mm->ksm_merging_pages
    items: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)   # every process using mm (CLONE_VM)
    mm_users: int | None = None  # 0: the mm exited (its VMAs and page tables are gone)
    mm_ksm_zero_pages: int | None = None  # mm->ksm_zero_pages (ksm_stat's ksm_zero_pages)
    ksm_zero_pages: int | None = None     # decoded: zero-pfn dirty PTEs in mergeable VMAs
    zero_pages: list[int] = field(default_factory=list)   # their addresses


@dataclass
class Snapshot:
    kernel: KernelInfo
    counters: dict               # /sys/kernel/mm/ksm names -> values (from the globals)
    stable_nodes: list[StableNode]
    rmap_items: list[RmapItem]
    mm_slots: list[MmSlot]
    scan: dict = field(default_factory=dict)      # ksm_scan cursor
    meta: dict = field(default_factory=dict)      # mode, timings, races
    # anon_vma interval trees the stable rmap_items point at: id -> {"root",
    # "leftmost", "nodes": {avc id: {"vma", "mm", "vm_start", "vm_end",
    # "vm_pgoff", "left", "right", "parent", "subtree_last"}}}
    anon_vmas: dict = field(default_factory=dict)
    schema: str = SCHEMA

    # ---------------------------------------------------------------- lookups
    def item(self, item_id: str) -> RmapItem:
        return self._items_by_id()[item_id]

    def node(self, node_id: str) -> StableNode:
        return self._nodes_by_id()[node_id]

    def _items_by_id(self):
        if not hasattr(self, "_ibid"):
            self._ibid = {i.id: i for i in self.rmap_items}
        return self._ibid

    def _nodes_by_id(self):
        if not hasattr(self, "_nbid"):
            self._nbid = {n.id: n for n in self.stable_nodes}
        return self._nbid

    def items_of(self, pid: int) -> list[RmapItem]:
        return [i for i in self.rmap_items if i.pid == pid]

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = {
            "schema": self.schema,
            "kernel": dataclasses.asdict(self.kernel),
            "counters": self.counters,
            "scan": self.scan,
            "meta": self.meta,
            "stable_nodes": [dataclasses.asdict(n) for n in self.stable_nodes],
            "rmap_items": [dataclasses.asdict(i) for i in self.rmap_items],
            "mm_slots": [dataclasses.asdict(m) for m in self.mm_slots],
            "anon_vmas": self.anon_vmas,
        }
        return d

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "Snapshot":
        schema = d.get("schema")
        if schema != SCHEMA:
            raise KsmlensError(f"snapshot schema {schema!r} is not {SCHEMA!r}",
                               "take the snapshot again with this ksmlens version")
        try:
            return cls(
                kernel=KernelInfo(**d["kernel"]),
                counters=d["counters"],
                stable_nodes=[StableNode(**n) for n in d["stable_nodes"]],
                rmap_items=[RmapItem(**i) for i in d["rmap_items"]],
                mm_slots=[MmSlot(**m) for m in d["mm_slots"]],
                scan=d.get("scan", {}), meta=d.get("meta", {}),
                anon_vmas=d.get("anon_vmas", {}), schema=schema)
        except (KeyError, TypeError) as e:
            raise KsmlensError(f"snapshot file is malformed ({e})",
                               "was it written by ksmlens?") from None

    @classmethod
    def load(cls, path) -> "Snapshot":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise KsmlensError(f"no snapshot file {path}", "") from None
        except ValueError as e:
            raise KsmlensError(f"{path} is not JSON ({e})", "") from None
        return cls.from_dict(d)
