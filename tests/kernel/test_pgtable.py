"""ksmlens.kernel.pgtable on hand-built 4- and 5-level x86-64 page tables (no guest).

The bit layouts are the kernel's (arch/x86/include/asm/pgtable_types.h,
pgtable-invert.h); the walk must give follow_pfn()'s answer and the kernel's
pte_present() semantics: PROT_NONE entries are present, with inverted PFNs.
"""

import numpy as np
import pytest

from ksmlens.kernel import pgtable as P

DM = 0xFFFF_8880_0000_0000     # a direct map base


class Mem:
    """Physical pages as 512-entry tables, read through the direct map."""

    def __init__(self):
        self.pages = {}
        self.next = 0x1000

    def new(self):
        pa = self.next
        self.next += 0x1000
        self.pages[pa] = np.zeros(512, dtype="<u8")
        return pa

    def read(self, addr, size):
        pa = addr - DM
        t = self.pages.get(pa & ~0xFFF)
        return None if t is None else t.tobytes()[pa & 0xFFF:(pa & 0xFFF) + size]


def build(levels, maps):
    """maps: {addr: (entry_flags, pfn, level_shift)}; returns (mem, pgd_virt)."""
    m = Mem()
    pgd = m.new()
    shifts = (48, 39, 30, 21, 12) if levels == 5 else (39, 30, 21, 12)
    for addr, (flags, pfn, leaf_shift) in maps.items():
        table = pgd
        for sh in shifts:
            i = (addr >> sh) & 511
            if sh == leaf_shift:
                val = (pfn << 12) | flags
                if flags and not flags & P._PAGE_PRESENT and flags & P._PAGE_PROTNONE:
                    val = ((~(pfn << 12)) & P.PTE_PFN_MASK) | flags      # the kernel inverts
                m.pages[table][i] = val
                break
            e = int(m.pages[table][i])
            if not e:
                nt = m.new()
                m.pages[table][i] = nt | P._PAGE_PRESENT | P._PAGE_RW | P._PAGE_USER
                e = int(m.pages[table][i])
            table = e & P.PTE_PFN_MASK
    return m, DM + pgd


@pytest.mark.parametrize("levels", [4, 5])
def test_lookup_and_leaves_agree(levels):
    A = 0x7F00_0000_0000 if levels == 4 else 0x00F0_0000_0000_0000 >> 2
    present = P._PAGE_PRESENT | P._PAGE_USER | P._PAGE_ACCESSED
    maps = {
        A: (present | P._PAGE_DIRTY, 0x1234, 12),
        A + 0x1000: (P._PAGE_PROTNONE | P._PAGE_ACCESSED, 0x5678, 12),     # PROT_NONE
        A + 0x2000: (0x3E00 | (7 << 59), 0, 12),                          # a swap entry
        A + 0x20_0000: (present | P._PAGE_PSE, 0x40000, 21),              # 2 MiB leaf
        A + 0x4000_0000: (present | P._PAGE_PSE, 0x80000, 30),            # 1 GiB leaf
    }
    m, pgd = build(levels, maps)
    pt = P.PageTables(m.read, DM, levels)
    assert pt.lookup(pgd, A) == ("present", 0x1234, maps[A][0] | 0x1234 << 12)
    k, pfn, _ = pt.lookup(pgd, A + 0x1000)
    assert (k, pfn) == ("prot_none", 0x5678) and P.pte_present(_)
    assert pt.lookup(pgd, A + 0x2000)[:2] == ("swap", None)
    assert pt.lookup(pgd, A + 0x3000)[:2] == ("none", None)
    assert pt.lookup(pgd, A + 0x20_0000 + 5 * 0x1000)[:2] == ("present", 0x40005)
    assert pt.lookup(pgd, A + 0x4000_0000 + 0x30_1000)[:2] == ("present", 0x80000 + 0x301)
    assert pt.lookup(pgd, A + 0x8000_0000)[:2] == ("none", None)
    # the range walk, decoded in bulk, gives the same answers
    qs = [A, A + 0x1000, A + 0x2000, A + 0x3000, A + 0x20_0000 + 5 * 0x1000,
          A + 0x4000_0000 + 0x30_1000, A + 0x8000_0000]
    leaves = pt.leaves(pgd, A, A + 0x1_0000_0000)
    kinds, pfns, _ = P.decode(leaves, np.array(qs, dtype=np.uint64))
    got = [(P.KIND_NAMES[k], int(p)) for k, p in zip(kinds, pfns)]
    want = [(pt.lookup(pgd, q)[0], pt.lookup(pgd, q)[1] or 0) for q in qs]
    assert got == want
    assert [int(a) for a in leaves[0]] == sorted(maps)


def test_bits_follow_the_kernel():
    assert P.pte_present(P._PAGE_PROTNONE) and not P.pte_present(0x3E00 | (7 << 59))
    assert P.pte_none(P._PAGE_DIRTY | P._PAGE_ACCESSED)       # the KNL erratum bits
    assert P.pte_pfn(P._PAGE_PROTNONE | (~(0x42 << 12) & P.PTE_PFN_MASK)) == 0x42
    assert P.pte_dirty(P._PAGE_SAVED_DIRTY) and not P.pte_dirty(P._PAGE_ACCESSED)
    # a KSM zero page's PTE as a 6.12 guest holds it (read-only: dirty saved in bit 58)
    ksm_zero = 0x840000000210c225
    assert P.pte_dirty(ksm_zero) and P.pte_special(ksm_zero) and P.pte_pfn(ksm_zero) == 0x210c
    assert not P.pte_dirty(0x800000000210c225)      # a read fault's zero page: clean


def test_sparse_range_reads_only_populated_tables():
    A = 0x7000_0000_0000
    m, pgd = build(4, {A + (1 << 40): (P._PAGE_PRESENT, 9, 12)})
    pt = P.PageTables(m.read, DM, 4)
    la, le, ls = pt.leaves(pgd, A, A + (4 << 40))          # a 4 TiB range
    assert [int(x) for x in la] == [A + (1 << 40)]
    assert len(pt.tables) <= 8
