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
