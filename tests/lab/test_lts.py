"""Debian's 6.1 LTS kernel (``ksmlens vm up --kernel 6.1``), booted: one guest
per 6.1 variant (stock, v3), shared by the module.

What 6.1 lacks is found in its DWARF and symbols (ksmlens.lens.helpers.KsmKernel)
and is checked here against what the guest's own sysfs lists; the walk's
counts against /sys/kernel/mm/ksm and /proc/PID/ksm_stat; verify's
predictions against the kernel's migration (and reclaim); SmartScan's views
refuse in one line.
"""

import re
import subprocess
import sys

import pytest

import ksmlens.lab.kbuild as kbuild
import ksmlens.lab.ksmsys as ksmsys
from ksmlens.errors import KsmlensError
from ksmlens.experiments.check import check_vm, per_pid_counts, walk_counts
from ksmlens.experiments.verify import verify, verify_smartscan
from ksmlens.lab.attach import attach
from ksmlens.lab.scenarios import ScenarioRun
from ksmlens.lens.helpers import ksm_kernel
from ksmlens.views.tables import verify_table

from conftest import boot

pytestmark = pytest.mark.vm
SOURCE = "6.1"


@pytest.fixture(scope="module", params=list(kbuild.SOURCES[SOURCE].variants))
def vm(request):
    return boot(request.param, source=SOURCE)


def test_uname_names_version_and_variant(vm):
    variant = vm.state["variant"]
    release = vm.run(["uname", "-r"], check=True).stdout.strip()
    k = kbuild.find_kernel(variant, SOURCE)
    assert release == k.release == vm.state["kernel_release"]
    # the version is the 6.1 source's own (its Makefile), the variant ours
    version = kbuild.source_version(SOURCE).split("-")[0]
    assert release == f"{version}-ksmlens-{variant}" and version.startswith("6.1.")


def test_what_the_kernel_lacks_is_what_its_sysfs_lists(vm):
    """KsmKernel, from the DWARF and symbols, against the guest's own files."""
    k = ksm_kernel(attach(f"vm:{vm.name}"))
    files = set(ksmsys.read_counters(vm))
    assert k.smartscan == ("smart_scan" in files) == ("pages_skipped" in files)
    assert k.zero_pages == ("ksm_zero_pages" in files)
    assert k.process_profit == ("general_profit" in files)
    assert k.pages_scanned == ("pages_scanned" in files)
    assert k.advisor == ("advisor_mode" in files)
    assert not k.smartscan            # the point of this kernel
    stat = vm.sh("cat /proc/self/ksm_stat")
    assert ("ksm_merging_pages" in stat) == k.process_profit


def test_mremap_walk_check_and_migration_agree(vm):
    """The mremap scenario: snapshot counts equal sysfs and ksm_stat, `check`
    agrees, and `verify` (migration) predicts what the kernel does."""
    variant = vm.state["variant"]
    with ScenarioRun(vm, "mremap") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        with ksmsys.held(vm):
            prog = attach(f"vm:{vm.name}")
            rows, snap, info = check_vm(vm, prog)
            bad = [r for r in rows if not r.ok]
            assert not bad, bad
            sysfs = ksmsys.read_counters(vm)
            w = walk_counts(snap)
            assert w["pages_shared"] == sysfs["pages_shared"] > 0
            assert w["pages_sharing"] == sysfs["pages_sharing"] > 0
            stat = ksmsys.read_ksm_stat(vm, run.pids())
            per = per_pid_counts(snap)
            for pid in run.pids():
                assert per[pid]["ksm_rmap_items"] == stat[pid]["ksm_rmap_items"]
                # 6.1: /proc/PID/ksm_merging_pages, read beside ksm_stat
                assert per[pid]["ksm_merging_pages"] == stat[pid]["ksm_merging_pages"]
            assert snap.kernel.smartscan is False and snap.kernel.zero_pages is False
            assert "smart_scan" not in snap.counters
        res = verify(vm)
        print(verify_table(res))
        assert res.rule == variant and res.agree, verify_table(res)
        stays = [r for r in res.rows if r["predicted"] == "stays"]
        # v3 misses the moved VMA's mappings; stock finds them all
        assert bool(stays) == (variant == "v3"), verify_table(res)


def test_reclaim_agrees(vm):
    """`verify --by reclaim`: swap on zram (6.1's zram through the crypto
    API, vm/config/6.1.config) and memory.reclaim."""
    with ScenarioRun(vm, "mremap") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        res = verify(vm, by="reclaim")
        print(verify_table(res))
        assert res.agree, verify_table(res)
        stays = [r for r in res.rows if r["predicted"] == "stays"]
        assert bool(stays) == (vm.state["variant"] == "v3"), verify_table(res)


def test_smartscan_refused_in_one_line(vm, tmp_path):
    from ksmlens.experiments.watch import watch
    from ksmlens.views.report import smartscan_table
    from ksmlens.lens.snapshot import take_snapshot
    prog = attach(f"vm:{vm.name}")
    errors = []
    with pytest.raises(KsmlensError) as e:
        verify_smartscan(vm)
    errors.append(e.value)
    with pytest.raises(KsmlensError) as e:
        watch(prog, vm, count=1, pace_ms=50)
    errors.append(e.value)
    with pytest.raises(KsmlensError) as e:
        smartscan_table(take_snapshot(prog, mode="live"))
    errors.append(e.value)
    with pytest.raises(KsmlensError) as e:
        ScenarioRun(vm, "smartscan").start()
    errors.append(e.value)
    for err in errors:
        assert "no SmartScan" in str(err) and "\n" not in str(err), err
    # the CLI: one line on stderr, exit 2 (its own drgn: the test's holds QMP)
    r = subprocess.run([sys.executable, "-m", "ksmlens", "verify", "--name", vm.name,
                        "--smartscan", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert re.fullmatch(r"ksmlens: error: verify --smartscan: this kernel has no SmartScan"
                        r"[^\n]*\n", r.stderr), r.stderr


@pytest.mark.parametrize("scenario,need", [("smartscan", "smart_scan"),
                                           ("zero-pages", "ksm_zero_pages"),
                                           ("prctl", "ksym:ksm_enable_merge_any")])
def test_scenarios_refuse_what_the_kernel_lacks(vm, scenario, need):
    """A scenario that needs what the guest kernel has not refuses in one line
    before it starts anything; the guest says what it lacks."""
    if need.startswith("ksym:"):
        lacks = vm.run(["grep", "-q", f" {need[5:]}$", "/proc/kallsyms"]).rc != 0
    else:
        lacks = need not in ksmsys.read_counters(vm)
    assert lacks        # 6.1 has none of them
    with pytest.raises(KsmlensError, match=f"scenario {scenario} cannot run on this kernel"
                       ) as e:
        ScenarioRun(vm, scenario).start()
    assert "\n" not in str(e.value)
