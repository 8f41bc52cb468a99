"""The lab against real guests: every variant boots, identifies itself, runs
commands, runs every scenario checked against the kernel's own counters, and
shows (or not) the v3 bug through the kernel's own rmap walk (migration)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from drgn import Program

import ksmlens.lab.kbuild as kbuild
import ksmlens.lab.ksmsys as ksmsys
from ksmlens.kernel.constants import STORED_INDEX_MEMBERS
from ksmlens.lab.attach import attach
from ksmlens.errors import KsmlensError
from ksmlens.lab.ksmsys import migrate_pages
from ksmlens.lab.scenarios import SCENARIOS, ScenarioRun
from ksmlens.lab.paths import vms_root
from ksmlens.lab.vm import VM

from conftest import boot

pytestmark = pytest.mark.vm      # every test here boots a guest

VARIANTS = list(kbuild.VARIANTS)


@pytest.fixture(scope="module", params=VARIANTS)
def vm(request):
    """One guest per variant (2 NUMA nodes), shared by this module's tests."""
    return boot(request.param)


def test_variant_identifies_itself(vm):
    variant = vm.state["variant"]
    r = vm.run(["uname", "-r"], check=True)
    # The release the build recorded (its `make kernelrelease`), whichever
    # 6.12 point release Debian's linux-source-6.12 is at today.
    built = kbuild.find_kernel(variant)
    assert built is not None and built.release.endswith(f"-ksmlens-{variant}")
    assert built.release.startswith(kbuild.source_version().split("-")[0] + "-")
    assert r.stdout.strip() == built.release
    assert kbuild.variant_of_release(r.stdout.strip()) == variant
    # The patch is really in this kernel: its DWARF has the stored pgoff or not.
    prog = attach(f"vm:{vm.name}")
    members = [m for m in STORED_INDEX_MEMBERS
               if prog.type("struct ksm_rmap_item").has_member(m)]
    assert members == {"union": ["pgoff"], "v8": ["linear_page_index"]}.get(variant, [])
    assert prog.type("struct ksm_rmap_item").size == 64


def test_guest_has_what_the_lab_needs(vm):
    out = vm.sh("ls /sys/devices/system/node | grep -c '^node[0-9]'; "
                "test -d /sys/kernel/mm/ksm && echo ksm; "
                "zcat /proc/config.gz | grep -E '^CONFIG_(KSM|NUMA|SWAP|MIGRATION|ZRAM|MEMCG)=y' "
                "| wc -l")
    nodes, ksm, configs = out.split()
    assert int(nodes) == 2
    assert ksm == "ksm"
    assert int(configs) == 6


def test_run_returns_stdout_stderr_and_code(vm):
    r = vm.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.rc, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = vm.run(["sleep", "30"], timeout=1)
    assert r.timed_out and r.rc is None
    with pytest.raises(KsmlensError, match="exited 1"):
        vm.run(["false"], check=True)


def test_status_json_for_scripts_and_drgn(vm):
    out = subprocess.run([sys.executable, "-m", "ksmlens", "vm", "status", "--json",
                          "--name", vm.name], capture_output=True, text=True, check=True)
    s = json.loads(out.stdout)
    for k in ("name", "variant", "kernel_release", "accel", "qmp", "vmlinux", "pid"):
        assert s[k], k
    assert s["accel"] in ("kvm", "tcg")
    assert os.stat(s["dir"]).st_mode & 0o777 == 0o700
    # drgn reads the live guest through that QMP socket.
    prog = Program()
    prog.set_qemu_qmp(s["qmp"])
    prog.load_debug_info([s["vmlinux"]])
    assert prog["UTS_RELEASE"].string_().decode() == s["kernel_release"]


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s.core])
def test_scenario_checks_pass(vm, name):
    before = ksmsys.read_counters(vm)
    with ScenarioRun(vm, name) as run:
        for st in run.scenario.steps:
            run.step(st.name)          # each step raises if KSM did not do its part
        stat = run.ksm_stat()
        for pid in run.pids():
            want = run.pages_of(pid)
            if want:
                assert stat[pid]["ksm_merging_pages"] >= want
    after = ksmsys.read_counters(vm)
    # The scenario put the knobs back.
    for k in ("pages_to_scan", "sleep_millisecs", "max_page_sharing", "run"):
        assert after[k] == before[k], k


def test_mremap_moved_pages_and_the_kernels_rmap_walk(vm):
    """After mremap + re-merge, migrate the moved KSM pages for real.

    migrate_pages() unmaps every mapping through rmap_walk_ksm(): the v3
    walk (pgoff = address >> PAGE_SHIFT) misses the moved VMA, whose vm_pgoff
    still says where it was, so the page stays mapped and cannot move.
    """
    variant = vm.state["variant"]
    with ScenarioRun(vm, "mremap") as run:
        run.step("merged")
        moved = run.step("mremap")
        run.step("remerged")
        pid = moved["pid"]
        (region,) = [r for p, r in run.regions() if p == pid]
        assert region["start"] == moved["new"]
        # Hold ksmd (its scan takes page references that fail a migration
        # transiently); the rmap walk does not depend on it.
        vm.write_file("/sys/kernel/mm/ksm/run", "0")
        res = migrate_pages(vm, [(pid, region["start"], region["pages"])])[0]
    pages = res["pages"]
    assert len(pages) == region["pages"]
    assert all(p["before"] in (0, 1) for p in pages)
    went = [p["after"] == p["target"] for p in pages]
    if variant == "v3":
        assert not any(went), f"v3 migrated {sum(went)} moved KSM pages: {pages[:3]}"
        assert all(p["after"] == p["before"] and p["tries"] == 4 for p in pages)
        assert res["rc"] > 0        # move_pages(): that many pages were not migrated
    else:
        assert all(went), f"{variant}: {went.count(False)} moved KSM pages did not migrate"
        assert res["rc"] == 0


def test_name_in_use(vm):
    with pytest.raises(KsmlensError, match="already up"):
        VM.up(vm.name, vm.state["variant"])


def test_second_vm_side_by_side_and_dead_vm():
    """A second VM runs beside the test VM; a killed one is reported dead."""
    first = boot("stock")
    other = VM.up(f"{first.name}-dead", "v3", numa=1, cpus=1, memory="512M")
    _started = other.state["pid"]
    assert other.run(["uname", "-r"], check=True).stdout.strip().endswith("-v3")
    assert first.run(["uname", "-r"], check=True).stdout.strip().endswith("-stock")
    try:
        os.kill(other.state["pid"], signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(KsmlensError, match="died"):
            other.run(["true"])
    finally:
        other.down()
    assert not os.path.exists(f"/proc/{_started}")
    assert not other.dir.exists()


def test_guest_that_never_comes_up_is_reported(tmp_path):
    with pytest.raises(KsmlensError, match="guest never came up within 1 s"):
        VM.up("test-never", "stock", numa=1, cpus=1, memory="512M", boot_timeout=1)
    assert not (vms_root() / "test-never" / "state.json").exists()
    out = subprocess.run(["pgrep", "-f", "vms/test-never/"], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_a_scenario_starts_once():
    """A second start() would replace the first workload's handle, and
    stop() could no longer end it: refused before the guest is touched."""
    from ksmlens.errors import KsmlensError
    from ksmlens.lab.scenarios import ScenarioRun
    run = ScenarioRun(object(), "merge")
    run.handle = 7                       # as start() leaves it
    with pytest.raises(KsmlensError, match="already running"):
        run.start()
