"""Shared fixtures: real kernels, real guests, always cleaned up.

``lab(variant, numa=...)`` returns a booted :class:`ksmlens.lab.vm.VM` of that
variant. At most one test VM runs at a time (2 host cores, TCG): asking for
another variant powers the current one off first. Every VM a test started is
downed at session end, and QEMU processes are killed by pid even if a test
or the session itself fails.
"""

import atexit
import os
import signal

import pytest

import ksmlens.lab.kbuild as kbuild
from ksmlens.lab.vm import VM

_live: dict = {}
_started_pids: set = set()


def _kill_all():
    for vm in list(_live.values()):
        try:
            vm.down(quiet=True)
        except Exception:
            pass
    _live.clear()
    for pid in _started_pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


atexit.register(_kill_all)


def boot(variant: str, numa: int = 2, cpus: int = 2, memory: str = "2G") -> VM:
    key = (variant, numa, cpus, memory)
    vm = _live.get(key)
    if vm is not None and vm.alive():
        return vm
    for k in list(_live):
        _live.pop(k).down(quiet=True)
    name = f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-{os.getpid()}-{variant}"
    vm = VM.up(name, variant, numa=numa, cpus=cpus, memory=memory, quiet=False)
    _started_pids.add(vm.state["pid"])
    _live[key] = vm
    return vm


@pytest.fixture(scope="session")
def lab():
    """Factory: ``lab("union")`` -> a running VM of that variant (2 NUMA nodes)."""
    yield boot
    _kill_all()


@pytest.fixture(scope="session")
def kernels():
    """All four variants, built (or found in the cache)."""
    return {v: kbuild.build(v) for v in kbuild.VARIANTS}
