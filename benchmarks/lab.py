#!/usr/bin/env python3
"""Lab benchmark: prints the figures the lab is held to (no pass/fail here).

    .venv/bin/python benchmarks/lab.py [--cold] [--variant union]

* cold kernel build: with --cold, a fresh cache directory is used (about 12
  minutes on 2 cores); without it, the figure recorded when the cached build
  was made is printed
* switching variant: rebuilding each patched variant after another (only
  mm/ksm.c and the link)
* `vm up` to a ready agent
* each scenario's time to its merged state (and per step)
* `verify` on the mremap scenario, by migration and by reclaim
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ksmlens.lab import kbuild  # noqa: E402
from ksmlens.lab.scenarios import SCENARIOS, ScenarioRun  # noqa: E402
from ksmlens.experiments.verify import verify  # noqa: E402
from ksmlens.lab.vm import VM  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true", help="time a cold build in a fresh cache")
    ap.add_argument("--variant", default=kbuild.DEFAULT_VARIANT)
    a = ap.parse_args()

    if a.cold:
        with tempfile.TemporaryDirectory(dir=os.path.expanduser("~/.cache")) as d:
            os.environ["KSMLENS_CACHE"] = d
            t = time.monotonic()
            kbuild.build("stock")
            print(f"cold build (stock, fresh cache): {time.monotonic() - t:.0f} s")
            del os.environ["KSMLENS_CACHE"]
    else:
        k = kbuild.build("stock")
        meta = json.loads((k.directory / "meta.json").read_text())
        print(f"stock build as recorded in the cache: {meta['build_seconds']} s "
              f"(cold only if it was the first build of the tree)")

    prev = None
    for v in ("v3", "union", "v8", "stock"):
        t = time.monotonic()
        kbuild.build(v, force=True, quiet=True)
        print(f"switch {prev or 'stock'} -> {v} (rebuild): {time.monotonic() - t:.1f} s")
        prev = v

    t = time.monotonic()
    vm = VM.up("bench", a.variant, numa=2)
    print(f"vm up ({a.variant}, {vm.state['accel']}): {time.monotonic() - t:.1f} s "
          f"(boot to agent {vm.state['boot_seconds']} s)")
    try:
        for name in SCENARIOS:
            t = time.monotonic()
            with ScenarioRun(vm, name) as run:
                for st in run.scenario.steps:
                    run.step(st.name)
                total = time.monotonic() - t
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in run.timings.items())
            print(f"scenario {name}: merged state in {total:.1f} s ({steps})")
        for by in ("migration", "reclaim"):
            with ScenarioRun(vm, "mremap") as run:
                for st in run.scenario.steps:
                    run.step(st.name)
                res = verify(vm, by=by)
            print(f"verify --by {by} (mremap, {len(res.pages)} mappings): "
                  + ", ".join(f"{k} {v} s" for k, v in res.seconds.items())
                  + (f", {res.extra['reclaim']['rounds']} memory.reclaim round(s)"
                     if by == "reclaim" else ""))
    finally:
        vm.down()


if __name__ == "__main__":
    main()
