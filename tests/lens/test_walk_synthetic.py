"""Unit tests of :mod:`ksmlens.lens.helpers` on synthetic kernels (no VM).

Each test lays out mm/ksm.c's structures in fake memory behind a drgn
program that has a real lab vmlinux's DWARF types (see ``synthetic.py``),
then checks the helpers against the exact objects it linked.
"""

from __future__ import annotations

import random

import pytest
from drgn.helpers.linux.rbtree import validate_rbtree

import ksmlens.lens.helpers as walk
from ksmlens.lens.helpers import SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG

from synthetic import (SyntheticKernel, add_rmap_items_to_stable_node, find_vmlinux,
                       init_ksm_globals, link_rmap_list, new_chain, new_mm_slot,
                       new_rmap_item, new_stable_node, rb_nodes,
                       variant_of)

SN = "struct ksm_stable_node"
RI = "struct ksm_rmap_item"
MS = "struct ksm_mm_slot"
AVC = "struct anon_vma_chain"
VMA = "struct vm_area_struct"
PAGE_SHIFT = 12


@pytest.fixture(scope="module")
def kernel():
    found = find_vmlinux()
    if found is None:
        pytest.skip("no lab kernel built: neither kbuild.find_kernel('stock') nor "
                    "~/.cache/ksmlens/kernels/*/vmlinux exists (CI builds the kernels "
                    "before the tests; locally run `ksmlens vm build --variant stock`)")
    return SyntheticKernel(*found)


@pytest.fixture
def k(kernel):
    kernel.reset()
    init_ksm_globals(kernel)
    return kernel


def addrs(objs) -> list[int]:
    return [o.value_() for o in objs]


def type_name(obj) -> str:
    return obj.type_.type_name()


# ------------------------------------------------------------------ 1. empty state

def test_synthetic_program_is_a_kernel(k):
    assert k.prog["PAGE_SHIFT"].value_() == PAGE_SHIFT
    assert k.prog["ksm_nr_node_ids"].value_() == 1
    assert k.prog["root_stable_tree"].value_() == k.sym("one_stable_tree")
    # the builder writes where drgn reads, through the DWARF layout
    k.set_global("ksm_scan", "seqnr", 0x1234)
    assert k.prog["ksm_scan"].seqnr.value_() == 0x1234
    with pytest.raises(ValueError):
        k.set_global("ksm_nr_node_ids", None, 1 << 40)


def test_empty_state_yields_nothing(k):
    p = k.prog
    assert [(nid, r.value_()) for nid, r in walk.ksm_stable_tree_roots(p)] == \
        [(0, k.sym("one_stable_tree"))]
    assert list(walk.for_each_stable_tree_node(p)) == []
    assert list(walk.for_each_stable_node(p)) == []
    assert list(walk.for_each_migrate_node(p)) == []
    assert list(walk.for_each_ksm_mm_slot(p)) == []
    assert list(walk.for_each_rmap_item(p)) == []
    assert list(walk.for_each_unstable_rmap_item(p)) == []


def _set_counters(k, *, shared, sharing, unshared, rmap_items, seqnr, zero_pages):
    k.set_global("ksm_pages_shared", None, shared)
    k.set_global("ksm_pages_sharing", None, sharing)
    k.set_global("ksm_pages_unshared", None, unshared)
    k.set_global("ksm_rmap_items", None, rmap_items)
    k.set_global("ksm_pages_scanned", None, 123456)
    k.set_global("ksm_pages_skipped", None, 77)
    k.set_global("ksm_stable_node_chains", None, 2)
    k.set_global("ksm_stable_node_dups", None, 5)
    k.set_global("ksm_zero_pages", "counter", zero_pages)
    k.set_global("ksm_scan", "seqnr", seqnr)


def test_counters(k):
    _set_counters(k, shared=3, sharing=10, unshared=5, rmap_items=25, seqnr=0x1234,
                  zero_pages=4)
    item_size = k.sizeof(RI)
    assert walk.ksm_counters(k.prog) == {
        "pages_shared": 3,
        "pages_sharing": 10,
        "pages_unshared": 5,
        "pages_scanned": 123456,
        "pages_skipped": 77,
        "stable_node_chains": 2,
        "stable_node_dups": 5,
        "rmap_items": 25,
        "full_scans": 0x1234,      # the whole seqnr, not its SEQNR_MASK bits
        "ksm_zero_pages": 4,
        "pages_volatile": 25 - 3 - 10 - 5,
        "general_profit": (10 + 4) * 4096 - 25 * item_size,
    }


def test_counters_volatile_clamped_and_profit_negative(k):
    _set_counters(k, shared=3, sharing=10, unshared=5, rmap_items=10, seqnr=7, zero_pages=0)
    c = walk.ksm_counters(k.prog)
    assert c["pages_volatile"] == 0            # 10 - 3 - 10 - 5 < 0
    assert c["full_scans"] == 7
    _set_counters(k, shared=0, sharing=0, unshared=0, rmap_items=1000, seqnr=1, zero_pages=0)
    c = walk.ksm_counters(k.prog)
    assert c["pages_volatile"] == 1000
    assert c["general_profit"] == -1000 * k.sizeof(RI)


def test_settings(k):
    values = {"ksm_run": 1, "ksm_thread_pages_to_scan": 100, "ksm_thread_sleep_millisecs": 20,
              "ksm_max_page_sharing": 256, "ksm_merge_across_nodes": 0,
              "ksm_use_zero_pages": 1, "ksm_smart_scan": 1,
              "ksm_stable_node_chains_prune_millisecs": 2000,
              "ksm_advisor_max_cpu": 70, "ksm_advisor_min_pages_to_scan": 500,
              "ksm_advisor_max_pages_to_scan": 30000, "ksm_advisor_target_scan_time": 200}
    for name, v in values.items():
        k.set_global(name, None, v)
    assert walk.ksm_settings(k.prog) == {
        "run": 1, "pages_to_scan": 100, "sleep_millisecs": 20, "max_page_sharing": 256,
        "merge_across_nodes": 0, "use_zero_pages": 1, "smart_scan": 1,
        "stable_node_chains_prune_millisecs": 2000,
        "advisor_max_cpu": 70, "advisor_min_pages_to_scan": 500,
        "advisor_max_pages_to_scan": 30000, "advisor_target_scan_time": 200,
    }


# ------------------------------------------------------------------ 2. stable tree

def test_stable_tree_regular_nodes_chain_and_dups(k):
    p = k.prog
    r1 = new_stable_node(k, 0x1001)
    r1_items = add_rmap_items_to_stable_node(k, r1, [0x7f0000001000, 0x7f0000002000])
    chain, dups, dup_items = new_chain(
        k, [[0x7f0000010000, 0x7f0000011000], [0x7f0000020000]], kpfn0=0x2001)
    r2 = new_stable_node(k, 0x3001)
    r2_items = add_rmap_items_to_stable_node(k, r2, [0x7f0000030000])
    r3 = new_stable_node(k, 0x4001)
    r3_items = add_rmap_items_to_stable_node(
        k, r3, [0x7f0000040000, 0x7f0000041000, 0x7f0000042000])
    # a node parked on migrate_nodes (stable_node->head = &migrate_nodes)
    mig = new_stable_node(k, 0x5001, nid=1)
    k.set(mig, SN, "head", k.sym("migrate_nodes"))
    k.list_add_tail(k.addr(mig, SN, "list"), k.sym("migrate_nodes"))
    mig_items = add_rmap_items_to_stable_node(k, mig, [0x7f0000050000])

    tree = [r1, chain, r2, r3]
    k.rb_build(k.sym("one_stable_tree"), rb_nodes(k, tree, SN))
    pos = {a: i for i, a in enumerate(tree)}
    validate_rbtree(SN, k.prog["root_stable_tree"], "node",
                    lambda a, b: pos[a.value_()] - pos[b.value_()], False)

    nodes = list(walk.for_each_stable_tree_node(p))
    assert addrs(nodes) == tree
    assert all(type_name(n) == "struct ksm_stable_node *" for n in nodes)
    assert [walk.is_stable_node_chain(n) for n in nodes] == [False, True, False, False]
    assert [walk.is_stable_node_dup(n) for n in nodes] == [False] * 4

    assert len(dups) == 2
    dup_objs = list(walk.for_each_stable_node_dup(nodes[1]))
    assert addrs(dup_objs) == dups
    assert [walk.is_stable_node_dup(d) for d in dup_objs] == [True, True]
    assert [walk.is_stable_node_chain(d) for d in dup_objs] == [False, False]
    assert [d.kpfn.value_() for d in dup_objs] == [0x2002, 0x2001]

    mig_obj = k.obj(mig, SN)
    assert not walk.is_stable_node_dup(mig_obj) and not walk.is_stable_node_chain(mig_obj)
    assert addrs(walk.for_each_migrate_node(p)) == [mig]

    assert addrs(walk.for_each_stable_node(p)) == [r1, *dups, r2, r3, mig]

    expected_items = {r1: r1_items, r2: r2_items, r3: r3_items, mig: mig_items,
                      dups[0]: dup_items[0], dups[1]: dup_items[1]}
    for node, items in expected_items.items():
        got = list(walk.for_each_stable_node_rmap_item(k.obj(node, SN)))
        assert addrs(got) == items, hex(node)
        assert all(type_name(i) == "struct ksm_rmap_item *" for i in got)
        assert all(walk.rmap_item_state(i) == "stable" for i in got)
        assert all(i.head.value_() == node for i in got)
    assert [len(v) for v in expected_items.values()] == [2, 1, 3, 1, 1, 2]
    # hlist_add_head(): the last appended item comes first
    assert [walk.rmap_item_address(i)
            for i in walk.for_each_stable_node_rmap_item(k.obj(r3, SN))] == \
        [0x7f0000042000, 0x7f0000041000, 0x7f0000040000]


def test_chain_without_dups_yields_nothing(k):
    chain, dups, _ = new_chain(k, [], kpfn0=1)
    k.rb_build(k.sym("one_stable_tree"), rb_nodes(k, [chain], SN))
    assert dups == []
    assert list(walk.for_each_stable_node_dup(k.obj(chain, SN))) == []
    assert list(walk.for_each_stable_node(k.prog)) == []
    assert addrs(walk.for_each_stable_tree_node(k.prog)) == [chain]


# ------------------------------------------------------------------ 3. NUMA roots

def test_numa_stable_tree_roots(k):
    p = k.prog
    roots = k.allocate("struct rb_root", count=2)
    root_size = k.sizeof("struct rb_root")
    k.set_global("ksm_nr_node_ids", None, 2)
    k.set_global("root_stable_tree", None, roots)
    # a decoy in the static one_stable_tree, which NUMA mode does not use
    decoy = new_stable_node(k, 0xdead)
    k.rb_build(k.sym("one_stable_tree"), rb_nodes(k, [decoy], SN))

    n0 = [new_stable_node(k, 0x100 + i, nid=0) for i in range(3)]
    n1a = [new_stable_node(k, 0x200 + i, nid=1) for i in range(2)]
    chain, dups, _ = new_chain(k, [[0x7f0000001000]], kpfn0=0x300, nid=1)
    n1b = [new_stable_node(k, 0x400 + i, nid=1) for i in range(2)]
    n1 = n1a + [chain] + n1b
    k.rb_build(roots, rb_nodes(k, n0, SN))
    k.rb_build(roots + root_size, rb_nodes(k, n1, SN))

    got = list(walk.ksm_stable_tree_roots(p))
    assert [(nid, r.value_()) for nid, r in got] == [(0, roots), (1, roots + root_size)]
    assert all(type_name(r) == "struct rb_root *" for _, r in got)

    nodes = list(walk.for_each_stable_tree_node(p))
    assert addrs(nodes) == n0 + n1
    assert [n.nid.value_() for n in nodes] == [0] * 3 + [1] * 5
    assert addrs(walk.for_each_stable_node(p)) == n0 + n1a + dups + n1b


# ------------------------------------------------------------------ 4. mm slots, rmap_items

SEQNR = 0x1234
CUR = SEQNR & SEQNR_MASK        # 0x34
PREV = (SEQNR - 1) & SEQNR_MASK  # 0x33


def _two_slots(k):
    k.set_global("ksm_scan", "seqnr", SEQNR)
    stable = new_stable_node(k, 0x777)
    s1 = new_mm_slot(k, 0xFFFF888001000000)
    s2 = new_mm_slot(k, 0xFFFF888002000000)
    k.set_global("ksm_scan", "mm_slot", s1)
    spec1 = [0x7f0000001000 | STABLE_FLAG,
             0x7f0000002000 | UNSTABLE_FLAG | CUR,
             0x7f0000003000 | UNSTABLE_FLAG | PREV,
             0x7f0000004000]
    spec2 = [0x5600000a0000 | UNSTABLE_FLAG | CUR,
             0x5600000b0000 | STABLE_FLAG]
    items1 = [new_rmap_item(k, a, 0xFFFF888001000000) for a in spec1]
    items2 = [new_rmap_item(k, a, 0xFFFF888002000000) for a in spec2]
    for item, a in zip(items1 + items2, spec1 + spec2):
        if a & STABLE_FLAG:
            k.set(item, RI, "head", stable)
    link_rmap_list(k, s1, items1)
    link_rmap_list(k, s2, items2)
    return s1, s2, items1, items2


def test_mm_slots_and_rmap_items(k):
    p = k.prog
    s1, s2, items1, items2 = _two_slots(k)

    slots = list(walk.for_each_ksm_mm_slot(p))
    assert addrs(slots) == [s1, s2]
    assert all(type_name(s) == "struct ksm_mm_slot *" for s in slots)
    assert [s.slot.mm.value_() for s in slots] == [0xFFFF888001000000, 0xFFFF888002000000]

    assert addrs(walk.for_each_mm_slot_rmap_item(slots[0])) == items1
    assert addrs(walk.for_each_mm_slot_rmap_item(slots[1])) == items2
    all_items = list(walk.for_each_rmap_item(p))
    assert addrs(all_items) == items1 + items2
    assert all(type_name(i) == "struct ksm_rmap_item *" for i in all_items)

    assert [walk.rmap_item_state(i) for i in all_items] == \
        ["stable", "unstable", "unstable", "none", "unstable", "stable"]
    assert [walk.rmap_item_address(i) for i in all_items] == \
        [0x7f0000001000, 0x7f0000002000, 0x7f0000003000, 0x7f0000004000,
         0x5600000a0000, 0x5600000b0000]
    assert [walk.rmap_item_seqnr(i) for i in all_items] == [0, CUR, PREV, 0, CUR, 0]
    assert [walk.rmap_item_in_unstable_tree(i) for i in all_items] == \
        [False, True, False, False, True, False]
    assert [walk.rmap_item_addr_pgoff(i) for i in all_items] == \
        [0x7f0000001, 0x7f0000002, 0x7f0000003, 0x7f0000004, 0x5600000a0, 0x5600000b0]


def test_empty_mm_slot(k):
    s1 = new_mm_slot(k, 0xFFFF888001000000)
    link_rmap_list(k, s1, [])
    s2 = new_mm_slot(k, 0xFFFF888002000000)
    items = [new_rmap_item(k, 0x400000 + (i << PAGE_SHIFT)) for i in range(3)]
    link_rmap_list(k, s2, items)
    assert addrs(walk.for_each_ksm_mm_slot(k.prog)) == [s1, s2]
    assert list(walk.for_each_mm_slot_rmap_item(k.obj(s1, MS))) == []
    assert addrs(walk.for_each_rmap_item(k.prog)) == items


@pytest.mark.parametrize("seqnr, in_tree, stale", [
    (0x1234, 0x34, 0x33),
    (0x100, 0x00, 0xFF),    # the low byte wrapped this pass
    (0x1FF, 0xFF, 0xFE),
    (0, 0x00, 0xFF),
])
def test_rmap_item_in_unstable_tree_by_seqnr(k, seqnr, in_tree, stale):
    k.set_global("ksm_scan", "seqnr", seqnr)
    cur = k.obj(new_rmap_item(k, 0x7f0000001000 | UNSTABLE_FLAG | in_tree), RI)
    old = k.obj(new_rmap_item(k, 0x7f0000002000 | UNSTABLE_FLAG | stale), RI)
    stable = k.obj(new_rmap_item(k, 0x7f0000003000 | STABLE_FLAG | in_tree), RI)
    plain = k.obj(new_rmap_item(k, 0x7f0000004000 | in_tree), RI)
    assert walk.rmap_item_state(cur) == walk.rmap_item_state(old) == "unstable"
    assert walk.rmap_item_in_unstable_tree(cur) is True
    assert walk.rmap_item_in_unstable_tree(old) is False
    assert walk.rmap_item_in_unstable_tree(stable) is False
    assert walk.rmap_item_in_unstable_tree(plain) is False
    assert walk.rmap_item_seqnr(cur) == in_tree and walk.rmap_item_seqnr(old) == stale


@pytest.mark.parametrize("seqnr, prev", [(0x1234, 0x33), (0x100, 0xFF)])
def test_unstable_tree_between_passes(k, seqnr, prev):
    """A pass ends with ksm_scan.seqnr++, but root_unstable_tree is reset only
    when the next pass starts (ksm_scan.mm_slot == &ksm_mm_head): until then
    the tree holds the previous pass's items."""
    k.set_global("ksm_scan", "seqnr", seqnr)
    k.set_global("ksm_scan", "mm_slot", k.sym("ksm_mm_head"))
    prev_item = k.obj(new_rmap_item(k, 0x7f0000001000 | UNSTABLE_FLAG | prev), RI)
    cur = k.obj(new_rmap_item(k, 0x7f0000002000 | UNSTABLE_FLAG | (seqnr & 0xFF)), RI)
    assert walk.ksm_unstable_tree_seqnr(k.prog) == prev
    assert walk.rmap_item_in_unstable_tree(prev_item) is True
    assert walk.rmap_item_in_unstable_tree(cur) is False
    k.set_global("ksm_scan", "mm_slot", 0)          # during a pass
    assert walk.rmap_item_in_unstable_tree(cur) is True
    assert walk.rmap_item_in_unstable_tree(prev_item) is False


def test_rmap_item_stored_pgoff(k):
    item = new_rmap_item(k, 0x7f0000005000 | STABLE_FLAG)
    variant = variant_of(k.release)
    if variant in ("union", "v8"):
        member = {"union": "pgoff", "v8": "linear_page_index"}[variant]
        assert walk.ksm_stored_index_member(k.prog) == member
        k.set(item, RI, member, 0xABCDE)
        assert walk.ksm_has_stored_pgoff(k.prog) is True
        assert walk.rmap_item_stored_pgoff(k.obj(item, RI)) == 0xABCDE
    else:
        # stock (and v3) 6.12: struct ksm_rmap_item has no stored index
        assert walk.ksm_stored_index_member(k.prog) is None
        assert walk.ksm_has_stored_pgoff(k.prog) is False
        assert walk.rmap_item_stored_pgoff(k.obj(item, RI)) is None


def test_linear_page_index(k):
    vma = k.allocate(VMA)
    k.set(vma, VMA, "vm_start", 0x7f0000000000)
    k.set(vma, VMA, "vm_end", 0x7f0000010000)
    k.set(vma, VMA, "vm_pgoff", 0x1234)     # e.g. after mremap(): not vm_start >> 12
    v = k.obj(vma, VMA)
    assert walk.linear_page_index(v, 0x7f0000000000) == 0x1234
    assert walk.linear_page_index(v, 0x7f0000005000) == 0x1239
    assert walk.linear_page_index(v, 0x7f0000005abc) == 0x1239
    assert walk.linear_page_index(v, 0x7f000000f000) == 0x1234 + 15


def test_folio_stable_node(k):
    node = new_stable_node(k, 0x42)
    page = k.allocate("struct page")
    k.set(page, "struct page", "mapping", node | walk.PAGE_MAPPING_KSM)
    got = walk.folio_stable_node(k.obj(page, "struct page"))
    assert got is not None and got.value_() == node
    assert type_name(got) == "struct ksm_stable_node *"
    k.set(page, "struct page", "mapping", node | walk.PAGE_MAPPING_ANON)   # anon, not KSM
    assert walk.folio_stable_node(k.obj(page, "struct page")) is None
    k.set(page, "struct page", "mapping", 0)
    assert walk.folio_stable_node(k.obj(page, "struct page")) is None


# ------------------------------------------------------------------ 5. unstable tree

def _unstable_items(k, n, base):
    return [new_rmap_item(k, (base + (i << PAGE_SHIFT)) | UNSTABLE_FLAG | CUR) for i in range(n)]


def test_unstable_tree(k):
    k.set_global("ksm_scan", "seqnr", SEQNR)
    items = _unstable_items(k, 5, 0x7f0000000000)
    # an older item, no longer in the tree (UNSTABLE_FLAG but previous seqnr)
    new_rmap_item(k, 0x7f0000100000 | UNSTABLE_FLAG | PREV)
    k.rb_build(k.sym("one_unstable_tree"), rb_nodes(k, items, RI))
    got = list(walk.for_each_unstable_rmap_item(k.prog))
    assert addrs(got) == items
    assert all(type_name(i) == "struct ksm_rmap_item *" for i in got)
    assert all(walk.rmap_item_in_unstable_tree(i) for i in got)


def test_unstable_tree_numa(k):
    roots = k.allocate("struct rb_root", count=2)
    k.set_global("ksm_nr_node_ids", None, 2)
    k.set_global("root_unstable_tree", None, roots)
    decoy = _unstable_items(k, 1, 0x10000000)
    k.rb_build(k.sym("one_unstable_tree"), rb_nodes(k, decoy, RI))
    a = _unstable_items(k, 4, 0x7f0000000000)
    b = _unstable_items(k, 3, 0x7e0000000000)
    k.rb_build(roots, rb_nodes(k, a, RI))
    k.rb_build(roots + k.sizeof("struct rb_root"), rb_nodes(k, b, RI))
    assert addrs(walk.for_each_unstable_rmap_item(k.prog)) == a + b


# ------------------------------------------------------------------ 6. anon_vma interval tree

class IntervalTree:
    """An anon_vma whose rb_root holds one anon_vma_chain per (pgoff, npages)."""

    def __init__(self, k: SyntheticKernel, ranges: list[tuple[int, int]]):
        self.k = k
        self.ranges = ranges
        # chains first, contiguous, so reads of them are easy to attribute
        self.avcs = [k.allocate(AVC) for _ in ranges]
        self.anon_vma = k.allocate("struct anon_vma")
        self.root = k.addr(self.anon_vma, "struct anon_vma", "rb_root")
        for i, (avc, (pgoff, npages)) in enumerate(zip(self.avcs, ranges)):
            vma = k.allocate(VMA)
            start = 0x10000000 + (i << 32)
            k.set(vma, VMA, "vm_start", start)
            k.set(vma, VMA, "vm_end", start + (npages << PAGE_SHIFT))
            k.set(vma, VMA, "vm_pgoff", pgoff)
            k.set(avc, AVC, "vma", vma)
            k.set(avc, AVC, "anon_vma", self.anon_vma)
        # the kernel inserts equal starts to the right: in-order is
        # (start, insertion order)
        self.order = sorted(range(len(ranges)), key=lambda i: (ranges[i][0], i))
        by_rb = {k.addr(self.avcs[i], AVC, "rb"): i for i in self.order}
        links = k.rb_build(self.root, list(by_rb), cached=True)
        self.subtree_last = {}
        idx = {0: None, **by_rb}
        self.parent = {i: idx[links[rb][0]] for rb, i in by_rb.items()}
        self.left = {i: idx[links[rb][1]] for rb, i in by_rb.items()}
        self.right = {i: idx[links[rb][2]] for rb, i in by_rb.items()}

        def fill(rb: int) -> int:        # rb_subtree_last, bottom-up
            if not rb:
                return -1
            _, left, right = links[rb]
            i = by_rb[rb]
            m = max(self.last(i), fill(left), fill(right))
            k.set(self.avcs[i], AVC, "rb_subtree_last", m)
            self.subtree_last[i] = m
            return m

        tops = [rb for rb, (parent, _, _) in links.items() if parent == 0]
        assert len(tops) == (1 if ranges else 0)
        for top in tops:
            fill(top)

    def last(self, i: int) -> int:
        pgoff, npages = self.ranges[i]
        return pgoff + npages - 1

    def expected(self, start: int, last: int) -> list[int]:
        return [self.avcs[i] for i in self.order
                if self.ranges[i][0] <= last and start <= self.last(i)]

    def query(self, start: int, last: int) -> list[int]:
        root = self.k.obj(self.root, "struct rb_root_cached")
        return addrs(walk.anon_vma_interval_tree_foreach(root, start, last))

    def validate(self) -> None:
        pos = {self.avcs[i]: n for n, i in enumerate(self.order)}
        root = self.k.obj(self.root, "struct rb_root_cached")
        validate_rbtree(AVC, root.rb_root.address_of_(), "rb",
                        lambda a, b: pos[a.value_()] - pos[b.value_()], False)
        assert root.rb_leftmost.value_() == (
            self.k.addr(self.avcs[self.order[0]], AVC, "rb") if self.ranges else 0)

    def chains_touched(self, reads) -> set[int]:
        """The anon_vma_chains (indices) the logged reads touched."""
        size = self.k.sizeof(AVC)
        return {i for address, count in reads for i, avc in enumerate(self.avcs)
                if address < avc + size and avc < address + count}

    def kernel_walk(self, start: int, last: int) -> tuple[list[int], set[int]]:
        """anon_vma_interval_tree_iter_first()/_iter_next() as written in
        include/linux/interval_tree_generic.h, run on this tree's own model
        (not on memory): the chains it yields and every chain it looks at."""
        touched: set[int] = set()
        parent, left, right, sub = self.parent, self.left, self.right, self.subtree_last
        first = lambda i: self.ranges[i][0]     # noqa: E731

        def look(i):
            touched.add(i)
            return i

        def subtree_search(i):
            while True:
                look(i)
                lft = left[i]
                if lft is not None and start <= sub[look(lft)]:
                    i = lft
                    continue
                if first(i) <= last:
                    if start <= self.last(i):
                        return i
                    if right[i] is not None:
                        i = look(right[i])
                        if start <= sub[i]:
                            continue
                return None

        def iter_first():
            if not self.ranges:
                return None
            top = look(next(i for i, p in parent.items() if p is None))
            if sub[top] < start:
                return None
            if first(look(self.order[0])) > last:
                return None
            return subtree_search(top)

        def iter_next(i):
            rb = right[look(i)]
            while True:
                if rb is not None and start <= sub[look(rb)]:
                    return subtree_search(rb)
                while True:
                    p = parent[look(i)]
                    if p is None:
                        return None
                    prev, i = i, look(p)
                    rb = right[i]
                    if prev != rb:
                        break
                if last < first(i):
                    return None
                if start <= self.last(i):
                    return i

        out = []
        i = iter_first()
        while i is not None:
            out.append(i)
            i = iter_next(i)
        return out, touched


def _ranges_20() -> list[tuple[int, int]]:
    rng = random.Random(20)
    out = [(rng.randrange(0, 200), rng.choice([1, 1, 2, 5, 8, 16, 40])) for _ in range(15)]
    out += [(0, 1), (0, 256),          # same start as each other, nested
            (50, 3), (50, 3),          # identical intervals
            (1 << 40, 16)]             # far away (vm_pgoff of a high address)
    return out


TREES = {
    1: [(5, 3)],
    2: [(10, 5), (3, 20)],                                   # nested
    7: [(0, 1), (0, 10), (5, 2), (20, 5), (21, 1), (40, 100), (8, 30)],
    20: _ranges_20(),
}


def _queries(ranges, rng: random.Random, n_pairs: int) -> list[tuple[int, int]]:
    top = max(p + n for p, n in ranges)
    q = [(0, 2**64 - 1), (0, 0), (2**64 - 1, 2**64 - 1), (top, 2**64 - 1)]
    q += [(p, p) for p in range(0, 260)]
    bounds = sorted({b for p, n in ranges
                     for b in (p - 1, p, p + n - 1, p + n) if b >= 0} | {0})
    for p, n in ranges:
        q += [(p, p), (p + n - 1, p + n - 1), (p, p + n - 1)]
    pairs = [(a, b) for a in bounds for b in bounds if a <= b]
    q += pairs if len(pairs) <= n_pairs else rng.sample(pairs, n_pairs)
    return q


@pytest.mark.parametrize("size", sorted(TREES))
def test_anon_vma_interval_tree_foreach(k, size):
    ranges = TREES[size]
    assert len(ranges) == size
    t = IntervalTree(k, ranges)
    t.validate()
    avc0 = k.obj(t.avcs[0], AVC)
    assert walk.avc_start_pgoff(avc0) == ranges[0][0]
    assert walk.avc_last_pgoff(avc0) == ranges[0][0] + ranges[0][1] - 1
    assert t.query(0, 2**64 - 1) == [t.avcs[i] for i in t.order]
    for start, last in _queries(ranges, random.Random(size), 300):
        assert t.query(start, last) == t.expected(start, last), (start, last)


def test_anon_vma_interval_tree_empty(k):
    t = IntervalTree(k, [])
    assert t.query(0, 2**64 - 1) == []
    assert t.query(5, 5) == []


def test_anon_vma_interval_tree_prunes(k):
    t = IntervalTree(k, TREES[20])
    far = 1 << 40
    assert t.expected(far, far) == [t.avcs[-1]]
    with k.record_reads() as full_reads:
        assert len(t.query(0, 2**64 - 1)) == 20
    with k.record_reads() as narrow_reads:
        assert t.query(far, far) == [t.avcs[-1]]
    full, narrow = len(t.chains_touched(full_reads)), len(t.chains_touched(narrow_reads))
    assert full == 20
    # a balanced tree of 20 has height 5: one root-to-leaf path and the
    # right children looked at on the way, not the whole tree
    assert narrow < full
    assert narrow <= 10, narrow


@pytest.mark.parametrize("size", [7, 20])
def test_anon_vma_interval_tree_reads_what_the_kernel_reads(k, size):
    """The port looks at exactly the chains the kernel's iterator looks at
    (same pruning by rb_subtree_last, same leftmost check), query by query."""
    ranges = TREES[size]
    t = IntervalTree(k, ranges)
    queries = _queries(ranges, random.Random(100 + size), 150)
    for start, last in queries:
        want, want_touched = t.kernel_walk(start, last)
        assert [t.avcs[i] for i in want] == t.expected(start, last)   # the model itself
        with k.record_reads() as reads:
            got = t.query(start, last)
        assert got == [t.avcs[i] for i in want], (start, last)
        assert t.chains_touched(reads) == want_touched, (start, last)
