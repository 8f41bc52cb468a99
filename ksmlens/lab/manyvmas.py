"""The many-vmas scenario: one anon_vma shared by N VMAs, a few KSM pages among them.

What makes ``rmap_walk_ksm()`` expensive (the "Optimize rmap_walk_ksm"
series: 20,000 VMAs in one anon_vma, the stock walk's every iteration but a
few skipped by the ``vm_start``/``vm_end`` check). The guest program is
``vm/scenarios/ksmlens-manyvmas.c``; its shapes:

* ``split``: one region of N pages split into N one-page VMAs (every other
  page read-only), all in the anon_vma of the first fault;
* ``fork``: a region of N / (C + 1) pages split the same way, then C
  children that keep every mapping: their VMAs join the parent's anon_vma
  tree, and the KSM pages they map are reached only by ``search_new_forks``.

Either way P pairs of equal pages become P KSM pages of two rmap_items each;
``--mremap K`` moves the first page of K pairs (``mremap(MAYMOVE|FIXED)``),
so cost and misses appear together. ksmd is held (``run=0``) at the end, so
the state stays while walks are predicted and counted.

    with ScenarioRun(vm, "many-vmas", extra_args=("--vmas", "2000")) as run:
        for s in run.scenario.steps: run.step(s.name)
"""

from __future__ import annotations

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.errors import KsmlensError
from ksmlens.lab.scenario_run import Scenario, ScenarioRun, Step, check, go, hold

__all__ = ["MANY_VMAS", "SOURCE", "DEFAULT_ARGS", "max_map_count", "vmas_per_process",
           "parse_args"]

SOURCE = "scenarios/ksmlens-manyvmas.c"   # under vm/
DEFAULT_ARGS = ("--shape", "split", "--vmas", "20000", "--pages", "16", "--forks", "9",
                "--mremap", "0")
MAX_MAP_COUNT = "/proc/sys/vm/max_map_count"
# VMAs a process has besides the region: the binary, stack, vdso, vvar, heap...
OTHER_VMAS = 64


def parse_args(args) -> dict:
    """The program's options as ints/strings (the last of a repeated one wins,
    as in the program)."""
    out = {"shape": "split", "vmas": 20000, "pages": 16, "forks": 9, "mremap": 0}
    args = list(args)
    for k in range(0, len(args) - 1, 2):
        name = args[k].lstrip("-")
        if name in out:
            out[name] = args[k + 1] if name == "shape" else int(args[k + 1])
    return out


def vmas_per_process(opts: dict) -> int:
    """VMAs the region takes in each process: N (split), N / (C + 1) (fork)."""
    return opts["vmas"] if opts["shape"] == "split" else opts["vmas"] // (opts["forks"] + 1)


def max_map_count(vm) -> int:
    """The guest's ``vm.max_map_count``."""
    return int(vm.read_file(MAX_MAP_COUNT).strip())


def _precheck(vm, args) -> None:
    opts = parse_args(args)
    need = vmas_per_process(opts) + OTHER_VMAS
    limit = max_map_count(vm)
    if need > limit:
        raise KsmlensError(
            f"many-vmas --vmas {opts['vmas']} needs {need} VMAs in one process, above "
            f"the guest's vm.max_map_count ({limit})",
            f"ask for fewer, or raise it: `ksmlens vm run -- sysctl -w "
            f"vm.max_map_count={need}`")


def _ksm_pages(run: ScenarioRun) -> int:
    return 2 * len(run.info["pairs"])


def _region_vmas(run: ScenarioRun, pid: int) -> int:
    """VMAs of the region in /proc/PID/maps (the kernel's count)."""
    lo = run.info["region"]
    hi = lo + run.info["region_pages"] * 4096
    n = 0
    for line in run.vm.read_file(f"/proc/{pid}/maps").splitlines():
        a, b = (int(x, 16) for x in line.split()[0].split("-"))
        n += lo <= a and b <= hi
    return n


def _merged(run: ScenarioRun) -> dict:
    run.refresh()
    pid = run.info["pid"]
    got = run.wait_merging({pid: _ksm_pages(run)}, timeout=max(120.0, run.info["vmas"] / 50))
    vmas = _region_vmas(run, pid)
    check(vmas == run.info["region_pages"],
          f"many-vmas: the region has {vmas} VMAs in /proc/{pid}/maps, expected one per page "
          f"({run.info['region_pages']})")
    return {"ksm_merging_pages": got, "region_vmas": vmas,
            "counters": ksmsys.read_counters(run.vm)}


def _mremap(run: ScenarioRun) -> dict:
    k = run.info["mremap"]
    if not k:
        return {"moved": 0}
    pid = run.info["pid"]
    hold(run)
    run.command("mremap")
    run.refresh()
    go(run)
    got = run.wait_merging({pid: _ksm_pages(run)})
    return {"moved": run.info["moved"], "ksm_merging_pages": got}


def _fork(run: ScenarioRun) -> dict:
    if run.info["shape"] != "fork":
        return {"children": 0}
    hold(run)        # the children get no rmap_items: only search_new_forks reaches them
    run.command("fork")
    run.refresh()
    kids = run.info["children"]
    ksm = ksmsys.read_smaps_ksm(run.vm, kids)
    want = _ksm_pages(run) * 4096 // 1024
    check(all(ksm.get(p, 0) >= _ksm_pages(run) for p in kids),
          f"many-vmas: the forked children map KSM pages {ksm} (smaps KSM:), expected "
          f"{_ksm_pages(run)} each ({want} kB)")
    stat = ksmsys.read_ksm_stat(run.vm, kids)
    check(all(s.get("ksm_rmap_items", 0) == 0 for s in stat.values()),
          f"many-vmas: a child has rmap_items with ksmd held: {stat}")
    return {"children": len(kids), "ksm_pages": ksm}


def _held(run: ScenarioRun) -> dict:
    hold(run)
    return {"run": 0, "counters": ksmsys.read_counters(run.vm)}


MANY_VMAS = Scenario(
    "many-vmas", "one anon_vma shared by N VMAs (--vmas N, default 20,000; --shape "
    "split|fork), P pairs merged into P KSM pages (--pages P); --mremap K moves K of them: "
    "what makes rmap_walk_ksm() expensive",
    DEFAULT_ARGS,
    (Step("merged", "wait until the P pairs are merged (ksm_stat ksm_merging_pages 2P); "
          "the region has one VMA per page (/proc/PID/maps)", _merged),
     Step("mremap", "with --mremap K: hold ksmd, move the first page of K pairs >= 1 GiB "
          "away, let ksmd re-merge them at the new address", _mremap),
     Step("fork", "fork shape: hold ksmd, fork C children that keep the mappings (their "
          "VMAs join the parent's anon_vma tree; no rmap_items of their own)", _fork),
     Step("held", "hold ksmd (run=0): the state stays while walks are counted", _held)),
    knobs={"smart_scan": 0}, program=SOURCE, precheck=_precheck)
