"""Build the lab's patched 6.12 kernels from Debian's ``linux-source-6.12``.

Layout under the cache (see :mod:`ksmlens.lab.paths`)::

    src/<debversion>/           the extracted source (patched in place, per build)
    src/<debversion>.pristine/  pristine copies of every file a patch touches
    tree/<debversion>/          one shared ``make O=`` tree: variants differ only
                                in mm/ksm.c, so switching costs one file + link
    kernels/<variant>-<key>/    bzImage, vmlinux, config, meta.json, build.log

``<key>`` hashes the source version, the config fragment and the variant's
patches: change any of them and the variant is rebuilt; otherwise it is found.
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
# The variants live in the kernel layer (the lens reads them too); these
# names stay importable from here.
from ksmlens.kernel.variants import (DEFAULT_VARIANT, RELEASE_TAG, VARIANTS, Variant,  # noqa: F401
                                     get_variant, variant_of_release)
from ksmlens.lab.paths import cache_root, vm_data

__all__ = ["VARIANTS", "DEFAULT_VARIANT", "Variant", "Kernel", "BuildLock", "get_variant",
           "find_kernel", "build", "source_version", "variant_of_release"]

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
PACKAGE = "linux-source-6.12"
BUILD_FORMAT = 1  # bump when the build procedure changes what it produces


@dataclasses.dataclass(frozen=True)
class Kernel:
    variant: str
    release: str
    bzimage: Path
    vmlinux: Path
    config: Path
    key: str

    @property
    def directory(self) -> Path:
        return self.bzimage.parent


def _need_tarball() -> Path:
    if not TARBALL.exists():
        raise KsmlensError(f"{TARBALL} not found ({PACKAGE} is not installed)",
                           f"run `apt-get install {PACKAGE}` (./setup.sh does it)")
    return TARBALL


def source_version() -> str:
    """The Debian package version of the kernel source, e.g. 6.12.117-1~deb12u1."""
    tarball = _need_tarball()
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE],
                             capture_output=True, text=True, check=True).stdout
        if out.strip():
            return out.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    st = tarball.stat()
    return f"tar-{st.st_size}-{int(st.st_mtime)}"


def _dirname() -> str:
    """source_version() made safe for a path (make dislikes '~')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", source_version())


def _fragment() -> Path:
    return vm_data() / "config" / "ksmlens.config"


def _patch_path(name: str) -> Path:
    return vm_data() / "patches" / name


def artifact_key(variant: Variant) -> str:
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT}\nsource={source_version()}\n".encode())
    h.update(_fragment().read_bytes())
    for p in variant.patches:
        h.update(p.encode() + b"\0" + _patch_path(p).read_bytes())
    return h.hexdigest()[:12]


def _kernel_dir(variant: Variant, key: str) -> Path:
    return cache_root() / "kernels" / f"{variant.name}-{key}"


def find_kernel(variant: str = DEFAULT_VARIANT) -> Kernel | None:
    """The built kernel of ``variant`` for the current source/config/patches."""
    v = get_variant(variant)
    key = artifact_key(v)
    d = _kernel_dir(v, key)
    meta = d / "meta.json"
    if not meta.exists():
        return None
    m = json.loads(meta.read_text())
    return Kernel(v.name, m["release"], d / "bzImage", d / "vmlinux", d / "config", key)


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


def _all_patched_files() -> set[str]:
    files = set()
    for v in VARIANTS.values():
        for p in v.patches:
            for line in _patch_path(p).read_text().splitlines():
                if line.startswith("+++ "):
                    files.add(line[4:].split("\t")[0].split("/", 1)[1])
    return files


def _source_tree(log) -> Path:
    ver = _dirname()
    src = cache_root() / "src" / ver
    pristine = cache_root() / "src" / f"{ver}.pristine"
    if not (src / "Makefile").exists():
        tmp = cache_root() / "src" / f"{ver}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"extracting {TARBALL} ({ver})")
        subprocess.run(["tar", "xJf", str(_need_tarball()), "-C", str(tmp)], check=True)
        (top,) = list(tmp.iterdir())
        shutil.rmtree(src, ignore_errors=True)
        top.rename(src)
        shutil.rmtree(tmp)
        shutil.rmtree(pristine, ignore_errors=True)
    for rel in _all_patched_files():
        dst = pristine / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst)
    return src


def _apply_patches(src: Path, variant: Variant, log) -> None:
    ver = _dirname()
    pristine = cache_root() / "src" / f"{ver}.pristine"
    for rel in _all_patched_files():
        want = (pristine / rel).read_bytes()
        if (src / rel).read_bytes() != want:
            (src / rel).write_bytes(want)  # new mtime: make rebuilds it
    for p in variant.patches:
        log(f"applying {p}")
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(_patch_path(p))],
                           cwd=src, capture_output=True, text=True)
        if r.returncode:
            raise KsmlensError(f"patch {p} does not apply to {ver}: "
                               f"{(r.stdout + r.stderr).strip().splitlines()[-1]}",
                               "refresh the patch in vm/patches against this source")
    _stamp = src / ".ksmlens-variant"
    _stamp.write_text(variant.name)


def _make(src: Path, tree: Path, args: list[str], logf, progress=None) -> None:
    cmd = ["make", f"O={tree}", "ARCH=x86_64"] + args
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


def _configure(src: Path, tree: Path, logf, log) -> None:
    """(Re)create tree/.config from allnoconfig + our fragment; verify it."""
    frag = _fragment()
    stamp = tree / ".ksmlens-fragment"
    if stamp.exists() and stamp.read_bytes() == frag.read_bytes() and (tree / ".config").exists():
        return
    log("configuring (allnoconfig + vm/config/ksmlens.config)")
    tree.mkdir(parents=True, exist_ok=True)
    _make(src, tree, ["allnoconfig"], logf)
    r = subprocess.run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(tree),
                        str(tree / ".config"), str(frag)], cwd=src,
                       capture_output=True, text=True)
    logf.write(r.stdout + r.stderr)
    if r.returncode:
        raise KsmlensError("merging the config fragment failed", f"see {logf.name}")
    _make(src, tree, ["olddefconfig"], logf)
    have = set((tree / ".config").read_text().splitlines())
    missing = [l for l in frag.read_text().splitlines()
               if l.startswith("CONFIG_") and l not in have]
    if missing:
        raise KsmlensError(f"config options did not stick: {', '.join(missing)}",
                           "add their dependencies to vm/config/ksmlens.config")
    stamp.write_bytes(frag.read_bytes())


class _Progress:
    """Counts compiled objects; prints a line now and then (stderr)."""

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


def build(variant: str = DEFAULT_VARIANT, *, force: bool = False, jobs: int | None = None,
          quiet: bool = False) -> Kernel:
    """Build ``variant`` (or find it in the cache) and return its :class:`Kernel`."""
    v = get_variant(variant)
    if not force:
        k = find_kernel(variant)
        if k:
            return k

    def log(msg):
        if not quiet:
            print(f"ksmlens: {msg}", file=sys.stderr, flush=True)

    for tool in ("make", "gcc", "flex", "bison", "bc", "patch"):
        if not shutil.which(tool):
            raise KsmlensError(f"{tool} not found (needed to build the kernel)",
                               "run ./setup.sh, or apt-get install build-essential "
                               "flex bison bc patch libelf-dev libssl-dev")
    key = artifact_key(v)
    root = cache_root()
    with BuildLock(root / "build.lock"):
        src = _source_tree(log)
        tree = root / "tree" / _dirname()
        tree.mkdir(parents=True, exist_ok=True)
        out = _kernel_dir(v, key)
        tmp_out = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        t0 = time.monotonic()
        with open(tmp_out / "build.log", "w", buffering=1) as logf:
            _apply_patches(src, v, log)
            _configure(src, tree, logf, log)
            counts = tree / ".ksmlens-objcount"
            expected = int(counts.read_text()) if counts.exists() else None
            prog = None if quiet else _Progress(v.name, expected)
            localversion = f"LOCALVERSION=-{v.name}"
            jobs = jobs or (os.cpu_count() or 1) + 1
            log(f"building {v.name} in {tree} (log: {out}/build.log)")
            _make(src, tree, [f"-j{jobs}", localversion, "bzImage"], logf, prog)
            if prog:
                prog.show("done", end=True)
                if prog.count > 500:
                    counts.write_text(str(prog.count))
            release = subprocess.run(
                ["make", "-s", f"O={tree}", "ARCH=x86_64", localversion, "kernelrelease"],
                cwd=src, capture_output=True, text=True, check=True).stdout.strip()
        shutil.copy2(tree / "arch/x86/boot/bzImage", tmp_out / "bzImage")
        shutil.copy2(tree / "vmlinux", tmp_out / "vmlinux")
        shutil.copy2(tree / ".config", tmp_out / "config")
        meta = {"variant": v.name, "release": release, "key": key,
                "source": source_version(), "patches": list(v.patches),
                "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp_out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp_out.rename(out)
        for old in out.parent.glob(f"{v.name}-*"):  # superseded builds of this variant
            if old != out and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
        log(f"built {release} in {meta['build_seconds']}s: {out}")
    k = find_kernel(variant)
    assert k is not None
    return k
