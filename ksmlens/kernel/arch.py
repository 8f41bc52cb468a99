"""The architectures ksmlens builds, boots and reads: one :class:`Arch` record
each, every name an architecture goes by in one place.

An architecture has a different name for each tool: the kernel's ``ARCH=``
(``arm64``), ``uname -m`` (``aarch64``), Debian (``arm64``), drgn
(``Architecture.AARCH64``) and QEMU (``qemu-system-aarch64``). ``--arch``
takes any of them. The page tables each one reads are in
:mod:`ksmlens.kernel.pgtable` (x86-64) and :mod:`ksmlens.kernel.pgtable_arm64`.
"""

from __future__ import annotations

import dataclasses
import os

from ksmlens.errors import KsmlensError

__all__ = ["Arch", "ARCHES", "DEFAULT_ARCH", "X86_64", "ARM64", "get_arch", "host_arch",
           "arch_of_program", "arch_of_machine"]


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture.

    ``name``: the kernel's ``ARCH=`` and what ``--arch`` prints (``"x86_64"``,
    ``"arm64"``). ``srcarch``: its folder under ``arch/`` (``"x86"``).
    ``machine``: ``uname -m`` (``"aarch64"``). ``debian``: Debian's name
    (``dpkg --print-architecture``). ``drgn``: the member of
    ``drgn.Architecture``. ``cross_compile``: the ``CROSS_COMPILE`` prefix on
    an x86-64 host (``""``: native), from ``cross_package``. ``image``: the
    ``make`` target of the boot image and ``image_path`` where the tree has
    it. ``qemu`` / ``qemu_package``: the system emulator and its Debian
    package. ``config``: the fragment under ``vm/config/`` merged after the
    shared ``ksmlens.config`` (``""``: none). ``prefix``: the cache's name
    prefix for its builds (``""`` for x86-64, whose cache predates arm64).
    """

    name: str
    srcarch: str
    machine: str
    debian: str
    drgn: str
    cross_compile: str
    cross_package: str
    image: str
    image_path: str
    qemu: str
    qemu_package: str
    config: str
    prefix: str
    aliases: tuple[str, ...] = ()

    @property
    def gcc(self) -> str:
        """The C compiler for this architecture's user programs (the workload):
        ``gcc`` on a host of this architecture, the cross compiler elsewhere."""
        return "gcc" if host_arch() is self else f"{self.cross_compile}gcc"

    def make_args(self) -> list[str]:
        """``ARCH=`` (and ``CROSS_COMPILE=`` off the host's architecture) for make."""
        args = [f"ARCH={self.name}"]
        if self.cross_compile and host_arch() is not self:
            args.append(f"CROSS_COMPILE={self.cross_compile}")
        return args


X86_64 = Arch("x86_64", "x86", "x86_64", "amd64", "X86_64", "x86_64-linux-gnu-",
              "gcc-x86-64-linux-gnu", "bzImage", "arch/x86/boot/bzImage",
              "qemu-system-x86_64", "qemu-system-x86", "", "",
              aliases=("x86-64", "amd64", "x86"))
ARM64 = Arch("arm64", "arm64", "aarch64", "arm64", "AARCH64", "aarch64-linux-gnu-",
             "gcc-aarch64-linux-gnu", "Image", "arch/arm64/boot/Image",
             "qemu-system-aarch64", "qemu-system-arm", "arm64.config", "arm64-",
             aliases=("aarch64",))
ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64, ARM64)}
DEFAULT_ARCH = X86_64.name


def get_arch(name: str | Arch | None = None) -> Arch:
    """The record of ``name`` (any of its names; None: x86-64, the lab's
    default); :class:`KsmlensError` naming the known ones."""
    if isinstance(name, Arch):
        return name
    if name is None:
        return X86_64
    key = str(name).strip().lower()
    for a in ARCHES.values():
        if key == a.name or key in a.aliases or key == a.machine:
            return a
    raise KsmlensError(f"unknown architecture {name!r}",
                       f"choose one of {', '.join(ARCHES)} (--arch)")


def host_arch() -> Arch | None:
    """The architecture this host runs (``uname -m``), None if ksmlens has no record of it."""
    return arch_of_machine(os.uname().machine)


def arch_of_machine(machine: str) -> Arch | None:
    """The record whose ``uname -m`` is ``machine``, or None."""
    return next((a for a in ARCHES.values() if a.machine == machine), None)


def arch_of_program(prog) -> Arch:
    """The architecture of the kernel drgn reads; :class:`KsmlensError` in one
    line for one ksmlens does not read (its page tables are not decoded)."""
    import drgn
    platform = prog.platform
    if platform is None:
        raise KsmlensError("the program has no platform (no kernel loaded)",
                           "attach to a kernel first (ksmlens.lab.attach.attach)")
    for a in ARCHES.values():
        if platform.arch == getattr(drgn.Architecture, a.drgn):
            if not platform.flags & drgn.PlatformFlags.IS_LITTLE_ENDIAN:
                raise KsmlensError(f"a big-endian {a.name} kernel",
                                   "ksmlens reads little-endian kernels only")
            return a
    raise KsmlensError(f"page tables of a {platform.arch.name} kernel are not decoded by ksmlens",
                       f"ksmlens reads {' and '.join(ARCHES)} kernels")
