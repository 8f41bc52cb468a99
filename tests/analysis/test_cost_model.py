"""The cost model's parts that need no guest (its claims about kernels are
made in tests/experiments/test_cost.py against real ones)."""

import numpy as np
import pytest

from ksmlens.analysis.cost import _point_counts, cost_rules, walk_cost
from ksmlens.errors import KsmlensError
from ksmlens.kernel.rmap_walk import WALK_KINDS, WALKS, walk_of_rmap_one

from smallsnap import item, snapshot


def test_point_counts_are_the_intervals_containing_the_point():
    rng = np.random.default_rng(7)
    trees = 5
    n = 400
    av = np.sort(rng.integers(0, trees, n))
    start = np.empty(n, np.uint64)
    last = np.empty(n, np.uint64)
    for t in range(trees):          # each tree in-order: sorted by start
        sel = av == t
        s = np.sort(rng.integers(0, 1000, sel.sum())).astype(np.uint64)
        start[sel] = s
        last[sel] = s + rng.integers(0, 50, sel.sum()).astype(np.uint64)
    tree_lo = np.searchsorted(av, np.arange(trees))
    i_av = rng.integers(0, trees, 300)
    q = rng.integers(0, 1100, 300).astype(np.uint64)
    got = _point_counts(av, start, last, tree_lo, i_av, q)
    want = [int(np.count_nonzero((av == a) & (start <= x) & (x <= last))) for a, x in zip(i_av, q)]
    assert got.tolist() == want
    assert max(want) > 1            # the check is not trivially zero


def test_every_walk_names_its_callback():
    for kind, walks in WALK_KINDS.items():
        for w in walks:
            fn = WALKS[w][0]
            assert fn is None or walk_of_rmap_one(fn) == w
    assert walk_of_rmap_one("page_mkclean_one") is None


def test_bad_input_is_one_line():
    empty = snapshot([], variant="stock", walk_rule="stock")
    with pytest.raises(KsmlensError, match="no KSM page"):
        walk_cost(empty)
    with pytest.raises(KsmlensError, match="unknown rmap walk rule 'v9'"):
        cost_rules(empty, ["v9"])
    with pytest.raises(KsmlensError, match="unknown walk kind 'compact'"):
        walk_cost(empty, kinds=("compact",))
    stock = snapshot([item(1, 0x1000, vma=(0x1000, 0x2000, 1))], variant="stock",
                     walk_rule="stock")
    stock.kernel.has_stored_pgoff = False
    with pytest.raises(KsmlensError, match="stores no page index"):
        cost_rules(stock, ["stored"])
    assert cost_rules(stock) == ["stock", "v3"]


def test_memory_failure_policy_decoder():
    from ksmlens.kernel.constants import PF_MCE_EARLY, PF_MCE_PROCESS, mce_early_kill
    assert not mce_early_kill([0, 0], 0) and mce_early_kill([0], 1)
    # prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_LATE) on every thread: never
    assert not mce_early_kill([PF_MCE_PROCESS, PF_MCE_PROCESS], 1)
    # one early thread is enough, whatever the sysctl
    assert mce_early_kill([PF_MCE_PROCESS, PF_MCE_PROCESS | PF_MCE_EARLY], 0)
    assert not mce_early_kill([], 1)            # no thread: nothing to signal


def test_collect_procs_ksm_against_the_kernel_loop():
    """_collect() against collect_procs_ksm()'s loop run literally: per
    rmap_item, per collected process, the tree's VMAs over the range."""
    from ksmlens.analysis.cost import _collect
    from ksmlens.kernel.constants import PF_MCE_EARLY, PF_MCE_PROCESS
    rng = np.random.default_rng(3)
    trees, n_avc, n_pages = 4, 300, 6
    avc_av = np.sort(rng.integers(0, trees, n_avc))
    avc_mm = rng.integers(0, 5, n_avc)                  # mm codes 0..4
    start = np.empty(n_avc, np.uint64)
    for t in range(trees):
        sel = avc_av == t
        start[sel] = np.sort(rng.integers(0, 200, sel.sum())).astype(np.uint64)
    last = start + rng.integers(0, 20, n_avc).astype(np.uint64)
    i_page = np.sort(rng.integers(0, n_pages, 40))
    i_page[:n_pages] = np.arange(n_pages)               # every page has an item
    i_page.sort()
    i_av = rng.integers(0, trees, i_page.size)
    i_mm = rng.integers(0, 5, i_page.size)
    q = rng.integers(0, 220, i_page.size).astype(np.uint64)
    mm_all = [f"mm{k}" for k in range(6)]               # mm5: a process with no VMA here
    procs = [[1, "mm0", [0]], [2, "mm1", [PF_MCE_PROCESS | PF_MCE_EARLY]],
             [3, "mm2", [PF_MCE_PROCESS]], [4, "mm2", [0]], [5, "mm5", [0, 0]]]
    for early_kill in (0, 1):
        for injector in (None, "mm2", "mm9"):
            for query in (None, q):
                inside = np.ones(n_avc, bool)
                R = np.array([np.count_nonzero((avc_av == a) & (True if query is None else
                                               (start <= x) & (x <= last)))
                              for a, x in zip(i_av, q)])
                got = _collect({"early_kill": early_kill, "processes": procs}, None, injector,
                               i_page, i_av, query, R, mm_all, i_mm, avc_av, avc_mm, start,
                               last, n_pages, trees)
                want = {k: np.zeros(n_pages, np.int64) for k in got}
                for it in range(i_page.size):
                    cur = injector or mm_all[i_mm[np.searchsorted(i_page, i_page[it])]]
                    coll = [mm for _, mm, fl in procs if mm == cur or any(
                        (f & PF_MCE_PROCESS and f & PF_MCE_EARLY) or
                        (not f & PF_MCE_PROCESS and early_kill) for f in fl)]
                    if not any(mm == cur for _, mm, _ in procs):
                        coll.append(cur)        # the poisoning task's own process
                    for mm in coll:
                        inside = (avc_av == i_av[it]) & (True if query is None else
                                                         (start <= q[it]) & (q[it] <= last))
                        yielded = np.flatnonzero(inside)
                        pg = i_page[it]
                        want["first"][pg] += 1
                        want["first_null"][pg] += not yielded.size
                        want["next"][pg] += yielded.size
                        want["next_null"][pg] += bool(yielded.size)
                        want["returned"][pg] += yielded.size
                        ones = sum(mm_all[avc_mm[j]] == mm for j in yielded)
                        want["rmap_one"][pg] += ones
                        want["other_mm"][pg] += yielded.size - ones
                for k in got:
                    assert got[k].tolist() == want[k].tolist(), (early_kill, injector, k)
                assert got["rmap_one"].sum() > 0


def test_hwpoison_needs_the_recorded_tasks():
    snap = snapshot([item(1, 0x1000, vma=(0x1000, 0x2000, 1))], variant="stock",
                    walk_rule="stock")
    assert snap.kernel.mce is None
    with pytest.raises(KsmlensError, match="memory-failure policy"):
        walk_cost(snap, kinds=("hwpoison",))
