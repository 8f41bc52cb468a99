"""``virtme-run`` for ksmlens' dry runs of a guest with a root of its own
(an arm64 guest, :mod:`ksmlens.lab.rootfs`).

For such a root virtme-ng keeps the kernel command line under 896 bytes
(``virtme_ng.utils.KERNEL_CMDLINE_MAX``, s390's limit); past it, and an arm64
guest's always is (its 9p overlays and mounts), ``virtme-run`` writes the
init commands into a temporary file in the root and deletes it when it
exits. ksmlens takes the QEMU command from ``vng --dry-run`` and starts QEMU
after vng has exited, so that file would be gone. This ``virtme-run`` is
virtme-ng's own with one change: the file is kept, named by its content
(``/virtme-init-<sha256>``; no dot: the kernel drops a command-line word
with a dot as a module parameter instead of passing it to init), so every
guest with the same init shares one file and nothing needs removing. :func:`shim_dir` is put first on ``PATH``
for the dry run (vng runs ``virtme-run`` from ``PATH``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

__all__ = ["keep_init_script", "shim_dir", "main"]


def keep_init_script(root: str, initsh: str) -> str | None:
    """virtme-ng's ``create_guest_init_script()``, the file kept: ``initsh``
    written once to ``ROOT/virtme-init-<digest>``; its path in the guest,
    or None when the root cannot be written (virtme-ng then keeps the
    commands on the command line)."""
    name = f"virtme-init-{hashlib.sha256(initsh.encode()).hexdigest()[:16]}"
    path = Path(root) / name
    try:
        if not path.exists():
            tmp = path.with_name(f"{name}.tmp{os.getpid()}")
            tmp.write_text(initsh + "\n")
            tmp.chmod(0o644)
            tmp.replace(path)
    except OSError:
        return None
    return f"/{name}"


def shim_dir() -> Path:
    """A folder holding a ``virtme-run`` that runs :func:`main` with this
    interpreter (made once per interpreter, under the cache)."""
    from ksmlens.lab.paths import cache_root
    digest = hashlib.sha256(sys.executable.encode()).hexdigest()[:12]
    d = cache_root() / "shim" / digest
    exe = d / "virtme-run"
    want = f"#!/bin/sh\nexec {sys.executable} -m ksmlens.lab.virtme_run \"$@\"\n"
    if not exe.exists() or exe.read_text() != want:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"virtme-run.tmp{os.getpid()}"
        tmp.write_text(want)
        tmp.chmod(0o755)
        tmp.replace(exe)
    return d


def main() -> int:
    import virtme.commands.run as run
    if not hasattr(run, "create_guest_init_script"):
        sys.stderr.write("ksmlens: this virtme-ng has no create_guest_init_script(); "
                         "install the version pyproject.toml pins (./setup.sh --deps)\n")
        return 1
    run.create_guest_init_script = keep_init_script
    sys.argv[0] = "virtme-run"
    return run.main()


if __name__ == "__main__":
    sys.exit(main())
