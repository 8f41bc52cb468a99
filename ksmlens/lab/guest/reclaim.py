"""Ask the kernel to reclaim user pages through their memory cgroups (runs in the guest).

    python3 reclaim.py [--rounds N] PID START NPAGES [PID START NPAGES ...]

Writes ``memory.reclaim`` (cgroup v2, ``swappiness=200``: anonymous pages
only) of each pid's cgroup, round after round, and reads every page of the
ranges back from ``/proc/PID/pagemap`` after each round. Reclaim unmaps a
page through the kernel's own rmap walk (``try_to_unmap()``; for a KSM page
``rmap_walk_ksm()``) and swaps it out: its PTEs become swap entries (pagemap
bit 62). A KSM page whose walk misses a mapping stays mapped there and is
never freed; the mappings the walk found are swap entries all the same.

Reclaim is not one-shot: the first pass over a page only clears the young
bits the walk finds (``folio_check_references()`` activates a folio with two
referenced PTEs), the next ones deactivate and reclaim it. The rounds go on
until every page is swapped out, or until the set of swapped pages has not
changed for STABLE rounds after MIN_ROUNDS, or N rounds (a fixpoint, not a
timer). Needs swap (``ksmlens.lab.ksmsys.ensure_swap``).

Prints one JSON line: ``{"rounds", "swapped_per_round", "cgroups",
"ranges": [{"pid", "start", "pages": [{"before_pfn", "present", "swapped",
"pfn"}]}]}``. Standard library only.
"""

import errno
import json
import os
import sys

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SWAPPINESS_KEY = True   # memory.reclaim takes "swappiness=" (False once refused)
# /proc/PID/pagemap: one little-endian u64 per virtual page
# (Documentation/admin-guide/mm/pagemap.rst, fs/proc/task_mmu.c PM_*)
PAGEMAP_ENTRY_BYTES = 8
PM_PRESENT = 1 << 63                # PM_PRESENT: page present in RAM
PM_SWAP = 1 << 62                   # PM_SWAP: a swap entry
PM_PFRAME_MASK = (1 << 55) - 1      # PM_PFRAME_MASK = GENMASK_ULL(54, 0): the pfn
CGROOT = "/sys/fs/cgroup"
ROUNDS = 12
MIN_ROUNDS = 3
STABLE = 2


def pagemap(pid, start, n):
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE_SIZE * PAGEMAP_ENTRY_BYTES)
        data = f.read(n * PAGEMAP_ENTRY_BYTES)
    out = []
    for k in range(n):
        e = int.from_bytes(data[k * PAGEMAP_ENTRY_BYTES:(k + 1) * PAGEMAP_ENTRY_BYTES],
                           "little")
        present = bool(e & PM_PRESENT)
        out.append({"present": present, "swapped": bool(e & PM_SWAP),
                    "pfn": e & PM_PFRAME_MASK if present else None})
    return out


def cgroup_of(pid):
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(CGROOT, line[3:].strip().lstrip("/"))
    print(json.dumps({"error": f"pid {pid} is in no cgroup v2 group"}))
    raise SystemExit(0)


def reclaim(cg):
    """One memory.reclaim write of everything the cgroup holds; EAGAIN
    (could not reclaim it all) is the normal answer when a page stays."""
    try:
        with open(os.path.join(cg, "memory.current")) as f:
            want = max(int(f.read()), 1 << 20)     # bytes: at least 1 MiB
    except OSError:
        want = 1 << 30
    global SWAPPINESS_KEY
    try:
        with open(os.path.join(cg, "memory.reclaim"), "w") as f:
            f.write(f"{want} swappiness=200" if SWAPPINESS_KEY else str(want))
    except OSError as e:
        if e.errno == errno.EINVAL and SWAPPINESS_KEY:
            # a kernel whose memory.reclaim takes no keys (the swappiness=
            # key came with "mm: add swapiness= arg to memory.reclaim", posted
            # as v6 on 2024-01-03; 6.1 refuses it): the guest's global
            # vm.swappiness=200 (the most, since 5.8) asks the same of
            # reclaim, and stays (a lab guest)
            SWAPPINESS_KEY = False
            with open("/proc/sys/vm/swappiness", "w") as f:
                f.write("200")
            return reclaim(cg)
        if e.errno not in (errno.EAGAIN, errno.EINTR):
            raise


def main(argv):
    rounds = ROUNDS
    if argv[:1] == ["--rounds"]:
        rounds, argv = int(argv[1]), argv[2:]
    if len(argv) % 3:
        raise SystemExit("usage: reclaim.py [--rounds N] PID START NPAGES [...]")
    ranges = [(int(argv[i]), int(argv[i + 1]), int(argv[i + 2])) for i in range(0, len(argv), 3)]
    if not os.path.exists(os.path.join(CGROOT, "cgroup.controllers")):
        os.system(f"mount -t cgroup2 none {CGROOT}")
    cgroups = sorted({cgroup_of(pid) for pid, _, _ in ranges})
    for cg in cgroups:
        if not os.path.exists(os.path.join(cg, "memory.reclaim")):
            print(json.dumps({"error": f"{cg} has no memory.reclaim: enable the memory "
                              "controller in its parent's cgroup.subtree_control"}))
            return
    before = [pagemap(*r) for r in ranges]
    history, last, same = [], None, 0
    done = 0
    for done in range(1, rounds + 1):
        for cg in cgroups:
            reclaim(cg)
        now = [pagemap(*r) for r in ranges]
        swapped = frozenset((i, k) for i, pages in enumerate(now)
                            for k, p in enumerate(pages) if not p["present"])
        history.append(len(swapped))
        if len(swapped) == sum(n for _, _, n in ranges):
            break
        same = same + 1 if swapped == last else 0
        last = swapped
        if done >= MIN_ROUNDS and same >= STABLE:
            break
    out = []
    for (pid, start, n), b, a in zip(ranges, before, now):
        out.append({"pid": pid, "start": start,
                    "pages": [{"before_pfn": x["pfn"], **y} for x, y in zip(b, a)]})
    print(json.dumps({"rounds": done, "swapped_per_round": history, "cgroups": cgroups,
                      "ranges": out}))


if __name__ == "__main__":
    main(sys.argv[1:])
