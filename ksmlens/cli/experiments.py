"""The experiments' commands: the walk and its predictions against the kernel.

    ksmlens check                         prove the walk against the kernel's counters
    ksmlens verify [--by reclaim]         predict, then let the kernel prove it
    ksmlens watch [-n K] [--scans N]      a snapshot per full scan, with diffs
    ksmlens selftests [--suite S]         the kernel's KSM selftests, walk checked while paused
    ksmlens matrix [--variant V]...       each scenario on each variant, verified: the README table
    ksmlens cost [--measure]              rmap_walk_ksm()'s work per KSM page and rule, counted

What they print comes from :mod:`ksmlens.views` (report, tables).
"""

from __future__ import annotations

import json
import sys
import time

from ksmlens.cli.common import (NAME, SNAPSHOT, TARGET, Commands, arg, attach_target,
                                snapshot_or_live, walk_mode)
from ksmlens.errors import KsmlensError

COMMANDS = Commands()
register = COMMANDS.register


@COMMANDS.command(
    "check", help="prove a walk against the kernel's own counters",
    description="Walk (guest paused) and compare with /sys/kernel/mm/ksm/* and "
    "/proc/PID/ksm_stat read in the guest: pages_shared, pages_sharing, pages_unshared, "
    "rmap_items, chains, dups, per-process counts. With --target /proc/kcore (as root): "
    "this machine's kernel and its own sysfs, the walk live (nothing pauses a running "
    "kernel; hold ksmd with run=0 for a steady state). Exits 1 on any mismatch.",
    args=(TARGET,))
def check(a):
    from ksmlens.experiments.check import check_vm, unreachable_note
    from ksmlens.lab.host import LocalKernel, is_kcore
    from ksmlens.lab.vm import VM
    from ksmlens.views.tables import check_text
    prog = attach_target(a)
    if is_kcore(prog):      # this machine's kernel: its own sysfs, a live walk
        rows, snap, info = check_vm(LocalKernel(), prog, mode=walk_mode(a, prog))
    else:
        vm = prog.cache.get("ksmlens_vm") or VM(a.name)
        rows, snap, info = check_vm(vm, prog)
    print(check_text(rows, snap, info, notes=[unreachable_note(snap)]))
    return 0 if all(r.ok for r in rows) else 1


@COMMANDS.command(
    "verify", help="predict which KSM pages the kernel's rmap walk cannot unmap, then "
    "migrate them and compare",
    description="From a paused snapshot (ksmd held), replay rmap_walk_ksm() under the "
    "kernel's rule on the guest's real anon_vma trees and write down, per KSM page, whether "
    "it can be unmapped; then move_pages(MPOL_MF_MOVE_ALL) every mapped KSM page to the "
    "other NUMA node and read the nodes back. Prints predicted / observed / agree per "
    "stable node; exits 1 on any disagreement. The prediction is made under every rule "
    "(stock, v3, and stored where the kernel has a stored index) and the kernel's outcome "
    "names the rules it behaved like ('this kernel unmaps like rule v3'), or says that this "
    "state cannot tell them apart. Needs a VM with 2 NUMA nodes (`ksmlens vm "
    "up --numa 2`). With --smartscan N: forecast SmartScan's skips over N full scans and "
    "compare with the kernel's pages_skipped and every rmap_item's age/remaining_skips.",
    args=(NAME,
          arg("--rule", choices=["stock", "v3", "stored"],
              help="predict with this rule instead of the kernel's own"),
          arg("--smartscan", type=int, metavar="N",
              help="verify a SmartScan forecast over N full scans instead"),
          arg("--by", choices=["migration", "reclaim", "hwpoison"], default="migration",
              help="the kernel's proof: migrate every KSM page to the other node (default), "
              "or reclaim it through memory.reclaim of its processes' cgroups (swap on zram, "
              "set up if missing): a mapping the walk misses stays mapped, the page is never "
              "freed; or hwpoison: run the mremap scenario and poison one KSM page with "
              "MADV_HWPOISON (who is unmapped, who gets SIGBUS; irreversible: a fresh VM "
              "each time)"),
          arg("--early-kill", action="store_true",
              help="with --by hwpoison: vm.memory_failure_early_kill=1 during the injection "
              "(every process mapping the page is signalled, not only the poisoning one)"),
          arg("--json", action="store_true", help="machine-readable"),
          arg("--all", action="store_true", help="every row")))
def verify(a):
    from ksmlens.experiments.verify import verify as run_verify
    from ksmlens.experiments.verify import verify_smartscan
    from ksmlens.lab.vm import VM
    from ksmlens.views.tables import smartscan_verify_table, verify_text
    vm = VM(a.name)
    if a.smartscan:
        r = verify_smartscan(vm, a.smartscan)
        if a.json:
            print(json.dumps({"release": r.release, "full_scans": r.full_scans,
                              "predicted": r.predicted, "observed": r.observed,
                              "agree": r.agree, "items": r.items}, indent=1))
        else:
            print(smartscan_verify_table(r, limit=None if a.all else 20))
        return 0 if r.agree else 1
    res = run_verify(vm, rule=a.rule, by=a.by, early_kill=a.early_kill)
    print(json.dumps(res.to_dict(), indent=1) if a.json else verify_text(res))
    return 0 if res.agree else 1


@COMMANDS.command(
    "watch", help="a paused snapshot per full scan, with diffs",
    description="Take --count paused snapshots, one after every --scans full scans of ksmd "
    "(or every --every seconds), printing what changed (items appeared/dropped/merged/"
    "unmerged/moved, SmartScan skips, counter deltas). -o DIR keeps the timeline "
    "(frame-NNNN.json).",
    args=(TARGET,
          arg("--count", "-n", type=int, default=5, help="snapshots (default 5)"),
          arg("--scans", type=int, default=1, help="full scans between snapshots"),
          arg("--every", type=float, metavar="S",
              help="seconds between snapshots instead of full scans"),
          arg("--pace", type=int, metavar="MS",
              help="set ksmd's sleep_millisecs to MS while watching (restored after), so "
              "frames are exactly --scans full scans apart even when ksmd scans faster than "
              "the host polls"),
          arg("--batches", metavar="PAGES,...",
              help="instead: hold ksmd and let it do one batch per frame, of PAGES pages "
              "(pages_to_scan) each in turn (e.g. 2000,12,48,48); sysfs is read around each "
              "walk; ends with the chains/dups table (ksmlens.views.tables.chain_growth_table)"),
          arg("-o", "--output", metavar="DIR", help="save the timeline here")))
def watch(a):
    from ksmlens.experiments.watch import watch as run_watch
    from ksmlens.views.report import summary
    if a.batches:
        try:
            pages = [int(p) for p in a.batches.split(",")]
        except ValueError:
            pages = []
        if not pages or min(pages) < 1:
            raise KsmlensError(f"--batches {a.batches!r}: give pages_to_scan per batch",
                               "e.g. --batches 2000,12,48,48")
    prog = attach_target(a)
    vm = prog.cache.get("ksmlens_vm")
    if vm is None:
        raise KsmlensError("watch needs a lab VM (it waits for ksmd's full scans)",
                           "use --name NAME, or diff saved snapshots with `ksmlens diff`")

    def show(s, d):
        print(summary(s).splitlines()[0] if d is None else d.summary(), flush=True)

    if a.batches:
        from ksmlens.experiments.watch import watch_batches
        from ksmlens.views.tables import chain_growth_table
        tl = watch_batches(prog, vm, pages, on_frame=show)
        print(chain_growth_table(tl.frames))
    else:
        tl = run_watch(prog, vm, count=a.count, scans=a.scans, seconds=a.every,
                       on_frame=show, pace_ms=a.pace)
    if a.output:
        print(f"timeline saved to {tl.save(a.output)}/frame-*.json", file=sys.stderr)
    return 0


def _selftests_args():
    from ksmlens.experiments.selftests import KSM_TESTS_MODES, MREMAP_SUITE, SUITES
    return (NAME,
            arg("--suite", action="append", choices=[*SUITES, MREMAP_SUITE],
                help="run only this suite (repeatable; default: both kernel suites)"),
            arg("--mode", action="append", choices=list(KSM_TESTS_MODES),
                help="ksm_tests mode (repeatable; default: every mode): " + "; ".join(
                    f"{k}: {' '.join(v)}" for k, v in KSM_TESTS_MODES.items())),
            arg("--min-checks", type=int, default=30, metavar="N",
                help="agreeing paused checks each suite needs (default 30)"),
            arg("--gap", type=float, default=0.1, metavar="S",
                help="pause again after a uniform random 0..S seconds (default 0.1)"),
            arg("--seed", type=int, help="seed the random pause moments"),
            arg("--no-verify", action="store_true",
                help="ksm_and_mremap without `ksmlens verify` beside it"),
            arg("--json", action="store_true", help="machine-readable"))


@COMMANDS.command(
    "selftests", help="the kernel's KSM selftests, the walk checked against the kernel at "
    "random pauses while they run",
    description="Build ksm_functional_tests and ksm_tests from Debian's linux-source-6.12 "
    "(cached), run them in the guest (ksm_tests once per mode) and, while they run, pause "
    "the guest at random moments and compare the walk with the kernel's own counters read "
    "in the same pause (globals, mm->ksm_*, rmap_hlist_len). Prints one summary line; exits "
    "0 only if both suites pass and every paused check agrees (a walk that meets ksmd "
    "mid-update is counted separately, as classified). --suite ksm_and_mremap runs the "
    "project's equivalent of the kernel's migrate.ksm_and_mremap (rmap.c, v7.3) beside "
    "`ksmlens verify` (needs 2 NUMA nodes). The suites unmerge everything in the guest "
    "(run=2); the KSM knobs are put back.",
    args=_selftests_args)
def selftests(a):
    from ksmlens.experiments.selftests import (MREMAP_SUITE, SUITES, run_mremap_selftest,
                                               run_selftests)
    from ksmlens.lab.vm import VM
    vm = VM(a.name)
    suites = a.suite or list(SUITES)
    kernel = [s for s in suites if s in SUITES]
    ok, parts, doc = True, [], {}
    if kernel:
        res = run_selftests(vm, suites=kernel, modes=a.mode, min_checks=a.min_checks,
                            gap=(0.0, a.gap), seed=a.seed,
                            out=None if a.json else sys.stderr)
        ok = res.ok
        parts.append(res.summary())
        doc = res.to_dict()
    if MREMAP_SUITE in suites:
        m = run_mremap_selftest(vm, with_verify=not a.no_verify)
        ok = ok and m.passed and (m.verify is None or m.verify["agree"])
        parts.append(m.summary())
        doc["ksm_and_mremap"] = {"outcome": m.outcome, "rc": m.rc, "output": m.output,
                                 "merged": m.merged, "verify": m.verify,
                                 "summary": m.summary()}
    if a.json:
        doc["ok"] = ok
        print(json.dumps(doc, indent=1))
    else:     # one line: the kernel suites' summary, then ksm_and_mremap's
        print("; ".join(parts) if kernel else "selftests: " + parts[0])
    return 0 if ok else 1


def _matrix_args():
    from ksmlens.experiments.matrix import MATRIX_BY, MATRIX_SCENARIOS
    from ksmlens.kernel.variants import VARIANTS
    return (arg("--variant", "-V", action="append", metavar="V",
                help=f"a kernel variant, built-in or built with `vm build --source` "
                f"(repeatable; default: {', '.join(VARIANTS)})"),
            arg("--scenario", "-S", action="append", metavar="S",
                help=f"a scenario (repeatable; default: {', '.join(MATRIX_SCENARIOS)})"),
            arg("--by", action="append", choices=list(MATRIX_BY),
                help="the kernel's proof: migration (move_pages), reclaim (memory.reclaim), "
                "hwpoison (MADV_HWPOISON on the mremap scenario, last on each guest: a "
                "poisoned page stays poisoned) (repeatable; default: migration and reclaim)"),
            arg("-o", "--output", metavar="DIR",
                help="write DIR/matrix.json and DIR/matrix.png (default: out/matrix; with "
                "--from: the picture only, and only if given)"),
            arg("--from", dest="from_file", metavar="FILE",
                help="do not run: render a saved matrix.json (table, picture, --readme)"),
            arg("--readme", nargs="?", const="README.md", metavar="README",
                help="rewrite the marked matrix block of README.md (or the file given) "
                "with this matrix's table"),
            arg("--arch", action="append", metavar="ARCH",
                help="the guests' architecture: x86_64, arm64 (repeatable, run in turn; "
                "default: x86_64)"),
            arg("--into", metavar="FILE",
                help="add this run's cells to the saved matrix FILE, each replacing the cell "
                "of the same arch, variant, scenario and proof, and save it there (with its "
                "matrix.png): e.g. `--arch arm64 --into docs/matrix.json --readme` adds "
                "arm64's rows"),
            arg("--name", default="matrix", help="VM name prefix (default: matrix)"),
            arg("--json", action="store_true", help="print the JSON instead of the table"))


@COMMANDS.command(
    "matrix", help="run each scenario on each kernel variant and verify it: the README's "
    "table of what the kernels do",
    description="Boot each variant (two NUMA nodes, one guest at a time), run each scenario "
    "to its last step and `verify` it by migration and, from a fresh run, by reclaim; print "
    "per cell what the kernel did (KSM pages pinned or moved, freed or kept; mappings "
    "unmapped or kept), whether the prediction agreed and which walk rules the kernel "
    "behaved like. Saves DIR/matrix.json and DIR/matrix.png; --readme rewrites README.md's "
    "marked table from it. Exits 1 if any prediction disagreed.",
    args=_matrix_args)
def matrix(a):
    from pathlib import Path
    from ksmlens.experiments.matrix import DEFAULT_BY, MATRIX_SCENARIOS, Matrix, run_matrix
    from ksmlens.kernel.variants import VARIANTS
    from ksmlens.views.plots import matrix_figure
    from ksmlens.views.tables import matrix_markdown, matrix_table, replace_marked_block
    from ksmlens.kernel.arch import DEFAULT_ARCH, get_arch
    archs = [get_arch(x).name for x in (a.arch or [DEFAULT_ARCH])]   # unknown: one line
    base = Matrix.load(a.into) if a.into else None     # refused before anything boots
    if a.from_file:
        if a.variant or a.scenario or a.by or a.arch or a.into:
            raise KsmlensError("--from renders a saved matrix: --variant/--scenario/--by/"
                               "--arch/--into select what to run", "drop them, or drop --from")
        m = Matrix.load(a.from_file)
        if a.output:
            out = Path(a.output)
            out.mkdir(parents=True, exist_ok=True)
            matrix_figure(m).savefig(out / "matrix.png", dpi=100)
            print(f"matrix: saved {out / 'matrix.png'}", file=sys.stderr)
    else:
        def show(c):
            print(f"matrix: {c.arch} {c.variant} {c.scenario} by {c.by}: {c.outcome}, "
                  f"{c.pages_stayed}/{c.pages} stay"
                  f"{', like ' + (','.join(c.matches) or 'none') if c.candidates else ''}"
                  f"{'' if c.agree else ', DISAGREES'} ({c.seconds:.1f} s)",
                  file=sys.stderr, flush=True)
        m = base if base is not None else Matrix([])
        for arch in archs:
            m = m.merged(run_matrix(a.variant or list(VARIANTS),
                                    a.scenario or list(MATRIX_SCENARIOS),
                                    a.by or list(DEFAULT_BY), name=a.name, on_cell=show,
                                    arch=arch))
        m.meta["date"] = time.strftime("%Y-%m-%d")
        json_path = Path(a.into) if a.into else Path(a.output or "out/matrix") / "matrix.json"
        out = Path(a.output) if a.output else json_path.parent
        m.save(json_path)
        fig = matrix_figure(m)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "matrix.png", dpi=100)
        print(f"matrix: saved {json_path} and {out / 'matrix.png'}", file=sys.stderr)
    if a.readme:
        p = Path(a.readme)
        if not p.exists():
            raise KsmlensError(f"no {p}", "run from the checkout, or give --readme PATH")
        p.write_text(replace_marked_block(p.read_text(), matrix_markdown(m)))
        print(f"matrix: rewrote the matrix block of {p}", file=sys.stderr)
    print(json.dumps(m.to_dict(), indent=1) if a.json else matrix_table(m))
    return 0 if m.agree else 1


@COMMANDS.command(
    "cost", help="rmap_walk_ksm()'s work per KSM page and rule: the pages that would hold "
    "the anon_vma lock longest; --measure: the kernel counts it",
    description="Predict, from the anon_vma interval trees of a snapshot (live guest, "
    "vmcore, /proc/kcore or a saved file), how much work rmap_walk_ksm() does for each KSM "
    "page under each rule (stock [0, ULONG_MAX], v3 [address >> PAGE_SHIFT], stored [the "
    "stored index]): the VMAs the interval tree yields (returned), those the vm_start/vm_end "
    "check skips, the rmap_one calls, the mappings missed; for a walk that never stops "
    "early (--walk full, the default) or as migration (try_to_migrate, which stops once the "
    "page is unmapped, then remove_migration_ptes), reclaim (folio_referenced, "
    "try_to_unmap) or memory failure (collect_procs_ksm: the tree once per rmap_item and "
    "collected process, then try_to_unmap) would run it. Prints the worst pages and the "
    "totals. --measure (a lab VM): hold ksmd, predict, then make the kernel walk (--by "
    "migrate, reclaim or hwpoison) with tracefs kprobes counting each walk's interval-tree "
    "calls, rmap_one calls and duration in the kernel; prints predicted against counted, "
    "exits 1 on any difference. Durations include the probes' cost: reported, never "
    "judged.",
    args=(TARGET, SNAPSHOT,
          arg("--rule", action="append", choices=["stock", "v3", "stored"],
              help="predict under this rule (repeatable; default: every rule the kernel "
              "can have)"),
          arg("--walk", choices=["full", "migrate", "reclaim", "hwpoison"], default="full",
              help="which kernel work: full (no early stop, the worst case; default), "
              "migrate, reclaim, hwpoison (memory failure: collect_procs_ksm(), then "
              "try_to_unmap())"),
          arg("--top", type=int, default=20, metavar="K", help="the K worst pages (default 20)"),
          arg("--measure", action="store_true",
              help="count the walks in the guest kernel (tracefs kprobes) and compare"),
          arg("--by", choices=["migrate", "reclaim", "hwpoison"], default="migrate",
              help="with --measure: the walks to drive. migrate: move_pages() to the other "
              "node (2 NUMA nodes); reclaim: memory.reclaim of the processes' cgroups (swap "
              "on zram); hwpoison: start a many-vmas run (2,000 VMAs, split) and "
              "madvise(MADV_HWPOISON) one of its KSM pages: irreversible, use a fresh VM"),
          arg("--early-kill", action="store_true",
              help="--walk/--by hwpoison: assume (set, while poisoning) "
              "vm.memory_failure_early_kill=1: every process is collected"),
          arg("--json", action="store_true", help="machine-readable"),
          arg("--all", action="store_true", help="every page / walk")))
def cost(a):
    from ksmlens.analysis.cost import cost_totals, walk_cost, worst_pages
    from ksmlens.views.tables import cost_measure_text, cost_table, cost_totals_table
    if a.measure:
        from ksmlens.experiments.cost import measure_cost
        from ksmlens.lab.vm import VM
        if a.snapshot or (a.target and not a.target.startswith("vm:")):
            raise KsmlensError("--measure drives walks in a lab VM: not in a snapshot, a "
                               "vmcore or /proc/kcore", "leave --snapshot/--target out, or "
                               "give --target vm:NAME")
        vm = VM(a.target[3:] if a.target else a.name)
        res = measure_cost(vm, by=a.by, rules=a.rule, early_kill=a.early_kill)
        print(json.dumps(res.to_dict(), indent=1) if a.json else
              cost_measure_text(res, limit=None if a.all else 20))
        return 0 if res.agree else 1
    snap = snapshot_or_live(a)
    c = walk_cost(snap, a.rule, kinds=(a.walk,), early_kill=True if a.early_kill else None)
    rules = list(c["rule"].unique())
    worst = worst_pages(c, None if a.all else a.top)
    totals = cost_totals(c)
    if a.json:
        print(json.dumps({"release": snap.kernel.release, "walk": a.walk, "rules": rules,
                          "pages": json.loads(worst.to_json(orient="records")),
                          "totals": json.loads(totals.to_json(orient="records"))}, indent=1))
        return 0
    print(f"{snap.kernel.release}: {c['node'].nunique()} KSM pages; VMAs the anon_vma "
          f"interval tree yields per {a.walk} walk (the anon_vma lock is held meanwhile), "
          "worst first")
    print(cost_table(worst, rules))
    print()
    print(cost_totals_table(totals))
    return 0
