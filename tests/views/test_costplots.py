"""The cost figures draw what they are given (fast; the numbers themselves are
the kernel's, proven in tests/experiments/test_cost.py)."""

import pandas as pd
import pytest

from ksmlens.errors import KsmlensError
from ksmlens.views.costplots import cost_vs_vmas, page_cost


def _sweep():
    rows = []
    for n in (100, 1000, 10000):
        for rule, v in (("stock", 4 * n), ("v3", 4), ("stored", 4)):
            counted = rule == "stored"
            rows.append({"vmas": n, "variant": "union", "release": "r", "rule": rule,
                         "walk": "remove_migration_ptes", "predicted": v, "rmap_one": 2,
                         "measured": v if counted else float("nan"),
                         "max_ms": 0.1 if counted else float("nan"),
                         "agree": True if counted else None})
    return pd.DataFrame(rows)


def _gids(fig):
    return {a.get_gid(): a for ax in fig.axes for a in ax.get_children() + ax.lines
            if a.get_gid()}


def test_cost_vs_vmas_draws_every_rule_and_only_counted_points():
    g = _gids(cost_vs_vmas(_sweep()))
    assert {"predicted:stock", "predicted:v3", "predicted:stored", "measured:stored",
            "duration:stored"} <= set(g)
    assert "measured:stock" not in g
    assert list(g["predicted:stock"].get_ydata()) == [400, 4000, 40000]
    with pytest.raises(KsmlensError, match="no try_to_unmap walks"):
        cost_vs_vmas(_sweep(), walk="try_to_unmap")


def test_page_cost_bars_per_rule():
    c = pd.DataFrame({"node": ["a", "a", "b", "b"], "kpfn": [1, 1, 2, 2],
                      "rule": ["stock", "v3"] * 2, "walk": ["full"] * 4,
                      "returned": [8000, 4, 6000, 0]})
    fig = page_cost(c)
    bars = [p for p in fig.axes[0].patches if p.get_gid() == "pages:stock"]
    assert [b.get_height() for b in bars] == [8000, 6000]
    with pytest.raises(KsmlensError, match="no migrate walks"):
        page_cost(c, walk="migrate")
