"""arm64 page tables read from kernel memory, with the kernel's own semantics.

Every bit is named once, as in ``arch/arm64/include/asm/pgtable-hwdef.h``
(the hardware's) and ``pgtable-prot.h`` (the kernel's software bits), and
decoded as ``arch/arm64/include/asm/pgtable.h`` does (``pte_present()``,
``pte_pfn()``, ``pte_dirty()``, ``pmd_leaf()``). ksmlens reads 4 KiB pages
(``CONFIG_ARM64_4K_PAGES``) with 39- or 48-bit VAs (3 or 4 levels); a 16K or
64K kernel, or 52-bit PAs (LPA2, another PFN layout), is refused in one line.
Where arm64 differs from x86-64 (:mod:`ksmlens.kernel.pgtable`):

* ``pte_none()`` is the whole entry zero (no erratum bits).
* a ``PROT_NONE`` mapping is present to the kernel but not to the MMU:
  ``PTE_VALID`` clear and the marker set. The marker moved: 6.1 has a
  software bit ``PTE_PROT_NONE`` (58); "arm64/mm: Remove PTE_PROT_NONE bit"
  (merged for v6.10) made it ``PTE_PRESENT_INVALID``, which is ``PTE_NG``
  (11), and gave bit 58 to uffd-wp. The PFN is not inverted.
* "dirty" is the software ``PTE_DIRTY`` (55) or hardware-dirty, a writable
  (``PTE_WRITE`` = ``PTE_DBM``, 51) entry with ``PTE_RDONLY`` (7) clear; a KSM
  zero page is mapped ``pte_mkdirty(pte_mkspecial(...))``, so its
  ``is_ksm_zero_pte()`` (include/linux/ksm.h) reads the software bit.
* a huge leaf is a *block* descriptor: bits[1:0] = 0b01 at PMD or PUD level
  (``pmd_leaf()``: present and not ``pmd_table()``).
"""

from __future__ import annotations

import numpy as np

from ksmlens.errors import KsmlensError
from ksmlens.kernel.pgtable import (KIND_PRESENT, KIND_PROT_NONE, KIND_SWAP, TableReader,
                                    leaf_pfns, match_leaves)

__all__ = [
    "PAGE_SHIFT", "PAGE_SIZE", "PTRS_PER_TABLE", "PTE_VALID", "PTE_TYPE_MASK", "PTE_TYPE_PAGE",
    "PMD_TYPE_TABLE", "PMD_TYPE_SECT", "PTE_USER", "PTE_RDONLY", "PTE_AF", "PTE_NG", "PTE_DBM",
    "PTE_WRITE", "PTE_DIRTY", "PTE_SPECIAL", "PTE_PROT_NONE_6_1", "PTE_PRESENT_INVALID",
    "PTE_ADDR_LOW", "PROT_NONE_MOVED", "pgtable_levels", "vmcoreinfo_numbers", "PageTables",
]

# arch/arm64/include/asm/page-def.h (CONFIG_ARM64_4K_PAGES)
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PTRS_PER_TABLE = 1 << (PAGE_SHIFT - 3)     # PTRS_PER_PTE / PMD / PUD / PGD: 512
# arch/arm64/include/asm/pgtable-hwdef.h
PTE_VALID = 1 << 0
PTE_TYPE_MASK = 3 << 0
PTE_TYPE_PAGE = 3 << 0                     # a level-3 page descriptor
PMD_TYPE_TABLE = 3 << 0                    # levels 0-2: a pointer to the next table
PMD_TYPE_SECT = 1 << 0                     # levels 1-2: a block (1 GiB / 2 MiB) leaf
PTE_USER = 1 << 6                          # AP[1]
PTE_RDONLY = 1 << 7                        # AP[2]
PTE_AF = 1 << 10                           # the Access Flag
PTE_NG = 1 << 11                           # nG
PTE_DBM = 1 << 51                          # Dirty Bit Management
# the output address of a 4K-granule descriptor with 48-bit PAs
# (PHYS_MASK_SHIFT 48; PTE_ADDR_LOW): bits 47..12
PTE_ADDR_LOW = ((1 << (48 - PAGE_SHIFT)) - 1) << PAGE_SHIFT
# arch/arm64/include/asm/pgtable-prot.h: the kernel's software bits
PTE_WRITE = PTE_DBM
PTE_DIRTY = 1 << 55
PTE_SPECIAL = 1 << 56
PTE_PROT_NONE_6_1 = 1 << 58                # PTE_PROT_NONE before v6.10 (only when !PTE_VALID)
PTE_PRESENT_INVALID = PTE_NG               # from v6.10 (only when !PTE_VALID)
PROT_NONE_MOVED = (6, 10)                  # "arm64/mm: Remove PTE_PROT_NONE bit"


def pgtable_levels(va_bits: int) -> int:
    """``ARM64_HW_PGTABLE_LEVELS(va_bits)`` for 4K pages: 48 -> 4, 39 -> 3."""
    return (va_bits - 4) // (PAGE_SHIFT - 3)


def _release_tuple(release: str) -> tuple[int, int]:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        raise KsmlensError(f"cannot read a kernel version from {release!r}",
                           "the kernel's UTS release names it (uname -r)") from None


_U = np.uint64


def vmcoreinfo_numbers(prog) -> dict[str, str]:
    """The ``NUMBER(name)=value`` lines of the kernel's vmcoreinfo (drgn's
    ``VMCOREINFO`` object), as ``{name: value text}``."""
    text = prog["VMCOREINFO"].string_().decode(errors="replace")
    out = {}
    for line in text.splitlines():
        if line.startswith("NUMBER(") and ")=" in line:
            name, value = line[len("NUMBER("):].split(")=", 1)
            out[name] = value.strip()
    return out


class PageTables(TableReader):
    """arm64 page-table lookups of user mms, through a 4 KiB page cache: the
    interface of :class:`ksmlens.kernel.pgtable.PageTables`.

    ``read(addr, size) -> bytes | None`` reads kernel memory; ``linear`` is
    the linear map's offset, ``__phys_to_virt(pa) = pa + linear`` (mod 2**64:
    ``PAGE_OFFSET - PHYS_OFFSET``); ``va_bits`` 39 or 48;
    ``prot_none``: the bit that marks a present-invalid (PROT_NONE) entry,
    :data:`PTE_PRESENT_INVALID` (v6.10 on) or :data:`PTE_PROT_NONE_6_1`.
    """

    arch = "arm64"
    page_shift = PAGE_SHIFT

    def __init__(self, read, linear: int, va_bits: int = 48,
                 prot_none: int = PTE_PRESENT_INVALID):
        if va_bits not in (39, 48):
            raise KsmlensError(f"an arm64 kernel with {va_bits}-bit VAs",
                               "ksmlens reads 39- and 48-bit VAs with 4K pages")
        self.read = read
        self.linear = linear & (2**64 - 1)
        self.va_bits = va_bits
        self.levels = pgtable_levels(va_bits)
        self.shifts = tuple(PAGE_SHIFT + 9 * i for i in range(self.levels))[::-1]
        self.prot_none = prot_none
        self.user_top = 1 << va_bits            # TASK_SIZE_64: 1 << VA_BITS
        self.tables: dict[int, np.ndarray | None] = {}

    @classmethod
    def of(cls, prog, read) -> "PageTables":
        """For a drgn Program of an arm64 kernel: ``VA_BITS`` and
        ``PHYS_OFFSET`` from its vmcoreinfo (arch/arm64/kernel/vmcore_info.c,
        ``arch_crash_save_vmcoreinfo()``), ``PAGE_OFFSET`` =
        ``_PAGE_OFFSET(VA_BITS)`` (arch/arm64/include/asm/memory.h), the
        PROT_NONE marker by the kernel's version. :class:`KsmlensError` for a
        page size ksmlens does not read."""
        shift = int(prog["PAGE_SHIFT"].value_())
        if shift != PAGE_SHIFT:
            raise KsmlensError(f"an arm64 kernel with {1 << (shift - 10)} KiB pages",
                               "ksmlens reads arm64 kernels built with CONFIG_ARM64_4K_PAGES")
        info = vmcoreinfo_numbers(prog)
        try:
            va_bits = int(info["VA_BITS"])
            phys_offset = int(info["PHYS_OFFSET"], 16)
        except KeyError as e:
            raise KsmlensError(f"the arm64 kernel's vmcoreinfo has no NUMBER({e.args[0]})",
                               "ksmlens needs CONFIG_VMCORE_INFO (CONFIG_CRASH_CORE before 6.9)"
                               ) from None
        page_offset = (-(1 << va_bits)) & (2**64 - 1)        # _PAGE_OFFSET(VA_BITS)
        release = prog["UTS_RELEASE"].string_().decode()
        moved = _release_tuple(release) >= PROT_NONE_MOVED
        return cls(read, page_offset - phys_offset, va_bits,
                   PTE_PRESENT_INVALID if moved else PTE_PROT_NONE_6_1)

    # ---------------------------------------------------------- one entry

    def none(self, v: int) -> bool:
        """``pte_none()``: the entry is zero."""
        return v == 0

    def present(self, v: int) -> bool:
        """``pte_present()``: valid, or present-invalid (PROT_NONE)."""
        return bool(v & PTE_VALID) or (v & (PTE_VALID | self.prot_none)) == self.prot_none

    def kind(self, v: int) -> str:
        """``"none"``, ``"present"``, ``"prot_none"`` or ``"swap"`` (a swap or
        migration entry), as :func:`ksmlens.kernel.pgtable.pte_kind`."""
        if v == 0:
            return "none"
        if v & PTE_VALID:
            return "present"
        if v & self.prot_none:
            return "prot_none"
        return "swap"

    @staticmethod
    def pfn(v: int) -> int:
        """``pte_pfn()``: the output address's page number (never inverted)."""
        return (v & PTE_ADDR_LOW) >> PAGE_SHIFT

    def _next(self, entry: int) -> int:
        return (self.linear + (entry & PTE_ADDR_LOW)) & (2**64 - 1)

    def _class(self, e: int, level: int) -> str:
        last = len(self.shifts) - 1
        if e == 0:
            return "none"
        if (e & PTE_TYPE_MASK) == PMD_TYPE_TABLE:          # pmd_table() / pud_table()
            return "table"
        if level >= last - 2 and self.present(e):           # a block: pmd_leaf() / pud_leaf()
            return "leaf"
        return "swap" if level == last - 1 else "none"      # a PMD migration entry


    # ---------------------------------------------------------- in bulk

    def decode(self, leaves, addrs: np.ndarray):
        """Look up every address of ``addrs`` in ``leaves``: ``(kinds, pfns,
        entries)``, as :func:`ksmlens.kernel.pgtable.decode`."""
        q, ents, start, span = match_leaves(leaves, addrs)
        kinds = np.zeros(q.size, dtype=np.uint8)
        nonnone = ents != 0
        valid = (ents & _U(PTE_VALID)) != 0
        protnone = ~valid & ((ents & _U(self.prot_none)) != 0)
        kinds[nonnone] = KIND_SWAP
        kinds[nonnone & valid] = KIND_PRESENT
        kinds[nonnone & protnone] = KIND_PROT_NONE
        pfns = leaf_pfns(kinds, (ents & _U(PTE_ADDR_LOW)) >> _U(PAGE_SHIFT), q, start, span)
        return kinds, pfns, ents

    @staticmethod
    def dirty(ents: np.ndarray) -> np.ndarray:
        """``pte_dirty()`` of each entry: ``pte_sw_dirty() || pte_hw_dirty()``."""
        e = np.asarray(ents, dtype=np.uint64)
        sw = (e & _U(PTE_DIRTY)) != 0
        hw = ((e & _U(PTE_WRITE)) != 0) & ((e & _U(PTE_RDONLY)) == 0)
        return sw | hw

    @staticmethod
    def special(ents: np.ndarray) -> np.ndarray:
        """``pte_special()`` of each entry."""
        return (np.asarray(ents, dtype=np.uint64) & _U(PTE_SPECIAL)) != 0
