"""ksmsys on a fake VM (set_knobs, held, knobs_set), the vng/QEMU command
lines, ``vm up --dry-run`` and the guest's pagemap bits, without a guest:
nothing here boots (the dry run starts only vng)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ksmlens.errors import KsmlensError
from ksmlens.kernel import sysfs, variants
from ksmlens.lab import cmdline

ROOT = Path(__file__).resolve().parents[2]


class FakeVM:
    """Files of /sys/kernel/mm/ksm in a dict; records every write."""

    def __init__(self, **files):
        self.files = {f"{sysfs.KSM_SYSFS}/{k}": str(v) for k, v in files.items()}
        self.writes = []

    def read_files(self, paths=(), globs=()):
        return dict(self.files)

    def write_file(self, path, data):
        self.writes.append((path.rsplit("/", 1)[1], data))
        self.files[path] = data


def test_set_knobs_unmerges_first_and_refuses_a_counter():
    from ksmlens.lab import ksmsys
    vm = FakeVM(run=1, max_page_sharing=256, sleep_millisecs=20, pages_shared=5,
                advisor_mode="[none] scan-time")
    saved = ksmsys.set_knobs(vm, sleep_millisecs=50, max_page_sharing=16)
    assert saved == {"sleep_millisecs": 20, "max_page_sharing": 256}
    assert vm.writes == [("run", "2"), ("max_page_sharing", "16"), ("sleep_millisecs", "50"),
                         ("run", "1")]
    vm.writes.clear()
    with pytest.raises(KsmlensError):
        ksmsys.set_knobs(vm, sleep_millisecs=10, pages_shared=0)
    assert vm.writes == []


# ------------------------------------------------------------------ 3. held

def test_held_restores_run_also_on_an_exception():
    from ksmlens.lab import ksmsys
    vm = FakeVM(run=1)
    with ksmsys.held(vm) as old:
        assert old == 1 and vm.files[f"{sysfs.KSM_SYSFS}/run"] == "0"
        ksmsys.set_run(vm, sysfs.RUN_MERGE)
    assert vm.writes == [("run", "0"), ("run", "1"), ("run", "1")]
    vm = FakeVM(run=2)
    with pytest.raises(RuntimeError):
        with ksmsys.held(vm):
            raise RuntimeError("boom")
    assert vm.writes == [("run", "0"), ("run", "2")]
    with pytest.raises(KsmlensError):
        ksmsys.set_run(vm, 3)


def test_knobs_set_restores():
    from ksmlens.lab import ksmsys
    vm = FakeVM(run=1, sleep_millisecs=20)
    with pytest.raises(RuntimeError):
        with ksmsys.knobs_set(vm, sleep_millisecs=5):
            assert vm.files[f"{sysfs.KSM_SYSFS}/sleep_millisecs"] == "5"
            raise RuntimeError
    assert vm.files[f"{sysfs.KSM_SYSFS}/sleep_millisecs"] == "20"


# ------------------------------------------------------------------ 4. command line

def _spec(tmp_path, **kw):
    args = dict(bzimage=Path("/k/bzImage"), memory_mb=2048, cpus=3, numa=1, accel="tcg",
                vm_dir=tmp_path / "vms" / "x", agent_cmd="exec agent", vng="/v/vng",
                qemu="/q/qemu-system-x86_64")
    args.update(kw)
    return cmdline.LaunchSpec(**args)


def _opt(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_vng_argv_numa_split_and_accel(tmp_path):
    a = cmdline.vng_argv(_spec(tmp_path, numa=2, memory_mb=2049))
    assert a[0] == "/v/vng" and "--dry-run" in a and "--disable-kvm" in a
    assert _opt(a, "--numa") == ["1024M,cpus=0-1", "1025M,cpus=2-2"]
    assert _opt(a, "--memory") == ["2049M"] and _opt(a, "--cpus") == ["3"]
    k = cmdline.vng_argv(_spec(tmp_path, accel="kvm"))
    assert "--disable-kvm" not in k and "--numa" not in k
    opts = shlex.split(next(x for x in k if x.startswith("--qemu-opts="))[len("--qemu-opts="):])
    qmp = _opt(opts, "-qmp")
    d = tmp_path / "vms" / "x"
    assert qmp[:2] == [f"unix:{d}/qmp.sock,server=on,wait=off",
                       f"unix:{d}/drgn.sock,server=on,wait=off"]
    assert len(qmp) == 2 + cmdline.DRGN_POOL
    for bad in (dict(numa=4, cpus=3), dict(numa=0), dict(accel="hvf")):
        with pytest.raises(KsmlensError):
            cmdline.vng_argv(_spec(tmp_path, **bad))


VNG_OUT = ("some banner\n/usr/bin/qemu-system-x86_64 -name virtme-ng -m 2048M -smp 3 "
           "-chardev file,id=ret,path=/tmp/virtme_retab12 -kernel /k/bzImage "
           "-append 'console=ttyS0 panic=-1' -qmp unix:/d/qmp.sock,server=on,wait=off\n")


def test_qemu_argv_from_vng_output(tmp_path):
    s = _spec(tmp_path)
    a = cmdline.qemu_argv(s, VNG_OUT)
    assert a[0] == "/q/qemu-system-x86_64"
    assert f"file,id=ret,path={tmp_path}/vms/x/ret" in a          # out of /tmp
    assert not any("virtme_ret" in x for x in a)
    assert _opt(a, "-append") == ["console=ttyS0 panic=-1"]
    with pytest.raises(KsmlensError, match="no QEMU command line: vng: kernel not found"):
        cmdline.qemu_argv(s, "nothing\n", "warning\nvng: kernel not found\n")


def test_parse_mem():
    assert cmdline.parse_mem("2G") == 2048 and cmdline.parse_mem("1536m") == 1536
    with pytest.raises(KsmlensError):
        cmdline.parse_mem("lots")


def _qemu_pids():
    r = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True)
    return set(r.stdout.split())


def test_vm_up_dry_run_prints_the_command_and_starts_nothing(tmp_path):
    import ksmlens.lab.kbuild as kbuild
    if not kbuild.find_kernel(variants.DEFAULT_VARIANT):
        pytest.skip("the default variant is not built")
    from ksmlens.lab.paths import vms_root
    name = "lab-dryrun-test"
    before = _qemu_pids()
    r = subprocess.run([sys.executable, "-m", "ksmlens", "vm", "up", "--dry-run", "--name", name,
                        "--memory", "1G", "--cpus", "2", "--numa", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    k = kbuild.find_kernel(variants.DEFAULT_VARIANT)
    assert _opt(argv, "-kernel") == [str(k.bzimage)]
    assert _opt(argv, "-m") == ["1024M"] and _opt(argv, "-smp") == ["2"]
    d = vms_root() / name
    assert f"unix:{d}/qmp.sock,server=on,wait=off" in _opt(argv, "-qmp")
    assert f"unix:{d}/drgn.sock,server=on,wait=off" in _opt(argv, "-qmp")
    assert not d.exists()                           # no state left behind
    new = _qemu_pids() - before
    for pid in new:                                  # another agent's VM may start meanwhile
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
        assert name.encode() not in cmd


# ------------------------------------------------------------------ pagemap bits

def test_guest_pagemap_decodes_this_process(tmp_path):
    """The guest script's named pagemap bits on the host's own pagemap: a
    touched anonymous page is present with a pfn, an untouched one is not."""
    import importlib.util
    import mmap
    import os
    spec = importlib.util.spec_from_file_location(
        "guest_pagemap", ROOT / "ksmlens" / "lab" / "guest" / "pagemap.py")
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    buf = mmap.mmap(-1, 2 * pm.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[0] = 1                                    # fault in the first page only
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    pages = pm.pages(os.getpid(), addr, 2)
    assert pages[0]["present"] and not pages[0]["swapped"]
    if os.geteuid() == 0:                          # pfns are 0 for others
        assert pages[0]["pfn"]
    assert not pages[1]["present"] and pages[1]["pfn"] is None
