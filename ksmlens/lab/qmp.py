"""A minimal QMP (QEMU Machine Protocol) client over a unix socket.

Enough for ksmlens' control socket: pause/resume the guest around a
consistent walk, query its run state, dump guest memory, quit.
drgn gets a QMP socket of its own (a QMP socket serves one client at a time).
"""

from __future__ import annotations

import json
import re
import socket
import time

from ksmlens.errors import KsmlensError

__all__ = ["QMP", "parse_registers"]

# `info registers -a` (HMP) per vCPU: x86-64 (target/i386/cpu-dump.c
# x86_cpu_dump_state()) "CPU#0\nRAX=... RBX=...\nR8 =... RIP=... RFL=...";
# arm64 (target/arm/cpu.c aarch64_cpu_dump_state()) "CPU#0\n PC=... X00=...
# ... X30=...  SP=...\nPSTATE=..."
_CPU = re.compile(r"^CPU#(\d+)", re.M)
_REG = re.compile(r"\b(R[A-Z0-9]{1,2}|RIP|RFL|PC|SP|X\d\d|PSTATE)\s*=([0-9a-f]{8,16})\b")


class QMP:
    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise KsmlensError(f"cannot connect to QMP socket {path}: {e.strerror}",
                               "is the VM up? see `ksmlens vm status`") from None
        self.f = self.sock.makefile("rwb", buffering=0)
        greeting = self._read()
        if "QMP" not in greeting:
            raise KsmlensError(f"{path} does not speak QMP", "")
        self.command("qmp_capabilities")

    def _read(self, what: str = "greeting") -> dict:
        while True:
            try:
                line = self.f.readline()
            except (socket.timeout, TimeoutError):
                raise KsmlensError(f"QMP {what} gave no answer within "
                                   f"{self.sock.gettimeout():.0f} s on {self.path}",
                                   "is another client holding the socket, or the VM hung?") \
                    from None
            if not line:
                raise KsmlensError(f"QMP socket {self.path} closed", "the VM has gone")
            msg = json.loads(line)
            if "event" in msg:
                continue
            return msg

    def command(self, name: str, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write((json.dumps(msg) + "\n").encode())
        reply = self._read(name)
        if "error" in reply:
            raise KsmlensError(f"QMP {name} failed: {reply['error'].get('desc')}", "")
        return reply.get("return")

    def status(self) -> str:
        return self.command("query-status")["status"]

    def stop(self) -> None:
        self.command("stop")

    def cont(self) -> None:
        self.command("cont")

    def cpu_registers(self) -> list[dict]:
        """Every vCPU's general registers, ``[{"cpu": 0, "rip": int, "rsp":
        int, ...}]`` (lower-case x86-64 names, ``rfl`` the flags; on arm64
        ``pc``, ``sp``, ``x00``..``x30``, ``pstate``), from HMP
        ``info registers -a``. Meaningful while the guest is stopped."""
        return parse_registers(self.command("human-monitor-command",
                                            **{"command-line": "info registers -a"}))

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_registers(text: str) -> list[dict]:
    """Parse HMP ``info registers -a`` output: one dict per vCPU, x86-64
    ``{"cpu": N, "rax": int, ..., "r15": int, "rip": int, "rfl": int}``,
    arm64 ``{"cpu": N, "pc": int, "x00": int, ..., "x30": int, "sp": int,
    "pstate": int}``.
    Raises :class:`KsmlensError` if no vCPU is found."""
    starts = [(m.start(), int(m.group(1))) for m in _CPU.finditer(text)]
    if not starts:
        raise KsmlensError("QMP info registers printed no CPU",
                           f"QEMU answered {text[:80]!r}; is this an x86-64 or arm64 guest?")
    out = []
    for (pos, cpu), nxt in zip(starts, [p for p, _ in starts[1:]] + [len(text)]):
        regs = {"cpu": cpu}
        regs.update((k.lower(), int(v, 16)) for k, v in _REG.findall(text[pos:nxt]))
        out.append(regs)
    return out


def wait_socket(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.close()
            return True
        except OSError:
            time.sleep(0.05)
    return False
