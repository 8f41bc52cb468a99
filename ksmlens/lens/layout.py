"""Struct layouts from the kernel's DWARF, as numpy dtypes, and bulk reads.

The fast walk reads kernel objects as raw bytes: a whole slab page at a
time, decoded for thousands of objects at once through a numpy
structured dtype whose field offsets come from ``offsetof()`` on the
kernel's own debug info. A layout the walk does not understand is refused
in one line.
"""

from __future__ import annotations

import struct

import numpy as np
from drgn import FaultError, Program, offsetof

from ksmlens.errors import KsmlensError
from ksmlens.kernel.constants import STORED_INDEX_MEMBERS
from ksmlens.kernel.rules import UnionLayout

__all__ = ["Layout", "Memory", "STORED_INDEX_MEMBERS"]

_PAGE = 4096
_Q = struct.Struct("<Q")

def _dtype(fields: dict[str, tuple[int, str]], size: int) -> np.dtype:
    names = list(fields)
    return np.dtype({"names": names, "formats": [fields[n][1] for n in names],
                     "offsets": [fields[n][0] for n in names], "itemsize": size})


class Layout:
    """Offsets and numpy dtypes of the structs the walk decodes.

    ``item``: ``struct ksm_rmap_item`` (rmap_list, anon_vma or nid, mm,
    address, the 8-byte word at oldchecksum, head, hlist.next);
    ``node``: ``struct ksm_stable_node`` (rb_left/rb_right of node, head,
    hlist.first, kpfn, rmap_hlist_len, nid); ``page``: ``struct page``
    (compound_head, mapping, _mapcount). Raises KsmlensError when a member
    the walk needs is missing or overlaps another.
    """

    def __init__(self, prog: Program):
        from ksmlens.lens.helpers import ksm_kernel
        k = self.kernel = ksm_kernel(prog)   # type names, mm slot shape, SmartScan
        it = prog.type(k.rmap_item)
        self.item_size = it.size
        self.stored_member = next((m for m in STORED_INDEX_MEMBERS if it.has_member(m)), None)
        self.has_nid = it.has_member("nid")
        # age/remaining_skips only with SmartScan (commit 5e924ff54d08, 6.7)
        o = {m: offsetof(it, m) for m in ("rmap_list", "anon_vma", "mm", "address",
                                          "oldchecksum", "head", "hlist")
             + (("age", "remaining_skips") if k.smartscan else ())}
        self.i = o
        if self.stored_member and offsetof(it, self.stored_member) != o["oldchecksum"]:
            raise KsmlensError(f"ksm_rmap_item {self.stored_member} does not share "
                               "oldchecksum's bytes",
                               "this kernel's stored-index patch differs from what ksmlens "
                               "knows")
        if not k.smartscan:
            # no SmartScan bytes: the word at oldchecksum is the u32 and padding
            # (the rmap_item is kmem_cache_zalloc()ed); age/skips decode as 0
            # and nothing reads them (snap.kernel.smartscan is False)
            self.union = UnionLayout()
        elif not (0 < o["age"] - o["oldchecksum"] < 8 and
                  0 < o["remaining_skips"] - o["oldchecksum"] < 8):
            raise KsmlensError("ksm_rmap_item age/remaining_skips are not next to oldchecksum",
                               "this kernel's ksm.c differs from what ksmlens knows")
        else:
            self.union = UnionLayout(0, o["age"] - o["oldchecksum"],
                                     o["remaining_skips"] - o["oldchecksum"])
        words = {"next": o["rmap_list"], "anon_vma": o["anon_vma"], "mm": o["mm"],
                 "address": o["address"], "union": o["oldchecksum"], "head": o["head"],
                 "hnext": o["hlist"]}
        offs = sorted(words.values())
        if any(b - a < 8 for a, b in zip(offs, offs[1:])):
            raise KsmlensError("struct ksm_rmap_item has an unexpected layout",
                               "this kernel's ksm.c differs from what ksmlens knows")
        self.item_dtype = _dtype({k: (v, "<u8") for k, v in words.items()}, it.size)

        sn = prog.type(k.stable_node)
        rb = prog.type("struct rb_node")
        n_rb = offsetof(sn, "node")
        self.node_size = sn.size
        self.n_rb = n_rb
        self.n_list = offsetof(sn, "list")
        self.n_hlist_dup = offsetof(sn, "hlist_dup")
        nf = {"rb_right": (n_rb + offsetof(rb, "rb_right"), "<u8"),
              "rb_left": (n_rb + offsetof(rb, "rb_left"), "<u8"),
              "head": (offsetof(sn, "head"), "<u8"),
              "first": (offsetof(sn, "hlist"), "<u8"),
              "kpfn": (offsetof(sn, "kpfn"), "<u8"),
              "len": (offsetof(sn, "rmap_hlist_len"), "<i4")}
        if sn.has_member("nid"):
            nf["nid"] = (offsetof(sn, "nid"), "<i4")
        # rb_left and head share bytes (a union): decode them separately
        self.node_rb = _dtype({k: nf[k] for k in ("rb_right", "rb_left")}, sn.size)
        self.node_dtype = _dtype({k: v for k, v in nf.items() if not k.startswith("rb_")},
                                 sn.size)
        self.rb_left, self.rb_right = nf["rb_left"][0] - n_rb, nf["rb_right"][0] - n_rb

        pg = prog.type("struct page")
        self.page_size_struct = pg.size
        self.page_dtype = _dtype({"compound_head": (offsetof(pg, "compound_head"), "<u8"),
                                  "mapping": (offsetof(pg, "mapping"), "<u8"),
                                  "mapcount": (offsetof(pg, "_mapcount"), "<i4")}, pg.size)

        # KSM's own mm slot (mm_list, mm) before commit 58730ab6c7ca, 6.1; the
        # generic struct mm_slot embedded as ``slot`` after
        ms = prog.type(k.mm_slot)
        self.slot_size = ms.size
        self.s_mm_node = offsetof(ms, k.slot_list)
        self.s_mm = offsetof(ms, k.slot_mm)
        self.s_rmap_list = offsetof(ms, "rmap_list")


class Memory:
    """Kernel memory through a cache of 4 KiB pages, with bulk reads.

    ``read(addr, size)`` returns bytes or None on a fault (counted by
    ``on_fault``). Cached pages live in one growing arena (``arena``, a
    bytearray; ``slot[page]`` is a page's offset in it), not one bytes
    object each: a million rmap_items sit on ~16k slab pages, and the
    allocator would keep their memory after they are dropped. Objects of a
    slab cache are decoded in bulk with :meth:`gather`: every page they sit
    on is read once (consecutive pages in one read), then one numpy gather
    per field pulls the field of every object out of the arena.
    """

    def __init__(self, prog: Program, on_fault=None):
        self.prog = prog
        self.on_fault = on_fault
        self.reads = 0
        self.clear()

    def clear(self) -> None:
        """Forget every cached page (and give the arena's memory back)."""
        self.arena = bytearray()
        self.slot: dict[int, int] = {}

    def read(self, addr: int, size: int) -> bytes | None:
        self.reads += 1
        try:
            return self.prog.read(addr, size)
        except FaultError:
            if self.on_fault:
                self.on_fault("fault reading kernel memory")
            return None

    def _add(self, page: int, data) -> int:
        off = len(self.arena)
        self.arena += data
        self.slot[page] = off
        return off

    def page(self, page: int) -> int | None:
        """The arena offset of the 4 KiB page at ``page`` (read on a miss),
        or None if it cannot be read."""
        off = self.slot.get(page)
        if off is None:
            b = self.read(page, _PAGE)
            if b is None:
                return None
            off = self._add(page, b)
        return off

    def u64(self, addr: int) -> int | None:
        off = addr & (_PAGE - 1)
        if off > _PAGE - 8:
            b = self.read(addr, 8)
            return None if b is None else _Q.unpack(b)[0]
        o = self.page(addr - off)
        return None if o is None else _Q.unpack_from(self.arena, o + off)[0]

    def prefetch(self, pages: np.ndarray, max_run: int = 256, unique: bool = False) -> None:
        """Read the 4 KiB pages ``pages`` (addresses, any order; ``unique``:
        already sorted and distinct) not yet cached, runs of consecutive
        pages in one read each."""
        want = np.asarray(pages, dtype=np.uint64)
        if not unique:
            want = np.unique(want)
        if self.slot:
            have = np.fromiter(self.slot.keys(), dtype=np.uint64, count=len(self.slot))
            want = want[~np.isin(want, have)]
        if not want.size:
            return
        brk = np.nonzero(np.diff(want) != _PAGE)[0] + 1
        for run in np.split(want, brk):
            for k in range(0, run.size, max_run):
                part = run[k:k + max_run]
                start = int(part[0])
                b = self.read(start, part.size * _PAGE)
                if b is None:       # a hole inside the run: page by page
                    for p in part.tolist():
                        self.page(p)
                    continue
                off = len(self.arena)
                self.arena += b
                for j in range(part.size):
                    self.slot[start + j * _PAGE] = off + j * _PAGE

    def gather(self, addrs: np.ndarray, size: int, dtype: np.dtype, drop: bool = False
               ) -> tuple[dict, np.ndarray]:
        """Decode ``size``-byte objects at ``addrs`` (uint64) with the
        fields of ``dtype`` (a structured dtype with DWARF offsets).
        Returns ``({field: array}, ok)``: ``ok`` False where a page could
        not be read (its fields are 0). ``drop``: clear the cache after."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        n = addrs.size
        if not n:
            return {f: np.zeros(0, dtype=dtype.fields[f][0]) for f in dtype.names}, \
                np.zeros(0, dtype=bool)
        mask = np.uint64(_PAGE - 1)
        first = addrs & ~mask
        last = (addrs + np.uint64(size - 1)) & ~mask
        slot = self.slot
        pf, pl = first >> np.uint64(12), last >> np.uint64(12)
        lo = int(pf.min())
        span = int(pl.max()) - lo + 1
        if span <= max(4 * n, 1 << 22):
            # page numbers in a compact range (a slab's pages in the direct
            # map, struct pages in the memmap): a table indexed by page
            # number instead of sorting (np.unique, searchsorted)
            fi, li = (pf - np.uint64(lo)).astype(np.int64), (pl - np.uint64(lo)).astype(np.int64)
            mark = np.zeros(span, bool)
            mark[fi] = True
            mark[li] = True
            pages = (np.flatnonzero(mark).astype(np.uint64) + np.uint64(lo)) << np.uint64(12)
            del mark
            self.prefetch(pages, unique=True)
            table = np.full(span, -1, np.int64)
            table[((pages >> np.uint64(12)) - np.uint64(lo)).astype(np.int64)] = np.fromiter(
                (slot.get(p, -1) for p in pages.tolist()), dtype=np.int64, count=pages.size)
            op, ol = table[fi], table[li]
            del table, fi, li
        else:
            self.prefetch(np.concatenate([first, last[last != first]]))
            pages = np.unique(np.concatenate([first, last]))
            offs = np.fromiter((slot.get(p, -1) for p in pages.tolist()), dtype=np.int64,
                               count=pages.size)
            op = offs[np.searchsorted(pages, first)]
            ol = offs[np.searchsorted(pages, last)]
        # an object across two pages needs them adjacent in the arena too
        ok = (op >= 0) & (ol >= 0) & ((pl == pf) | (ol == op + _PAGE))
        base = np.where(ok, op + (addrs & mask).astype(np.int64), 0)
        out = {}
        arena = self.arena
        bad = None if ok.all() else ~ok
        aligned = not (base & 7).any() and len(arena) % 8 == 0
        for name in dtype.names:
            ft, off = dtype.fields[name][:2]
            if aligned and off % ft.itemsize == 0:
                v = np.frombuffer(arena, dtype=ft)[(base + off) >> (ft.itemsize.bit_length() - 1)]
            else:
                u8 = np.frombuffer(arena, dtype=np.uint8)
                v = u8[(base + off)[:, None] + np.arange(ft.itemsize)].copy().view(ft).reshape(n)
                del u8
            if bad is not None:
                v[bad] = 0
            out[name] = v
        if drop:
            self.clear()
        return out, ok
