"""The lab's commands: kernels, VMs, scenarios, the demo, the notebooks.

    ksmlens vm build|up|run|status|down    patched 6.12 kernels under QEMU
    ksmlens scenario list|run              workloads that put KSM in a known state
    ksmlens demo                           build, boot, run mremap, print counters
    ksmlens notebooks                      execute notebooks/*.ipynb against a VM
    ksmlens book                           the executed notebooks as a static site
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import ksmlens.lab.kbuild as kbuild
from ksmlens.cli.common import NAME, VARIANT, VARIANT_HELP, Commands, arg
from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import ARCHES, DEFAULT_ARCH

# --kernel picks the source (kbuild.SOURCES); --variant then defaults to the
# source's own default (6.12: union, 6.1: stock)
KERNEL = arg("--kernel", "-k", default=kbuild.DEFAULT_SOURCE, choices=list(kbuild.SOURCES),
             help=f"kernel source (default: {kbuild.DEFAULT_SOURCE}); "
             + "; ".join(f"{s.name}: Debian's {s.package}, variants {', '.join(s.variants)}"
                         for s in kbuild.SOURCES.values()))
ARCH = arg("--arch", default=DEFAULT_ARCH, metavar="ARCH",
           help=f"guest architecture: {', '.join(ARCHES)} (default: {DEFAULT_ARCH}; "
           "arm64 is cross-built with Debian's gcc-aarch64-linux-gnu and boots under "
           "qemu-system-aarch64 TCG with a Debian arm64 root of its own)")
KVARIANT = arg("--variant", "-V", default=None, metavar="V",
               help=f"kernel variant (default: {kbuild.DEFAULT_VARIANT}, or the --kernel's "
               f"first variant where it has none). {VARIANT_HELP}")


def _variant(a) -> str:
    return a.variant or kbuild.default_variant(a.kernel)


COMMANDS = Commands()
register = COMMANDS.register

COMMANDS.group("vm", help="build, boot and drive lab VMs",
               description="Lab VMs: patched 6.12 kernels under QEMU (virtme-ng).",
               metavar="VMCOMMAND")
COMMANDS.group("scenario", help="workloads that put KSM in a known state",
               description="Workloads (one static C program driven over its stdin) that "
               "put KSM in a known state: merged pages, chains and dups, an mremap()ed "
               "VMA, SmartScan skips, forks; each step checked against the kernel's "
               "counters (/sys/kernel/mm/ksm, /proc/PID/ksm_stat, smaps).",
               metavar="SCENARIOCOMMAND")


# ------------------------------------------------------------------ vm

@COMMANDS.command(
    "vm build", help="build a kernel variant (cached outside the repo)",
    description="Build a patched 6.12 kernel from Debian's linux-source-6.12. Variants "
    "share one build tree, so a switch recompiles mm/ksm.c and relinks. " + VARIANT_HELP,
    args=(KVARIANT, KERNEL, ARCH,
          arg("--all", action="store_true", help="build every variant of the --kernel"),
          arg("--force", action="store_true", help="rebuild even if cached"),
          arg("--jobs", "-j", type=int, help="make -j (default: CPUs + 1)"),
          arg("--source", metavar="DIR",
              help="build your own kernel tree DIR (a supported version: "
              f"{', '.join(kbuild.SOURCES)}) with ksmlens's config as variant --variant NAME; "
              "DIR is never written (built from a copy in the cache), cached by content "
              "(git tree id of a clean checkout, else the files' bytes); with --arch arm64 "
              "cross-built for the arm64 lab"),
          arg("--patch", action="append", metavar="FILE", default=[],
              help="with --source: apply FILE first (repeatable, in order): a `git "
              "format-patch` file, a unified diff, or an mbox of several patches saved from "
              "the list (cover letter and replies skipped)")))
def vm_build(a):
    if a.source or a.patch:
        return _vm_build_own(a)
    variants = list(kbuild.get_source(a.kernel).variants) if a.all else [_variant(a)]
    for v in variants:        # one line per kernel as soon as it is built
        k = kbuild.build(v, source=a.kernel, force=a.force, jobs=a.jobs, arch=a.arch)
        print(f"{k.variant}\t{k.release}\t{k.bzimage}\t{k.vmlinux}")
    return 0


def _vm_build_own(a):
    from ksmlens.lab.owntree import build_own
    if not a.source:
        raise KsmlensError("--patch needs --source DIR",
                           "ksmlens vm build --source DIR --patch FILE --variant NAME")
    if not a.variant or a.all:
        raise KsmlensError("--source needs a name for the kernel: --variant NAME (not --all)",
                           "e.g. ksmlens vm build --source ~/linux --variant mine")
    t = {}
    k = build_own(a.source, a.patch, a.variant, force=a.force, jobs=a.jobs, timings=t,
                  arch=a.arch)
    print(f"{k.variant}\t{k.release}\t{k.bzimage}\t{k.vmlinux}")
    flag = "" if k.arch == DEFAULT_ARCH else f" --arch {k.arch}"
    print(f"ksmlens: {'found in the cache' if t.get('cache_hit') else 'built'} for {k.arch} in "
          f"{t.get('total')} s (content hash: {t.get('digest_kind')}, {t.get('digest')} s); "
          f"boot it: ksmlens vm up --variant {k.variant}{flag}", file=sys.stderr)
    return 0


@COMMANDS.command(
    "vm up", help="boot a lab VM and wait until it answers",
    description="Boot a variant under QEMU; builds it first if needed. KVM is used only "
    "where a probe shows a guest boots; TCG otherwise.",
    args=(NAME, KVARIANT, KERNEL, ARCH,
          arg("--memory", "-m", default="2G", help="guest memory (default: 2G)"),
          arg("--cpus", "-p", type=int, default=2, help="guest CPUs (default: 2)"),
          arg("--numa", type=int, default=1, metavar="N",
              help="guest NUMA nodes, memory split evenly (default: 1; 2 for migration "
              "experiments)"),
          arg("--accel", choices=["auto", "kvm", "tcg"], default="auto",
              help="accelerator (default: auto = probe KVM, fall back to TCG)"),
          arg("--timeout", type=float, default=180, help="boot timeout in s (default 180)"),
          arg("--dry-run", action="store_true", help="print the QEMU command line "
              "(shell-quoted) and exit: boots and writes nothing")))
def vm_up(a):
    from ksmlens.lab.vm import VM
    if a.dry_run:
        print(VM.dry_run(a.name, _variant(a), memory=a.memory, cpus=a.cpus, numa=a.numa,
                         accel=a.accel, source=a.kernel, arch=a.arch))
        return 0
    vm = VM.up(a.name, _variant(a), memory=a.memory, cpus=a.cpus, numa=a.numa,
               accel=a.accel, boot_timeout=a.timeout, source=a.kernel, arch=a.arch)
    s = vm.status()
    print(f"{s['name']}: {s['kernel_release']} up in {s['boot_seconds']} s under "
          f"{s['accel'].upper()} ({s['accel_reason']}); drgn: drgn --qemu {s['qmp']} "
          f"-s {s['vmlinux']}")
    return 0


@COMMANDS.command(
    "vm run", help="run a command as root in the guest",
    description="Run CMD as root in the guest; its stdout, stderr and exit code come back. "
    "Example: ksmlens vm run -- cat /sys/kernel/mm/ksm/pages_shared",
    args=(NAME,
          arg("--detach", "-d", action="store_true",
              help="start CMD in the background and return at once"),
          arg("--timeout", type=float, default=120, help="seconds (default 120)"),
          arg("--stdin", action="store_true", help="pass our stdin to CMD"),
          arg("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")))
def vm_run(a):
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


@COMMANDS.command(
    "vm status", help="show a VM (JSON for scripts and drgn)",
    description="Show a lab VM: name, variant, kernel release, accelerator, QEMU's run "
    "state and pid, the QMP socket drgn attaches to (drgn --qemu SOCK -s VMLINUX), "
    "vmlinux, the console log. Exits 1 if it is not running.",
    args=(NAME,
          arg("--json", action="store_true", help="machine-readable"),
          arg("--all", action="store_true", help="every VM ksmlens knows of")))
def vm_status(a):
    from ksmlens.lab.vm import VM, list_vms
    from ksmlens.views.tables import vm_status_table, vms_table
    if a.all:
        vms = list_vms()
        print(json.dumps(vms, indent=2) if a.json else vms_table(vms))
        return 0
    s = VM(a.name).status()
    print(json.dumps(s, indent=2) if a.json else vm_status_table(s))
    return 0 if s["running"] else 1


def cache_entries() -> list[dict]:
    """What the lab builds or probes into the cache (``$KSMLENS_CACHE``, else
    ``~/.cache/ksmlens``) and whether it is there: one dict per entry with
    ``what``, ``state`` ("warm": built for today's sources and files;
    "cold": the first command or test that needs it builds it) and ``path``.
    Kernels are listed per source, architecture and variant
    (:func:`kbuild.find_kernel`: the key hashes the source's Debian version,
    the config and the patches), then the kernel selftests, the static guest
    programs per architecture (keyed by their source's bytes), the arm64
    guest's root (:mod:`ksmlens.lab.rootfs`) and the KVM probe."""
    from ksmlens.experiments.selftests import (MREMAP_SELFTEST_SOURCE, selftests_built,
                                               selftests_dir)
    from ksmlens.lab.paths import cache_root, vm_data
    from ksmlens.lab.manyvmas import SOURCE as MANYVMAS_SOURCE
    from ksmlens.lab.scenarios import WORKLOAD_SOURCE, static_binary_path
    out = []
    for src in kbuild.SOURCES.values():
        try:
            kbuild.source_tarball(src)
        except KsmlensError:
            out.append({"what": f"kernel {src.name}", "state": "cold",
                        "path": f"{src.tarball} missing (apt-get install {src.package})"})
            continue
        for arch in ARCHES.values():
            for v in src.variants:
                k = kbuild.find_kernel(v, src, arch)
                what = f"kernel {src.name} {v}" + ("" if arch.name == DEFAULT_ARCH
                                                   else f" {arch.name}")
                out.append({"what": what, "state": "warm" if k else "cold",
                            "path": str(k.directory) if k else f"{cache_root()}/kernels/"})
    out.append({"what": "kernel selftests (ksm_tests)",
                "state": "warm" if selftests_built() else "cold", "path": str(selftests_dir())})
    for arch in ARCHES.values():
        suffix = "" if arch.name == DEFAULT_ARCH else f" {arch.name}"
        for rel, name in ((WORKLOAD_SOURCE, "ksmlens-workload"),
                          (MANYVMAS_SOURCE, "ksmlens-manyvmas"),
                          (MREMAP_SELFTEST_SOURCE, "ksm-mremap-migrate")):
            p = static_binary_path(vm_data() / rel, name, arch)
            out.append({"what": f"guest program {name}{suffix}",
                        "state": "warm" if p.exists() else "cold", "path": str(p)})
    from ksmlens.lab import rootfs
    for arch in ARCHES.values():
        if arch.name != DEFAULT_ARCH:
            root = rootfs.find_root(arch)
            out.append({"what": f"guest root {arch.name}", "state": "warm" if root else "cold",
                        "path": str(root or rootfs.root_dir(arch))})
    probe = cache_root() / "accel-probe.json"
    out.append({"what": "KVM probe", "state": "warm" if probe.exists() else "cold",
                "path": str(probe)})
    return out


@COMMANDS.command(
    "vm cache", help="what is built in the cache, and what the next use builds",
    description="List the cache ($KSMLENS_CACHE, else ~/.cache/ksmlens): each kernel "
    "source and variant, the kernel selftests, the static guest programs and the KVM probe, "
    "'warm' where the build for today's sources and files is there, 'cold' where the first "
    "command or test that needs it builds it. A cold run of everything: "
    "KSMLENS_CACHE=$(mktemp -d) bash .ci/run",
    args=(arg("--json", action="store_true", help="machine-readable"),))
def vm_cache(a):
    from ksmlens.views.tables import format_table
    rows = cache_entries()
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(["what", "state", "path"],
                       [[r["what"], r["state"], r["path"]] for r in rows]))
    warm = sum(r["state"] == "warm" for r in rows)
    print(f"{warm} warm, {len(rows) - warm} cold")
    return 0


@COMMANDS.command("vm down", help="power off a VM; no QEMU process is left",
                  args=(NAME, arg("--all", action="store_true", help="every VM")))
def vm_down(a):
    from ksmlens.lab.vm import VM, list_vms
    names = [s["name"] for s in list_vms()] if a.all else [a.name]
    for n in names:
        VM(n).down()
        print(f"{n}: down")
    return 0


# ------------------------------------------------------------------ scenario

@COMMANDS.command("scenario list", help="list scenarios and their steps")
def scenario_list(a):
    from ksmlens.lab.scenarios import SCENARIOS
    from ksmlens.views.tables import scenario_table
    print(scenario_table(SCENARIOS.values()))
    return 0


@COMMANDS.command(
    "scenario run", help="run a scenario in a VM and check it against the kernel's counters",
    description="Run every step of a scenario in the VM, printing the kernel's KSM counters "
    "before and after; fails if KSM did not do what the scenario expects.",
    args=(NAME,
          arg("scenario", help="scenario name (see `ksmlens scenario list`)"),
          arg("--keep", action="store_true",
              help="leave the workload running (and the KSM knobs set) afterwards"),
          arg("--vmas", type=int, metavar="N",
              help="many-vmas: VMAs in the one anon_vma (default 20000; at most the "
              "guest's vm.max_map_count per process)"),
          arg("--shape", choices=["split", "fork"],
              help="many-vmas: one region split into N one-page VMAs (split, the default), "
              "or N/(C+1) of them in a parent and C forked children (fork)"),
          arg("--pages", type=int, metavar="P", help="many-vmas: KSM pages, two rmap_items "
              "each (default 16)"),
          arg("--forks", type=int, metavar="C", help="many-vmas --shape fork: children "
              "(default 9)"),
          arg("--mremap", type=int, metavar="K", help="many-vmas: move the first page of K "
              "KSM pages with mremap() (default 0)")))
def scenario_run(a):
    from ksmlens.lab.scenarios import get_scenario, run_scenario
    from ksmlens.lab.vm import VM
    scn = get_scenario(a.scenario)
    extra = [x for k in ("vmas", "shape", "pages", "forks", "mremap")
             if getattr(a, k) is not None for x in (f"--{k}", str(getattr(a, k)))]
    if extra and scn.name != "many-vmas":
        raise KsmlensError(f"{' '.join(extra[::2])}: options of the many-vmas scenario, "
                           f"not of {scn.name}", "leave them out, or run many-vmas")
    vm = VM(a.name)
    run_scenario(vm, scn, keep=a.keep, out=sys.stdout, extra_args=tuple(extra))
    return 0


# ------------------------------------------------------------------ demo, notebooks

@COMMANDS.command(
    "demo", help="the main job: build, boot, run the mremap scenario",
    description="Build (or find) the default kernel variant, boot it with two NUMA nodes, "
    "run the mremap scenario and print the kernel's KSM counters before and after; then "
    "power the VM off.",
    args=(NAME, VARIANT, arg("--keep", action="store_true", help="leave the VM up afterwards")))
def demo(a):
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


def _notebook_args():
    from ksmlens.views.notebook import OUT_DIR, vm_name
    return (arg("notebooks", nargs="*", metavar="NOTEBOOK",
                help="notebook files (default: every notebooks/*.ipynb)"),
            arg("--name", default=vm_name(),
                help=f"lab VM the notebooks use, as $KSMLENS_VM (default: {vm_name()})"),
            arg("--out", "-o", default=str(OUT_DIR), metavar="DIR",
                help="directory for the HTML (default: out/notebooks of the checkout)"),
            arg("--timeout", type=float, default=900,
                help="seconds one cell may take (default 900: TCG is slow)"),
            arg("--book", metavar="DIR",
                help="then build the executed notebooks as a static site (Sphinx) into DIR"))


@COMMANDS.command(
    "notebooks", help="execute the notebooks against a VM, into HTML",
    description="Execute notebooks/*.ipynb (or the ones named) top to bottom with nbclient "
    "against one lab VM (reused if up, else booted and powered off at the end), writing "
    "out/notebooks/NAME.html and the executed out/notebooks/NAME.ipynb; with --book DIR, "
    "then the book of them (`ksmlens book`). To work in them yourself: "
    ".venv/bin/jupyter lab notebooks/",
    args=_notebook_args)
def notebooks(a):
    """Execute the notebooks against one VM (booted once if not up) into HTML."""
    from pathlib import Path
    import nbformat
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
            executed = out / p.name
            executed.unlink(missing_ok=True)       # a failed run leaves no stale one
            try:
                nb = run_notebook(p, html, timeout=a.timeout, vm=a.name)
                nbformat.write(nb, executed)
                print(f"notebooks: {p.name} ran in {time.monotonic() - t:.0f} s -> {html}")
            except KsmlensError as e:
                failed.append(p.name)
                print(f"notebooks: {e}", file=sys.stderr)
    finally:
        lab.close()
    print(f"notebooks: {len(paths) - len(failed)}/{len(paths)} ran in "
          f"{time.monotonic() - t0:.0f} s; HTML in {out}/ (open in a browser). "
          f"Run them yourself: .venv/bin/jupyter lab notebooks/")
    if a.book:
        from ksmlens.views.book import build_book
        done = [out / p.name for p in paths if p.name not in failed]
        if done:
            print(f"notebooks: the book -> {build_book(done, a.book)}")
    return 1 if failed else 0


@COMMANDS.command(
    "book", help="the executed notebooks as a static site (Sphinx + myst-nb)",
    description="Build executed notebooks (the out/notebooks/NAME.ipynb that `ksmlens "
    "notebooks` writes) into a static site readable in any browser: index.html lists each "
    "notebook with its summary and first figure, NAME.html is the notebook, guide/PAGE.html "
    "a page of the guide (docs/guide/*.md). Nothing is "
    "executed; no VM is needed.",
    args=lambda: (arg("executed", nargs="*", metavar="IPYNB_OR_DIR",
                      help="executed notebooks or directories of them "
                           "(default: out/notebooks of the checkout)"),
                  arg("--out", "-o", default=None, metavar="DIR",
                      help="directory for the site (default: out/book of the checkout; "
                           "a previous book there is replaced)")))
def book(a):
    """Build the book from already executed notebooks."""
    from ksmlens.views.book import BOOK_DIR, build_book
    from ksmlens.views.notebook import OUT_DIR
    t0 = time.monotonic()
    index = build_book(a.executed or [OUT_DIR], a.out or BOOK_DIR)
    print(f"book: {index} in {time.monotonic() - t0:.0f} s (open it in a browser)")
    return 0
