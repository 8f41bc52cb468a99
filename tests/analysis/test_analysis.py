"""Fast unit tests of the analysis on recorded data (no VM): the interval
query over recorded anon_vma trees against brute force, and the SmartScan
model against mm/ksm.c's rules worked by hand. The real-guest proofs are in
test_verify.py and test_smartscan.py."""

import random

from ksmlens.analysis.core import anon_vma_query, skip_age, smartscan_visit
from ksmlens.kernel.itree import ULONG_MAX
from ksmlens.lens.model import KernelInfo, Snapshot


def _recorded_tree(intervals):
    """An augmented BST (keyed by start, like the kernel's) as snapshot records."""
    nodes, root = {}, None

    def insert(nid, start):
        nonlocal root
        if root is None:
            root = nid
            return
        cur = root
        while True:
            side = "left" if start < nodes[cur]["vm_pgoff"] else "right"
            if nodes[cur][side] is None:
                nodes[cur][side] = nid
                nodes[nid]["parent"] = cur
                return
            cur = nodes[cur][side]

    for k, (start, pages) in enumerate(intervals):
        nid = f"0x{0x1000 + k * 0x40:x}"
        nodes[nid] = {"vma": nid, "mm": "0x1", "vm_start": start << 12,
                      "vm_end": (start + pages) << 12, "vm_pgoff": start, "left": None,
                      "right": None, "parent": None, "subtree_last": 0}
        insert(nid, start)

    def fix(n):
        if n is None:
            return -1
        d = nodes[n]
        d["subtree_last"] = max(d["vm_pgoff"] + (d["vm_end"] - d["vm_start"] >> 12) - 1,
                                fix(d["left"]), fix(d["right"]))
        return d["subtree_last"]

    fix(root)
    leftmost = root
    while leftmost and nodes[leftmost]["left"]:
        leftmost = nodes[leftmost]["left"]
    return {"root": root, "leftmost": leftmost, "nodes": nodes}


def _inorder(rec):
    out, stack, n = [], [], rec["root"]
    while stack or n:
        while n:
            stack.append(n)
            n = rec["nodes"][n]["left"]
        n = stack.pop()
        out.append(n)
        n = rec["nodes"][n]["right"]
    return out


def test_recorded_interval_query_is_brute_force_in_order():
    rnd = random.Random(7)
    for trial in range(40):
        ivs = [(rnd.randrange(0, 500), rnd.randrange(1, 40)) for _ in range(rnd.randrange(1, 60))]
        rec = _recorded_tree(ivs)
        snap = Snapshot(kernel=KernelInfo("t", None, False), counters={}, stable_nodes=[],
                        rmap_items=[], mm_slots=[], anon_vmas={"0xa": rec})
        order = _inorder(rec)
        for start, last in [(0, ULONG_MAX)] + [tuple(sorted((rnd.randrange(0, 560),
                                                              rnd.randrange(0, 560))))
                                                for _ in range(25)]:
            got = [a["id"] for a in anon_vma_query(snap, "0xa", start, last)]
            want = [n for n in order
                    if rec["nodes"][n]["vm_pgoff"] <= last
                    and start <= rec["nodes"][n]["vm_pgoff"]
                    + (rec["nodes"][n]["vm_end"] - rec["nodes"][n]["vm_start"] >> 12) - 1]
            assert got == want, (trial, start, last)


def test_smartscan_model_by_hand():
    # should_skip_rmap_item() from age 0, remaining_skips 0: ages 0,1,2 are
    # processed; age 3 sets skips = skip_age(3) = 1 and is processed; ...
    age, skips, sched = 0, 0, ""
    for _ in range(16):
        age, skips, skipped = smartscan_visit(age, skips)
        sched += "S" if skipped else "P"
    assert sched == "PPPPSPSSPSSSSPSS"
    assert [skip_age(a) for a in (0, 3, 4, 5, 6, 8, 9, 255)] == [1, 1, 2, 2, 4, 4, 8, 8]
    assert smartscan_visit(255, 0) == (255, 8, False)     # age saturates at U8_MAX
    # the union hazard's first visit: age 7 read from a pgoff of 0x7f...
    assert smartscan_visit(7, 0) == (8, 4, False)


def test_public_names_exist():
    """Every module's ``__all__`` names something real (``import *`` works)."""
    import importlib
    import pkgutil
    import ksmlens
    names = [m.name for m in pkgutil.walk_packages(ksmlens.__path__, "ksmlens.")
             if ".guest" not in m.name and not m.name.endswith("__main__")]
    assert "ksmlens.lens.snapshot" in names and "ksmlens.analysis.core" in names
    for m in names:
        mod = importlib.import_module(m)
        assert [n for n in getattr(mod, "__all__", ()) if not hasattr(mod, n)] == [], m


# --------------------------------------------------------- issue 9: per-item truths

from smallsnap import item as _item, snapshot as _snapshot  # noqa: E402

from ksmlens.analysis.core import (pgoff_status, range_walk, smartscan_next,  # noqa: E402
                              stored_status, union_hazard)
from ksmlens.experiments.check import Row  # noqa: E402

PAGE = 4096


def test_range_walk_follows_the_interval_query():
    """A VMA moved up by 32 pages, then grown in place to 48: its vm_pgoff
    range [old, old + 47] still holds address >> PAGE_SHIFT for its first 16
    pages, so v3 finds those (the kernel's interval query), not the rest."""
    old = 0x7F0000000
    vma = ((old + 32) << 12, (old + 32 + 48) << 12, old)
    found = [range_walk(_item(1, vma[0] + k * PAGE, vma=vma, state="unstable"), True)["v3"]
             for k in range(48)]
    assert found == [True] * 16 + [False] * 32
    it = _item(1, vma[0], vma=vma, state="unstable")
    assert pgoff_status(it)[0] == "moved"            # and yet found: two separate questions
    assert range_walk(it, True) == {"stock": True, "v3": True, "stored": None}


def test_stored_index_only_for_stable_items():
    vma = (0x1000000, 0x1010000, 0x1000)
    st = _item(1, 0x1000000, vma=vma)                   # stored == lpi
    assert stored_status(st, True) == "ok" and stored_status(st, False) is None
    un = _item(1, 0x1001000, vma=vma, state="unstable")
    assert stored_status(un, True) is None               # those bytes are oldchecksum/age
    assert stored_status(_item(1, 0x1002000, vma=vma, stored=0), True) == "unset"
    assert stored_status(_item(1, 0x1003000, vma=vma, stored=7), True) == "stale"


def test_items_ksmd_frees_are_not_read_skipped_or_hazards():
    vma = (0x1000000, 0x1010000, 0x1000)
    freed = _item(1, 0x1000000, vma=vma, age=5, skips=2)
    freed.pte, freed.will_visit, freed.not_visited, freed.page_ksm = "none", False, "no_page", None
    cow = _item(1, 0x1001000, vma=vma, age=0)
    cow.pte, cow.will_visit, cow.page_ksm = "present", True, False
    shared = _item(1, 0x1002000, vma=vma, state="unstable", age=4)
    shared.pte, shared.will_visit, shared.page_ksm = "present", True, True   # KSM via a sharer
    snap = _snapshot([freed, cow, shared])
    snap.counters["smart_scan"] = 1
    r = smartscan_next(snap, freed, 4)
    assert (r["freed"], r["schedule"], r["skipped"], r["reads"]) == ("no_page", "", 0, None)
    assert smartscan_next(snap, shared, 4)["schedule"] == ""      # PageKsm: never aged
    assert smartscan_next(snap, cow, 1)["leaves_stable_tree"] == 1
    assert [h["item"] for h in union_hazard(snap)] == [cow.id]
    snap.counters["smart_scan"] = 0
    assert union_hazard(snap) == []        # should_skip_rmap_item() returns before reading


def test_between_rows():
    assert Row("pages_scanned", 5, 3, 9, rule="between").ok
    assert not Row("pages_scanned", 2, 3, 9, rule="between").ok
    assert not Row("pages_scanned", 5, None, 9, rule="between").ok
