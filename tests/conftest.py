"""Shared fixtures: real kernels, real guests, always cleaned up.

``lab(variant, numa=...)`` returns a booted :class:`ksmlens.lab.vm.VM` of that
variant. At most one test VM runs at a time (2 host cores, TCG): asking for
another variant powers the current one off first. Every VM a test started is
downed at session end, and QEMU processes are killed by pid even if a test
or the session itself fails.

Only tests marked ``vm`` may boot: around every other test (setup, call and
teardown) ``$KSMLENS_NO_VM`` names the test, and ``VM.up`` -- in this process
or in any program the test starts -- raises a KsmlensError naming it. So
``pytest -m "not vm"`` boots nothing, and an unmarked test that boots fails.
"""

import atexit
import os
import signal

import pytest

from ksmlens.views.tables import rule_match_line

from ksmlens.lab.vm import NO_VM_ENV, VM

_live: dict = {}
_started_pids: set = set()


def _kill_all():
    for vm in list(_live.values()):
        try:
            vm.down(quiet=True)
        except Exception:
            pass
    _live.clear()
    for pid in _started_pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


atexit.register(_kill_all)


def boot(variant: str, numa: int = 2, cpus: int = 2, memory: str = "2G",
         source: str | None = None, arch: str | None = None) -> VM:
    """``source``: a kernel source of ksmlens.lab.kbuild.SOURCES ("6.1"), None: the default;
    ``arch``: "arm64" for the arm64 lab, None: x86-64."""
    key = (variant, numa, cpus, memory, source, arch)
    vm = _live.get(key)
    if vm is not None and vm.alive():
        return vm
    for k in list(_live):
        _live.pop(k).down(quiet=True)
    name = (f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-{os.getpid()}-"
            f"{source + '-' if source else ''}{arch + '-' if arch else ''}{variant}")
    vm = VM.up(name, variant, numa=numa, cpus=cpus, memory=memory, quiet=False, source=source,
               arch=arch)
    _started_pids.add(vm.state["pid"])
    _live[key] = vm
    return vm


def checked(vm):
    """``ksmlens check`` (check_vm) on ``vm``: every row must agree with the
    kernel. Returns ({row name: row}, snapshot)."""
    from ksmlens.experiments.check import check_vm
    from ksmlens.lab.attach import attach
    rows, snap, info = check_vm(vm, attach(f"vm:{vm.name}"))
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    return {r.what: r for r in rows}, snap


def check_matches(res, moved: str, stayed: str) -> None:
    """``res.matches`` against a restatement from the kernel's outcome: per
    KSM page the set of what happened to its compared mappings (``moved`` /
    ``stayed`` per page for migration; ``reclaimed`` / ``stayed`` per row
    for reclaim), and per candidate rule whether that rule misses a mapped
    mapping of it (the snapshot's ``unmappable_under``, or mappings no
    rmap_item reaches)."""
    snap = res.snapshot
    cands = ["stock", "v3"] + (["stored"] if snap.kernel.has_stored_pgoff else [])
    assert res.candidates == cands
    if res.by == "migration":
        did = {}
        for p in res.pages:
            if p["observed"] != "gone":
                did.setdefault(p["node"], set()).add(p["observed"])
    else:
        did = {r["node"]: {r["observed"]} for r in res.rows if r["observed"] != "gone"}
        # and per mapping: a swap entry where the rule finds it, still mapped
        # where it misses it (no rmap_item reaches an orphan mapping)
        found = {}
        for n in snap.nodes():
            for m in n.mappings:
                if m["mapped"]:
                    found[(m["pid"], m["address"])] = m["found"]
            for m in n.orphan_mappings:
                found[(m["pid"], m["address"])] = dict.fromkeys(cands, False)
        per_page = [(found[(p["pid"], p["address"])], p["observed"]) for p in res.pages
                    if p["observed"] in ("swapped", "mapped")
                    and (p["pid"], p["address"]) in found]
    assert did

    def confirmed(rule):
        if res.by == "reclaim" and not all(bool(f[rule]) == (obs == "swapped")
                                           for f, obs in per_page):
            return False
        return all(obs == {stayed if (rule in snap.node(nid).unmappable_under
                                      or snap.node(nid).unreachable) else moved}
                   for nid, obs in did.items())
    assert res.matches == [r for r in cands if confirmed(r)], res.by_rule
    assert res.to_dict()["matches"] == res.matches
    line = rule_match_line(res)
    if len(res.matches) == 1:
        assert f"like rule {res.matches[0]} (" in line
    elif res.matches:
        assert "cannot tell them apart" in line and ", ".join(res.matches) in line


@pytest.fixture(scope="session")
def lab():
    """Factory: ``lab("union")`` -> a running VM of that variant (2 NUMA nodes)."""
    yield boot
    _kill_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """$KSMLENS_NO_VM set to the test's id around a test not marked ``vm``."""
    if item.get_closest_marker("vm") is not None:
        yield
        return
    old = os.environ.get(NO_VM_ENV)
    os.environ[NO_VM_ENV] = f"{item.nodeid} is not marked vm"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(NO_VM_ENV, None)
        else:
            os.environ[NO_VM_ENV] = old


@pytest.fixture
def fresh():
    """A fresh guest per hwpoison experiment (a poisoned page stays poisoned);
    the session's shared test VM is powered off first (one TCG guest at a time)."""
    vms = []

    def up(variant):
        for k in list(_live):
            _live.pop(k).down(quiet=True)
        name = f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-{os.getpid()}-hw-{variant}"
        vm = VM.up(name, variant, quiet=False)
        _started_pids.add(vm.state["pid"])
        vms.append(vm)
        return vm
    try:
        yield up
    finally:
        for vm in vms:
            vm.down(quiet=True)


def walks_agree(vm, prog, both: bool = False):
    """In one pause of ``vm``, the paused walk by pointers and by a copy of
    the slabs (ksmlens.lens.slabscan) must read the same Raw; returns it
    (the slab-scan one; ``both=True``: the pair, pointers first). Both take
    every rmap_item and stable node the kernel links, so a list or tree
    either walk got wrong shows here."""
    import pickle
    from ksmlens.lens.snapshot import walk_paused
    with vm.paused():
        a = walk_paused(prog, slab_scan=False)
        b = walk_paused(prog, slab_scan=True)
    assert not a.meta["slab_scan"] and b.meta["slab_scan"]
    assert a.races == b.races     # a half-done update (a pause lands anywhere) alike
    for part in ("items", "nodes", "cand"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys(), part
        for k in x:
            assert pickle.dumps(x[k]) == pickle.dumps(y[k]), (part, k)
    assert pickle.dumps(a.slots) == pickle.dumps(b.slots)
    assert a.anon_vmas == b.anon_vmas and a.kernel == b.kernel
    assert a.counters == b.counters and a.scan == b.scan
    return (a, b) if both else b
