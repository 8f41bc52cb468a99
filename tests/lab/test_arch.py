"""The architecture records, and what --arch changes in the lab without a
guest: the kernel's cache key and config fragments, the guest programs'
build, the vng command line. The arm64 guest itself: tests/lab/test_arm64.py."""

from pathlib import Path

import pytest

from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import ARM64, X86_64, get_arch
from ksmlens.lab import cmdline, kbuild
from ksmlens.lab.paths import vm_data


def test_every_name_of_an_architecture_finds_its_record():
    for name in ("arm64", "aarch64", "ARM64"):
        assert get_arch(name) is ARM64
    for name in ("x86_64", "x86-64", "amd64", None):
        assert get_arch(name) is X86_64
    with pytest.raises(KsmlensError, match=r"unknown architecture 'sparc'.*x86_64, arm64"):
        get_arch("sparc")
    assert ARM64.make_args() == ["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"]
    assert X86_64.make_args() == ["ARCH=x86_64"]


def test_arm64_keys_and_fragments_are_its_own_and_x86_64s_unchanged():
    v = kbuild.get_variant("stock")
    x86 = kbuild.artifact_key(v, "6.12")
    assert kbuild.artifact_key(v, "6.12", "x86_64") == x86       # the cache from before arm64
    assert kbuild.artifact_key(v, "6.12", "arm64") != x86
    assert kbuild.fragments("6.12") == [vm_data() / "config" / "ksmlens.config"]
    assert kbuild.fragments("6.12", "arm64")[-1] == vm_data() / "config" / "arm64.config"
    assert kbuild._kernel_dir(v, "k", kbuild.get_source("6.1"), ARM64).name == \
        "arm64-6.1-stock-k"


def test_a_later_fragment_unsets_an_earlier_line(tmp_path):
    a, b = tmp_path / "a.config", tmp_path / "b.config"
    a.write_text("CONFIG_ACPI=y\nCONFIG_KSM=y\nCONFIG_NR_CPUS=8\n# a comment\n")
    b.write_text("# CONFIG_ACPI is not set\nCONFIG_NR_CPUS=4\n")
    assert kbuild.merged_lines([a, b]) == ["CONFIG_KSM=y", "CONFIG_NR_CPUS=4"]


def test_kconfig_symbols_of_one_architecture(tmp_path):
    for d, sym in (("arch/x86", "PVH"), ("arch/arm64", "ARM64_4K_PAGES"), ("mm", "KSM")):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "Kconfig").write_text(f"config {sym}\n\tbool\n")
    assert kbuild.kconfig_symbols(tmp_path) == {"PVH", "ARM64_4K_PAGES", "KSM"}
    assert kbuild.kconfig_symbols(tmp_path, "arm64") == {"ARM64_4K_PAGES", "KSM"}
    assert kbuild.kconfig_symbols(tmp_path, "x86_64") == {"PVH", "KSM"}


def test_the_arm64_vng_command_boots_its_own_root():
    spec = cmdline.LaunchSpec(bzimage=Path("/k/Image"), memory_mb=2048, cpus=2, numa=2,
                              accel="tcg", vm_dir=Path("/tmp/vm"), agent_cmd="exec agent",
                              qemu="qemu-system-aarch64", arch="arm64", root=Path("/r"),
                              rodirs=("/ksmlens=/repo", "/ksmlens-cache=/cache"))
    argv = cmdline.vng_argv(spec)
    at = argv.index("--arch")
    assert argv[at:at + 4] == ["--arch", "arm64", "--root", "/r"]
    assert "--rodir" in argv and "/ksmlens=/repo" in argv and "/ksmlens-cache=/cache" in argv
    assert argv[argv.index("--cwd") + 1] == "/r"          # the root's own "/"
    assert "--disable-microvm" not in argv and "--disable-kvm" in argv
    assert argv[-1].startswith("--qemu-opts=") and "gic-version=3" in argv[-1]
    x86 = cmdline.vng_argv(cmdline.LaunchSpec(
        bzimage=Path("/k/bzImage"), memory_mb=2048, cpus=2, numa=1, accel="kvm",
        vm_dir=Path("/tmp/vm"), agent_cmd="exec agent"))
    assert "--arch" not in x86 and "--disable-microvm" in x86 and "gic-version" not in x86[-1]


def test_host_paths_as_the_arm64_guest_sees_them():
    from ksmlens.lab.vm import guest_path
    mounts = {"/ksmlens": "/work/main", "/ksmlens-cache": "/root/.cache/ksmlens"}
    assert guest_path("/work/main/ksmlens/lab/guest/agent.py", mounts) == \
        "/ksmlens/ksmlens/lab/guest/agent.py"
    assert guest_path("/root/.cache/ksmlens/bin/w-arm64-1", mounts) == \
        "/ksmlens-cache/bin/w-arm64-1"
    assert guest_path("/work/mainline/x", mounts) == "/work/mainline/x"    # not under it
    assert guest_path("/bin/sh", {}) == "/bin/sh"


def test_guest_programs_are_built_per_architecture(tmp_path, monkeypatch):
    from ksmlens.lab import scenario_run
    src = vm_data() / scenario_run.WORKLOAD_SOURCE
    x86 = scenario_run.static_binary_path(src, "w")
    arm = scenario_run.static_binary_path(src, "w", "arm64")
    assert x86.name.startswith("w-") and arm.name.startswith("w-arm64-")
    assert x86.name.split("-")[-1] == arm.name.split("-")[-1]          # one source digest
    monkeypatch.setattr(ARM64.__class__, "gcc", property(lambda self: "no-such-gcc"))
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path))
    with pytest.raises(KsmlensError, match="no-such-gcc not found.*gcc-aarch64-linux-gnu"):
        scenario_run.static_binary(src, "w", "the workload", "arm64")


def test_a_missing_cross_compiler_is_refused_before_any_build(monkeypatch, tmp_path):
    import shutil
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path))
    real = shutil.which
    monkeypatch.setattr(kbuild.shutil, "which",
                        lambda t: None if t == "aarch64-linux-gnu-gcc" else real(t))
    with pytest.raises(KsmlensError, match=r"aarch64-linux-gnu-gcc not found.*"
                       r"apt-get install gcc-aarch64-linux-gnu"):
        kbuild.build("stock", arch="arm64", force=True, quiet=True)
    assert not (tmp_path / "tree").exists()                 # nothing was started
