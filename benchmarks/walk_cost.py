#!/usr/bin/env python3
"""The series' own table on our kernels: rmap_walk_ksm()'s work per variant, counted.

    .venv/bin/python benchmarks/walk_cost.py [--vmas 20000] [--pages 4] [--variant V]...
                                             [--shape split|fork] [--mremap K] [--json F]
                                             [--sweep PNG]

For each variant (default stock, v3, v8), one after the other in one run: boot
a 2-node guest, run the many-vmas scenario (N VMAs in one anon_vma, P KSM
pages of two rmap_items), then ``measure_cost(by="migrate")`` twice:

1. the counts: every walk's interval-tree calls and rmap_one calls counted by
   kprobes, each compared with the prediction (a difference fails the run);
2. the durations: the pages migrated back with only the walks' entry and exit
   probed (the iteration probes' own cost left out).

Prints per variant: VMAs yielded per walk (the loop's iterations) and
rmap_one calls, for try_to_migrate and remove_migration_ptes, the longest
walk in ms with iteration probes and without, and the time the prediction
took. No pass/fail on times: the figures are what they are (TCG or KVM).

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


def one(variant: str, a) -> dict:
    t = time.monotonic()
    vm = VM.up(f"cost-{variant}", variant, numa=2, cpus=2, memory="2G", quiet=True)
    boot = time.monotonic() - t
    try:
        args = ("--vmas", str(a.vmas), "--pages", str(a.pages), "--shape", a.shape,
                "--mremap", str(a.mremap))
        with ScenarioRun(vm, "many-vmas", extra_args=args) as run:
            t = time.monotonic()
            for st in run.scenario.steps:
                run.step(st.name)
            setup = time.monotonic() - t
            counted = measure_cost(vm)
            timed = measure_cost(vm, iterations=False)
    finally:
        vm.down()
    w, r = counted.walks, counted.rule
    out = {"variant": variant, "release": counted.release, "rule": r, "boot_s": round(boot, 1),
           "setup_s": round(setup, 1), "agree": counted.agree,
           "rule_matches": counted.rule_matches, "predict_s": counted.seconds["predict"],
           "walks": len(w), "events": counted.events}
    for walk, g in w.groupby("walk", observed=True):
        tw = timed.walks[timed.walks["walk"] == walk]
        out[walk] = {"walks": len(g), "returned_per_walk": round(g["m_returned"].mean(), 1),
                     "max_returned": int(g["m_returned"].max()),
                     "rmap_one_per_walk": round(g["m_rmap_one"].mean(), 2),
                     "predicted_equal": bool(g["agree"].all()),
                     "max_ms_probed": round(g["us"].max() / 1000, 3),
                     "max_ms": round(tw["us"].max() / 1000, 3) if len(tw) else None}
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
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--sweep", metavar="PNG")
    a = ap.parse_args()
    if a.sweep:
        return sweep(a)
    res = [one(v, a) for v in a.variant or ["stock", "v3", "v8"]]
    head = ["variant", "walk", "walks", "VMAs yielded/walk", "max", "rmap_one/walk",
            "longest ms (probed)", "longest ms", "= prediction"]
    rows = []
    for r in res:
        for walk in ("try_to_migrate", "remove_migration_ptes"):
            x = r.get(walk)
            if x:
                rows.append([r["variant"], walk, x["walks"], x["returned_per_walk"],
                             x["max_returned"], x["rmap_one_per_walk"], x["max_ms_probed"],
                             x["max_ms"], x["predicted_equal"]])
    print(f"many-vmas --shape {a.shape} --vmas {a.vmas} --pages {a.pages} --mremap {a.mremap}")
    print(format_table(head, rows, align="<<" + ">" * (len(head) - 2)))
    for r in res:
        print(f"{r['variant']}: {r['release']}, boot {r['boot_s']} s, scenario {r['setup_s']} s, "
              f"prediction {r['predict_s']} s, {r['events']} trace events, rules matched "
              f"{r['rule_matches']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0 if all(r["agree"] for r in res) else 1


if __name__ == "__main__":
    sys.exit(main())
