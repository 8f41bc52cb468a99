#!/usr/bin/env python3
"""Walk benchmark: rmap_items per second and peak memory of a full KSM walk.

    .venv/bin/python benchmarks/walk.py [--sizes 10000,100000,500000] [--variant union]

For each size N, a guest (memory sized for N pages) runs the `merge`
workload with N pages in 4 processes and waits until the kernel reports
N rmap_items; then the walk is timed live over QMP (consistent: guest
paused, and live: not paused) and from a vmcore of the same guest. Each
walk runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ksmlens import ksmsys  # noqa: E402
from ksmlens.lab.scenarios import ScenarioRun  # noqa: E402
from ksmlens.lab.vm import VM  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from ksmlens.lab.attach import attach
from ksmlens.lens.snapshot import take_snapshot
target, mode, vmlinux = sys.argv[2], sys.argv[3], sys.argv[4]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.monotonic()
prog = attach(target, vmlinux=vmlinux)
t_attach = time.monotonic() - t
snap = take_snapshot(prog, mode=mode)
print(json.dumps({"items": len(snap.rmap_items), "walk": snap.meta["walk_seconds"],
                  "paused": snap.meta.get("paused_seconds", 0), "attach": t_attach,
                  "races": snap.meta.get("races", {}),
                  "replay": snap.meta.get("replay_seconds", 0),
                  "pte": snap.meta.get("pte_seconds", 0),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_mb": base / 1024}))
"""


def measure(target, mode, vmlinux):
    r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), target, mode, vmlinux],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,500000")
    ap.add_argument("--variant", default="union")
    a = ap.parse_args()
    for n in [int(x) for x in a.sizes.split(",")]:
        mem_mb = max(2048, (n * 4096 * 3) // (1 << 20) + 1024)
        vm = VM.up(f"bench-walk", a.variant, memory=f"{mem_mb}M", numa=1)
        try:
            per = n // 4
            with ScenarioRun(vm, "merge", extra_args=("--procs", "4", "--pages", str(per),
                                                      "--distinct", "64")) as run:
                t = time.monotonic()
                ksmsys.wait_until(vm, lambda c: c["pages_shared"] + c["pages_sharing"]
                                  + c["pages_unshared"] + c["pages_volatile"] >= per * 4,
                                  timeout=1800, what=f"{n} rmap_items")
                print(f"N={n}: guest {mem_mb} MB, {per * 4} rmap_items after "
                      f"{time.monotonic() - t:.0f} s of scanning")
                vml = vm.state["vmlinux"]
                for mode in ("consistent", "live"):
                    m = measure(f"vm:{vm.name}", mode, vml)
                    print(f"  live QMP {mode:10}: {m['items']} items in {m['walk']:.2f} s = "
                          f"{m['items'] / m['walk']:,.0f} items/s, paused {m['paused']:.2f} s, "
                          f"peak RSS {m['maxrss_mb']:.0f} MB, races {m['races']} (anon_vma trees + "
                          f"PTEs {m['pte']:.2f} s of the walk; walk replay after it "
                          f"{m['replay']:.2f} s)")
                with tempfile.TemporaryDirectory(dir=os.path.expanduser("~/.cache")) as d:
                    core = os.path.join(d, "vm.core")
                    with vm.qmp(timeout=600) as q:
                        t = time.monotonic()
                        q.command("dump-guest-memory", paging=False, protocol=f"file:{core}")
                        dump = time.monotonic() - t
                    m = measure(core, "consistent", vml)
                    print(f"  vmcore (dump {dump:.1f} s): {m['items']} items in {m['walk']:.2f} s"
                          f" = {m['items'] / m['walk']:,.0f} items/s, peak RSS "
                          f"{m['maxrss_mb']:.0f} MB")
        finally:
            vm.down()


if __name__ == "__main__":
    main()
