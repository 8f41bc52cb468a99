"""A minimal QMP (QEMU Machine Protocol) client over a unix socket.

Enough for ksmlens' control socket: pause/resume the guest around a
consistent walk, query its run state, dump guest memory, quit.
drgn gets a QMP socket of its own (a QMP socket serves one client at a time).
"""

from __future__ import annotations

import json
import socket
import time

from ksmlens.errors import KsmlensError

__all__ = ["QMP"]


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
