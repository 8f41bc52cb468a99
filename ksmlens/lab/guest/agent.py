"""ksmlens guest agent: runs inside the lab VM, serves the host over virtio-serial.

Started by virtme-ng as the guest's command (``vng --exec``). It speaks
newline-delimited JSON on the virtio-serial port named ``org.ksmlens.agent``:
each request ``{"id": N, "op": ..., ...}`` gets exactly one reply
``{"id": N, "ok": true, ...}`` or ``{"id": N, "ok": false, "error": "..."}``.

Standard library only: this file runs under the host's Python interpreter,
which the guest sees through virtme-ng's read-only share of the host root.
Requests are served one at a time; long-lived programs (scenario workloads)
are started with ``spawn`` and driven with ``send``/``kill`` by handle.
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

PORT_NAME = "org.ksmlens.agent"


def read_files(paths=(), globs=()):
    """{path: text or None} for ``paths`` and every match of ``globs`` (sorted);
    an unreadable file comes back as None. Also the host's reader for
    /proc/kcore (ksmlens.lab.host), so both read procfs the same way."""
    import glob
    paths = list(paths)
    for g in globs:
        paths += sorted(glob.glob(g))
    out = {}
    for p in paths:
        try:
            with open(p, "rb") as f:
                out[p] = f.read().decode(errors="replace")
        except OSError:
            out[p] = None
    return out


def find_port(name=PORT_NAME):
    base = "/sys/class/virtio-ports"
    for _ in range(200):
        try:
            for port in os.listdir(base):
                try:
                    with open(os.path.join(base, port, "name")) as f:
                        if f.read().strip() == name:
                            return "/dev/" + port
                except OSError:
                    continue
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"ksmlens-agent: no virtio-serial port named {name}")


class Spawned:
    """A long-lived child: stdin is ours, stdout is read line by line."""

    def __init__(self, argv, env, cwd, cgroup):
        def preexec():
            os.setsid()
            if cgroup:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))

        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, cwd=cwd, preexec_fn=preexec,
            bufsize=0)
        self.lines = []
        self.stderr = bytearray()
        self.cond = threading.Condition()
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # EOF marker
            self.cond.notify_all()

    def _pump_err(self):
        for chunk in iter(lambda: self.proc.stderr.read(4096), b""):
            with self.cond:
                self.stderr += chunk
                del self.stderr[:-65536]

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.lines:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"timed_out": True, "line": None}
                self.cond.wait(left)
            line = self.lines.pop(0)
            if line is None:
                self.lines.insert(0, None)
                return {"eof": True, "line": None, "rc": self.proc.wait(),
                        "stderr": self.stderr.decode(errors="replace")}
            return {"line": line}

    def kill(self, grace):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        time.sleep(0.05)
        return {"rc": self.proc.returncode,
                "stderr": self.stderr.decode(errors="replace")}


class Agent:
    def __init__(self):
        self.spawned = {}
        self.next_handle = 1

    def op_ping(self, req):
        return {"release": os.uname().release, "pid": os.getpid(),
                "uptime": float(open("/proc/uptime").read().split()[0])}

    def op_run(self, req):
        timeout = req.get("timeout", 60)
        proc = subprocess.Popen(
            req["argv"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=self._env(req), cwd=req.get("cwd"),
            start_new_session=True)
        try:
            out, err = proc.communicate(req.get("stdin", "").encode(), timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return {"rc": None, "timed_out": True,
                    "stdout": out.decode(errors="replace"),
                    "stderr": err.decode(errors="replace")}
        return {"rc": proc.returncode, "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace")}

    def op_spawn(self, req):
        sp = Spawned(req["argv"], self._env(req), req.get("cwd"), req.get("cgroup"))
        handle = self.next_handle
        self.next_handle += 1
        self.spawned[handle] = sp
        return {"handle": handle, "pid": sp.proc.pid}

    def _get(self, req):
        try:
            return self.spawned[req["handle"]]
        except KeyError:
            raise ValueError(f"no spawned process with handle {req['handle']}")

    def op_send(self, req):
        sp = self._get(req)
        if req.get("line") is not None:
            try:
                sp.proc.stdin.write((req["line"] + "\n").encode())
                sp.proc.stdin.flush()
            except BrokenPipeError:
                pass
        return sp.readline(req.get("timeout", 60))

    def op_kill(self, req):
        sp = self.spawned.pop(req["handle"], None)
        if sp is None:
            return {"rc": None, "gone": True}
        return sp.kill(req.get("grace", 5))

    def op_list(self, req):
        return {"spawned": [{"handle": h, "pid": sp.proc.pid,
                             "running": sp.proc.poll() is None,
                             "argv": sp.proc.args}
                            for h, sp in self.spawned.items()]}

    def op_read_file(self, req):
        with open(req["path"], "rb") as f:
            return {"data": f.read().decode(errors="replace")}

    def op_read_files(self, req):
        """Many small files (sysfs, procfs) without a fork each: see :func:`read_files`."""
        return {"files": read_files(req.get("paths", []), req.get("globs", []))}

    def op_write_file(self, req):
        with open(req["path"], "w") as f:
            f.write(req["data"])
        return {}

    def op_poweroff(self, req):
        for sp in list(self.spawned.values()):
            sp.kill(1)
        os.sync()
        threading.Timer(0.2, lambda: open("/proc/sysrq-trigger", "w").write("o")).start()
        return {}

    @staticmethod
    def _env(req):
        env = dict(os.environ)
        env.update(req.get("env") or {})
        return env

    def handle(self, req):
        fn = getattr(self, "op_" + str(req.get("op")), None)
        if fn is None:
            return {"ok": False, "error": f"unknown op {req.get('op')!r}"}
        try:
            res = fn(req)
        except Exception as e:  # reported to the host, the agent lives on
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        res["ok"] = True
        return res


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else find_port()
    fd = os.open(path, os.O_RDWR)
    agent = Agent()
    buf = b""
    # Tell the host we are up (it may not be connected yet: it also pings).
    print(f"ksmlens-agent: serving on {path}", file=sys.stderr, flush=True)
    while True:
        r, _, _ = select.select([fd], [], [], 1.0)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:  # host side closed: virtio-serial returns 0; wait again
            time.sleep(0.05)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except ValueError as e:
                req, reply = {}, {"ok": False, "error": f"bad request: {e}"}
            else:
                reply = agent.handle(req)
            reply["id"] = req.get("id")
            data = (json.dumps(reply) + "\n").encode()
            while data:
                n = os.write(fd, data)
                data = data[n:]


if __name__ == "__main__":
    main()
