"""Get a drgn :class:`~drgn.Program` for a KSM kernel: live VM, vmcore or kcore.

    prog = attach()                    # the default lab VM, live over QMP
    prog = attach("vm:stock-test")     # another lab VM by name
    prog = attach("dump.vmcore")       # a QEMU dump-guest-memory file
    prog = attach("/proc/kcore")       # the running kernel (inside a guest, or as root)

For lab VMs the right vmlinux is found from the VM's state; for /proc/kcore
and vmcores it is searched for by build ID (the lab's builds, the standard
debug paths, then drgn's own finders: :mod:`ksmlens.lab.debuginfo`), or
given as ``vmlinux=`` (refused unless its build ID is the kernel's).
"""

from __future__ import annotations

import os
from pathlib import Path

from drgn import Program

from ksmlens.errors import KsmlensError
from ksmlens.lab.debuginfo import elf_build_id, load_kernel_debug_info

__all__ = ["attach", "check_ksm_kernel", "dump_vmcore", "elf_build_id"]


def _load_vmlinux(prog: Program, vmlinux, what: str) -> None:
    prog.cache["ksmlens_vmlinux_path"] = load_kernel_debug_info(prog, vmlinux, what=what)


def check_ksm_kernel(prog: Program) -> None:
    """Raise a one-line error unless the kernel has KSM and its debug info."""
    try:
        try:
            prog.type("struct ksm_rmap_item")
        except LookupError:     # its name before 21fbd59136e0 (6.1)
            prog.type("struct rmap_item")
    except LookupError:
        raise KsmlensError("the kernel's debug info has no struct ksm_rmap_item "
                           "(CONFIG_KSM off, or no DWARF debug info)",
                           "boot a kernel built with CONFIG_KSM=y and CONFIG_DEBUG_INFO") \
            from None
    try:
        prog["ksm_mm_head"]
    except KeyError:
        raise KsmlensError("the kernel has no ksm_mm_head symbol", "is CONFIG_KSM on?") \
            from None


_LIVE: dict[str, tuple[int, Program]] = {}   # VM name -> (QEMU pid, Program)


def _qmp_socket_free(path: str, timeout: float = 3.0) -> bool:
    """QEMU greets one QMP client at a time; a second one waits silently."""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return bool(s.recv(1))
    except (socket.timeout, OSError):
        return False
    finally:
        s.close()


def attach(target: str | None = None, *, vmlinux=None) -> Program:
    """A drgn Program for ``target`` with KSM checked (see the module doc).

    For a lab VM the Program is kept and returned again on the next call in
    this process: drgn holds the VM's QMP socket, which serves one client.
    """
    if target is None or target.startswith("vm:"):
        from ksmlens.lab.vm import DEFAULT_NAME, VM
        name = target[3:] if target else DEFAULT_NAME
        vm = VM(name)
        if not vm.alive():
            raise KsmlensError(f"VM {name!r} is not running",
                               f"`ksmlens vm down --name {name}` then `ksmlens vm up`")
        if vmlinux is not None and str(vmlinux) != vm.state["vmlinux"]:
            if not Path(vmlinux).exists():
                raise KsmlensError(f"vmlinux {vmlinux} does not exist", "give the right path")
            have, want = elf_build_id(vmlinux), elf_build_id(vm.state["vmlinux"])
            if have != want:
                raise KsmlensError(
                    f"{vmlinux} is not the running kernel's vmlinux (build ID "
                    f"{(have or b'').hex()[:16]}... vs {(want or b'').hex()[:16]}...)",
                    "use the vmlinux of the booted build (`ksmlens vm status`)")
        cached = _LIVE.get(name)
        if cached and cached[0] == vm.state["pid"] and vmlinux in (None, vm.state["vmlinux"]):
            cached[1].cache["ksmlens_vm"] = vm
            cached[1].cache["ksmlens_pause"] = vm.paused
            return cached[1]
        if cached:
            del _LIVE[name]
        sock = next((p for p in vm.state.get("qmp_pool", []) + [vm.state["qmp"]]
                     if _qmp_socket_free(p, 1.0)), None)
        if sock is None:
            raise KsmlensError(f"every drgn QMP socket of VM {name!r} is in use",
                               "close other drgn sessions or ksmlens processes on this VM")
        prog = Program()
        prog.set_qemu_qmp(sock)
        what = f"VM {name!r} ({vm.state['kernel_release']})"
        want_cache = vmlinux is None or str(vmlinux) == vm.state["vmlinux"]
        vmlinux = vmlinux or vm.state["vmlinux"]
        prog.cache["ksmlens_vm"] = vm
        # the lens pauses through this (ksmlens.lens.snapshot.register_pause),
        # without knowing what a VM is
        prog.cache["ksmlens_pause"] = vm.paused
        prog.cache["ksmlens_source"] = f"qmp:{sock}"
    elif target in ("kcore", "/proc/kcore"):
        if os.geteuid() != 0:
            raise KsmlensError("/proc/kcore needs root (CAP_SYS_RAWIO)",
                               "run ksmlens as root, e.g. sudo .venv/bin/ksmlens ...")
        prog = Program()
        try:
            prog.set_kernel()
        except (OSError, ValueError) as e:
            raise KsmlensError(f"cannot open the running kernel through /proc/kcore ({e})",
                               "the kernel needs CONFIG_PROC_KCORE=y; run as root") from None
        what = f"the running kernel {os.uname().release}"
        prog.cache["ksmlens_source"] = "kcore"
    else:
        prog = Program()
        if not os.path.exists(target):
            raise KsmlensError(f"no such vmcore {target}",
                               "take one with `ksmlens snapshot --vmcore FILE`")
        try:
            prog.set_core_dump(target)
        except Exception as e:
            raise KsmlensError(f"{target} is not a kernel core dump ({e})", "") from None
        what = f"vmcore {target}"
    _load_vmlinux(prog, vmlinux, what)
    check_ksm_kernel(prog)
    if target is None or target.startswith("vm:"):
        if want_cache:
            _LIVE[name] = (vm.state["pid"], prog)
    return prog


def dump_vmcore(vm, path) -> float:
    """Dump a lab VM's memory to an ELF vmcore (QMP dump-guest-memory).

    Returns the seconds the guest was paused. drgn reads the result with
    ``attach(path, vmlinux=...)``.
    """
    import time
    path = os.path.abspath(path)
    with vm.qmp(timeout=600) as q:
        t = time.monotonic()
        q.command("dump-guest-memory", paging=False, protocol=f"file:{path}")
        return time.monotonic() - t
