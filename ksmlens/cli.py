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

Kernel builds and VM state live in ~/.cache/ksmlens ($KSMLENS_CACHE).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from . import kbuild
from .errors import KsmlensError

VARIANT_HELP = "; ".join(f"{v.name}: {v.summary}" for v in kbuild.VARIANTS.values())


def _add_name(p):
    from .vm import DEFAULT_NAME
    p.add_argument("--name", default=DEFAULT_NAME,
                   help=f"which lab VM (default: {DEFAULT_NAME}); several can run side by side")


def _add_variant(p, default=kbuild.DEFAULT_VARIANT):
    p.add_argument("--variant", "-V", default=default, metavar="V",
                   help=f"kernel variant (default: {default}). {VARIANT_HELP}")


def cmd_vm_build(a):
    variants = list(kbuild.VARIANTS) if a.all else [a.variant]
    for v in variants:
        k = kbuild.build(v, force=a.force, jobs=a.jobs)
        print(f"{k.variant}\t{k.release}\t{k.bzimage}\t{k.vmlinux}")
    return 0


def cmd_vm_up(a):
    from .vm import VM
    vm = VM.up(a.name, a.variant, memory=a.memory, cpus=a.cpus, numa=a.numa,
               accel=a.accel, boot_timeout=a.timeout)
    s = vm.status()
    print(f"{s['name']}: {s['kernel_release']} up in {s['boot_seconds']} s under "
          f"{s['accel'].upper()} ({s['accel_reason']}); drgn: drgn --qemu {s['qmp']} "
          f"-s {s['vmlinux']}")
    return 0


def cmd_vm_run(a):
    from .vm import VM
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
    from .vm import VM, list_vms
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
    from .vm import VM, list_vms
    names = [s["name"] for s in list_vms()] if a.all else [a.name]
    for n in names:
        VM(n).down()
        print(f"{n}: down")
    return 0


def cmd_scenario_list(a):
    from .scenarios import SCENARIOS
    for s in SCENARIOS.values():
        print(f"{s.name:10} {s.summary}")
        print(f"{'':10}   steps: {', '.join(st.name for st in s.steps)}")
    return 0


def cmd_scenario_run(a):
    from .scenarios import get_scenario, run_scenario
    from .vm import VM
    scn = get_scenario(a.scenario)
    vm = VM(a.name)
    run_scenario(vm, scn, keep=a.keep, out=sys.stdout)
    return 0


def cmd_demo(a):
    """The main job: build + boot the default variant, run the mremap scenario."""
    from .scenarios import run_scenario
    from .vm import VM, list_vms
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
    from .attach import attach
    target = a.target
    if target is None:
        target = f"vm:{a.name}"
    return attach(target, vmlinux=a.vmlinux)


def cmd_snapshot(a):
    from .report import summary
    from .snapshot import take_snapshot
    from .attach import dump_vmcore
    if a.vmcore:
        from .vm import VM
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
    from .check import check_vm, format_rows
    from .vm import VM
    prog = _attach(a)
    vm = prog.cache.get("ksmlens_vm") or VM(a.name)
    rows, snap, info = check_vm(vm, prog)
    print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    print(f"check: {len(rows) - len(bad)}/{len(rows)} agree "
          f"(walk of {len(snap.rmap_items)} rmap_items, guest paused "
          f"{snap.meta['paused_seconds']:.3f} s, attempt {info['attempts']})")
    return 1 if bad else 0


def cmd_report(a):
    from .model import Snapshot
    from .report import process_table, stable_table, summary
    if a.snapshot:
        snap = Snapshot.load(a.snapshot)
    else:
        from .snapshot import take_snapshot
        snap = take_snapshot(_attach(a), mode=a.mode)
    print(summary(snap))
    print()
    print(stable_table(snap, limit=None if a.all else 50))
    print()
    print(process_table(snap))
    return 0


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
