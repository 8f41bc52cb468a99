"""The byte-level walk (:func:`ksmlens.lens.snapshot.take_snapshot`) against
the drgn-Object helpers (:mod:`ksmlens.lens.helpers`), on a synthetic kernel.

No guest: mm/ksm.c's state is laid out in fake memory behind a drgn program
with a real lab vmlinux's types (``synthetic.py``), with every rmap_item
state (stable on a regular node, on chain dups, on a migrate_nodes node;
unstable in the current tree and from an older pass; none), on two mms
owned by two tasks. ``take_snapshot(pages=False)`` (no page tables, no
struct page) must see item by item what the helpers see.
"""

from __future__ import annotations

import pytest

import ksmlens.lens.helpers as walk
from ksmlens.lens.helpers import SEQNR_MASK, STABLE_FLAG, UNSTABLE_FLAG
from ksmlens.lens.snapshot import take_snapshot

from synthetic import (RI, SN, SyntheticKernel, add_task, find_vmlinux, init_ksm_globals,
                       link_rmap_list, new_chain, new_mm_slot, new_rmap_item, new_stable_node,
                       rb_nodes)

FIELDS = ("id", "mm", "pid", "address", "state", "seqnr", "in_unstable_tree", "stable_node",
          "anon_vma", "stored_pgoff")


def fast_items(snap) -> list[dict]:
    """The snapshot's rmap_items in walk order as ``{field: value}`` for
    :data:`FIELDS`; addresses of kernel objects as ints, None where unset.
    The only place this test reads the snapshot's model."""
    def a(v):
        return None if v is None else int(v, 16)
    return [{"id": a(i.id), "mm": a(i.mm), "pid": i.pid, "address": i.address,
             "state": i.state, "seqnr": i.seqnr, "in_unstable_tree": i.in_unstable_tree,
             "stable_node": a(i.stable_node), "anon_vma": a(i.anon_vma),
             "stored_pgoff": i.stored_pgoff} for i in snap.items()]


def helper_items(prog) -> list[dict]:
    """The same fields from the helpers: every rmap_item of every mm slot;
    its stable node found by walking the stable trees, their dups and
    migrate_nodes (not by reading ``item->head``); its pid from the tasks."""
    node_of = {i.value_(): n.value_() for n in walk.for_each_stable_node(prog)
               for i in walk.for_each_stable_node_rmap_item(n)}
    out = []
    for item in walk.for_each_rmap_item(prog):
        state = walk.rmap_item_state(item)
        stable = state == "stable"
        tasks = sorted(t.tgid.value_() for t in walk.rmap_item_tasks(item))
        out.append({"id": item.value_(), "mm": item.mm.value_(),
                    "pid": tasks[0] if tasks else None,
                    "address": walk.rmap_item_address(item), "state": state,
                    "seqnr": walk.rmap_item_seqnr(item),
                    "in_unstable_tree": walk.rmap_item_in_unstable_tree(item),
                    "stable_node": node_of.get(item.value_()),
                    "anon_vma": item.anon_vma.value_() if stable else None,
                    "stored_pgoff": walk.rmap_item_stored_pgoff(item) if stable else None})
    return out


def _kernel(variant: str):
    import ksmlens.lab.kbuild as kbuild
    k = kbuild.find_kernel(variant)
    if k is None and variant == "stock":
        found = find_vmlinux()
        return found and SyntheticKernel(*found)
    return k and SyntheticKernel(k.vmlinux, k.release)


@pytest.fixture(scope="module", params=["stock", "union", "v8"])
def k(request):
    """A synthetic kernel of that variant (union: rmap_item->pgoff, v8: ->linear_page_index)."""
    kernel = _kernel(request.param)
    if kernel is None:
        pytest.skip(f"no {request.param} kernel built (`ksmlens vm build --variant "
                    f"{request.param}`)")
    kernel.add_globals(["init_pid_ns"])
    kernel.reset()
    init_ksm_globals(kernel)
    return kernel


SEQNR = 0x105            # ksm_scan.seqnr mid-pass: the current tree's items carry 0x05
PAGE = 4096


def _stable(k, node: int, address: int, mm: int, anon_vma: int, pgoff: int) -> int:
    """stable_tree_append(): an rmap_item on ``node``'s hlist, with the
    stored pgoff where the kernel has one (SmartScan bytes otherwise)."""
    item = new_rmap_item(k, address | STABLE_FLAG | 0x2A, mm)
    k.set(item, RI, "head", node)
    k.set(item, RI, "anon_vma", anon_vma)
    member = walk.ksm_stored_index_member(k.prog)
    if member:
        k.set(item, RI, member, pgoff)
    else:
        k.set(item, RI, "oldchecksum", pgoff & 0xFFFFFFFF)
        k.set(item, RI, "age", 3)
    k.hlist_add_head(k.addr(item, RI, "hlist"), k.addr(node, SN, "hlist"))
    k.set(node, SN, "rmap_hlist_len", k.get(node, SN, "rmap_hlist_len") + 1)
    return item


def lay_out(k: SyntheticKernel) -> dict:
    """Two mms (pids 11 and 12) with every item state; returns what was built."""
    mms = [k.allocate("struct mm_struct") for _ in range(2)]
    for pid, mm in zip((11, 12), mms):
        add_task(k, pid, f"ksmlens-{pid}", mm)
        k.set(mm, "struct mm_struct", "mm_users", 1)
    av = [k.allocate("struct anon_vma") for _ in range(2)]
    regular = new_stable_node(k, kpfn=0x1000)
    chain, dups, _ = new_chain(k, [[], []], kpfn0=0x2000)
    migrating = new_stable_node(k, kpfn=0x3000)
    k.list_add_tail(k.addr(migrating, SN, "list"), k.sym("migrate_nodes"))
    k.rb_build(k.sym("one_stable_tree"), rb_nodes(k, [regular, chain], SN))
    base = (0x7F0000000000, 0x7F1000000000)
    a, b = mms
    items = {a: [_stable(k, regular, base[0], a, av[0], 0x7F0000000),
                 _stable(k, dups[0], base[0] + PAGE, a, av[0], 0x7F0000001),
                 new_rmap_item(k, base[0] + 2 * PAGE | UNSTABLE_FLAG | (SEQNR & SEQNR_MASK), a),
                 new_rmap_item(k, base[0] + 3 * PAGE | UNSTABLE_FLAG | (SEQNR - 1 & SEQNR_MASK),
                               a),
                 new_rmap_item(k, base[0] + 4 * PAGE | 0x04, a)],
             b: [_stable(k, regular, base[1], b, av[1], 0x7F1000000),
                 _stable(k, migrating, base[1] + PAGE, b, av[1], 0x7F1000001),
                 _stable(k, dups[1], base[1] + 2 * PAGE, b, av[1], 0x7F1000002),
                 new_rmap_item(k, base[1] + 3 * PAGE | UNSTABLE_FLAG | (SEQNR & SEQNR_MASK), b)]}
    slots = [new_mm_slot(k, mm) for mm in mms]
    for slot, mm in zip(slots, mms):
        link_rmap_list(k, slot, items[mm])
    in_tree = [items[a][2], items[b][3]]
    k.rb_build(k.sym("one_unstable_tree"), rb_nodes(k, in_tree, RI))
    k.set_global("ksm_scan", "seqnr", SEQNR)
    k.set_global("ksm_scan", "mm_slot", slots[1])
    return {"items": [i for mm in mms for i in items[mm]], "in_tree": in_tree,
            "nodes": {regular, migrating, *dups}}


def test_fast_walk_equals_helper_walk(k):
    built = lay_out(k)
    snap = take_snapshot(k.prog, pages=False)
    assert snap.meta["mode"] == "static" and snap.meta["races"] == {}
    fast, slow = fast_items(snap), helper_items(k.prog)
    # the helpers see what was laid out, so the comparison is not of two empty walks
    assert [d["id"] for d in slow] == built["items"]
    assert {d["stable_node"] for d in slow} - {None} == built["nodes"]
    assert {d["id"] for d in slow if d["in_unstable_tree"]} == \
        {o.value_() for o in walk.for_each_unstable_rmap_item(k.prog)} == set(built["in_tree"])
    assert {d["state"] for d in slow} == {"stable", "unstable", "none"}
    assert {d["pid"] for d in slow} == {11, 12}
    has_pgoff = walk.ksm_has_stored_pgoff(k.prog)
    assert any(d["stored_pgoff"] is not None for d in slow) == has_pgoff
    # item by item, field by field
    assert len(fast) == len(slow)
    for f, s in zip(fast, slow):
        assert f == s, {key: (f[key], s[key]) for key in FIELDS if f[key] != s[key]}
    # the stable nodes: same pages, same items in hlist order
    nodes = {n.value_(): (n.kpfn.value_(), [i.value_() for i in
                                             walk.for_each_stable_node_rmap_item(n)])
             for n in walk.for_each_stable_node(k.prog)}
    assert {int(n.id, 16): (n.kpfn, [int(i, 16) for i in n.items])
            for n in snap.nodes() if n.kind != "chain"} == nodes
