"""Commands declared beside their handlers, and the arguments they share.

The pattern of drgn's ``@command(..., arguments=(argument(...), ...))``:
each layer's module (:mod:`ksmlens.cli.lab`, :mod:`ksmlens.cli.lens`,
:mod:`ksmlens.cli.experiments`) declares its commands on one
:class:`Commands` with the arguments written on the handler, and its
``register(subparsers)`` adds them to the ``ksmlens`` parser::

    COMMANDS = Commands()

    @COMMANDS.command("vm down", help="power off a VM; no QEMU process is left",
                      args=(NAME, arg("--all", action="store_true", help="every VM")))
    def vm_down(a): ...

    register = COMMANDS.register

A handler takes the parsed :class:`argparse.Namespace` and returns the exit
code (None: 0); it raises :class:`ksmlens.errors.KsmlensError` for anything
a user can get wrong, which :func:`ksmlens.cli.main` prints in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from ksmlens.kernel.variants import DEFAULT_VARIANT, VARIANTS
from ksmlens.lab.vm import DEFAULT_NAME

__all__ = ["Arg", "arg", "Commands", "NAME", "VARIANT", "TARGET", "SNAPSHOT", "attach_target",
           "snapshot_or_live", "walk_mode"]


@dataclasses.dataclass(frozen=True)
class Arg:
    """One ``add_argument(*flags, **kw)``."""
    flags: tuple[str, ...]
    kw: dict


def arg(*flags: str, **kw: Any) -> Arg:
    """An argument, as :meth:`argparse.ArgumentParser.add_argument` takes it."""
    return Arg(flags, kw)


def _flatten(args) -> list[Arg]:
    """Args, tuples of them, and callables returning them (evaluated when the
    parser is built: defaults read from the environment then)."""
    if callable(args):
        args = args()
    out = []
    for x in ((args,) if isinstance(args, Arg) else args):
        out += [x] if isinstance(x, Arg) else _flatten(x)
    return out


@dataclasses.dataclass
class _Command:
    path: tuple[str, ...]
    help: str
    description: str | None
    args: Any            # Args, tuples of them, callables returning them
    fn: Callable[[argparse.Namespace], int | None]


class Commands:
    """The commands of one CLI module, added to a parser by :meth:`register`.

    A command's path is one word (``"snapshot"``) or a group and a word
    (``"vm up"``); a group is declared once with :meth:`group`."""

    def __init__(self) -> None:
        self.commands: list[_Command] = []
        self.groups: dict[str, dict] = {}

    def group(self, name: str, *, help: str, description: str | None = None,
              metavar: str) -> None:
        """A command with subcommands (``ksmlens vm ...``); ``metavar`` names
        them in usage lines (``VMCOMMAND``)."""
        self.groups[name] = {"help": help, "description": description or help,
                             "metavar": metavar}

    def command(self, path: str, *, help: str, description: str | None = None,
                args: Iterable | Callable[[], Iterable] = ()) -> Callable:
        """Declare the decorated function as ``ksmlens PATH``: ``help`` is its
        line in the parent's list, ``description`` its ``--help`` (default:
        ``help``), ``args`` its arguments (:func:`arg`, tuples of them, or a
        function returning them, called when the parser is built)."""
        def deco(fn):
            self.commands.append(_Command(tuple(path.split()), help, description, args, fn))
            return fn
        return deco

    def register(self, subparsers: argparse._SubParsersAction) -> None:
        """Add every command (and its group) to ``subparsers``, the
        top-level ``add_subparsers()`` of ``ksmlens``."""
        made: dict[str, argparse._SubParsersAction] = {}
        for c in self.commands:
            parent = subparsers
            for g in c.path[:-1]:
                if g not in made:
                    spec = self.groups[g]
                    gp = parent.add_parser(g, help=spec["help"],
                                           description=spec["description"])
                    made[g] = gp.add_subparsers(dest=f"{g}cmd", required=True,
                                                metavar=spec["metavar"])
                parent = made[g]
            p = parent.add_parser(c.path[-1], help=c.help,
                                  description=c.description or _sentence(c.help))
            for a in _flatten(c.args):
                p.add_argument(*a.flags, **a.kw)
            p.set_defaults(fn=c.fn)


def _sentence(s: str) -> str:
    return s[:1].upper() + s[1:] + ("" if s.endswith(".") else ".")


# ------------------------------------------------------------------ shared arguments

VARIANT_HELP = "; ".join(f"{v.name}: {v.description}" for v in VARIANTS.values())

NAME = arg("--name", default=DEFAULT_NAME,
           help=f"which lab VM (default: {DEFAULT_NAME}); several can run side by side")
VARIANT = arg("--variant", "-V", default=DEFAULT_VARIANT, metavar="V",
              help=f"kernel variant (default: {DEFAULT_VARIANT}). {VARIANT_HELP}")
# what drgn reads: a lab VM live over QMP, a vmcore, or /proc/kcore
TARGET = (NAME,
          arg("--target", metavar="T", help="vm:NAME (default: the --name VM, live over "
              "QMP), a vmcore file, or /proc/kcore (this machine's running kernel, as root)"),
          arg("--vmlinux", help="vmlinux with debug info (default: the lab VM's; for "
              "/proc/kcore and vmcores searched by build ID: the lab's builds, "
              "/usr/lib/debug, /boot, /lib/modules/RELEASE, then drgn's finders)"))
SNAPSHOT = arg("--snapshot", "-s", metavar="FILE",
               help="read a saved snapshot (JSON or columnar) instead of walking")


def attach_target(a: argparse.Namespace):
    """The drgn :class:`~drgn.Program` for ``--target`` (default ``vm:NAME``)."""
    from ksmlens.lab.attach import attach
    return attach(a.target or f"vm:{a.name}", vmlinux=a.vmlinux)


_said_kcore = False


def walk_mode(a: argparse.Namespace, prog) -> str:
    """``--mode``, or its default: consistent (the guest paused for the walk),
    but live on /proc/kcore, which nothing can pause: said once per process
    on stderr (:data:`ksmlens.lab.host.KCORE_NOTE`); ``--mode consistent``
    there is refused in one line."""
    global _said_kcore
    import sys
    from ksmlens.errors import KsmlensError
    from ksmlens.lab.host import KCORE_NOTE, is_kcore
    mode = getattr(a, "mode", None)
    if not is_kcore(prog):
        return mode or "consistent"
    if mode == "consistent":
        raise KsmlensError("a consistent walk needs the kernel paused, and /proc/kcore is the "
                           "running kernel: nothing can pause it",
                           "leave --mode out (a live walk that counts races), hold ksmd with "
                           "`echo 0 > /sys/kernel/mm/ksm/run`, or walk a lab VM or a vmcore")
    if not _said_kcore:
        print(f"ksmlens: note: {KCORE_NOTE}", file=sys.stderr)
        _said_kcore = True
    return "live"


def snapshot_or_live(a: argparse.Namespace):
    """The snapshot saved in ``--snapshot FILE``, else a walk of the target
    (``--mode``, default consistent: the guest paused for the walk; live on
    /proc/kcore, see :func:`walk_mode`)."""
    from ksmlens.lens.model import Snapshot
    if getattr(a, "snapshot", None):
        return Snapshot.load(a.snapshot)
    from ksmlens.lens.snapshot import take_snapshot
    prog = attach_target(a)
    return take_snapshot(prog, mode=walk_mode(a, prog))
