"""The ``ksmlens`` command.

    ksmlens vm build [--variant V]        build a patched 6.12 kernel (cached)
    ksmlens vm up [--variant V] ...       boot it under QEMU (virtme-ng)
    ksmlens vm run [--detach] -- CMD...   run CMD as root in the guest
    ksmlens vm status [--json]            what runs, where its QMP socket is
    ksmlens vm down                       power off, leave no QEMU behind
    ksmlens scenario list                 the workloads that shape KSM state
    ksmlens scenario run NAME             run one to its merged state, checked
    ksmlens demo                          build, boot, run mremap, print counters
    ksmlens snapshot [-o FILE.json]       walk KSM state with drgn (guest paused)
    ksmlens check                         prove the walk against the kernel's counters
    ksmlens report [--snapshot FILE]      stable nodes and processes, as tables
    ksmlens notebooks [NOTEBOOK...]       execute notebooks/*.ipynb against a VM into HTML
    ksmlens replay                        which mappings each rmap walk rule misses
    ksmlens verify [--by reclaim]         predict, then let the kernel prove it
    ksmlens smartscan                     SmartScan forecast, the union hazard
    ksmlens watch [-n K] [--scans N]      a snapshot per full scan, with diffs
    ksmlens diff A.json B.json            what changed between two snapshots
    ksmlens selftests [--suite S]         the kernel's KSM selftests, walk checked while paused

Kernel builds and VM state live in ~/.cache/ksmlens ($KSMLENS_CACHE).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import ksmlens.lab.kbuild as kbuild
from ksmlens.errors import KsmlensError
from ksmlens.kernel.variants import DEFAULT_VARIANT, VARIANTS

VARIANT_HELP = "; ".join(f"{v.name}: {v.description}" for v in VARIANTS.values())


def _add_name(p):
    from ksmlens.lab.vm import DEFAULT_NAME
    p.add_argument("--name", default=DEFAULT_NAME,
                   help=f"which lab VM (default: {DEFAULT_NAME}); several can run side by side")


def _add_variant(p, default=DEFAULT_VARIANT):
    p.add_argument("--variant", "-V", default=default, metavar="V",
                   help=f"kernel variant (default: {default}). {VARIANT_HELP}")


def cmd_vm_build(a):
    variants = list(VARIANTS) if a.all else [a.variant]
    for v in variants:
        k = kbuild.build(v, force=a.force, jobs=a.jobs)
        print(f"{k.variant}\t{k.release}\t{k.bzimage}\t{k.vmlinux}")
    return 0


def cmd_vm_up(a):
    from ksmlens.lab.vm import VM
    vm = VM.up(a.name, a.variant, memory=a.memory, cpus=a.cpus, numa=a.numa,
               accel=a.accel, boot_timeout=a.timeout)
    s = vm.status()
    print(f"{s['name']}: {s['kernel_release']} up in {s['boot_seconds']} s under "
          f"{s['accel'].upper()} ({s['accel_reason']}); drgn: drgn --qemu {s['qmp']} "
          f"-s {s['vmlinux']}")
    return 0


def cmd_vm_run(a):
    from ksmlens.lab.vm import VM
    argv = a.cmd
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise KsmlensError("no command given", "usage: ksmlens vm run [--detach] -- CMD...")
    vm = VM(a.name)
    if a.detach:
        r = vm.spawn(argv)
        print(f"started pid {r['pid']} (handle {r['handle']}) in {a.name}")
        return 0
    stdin = sys.stdin.read() if a.stdin else ""
    r = vm.run(argv, timeout=a.timeout, stdin=stdin)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if r.timed_out:
        print(f"ksmlens: {shlex.join(argv)} timed out after {a.timeout} s (killed)",
              file=sys.stderr)
        return 124
    return r.rc


def cmd_vm_status(a):
    from ksmlens.lab.vm import VM, list_vms
    if a.all:
        vms = list_vms()
        if a.json:
            print(json.dumps(vms, indent=2))
        else:
            for s in vms:
                print(f"{s['name']}\t{s['kernel_release']}\t{s['accel']}\t"
                      f"{'running' if s['running'] else 'dead'}\tpid {s['pid']}")
        return 0
    s = VM(a.name).status()
    if a.json:
        print(json.dumps(s, indent=2))
    else:
        for k in ("name", "variant", "kernel_release", "accel", "accel_reason", "running",
                  "run_state", "pid", "qmp", "vmlinux", "console_log", "memory_mb",
                  "cpus", "numa_nodes", "boot_seconds"):
            if k in s:
                print(f"{k:15} {s[k]}")
    return 0 if s["running"] else 1


def cmd_vm_down(a):
    from ksmlens.lab.vm import VM, list_vms
    names = [s["name"] for s in list_vms()] if a.all else [a.name]
    for n in names:
        VM(n).down()
        print(f"{n}: down")
    return 0


def cmd_scenario_list(a):
    from ksmlens.lab.scenarios import SCENARIOS
    for s in SCENARIOS.values():
        print(f"{s.name:10} {s.summary}")
        print(f"{'':10}   steps: {', '.join(st.name for st in s.steps)}")
    return 0


def cmd_scenario_run(a):
    from ksmlens.lab.scenarios import get_scenario, run_scenario
    from ksmlens.lab.vm import VM
    scn = get_scenario(a.scenario)
    vm = VM(a.name)
    run_scenario(vm, scn, keep=a.keep, out=sys.stdout)
    return 0


def cmd_demo(a):
    """The main job: build + boot the default variant, run the mremap scenario."""
    from ksmlens.lab.scenarios import run_scenario
    from ksmlens.lab.vm import VM, list_vms
    t0 = time.monotonic()
    k = kbuild.build(a.variant)
    print(f"demo: kernel {k.release} ready ({time.monotonic() - t0:.0f} s)")
    running = {s["name"]: s for s in list_vms() if s["running"]}
    started = False
    if a.name in running and running[a.name]["variant"] == a.variant:
        vm = VM(a.name)
        print(f"demo: using VM {a.name!r} that is already up")
    else:
        vm = VM.up(a.name, a.variant, numa=2)
        started = True
        s = vm.status()
        print(f"demo: VM {a.name!r} up in {s['boot_seconds']} s under {s['accel'].upper()} "
              f"({s['accel_reason']})")
    try:
        print("demo: scenario mremap (merge, mremap, re-merge); the kernel's KSM counters:")
        run_scenario(vm, "mremap", out=sys.stdout)
    finally:
        if started and not a.keep:
            vm.down()
            print(f"demo: VM {a.name!r} is down")
    if a.keep or not started:
        print(f"demo: the VM is still up: `ksmlens vm status --name {a.name}`, "
              f"`ksmlens vm down --name {a.name}`")
    print(f"demo: done in {time.monotonic() - t0:.0f} s")
    return 0


def _attach(a):
    from ksmlens.lab.attach import attach
    target = a.target
    if target is None:
        target = f"vm:{a.name}"
    return attach(target, vmlinux=a.vmlinux)


def cmd_snapshot(a):
    from ksmlens.views.report import summary
    from ksmlens.lens.snapshot import take_snapshot
    from ksmlens.lab.attach import dump_vmcore
    if a.vmcore:
        from ksmlens.lab.vm import VM
        vm = VM(a.name)
        secs = dump_vmcore(vm, a.vmcore)
        print(f"vmcore written to {a.vmcore} (guest paused {secs:.2f} s); read it with "
              f"`ksmlens snapshot --target {a.vmcore} --vmlinux {vm.state['vmlinux']}`",
              file=sys.stderr)
        if not a.output:
            return 0
    prog = _attach(a)
    snap = take_snapshot(prog, mode=a.mode)
    if a.output:
        snap.save(a.output)
        print(f"snapshot saved to {a.output}", file=sys.stderr)
    print(summary(snap))
    return 0


def cmd_check(a):
    from ksmlens.experiments.check import check_vm, format_rows, unreachable_note
    from ksmlens.lab.vm import VM
    prog = _attach(a)
    vm = prog.cache.get("ksmlens_vm") or VM(a.name)
    rows, snap, info = check_vm(vm, prog)
    print(format_rows(rows))
    note = unreachable_note(snap)
    if note:
        print(f"note: {note}")
    if info.get("note"):
        print(f"note: {info['note']}")
    if info.get("mid_update_seen"):
        print(f"note: {info['mid_update_seen']} paused walk(s) landed in a half-done KSM "
              "update and were taken again")
    bad = [r for r in rows if not r.ok]
    print(f"check: {len(rows) - len(bad)}/{len(rows)} agree "
          f"(walk of {len(snap.rmap_items)} rmap_items, guest paused "
          f"{snap.meta['paused_seconds']:.3f} s, attempt {info['attempts']})")
    return 1 if bad else 0


def cmd_report(a):
    from ksmlens.views.report import process_table, stable_table, summary
    snap = _snap_or_live(a)
    print(summary(snap))
    print()
    print(stable_table(snap, limit=None if a.all else 50))
    print()
    print(process_table(snap))
    return 0


def _snap_or_live(a):
    from ksmlens.lens.model import Snapshot
    if getattr(a, "snapshot", None):
        return Snapshot.load(a.snapshot)
    from ksmlens.lens.snapshot import take_snapshot
    return take_snapshot(_attach(a), mode=getattr(a, "mode", "consistent"))


def cmd_verify(a):
    from ksmlens.experiments.verify import verify, verify_smartscan
    from ksmlens.lab.vm import VM
    vm = VM(a.name)
    if a.smartscan:
        r = verify_smartscan(vm, a.smartscan)
        if a.json:
            print(json.dumps({"release": r.release, "full_scans": r.full_scans,
                              "predicted": r.predicted, "observed": r.observed,
                              "agree": r.agree, "items": r.items}, indent=1))
        else:
            print(r.table(limit=None if a.all else 20))
        return 0 if r.agree else 1
    res = verify(vm, rule=a.rule, by=a.by)
    if a.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        print(res.table())
        if a.by == "reclaim":
            rc = res.extra["reclaim"]
            print(f"(predicted from a paused snapshot in {res.seconds['predict']} s, then "
                  f"memory.reclaim of {', '.join(rc['cgroups'])}: {rc['rounds']} rounds, "
                  f"{res.seconds['reclaim']} s; per page: {sum(p['agree'] for p in res.pages)}"
                  f"/{len(res.pages)} mappings as predicted)")
        else:
            print(f"(predicted from a paused snapshot in {res.seconds['predict']} s, then "
                  f"move_pages(MPOL_MF_MOVE_ALL) to the other node: "
                  f"{res.seconds['migrate']} s)")
    return 0 if res.agree else 1


def cmd_replay(a):
    from ksmlens.analysis.core import RULE_HELP, RULES, walk_misses
    snap = _snap_or_live(a)
    rules = [a.rule] if a.rule else [r for r in RULES
                                     if r != "stored" or snap.kernel.has_stored_pgoff]
    print(f"{snap.kernel.release}: rmap_walk_ksm() uses "
          f"{snap.kernel.walk_rule or 'an unknown rule'!s}")
    for r in RULES:
        mark = ("  (n/a: struct ksm_rmap_item has no pgoff)"
                if r == "stored" and not snap.kernel.has_stored_pgoff else "")
        print(f"  {r:7} {RULE_HELP[r]}{mark}")
    nodes = [n for n in snap.nodes() if n.kind != "chain"]
    for r in rules:
        misses = walk_misses(snap, r)
        bad = {m["node"] for m in misses}
        print(f"\nrule {r}: {len(nodes) - len(bad)}/{len(nodes)} KSM pages: every mapping "
              f"found; {len(bad)} pages miss {len(misses)} mappings")
        for m in misses[: None if a.all else 20]:
            print(f"  node {m['node']} kpfn {m['kpfn']:#x}: pid {m['pid']} "
                  f"{m['address']:#x} (VMA {m['vma_start']:#x}-{m['vma_end']:#x} "
                  f"vm_pgoff {m['vm_pgoff']:#x}, pass {m['pass']})")
        if len(misses) > 20 and not a.all:
            print(f"  ... {len(misses) - 20} more (--all)")
    return 0


def cmd_smartscan(a):
    from ksmlens.analysis.core import smartscan_forecast, union_hazard
    snap = _snap_or_live(a)
    fc = smartscan_forecast(snap, a.scans)
    deltas = fc["pages_skipped_delta"]
    print(f"{snap.kernel.release}: smart_scan={snap.counters.get('smart_scan')} "
          f"full_scans={snap.scan.get('seqnr')} pages_skipped={snap.counters.get('pages_skipped')}")
    print("forecast pages_skipped increase after n more full scans: " +
          ", ".join(f"n={n}: +{d}" for n, d in enumerate(deltas) if n))
    hz = union_hazard(snap)
    if hz:
        print(f"\n{len(hz)} STABLE rmap_items on pages that are no longer KSM "
              "(ksmd's next visit runs should_skip_rmap_item() on them):")
        for h in hz[: None if a.all else 20]:
            if h["smartscan_reads_stable"] is False:
                what = "SmartScan does not read a STABLE item (v8); its removal zeroes them"
            else:
                src = "the stored pgoff's bytes" if h["hazard"] else "its own fields"
                what = (f"reads age={h['age']} remaining_skips={h['remaining_skips']} "
                        f"from {src}")
            print(f"  pid {h['pid']} {h['address']:#x}: {what}; next visit "
                  f"{h['next_visit']}, then age={h['age_after']} skips={h['skips_after']}")
    return 0


def cmd_watch(a):
    from ksmlens.experiments.watch import watch
    from ksmlens.views.report import summary
    prog = _attach(a)
    vm = prog.cache.get("ksmlens_vm")
    if vm is None:
        raise KsmlensError("watch needs a lab VM (it waits for ksmd's full scans)",
                           "use --name NAME, or diff saved snapshots with `ksmlens diff`")

    def show(s, d):
        print(summary(s).splitlines()[0] if d is None else d.summary(), flush=True)

    tl = watch(prog, vm, count=a.count, scans=a.scans, seconds=a.every, on_frame=show,
               pace_ms=a.pace)
    if a.output:
        print(f"timeline saved to {tl.save(a.output)}/frame-*.json", file=sys.stderr)
    return 0


def cmd_diff(a):
    from ksmlens.lens.model import Snapshot
    from ksmlens.experiments.watch import diff
    d = diff(Snapshot.load(a.a), Snapshot.load(a.b))
    if a.json:
        print(json.dumps(d.to_dict(), indent=1))
        return 0
    print(d.summary())
    for what in ("appeared", "dropped", "merged", "unmerged", "moved", "pgoff_changed"):
        v = getattr(d, what)
        if v:
            print(f"  {what:13} " + " ".join(f"{p}:{addr:#x}" for p, addr in v[:8])
                  + (f" ... ({len(v)})" if len(v) > 8 else ""))
    return 0


def cmd_selftests(a):
    from ksmlens.experiments.selftests import MREMAP_SUITE, SUITES, run_mremap_selftest, run_selftests
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


def cmd_notebooks(a):
    """Execute the notebooks against one VM (booted once if not up) into HTML."""
    from pathlib import Path
    from ksmlens.views.notebook import Lab, notebook_paths, run_notebook
    paths = [Path(p) for p in a.notebooks] or notebook_paths()
    if not paths:
        raise KsmlensError("no notebooks found", "expected notebooks/*.ipynb in the checkout")
    for p in paths:
        if not p.exists():
            raise KsmlensError(f"no notebook {p}", "give paths like notebooks/01-tour.ipynb")
    out = Path(a.out)
    t0 = time.monotonic()
    lab = Lab.open(a.name)      # the notebooks reuse it; downed at the end if booted here
    failed = []
    try:
        for p in paths:
            html = out / (p.stem + ".html")
            t = time.monotonic()
            try:
                run_notebook(p, html, timeout=a.timeout, vm=a.name)
                print(f"notebooks: {p.name} ran in {time.monotonic() - t:.0f} s -> {html}")
            except KsmlensError as e:
                failed.append(p.name)
                print(f"notebooks: {e}", file=sys.stderr)
    finally:
        lab.close()
    print(f"notebooks: {len(paths) - len(failed)}/{len(paths)} ran in "
          f"{time.monotonic() - t0:.0f} s; HTML in {out}/ (open in a browser). "
          f"Run them yourself: .venv/bin/jupyter lab notebooks/")
    return 1 if failed else 0


def _add_target(p):
    _add_name(p)
    p.add_argument("--target", metavar="T", help="vm:NAME (default: the --name VM, live over "
                   "QMP), a vmcore file, or /proc/kcore")
    p.add_argument("--vmlinux", help="vmlinux with debug info (found for lab VMs)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ksmlens", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    vm = sub.add_parser("vm", help="build, boot and drive lab VMs",
                        description="Lab VMs: patched 6.12 kernels under QEMU (virtme-ng).")
    vsub = vm.add_subparsers(dest="vmcmd", required=True, metavar="VMCOMMAND")

    b = vsub.add_parser("build", help="build a kernel variant (cached outside the repo)",
                        description="Build a patched 6.12 kernel from Debian's "
                        "linux-source-6.12. Variants share one build tree, so a switch "
                        "recompiles mm/ksm.c and relinks. " + VARIANT_HELP)
    _add_variant(b)
    b.add_argument("--all", action="store_true", help="build every variant")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--jobs", "-j", type=int, help="make -j (default: CPUs + 1)")
    b.set_defaults(fn=cmd_vm_build)

    u = vsub.add_parser("up", help="boot a lab VM and wait until it answers",
                        description="Boot a variant under QEMU; builds it first if needed. "
                        "KVM is used only where a probe shows a guest boots; TCG otherwise.")
    _add_name(u)
    _add_variant(u)
    u.add_argument("--memory", "-m", default="2G", help="guest memory (default: 2G)")
    u.add_argument("--cpus", "-p", type=int, default=2, help="guest CPUs (default: 2)")
    u.add_argument("--numa", type=int, default=1, metavar="N",
                   help="guest NUMA nodes, memory split evenly (default: 1; 2 for "
                   "migration experiments)")
    u.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="accelerator (default: auto = probe KVM, fall back to TCG)")
    u.add_argument("--timeout", type=float, default=180, help="boot timeout in s (default 180)")
    u.set_defaults(fn=cmd_vm_up)

    r = vsub.add_parser("run", help="run a command as root in the guest",
                        description="Run CMD as root in the guest; its stdout, stderr and "
                        "exit code come back. Example: ksmlens vm run -- cat "
                        "/sys/kernel/mm/ksm/pages_shared")
    _add_name(r)
    r.add_argument("--detach", "-d", action="store_true",
                   help="start CMD in the background and return at once")
    r.add_argument("--timeout", type=float, default=120, help="seconds (default 120)")
    r.add_argument("--stdin", action="store_true", help="pass our stdin to CMD")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    r.set_defaults(fn=cmd_vm_run)

    s = vsub.add_parser("status", help="show a VM (JSON for scripts and drgn)")
    _add_name(s)
    s.add_argument("--json", action="store_true", help="machine-readable")
    s.add_argument("--all", action="store_true", help="every VM ksmlens knows of")
    s.set_defaults(fn=cmd_vm_status)

    d = vsub.add_parser("down", help="power off a VM; no QEMU process is left")
    _add_name(d)
    d.add_argument("--all", action="store_true", help="every VM")
    d.set_defaults(fn=cmd_vm_down)

    dm = sub.add_parser("demo", help="the main job: build, boot, run the mremap scenario",
                        description="Build (or find) the default kernel variant, boot it with "
                        "two NUMA nodes, run the mremap scenario and print the kernel's KSM "
                        "counters before and after; then power the VM off.")
    _add_name(dm)
    _add_variant(dm)
    dm.add_argument("--keep", action="store_true", help="leave the VM up afterwards")
    dm.set_defaults(fn=cmd_demo)

    sn = sub.add_parser("snapshot", help="walk KSM state into a JSON snapshot",
                        description="Walk the stable tree, chains and dups, rmap_items and mm "
                        "slots with drgn into plain data (JSON with -o). consistent mode "
                        "pauses the guest for the walk; live mode does not and counts races.")
    _add_target(sn)
    sn.add_argument("-o", "--output", help="write the snapshot JSON here")
    sn.add_argument("--mode", choices=["consistent", "live"], default="consistent",
                    help="pause the guest for the walk (default) or not")
    sn.add_argument("--vmcore", metavar="FILE",
                    help="instead dump the VM's memory to FILE (QMP dump-guest-memory)")
    sn.set_defaults(fn=cmd_snapshot)

    ck = sub.add_parser("check", help="prove a walk against the kernel's own counters",
                        description="Walk (guest paused) and compare with /sys/kernel/mm/ksm/* "
                        "and /proc/PID/ksm_stat read in the guest: pages_shared, pages_sharing, "
                        "pages_unshared, rmap_items, chains, dups, per-process counts. Exits 1 "
                        "on any mismatch.")
    _add_target(ck)
    ck.set_defaults(fn=cmd_check)

    rp = sub.add_parser("report", help="readable tables: stable nodes, processes")
    _add_target(rp)
    rp.add_argument("--snapshot", "-s", metavar="FILE", help="read a saved snapshot instead")
    rp.add_argument("--mode", choices=["consistent", "live"], default="consistent")
    rp.add_argument("--all", action="store_true", help="every stable node, not the first 50")
    rp.set_defaults(fn=cmd_report)

    vf = sub.add_parser("verify", help="predict which KSM pages the kernel's rmap walk "
                        "cannot unmap, then migrate them and compare",
                        description="From a paused snapshot (ksmd held), replay "
                        "rmap_walk_ksm() under the kernel's rule on the guest's real anon_vma "
                        "trees and write down, per KSM page, whether it can be unmapped; then "
                        "move_pages(MPOL_MF_MOVE_ALL) every mapped KSM page to the other NUMA "
                        "node and read the nodes back. Prints predicted / observed / agree per "
                        "stable node; exits 1 on any disagreement. Needs a VM with 2 NUMA "
                        "nodes (`ksmlens vm up --numa 2`). With --smartscan N: forecast "
                        "SmartScan's skips over N full scans and compare with the kernel's "
                        "pages_skipped and every rmap_item's age/remaining_skips.")
    _add_name(vf)
    vf.add_argument("--rule", choices=["stock", "v3", "stored"],
                    help="predict with this rule instead of the kernel's own")
    vf.add_argument("--smartscan", type=int, metavar="N", help="verify a SmartScan forecast "
                    "over N full scans instead")
    vf.add_argument("--by", choices=["migration", "reclaim"], default="migration",
                    help="the kernel's proof: migrate every KSM page to the other node "
                    "(default), or reclaim it through memory.reclaim of its processes' "
                    "cgroups (swap on zram, set up if missing): a mapping the walk misses "
                    "stays mapped, the page is never freed")
    vf.add_argument("--json", action="store_true", help="machine-readable")
    vf.add_argument("--all", action="store_true", help="every row")
    vf.set_defaults(fn=cmd_verify)

    rl = sub.add_parser("replay", help="which mappings each rmap walk rule finds or misses",
                        description="Replay rmap_walk_ksm() for every KSM page under each "
                        "rule: stock [0, ULONG_MAX], v3 [address >> PAGE_SHIFT], stored "
                        "[rmap_item->pgoff] (union/v8 kernels), on the recorded anon_vma "
                        "interval trees, both passes (search_new_forks). Lists the mapped "
                        "mappings a rule misses.")
    _add_target(rl)
    rl.add_argument("--snapshot", "-s", metavar="FILE", help="read a saved snapshot instead")
    rl.add_argument("--rule", choices=["stock", "v3", "stored"], help="only this rule")
    rl.add_argument("--all", action="store_true", help="every miss, not the first 20")
    rl.set_defaults(fn=cmd_replay)

    ss = sub.add_parser("smartscan", help="SmartScan forecast and the union hazard",
                        description="From a snapshot: the pages_skipped increase over the "
                        "next N full scans (the kernel's should_skip_rmap_item()/skip_age() "
                        "replayed per rmap_item), and the STABLE rmap_items whose page is no "
                        "longer KSM, with the age/remaining_skips SmartScan will read (on the "
                        "union kernel: the stored pgoff's bytes). `ksmlens verify --smartscan "
                        "N` checks a forecast against the kernel.")
    _add_target(ss)
    ss.add_argument("--snapshot", "-s", metavar="FILE", help="read a saved snapshot instead")
    ss.add_argument("--scans", type=int, default=8, help="forecast horizon (default 8)")
    ss.add_argument("--all", action="store_true", help="every item")
    ss.set_defaults(fn=cmd_smartscan)

    wt = sub.add_parser("watch", help="a paused snapshot per full scan, with diffs",
                        description="Take --count paused snapshots, one after every --scans "
                        "full scans of ksmd (or every --every seconds), printing what changed "
                        "(items appeared/dropped/merged/unmerged/moved, SmartScan skips, "
                        "counter deltas). -o DIR keeps the timeline (frame-NNNN.json).")
    _add_target(wt)
    wt.add_argument("--count", "-n", type=int, default=5, help="snapshots (default 5)")
    wt.add_argument("--scans", type=int, default=1, help="full scans between snapshots")
    wt.add_argument("--every", type=float, metavar="S", help="seconds between snapshots "
                    "instead of full scans")
    wt.add_argument("--pace", type=int, metavar="MS", help="set ksmd's sleep_millisecs to MS "
                    "while watching (restored after), so frames are exactly --scans full "
                    "scans apart even when ksmd scans faster than the host polls")
    wt.add_argument("-o", "--output", metavar="DIR", help="save the timeline here")
    wt.set_defaults(fn=cmd_watch)

    df = sub.add_parser("diff", help="what changed between two saved snapshots")
    df.add_argument("a", help="earlier snapshot JSON")
    df.add_argument("b", help="later snapshot JSON")
    df.add_argument("--json", action="store_true")
    df.set_defaults(fn=cmd_diff)

    from ksmlens.experiments.selftests import KSM_TESTS_MODES, MREMAP_SUITE, SUITES
    st = sub.add_parser("selftests", help="the kernel's KSM selftests, the walk checked "
                        "against the kernel at random pauses while they run",
                        description="Build ksm_functional_tests and ksm_tests from Debian's "
                        "linux-source-6.12 (cached), run them in the guest (ksm_tests once per "
                        "mode) and, while they run, pause the guest at random moments and "
                        "compare the walk with the kernel's own counters read in the same "
                        "pause (globals, mm->ksm_*, rmap_hlist_len). Prints one summary line; "
                        "exits 0 only if both suites pass and every paused check agrees (a "
                        "walk that meets ksmd mid-update is counted separately, as "
                        "classified). --suite ksm_and_mremap runs the project's equivalent of "
                        "the kernel's migrate.ksm_and_mremap (rmap.c, v7.3) beside `ksmlens "
                        "verify` (needs 2 NUMA nodes). The suites unmerge everything in the "
                        "guest (run=2); the KSM knobs are put back.")
    _add_name(st)
    st.add_argument("--suite", action="append", choices=[*SUITES, MREMAP_SUITE],
                    help="run only this suite (repeatable; default: both kernel suites)")
    st.add_argument("--mode", action="append", choices=list(KSM_TESTS_MODES),
                    help="ksm_tests mode (repeatable; default: every mode): " + "; ".join(
                        f"{k}: {' '.join(v)}" for k, v in KSM_TESTS_MODES.items()))
    st.add_argument("--min-checks", type=int, default=30, metavar="N",
                    help="agreeing paused checks each suite needs (default 30)")
    st.add_argument("--gap", type=float, default=0.1, metavar="S",
                    help="pause again after a uniform random 0..S seconds (default 0.1)")
    st.add_argument("--seed", type=int, help="seed the random pause moments")
    st.add_argument("--no-verify", action="store_true",
                    help="ksm_and_mremap without `ksmlens verify` beside it")
    st.add_argument("--json", action="store_true", help="machine-readable")
    st.set_defaults(fn=cmd_selftests)

    from ksmlens.views.notebook import OUT_DIR, vm_name
    nbp = sub.add_parser("notebooks", help="execute the notebooks against a VM, into HTML",
                         description="Execute notebooks/*.ipynb (or the ones named) top to "
                         "bottom with nbclient against one lab VM (reused if up, else booted "
                         "and powered off at the end), writing out/notebooks/NAME.html. To "
                         "work in them yourself: .venv/bin/jupyter lab notebooks/")
    nbp.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                     help="notebook files (default: every notebooks/*.ipynb)")
    nbp.add_argument("--name", default=vm_name(),
                     help=f"lab VM the notebooks use, as $KSMLENS_VM (default: {vm_name()})")
    nbp.add_argument("--out", "-o", default=str(OUT_DIR), metavar="DIR",
                     help="directory for the HTML (default: out/notebooks of the checkout)")
    nbp.add_argument("--timeout", type=float, default=900,
                     help="seconds one cell may take (default 900: TCG is slow)")
    nbp.set_defaults(fn=cmd_notebooks)

    sc = sub.add_parser("scenario", help="workloads that put KSM in a known state")
    ssub = sc.add_subparsers(dest="scncmd", required=True, metavar="SCENARIOCOMMAND")
    sl = ssub.add_parser("list", help="list scenarios and their steps")
    sl.set_defaults(fn=cmd_scenario_list)
    sr = ssub.add_parser("run", help="run a scenario in a VM and check it against "
                         "the kernel's counters",
                         description="Run every step of a scenario in the VM, printing the "
                         "kernel's KSM counters before and after; fails if KSM did not do "
                         "what the scenario expects.")
    _add_name(sr)
    sr.add_argument("scenario", help="scenario name (see `ksmlens scenario list`)")
    sr.add_argument("--keep", action="store_true",
                    help="leave the workload running (and the KSM knobs set) afterwards")
    sr.set_defaults(fn=cmd_scenario_run)
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        return a.fn(a) or 0
    except KsmlensError as e:
        print(f"ksmlens: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ksmlens: interrupted", file=sys.stderr)
        return 130
