"""The kernel counts what :func:`ksmlens.analysis.cost.walk_cost` predicted.

:func:`measure_cost` holds ksmd, takes a paused snapshot and predicts every
walk of every KSM page under every candidate rule *first*; then it sets
tracefs kprobes in the guest (``ksmlens/lab/guest/walktrace.py``: no module
of our own, only ``CONFIG_KPROBE_EVENTS``), makes the kernel walk each page
for real (``--by migrate``: ``move_pages(MPOL_MF_MOVE_ALL)`` of every mapped
KSM page to the other NUMA node, i.e. ``try_to_migrate()`` then
``remove_migration_ptes()``), and reads back, per ``rmap_walk_ksm()`` call,
the interval-tree calls (``anon_vma_interval_tree_iter_first`` / ``_next``
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

import dataclasses
import json
import sys
import time
from typing import Any

import pandas as pd

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.analysis.cost import cost_rules, walk_cost
from ksmlens.errors import KsmlensError
from ksmlens.kernel.rmap_walk import WALK_KINDS, WALKS, walk_of_rmap_one
from ksmlens.kernel.constants import PAGE_MAPPING_FLAGS

__all__ = ["CostResult", "measure_cost", "MEASURE_BY", "MEASURED", "trace_walks", "cost_sweep",
           "SWEEP_VMAS"]

MEASURE_BY = ("migrate",)
# what the probes count per walk (the predicted counters the kernel can show)
MEASURED = ("first", "first_null", "next", "next_null", "returned", "rmap_one")


@dataclasses.dataclass
class CostResult:
    """Prediction and count. ``walks``: one row per measured walk: ``node``,
    ``kpfn``, ``walk``, ``us`` (its duration with the probes on), each of
    :data:`MEASURED` measured (``m_first`` ...) and predicted under each rule
    (``stock_first`` ...), and ``agree`` under ``rule``. ``rule``: the
    kernel's own where known, else the first of ``rule_matches``.
    ``rule_matches``: the rules whose every prediction the kernel's counts
    equalled. ``cost``: the prediction (:func:`ksmlens.analysis.cost.walk_cost`)."""
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

    @property
    def agree(self) -> bool:
        return bool(len(self.walks)) and bool(self.walks["agree"].all())

    def summary(self) -> pd.DataFrame:
        """Per (walk): walks measured, predicted and measured sums, the
        longest walk (ms), under ``rule``."""
        w = self.walks
        r = self.rule
        g = w.groupby("walk", observed=True)
        out = pd.DataFrame({"walks": g.size()})
        for c in ("returned", "rmap_one"):
            out[f"{c}_predicted"] = g[f"{r}_{c}"].sum()
            out[f"{c}_measured"] = g[f"m_{c}"].sum()
        out["max_ms"] = (g["us"].max() / 1000).round(2)
        out["agree"] = g["agree"].all()
        return out.reset_index()

    def to_dict(self) -> dict:
        return {"release": self.release, "rule": self.rule, "by": self.by, "rules": self.rules,
                "rule_matches": self.rule_matches, "agree": self.agree, "events": self.events,
                "seconds": self.seconds,
                "walks": json.loads(self.walks.to_json(orient="records"))}


def _guest(vm, *argv, timeout: float = 600):
    from ksmlens.lab.paths import repo_root
    script = str(repo_root() / "ksmlens" / "lab" / "guest" / "walktrace.py")
    r = vm.run([sys.executable, script, *argv], timeout=timeout)
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
        w["walk"] = walk_of_rmap_one(names.get(w["rmap_one"], ""))
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


def measure_cost(vm, *, by: str = "migrate", rules=None, iterations: bool = True
                 ) -> CostResult:
    """Predict, then count (see the module doc). ``vm``: a lab
    :class:`~ksmlens.lab.vm.VM` with 2 NUMA nodes and KSM pages. ``rules``:
    the rules to predict under (default :func:`ksmlens.analysis.cost.cost_rules`).
    ``iterations=False`` probes only the walks' entry and exit (their
    durations without the iteration probes' cost; the counts are then not
    compared). Raises :class:`KsmlensError` in one line for: an unknown
    ``by``, no KSM page, one NUMA node, tracefs or kprobes missing."""
    from ksmlens.lab.attach import attach
    from ksmlens.lens.snapshot import take_snapshot
    if by not in MEASURE_BY:
        raise KsmlensError(f"cost --measure --by {by!r}: not a walk ksmlens can drive yet",
                           f"use {' or '.join(MEASURE_BY)}")
    t0 = time.monotonic()
    nodes = int(vm.sh("ls -d /sys/devices/system/node/node[0-9]* | wc -l").strip() or 0)
    if nodes < 2:
        raise KsmlensError(f"VM {vm.name!r} has {nodes} NUMA node(s); --by migrate moves "
                           "KSM pages across two", f"boot it with `ksmlens vm up --name "
                           f"{vm.name} --numa 2`")
    with ksmsys.held(vm):
        prog = attach(f"vm:{vm.name}")
        snap = take_snapshot(prog)
        rules = cost_rules(snap, rules)
        cost = walk_cost(snap, rules, kinds=(by,))       # written down before the walks
        ranges = _targets(snap)
        if not ranges:
            raise KsmlensError(f"VM {vm.name!r} has no mapped KSM page to walk",
                               "run a scenario first (`ksmlens scenario run many-vmas --keep`)")
        t1 = time.monotonic()
        out = trace_walks(vm, prog, list(WALK_KINDS[by]),
                          lambda: ksmsys.migrate_pages(vm, ranges), iterations=iterations)
        t2 = time.monotonic()
    walks = pd.DataFrame(out["walks"])
    if not len(walks):
        raise KsmlensError("the kernel walked no KSM page during the migration",
                           "were the pages KSM pages? see `ksmlens report`")
    walks = walks.rename(columns={"rmap_one_calls": "m_rmap_one"})
    for c in MEASURED[:-1]:
        walks[f"m_{c}"] = walks[c]
    pred = cost.set_index(["node", "walk", "rule"])
    kpfn = dict(zip(cost["node"], cost["kpfn"]))
    walks["kpfn"] = walks["node"].map(kpfn)
    matches = []
    for r in rules:
        for c in MEASURED:
            walks[f"{r}_{c}"] = [int(pred.at[(n, w, r), c]) if (n, w, r) in pred.index else -1
                                 for n, w in zip(walks["node"], walks["walk"])]
        eq = pd.Series(True, index=walks.index)
        for c in MEASURED:
            eq &= walks[f"{r}_{c}"] == walks[f"m_{c}"]
        walks[f"agree_{r}"] = eq
        if bool(eq.all()) and iterations:
            matches.append(r)
    rule = snap.kernel.walk_rule or (matches[0] if matches else rules[0])
    walks["agree"] = walks[f"agree_{rule}"] if iterations else True
    keep = ["node", "kpfn", "walk", "us", *[f"m_{c}" for c in MEASURED],
            *[f"{r}_{c}" for r in rules for c in MEASURED], *[f"agree_{r}" for r in rules],
            "agree"]
    return CostResult(release=snap.kernel.release, rule=rule, by=by, rules=rules,
                      rule_matches=matches, walks=walks[keep], cost=cost, events=out["events"],
                      snapshot=snap,
                      seconds={"predict": round(t1 - t0, 2), "walks": round(t2 - t1, 2),
                               "total": round(time.monotonic() - t0, 2)})



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
