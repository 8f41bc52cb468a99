"""Read the fate of user pages from the kernel itself (runs in the guest, as root).

    python3 pagemap.py PID START NPAGES [PID START NPAGES ...]
    python3 pagemap.py --pfn PFN [PFN ...]

prints one JSON line: a list with, per range, ``{"pid", "start", "pages"}``
where each page is ``{"present", "swapped", "pfn", "kpf_ksm", "kpf_anon",
"kpf_zero", "kpf_thp", "kpf_swapcache", "mapcount"}`` from
``/proc/PID/pagemap``, ``/proc/kpageflags`` and ``/proc/kpagecount``; with
``--pfn``, per pfn ``{"pfn", "flags", "kpf_..."..., "mapcount"}`` (a page no
PTE maps any more: a KSM folio left in the swap cache, say). Standard library
only.

``kpf_ksm`` is KPF_KSM (bit 21) as the kernel reports it, which 6.12 gets
wrong: fs/proc/page.c tests ``mapping & PAGE_MAPPING_KSM`` (a mask of both
low bits), so every anonymous page has it. Use the pfns (KSM sharers map the
same pfn) or ``KSM:`` in /proc/PID/smaps_rollup instead.
"""

import json
import os
import struct
import sys

# /proc/PID/pagemap: one little-endian u64 per virtual page
# (Documentation/admin-guide/mm/pagemap.rst, fs/proc/task_mmu.c PM_*)
PAGEMAP_ENTRY_BYTES = 8
PM_PRESENT = 1 << 63                # PM_PRESENT: page present in RAM
PM_SWAP = 1 << 62                   # PM_SWAP: a swap entry
PM_PFRAME_MASK = (1 << 55) - 1      # PM_PFRAME_MASK = GENMASK_ULL(54, 0): the pfn
# /proc/kpageflags bits: include/uapi/linux/kernel-page-flags.h
KPF_DIRTY = 4
KPF_HWPOISON = 19
KPF_KSM = 21
KPF_ANON = 12
KPF_SWAPCACHE = 13
KPF_THP = 22
KPF_ZERO_PAGE = 24
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _u64s(path, index, count):
    with open(path, "rb") as f:
        f.seek(index * PAGEMAP_ENTRY_BYTES)
        data = f.read(count * PAGEMAP_ENTRY_BYTES)
    return struct.unpack(f"<{len(data) // PAGEMAP_ENTRY_BYTES}Q", data)


def pages(pid, start, npages):
    entries = _u64s(f"/proc/{pid}/pagemap", start // PAGE_SIZE, npages)
    out = []
    for e in entries:
        present = bool(e & PM_PRESENT)
        swapped = bool(e & PM_SWAP)
        pfn = e & PM_PFRAME_MASK if present else None
        page = {"present": present, "swapped": swapped, "pfn": pfn, "kpf_ksm": False,
                "kpf_anon": False, "kpf_zero": False, "kpf_thp": False,
                "kpf_swapcache": False, "mapcount": None}
        if present and pfn:
            page.update(_flags(pfn))
        out.append(page)
    return out


def _flags(pfn):
    flags, = _u64s("/proc/kpageflags", pfn, 1)
    count, = _u64s("/proc/kpagecount", pfn, 1)
    return {"kpf_ksm": bool(flags >> KPF_KSM & 1), "kpf_anon": bool(flags >> KPF_ANON & 1),
            "kpf_zero": bool(flags >> KPF_ZERO_PAGE & 1), "kpf_thp": bool(flags >> KPF_THP & 1),
            "kpf_swapcache": bool(flags >> KPF_SWAPCACHE & 1), "mapcount": count}


def by_pfn(pfns):
    return [{"pfn": p, "flags": _u64s("/proc/kpageflags", p, 1)[0], **_flags(p)} for p in pfns]


def main(argv):
    if argv[:1] == ["--pfn"]:
        print(json.dumps(by_pfn([int(p) for p in argv[1:]])))
        return
    if len(argv) % 3:
        raise SystemExit("usage: pagemap.py PID START NPAGES [PID START NPAGES ...]")
    res = []
    for i in range(0, len(argv), 3):
        pid, start, n = int(argv[i]), int(argv[i + 1]), int(argv[i + 2])
        try:
            res.append({"pid": pid, "start": start, "pages": pages(pid, start, n)})
        except OSError as e:
            res.append({"pid": pid, "start": start, "error": f"{e.strerror}"})
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
