"""What the walked state means for the rmap walk: stale pgoffs, rule by rule.

Three separate questions about a ``struct ksm_rmap_item``:

``pgoff_status(item)``: is ``address >> PAGE_SHIFT`` (what the series' v3
searches) the mapping's ``linear_page_index(vma, address)``?

* ``ok``      they are equal
* ``moved``   they differ; ``pgoff_cause`` says why where it can be told:
              ``mremap`` (an anonymous VMA kept its ``vm_pgoff`` when it
              moved), ``file`` (a MAP_PRIVATE file mapping: ``vm_pgoff`` is
              the file offset), ``stack`` (the exec stack, relocated by
              ``relocate_vma_down()``)
* ``no_vma``  the item outlived its mapping and waits for ksmd

``stored_status(item)``: for a STABLE item on a kernel that stores the index
(``rmap_item->pgoff`` / ``linear_page_index``): ``ok``, ``stale`` (differs
from the current ``linear_page_index``), ``unset`` (0 while the index is
not), ``no_vma``; None for other items (their bytes are
oldchecksum/age/remaining_skips) and other kernels.

Neither says whether a walk *misses* the mapping: the kernel's interval query
finds every VMA whose pgoff *range* contains the searched index, so a moved
item can still be found (a VMA moved up by 32 pages, then grown in place to
48, keeps its first 16 pages findable by v3). ``RmapItem.walk`` answers that
per rule: from the replay for STABLE items (:func:`replay_walks`), from the
VMA's pgoff range for the others (:func:`range_walk`).
"""

from __future__ import annotations

from ksmlens.errors import KsmlensError
from ksmlens.kernel.itree import ULONG_MAX, interval_tree_foreach
from ksmlens.kernel.variants import VARIANTS
from ksmlens.lens.model import RmapItem, Snapshot, StableNode
from ksmlens.lens.helpers import VM_GROWSDOWN

__all__ = ["pgoff_status", "stored_status", "item_status", "range_walk", "STATUSES", "STORED_STATUSES",
           "RULES", "RULE_HELP", "VARIANT_RULE",
           "kernel_walk_rule", "rule_range", "anon_vma_query", "walk_candidates",
           "replay_walks", "walk_misses", "skip_age", "smartscan_visit",
           "smartscan_next", "smartscan_forecast", "page_is_ksm", "scan_position",
           "visits_between", "union_hazard", "stale_items", "will_visit"]

STATUSES = ("ok", "moved", "no_vma")
STORED_STATUSES = ("ok", "stale", "unset", "no_vma")


def pgoff_status(item: RmapItem, has_stored_pgoff: bool = False, page_shift: int = 12
                 ) -> tuple[str, str | None]:
    """``(status, cause)``: ``address >> PAGE_SHIFT`` against
    ``linear_page_index()`` (see the module doc). ``has_stored_pgoff`` is
    accepted for compatibility and not used: see :func:`stored_status`."""
    lpi = item.linear_page_index
    if lpi is None:
        return "no_vma", None
    if item.addr_pgoff != lpi:
        return "moved", _cause(item, page_shift)
    return "ok", None


def stored_status(item: RmapItem, has_stored_pgoff: bool) -> str | None:
    """The stored index of a STABLE item against its mapping's
    ``linear_page_index()`` (see the module doc); None where nothing is stored."""
    if not has_stored_pgoff or item.state != "stable" or item.stored_pgoff is None:
        return None
    lpi = item.linear_page_index
    if lpi is None:
        return "no_vma"
    if item.stored_pgoff == lpi:
        return "ok"
    return "unset" if item.stored_pgoff == 0 else "stale"


def item_status(item: RmapItem) -> str:
    """One status per item for pictures: ``stored_stale`` / ``stored_unset``
    when the stored index is wrong, else :func:`pgoff_status`'s."""
    if item.stored_status in ("stale", "unset"):
        return f"stored_{item.stored_status}"
    return item.pgoff_status or "ok"


def range_walk(item: RmapItem, has_stored_pgoff: bool, page_shift: int = 12) -> dict | None:
    """Per rule, does the interval query of ``rmap_walk_ksm()`` meet the
    item's own VMA (whose pgoff range is ``[vm_pgoff, vm_pgoff +
    vma_pages - 1]``) and then pass the address filter? For an item that
    is not STABLE (no walk runs for it yet; ``stored`` is None: nothing is
    stored before the merge). None without a VMA."""
    if item.vma_start is None:
        return None
    last = item.vm_pgoff + ((item.vma_end - item.vma_start) >> page_shift) - 1
    return {"stock": True, "v3": item.vm_pgoff <= item.addr_pgoff <= last,
            "stored": None}


def _cause(item: RmapItem, page_shift: int) -> str | None:
    if item.vma_file:
        return "file"
    if item.vm_flags is not None and item.vm_flags & VM_GROWSDOWN:
        return "stack"
    if item.vma_start is not None and item.vm_pgoff != item.vma_start >> page_shift:
        return "mremap"
    return None


# ------------------------------------------------------------------ rmap walk replay

RULES = ("stock", "v3", "stored")
RULE_HELP = {
    "stock": "[0, ULONG_MAX], then the address filter (unmodified 6.12)",
    "v3": "[address >> PAGE_SHIFT] (the series v1-v3)",
    "stored": "[rmap_item->pgoff] (the union and v8 kernels)",
}
# What each lab variant's rmap_walk_ksm() searches (ksmlens.kernel.variants).
VARIANT_RULE = {v.name: v.walk_rule for v in VARIANTS.values()}


def kernel_walk_rule(variant: str | None, has_stored_pgoff: bool) -> str | None:
    """The rule a kernel's ``rmap_walk_ksm()`` uses: from the lab variant, or
    for another kernel from ``struct ksm_rmap_item`` (a ``pgoff`` member
    means ``stored``; without one it is ``stock`` or a v3-like patch, which
    the structures cannot tell apart: None)."""
    if variant in VARIANTS:
        return VARIANTS[variant].walk_rule
    return "stored" if has_stored_pgoff else None


def rule_range(item: RmapItem, rule: str, has_stored_pgoff: bool) -> tuple[int, int] | None:
    """The pgoff range ``[start, last]`` rule ``rule`` searches for ``item``
    (a KSM folio is one page), or None if the kernel has no stored pgoff."""
    if rule == "stock":
        return 0, ULONG_MAX
    if rule == "v3":
        return item.addr_pgoff, item.addr_pgoff
    if rule == "stored":
        if not has_stored_pgoff or item.stored_pgoff is None:
            return None
        return item.stored_pgoff, item.stored_pgoff
    raise KsmlensError(f"unknown rmap walk rule {rule!r}", f"choose one of {', '.join(RULES)}")


class _RecordedTree:
    """:class:`ksmlens.kernel.itree.Tree` over one anon_vma tree recorded in a snapshot."""

    def __init__(self, rec: dict, shift: int):
        self.n = rec["nodes"]
        self.shift = shift

    def left(self, a):
        return self.n[a]["left"]

    def right(self, a):
        return self.n[a]["right"]

    def parent(self, a):
        return self.n[a]["parent"]

    def subtree_last(self, a):
        return self.n[a]["subtree_last"]

    def start(self, a):
        return self.n[a]["vm_pgoff"]

    def last(self, a):
        d = self.n[a]
        return d["vm_pgoff"] + ((d["vm_end"] - d["vm_start"]) >> self.shift) - 1


def anon_vma_query(snap: Snapshot, anon_vma: str, start: int, last: int) -> list[dict]:
    """The avc records of a recorded anon_vma tree whose VMA's pgoff range
    meets ``[start, last]``, in the kernel's order (the kernel's
    ``anon_vma_interval_tree_foreach()``, replayed on the recorded nodes)."""
    rec = snap.anon_vmas.get(anon_vma)
    if rec is None:
        raise KsmlensError(f"anon_vma {anon_vma} is not recorded in this snapshot",
                           "take the snapshot again (schema 2 records the trees of "
                           "stable rmap_items)")
    t = _RecordedTree(rec, snap.kernel.page_shift)
    return [dict(rec["nodes"][a], id=a)
            for a in interval_tree_foreach(t, rec["root"], rec["leftmost"], start, last)]


def walk_candidates(snap: Snapshot, node: StableNode, rule: str,
                    _cache: dict | None = None) -> list[dict] | None:
    """Replay ``rmap_walk_ksm()`` of ``node``'s page under ``rule``: each
    (mm, address) it would hand to ``rmap_one()``, in order, as
    ``{"mm", "address", "avc", "vma_start", "vma_end", "vm_pgoff", "item",
    "pass"}``. Both passes: the rmap_items' own mms, then
    ``search_new_forks`` (VMAs of other mms, forked since ksmd passed).
    None when the rule needs a stored pgoff the kernel lacks."""
    has = snap.kernel.has_stored_pgoff
    if rule == "stored" and not has:
        return None
    out = []
    items = [snap.item(i) for i in node.items]
    for search_new_forks in (0, 1):
        for item in items:
            rng = rule_range(item, rule, has)
            if rng is None or item.anon_vma is None:
                continue
            if _cache is not None:
                key = (item.anon_vma, rng)
                avcs = _cache.get(key)
                if avcs is None:
                    avcs = _cache[key] = anon_vma_query(snap, item.anon_vma, *rng)
            else:
                avcs = anon_vma_query(snap, item.anon_vma, *rng)
            for avc in avcs:
                addr = item.address
                if addr < avc["vm_start"] or addr >= avc["vm_end"]:
                    continue
                if (item.mm == avc["mm"]) == bool(search_new_forks):
                    continue
                out.append({"mm": avc["mm"], "address": addr, "avc": avc["id"],
                            "vma_start": avc["vm_start"], "vma_end": avc["vm_end"],
                            "vm_pgoff": avc["vm_pgoff"], "item": item.id,
                            "pass": 1 + search_new_forks})
    return out


def replay_walks(snap: Snapshot, mapped: dict | None = None, stock: dict | None = None
                 ) -> Snapshot:
    """Replay every rule's walk for every stable page node of ``snap`` and
    fill ``StableNode.mappings`` / ``unmappable_under`` and
    ``RmapItem.walk`` in place (returns ``snap``).

    The mappings are the stock walk's candidates (the other rules search
    sub-ranges of the same trees, with the same filters). ``mapped`` maps
    ``(node id, mm, address)`` to whether a PTE of mm maps the node's page
    there (the snapshot walk reads the page tables); without it the values
    already in ``node.mappings`` are kept. ``stock``: the stock rule's
    candidates per node id, when already computed. A rule is in ``unmappable_under``
    when it misses a mapping that is mapped: the kernel's walk would leave
    that PTE in place (no migration, no reclaim of the page).
    """
    import gc
    snap.__dict__.pop("_mapped_idx", None)
    was = gc.isenabled()
    gc.disable()         # millions of small dicts, no cycles: the collector only costs
    try:
        return _replay_walks(snap, mapped, stock)
    finally:
        if was:
            gc.enable()


def _replay_walks(snap, mapped, stock):
    owners = {s.mm: (s.pid, s.comm) for s in snap.mm_slots}
    cache: dict = {}     # (anon_vma, range) -> avcs: the stock range repeats per anon_vma
    for node in snap.stable_nodes:
        if node.kind == "chain":
            continue
        old = {(m["mm"], m["address"]): m.get("mapped") for m in node.mappings}
        found = {r: (stock[node.id] if r == "stock" and stock and node.id in stock
                     else walk_candidates(snap, node, r, cache)) for r in RULES}
        stock = found["stock"]
        keys = {r: (None if f is None else {(c["mm"], c["address"]) for c in f})
                for r, f in found.items()}
        mappings, seen = [], set()
        for c in stock:
            k = (c["mm"], c["address"])
            if k in seen:
                continue
            seen.add(k)
            pid, comm = owners.get(c["mm"], (None, None))
            m = dict(c, pid=pid, comm=comm)
            m["mapped"] = (mapped.get((node.id,) + k) if mapped is not None else old.get(k))
            m["found"] = {r: (None if keys[r] is None else k in keys[r]) for r in RULES}
            mappings.append(m)
        node.mappings = mappings
        node.reachable = sum(1 for m in mappings if m["mapped"])
        # only for a page that is still this node's KSM page (a stale node's
        # kpfn may have been freed and reused: its mapcount is someone else's)
        own = node.page_is_ksm and node.page_stable_node == node.id
        node.unreachable = max(0, (node.mapcount or 0) - node.reachable) if own else 0
        node.unmappable_under = [r for r in RULES if keys[r] is not None and (
            node.unreachable or any(m["mapped"] and not m["found"][r] for m in mappings))]
        for iid in node.items:
            it = snap.item(iid)
            k = (it.mm, it.address)
            it.walk = {r: (None if keys[r] is None else k in keys[r]) for r in RULES}
    has, shift = snap.kernel.has_stored_pgoff, snap.kernel.page_shift
    for it in snap.rmap_items:
        if it.state != "stable":
            it.walk = range_walk(it, has, shift)
    return snap


def walk_misses(snap: Snapshot, rule: str | None = None) -> list[dict]:
    """The mapped mappings that ``rule`` (default: the kernel's own) misses,
    one row per (stable node, mapping)."""
    rule = rule or snap.kernel.walk_rule
    if rule is None:
        raise KsmlensError("this kernel's rmap walk rule is unknown",
                           f"name one: {', '.join(RULES)}")
    if rule == "stored" and not snap.kernel.has_stored_pgoff:
        raise KsmlensError(f"{snap.kernel.release} has no stored pgoff "
                           "(struct ksm_rmap_item has no pgoff member)",
                           "ask for stock or v3, or snapshot a union/v8 kernel")
    out = []
    for node in snap.stable_nodes:
        for m in node.mappings:
            if m["mapped"] and not m["found"][rule]:
                out.append(dict(m, node=node.id, kpfn=node.kpfn, rule=rule))
    return out


# ------------------------------------------------------------------ SmartScan

U8_MAX = 255


def skip_age(age: int) -> int:
    """mm/ksm.c ``skip_age()``: how many scans an item of this age skips."""
    if age <= 3:
        return 1
    if age <= 5:
        return 2
    if age <= 8:
        return 4
    return 8


def smartscan_visit(age: int, skips: int) -> tuple[int, int, bool]:
    """One ``should_skip_rmap_item()`` of a non-KSM page with SmartScan on:
    ``(age, remaining_skips, skipped)`` after the visit."""
    a = age
    if age != U8_MAX:
        age += 1
    if a < 3:
        return age, skips, False
    if not skips:
        return age, skip_age(a), False
    return age, skips - 1, True


def _smartscan_reads_stable(snap: Snapshot) -> bool | None:
    """Does this kernel's ``should_skip_rmap_item()`` read a STABLE item's
    age/remaining_skips? Every 6.12 kernel does, except v8 (a behaviour,
    not a structure: known for the lab variants only,
    ``Variant.smartscan_reads_stable``; None for another kernel)."""
    v = VARIANTS.get(snap.kernel.variant)
    return None if v is None else v.smartscan_reads_stable


def page_is_ksm(snap: Snapshot, item: RmapItem) -> bool:
    """``PageKsm()`` of the page mapped at ``item``'s address, as the walk
    read it from the page tables (``RmapItem.page_ksm``), whatever the
    item's state: what ``should_skip_rmap_item()`` tests. A fork-shared
    page that became KSM through its other sharer is KSM for an UNSTABLE
    item too; a STABLE item whose page was COW-broken or unmerged is not.
    Snapshots without page tables (``pages=False``) fall back to the
    replay: a STABLE item whose PTE maps its own node's page."""
    if item.page_ksm is not None or item.pte != "unread":
        return bool(item.page_ksm)
    if item.state != "stable" or item.stable_node is None:
        return False
    idx = snap.__dict__.get("_mapped_idx")
    if idx is None:      # built once per snapshot (replay_walks drops it)
        idx = snap._mapped_idx = {(n.id, m["mm"], m["address"]): bool(m["mapped"])
                                  for n in snap.stable_nodes for m in n.mappings}
    return idx.get((item.stable_node, item.mm, item.address), False)


def will_visit(item: RmapItem) -> bool:
    """Will ksmd's next pass visit ``item`` (``RmapItem.will_visit``)? Items
    of snapshots without page tables count as visited."""
    return item.will_visit is not False


def smartscan_next(snap: Snapshot, item: RmapItem, visits: int = 1) -> dict:
    """What ksmd's next ``visits`` visits do to ``item`` with SmartScan.

    ``{"page_is_ksm", "freed": None or why ksmd frees the item unread on its
    next pass (``RmapItem.not_visited``: then nothing is read, skipped or
    aged, and ``schedule`` is empty), "reads": (age, remaining_skips) the
    first visit reads,
    "reads_pgoff": those bytes are the stored pgoff's (the union hazard),
    "schedule": "P" (processed) / "S" (skipped) per visit, "skipped": count,
    "age", "remaining_skips": after the visits, "leaves_stable_tree": the
    visit (1-based) that takes a STABLE item off its stable node, or None}``.
    A KSM page is never skipped and its item does not age. A STABLE item
    whose page is not KSM (COW-broken, unmerged) leaves its stable node at
    its first visit; on kernels with the union, ``age`` / ``remaining_skips``
    are then bytes 4 and 5 of the stored pgoff (v8 does not read them and
    resets them to 0 with the pgoff).
    """
    ksm = page_is_ksm(snap, item)
    res = {"page_is_ksm": ksm, "freed": None, "reads": (item.age, item.remaining_skips),
           "reads_pgoff": False, "schedule": "", "skipped": 0, "age": item.age,
           "remaining_skips": item.remaining_skips, "leaves_stable_tree": None}
    if not will_visit(item):
        res.update(freed=item.not_visited, reads=None,
                   leaves_stable_tree=1 if item.state == "stable" else None)
        return res
    if ksm or not snap.counters.get("smart_scan", 1) or visits <= 0:
        return res
    age, skips = item.age, item.remaining_skips
    sched = []
    first = 0
    if item.state == "stable":
        reads = _smartscan_reads_stable(snap)
        res["leaves_stable_tree"] = 1
        if reads is False:             # v8: not read; the removal zeroes the union
            sched.append("P")
            age, skips = 0, 0
            res["reads"] = None
            first = 1
        else:
            res["reads_pgoff"] = bool(snap.kernel.has_stored_pgoff)
    for _ in range(first, visits):
        age, skips, skipped = smartscan_visit(age, skips)
        sched.append("S" if skipped else "P")
    res.update(schedule="".join(sched), skipped=sched.count("S"), age=age,
               remaining_skips=skips)
    return res


def scan_position(snap: Snapshot, item: RmapItem) -> tuple[int, int]:
    """Where ``item`` is in ksmd's scan order: (mm slot index, address)."""
    return _slot_index(snap).get(item.mm, 1 << 30), item.address


def _slot_index(snap: Snapshot) -> dict:
    if not hasattr(snap, "_slot_idx"):
        snap._slot_idx = {s.mm: k for k, s in enumerate(snap.mm_slots)}
    return snap._slot_idx


def _pending(snap: Snapshot, item: RmapItem) -> int:
    """1 if ksmd has not yet visited ``item`` in its current pass."""
    cur = snap.scan.get("mm_slot")
    if snap.scan.get("at_pass_start") or cur is None:
        return 1
    k = next((k for k, s in enumerate(snap.mm_slots) if s.id == cur), None) \
        if "_cursor_idx" not in snap.__dict__ else snap._cursor_idx
    snap._cursor_idx = k
    if k is None:
        return 1
    return int(scan_position(snap, item) >= (k, snap.scan.get("address", 0)))


def visits_between(a: Snapshot, b: Snapshot, item: RmapItem) -> int:
    """How many times ksmd visited ``item`` between snapshots ``a`` and
    ``b``: the full scans between them, corrected by where the scan cursor
    (``ksm_scan``) stood in each. Exact when ksmd was idle at both."""
    d = b.scan["seqnr"] - a.scan["seqnr"]
    return d + _pending(a, item) - _pending(b, item)


def smartscan_forecast(snap: Snapshot, full_scans: int) -> dict:
    """Predict, from ``snap`` alone, the ``pages_skipped`` increase over the
    next ``full_scans`` full scans (per count 0..full_scans) and each
    item's age / remaining_skips after them. Assumes no page changes its
    KSM status meanwhile (no new merges, no writes)."""
    per_n = [0] * (full_scans + 1)
    items = {}
    for it in snap.rmap_items:
        p = _pending(snap, it)
        res = items[it.id] = smartscan_next(snap, it, full_scans - 1 + p if full_scans else 0)
        # a shorter run is a prefix of the same schedule
        for n in range(1, full_scans + 1):
            per_n[n] += res["schedule"][:n - 1 + p].count("S")
    return {"pages_skipped_delta": per_n, "items": items}


def union_hazard(snap: Snapshot) -> list[dict]:
    """STABLE rmap_items that ksmd's next pass will visit (:func:`will_visit`)
    although the page mapped there is no longer KSM (COW-broken): the visit
    runs ``should_skip_rmap_item()`` on them. Items it frees unread (page
    unmapped, unmerged, swapped, zero page, mm exited) are not hazards. On a kernel
    with the stored pgoff in the union (and SmartScan reading stable items,
    i.e. not v8), ``age`` / ``remaining_skips`` / ``oldchecksum`` are then
    read from (and ``age++`` written into) the pgoff's bytes. One row per
    item: pid, address, stored pgoff, the bytes SmartScan reads, and what
    the next visit does."""
    out = []
    if not snap.counters.get("smart_scan", 1):
        return out       # should_skip_rmap_item() returns before it reads anything
    reads = _smartscan_reads_stable(snap)
    for it in snap.rmap_items:
        if it.state != "stable" or not will_visit(it) or page_is_ksm(snap, it):
            continue
        nxt = smartscan_next(snap, it, 1)
        out.append({"item": it.id, "pid": it.pid, "comm": it.comm, "address": it.address,
                    "stable_node": it.stable_node, "stored_pgoff": it.stored_pgoff,
                    "oldchecksum": it.oldchecksum, "age": it.age,
                    "remaining_skips": it.remaining_skips,
                    "hazard": bool(snap.kernel.has_stored_pgoff and reads),
                    "smartscan_reads_stable": reads,
                    "next_visit": nxt["schedule"][:1] or None,
                    "age_after": nxt["age"], "skips_after": nxt["remaining_skips"],
                    "pgoff_after": (None if not (snap.kernel.has_stored_pgoff and reads)
                                    else (it.raw_union & ~(0xFFFF << 32))
                                    | (nxt["age"] << 32) | (nxt["remaining_skips"] << 40))})
    return out


def stale_items(snap: Snapshot, rule: str | None = None) -> list[RmapItem]:
    """rmap_items whose own mapping the walk under ``rule`` misses
    (``walk[rule] is False``; by default under any rule), and STABLE items
    whose stored index is not their mapping's (``stored_status`` stale /
    unset)."""
    rules = [rule] if rule else list(RULES)
    return [i for i in snap.rmap_items
            if (i.walk and any(i.walk.get(r) is False for r in rules))
            or i.stored_status in ("stale", "unset")]
