"""``ksmlens selftests``: the kernel's own KSM selftests as a peer suite.

The kernel ships its own KSM tests in ``tools/testing/selftests/mm``:
``ksm_functional_tests.c`` (David Hildenbrand: unmerge, zero pages, uffd-wp,
PROT_NONE, ``PR_SET_MEMORY_MERGE``) and ``ksm_tests.c`` (one mode per run:
``-M`` merge, ``-Z`` zero pages, ``-N`` NUMA, ``-U`` unmerge, ``-P``/``-H``
merge time, ``-C`` COW time, ``-t 1`` prctl merging). ksmlens builds both from
Debian's ``linux-source-6.12`` (never vendored: the tarball in /usr/src is
the source), runs them in a lab guest, and while they run pauses the guest at
random moments and checks its walk against the kernel each time.

A paused check compares what can be compared while the guest is stopped (the
kernel cannot print sysfs then; ``ksmlens check`` reads sysfs around the
pause and retries until it held still, which while these suites run takes
seconds): the walk's own counts (:func:`ksmlens.experiments.check.walk_counts`) against
the globals ``mm/ksm.c``'s ``*_show()`` functions print, read by drgn in the
same pause; every mm slot's items, stable items and KSM zero pages against
``mm->ksm_rmap_items`` / ``ksm_merging_pages`` / ``ksm_zero_pages`` (what
``proc_pid_ksm_stat()`` prints); every stable node's ``rmap_hlist_len``
against its list and every KSM page's mapcount against the PTEs mapping it
(:func:`ksmlens.experiments.check.page_checks`). Each pause is one observation: a walk
that lands in a KSM update half done (ksmd unlinks an rmap_item from its
mm's list before it takes it off its stable node;
``remove_node_from_stable_tree()`` clears STABLE_FLAG item by item), which
:func:`ksmlens.lens.snapshot.take_snapshot` classifies with who was busy, or
counts that a task visibly on a CPU has half updated (:func:`classify`:
ksmd in ``replace_page()`` or at its cursor's rmap_list, a PTE update, a
``munmap()`` or ``exit_mmap()`` under way, each only with its evidence) is
counted as "mid-update (classified)", never as agreement.

    res = run_selftests(vm)            # both suites, every ksm_tests mode
    print(res.summary()); assert res.ok

Binaries are cached per source version under ``<cache>/selftests/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ksmlens.lab.kbuild as kbuild
from ksmlens.lab.kbuild import BuildLock
from ksmlens.errors import KsmlensError
from ksmlens.lens.midupdate import (classify, exit_mmap_window, in_flight_window,  # noqa: F401
                                   munmap_window, on_cpu, pte_update_window,
                                   replace_page_window, rmap_list_window)
from ksmlens.lab.paths import cache_root, vm_data

__all__ = ["selftests_dir", "selftests_built", "MREMAP_SELFTEST_SOURCE", "SUITES", "MREMAP_SUITE", "compare_paused", "classify", "on_cpu", "replace_page_window", "rmap_list_window",
           "pte_update_window", "munmap_window", "exit_mmap_window", "in_flight_window", "parse_tap", "SelftestRun", "KSM_TESTS_MODES", "build_selftests", "PausedCheck", "SuiteResult",
           "SelftestsResult", "paused_check", "run_selftests", "mremap_selftest_binary",
           "MremapResult", "run_mremap_selftest"]

SUITES = ("ksm_functional_tests", "ksm_tests")
MREMAP_SUITE = "ksm_and_mremap"   # the project's own: vm/selftests/ksm-mremap-migrate.c
BUILD_FORMAT = 1          # bump when the build recipe changes what it produces

# ksm_tests runs one test per invocation (ksm_tests.c main()). Sizes chosen
# for a 2 GB guest under TCG: -P/-H merge 32 MiB twice over (ksm_tests sets
# pages_to_scan to -p, default 10, and sleep_millisecs 0).
KSM_TESTS_MODES: dict[str, tuple[str, ...]] = {
    "merge": ("-M", "-p", "10"),                 # check_ksm_merge, madvise
    "zero": ("-Z", "-p", "10", "-z", "1"),       # check_ksm_zero_page_merge, use_zero_pages=1
    "numa0": ("-N", "-m", "0"),                  # check_ksm_numa_merge, merge_across_nodes=0
    "numa1": ("-N", "-m", "1"),                  # ... merge_across_nodes=1
    "unmerge": ("-U",),                          # check_ksm_unmerge
    "merge-time": ("-P", "-s", "32"),            # ksm_merge_time
    "merge-time-thp": ("-H", "-s", "32"),        # ksm_merge_hugepages_time (THP)
    "cow-time": ("-C",),                         # ksm_cow_time
    "prctl": ("-M", "-p", "10", "-t", "1"),      # check_ksm_merge, PR_SET_MEMORY_MERGE
}
KSFT_PASS, KSFT_FAIL, KSFT_SKIP = 0, 1, 4      # tools/testing/selftests/kselftest.h

# Paths of the source tarball a selftests build needs (headers_install, the
# selftests' own headers, include/vdso for ksm_tests.c).
_MEMBERS = ("Makefile", "Kbuild", "Kconfig", "scripts", "include", "arch/x86", "usr",
            "tools/include", "tools/arch/x86", "tools/scripts", "tools/build",
            "tools/testing/selftests/kselftest.h", "tools/testing/selftests/kselftest",
            "tools/testing/selftests/kselftest_harness.h",
            "tools/testing/selftests/lib.mk", "tools/testing/selftests/mm",
            "tools/testing/selftests/x86/check_cc.sh", "mm/gup_test.h")


# ------------------------------------------------------------------ building

def selftests_dir() -> Path:
    """``<cache>/selftests/<source version>-f<format>``: where
    :func:`build_selftests` keeps its build (``bin/``, ``meta.json``)."""
    ver = re.sub(r"[^A-Za-z0-9._-]", "_", kbuild.source_version())
    return cache_root() / "selftests" / f"{ver}-f{BUILD_FORMAT}"


def _run_logged(cmd, cwd, logf, what: str) -> None:
    logf.write(f"$ {' '.join(map(str, cmd))}  (in {cwd})\n")
    logf.flush()
    r = subprocess.run(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT)
    if r.returncode:
        logf.flush()
        tail = Path(logf.name).read_text(errors="replace").strip().splitlines()
        err = next((l for l in reversed(tail) if re.search(r"error|Error|cannot|No such", l)),
                   tail[-1] if tail else "")
        raise KsmlensError(f"building the kernel's KSM selftests failed ({what}): "
                           f"{err.strip()[:200]}", f"full log: {logf.name}")


def selftests_built() -> bool:
    """True when :func:`build_selftests` would find its build in the cache."""
    top = selftests_dir()
    return (top / "meta.json").exists() and all((top / "bin" / n).exists() for n in SUITES)


def build_selftests(*, force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Build ``ksm_functional_tests`` and ``ksm_tests`` (statically linked, so
    the guest needs nothing from the host's libraries) from the
    ``linux-source-6.12`` tarball; return {name: path}. Cached by source
    version: ``<cache>/selftests/<version>-f<format>/bin/``.

    The needed part of the tarball is unpacked into a private tree there
    (the kernel builds' shared tree is never touched), ``make
    headers_install`` installs the uAPI headers into it, and the selftests'
    own Makefile (``tools/testing/selftests/mm``) builds the two targets with
    ``KHDR_INCLUDES`` pointing at them, ``-static`` added, ``-lnuma`` from
    Debian's ``libnuma-dev`` (``libnuma.a``).
    """
    top = selftests_dir()
    bindir = top / "bin"
    want = {n: bindir / n for n in SUITES}
    if not force and (top / "meta.json").exists() and all(p.exists() for p in want.values()):
        return want

    def log(msg):
        if not quiet:
            print(f"ksmlens: {msg}", file=sys.stderr, flush=True)

    for tool, pkg in (("make", "make"), ("gcc", "gcc"), ("tar", "tar"), ("xz", "xz-utils")):
        if not shutil.which(tool):
            raise KsmlensError(f"{tool} not found (needed to build the KSM selftests)",
                               f"apt-get install {pkg} (./setup.sh does it)")
    if not Path("/usr/include/numa.h").exists():
        raise KsmlensError("numa.h not found: ksm_tests needs libnuma-dev",
                           "apt-get install libnuma-dev (./setup.sh does it)")
    tarball = kbuild.source_tarball()
    with BuildLock(cache_root() / "selftests" / "build.lock", "selftests build"):
        if not force and (top / "meta.json").exists() and all(p.exists() for p in want.values()):
            return want
        t0 = time.monotonic()
        shutil.rmtree(top, ignore_errors=True)
        top.mkdir(parents=True)
        src, hdr, tmp_bin = top / "src", top / "headers", top / "bin.tmp"
        with open(top / "build.log", "w", buffering=1) as logf:
            first = subprocess.run(f"tar tJf {tarball} | head -1", shell=True,
                                   capture_output=True, text=True).stdout.strip()
            prefix = first.split("/", 1)[0]
            if not prefix:
                raise KsmlensError(f"cannot list {tarball}", "is linux-source-6.12 intact?")
            log(f"unpacking the selftests' part of {tarball.name} into {src}")
            src.mkdir()
            _run_logged(["tar", "xJf", str(tarball), "--strip-components=1", "-C", str(src),
                         *[f"{prefix}/{m}" for m in _MEMBERS]], top, logf, "tar")
            log("make headers_install (private copy)")
            _run_logged(["make", "ARCH=x86_64", f"-j{os.cpu_count() or 1}",
                         f"INSTALL_HDR_PATH={hdr}", "headers_install"], src, logf,
                        "headers_install")
            log("building ksm_functional_tests and ksm_tests (static)")
            tmp_bin.mkdir()
            mm = src / "tools/testing/selftests/mm"
            _run_logged(["make", "-C", str(mm), f"OUTPUT={tmp_bin}",
                         f"KHDR_INCLUDES=-isystem {hdr / 'include'}", "LDFLAGS=-static",
                         *[str(tmp_bin / n) for n in SUITES]], top, logf, "make")
        for n in SUITES:
            if not (tmp_bin / n).exists():
                raise KsmlensError(f"the selftests build produced no {n}",
                                   f"full log: {top / 'build.log'}")
        tmp_bin.rename(bindir)
        meta = {"source": kbuild.source_version(), "tarball": str(tarball),
                "format": BUILD_FORMAT, "binaries": list(SUITES),
                "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (top / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(src, ignore_errors=True)      # 170 MB; headers and binaries stay
        log(f"built the KSM selftests in {meta['build_seconds']} s: {bindir}")
    return want


# ------------------------------------------------------------------ paused checks

@dataclasses.dataclass
class PausedCheck:
    """One pause while a selftest ran: ``outcome`` is ``agree``,
    ``disagree`` (rows that differ in ``mismatches``) or ``mid-update``
    (the walk met a state ksmd leaves only mid-operation; ``detail``)."""
    suite: str
    mode: str | None
    at: float                      # seconds after the test process started
    outcome: str
    paused_seconds: float = 0.0
    rmap_items: int = 0
    stable_nodes: int = 0
    rows: int = 0
    mismatches: list = dataclasses.field(default_factory=list)
    detail: str = ""
    ksmd: dict | None = None
    evidence: dict | None = None
    on_cpu: list | None = None     # the task each CPU ran (idle left out)


def compare_paused(snap) -> list:
    """Rows (:class:`ksmlens.experiments.check.Row`, ``kernel`` = the value the kernel
    holds, read by drgn in the same pause) of everything a paused walk can be
    compared with: the globals sysfs prints (``*_show()`` in mm/ksm.c, with
    ``ksm_zero_pages`` decoded from the page tables and ``general_profit``),
    each mm slot's ``mm->ksm_rmap_items`` / ``ksm_merging_pages`` /
    ``ksm_zero_pages`` (what ``proc_pid_ksm_stat()`` prints), and
    :func:`ksmlens.experiments.check.page_checks` (each stable node's ``rmap_hlist_len``
    against its list, each KSM page's mapcount against the PTEs mapping it)."""
    from ksmlens.experiments.check import Row, page_checks, walk_counts
    w = walk_counts(snap)
    g = snap.counters
    rows = [Row(k, w[k], g.get(k), None)
            for k in ("pages_shared", "pages_sharing", "pages_unshared", "stable_node_chains",
                      "stable_node_dups", "ksm_zero_pages", "general_profit")
            if k in w and k in g]
    rows.append(Row("ksm_rmap_items", w["rmap_items"], g.get("rmap_items"), None))
    items = {i.id: i for i in snap.items()}
    for slot in snap.slots():
        label = f"pid {slot.pid}" if slot.pid is not None else f"mm {slot.mm}"
        mine = [items[i] for i in slot.items if i in items]
        rows.append(Row(f"{label} ksm_rmap_items", len(mine), slot.mm_ksm_rmap_items, None))
        rows.append(Row(f"{label} ksm_merging_pages",
                        sum(1 for i in mine if i.state == "stable"),
                        slot.mm_ksm_merging_pages, None))
        if slot.ksm_zero_pages is not None and slot.mm_ksm_zero_pages is not None:
            rows.append(Row(f"{label} ksm_zero_pages", slot.ksm_zero_pages,
                            slot.mm_ksm_zero_pages, None))
    rows += page_checks(snap)
    return rows


def paused_check(prog, vm, suite: str = "", mode: str | None = None,
                 at: float = 0.0) -> PausedCheck:
    """Pause ``vm`` once, walk it, compare (see :func:`compare_paused`).

    One pause, no retry (``take_snapshot(retries=1)``): a walk that lands in
    a KSM update half done (``meta["mid_update"]``, classified by
    :func:`ksmlens.lens.snapshot.take_snapshot` with who was busy) is a
    ``mid-update`` check, its counts not compared. The guest is stopped
    first to record which task each CPU runs (:func:`on_cpu`), then walked
    in the same pause (``take_snapshot``'s own stop is a no-op then; it
    resumes the guest), with each vCPU's kernel stack unwound from its
    registers; mismatches that one of those tasks, or ksmd, is visibly in
    the middle of are classified too (:func:`classify`)."""
    from ksmlens.lens.snapshot import take_snapshot
    # The control socket serves one client: stop, read, let go; take_snapshot
    # connects itself (its stop is a no-op on a stopped guest) and resumes.
    with vm.qmp(timeout=30) as q:
        q.stop()
        try:
            regs = q.cpu_registers()
        except KsmlensError:
            regs = None
    try:
        cpus = on_cpu(prog, regs)
        snap = take_snapshot(prog, mode="consistent", vm=vm, retries=1)
    except BaseException:
        with vm.qmp(timeout=30) as q:
            q.cont()
        raise
    common = dict(paused_seconds=snap.meta.get("paused_seconds", 0.0),
                  rmap_items=len(snap.rmap_items), stable_nodes=len(snap.stable_nodes),
                  ksmd=snap.meta.get("ksmd"), on_cpu=cpus)
    mid = snap.meta.get("mid_update")
    if mid:
        what = "; ".join(f"{k} x{v}" for k, v in (mid.get("what") or {}).items())
        busy = ", ".join(mid.get("busy") or [])
        return PausedCheck(suite, mode, round(at, 2), "mid-update",
                           detail=f"{what} (busy: {busy})", **common)
    rows = compare_paused(snap)
    bad = [r for r in rows if not r.ok]
    evidence = _mapcount_evidence(snap) if bad else None
    mism = [{"what": r.what, "walk": r.walk, "kernel": r.kernel} for r in bad]
    why = classify(snap, bad, cpus) if bad else None
    if why:
        return PausedCheck(suite, mode, round(at, 2), "mid-update", rows=len(rows),
                           detail=why, evidence=evidence, mismatches=mism, **common)
    return PausedCheck(suite, mode, round(at, 2), "disagree" if bad else "agree",
                       rows=len(rows), evidence=evidence, mismatches=mism, **common)


def _mapcount_evidence(snap) -> dict:
    """What the walk saw around a mapcount/PTE mismatch: the KSM pages whose
    folio mapcount differs from the PTEs mapping them, and ksmd's scan
    cursor (``ksm_scan.rmap_list`` points at the ``rmap_list`` field, offset
    0, of the rmap_item ``cmp_and_merge_page()`` works on)."""
    off = [{"node": n.id, "kpfn": n.kpfn, "mapcount": n.mapcount, "ptes": n.ptes,
            "items": len(n.items)}
           for n in snap.nodes()
           if n.kind in ("regular", "dup") and n.page_is_ksm and n.ptes is not None
           and n.mapcount is not None and n.ptes != n.mapcount]
    cur = None
    items = {i.id: i for i in snap.items()}
    it = items.get(snap.scan.get("rmap_list") or "")
    if it is not None:
        cur = {"item": it.id, "pid": it.pid, "address": it.address, "state": it.state,
               "stable_node": it.stable_node, "pte": it.pte, "pfn": it.pfn,
               "page_ksm": it.page_ksm}
    return {"nodes": off, "cursor": cur, "ksmd": snap.meta.get("ksmd")}


# ------------------------------------------------------------------ running

@dataclasses.dataclass
class SelftestRun:
    """One selftest process: its TAP results and exit code."""
    suite: str
    mode: str | None
    argv: list
    rc: int | None
    passed: int
    failed: int
    skipped: int
    planned: int | None
    seconds: float
    output: list
    failed_tries: list = dataclasses.field(default_factory=list)  # earlier tries' output

    @property
    def ok(self) -> bool:
        complete = self.planned is None or self.passed + self.failed + self.skipped == self.planned
        return self.rc in (KSFT_PASS, KSFT_SKIP) and not self.failed and complete


@dataclasses.dataclass
class SuiteResult:
    name: str
    runs: list
    checks: list
    rounds: int = 0

    def count(self, outcome: str) -> int:
        return sum(1 for c in self.checks if c.outcome == outcome)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def describe(self) -> str:
        p = sum(r.passed for r in self.runs)
        f = sum(r.failed for r in self.runs)
        s = sum(r.skipped for r in self.runs)
        what = ", ".join(x for x in (f"{p} pass", f"{f} fail" if f else "",
                                     f"{s} skip" if s else "") if x)
        if self.name == "ksm_tests":
            what = f"{len(self.runs) // max(self.rounds, 1)} modes: {what}"
        if self.rounds > 1:
            what = f"{self.rounds} rounds, {what}"
        bad = [r for r in self.runs if not r.ok]
        if bad:
            what += "; failed: " + ", ".join(r.mode or f"rc {r.rc}" for r in bad)
        again = [f"{r.mode or self.name} on try {len(r.failed_tries) + 1}"
                 for r in self.runs if r.ok and r.failed_tries]
        if again:
            what += "; passed " + ", ".join(again)
        a, d, m = self.count("agree"), self.count("disagree"), self.count("mid-update")
        checks = f"{a} paused checks agree"
        if d:
            checks = f"{len(self.checks)} paused checks: {a} agree, {d} DISAGREE"
        if m:
            checks += f", {m} mid-update (classified)"
        return f"{self.name} {'ok' if self.ok else 'FAILED'} ({what}), {checks}"


@dataclasses.dataclass
class SelftestsResult:
    release: str
    suites: list
    min_checks: int
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.suites) and all(
            s.ok and not s.count("disagree") and s.count("agree") >= self.min_checks
            for s in self.suites)

    def summary(self) -> str:
        parts = []
        for s in self.suites:
            d = s.describe()
            if s.count("agree") < self.min_checks:
                d += f" (fewer than {self.min_checks})"
            parts.append(d)
        return "selftests: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {"release": self.release, "ok": self.ok, "min_checks": self.min_checks,
                "seconds": self.seconds, "summary": self.summary(),
                "suites": [{"name": s.name, "ok": s.ok,
                            "runs": [dataclasses.asdict(r) for r in s.runs],
                            "checks": [dataclasses.asdict(c) for c in s.checks]}
                           for s in self.suites]}


_TAP = re.compile(r"^(not ok|ok) \d+\b(.*)$")


_TOTALS = re.compile(r"^# Totals: pass:(\d+) fail:(\d+) xfail:\d+ xpass:\d+ skip:(\d+)"
                     r"(?: error:(\d+))?")


def parse_tap(lines) -> dict:
    """Counts from kselftest TAP output: ``ok N``, ``ok N # SKIP``,
    ``not ok N``, and the plan ``1..N`` (the first one).

    When the output has ``# Totals:`` lines (``ksft_print_cnts()``), the
    last one wins: a child that falls through after a failed ``execv()`` (as
    6.12's ``test_prctl_fork_exec`` does: its argv has no NULL terminator)
    prints its own results and totals into the same pipe before the parent,
    which waits for it, prints its own last."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "planned": None}
    totals = None
    for line in lines:
        m = re.match(r"^1\.\.(\d+)$", line.strip())
        if m:
            if out["planned"] is None:
                out["planned"] = int(m.group(1))
            continue
        m = _TOTALS.match(line.strip())
        if m:
            totals = m
            continue
        m = _TAP.match(line.strip())
        if not m:
            continue
        if m.group(1) == "not ok":
            out["failed"] += 1
        elif re.search(r"#\s*SKIP", m.group(2), re.I):
            out["skipped"] += 1
        else:
            out["passed"] += 1
    if totals:
        out["passed"], out["failed"], out["skipped"] = (int(totals.group(i)) for i in (1, 2, 3))
        out["failed"] += int(totals.group(4) or 0)
    return out


def _drain(vm, handle: int, lines: list) -> int | None:
    """Collect what the process printed so far; its exit code once it ended."""
    while True:
        r = vm.send(handle, None, timeout=0)
        if r.get("eof"):
            return r.get("rc")
        if r.get("timed_out") or r.get("line") is None:
            return None
        lines.append(r["line"])


def _observe(vm, prog, suite: str, mode: str | None, argv: list, cwd: str, *, rng,
             gap: tuple, timeout: float, checks: list, log) -> SelftestRun:
    """Run ``argv`` in the guest (cwd ``cwd``, stderr into stdout) and pause
    the guest at random moments while it runs, a paused check each time."""
    import shlex
    script = f"cd {shlex.quote(cwd)} && exec {shlex.join(argv)} 2>&1"
    h = vm.request({"op": "spawn", "argv": ["/bin/sh", "-c", script], "env": {}})["handle"]
    t0 = time.monotonic()
    lines: list = []
    rc = None
    try:
        while True:
            time.sleep(rng.uniform(*gap))
            rc = _drain(vm, h, lines)
            if rc is not None:
                break
            if time.monotonic() - t0 > timeout:
                raise KsmlensError(f"{suite} {mode or ''} still running after {timeout:.0f} s "
                                   "(killed)", "is the guest too slow? see the console log")
            c = paused_check(prog, vm, suite, mode, time.monotonic() - t0)
            checks.append(c)
            if c.outcome != "agree":
                log(f"  paused check at {c.at:.2f} s: {c.outcome.upper()}: "
                    + (c.detail or "; ".join(f"{m['what']} walk {m['walk']} kernel "
                                            f"{m['kernel']}" for m in c.mismatches)))
    finally:
        try:
            vm.kill(h)
        except KsmlensError:
            pass
    tap = parse_tap(lines)
    return SelftestRun(suite, mode, list(argv), rc, tap["passed"], tap["failed"], tap["skipped"],
                   tap["planned"], round(time.monotonic() - t0, 2), lines)


# Knobs for ksm_functional_tests: it only writes run (2 to unmerge, 1 to merge)
# and waits for two full scans each time; scan fast so that it ends soon.
FUNCTIONAL_KNOBS = {"advisor_mode": "none", "pages_to_scan": 1000, "sleep_millisecs": 10}
# ksm_tests sets run, sleep_millisecs 0 and pages_to_scan itself, but not
# smart_scan (6.7+, on by default): with it, -N -m 1 failed 8 of 20 runs in a
# union guest without ksmlens pausing anything (the first page, alone for two
# scans, has aged into SmartScan's skips when its twin arrives, so the two
# full scans the test waits are not enough), 0 of 20 with smart_scan=0. LTP
# turned SmartScan off for its KSM tests for the same reason (2023).
KSM_TESTS_KNOBS = {"advisor_mode": "none", "smart_scan": 0}


def run_selftests(vm, *, suites=SUITES, modes=None, min_checks: int = 30,
                  gap: tuple = (0.0, 0.1), seed: int | None = None,
                  timeout: float = 600.0, retries: int = 2, max_rounds: int = 4,
                  out=None) -> SelftestsResult:
    """Run the kernel's KSM selftests in ``vm`` and pause it at random
    moments (a uniform ``gap`` after each check) while they run, comparing
    the walk with the kernel each time. ``modes``: ksm_tests modes (keys of
    :data:`KSM_TESTS_MODES`, default all). A ksm_tests mode that fails is run
    again up to ``retries`` times, and the summary says so: ``-U`` waits for
    one full scan after its write, and a scan that had already passed its
    pages can end first (``check_ksm_unmerge()``; 1 to 2 runs in 20 here,
    without ksmlens pausing anything). ksm_tests runs with SmartScan off
    (:data:`KSM_TESTS_KNOBS`). A suite that ended with fewer than
    ``min_checks`` agreeing checks runs again, up to ``max_rounds`` times
    (the summary says how many rounds). The guest's KSM knobs are put back
    afterwards; its merged pages are not (both suites unmerge all: run=2)."""
    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.lab.attach import attach
    if vm.arch != "x86_64":
        raise KsmlensError(f"the kernel's selftests are built for x86_64 guests only; "
                           f"VM {vm.name!r} is {vm.arch}",
                           "run `ksmlens selftests` on an x86_64 VM")
    for s in suites:
        if s not in SUITES:
            raise KsmlensError(f"unknown suite {s!r}", f"choose from {', '.join(SUITES)}")
    modes = list(KSM_TESTS_MODES) if modes is None else list(modes)
    for m in modes:
        if m not in KSM_TESTS_MODES:
            raise KsmlensError(f"unknown ksm_tests mode {m!r}",
                               f"choose from {', '.join(KSM_TESTS_MODES)}")
    log = (lambda msg: print(msg, file=out, flush=True)) if out else (lambda msg: None)
    bins = build_selftests(quiet=out is None)
    rng = random.Random(seed)
    prog = attach(f"vm:{vm.name}")
    release = prog["UTS_RELEASE"].string_().decode()
    old = {k: v for k, v in ksmsys.read_counters(vm).items() if k in ksmsys.KNOBS}
    t_all = time.monotonic()
    results = []
    try:
        for s in suites:
            res = SuiteResult(s, [], [])
            results.append(res)
            cwd = str(bins[s].parent)
            if s == "ksm_functional_tests":
                ksmsys.set_knobs(vm, **FUNCTIONAL_KNOBS)
                runs = [(None, [f"./{s}"])]
            else:
                ksmsys.set_knobs(vm, **KSM_TESTS_KNOBS)
                runs = [(m, [f"./{s}", *KSM_TESTS_MODES[m]]) for m in modes]
            while True:
                res.rounds += 1
                for mode, argv in runs:
                    failed_tries = []
                    for attempt in range(1 + (retries if mode else 0)):
                        r = _observe(vm, prog, s, mode, argv, cwd, rng=rng, gap=gap,
                                     timeout=timeout, checks=res.checks, log=log)
                        log(f"{s}{' ' + ' '.join(argv[1:]) if mode else ''}: "
                            f"{'ok' if r.ok else 'FAILED'} (rc {r.rc}: {r.passed} pass, "
                            f"{r.failed} fail, {r.skipped} skip) in {r.seconds:.1f} s, "
                            f"{len(res.checks)} paused checks so far")
                        if r.ok:
                            break
                        for line in r.output[-15:]:
                            log(f"  | {line}")
                        failed_tries.append(r.output)
                    r.failed_tries = failed_tries if r.ok else failed_tries[:-1]
                    res.runs.append(r)
                # A suite that ended before it was paused min_checks times runs
                # again (a short run is not a reason to look less).
                if (res.count("agree") >= min_checks or res.rounds >= max_rounds
                        or not res.ok or res.count("disagree")):
                    break
                log(f"{s}: {res.count('agree')} agreeing paused checks in round "
                    f"{res.rounds}, fewer than {min_checks}: once more")
            # Both suites leave KSM as they set it: put the knobs back between them.
            _restore_knobs(vm, old)
    finally:
        try:
            _restore_knobs(vm, old)
        except KsmlensError as e:
            log(f"selftests: could not restore the KSM knobs: {e}")
    return SelftestsResult(release, results, min_checks, round(time.monotonic() - t_all, 1))


def _restore_knobs(vm, old: dict) -> None:
    import ksmlens.lab.ksmsys as ksmsys
    cur = ksmsys.read_counters(vm)
    want = {k: v for k, v in old.items() if cur.get(k) != v}
    if cur.get("pages_shared") and "max_page_sharing" in want:
        want["run"] = old.get("run", 1)          # set_knobs unmerges first then
    if want:
        ksmsys.set_knobs(vm, **want)


# ------------------------------------------------------------------ mremap + migrate

MREMAP_SELFTEST_SOURCE = "selftests/ksm-mremap-migrate.c"   # under vm/


def mremap_selftest_binary(arch: str | None = None) -> Path:
    """Compile ``vm/selftests/ksm-mremap-migrate.c`` (static; host gcc, or
    the cross compiler for another ``arch``) once per source version into
    ``<cache>/bin/``."""
    from ksmlens.lab.scenarios import static_binary
    return static_binary(vm_data() / MREMAP_SELFTEST_SOURCE,
                         "ksm-mremap-migrate", "the mremap selftest", arch)


@dataclasses.dataclass
class MremapResult:
    """``migrate.ksm_and_mremap`` on one kernel, beside ksmlens ``verify``
    run on the same state (the merged page, held before the test migrates)."""
    release: str
    variant: str | None
    outcome: str                 # pass / fail / skip
    rc: int | None
    output: list
    merged: dict                 # start, pages, pfn, node, pid
    verify: dict | None          # predicted / observed / agree for the test's page

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"

    def summary(self) -> str:
        why = next((l.split("#", 1)[1].strip() for l in self.output
                    if l.startswith("not ok") and "#" in l), "")
        s = (f"{self.release}: migrate.ksm_and_mremap {self.outcome.upper()}"
             + (f": {why}" if why else ""))
        v = self.verify
        if v:
            s += (f"; ksmlens verify on the same state: {v['mappings']} mappings, "
                  f"{v['misses']} missed by rule {v['rule']!r}, predicted {v['predicted']}, "
                  f"observed {v['observed']}: {'agree' if v['agree'] else 'DISAGREE'}")
        return s


def run_mremap_selftest(vm, *, with_verify: bool = True,
                        timeout: float = 180.0) -> MremapResult:
    """Run the project's ``migrate.ksm_and_mremap`` in ``vm`` (2 NUMA nodes):
    32 pages, the upper half mremapped over the lower half, merged into one
    KSM page, migrated. With ``with_verify``, the test holds after the merge
    and :func:`ksmlens.experiments.verify.verify` predicts (paused snapshot) and
    migrates that same page first; the test then migrates it itself."""
    from ksmlens.experiments.verify import verify
    binary = mremap_selftest_binary(vm.arch)
    argv = [vm.guest_path(binary), "--timeout", str(int(timeout * 2 / 3))]
    if with_verify:
        argv.append("--hold")
    h = vm.request({"op": "spawn", "argv": argv, "env": {}})["handle"]
    lines: list = []
    merged: dict = {}
    vres = None
    rc = None
    try:
        deadline = time.monotonic() + timeout
        pending = None
        while True:
            r = pending or vm.send(h, None, timeout=max(1.0, deadline - time.monotonic()))
            pending = None
            if r.get("eof"):
                rc = r.get("rc")
                break
            if r.get("timed_out"):
                raise KsmlensError(f"the mremap selftest gave no answer in {timeout:.0f} s",
                                   "is ksmd running? see the guest's console log")
            line = r["line"]
            lines.append(line)
            if line.startswith("merged "):
                merged = {k: int(v, 0) for k, v in
                          (kv.split("=", 1) for kv in line.split()[1:])}
                res = verify(vm)
                row = next((row for row in res.rows if row["kpfn"] == merged["pfn"]), None)
                vres = {"release": res.release, "rule": res.rule, "agree_all": res.agree,
                        "nodes": len(res.rows)}
                if row:
                    vres.update({k: row[k] for k in ("mappings", "misses", "predicted",
                                                     "observed", "agree")})
                else:
                    vres.update({"mappings": 0, "misses": 0, "predicted": "absent",
                                 "observed": "absent", "agree": False})
                # The reply to "go" is the test's next line (or its end).
                pending = vm.send(h, "go", timeout=max(1.0, deadline - time.monotonic()))
    finally:
        try:
            vm.kill(h)
        except KsmlensError:
            pass
    tap = parse_tap(lines)
    outcome = ("fail" if tap["failed"] or rc not in (KSFT_PASS, KSFT_SKIP) else
               "skip" if tap["skipped"] else "pass" if tap["passed"] else "fail")
    st = vm.status()
    return MremapResult(release=st.get("kernel_release", ""), variant=st.get("variant"),
                        outcome=outcome, rc=rc, output=lines, merged=merged, verify=vres)
