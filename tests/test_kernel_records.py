"""The variant records, the KSM sysfs table, ksmsys.held and the QEMU command
line, without a guest (nothing here boots; the dry run starts only vng)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ksmlens.errors import KsmlensError
from ksmlens.kernel import sysfs, variants
from ksmlens.lab import cmdline

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ 1. variants

def test_every_variant_patch_exists_and_the_default_is_a_variant():
    assert variants.DEFAULT_VARIANT in variants.VARIANTS
    for v in variants.VARIANTS.values():
        for p in v.patches:
            assert (ROOT / "vm" / "patches" / p).is_file(), (v.name, p)


def test_stored_pgoff_follows_the_patch_text():
    """A variant stores the pgoff iff one of its patches adds the member to
    struct ksm_rmap_item; it is reset on removal iff a patch writes 0 to it."""
    for v in variants.VARIANTS.values():
        text = "".join((ROOT / "vm" / "patches" / p).read_text() for p in v.patches)
        added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
        assert v.stored_pgoff == any(re.search(r"\bpgoff;", l) for l in added), v.name
        assert v.pgoff_reset_on_removal == any("rmap_item->pgoff = 0" in l for l in added), v.name
        assert (v.walk_rule == "stored") == v.stored_pgoff, v.name


def test_get_variant_and_release():
    assert variants.get_variant("v8").smartscan_reads_stable is False
    with pytest.raises(KsmlensError) as e:
        variants.get_variant("v9")
    assert "v9" in str(e.value) and all(n in str(e.value) for n in variants.VARIANTS)
    assert "\n" not in str(e.value)
    assert variants.variant_of_release("6.12.117-ksmlens-v8") == "v8"
    assert variants.variant_of_release("6.12.117-ksmlens-v9") is None
    assert variants.variant_of_release("6.12.117-ksmlens") is None


def test_the_old_names_are_the_records():
    import ksmlens.lab.kbuild as kbuild
    from ksmlens.analysis import core
    assert kbuild.VARIANTS is variants.VARIANTS
    assert kbuild.variant_of_release is variants.variant_of_release
    assert core.VARIANT_RULE == {n: v.walk_rule for n, v in variants.VARIANTS.items()}
    assert core.kernel_walk_rule("v3", False) == "v3"
    assert core.kernel_walk_rule(None, True) == "stored"
    assert core.kernel_walk_rule(None, False) is None


def test_the_readme_variants_table_is_the_records():
    """README's table: one row per variant, in order, with its walk rule
    and the record's notes."""
    searches = {"stock": "`[0, ULONG_MAX]`", "v3": "`[address >> PAGE_SHIFT]`",
                "stored": "`[rmap_item->pgoff]`"}
    text = (ROOT / "README.md").read_text()
    head = text.index("| variant | `rmap_walk_ksm()` searches | notes |")
    rows = []
    for line in text[head:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert [r[0].split()[0].strip("`") for r in rows] == list(variants.VARIANTS)
    for (name, search, notes), v in zip(rows, variants.VARIANTS.values()):
        assert search.startswith(searches[v.walk_rule]), v.name
        assert notes == v.notes, v.name
        assert ("(default)" in name) == (v.name == variants.DEFAULT_VARIANT)


# ------------------------------------------------------------------ 2. sysfs

def test_sysfs_table_matches_mm_ksm_c():
    """Each file's kind and variable as mm/ksm.c registers and prints it
    (the 6.12 source ksmlens builds from, where it is extracted)."""
    srcs = sorted(p for p in (Path.home() / ".cache/ksmlens/src").glob("*/mm/ksm.c")
                  if ".pristine" not in str(p))
    if not srcs:
        pytest.skip("no extracted kernel source (ksmlens vm build extracts it)")
    c = srcs[0].read_text()
    ro = set(re.findall(r"^KSM_ATTR_RO\((\w+)\);", c, re.M))
    rw = set(re.findall(r"^KSM_ATTR\((\w+)\);", c, re.M))
    files = {f.name: f for f in sysfs.FILES if f.in_sysfs}
    assert set(files) == ro | rw
    for name, f in files.items():
        assert (f.kind == "knob") == (name in rw), name
        show = re.search(rf"{name}_show\(struct kobject.*?\n}}", c, re.S).group(0)
        if f.variable:
            assert f.variable in show, (name, f.variable)
        else:
            assert f.show, name


def test_sysfs_names_and_knob():
    assert "run" in sysfs.KNOBS and "pages_shared" in sysfs.COUNTERS
    assert "rmap_items" not in sysfs.COUNTERS           # not a file
    assert sysfs.WRITE_ORDER[0] == "advisor_mode" and sysfs.WRITE_ORDER[-1] == "run"
    assert set(sysfs.WRITE_ORDER) == set(sysfs.KNOBS)
    assert sysfs.knob("max_page_sharing").needs_unmerged
    for bad in ("pages_shared", "rnu"):
        with pytest.raises(KsmlensError):
            sysfs.knob(bad)


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
