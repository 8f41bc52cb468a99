"""Memory failure, the third way the kernel unmaps a KSM page, and the v8
kernel's stored index, on real guests.

* v8's ``struct ksm_rmap_item`` has ``linear_page_index`` (the DWARF, read
  with drgn), the walk reports it as ``kernel.stored_index_member``, and
  every STABLE rmap_item's stored index equals ``linear_page_index(vma,
  address)`` computed from the VMA the kernel has at that address (drgn's
  ``vma_find()``), moved VMAs included.
* ``verify(vm, by="hwpoison")``: a sharer of a KSM page that a moved VMA
  shares poisons it with MADV_HWPOISON; the prediction (walk replay under the
  kernel's rule, collect_procs_ksm(), the page's dirty bit) must match
  pagemap, the madvise result, the SIGBUS each process got and dmesg. A
  poisoned page stays poisoned: each case boots a fresh guest.
"""

import json

import pytest
from drgn import Object, offsetof
from drgn.helpers.linux.mm import vma_find

from conftest import boot
from ksmlens.experiments.verify import BUS_MCEERR_AO, BUS_MCEERR_AR, verify
from ksmlens.lab.attach import attach
from ksmlens.lab.scenarios import ScenarioRun
from ksmlens.lens.snapshot import take_snapshot
from ksmlens.lens.store import load
from ksmlens.views.tables import verify_text

pytestmark = pytest.mark.vm


def test_v8_stores_linear_page_index(tmp_path):
    vm = boot("v8")
    prog = attach(f"vm:{vm.name}")
    ri = prog.type("struct ksm_rmap_item")
    # The DWARF: the member as merged, in the union with the SmartScan bytes.
    assert ri.has_member("linear_page_index")
    assert not ri.has_member("pgoff") and not ri.has_member("vm_pgoff")
    assert offsetof(ri, "linear_page_index") == offsetof(ri, "oldchecksum")
    assert ri.size == 64
    with ScenarioRun(vm, "mremap") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        snap = take_snapshot(prog)
        assert snap.kernel.stored_index_member == "linear_page_index"
        assert snap.kernel.has_stored_pgoff and snap.kernel.walk_rule == "stored"
        items = snap.rmap_items
        stable = items[items["state"] == "stable"]
        assert len(stable) > 0
        moved = 0
        mms = {}
        for r in stable.itertuples():
            # linear_page_index(vma, address), from the VMA the kernel has there
            mm = mms.setdefault(r.mm, Object(prog, "struct mm_struct *", int(r.mm, 16)))
            vma = vma_find(mm, r.address)
            assert vma, (r.id, hex(r.address))
            want = ((r.address - vma.vm_start.value_()) >> 12) + vma.vm_pgoff.value_()
            assert r.stored_pgoff == want, (r.id, hex(r.address), r.stored_pgoff, want)
            moved += want != r.address >> 12
        # the mremap scenario's moved VMA: stored index != address >> PAGE_SHIFT
        assert moved > 0
        # the JSON keeps its field name and records the member
        snap.save(tmp_path / "s.json")
        doc = json.loads((tmp_path / "s.json").read_text())
        assert doc["kernel"]["stored_index_member"] == "linear_page_index"
        assert "stored_pgoff" in doc["rmap_items"][0]
        assert load(tmp_path / "s.json").kernel.stored_index_member == "linear_page_index"


@pytest.mark.parametrize("variant,early_kill", [("v3", False), ("v8", False), ("v3", True),
                                                 ("v8", True), ("stock", False),
                                                 ("union", False)])
def test_verify_hwpoison(fresh, variant, early_kill):
    vm = fresh(variant)
    res = verify(vm, by="hwpoison", early_kill=early_kill)
    print(verify_text(res))
    hw, row = res.extra["hwpoison"], res.rows[0]
    # the kernel acted: the page is marked HWPoison and said so in dmesg
    assert hw["hwpoison_flag"]
    assert any("Injecting memory failure" in line for line in hw["dmesg"])
    # prediction == kernel, per mapping, for madvise and for the signals
    assert res.agree, verify_text(res)
    assert all(p["agree"] for p in res.pages), [p for p in res.pages if not p["agree"]]
    # the page is shared by the moved process and the poisoning one
    assert len(row["pids"]) >= 2
    kept = [p for p in res.pages if p["observed"] == "mapped"]
    if res.rule == "v3":
        # v3 misses the moved mappings: they stay mapped, unmapping failed
        assert row["misses"] > 0 and kept
        assert {p["pid"] for p in kept} != {hw["injector"]["pid"]}
        assert hw["madvise"] == "EBUSY"
        assert any("failed to unmap page" in line for line in hw["dmesg"])
    else:
        assert row["misses"] == 0 and not kept and hw["madvise"] == "ok"
    # who was signalled, as the kernel logged it
    logged = {int(line.rsplit(":", 1)[1].split()[0]) for line in hw["dmesg"]
              if "Sending SIGBUS to" in line}
    assert logged == set(row["observed_signals"])
    if not (hw["dirty"] or hw["madvise"] == "EBUSY"):
        # clean and unmapped: memory_failure() signals no one (no forcekill)
        assert not row["observed_signals"]
        return
    assert row["observed_signals"].get(hw["injector"]["pid"]) == BUS_MCEERR_AR
    others = {p: c for p, c in row["observed_signals"].items() if p != hw["injector"]["pid"]}
    if early_kill:
        assert others and set(others.values()) == {BUS_MCEERR_AO}
    else:
        assert not others


def test_verify_hwpoison_cli(fresh):
    """`ksmlens verify --by hwpoison --early-kill --json` on v3 (where the
    moved mappings stay): the JSON says what the kernel did."""
    import subprocess
    import sys
    vm = fresh("v3")
    r = subprocess.run([sys.executable, "-m", "ksmlens", "verify", "--name", vm.name,
                        "--by", "hwpoison", "--early-kill", "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    hw, row = d["hwpoison"], d["rows"][0]
    assert d["agree"] and d["by"] == "hwpoison" and d["rule"] == "v3" and hw["early_kill"]
    assert hw["madvise"] == "EBUSY" and row["observed"] == "stayed"
    # every workload process that got a SIGBUS is in the kernel's log
    signalled = {int(p) for p, s in hw["signals"].items() if s}
    assert signalled and signalled == {int(line.rsplit(":", 1)[1].split()[0])
                                       for line in hw["dmesg"] if "Sending SIGBUS" in line}
