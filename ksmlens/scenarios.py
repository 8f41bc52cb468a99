"""Scenario workloads: small C programs, run in the guest, driven step by step.

Each scenario is one mode of ``vm/scenarios/ksmlens-workload.c`` (built on
the host, run in the guest through the shared root) plus a list of named
steps. A step either sends a command to the workload (``mremap``, ``fork``,
``write ...``) or waits on the kernel (``merged``: until the kernel's own
counters say KSM merged what it should). Every scenario checks its outcome
against ``/sys/kernel/mm/ksm/*`` and ``/proc/PID/ksm_stat`` and raises
:class:`~ksmlens.errors.KsmlensError` if KSM did not do what it expected.

    run = ScenarioRun(vm, "mremap"); run.start()
    run.step("merged"); run.step("mremap"); run.step("remerged")
    ...
    run.stop()          # quits the workload, puts the KSM knobs back
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import ksmsys
from .errors import KsmlensError
from .paths import cache_root, vm_data

__all__ = ["SCENARIOS", "Scenario", "Step", "ScenarioRun", "get_scenario", "run_scenario",
           "workload_binary", "CGROUP"]

CGROUP = "/sys/fs/cgroup/ksmlens"
# Fast scanning for a small guest: every mergeable page is visited each wake.
FAST_KNOBS = {"advisor_mode": "none", "pages_to_scan": 2000, "sleep_millisecs": 20, "run": 1}
MERGE_TIMEOUT = 120.0


def workload_binary() -> Path:
    """Compile the workload (static, host gcc) once per source version."""
    src = vm_data() / "scenarios" / "ksmlens-workload.c"
    if not src.exists():
        raise KsmlensError(f"{src} is missing", "is the repository complete?")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = cache_root() / "bin" / f"ksmlens-workload-{digest}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if not gcc:
        raise KsmlensError("gcc not found (needed to build the scenario workloads)",
                           "apt-get install gcc libc6-dev (./setup.sh does it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    r = subprocess.run([gcc, "-O2", "-Wall", "-static", "-pthread", "-o", str(tmp), str(src)],
                       capture_output=True, text=True)
    if r.returncode:
        first = next((l for l in r.stderr.splitlines() if "error" in l), r.stderr.strip())
        raise KsmlensError(f"building the scenario workload failed: {first}",
                           "static linking needs libc6-dev")
    tmp.rename(out)
    return out


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    help: str
    fn: Callable[["ScenarioRun"], dict]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    args: tuple[str, ...]
    steps: tuple[Step, ...]
    knobs: dict = dataclasses.field(default_factory=dict)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KsmlensError(f"scenario {self.name!r} has no step {name!r}",
                           f"its steps: {', '.join(s.name for s in self.steps)}")


class ScenarioRun:
    """A scenario's workload running in a VM, with the KSM knobs it set."""

    def __init__(self, vm, scenario: Scenario | str, *, extra_args: tuple = ()):
        self.vm = vm
        self.scenario = get_scenario(scenario) if isinstance(scenario, str) else scenario
        self.extra_args = tuple(extra_args)
        self.handle = None
        self.info: dict = {}
        self.saved_knobs: dict = {}
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}
        self.written: dict[int, set[int]] = {}   # pid -> addresses made unique by `write`

    # -- lifecycle
    def start(self) -> dict:
        binary = workload_binary()
        knobs = dict(FAST_KNOBS)
        knobs.update(self.scenario.knobs)
        self.saved_knobs = ksmsys.set_knobs(self.vm, **knobs)
        self.vm.sh(f"mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup; "
                   f"mkdir -p {CGROUP}; "
                   f"grep -qw memory /sys/fs/cgroup/cgroup.subtree_control || "
                   f"echo +memory > /sys/fs/cgroup/cgroup.subtree_control")
        self.t0 = time.monotonic()
        r = self.vm.spawn([str(binary), self.scenario.name, *self.scenario.args,
                           *self.extra_args], cgroup=CGROUP)
        self.handle = r["handle"]
        first = self.vm.send(self.handle, None, timeout=60)
        line = first.get("line")
        if not line or not line.startswith("ready "):
            err = first.get("stderr", "").strip().splitlines()
            self.vm.kill(self.handle)
            self.handle = None
            self._restore()
            raise KsmlensError(f"scenario {self.scenario.name} failed to start: "
                               f"{err[-1] if err else line}", "see the workload's stderr")
        self.info = json.loads(line[len("ready "):])
        self.history.append({"step": "start", "t": 0.0})
        return self.info

    def stop(self) -> None:
        if self.handle is not None:
            try:
                self.vm.send(self.handle, "quit", timeout=20)
            except KsmlensError:
                pass
            self.vm.kill(self.handle)
            self.handle = None
        self._restore()

    def _restore(self):
        if self.saved_knobs:
            # Merged pages of the exited workload are gone; restore in order.
            ksmsys.set_knobs(self.vm, **self.saved_knobs)
            self.saved_knobs = {}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- talking to the workload
    def command(self, line: str, timeout: float = 60.0) -> dict:
        if self.handle is None:
            raise KsmlensError(f"scenario {self.scenario.name} is not running", "start() it")
        r = self.vm.send(self.handle, line, timeout=timeout)
        out = r.get("line")
        if out is None:
            why = "timed out" if r.get("timed_out") else f"exited {r.get('rc')}"
            err = (r.get("stderr") or "").strip().splitlines()
            raise KsmlensError(f"workload {why} on {line!r}" + (f": {err[-1]}" if err else ""),
                               "see the workload's stderr")
        if out.startswith("err "):
            raise KsmlensError(f"workload refused {line!r}: {out[4:]}", "")
        if not out.startswith("ok"):
            raise KsmlensError(f"workload said {out!r} to {line!r}", "protocol mismatch")
        return json.loads(out[3:]) if len(out) > 3 else {}

    def refresh(self) -> dict:
        self.info = self.command("info")
        return self.info

    def pids(self, role: str | None = None) -> list[int]:
        return [p["pid"] for p in self.info["procs"] if role is None or p["role"] == role]

    def pages_of(self, pid: int) -> int:
        """How many of ``pid``'s pages KSM should merge: its pattern/same
        regions, less the pages a ``write`` step made unique."""
        for p in self.info["procs"]:
            if p["pid"] == pid:
                return sum(r["pages"] for r in p["regions"]
                           if r.get("content") in ("pattern", "same")) \
                    - len(self.written.get(pid, ()))
        raise KeyError(pid)

    def ksm_stat(self) -> dict:
        return ksmsys.read_ksm_stat(self.vm, self.pids())

    def regions(self, mergeable_only: bool = True):
        """(pid, region dict) for every region of every process."""
        for p in self.info["procs"]:
            for r in p["regions"]:
                if not mergeable_only or r.get("content") in ("pattern", "same"):
                    yield p["pid"], r

    def page_states(self, pid: int | None = None, region: str | None = None) -> list[dict]:
        """Per region, each page's fate as the kernel reports it (pagemap,
        kpageflags' KPF_KSM, kpagecount): see :mod:`ksmlens.guest.pagemap`."""
        sel = [(p, r) for p, r in self.regions(mergeable_only=region is None)
               if (pid is None or p == pid) and (region is None or r["name"] == region)]
        return ksmsys.read_pages(self.vm, [(p, r["start"], r["pages"]) for p, r in sel],
                                 names=[r["name"] for _, r in sel])

    def step(self, name: str) -> dict:
        st = self.scenario.step(name)
        t = time.monotonic()
        res = st.fn(self) or {}
        self.timings[name] = round(time.monotonic() - t, 2)
        self.history.append({"step": name, "t": round(time.monotonic() - self.t0, 2),
                             "result": res})
        return res

    # -- waiting on the kernel
    def wait_merging(self, expect: dict[int, int], timeout: float = MERGE_TIMEOUT) -> dict:
        """Wait until each pid maps at least ``n`` KSM pages (``KSM:`` of
        /proc/PID/smaps_rollup) and /proc/PID/ksm_stat shows
        ``ksm_merging_pages >= n`` (a stale count alone is not enough: the
        rmap_items of unmapped pages linger until ksmd passes by).

        Not KPF_KSM: 6.12's /proc/kpageflags sets it on every anon page."""
        deadline = time.monotonic() + timeout
        while True:
            stat = ksmsys.read_ksm_stat(self.vm, list(expect))
            got = {p: stat.get(p, {}).get("ksm_merging_pages", 0) for p in expect}
            ksm = ksmsys.read_smaps_ksm(self.vm, list(expect))
            if all(got[p] >= n and ksm.get(p, 0) >= n for p, n in expect.items()):
                return got
            if time.monotonic() > deadline:
                c = ksmsys.read_counters(self.vm)
                raise KsmlensError(
                    f"{self.scenario.name}: KSM did not merge as expected within "
                    f"{timeout:.0f} s: ksm_merging_pages {got}, KSM pages (smaps) "
                    f"{ksm}, wanted {expect} (full_scans={c['full_scans']}, "
                    f"pages_shared={c['pages_shared']})",
                    "is ksmd running? see `ksmlens vm run -- cat /sys/kernel/mm/ksm/*`")
            time.sleep(0.5)


# ------------------------------------------------------------------ steps

def _merged_all(run: ScenarioRun) -> dict:
    run.refresh()
    expect = {pid: run.pages_of(pid) for pid in run.pids() if run.pages_of(pid)}
    got = run.wait_merging(expect)
    return {"ksm_merging_pages": got, "counters": ksmsys.read_counters(run.vm)}


def _check(cond: bool, msg: str):
    if not cond:
        raise KsmlensError(msg, "KSM did not do what the scenario expects")


def _merge_check(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    c = res["counters"]
    distinct = int(_opt(run, "--distinct", 16))
    _check(c["pages_shared"] >= distinct,
           f"merge: pages_shared={c['pages_shared']} < {distinct} distinct patterns")
    total = sum(run.pages_of(p) for p in run.pids())
    _check(c["pages_shared"] + c["pages_sharing"] >= total,
           f"merge: shared+sharing={c['pages_shared'] + c['pages_sharing']} < {total} pages")
    return res


def _chain_check(run: ScenarioRun) -> dict:
    res = _merged_all(run)
    c = res["counters"]
    mps = run.scenario.knobs["max_page_sharing"]
    total = sum(run.pages_of(p) for p in run.pids())
    _check(c["stable_node_chains"] >= 1, f"chain: no stable node chain "
           f"(stable_node_chains={c['stable_node_chains']})")
    need = -(-total // mps)
    _check(c["stable_node_dups"] >= need, f"chain: stable_node_dups="
           f"{c['stable_node_dups']}, expected >= {need} for {total} sharers / {mps}")
    return res


def _mremap(run: ScenarioRun) -> dict:
    pid = run.pids("sharer")[0]
    # Hold ksmd (run=0 keeps merged pages) so the moved, unmerged state can be
    # seen: with fast scanning ksmd re-merges within one pass otherwise.
    run.vm.write_file(f"{ksmsys.KSM_SYSFS}/run", "0")
    r = run.command(f"mremap {pid}")
    run.refresh()
    # move_vma() broke the KSM pages of the old range before moving it
    # (ksm_madvise(MADV_UNMERGEABLE) keeps VM_MERGEABLE): at the new address
    # no page is KSM until ksmd merges them again.
    ksm = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    r["ksm_pages_after_move"] = ksm
    _check(ksm < run.pages_of(pid),
           f"mremap: {ksm} of pid {pid}'s moved pages are still KSM pages right after "
           "the move (move_vma() should have broken them)")
    r["pid"] = pid
    return r


def _remerge(run: ScenarioRun) -> dict:
    run.vm.write_file(f"{ksmsys.KSM_SYSFS}/run", "1")
    return _merged_all(run)


def _fork(run: ScenarioRun) -> dict:
    r = run.command("fork")
    run.refresh()
    return r


def _smartscan_check(run: ScenarioRun) -> dict:
    before = ksmsys.read_counters(run.vm)
    res = _merged_all(run)
    after = ksmsys.wait_full_scans(run.vm, 8, timeout=MERGE_TIMEOUT)
    res["counters"] = after
    res["pages_skipped_delta"] = after["pages_skipped"] - before["pages_skipped"]
    _check(after["smart_scan"] == 1, "smartscan: smart_scan is off in the guest")
    _check(res["pages_skipped_delta"] > 0,
           f"smartscan: pages_skipped did not grow over 8 full scans "
           f"({before['pages_skipped']} -> {after['pages_skipped']})")
    return res


COW_BREAK_PAGES = 8


def _cow_break(run: ScenarioRun) -> dict:
    pid = run.pids("sharer")[0]
    before = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    # Hold ksmd: the written pages' rmap_items stay STABLE, on pages that are
    # no longer KSM, until ksmd's next visit (should_skip_rmap_item()).
    run.vm.write_file(f"{ksmsys.KSM_SYSFS}/run", "0")
    idx = list(range(COW_BREAK_PAGES))
    r = run.command(f"write {pid} data {' '.join(map(str, idx))}")
    run.refresh()
    after = ksmsys.read_smaps_ksm(run.vm, [pid])[pid]
    _check(before - after == COW_BREAK_PAGES,
           f"cow-break: pid {pid} maps {before} -> {after} KSM pages, expected "
           f"{COW_BREAK_PAGES} fewer after writing into them")
    start = next(reg["start"] for p, reg in run.regions() if p == pid and reg["name"] == "data")
    addrs = [start + k * 4096 for k in idx]
    run.written.setdefault(pid, set()).update(addrs)
    r.update(pid=pid, addresses=addrs, ksm_pages_before=before, ksm_pages_after=after)
    return r


def _resume(run: ScenarioRun) -> dict:
    run.vm.write_file(f"{ksmsys.KSM_SYSFS}/run", "1")
    # two increments of full_scans: every item was visited at least once, so the
    # written pages' rmap_items have left their stable nodes
    c = ksmsys.wait_full_scans(run.vm, 2, timeout=MERGE_TIMEOUT)
    return {"run": 1, "full_scans": c["full_scans"]}


def _opt(run: ScenarioRun, name: str, default):
    args = list(run.scenario.args) + list(run.extra_args)
    if name in args:
        return args[args.index(name) + 1]
    return default


MERGED = Step("merged", "wait until every process's pages are merged "
              "(/proc/PID/ksm_stat ksm_merging_pages)", _merged_all)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("merge", "identical pages in 3 processes (16 distinct patterns x 64 pages)",
             (), (Step("merged", MERGED.help + "; check pages_shared/pages_sharing",
                       _merge_check),)),
    Scenario("chain", "6 processes x 64 identical pages, max_page_sharing=16: "
             "a stable node chain with dups", (),
             (Step("merged", MERGED.help + "; check stable_node_chains/dups", _chain_check),),
             knobs={"max_page_sharing": 16}),
    Scenario("mremap", "merge, move one process's VMA with mremap(MAYMOVE|FIXED), "
             "let ksmd re-merge it at the new address", (),
             (MERGED,
              Step("mremap", "hold ksmd (run=0), move the first sharer's region >= 1 GiB "
                   "away (move_vma() breaks its KSM pages, VM_MERGEABLE stays)", _mremap),
              Step("remerged", "let ksmd run again; wait until it merged the moved "
                   "pages at their new address", _remerge))),
    Scenario("smartscan", "unique and volatile pages beside mergeable ones: "
             "ages and skips build up", (),
             (Step("merged", "wait for the mergeable pages, then 8 more full scans; "
                   "check pages_skipped grew", _smartscan_check),
              Step("cow-break", f"hold ksmd (run=0), write into {COW_BREAK_PAGES} merged "
                   "pages of the first sharer: COW breaks them, their rmap_items stay "
                   "STABLE until ksmd's next visit (the union hazard)", _cow_break),
              Step("resume", "let ksmd run again (run=1) for two full scans: the "
                   "written pages' rmap_items leave their stable nodes", _resume)),
             knobs={"smart_scan": 1}),
    Scenario("fork", "merge, then fork: the child shares KSM pages through the "
             "anon_vma hierarchy", (),
             (MERGED, Step("fork", "the first sharer forks a child that keeps the "
                           "mapping", _fork),
              Step("child-merged", "wait until ksmd has an rmap_item for each "
                   "of the child's pages", _merged_all))),
    Scenario("file-cow", "MAP_PRIVATE file mapping at a file offset, written (COW) "
             "then merged: vm_pgoff is the file offset", (),
             (MERGED,)),
]}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KsmlensError(f"unknown scenario {name!r}",
                           f"choose one of {', '.join(SCENARIOS)}") from None


def _fmt_counters(c: dict) -> str:
    keys = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared",
            "pages_volatile", "pages_skipped", "stable_node_chains", "stable_node_dups")
    return "  ".join(f"{k}={c.get(k)}" for k in keys)


def run_scenario(vm, scenario: Scenario | str, *, keep: bool = False, out=sys.stdout
                 ) -> ScenarioRun:
    """Run every step of a scenario, printing the kernel's counters."""
    run = ScenarioRun(vm, scenario)
    print(f"before: {_fmt_counters(ksmsys.read_counters(vm))}", file=out)
    run.start()
    try:
        print(f"{run.scenario.name}: started, pids {run.pids()}", file=out)
        for st in run.scenario.steps:
            res = run.step(st.name)
            brief = {k: v for k, v in res.items() if k != "counters"}
            print(f"{run.scenario.name}: step {st.name} done in {run.timings[st.name]} s "
                  f"{json.dumps(brief) if brief else ''}", file=out)
        print(f"after:  {_fmt_counters(ksmsys.read_counters(vm))}", file=out)
        stat = run.ksm_stat()
        for pid, s in stat.items():
            print(f"  pid {pid}: " + "  ".join(f"{k}={v}" for k, v in s.items()), file=out)
    except BaseException:
        run.stop()
        raise
    if not keep:
        run.stop()
    return run
