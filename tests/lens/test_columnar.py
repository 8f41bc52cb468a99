"""The columnar snapshot: its files, its vectorised rmap walk replay and
its records, held to a real guest (the replay against the kernel's own
interval-tree iteration replayed node by node, the files against the
snapshot they came from), plus the one-line refusals."""

import json

import pandas as pd
import pytest

from ksmlens.analysis.core import anon_vma_query, replay_walks
from ksmlens.errors import KsmlensError
from ksmlens.kernel.rules import RULES, rule_range
from ksmlens.lab.attach import attach
from ksmlens.lab.scenarios import ScenarioRun
from ksmlens.lens.model import SCHEMA, Snapshot
from ksmlens.lens.snapshot import take_snapshot

from conftest import boot


def test_old_schema_and_junk_are_refused_in_one_line(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "ksmlens-snapshot/3", "rmap_items": []}))
    with pytest.raises(KsmlensError) as e:
        Snapshot.load(old)
    assert "ksmlens-snapshot/3" in str(e.value) and SCHEMA in str(e.value)
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.ksm"
    junk.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(KsmlensError, match="not a ksmlens columnar snapshot"):
        Snapshot.load(junk)
    with pytest.raises(KsmlensError, match="no snapshot file"):
        Snapshot.load(tmp_path / "missing.ksm")


def _tree_replay(snap: Snapshot, node, rule: str) -> set:
    """(mm, address) pairs the kernel's rmap_walk_ksm() of ``node`` visits
    under ``rule``, replayed item by item on the recorded anon_vma trees
    with the kernel's own interval-tree iteration (rb_subtree_last pruning):
    the reference the vectorised join must equal."""
    out = set()
    for iid in node.items:
        it = snap.item(iid)
        if it.anon_vma is None:
            continue
        rng = rule_range(rule, it.addr_pgoff, it.stored_pgoff)
        if rng is None:
            continue
        for avc in anon_vma_query(snap, it.anon_vma, *rng):
            if avc["vm_start"] <= it.address < avc["vm_end"]:
                out.add((avc["mm"], it.address))
    return out


@pytest.mark.vm
@pytest.mark.parametrize("variant,scenario", [("v3", "mremap"), ("union", "fork"),
                                              ("v8", "chain")])
def test_vectorised_replay_is_the_tree_walk_and_files_round_trip(variant, scenario, tmp_path):
    vm = boot(variant)
    with ScenarioRun(vm, scenario) as run:
        for st in run.scenario.steps:
            run.step(st.name)
        snap = take_snapshot(attach(f"vm:{vm.name}"))
    m = snap.mappings
    nodes = [n for n in snap.nodes() if n.kind != "chain" and n.items]
    assert nodes and len(m)
    for n in nodes:
        mine = m[m.node == n.id]
        for rule in RULES:
            if rule == "stored" and not snap.kernel.has_stored_pgoff:
                assert mine.found_stored.isna().all()
                continue
            found = set(zip(mine.mm[mine[f"found_{rule}"].fillna(False)],
                            mine.address[mine[f"found_{rule}"].fillna(False)].astype(int)))
            assert found == _tree_replay(snap, n, rule), (n.id, rule)
    # mapped: the mappings the walk found mapped are the KSM pages' PTEs the
    # kernel counts in each folio's mapcount (nothing unreachable here)
    nd = snap.stable_nodes[snap.stable_nodes.kind != "chain"]
    assert (nd.reachable == nd.mapcount).all()
    assert (nd.unreachable == 0).all()
    # both files give back the same tables and records
    for name in ("s.json", "s.ksm"):
        snap.save(tmp_path / name)
        back = Snapshot.load(tmp_path / name)
        for t in ("rmap_items", "stable_nodes", "mm_slots", "mappings"):
            a = getattr(snap, t).reset_index(drop=True)
            b = getattr(back, t).reset_index(drop=True)
            if name.endswith(".json"):     # JSON keeps the values, not every dtype
                a, b = a.astype(object).where(a.notna(), None), \
                    b.astype(object).where(b.notna(), None)
                if t == "mappings":        # JSON nests mappings by node: node order
                    a = a.sort_values(["node", "mm", "address"]).reset_index(drop=True)
                    b = b.sort_values(["node", "mm", "address"]).reset_index(drop=True)
            pd.testing.assert_frame_equal(a, b, check_dtype=not name.endswith(".json"),
                                          check_categorical=False, obj=f"{name} {t}")
        assert back.items() == snap.items() and back.slots() == snap.slots()
        assert back.nodes() == snap.nodes()     # JSON: written from the tables
        assert back.anon_vmas == snap.anon_vmas and back.kernel == snap.kernel
    # replaying the loaded file's own tables gives the walk's answers again
    again = replay_walks(Snapshot.load(tmp_path / "s.ksm"))
    for r in RULES:
        assert again.rmap_items[f"walk_{r}"].equals(snap.rmap_items[f"walk_{r}"]), r
        assert (again.stable_nodes[f"unmappable_{r}"] ==
                snap.stable_nodes[f"unmappable_{r}"]).all(), r
    big = (tmp_path / "s.ksm").stat().st_size
    assert big < (tmp_path / "s.json").stat().st_size
