"""ksmlens.kernel.pgtable_arm64 on hand-built 3- and 4-level arm64 page tables (no guest).

The bit layouts are the kernel's (arch/arm64/include/asm/pgtable-hwdef.h,
pgtable-prot.h, pgtable.h); an arm64 guest's own tables are read in
tests/lens/test_arm64.py. Here: table/block/page descriptors, PROT_NONE
(present-invalid, two markers by kernel version), swap entries, dirty as
pte_dirty() sees it.
"""

import numpy as np
import pytest

from ksmlens.errors import KsmlensError
from ksmlens.kernel import pgtable as X
from ksmlens.kernel import pgtable_arm64 as A

PHYS_OFFSET = 0x4000_0000                       # QEMU virt's RAM starts at 1 GiB
PAGE_OFFSET = (-(1 << 48)) & (2**64 - 1)        # _PAGE_OFFSET(48)
LINEAR = (PAGE_OFFSET - PHYS_OFFSET) & (2**64 - 1)


class Mem:
    """Physical pages as 512-entry tables, read through the linear map."""

    def __init__(self):
        self.pages = {}
        self.next = PHYS_OFFSET + 0x1000

    def new(self):
        pa = self.next
        self.next += 0x1000
        self.pages[pa] = np.zeros(512, dtype="<u8")
        return pa

    def read(self, addr, size):
        pa = (addr - LINEAR) & (2**64 - 1)
        t = self.pages.get(pa & ~0xFFF)
        return None if t is None else t.tobytes()[pa & 0xFFF:(pa & 0xFFF) + size]


def build(va_bits, maps):
    """maps: {addr: (entry_bits, pfn, leaf_shift)}; returns (mem, pgd_virt)."""
    m = Mem()
    pgd = m.new()
    shifts = (39, 30, 21, 12) if va_bits == 48 else (30, 21, 12)
    for addr, (bits, pfn, leaf_shift) in maps.items():
        table = pgd
        for sh in shifts:
            i = (addr >> sh) & 511
            if sh == leaf_shift:
                m.pages[table][i] = (pfn << 12) | bits
                break
            e = int(m.pages[table][i])
            if not e:
                m.pages[table][i] = m.new() | A.PMD_TYPE_TABLE
                e = int(m.pages[table][i])
            table = e & A.PTE_ADDR_LOW
    return m, (LINEAR + pgd) & (2**64 - 1)


USER_PAGE = A.PTE_TYPE_PAGE | A.PTE_USER | A.PTE_AF | A.PTE_NG | (3 << 8)   # PAGE_READONLY-ish
BLOCK = A.PMD_TYPE_SECT | A.PTE_USER | A.PTE_AF | A.PTE_NG


@pytest.mark.parametrize("va_bits", [39, 48])
def test_lookup_and_leaves_agree(va_bits):
    B = 0x7F_0000_0000 if va_bits == 39 else 0xFFFF_0000_0000
    # 6.12: PROT_NONE is PTE_PRESENT_INVALID (nG) with PTE_VALID clear
    prot_none = (A.PTE_TYPE_PAGE & ~A.PTE_VALID) | A.PTE_NG | A.PTE_AF | A.PTE_USER
    swap = (5 << 6) | (0x1234 << 12)                # type 5, offset 0x1234: bit 11 clear
    maps = {
        B: (USER_PAGE | A.PTE_DIRTY | A.PTE_RDONLY, 0x41234, 12),
        B + 0x1000: (prot_none, 0x45678, 12),
        B + 0x2000: (swap, 0, 12),
        B + 0x20_0000: (BLOCK, 0x48000 & ~0x1FF, 21),                    # 2 MiB block
        B + 0x4000_0000: (BLOCK, 0x80000, 30),                           # 1 GiB block
    }
    m, pgd = build(va_bits, maps)
    pt = A.PageTables(m.read, LINEAR, va_bits)
    assert pt.levels == (4 if va_bits == 48 else 3) and pt.user_top == 1 << va_bits
    assert pt.lookup(pgd, B)[:2] == ("present", 0x41234)
    assert pt.lookup(pgd, B + 0x1000)[:2] == ("prot_none", 0x45678)
    assert pt.lookup(pgd, B + 0x2000)[:2] == ("swap", None)
    assert pt.lookup(pgd, B + 0x3000)[:2] == ("none", None)
    assert pt.lookup(pgd, B + 0x20_0000 + 5 * 0x1000)[:2] == ("present", 0x48005)
    assert pt.lookup(pgd, B + 0x4000_0000 + 0x30_1000)[:2] == ("present", 0x80000 + 0x301)
    assert pt.lookup(pgd, B + 0x8000_0000)[:2] == ("none", None)
    qs = [B, B + 0x1000, B + 0x2000, B + 0x3000, B + 0x20_0000 + 5 * 0x1000,
          B + 0x4000_0000 + 0x30_1000, B + 0x8000_0000]
    leaves = pt.leaves(pgd, B, B + 0x1_0000_0000)
    kinds, pfns, ents = pt.decode(leaves, np.array(qs, dtype=np.uint64))
    got = [(X.KIND_NAMES[k], int(p)) for k, p in zip(kinds, pfns)]
    want = [(pt.lookup(pgd, q)[0], pt.lookup(pgd, q)[1] or 0) for q in qs]
    assert got == want
    assert [int(a) for a in leaves[0]] == sorted(maps)


def test_prot_none_marker_by_kernel_version():
    old = A.PTE_PROT_NONE_6_1 | A.PTE_AF | A.PTE_USER | (0x42 << 12)   # 6.1's PROT_NONE
    new = A.PTE_PRESENT_INVALID | A.PTE_AF | A.PTE_USER | (0x42 << 12)
    pt61 = A.PageTables(lambda a, s: None, LINEAR, 48, A.PTE_PROT_NONE_6_1)
    pt612 = A.PageTables(lambda a, s: None, LINEAR, 48, A.PTE_PRESENT_INVALID)
    assert pt61.kind(old) == "prot_none" and pt612.kind(new) == "prot_none"
    # bit 58 is uffd-wp from v6.10 on; a non-present entry with it is no page
    assert pt612.kind(old) == "swap" and pt61.kind(new) == "swap"
    assert pt612.present(new) and not pt612.present((5 << 6) | (1 << 12))
    assert A._release_tuple("6.12.118-ksmlens-stock") == (6, 12) >= A.PROT_NONE_MOVED
    assert A._release_tuple("6.1.159") < A.PROT_NONE_MOVED


def test_dirty_and_special_follow_pte_dirty():
    e = np.array([
        USER_PAGE | A.PTE_RDONLY,                        # clean, read-only
        USER_PAGE | A.PTE_WRITE,                         # writable, RDONLY clear: hw dirty
        USER_PAGE | A.PTE_WRITE | A.PTE_RDONLY,          # writable, not yet written
        USER_PAGE | A.PTE_RDONLY | A.PTE_DIRTY | A.PTE_SPECIAL,   # a KSM zero page
    ], dtype=np.uint64)
    assert A.PageTables.dirty(e).tolist() == [False, True, False, True]
    assert A.PageTables.special(e).tolist() == [False, False, False, True]


def test_unsupported_layouts_are_refused_in_one_line():
    with pytest.raises(KsmlensError, match="52-bit|VAs"):
        A.PageTables(lambda a, s: None, LINEAR, 52)
    assert A.pgtable_levels(48) == 4 and A.pgtable_levels(39) == 3
