"""The running kernel's vmlinux, found without naming it, matched by build ID.

For ``/proc/kcore`` (``attach("/proc/kcore")``, a plain ``drgn`` with the
ksmlens plugin) and for vmcores, ksmlens adds one debug-info finder to drgn's
own (:meth:`drgn.Program.register_debug_info_finder`, named ``ksmlens``,
enabled first). The kernel's build ID comes from drgn
(``prog.main_module().build_id``: the ``BUILD-ID`` line of vmcoreinfo, or
``/sys/kernel/notes`` for the running kernel), and a file is used only if its
GNU build ID note is that one (:meth:`drgn.Module.try_file` checks it too).
The order, first match wins (``R`` is ``uname -r``):

(a) the lab's builds: ``<cache>/kernels/*/vmlinux`` whose ``meta.json``
    ``release`` is ``R`` (``$KSMLENS_CACHE``, default ``~/.cache/ksmlens``;
    a lab guest sees the host's cache read-only), newest build first;
(b) the standard paths distributions install debug info at and drgn looks in:
    ``/usr/lib/debug/boot/vmlinux-R``, ``/usr/lib/debug/lib/modules/R/vmlinux``,
    ``/lib/modules/R/build/vmlinux``, ``/boot/vmlinux-R``,
    ``/usr/lib/debug/.build-id/xx/yyyy.debug``;
(c) then drgn's own enabled finders (``standard``, ``debuginfod`` where
    enabled: ``prog.enabled_debug_info_finders()``), through
    :meth:`drgn.Program.load_debug_info`.

Nothing found, or only files of another build, is refused in one line
(:class:`~ksmlens.errors.KsmlensError`) saying what was tried and what to do:
install the kernel's debug package or pass ``--vmlinux``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from drgn import MissingDebugInfoError, ModuleFileStatus, Program, ProgramFlags

from ksmlens.errors import KsmlensError

__all__ = ["FINDER", "elf_arch", "elf_build_id", "lab_vmlinuxes", "standard_vmlinuxes",
           "vmlinux_candidates", "find_vmlinux", "register_finder", "load_kernel_debug_info",
           "kernel_release", "DEBUG_PACKAGE_HINT"]

FINDER = "ksmlens"
DEBUG_DIR = "/usr/lib/debug"
DEBUG_PACKAGE_HINT = ("install your kernel's debug info (Debian: linux-image-{r}-dbg; "
                      "Ubuntu: linux-image-{r}-dbgsym; Fedora: kernel-debuginfo-{r}) or pass "
                      "--vmlinux with your build's vmlinux")


# e_machine of the architectures ksmlens reads (include/uapi/linux/elf-em.h)
_EM = {62: "x86_64", 183: "arm64"}


def elf_arch(path) -> str | None:
    """The architecture an ELF file is for: ``"x86_64"``, ``"arm64"``,
    ``"e_machine N"`` for another, None when it is not ELF. Raises OSError if
    the file cannot be read."""
    import struct
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)[0]
    return _EM.get(machine, f"e_machine {machine}")


def _platform_arch(prog: Program) -> str | None:
    import drgn
    if prog.platform is None:
        return None
    return {drgn.Architecture.X86_64: "x86_64", drgn.Architecture.AARCH64: "arm64"}.get(
        prog.platform.arch, prog.platform.arch.name.lower())


def elf_build_id(path) -> bytes | None:
    """The GNU build ID note (``NT_GNU_BUILD_ID``) of an ELF64 little-endian
    file (a vmlinux, a ``.debug`` file), or None when it is not ELF64 or has
    none. Raises OSError if the file cannot be read."""
    import struct
    with open(path, "rb") as f:
        ehdr = f.read(64)
        if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
            return None
        shoff, = struct.unpack_from("<Q", ehdr, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", ehdr, 0x3A)
        f.seek(shoff)
        shdrs = f.read(shentsize * shnum)
        for i in range(shnum):
            sh_type, = struct.unpack_from("<I", shdrs, i * shentsize + 4)
            if sh_type != 7:  # SHT_NOTE
                continue
            off, size = struct.unpack_from("<QQ", shdrs, i * shentsize + 0x18)
            f.seek(off)
            data = f.read(size)
            pos = 0
            while pos + 12 <= len(data):
                namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
                name = data[pos + 12:pos + 12 + namesz]
                dpos = pos + 12 + ((namesz + 3) & ~3)
                if ntype == 3 and name.rstrip(b"\0") == b"GNU":   # NT_GNU_BUILD_ID
                    return data[dpos:dpos + descsz]
                pos = dpos + ((descsz + 3) & ~3)
    return None


def lab_vmlinuxes(release: str | None, cache: Path | None = None) -> list[Path]:
    """(a): the lab's built vmlinux files whose ``meta.json`` names ``release``
    (every build when ``release`` is None: a vmcore's release is not known
    before its debug info), newest ``meta.json`` first."""
    if cache is None:
        from ksmlens.lab.paths import cache_root
        cache = cache_root()
    found = []
    for meta in (Path(cache) / "kernels").glob("*/meta.json"):
        try:
            m = json.loads(meta.read_text())
            mtime = meta.stat().st_mtime
        except (OSError, ValueError):
            continue
        if release is None or m.get("release") == release:
            found.append((mtime, meta.parent / "vmlinux"))
    return [p for _, p in sorted(found, key=lambda t: (-t[0], str(t[1])))]


def standard_vmlinuxes(release: str | None, build_id: bytes | None,
                       root: str | Path = "/") -> list[Path]:
    """(b): where distributions put a kernel's debug info and drgn's standard
    finder looks (the release paths only when ``release`` is known; the
    build-ID path only when ``build_id`` is)."""
    root = Path(root)
    debug = root / DEBUG_DIR.lstrip("/")
    out = []
    if release:
        out += [debug / "boot" / f"vmlinux-{release}",
                debug / "lib" / "modules" / release / "vmlinux",
                root / "lib" / "modules" / release / "build" / "vmlinux",
                root / "boot" / f"vmlinux-{release}"]
    if build_id:
        h = build_id.hex()
        out.append(debug / ".build-id" / h[:2] / f"{h[2:]}.debug")
    return out


def vmlinux_candidates(release: str | None, build_id: bytes | None, *,
                       cache: Path | None = None, root: str | Path = "/") -> list[tuple[str, Path]]:
    """Every path (a) then (b) would try, as ``("lab" | "standard", path)``,
    whether it exists or not, without duplicates."""
    out, seen = [], set()
    for src, paths in (("lab", lab_vmlinuxes(release, cache)),
                       ("standard", standard_vmlinuxes(release, build_id, root))):
        for p in paths:
            if p not in seen:
                seen.add(p)
                out.append((src, p))
    return out


def find_vmlinux(release: str | None, build_id: bytes, *, cache: Path | None = None,
                 root: str | Path = "/") -> tuple[Path | None, list[dict]]:
    """The first candidate (:func:`vmlinux_candidates`) whose build ID is
    ``build_id``, and what was tried: ``[{"source", "path", "build_id"}]`` for
    every candidate that exists (``build_id`` hex, or None: no note)."""
    tried = []
    for src, p in vmlinux_candidates(release, build_id, cache=cache, root=root):
        try:
            bid = elf_build_id(p) if p.is_file() else False
        except OSError:
            bid = False
        if bid is False:
            continue
        tried.append({"source": src, "path": str(p), "build_id": bid.hex() if bid else None})
        if bid == build_id:
            return p, tried
    return None, tried


def kernel_release(prog: Program) -> str | None:
    """The release to search for: ``uname -r`` for the local running kernel
    (/proc/kcore), else None (a vmcore: only build IDs are searched)."""
    if prog.flags & ProgramFlags.IS_LOCAL:
        return os.uname().release
    return None


def _finder(prog: Program):
    def find(modules) -> None:
        for m in modules:
            if not (prog.flags & ProgramFlags.IS_LINUX_KERNEL) or m.name != "kernel" \
                    or not m.wants_debug_file() or not m.build_id:
                continue
            path, tried = find_vmlinux(kernel_release(prog), m.build_id)
            prog.cache["ksmlens_vmlinux_tried"] = tried
            if path is not None:
                m.try_file(str(path))
                if m.debug_file_status == ModuleFileStatus.HAVE:
                    prog.cache["ksmlens_vmlinux"] = {"path": str(path),
                                                     "source": tried[-1]["source"]}
    return find


def register_finder(prog: Program) -> None:
    """Add the ``ksmlens`` finder ((a), (b)) to ``prog`` before drgn's own,
    once (drgn then runs it in every debug-info search of ``prog``)."""
    if FINDER not in prog.registered_debug_info_finders():
        prog.register_debug_info_finder(FINDER, _finder(prog), enable_index=0)


@contextlib.contextmanager
def _drgn_quiet():
    """Keep drgn's own warnings ("missing debugging symbols ...", "provided
    file ... did not match") off stderr while ksmlens searches: its one-line
    error says what was tried. Yields the records drgn logged."""
    log = logging.getLogger("drgn")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    h, propagate = Keep(), log.propagate
    log.addHandler(h)
    log.propagate = False
    try:
        yield records
    finally:
        log.removeHandler(h)
        log.propagate = propagate


def load_kernel_debug_info(prog: Program, vmlinux=None, *, what: str = "the kernel") -> str:
    """Load the kernel's debug info into ``prog`` and return the vmlinux used.

    ``vmlinux`` None: the search of the module doc ((a), (b), then drgn's
    enabled finders); given: that file, refused unless its build ID is the
    kernel's. Only the main module (vmlinux) is required: KSM is built in
    (``CONFIG_KSM`` is a bool), loadable modules without debug info are left.
    Raises :class:`KsmlensError` in one line: no file found (what was tried),
    a file of another build, a file that is not an ELF vmlinux.
    """
    release = kernel_release(prog)
    hint = DEBUG_PACKAGE_HINT.format(r=release or "RELEASE")
    if vmlinux is not None:
        vmlinux = Path(vmlinux)
        if not vmlinux.is_file():
            raise KsmlensError(f"vmlinux {vmlinux} does not exist",
                               "give the path of the running kernel's unstripped vmlinux")
        have = elf_build_id(vmlinux)
        if have is None:
            raise KsmlensError(f"{vmlinux} has no build ID: not an ELF vmlinux",
                               "give the unstripped vmlinux from the kernel build")
        file_arch, kernel_arch = elf_arch(vmlinux), _platform_arch(prog)
        if file_arch and kernel_arch and file_arch != kernel_arch:
            raise KsmlensError(f"{vmlinux} is an {file_arch} vmlinux; {what} is {kernel_arch}",
                               f"pass the vmlinux of the {kernel_arch} build "
                               "(`ksmlens vm status` names a lab guest's)")
        saved = prog.enabled_debug_info_finders()
        prog.set_enabled_debug_info_finders([])
        try:
            with _drgn_quiet():
                prog.load_debug_info([str(vmlinux)], main=True)
        except MissingDebugInfoError:
            pass
        finally:
            prog.set_enabled_debug_info_finders(saved)
        main = prog.main_module()
        if main.debug_file_status != ModuleFileStatus.HAVE:
            want = main.build_id.hex() if main.build_id else "unknown"
            raise KsmlensError(f"{vmlinux} is not the vmlinux of {what} (build ID "
                               f"{have.hex()[:12]}…, the kernel's {want[:12]}…)",
                               "pass the vmlinux of the running build, or leave --vmlinux "
                               "out to search for it; " + hint)
        return str(vmlinux)
    register_finder(prog)
    try:
        with _drgn_quiet():
            prog.load_debug_info(main=True)
    except MissingDebugInfoError:
        pass
    main = prog.main_module()
    if main.debug_file_status == ModuleFileStatus.HAVE:
        return main.debug_file_path
    want = main.build_id.hex() if main.build_id else None
    tried = prog.cache.get("ksmlens_vmlinux_tried") or []
    wrong = [t for t in tried if t["build_id"] != want]
    if wrong:
        cause = (f"no vmlinux for {what} (build ID {(want or '?')[:12]}…): "
                 + ", ".join(f"{t['path']} is build {(t['build_id'] or 'none')[:12]}…"
                             for t in wrong[:3]))
    else:
        cause = (f"no vmlinux for {what} (build ID {(want or '?')[:12]}…) in the lab's "
                 f"builds, {DEBUG_DIR}, /boot, /lib/modules/{release or 'RELEASE'} or "
                 f"drgn's finders ({', '.join(prog.enabled_debug_info_finders())})")
    raise KsmlensError(cause, hint)
