"""x86-64 page tables read from kernel memory, with the kernel's own semantics.

Every bit is named once, as in ``arch/x86/include/asm/pgtable_types.h``, and
decoded by small functions that follow the kernel's helpers of the same name
(``pte_none()``, ``pte_present()``, ``pte_pfn()``, ``pte_dirty()``,
``pmd_leaf()``). Two points where a naive reader is wrong:

* ``pte_present()`` counts ``_PAGE_PROTNONE``: a ``PROT_NONE`` mapping is
  present to the kernel (it maps a page, migration and reclaim unmap it), and
  its PFN bits are stored inverted (L1TF, ``pgtable-invert.h``).
* a non-present, non-none entry is a swap or migration entry.

:class:`PageTables` walks 4- or 5-level tables (``pgtable_l5_enabled()``),
including 2 MiB and 1 GiB leaves, through a cache of 4 KiB table pages, and
refuses anything but little-endian x86-64 in one line. arm64's are
:mod:`ksmlens.kernel.pgtable_arm64`; :func:`page_tables` picks by the kernel.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ksmlens.errors import KsmlensError

__all__ = [
    "PAGE_SHIFT", "PAGE_SIZE", "PTRS_PER_TABLE", "_PAGE_PRESENT", "_PAGE_RW", "_PAGE_USER",
    "_PAGE_ACCESSED", "_PAGE_DIRTY", "_PAGE_PSE", "_PAGE_GLOBAL", "_PAGE_PROTNONE",
    "_PAGE_SPECIAL", "_PAGE_SAVED_DIRTY", "_PAGE_NX", "PTE_PFN_MASK",
    "pte_none", "pte_present", "pte_pfn", "pte_dirty", "pte_special", "pmd_present",
    "pmd_leaf", "pte_kind", "check_platform", "page_tables", "TableReader", "match_leaves",
    "leaf_pfns", "PageTables", "decode", "KIND_NAMES",
    "KIND_NONE", "KIND_PRESENT", "KIND_PROT_NONE", "KIND_SWAP",
]

# arch/x86/include/asm/page_types.h
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PTRS_PER_TABLE = 512                     # PTRS_PER_PTE/PMD/PUD/P4D/PGD on x86-64
# arch/x86/include/asm/pgtable_types.h
_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_ACCESSED = 1 << 5
_PAGE_DIRTY = 1 << 6
_PAGE_PSE = 1 << 7                       # a 2 MiB (PMD) or 1 GiB (PUD) leaf
_PAGE_GLOBAL = 1 << 8
_PAGE_PROTNONE = _PAGE_GLOBAL            # only meaningful when !_PAGE_PRESENT
_PAGE_SPECIAL = 1 << 9                   # _PAGE_BIT_SOFTW1: pte_special()
# _PAGE_BIT_SOFTW5 (58): since 6.6 ("x86/mm: Introduce _PAGE_SAVED_DIRTY") every
# x86-64 kernel keeps the dirty bit of a read-only PTE here (Write=0, Dirty=1
# would mean shadow stack): a KSM zero page's PTE is read-only, so its "dirty"
# is this bit. Unused (0) on older kernels.
_PAGE_SAVED_DIRTY = 1 << 58
_PAGE_NX = 1 << 63
_PAGE_KNL_ERRATUM_MASK = _PAGE_DIRTY | _PAGE_ACCESSED   # ignored by pte_none()
# __PHYSICAL_MASK_SHIFT 52: PTE_PFN_MASK = PHYSICAL_PAGE_MASK
PTE_PFN_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)


def pte_none(v: int) -> bool:
    """``pte_none()``: nothing mapped, nothing swapped (A/D bits aside)."""
    return not (v & ~_PAGE_KNL_ERRATUM_MASK)


def pte_present(v: int) -> bool:
    """``pte_present()``: maps a page, PROT_NONE included."""
    return bool(v & (_PAGE_PRESENT | _PAGE_PROTNONE))


def pmd_present(v: int) -> bool:
    """``pmd_present()``: a PMD whose PSE bit is set counts as present too
    (a THP being split)."""
    return bool(v & (_PAGE_PRESENT | _PAGE_PROTNONE | _PAGE_PSE))


def pte_pfn(v: int) -> int:
    """``pte_pfn()``: the PFN, un-inverting a PROT_NONE entry
    (``protnone_mask()`` of ``pgtable-invert.h``)."""
    if v and not v & _PAGE_PRESENT:
        v = ~v
    return (v & PTE_PFN_MASK) >> PAGE_SHIFT


def pte_dirty(v: int) -> bool:
    """``pte_dirty()``: ``_PAGE_DIRTY_BITS``, the hardware or the saved dirty bit."""
    return bool(v & (_PAGE_DIRTY | _PAGE_SAVED_DIRTY))


def pte_special(v: int) -> bool:
    return bool(v & _PAGE_SPECIAL)


def pmd_leaf(v: int) -> bool:
    """``pmd_leaf()`` / ``pud_leaf()``: a huge mapping, not a pointer to a table."""
    return bool(v & _PAGE_PSE) and pmd_present(v)


def pte_kind(v: int) -> str:
    """``"none"``, ``"swap"`` (a swap or migration entry), ``"present"`` or
    ``"prot_none"`` (present to the kernel, PFN inverted)."""
    if pte_none(v):
        return "none"
    if v & _PAGE_PRESENT:
        return "present"
    if v & _PAGE_PROTNONE:
        return "prot_none"
    return "swap"


def check_platform(prog) -> None:
    """Refuse, in one line, a kernel whose page tables ksmlens cannot read
    (x86-64 and arm64 are read: :func:`page_tables`)."""
    from ksmlens.kernel.arch import arch_of_program
    arch_of_program(prog)


def page_tables(prog, read):
    """The page-table reader for the kernel of the drgn Program ``prog``:
    :class:`PageTables` (x86-64) or
    :class:`ksmlens.kernel.pgtable_arm64.PageTables`; both have ``lookup``,
    ``leaves``, ``decode``, ``dirty`` and ``special``. :class:`KsmlensError`
    for another architecture."""
    from ksmlens.kernel.arch import ARM64, arch_of_program
    if arch_of_program(prog) is ARM64:
        from ksmlens.kernel import pgtable_arm64
        return pgtable_arm64.PageTables.of(prog, read)
    return PageTables.of(prog, read)


class TableReader:
    """What the readers of both architectures share (this module's
    :class:`PageTables`, :class:`ksmlens.kernel.pgtable_arm64.PageTables`):
    a cache of 4 KiB table pages read once each (``self.read(addr, size)``,
    None on a fault), and the frame of the range walk :meth:`leaves`. A
    reader sets ``read``, ``shifts`` (index shift per level, top first),
    ``tables`` ({} to start) and ``none_mask`` (the bits ``pte_none()``
    looks at), and defines ``kind``/``pfn`` (a leaf entry), ``_class`` (an
    entry above the last level) and ``_next`` (a table pointer); the
    lookup of one address and the range walk are this class's."""

    read: Callable[[int, int], bytes | None]
    shifts: tuple[int, ...]
    tables: dict[int, np.ndarray | None]
    none_mask: int = 2**64 - 1

    def table(self, virt: int) -> np.ndarray | None:
        t = self.tables.get(virt, False)
        if t is False:
            buf = self.read(virt, PAGE_SIZE)
            t = None if buf is None else np.frombuffer(buf, dtype="<u8")
            self.tables[virt] = t
        return t

    def leaves(self, pgd: int, start: int, end: int):
        """Every non-none leaf entry mapping ``[start, end)``, in address
        order, as numpy arrays ``(addresses, entries, shifts)``: 4 KiB
        entries and huge leaves (``shifts`` 21 or 30, ``addresses`` the
        leaf's own first address). Missing tables are
        skipped, so a sparse 4 TiB VMA costs only its populated tables."""
        out: tuple[list, list, list] = ([], [], [])
        self._leaves(pgd, 0, start, end, out)
        if not out[0]:
            e = np.zeros(0, dtype=np.uint64)
            return e, e.copy(), np.zeros(0, dtype=np.uint8)
        return tuple(np.concatenate(x) for x in out)

    def _leaves(self, table, level, start, end, out):
        shift = self.shifts[level]
        t = self.table(table)
        if t is None:
            return
        size = 1 << shift
        lo = (start >> shift) & (PTRS_PER_TABLE - 1)
        hi = ((end - 1) >> shift) & (PTRS_PER_TABLE - 1)
        base = start & ~((size << 9) - 1)       # this table's first address
        if level == len(self.shifts) - 1:
            sl = t[lo:hi + 1]
            keep = np.nonzero(sl & np.uint64(self.none_mask))[0]
            if keep.size:
                out[0].append(np.uint64(base) + (keep + lo).astype(np.uint64) * np.uint64(size))
                out[1].append(sl[keep])
                out[2].append(np.full(keep.size, shift, dtype=np.uint8))
            return
        for i in range(lo, hi + 1):
            e = int(t[i])
            if e & self.none_mask:
                a = base + i * size
                self._entry(e, a, level, max(start, a), min(end, a + size), out)

    def lookup(self, pgd: int, addr: int) -> tuple[str, int | None, int]:
        """``(kind, pfn, entry)`` of the leaf entry mapping ``addr``: kind
        ``"none"``, ``"present"``, ``"prot_none"``, ``"swap"`` (a swap or
        migration entry) or ``"fault"`` (a table could not be read); pfn None
        unless present (or PROT_NONE). A huge leaf gives the 4 KiB subpage's
        pfn."""
        table = pgd
        last = len(self.shifts) - 1
        for level, shift in enumerate(self.shifts):
            t = self.table(table)
            if t is None:
                return "fault", None, 0
            e = int(t[(addr >> shift) & (PTRS_PER_TABLE - 1)])
            if level == last:
                kind = self.kind(e)
                return kind, (self.pfn(e) if kind in ("present", "prot_none") else None), e
            what = self._class(e, level)
            if what == "table":
                table = self._next(e)
                continue
            if what == "leaf":                                  # a PUD / PMD leaf
                kind = self.kind(e)
                span = (1 << (shift - PAGE_SHIFT)) - 1
                return kind, (self.pfn(e) & ~span) + ((addr >> PAGE_SHIFT) & span), e
            return what, None, e
        return "none", None, 0

    def _entry(self, e: int, a: int, level: int, start: int, end: int, out) -> None:
        """A non-none entry ``e`` mapping from ``a`` at ``level`` (not the
        last): a table to walk over ``[start, end)``, a huge leaf or PMD
        migration entry to record, or nothing."""
        what = self._class(e, level)
        if what == "table":
            self._leaves(self._next(e), level + 1, start, end, out)
        elif what in ("leaf", "swap"):
            self._leaf(out, a, e, self.shifts[level])

    def _class(self, e: int, level: int) -> str:
        """What entry ``e`` above the last level is: ``"table"``, ``"leaf"``
        (a 2 MiB / 1 GiB mapping), ``"swap"`` (a PMD migration entry) or
        ``"none"``."""
        raise NotImplementedError

    def _next(self, entry: int) -> int:
        """The kernel virtual address of the table ``entry`` points to."""
        raise NotImplementedError

    def kind(self, v: int) -> str:
        raise NotImplementedError

    def pfn(self, v: int) -> int:
        raise NotImplementedError

    @staticmethod
    def _leaf(out, a: int, e: int, shift: int) -> None:
        """One huge leaf (or PMD migration entry) at ``a``."""
        out[0].append(np.array([a], dtype=np.uint64))
        out[1].append(np.array([e], dtype=np.uint64))
        out[2].append(np.array([shift], dtype=np.uint8))


def match_leaves(leaves, addrs):
    """The leaf entry of :meth:`TableReader.leaves` covering each address of
    ``addrs`` (uint64, any order): ``(q, e, start, span)``, the addresses,
    their entries (0 where none covers them), each covering leaf's first
    address and size in bytes."""
    la, le, ls = leaves
    q = np.asarray(addrs, dtype=np.uint64)
    if not la.size or not q.size:
        z = np.zeros(q.size, dtype=np.uint64)
        return q, z, z.copy(), np.ones(q.size, dtype=np.uint64)
    idx = np.searchsorted(la, q, side="right").astype(np.int64) - 1
    ok = idx >= 0
    idx_c = np.where(ok, idx, 0)
    span = np.left_shift(np.uint64(1), ls[idx_c].astype(np.uint64))
    ok &= q < la[idx_c] + span
    return q, np.where(ok, le[idx_c], np.uint64(0)), la[idx_c], span


def leaf_pfns(kinds, base_pfn, q, start, span):
    """The 4 KiB page each address maps where its kind is present or
    PROT_NONE (the subpage of a huge leaf), else 0; ``base_pfn`` is the
    leaf's output address >> PAGE_SHIFT, its bits below the leaf's size
    ignored (x86-64 keeps PAT in bit 12 of a huge leaf)."""
    base = base_pfn & ~((span >> np.uint64(PAGE_SHIFT)) - np.uint64(1))
    sub = (q - start) >> np.uint64(PAGE_SHIFT)
    return np.where((kinds == KIND_PRESENT) | (kinds == KIND_PROT_NONE), base + sub,
                    np.uint64(0)).astype(np.uint64)


class PageTables(TableReader):
    """Page-table lookups of user mms, through a 4 KiB page cache.

    ``read(addr, size) -> bytes | None`` reads kernel memory (None on a
    fault); ``direct_map`` is ``PAGE_OFFSET`` (``phys_to_virt(0)``);
    ``levels`` 4 or 5 (``pgtable_l5_enabled()``). Table entries are read
    once per 4 KiB table page.
    """

    arch = "x86_64"
    page_shift = PAGE_SHIFT
    none_mask = ~_PAGE_KNL_ERRATUM_MASK & (2**64 - 1)       # pte_none() ignores A/D

    def __init__(self, read, direct_map: int, levels: int = 4):
        if levels not in (4, 5):
            raise KsmlensError(f"{levels}-level page tables", "x86-64 has 4 or 5 levels")
        self.read = read
        self.pob = direct_map
        self.levels = levels
        # index shift per level, top (pgd) first
        self.shifts = (48, 39, 30, 21, 12) if levels == 5 else (39, 30, 21, 12)
        # TASK_SIZE_MAX, the user half: 128 TiB (4 levels), 64 PiB (5)
        self.user_top = 1 << (self.shifts[0] + 8)
        self.tables: dict[int, np.ndarray | None] = {}

    @classmethod
    def of(cls, prog, read) -> "PageTables":
        """For a drgn Program; 5 levels when the kernel has them enabled
        (``__pgtable_l5_enabled``, CONFIG_X86_5LEVEL on a la57 CPU)."""
        from drgn.helpers.linux.mm import phys_to_virt

        from ksmlens.kernel.arch import X86_64, arch_of_program
        arch = arch_of_program(prog)
        if arch is not X86_64:
            raise KsmlensError(f"x86-64 page tables asked of an {arch.name} kernel",
                               "use ksmlens.kernel.pgtable.page_tables(prog, read)")
        levels = 4
        try:
            if prog["__pgtable_l5_enabled"].value_():
                levels = 5
        except (KeyError, LookupError):
            pass
        return cls(read, phys_to_virt(prog, 0).value_(), levels)

    def _next(self, entry: int) -> int:
        return self.pob + (entry & PTE_PFN_MASK)

    def _class(self, e: int, level: int) -> str:
        last = len(self.shifts) - 1
        if level >= last - 2 and e & _PAGE_PSE and pmd_present(e):
            return "leaf"                                   # pmd_leaf() / pud_leaf()
        if not e & _PAGE_PRESENT:
            return "swap" if level == last - 1 and not pte_none(e) else "none"
        return "table"

    def kind(self, v: int) -> str:
        """:func:`pte_kind`."""
        return pte_kind(v)

    def pfn(self, v: int) -> int:
        """:func:`pte_pfn`."""
        return pte_pfn(v)

    def decode(self, leaves, addrs):
        """:func:`decode` (the module's), for a reader of either architecture."""
        return decode(leaves, addrs)

    @staticmethod
    def dirty(ents: np.ndarray) -> np.ndarray:
        """``pte_dirty()`` of each entry: ``_PAGE_DIRTY_BITS``, the hardware or
        the saved dirty bit (see :data:`_PAGE_SAVED_DIRTY`)."""
        return (np.asarray(ents, dtype=np.uint64)
                & np.uint64(_PAGE_DIRTY | _PAGE_SAVED_DIRTY)) != 0

    @staticmethod
    def special(ents: np.ndarray) -> np.ndarray:
        """``pte_special()`` of each entry."""
        return (np.asarray(ents, dtype=np.uint64) & np.uint64(_PAGE_SPECIAL)) != 0


# kinds as small integers, for the vectorised decoder
KIND_NONE, KIND_PRESENT, KIND_PROT_NONE, KIND_SWAP = 0, 1, 2, 3
KIND_NAMES = ("none", "present", "prot_none", "swap")


def decode(leaves, addrs: np.ndarray):
    """Look up every address of ``addrs`` (uint64, any order) in the
    ``leaves`` of :meth:`PageTables.leaves`: ``(kinds, pfns, entries)`` as
    numpy arrays (kinds per ``KIND_NAMES``; pfns valid where the kind is
    present or PROT_NONE, the 4 KiB subpage's pfn inside a huge leaf)."""
    q, ents, start, span = match_leaves(leaves, addrs)
    kinds = np.zeros(q.size, dtype=np.uint8)
    nonnone = (ents & np.uint64(~_PAGE_KNL_ERRATUM_MASK & (2**64 - 1))) != 0
    present = (ents & np.uint64(_PAGE_PRESENT)) != 0
    protnone = ~present & ((ents & np.uint64(_PAGE_PROTNONE)) != 0) & nonnone
    kinds[nonnone] = KIND_SWAP
    kinds[present & nonnone] = KIND_PRESENT
    kinds[protnone] = KIND_PROT_NONE
    v = np.where(present | ~nonnone, ents, ~ents)               # PROT_NONE: inverted
    pfns = leaf_pfns(kinds, (v & np.uint64(PTE_PFN_MASK)) >> np.uint64(PAGE_SHIFT),
                     q, start, span)
    return kinds, pfns, ents
