"""Count ``rmap_walk_ksm()``'s work in the kernel with tracefs kprobes (runs in the guest).

    python3 walktrace.py start --mapping-offset N --rmap-one-offset N [--rmap-one FN]...
                               [--collect] [--no-iterations]
    python3 walktrace.py stop

``start`` mounts tracefs if needed, makes the trace buffer large, and
defines kprobe events in the group ``ksmlens`` (Documentation/trace/kprobetrace.rst):

* ``walk``: entry of ``rmap_walk_ksm(folio, rwc)`` with ``folio->mapping``
  (the stable node | PAGE_MAPPING_KSM) and ``rwc->rmap_one`` (offsets from
  the kernel's DWARF, given by the host);
* ``walk_end``: its return;
* with ``--collect``, ``collect`` / ``collect_end``: entry (with
  ``folio->mapping``) and return of ``collect_procs_ksm(folio, ...)``
  (mm/ksm.c, memory failure: its own loop over the stable node's
  rmap_items, the anon_vma tree per early-kill process), a walk of its own;
* ``first`` / ``next``: returns of ``anon_vma_interval_tree_iter_first`` /
  ``_iter_next`` (mm/interval_tree.c) with the VMA chain they return;
* ``one_FN``: entry of each named rmap_one callback (``try_to_migrate_one``,
  ``remove_migration_pte``, ...).

``--no-iterations`` leaves ``first`` / ``next`` out (the walks' durations
without the cost of the iteration probes). ``stop`` disables them, reads the trace, attributes every event to the walk
its task is inside (between ``walk`` and ``walk_end`` of the same pid: the
interval tree is iterated by other code too), removes the events and prints
one JSON line: ``{"walks": [{"fn", "pid", "mapping", "rmap_one", "first",
"first_null", "next", "next_null", "calls": {FN: n}, "us"}], "lost": N,
"events": N}``. ``lost``: events the ring buffer overran (then the counts
are wrong: the host refuses them), with the kprobes' ``nmissed``
(kprobe_profile). ``fn``: ``rmap_walk_ksm`` or ``collect_procs_ksm`` (its
``rmap_one`` 0). The trace clock is ``global``: the events of a task that
moves between CPUs stay in order. Standard library only.
"""

import json
import os
import re
import sys

TRACEFS = "/sys/kernel/tracing"
GROUP = "ksmlens"
BUFFER_KB = 131072          # per CPU
LINE = re.compile(r"^\s*.+?-(\d+)\s+\[\d+\].*?\s(\d+\.\d+): (\w+): \((.*?)\)(.*)$")
ARG = re.compile(r"(\w+)=(\S+)")


def w(path, text, append=False):
    # os.open, not open(..., "a"): Python seeks to the end of a file opened for
    # appending, and tracefs' kprobe_events refuses lseek() with EINVAL
    fd = os.open(os.path.join(TRACEFS, path),
                 os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def mount():
    if not os.path.exists(os.path.join(TRACEFS, "kprobe_events")):
        os.makedirs(TRACEFS, exist_ok=True)
        if os.system(f"mount -t tracefs nodev {TRACEFS} 2>/dev/null") or \
                not os.path.exists(os.path.join(TRACEFS, "kprobe_events")):
            print(json.dumps({"error": "tracefs: no kprobe_events (the kernel needs "
                              "CONFIG_KPROBE_EVENTS and CONFIG_FTRACE)"}))
            sys.exit(3)


def remove():
    if os.path.exists(os.path.join(TRACEFS, "events", GROUP)):
        w(f"events/{GROUP}/enable", "0")
    with open(os.path.join(TRACEFS, "kprobe_events")) as f:
        mine = [ln.split()[0].split(":", 1)[1] for ln in f if f":{GROUP}/" in ln]
    for ev in mine:
        w("kprobe_events", f"-:{ev}", append=True)


def start(argv):
    opts = {"--mapping-offset": None, "--rmap-one-offset": None}
    funcs = []
    iterations = "--no-iterations" not in argv
    collect = "--collect" in argv
    argv = [a for a in argv if a not in ("--no-iterations", "--collect")]
    k = 0
    while k < len(argv):
        if argv[k] == "--rmap-one":
            funcs.append(argv[k + 1])
        else:
            opts[argv[k]] = int(argv[k + 1])
        k += 2
    mount()
    w("tracing_on", "0")
    remove()
    w("current_tracer", "nop")
    w("buffer_size_kb", str(BUFFER_KB))
    w("trace_clock", "global")
    probes = [
        f"p:{GROUP}/walk rmap_walk_ksm mapping=+{opts['--mapping-offset']}($arg1):x64 "
        f"rmap_one=+{opts['--rmap-one-offset']}($arg2):x64",
        f"r:{GROUP}/walk_end rmap_walk_ksm",
    ] + ([
        f"p:{GROUP}/collect collect_procs_ksm mapping=+{opts['--mapping-offset']}($arg1):x64",
        f"r:{GROUP}/collect_end collect_procs_ksm",
    ] if collect else []) + ([
        f"r:{GROUP}/first anon_vma_interval_tree_iter_first ret=$retval:x64",
        f"r:{GROUP}/next anon_vma_interval_tree_iter_next ret=$retval:x64",
    ] if iterations else []) + [f"p:{GROUP}/one_{fn} {fn}" for fn in funcs]
    for p in probes:
        try:
            w("kprobe_events", p, append=True)
        except OSError as e:
            remove()
            print(json.dumps({"error": f"kprobe {p.split()[0]} on {p.split()[1]}: {e}"}))
            sys.exit(3)
    w("trace", "")
    w(f"events/{GROUP}/enable", "1")
    w("tracing_on", "1")
    print(json.dumps({"probes": probes}))


def stop():
    w("tracing_on", "0")
    lost = 0
    cpus = os.path.join(TRACEFS, "per_cpu")
    for c in os.listdir(cpus):
        with open(os.path.join(cpus, c, "stats")) as f:
            for ln in f:
                if ln.startswith("overrun:"):
                    lost += int(ln.split()[1])
    # kprobes that fired but could not record (a kretprobe out of instances)
    with open(os.path.join(TRACEFS, "kprobe_profile")) as f:
        for ln in f:
            parts = ln.split()
            if len(parts) == 3 and parts[0].startswith(f"{GROUP}/"):
                lost += int(parts[2])
    walks, open_ = [], {}
    events = 0
    with open(os.path.join(TRACEFS, "trace")) as f:
        for ln in f:
            if ln.startswith("#"):
                continue
            m = LINE.match(ln)
            if not m:
                continue
            events += 1
            pid, ts, ev = int(m.group(1)), float(m.group(2)), m.group(3)
            args = dict(ARG.findall(m.group(5)))
            if ev in ("walk", "collect"):
                cur = {"fn": "rmap_walk_ksm" if ev == "walk" else "collect_procs_ksm",
                       "pid": pid, "mapping": int(args["mapping"], 16),
                       "rmap_one": int(args.get("rmap_one", "0"), 16), "first": 0, "first_null": 0,
                       "next": 0, "next_null": 0, "calls": {}, "t0": ts}
                open_[pid] = cur
                walks.append(cur)
                continue
            cur = open_.get(pid)
            if cur is None:
                continue
            if ev in ("walk_end", "collect_end"):
                cur["us"] = round((ts - cur.pop("t0")) * 1e6, 1)
                del open_[pid]
            elif ev in ("first", "next"):
                cur[ev] += 1
                if int(args["ret"], 16) == 0:
                    cur[ev + "_null"] += 1
            elif ev.startswith("one_"):
                cur["calls"][ev[4:]] = cur["calls"].get(ev[4:], 0) + 1
    w(f"events/{GROUP}/enable", "0")
    remove()
    w("trace", "")
    w("buffer_size_kb", "1408")
    for c in open_.values():
        c["us"] = None
        c.pop("t0", None)
    print(json.dumps({"walks": walks, "lost": lost, "events": events}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["start"]:
        start(sys.argv[2:])
    elif sys.argv[1:2] == ["stop"]:
        stop()
    else:
        sys.exit(__doc__)
