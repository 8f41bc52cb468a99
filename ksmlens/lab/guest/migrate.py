"""Ask the kernel to migrate user pages to the other NUMA node (runs in the guest).

    python3 migrate.py PID START NPAGES [PID START NPAGES ...]

For each page: its node now (``move_pages(2)`` with nodes=NULL), then a
``move_pages(..., MPOL_MF_MOVE_ALL)`` to the other node of a two-node guest,
then its node again. The target is decided per physical page (pfn, from
/proc/PID/pagemap) before anything moves, so a KSM page mapped by several
ranges is sent to one node, whichever range moves it. Migration unmaps the page through the kernel's real rmap
walk (``rmap_walk_ksm()`` for a KSM page): a mapping the walk misses keeps the
page mapped and the move fails. Prints one JSON line: per range
``{"pid", "start", "rc", "pages": [{"pfn", "before", "target", "status", "after",
"tries"}]}``.
Pages that did not move are tried again (RETRIES times): a transient extra
reference also fails a migration, a missed mapping fails every time.
``rc`` is the last move_pages()'s return: 0, the number of pages it could not move,
or -errno; ``status`` is None where the kernel did not fill it in.
Standard library (ctypes) only.
"""

import ctypes
import json
import os
import sys

# move_pages(2) by the guest's machine: x86_64 arch/x86/entry/syscalls/syscall_64.tbl,
# aarch64 include/uapi/asm-generic/unistd.h (__NR_move_pages)
SYS_move_pages = {"x86_64": 279, "aarch64": 239}[os.uname().machine]
MPOL_MF_MOVE_ALL = 1 << 2  # include/uapi/linux/mempolicy.h
RETRIES = 3
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# /proc/PID/pagemap: one little-endian u64 per virtual page
# (Documentation/admin-guide/mm/pagemap.rst, fs/proc/task_mmu.c PM_*)
PAGEMAP_ENTRY_BYTES = 8
PM_PRESENT = 1 << 63                # PM_PRESENT: page present in RAM
PM_SWAP = 1 << 62                   # PM_SWAP: a swap entry
PM_PFRAME_MASK = (1 << 55) - 1      # PM_PFRAME_MASK = GENMASK_ULL(54, 0): the pfn
libc = ctypes.CDLL(None, use_errno=True)


def move_pages(pid, addrs, nodes, flags):
    n = len(addrs)
    pages = (ctypes.c_void_p * n)(*addrs)
    status = (ctypes.c_int * n)(*([-1000] * n))
    nodes_arr = (ctypes.c_int * n)(*nodes) if nodes is not None else None
    rc = libc.syscall(ctypes.c_long(SYS_move_pages), ctypes.c_int(pid), ctypes.c_ulong(n),
                      pages, nodes_arr, status, ctypes.c_int(flags))
    err = ctypes.get_errno() if rc < 0 else 0
    return (rc if rc >= 0 else -err), list(status)


def pfns(pid, addrs):
    """Each page's pfn from /proc/PID/pagemap (None if not present)."""
    out = []
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for a in addrs:
            f.seek(a // PAGE_SIZE * PAGEMAP_ENTRY_BYTES)
            e = int.from_bytes(f.read(PAGEMAP_ENTRY_BYTES), "little")
            out.append(e & PM_PFRAME_MASK if e & PM_PRESENT else None)
    return out


def nr_nodes():
    return len([d for d in os.listdir("/sys/devices/system/node") if d.startswith("node")
                and d[4:].isdigit()])


def main(argv):
    if len(argv) % 3:
        raise SystemExit("usage: migrate.py PID START NPAGES [PID START NPAGES ...]")
    if nr_nodes() < 2:
        print(json.dumps({"error": "the guest has one NUMA node: boot it with --numa 2"}))
        return
    out = []
    ranges = []
    for i in range(0, len(argv), 3):
        pid, start, n = int(argv[i]), int(argv[i + 1]), int(argv[i + 2])
        addrs = [start + k * PAGE_SIZE for k in range(n)]
        _, before = move_pages(pid, addrs, None, 0)
        ranges.append((pid, start, n, addrs, before, pfns(pid, addrs)))
    by_pfn = {}
    for pid, start, n, addrs, before, pf in ranges:
        for b, p in zip(before, pf):
            if p is not None and b in (0, 1):
                by_pfn.setdefault(p, 1 - b)
    for pid, start, n, addrs, before, pf in ranges:
        target = [by_pfn.get(p, 1 - b if b in (0, 1) else 0) for b, p in zip(before, pf)]
        rc, status = move_pages(pid, addrs, target, MPOL_MF_MOVE_ALL)
        _, after = move_pages(pid, addrs, None, 0)
        tries = [1] * n
        # A transient extra reference (ksmd scanning, LRU isolation) fails a
        # migration too; a mapping the rmap walk misses fails every time.
        for _ in range(RETRIES):
            left = [k for k in range(n) if after[k] != target[k]]
            if not left:
                break
            rc2, st2 = move_pages(pid, [addrs[k] for k in left], [target[k] for k in left],
                                  MPOL_MF_MOVE_ALL)
            _, now = move_pages(pid, [addrs[k] for k in left], None, 0)
            for j, k in enumerate(left):
                tries[k] += 1
                after[k] = now[j]
                if st2[j] != -1000:
                    status[k] = st2[j]
            rc = rc2
        # status the kernel did not fill in (a failed batch) stays None
        status = [None if s == -1000 else s for s in status]
        out.append({"pid": pid, "start": start, "rc": rc,
                    "pages": [{"pfn": p, "before": b, "target": t, "status": s, "after": a,
                               "tries": k}
                              for p, b, t, s, a, k in zip(pf, before, target, status, after,
                                                          tries)]})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
