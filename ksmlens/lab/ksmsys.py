"""The kernel's own KSM reports, read in the guest: ground truth for checks.

``/sys/kernel/mm/ksm/*`` (global counters and knobs) and
``/proc/PID/ksm_stat`` (per process). Every claim ksmlens makes about KSM
state is compared against these.
"""

from __future__ import annotations

import contextlib
import time

from ksmlens.errors import KsmlensError
from ksmlens.kernel import sysfs
from ksmlens.kernel.pgtable import PAGE_SIZE
from ksmlens.kernel.sysfs import COUNTERS, KNOBS, KSM_SYSFS

__all__ = ["numa_nodes", "require_numa", "parse_kv", "KSM_SYSFS", "COUNTERS", "KNOBS", "read_counters", "read_ksm_stat", "set_knobs",
           "wait_full_scans", "wait_until", "read_pages", "migrate_pages", "ksm_pids",
           "read_smaps_ksm", "read_smaps_rollup", "read_pfns", "read_vmstat", "ensure_swap",
           "reclaim_pages", "set_run", "held", "knobs_set"]

# The file names, what each reads in mm/ksm.c and what writing it does:
# ksmlens.kernel.sysfs (one table for the guest side and the drgn side).
# COUNTERS: the read-only files; KNOBS: the writable ones.


def _parse_value(v: str):
    v = v.strip()
    if v.startswith("[") or " " in v:  # advisor_mode: "[none] scan-time"
        for w in v.split():
            if w.startswith("["):
                return w.strip("[]")
        return v
    try:
        return int(v)
    except ValueError:
        return v


def read_counters(vm) -> dict:
    """Every file of /sys/kernel/mm/ksm in the guest, as {name: int|str}."""
    files = vm.read_files(globs=[f"{KSM_SYSFS}/*"])
    if not files:
        raise KsmlensError("the guest kernel has no /sys/kernel/mm/ksm (CONFIG_KSM off)",
                           "boot a ksmlens variant: `ksmlens vm up`")
    return {p.rsplit("/", 1)[1]: _parse_value(v) for p, v in files.items() if v is not None}


def read_ksm_stat(vm, pids) -> dict:
    """``/proc/PID/ksm_stat`` of each pid: {pid: {ksm_rmap_items: ..., ...}}.

    Which fields a kernel prints is its own: 6.1 prints only
    ``ksm_rmap_items`` (commit cb4df4cae4f2) and has ``ksm_merging_pages`` in
    a file of its own, ``/proc/PID/ksm_merging_pages`` (commit 7609385337a4);
    ``ksm_stat`` gained ``ksm_merging_pages`` and ``ksm_process_profit`` with
    d21077fbc2fc (6.4) and ``ksm_zero_pages`` with 6080d19f0704 (6.6). Where
    ``ksm_stat`` lacks ``ksm_merging_pages`` it is read from that file."""
    pids = [int(p) for p in pids]
    if not pids:
        return {}
    paths = [f"/proc/{p}/{f}" for p in pids for f in ("ksm_stat", "ksm_merging_pages")]
    files = vm.read_files(paths=paths)
    out = {}
    for p in pids:
        st = parse_kv(files.get(f"/proc/{p}/ksm_stat"))
        merging = files.get(f"/proc/{p}/ksm_merging_pages")
        if st and "ksm_merging_pages" not in st and merging and merging.strip().isdigit():
            st["ksm_merging_pages"] = int(merging)
        out[p] = st
    return out


def parse_kv(text) -> dict:
    res = {}
    for line in (text or "").splitlines():
        if line.strip():
            k, v = line.split(None, 1)
            res[k.rstrip(":")] = _parse_value(v)
    return res


def read_smaps_ksm(vm, pids) -> dict[int, int]:
    """KSM pages per process, from the ``KSM:`` line of /proc/PID/smaps_rollup
    (the kernel counts ``folio_test_ksm()`` pages of each mapping).

    A kernel without that line (it came with commit 8b47933544a6, "proc/ksm:
    add ksm stats to /proc/pid/smaps", 6.6; 6.1 lacks it) is answered from
    the pages themselves: KPF_KSM of every present page of the process's
    VM_MERGEABLE VMAs (VmFlags ``mg`` in /proc/PID/smaps), through
    /proc/PID/pagemap and /proc/kpageflags (where KPF_KSM is PageKsm())."""
    pids = [int(p) for p in pids]
    if not pids:
        return {}
    files = vm.read_files(paths=[f"/proc/{p}/smaps_rollup" for p in pids])
    res, missing = {}, []
    for p in pids:
        text = files.get(f"/proc/{p}/smaps_rollup")
        kv = parse_kv(text)
        if "KSM" in kv:
            res[p] = int(str(kv["KSM"]).split()[0]) * 1024 // PAGE_SIZE   # kB -> pages
        elif text:
            missing.append(p)
    if missing:
        smaps = vm.read_files(paths=[f"/proc/{p}/smaps" for p in missing])
        ranges, owner = [], []
        for p in missing:
            start = end = None
            for line in (smaps.get(f"/proc/{p}/smaps") or "").splitlines():
                head = line.split(None, 1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    a, b = head.split("-")
                    start, end = int(a, 16), int(b, 16)
                elif head == "VmFlags:" and start is not None and " mg" in f" {line}":
                    ranges.append((p, start, (end - start) // PAGE_SIZE))
                    owner.append(p)
            res[p] = 0
        for p, page in zip(owner, read_pages(vm, ranges) if ranges else []):
            res[p] += sum(1 for x in page.get("pages", []) if x.get("kpf_ksm"))
    return res


def read_smaps_rollup(vm, pids) -> dict[int, dict]:
    """/proc/PID/smaps_rollup of each pid as {pid: {field: kB}} (``KSM``,
    ``Swap``, ``AnonHugePages``, ``Rss``, ...); a pid that is gone maps to {}."""
    pids = [int(p) for p in pids]
    files = vm.read_files(paths=[f"/proc/{p}/smaps_rollup" for p in pids]) if pids else {}
    out = {}
    for p in pids:
        kv = parse_kv(files.get(f"/proc/{p}/smaps_rollup"))
        out[p] = {k: int(str(v).split()[0]) for k, v in kv.items()
                  if str(v).split()[:1] and str(v).split()[0].isdigit()}
    return out


def read_vmstat(vm) -> dict[str, int]:
    """/proc/vmstat (e.g. ``thp_split_page``, ``pswpout``)."""
    return {k: int(v) for k, v in (l.split() for l in
                                   vm.read_file("/proc/vmstat").splitlines() if l.strip())}


def ksm_pids(vm) -> list[int]:
    """Pids whose /proc/PID/ksm_stat shows rmap_items, merged pages or KSM
    zero pages (a fork child ksmd has not scanned has zero pages and no
    rmap_item; /proc lists only thread-group leaders)."""
    files = vm.read_files(globs=["/proc/[0-9]*/ksm_stat"])
    out = []
    for path, text in files.items():
        kv = parse_kv(text)
        if any(kv.get(k) for k in ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages")):
            out.append(int(path.split("/")[2]))
    return sorted(out)


def _guest_script(vm, script: str, ranges, timeout: float = 120):
    """Run ksmlens/lab/guest/SCRIPT PID START NPAGES... in the guest; its JSON."""
    import json
    import sys
    from ksmlens.lab.paths import repo_root
    argv = [vm.python, vm.guest_path(repo_root() / "ksmlens" / "lab" / "guest" / script)]
    for pid, start, n in ranges:
        argv += [str(pid), str(start), str(n)]
    return json.loads(vm.run(argv, check=True, timeout=timeout).stdout)


def read_pages(vm, ranges, names=None) -> list[dict]:
    """Each page's fate in ``ranges`` [(pid, start, npages)], read in the guest
    from /proc/PID/pagemap, /proc/kpageflags and /proc/kpagecount."""
    if not ranges:
        return []
    res = _guest_script(vm, "pagemap.py", ranges)
    for i, r in enumerate(res):
        if "error" in r:
            raise KsmlensError(f"cannot read pagemap of pid {r['pid']}: {r['error']}",
                               "has the process exited?")
        if names:
            r["name"] = names[i]
    return res


def read_pfns(vm, pfns) -> dict[int, dict]:
    """/proc/kpageflags and /proc/kpagecount of physical pages, e.g. a KSM
    page no PTE maps any more: {pfn: {"kpf_swapcache", "mapcount", ...}}."""
    if not pfns:
        return {}
    import json
    import sys
    from ksmlens.lab.paths import repo_root
    argv = [vm.python, vm.guest_path(repo_root() / "ksmlens" / "lab" / "guest" / "pagemap.py"),
            "--pfn",
            *map(str, pfns)]
    return {r["pfn"]: r for r in json.loads(vm.run(argv, check=True).stdout)}


SWAP_DEVICE = "/dev/zram0"


def ensure_swap(vm, size: str = "256M") -> dict:
    """Swap on zram in the guest, set up once (idempotent): zram0 disksize,
    ``mkswap``, ``swapon`` (the tools come from the host root the guest
    sees). Returns the /proc/swaps line as {"device", "size_kb", "used_kb"}."""
    script = (f"export PATH=$PATH:/sbin:/usr/sbin; d={SWAP_DEVICE}; "
              "if ! grep -q \"^$d \" /proc/swaps; then "
              "  test -b $d || { echo \"no $d: the kernel lacks CONFIG_ZRAM\" >&2; exit 3; }; "
              f"  [ \"$(cat /sys/block/zram0/disksize)\" != 0 ] || echo {size} > /sys/block/zram0/disksize; "
              "  mkswap $d >/dev/null && swapon $d || exit 4; "
              "fi; grep \"^$d \" /proc/swaps")
    r = vm.run(["/bin/sh", "-c", script])
    if r.rc:
        err = (r.stderr.strip().splitlines() or ["mkswap/swapon failed"])[-1]
        raise KsmlensError(f"cannot set up swap on {SWAP_DEVICE} in the guest: {err}",
                           "the lab kernel needs CONFIG_ZRAM and CONFIG_SWAP; mkswap and "
                           "swapon come from the host's util-linux")
    f = r.stdout.split()
    return {"device": f[0], "size_kb": int(f[2]), "used_kb": int(f[3])}


def reclaim_pages(vm, ranges, *, rounds: int | None = None) -> dict:
    """Make the guest kernel reclaim the pages of ``ranges`` [(pid, start,
    npages)] through their processes' memory cgroups (``memory.reclaim``,
    anon only), round after round until nothing changes, and report each
    page before and after (see :mod:`ksmlens.lab.guest.reclaim`). Reclaim
    unmaps through the kernel's real rmap walk: a KSM page whose walk misses a
    mapping stays mapped there. Needs swap (:func:`ensure_swap`)."""
    import json
    import sys
    from ksmlens.lab.paths import repo_root
    argv = [vm.python, vm.guest_path(repo_root() / "ksmlens" / "lab" / "guest" / "reclaim.py")]
    if rounds:
        argv += ["--rounds", str(rounds)]
    for pid, start, n in ranges:
        argv += [str(pid), str(start), str(n)]
    r = vm.run(argv, timeout=600)
    try:
        res = json.loads(r.stdout or r.stderr.strip().splitlines()[-1])
    except (ValueError, IndexError):
        r.check()
        raise
    if "error" in res:
        raise KsmlensError(f"reclaim: {res['error']}",
                           "echo +memory > /sys/fs/cgroup/cgroup.subtree_control (a scenario "
                           "does it for its own cgroup)")
    return res


def numa_nodes(vm) -> int:
    """The guest's NUMA nodes (``/sys/devices/system/node/nodeN``)."""
    return len(vm.read_files(globs=["/sys/devices/system/node/node[0-9]*/cpulist"]))


def require_numa(vm, what: str, need: int = 2) -> None:
    """Raise :class:`KsmlensError` in one line, saying how to boot it, when
    the guest has fewer than ``need`` NUMA nodes; ``what`` is the sentence's
    subject ("verify migrates KSM pages across two")."""
    n = numa_nodes(vm)
    if n < need:
        raise KsmlensError(f"VM {vm.name!r} has {n} NUMA node(s); {what}",
                           f"boot it with `ksmlens vm up --name {vm.name} --numa {need}`")


def migrate_pages(vm, ranges) -> list[dict]:
    """Make the guest kernel migrate each page of ``ranges`` [(pid, start,
    npages)] to the other NUMA node (``move_pages(MPOL_MF_MOVE_ALL)``), and
    report before/target/status/after per page (see :mod:`ksmlens.lab.guest.migrate`).

    Migration unmaps through the kernel's real rmap walk: a KSM page whose
    walk misses a mapping stays where it is.
    """
    res = _guest_script(vm, "migrate.py", ranges, timeout=300)
    if isinstance(res, dict) and "error" in res:
        raise KsmlensError(res["error"].split(":")[0], res["error"].split(":", 1)[-1].strip())
    return res


def set_knobs(vm, **knobs) -> dict:
    """Write KSM knobs in the guest, in a safe order; return the old values.

    ``max_page_sharing`` and ``merge_across_nodes`` can only change while
    nothing is merged (``KsmFile.needs_unmerged``), so they are written
    with ``run=2`` (unmerge all) first and ``run`` put back after;
    ``pages_to_scan`` needs ``advisor_mode=none`` (written first).
    The order is :data:`ksmlens.kernel.sysfs.WRITE_ORDER`. Raises
    :class:`KsmlensError` for a name that is not a knob, before writing anything.
    """
    for k in knobs:
        sysfs.knob(k)          # one-line error for a counter or a typo
    old = read_counters(vm)
    knobs = dict(knobs)
    for k in [k for k in knobs if k not in old]:
        # a file this kernel does not have (KsmFile.since): setting what the
        # kernel does without it (smart_scan=0, advisor_mode=none) is a no-op
        f = sysfs.BY_NAME[k]
        if f.absent_as is not None and knobs[k] == f.absent_as:
            del knobs[k]
            continue
        raise KsmlensError(f"this kernel has no {KSM_SYSFS}/{k}"
                           + (f" (added by {f.since})" if f.since else ""),
                           "run this on a kernel that has it (e.g. the 6.12 lab kernels)")
    saved = {k: old[k] for k in knobs if k in old}
    needs_unmerge = any(knobs[k] != old.get(k) for k in knobs
                        if sysfs.BY_NAME[k].needs_unmerged)
    if needs_unmerge:
        vm.write_file(f"{KSM_SYSFS}/run", str(sysfs.RUN_UNMERGE))
    for k in sorted(knobs, key=sysfs.WRITE_ORDER.index):
        if knobs[k] == old.get(k) and not (k == "run" and needs_unmerge):
            continue
        try:
            vm.write_file(f"{KSM_SYSFS}/{k}", str(knobs[k]))
        except KsmlensError as e:
            raise KsmlensError(f"cannot set KSM knob {k}={knobs[k]} in the guest: {e.cause}",
                               "max_page_sharing needs pages_shared == 0; pages_to_scan "
                               "needs advisor_mode=none") from None
    if needs_unmerge and "run" not in knobs:
        vm.write_file(f"{KSM_SYSFS}/run", str(old["run"]))
    return saved


def set_run(vm, value: int) -> None:
    """Write ``/sys/kernel/mm/ksm/run`` in the guest: :data:`~ksmlens.kernel.sysfs.RUN_STOP`
    (0), ``RUN_MERGE`` (1) or ``RUN_UNMERGE`` (2); ``run_store()`` in mm/ksm.c
    takes ksm_thread_mutex, so the write returns between two of ksmd's batches."""
    if value not in (sysfs.RUN_STOP, sysfs.RUN_MERGE, sysfs.RUN_UNMERGE):
        raise KsmlensError(f"run={value}: the kernel takes 0, 1 or 2",
                           "0 stops ksmd, 1 merges, 2 unmerges everything")
    vm.write_file(f"{KSM_SYSFS}/run", str(value))


@contextlib.contextmanager
def held(vm):
    """Hold ksmd for the ``with`` block: ``run=0``, then the old ``run`` back
    on the way out, also when the block raises.

    ``run=0`` (``KSM_RUN_STOP``) only stops ksmd's scanning: merged pages
    stay merged, stable nodes and rmap_items stay as they are (nothing is
    unmerged; that is ``run=2``), and the pages of a process can still
    change under it (a write COW-breaks a KSM page; ksmd notices at its next
    visit). The write waits for ksmd's current batch (``ksm_thread_mutex``).
    Yields the old value of ``run``. The block may write ``run`` itself
    (:func:`set_run`); the old value is restored all the same.
    """
    old = read_counters(vm)["run"]
    set_run(vm, sysfs.RUN_STOP)
    try:
        yield old
    finally:
        set_run(vm, old)


@contextlib.contextmanager
def knobs_set(vm, **knobs):
    """:func:`set_knobs` for the ``with`` block, the old values put back on
    the way out (also when the block raises); yields the old values."""
    saved = set_knobs(vm, **knobs) if knobs else {}
    try:
        yield saved
    finally:
        if saved:
            set_knobs(vm, **saved)


def wait_until(vm, predicate, *, timeout: float, what: str, poll: float = 0.5):
    """Poll the counters until ``predicate(counters)`` holds; error on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        c = read_counters(vm)
        if predicate(c):
            return c
        if time.monotonic() > deadline:
            raise KsmlensError(f"timed out after {timeout:.0f} s waiting for {what} "
                               f"(run={c.get('run')}, full_scans={c.get('full_scans')}, "
                               f"pages_shared={c.get('pages_shared')}, "
                               f"pages_sharing={c.get('pages_sharing')})",
                               "is ksmd running (run=1)? is the guest too slow?")
        time.sleep(poll)


def wait_full_scans(vm, n: int = 1, *, timeout: float = 120.0, poll: float = 0.5) -> dict:
    """Wait until ksmd has completed ``n`` more full scans."""
    start = read_counters(vm)
    if start.get("run") != 1:
        raise KsmlensError(f"ksmd is not running (run={start.get('run')})",
                           "set run=1 (a scenario does) before waiting for scans")
    target = start["full_scans"] + n
    return wait_until(vm, lambda c: c["full_scans"] >= target, timeout=timeout,
                      what=f"{n} more full scan(s)", poll=poll)
