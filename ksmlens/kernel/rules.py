"""KSM's kernel rules as pure decoders: the same function serves one
value or a numpy array of them (the fast walk decodes columns, the drgn
helpers one object), so each rule is written once.

Sources: ``mm/ksm.c`` (rmap_item address bits, ``rmap_walk_ksm()``,
SmartScan), ``include/linux/pagemap.h`` (``linear_page_index()``),
``include/linux/page-flags.h`` (``folio->mapping`` low bits),
``mm/interval_tree.c`` (``vma_start_pgoff()`` / ``vma_last_pgoff()``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ksmlens.kernel.constants import (PAGE_MAPPING_ANON, PAGE_MAPPING_FLAGS, PAGE_MAPPING_KSM,
                                      SEQNR_MASK, STABLE_FLAG, ULONG_MAX, UNSTABLE_FLAG)

__all__ = [
    "STATE_NONE", "STATE_UNSTABLE", "STATE_STABLE", "STATE_NAMES", "RULES", "RULE_HELP",
    "rmap_item_state", "rmap_item_seqnr", "rmap_item_page_address", "linear_page_index",
    "vma_last_pgoff", "folio_is_anon", "folio_is_ksm", "folio_stable_node", "rule_range",
    "UnionLayout",
]

# rmap_item->address low bits: which tree lists the item
STATE_NONE, STATE_UNSTABLE, STATE_STABLE = 0, 1, 2
STATE_NAMES = ("none", "unstable", "stable")

# What rmap_walk_ksm() searches in each rmap_item's anon_vma interval tree
RULES = ("stock", "v3", "stored")
RULE_HELP = {
    "stock": "[0, ULONG_MAX], then the address filter (unmodified 6.12)",
    "v3": "[address >> PAGE_SHIFT] (the series v1-v3)",
    "stored": "[the stored index] (the union and v8 kernels)",
}


def rmap_item_state(address):
    """``STATE_STABLE`` if STABLE_FLAG, ``STATE_UNSTABLE`` if UNSTABLE_FLAG,
    else ``STATE_NONE`` (``rmap_item->address``, an int or uint64 array)."""
    if isinstance(address, int):
        return (STATE_STABLE if address & STABLE_FLAG else
                STATE_UNSTABLE if address & UNSTABLE_FLAG else STATE_NONE)
    import numpy as np
    a = address.astype(np.uint64, copy=False)
    return np.where(a & np.uint64(STABLE_FLAG), STATE_STABLE,
                    np.where(a & np.uint64(UNSTABLE_FLAG), STATE_UNSTABLE, STATE_NONE)
                    ).astype(np.uint8)


def rmap_item_seqnr(address):
    """``rmap_item->address & SEQNR_MASK``: the unstable tree pass it was
    inserted in (mod 256)."""
    return address & (SEQNR_MASK if isinstance(address, int) else _u64(SEQNR_MASK))


def rmap_item_page_address(address, page_shift: int = 12):
    """``rmap_item->address & PAGE_MASK``: the user address."""
    mask = ~((1 << page_shift) - 1) & ULONG_MAX
    return address & (mask if isinstance(address, int) else _u64(mask))


def linear_page_index(address, vm_start, vm_pgoff, page_shift: int = 12):
    """include/linux/pagemap.h ``linear_page_index()``: ``((address -
    vm_start) >> PAGE_SHIFT) + vm_pgoff``, the page's index in its VMA's
    pgoff space (what an anon_vma interval tree is keyed by)."""
    return ((address - vm_start) >> page_shift) + vm_pgoff


def vma_last_pgoff(vm_start, vm_end, vm_pgoff, page_shift: int = 12):
    """mm/interval_tree.c ``vma_last_pgoff()``: the last pgoff a VMA maps."""
    return vm_pgoff + ((vm_end - vm_start) >> page_shift) - 1


def folio_is_anon(mapping):
    """``folio_test_anon()``: ``folio->mapping`` has PAGE_MAPPING_ANON."""
    return (mapping & PAGE_MAPPING_ANON) != 0


def folio_is_ksm(mapping):
    """``folio_test_ksm()``: ``folio->mapping`` low bits == PAGE_MAPPING_KSM."""
    if isinstance(mapping, int):
        return (mapping & PAGE_MAPPING_FLAGS) == PAGE_MAPPING_KSM
    return (mapping & _u64(PAGE_MAPPING_FLAGS)) == _u64(PAGE_MAPPING_KSM)


def folio_stable_node(mapping):
    """``folio_stable_node()``: the stable node address a KSM folio's
    mapping points to (0 where the folio is not KSM)."""
    if isinstance(mapping, int):
        return mapping & ~PAGE_MAPPING_FLAGS & ULONG_MAX if folio_is_ksm(mapping) else 0
    import numpy as np
    return np.where(folio_is_ksm(mapping), mapping & _u64(~PAGE_MAPPING_FLAGS & ULONG_MAX),
                    _u64(0))


def rule_range(rule: str, addr_pgoff, stored=None):
    """The pgoff range ``(start, last)`` ``rmap_walk_ksm()`` queries for one
    rmap_item under ``rule`` (a KSM folio is one page); None for
    ``stored`` when nothing is stored."""
    if rule == "stock":
        return 0, ULONG_MAX
    if rule == "v3":
        return addr_pgoff, addr_pgoff
    if rule == "stored":
        return None if stored is None else (stored, stored)
    from ksmlens.errors import KsmlensError
    raise KsmlensError(f"unknown rmap walk rule {rule!r}", f"choose one of {', '.join(RULES)}")


@dataclass(frozen=True)
class UnionLayout:
    """Where SmartScan's fields sit in the 8 bytes of ``struct
    ksm_rmap_item`` that a stored index shares (the seed mail's union):
    byte offsets within that word, from the kernel's DWARF. The default
    is 6.12's ``{u32 oldchecksum; u8 age; u8 remaining_skips;}``."""
    oldchecksum: int = 0
    age: int = 4
    remaining_skips: int = 5

    def decode(self, raw):
        """``(oldchecksum, age, remaining_skips)`` of the union word(s)."""
        o, a, s = self.oldchecksum * 8, self.age * 8, self.remaining_skips * 8
        if isinstance(raw, int):
            return (raw >> o) & 0xFFFFFFFF, (raw >> a) & 0xFF, (raw >> s) & 0xFF
        import numpy as np
        r = raw.astype(np.uint64, copy=False)
        return ((r >> _u64(o)) & _u64(0xFFFFFFFF)).astype(np.uint32), \
            ((r >> _u64(a)) & _u64(0xFF)).astype(np.uint8), \
            ((r >> _u64(s)) & _u64(0xFF)).astype(np.uint8)

    def with_smartscan(self, raw: int, age: int, skips: int) -> int:
        """The word after SmartScan writes ``age`` and ``remaining_skips``
        (the bytes a stored index loses when they share them)."""
        a, s = self.age * 8, self.remaining_skips * 8
        raw &= ~((0xFF << a) | (0xFF << s)) & ULONG_MAX
        return raw | (age & 0xFF) << a | (skips & 0xFF) << s

    def smartscan_bytes(self) -> tuple[int, int]:
        """Byte offsets (within the word) SmartScan writes: age, remaining_skips."""
        return self.age, self.remaining_skips


def _u64(v: int):
    import numpy as np
    return np.uint64(v)
