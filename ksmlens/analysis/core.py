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

import pandas as pd

from ksmlens.errors import KsmlensError
from ksmlens.kernel.constants import U8_MAX, VM_GROWSDOWN
from ksmlens.kernel.itree import interval_tree_foreach
from ksmlens.kernel.rules import RULE_HELP, RULES, UnionLayout
from ksmlens.kernel.variants import VARIANTS, kernel_walk_rule
from ksmlens.lens.model import RmapItem, Snapshot

__all__ = ["pgoff_status", "stored_status", "item_status", "range_walk", "STATUSES", "STORED_STATUSES",
           "RULES", "RULE_HELP", "VARIANT_RULE",
           "kernel_walk_rule", "anon_vma_query",
           "replay_walks", "walk_misses", "skip_age", "smartscan_visit",
           "smartscan_next", "smartscan_forecast", "page_is_ksm", "scan_position",
           "visits_between", "union_hazard", "stale_items", "will_visit",
           "address_axis_frame", "address_axis_frames", "AXIS_RULE_STATUSES", "AXIS_VISITS"]

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

# What each lab variant's rmap_walk_ksm() searches (ksmlens.kernel.variants).
VARIANT_RULE = {v.name: v.walk_rule for v in VARIANTS.values()}


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


def replay_walks(snap: Snapshot) -> Snapshot:
    """Replay every rule's ``rmap_walk_ksm()`` on ``snap``'s own tables and
    fill ``snap.mappings``, each item's ``walk_*`` and each node's
    ``reachable`` / ``unreachable`` / ``unmappable_*`` in place (returns
    ``snap``); see :func:`ksmlens.lens.snapshot.replay_tables`. A fresh
    snapshot is already replayed: this is for saved and hand-made ones."""
    from ksmlens.lens.replay import replay_tables
    return replay_tables(snap)


def walk_misses(snap: Snapshot, rule: str | None = None) -> list[dict]:
    """The mapped mappings that ``rule`` (default: the kernel's own) misses,
    one row per (stable node, mapping): the mapping's fields plus ``node``,
    ``kpfn`` and ``rule``."""
    rule = rule or snap.kernel.walk_rule
    if rule is None:
        raise KsmlensError("this kernel's rmap walk rule is unknown",
                           f"name one: {', '.join(RULES)}")
    if rule == "stored" and not snap.kernel.has_stored_pgoff:
        raise KsmlensError(f"{snap.kernel.release} has no stored pgoff "
                           "(struct ksm_rmap_item has no stored index member)",
                           "ask for stock or v3, or snapshot a union/v8 kernel")
    m = snap.mappings
    miss = m[m["mapped"].fillna(False) & ~m[f"found_{rule}"].fillna(True)]
    kpfn = dict(zip(snap.stable_nodes["id"], snap.stable_nodes["kpfn"]))
    out = []
    for r in miss.to_dict("records"):
        d = {k: (None if v is pd.NA or (isinstance(v, float) and v != v) else v)
             for k, v in r.items() if not k.startswith("found_") and k != "node"}
        d["found"] = {x: (None if r[f"found_{x}"] is pd.NA else bool(r[f"found_{x}"]))
                      for x in RULES}
        d.update(node=r["node"], kpfn=kpfn.get(r["node"]), rule=rule)
        out.append(d)
    return out


# ------------------------------------------------------------------ SmartScan



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
    v = VARIANTS.get(snap.kernel.variant or "")
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
    idx = snap._records.get("mapped_idx")
    if idx is None:      # built once per snapshot (dropped by Snapshot.changed())
        m = snap.mappings
        idx = snap._records["mapped_idx"] = {
            (n, mm, a): bool(v) for n, mm, a, v in zip(m["node"], m["mm"], m["address"],
                                                      m["mapped"].fillna(False))}
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
    if ksm or not smartscan_on(snap) or visits <= 0:
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
    idx = snap._records.get("slot_idx")
    if idx is None:
        idx = snap._records["slot_idx"] = {s.mm: k for k, s in enumerate(snap.slots())}
    return idx


def _pending(snap: Snapshot, item: RmapItem) -> int:
    """1 if ksmd has not yet visited ``item`` in its current pass."""
    cur = snap.scan.get("mm_slot")
    if snap.scan.get("at_pass_start") or cur is None:
        return 1
    if "cursor_idx" not in snap._records:
        snap._records["cursor_idx"] = next(
            (k for k, s in enumerate(snap.slots()) if s.id == cur), None)
    k = snap._records["cursor_idx"]
    if k is None:
        return 1
    return int(scan_position(snap, item) >= (k, snap.scan.get("address", 0)))


def visits_between(a: Snapshot, b: Snapshot, item: RmapItem) -> int:
    """How many times ksmd visited ``item`` between snapshots ``a`` and
    ``b``: the full scans between them, corrected by where the scan cursor
    (``ksm_scan``) stood in each. Exact when ksmd was idle at both."""
    d = b.scan["seqnr"] - a.scan["seqnr"]
    return d + _pending(a, item) - _pending(b, item)


NO_SMARTSCAN = ("this kernel has no SmartScan (struct ksm_rmap_item has no age/remaining_skips, "
                "no /sys/kernel/mm/ksm/smart_scan: they came with commit 5e924ff54d08, "
                "\"mm/ksm: add \"smart\" page scanning mode\", 6.7)")


def require_smartscan(has_smartscan: bool, what: str) -> None:
    """Raise :class:`KsmlensError` in one line, naming ``what`` (a command),
    when the kernel has no SmartScan (``KernelInfo.smartscan`` /
    :attr:`ksmlens.lens.helpers.KsmKernel.smartscan`)."""
    if not has_smartscan:
        raise KsmlensError(f"{what}: {NO_SMARTSCAN}",
                           "run it on a kernel with SmartScan (the 6.12 lab kernels)")


def smartscan_on(snap: Snapshot) -> bool:
    """Whether ksmd skips anything: the kernel has SmartScan and ``smart_scan``
    is 1 (a snapshot without the counter, from before ksmlens read it, counts
    as on)."""
    return bool(snap.kernel.smartscan and snap.counters.get("smart_scan", 1))


def smartscan_forecast(snap: Snapshot, full_scans: int) -> dict:
    """Predict, from ``snap`` alone, the ``pages_skipped`` increase over the
    next ``full_scans`` full scans (per count 0..full_scans) and each
    item's age / remaining_skips after them. Assumes no page changes its
    KSM status meanwhile (no new merges, no writes)."""
    per_n = [0] * (full_scans + 1)
    items = {}
    for it in snap.items():
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
    if not smartscan_on(snap):
        return out       # should_skip_rmap_item() returns before it reads anything
    reads = _smartscan_reads_stable(snap)
    union = UnionLayout(**snap.kernel.union_layout)
    for it in snap.items():
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
                                    else union.with_smartscan(it.raw_union, nxt["age"],
                                                              nxt["remaining_skips"]))})
    return out


def stale_items(snap: Snapshot, rule: str | None = None) -> list[RmapItem]:
    """rmap_items whose own mapping the walk under ``rule`` misses
    (``walk[rule] is False``; by default under any rule), and STABLE items
    whose stored index is not their mapping's (``stored_status`` stale /
    unset)."""
    rules = [rule] if rule else list(RULES)
    df = snap.rmap_items
    if not len(df):
        return []
    # the same test on the columns (walk_<rule> False: the walk misses it),
    # then records for those rows only
    bad = df["stored_status"].isin(["stale", "unset"]).fillna(False).to_numpy(dtype=bool)
    for r in rules:
        bad = bad | (df[f"walk_{r}"] == False).fillna(False).to_numpy(dtype=bool)  # noqa: E712
    return snap.item_records(df[bad])


# ------------------------------------------------------------------ the address axis

# What each rule's walk does for one rmap_item (address_axis_frame's rule_* columns)
AXIS_RULE_STATUSES = ("found", "missed", "not_stable", "no_vma", "n/a")
# What one of ksmd's next visits does to an rmap_item (visit_* columns)
AXIS_VISITS = ("processed", "skipped", "freed")
_VISIT_CHAR = {"P": "processed", "S": "skipped", "F": "freed"}


def _axis_rule_status(item: RmapItem, rule: str, has_stored: bool) -> str:
    if rule == "stored" and not has_stored:
        return "n/a"
    if item.vma_start is None:
        return "no_vma"
    if item.state != "stable":
        return "not_stable"
    v = (item.walk or {}).get(rule)
    return "n/a" if v is None else ("found" if v else "missed")


def address_axis_frame(snap: Snapshot, pid: int, visits: int = 8) -> pd.DataFrame:
    """Plain data of the address-axis picture: one row per rmap_item of
    ``pid``'s mm(s), by address, with where it sits, what each rmap walk
    rule does for it and what SmartScan's next ``visits`` visits do to it.

    Columns (kernel names where there is one):

    * ``item``, ``pid``, ``comm``, ``address``, ``vpn`` (``address >>
      PAGE_SHIFT``), ``state``, ``stable_node``
    * the VMA now: ``vma_start``, ``vma_end``, ``vm_pgoff``;
      ``vma_shift`` = ``vm_pgoff - (vm_start >> PAGE_SHIFT)`` in pages (not 0:
      the VMA no longer sits where its pgoff says, e.g. after ``mremap()``;
      None without a VMA); ``addr_pgoff``, ``linear_page_index``,
      ``stored_pgoff``, ``pgoff_status``, ``pgoff_cause``, ``stored_status``
    * ``rule_stock``, ``rule_v3``, ``rule_stored``: one of
      :data:`AXIS_RULE_STATUSES` -- ``found`` / ``missed`` (the replayed
      ``rmap_walk_ksm()`` under that rule finds / misses the item's own
      mapping: ``RmapItem.walk``), ``not_stable`` (no rmap walk runs from an
      item that is not on a stable node), ``no_vma`` (the item outlived its
      mapping), ``n/a`` (``stored`` on a kernel without a stored index);
      ``kernel_rule`` is the booted kernel's own rule (``walk_rule``)
    * SmartScan (:func:`smartscan_next`, mm/ksm.c ``should_skip_rmap_item()``):
      ``page_ksm`` (a KSM page is never skipped and does not age), ``age``,
      ``remaining_skips``, ``reads_pgoff`` (the first visit reads those from
      the stored pgoff's bytes: the union), ``next`` and ``visit_1`` ..
      ``visit_<visits>``: one of :data:`AXIS_VISITS` (``freed``: ksmd frees
      the item unread at its next pass, ``freed_why`` says why; the later
      visits are then None), ``schedule`` ("P"/"S"/"F" per visit),
      ``skipped``, ``age_after``, ``skips_after``, ``leaves_stable_tree``

    ``df.attrs``: ``pid``, ``comm``, ``visits``, ``release``, ``variant``,
    ``walk_rule``, ``has_stored_pgoff``, ``smartscan_on``, ``page_shift``,
    ``full_scans``. Works on a loaded snapshot. :class:`KsmlensError` if
    ``pid`` has no rmap_items (naming the pids that have).
    """
    if visits < 1:
        raise KsmlensError(f"visits={visits}: at least one visit", "pass visits >= 1")
    shift = snap.kernel.page_shift
    items = sorted(snap.items_of(pid), key=lambda i: i.address)
    if not items:
        have = sorted({i.pid for i in snap.items() if i.pid is not None})
        raise KsmlensError(f"pid {pid} has no rmap_items in this snapshot",
                           f"pids with rmap_items: {have or 'none'}")
    has = bool(snap.kernel.has_stored_pgoff)
    on = smartscan_on(snap) and bool(snap.kernel.smartscan)
    rows = []
    for it in items:
        nxt = smartscan_next(snap, it, visits)
        if nxt["freed"]:
            sched = "F"
        elif nxt["schedule"]:
            sched = nxt["schedule"]
        else:                          # a KSM page, or SmartScan off: never skipped
            sched = "P" * visits
        vis = [_VISIT_CHAR[c] for c in sched] + [None] * (visits - len(sched))
        row = {"item": it.id, "pid": it.pid, "comm": it.comm, "address": it.address,
               "vpn": it.address >> shift, "state": it.state, "stable_node": it.stable_node,
               "vma_start": it.vma_start, "vma_end": it.vma_end, "vm_pgoff": it.vm_pgoff,
               "vma_shift": (None if it.vma_start is None
                             else it.vm_pgoff - (it.vma_start >> shift)),
               "addr_pgoff": it.addr_pgoff, "linear_page_index": it.linear_page_index,
               "stored_pgoff": it.stored_pgoff, "pgoff_status": it.pgoff_status or None,
               "pgoff_cause": it.pgoff_cause, "stored_status": it.stored_status}
        for r in RULES:
            row[f"rule_{r}"] = _axis_rule_status(it, r, has)
        row.update({"kernel_rule": snap.kernel.walk_rule, "page_ksm": nxt["page_is_ksm"],
                    "age": it.age, "remaining_skips": it.remaining_skips,
                    "reads_pgoff": nxt["reads_pgoff"], "next": vis[0],
                    "freed_why": nxt["freed"], "schedule": sched,
                    "skipped": nxt["skipped"], "age_after": nxt["age"],
                    "skips_after": nxt["remaining_skips"],
                    "leaves_stable_tree": nxt["leaves_stable_tree"]})
        row.update({f"visit_{k + 1}": v for k, v in enumerate(vis)})
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in ("address", "vpn", "vma_start", "vma_end", "vm_pgoff", "addr_pgoff",
              "linear_page_index", "stored_pgoff"):
        df[c] = df[c].astype("UInt64")
    for c in ("vma_shift", "leaves_stable_tree", "pid"):
        df[c] = df[c].astype("Int64")
    df.attrs.update(pid=pid, comm=next((i.comm for i in items if i.comm), None),
                    visits=visits, release=snap.kernel.release, variant=snap.kernel.variant,
                    walk_rule=snap.kernel.walk_rule, has_stored_pgoff=has, smartscan_on=on,
                    page_shift=shift, full_scans=snap.counters.get("full_scans"))
    return df


def address_axis_frames(frames, pid: int, visits: int = 8) -> pd.DataFrame:
    """:func:`address_axis_frame` of each snapshot of a timeline (a list of
    :class:`Snapshot`, or an object with ``frames`` such as
    :class:`ksmlens.experiments.watch.Timeline`), concatenated with
    ``frame`` (0-based) and ``full_scans`` columns; a frame where ``pid`` has
    no rmap_items adds no rows. :class:`KsmlensError` when no frame has any."""
    frames = list(getattr(frames, "frames", frames))
    parts = []
    for k, s in enumerate(frames):
        try:
            d = address_axis_frame(s, pid, visits)
        except KsmlensError:
            continue
        d.insert(0, "full_scans", s.counters.get("full_scans"))
        d.insert(0, "frame", k)
        parts.append(d)
    if not parts:
        raise KsmlensError(f"pid {pid} has no rmap_items in any of {len(frames)} snapshot(s)",
                           "pick a pid of the scenario's processes")
    df = pd.concat(parts, ignore_index=True)
    df.attrs.update(parts[-1].attrs, frames=len(frames))
    return df
