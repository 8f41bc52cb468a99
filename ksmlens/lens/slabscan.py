"""Copy first, then put in order: every slab of a cache in a few large reads,
and the lists and rbtrees among its objects ordered with array operations.

The pointer-chasing walk (:meth:`ksmlens.lens.snapshot._Walker.follow`)
costs one Python step per rmap_item and one read per slab page it meets
first. This module finds the slab pages of a ``struct kmem_cache`` the way
drgn's :func:`~drgn.helpers.linux.slab.slab_cache_for_each_allocated_object`
does for SLUB (every ``struct page`` of the memmap, keeping those whose
``struct slab`` names the cache), but with the memmap read in large pieces
and filtered by numpy. Every object of those slabs is then a *candidate*:
allocated or free, and, when the kernel merged the cache with another of the
same size, not even of the cache's type. Free objects keep stale links to
live ones, so the candidates' links form a forest, not the kernel's lists;
the functions here therefore never rank all candidates: they start at the
heads the kernel's own roots give and follow only what is reachable from
them (:func:`list_order`: pointer doubling; :func:`rb_inorder`: the tree
level by level from its root), and say where a
link leaves the candidates, so that the caller can go on by pointer.

Layouts (``struct slab``, from DWARF): its ``slab_cache`` and ``objects``
members, after commit d122019bf061 ("mm: Split slab into its own type",
5.17); a kernel whose slabs are still ``struct page`` is not scanned
(:func:`slab_layout` returns None and the caller chases pointers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from drgn import Object, Program

__all__ = ["SlabLayout", "slab_layout", "page_ranges", "memmap_bytes", "slab_objects", "list_order",
           "rb_inorder", "index_of", "END", "OUTSIDE", "CYCLE"]

_U = np.uint64
_PAGE_SHIFT = 12
#: list_order(): the list ended at a NULL next pointer
END = 0
#: list_order(): a next pointer leads outside the candidates (go on by pointer)
OUTSIDE = 1
#: list_order(): the list did not end within the candidates (a cycle: a race)
CYCLE = 2
_CHUNK_PAGES = 1 << 17          # struct pages read at once from the memmap (8 MiB)


@dataclass
class SlabLayout:
    """Where ``struct slab`` keeps what a scan needs: ``cache_off`` (byte
    offset of ``slab_cache``), ``objects_bit`` (bit offset of the
    ``objects`` bit field, 15 bits: mm/slab.h), ``page_size`` (``sizeof
    (struct page)``: the memmap's stride)."""
    cache_off: int
    objects_bit: int
    objects_bits: int
    page_size: int


def slab_layout(prog: Program) -> SlabLayout | None:
    """The :class:`SlabLayout` of ``prog``'s kernel, or None where slabs
    have no ``struct slab`` of their own (before 5.17) or it lacks a member
    (SLAB rather than SLUB)."""
    try:
        t = prog.type("struct slab")
        cache = t.member("slab_cache")
        objects = t.member("objects")
    except LookupError:
        return None
    if objects.bit_field_size is None or cache.bit_offset % 64:
        return None
    return SlabLayout(cache.bit_offset // 8, objects.bit_offset, objects.bit_field_size,
                      prog.type("struct page").size)


def page_ranges(prog: Program) -> list[tuple[int, int, int]]:
    """``(start_pfn, end_pfn, mem_map address)`` of every range of valid
    pfns (:func:`drgn.helpers.linux.mm.for_each_valid_page_range`)."""
    from drgn.helpers.linux.mm import for_each_valid_page_range
    return [(s, e, m.value_()) for s, e, m in for_each_valid_page_range(prog)]


def memmap_bytes(prog: Program, ranges=None) -> int:
    """Bytes of ``struct page`` a scan of ``ranges`` (default: every valid
    pfn's, :func:`page_ranges`) reads."""
    sz = prog.type("struct page").size
    return sum((e - s) * sz for s, e, _ in (ranges if ranges is not None else page_ranges(prog)))


def _oo_objects(x: int) -> int:
    return x & 0xFFFF        # mm/slub.c oo_objects(): OO_SHIFT 16


def slab_objects(prog: Program, caches: list[Object], read, layout: SlabLayout,
                 ranges=None) -> dict[int, np.ndarray]:
    """Every object address of every slab of each ``struct kmem_cache *``
    in ``caches``: ``{cache address: sorted uint64 array}``.

    Reads the memmap (:func:`drgn.helpers.linux.mm.for_each_valid_page_range`)
    ``_CHUNK_PAGES`` struct pages at a time with ``read(addr, size)``
    (bytes, or None on a fault: that piece is skipped; ``ranges``: those of
    :func:`page_ranges`, read once by the caller) and keeps each
    ``struct slab`` whose ``slab_cache`` is one of the caches and whose
    ``objects`` is that cache's per-slab count (``s->oo`` or, for a slab
    allocated at the fallback order, ``s->min``: mm/slub.c allocate_slab()).
    Objects sit at ``slab_address() + red_left_pad + k * s->size``
    (mm/slub.c ``for_each_object()``)."""
    from drgn.helpers.linux.mm import pfn_to_virt
    want = {}
    for c in caches:
        n_oo, n_min = _oo_objects(c.oo.x.value_()), _oo_objects(c.min.x.value_())
        want[c.value_()] = (c.size.value_(), c.red_left_pad.value_(), {n_oo, n_min})
    keys = np.array(sorted(want), dtype=_U)
    sz = layout.page_size
    co = layout.cache_off
    ow, ob = layout.objects_bit // 64, layout.objects_bit % 64
    omask = _U((1 << layout.objects_bits) - 1)
    found_pfn: list[np.ndarray] = []
    found_cache: list[np.ndarray] = []
    found_n: list[np.ndarray] = []
    for start, end, mem_map in (ranges if ranges is not None else page_ranges(prog)):
        for lo in range(start, end, _CHUNK_PAGES):
            hi = min(end, lo + _CHUNK_PAGES)
            b = read(mem_map + lo * sz, (hi - lo) * sz)
            if b is None:
                continue
            words = np.frombuffer(b, dtype=_U).reshape(hi - lo, sz // 8)
            cache = words[:, co // 8]
            hit = np.flatnonzero(np.isin(cache, keys))
            if not hit.size:
                continue
            found_pfn.append(hit.astype(_U) + _U(lo))
            found_cache.append(cache[hit])
            found_n.append((words[hit, ow] >> _U(ob)) & omask)
    out = {int(k): np.zeros(0, _U) for k in keys.tolist()}
    if not found_pfn:
        return out
    pfn = np.concatenate(found_pfn)
    cache = np.concatenate(found_cache)
    nobj = np.concatenate(found_n).astype(np.int64)
    # the direct map is linear in the pfn (x86-64 __va(), arm64's linear map)
    p0, p1 = int(pfn[0]), int(pfn[-1])
    base = pfn_to_virt(prog, p0).value_() - (p0 << _PAGE_SHIFT)
    if pfn_to_virt(prog, p1).value_() - (p1 << _PAGE_SHIFT) != base:
        raise ValueError("the direct map is not linear over the slab pages")
    for k, (size, pad, counts) in want.items():
        sel = (cache == _U(k)) & np.isin(nobj, list(counts))
        n = nobj[sel]
        first = _U(base) + (pfn[sel] << _U(_PAGE_SHIFT)) + _U(pad)
        rep = np.repeat(first, n)
        k_in = np.arange(rep.size, dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
        out[k] = np.sort(rep + k_in.astype(_U) * _U(size))
    return out


def index_of(sorted_addrs: np.ndarray, ptrs: np.ndarray, stride: int | None = None
             ) -> np.ndarray:
    """Index of each of ``ptrs`` in ``sorted_addrs``, -1 where absent.

    ``stride``: every object of a slab is ``stride`` bytes after the one
    before (``s->size``; the candidates of :func:`slab_objects`), so the
    candidates starting in one page are evenly spaced: a table of each
    page's first candidate (indexed by page number) and one division find
    each pointer's, checked, instead of a binary search per pointer."""
    n = sorted_addrs.size
    if not n:
        return np.full(ptrs.size, -1, np.int64)
    if stride:
        pg = sorted_addrs >> _U(_PAGE_SHIFT)
        lo = int(pg[0])
        span = int(pg[-1]) - lo + 2
        if span <= 1 << 26:
            first = np.full(span, -1, np.int64)
            starts = np.flatnonzero(np.r_[True, pg[1:] != pg[:-1]])
            first[(pg[starts] - _U(lo)).astype(np.int64)] = starts
            q = ptrs >> _U(_PAGE_SHIFT)
            inside = (q >= _U(lo)) & (q < _U(lo + span - 1))
            f = np.where(inside, first[np.where(inside, q - _U(lo), _U(0)).astype(np.int64)],
                         -1)
            base = sorted_addrs[np.maximum(f, 0)]
            k = np.where((f >= 0) & (ptrs >= base),
                         f + ((ptrs - base) // _U(stride)).astype(np.int64), -1)
            j = np.clip(k, 0, n - 1)
            return np.where((k >= 0) & (k < n) & (sorted_addrs[j] == ptrs), k, -1)
    j = np.minimum(np.searchsorted(sorted_addrs, ptrs), n - 1)
    return np.where(sorted_addrs[j] == ptrs, j, -1)


def list_order(addrs: np.ndarray, nexts: np.ndarray, heads: list[int],
               stride: int | None = None) -> list[tuple[np.ndarray, int, int]]:
    """Singly linked lists among candidate nodes, in list order.

    ``addrs``: the candidates' addresses (sorted uint64); ``nexts``: each
    candidate's next pointer, as a node address (0 for NULL); ``heads``: the
    first node of each list (an address, 0 for an empty list). Returns per
    head ``(nodes, how, at)``: the node addresses from the head on, and how
    the list ended: :data:`END` (a NULL next), :data:`OUTSIDE` (``at`` is a
    next pointer that is not a candidate: the caller goes on from there;
    a head that is not a candidate is ``(empty, OUTSIDE, head)``) or
    :data:`CYCLE` (the list does not end within the candidates: ``(empty,
    CYCLE, head)``, for the caller to walk by pointer, bounded).

    Pointer doubling: table ``J[k][i]`` is node i's 2**k-th successor
    (int32, one gather per level, as many levels as the longest list
    needs); each list's length follows from its head's entries, and its
    nodes from expanding the head by halving strides (position p + 2**k is
    ``J[k]`` of position p). Only what the heads reach is returned, so the
    stale links of free objects in the candidates do not matter."""
    n = addrs.size
    out: list[tuple[np.ndarray, int, int]] = [(np.zeros(0, _U), OUTSIDE, h) if h else
                                              (np.zeros(0, _U), END, 0) for h in heads]
    hidx = index_of(addrs, np.asarray(heads, dtype=_U))
    live = [k for k, h in enumerate(heads) if h and hidx[k] >= 0]
    if not live:
        return out
    succ = index_of(addrs, nexts, stride)
    j0 = np.empty(n + 1, np.int32)              # index n: past the end
    j0[:n] = np.where(succ >= 0, succ, n)
    j0[n] = n
    del succ
    tables = [j0]
    hv = hidx[live].astype(np.int64)
    cyc = np.zeros(len(live), bool)
    while True:
        jk = tables[-1]
        open_ = jk[hv] != n
        if not open_.any():
            break
        if len(tables) > n.bit_length() + 1:    # 2**k > n steps and not ended
            cyc = open_
            break
        tables.append(jk[jk])
    K = len(tables)
    # each list's length: the last node, descending the strides
    pos = hv.copy()
    length = np.zeros(len(live), np.int64)
    for k in range(K - 1, -1, -1):
        nxt = tables[k][pos]
        go = nxt != n
        pos = np.where(go, nxt, pos)
        length += go.astype(np.int64) << k
    length += 1
    # expansion: positions at stride 2**(k+1) give those at stride 2**k
    node, p, own = hv.copy(), np.zeros(len(live), np.int64), np.arange(len(live))
    keep = ~cyc
    node, p, own = node[keep], p[keep], own[keep]
    for k in range(K - 1, -1, -1):
        more = p + (1 << k) < length[own]
        if more.any():
            node = np.concatenate([node, tables[k][node[more]]])
            p = np.concatenate([p, p[more] + (1 << k)])
            own = np.concatenate([own, own[more]])
    del tables
    order = np.lexsort((p, own))
    node, own = node[order], own[order]
    cuts = np.searchsorted(own, np.arange(len(live) + 1))
    for j, k in enumerate(live):
        if cyc[j]:
            out[k] = (np.zeros(0, _U), CYCLE, heads[k])
            continue
        seg = node[cuts[j]:cuts[j + 1]]
        last = int(seg[-1])
        how, at = (OUTSIDE, int(nexts[last])) if nexts[last] else (END, 0)
        out[k] = (addrs[seg], how, at)
    return out


def rb_inorder(addrs: np.ndarray, left: np.ndarray, right: np.ndarray, root: int,
               max_depth: int = 256, stride: int | None = None
               ) -> tuple[np.ndarray, list[int]]:
    """The nodes of the rbtree under ``root`` in order (an rbtree's
    in-order: ``rb_first()``, ``rb_next()``), among candidates ``addrs``
    (sorted uint64) whose child pointers are ``left``/``right`` (as node
    addresses, 0 for none). Returns ``(node addresses in order, faults)``:
    ``faults`` the child pointers that are not candidates (the caller reads
    those subtrees by pointer) and, for a node reached twice or a tree
    deeper than ``max_depth``, that node's address; their subtrees are left
    out. Level by level from the root (an rbtree of n nodes is at most
    2 log2(n + 1) deep), then each node's in-order rank from the sizes of
    its children's subtrees."""
    n = addrs.size
    li, ri = index_of(addrs, left, stride), index_of(addrs, right, stride)
    faults: list[int] = []
    r = index_of(addrs, np.array([root], dtype=_U))[0] if root else -1
    if r < 0:
        if root:
            faults.append(root)
        return np.zeros(0, _U), faults
    seen = np.zeros(n, bool)
    stamp = np.zeros(n, np.int64)
    levels = []
    frontier = np.array([r], np.int64)
    seen[r] = True
    kid_l = np.full(n, -1, np.int64)
    kid_r = np.full(n, -1, np.int64)
    while frontier.size:
        if len(levels) >= max_depth:
            faults += addrs[frontier].tolist()
            break
        levels.append(frontier)
        nxt = []
        for kids, ptrs, dst in ((li, left, kid_l), (ri, right, kid_r)):
            k = kids[frontier]
            bad = (k < 0) & (ptrs[frontier] != 0)
            faults += ptrs[frontier][bad].tolist()
            ok = k >= 0
            k, par = k[ok], frontier[ok]
            again = seen[k]
            faults += addrs[k[again]].tolist()
            k, par = k[~again], par[~again]
            # two parents in one level naming one child: keep the first
            stamp[k[::-1]] = np.arange(k.size)[::-1]
            first = stamp[k] == np.arange(k.size)
            if not first.all():
                faults += addrs[k[~first]].tolist()
                k, par = k[first], par[first]
            seen[k] = True
            dst[par] = k
            nxt.append(k)
        frontier = np.concatenate(nxt)
    size = np.zeros(n + 1, np.int64)         # size[-1] (index n): no child
    for lev in reversed(levels):
        size[lev] = 1 + size[kid_l[lev]] + size[kid_r[lev]]
    rank = np.zeros(n, np.int64)
    rank[r] = size[kid_l[r]]
    for lev in levels:
        for kids, sign, other in ((kid_l, -1, kid_r), (kid_r, 1, kid_l)):
            k = kids[lev]
            ok = k >= 0
            k, par = k[ok], lev[ok]
            # left child: parent's rank - 1 - its right subtree; right: + 1 + its left
            rank[k] = rank[par] + sign * (1 + size[other[k]])
    inside = np.concatenate(levels)
    return addrs[inside[np.argsort(rank[inside], kind="stable")]], faults
