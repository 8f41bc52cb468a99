"""Plain data between the drgn walk and everything that reads it: tables.

A :class:`Snapshot` holds no drgn objects: analysis, reports, plots and
notebooks work the same on a live walk and on a saved file. Its tables are
pandas DataFrames, one row per kernel object, columns named as in the JSON
contract:

=====================  ==========================================================
``snap.rmap_items``    one ``struct ksm_rmap_item`` per row (:class:`RmapItem`)
``snap.stable_nodes``  one ``struct ksm_stable_node`` per row (:class:`StableNode`)
``snap.mm_slots``      one ``struct ksm_mm_slot`` per row (:class:`MmSlot`)
``snap.mappings``      the rmap walk replayed: each (stable node, mm, address)
                       the widest walk visits, with what each rule finds
``snap.orphans``       mappings of KSM pages no rmap_item leads to
=====================  ==========================================================

Kernel pointers are hex strings (``"0xffff8880..."``): they are ids, and
JSON numbers lose them past 2**53. The per-rule answers that JSON nests
(``walk``, ``found``, ``unmappable_under``) are flat boolean columns here
(``walk_stock``, ``found_v3``, ``unmappable_stored`` ...).

Code that reasons about one object at a time asks for records:
:meth:`Snapshot.items`, :meth:`~Snapshot.nodes`, :meth:`~Snapshot.slots`
(dataclasses built from the tables on first use, then cached; a million
items take about a second) and :meth:`~Snapshot.item` / :meth:`~Snapshot.node`
by id. Records are read-only views: change the tables, not them.

On disk (:mod:`ksmlens.lens.store`): JSON (``.json``, the contract users
script against: top level ``schema``, ``kernel``, ``counters``, ``scan``,
``meta``, ``stable_nodes``, ``rmap_items``, ``mm_slots``, ``anon_vmas``;
extend freely, do not rename) or the columnar form (any other name: a zip
of Parquet tables). :meth:`Snapshot.load` reads both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from ksmlens.errors import KsmlensError
from ksmlens.kernel.rules import RULES

__all__ = ["column_values", "SCHEMA", "KernelInfo", "RmapItem", "StableNode", "MmSlot", "Snapshot",
           "ITEM_COLUMNS", "NODE_COLUMNS", "SLOT_COLUMNS", "MAPPING_COLUMNS",
           "ORPHAN_COLUMNS", "NODE_DERIVED", "mapping_dicts", "positions"]

SCHEMA = "ksmlens-snapshot/4"  # 2: anon_vma trees, walk replay, walk_rule
                               # 3: page tables per item (pte, pfn, page_ksm,
                               #    will_visit), KSM zero pages, per-rule walk
                               #    answers, stored_status, unreachable mappings
                               # 4: columnar (tables), hlist_pos, union_layout


@dataclass
class KernelInfo:
    release: str
    variant: str | None          # ksmlens variant from the release, None if not ours
    has_stored_pgoff: bool       # struct ksm_rmap_item stores the page index
    nr_node_ids: int = 1         # ksm_nr_node_ids: stable/unstable tree roots
    page_shift: int = 12
    rmap_item_size: int = 64     # sizeof(struct ksm_rmap_item): the profit formulas
    source: str = ""             # "qmp:PATH", "vmcore:PATH" or "kcore"
    walk_rule: str | None = None  # the rule this kernel's rmap_walk_ksm() uses:
                                  # "stock", "v3" or "stored" (see ksmlens.kernel.rules.RULES)
    stored_index_member: str | None = None  # the member holding the stored index
    # byte offsets of oldchecksum / age / remaining_skips within the 8 bytes
    # the stored index shares (ksmlens.kernel.rules.UnionLayout), from DWARF
    union_layout: dict = field(default_factory=lambda: {
        "oldchecksum": 0, "age": 4, "remaining_skips": 5})
    # offsetof(struct ksm_rmap_item, oldchecksum) from DWARF: where those 8
    # bytes sit in the item (32 on 6.12 x86-64); None in older snapshots
    union_offset: int | None = None
    # SmartScan: struct ksm_rmap_item has age/remaining_skips (commit
    # 5e924ff54d08, 6.7); without it those columns are 0 and meaningless
    smartscan: bool = True
    # KSM zero pages are counted (ksm_zero_pages, mm->ksm_zero_pages) and their
    # PTEs marked dirty (commit e2942062e01d, 6.6); without it the walk cannot
    # tell them and the slots' ksm_zero_pages are None
    zero_pages: bool = True
    # memory failure (mm/ksm.c collect_procs_ksm()): {"early_kill": the sysctl
    # vm.memory_failure_early_kill, "processes": [[tgid, mm, [thread flags]]]}
    # for every process whose leader has an mm; None without
    # CONFIG_MEMORY_FAILURE, and in snapshots before 2026-12-06
    mce: dict | None = None
    # the architecture's facts (ksmlens.kernel.arch): "x86_64" or "arm64", and
    # the user VA size the page tables were read with (x86-64: 47 for 4
    # levels, 56 for 5; arm64: VA_BITS); snapshots before 2026-12-06 are x86-64
    arch: str = "x86_64"
    va_bits: int = 47


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
                                 # linear_page_index (ksmlens.analysis.pgoff_status)
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
    hlist_pos: int | None = None  # STABLE: position on its stable node's hlist (0 first)


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
    # anon_vma led there), "avc", "pass" (1, or 2 = search_new_forks),
    # "mapped" (a PTE of mm maps kpfn there), "found": {rule: bool | None}}
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


# ---------------------------------------------------------------- table schemas
# Column -> pandas dtype. Nullable ("Int64", "UInt64", "boolean") where the
# kernel object may lack the value; "str" is pandas' Arrow-backed string;
# "category" for ids with few distinct values (an mm, an anon_vma, a comm).
_STR = "str"


def _enum(*values) -> pd.CategoricalDtype:
    return pd.CategoricalDtype(list(values))


# The values of the enumerated columns (fixed, so tables from two walks
# compare and concatenate)
STATES = ("none", "unstable", "stable")
PTE_KINDS = ("unread", "none", "present", "prot_none", "swap", "zero", "ksm_zero")
PGOFF_STATUSES = ("", "ok", "moved", "no_vma")
PGOFF_CAUSES = ("file", "stack", "mremap")
STORED_STATUSES = ("ok", "stale", "unset", "no_vma")
NOT_VISITED = ("mm_exited", "no_vma", "not_mergeable", "no_anon_vma", "no_page", "swapped",
               "zero_page", "special", "not_anon")
NODE_KINDS = ("regular", "chain", "dup")
ITEM_COLUMNS = {
    "id": _STR, "mm": "category", "pid": "Int64", "comm": "category", "address": "UInt64",
    "flags": "uint16", "state": _enum(*STATES), "seqnr": "uint8", "in_unstable_tree": "bool",
    "stable_node": _STR, "anon_vma": "category", "nid": "Int64", "vma_start": "UInt64",
    "vma_end": "UInt64", "vm_pgoff": "UInt64", "vma_anon_vma": "category", "vma_file": "boolean",
    "addr_pgoff": "UInt64", "linear_page_index": "UInt64", "stored_pgoff": "UInt64",
    "oldchecksum": "uint32", "age": "uint8", "remaining_skips": "uint8",
    "raw_union": "UInt64", "vm_flags": "UInt64", "pgoff_status": _enum(*PGOFF_STATUSES),
    "pgoff_cause": _enum(*PGOFF_CAUSES), "stored_status": _enum(*STORED_STATUSES),
    "walk_stock": "boolean", "walk_v3": "boolean", "walk_stored": "boolean",
    "pte": _enum(*PTE_KINDS), "pfn": "Int64", "page_ksm": "boolean", "will_visit": "boolean",
    "not_visited": _enum(*NOT_VISITED), "hlist_pos": "Int64",
}
NODE_COLUMNS = {
    "id": _STR, "kind": _enum(*NODE_KINDS), "chain": _STR, "kpfn": "Int64", "nid": "int32",
    "rmap_hlist_len": "int32", "mapcount": "Int64", "page_is_ksm": "boolean",
    "page_stable_node": _STR, "migrate_list": "bool", "ptes": "Int64",
    "reachable": "Int64", "unreachable": "int64",
    "unmappable_stock": "bool", "unmappable_v3": "bool", "unmappable_stored": "bool",
}
SLOT_COLUMNS = {
    "id": _STR, "mm": _STR, "pid": "Int64", "comm": _STR, "rmap_items": "int64",
    "mm_ksm_rmap_items": "int64", "mm_ksm_merging_pages": "int64", "pids": "object",
    "mm_users": "Int64", "mm_ksm_zero_pages": "Int64", "ksm_zero_pages": "Int64",
    "zero_pages": "object",
}
MAPPING_COLUMNS = {
    "node": _STR, "mm": "category", "pid": "Int64", "comm": "category", "address": "UInt64",
    "vma_start": "UInt64", "vma_end": "UInt64", "vm_pgoff": "UInt64", "item": _STR,
    "avc": "category", "pass": "uint8", "mapped": "boolean",
    "found_stock": "boolean", "found_v3": "boolean", "found_stored": "boolean",
}
ORPHAN_COLUMNS = {"node": _STR, "pid": "Int64", "comm": _STR, "mm": _STR, "address": "UInt64"}

# record fields that are not columns (derived, or nested in JSON)
_ITEM_NESTED = ("walk",)
NODE_DERIVED = ("items", "dups", "mappings", "unmappable_under", "orphan_mappings")
_SLOT_DERIVED = ("items",)


def empty_table(columns: dict) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in columns.items()})


def table(data: dict, columns: dict) -> pd.DataFrame:
    """A DataFrame with exactly ``columns`` (missing ones all-null), each
    cast to its dtype. ``data``: column -> numpy array, list or Series."""
    n = None
    for v in data.values():
        n = len(v)
        break
    n = n or 0
    out = {}
    for c, t in columns.items():
        v = data.get(c)
        if v is None:
            v = [None] * n if t != "bool" else np.zeros(n, dtype=bool)
        if isinstance(t, pd.CategoricalDtype) and not (
                isinstance(v, (pd.Categorical, pd.Series)) and v.dtype == t):
            bad = set(pd.unique(pd.Series(v).dropna())) - set(t.categories)
            if bad:
                raise KsmlensError(f"column {c} has values outside {list(t.categories)}: "
                                   f"{sorted(map(str, bad))[:5]}",
                                   "a snapshot from another ksmlens version? take it again")
        if t == "object":
            s = pd.Series(v, dtype=object)
        elif t in ("UInt64", "Int64") and isinstance(v, list):
            s = pd.Series(pd.array(v, dtype=t))
        else:
            s = pd.Series(v)
            if not (t == "category" and isinstance(s.dtype, pd.CategoricalDtype)):
                s = s.astype(t)
        out[c] = s.reset_index(drop=True)
    return pd.DataFrame(out)


def column_values(df: pd.DataFrame, c: str) -> list:
    """A column as Python values, None for missing."""
    s = df[c]
    if s.dtype == object:
        return s.tolist()
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.astype(object).where(s.notna(), None).tolist()
    return s.to_numpy(dtype=object, na_value=None).tolist()


def positions(values: pd.Series, ids: pd.Series) -> np.ndarray:
    """Position of each of ``values`` among ``ids`` (distinct), -1 where
    absent or missing: pyarrow's hash lookup (``index_in``) on the string
    columns, without a Python string per row."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if not len(values):
        return np.zeros(0, np.int64)
    found = pc.index_in(pa.array(values, from_pandas=True),
                        value_set=pa.array(ids, from_pandas=True))
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


class Snapshot:
    """The KSM state of one kernel at one moment (see the module doc).

    ``Snapshot(kernel, counters, stable_nodes, rmap_items, mm_slots, ...)``:
    the three tables as DataFrames (what the walk builds) or as lists of
    records (small hand-made snapshots in tests and teaching).
    """

    def __init__(self, kernel: KernelInfo, counters: dict, stable_nodes=None,
                 rmap_items=None, mm_slots=None, *, scan: dict | None = None,
                 meta: dict | None = None, anon_vmas: dict | None = None,
                 mappings: pd.DataFrame | None = None, orphans: pd.DataFrame | None = None,
                 schema: str = SCHEMA):
        self.kernel = kernel
        self.counters = counters
        self.scan = scan if scan is not None else {}
        self.meta = meta if meta is not None else {}
        # anon_vma interval trees the stable rmap_items point at: id -> {"root",
        # "leftmost", "nodes": {avc id: {"vma", "mm", "vm_start", "vm_end",
        # "vm_pgoff", "left", "right", "parent", "subtree_last"}}}
        self.anon_vmas = anon_vmas if anon_vmas is not None else {}
        self.schema = schema
        self._records: dict = {}
        # Built from records (hand-made snapshots): those records are the
        # snapshot's records, the tables are made from them once.
        rec_nodes = given = None
        if rmap_items is None or isinstance(rmap_items, (list, tuple)):
            given = {"items": list(rmap_items or ())}
            rmap_items = _items_table(given["items"])
        if stable_nodes is None or isinstance(stable_nodes, (list, tuple)):
            rec_nodes = list(stable_nodes or ())
            stable_nodes = _nodes_table(rec_nodes)
        if mm_slots is None or isinstance(mm_slots, (list, tuple)):
            slots_given = list(mm_slots or ())
            mm_slots = _slots_table(slots_given)
            if given is not None and rec_nodes is not None:
                given.update(nodes=rec_nodes, slots=slots_given)
        self.rmap_items: pd.DataFrame = rmap_items
        self.stable_nodes: pd.DataFrame = stable_nodes
        self.mm_slots: pd.DataFrame = mm_slots
        if rec_nodes is not None and mappings is None:
            mappings, orphans = _node_lists(rec_nodes)
            if rec_nodes and self.rmap_items.hlist_pos.isna().all():
                self._hlist_from_records(rec_nodes, given["items"] if given else [])
        self.mappings: pd.DataFrame = (mappings if mappings is not None
                                       else empty_table(MAPPING_COLUMNS))
        self.orphans: pd.DataFrame = (orphans if orphans is not None
                                      else empty_table(ORPHAN_COLUMNS))
        self._given = given if given and len(given) == 3 else None
        if self._given:
            self._records.update(self._given)

    def _hlist_from_records(self, nodes: list[StableNode], records: list) -> None:
        pos = {}
        for n in nodes:
            if n.kind != "chain":
                for k, i in enumerate(n.items):
                    pos[i] = k
        if pos:
            ids = self.rmap_items["id"].tolist()
            self.rmap_items["hlist_pos"] = pd.array([pos.get(i) for i in ids], dtype="Int64")
            # an item listed on a node's hlist has that node as its head
            owner = {i: n.id for n in nodes if n.kind != "chain" for i in n.items}
            cur = self.rmap_items["stable_node"].tolist()
            self.rmap_items["stable_node"] = pd.Series(
                [c if isinstance(c, str) else owner.get(i) for i, c in zip(ids, cur)],
                dtype="str")
            for r in records:            # the given records say the same
                r.hlist_pos = pos.get(r.id, r.hlist_pos)
                r.stable_node = r.stable_node or owner.get(r.id)

    def changed(self) -> None:
        """Forget the cached records after the tables were changed (a
        hand-made snapshot keeps the records it was built from)."""
        self._records.clear()
        self._given = None

    # ---------------------------------------------------------------- records
    def items(self) -> list[RmapItem]:
        """Every rmap_item as an :class:`RmapItem` (cached), in walk order:
        mm slot by mm slot, each slot's ``rmap_list`` in order."""
        r = self._records.get("items")
        if r is None:
            r = self._records["items"] = _item_records(self.rmap_items)
        return r

    def nodes(self, mappings: bool = True) -> list[StableNode]:
        """Every stable node as a :class:`StableNode` (cached) with its
        ``items`` (hlist order), ``dups``, ``mappings`` and orphans filled.
        ``mappings=False``: without ``mappings`` / ``orphan_mappings`` (empty
        lists; much faster for a million mappings: read ``snap.mappings``)."""
        r = self._records.get("nodes")
        if r is None and not mappings:
            r = self._records.get("nodes_lite")
            if r is None:
                r = self._records["nodes_lite"] = _node_records(self, mappings=False)
            return r
        if r is None:
            r = self._records["nodes"] = _node_records(self)
        return r

    def slots(self) -> list[MmSlot]:
        """Every mm slot as an :class:`MmSlot` (cached) with its ``items``."""
        r = self._records.get("slots")
        if r is None:
            r = self._records["slots"] = _slot_records(self)
        return r

    def item(self, item_id: str) -> RmapItem:
        """The :class:`RmapItem` with kernel address ``item_id`` (KeyError if none)."""
        return self._by_id("items")[item_id]

    def node(self, node_id: str) -> StableNode:
        """The :class:`StableNode` with kernel address ``node_id`` (KeyError if none)."""
        return self._by_id("nodes")[node_id]

    def _by_id(self, what: str) -> dict:
        key = f"{what}_by_id"
        d = self._records.get(key)
        if d is None:
            d = self._records[key] = {r.id: r for r in getattr(self, what)()}
        return d

    def items_of(self, pid: int) -> list[RmapItem]:
        """The rmap_items of ``pid`` (walk order), records built for those
        rows only unless every record is already cached."""
        if self._records.get("items") is not None:
            return [i for i in self.items() if i.pid == pid]
        df = self.rmap_items
        return self.item_records(df[(df["pid"] == pid).fillna(False).to_numpy(dtype=bool)])

    def item_records(self, rows: pd.DataFrame) -> list[RmapItem]:
        """:class:`RmapItem` records of some rows of :attr:`rmap_items` (the
        records :meth:`items` gives for them, built for these alone)."""
        if self._given is not None:      # hand-made: the records it was built from
            by_id = self._by_id("items")
            return [by_id[i] for i in rows["id"].tolist()]
        return _item_records(rows)

    # ---------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """The JSON contract as Python objects (small snapshots; files are
        written by :func:`ksmlens.lens.store.save` without building this)."""
        from ksmlens.lens.store import to_dict
        return to_dict(self)

    def save(self, path) -> str:
        """Write JSON if ``path`` ends in ``.json``, else the columnar form.
        Returns the format written (``"json"`` or ``"columnar"``)."""
        from ksmlens.lens.store import save
        return save(self, path)

    @classmethod
    def from_dict(cls, d: dict) -> "Snapshot":
        from ksmlens.lens.store import from_dict
        return from_dict(d)

    @classmethod
    def load(cls, path) -> "Snapshot":
        """Read a snapshot file of either format; a file from another
        schema is refused in one line."""
        from ksmlens.lens.store import load
        return load(path)

    def __repr__(self):
        return (f"<Snapshot {self.kernel.release}: {len(self.rmap_items)} rmap_items, "
                f"{len(self.stable_nodes)} stable nodes, {len(self.mm_slots)} mm slots>")


# ---------------------------------------------------------------- records <-> tables

def _walk_cols(walks: list) -> dict:
    return {f"walk_{r}": [None if w is None else w.get(r) for w in walks] for r in RULES}


def _items_table(items: list[RmapItem]) -> pd.DataFrame:
    names = [f.name for f in fields(RmapItem) if f.name not in _ITEM_NESTED]
    data = {n: [getattr(i, n) for i in items] for n in names}
    data.update(_walk_cols([i.walk for i in items]))
    return table(data, ITEM_COLUMNS)


def _nodes_table(nodes: list[StableNode]) -> pd.DataFrame:
    names = [f.name for f in fields(StableNode) if f.name not in NODE_DERIVED]
    data = {n: [getattr(x, n) for x in nodes] for n in names}
    for r in RULES:
        data[f"unmappable_{r}"] = np.array([r in x.unmappable_under for x in nodes], dtype=bool)
    return table(data, NODE_COLUMNS)


def _slots_table(slots: list[MmSlot]) -> pd.DataFrame:
    names = [f.name for f in fields(MmSlot) if f.name not in _SLOT_DERIVED]
    return table({n: [getattr(s, n) for s in slots] for n in names}, SLOT_COLUMNS)


def _node_lists(nodes: list[StableNode]):
    maps, orph = [], []
    for n in nodes:
        for m in n.mappings:
            row = {k: m.get(k) for k in MAPPING_COLUMNS if k in m}
            row["node"] = n.id
            for r in RULES:
                row[f"found_{r}"] = (m.get("found") or {}).get(r)
            maps.append(row)
        for o in n.orphan_mappings:
            orph.append(dict(o, node=n.id))
    return (table({c: [m.get(c) for m in maps] for c in MAPPING_COLUMNS}, MAPPING_COLUMNS),
            table({c: [o.get(c) for o in orph] for c in ORPHAN_COLUMNS}, ORPHAN_COLUMNS))


def _item_records(df: pd.DataFrame) -> list[RmapItem]:
    names = [f.name for f in fields(RmapItem)]
    cols = []
    walks = list(zip(*[column_values(df, f"walk_{r}") for r in RULES])) if len(df) else []
    for n in names:
        if n == "walk":
            cols.append([None if w == (None, None, None) else dict(zip(RULES, w))
                         for w in walks])
        else:
            cols.append(column_values(df, n))
    return [RmapItem(*row) for row in zip(*cols)]   # walk None: no VMA, nothing answered


def _node_records(snap: Snapshot, mappings: bool = True) -> list[StableNode]:
    df = snap.stable_nodes
    names = [f.name for f in fields(StableNode) if f.name not in NODE_DERIVED]
    cols = {n: column_values(df, n) for n in names}
    unm = {r: df[f"unmappable_{r}"].tolist() for r in RULES}
    # items per node, in hlist order
    it = snap.rmap_items
    items_of = _ids_by(it, "stable_node", order="hlist_pos")
    dups_of: dict = {}
    for i, k, c in zip(cols["id"], cols["kind"], cols["chain"]):
        if k == "dup" and c is not None:
            dups_of.setdefault(c, []).append(i)
    maps_of: dict = {}
    if mappings:
        for node, d in zip(column_values(snap.mappings, "node"), mapping_dicts(snap.mappings)):
            maps_of.setdefault(node, []).append(d)
    orph_of = {} if not mappings else _rows_by(snap.orphans, "node",
                       lambda r: {"pid": r["pid"], "comm": r["comm"], "mm": r["mm"],
                                  "address": r["address"]})
    out = []
    for k in range(len(df)):
        n = StableNode(**{name: cols[name][k] for name in names})
        if n.kind == "chain":
            n.dups = dups_of.get(n.id, [])
            n.items = list(n.dups)
        else:
            n.items = items_of.get(n.id, [])
        n.mappings = maps_of.get(n.id, [])
        n.orphan_mappings = orph_of.get(n.id, [])
        n.unmappable_under = [r for r in RULES if unm[r][k]]
        out.append(n)
    return out


def _ids_by(df: pd.DataFrame, key: str, order: str | None = None) -> dict:
    """key value -> list of ``id`` of the rows with it (rows with no key
    left out), in ``order`` (then table order) within each key."""
    sel = df[df[key].notna()]
    if not len(sel):
        return {}
    codes, uniq = pd.factorize(sel[key])
    if order is not None:
        o = np.lexsort((sel[order].to_numpy(dtype=np.int64, na_value=1 << 40), codes))
    else:
        o = np.argsort(codes, kind="stable")
    c = codes[o]
    ids = sel["id"].to_numpy(dtype=object)[o]
    cut = np.flatnonzero(np.diff(c)) + 1
    starts = np.concatenate([[0], cut]).tolist()
    ends = np.concatenate([cut, [c.size]]).tolist()
    names = list(uniq)
    return {names[c[a]]: ids[a:b].tolist() for a, b in zip(starts, ends)}


def mapping_dicts(rows: pd.DataFrame) -> list[dict]:
    """Each row of a ``mappings`` table as :attr:`StableNode.mappings` and the
    JSON contract have it (``found`` nested: ``{rule: bool | None}``),
    built column-wise."""
    names = [k for k in MAPPING_COLUMNS if k != "node" and not k.startswith("found_")]
    cols = [column_values(rows, c) for c in names]
    found = [dict(zip(RULES, f)) for f in zip(*(column_values(rows, f"found_{r}")
                                                for r in RULES))]
    return [dict(zip(names + ["found"], row)) for row in zip(*cols, found)]


def _rows_by(df: pd.DataFrame, key: str, make) -> dict:
    if not len(df):
        return {}
    cols = {c: column_values(df, c) for c in df.columns}
    out: dict = {}
    for k in range(len(df)):
        r = {c: v[k] for c, v in cols.items()}
        out.setdefault(r[key], []).append(make(r))
    return out


def _slot_records(snap: Snapshot) -> list[MmSlot]:
    df = snap.mm_slots
    names = [f.name for f in fields(MmSlot) if f.name not in _SLOT_DERIVED]
    cols = {n: column_values(df, n) for n in names}
    it = snap.rmap_items
    items_of = _ids_by(it, "mm")
    out = []
    for k in range(len(df)):
        s = MmSlot(**{n: cols[n][k] for n in names})
        s.pids = [] if s.pids is None else [int(x) for x in s.pids]
        s.zero_pages = [] if s.zero_pages is None else [int(x) for x in s.zero_pages]
        s.items = items_of.get(s.mm, [])
        out.append(s)
    return out
