"""The lab VM's command lines, as pure functions (no process, no file).

virtme-ng builds the QEMU command line: ``vng --dry-run --verbose`` prints
it (host root shared read-only over 9p, rw overlays in the guest, the
``virtme.*`` virtio-serial ports) and ksmlens adds its own devices with
``--qemu-opts``. :func:`vng_argv` is the ``vng`` command for a
:class:`LaunchSpec`; :func:`qemu_argv` turns what that command printed into
the QEMU argv ksmlens starts itself (detached: ``vng`` needs a terminal).
:mod:`ksmlens.lab.vm` runs the one and starts the other.

A VM's directory holds its sockets (see :func:`sockets`): ``qmp.sock`` for
ksmlens, ``drgn.sock`` for the user's drgn, ``drgn-N.sock`` for ksmlens' own
drgn Programs, ``agent.sock`` for the guest agent, and ``ret`` for vng's
return-code port.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Literal

from ksmlens.errors import KsmlensError

Accel = Literal["kvm", "tcg"]   # what LaunchSpec.accel may be

__all__ = ["Accel", "LaunchSpec", "sockets", "vng_argv", "qemu_argv", "parse_mem", "split_cpus",
           "numa_nodes", "AGENT_PORT", "DRGN_POOL"]

AGENT_PORT = "org.ksmlens.agent"   # the guest agent's virtserialport name
DRGN_POOL = 3                      # extra QMP sockets for ksmlens' own drgn Programs


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """What a lab VM boots with.

    ``bzimage``: the kernel image. ``memory_mb``: guest memory in MiB.
    ``cpus``: vCPUs. ``numa``: NUMA nodes (memory split evenly, CPUs as
    evenly as they go). ``accel``: ``"kvm"`` or ``"tcg"`` (vng
    ``--disable-kvm``). ``vm_dir``: the VM's private directory (its sockets;
    need not exist). ``agent_cmd``: the shell command the guest runs as its
    init's payload (``vng --exec``). ``vng`` / ``qemu``: the programs' paths.
    ``arch``: the guest's architecture (an
    :data:`~ksmlens.kernel.arch.ARCHES` name); off the host's it boots
    ``root`` (``vng --arch --root``, :mod:`ksmlens.lab.rootfs`) with the
    host folders of ``rodirs`` (``"GUEST=HOST"``) mounted read-only.
    """

    bzimage: Path
    memory_mb: int
    cpus: int
    numa: int
    accel: Accel
    vm_dir: Path
    agent_cmd: str
    vng: str = "vng"
    qemu: str = "qemu-system-x86_64"
    arch: str = "x86_64"
    root: Path | None = None
    rodirs: tuple[str, ...] = ()


def parse_mem(memory: str | int) -> int:
    """``"2G"`` -> 2048, ``"1536M"`` -> 1536, ``512`` -> 512 (MiB);
    :class:`KsmlensError` for anything else."""
    if isinstance(memory, int):
        return memory
    m = str(memory).strip().upper()
    try:
        if m.endswith("G"):
            return int(float(m[:-1]) * 1024)
        if m.endswith("M"):
            return int(m[:-1])
        return int(m)
    except ValueError:
        raise KsmlensError(f"bad memory size {memory!r}", "use e.g. 2G or 1536M") from None


def split_cpus(cpus: int, nodes: int) -> list[tuple[int, int]]:
    """CPU ranges ``[(first, last), ...]`` of ``nodes`` nodes, the first
    nodes taking one more where ``cpus`` does not divide evenly."""
    if cpus < nodes:
        raise KsmlensError(f"--numa {nodes} needs --cpus >= {nodes}", "")
    per, out, first = cpus // nodes, [], 0
    for i in range(nodes):
        n = per + (1 if i < cpus % nodes else 0)
        out.append((first, first + n - 1))
        first += n
    return out


def numa_nodes(memory_mb: int, cpus: int, numa: int) -> list[tuple[int, int, int]]:
    """``[(memory_mb, first_cpu, last_cpu), ...]`` per node: memory split
    evenly, the last node taking the remainder."""
    if numa < 1:
        raise KsmlensError(f"--numa {numa}: a guest needs at least one node", "use --numa 1")
    cpu_sets = split_cpus(cpus, numa)
    per = memory_mb // numa
    sizes = [per] * (numa - 1) + [memory_mb - per * (numa - 1)]
    return [(sz, a, b) for sz, (a, b) in zip(sizes, cpu_sets)]


def sockets(vm_dir: Path) -> dict:
    """The VM directory's sockets: ``{"qmp", "drgn_qmp", "pool": [...], "agent", "ret"}``."""
    d = Path(vm_dir)
    return {"qmp": d / "qmp.sock", "drgn_qmp": d / "drgn.sock",
            "pool": [d / f"drgn-{i}.sock" for i in range(2, 2 + DRGN_POOL)],
            "agent": d / "agent.sock", "ret": d / "ret"}


def _extra_qemu_opts(vm_dir: Path) -> list[str]:
    s = sockets(vm_dir)
    # A QMP socket serves one client at a time: drgn.sock is left for the
    # user's own drgn; ksmlens' attach() takes the first free of the pool.
    return [
        "-qmp", f"unix:{s['qmp']},server=on,wait=off",
        "-qmp", f"unix:{s['drgn_qmp']},server=on,wait=off",
        *[a for p in s["pool"] for a in ("-qmp", f"unix:{p},server=on,wait=off")],
        "-device", "vmcoreinfo",
        "-device", "virtio-serial-pci,id=ksmlens-serial",
        "-chardev", f"socket,id=ksmlens-agent,path={s['agent']},server=on,wait=off",
        "-device", f"virtserialport,bus=ksmlens-serial.0,chardev=ksmlens-agent,"
                   f"name={AGENT_PORT}",
        "-no-reboot",
    ]


def vng_argv(spec: LaunchSpec) -> list[str]:
    """The ``vng --dry-run`` command that prints ``spec``'s QEMU command line."""
    if spec.accel not in ("kvm", "tcg"):
        raise KsmlensError(f"unknown accelerator {spec.accel!r}", "use auto, kvm or tcg")
    nodes = numa_nodes(spec.memory_mb, spec.cpus, spec.numa)
    argv = [spec.vng, "--dry-run", "--verbose", "--run", str(spec.bzimage), "--force-9p"]
    if spec.root is not None:
        # a foreign architecture: its own root, virtme-ng's shell init
        # (virtme-ng-init is a host binary), the host's folders it needs
        argv += ["--arch", spec.arch, "--root", str(spec.root)]
        for d in spec.rodirs:
            argv += ["--rodir", d]
    else:
        argv.append("--disable-microvm")
    # the guest starts in its root's "/" (vng takes --cwd as a host path in --root)
    cwd = str(spec.root) if spec.root is not None else "/"
    argv += ["--memory", f"{spec.memory_mb}M", "--cpus", str(spec.cpus), "--cwd", cwd,
             "--append", "oops=panic",          # vng appends panic=-1 itself
             "--exec", spec.agent_cmd]
    if spec.accel == "tcg":
        argv.append("--disable-kvm")
    if spec.numa > 1:
        for sz, a, b in nodes:
            argv += ["--numa", f"{sz}M,cpus={a}-{b}"]
    extra = _extra_qemu_opts(spec.vm_dir)
    if spec.arch == "arm64":
        # virtme-ng asks for -M virt (GICv2, 8 CPUs at most); QEMU merges a
        # second -machine into it: GICv3, as arm64 servers have
        extra += ["-machine", "gic-version=3"]
    argv.append(f"--qemu-opts={shlex.join(extra)}")
    return argv


def qemu_argv(spec: LaunchSpec, vng_stdout: str, vng_stderr: str = "") -> list[str]:
    """The QEMU argv to start, from what ``vng_argv(spec)`` printed: its last
    ``qemu-system`` line, split as the shell would, with ``spec.qemu`` as the
    program and vng's return-code port (a temp file vng deletes on exit)
    moved into the VM directory. :class:`KsmlensError` when vng printed no
    QEMU command (its last stderr line says why)."""
    lines = [l for l in vng_stdout.splitlines() if "qemu-system" in l]
    if not lines:
        err = vng_stderr.strip().splitlines()
        raise KsmlensError("virtme-ng printed no QEMU command line"
                           + (f": {err[-1]}" if err else ""),
                           "run the vng command with --verbose by hand to see why")
    argv = shlex.split(lines[-1])
    argv[0] = spec.qemu
    ret = sockets(spec.vm_dir)["ret"]
    return [re.sub(r"(id=ret,path=)[^,]+", lambda m: f"{m.group(1)}{ret}", a) for a in argv]
