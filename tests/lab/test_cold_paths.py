"""Every step that builds into the cache, run into an empty one.

A warm cache hides the code that runs only when nothing is built yet: on a
fresh machine ``ksmlens selftests`` crashed in ``build_selftests()`` (a call
that no longer matched its definition) while CI, with the build cached from
before, stayed green. So each build that is cheap enough runs here into a
fresh ``$KSMLENS_CACHE`` (``tmp_path``), and its product is checked as the
guest will use it: a statically linked x86-64 ELF (the guest shares no
libraries with the host). The kernel builds (minutes each) get the cold mode
of CI instead: ``KSMLENS_CACHE=$(mktemp -d) bash .ci/run`` (README).
Nothing here boots a guest.
"""

import json
import struct
import subprocess
import sys

import pytest

import ksmlens.lab.kbuild as kbuild
from ksmlens.cli.lab import cache_entries
from ksmlens.experiments import selftests
from ksmlens.lab import scenarios


@pytest.fixture
def cold(tmp_path, monkeypatch):
    """An empty cache for this test alone."""
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


EM_X86_64, EM_AARCH64 = 62, 183      # e_machine (include/uapi/linux/elf-em.h)


def static_x86_64(path, machine=EM_X86_64) -> bool:
    """An ELF64 little-endian executable for ``machine`` (x86-64 unless
    told) without a program interpreter (PT_INTERP), i.e. statically linked."""
    b = path.read_bytes()
    if b[:4] != b"\x7fELF" or b[4] != 2 or b[5] != 1:
        return False
    e_machine = struct.unpack_from("<H", b, 18)[0]
    phoff, = struct.unpack_from("<Q", b, 32)
    phentsize, phnum = struct.unpack_from("<HH", b, 54)
    interp = any(struct.unpack_from("<I", b, phoff + i * phentsize)[0] == 3
                 for i in range(phnum))
    return e_machine == machine and not interp


def test_everything_is_cold_in_an_empty_cache(cold):
    rows = cache_entries()
    assert rows and all(r["state"] == "cold" for r in rows), rows
    kernels = [r["what"] for r in rows if r["what"].startswith("kernel 6")]
    assert kernels == [f"kernel {s.name} {v}{a}" for s in kbuild.SOURCES.values()
                       for a in ("", " arm64") for v in s.variants]
    for s in kbuild.SOURCES.values():
        for v in s.variants:
            assert kbuild.find_kernel(v, s) is None and kbuild.find_kernel(v, s, "arm64") is None
    assert "guest root arm64" in {r["what"] for r in rows}


@pytest.mark.parametrize("build", [scenarios.workload_binary, selftests.mremap_selftest_binary],
                         ids=["workload", "mremap-selftest"])
def test_guest_program_builds_into_an_empty_cache(cold, build):
    p = build()
    assert p.is_relative_to(cold) and static_x86_64(p)
    name = {scenarios.workload_binary: "guest program ksmlens-workload",
            selftests.mremap_selftest_binary: "guest program ksm-mremap-migrate"}[build]
    assert {r["what"]: r["state"] for r in cache_entries()}[name] == "warm"
    mtime = p.stat().st_mtime_ns
    assert build() == p and p.stat().st_mtime_ns == mtime      # found, not rebuilt


def test_arm64_guest_programs_cross_build_into_an_empty_cache(cold):
    """The workload cross-built for the arm64 guest: a static aarch64 ELF of
    its own name, beside (not instead of) the x86-64 one."""
    p = scenarios.workload_binary(arch="arm64")
    assert p.is_relative_to(cold) and static_x86_64(p, EM_AARCH64), p
    states = {r["what"]: r["state"] for r in cache_entries()}
    assert states["guest program ksmlens-workload arm64"] == "warm"
    assert states["guest program ksmlens-workload"] == "cold"


def test_kernel_selftests_build_into_an_empty_cache(cold):
    """What ``ksmlens selftests`` does first on a fresh machine (about half a
    minute: the uAPI headers and two programs from Debian's source tarball)."""
    assert not selftests.selftests_built()
    bins = selftests.build_selftests(quiet=True)
    assert set(bins) == set(selftests.SUITES)
    for p in bins.values():
        assert p.is_relative_to(cold) and static_x86_64(p), p
    assert selftests.selftests_built()
    meta = json.loads((selftests.selftests_dir() / "meta.json").read_text())
    assert meta  # written last: its presence marks a complete build
    assert selftests.build_selftests(quiet=True) == bins        # a cache hit


def test_vm_cache_command_reports_cold_and_warm(cold):
    r = subprocess.run([sys.executable, "-m", "ksmlens", "vm", "cache", "--json"],
                       capture_output=True, text=True, check=True)
    rows = json.loads(r.stdout)
    assert rows == cache_entries()
    scenarios.workload_binary()
    r = subprocess.run([sys.executable, "-m", "ksmlens", "vm", "cache"],
                       capture_output=True, text=True, check=True)
    line = next(l for l in r.stdout.splitlines() if "ksmlens-workload" in l)
    assert line.split()[3] == "warm"
    assert r.stdout.strip().splitlines()[-1] == f"1 warm, {len(rows) - 1} cold"
