"""The lab VM: a patched kernel booted under QEMU by virtme-ng, driven from Python.

A VM is named (``--name``, default ``ksmlens``) and owns a private directory
``<cache>/vms/<name>/`` (mode 0700) holding:

* ``qmp.sock``      QMP for ksmlens itself (pause/resume, status, quit)
* ``drgn.sock``     a second QMP socket, left free for your drgn (``drgn --qemu PATH``)
* ``drgn-N.sock``   more QMP sockets that ksmlens' own drgn Programs take
* ``agent.sock``    virtio-serial port to the guest agent (runs commands as root)
* ``console.log``   kernel console and the agent's own output
* ``state.json``    what ``ksmlens vm status`` reports

virtme-ng builds the QEMU command line (``vng --dry-run``: host root shared
read-only over 9p, rw overlays in the guest); ksmlens adds its sockets with
``--qemu-opts`` and starts QEMU itself, detached, so the VM outlives the
command that started it (``vng`` itself needs a terminal). The command lines
are pure functions in :mod:`ksmlens.lab.cmdline`; :meth:`VM.dry_run`
(``ksmlens vm up --dry-run``) prints the QEMU one without booting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import ksmlens.lab.kbuild as kbuild
from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import DEFAULT_ARCH, Arch, get_arch, host_arch
from ksmlens.kernel.variants import DEFAULT_VARIANT, get_variant
from ksmlens.lab.cmdline import (Accel, AGENT_PORT, DRGN_POOL, LaunchSpec, numa_nodes,  # noqa: F401
                                 parse_mem, qemu_argv, sockets, split_cpus, vng_argv)
from ksmlens.lab.paths import cache_root, repo_root, vms_root
from ksmlens.lab.qmp import QMP, wait_socket

__all__ = ["VM", "RunResult", "probe_accel", "list_vms", "DEFAULT_NAME"]

DEFAULT_NAME = "ksmlens"
BOOT_TIMEOUT = 180.0
# Set (to who is asking, e.g. a test's node id) and VM.up refuses to boot;
# tests/conftest.py sets it around every test not marked ``vm``.
NO_VM_ENV = "KSMLENS_NO_VM"


@dataclasses.dataclass
class RunResult:
    """What a command run in the guest returned."""
    argv: list
    rc: int | None
    stdout: str
    stderr: str
    timed_out: bool = False

    def check(self) -> "RunResult":
        if self.rc != 0:
            what = "timed out" if self.timed_out else f"exited {self.rc}"
            err = (self.stderr.strip().splitlines() or [""])[-1]
            raise KsmlensError(f"guest command {shlex.join(map(str, self.argv))} {what}"
                               + (f": {err}" if err else ""), "see its stderr above")
        return self


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _find_vng() -> str:
    cand = _venv_bin() / "vng"
    if cand.exists():
        return str(cand)
    w = shutil.which("vng")
    if w:
        return w
    raise KsmlensError("virtme-ng (vng) not found",
                       "run ./setup.sh, or pip install virtme-ng into ksmlens' venv")


def _find_qemu(arch: str | Arch | None = None) -> str:
    a = get_arch(arch)
    q = shutil.which(a.qemu)
    if not q:
        raise KsmlensError(f"{a.qemu} not found",
                           f"run ./setup.sh, or apt-get install {a.qemu_package}")
    return q


def guest_mounts() -> dict[str, str]:
    """Where a foreign architecture's guest sees the host's folders:
    ``{guest path: host path}``, the repository at ``/ksmlens`` and the cache
    at ``/ksmlens-cache``. Short, fixed paths: virtme-ng puts each mount on the
    kernel command line, which for a root of its own it keeps under 896
    bytes (else it writes the init into the root and deletes it when the
    dry run exits, before ksmlens starts QEMU)."""
    return {"/ksmlens": str(repo_root()), "/ksmlens-cache": str(cache_root())}


def guest_path(host_path, mounts: dict[str, str]) -> str:
    """``host_path`` as the guest sees it through ``mounts`` (unchanged
    outside them, and for a guest that shares the host's root)."""
    p = str(host_path)
    for g, h in mounts.items():
        if p == h or p.startswith(h.rstrip("/") + "/"):
            return g + p[len(h.rstrip("/")):]
    return p


def _guest_python() -> str:
    from ksmlens.lab.rootfs import GUEST_PYTHON
    return GUEST_PYTHON


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"qemu-system" in f.read()
    except OSError:
        return False


# ---------------------------------------------------------------- accel probe

def probe_accel(kernel: kbuild.Kernel, *, force: bool = False,
                boot: bool = True) -> tuple[str, str]:
    """Return ``("kvm" | "tcg", why)``: KVM only where a guest really boots.

    On some hosts (nested virtualisation) /dev/kvm exists but a KVM guest
    aborts or hangs before the kernel prints anything; the probe boots the
    lab kernel briefly under KVM and looks for its first console line. The
    result is cached per host kernel and QEMU binary. With ``boot=False``
    (a dry run) nothing is booted or written: without a cached probe an
    accessible /dev/kvm gives ``"kvm"``, said to be unprobed.
    """
    if not os.path.exists("/dev/kvm"):
        return "tcg", "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not accessible (add yourself to group kvm)"
    qemu = _find_qemu()
    key = f"{os.uname().release} {qemu} {os.stat(qemu).st_mtime_ns}"
    cache = cache_root() / "accel-probe.json"
    if not force and cache.exists():
        c = json.loads(cache.read_text())
        if c.get("key") == key:
            return c["accel"], c["why"] + " (cached probe)"
    if not boot:
        return "kvm", "/dev/kvm is accessible (not probed: dry run)"
    log = cache_root() / "accel-probe.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    proc = subprocess.Popen(
        [qemu, "-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1",
         "-kernel", str(kernel.bzimage), "-append", "console=ttyS0 panic=-1",
         "-display", "none", "-vga", "none", "-nodefaults", "-no-reboot",
         "-serial", f"file:{log}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    accel, why = "tcg", "KVM guest printed nothing within 15 s (hangs on this host)"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if b"Linux version" in log.read_bytes():
            accel, why = "kvm", "KVM guest booted in the probe"
            break
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            why = "QEMU with KVM failed: " + (err[-1] if err else f"exit {proc.returncode}")
            break
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cache.write_text(json.dumps({"key": key, "accel": accel, "why": why}))
    return accel, why


# ---------------------------------------------------------------- the VM

def list_vms() -> list[dict]:
    out = []
    root = vms_root()
    if root.exists():
        for d in sorted(root.iterdir()):
            st = d / "state.json"
            if st.exists():
                s = json.loads(st.read_text())
                s["running"] = _pid_alive(s.get("pid", 0))
                out.append(s)
    return out


class VM:
    """A running lab VM, found by name. Use :meth:`up` to start one."""

    def __init__(self, name: str = DEFAULT_NAME):
        self.name = name
        self.dir = vms_root() / name
        st = self.dir / "state.json"
        if not st.exists():
            raise KsmlensError(f"no VM named {name!r} is up",
                               f"start one with `ksmlens vm up --name {name}`")
        self.state = json.loads(st.read_text())
        self._next_id = 1

    # -------------------------------------------------------- lifecycle

    @classmethod
    def _plan(cls, name: str, variant: str, *, memory: str, cpus: int, numa: int,
              accel: str, build: bool, quiet: bool, probe: bool = True,
              source: str | None = None, arch: str | None = None):
        """Kernel, :class:`~ksmlens.lab.cmdline.LaunchSpec`, why this accelerator:
        everything ``up`` decides before it runs anything in the VM's directory."""
        get_variant(variant)
        src = kbuild.get_source(source)
        a = get_arch(arch)
        foreign = host_arch() is not a
        qemu = _find_qemu(a)
        vng = _find_vng()
        kernel = kbuild.find_kernel(variant, src, a)
        if kernel is None:
            if not build:
                kopt = "" if src.name == kbuild.DEFAULT_SOURCE else f" --kernel {src.name}"
                aopt = "" if a.name == DEFAULT_ARCH else f" --arch {a.name}"
                raise KsmlensError(f"kernel variant {variant!r} ({src.name}, {a.name}) "
                                   "is not built",
                                   f"run `ksmlens vm build{kopt}{aopt} --variant {variant}`")
            kernel = kbuild.build(variant, source=src, quiet=quiet, arch=a)
        if foreign:
            if accel == "kvm":
                raise KsmlensError(f"KVM cannot run an {a.name} guest on this "
                                   f"{os.uname().machine} host", "use --accel tcg (or auto)")
            if accel not in ("auto", "tcg"):
                raise KsmlensError(f"unknown accelerator {accel!r}", "use auto, kvm or tcg")
            accel, why = "tcg", f"an {a.name} guest on an {os.uname().machine} host"
        elif accel == "auto":
            accel, why = probe_accel(kernel, boot=probe)
        elif accel in ("kvm", "tcg"):
            why = "asked for"
        else:
            raise KsmlensError(f"unknown accelerator {accel!r}", "use auto, kvm or tcg")
        # numpy's AVX2 (X86_V3) argsort returns wrong orders under QEMU TCG
        # (np.unique(..., return_inverse=True) gave duplicate "unique" values in
        # 42 of 300 tries in a TCG guest, none on the host): the guest's numpy
        # keeps to its X86_V2 baseline there.
        npy = "NPY_DISABLE_CPU_FEATURES=X86_V3 " if accel == "tcg" and not foreign else ""
        root, rodirs, python = None, (), sys.executable
        if foreign:
            from ksmlens.lab import rootfs
            root = rootfs.find_root(a) if not build else rootfs.build_root(a, quiet=quiet)
            if root is None:
                raise KsmlensError(f"the {a.name} guest root is not made",
                                   f"run `ksmlens vm up --arch {a.name}` once (it makes it)")
            rodirs = tuple(f"{g}={h}" for g, h in guest_mounts().items())
            python = rootfs.GUEST_PYTHON
        agent = str(repo_root() / "ksmlens" / "lab" / "guest" / "agent.py")
        if foreign:
            agent = guest_path(agent, guest_mounts())
        agent_cmd = f"{npy}exec {shlex.quote(python)} {shlex.quote(agent)}"
        spec = LaunchSpec(bzimage=kernel.bzimage, memory_mb=parse_mem(memory), cpus=cpus,
                          numa=numa, accel=cast(Accel, accel), vm_dir=vms_root() / name,
                          agent_cmd=agent_cmd, vng=vng, qemu=qemu, arch=a.name, root=root,
                          rodirs=rodirs)
        numa_nodes(spec.memory_mb, cpus, numa)   # one-line errors before anything runs
        return kernel, spec, why

    @staticmethod
    def _run_vng(spec: LaunchSpec, log: Path | None = None) -> list[str]:
        """Run ``vng --dry-run`` (it starts nothing) and return the QEMU argv."""
        env = dict(os.environ)
        env["PATH"] = f"{_venv_bin()}:{env.get('PATH', '')}"
        if spec.root is not None:       # a root of its own: keep vng's init file
            from ksmlens.lab.virtme_run import shim_dir
            env["PATH"] = f"{shim_dir()}:{env['PATH']}"
        r = subprocess.run(vng_argv(spec), env=env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, cwd="/")
        if log is not None:
            log.write_text(r.stderr)
        if r.returncode:
            err = r.stderr.strip().splitlines()
            raise KsmlensError("virtme-ng could not prepare the VM"
                               + (f": {err[-1]}" if err else ""),
                               f"see {log}" if log else "run it with --verbose by hand")
        return qemu_argv(spec, r.stdout, r.stderr)

    @classmethod
    def dry_run(cls, name: str = DEFAULT_NAME, variant: str = DEFAULT_VARIANT, *,
                memory: str = "2G", cpus: int = 2, numa: int = 1,
                accel: str = "auto", source: str | None = None,
                arch: str | None = None) -> str:
        """The exact QEMU command :meth:`up` would start, shell-quoted on one
        line, as ``vng --dry-run`` prints its own. Boots nothing and writes
        nothing: the kernel must be built already, ``accel="auto"`` takes a
        cached KVM probe or, without one, decides without booting the probe
        (see :func:`probe_accel`), and the VM directory is not created."""
        _, spec, _ = cls._plan(name, variant, memory=memory, cpus=cpus, numa=numa,
                               accel=accel, build=False, quiet=True, probe=False,
                               source=source, arch=arch)
        return shlex.join(cls._run_vng(spec))

    @classmethod
    def up(cls, name: str = DEFAULT_NAME, variant: str = DEFAULT_VARIANT, *,
           memory: str = "2G", cpus: int = 2, numa: int = 1, accel: str = "auto",
           build: bool = True, boot_timeout: float = BOOT_TIMEOUT,
           quiet: bool = False, source: str | None = None,
           arch: str | None = None) -> "VM":
        """Boot ``variant`` built from kernel ``source`` (a
        :data:`ksmlens.lab.kbuild.SOURCES` name such as ``"6.1"``; None: the
        default, 6.12) as VM ``name`` and wait until its agent answers.

        Raises KsmlensError when ``$KSMLENS_NO_VM`` is set (a test not marked
        ``vm``), after the argument checks and before anything is built or started.
        """
        get_variant(variant)
        kbuild.get_source(source)
        _find_qemu(arch)
        _find_vng()
        d = vms_root() / name
        if (d / "state.json").exists():
            old = json.loads((d / "state.json").read_text())
            if _pid_alive(old.get("pid", 0)):
                raise KsmlensError(f"a VM named {name!r} is already up "
                                   f"({old.get('variant')}, pid {old.get('pid')})",
                                   f"`ksmlens vm down --name {name}` or pick another --name")
        refused = os.environ.get(NO_VM_ENV)
        if refused:
            raise KsmlensError(f"VM.up({name!r}) refused: ${NO_VM_ENV} is set ({refused})",
                               "this caller must not boot a guest; a test that boots one "
                               "carries @pytest.mark.vm")
        kernel, spec, why = cls._plan(name, variant, memory=memory, cpus=cpus, numa=numa,
                                      accel=accel, build=build, quiet=quiet,
                                      source=source, arch=arch)
        if spec.root is not None:
            from ksmlens.lab import rootfs
            rootfs.mount_points(spec.root, guest_mounts())
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, mode=0o700)
        os.chmod(d, 0o700)
        argv = cls._run_vng(spec, d / "vng-dry-run.txt")
        (d / "qemu-cmdline.txt").write_text(shlex.join(argv) + "\n")
        sock = sockets(d)
        console = open(d / "console.log", "wb")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                cwd="/")
        state = {
            "name": name, "variant": variant, "kernel_release": kernel.release,
            "source": kernel.source, "arch": spec.arch,
            "python": sys.executable if spec.root is None else _guest_python(),
            "mounts": guest_mounts() if spec.root is not None else {},
            "accel": spec.accel, "accel_reason": why, "qmp": str(sock["drgn_qmp"]),
            "qmp_pool": [str(p) for p in sock["pool"]],
            "control_qmp": str(sock["qmp"]), "agent": str(sock["agent"]),
            "vmlinux": str(kernel.vmlinux),
            "bzimage": str(kernel.bzimage), "pid": proc.pid, "memory_mb": spec.memory_mb,
            "cpus": cpus, "numa_nodes": numa, "console_log": str(d / "console.log"),
            "dir": str(d), "started_at": time.time(),
        }
        (d / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        vm = cls(name)
        try:
            vm._wait_agent(proc, boot_timeout)
        except BaseException:
            vm.down(quiet=True)
            raise
        vm.state["boot_seconds"] = round(time.monotonic() - t0, 2)
        ping = vm._request({"op": "ping"}, timeout=10)
        if ping["release"] != kernel.release:
            vm.down(quiet=True)
            raise KsmlensError(f"guest runs {ping['release']}, expected {kernel.release}",
                               "the bzImage and its build disagree; rebuild with --force")
        (d / "state.json").write_text(json.dumps(vm.state, indent=2) + "\n")
        return vm

    def _wait_agent(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not wait_socket(self.state["agent"], 10):
            self._dead_or("QEMU did not create its sockets")
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._dead_or("unreachable")
            try:
                self._request({"op": "ping"}, timeout=min(5.0, deadline - time.monotonic()))
                return
            except (TimeoutError, ConnectionResetError):
                # a reset while the guest brings its virtio console up (seen
                # once booting 6.1 under TCG): not up yet
                time.sleep(0.2)
                continue
        raise KsmlensError(f"guest never came up within {timeout:.0f} s: "
                           f"{self._console_tail()}",
                           f"see {self.state['console_log']}")

    def _console_tail(self) -> str:
        try:
            lines = Path(self.state["console_log"]).read_text(errors="replace").splitlines()
        except OSError:
            return "no console log"
        lines = [l.strip() for l in lines if l.strip()]
        return lines[-1][-160:] if lines else "console is empty"

    def _dead_or(self, what: str):
        if not self.alive():
            raise KsmlensError(f"VM {self.name!r} died: {self._console_tail()}",
                               f"see {self.state['console_log']}; "
                               f"`ksmlens vm down --name {self.name}` cleans up")
        raise KsmlensError(f"VM {self.name!r}: {what}", f"see {self.state['console_log']}")

    @property
    def arch(self) -> str:
        """The guest's architecture (an :data:`~ksmlens.kernel.arch.ARCHES` name)."""
        return self.state.get("arch", DEFAULT_ARCH)

    def guest_path(self, host_path) -> str:
        """A host file (the repository's guest scripts, the cache's guest
        programs) as this guest sees it: the same path where the guest shares
        the host's root, under ``/ksmlens`` or ``/ksmlens-cache`` for an arm64
        guest (:func:`guest_mounts`)."""
        return guest_path(host_path, self.state.get("mounts") or {})

    @property
    def python(self) -> str:
        """The guest's Python for ksmlens' guest scripts: the host's own
        interpreter (the host root is the guest's), or the guest root's."""
        return self.state.get("python", sys.executable)

    def alive(self) -> bool:
        return _pid_alive(self.state["pid"])

    def down(self, *, quiet: bool = False, timeout: float = 15.0) -> None:
        """Power the guest off and make sure QEMU is gone. Idempotent."""
        pid = self.state["pid"]
        if _pid_alive(pid):
            try:
                self._request({"op": "poweroff"}, timeout=3)
            except (KsmlensError, TimeoutError, OSError):
                pass
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                try:
                    with QMP(self.state["control_qmp"], timeout=2) as q:
                        q.command("quit")
                except (KsmlensError, OSError):
                    pass
                time.sleep(0.5)
            if _pid_alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        try:  # reap if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        log = Path(self.state["console_log"])
        if log.exists():
            shutil.copy2(log, vms_root() / f"{self.name}.last-console.log")
        shutil.rmtree(self.dir, ignore_errors=True)

    # -------------------------------------------------------- agent protocol

    def _request(self, req: dict, timeout: float = 60.0) -> dict:
        """One request/reply with the guest agent (serialised across processes)."""
        if not self.alive():
            self._dead_or("")
        req = dict(req)
        rid = f"{os.getpid()}-{time.monotonic_ns()}-{self._next_id}"
        self._next_id += 1
        req["id"] = rid
        lock = open(self.dir / "agent.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.state["agent"])
            except OSError as e:
                raise KsmlensError(f"cannot reach the guest agent: {e.strerror}",
                                   f"is VM {self.name!r} up? `ksmlens vm status`") from None
            s.sendall((json.dumps(req) + "\n").encode())
            buf = b""
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest agent gave no answer to {req['op']} "
                                       f"within {timeout:.0f} s")
                s.settimeout(min(left, 1.0))
                try:
                    chunk = s.recv(1 << 20)
                except socket.timeout:
                    if not self.alive():
                        self._dead_or("")
                    continue
                if not chunk:
                    self._dead_or("agent socket closed")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        continue
                    if reply.get("id") != rid:
                        continue  # a stale reply to a client that gave up
                    if not reply.get("ok"):
                        raise KsmlensError(f"guest agent: {reply.get('error')}", "")
                    return reply
        finally:
            try:
                s.close()
            except (NameError, UnboundLocalError):
                pass
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    def request(self, req: dict, timeout: float = 60.0) -> dict:
        """Like the agent protocol, but a hung guest becomes a one-line error."""
        try:
            return self._request(req, timeout)
        except TimeoutError as e:
            state = "unknown"
            try:
                with self.qmp(timeout=2) as q:
                    state = q.status()
            except KsmlensError:
                pass
            if state == "paused":
                raise KsmlensError(f"VM {self.name!r} is paused (QMP stop), so its agent "
                                   f"cannot answer {req.get('op')}",
                                   "resume it: QMP cont on " + self.state["control_qmp"]) \
                    from None
            raise KsmlensError(f"VM {self.name!r} is hung? {e} (run state {state})",
                               f"check {self.state['console_log']}; "
                               f"`ksmlens vm down --name {self.name}`") from None

    # -------------------------------------------------------- conveniences

    def run(self, argv, *, timeout: float = 120.0, stdin: str = "", check: bool = False,
            env: dict | None = None) -> RunResult:
        """Run ``argv`` as root in the guest; return its exit code and output."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        r = self.request({"op": "run", "argv": list(map(str, argv)), "stdin": stdin,
                          "timeout": timeout, "env": env or {}}, timeout=timeout + 15)
        res = RunResult(list(argv), r["rc"], r["stdout"], r["stderr"], r.get("timed_out", False))
        return res.check() if check else res

    def sh(self, script: str, timeout: float = 120.0) -> str:
        """Run a shell snippet in the guest, fail loudly, return its stdout."""
        return self.run(["/bin/sh", "-c", script], timeout=timeout, check=True).stdout

    def spawn(self, argv, *, cgroup: str | None = None, env: dict | None = None) -> dict:
        return self.request({"op": "spawn", "argv": list(map(str, argv)), "cgroup": cgroup,
                             "env": env or {}})

    def send(self, handle: int, line: str | None, timeout: float = 60.0) -> dict:
        return self.request({"op": "send", "handle": handle, "line": line,
                             "timeout": timeout}, timeout=timeout + 15)

    def kill(self, handle: int) -> dict:
        return self.request({"op": "kill", "handle": handle}, timeout=30)

    def read_file(self, path: str) -> str:
        return self.request({"op": "read_file", "path": path})["data"]

    def read_files(self, paths=(), globs=()) -> dict:
        """Read many small guest files in one round trip: {path: text or None}."""
        return self.request({"op": "read_files", "paths": list(paths),
                             "globs": list(globs)})["files"]

    def write_file(self, path: str, data: str) -> None:
        self.request({"op": "write_file", "path": path, "data": str(data)})

    def qmp(self, timeout: float = 10.0) -> QMP:
        """A QMP connection to ksmlens' control socket (not drgn's)."""
        if not self.alive():
            self._dead_or("")
        return QMP(self.state["control_qmp"], timeout=timeout)

    @contextlib.contextmanager
    def paused(self, timeout: float = 30.0):
        """Hold every vCPU still (QMP ``stop``) for the ``with`` block, then
        ``cont``, also on an exception. What drgn reads meanwhile is one
        instant of the guest."""
        with self.qmp(timeout=timeout) as q:
            q.stop()
            self._held = q
            try:
                yield self
            finally:
                self._held = None
                q.cont()

    def cpu_registers(self) -> list[dict]:
        """Each vCPU's registers (:meth:`ksmlens.lab.qmp.QMP.cpu_registers`)
        inside a :meth:`paused` block, on its QMP connection (the control
        socket serves one client); outside one, on a connection of its own
        (meaningful only if the guest is stopped)."""
        q = getattr(self, "_held", None)
        if q is not None:
            return q.cpu_registers()
        with self.qmp() as q:
            return q.cpu_registers()

    def status(self) -> dict:
        s = dict(self.state)
        s["running"] = self.alive()
        if s["running"]:
            try:
                with self.qmp(timeout=3) as q:
                    s["run_state"] = q.status()
            except KsmlensError:
                s["run_state"] = "unknown"
        return s

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()

    def __repr__(self):
        return f"<VM {self.name} {self.state.get('kernel_release')} pid={self.state.get('pid')}>"

