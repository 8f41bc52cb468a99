"""Prove the walk replay against the kernel: predict, then make the kernel walk.

For every KSM page of a lab VM, :func:`ksmlens.analysis.core.replay_walks` says
which of its mappings the kernel's own ``rmap_walk_ksm()`` rule finds. A
page whose walk misses a mapping cannot be unmapped, so it cannot migrate.
:func:`verify` writes that prediction down from a paused snapshot *first*,
then asks the guest kernel to migrate every mapped page of every stable node
to the other NUMA node (``move_pages(MPOL_MF_MOVE_ALL)``: migration unmaps
through ``rmap_walk_ksm()``), and reads each page's node back.

ksmd is held (``run=0``, merged pages stay) for the experiment, so the
stable tree cannot change between prediction and outcome; the old value of
``run`` is put back afterwards.

Reclaim is the second proof (:func:`verify_reclaim`, ``verify(vm,
by="reclaim")``): ``memory.reclaim`` of the processes' memory cgroups swaps
the pages out (swap on zram); ``shrink_folio_list()`` unmaps a KSM page with
``try_to_unmap()``, i.e. the same ``rmap_walk_ksm()``. Mappings the walk
finds become swap entries, a mapping it misses keeps the page mapped, and a
page still mapped is never freed.

The rule is found by experiment too: ksmlens cannot read a kernel's walk
rule from its code, so every verification predicts under every candidate
rule (``stock``, ``v3``, and ``stored`` where ``struct ksm_rmap_item`` has a
stored index member), observes once, and names the rules whose every
prediction the kernel confirmed (``VerifyResult.matches``). Where several
rules predict the same for this state the experiment cannot tell them
apart (``mremap`` separates them: v3 misses the moved mappings, stock and
stored do not).

    res = verify(vm)
    print(verify_table(res)); assert res.agree   # ksmlens.views.tables
    res.matches                                  # ["v3"]: it unmaps like rule v3

Memory failure is the third (:func:`verify_hwpoison`, ``verify(vm,
by="hwpoison")``): a process mapping a KSM page poisons it with
``madvise(MADV_HWPOISON)``; ``memory_failure()`` collects the processes to
signal with ``collect_procs_ksm()`` and unmaps the page with
``try_to_unmap()`` (``rmap_walk_ksm()`` again). It cannot be undone: one
experiment per guest.
"""

from __future__ import annotations

import dataclasses
import time

import ksmlens.lab.ksmsys as ksmsys
from ksmlens.errors import KsmlensError
from ksmlens.kernel.constants import BUS_MCEERR_AO, BUS_MCEERR_AR
from ksmlens.lab.guest.pagemap import KPF_DIRTY, KPF_HWPOISON
from ksmlens.kernel.sysfs import RUN_MERGE, RUN_STOP

__all__ = ["VerifyResult", "verify", "predict", "candidate_rules", "page_runs", "SmartScanResult",
           "verify_smartscan", "verify_reclaim", "verify_hwpoison", "collect_rule", "VERIFY_BY"]

VERIFY_BY = ("migration", "reclaim", "hwpoison")


@dataclasses.dataclass
class VerifyResult:
    """Prediction and outcome, per stable node (``rows``) and per mapped page
    (``pages``). Row: ``{"node", "kpfn", "pids", "mappings", "mapcount",
    "misses", "predicted": "moves"|"stays", "observed":
    "moved"|"stayed"|"mixed"|"gone", "agree"}``; page: ``{"pid", "address",
    "node", "pfn", "before", "target", "after", "tries", "predicted",
    "observed", "agree"}``.

    ``rule``: the kernel's own rule where ksmlens knows it (a lab variant,
    or a stored index member: ``stored``), or the one asked for; None for a
    kernel of unknown rule. ``rows`` / ``pages`` are judged under
    ``rows_rule``: ``rule``, else the first of ``matches`` (matching rules
    predict the same on every compared page), else the first candidate.
    ``candidates``: the rules predicted under (``stock``, ``v3``, and
    ``stored`` if the kernel has a stored index). ``matches``: those whose
    every prediction, per KSM page and per mapping, the kernel confirmed
    (at least one compared). ``by_rule``: per candidate ``{"predicted_stay",
    "misses", "disagree", "agree"}`` (``misses``: mapped mappings it misses)."""
    variant: str | None
    release: str
    rule: str | None
    rows: list[dict]
    pages: list[dict]
    seconds: dict
    snapshot: object = None          # the Snapshot the prediction came from
    by: str = "migration"            # the kernel's proof: migration or reclaim
    extra: dict = dataclasses.field(default_factory=dict)   # e.g. reclaim rounds
    candidates: list[str] = dataclasses.field(default_factory=list)
    matches: list[str] = dataclasses.field(default_factory=list)
    by_rule: dict = dataclasses.field(default_factory=dict)
    rows_rule: str | None = None

    @property
    def distinguished(self) -> bool:
        """Exactly one candidate rule matches: the experiment names the rule."""
        return len(self.matches) == 1

    @property
    def agree(self) -> bool:
        """Every compared row agrees, and at least one was compared (a row
        whose every mapping was dropped by its process meanwhile is "gone",
        ``agree`` None: not compared)."""
        compared = [r for r in self.rows if r["agree"] is not None]
        return bool(compared) and all(r["agree"] for r in compared)

    def counts(self) -> dict:
        c = {"nodes": len(self.rows), "pages": len(self.pages),
             "predicted_stay": sum(r["predicted"] == "stays" for r in self.rows),
             "observed_stayed": sum(r["observed"] == "stayed" for r in self.rows),
             "disagree": sum(r["agree"] is False for r in self.rows),
             "gone": sum(r["agree"] is None for r in self.rows)}
        return c

    def table(self) -> str:
        """Moved: :func:`ksmlens.views.tables.verify_table` (views format, experiments measure)."""
        raise KsmlensError("VerifyResult.table() moved",
                           "use ksmlens.views.tables.verify_table(res)")

    def to_dict(self) -> dict:
        return {"variant": self.variant, "release": self.release, "rule": self.rule,
                "by": self.by, "agree": self.agree, "counts": self.counts(),
                "candidates": self.candidates, "matches": self.matches,
                "by_rule": self.by_rule, "rows_rule": self.rows_rule, "rows": self.rows,
                "pages": self.pages, "seconds": self.seconds, **self.extra}


def candidate_rules(snap) -> list[str]:
    """The rules a verification predicts under: ``stock`` and ``v3`` on every
    kernel, ``stored`` only where ``struct ksm_rmap_item`` has a stored index
    member (``snap.kernel.has_stored_pgoff``): elsewhere there is nothing
    stored to search."""
    return ["stock", "v3"] + (["stored"] if snap.kernel.has_stored_pgoff else [])


def predict(snap, rule: str | None = None) -> dict:
    """Per stable page node of ``snap``: ``"stays"`` if ``rule`` (default:
    the kernel's) misses one of its mapped mappings, else ``"moves"``."""
    rule = rule or snap.kernel.walk_rule
    if rule is None:
        raise KsmlensError(f"the rmap walk rule of {snap.kernel.release} is unknown "
                           "(not a ksmlens lab kernel)", "pass rule='stock'|'v3'|'stored'")
    if rule == "stored" and not snap.kernel.has_stored_pgoff:
        raise KsmlensError(f"{snap.kernel.release} has no stored pgoff: the 'stored' rule "
                           "does not apply", "use the union or v8 variant")
    out = {}
    for n in snap.nodes():
        if n.kind == "chain" or n.kpfn is None:
            continue
        if not any(m["mapped"] for m in n.mappings) and not n.orphan_mappings:
            continue
        # a page with mappings no rmap_item reaches stays under every rule
        out[n.id] = "stays" if (rule in n.unmappable_under or n.unreachable) else "moves"
    return out


def _predictions(snap, rule: str | None) -> tuple[list[str], dict[str, dict]]:
    """The candidate rules (plus ``rule`` if asked for and not one of
    them) and each one's :func:`predict`, written down before the experiment."""
    rules = candidate_rules(snap)
    if rule is not None and rule not in rules:
        rules.append(rule)              # predict() refuses 'stored' without a member
    return rules, {r: predict(snap, r) for r in rules}


def _node_row(n, rule: str, rules: list[str] | None = None) -> dict:
    """What a verify row says of a KSM page before the kernel acts: its
    sharers, its mapped mappings, its mapcount, and how many mappings
    ``rule`` misses (plus those no rmap_item reaches); ``misses_by``: the
    same for each of ``rules`` (default: ``rule`` alone)."""
    mapped = [m for m in n.mappings if m["mapped"]]

    def misses(r):
        return sum(not m["found"][r] for m in mapped) + n.unreachable
    return {"node": n.id, "kpfn": n.kpfn,
            "pids": sorted({m["pid"] for m in mapped + n.orphan_mappings
                            if m["pid"] is not None}),
            "mappings": len(mapped), "mapcount": n.mapcount, "unreachable": n.unreachable,
            "misses": misses(rule), "misses_by": {r: misses(r) for r in rules or [rule]}}


def _confirmed(rows: list[dict], pages: list[dict]) -> bool:
    """Every compared row and page agrees, and at least one row was compared."""
    compared = [r for r in rows if r["agree"] is not None]
    return (bool(compared) and all(r["agree"] for r in compared)
            and all(p["agree"] is not False for p in pages))


def _judge_rules(rule: str | None, rules: list[str], candidates: list[str], judge,
                 stay: str) -> dict:
    """Judge the one observation under every rule: ``judge(r)`` returns the
    (rows, pages) with ``predicted`` / ``agree`` under rule ``r``. Returns
    the VerifyResult fields ``rows``, ``pages``, ``candidates``,
    ``matches``, ``by_rule``, ``rows_rule``."""
    judged = {r: judge(r) for r in rules}
    matches = [r for r in candidates if _confirmed(*judged[r])]
    by_rule = {}
    for r, (rows, pages) in judged.items():
        by_rule[r] = {"predicted_stay": sum(x["predicted"] == stay for x in rows),
                      "misses": sum(x["misses_by"][r] for x in rows),
                      "disagree": sum(x["agree"] is False for x in rows)
                      + sum(p["agree"] is False for p in pages),
                      "agree": r in matches}
    shown = rule or (matches[0] if matches else candidates[0])
    rows, pages = judged[shown]
    return {"rows": rows, "pages": pages, "candidates": candidates, "matches": matches,
            "by_rule": by_rule, "rows_rule": shown}


def page_runs(addrs: list[int], page: int) -> list[tuple[int, int]]:
    """Contiguous (start, npages) runs of sorted page addresses."""
    out = []
    for a in sorted(set(addrs)):
        if out and out[-1][0] + out[-1][1] * page == a:
            out[-1][1] += 1
        else:
            out.append([a, 1])
    return [tuple(r) for r in out]


def verify(vm, *, rule: str | None = None, by: str = "migration",
           early_kill: bool = False) -> VerifyResult:
    """Predict from a paused snapshot, then migrate every mapped KSM page of
    ``vm`` (a :class:`ksmlens.lab.vm.VM` with 2 NUMA nodes) and compare.
    ``by="reclaim"``: reclaim them instead (:func:`verify_reclaim`);
    ``by="hwpoison"``: poison one KSM page of the mremap scenario
    (:func:`verify_hwpoison`, ``early_kill`` its
    ``vm.memory_failure_early_kill``).

    Migration and reclaim: the prediction is made under every
    :func:`candidate_rules` (and ``rule``, default the kernel's own where
    known); the result names the rules the kernel behaved like (``matches``)."""
    if by not in VERIFY_BY:
        raise KsmlensError(f"verify by {by!r}: unknown proof", f"use one of {VERIFY_BY}")
    if by == "reclaim":
        return verify_reclaim(vm, rule=rule)
    if by == "hwpoison":
        return verify_hwpoison(vm, rule=rule, early_kill=early_kill)
    from ksmlens.lab.attach import attach
    from ksmlens.lens.snapshot import take_snapshot
    t0 = time.monotonic()
    ksmsys.require_numa(vm, "verify migrates KSM pages across two")
    with ksmsys.held(vm):   # hold ksmd: merged pages stay
        prog = attach(f"vm:{vm.name}")
        snap = take_snapshot(prog)
        rule = rule or snap.kernel.walk_rule
        rules, preds = _predictions(snap, rule)     # written down before the experiment
        t_pred = time.monotonic()
        any_pred = preds[rules[0]]
        if not any_pred:
            raise KsmlensError(f"VM {vm.name!r} has no mapped KSM page to verify",
                               "run a scenario first (`ksmlens scenario run mremap --keep`)")
        page = 1 << snap.kernel.page_shift
        want: dict[tuple[int, int], str] = {}     # (pid, address) -> node id
        for n in snap.nodes():
            if n.id not in any_pred:
                continue
            for m in [m for m in n.mappings if m["mapped"]] + n.orphan_mappings:
                if m["pid"] is not None:
                    want[(m["pid"], m["address"])] = n.id
        ranges = []
        for pid in sorted({p for p, _ in want}):
            ranges += [(pid, s, k) for s, k in page_runs([a for p, a in want if p == pid], page)]
        res = ksmsys.migrate_pages(vm, ranges)
        t_mig = time.monotonic()
    # the observation: once, whatever the rule
    seen = []
    for r in res:
        for k, p in enumerate(r["pages"]):
            addr = r["start"] + k * page
            nid = want.get((r["pid"], addr))
            if nid is None:
                continue
            kpfn = snap.node(nid).kpfn
            if p["pfn"] != kpfn or p["before"] not in (0, 1):
                obs = "gone"            # not the page predicted about any more
            elif p["after"] == p["target"]:
                obs = "moved"
            elif p["after"] == p["before"]:
                obs = "stayed"
            else:
                obs = "gone"
            seen.append({"pid": r["pid"], "address": addr, "node": nid, "pfn": p["pfn"],
                         "before": p["before"], "target": p["target"], "after": p["after"],
                         "tries": p["tries"], "observed": obs})
    observed_of = {}
    for n in snap.nodes():
        if n.id in any_pred:
            kinds = {p["observed"] for p in seen if p["node"] == n.id} - {"gone"}
            observed_of[n.id] = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "gone")

    def judge(r):
        pred = preds[r]
        # a mapping its process dropped meanwhile (munmap, exit, write) is not
        # compared: nothing was predicted about it
        pages = [{**p, "predicted": pred[p["node"]],
                  "agree": None if p["observed"] == "gone" else
                  (pred[p["node"]] == "moves") == (p["observed"] == "moved")} for p in seen]
        rows = []
        for n in snap.nodes():
            if n.id not in pred:
                continue
            observed = observed_of[n.id]
            rows.append({**_node_row(n, r, rules), "predicted": pred[n.id],
                         "observed": observed,
                         "agree": (None if observed == "gone" else
                                   (pred[n.id] == "moves") == (observed == "moved")
                                   and observed in ("moved", "stayed"))})
        return rows, pages
    return VerifyResult(variant=snap.kernel.variant, release=snap.kernel.release, rule=rule,
                        snapshot=snap, **_judge_rules(rule, rules, candidate_rules(snap),
                                                      judge, "stays"),
                        seconds={"predict": round(t_pred - t0, 2),
                                 "migrate": round(t_mig - t_pred, 2),
                                 "total": round(time.monotonic() - t0, 2)})


# ------------------------------------------------------------------ reclaim

def verify_reclaim(vm, *, rule: str | None = None, rounds: int | None = None) -> VerifyResult:
    """Predict from a paused snapshot (ksmd held), then make the guest kernel
    reclaim every mapped KSM page through its processes' memory cgroups
    (``memory.reclaim``, anon only, swap on zram set up if missing) and read
    every mapping back from pagemap.

    Prediction, from the walk replay under ``rule`` (default: the kernel's;
    and, as for migration, under every :func:`candidate_rules` to name the
    rules the kernel behaved like): a KSM page whose walk finds every
    mapping is ``reclaimed`` (every
    mapping a swap entry); otherwise it ``stays``: each mapping the rule
    misses keeps the page mapped, each one it finds becomes a swap entry
    (``try_to_unmap()`` unmaps what the walk reaches, the folio stays in the
    swap cache). Per page ``predicted`` is ``unmapped`` / ``mapped`` and
    ``observed`` ``swapped`` / ``mapped`` / ``gone`` (not the predicted page).

    The outcome does not trust the snapshot's idea of what is mapped: every
    candidate mapping of the walk replay is read back, including those the
    snapshot says no PTE maps (``predicted`` ``absent``), and the mappings no
    rmap_item reaches (``orphan_mappings``: predicted ``mapped``); one that
    mapped the page after all is a disagreement, and a page still mapped
    anywhere ``stayed``. A page whose every read-back mapping is a swap entry
    but which /proc/kpagecount still finds mapped (and in the swap cache) is
    ``stayed`` too: mapped where no one looked. Mappings their process
    dropped meanwhile are ``gone``, not compared (``agree`` None).

    Reclaim is repeated until nothing changes (see
    :mod:`ksmlens.lab.guest.reclaim`): a page's first pass may only clear young
    bits and activate it (``folio_check_references()``); no timer decides.
    """
    from ksmlens.lab.attach import attach
    from ksmlens.lens.snapshot import take_snapshot
    t0 = time.monotonic()
    swap = ksmsys.ensure_swap(vm)
    with ksmsys.held(vm):   # hold ksmd: rmap_items stay
        prog = attach(f"vm:{vm.name}")
        snap = take_snapshot(prog)
        rule = rule or snap.kernel.walk_rule
        rules, moves = _predictions(snap, rule)
        preds = {r: {nid: "reclaimed" if p == "moves" else "stays" for nid, p in m.items()}
                 for r, m in moves.items()}
        any_pred = preds[rules[0]]
        t_pred = time.monotonic()
        if not any_pred:
            raise KsmlensError(f"VM {vm.name!r} has no mapped KSM page to verify",
                               "run a scenario first (`ksmlens scenario run mremap --keep`)")
        page = 1 << snap.kernel.page_shift
        # (pid, addr) -> (node, {rule: found}, mapped): every candidate of the replay
        want: dict[tuple[int, int], tuple[str, dict, bool]] = {}
        for n in snap.nodes():
            if n.id in any_pred:
                for m in n.mappings:
                    k = (m["pid"], m["address"])
                    if m["pid"] is not None and not (k in want and want[k][2]):
                        want[k] = (n.id, {r: bool(m["found"][r]) for r in rules},
                                   bool(m["mapped"]))
                for m in n.orphan_mappings:     # no rmap_item reaches them
                    if m["pid"] is not None:
                        want[(m["pid"], m["address"])] = (n.id, dict.fromkeys(rules, False),
                                                          True)
        ranges = []
        for pid in sorted({p for p, _ in want}):
            ranges += [(pid, s, k) for s, k in page_runs([a for p, a in want if p == pid], page)]
        res = ksmsys.reclaim_pages(vm, ranges, rounds=rounds)
        after = ksmsys.read_pfns(vm, sorted({snap.node(nid).kpfn for nid in any_pred}))
        t_rec = time.monotonic()
    # the observation: once, whatever the rule
    seen = []
    for r in res["ranges"]:
        for k, p in enumerate(r["pages"]):
            addr = r["start"] + k * page
            if (r["pid"], addr) not in want:
                continue
            nid, found, mapped = want[(r["pid"], addr)]
            kpfn = snap.node(nid).kpfn
            if p["before_pfn"] != kpfn:
                # not the page predicted about (any more), or rightly absent
                obs = "gone" if mapped else "absent"
            elif p["present"] and p["pfn"] == kpfn:
                obs = "mapped"
            elif p["swapped"] and not p["present"]:
                obs = "swapped"
            else:
                obs = "gone"
            seen.append({"pid": r["pid"], "address": addr, "node": nid,
                         "pfn": p["before_pfn"], "found_by": found, "mapped_before": mapped,
                         "observed": obs})
    observed_of = {}
    for n in snap.nodes():
        if n.id not in any_pred:
            continue
        obs = {p["observed"] for p in seen if p["node"] == n.id} - {"gone", "absent"}
        kp = after.get(n.kpfn, {}) if n.kpfn is not None else {}
        if not obs:
            observed_of[n.id] = "gone"      # every mapping dropped by its process meanwhile
        elif obs != {"swapped"} or (kp.get("mapcount") and kp.get("kpf_swapcache")):
            observed_of[n.id] = "stayed"    # still mapped somewhere: never freed
        else:
            observed_of[n.id] = "reclaimed"

    def judge(r):
        pages = []
        for s in seen:
            found, mapped, obs = s["found_by"][r], s["mapped_before"], s["observed"]
            pr = "absent" if not mapped else "unmapped" if found else "mapped"
            agree = (obs == "absent" if pr == "absent" else None if obs == "gone" else
                     (pr == "unmapped") == (obs == "swapped"))
            pages.append({"pid": s["pid"], "address": s["address"], "node": s["node"],
                          "pfn": s["pfn"], "found": found, "predicted": pr, "observed": obs,
                          "agree": agree})
        rows = []
        for n in snap.nodes():
            if n.id not in preds[r]:
                continue
            ps = [p for p in pages if p["node"] == n.id and p["observed"] != "absent"]
            kp = after.get(n.kpfn, {}) if n.kpfn is not None else {}
            observed = observed_of[n.id]
            rows.append({**_node_row(n, r, rules),
                         "swapped": sum(p["observed"] == "swapped" for p in ps),
                         "kpfn_after": {k: kp.get(k) for k in ("mapcount", "kpf_swapcache")},
                         "predicted": preds[r][n.id], "observed": observed,
                         "agree": (None if observed == "gone" else
                                   (preds[r][n.id] == "reclaimed") == (observed == "reclaimed"))})
        return rows, pages
    return VerifyResult(variant=snap.kernel.variant, release=snap.kernel.release, rule=rule,
                        snapshot=snap, by="reclaim",
                        **_judge_rules(rule, rules, candidate_rules(snap), judge, "stays"),
                        extra={"reclaim": {"rounds": res["rounds"],
                                           "swapped_per_round": res["swapped_per_round"],
                                           "cgroups": res["cgroups"], "swap": swap}},
                        seconds={"predict": round(t_pred - t0, 2),
                                 "reclaim": round(t_rec - t_pred, 2),
                                 "total": round(time.monotonic() - t0, 2)})


# ------------------------------------------------------------------ memory failure

EARLY_KILL = "/proc/sys/vm/memory_failure_early_kill"


def collect_rule(kernel) -> str:
    """The pgoff range ``collect_procs_ksm()`` (mm/ksm.c, memory failure)
    searches in each rmap_item's anon_vma: ``stored`` where the kernel has
    the merged series' follow-up "ksm: use precise linear_page_index instead
    of the whole address space" (it came with the ``linear_page_index``
    member: the lab's v8 kernel, mainline from v7.3), else ``stock``
    ([0, ULONG_MAX]: 6.12, and the v3 and union patches, which change only
    ``rmap_walk_ksm()``)."""
    return "stored" if kernel.stored_index_member == "linear_page_index" else "stock"


def _hwpoison_target(snap, rule: str, pids: set[int]):
    """The KSM page to poison and who poisons it: the stable node whose
    mapped mappings ``rule`` misses most (then: most processes), and as the
    injector a workload process whose mapping of it is where it was merged
    (``address >> PAGE_SHIFT`` is its linear_page_index: rule ``v3`` finds
    it), so a moved process is a bystander."""
    best = None
    for n in snap.nodes():
        if n.kind == "chain" or n.kpfn is None:
            continue
        mapped = [m for m in n.mappings if m["mapped"] and m["pid"] in pids]
        if len({m["pid"] for m in mapped}) < 2:
            continue
        key = (sum(not m["found"][rule] for m in mapped), len({m["pid"] for m in mapped}),
               -n.kpfn)
        if best is None or key > best[0]:
            best = (key, n, mapped)
    if best is None:
        raise KsmlensError("no KSM page mapped by two workload processes",
                           "run the mremap scenario up to its remerged step")
    _, n, mapped = best
    inj = next((m for m in mapped if m["found"]["v3"]), mapped[0])
    return n, inj


def verify_hwpoison(vm, *, rule: str | None = None, early_kill: bool = False,
                    run=None) -> VerifyResult:
    """Poison one KSM page shared by a moved VMA and compare what
    ``memory_failure()`` does with the walk replay's prediction.

    ``run``: a :class:`ksmlens.lab.scenarios.ScenarioRun` of the ``mremap``
    scenario past its ``remerged`` step; None starts one in ``vm`` (and stops
    it afterwards). The poison cannot be undone: use a fresh guest for each
    experiment. ``early_kill``: ``vm.memory_failure_early_kill`` during the
    injection (put back after).

    The page (see :func:`_hwpoison_target`) is poisoned by one of its
    processes with ``madvise(MADV_HWPOISON)`` (mm/madvise.c
    ``madvise_inject_error()``: ``memory_failure(pfn, MF_ACTION_REQUIRED |
    ...)``). mm/memory-failure.c ``hwpoison_user_mappings()`` then

    * collects the processes to signal (``collect_procs_ksm()``): per
      rmap_item, every process with a VMA in its anon_vma over the
      :func:`collect_rule` range (approximated by the rule's answer for the
      rmap_item's own mapping: exact without fork), if it is the poisoning
      process (``force_early``) or an early-kill one
      (``task_early_kill()``);
    * unmaps the page (``try_to_unmap()``, i.e. ``rmap_walk_ksm()`` under
      ``rule``): a mapping the rule finds becomes a hwpoison entry
      (pagemap: not present, swap), one it misses stays mapped, and then
      unmapping failed (``madvise`` returns EBUSY);
    * signals the collected processes only if the page was dirty
      (``/proc/kpageflags`` before) or unmapping failed (``forcekill``):
      ``BUS_MCEERR_AR`` to the poisoning process, ``BUS_MCEERR_AO`` to others.

    Observed: pagemap of every mapping, each workload process's SIGBUS
    (si_code, si_addr; the workload survives them), ``/proc/PID/status``,
    kpageflags of the page, and the kernel's "Memory failure: ..." lines.
    One row (the page); ``pages`` per mapping; ``extra["hwpoison"]`` the
    signals, madvise result and dmesg. ``agree`` needs the mappings, the
    madvise result and the signalled processes (with their si_code) to
    match.
    """
    from ksmlens.lab.attach import attach
    from ksmlens.lab.scenarios import ScenarioRun
    from ksmlens.lens.snapshot import take_snapshot
    t0 = time.monotonic()
    own = run is None
    if own:
        run = ScenarioRun(vm, "mremap")
        run.start()
    try:
        if own:
            for step in ("merged", "mremap", "remerged"):
                run.step(step)
        info = run.refresh()
        workers = set(run.pids())
        dmesg_from = len(vm.run(["dmesg"], check=True).stdout.splitlines())
        t_setup = time.monotonic()
        with ksmsys.held(vm):   # hold ksmd: the stable tree stays as predicted
            snap = take_snapshot(attach(f"vm:{vm.name}"))
            rule = rule or snap.kernel.walk_rule
            if rule is None:
                raise KsmlensError(f"the rmap walk rule of {snap.kernel.release} is unknown",
                                   "pass rule='stock'|'v3'|'stored'")
            crule = collect_rule(snap.kernel)
            n, inj = _hwpoison_target(snap, rule, workers)
            page = 1 << snap.kernel.page_shift
            mapped = [m for m in n.mappings if m["mapped"]]
            cands = mapped + [m for m in n.orphan_mappings if m["pid"] is not None]
            before = ksmsys.read_pfns(vm, [n.kpfn])[n.kpfn]
            dirty = bool(before["flags"] >> KPF_DIRTY & 1)
            unmap_ok = all(m["found"][rule] for m in mapped) and not n.unreachable
            collected = {m["pid"] for m in mapped if m["found"][crule]} | {inj["pid"]}
            eligible = set(workers) if early_kill else {inj["pid"]}
            pred_sig = ({p: BUS_MCEERR_AR if p == inj["pid"] else BUS_MCEERR_AO
                         for p in sorted(collected & eligible)}
                        if dirty or not unmap_ok else {})
            pred_madvise = "ok" if unmap_ok else "EBUSY"
            t_pred = time.monotonic()
            reg = next(r for p in info["procs"] if p["pid"] == inj["pid"]
                       for r in p["regions"]
                       if r["start"] <= inj["address"] < r["start"] + r["pages"] * page)
            idx = (inj["address"] - reg["start"]) // page
            old_early = (vm.read_files(paths=[EARLY_KILL]).get(EARLY_KILL) or "0").strip()
            vm.write_file(EARLY_KILL, str(int(early_kill)))
            try:
                try:
                    run.command(f"madvise {inj['pid']} {reg['name']} hwpoison {idx} 1")
                    madv = "ok"
                except KsmlensError as e:
                    if "busy" not in str(e).lower():
                        raise
                    madv = "EBUSY"
            finally:
                vm.write_file(EARLY_KILL, old_early)
            got = ksmsys.read_pages(vm, [(m["pid"], m["address"], 1) for m in cands])
            after = ksmsys.read_pfns(vm, [n.kpfn])[n.kpfn]
            sig = {p: run.command(f"sigbus {p}")["signals"] for p in sorted(workers)}
            files = vm.read_files(paths=[f"/proc/{p}/status" for p in sorted(workers)])
            status = {p: {k: v for k, v in (ln.split(":\t", 1) for ln in
                                            (files.get(f"/proc/{p}/status") or "").splitlines()
                                            if ":\t" in ln)
                          if k in ("State", "SigPnd", "ShdPnd", "SigCgt")}
                      for p in sorted(workers)}
            dmesg = [line for line in vm.run(["dmesg"], check=True).stdout.splitlines()
                     [dmesg_from:] if "emory failure" in line]
            t_obs = time.monotonic()
    finally:
        if own:
            run.stop()
    pages = []
    for m, g in zip(cands, got):
        p = (g.get("pages") or [{}])[0]
        mp = bool(m["mapped"])
        found = bool(m["found"][rule]) if mp and m in mapped else False
        if p.get("present") and p.get("pfn") == n.kpfn:
            obs = "mapped"
        elif not p.get("present") and p.get("swapped"):
            obs = "unmapped"          # a hwpoison swap entry (no swap device here)
        else:
            obs = "gone"
        pr = "unmapped" if found else "mapped"
        pages.append({"pid": m["pid"], "address": m["address"], "node": n.id, "pfn": n.kpfn,
                      "found": found, "predicted": pr, "observed": obs,
                      "agree": None if obs == "gone" else pr == obs})
    obs_sig = {p: v[0][0] for p, v in sig.items() if v}
    compared = [p for p in pages if p["agree"] is not None]
    observed = ("gone" if not compared else
                "unmapped" if all(p["observed"] == "unmapped" for p in compared) else "stayed")
    predicted = "unmapped" if unmap_ok else "stays"
    agree = (None if observed == "gone" else
             (predicted == "unmapped") == (observed == "unmapped")
             and all(p["agree"] for p in compared) and obs_sig == pred_sig
             and madv == pred_madvise)
    row = {**_node_row(n, rule), "predicted": predicted, "observed": observed,
           "injector": inj["pid"], "predicted_signals": pred_sig, "observed_signals": obs_sig,
           "predicted_madvise": pred_madvise, "observed_madvise": madv, "agree": agree}
    return VerifyResult(
        variant=snap.kernel.variant, release=snap.kernel.release, rule=rule,
        rows=[row], pages=pages, snapshot=snap, by="hwpoison",
        extra={"hwpoison": {
            "early_kill": early_kill, "collect_rule": crule, "dirty": dirty,
            "injector": {"pid": inj["pid"], "address": inj["address"],
                         "region": reg["name"], "page": idx},
            "madvise": madv, "signals": sig, "kpageflags_after": after["flags"],
            "hwpoison_flag": bool(after["flags"] >> KPF_HWPOISON & 1),
            "mapcount_after": after["mapcount"], "status": status, "dmesg": dmesg}},
        seconds={"setup": round(t_setup - t0, 2), "predict": round(t_pred - t_setup, 2),
                 "hwpoison": round(t_obs - t_pred, 2), "total": round(time.monotonic() - t0, 2)})


# ------------------------------------------------------------------ SmartScan

@dataclasses.dataclass
class SmartScanResult:
    """A SmartScan forecast from snapshot ``before`` against the kernel after
    ``full_scans`` more full scans: ``predicted`` / ``observed``
    ``pages_skipped`` increase, and per rmap_item the predicted and the
    observed age / remaining_skips (``items``: rows with ``agree``)."""
    release: str
    full_scans: int
    predicted: int
    observed: int
    items: list[dict]
    before: object
    after: object

    @property
    def agree(self) -> bool:
        return self.predicted == self.observed and all(r["agree"] for r in self.items)

    def table(self, limit: int = 20) -> str:
        """Moved: :func:`ksmlens.views.tables.smartscan_verify_table`."""
        raise KsmlensError("SmartScanResult.table() moved",
                           "use ksmlens.views.tables.smartscan_verify_table(res, limit)")


def verify_smartscan(vm, full_scans: int = 6, *, timeout: float = 180.0) -> SmartScanResult:
    """Forecast SmartScan from a paused snapshot taken with ksmd held, then
    let ksmd run ``full_scans`` full scans and compare the kernel's
    ``pages_skipped`` and every rmap_item's age / remaining_skips.
    :class:`KsmlensError` in one line on a kernel without SmartScan."""
    from ksmlens.analysis.core import require_smartscan, smartscan_next, visits_between
    from ksmlens.lab.attach import attach
    from ksmlens.lens.snapshot import take_idle_snapshot
    c = ksmsys.read_counters(vm)
    # no /sys/kernel/mm/ksm/smart_scan: a kernel before SmartScan (5e924ff54d08)
    require_smartscan("smart_scan" in c, "verify --smartscan")
    if not c.get("smart_scan"):
        raise KsmlensError("SmartScan is off in the guest (smart_scan=0)",
                           "echo 1 > /sys/kernel/mm/ksm/smart_scan")
    prog = attach(f"vm:{vm.name}")
    with ksmsys.held(vm):
        a = take_idle_snapshot(prog, vm)
        ksmsys.set_run(vm, RUN_MERGE)        # let ksmd run full_scans passes
        ksmsys.wait_until(vm, lambda k: k["full_scans"] >= a.scan["seqnr"] + full_scans,
                          timeout=timeout, what=f"{full_scans} full scans")
        ksmsys.set_run(vm, RUN_STOP)
        b = take_idle_snapshot(prog, vm)
    by_key = {(i.mm, i.address): i for i in b.items()}
    rows, predicted = [], 0
    for it in a.items():
        nb = by_key.get((it.mm, it.address))
        v = visits_between(a, b, it)
        p = smartscan_next(a, it, v)       # 0 skips for an item ksmd frees unread
        predicted += p["skipped"]
        if p["freed"] and v:
            # predicted: freed at ksmd's next visit (a later visit may allocate
            # a new item at the same address, with a fresh age)
            kept = nb is not None and nb.id == it.id
            rows.append({"item": it.id, "pid": it.pid, "address": it.address,
                         "state": it.state, "visits": v, "schedule": f"freed:{p['freed']}",
                         "skipped": 0, "predicted_age": None,
                         "observed_age": nb.age if kept else None,
                         "predicted_skips": None,
                         "observed_skips": nb.remaining_skips if kept else None,
                         "reads_pgoff": False, "freed": p["freed"], "agree": not kept})
            continue
        if nb is None:
            continue
        rows.append({"item": it.id, "pid": it.pid, "address": it.address, "state": it.state,
                     "visits": v, "schedule": p["schedule"], "skipped": p["skipped"],
                     "predicted_age": p["age"], "observed_age": nb.age,
                     "predicted_skips": p["remaining_skips"],
                     "observed_skips": nb.remaining_skips, "reads_pgoff": p["reads_pgoff"],
                     "agree": (p["age"], p["remaining_skips"]) == (nb.age, nb.remaining_skips)})
    return SmartScanResult(release=a.kernel.release, full_scans=b.scan["seqnr"] - a.scan["seqnr"],
                           predicted=predicted,
                           observed=b.counters["pages_skipped"] - a.counters["pages_skipped"],
                           items=rows, before=a, after=b)
