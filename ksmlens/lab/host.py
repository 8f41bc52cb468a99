"""The machine ksmlens runs on, with a lab VM's file interface: for /proc/kcore.

:mod:`ksmlens.lab.ksmsys` reads ``/sys/kernel/mm/ksm`` and
``/proc/PID/ksm_stat`` through a VM's guest agent (``read_files``,
``write_file``, ``run``); :class:`LocalKernel` answers the same calls from
this machine's own files, so ``ksmlens check --target /proc/kcore`` compares
the walk with the running kernel's sysfs exactly as ``check`` does in a
guest. It cannot pause the kernel (``paused`` is None).
"""

from __future__ import annotations

import os
import subprocess

from ksmlens.lab.guest.agent import read_files
from ksmlens.lab.vm import RunResult

__all__ = ["LocalKernel", "KCORE_NOTE", "is_kcore"]


def _text(out: bytes | str | None) -> str:
    """What a timed-out run had printed (TimeoutExpired keeps bytes even with text=True)."""
    if isinstance(out, bytes):
        return out.decode(errors="replace")
    return out or ""


class LocalKernel:
    """The running kernel of this machine, read as root (no agent, no QMP)."""

    name = "local"
    paused = None          # /proc/kcore: nothing can stop the kernel for a walk

    def __init__(self) -> None:
        self.state = {"name": self.name, "kernel_release": os.uname().release}

    def read_files(self, paths=(), globs=()) -> dict:
        """Many small files (sysfs, procfs): {path: text or None}; the agent's
        ``read_files`` (ksmlens/lab/guest/agent.py), globs sorted."""
        return read_files(paths, globs)

    def read_file(self, path: str) -> str:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")

    def write_file(self, path: str, data: str) -> None:
        with open(path, "w") as f:
            f.write(str(data))

    def run(self, argv, *, timeout: float = 120.0, stdin: str = "", check: bool = False,
            env: dict | None = None) -> RunResult:
        """Run ``argv`` here (as the guest agent's ``run`` does in a guest)."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        try:
            p = subprocess.run(list(map(str, argv)), input=stdin, capture_output=True,
                               text=True, timeout=timeout, env={**os.environ, **(env or {})})
            res = RunResult(list(argv), p.returncode, p.stdout, p.stderr)
        except subprocess.TimeoutExpired as e:
            res = RunResult(list(argv), None, _text(e.stdout), _text(e.stderr), timed_out=True)
        return res.check() if check else res

    def __repr__(self) -> str:
        return f"<LocalKernel {self.state['kernel_release']}>"


KCORE_NOTE = ("/proc/kcore is the running kernel and nothing can pause it: the walk is live "
              "(unpaused), what raced with ksmd or a process is counted, and check takes a "
              "walk that raced again; for a steady state hold ksmd with "
              "`echo 0 > /sys/kernel/mm/ksm/run` (merged pages stay merged; "
              "`echo 1 > /sys/kernel/mm/ksm/run` resumes it)")


def is_kcore(prog) -> bool:
    """Whether ``prog`` reads the running kernel of this machine
    (``/proc/kcore``: drgn's ``IS_LIVE | IS_LOCAL``), which cannot be paused."""
    from drgn import ProgramFlags
    want = ProgramFlags.IS_LINUX_KERNEL | ProgramFlags.IS_LIVE | ProgramFlags.IS_LOCAL
    return prog.flags & want == want
