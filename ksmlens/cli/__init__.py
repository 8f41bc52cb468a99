"""The ``ksmlens`` command.

    ksmlens vm build [--variant V]        build a patched 6.12 kernel (cached)
    ksmlens vm up [--variant V] ...       boot it under QEMU (virtme-ng)
    ksmlens vm run [--detach] -- CMD...   run CMD as root in the guest
    ksmlens vm status [--json]            what runs, where its QMP socket is
    ksmlens vm down                       power off, leave no QEMU behind
    ksmlens scenario list                 the workloads that shape KSM state
    ksmlens scenario run NAME             run one to its merged state, checked
    ksmlens demo                          build, boot, run mremap, print counters
    ksmlens notebooks [NOTEBOOK...]       execute notebooks/*.ipynb against a VM into HTML
    ksmlens book [IPYNB...] [-o DIR]      the executed notebooks as a static site (Sphinx)
    ksmlens snapshot [-o FILE.json]       walk KSM state with drgn (guest paused)
    ksmlens report [--snapshot FILE]      stable nodes and processes, as tables
    ksmlens replay                        which mappings each rmap walk rule misses
    ksmlens smartscan                     SmartScan forecast, the union hazard
    ksmlens diff A.json B.json            what changed between two snapshots
    ksmlens check                         prove the walk against the kernel's counters
    ksmlens verify [--by reclaim]         predict, then let the kernel prove it
    ksmlens watch [-n K] [--scans N]      a snapshot per full scan, with diffs
    ksmlens selftests [--suite S]         the kernel's KSM selftests, walk checked while paused
    ksmlens matrix [--variant V]...       each scenario on each variant, verified: the README table
    ksmlens cost [--measure]              rmap_walk_ksm()'s work per KSM page and rule, counted

Kernel builds and VM state live in ~/.cache/ksmlens ($KSMLENS_CACHE).
"""

from __future__ import annotations

import argparse
import sys

from ksmlens.errors import KsmlensError

__all__ = ["main", "build_parser", "LAYERS"]

# one module per layer of commands, in the order `ksmlens --help` lists them
LAYERS = ("ksmlens.cli.lab", "ksmlens.cli.lens", "ksmlens.cli.experiments")


def build_parser() -> argparse.ArgumentParser:
    """The ``ksmlens`` parser: each module of :data:`LAYERS` adds its
    commands (``register(subparsers)``); a command's handler is ``fn``."""
    import importlib
    p = argparse.ArgumentParser(prog="ksmlens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name in LAYERS:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``ksmlens ARGV``; returns the exit code: the handler's (0 unless
    it says otherwise), 2 for a :class:`~ksmlens.errors.KsmlensError`
    (printed as one line, ``ksmlens: error: CAUSE: WHAT TO DO``, as argparse
    prints a usage error), 130 when interrupted."""
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a) or 0
    except KsmlensError as e:
        print(f"ksmlens: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ksmlens: interrupted", file=sys.stderr)
        return 130
