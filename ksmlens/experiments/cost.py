"""The kernel counts what :func:`ksmlens.analysis.cost.walk_cost` predicted.

:func:`measure_cost` holds ksmd, takes a paused snapshot and predicts every
walk of every KSM page under every candidate rule *first*; then it sets
tracefs kprobes in the guest (``ksmlens/lab/guest/walktrace.py``: no module
of our own, only ``CONFIG_KPROBE_EVENTS``), makes the kernel walk each page
for real (``--by migrate``: ``move_pages(MPOL_MF_MOVE_ALL)`` of every mapped
KSM page to the other NUMA node, i.e. ``try_to_migrate()`` then
``remove_migration_ptes()``; ``--by reclaim``: ``memory.reclaim``, i.e.
``folio_referenced()`` then ``try_to_unmap()``; ``--by hwpoison``:
``madvise(MADV_HWPOISON)`` of one page, i.e. ``collect_procs_ksm()`` then
``try_to_unmap()``), and reads back, per ``rmap_walk_ksm()`` (or
``collect_procs_ksm()``) call, the interval-tree calls (``anon_vma_interval_tree_iter_first`` / ``_next``
and their NULL returns), the ``rmap_one`` calls and the walk's duration.

Each measured walk is matched to its page (``folio->mapping``: the stable
node) and its walk (``rwc->rmap_one``: ``try_to_migrate_one`` ...), and
compared with the prediction counter by counter. A page that cannot migrate
is walked again (migration retries); every walk must equal the prediction.
Durations are reported, never judged: they include the probes' own cost
(kprobes under TCG or KVM), and the ratio between rules is the figure.

    res = measure_cost(vm)            # a lab VM with 2 NUMA nodes
    res.agree, res.rule_matches       # every counter equal; ["stock"]
    res.walks                         # DataFrame: predicted vs measured per walk
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from typing import Any

import pandas as pd

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.analysis.cost import cost_rules, walk_cost
from ksmlens.errors import KsmlensError
from ksmlens.kernel.rmap_walk import COLLECT, WALK_KINDS, WALKS, walk_of_rmap_one
from ksmlens.kernel.constants import PAGE_MAPPING_FLAGS
from ksmlens.experiments.verify import EARLY_KILL

__all__ = ["CostResult", "measure_cost", "MEASURE_BY", "MEASURED", "trace_walks", "cost_sweep",
           "SWEEP_VMAS", "LEAVES_UNMAPPED", "HWPOISON_ARGS", "settled_tasks"]

MEASURE_BY = ("migrate", "reclaim", "hwpoison")
# the many-vmas run measure_cost(by="hwpoison") starts when given none
HWPOISON_ARGS = ("--vmas", "2000", "--shape", "split", "--pages", "4", "--mremap", "1")
# what the probes count per walk (the predicted counters the kernel can show)
MEASURED = ("first", "first_null", "next", "next_null", "returned", "rmap_one")


@dataclasses.dataclass
class CostResult:
    """Prediction and count. ``walks``: one row per measured walk, in the
    kernel's order: ``node``, ``kpfn``, ``walk``, ``rule`` (the rule it is
    judged under: ``rule``, or ``collect_rule`` for ``collect_procs_ksm``),
    ``after`` (walked after a ``try_to_unmap`` left the page mapped:
    predicted as the ``full`` walk), ``us`` (its duration with the probes
    on), each of :data:`MEASURED` measured (``m_first`` ...), predicted
    under its ``rule`` (``p_first`` ...) and under each rule (``stock_first``
    ...), ``agree_R`` per rule, and ``agree`` under its ``rule``. ``rule``:
    the kernel's own where known, else the first of ``rule_matches``.
    ``rule_matches``: the rules whose every prediction of the
    ``rmap_walk_ksm()`` walks the kernel's counts equalled;
    ``collect_matches``: the same for ``collect_procs_ksm``. ``cost``: the
    prediction (:func:`ksmlens.analysis.cost.walk_cost`). ``extra``
    (hwpoison): what the workload saw: ``madvise``, ``signals``; ``tasks``:
    the processes alive at the poisoning, as ``KernelInfo.mce``, which
    ``collect_procs_ksm``'s prediction collects; ``tasks_changed`` /
    ``tasks_raced``: one line each, when they differ from the snapshot's /
    changed across the poisoning."""
    release: str
    rule: str | None
    by: str
    rules: list[str]
    rule_matches: list[str]
    walks: pd.DataFrame
    cost: pd.DataFrame
    events: int
    seconds: dict
    snapshot: Any = None        # the paused Snapshot predicted from
    collect_rule: str | None = None   # hwpoison: the range collect_procs_ksm() searches
    collect_matches: list = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)   # hwpoison: madvise, signals

    @property
    def agree(self) -> bool:
        return bool(len(self.walks)) and bool(self.walks["agree"].all())

    def summary(self) -> pd.DataFrame:
        """Per (walk): walks measured, predicted (under each walk's ``rule``)
        and measured sums, the longest walk (ms)."""
        w = self.walks
        r = self.rule
        g = w.groupby("walk", observed=True)
        out = pd.DataFrame({"walks": g.size()})
        for c in ("returned", "rmap_one"):
            out[f"{c}_predicted"] = g[f"p_{c}"].sum()
            out[f"{c}_measured"] = g[f"m_{c}"].sum()
        out["max_ms"] = (g["us"].max() / 1000).round(2)
        out["agree"] = g["agree"].all()
        return out.reset_index()

    def to_dict(self) -> dict:
        return {"release": self.release, "rule": self.rule, "by": self.by, "rules": self.rules,
                "rule_matches": self.rule_matches, "collect_rule": self.collect_rule,
                "collect_matches": self.collect_matches, "agree": self.agree,
                "events": self.events, "seconds": self.seconds, **self.extra,
                "walks": json.loads(self.walks.to_json(orient="records"))}


def _guest(vm, *argv, timeout: float = 600):
    from ksmlens.lab.paths import repo_root
    script = str(repo_root() / "ksmlens" / "lab" / "guest" / "walktrace.py")
    r = vm.run([vm.python, vm.guest_path(script), *argv], timeout=timeout)
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        r.check()
        raise KsmlensError(f"walktrace.py {argv[0]}: no answer", "see the guest's stderr")
    if "error" in out:
        raise KsmlensError(f"counting in the guest kernel: {out['error']}",
                           "the lab kernels have CONFIG_KPROBE_EVENTS; yours needs it too")
    return out


def trace_walks(vm, prog, walks: list[str], action, *, iterations: bool = True) -> dict:
    """Run ``action()`` with the walk probes on; the guest's per-walk counts
    (see ``walktrace.py``), each walk's ``walk`` name and stable ``node``
    (hex id) filled in. Raises :class:`KsmlensError` if tracefs or kprobes
    are missing, or if the ring buffer lost events."""
    from drgn import offsetof
    fns: list[str] = [f for f in (WALKS[w][0] for w in walks) if f]
    names: dict[int, str] = {}
    for f in fns:
        try:
            names[prog[f].address_of_().value_()] = f
        except KeyError:
            raise KsmlensError(f"the kernel has no {f}() to count", "is it a 6.x kernel?") \
                from None
    argv = ["start", "--mapping-offset", str(offsetof(prog.type("struct folio"), "mapping")),
            "--rmap-one-offset", str(offsetof(prog.type("struct rmap_walk_control"),
                                              "rmap_one"))]
    for f in fns:
        argv += ["--rmap-one", f]
    if not iterations:
        argv.append("--no-iterations")
    if COLLECT in walks:
        argv.append("--collect")
    _guest(vm, *argv)
    try:
        action()
    finally:
        out = _guest(vm, "stop")
    if out["lost"]:
        raise KsmlensError(f"the trace lost {out['lost']} events (ring buffer overrun or "
                           "kretprobe instances exhausted): the counts would be wrong",
                           "measure fewer pages at a time (a smaller --vmas)")
    for w in out["walks"]:
        w["node"] = hex(w["mapping"] & ~PAGE_MAPPING_FLAGS)
        w["walk"] = COLLECT if w.get("fn") == COLLECT else \
            walk_of_rmap_one(names.get(w["rmap_one"], ""))
        w["returned"] = w["first"] - w["first_null"] + w["next"] - w["next_null"]
        w["rmap_one_calls"] = sum(w["calls"].values())
    return out


def _targets(snap) -> list[tuple[int, int, int]]:
    """(pid, start, npages) runs of every mapped KSM page's mappings."""
    from ksmlens.experiments.verify import page_runs
    m = snap.mappings
    m = m[m["mapped"].fillna(False) & m["pid"].notna()]
    page = 1 << snap.kernel.page_shift
    out = []
    for pid, g in m.groupby("pid"):
        out += [(int(pid), s, k) for s, k in page_runs(g["address"].astype(int).tolist(), page)]
    return out


def _victim(snap, run, pair: int):
    """(stable node id, injector mm, injector pid) of the many-vmas ``run``'s
    pair ``pair``: its second page, in the parent (never moved)."""
    if run.scenario.name != "many-vmas":
        raise KsmlensError(f"cost --measure --by hwpoison poisons a page of the many-vmas "
                           f"scenario, not of {run.scenario.name}",
                           "run many-vmas (measure_cost starts one when run is None)")
    info = run.refresh()
    if not 0 <= pair < len(info["pairs"]):
        raise KsmlensError(f"pair {pair}: the run has pairs 0..{len(info['pairs']) - 1}", "")
    pid, addr = info["pid"], info["pairs"][pair][1]
    m = snap.mappings
    hit = m[(m["pid"] == pid) & (m["address"] == addr) & m["mapped"].fillna(False)]
    if not len(hit):
        raise KsmlensError(f"pair {pair}'s page at {addr:#x} (pid {pid}) is not a mapped KSM "
                           "page", "run the scenario to its merged step first")
    return str(hit["node"].iloc[0]), str(hit["mm"].iloc[0]), pid


# walks after which the page stays as the walk left it: try_to_unmap() makes
# swap or hwpoison entries of what it reached (no undo, unlike migration's
# remove_migration_ptes()); if it missed a mapping the folio stays mapped and
# may be walked again, then finding nothing it could stop at: such a walk runs
# to its end, its counters those of the ``full`` walk
LEAVES_UNMAPPED = ("try_to_unmap",)
RECLAIM_TRIES = 3


# collect_procs_ksm() collects the processes alive when the page is
# poisoned, not those of the snapshot: a fresh guest's boot-time helpers
# (udev workers) may still be exiting then. The tasks are read again right
# before the poisoning, once they held still over TASKS_SETTLE seconds (up to
# TASKS_WAIT), and after it.
TASKS_SETTLE = 1.0
TASKS_WAIT = 30.0


def _task_set(mce: dict | None) -> set:
    return {(t, mm) for t, mm, _ in (mce or {}).get("processes", [])}


def settled_tasks(prog, settle: float = TASKS_SETTLE, wait: float = TASKS_WAIT):
    """:func:`ksmlens.lens.snapshot.mce_tasks` once two reads ``settle``
    seconds apart see the same processes (tgid, mm), or after ``wait``
    seconds: (the last read, whether it settled)."""
    from ksmlens.lens.snapshot import mce_tasks
    last = mce_tasks(prog)
    t_end = time.monotonic() + wait
    while True:
        time.sleep(settle)
        now = mce_tasks(prog)
        if _task_set(now) == _task_set(last):
            return now, True
        last = now
        if time.monotonic() > t_end:
            return now, False


def _action(vm, by: str, snap, run, pair: int, early_kill: bool, prog=None):
    """What makes the kernel walk (see measure_cost), and the pages it walks."""
    if by == "hwpoison":
        from ksmlens.lens.snapshot import mce_tasks
        node, _, _ = _victim(snap, run, pair)
        old = (vm.read_files(paths=[EARLY_KILL]).get(EARLY_KILL) or "0").strip()
        box: dict = {}

        def poison():
            vm.write_file(EARLY_KILL, str(int(early_kill)))
            try:
                if prog is not None:
                    box["tasks_before"], box["tasks_settled"] = settled_tasks(prog)
                box.update(run.command(f"hwpoison {pair}")["hwpoison"])
                if prog is not None:
                    box["tasks_after"] = mce_tasks(prog)
            finally:
                vm.write_file(EARLY_KILL, old)
        return poison, [node], box
    ranges = _targets(snap)
    if not ranges:
        raise KsmlensError(f"VM {vm.name!r} has no mapped KSM page to walk",
                           "run a scenario first (`ksmlens scenario run many-vmas --keep`)")
    if by == "reclaim":
        def reclaim():
            # reclaim's own heuristics decide when a page's turn comes (the
            # first round activates a folio whose PTEs are young; a later one
            # may not age the active list at all): ask again, up to
            # RECLAIM_TRIES times, until every mapping is a swap entry
            for _ in range(RECLAIM_TRIES):
                res = ksmsys.reclaim_pages(vm, ranges)
                if all(p["swapped"] and not p["present"] for r in res["ranges"]
                       for p in r["pages"]):
                    break
        return reclaim, None, {}
    return (lambda: ksmsys.migrate_pages(vm, ranges)), None, {}


def measure_cost(vm, *, by: str = "migrate", rules=None, iterations: bool = True, run=None,
                 pair: int = 0, early_kill: bool = False) -> CostResult:
    """Predict, then count (see the module doc). ``vm``: a lab
    :class:`~ksmlens.lab.vm.VM` with KSM pages. ``by``:

    * ``migrate`` (2 NUMA nodes): ``move_pages()`` of every mapped KSM page
      (``try_to_migrate``, then ``remove_migration_ptes``);
    * ``reclaim``: ``memory.reclaim`` of their processes' cgroups, round
      after round (:func:`ksmlens.lab.ksmsys.reclaim_pages`; swap on zram
      set up if missing): ``folio_referenced`` each round, ``try_to_unmap``
      when the kernel reclaims; a page left mapped by a missed mapping is
      walked again, predicted as the ``full`` walk (:data:`LEAVES_UNMAPPED`);
    * ``hwpoison``: ``madvise(MADV_HWPOISON)`` of pair ``pair``'s page of
      the many-vmas ``run`` (None: one is started with
      :data:`HWPOISON_ARGS`, and stopped after) by its parent process,
      ``vm.memory_failure_early_kill`` set to ``early_kill`` meanwhile:
      ``collect_procs_ksm`` (judged under
      :func:`ksmlens.experiments.verify.collect_rule`), then
      ``try_to_unmap``. Irreversible: the page stays poisoned.

    ``rules``: the rules to predict under (default
    :func:`ksmlens.analysis.cost.cost_rules`). ``iterations=False`` probes
    only the walks' entry and exit (their durations without the iteration
    probes' cost; the counts are then not compared). Raises
    :class:`KsmlensError` in one line for: an unknown ``by``, no KSM page,
    one NUMA node (migrate), tracefs or kprobes missing, a lost event."""
    from ksmlens.lab.scenarios import ScenarioRun
    if by not in MEASURE_BY:
        raise KsmlensError(f"cost --measure --by {by!r}: not a walk ksmlens can drive",
                           f"use {', '.join(MEASURE_BY)}")
    if by == "migrate":
        ksmsys.require_numa(vm, "--by migrate moves KSM pages across two")
    if by == "reclaim":
        ksmsys.ensure_swap(vm)
    own = by == "hwpoison" and run is None
    if own:
        run = ScenarioRun(vm, "many-vmas", extra_args=HWPOISON_ARGS)
        run.start()
    try:
        if own:
            for st in run.scenario.steps:
                run.step(st.name)
        return _measure(vm, by, rules, iterations, run, pair, early_kill)
    finally:
        if own:
            run.stop()


def _measure(vm, by, rules, iterations, run, pair, early_kill) -> CostResult:
    from ksmlens.experiments.verify import collect_rule
    from ksmlens.lab.attach import attach
    from ksmlens.lens.snapshot import take_snapshot
    t0 = time.monotonic()
    with ksmsys.held(vm):
        prog = attach(f"vm:{vm.name}")
        snap = take_snapshot(prog)
        rules = cost_rules(snap, rules)
        injector = _victim(snap, run, pair)[1] if by == "hwpoison" else None
        kinds = (by,) if by == "migrate" else ("full", by)
        cost = walk_cost(snap, rules, kinds=kinds, early_kill=early_kill,   # written down
                         injector=injector)                                # before the walks
        action, only, got = _action(vm, by, snap, run, pair, early_kill, prog)
        t1 = time.monotonic()
        out = trace_walks(vm, prog, list(WALK_KINDS[by]), action, iterations=iterations)
        t2 = time.monotonic()
    if by == "hwpoison":
        cost = _collect_as_poisoned(snap, cost, rules, got, early_kill, injector)
    walks = pd.DataFrame(out["walks"])
    if not len(walks):
        raise KsmlensError(f"the kernel walked no KSM page (--by {by})",
                           "were the pages KSM pages? see `ksmlens report`")
    walks = walks.rename(columns={"rmap_one_calls": "m_rmap_one"})
    for c in MEASURED[:-1]:
        walks[f"m_{c}"] = walks[c]
    pred = cost.set_index(["node", "walk", "rule"])
    kpfn = dict(zip(cost["node"], cost["kpfn"]))
    walks["kpfn"] = walks["node"].map(kpfn)
    crule = collect_rule(snap.kernel)
    collect = walks["walk"] == COLLECT
    matches, collect_matches = [], []
    for r in rules:
        left: set[str] = set()          # pages a try_to_unmap under r left mapped
        keys, after = [], []
        for n, w in zip(walks["node"], walks["walk"]):
            late = n in left
            keys.append((n, "full" if late and w != COLLECT else w, r))
            after.append(late)
            if w in LEAVES_UNMAPPED and (n, w, r) in pred.index \
                    and not bool(pred.at[(n, w, r), "stopped"]):
                left.add(n)
        walks[f"after_{r}"] = after
        for c in MEASURED:
            walks[f"{r}_{c}"] = [int(pred.at[k, c]) if k in pred.index else -1 for k in keys]
        eq = pd.Series(True, index=walks.index)
        for c in MEASURED:
            eq &= walks[f"{r}_{c}"] == walks[f"m_{c}"]
        walks[f"agree_{r}"] = eq
        if iterations and bool(eq[~collect].all()) and (~collect).any():
            matches.append(r)
        if iterations and collect.any() and bool(eq[collect].all()):
            collect_matches.append(r)
    rule = snap.kernel.walk_rule or (matches[0] if matches else rules[0])
    walks["rule"] = [crule if w == COLLECT else rule for w in walks["walk"]]
    for c in MEASURED:
        walks[f"p_{c}"] = [walks.at[i, f"{r}_{c}"] if r in rules else -1
                           for i, r in zip(walks.index, walks["rule"])]
    walks["after"] = [bool(walks.at[i, f"after_{r}"]) if r in rules else False
                      for i, r in zip(walks.index, walks["rule"])]
    walks["agree"] = ([bool(walks.at[i, f"agree_{r}"]) if r in rules else False
                       for i, r in zip(walks.index, walks["rule"])] if iterations else True)
    if only is not None:                 # hwpoison: the poisoned page, and only it
        walks.loc[~walks["node"].isin(only), "agree"] = False
    if got.get("tasks_raced"):           # collect_procs_ksm()'s processes are not known
        walks.loc[walks["walk"] == COLLECT, "agree"] = False
    keep = ["node", "kpfn", "walk", "rule", "after", "us", *[f"m_{c}" for c in MEASURED],
            *[f"p_{c}" for c in MEASURED],
            *[f"{r}_{c}" for r in rules for c in MEASURED], *[f"agree_{r}" for r in rules],
            "agree"]
    return CostResult(release=snap.kernel.release, rule=rule, by=by, rules=rules,
                      rule_matches=matches, walks=walks[keep], cost=cost, events=out["events"],
                      snapshot=snap, collect_rule=crule if by == "hwpoison" else None,
                      collect_matches=collect_matches, extra={"hwpoison": got} if got else {},
                      seconds={"predict": round(t1 - t0, 2), "walks": round(t2 - t1, 2),
                               "total": round(time.monotonic() - t0, 2)})


def _collect_as_poisoned(snap, cost, rules, got, early_kill, injector):
    """The ``collect_procs_ksm`` rows of ``cost`` predicted again from the
    tasks read just before the poisoning (``got["tasks_before"]``, read
    before the walk like the snapshot) where they differ from the
    snapshot's; ``got["tasks_changed"]``: the processes that came or went
    meanwhile (one line each way), ``got["tasks_raced"]``: processes came
    or went across the poisoning itself, other than the KSM processes its
    early kill may end (the walk's own set is then not known)."""
    before, after = got.pop("tasks_before", None), got.pop("tasks_after", None)
    settled = got.pop("tasks_settled", True)
    if before is None:
        return cost
    got["tasks"] = before            # KernelInfo.mce's shape: what the prediction collected
    snap_set, b_set = _task_set(snap.kernel.mce), _task_set(before)
    if b_set != snap_set:
        gone = sorted(t for t, _ in snap_set - b_set)
        new = sorted(t for t, _ in b_set - snap_set)
        got["tasks_changed"] = (f"the guest's processes changed between the snapshot and the "
                                f"poisoning: gone {gone or 'none'}, new {new or 'none'}; "
                                f"collect_procs_ksm() predicted from those alive then")
        s2 = copy.copy(snap)                      # the same tables, the tasks of then
        s2.kernel = dataclasses.replace(snap.kernel, mce=before)
        again = walk_cost(s2, rules, kinds=("hwpoison",), early_kill=early_kill,
                          injector=injector)
        cost = pd.concat([cost[cost["walk"] != COLLECT], again[again["walk"] == COLLECT]],
                         ignore_index=True)
    if after is not None:
        ksm_mms = set(snap.mm_slots["mm"].astype(str)) if len(snap.mm_slots) else set()
        a_set = _task_set(after)
        odd = sorted({t for t, _ in a_set - b_set}
                     | {t for t, mm in b_set - a_set if mm not in ksm_mms})
        if odd:
            got["tasks_raced"] = (f"processes {odd} came or went across the poisoning: "
                                  "collect_procs_ksm()'s own set is not known")
    if not settled:
        got["tasks_raced"] = got.get("tasks_raced") or (
            f"the guest's processes did not hold still for {TASKS_SETTLE:g} s within "
            f"{TASKS_WAIT:g} s before the poisoning")
    return cost


SWEEP_VMAS = (100, 1000, 10000, 20000)


def cost_sweep(vm, vmas=SWEEP_VMAS, *, shape: str = "split", pages: int = 4,
               mremap: int = 0) -> pd.DataFrame:
    """The walk's cost against N: for each N of ``vmas``, the many-vmas
    scenario in ``vm`` and :func:`measure_cost` on it. One row per (N, rule,
    walk): ``vmas``, ``variant``, ``release``, ``rule``, ``walk``,
    ``predicted`` (VMAs yielded per walk, mean over the pages),
    ``rmap_one`` (predicted per walk), and for the kernel's own rule
    ``measured`` (the kernel's count, mean per walk), ``max_ms`` (the
    longest walk, probes on) and ``agree``; NaN for the other rules, which
    this kernel does not run."""
    from ksmlens.lab.scenarios import ScenarioRun
    rows = []
    for n in vmas:
        args = ("--vmas", str(n), "--shape", shape, "--pages", str(pages), "--mremap",
                str(mremap))
        with ScenarioRun(vm, "many-vmas", extra_args=args) as run:
            for st in run.scenario.steps:
                run.step(st.name)
            res = measure_cost(vm)
        w = res.walks
        for (rule, walk), g in res.cost.groupby(["rule", "walk"], observed=True):
            row = {"vmas": n, "variant": res.snapshot.kernel.variant, "release": res.release,
                   "rule": rule, "walk": walk, "predicted": g["returned"].mean(),
                   "rmap_one": g["rmap_one"].mean(), "measured": float("nan"),
                   "max_ms": float("nan"), "agree": None}
            mw = w[w["walk"] == walk]
            if rule == res.rule and len(mw):
                row.update(measured=mw["m_returned"].mean(), max_ms=mw["us"].max() / 1000,
                           agree=bool(mw["agree"].all()))
            rows.append(row)
    return pd.DataFrame(rows)
