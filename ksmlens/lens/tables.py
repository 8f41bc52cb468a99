"""The tables of a snapshot, built from what the paused walk read."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ksmlens.kernel import rules
from ksmlens.kernel.constants import VM_GROWSDOWN
from ksmlens.kernel.rules import RULES
from ksmlens.lens.model import ITEM_COLUMNS, SLOT_COLUMNS, Snapshot, table
from ksmlens.lens.raw import (NOT_VISITED, PTE_NAMES, Raw, hx, masked, hex_ids,
                              release_memory)
from ksmlens.lens.replay import replay_raw

__all__ = ["finish"]

_U = np.uint64


def finish(raw: Raw) -> Snapshot:
    """Turn what :func:`walk_paused` read into a :class:`Snapshot`: the
    rmap_items, stable_nodes and mm_slots tables, and the rmap walk
    replayed under every rule (``mappings``, ``walk_*``, ``unmappable_*``,
    ``reachable`` / ``unreachable``). Pure computation."""
    k = raw.kernel
    it = raw.items
    shift = k.page_shift
    n = it["addr"].size
    stable = it["state"] == rules.STATE_STABLE
    has_vma = it["has_vma"]
    slot_pid = np.array([s["pid"] if s["pid"] is not None else -1 for s in raw.slots],
                        dtype=np.int64)
    pid = slot_pid[it["slot"]] if n else np.zeros(0, np.int64)
    comm_of_slot = [s["comm"] for s in raw.slots]
    cats = list(dict.fromkeys(c for c in comm_of_slot if c is not None))
    slot_code = np.array([cats.index(c) if c is not None else -1 for c in comm_of_slot]
                         + [-1], dtype=np.int64)
    comm = pd.Categorical.from_codes(slot_code[it["slot"]] if n else np.zeros(0, np.int64),
                                     categories=cats)
    lpi = it["lpi"]
    # pgoff status: address >> PAGE_SHIFT against linear_page_index
    moved = has_vma & (it["addr_pgoff"] != lpi)
    def enum(col, codes):
        return pd.Categorical.from_codes(codes, dtype=ITEM_COLUMNS[col])
    P = ITEM_COLUMNS["pgoff_status"].categories.get_loc
    status = enum("pgoff_status", np.select([~has_vma, moved], [P("no_vma"), P("moved")],
                                            P("ok")))
    C = ITEM_COLUMNS["pgoff_cause"].categories.get_loc
    cause = enum("pgoff_cause", np.select(
        [moved & it["vma_file"], moved & ((it["vm_flags"] & _U(VM_GROWSDOWN)) != 0),
         moved & (it["vm_pgoff"] != (it["vma_start"] >> _U(shift)))],
        [C("file"), C("stack"), C("mremap")], -1))
    stored = it["union"]
    hs = it["has_stored"]
    S = ITEM_COLUMNS["stored_status"].categories.get_loc
    st_status = enum("stored_status", np.select(
        [~hs, ~has_vma, stored == lpi, stored == 0],
        [-1, S("no_vma"), S("ok"), S("unset")], S("stale")))
    # non-stable items: does the v3 range meet the item's own VMA?
    last = rules.vma_last_pgoff(it["vma_start"], it["vma_end"], it["vm_pgoff"], shift)
    own_v3 = has_vma & (it["vm_pgoff"] <= it["addr_pgoff"]) & (it["addr_pgoff"] <= last)
    walk = {"stock": pd.array(np.where(has_vma, True, False), dtype="boolean"),
            "v3": pd.array(own_v3, dtype="boolean"),
            "stored": pd.array(np.zeros(n, bool), dtype="boolean")}
    for r in RULES:
        walk[r][~has_vma] = pd.NA
    walk["stored"][:] = pd.NA
    nodes_df, maps_df, item_walk = replay_raw(raw)
    raw.cand = None                     # the pairs are in the mappings table now
    release_memory()
    if item_walk is not None:
        for r in RULES:
            vals, sel = item_walk[r]
            walk[r][stable] = pd.NA
            walk[r][sel] = vals
    pages_read = it["visit_known"].any() or any(s.get("leaves") is not None for s in raw.slots)
    pte = pd.Categorical.from_codes(it["pte"].astype(np.int64), categories=list(PTE_NAMES))
    nv_codes = it["not_visited"].astype(np.int64)
    visited_known = it["visit_known"]
    data = {
        "id": hex_ids(it["addr"]), "mm": raw.cat(it["mm"]), "pid": pd.array(
            np.where(pid >= 0, pid, 0), dtype="Int64"),
        "comm": comm, "address": it["address"], "flags": it["flags"],
        "state": pd.Categorical.from_codes(it["state"].astype(np.int64),
                                           categories=list(rules.STATE_NAMES)),
        "seqnr": it["seqnr"], "in_unstable_tree": it["in_unstable_tree"],
        "stable_node": hex_ids(it["head"], stable), "anon_vma": raw.cat(it["anon_vma"], stable),
        "nid": masked(it["nid"], it["nid_ok"], "Int64"),
        "vma_start": masked(it["vma_start"], has_vma, "UInt64"),
        "vma_end": masked(it["vma_end"], has_vma, "UInt64"),
        "vm_pgoff": masked(it["vm_pgoff"], has_vma, "UInt64"),
        "vma_anon_vma": raw.cat(it["vma_anon_vma"], has_vma),
        "vma_file": masked(it["vma_file"], has_vma, "boolean"),
        "addr_pgoff": it["addr_pgoff"], "linear_page_index": masked(lpi, has_vma, "UInt64"),
        "stored_pgoff": masked(stored, hs, "UInt64"),
        "oldchecksum": it["oldchecksum"], "age": it["age"],
        "remaining_skips": it["remaining_skips"], "raw_union": it["union"],
        "vm_flags": masked(it["vm_flags"], has_vma, "UInt64"),
        "pgoff_status": status, "pgoff_cause": cause, "stored_status": st_status,
        "walk_stock": walk["stock"], "walk_v3": walk["v3"], "walk_stored": walk["stored"],
        "pte": pte, "pfn": masked(it["pfn"].astype(np.int64), it["pfn_ok"], "Int64"),
        "page_ksm": masked(it["page_ksm"] == 1, it["page_ksm"] >= 0, "boolean"),
        "will_visit": masked(nv_codes < 0, visited_known if pages_read
                              else np.zeros(n, bool), "boolean"),
        "not_visited": pd.Categorical.from_codes(np.where(nv_codes >= 0, nv_codes, -1),
                                                 categories=list(NOT_VISITED)),
        "hlist_pos": masked(it.get("hlist_pos", np.full(n, -1)),
                             it.get("hlist_pos", np.full(n, -1)) >= 0, "Int64"),
    }
    data["pid"][pid < 0] = pd.NA
    del it, stable, has_vma, lpi, stored, hs, pid
    raw.items = {}                      # the table holds what it needs (no second copy)
    items_df = table(data, ITEM_COLUMNS)
    del data
    release_memory()
    slots_df = _slots_table(raw)
    snap = Snapshot(k, raw.counters, nodes_df, items_df, slots_df, scan=raw.scan,
                    meta=dict(raw.meta), anon_vmas=raw.anon_vmas, mappings=maps_df)
    return snap


def _none_if(a: np.ndarray, empty: str):
    s = pd.Series(a, dtype=object)
    return s.where(s != empty, None)


def _slots_table(raw: Raw) -> pd.DataFrame:
    S = raw.slots
    data = {"id": [hx(s["id"]) for s in S], "mm": [hx(s["mm"]) for s in S],
            "pid": [s["pid"] for s in S], "comm": [s["comm"] for s in S],
            "rmap_items": [s["rmap_items"] for s in S],
            "mm_ksm_rmap_items": [s["mm_ksm_rmap_items"] for s in S],
            "mm_ksm_merging_pages": [s["mm_ksm_merging_pages"] for s in S],
            "pids": [s["pids"] for s in S], "mm_users": [s["mm_users"] for s in S],
            "mm_ksm_zero_pages": [s["mm_ksm_zero_pages"] for s in S],
            "ksm_zero_pages": [s.get("ksm_zero_pages") for s in S],
            "zero_pages": [s.get("zero_pages", []) for s in S]}
    return table(data, SLOT_COLUMNS)
