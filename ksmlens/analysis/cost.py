"""The cost of ``rmap_walk_ksm()``, per KSM page, per rule and per walk, from a snapshot.

mm/ksm.c ``rmap_walk_ksm()`` (6.12: mm/ksm.c:3110) runs, for one KSM page,
one loop per rmap_item of its stable node's hlist, twice (``search_new_forks``
0, then 1); each loop is an ``anon_vma_interval_tree_foreach()`` over the
item's anon_vma (``anon_vma_interval_tree_iter_first()`` once, then
``_iter_next()`` until it returns NULL) under the anon_vma lock. Every VMA
the tree yields is an iteration; it is *skipped* when the address is
outside ``[vm_start, vm_end)``, passed over when its mm is not the pass's,
and otherwise given to ``rwc->rmap_one()``. The walk ends early when the
caller says so (:data:`ksmlens.kernel.rmap_walk.WALKS`).

:func:`walk_cost` predicts every counter the kernel's loop produces, exactly,
from the snapshot's recorded anon_vma interval trees: the tree yields the
VMAs whose pgoff range ``[vm_pgoff, vma_last_pgoff()]`` meets the rule's
query, in its in-order. The rules (:data:`ksmlens.kernel.rules.RULES`):
``stock`` ``[0, ULONG_MAX]``, ``v3`` ``[address >> PAGE_SHIFT]``,
``stored`` ``[the stored index]`` (union, v8, mainline ``linear_page_index``).

One row per (KSM page, rule, walk), the columns (ints unless said):

==============  ==============================================================
``node``        the stable node (a regular node or a dup: one KSM page) id
``kpfn``        its page frame number
``rule``        the rule
``walk``        ``full``, ``try_to_migrate``, ``remove_migration_ptes``,
                ``folio_referenced``, ``try_to_unmap``, ``collect_procs_ksm``
``rmap_items``  items on the node's hlist (the loop runs over them per pass)
``first``       ``anon_vma_interval_tree_iter_first()`` calls (loops run)
``first_null``  of which returned NULL (an empty query)
``next``        ``anon_vma_interval_tree_iter_next()`` calls
``next_null``   of which returned NULL (loops that ran to their end)
``returned``    VMAs the iteration yielded (``first + next - nulls``)
``skipped``     yielded, but the address is outside ``vm_start``/``vm_end``
``other_mm``    yielded, in range, left for the other pass
``rmap_one``    calls that reached ``rwc->rmap_one()``
``missed``      mapped mappings of the page the rule never reaches (its own
                misses, plus those no rmap_item leads to)
``stopped``     bool: the walk ended early (the caller's stop condition held)
==============  ==============================================================

Assumes an uncontended walk: ``anon_vma_trylock_read()`` succeeds (no
``rwc->contended`` return under ``try_lock``), ``rmap_one()`` succeeds, and
``rwc->invalid_vma`` rejects nothing (reclaim through the memory cgroup of
every process mapping the page).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ksmlens.errors import KsmlensError
from ksmlens.kernel.constants import mce_early_kill
from ksmlens.kernel.rmap_walk import (COLLECT, STOP_REFERENCED, STOP_UNMAPPED, WALK_KINDS, WALKS,
                                      candidates)
from ksmlens.kernel.rules import RULES, vma_last_pgoff
from ksmlens.lens.model import Snapshot
from ksmlens.lens.replay import avc_table

__all__ = ["walk_cost", "cost_rules", "COST_COLUMNS", "COUNTERS", "worst_pages",
           "cost_by_node", "cost_by_process", "cost_totals"]

COUNTERS = ("first", "first_null", "next", "next_null", "returned", "skipped", "other_mm",
            "rmap_one")
COST_COLUMNS = ("node", "kpfn", "rule", "walk", "rmap_items", *COUNTERS, "missed", "stopped")


def cost_rules(snap: Snapshot, rules=None) -> list[str]:
    """The rules to predict under: ``rules`` (checked), else every rule the
    kernel could have (``stored`` only where it stores an index)."""
    have = [r for r in RULES if r != "stored" or snap.kernel.has_stored_pgoff]
    if rules is None:
        return have
    for r in rules:
        if r not in RULES:
            raise KsmlensError(f"unknown rmap walk rule {r!r}", f"choose one of {', '.join(RULES)}")
        if r not in have:
            raise KsmlensError(f"rule {r!r}: {snap.kernel.release} stores no page index in "
                               "struct ksm_rmap_item", f"ask for {' or '.join(have)}")
    return list(rules)


def _walks(kinds) -> list[str]:
    out = []
    for k in kinds:
        if k not in WALK_KINDS:
            raise KsmlensError(f"unknown walk kind {k!r}", f"choose from {', '.join(WALK_KINDS)}")
        out += [w for w in WALK_KINDS[k] if w not in out]
    return out


def _arrow_str(x):
    """``x`` (a Series, Index, array or list of ids) as one pyarrow string array."""
    import pyarrow as pa
    a = pa.array(x.array if isinstance(x, (pd.Series, pd.Index)) else
                 (x if isinstance(x, np.ndarray) else list(x)), from_pandas=True)
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()
    if pa.types.is_dictionary(a.type):
        a = a.dictionary_decode()
    if not pa.types.is_string(a.type):
        a = a.cast(pa.string())
    return a


def _unique_str(*parts) -> pd.Index:
    """The distinct non-null ids of ``parts``, in order of appearance."""
    import pyarrow as pa
    import pyarrow.compute as pc
    u = pc.unique(pa.concat_arrays([_arrow_str(p) for p in parts])).drop_null()
    return pd.Index(u.to_numpy(zero_copy_only=False), dtype=object)


def _index_in(values, keys) -> np.ndarray:
    """int64: each of ``values``' position in ``keys`` (-1 absent or null),
    by pyarrow (string columns: no Python object per value)."""
    import pyarrow.compute as pc
    return pc.fill_null(pc.index_in(_arrow_str(values), value_set=_arrow_str(keys)),
                        -1).to_numpy().astype(np.int64)


def walk_cost(snap: Snapshot, rules=None, kinds=("full", "migrate"), *,
              early_kill: bool | None = None, injector: str | None = None) -> pd.DataFrame:
    """Predict each KSM page's walk cost (the table in the module doc),
    for each of ``rules`` (default :func:`cost_rules`) and each walk of
    ``kinds`` (keys of :data:`ksmlens.kernel.rmap_walk.WALK_KINDS`: ``full``,
    ``migrate``, ``reclaim``, ``hwpoison``).

    ``hwpoison`` adds ``collect_procs_ksm`` (memory failure's own loop, see
    :data:`ksmlens.kernel.rmap_walk.COLLECT`; its rule is the range that
    loop searches, its ``rmap_one`` the ``add_to_kill_ksm()`` calls, its
    ``other_mm`` the VMAs of processes not collected) before
    ``try_to_unmap``. Who it collects comes from the snapshot's tasks
    (``KernelInfo.mce``): ``early_kill`` the sysctl
    ``vm.memory_failure_early_kill`` to assume (default: the recorded one),
    ``injector`` the mm (id) of the task that hits the page
    (``force_early``; default: per page, the mm of its first rmap_item).

    Raises :class:`KsmlensError` for an unknown rule or kind, a rule the
    kernel lacks, a snapshot without KSM pages or recorded anon_vma trees,
    and ``hwpoison`` on a snapshot that did not record the tasks."""
    rules = cost_rules(snap, rules)
    walks = _walks(kinds)
    k = snap.kernel
    if COLLECT in walks and k.mce is None:
        raise KsmlensError("this snapshot did not record the tasks' memory-failure policy "
                           "(a kernel without CONFIG_MEMORY_FAILURE, or a snapshot taken "
                           "before ksmlens did)", "take a new snapshot, or leave hwpoison out")
    nodes = snap.stable_nodes
    pages = nodes[nodes["kind"] != "chain"].reset_index(drop=True)
    if not len(pages):
        raise KsmlensError("this snapshot has no KSM page (no stable node)",
                           "merge something first, e.g. `ksmlens scenario run many-vmas --keep`")
    it = snap.rmap_items
    avcs = avc_table(snap.anon_vmas)
    av_ids = list(dict.fromkeys(avcs["anon_vma"]))
    page_ids = pages["id"]
    # the stable items of KSM pages whose anon_vma tree is recorded
    i_page = _index_in(it["stable_node"], page_ids)
    i_av = _index_in(it["anon_vma"], av_ids)
    keep = np.flatnonzero((it["state"] == "stable").to_numpy(bool) & (i_page >= 0)
                          & (i_av >= 0))
    st = it.take(keep)
    i_page, i_av = i_page[keep], i_av[keep]
    avc_av = _index_in(avcs["anon_vma"], av_ids)
    tree_lo = np.searchsorted(avc_av, np.arange(len(av_ids)))      # trees are contiguous
    tree_n = np.bincount(avc_av, minlength=len(av_ids))
    start = avcs["vm_pgoff"]
    last = vma_last_pgoff(avcs["vm_start"], avcs["vm_end"], start, k.page_shift)

    # the items, by page then hlist order
    i_hpos = st["hlist_pos"].to_numpy(np.int64, na_value=0)
    o = np.lexsort((i_hpos, i_page))
    i_page, i_hpos, i_av = i_page[o], i_hpos[o], i_av[o]
    mm_all = _unique_str(st["mm"], avcs["mm"])
    i_mm = _index_in(st["mm"], mm_all)[o]
    avc_mm = _index_in(avcs["mm"], mm_all)
    i_addr = st["address"].to_numpy(np.uint64)[o]
    i_stored = st["stored_pgoff"].to_numpy(np.uint64, na_value=0)[o] \
        if k.has_stored_pgoff else None
    n_pages, n_items = len(pages), i_page.size
    items_per_page = np.bincount(i_page, minlength=n_pages)

    # every (item, VMA) pair within the address: what rmap_one can be given
    c = candidates(i_av, i_mm, i_addr, i_stored, avc_av, avc_mm, avcs["vm_start"],
                   avcs["vm_end"], start, k.page_shift)
    p_item, p_avc, p_pass = c["item"], c["avc"], c["pass"]
    p_page = i_page[p_item]
    m_node = _index_in(snap.mappings["node"], page_ids)     # each mapping's page
    mapped, kpfn_mapcount = _mapped(snap, pages, m_node, p_page, avc_mm, mm_all, p_avc,
                                    i_addr[p_item])
    rows = []
    for rule in rules:
        q = None if rule == "stock" else (i_addr >> np.uint64(k.page_shift) if rule == "v3"
                                          else i_stored)
        R = tree_n[i_av] if q is None else _point_counts(avc_av, start, last, tree_lo, i_av, q)
        match = np.ones(p_item.size, bool) if rule == "stock" else c[rule]
        A = np.bincount(p_item[match], minlength=n_items)          # in range, either pass
        # the rule's calls in the kernel's order: page, pass, hlist position
        # (item order), tree in-order; for every walk that stops early
        sel = np.flatnonzero(match)
        sel = sel[np.lexsort((p_avc[sel], p_item[sel], p_pass[sel], p_page[sel]))]
        missed = _missed(snap, pages, m_node, rule)
        for walk in walks:
            stop = WALKS[walk][1]
            stopped = np.zeros(n_pages, bool)
            if walk == COLLECT:
                res = _collect(k.mce, early_kill, injector, i_page, i_av, q, R, mm_all,
                               i_mm, avc_av, avc_mm, start, last, n_pages, len(av_ids))
            else:
                res = _full(i_page, R, A, n_pages)
            if stop is not None:
                _early(res, stopped, stop, rule, q, i_page, i_hpos, i_av, R, A, items_per_page,
                       p_item[sel], p_avc[sel], p_pass[sel], p_page[sel], mapped[sel],
                       avc_mm, i_addr, kpfn_mapcount, tree_lo, last)
            rows.append((rule, walk, res, missed, stopped))
    # the frame, column by column (one array each, no per-part frames)
    parts = len(rows)
    import pyarrow as pa
    node_of = pa.array(np.tile(np.arange(n_pages, dtype=np.int64), parts))
    cols = {"node": pd.array(_arrow_str(page_ids).take(node_of), dtype=page_ids.dtype
                             if isinstance(page_ids.dtype, pd.StringDtype) else None),
            "kpfn": np.tile(pages["kpfn"].to_numpy(), parts),
            "rule": pd.Categorical.from_codes(
                np.repeat([list(RULES).index(r) for r, *_ in rows], n_pages),
                categories=list(RULES)),
            "walk": pd.Categorical.from_codes(
                np.repeat([list(WALKS).index(w) for _, w, *_ in rows], n_pages),
                categories=list(WALKS)),
            "rmap_items": np.tile(items_per_page.astype(np.int64), parts)}
    for c in COUNTERS:
        cols[c] = np.concatenate([r[2][c] for r in rows]).astype(np.int64, copy=False)
    cols["missed"] = np.concatenate([r[3] for r in rows]).astype(np.int64, copy=False)
    cols["stopped"] = np.concatenate([r[4] for r in rows])
    return pd.DataFrame(cols, columns=list(COST_COLUMNS))


def _point_counts(avc_av, start, last, tree_lo, i_av, q) -> np.ndarray:
    """Per item, the VMAs of its tree whose [start, last] contains q:
    #(start <= q) - #(last < q) (last < q implies start < q)."""
    vals, inv = np.unique(np.concatenate([start, last, q]), return_inverse=True)
    n = start.size
    rs, rl, rq = inv[:n], inv[n:2 * n], inv[2 * n:]
    big = np.int64(vals.size + 1)
    ks = np.sort(avc_av * big + rs)
    kl = np.sort(avc_av * big + rl)
    kq = i_av * big + rq
    le = np.searchsorted(ks, kq, side="right") - tree_lo[i_av]
    lt = np.searchsorted(kl, kq, side="left") - tree_lo[i_av]
    return (le - lt).astype(np.int64)


def _full(i_page, R, A, n_pages) -> dict:
    """A walk to its end: every item's loop, both passes."""
    def per_page(v):
        return np.bincount(i_page, weights=v, minlength=n_pages).astype(np.int64)
    Rp, Ap = per_page(R), per_page(A)
    return {"first": 2 * np.bincount(i_page, minlength=n_pages),
            "first_null": 2 * per_page((R == 0).astype(np.int64)),
            "next": 2 * Rp, "next_null": 2 * per_page((R > 0).astype(np.int64)),
            "returned": 2 * Rp, "skipped": 2 * (Rp - Ap), "other_mm": Ap.copy(), "rmap_one": Ap}


def _collect(mce, early_kill, injector, i_page, i_av, q, R, mm_all, i_mm, avc_av, avc_mm,
             start, last, n_pages, n_trees) -> dict:
    """collect_procs_ksm() for every page: per rmap_item, one tree query
    per collected process (:data:`ksmlens.kernel.rmap_walk.COLLECT`)."""
    sysctl = mce["early_kill"] if early_kill is None else int(early_kill)
    procs = [(str(mm), mce_early_kill(flags, sysctl)) for _, mm, flags in mce["processes"]]
    early = [mm for mm, e in procs if e]
    n_items = i_page.size
    # the poisoning task's mm, per page: given, or the page's first rmap_item's
    item_lo = np.searchsorted(i_page, np.arange(n_pages))
    mm_names = np.asarray(mm_all).astype(str)
    if injector is not None:
        inj = np.full(n_pages, str(injector), dtype=object)
    else:
        has = item_lo < n_items
        inj = np.where(has, mm_names[i_mm[np.minimum(item_lo, max(n_items - 1, 0))]]
                       if n_items else "", "").astype(object)
    # per page: how many processes of each mm are collected
    weight: dict[str, np.ndarray] = {}
    for mm in early:
        weight.setdefault(mm, np.zeros(n_pages, np.int64))[:] += 1
    for mm in set(inj.tolist()) - {""}:
        late = sum(1 for m, e in procs if m == mm and not e)
        if late or not any(m == mm for m, _ in procs):
            w = weight.setdefault(mm, np.zeros(n_pages, np.int64))
            w += np.where(inj == mm, max(late, 1), 0)
    n_proc = sum(weight.values()) if weight else np.zeros(n_pages, np.int64)
    e_item = np.asarray(n_proc)[i_page] if n_items else np.zeros(0, np.int64)
    k_item = np.zeros(n_items, np.int64)
    code = {m: i for i, m in enumerate(mm_names)}
    for mm, w in weight.items():
        c = code.get(mm)
        if c is None or not w.any():
            continue                  # no VMA of this mm in any tree
        sel = avc_mm == c
        if q is None:
            per_tree = np.bincount(avc_av[sel], minlength=n_trees)
            kk = per_tree[i_av]
        else:
            sub_av = avc_av[sel]
            kk = _point_counts(sub_av, np.asarray(start)[sel], np.asarray(last)[sel],
                               np.searchsorted(sub_av, np.arange(n_trees)), i_av, q)
        k_item += w[i_page] * kk

    def per_page(v):
        return np.bincount(i_page, weights=v, minlength=n_pages).astype(np.int64)
    ret = per_page(e_item * R)
    one = per_page(k_item)
    return {"first": per_page(e_item), "first_null": per_page(e_item * (R == 0)),
            "next": ret.copy(), "next_null": per_page(e_item * (R > 0)), "returned": ret,
            "skipped": np.zeros(n_pages, np.int64), "other_mm": ret - one, "rmap_one": one}


def _mapped(snap, pages, m_node, p_page, avc_mm, mm_all, p_avc, p_addr):
    """Per pair: does a PTE of its VMA's mm map the page at the address (the
    replay's ``mapped``); per page: folio_mapcount() (-1 unknown)."""
    m = snap.mappings
    mc = pages["mapcount"].to_numpy(np.int64, na_value=-1)
    if not len(m) or not p_page.size:
        return np.zeros(p_page.size, bool), mc
    # integer keys (page, mm, address): no Python object per mapping
    n_mm = np.int64(len(mm_all) + 1)
    m_key = m_node * n_mm + _index_in(m["mm"], mm_all)
    key = pd.MultiIndex.from_arrays([m_key, m["address"].to_numpy(np.uint64)])
    val = m["mapped"].fillna(False).to_numpy(bool)
    q = pd.MultiIndex.from_arrays([p_page.astype(np.int64) * n_mm + avc_mm[p_avc], p_addr])
    if not key.is_unique:
        first = ~key.duplicated(keep="first")
        key, val = key[first], val[first]
    j = key.get_indexer(q)
    return np.where(j >= 0, val[np.maximum(j, 0)], False), mc


def _missed(snap, pages, m_node, rule) -> np.ndarray:
    m = snap.mappings
    miss = (m["mapped"].fillna(False) & ~m[f"found_{rule}"].fillna(True).astype(bool)
            ).to_numpy(bool)
    code = m_node[miss]
    return (np.bincount(code[code >= 0], minlength=len(pages)).astype(np.int64)
            + pages["unreachable"].to_numpy(np.int64))


def _early(res, stopped, stop, rule, q, i_page, i_hpos, i_av, R, A, items_per_page,
           c_item, c_avc, c_pass, c_page, c_mapped, avc_mm, i_addr, mapcount, tree_lo, last):
    """Where a walk with a stop condition ends, and its counters up to there;
    the calls ``c_*`` in the kernel's order (page, pass, item, tree in-order)."""
    if stop == STOP_UNMAPPED:       # a mapping counts once: the first call unmaps it
        k1 = c_page.astype(np.int64) * np.int64(avc_mm.max(initial=0) + 2) + avc_mm[c_avc]
        a = i_addr[c_item]
        o2 = np.lexsort((np.arange(k1.size), a, k1))     # equal keys: the first call first
        dup = np.empty(k1.size, bool)
        dup[o2] = np.r_[False, (k1[o2][1:] == k1[o2][:-1]) & (a[o2][1:] == a[o2][:-1])]
        hit = c_mapped & ~dup
    else:                           # STOP_REFERENCED: every call finding the PTE counts
        hit = c_mapped
    cum = np.cumsum(hit)
    brk = np.flatnonzero(np.r_[True, c_page[1:] != c_page[:-1]]) if c_page.size else \
        np.zeros(0, np.int64)
    base = np.repeat(cum[brk] - hit[brk], np.diff(np.r_[brk, c_page.size]))
    got = cum - base
    done = hit & (got == mapcount[c_page]) & (mapcount[c_page] > 0)
    if not done.any():
        return
    # the first call of each page after which the walk stops
    s = np.flatnonzero(done)
    s = s[np.r_[True, c_page[s][1:] != c_page[s][:-1]]]
    pg, it, ps, avc = c_page[s], c_item[s], c_pass[s], c_avc[s]
    item_lo = np.r_[0, np.cumsum(items_per_page)[:-1]]
    page_lo = np.searchsorted(c_page, np.arange(items_per_page.size))
    lo, n = item_lo[pg], items_per_page[pg]
    # the loops that ran to their end before the stopping one: pass 1 whole if
    # the stop is in pass 2, then this pass's items before `it` (hlist order)
    two = (ps == 2).astype(np.int64)

    def before(v):
        cum = np.r_[0, np.cumsum(v, dtype=np.int64)]
        return two * (cum[lo + n] - cum[lo]) + (cum[it] - cum[lo])
    Rb, Ab, nulls = before(R), before(A), before((R == 0).astype(np.int64))
    loops = two * n + (it - lo)
    # the stopping loop yields the tree's VMAs up to and including avc: the
    # tree's in-order is by start pgoff, so before avc every VMA starts at or
    # below the query, and a point query yields those whose last pgoff reaches it
    lo_t = tree_lo[i_av[it]]
    if q is None:
        k = avc - lo_t + 1
    else:
        span = avc - lo_t
        at = np.repeat(lo_t - np.r_[0, np.cumsum(span)[:-1]], span) + np.arange(span.sum())
        hit_q = last[at] >= np.repeat(q[it], span)
        k = np.bincount(np.repeat(np.arange(s.size), span), weights=hit_q,
                        minlength=s.size).astype(np.int64) + 1
    # calls of `it` in range (either pass) up to avc: the pairs sorted by (item, avc)
    m = np.int64(avc_mm.size + 1)
    pair = np.sort(c_item.astype(np.int64) * m + c_avc)
    in_range = (np.searchsorted(pair, it.astype(np.int64) * m + avc, side="right")
                - np.searchsorted(pair, it.astype(np.int64) * m, side="left"))
    # its calls in this pass up to the stop: (page, pass, item) groups are contiguous
    grp = np.r_[True, (c_page[1:] != c_page[:-1]) | (c_pass[1:] != c_pass[:-1])
                | (c_item[1:] != c_item[:-1])]
    grp_lo = np.maximum.accumulate(np.where(grp, np.arange(c_page.size), 0))
    cs = s - grp_lo[s] + 1
    calls = s - page_lo[pg] + 1
    res["first"][pg] = loops + 1
    res["first_null"][pg] = nulls
    res["next"][pg] = Rb + k - 1
    res["next_null"][pg] = loops - nulls
    res["returned"][pg] = Rb + k
    res["skipped"][pg] = (Rb - Ab) + (k - in_range)
    res["rmap_one"][pg] = calls
    res["other_mm"][pg] = (Ab - (calls - cs)) + (in_range - cs)
    stopped[pg] = True


# ------------------------------------------------------------------ totals

def worst_pages(cost: pd.DataFrame, top: int | None = 20, by: str = "returned") -> pd.DataFrame:
    """The KSM pages whose walks do the most work (the anon_vma lock held
    longest): one row per page, the rules side by side (``by`` per rule,
    summed over the walks asked for), sorted by the worst rule, ``top`` rows."""
    t = cost.pivot_table(index=["node", "kpfn", "rmap_items"], columns="rule", values=by,
                         aggfunc="sum", observed=True)
    t.columns = [f"{by}_{r}" for r in t.columns]
    # worst first, ties by kpfn: the same state prints the same table
    t = t.assign(worst=t.max(axis=1)).reset_index().sort_values(
        ["worst", "kpfn"], ascending=[False, True], kind="stable").drop(columns="worst")
    return (t.head(top) if top else t).reset_index(drop=True)


def cost_by_node(snap: Snapshot, cost: pd.DataFrame) -> pd.DataFrame:
    """Totals per stable node: a chain's dups summed under its chain head."""
    nd = snap.stable_nodes.set_index("id")
    head = cost["node"].map(lambda n: nd.at[n, "chain"] if isinstance(nd.at[n, "chain"], str)
                            else n)
    cols = ["rmap_items", *COUNTERS, "missed"]
    return cost.assign(stable_node=head).groupby(["stable_node", "rule", "walk"], observed=True
                                                 )[cols].sum().reset_index()


def cost_by_process(snap: Snapshot, cost: pd.DataFrame) -> pd.DataFrame:
    """Totals per process: each page's walks counted for every process that
    maps it (the walk holds the lock of that process's anon_vma)."""
    m = snap.mappings
    who = m[m["mapped"].fillna(False)][["node", "pid"]].dropna().drop_duplicates()
    cols = [*COUNTERS, "missed"]
    j = cost.merge(who, on="node")
    return j.groupby(["pid", "rule", "walk"], observed=True)[cols].sum().reset_index()


def cost_totals(cost: pd.DataFrame) -> pd.DataFrame:
    """Totals per (rule, walk) over the snapshot, with ``pages``, the
    ``max_returned`` of one walk and the ``ratio`` of yielded VMAs to
    rmap_one calls."""
    g = cost.groupby(["rule", "walk"], observed=True)
    t = g[list(COUNTERS) + ["missed"]].sum()
    t.insert(0, "pages", g.size())
    t["max_returned"] = g["returned"].max()
    t["ratio"] = (t["returned"] / t["rmap_one"].where(t["rmap_one"] > 0)).round(1)
    return t.reset_index()
