"""Running a scenario's workload in the guest: the program, its steps, its run.

A :class:`Scenario` names a guest program (a small static C file under
``vm/scenarios/``, built on the host by :func:`static_binary` and run in the
guest through the shared root) and its named :class:`Step` s;
:class:`ScenarioRun` starts it with the KSM knobs it needs, talks to it one
line at a time and puts the knobs back. The catalogue of scenarios is
:mod:`ksmlens.lab.scenarios`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import Arch, get_arch
from ksmlens.kernel.sysfs import RUN_MERGE, RUN_STOP, RUN_UNMERGE
from ksmlens.lab.paths import cache_root, vm_data

__all__ = ["Scenario", "Step", "ScenarioRun", "workload_binary", "static_binary",
           "static_binary_path", "WORKLOAD_SOURCE", "CGROUP", "FAST_KNOBS", "MERGE_TIMEOUT",
           "missing_need", "check", "wait_for", "hold", "go", "SCENARIOS", "get_scenario"]

# Every scenario by name: the catalogues (ksmlens.lab.scenarios,
# ksmlens.lab.manyvmas) add theirs when imported.
SCENARIOS: dict[str, "Scenario"] = {}


def get_scenario(name: str) -> "Scenario":
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KsmlensError(f"unknown scenario {name!r}",
                           f"choose one of {', '.join(SCENARIOS)}") from None

CGROUP = "/sys/fs/cgroup/ksmlens"
# Fast scanning for a small guest: every mergeable page is visited each wake.
FAST_KNOBS = {"advisor_mode": "none", "pages_to_scan": 2000, "sleep_millisecs": 20,
              "run": RUN_MERGE}
MERGE_TIMEOUT = 120.0


def static_binary_path(src: Path, name: str, arch: str | Arch | None = None) -> Path:
    """Where :func:`static_binary` keeps ``src``'s build: ``<cache>/bin/NAME-<digest>``
    (``NAME-arm64-<digest>`` for arm64), the digest that of the source's
    bytes (built or not)."""
    if not src.exists():
        raise KsmlensError(f"{src} is missing", "is the repository complete?")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    a = get_arch(arch)
    return cache_root() / "bin" / f"{name}-{a.prefix}{digest}"


def static_binary(src: Path, name: str, what: str, arch: str | Arch | None = None) -> Path:
    """Compile the guest program ``src`` (static; the host's gcc, or the
    cross compiler for another ``arch``) once per source version into
    :func:`static_binary_path`; ``what`` names it in errors."""
    a = get_arch(arch)
    out = static_binary_path(src, name, a)
    if out.exists():
        return out
    gcc = shutil.which(a.gcc)
    if not gcc:
        pkg = "gcc libc6-dev" if a.gcc == "gcc" else a.cross_package
        raise KsmlensError(f"{a.gcc} not found (needed to build {what})",
                           f"apt-get install {pkg} (./setup.sh does it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    r = subprocess.run([gcc, "-O2", "-Wall", "-static", "-pthread", "-o", str(tmp), str(src)],
                       capture_output=True, text=True)
    if r.returncode:
        first = next((l for l in r.stderr.splitlines() if "error" in l), r.stderr.strip())
        raise KsmlensError(f"building {what} failed: {first}", "static linking needs libc6-dev")
    tmp.rename(out)
    return out


WORKLOAD_SOURCE = "scenarios/ksmlens-workload.c"   # under vm/


def workload_binary(source: str = WORKLOAD_SOURCE, arch: str | Arch | None = None) -> Path:
    """Compile a scenario program (``source`` under vm/; default the
    workload) statically for ``arch`` (None: x86-64), once per source version."""
    return static_binary(vm_data() / source, Path(source).stem, f"the scenario program {source}",
                         arch)


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
    # False for the states from issue 9's field programs: those are proven
    # by tests/lab/test_scenarios_field.py, the lab's six by tests/lab/test_lab.py
    # and tests/lens/test_lens_vm.py.
    core: bool = True
    numa: int = 1                 # NUMA nodes the scenario needs
    # What the kernel must have, found in the guest (never by version): a
    # /sys/kernel/mm/ksm file name, or "ksym:NAME" (a symbol in /proc/kallsyms)
    needs: tuple[str, ...] = ()
    program: str = WORKLOAD_SOURCE  # the guest program (under vm/) it runs
    # (vm, program args) -> None, raising KsmlensError in one line when the
    # guest cannot hold the state asked for (checked before the program starts)
    precheck: Callable | None = None

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KsmlensError(f"scenario {self.name!r} has no step {name!r}",
                           f"its steps: {', '.join(s.name for s in self.steps)}")


# what each need is, for the one-line refusal
_NEEDS = {
    "smart_scan": "SmartScan (commit 5e924ff54d08, \"mm/ksm: add \"smart\" page scanning "
                  "mode\", 6.7)",
    "ksm_zero_pages": "KSM zero-page counting (commit e2942062e01d, \"ksm: count all zero "
                      "pages placed by KSM\", 6.6)",
    "ksym:ksm_enable_merge_any": "prctl(PR_SET_MEMORY_MERGE) (commit d7597f59d1d3, \"mm: "
                                 "add new api to enable ksm per process\", 6.4)",
}


def missing_need(vm, scenario: "Scenario") -> None:
    """Raise :class:`KsmlensError` in one line if the guest kernel lacks what
    ``scenario.needs``: a ``/sys/kernel/mm/ksm`` file, or a kernel symbol
    (``ksym:NAME``, looked up in the guest's /proc/kallsyms)."""
    if not scenario.needs:
        return
    files = set(ksmsys.read_counters(vm))
    for need in scenario.needs:
        if need.startswith("ksym:"):
            r = vm.run(["grep", "-qE", rf" {need[5:]}$", "/proc/kallsyms"])
            ok = r.rc == 0
        else:
            ok = need in files
        if not ok:
            what = _NEEDS.get(need, need)
            raise KsmlensError(f"scenario {scenario.name} cannot run on this kernel: it has "
                               f"no {what}",
                               "run it on a kernel that has it (the 6.12 lab kernels)")


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
        self.marks: dict = {}                     # what a step leaves for a later one
        self.before: dict = {}

    # -- lifecycle
    def start(self) -> dict:
        if self.handle is not None:
            # a second workload would replace the first's handle, and stop()
            # could no longer end the first: its processes would stay merged
            raise KsmlensError(f"scenario {self.scenario.name} is already running "
                               "(`with ScenarioRun(...)` starts it)",
                               "call start() once, or stop() first")
        missing_need(self.vm, self.scenario)
        if self.scenario.precheck is not None:
            self.scenario.precheck(self.vm, (*self.scenario.args, *self.extra_args))
        binary = workload_binary(self.scenario.program, self.vm.arch)
        knobs = dict(FAST_KNOBS)
        knobs.update(self.scenario.knobs)
        if self.scenario.numa > 1:
            ksmsys.require_numa(self.vm, f"scenario {self.scenario.name} needs "
                                f"{self.scenario.numa}", self.scenario.numa)
        old_run = None
        if not self.scenario.core:
            # Start from nothing merged (run=2 unmerges everything and frees
            # the rmap_items of exited mms), so the counters are exact.
            old_run = ksmsys.read_counters(self.vm)["run"]
            ksmsys.set_run(self.vm, RUN_UNMERGE)
        self.saved_knobs = ksmsys.set_knobs(self.vm, **knobs)
        if old_run is not None:
            self.saved_knobs["run"] = RUN_STOP if old_run == RUN_UNMERGE else old_run
        # The kernel's counters before the workload: scenario checks are
        # deltas from here (another KSM user in the guest keeps its share).
        self.before = ksmsys.read_counters(self.vm)
        self.vm.sh(f"mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup; "
                   f"mkdir -p {CGROUP}; "
                   f"grep -qw memory /sys/fs/cgroup/cgroup.subtree_control || "
                   f"echo +memory > /sys/fs/cgroup/cgroup.subtree_control")
        self.t0 = time.monotonic()
        r = self.vm.spawn([self.vm.guest_path(binary), self.scenario.name, *self.scenario.args,
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
        kpageflags' KPF_KSM, kpagecount): see :mod:`ksmlens.lab.guest.pagemap`."""
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




def check(cond: bool, msg: str):
    """Raise :class:`KsmlensError` with ``msg`` unless ``cond``: a scenario's
    expectation on what the kernel reports."""
    if not cond:
        raise KsmlensError(msg, "KSM did not do what the scenario expects")


def wait_for(run: ScenarioRun, what: str, probe, timeout: float = MERGE_TIMEOUT):
    """Poll ``probe() -> (done, value)`` until done; error with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        done, value = probe()
        if done:
            return value
        if time.monotonic() > deadline:
            raise KsmlensError(f"{run.scenario.name}: the kernel did not reach {what} "
                               f"within {timeout:.0f} s: {value}",
                               "is ksmd running? see `ksmlens vm run -- cat /sys/kernel/mm/ksm/*`")
        time.sleep(0.3)


def hold(run: ScenarioRun):
    """run=0: ksmd stops between two batches (the write takes ksmd's mutex),
    merged pages stay and no rmap_item changes."""
    ksmsys.set_run(run.vm, RUN_STOP)


def go(run: ScenarioRun):
    ksmsys.set_run(run.vm, RUN_MERGE)
