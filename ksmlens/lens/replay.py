"""``rmap_walk_ksm()`` replayed on what a walk read, into tables.

The pairs come from :func:`ksmlens.kernel.rmap_walk.candidates` (one join
of the stable rmap_items with their anon_vma's chains answers every rule);
here they become the ``mappings`` table (one row per (KSM page, mm,
address) in the kernel's order), each item's ``walk_*`` and each node's
``reachable`` / ``unreachable`` / ``unmappable_*``. :func:`replay_tables`
runs the same on a snapshot's own tables (a saved file, a hand-made one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ksmlens.kernel import rules
from ksmlens.kernel.rmap_walk import candidates
from ksmlens.kernel.rules import RULES
from ksmlens.lens.model import MAPPING_COLUMNS, NODE_COLUMNS, Snapshot, table
from ksmlens.lens.raw import Raw, masked, release_memory

__all__ = ["avc_table", "replay_tables", "replay_raw", "visit_pairs", "node_kpfn_of_pairs"]

_U = np.uint64


def _inorder(rec: dict) -> list[str]:
    """avc ids of one recorded anon_vma tree in in-order (the kernel's
    iteration order: by start pgoff)."""
    n = rec["nodes"]
    out, stack, a = [], [], rec["root"]
    while stack or a:
        while a:
            stack.append(a)
            a = n[a]["left"]
        a = stack.pop()
        out.append(a)
        a = n[a]["right"]
    return out


def avc_table(anon_vmas: dict) -> dict:
    """Every recorded anon_vma_chain as arrays, each tree in in-order:
    ``anon_vma`` / ``avc`` / ``mm`` ids (lists) and ``vm_start``,
    ``vm_end``, ``vm_pgoff`` (uint64)."""
    av, ids, mm, vs, ve, pg = [], [], [], [], [], []
    for a, rec in anon_vmas.items():
        for c in _inorder(rec) if rec.get("root") else []:
            d = rec["nodes"][c]
            av.append(a)
            ids.append(c)
            mm.append(d["mm"])
            vs.append(d["vm_start"])
            ve.append(d["vm_end"])
            pg.append(d["vm_pgoff"])
    u = np.uint64
    return {"anon_vma": av, "avc": ids, "mm": mm, "vm_start": np.array(vs, dtype=u),
            "vm_end": np.array(ve, dtype=u), "vm_pgoff": np.array(pg, dtype=u)}


def visit_pairs(raw: Raw) -> dict:
    """The pairs ``rmap_walk_ksm()`` visits for every KSM page
    (:func:`ksmlens.kernel.rmap_walk.candidates`) from the items and the
    recorded anon_vma trees, plus ``avcs`` (:func:`avc_table`) and
    ``avc_mm`` (the avcs' mm keys, comparable with ``items["mm"]``)."""
    it = raw.items
    avcs = avc_table(raw.anon_vmas)
    stable = it["state"] == rules.STATE_STABLE
    av_code = {a: k for k, a in enumerate(dict.fromkeys(avcs["anon_vma"]))}
    avc_av = np.array([av_code[a] for a in avcs["anon_vma"]], dtype=np.int64)
    avc_mm = np.array([raw.key(m) for m in avcs["mm"]], dtype=np.uint64)
    item_av = np.full(it["addr"].size, -1, np.int64)
    sidx = np.nonzero(stable & (it["anon_vma"] != 0))[0]
    if sidx.size and av_code:
        u, inv = np.unique(it["anon_vma"][sidx], return_inverse=True)
        lut = np.array([av_code.get(raw.name(int(a)), -1) for a in u.tolist()],
                       dtype=np.int64)
        item_av[sidx] = lut[inv]
    # mm keys as small codes for the join
    allmm, mm_inv = np.unique(np.concatenate([it["mm"], avc_mm]), return_inverse=True)
    item_mm = mm_inv[:it["mm"].size].astype(np.int64)
    avc_mmc = mm_inv[it["mm"].size:].astype(np.int64)
    stored = it["union"] if raw.kernel.has_stored_pgoff else None
    c = candidates(item_av, item_mm, it["address"], stored, avc_av, avc_mmc,
                   avcs["vm_start"], avcs["vm_end"], avcs["vm_pgoff"], raw.kernel.page_shift)
    c["avcs"] = avcs
    c["avc_mm"] = avc_mm
    return c


def node_kpfn_of_pairs(raw: Raw, c: dict) -> np.ndarray:
    naddr = raw.nodes["addr"]
    if not naddr.size:
        return np.zeros(c["item"].size, np.uint64)
    order = np.argsort(naddr)
    sn = naddr[order]
    want = raw.items["head"][c["item"]]
    j = np.minimum(np.searchsorted(sn, want), sn.size - 1)
    return np.where(sn[j] == want, raw.nodes["kpfn"][order][j], _U(0))


def _codes(uniq: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in the sorted ``uniq`` (-1 where absent)."""
    if not uniq.size:
        return np.full(values.size, -1, np.int64)
    j = np.minimum(np.searchsorted(uniq, values), uniq.size - 1)
    return np.where(uniq[j] == values, j, -1)


def _lookup(keys: tuple, queries: tuple) -> np.ndarray:
    """For each query row (a tuple of equal-length key arrays), the index of
    the row of ``keys`` (unique rows) equal to it, or -1: one lexsort of both
    sets, each query matched with the last key row sorted before it."""
    nk = keys[0].size
    cols = [np.concatenate([np.asarray(k, dtype=np.int64) if k.dtype != np.uint64 else
                            k.view(np.int64) ^ np.int64(-2**63),
                            np.asarray(q, dtype=np.int64) if q.dtype != np.uint64 else
                            q.view(np.int64) ^ np.int64(-2**63)])
            for k, q in zip(keys, queries)]
    tag = np.concatenate([np.zeros(nk, np.int8), np.ones(queries[0].size, np.int8)])
    o = np.lexsort([tag] + cols[::-1])
    is_key = tag[o] == 0
    last = np.maximum.accumulate(np.where(is_key, np.arange(o.size), -1))
    qpos = np.flatnonzero(~is_key)
    lk = last[qpos]
    ok = lk >= 0
    src = o[np.maximum(lk, 0)]
    for col in cols:
        ok &= col[src] == col[o[qpos]]
    out = np.full(queries[0].size, -1, np.int64)
    out[o[qpos] - nk] = np.where(ok, src, -1)
    return out


def _owners(raw: Raw, mm: np.ndarray):
    """pid (Int64) and comm (Categorical) of the mm slot of each mm key."""
    smm = np.array([s["mm"] for s in raw.slots], dtype=np.uint64)
    spid = np.array([-1 if s["pid"] is None else s["pid"] for s in raw.slots], dtype=np.int64)
    comms = [s["comm"] for s in raw.slots]
    cats = list(dict.fromkeys(c for c in comms if c is not None))
    scode = np.array([-1 if c is None else cats.index(c) for c in comms], dtype=np.int64)
    if not smm.size:
        return (pd.array([None] * mm.size, dtype="Int64"),
                pd.Categorical.from_codes(np.full(mm.size, -1), categories=cats))
    o = np.argsort(smm)
    j = np.minimum(np.searchsorted(smm[o], mm), smm.size - 1)
    found = smm[o][j] == mm
    k = o[j]
    pid = masked(spid[k], found & (spid[k] >= 0), "Int64")
    return pid, pd.Categorical.from_codes(np.where(found, scode[k], -1), categories=cats)


def replay_raw(raw: Raw):
    """The stable_nodes table and the replayed mappings: per KSM page, the
    stock walk's (mm, address) pairs in the kernel's order with what each
    rule finds; per stable item, whether each rule finds its own mapping."""
    nd, it = raw.nodes, raw.items
    k = raw.kernel
    nn = nd["addr"].size
    page = nd["kind"] != 1
    ids = raw.fmt(nd["addr"])
    ptes = np.zeros(nn, np.int64)
    mapped_pfns = it.get("mapped_pfns")
    have_ptes = mapped_pfns is not None
    c = raw.cand
    pages = c is not None and c.get("mapped") is not None      # mapped answers known
    if mapped_pfns is not None and mapped_pfns.size:
        u, cnt = np.unique(mapped_pfns, return_counts=True)
        j = np.searchsorted(u, nd["kpfn"])
        j = np.minimum(j, u.size - 1)
        ptes = np.where(u[j] == nd["kpfn"], cnt[j], 0)
    reach = np.zeros(nn, np.int64)
    unm = {r: np.zeros(nn, bool) for r in RULES}
    maps = None
    item_walk = None
    if c is not None and c["item"].size:
        order_node = np.argsort(nd["addr"])
        snd = nd["addr"][order_node]
        item_node = it["head"][c["item"]]
        j = np.minimum(np.searchsorted(snd, item_node), nn - 1)
        node_idx = np.where(snd[j] == item_node, order_node[j], -1)
        keep = node_idx >= 0
        avcs = c["avcs"]
        avc_mm = c["avc_mm"]
        known_mapped = c.get("mapped") is not None
        mapped_pairs = c["mapped"] if known_mapped else np.zeros(c["item"].size, bool)
        sel = np.nonzero(keep)[0]
        r_node, r_pass = node_idx[sel], c["pass"][sel]
        r_hpos, r_avc = it["hlist_pos"][c["item"][sel]], c["avc"][sel]
        # the kernel's order: node, pass, then the hlist, then the tree's in-order
        o = sel[np.lexsort((r_avc, r_hpos, r_pass, r_node))]
        r_node = node_idx[o]
        r_item = c["item"][o]
        r_mm = avc_mm[c["avc"][o]]
        r_addr = it["address"][r_item]
        mm_u, mmc = np.unique(r_mm, return_inverse=True)
        mmc = mmc.reshape(-1)
        # one mapping per (node, mm, address): its first pair in that order
        g = np.lexsort((r_addr, mmc, r_node))            # stable: kernel order inside
        brk = np.ones(g.size, bool)
        brk[1:] = ((r_node[g][1:] != r_node[g][:-1]) | (mmc[g][1:] != mmc[g][:-1])
                   | (r_addr[g][1:] != r_addr[g][:-1]))
        starts = np.flatnonzero(brk)
        first = g[starts]
        v3_any = np.logical_or.reduceat(c["v3"][o][g], starts)
        st_any = np.logical_or.reduceat(c["stored"][o][g], starts)
        out = np.argsort(first, kind="stable")
        first, v3_any, st_any = first[out], v3_any[out], st_any[out]
        mn, mmv, maddr = r_node[first], r_mm[first], r_addr[first]
        g_mmc = mmc[first]
        a_idx = c["avc"][o][first]
        fi = r_item[first]
        mapped = mapped_pairs[o][first]
        passno = c["pass"][o][first]
        del r_node, r_item, r_mm, r_addr, g, brk, starts, out, o, sel
        release_memory()
        has = k.has_stored_pgoff
        nm = mn.size
        vmas = (avcs["vm_start"][a_idx], avcs["vm_end"][a_idx], avcs["vm_pgoff"][a_idx])
        pid, comm = _owners(raw, mmv)
        maps = table({
            "node": ids.iloc[mn].reset_index(drop=True),
            "mm": raw.cat(mmv), "pid": pid, "comm": comm, "address": maddr,
            "vma_start": vmas[0], "vma_end": vmas[1], "vm_pgoff": vmas[2],
            "item": raw.fmt(it["addr"][fi]),
            "avc": pd.Categorical.from_codes(a_idx, categories=pd.Index(avcs["avc"], dtype="str")),
            "pass": passno,
            "mapped": masked(mapped, np.full(nm, known_mapped), "boolean"),
            "found_stock": np.ones(nm, bool), "found_v3": v3_any,
            "found_stored": masked(st_any, np.full(nm, has), "boolean")}, MAPPING_COLUMNS)
        del vmas, pid, comm, fi, a_idx, passno
        reach = np.bincount(mn[mapped], minlength=nn)
        unm["v3"] = np.bincount(mn[mapped & ~v3_any], minlength=nn) > 0
        unm["stored"] = np.bincount(mn[mapped & ~st_any], minlength=nn) > 0
        # each stable item: does each rule find its own (mm, address)?
        st = np.nonzero(it["state"] == rules.STATE_STABLE)[0]
        inode = it["head"][st]
        j = np.minimum(np.searchsorted(snd, inode), nn - 1)
        ni = np.where(snd[j] == inode, order_node[j], -1)
        pos = _lookup((mn, g_mmc, maddr), (ni, _codes(mm_u, it["mm"][st]), it["address"][st]))
        hit = pos >= 0
        p0 = np.maximum(pos, 0)
        item_walk = {}
        for r, found in (("stock", np.ones(nm, bool)), ("v3", v3_any), ("stored", st_any)):
            vals = pd.array(hit & found[p0], dtype="boolean")
            if r == "stored" and not has:
                vals[:] = pd.NA
            item_walk[r] = (vals, st)
    elif c is not None:
        st = np.nonzero(it["state"] == rules.STATE_STABLE)[0]
        item_walk = {r: (pd.array(np.zeros(st.size, bool) if not (r == "stored" and not
                                  k.has_stored_pgoff) else [None] * st.size, dtype="boolean"),
                         st) for r in RULES}
    # only for a page that is still this node's KSM page (a stale node's kpfn
    # may have been freed and reused: its mapcount is someone else's)
    own = page & nd["page_ksm"] & (nd["page_node"] == nd["addr"])
    unreach = np.where(own, np.maximum(0, nd["mapcount"] - reach), 0) if pages else \
        np.zeros(nn, np.int64)
    for r in RULES:
        if r == "stored" and not k.has_stored_pgoff:
            unm[r][:] = False
        else:
            unm[r] |= page & (unreach > 0)
    hv = nd["page_ok"]
    nodes_df = table({
        "id": ids, "kind": pd.Categorical.from_codes(nd["kind"].astype(np.int64),
                                                     categories=["regular", "chain", "dup"]),
        "chain": raw.fmt(nd["chain"]), "kpfn": masked(nd["kpfn"].astype(np.int64), page, "Int64"),
        "nid": nd["nid"], "rmap_hlist_len": nd["len"],
        "mapcount": masked(nd["mapcount"], page & hv, "Int64"),
        "page_is_ksm": masked(nd["page_ksm"], page & hv, "boolean"),
        "page_stable_node": raw.fmt(nd["page_node"], page & hv),
        "migrate_list": nd["migrate"], "ptes": masked(ptes, page & have_ptes, "Int64"),
        "reachable": masked(reach, page & pages, "Int64"),
        "unreachable": unreach,
        "unmappable_stock": unm["stock"], "unmappable_v3": unm["v3"],
        "unmappable_stored": unm["stored"]}, NODE_COLUMNS)
    return nodes_df, maps, item_walk


def replay_tables(snap: Snapshot) -> Snapshot:
    """Replay ``rmap_walk_ksm()`` again on a snapshot's own tables (a saved
    file, a hand-made snapshot): ``mappings``, each item's ``walk_*`` and
    each node's ``reachable`` / ``unreachable`` / ``unmappable_*``, in place
    (returns ``snap``). Whether a PTE maps each page (``mapped``) is taken
    from the snapshot's previous replay (unknown where it had none)."""
    it, nd = snap.rmap_items, snap.stable_nodes
    strings = pd.concat([it["id"], it["mm"], it["stable_node"], it["anon_vma"], nd["id"],
                         nd["chain"], nd["page_stable_node"],
                         pd.Series([m for a in snap.anon_vmas.values()
                                    for m in [x["mm"] for x in a["nodes"].values()]],
                                   dtype="str")], ignore_index=True).dropna().unique()
    names = ["?"] + [str(x) for x in strings]
    code = {x: k for k, x in enumerate(names)}

    def key(x):
        return 0 if x is None or x != x else code[x]
    names_arr = np.array(names, dtype=object)

    def ids(a, valid=None):
        a = np.asarray(a, dtype=np.int64)
        out = pd.Series(names_arr[a], dtype=object)
        bad = a == 0 if valid is None else (a == 0) | ~np.asarray(valid, bool)
        return out.where(~bad, None).astype("str")

    def col(df, c, dtype=np.uint64, fill=0):
        return df[c].to_numpy(dtype=dtype, na_value=fill)

    def keys(series):
        return np.array([key(x) for x in series.tolist()], dtype=np.uint64)
    state = pd.Series(it["state"]).map({n: k for k, n in enumerate(rules.STATE_NAMES)}
                                       ).to_numpy(np.uint8)
    stable = state == rules.STATE_STABLE
    stored = col(it, "stored_pgoff")
    items = {"addr": keys(it["id"]), "head": keys(it["stable_node"]),
             "anon_vma": keys(it["anon_vma"]), "mm": keys(it["mm"]),
             "address": col(it, "address"), "state": state,
             "hlist_pos": col(it, "hlist_pos", np.int64, -1),
             "union": stored, "has_stored": stable & snap.kernel.has_stored_pgoff}
    kind = pd.Series(nd["kind"]).map({"regular": 0, "chain": 1, "dup": 2}).to_numpy(np.int8)
    nodes = {"addr": keys(nd["id"]), "kind": kind, "chain": keys(nd["chain"]),
             "kpfn": col(nd, "kpfn"), "nid": col(nd, "nid", np.int32),
             "len": col(nd, "rmap_hlist_len", np.int32),
             "mapcount": col(nd, "mapcount", np.int64), "page_ok": nd["mapcount"].notna()
             .to_numpy(), "page_ksm": col(nd, "page_is_ksm", bool, False),
             "page_node": keys(nd["page_stable_node"]), "migrate": col(nd, "migrate_list", bool)}
    raw = Raw(kernel=snap.kernel, counters=snap.counters, scan=snap.scan, meta={},
              items=items, nodes=nodes, slots=[{"mm": key(s), "pid": p, "comm": c}
                                               for s, p, c in zip(snap.mm_slots["mm"],
                                                                  snap.mm_slots["pid"],
                                                                  snap.mm_slots["comm"])],
              anon_vmas=snap.anon_vmas)
    raw.name = lambda v: names[v] if 0 < v < len(names) else None
    raw.key = key
    raw.ids = ids
    raw.cand = visit_pairs(raw)
    old = snap.mappings
    if len(old) and old["mapped"].notna().any():
        # the previous answer per (node, mm, address)
        prev = {(key(n), key(m), int(a)): bool(v) for n, m, a, v in zip(
            old["node"], old["mm"], old["address"], old["mapped"]) if v is not pd.NA}
        kp = raw.cand
        nodes_of = items["head"][kp["item"]]
        mms = kp["avc_mm"][kp["avc"]]
        ad = items["address"][kp["item"]]
        kp["mapped"] = np.array([prev.get((int(n), int(m), int(a)), False)
                                 for n, m, a in zip(nodes_of, mms, ad)], dtype=bool)
    nodes_df, maps_df, item_walk = replay_raw(raw)
    for c in ("reachable", "unreachable", "unmappable_stock", "unmappable_v3",
              "unmappable_stored"):
        snap.stable_nodes[c] = nodes_df[c].to_numpy() if c.startswith("unm") or \
            c == "unreachable" else nodes_df[c]
    if maps_df is not None:
        snap.mappings = maps_df
    if item_walk is not None:
        for r in RULES:
            vals, sel = item_walk[r]
            colv = snap.rmap_items[f"walk_{r}"].array.copy()
            colv[sel] = vals
            snap.rmap_items[f"walk_{r}"] = colv
    snap.changed()
    return snap
