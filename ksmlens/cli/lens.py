"""The lens's commands: walk KSM's structures with drgn and read the walk.

    ksmlens snapshot [-o FILE.json]       walk KSM state with drgn (guest paused)
    ksmlens report [--snapshot FILE]      stable nodes and processes, as tables
    ksmlens replay                        which mappings each rmap walk rule misses
    ksmlens smartscan                     SmartScan forecast, the union hazard
    ksmlens diff A.json B.json            what changed between two snapshots

What they print comes from :mod:`ksmlens.views` (report, tables).
"""

from __future__ import annotations

import json
import sys

from ksmlens.cli.common import (SNAPSHOT, TARGET, Commands, arg, attach_target, snapshot_or_live,
                                walk_mode)

COMMANDS = Commands()
register = COMMANDS.register

MODE = arg("--mode", choices=["consistent", "live"], default=None,
           help="pause the guest for the walk (consistent, the default) or not (live; "
           "the only mode on /proc/kcore)")
RULES = ["stock", "v3", "stored"]


@COMMANDS.command(
    "snapshot", help="walk KSM state into a snapshot (tables; JSON or Parquet file)",
    description="Walk the stable tree, chains and dups, rmap_items and mm slots with drgn "
    "into tables (pandas DataFrames), the rmap walk replayed under every rule. consistent "
    "mode pauses the guest for the walk; live mode does not and counts races. -o x.json "
    "writes the JSON contract; any other name writes the columnar form (a zip of Parquet "
    "tables, ~40 bytes per rmap_item); report/replay/diff --snapshot read both.",
    args=(TARGET,
          arg("-o", "--output", metavar="PATH",
              help="write the snapshot here: JSON if PATH ends in .json, else columnar"),
          MODE,
          arg("--vmcore", metavar="FILE",
              help="instead dump the VM's memory to FILE (QMP dump-guest-memory)")))
def snapshot(a):
    from ksmlens.lab.attach import dump_vmcore
    from ksmlens.lens.snapshot import take_snapshot
    from ksmlens.views.report import summary
    if a.vmcore:
        from ksmlens.lab.vm import VM
        vm = VM(a.name)
        secs = dump_vmcore(vm, a.vmcore)
        print(f"vmcore written to {a.vmcore} (guest paused {secs:.2f} s); read it with "
              f"`ksmlens snapshot --target {a.vmcore} --vmlinux {vm.state['vmlinux']}`",
              file=sys.stderr)
        if not a.output:
            return 0
    prog = attach_target(a)
    snap = take_snapshot(prog, mode=walk_mode(a, prog))
    if a.output:
        fmt = snap.save(a.output)
        print(f"snapshot saved to {a.output} ({fmt})", file=sys.stderr)
    print(summary(snap))
    return 0


@COMMANDS.command(
    "report", help="readable tables: stable nodes, processes",
    description="From a walk (or a saved snapshot): the kernel and its KSM counters, one "
    "row per stable node (kind regular/chain/dup, kpfn, mapcount, sharers pid:rmap_items) "
    "and one per mm slot (rmap_items by state, items whose address >> PAGE_SHIFT is not "
    "their linear_page_index(), items ksmd's next pass frees unread, KSM zero pages, "
    "/proc/PID/ksm_stat).",
    args=(TARGET, SNAPSHOT, MODE,
          arg("--all", action="store_true", help="every stable node, not the first 50")))
def report(a):
    from ksmlens.views.report import process_table, stable_table, summary
    snap = snapshot_or_live(a)
    print(summary(snap))
    print()
    print(stable_table(snap, limit=None if a.all else 50))
    print()
    print(process_table(snap))
    return 0


@COMMANDS.command(
    "replay", help="which mappings each rmap walk rule finds or misses",
    description="Replay rmap_walk_ksm() for every KSM page under each rule: stock [0, "
    "ULONG_MAX], v3 [address >> PAGE_SHIFT], stored [the stored index: ->pgoff on union, "
    "->linear_page_index on v8], on the recorded anon_vma interval trees, both passes (search_new_forks). Lists the "
    "mapped mappings a rule misses.",
    args=(TARGET, SNAPSHOT,
          arg("--rule", choices=RULES, help="only this rule"),
          arg("--all", action="store_true", help="every miss, not the first 20")))
def replay(a):
    from ksmlens.views.report import replay_text
    print(replay_text(snapshot_or_live(a), a.rule, limit=None if a.all else 20))
    return 0


@COMMANDS.command(
    "smartscan", help="SmartScan forecast and the union hazard",
    description="From a snapshot: the pages_skipped increase over the next N full scans "
    "(the kernel's should_skip_rmap_item()/skip_age() replayed per rmap_item), and the "
    "STABLE rmap_items whose page is no longer KSM, with the age/remaining_skips SmartScan "
    "will read (on the union kernel: the stored pgoff's bytes). `ksmlens verify --smartscan "
    "N` checks a forecast against the kernel.",
    args=(TARGET, SNAPSHOT,
          arg("--scans", type=int, default=8, help="forecast horizon (default 8)"),
          arg("--all", action="store_true", help="every item")))
def smartscan(a):
    from ksmlens.views.report import smartscan_text
    print(smartscan_text(snapshot_or_live(a), a.scans, limit=None if a.all else 20))
    return 0


@COMMANDS.command(
    "diff", help="what changed between two saved snapshots",
    description="What changed between two saved snapshots of one kernel, per rmap_item "
    "(pid, address): appeared / dropped, merged (became STABLE) / unmerged, moved (STABLE "
    "on another stable node or kpfn), pgoff_status changed, SmartScan skips (the "
    "should_skip_rmap_item() model over the full scans between them), and the deltas of "
    "the KSM counters (pages_shared, pages_sharing, pages_skipped, ...).",
    args=(arg("a", help="earlier snapshot file (JSON or columnar)"),
          arg("b", help="later snapshot file (JSON or columnar)"),
          arg("--json", action="store_true", help="machine-readable")))
def diff(a):
    from ksmlens.experiments.watch import diff as snapshot_diff
    from ksmlens.lens.model import Snapshot
    from ksmlens.views.tables import diff_text
    d = snapshot_diff(Snapshot.load(a.a), Snapshot.load(a.b))
    print(json.dumps(d.to_dict(), indent=1) if a.json else diff_text(d))
    return 0
