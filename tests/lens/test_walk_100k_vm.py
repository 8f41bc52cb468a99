"""Issue 21's equality at 100k rmap_items on a real guest: the walk by a
copy of the slabs (ksmlens.lens.slabscan, the default at this size) and
the walk by pointers read the same state in one pause, and everything
computed from it (the snapshot's tables and the rmap walks replayed in
them, the cost of every walk kind, the JSON and columnar files) is the
same; both agree with the kernel's own counters of that pause, and
``ksmlens check`` with /sys/kernel/mm/ksm and /proc/PID/ksm_stat."""

import pandas as pd
import pytest

from ksmlens.analysis.cost import walk_cost
from ksmlens.experiments.check import check_vm
from ksmlens.lab.attach import attach
from ksmlens.lab.bigstate import guest_memory_mb, merge_pairs
from ksmlens.lens.model import Snapshot
from ksmlens.lens.tables import finish
from ksmlens.views.tables import check_table

from conftest import boot, walks_agree

pytestmark = pytest.mark.vm

N = 100_000


@pytest.fixture(scope="module")
def big():
    # a memory size of its own: a guest no other test has put KSM pages in
    vm = boot("union", memory=f"{guest_memory_mb(N) + 512}M")
    handle, _ = merge_pairs(vm, N)
    yield vm
    vm.kill(handle)


def _frames(snap: Snapshot) -> dict:
    return {k: v for k, v in vars(snap).items() if isinstance(v, pd.DataFrame)}


def test_both_walks_read_the_same_100k_state_as_the_kernel_counts_it(big, tmp_path):
    prog = attach(f"vm:{big.name}")
    a, b = walks_agree(big, prog, both=True)
    # the kernel's own counters, read in the same pause
    assert b.items["addr"].size == b.counters["rmap_items"] == N
    stable = (b.nodes["kind"] != 1).sum()
    assert stable == b.counters["pages_shared"] == N // 2
    sa, sb = finish(a), finish(b)
    fa, fb = _frames(sa), _frames(sb)
    assert fa.keys() == fb.keys() and {"rmap_items", "stable_nodes", "mappings"} <= fa.keys()
    for k in fa:
        pd.testing.assert_frame_equal(fa[k], fb[k], obj=k)
    kinds = ("full", "migrate", "reclaim", "hwpoison")
    pd.testing.assert_frame_equal(walk_cost(sa, kinds=kinds), walk_cost(sb, kinds=kinds))
    for suffix in ("json", "arrow"):
        sa.save(tmp_path / f"a.{suffix}")
        sb.save(tmp_path / f"b.{suffix}")
        ra, rb = Snapshot.load(tmp_path / f"a.{suffix}"), Snapshot.load(tmp_path / f"b.{suffix}")
        for k, v in _frames(ra).items():
            pd.testing.assert_frame_equal(v, _frames(rb)[k], obj=f"{suffix}: {k}")
    # the JSON, written from the tables a chunk at a time, holds the records
    # the snapshot's own record view builds (Snapshot.nodes(), items(), slots())
    back = Snapshot.load(tmp_path / "b.json")
    assert back.nodes() == sb.nodes() and back.items() == sb.items()
    assert back.slots() == sb.slots()


def test_check_at_100k_agrees_with_the_kernel(big):
    rows, snap, info = check_vm(big, attach(f"vm:{big.name}"))
    assert all(r.ok for r in rows), check_table(rows)
    assert snap.meta["slab_scan"] and len(snap.rmap_items) == N
