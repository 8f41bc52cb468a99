"""Read the fate of user pages from the kernel itself (runs in the guest, as root).

    python3 pagemap.py PID START NPAGES [PID START NPAGES ...]

prints one JSON line: a list with, per range, ``{"pid", "start", "pages"}``
where each page is ``{"present", "swapped", "pfn", "ksm", "mapcount"}`` from
``/proc/PID/pagemap``, ``/proc/kpageflags`` (KPF_KSM = bit 21) and
``/proc/kpagecount``. Standard library only.
"""

import json
import os
import struct
import sys

KPF_KSM = 21
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _u64s(path, index, count):
    with open(path, "rb") as f:
        f.seek(index * 8)
        data = f.read(count * 8)
    return struct.unpack(f"<{len(data) // 8}Q", data)


def pages(pid, start, npages):
    entries = _u64s(f"/proc/{pid}/pagemap", start // PAGE_SIZE, npages)
    out = []
    for e in entries:
        present = bool(e >> 63 & 1)
        swapped = bool(e >> 62 & 1)
        pfn = e & ((1 << 55) - 1) if present else None
        page = {"present": present, "swapped": swapped, "pfn": pfn, "ksm": False,
                "mapcount": None}
        if present and pfn:
            flags, = _u64s("/proc/kpageflags", pfn, 1)
            page["ksm"] = bool(flags >> KPF_KSM & 1)
            page["mapcount"], = _u64s("/proc/kpagecount", pfn, 1)
        out.append(page)
    return out


def main(argv):
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
