"""ksmlens on /proc/kcore inside a lab guest, as a user runs it on their host.

The guest sees the host's root read-only, so the checkout's venv and this
worktree run there as they are. With the ``chain`` scenario merged and ksmd
held (run=0), ``ksmlens check --target /proc/kcore`` run in the guest must
print the table ``ksmlens check`` prints from the host (paused over QMP),
row for row; the vmlinux is found without naming it (the lab's build, by
build ID); a vmlinux of another build and no vmlinux at all are refused in
one line; report, snapshot and ``%ksm`` give the pages_shared /
pages_sharing the guest's /sys/kernel/mm/ksm shows.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.kernel.variants import VARIANTS
from ksmlens.lab import kbuild
from ksmlens.lab.paths import repo_root
from ksmlens.lab.scenarios import ScenarioRun

pytestmark = pytest.mark.vm

VARIANT = "union"
GUEST = Path(__file__).with_name("kcore_guest.py")
ENV = {"PYTHONPATH": str(repo_root())}


def parse_check(text: str) -> dict[str, tuple]:
    """``ksmlens check``'s table: {counter: (walk, kernel, globals, ok)}."""
    lines = text.splitlines()
    assert lines and lines[0].split()[:2] == ["counter", "walk"], text
    rows = {}
    for line in lines[1:]:
        if line.startswith(("note:", "check:")):
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == 5, line
        rows[cells[0]] = tuple(cells[1:])
    return rows


def summary_counters(text: str) -> dict[str, int]:
    """``counters: pages_shared=24  pages_sharing=360 ...`` of a summary."""
    line = next(l for l in text.splitlines() if l.startswith("counters:"))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.fixture(scope="module")
def held_chain(lab):
    vm = lab(VARIANT, numa=2)
    run = ScenarioRun(vm, "chain")
    run.start()
    try:
        run.step("merged")
        with ksmsys.held(vm):
            yield vm
    finally:
        run.stop()


def test_kcore_check_in_guest_equals_host_check(held_chain):
    vm = held_chain
    t = time.monotonic()
    host = subprocess.run([sys.executable, "-m", "ksmlens", "check", "--name", vm.name],
                          capture_output=True, text=True, env={**os.environ, **ENV})
    t_host = time.monotonic() - t
    assert host.returncode == 0, host.stdout + host.stderr
    t = time.monotonic()
    guest = vm.run([str(Path(sys.executable).with_name("ksmlens")), "check", "--target",
                    "/proc/kcore"], env=ENV, timeout=900)
    t_guest = time.monotonic() - t
    print(f"check: host {t_host:.1f} s, in the guest on /proc/kcore {t_guest:.1f} s")
    assert guest.rc == 0, guest.stdout + guest.stderr
    h, g = parse_check(host.stdout), parse_check(guest.stdout)
    assert g == h
    # the table is the kernel's: its own sysfs, read in the guest now
    c = ksmsys.read_counters(vm)
    assert int(g["pages_shared"][1]) == c["pages_shared"] > 0
    assert int(g["pages_sharing"][1]) == c["pages_sharing"] > 0
    assert int(g["stable_node_dups"][0]) == c["stable_node_dups"] > 0
    # said once: the walk is live, and how to hold ksmd
    assert guest.stderr.count("nothing can pause it") == 1, guest.stderr
    assert "/sys/kernel/mm/ksm/run" in guest.stderr
    assert "unpaused walk" in guest.stdout.splitlines()[-1]


def test_kcore_vmlinux_report_snapshot_ksm_in_guest(held_chain):
    vm = held_chain
    other = next(k for k in (kbuild.find_kernel(v) for v in VARIANTS if v != VARIANT)
                 if k is not None)
    t = time.monotonic()
    r = vm.run([sys.executable, str(GUEST), str(other.vmlinux)], env=ENV, timeout=1200)
    print(f"kcore_guest.py: {time.monotonic() - t:.1f} s")
    assert r.rc == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    want = res["sysfs_before"]
    assert res["sysfs_after"] == want and want["pages_shared"] > 0
    assert res["uname"] == vm.state["kernel_release"]
    # numpy's AVX2 sorts are wrong under TCG: the lab's guest agent turns them off
    if vm.state["accel"] == "tcg":
        assert res["npy_disabled"] == "X86_V3"
    # found without naming it: the lab's build of this release, by build ID
    assert res["attach"] == {"path": vm.state["vmlinux"], "source": "lab"}
    assert res["plain_drgn"]["vmlinux"] == vm.state["vmlinux"]
    assert res["plain_drgn"]["finders"][0] == "ksmlens"
    # report and snapshot: the kernel's counters and the walk's own counts
    assert res["report"]["rc"] == 0, res["report"]["stderr"]
    rep = summary_counters(res["report"]["stdout"])
    assert {k: rep[k] for k in want} == want
    assert res["snapshot"]["rc"] == 0, res["snapshot"]["stderr"]
    snap = res["snapshot_file"]
    assert snap["counters"] == want and snap["walk"] == want
    assert snap["mode"] == "live" and not snap["races"]
    # the live walk said once in the process (report, then snapshot)
    said = res["report"]["stderr"] + res["snapshot"]["stderr"]
    assert said.count("nothing can pause it") == 1, said
    # %ksm on a plain drgn Program of /proc/kcore
    assert "check: " in res["ksm_check"] and " agree " in res["ksm_check"]
    agree = re.search(r"check: (\d+)/(\d+) agree", res["ksm_check"])
    assert agree and agree[1] == agree[2], res["ksm_check"]
    assert res["ksm_check"].count("nothing can pause it") == 1
    assert "nothing can pause it" not in res["ksm_stable"]      # once per Program
    assert f"pages_shared = {want['pages_shared']}" in res["ksm_stable"]
    # refusals, one line each, with what to do
    for key, cause in (("consistent", "nothing can pause it"),
                       ("wrong", f"{other.vmlinux} is not the vmlinux of"),
                       ("missing", "no vmlinux for the running kernel")):
        out = res[key]
        assert out["rc"] == 2 and out["stdout"] == "", out
        lines = out["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ksmlens: error: "), out["stderr"]
        assert cause in lines[0], lines[0]
    assert "linux-image-" in res["wrong"]["stderr"] and "--vmlinux" in res["missing"]["stderr"]


def test_kcore_cost_in_guest_equals_host_cost(held_chain):
    """``ksmlens cost --target /proc/kcore`` in the guest: the numbers of the
    host's paused walk (issue 19: cost on /proc/kcore as live), for the
    worst case and for memory failure's walks."""
    vm = held_chain
    for walk in ("full", "hwpoison"):
        argv = ["cost", "--walk", walk, "--json", "--all"]
        host = subprocess.run([sys.executable, "-m", "ksmlens", *argv, "--name", vm.name],
                              capture_output=True, text=True, env={**os.environ, **ENV})
        assert host.returncode == 0, host.stderr
        guest = vm.run([str(Path(sys.executable).with_name("ksmlens")), *argv, "--target",
                        "/proc/kcore"], env=ENV, timeout=900)
        assert guest.rc == 0, guest.stderr
        h, g = json.loads(host.stdout), json.loads(guest.stdout)
        assert g["pages"] == h["pages"] and g["totals"] == h["totals"], walk
        assert len({p["node"] for p in h["pages"]}) == len(h["pages"])
        # the chain scenario's pages: 24 dups, each walked
        assert len(h["pages"]) == ksmsys.read_counters(vm)["pages_shared"] > 0
        assert all(t["returned"] > 0 for t in h["totals"]), h["totals"]
