"""The ``ksmlens`` command.

    ksmlens vm build [--variant V]        build a patched 6.12 kernel (cached)
    ksmlens vm up [--variant V] ...       boot it under QEMU (virtme-ng)
    ksmlens vm run [--detach] -- CMD...   run CMD as root in the guest
    ksmlens vm status [--json]            what runs, where its QMP socket is
    ksmlens vm down                       power off, leave no QEMU behind
    ksmlens scenario list                 the workloads that shape KSM state
    ksmlens scenario run NAME             run one to its merged state, checked
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

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
