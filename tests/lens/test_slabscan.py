"""ksmlens.lens.slabscan's ordering on candidate sets built here: real
lists and trees mixed with the stale links free slab objects keep. The
memmap scan itself is tested against real guests (tests/lens/test_lens_vm.py,
tests/lens/test_walk_100k_vm.py): both walks must give the same Raw."""

import random

import numpy as np
import pytest

from ksmlens.lens import slabscan

U = np.uint64


def _candidates(rng, n, base=0xFFFF888000100000, size=64):
    """n candidate addresses in slab-like runs (sorted)."""
    return np.sort(np.array(rng.sample(range(n * 4), n), dtype=U) * U(size) + U(base))


def _lists(rng, addrs, lengths):
    """Disjoint lists over ``addrs`` plus stale links among the rest, some
    of them into the lists (freed rmap_items keep their rmap_list)."""
    perm = rng.sample(range(addrs.size), addrs.size)
    nexts = np.zeros(addrs.size, dtype=U)
    heads, want, k = [], [], 0
    for ln in lengths:
        idx = perm[k:k + ln]
        k += ln
        for a, b in zip(idx, idx[1:]):
            nexts[a] = addrs[b]
        heads.append(int(addrs[idx[0]]) if idx else 0)
        want.append(addrs[idx])
    for j in perm[k:]:             # garbage: into anything, or NULL
        nexts[j] = addrs[rng.randrange(addrs.size)] if rng.random() < 0.8 else 0
    return nexts, heads, want


@pytest.mark.parametrize("seed", range(5))
def test_lists_come_out_whole_and_in_order_among_stale_links(seed):
    rng = random.Random(seed)
    addrs = _candidates(rng, 3000)
    nexts, heads, want = _lists(rng, addrs, [1, 700, 0, 1200, 2])
    got = slabscan.list_order(addrs, nexts, heads)
    for (nodes, how, at), w in zip(got, want):
        assert nodes.tolist() == w.tolist()
        assert (how, at) == (slabscan.END, 0)


def test_a_pointer_out_of_the_candidates_is_handed_back():
    rng = random.Random(7)
    addrs = _candidates(rng, 100)
    nexts, heads, want = _lists(rng, addrs, [10, 20])
    last = np.searchsorted(addrs, want[1][-1])
    nexts[last] = U(0xFFFF888012345000)           # an item on a slab the scan missed
    (a, how_a, _), (b, how_b, at_b) = slabscan.list_order(addrs, nexts, heads)
    assert a.tolist() == want[0].tolist() and how_a == slabscan.END
    assert b.tolist() == want[1].tolist()
    assert (how_b, at_b) == (slabscan.OUTSIDE, 0xFFFF888012345000)
    # a head outside: nothing, and where to go on from
    assert slabscan.list_order(addrs, nexts, [0xFFFF888000000040])[0][1:] == \
        (slabscan.OUTSIDE, 0xFFFF888000000040)


def test_a_cycle_is_handed_back_for_the_bounded_walk():
    addrs = np.arange(1, 6, dtype=U) * U(64)
    nexts = np.array([128, 192, 256, 128, 0], dtype=U)     # 64 -> 128 -> 192 -> 256 -> 128
    nodes, how, at = slabscan.list_order(addrs, nexts, [64])[0]
    assert (nodes.size, how, at) == (0, slabscan.CYCLE, 64)
    assert slabscan.list_order(addrs, nexts, [320])[0][1] == slabscan.END


def test_two_lists_sharing_a_tail_each_come_out_whole():
    # what a pointer walk gives too: each list from its own head
    addrs = np.arange(1, 7, dtype=U) * U(64)
    nexts = np.array([128, 320, 0, 320, 384, 0], dtype=U)   # 64->128->320->384, 256->320
    a, b = slabscan.list_order(addrs, nexts, [64, 256])
    assert a[0].tolist() == [64, 128, 320, 384] and b[0].tolist() == [256, 320, 384]


@pytest.mark.parametrize("seed,stride", [(0, None), (1, None), (2, 64), (3, 64)])
def test_an_rbtree_comes_out_in_order_among_stale_links(seed, stride):
    rng = random.Random(seed)
    addrs = _candidates(rng, 2000) if stride is None else _slab_pages(rng, 32)
    pick = rng.sample(range(addrs.size), 1500)
    keys = list(range(1500))
    rng.shuffle(keys)
    left = np.zeros(addrs.size, dtype=U)
    right = np.zeros(addrs.size, dtype=U)
    kof = {}
    root = pick[0]
    kof[root] = keys[0]
    for key, idx in zip(keys[1:], pick[1:]):
        cur = root
        while True:
            side = left if key < kof[cur] else right
            if side[cur] == 0:
                side[cur] = addrs[idx]
                break
            cur = int(np.searchsorted(addrs, side[cur]))
        kof[idx] = key
    rest = sorted(set(range(addrs.size)) - set(pick))
    for j in rest:                  # stale children, into the tree too
        left[j] = addrs[rng.randrange(addrs.size)]
        right[j] = addrs[rng.randrange(addrs.size)] if rng.random() < 0.5 else 0
    want = [int(addrs[i]) for i in sorted(pick, key=lambda i: kof[i])]
    order, faults = slabscan.rb_inorder(addrs, left, right, int(addrs[root]))
    assert faults == [] and order.tolist() == want
    if stride:          # whole slabs: the page-table lookup gives the same
        order, faults = slabscan.rb_inorder(addrs, left, right, int(addrs[root]), stride=64)
        assert faults == [] and order.tolist() == want


def test_an_rbtree_pointer_out_of_the_candidates_is_a_fault():
    addrs = np.array([64, 128, 192], dtype=U)
    left = np.array([0, 64, 0], dtype=U)
    right = np.array([0, 0x1000, 0], dtype=U)           # 128's right child: not a candidate
    order, faults = slabscan.rb_inorder(addrs, left, right, 128)
    assert faults == [0x1000]
    assert order.tolist() == [64, 128]          # what is reachable, the fault named
    empty, faults = slabscan.rb_inorder(addrs, left, right, 0)
    assert empty.size == 0 and faults == []
    order, faults = slabscan.rb_inorder(addrs, np.array([0, 64, 128], dtype=U),
                                        np.zeros(3, dtype=U), 192)
    assert order.tolist() == [64, 128, 192] and faults == []
    # a node reached twice (a cycle through a child link) is a fault
    _, faults = slabscan.rb_inorder(addrs, np.array([128, 64, 0], dtype=U),
                                    np.zeros(3, dtype=U), 128)
    assert faults == [128]


def test_two_parents_naming_one_child_keep_the_first_and_fault_the_other():
    # 128 is the root; 64 and 192 its children both name 32 as their left
    addrs = np.array([32, 64, 128, 192], dtype=U)
    left = np.array([0, 32, 64, 32], dtype=U)
    right = np.array([0, 0, 192, 0], dtype=U)
    order, faults = slabscan.rb_inorder(addrs, left, right, 128)
    assert order.tolist() == [32, 64, 128, 192] and faults == [32]


def _slab_pages(rng, n_pages, size=64, base=0xFFFF888000100000):
    """Every object of n_pages whole order-0 slabs (what slab_objects()
    gives), the pages scattered."""
    pages = np.sort(np.array(rng.sample(range(n_pages * 8), n_pages), dtype=U))
    per = 4096 // size
    return (U(base) + (pages * U(4096))[:, None] + np.arange(per, dtype=U) * U(size)).ravel()


@pytest.mark.parametrize("seed", range(3))
def test_the_stride_lookup_gives_what_the_binary_search_does(seed):
    rng = random.Random(seed)
    addrs = _slab_pages(rng, 50)
    nexts, heads, want = _lists(rng, addrs, [300, 1, 900])
    plain = slabscan.list_order(addrs, nexts, heads)
    strided = slabscan.list_order(addrs, nexts, heads, stride=64)
    for (a, ha, xa), (b, hb, xb), w in zip(plain, strided, want):
        assert a.tolist() == b.tolist() == w.tolist() and (ha, xa) == (hb, xb)
    # pointers into the middle of an object, outside every page, or NULL
    probe = np.concatenate([addrs[::7], addrs[::11] + U(8), U(0xFFFF888777000000) + addrs[:5],
                            np.zeros(3, U)])
    assert slabscan.index_of(addrs, probe, 64).tolist() == \
        slabscan.index_of(addrs, probe).tolist()


def test_the_stride_lookup_never_names_a_wrong_object_where_a_page_has_gaps():
    rng = random.Random(3)
    addrs = _candidates(rng, 2000)            # objects missing inside pages
    probe = addrs[rng.sample(range(addrs.size), 500)]
    got = slabscan.index_of(addrs, probe, 64)
    ok = got >= 0
    assert (addrs[got[ok]] == probe[ok]).all()
