"""A big KSM state in a lab guest: N rmap_items in N/2 stable nodes.

The state benchmarks/walk.py measures and the 100k tests walk: the
project's workload (vm/scenarios/ksmlens-workload.c, scenario ``merge``)
runs 2 processes x N/2 pages with ``--distinct N/2`` (page k of one process
has the same content as page k of the other, the N/2 contents all
different); ksmd runs fast (:data:`MERGE_KNOBS`) until /sys/kernel/mm/ksm
says ``pages_shared == pages_sharing == N/2``, then the knobs go back to
mm/ksm.c's defaults (:data:`REST_KNOBS`).

    handle, secs = merge_pairs(vm, 100_000)
    ...
    vm.kill(handle)
"""

from __future__ import annotations

import time

from ksmlens.errors import KsmlensError
from ksmlens.lab import ksmsys

__all__ = ["MERGE_KNOBS", "REST_KNOBS", "guest_memory_mb", "merge_pairs"]

MERGE_KNOBS = {"advisor_mode": "none", "pages_to_scan": 100000, "sleep_millisecs": 0, "run": 1}
REST_KNOBS = {"pages_to_scan": 100, "sleep_millisecs": 20}   # mm/ksm.c's defaults
_MB = 1 << 20


def guest_memory_mb(n: int) -> int:
    """Guest memory for N rmap_items: from 1M on the pages written plus
    2 GB, at least 8 GB (they are all written before ksmd merges half of
    them away); below, twice the pages plus 1 GB, at least 2 GB."""
    if n >= 1_000_000:
        return max(8192, n * 4096 // _MB + 2048)
    return max(2048, n * 4096 * 2 // _MB + 1024)


def merge_pairs(vm, n: int, *, say=None, timeout: float = 4 * 3600) -> tuple[int, dict]:
    """Write N pages in pairs in a fresh guest and let ksmd merge them.
    Returns ``(workload handle, {"fill_s": s, "merge_s": s})``; the caller
    kills the handle. ``say(text)`` hears progress (once a minute while
    merging). Raises KsmlensError on a guest that already has KSM pages or
    a workload that does not start."""
    from ksmlens.lab.scenarios import workload_binary
    say = say or (lambda text: None)
    half = n // 2
    before = ksmsys.read_counters(vm)
    if before["pages_shared"] or before["pages_sharing"]:
        raise KsmlensError(f"the guest already has KSM pages ({before['pages_shared']})",
                           "boot a clean VM")
    t = time.monotonic()
    h = vm.spawn([vm.guest_path(workload_binary(arch=vm.arch)), "merge", "--procs", "2",
                  "--pages", str(half), "--distinct", str(half)])["handle"]
    first = vm.send(h, None, timeout=3600)
    if not (first.get("line") or "").startswith("ready "):
        err = (first.get("stderr") or "").strip().splitlines()
        raise KsmlensError(f"workload did not start: {err[-1] if err else first}", "")
    fill = time.monotonic() - t
    say(f"fill: 2 x {half} pages written in {fill:.0f} s")
    ksmsys.set_knobs(vm, **MERGE_KNOBS)
    t = time.monotonic()
    last = [t]

    def merged(c):
        if time.monotonic() - last[0] > 60:
            last[0] = time.monotonic()
            say(f"  {time.monotonic() - t:.0f} s: full_scans {c['full_scans']} "
                f"pages_shared {c['pages_shared']} pages_sharing {c['pages_sharing']} "
                f"unshared {c['pages_unshared']}")
        return c["pages_shared"] == half and c["pages_sharing"] == half
    c = ksmsys.wait_until(vm, merged, timeout=timeout, what=f"{half} pairs merged", poll=2)
    merge = time.monotonic() - t
    ksmsys.set_knobs(vm, **REST_KNOBS)
    say(f"merge: pages_shared {c['pages_shared']} pages_sharing {c['pages_sharing']} "
        f"after {merge:.0f} s ({c['full_scans']} full scans)")
    return h, {"fill_s": fill, "merge_s": merge}
