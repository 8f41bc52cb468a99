"""The guest's root file system for a foreign architecture (arm64 on an x86-64
host): a small Debian root made from Debian's own packages, cached by content.

An x86-64 guest runs the host's root (virtme-ng shares it over 9p); an arm64
guest cannot run the host's binaries, so it gets a root of its own:
``debootstrap --foreign --variant=minbase`` of Debian 12 for the architecture
with :data:`PACKAGES` (Python's standard library for the guest agent and its
scripts, procps), every downloaded package unpacked with ``dpkg-deb -x``.
Nothing runs in the root while it is made (no emulator on the host): the
packages' maintainer scripts do not run, which the agent does not need; the
account files come from base-passwd's masters. virtme-ng's shell init
(``virtme-init``) boots it read-only, with its own overlays.

Layout under the cache (:mod:`ksmlens.lab.paths`)::

    roots/<arch>-<key>/         the root; meta.json beside it names what it holds

``<key>`` hashes :data:`PACKAGES`, the suite, the mirror and
:data:`ROOT_FORMAT`: change any and the root is made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import Arch, get_arch, host_arch
from ksmlens.lab.paths import cache_root

__all__ = ["PACKAGES", "SUITE", "ROOT_FORMAT", "mirror", "root_key", "root_dir", "find_root",
           "build_root", "GUEST_PYTHON"]

ROOT_FORMAT = 1                      # bump when the procedure changes what it makes
SUITE = "bookworm"                   # Debian 12, the host's release
# the guest agent and its scripts (ksmlens/lab/guest/*.py: json, ctypes,
# select, subprocess) and the commands the proofs run (ps, pkill)
PACKAGES = ("python3-minimal", "libpython3.11-stdlib", "procps")
GUEST_PYTHON = "/usr/bin/python3"    # the root's interpreter (python3-minimal's link)


def mirror() -> str:
    """The Debian mirror: ``$KSMLENS_DEBIAN_MIRROR``, else the first ``URIs:``
    of the host's ``/etc/apt/sources.list.d/debian.sources``, else
    ``http://deb.debian.org/debian``."""
    env = os.environ.get("KSMLENS_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    try:
        for line in Path("/etc/apt/sources.list.d/debian.sources").read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split(":", 1)[1].split()[0]
                if "security" not in uri:
                    return uri.rstrip("/")
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def root_key(arch: str | Arch) -> str:
    a = get_arch(arch)
    h = hashlib.sha256(f"format={ROOT_FORMAT}\narch={a.debian}\nsuite={SUITE}\n"
                       f"mirror={mirror()}\npackages={','.join(PACKAGES)}\n".encode())
    return h.hexdigest()[:12]


def root_dir(arch: str | Arch) -> Path:
    a = get_arch(arch)
    return cache_root() / "roots" / f"{a.name}-{root_key(a)}"


def find_root(arch: str | Arch) -> Path | None:
    """The made root for ``arch``, or None."""
    d = root_dir(arch)
    return d if (d / ".ksmlens-root.json").exists() else None


def build_root(arch: str | Arch, *, quiet: bool = False) -> Path:
    """Make (or find) the root for ``arch`` and return its path.
    :class:`KsmlensError` for the host's own architecture (its guests use the
    host's root), a missing debootstrap, or a failed download."""
    a = get_arch(arch)
    if host_arch() is a:
        raise KsmlensError(f"{a.name} guests run the host's own root",
                           "a root of its own is for a foreign --arch")
    found = find_root(a)
    if found:
        return found
    if not shutil.which("debootstrap") or not shutil.which("dpkg-deb"):
        raise KsmlensError("debootstrap not found (needed to make the arm64 guest's root)",
                           "run `apt-get install debootstrap` (./setup.sh does it)")

    def log(msg):
        if not quiet:
            print(f"ksmlens: {msg}", file=sys.stderr, flush=True)

    from ksmlens.lab.kbuild import BuildLock
    out = root_dir(a)
    with BuildLock(cache_root() / "roots" / "root.lock", "root build"):
        if find_root(a):
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        log(f"making the {a.name} guest root from Debian {SUITE} ({mirror()}) in {out}")
        logf = tmp.with_name(tmp.name + ".log")
        with open(logf, "w") as f:
            r = subprocess.run(
                ["debootstrap", "--foreign", f"--arch={a.debian}", "--variant=minbase",
                 f"--include={','.join(PACKAGES)}", SUITE, str(tmp), mirror()],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if r.returncode:
            tail = logf.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise KsmlensError(f"debootstrap failed: {tail[0]}",
                               f"is {mirror()} reachable? full log: {logf}")
        debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
        for deb in debs:      # the second stage's unpacking, without running anything
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        etc = tmp / "etc"
        for name in ("passwd", "group"):
            master = tmp / "usr/share/base-passwd" / f"{name}.master"
            if not (etc / name).exists() and master.exists():
                shutil.copy2(master, etc / name)
        for d in debs:
            d.unlink()
        shutil.rmtree(tmp / "debootstrap", ignore_errors=True)
        if not (tmp / GUEST_PYTHON.lstrip("/")).exists():
            raise KsmlensError(f"the {a.name} root has no {GUEST_PYTHON}",
                               f"see {logf}; the package list is rootfs.PACKAGES")
        meta = {"arch": a.name, "suite": SUITE, "mirror": mirror(), "packages": list(PACKAGES),
                "debs": len(debs), "seconds": round(time.monotonic() - t0, 1),
                "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / ".ksmlens-root.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        logf.unlink(missing_ok=True)
        log(f"made the {a.name} root in {meta['seconds']}s ({len(debs)} packages)")
    return out


def mount_points(root: Path, paths) -> None:
    """Create each host path of ``paths`` as an empty folder in ``root``
    (virtme-ng mounts the host's folders there; the guest's root is
    read-only)."""
    for p in paths:
        (root / str(p).lstrip("/")).mkdir(parents=True, exist_ok=True)
