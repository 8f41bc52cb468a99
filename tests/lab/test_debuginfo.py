"""The vmlinux search for /proc/kcore and vmcores (ksmlens.lab.debuginfo), on
synthetic ELF files carrying GNU build-ID notes: the order (lab builds of the
release, the standard paths, the .build-id path) and the build-ID match."""

import json
import os
import struct
import types

import pytest

from ksmlens.errors import KsmlensError
from ksmlens.lab.debuginfo import (elf_build_id, find_vmlinux, lab_vmlinuxes,
                                   standard_vmlinuxes, vmlinux_candidates)

RELEASE = "6.12.117-ksmlens-union"


def make_elf(path, build_id: bytes | None, *, extra_note: bool = True) -> None:
    """A minimal ELF64 little-endian file: a null section, an unrelated note
    (NT_GNU_ABI_TAG) and, unless ``build_id`` is None, an NT_GNU_BUILD_ID note."""
    def note(ntype, name, desc):
        name += b"\0"
        pad = lambda b: b + b"\0" * (-len(b) % 4)
        return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)
    notes = []
    if extra_note:
        notes.append(note(1, b"GNU", struct.pack("<IIII", 0, 3, 2, 0)))
    if build_id is not None:
        notes.append(note(3, b"GNU", build_id))
    data = b"".join(notes)
    shoff = 64 + len(data)
    ehdr = bytearray(64)
    ehdr[:16] = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    struct.pack_into("<HHI", ehdr, 16, 2, 62, 1)             # ET_EXEC, x86-64
    struct.pack_into("<Q", ehdr, 0x28, shoff)
    struct.pack_into("<HHHHHH", ehdr, 0x34, 64, 0, 0, 64, 2, 0)
    sh_null = bytes(64)
    sh_note = struct.pack("<IIQQQQIIQQ", 0, 7, 2, 0, 64, len(data), 0, 0, 4, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(ehdr) + data + sh_null + sh_note)


def lab_build(cache, name, release, build_id, mtime):
    d = cache / "kernels" / name
    make_elf(d / "vmlinux", build_id)
    (d / "meta.json").write_text(json.dumps({"release": release}))
    os.utime(d / "meta.json", (mtime, mtime))
    return d / "vmlinux"


BID = bytes.fromhex("9f22d51840fab1c822c05eada97a24e5678ada3f")
OTHER = bytes.fromhex("c67dd1f8a806eef594605eb148ffcf0c08b70d08")


def test_elf_build_id(tmp_path):
    make_elf(tmp_path / "a", BID)
    make_elf(tmp_path / "b", None)
    (tmp_path / "c").write_bytes(b"not an ELF file at all" * 4)
    assert elf_build_id(tmp_path / "a") == BID
    assert elf_build_id(tmp_path / "b") is None
    assert elf_build_id(tmp_path / "c") is None


def test_candidates_order(tmp_path):
    cache, root = tmp_path / "cache", tmp_path / "root"
    old = lab_build(cache, "union-old", RELEASE, OTHER, 1000)
    new = lab_build(cache, "union-new", RELEASE, BID, 2000)
    lab_build(cache, "stock-x", "6.12.117-ksmlens-stock", BID, 3000)
    got = vmlinux_candidates(RELEASE, BID, cache=cache, root=root)
    h = BID.hex()
    assert got == [
        ("lab", new), ("lab", old),              # (a) this release only, newest first
        ("standard", root / f"usr/lib/debug/boot/vmlinux-{RELEASE}"),
        ("standard", root / f"usr/lib/debug/lib/modules/{RELEASE}/vmlinux"),
        ("standard", root / f"lib/modules/{RELEASE}/build/vmlinux"),
        ("standard", root / f"boot/vmlinux-{RELEASE}"),
        ("standard", root / f"usr/lib/debug/.build-id/{h[:2]}/{h[2:]}.debug"),
    ]
    # a vmcore: release unknown, every lab build, only the build-ID path
    assert [p for _, p in vmlinux_candidates(None, BID, cache=cache, root=root)][:3] == \
        lab_vmlinuxes(None, cache)
    assert len(lab_vmlinuxes(None, cache)) == 3
    assert standard_vmlinuxes(None, None, root) == []


def test_find_lab_build_by_build_id(tmp_path):
    cache, root = tmp_path / "cache", tmp_path / "root"
    wrong = lab_build(cache, "union-new", RELEASE, OTHER, 2000)    # newer, other build
    right = lab_build(cache, "union-old", RELEASE, BID, 1000)
    make_elf(root / f"boot/vmlinux-{RELEASE}", BID)                # would match too, later
    path, tried = find_vmlinux(RELEASE, BID, cache=cache, root=root)
    assert path == right
    assert tried == [{"source": "lab", "path": str(wrong), "build_id": OTHER.hex()},
                     {"source": "lab", "path": str(right), "build_id": BID.hex()}]


def test_find_standard_paths_in_order(tmp_path):
    cache, root = tmp_path / "cache", tmp_path / "root"
    lab_build(cache, "union-x", RELEASE, OTHER, 1000)
    make_elf(root / f"lib/modules/{RELEASE}/build/vmlinux", None)          # no build ID
    make_elf(root / f"usr/lib/debug/lib/modules/{RELEASE}/vmlinux", OTHER)  # other build
    boot = root / f"boot/vmlinux-{RELEASE}"
    make_elf(boot, BID)
    h = BID.hex()
    make_elf(root / f"usr/lib/debug/.build-id/{h[:2]}/{h[2:]}.debug", BID)
    path, tried = find_vmlinux(RELEASE, BID, cache=cache, root=root)
    assert path == boot
    assert [(t["source"], t["build_id"]) for t in tried] == [
        ("lab", OTHER.hex()), ("standard", OTHER.hex()), ("standard", None),
        ("standard", BID.hex())]
    boot.unlink()
    path, _ = find_vmlinux(RELEASE, BID, cache=cache, root=root)
    assert path == root / f"usr/lib/debug/.build-id/{h[:2]}/{h[2:]}.debug"


def test_nothing_matches(tmp_path):
    cache, root = tmp_path / "cache", tmp_path / "root"
    lab_build(cache, "union-x", RELEASE, OTHER, 1000)
    path, tried = find_vmlinux(RELEASE, BID, cache=cache, root=root)
    assert path is None and [t["build_id"] for t in tried] == [OTHER.hex()]
    path, tried = find_vmlinux("6.1.0-other", BID, cache=cache, root=root)
    assert path is None and tried == []


def _fake_prog(flags):
    return types.SimpleNamespace(flags=flags, cache={})


def test_kcore_walk_mode_is_live_and_said_once(capsys, monkeypatch):
    import argparse
    from drgn import ProgramFlags

    import ksmlens.cli.common as common
    from ksmlens.lab.host import is_kcore
    monkeypatch.setattr(common, "_said_kcore", False)
    kcore = _fake_prog(ProgramFlags.IS_LINUX_KERNEL | ProgramFlags.IS_LIVE
                       | ProgramFlags.IS_LOCAL)
    qmp = _fake_prog(ProgramFlags.IS_LINUX_KERNEL | ProgramFlags.IS_LIVE)
    core = _fake_prog(ProgramFlags.IS_LINUX_KERNEL)
    assert is_kcore(kcore) and not is_kcore(qmp) and not is_kcore(core)
    assert common.walk_mode(argparse.Namespace(mode=None), qmp) == "consistent"
    assert common.walk_mode(argparse.Namespace(mode="live"), qmp) == "live"
    assert capsys.readouterr().err == ""
    assert common.walk_mode(argparse.Namespace(mode=None), kcore) == "live"
    assert common.walk_mode(argparse.Namespace(), kcore) == "live"
    err = capsys.readouterr().err
    assert err.count("nothing can pause it") == 1 and "/sys/kernel/mm/ksm/run" in err
    with pytest.raises(KsmlensError, match="nothing can pause it"):
        common.walk_mode(argparse.Namespace(mode="consistent"), kcore)


def test_local_kernel_reads_like_the_agent(tmp_path):
    from ksmlens.lab.host import LocalKernel
    (tmp_path / "b").write_text("2\n")
    (tmp_path / "a").write_text("1\n")
    k = LocalKernel()
    got = k.read_files(paths=[str(tmp_path / "gone")], globs=[str(tmp_path / "*")])
    assert list(got) == [str(tmp_path / "gone"), str(tmp_path / "a"), str(tmp_path / "b")]
    assert got[str(tmp_path / "gone")] is None and got[str(tmp_path / "b")] == "2\n"
    assert k.run(["/bin/sh", "-c", "echo hi; exit 3"]).rc == 3
