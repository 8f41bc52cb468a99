#!/usr/bin/env python3
"""The series' own table on our kernels: rmap_walk_ksm()'s work per variant, counted.

    .venv/bin/python benchmarks/walk_cost.py [--vmas 20000] [--pages 4] [--variant V]...
                                             [--by migrate|reclaim|hwpoison]...
                                             [--shape split|fork] [--mremap K] [--json F]
                                             [--readme] [--sweep PNG]

For each variant (default stock, v3, union, v8), one after the other in one
run: boot a 2-node guest, run the many-vmas scenario (N VMAs in one
anon_vma, P KSM pages of two rmap_items), then for each --by (default all
three, in this order) ``measure_cost(by=...)`` twice:

1. the counts: every walk's interval-tree calls and rmap_one calls counted by
   kprobes, each compared with the prediction (a difference fails the run);
2. the durations: the walks again with only their entry and exit probed
   (the iteration probes' own cost left out): migrate moves the pages
   back; reclaim runs on a new scenario run (the first swapped the pages
   out); hwpoison poisons pair 1 after pair 0 was counted.

Prints per variant and walk: VMAs yielded per walk (the loop's iterations)
and rmap_one calls, the longest walk in ms with iteration probes and
without, and the time the prediction took. No pass/fail on times: the
figures are what they are (TCG or KVM). ``--json docs/walk-cost.json
--readme`` keeps the figures and rewrites README's walk-cost table from them.

``--sweep PNG``: instead, on each variant the cost against N (100, 1,000,
10,000, 20,000; ``ksmlens.experiments.cost.cost_sweep``), every variant's
counts beside the predictions, drawn into PNG (``costplots.cost_vs_vmas``:
README's picture) and printed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ksmlens.experiments.cost import measure_cost  # noqa: E402
from ksmlens.lab.scenarios import ScenarioRun  # noqa: E402
from ksmlens.lab.vm import VM  # noqa: E402
from ksmlens.views.tables import format_table  # noqa: E402

VARIANTS = ("stock", "v3", "union", "v8")
BY = ("migrate", "reclaim", "hwpoison")      # hwpoison last: a poisoned page stays so


def _stats(counted, timed) -> dict:
    out = {}
    for walk, g in counted.walks.groupby("walk", observed=True):
        tw = timed.walks[timed.walks["walk"] == walk] if timed is not None else g.iloc[:0]
        out[walk] = {"walks": len(g), "returned_per_walk": round(g["m_returned"].mean(), 1),
                     "max_returned": int(g["m_returned"].max()),
                     "rmap_one_per_walk": round(g["m_rmap_one"].mean(), 2),
                     "predicted_equal": bool(g["agree"].all()),
                     "max_ms_probed": round(g["us"].max() / 1000, 3),
                     "max_ms": round(tw["us"].max() / 1000, 3) if len(tw) else None}
    return out


def one(variant: str, a) -> dict:
    """One guest: migrate, reclaim, then memory failure (last: irreversible),
    each counted, then timed with only the walks' entry and exit probed."""
    t = time.monotonic()
    vm = VM.up(f"cost-{variant}", variant, numa=2, cpus=2, memory="2G", quiet=True)
    boot = time.monotonic() - t
    args = ("--vmas", str(a.vmas), "--pages", str(a.pages), "--shape", a.shape,
            "--mremap", str(a.mremap))
    out = {"variant": variant, "boot_s": round(boot, 1), "kinds": {}}
    try:
        for by in a.by:
            runs = 1 if by in ("migrate", "hwpoison") else 2   # reclaim swaps the pages out
            res = []
            for k in range(runs):
                with ScenarioRun(vm, "many-vmas", extra_args=args) as run:
                    t = time.monotonic()
                    for st in run.scenario.steps:
                        run.step(st.name)
                    setup = time.monotonic() - t
                    if by == "hwpoison":        # pair 0 counted, pair 1 timed
                        res = [measure_cost(vm, by=by, run=run, pair=0),
                               measure_cost(vm, by=by, run=run, pair=1, iterations=False)]
                    elif by == "migrate":
                        res = [measure_cost(vm), measure_cost(vm, iterations=False)]
                    else:
                        res.append(measure_cost(vm, by=by, iterations=k == 0))
            counted, timed = res
            out.update(release=counted.release, rule=counted.rule)
            out["kinds"][by] = {"agree": counted.agree, "rule_matches": counted.rule_matches,
                                "collect_matches": counted.collect_matches,
                                "predict_s": counted.seconds["predict"],
                                "setup_s": round(setup, 1), "events": counted.events,
                                "walks": _stats(counted, timed)}
    finally:
        vm.down()
    out["agree"] = all(k["agree"] for k in out["kinds"].values())
    return out


def sweep(a) -> int:
    import pandas as pd
    from ksmlens.experiments.cost import cost_sweep
    from ksmlens.views.costplots import cost_vs_vmas
    frames = []
    for v in a.variant or ["stock", "v3", "v8"]:
        vm = VM.up(f"cost-{v}", v, numa=2, cpus=2, memory="2G", quiet=True)
        try:
            frames.append(cost_sweep(vm, shape=a.shape, pages=a.pages, mremap=a.mremap))
        finally:
            vm.down()
    d = pd.concat(frames, ignore_index=True)
    counted = d[d["measured"].notna()]
    cost_vs_vmas(d).savefig(a.sweep, dpi=90)
    cols = ["variant", "vmas", "walk", "rule", "predicted", "measured", "rmap_one", "max_ms",
            "agree"]
    print(format_table(cols, counted[cols].values.tolist(), align="<><<>>>><"))
    if a.json:
        Path(a.json).write_text(d.to_json(orient="records", indent=1))
    return 0 if counted["agree"].all() else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmas", type=int, default=20000)
    ap.add_argument("--pages", type=int, default=4)
    ap.add_argument("--shape", default="split", choices=["split", "fork"])
    ap.add_argument("--mremap", type=int, default=0)
    ap.add_argument("--variant", action="append")
    ap.add_argument("--by", action="append", choices=BY,
                    help="the walks to drive (default: migrate, reclaim, hwpoison)")
    ap.add_argument("--json", metavar="FILE", help="write the figures (docs/walk-cost.json)")
    ap.add_argument("--readme", action="store_true",
                    help="rewrite README's walk-cost block from these figures")
    ap.add_argument("--sweep", metavar="PNG")
    a = ap.parse_args()
    a.by = [b for b in BY if b in (a.by or BY)]
    if a.sweep:
        return sweep(a)
    res = [one(v, a) for v in a.variant or list(VARIANTS)]
    head = ["variant", "by", "walk", "walks", "VMAs yielded/walk", "max", "rmap_one/walk",
            "longest ms (probed)", "longest ms", "= prediction"]
    rows = []
    for r in res:
        for by, k in r["kinds"].items():
            for walk, x in k["walks"].items():
                rows.append([r["variant"], by, walk, x["walks"], x["returned_per_walk"],
                             x["max_returned"], x["rmap_one_per_walk"], x["max_ms_probed"],
                             x["max_ms"], x["predicted_equal"]])
    print(f"many-vmas --shape {a.shape} --vmas {a.vmas} --pages {a.pages} --mremap {a.mremap}")
    print(format_table(head, rows, align="<<<" + ">" * (len(head) - 3)))
    for r in res:
        print(f"{r['variant']}: {r['release']}, boot {r['boot_s']} s; " + "; ".join(
            f"{by}: scenario {k['setup_s']} s, prediction {k['predict_s']} s, {k['events']} "
            f"trace events, rules matched {k['rule_matches']}"
            + (f", collect {k['collect_matches']}" if k["collect_matches"] else "")
            for by, k in r["kinds"].items()))
    doc = {"schema": "ksmlens-walk-cost/1", "date": time.strftime("%Y-%m-%d"),
           "args": list(map(str, ("--shape", a.shape, "--vmas", a.vmas, "--pages", a.pages,
                                  "--mremap", a.mremap))), "variants": res}
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    if a.readme:
        from ksmlens.views.tables import COST_BEGIN, COST_END, replace_marked_block, walk_cost_markdown
        p = Path(__file__).resolve().parent.parent / "README.md"
        p.write_text(replace_marked_block(p.read_text(), walk_cost_markdown(doc), COST_BEGIN,
                                          COST_END))
        print(f"rewrote the walk-cost block of {p}")
    return 0 if all(r["agree"] for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
