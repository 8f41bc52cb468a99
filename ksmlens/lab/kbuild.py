"""Build the lab's patched kernels from Debian's kernel sources: ``linux-source-6.12``
(the default) and ``linux-source-6.1`` (the LTS of Debian 12), one
:class:`Source` record each in :data:`SOURCES`.

Layout under the cache (see :mod:`ksmlens.lab.paths`)::

    src/<debversion>/           the extracted source (patched in place, per build)
    src/<debversion>.pristine/  pristine copies of every file a patch touches
    tree/<debversion>/          one shared ``make O=`` tree per source: variants differ
                                only in mm/ksm.c, so switching costs one file + link
    kernels/<variant>-<key>/    bzImage, vmlinux, config, meta.json, build.log
                                (the default source; another source's builds are
                                ``kernels/<source>-<variant>-<key>/``)
    tree/<debversion>-arm64/    arm64's tree (``--arch arm64``, cross-built with
                                Debian's gcc-aarch64-linux-gnu); its builds are
                                ``kernels/arm64-[<source>-]<variant>-<key>/`` with
                                ``Image`` for ``bzImage``

``<key>`` hashes the source's Debian version, the config fragment and the
variant's patches (their names and contents): change any of them and the
variant is rebuilt; otherwise it is found. Two sources never share a key (their
versions differ), and the default source's keys are those it had before there
were several sources. Another architecture's key also hashes its name and
its fragment (x86-64's keys are those from before there was arm64).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import X86_64, Arch, get_arch
# The variants live in the kernel layer (the lens reads them too); these
# names stay importable from here.
from ksmlens.kernel.variants import (DEFAULT_VARIANT, RELEASE_TAG, VARIANTS, Variant,  # noqa: F401
                                     get_variant, variant_of_release)
from ksmlens.lab.paths import cache_root, variants_root, vm_data

__all__ = ["VARIANTS", "DEFAULT_VARIANT", "Variant", "Kernel", "BuildLock", "get_variant",
           "Source", "SOURCES", "DEFAULT_SOURCE", "get_source", "default_variant", "patch_files",
           "fragments", "merged_lines", "kconfig_symbols", "unset_lines",
           "find_kernel", "build", "make", "configure", "Progress", "source_tarball", "source_version", "variant_of_release",
           "read_record", "find_own_kernel", "own_build_keys", "own_build_key", "own_kernel_dir",
           "publish_build", "require_tools"]

BUILD_FORMAT = 1  # bump when the build procedure changes what it produces


@dataclasses.dataclass(frozen=True)
class Source:
    """One kernel source the lab builds from.

    ``name``: str, what ``--kernel`` takes (``"6.12"``, ``"6.1"``).
    ``package``: the Debian package that installs ``tarball`` (``apt-get install``).
    ``tarball``: Path of the ``.tar.xz`` the package installs under ``/usr/src``.
    ``variants``: the variants that exist for this source (their patches apply),
    in :data:`~ksmlens.kernel.variants.VARIANTS` order.
    ``patch_dir``: a folder under ``vm/patches/`` holding this source's ports:
    ``vm/patches/<patch_dir>/<name>`` is used in place of ``vm/patches/<name>``
    where it exists ("" : none).
    ``config``: a second fragment under ``vm/config/`` merged after
    ``ksmlens.config`` for this source only ("" : none), for what the source's
    Kconfig needs beyond the shared fragment.
    """

    name: str
    package: str
    tarball: Path
    variants: tuple[str, ...]
    patch_dir: str = ""
    config: str = ""

    @property
    def prefix(self) -> str:
        """The build directories' prefix under ``kernels/``: "" for the default
        source (so its cache from before there were several sources stays
        valid), ``"<name>-"`` for another."""
        return "" if self.name == DEFAULT_SOURCE else f"{self.name}-"


DEFAULT_SOURCE = "6.12"
SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("6.12", "linux-source-6.12", Path("/usr/src/linux-source-6.12.tar.xz"),
           tuple(VARIANTS)),
    # 6.1 LTS: no SmartScan (6.7), so the union/v8 patches (which put the
    # stored index in a union with age/remaining_skips) do not apply; v3's
    # one-hunk change to rmap_walk_ksm() applies as it is (mm/ksm.c offset).
    # 6.1.config: 6.1's ZRAM depends on a crypto compressor (6.12 has its
    # own backends, ZRAM_BACKEND_LZO).
    Source("6.1", "linux-source-6.1", Path("/usr/src/linux-source-6.1.tar.xz"),
           ("stock", "v3"), patch_dir="6.1", config="6.1.config"),
]}
# kept for callers that name the default source's files
TARBALL = SOURCES[DEFAULT_SOURCE].tarball
PACKAGE = SOURCES[DEFAULT_SOURCE].package


def get_source(name: str | Source | None = None) -> Source:
    """The record of source ``name`` (None: the default); :class:`KsmlensError`
    naming the known ones."""
    if isinstance(name, Source):
        return name
    try:
        return SOURCES[name or DEFAULT_SOURCE]
    except KeyError:
        raise KsmlensError(f"unknown kernel source {name!r}",
                           f"choose one of {', '.join(SOURCES)}") from None


def default_variant(source: str | Source | None = None) -> str:
    """The variant a command builds or boots from ``source`` when none is named:
    :data:`DEFAULT_VARIANT` where it exists, else the source's first (6.1: stock)."""
    src = get_source(source)
    return DEFAULT_VARIANT if DEFAULT_VARIANT in src.variants else src.variants[0]


def _variant_of(variant: str, source: Source) -> Variant:
    v = get_variant(variant)
    if v.name not in source.variants:
        raise KsmlensError(f"variant {v.name!r} does not exist for {source.name} "
                           f"(its patches do not apply there)",
                           f"choose one of {', '.join(source.variants)} with --kernel {source.name}")
    return v


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A built kernel: ``bzimage`` is the boot image (``bzImage`` on x86-64,
    ``Image`` on arm64), ``arch`` an :data:`~ksmlens.kernel.arch.ARCHES` name."""

    variant: str
    release: str
    bzimage: Path
    vmlinux: Path
    config: Path
    key: str
    source: str = DEFAULT_SOURCE
    arch: str = X86_64.name

    @property
    def directory(self) -> Path:
        return self.bzimage.parent


def source_tarball(source: str | Source | None = None) -> Path:
    """The ``.tar.xz`` of kernel source ``source`` (a :data:`SOURCES` name or
    record, None: the default), as its Debian package installs it under
    ``/usr/src``. :class:`KsmlensError` naming the package to install when it
    is missing."""
    source = get_source(source)
    if not source.tarball.exists():
        raise KsmlensError(f"{source.tarball} not found ({source.package} is not installed)",
                           f"run `apt-get install {source.package}` (./setup.sh does it)")
    return source.tarball


def source_version(source: str | Source | None = None) -> str:
    """The Debian package version of the kernel source, e.g. 6.12.117-1~deb12u1
    (``source``: a :data:`SOURCES` name, None for the default)."""
    source = get_source(source)
    tarball = source_tarball(source)
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", source.package],
                             capture_output=True, text=True, check=True).stdout
        if out.strip():
            return out.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    st = tarball.stat()
    return f"tar-{st.st_size}-{int(st.st_mtime)}"


def _dirname(source: Source) -> str:
    """source_version() made safe for a path (make dislikes '~')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", source_version(source))


def _fragment() -> Path:
    return vm_data() / "config" / "ksmlens.config"


def fragments(source: str | Source | None = None, arch: str | Arch | None = None) -> list[Path]:
    """The config fragments merged over ``allnoconfig`` for ``source`` built
    for ``arch`` (None: x86-64), in order: the shared ``ksmlens.config``, the
    source's, the architecture's (``vm/config/arm64.config``). A later
    fragment's ``# CONFIG_X is not set`` drops an earlier ``CONFIG_X=y``, as
    ``merge_config.sh`` does."""
    src = get_source(source)
    out = [_fragment()]
    if src.config:
        out.append(vm_data() / "config" / src.config)
    a = get_arch(arch)
    if a.config:
        out.append(vm_data() / "config" / a.config)
    return out


def _fragments_bytes(source: Source, arch: Arch = X86_64) -> bytes:
    """What the key and the tree's stamp hash: the shared fragment alone for a
    source without its own (so the 6.12 keys did not change), else all."""
    frags = fragments(source, arch)
    if len(frags) == 1:
        return frags[0].read_bytes()
    return b"".join(f.name.encode() + b"\0" + f.read_bytes() for f in frags)


_NOT_SET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def merged_lines(frags: list[Path]) -> list[str]:
    """The ``CONFIG_X=...`` lines the fragments ask for, in order, after
    ``merge_config.sh``'s rule: a later fragment's value for a symbol (also
    ``# CONFIG_X is not set``) replaces an earlier one's."""
    want: dict[str, str] = {}
    for f in frags:
        for line in f.read_text().splitlines():
            m = _NOT_SET.match(line)
            if m:
                want.pop(m.group(1), None)
            elif line.startswith("CONFIG_") and "=" in line:
                sym = line.split("=", 1)[0]
                want.pop(sym, None)
                want[sym] = line
    return list(want.values())


_KCONFIG_SYMBOL = re.compile(r"^[ \t]*(?:menu)?config[ \t]+([A-Za-z0-9_]+)[ \t]*$", re.M)


def kconfig_symbols(src: Path, arch: str | Arch | None = None) -> set[str]:
    """Every symbol some ``Kconfig*`` file of the tree ``src`` defines
    (``config X`` / ``menuconfig X``), without the ``CONFIG_`` prefix; with
    ``arch``, only that architecture's ``arch/<srcarch>/`` of the ``arch/``
    folders (``CONFIG_PVH`` is x86's, absent on arm64)."""
    own = get_arch(arch).srcarch if arch is not None else None
    out: set[str] = set()
    for dirpath, dirs, names in os.walk(src):
        if own is not None and Path(dirpath) == Path(src) / "arch":
            dirs[:] = [d for d in dirs if d == own]
        for n in names:
            if n.startswith("Kconfig"):
                try:
                    out.update(_KCONFIG_SYMBOL.findall(
                        Path(dirpath, n).read_text(errors="replace")))
                except OSError:
                    pass
    return out


def unset_lines(config_text: str, fragment_lines: list[str], symbols: set[str] | None
                ) -> tuple[list[str], list[str]]:
    """The fragment's ``CONFIG_X=...`` lines a resolved ``.config`` lacks, split
    in two: (did not stick, absent from this source's Kconfig). A line whose
    symbol no Kconfig defines cannot stick and is not an error: the shared
    fragment names options of the newest source, e.g. ``ZRAM_BACKEND_LZO``
    (zram's own compression backends, 6.12) and ``VMCORE_INFO`` (split out of
    ``CRASH_CORE`` in 6.9, "crash: split vmcoreinfo exporting code out from
    crash_core.c"), which 6.1 does not have. ``symbols`` None: every line counts
    as existing."""
    have = set(config_text.splitlines())
    missing, absent = [], []
    for line in fragment_lines:
        if not line.startswith("CONFIG_") or line in have:
            continue
        sym = line.split("=", 1)[0][len("CONFIG_"):]
        (absent if symbols is not None and sym not in symbols else missing).append(line)
    return missing, absent


def _patch_path(name: str) -> Path:
    return vm_data() / "patches" / name


def patch_files(variant: Variant | str, source: str | Source | None = None) -> list[str]:
    """The patches of ``variant`` for ``source``, as paths relative to
    ``vm/patches/``: the source's port (``<patch_dir>/<name>``) where one
    exists, else the patch itself."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    src = get_source(source)
    out = []
    for p in v.patches:
        port = f"{src.patch_dir}/{p}" if src.patch_dir else ""
        out.append(port if port and _patch_path(port).exists() else p)
    return out


def artifact_key(variant: Variant, source: str | Source | None = None,
                 arch: str | Arch | None = None) -> str:
    src = get_source(source)
    a = get_arch(arch)
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT}\nsource={source_version(src)}\n".encode())
    if a is not X86_64:
        h.update(f"arch={a.name}\n".encode())
    h.update(_fragments_bytes(src, a))
    for p in patch_files(variant, src):
        h.update(p.encode() + b"\0" + _patch_path(p).read_bytes())
    return h.hexdigest()[:12]


def _kernel_dir(variant: Variant, key: str, source: Source, arch: Arch = X86_64) -> Path:
    return cache_root() / "kernels" / f"{arch.prefix}{source.prefix}{variant.name}-{key}"


def _tree_dir(source: Source, arch: Arch) -> Path:
    """The shared ``make O=`` tree of ``source`` for ``arch``."""
    return cache_root() / "tree" / (_dirname(source) + (f"-{arch.name}" if arch.prefix else ""))


def read_record(name: str) -> dict | None:
    """An own-tree variant's record, ``<cache>/variants/NAME.json``
    (:func:`ksmlens.lab.owntree.write_record`), or None."""
    p = variants_root() / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def own_build_keys(record: dict) -> dict[str, str]:
    """An own tree's builds from its record: architecture name -> key
    (``keys``; a record written before arm64 had only ``key``, x86-64's)."""
    keys = record.get("keys") or ({X86_64.name: record["key"]} if record.get("key") else {})
    return dict(keys)


def own_build_key(record: dict, arch: str | Arch | None = None) -> str | None:
    """The key of an own tree's build for ``arch`` (None: x86-64), or None."""
    return own_build_keys(record).get(get_arch(arch).name)


def own_kernel_dir(name: str, key: str, arch: str | Arch | None = None) -> Path:
    """``<cache>/kernels/[arm64-]NAME-KEY``: an own tree's build artifacts."""
    return cache_root() / "kernels" / f"{get_arch(arch).prefix}{name}-{key}"


def publish_build(tmp_out: Path, out: Path, stem: str) -> None:
    """Move a finished build from ``tmp_out`` to ``out`` and remove the
    builds it supersedes: ``out``'s siblings named ``STEM<key>`` (a key has
    no '-', so another source's or variant's names never match)."""
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    for old in out.parent.glob(f"{stem}*"):
        if old != out and not old.name.endswith(".tmp") and "-" not in old.name[len(stem):]:
            shutil.rmtree(old, ignore_errors=True)


def find_own_kernel(name: str, arch: str | Arch | None = None) -> Kernel | None:
    """The last build of own-tree variant ``name`` for ``arch`` (None:
    x86-64; its record's key for that architecture), as a :class:`Kernel`;
    None if it is not built (any more) for it. :class:`KsmlensError` for a
    name that is no variant at all."""
    get_variant(name)
    a = get_arch(arch)
    rec = read_record(name)
    key = own_build_key(rec, a) if rec else None
    if not key:
        return None
    d = own_kernel_dir(name, key, a)
    if not (d / "meta.json").exists():
        return None
    m = json.loads((d / "meta.json").read_text())
    return Kernel(name, m["release"], d / a.image, d / "vmlinux", d / "config", key,
                  rec.get("series", ""), a.name)


def require_tools(arch: str | Arch | None = None, extra: tuple[str, ...] = ()) -> None:
    """Refuse in one line, before any build starts, a missing build tool or
    ``arch``'s cross compiler (what to ``apt-get install``)."""
    a = get_arch(arch)
    for tool in ("make", "gcc", "flex", "bison", "bc", "patch", *extra):
        if not shutil.which(tool):
            raise KsmlensError(f"{tool} not found (needed to build the kernel)",
                               "run ./setup.sh, or apt-get install build-essential "
                               "flex bison bc patch libelf-dev libssl-dev"
                               + "".join(f" {t}" for t in extra))
    if a.gcc != "gcc" and not shutil.which(a.gcc):
        raise KsmlensError(f"{a.gcc} not found (the {a.name} cross compiler)",
                           f"run `apt-get install {a.cross_package}` (./setup.sh does it)")


def find_kernel(variant: str = DEFAULT_VARIANT, source: str | Source | None = None,
                arch: str | Arch | None = None) -> Kernel | None:
    """The built kernel of ``variant`` from ``source`` (a :data:`SOURCES` name,
    None: the default) for ``arch`` (None: x86-64) for the current source
    version, config and patches; None if it is not built.
    :class:`KsmlensError` for a variant that does not exist for that source."""
    if variant not in VARIANTS:      # an own tree (vm build --source): its record says
        return find_own_kernel(variant, arch)
    src = get_source(source)
    a = get_arch(arch)
    v = _variant_of(variant, src)
    key = artifact_key(v, src, a)
    d = _kernel_dir(v, key, src, a)
    meta = d / "meta.json"
    if not meta.exists():
        return None
    m = json.loads(meta.read_text())
    return Kernel(v.name, m["release"], d / a.image, d / "vmlinux", d / "config", key,
                  src.name, a.name)


class BuildLock:
    """An exclusive flock on ``path`` for the length of a ``with``: a second
    build of the same cache waits, and says it does."""

    def __init__(self, path: Path, what: str = "build"):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")
        self.what = what

    def __enter__(self):
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"ksmlens: waiting for another {self.what} ({self.f.name})", file=sys.stderr)
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _all_patched_files(source: Source) -> set[str]:
    files = set()
    for name in source.variants:
        for p in patch_files(name, source):
            for line in _patch_path(p).read_text().splitlines():
                if line.startswith("+++ "):
                    files.add(line[4:].split("\t")[0].split("/", 1)[1])
    return files


def _source_tree(source: Source, log) -> Path:
    ver = _dirname(source)
    src = cache_root() / "src" / ver
    pristine = cache_root() / "src" / f"{ver}.pristine"
    if not (src / "Makefile").exists():
        tmp = cache_root() / "src" / f"{ver}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"extracting {source.tarball} ({ver})")
        subprocess.run(["tar", "xJf", str(source_tarball(source)), "-C", str(tmp)], check=True)
        (top,) = list(tmp.iterdir())
        shutil.rmtree(src, ignore_errors=True)
        top.rename(src)
        shutil.rmtree(tmp)
        shutil.rmtree(pristine, ignore_errors=True)
    for rel in _all_patched_files(source):
        dst = pristine / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst)
    return src


def _apply_patches(src: Path, variant: Variant, source: Source, log) -> None:
    ver = _dirname(source)
    pristine = cache_root() / "src" / f"{ver}.pristine"
    for rel in _all_patched_files(source):
        want = (pristine / rel).read_bytes()
        if (src / rel).read_bytes() != want:
            (src / rel).write_bytes(want)  # new mtime: make rebuilds it
    for p in patch_files(variant, source):
        log(f"applying {p}")
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(_patch_path(p))],
                           cwd=src, capture_output=True, text=True)
        if r.returncode:
            raise KsmlensError(f"patch {p} does not apply to {ver}: "
                               f"{(r.stdout + r.stderr).strip().splitlines()[-1]}",
                               f"refresh the patch against this source (a port goes in "
                               f"vm/patches/{source.patch_dir or source.name}/)")
    _stamp = src / ".ksmlens-variant"
    _stamp.write_text(variant.name)


def make(src: Path, tree: Path, args: list[str], logf, progress=None,
         arch: str | Arch | None = None) -> None:
    """``make O=tree ARCH=<arch> [CROSS_COMPILE=...] ARGS`` in the source
    ``src`` (``arch`` None: x86-64), its output into the open log ``logf``
    (and each line to ``progress``, a :class:`Progress`, if given).
    :class:`KsmlensError` with the first error line on failure. Used by
    :func:`build` and :func:`ksmlens.lab.owntree.build_own`."""
    cmd = ["make", f"O={tree}", *get_arch(arch).make_args()] + args
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    proc = subprocess.Popen(cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    tail = []
    for line in proc.stdout:
        logf.write(line)
        tail.append(line.rstrip("\n"))
        del tail[:-200]
        if progress:
            progress(line)
    if proc.wait():
        errors = [l for l in tail if re.search(r"\berror\b|Error \d|undefined reference", l)]
        first = errors[0] if errors else (tail[-1] if tail else "make failed")
        raise KsmlensError(f"kernel build failed: {first.strip()}",
                           f"full log: {logf.name}")


def configure(src: Path, tree: Path, source: Source, logf, log,
              arch: str | Arch | None = None) -> None:
    """(Re)create tree/.config from allnoconfig + our fragments for ``arch``
    (None: x86-64); verify that every line stuck (or names a symbol this
    source does not define for that architecture)."""
    a = get_arch(arch)
    frags = fragments(source, a)
    want = _fragments_bytes(source, a)
    stamp = tree / ".ksmlens-fragment"
    if stamp.exists() and stamp.read_bytes() == want and (tree / ".config").exists():
        return
    log(f"configuring (allnoconfig + {' + '.join('vm/config/' + f.name for f in frags)})")
    tree.mkdir(parents=True, exist_ok=True)
    make(src, tree, ["allnoconfig"], logf, arch=a)
    r = subprocess.run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(tree),
                        str(tree / ".config"), *map(str, frags)], cwd=src,
                       capture_output=True, text=True)
    logf.write(r.stdout + r.stderr)
    if r.returncode:
        raise KsmlensError("merging the config fragment failed", f"see {logf.name}")
    make(src, tree, ["olddefconfig"], logf, arch=a)
    missing, absent = unset_lines((tree / ".config").read_text(), merged_lines(frags),
                                  kconfig_symbols(src, a if a is not X86_64 else None))
    if absent:
        logf.write(f"ksmlens: not in this source's Kconfig (skipped): {', '.join(absent)}\n")
    if missing:
        raise KsmlensError(f"config options did not stick: {', '.join(missing)}",
                           "add their dependencies to vm/config/"
                           + (a.config or source.config or "ksmlens.config"))
    stamp.write_bytes(want)


class Progress:
    """Counts compiled objects of a :func:`make`; prints a line now and then
    (stderr): every second on a terminal, every 30 s otherwise."""

    def __init__(self, name: str, expected: int | None, stream=sys.stderr):
        self.name, self.expected, self.stream = name, expected, stream
        self.count, self.start, self.last = 0, time.monotonic(), 0.0
        self.tty = stream.isatty()

    def __call__(self, line: str) -> None:
        if line.startswith("  CC ") or line.startswith("  AS "):
            self.count += 1
        now = time.monotonic()
        if now - self.last >= (1 if self.tty else 30):
            self.last = now
            self.show(line.strip())

    def show(self, what: str = "", end: bool = False) -> None:
        el = time.monotonic() - self.start
        pct = f" ~{min(99, 100 * self.count // self.expected)}%" if self.expected else ""
        msg = (f"ksmlens: build {self.name}: {self.count} objects{pct}, "
               f"{int(el) // 60}m{int(el) % 60:02d}s  {what[:50]}")
        if self.tty:
            self.stream.write("\r\033[K" + msg + ("\n" if end else ""))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


def build(variant: str = DEFAULT_VARIANT, *, source: str | Source | None = None,
          force: bool = False, jobs: int | None = None, quiet: bool = False,
          arch: str | Arch | None = None) -> Kernel:
    """Build ``variant`` from ``source`` (a :data:`SOURCES` name, None: the
    default) for ``arch`` (None: x86-64; arm64 is cross-built with Debian's
    ``gcc-aarch64-linux-gnu``) or find it in the cache, and return its
    :class:`Kernel`. :class:`KsmlensError` for a variant the source does not
    have, a missing package or cross compiler, a patch that does not apply or
    a failed build."""
    if variant not in VARIANTS:      # an own tree is built by owntree.build_own(DIR, ...)
        k = find_kernel(variant, arch=arch)
        if k is None:
            a = get_arch(arch)
            flag = f" --arch {a.name}" if a is not X86_64 else ""
            raise KsmlensError(f"own-tree variant {variant!r} is not built"
                               + (f" for {a.name}" if flag else ""),
                               f"run `ksmlens vm build --source DIR --variant {variant}{flag}`")
        return k
    src_rec = get_source(source)
    a = get_arch(arch)
    v = _variant_of(variant, src_rec)
    if not force:
        k = find_kernel(variant, src_rec, a)
        if k:
            return k

    def log(msg):
        if not quiet:
            print(f"ksmlens: {msg}", file=sys.stderr, flush=True)

    require_tools(a)
    key = artifact_key(v, src_rec, a)
    root = cache_root()
    with BuildLock(root / "build.lock"):
        src = _source_tree(src_rec, log)
        tree = _tree_dir(src_rec, a)
        tree.mkdir(parents=True, exist_ok=True)
        out = _kernel_dir(v, key, src_rec, a)
        tmp_out = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        t0 = time.monotonic()
        with open(tmp_out / "build.log", "w", buffering=1) as logf:
            _apply_patches(src, v, src_rec, log)
            configure(src, tree, src_rec, logf, log, a)
            counts = tree / ".ksmlens-objcount"
            expected = int(counts.read_text()) if counts.exists() else None
            prog = None if quiet else Progress(a.prefix + v.name, expected)
            localversion = f"LOCALVERSION=-{v.name}"
            jobs = jobs or (os.cpu_count() or 1) + 1
            log(f"building {src_rec.name} {v.name} for {a.name} in {tree} "
                f"(log: {out}/build.log)")
            make(src, tree, [f"-j{jobs}", localversion, a.image], logf, prog, a)
            if prog:
                prog.show("done", end=True)
                if prog.count > 500:
                    counts.write_text(str(prog.count))
            release = subprocess.run(
                ["make", "-s", f"O={tree}", *a.make_args(), localversion, "kernelrelease"],
                cwd=src, capture_output=True, text=True, check=True).stdout.strip()
        shutil.copy2(tree / a.image_path, tmp_out / a.image)
        shutil.copy2(tree / "vmlinux", tmp_out / "vmlinux")
        shutil.copy2(tree / ".config", tmp_out / "config")
        meta = {"variant": v.name, "release": release, "key": key, "arch": a.name,
                "source": source_version(src_rec), "source_name": src_rec.name,
                "patches": patch_files(v, src_rec),
                "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp_out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        # superseded builds of this variant from this source (another source's
        # names start with its own prefix)
        publish_build(tmp_out, out, f"{a.prefix}{src_rec.prefix}{v.name}-")
        log(f"built {release} in {meta['build_seconds']}s: {out}")
    k = find_kernel(variant, src_rec, a)
    assert k is not None
    return k
