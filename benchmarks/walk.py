#!/usr/bin/env python3
"""Issue 10's benchmark: `ksmlens snapshot` on 100k and 1M rmap_items.

Run (from the repository, the venv's python):

    python benchmarks/walk.py                         # --sizes 100000,1000000
    python benchmarks/walk.py --sizes 100000 --profile
    python benchmarks/walk.py --vmcore ~/.cache/ksmlens-bench/walk-100000-union.vmcore \\
        --vmlinux ~/.cache/ksmlens/.../vmlinux         # offline: no guest is booted

Guest (per size N, unless --vmcore): a TCG lab VM of the --variant kernel
(default union) for --arch (default x86_64; arm64 for the arm64 lab), N pages + 2 GB for N >= 1M, at least 8 GB (else 2 x N pages + 1 GB, at least 2 GB;
ksmlens.lab.bigstate.guest_memory_mb),
2 vCPUs. The project's workload (vm/scenarios/ksmlens-workload.c, scenario
``merge``) runs 2 processes x N/2 pages with ``--distinct N/2``: page k of
one process has the same content as page k of the other, and the N/2
contents are all different. ksmd runs fast (pages_to_scan 100000,
sleep_millisecs 0) until /sys/kernel/mm/ksm says pages_shared == N/2 and
pages_sharing == N/2 (N rmap_items in N/2 stable nodes, two each); then the
knobs go back to the kernel's defaults (100 pages per 20 ms) for the
measurements. Prep times printed: boot (VM up until its agent answers),
fill (workload start until both processes have written their pages),
merge (ksmd switched on until the counters above hold).

Figures. Every one is one fresh process (``python -m ksmlens ...``: import,
attach, walk, write), its wall time measured here and its peak RSS from
wait4()'s rusage (ru_maxrss of that child alone):

  json      ``ksmlens snapshot -o X.json`` (consistent: guest paused over QMP):
            wall s, peak RSS MB, file MB (st_size), and the snapshot's own
            meta.paused_seconds (guest stopped, all walk attempts) and
            meta.walk_seconds (last attempt), read from the file.
  columnar  the same with ``-o X.arrow``. If the file written is JSON (this
            ksmlens writes JSON whatever the suffix) or the CLI refuses it,
            it prints "columnar: not supported by this ksmlens".
  cost      ``walk_cost()`` of the columnar file in a fresh process: each
            walk kind alone (full, migrate, reclaim, hwpoison: what ``ksmlens
            cost --walk K`` computes), then all at once; load s, peak RSS. At
            1M each kind's seconds are held against the columnar snapshot's
            end to end (issue 19: cost adds at most the snapshot's time).
  live      ``ksmlens snapshot --mode live -o X.arrow``: guest not paused.
  dump      ``ksmlens snapshot --vmcore FILE``: QMP dump-guest-memory; the
            guest is paused for the whole dump (kept, see below).
  vmcore    ``ksmlens snapshot --target FILE --vmlinux V -o X.arrow``.
  naive     this script's own ``--naive-child``: one drgn Object per step
            with ksmlens.lens.helpers (for_each_ksm_mm_slot,
            for_each_mm_slot_rmap_item, for_each_stable_node,
            for_each_stable_node_rmap_item) and drgn's vma_find() per item,
            collecting address, state, stable node, vma range, vm_pgoff and
            linear_page_index into a list of dicts (guest paused over QMP as
            in consistent mode). Run at N <= 100k always; above that only
            if it ends within --naive-limit seconds (stopped, and the guest
            resumed, otherwise). "speedup" = naive wall / the fastest of the
            json, columnar and vmcore walls (walk only: naive walk / its walk).

  floor     this script's own ``--floor-child`` (issue 21): in one pause,
            ksmlens's ``walk_paused()`` with every bulk read logged, then
            the physical floor of the same state: the pages those reads
            touched (slab pages of the rmap_items, stable nodes and mm
            slots, page tables, struct pages) copied again alone,
            consecutive pages in one read, and every rmap_item and stable
            node decoded from that copy (one numpy gather per field);
            floor = copy + decode. "near the floor" prints issue 21's
            targets with each figure's ratio to it.
  views     issue 21's views, each drawn from the columnar file in a fresh
            process (``--views-child FILE VIEW``, stopped after 120 s):
            plots.stable_tree, walk_replay, address_space, address_axis,
            costplots.page_cost (with walk_cost --walk full) and the %ksm
            tables (summary, stable, procs, rmap, stale); seconds after the
            load, the figure rendered to PNG (Agg). Target < 2 s each at 1M.

Targets (issue 10), checked in the table's last column:
  1M:   end to end <= 15 s, guest paused <= 5 s, peak RSS <= 1 GB,
        file <= 100 MB; live and vmcore in the same range.
  100k: end to end <= 2 s, peak RSS <= 400 MB, >= 10x the naive walk.
A size between gets no target ("-"). Timings are TCG on a shared 2-core
machine: expect some tens of percent of noise.

vmcores are kept in --keep-dir (default ~/.cache/ksmlens-bench/), named
walk-N-VARIANT.vmcore, for re-measuring offline with --vmcore/--vmlinux
(json, columnar, vmcore and naive figures; no live/pause figures there).
Snapshot outputs go to a temporary directory there and are deleted.
--profile runs the json snapshot once more under ``python -m cProfile -s
cumtime`` (sizes <= 200k only) and prints the top 15 functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 1 << 20
LIMITS = {"mem_cap_mb": 10240, "figure_s": 900.0}   # set from --mem-cap / --figure-limit
KEEP_DIR = Path(os.path.expanduser("~/.cache/ksmlens-bench"))

# (figure, size) -> target; the unit is in the figure's name.
TARGETS = {
    1_000_000: {"wall_s": 15.0, "paused_s": 5.0, "rss_mb": 1024.0, "file_mb": 100.0},
    100_000: {"wall_s": 2.0, "rss_mb": 400.0, "speedup": 10.0},
}


# ---------------------------------------------------------------- child runs

def _cap_memory():
    import resource
    cap = LIMITS["mem_cap_mb"] * MB
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_child(argv, *, timeout=None, on_timeout=None) -> dict:
    """Run argv in a fresh process; wall seconds, its own peak RSS (MB), rc,
    stdout/stderr. On timeout (default --figure-limit) the process group is
    killed, ``on_timeout()`` is called and ``timed_out`` is set. The child's
    address space is capped at --mem-cap (RLIMIT_AS): the host is shared."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    timeout = LIMITS["figure_s"] if timeout is None else timeout
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.monotonic()
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=str(ROOT),
                             start_new_session=True, preexec_fn=_cap_memory)
        timed_out = False
        deadline = None if timeout is None else t + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                os.killpg(p.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(p.pid, 0)
                timed_out = True
                if on_timeout:
                    on_timeout()
                break
            time.sleep(0.01)
        wall = time.monotonic() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall_s": wall, "rss_mb": ru.ru_maxrss / 1024, "rc": p.returncode,
                "timed_out": timed_out, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def ksmlens_cmd(*args):
    return [sys.executable, "-m", "ksmlens", *args]


def last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def failure(stderr: str) -> str:
    """The error line of a child's traceback and the innermost ksmlens
    frame it came from (``model.py:198 save``)."""
    where = ""
    lines = stderr.strip().splitlines()
    for i, l in enumerate(lines):
        if l.strip().startswith('File "') and "/ksmlens/" in l:
            parts = l.strip().split('"')
            fn = l.rsplit(" in ", 1)[-1]
            line = l.split(", line ")[-1].split(",")[0]
            where = f" in {Path(parts[1]).name}:{line} {fn}"
    return (last_line(stderr) or "no stderr") + where


def path_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def json_meta(path: Path) -> dict | None:
    """``meta`` of a JSON snapshot without loading the file (it comes near
    the start, before the per-item lists); None if the file is not JSON."""
    dec = json.JSONDecoder()
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if not head.lstrip().startswith(b"{"):
            return None
        chunk = 1 << 20
        while True:
            i = head.find(b'"meta":')
            if i >= 0:
                text = head[i + len('"meta":'):].decode(errors="replace").lstrip()
                try:
                    return dec.raw_decode(text)[0]
                except json.JSONDecodeError:
                    pass
            more = f.read(chunk)
            if not more:
                return {}
            head += more


META_CHILD = r"""
import json, sys, time
from ksmlens.lens.model import Snapshot
t = time.monotonic()
s = Snapshot.load(sys.argv[1])
m = dict(s.meta) if isinstance(getattr(s, "meta", None), dict) else {}
print(json.dumps({"load_s": time.monotonic() - t, "paused_seconds": m.get("paused_seconds"),
                  "walk_seconds": m.get("walk_seconds")}))
"""


def resume_guest(vm):
    """``cont`` a guest a killed child may have left paused."""
    if vm is not None:
        with vm.qmp(timeout=30) as q:
            q.cont()


def snapshot_figure(args, out: Path, vm=None) -> dict:
    """One ``ksmlens snapshot ... -o out`` in a fresh process, and what it wrote."""
    r = run_child(ksmlens_cmd("snapshot", *args, "-o", str(out)),
                  on_timeout=lambda: resume_guest(vm))
    fig = {"wall_s": r["wall_s"], "rss_mb": r["rss_mb"]}
    if r["timed_out"]:
        fig["error"] = f"stopped after {r['wall_s']:.0f} s (--figure-limit)"
        return fig
    if r["rc"] or not out.exists():
        fig["error"] = failure(r["stderr"]) if r["stderr"].strip() else f"exit {r['rc']}"
        if "MemoryError" in r["stderr"]:
            fig["error"] = f"MemoryError at the {LIMITS['mem_cap_mb']} MB --mem-cap" + \
                failure(r["stderr"]).split("MemoryError", 1)[-1]
        return fig
    fig["file_mb"] = path_size(out) / MB
    meta = json_meta(out) if out.is_file() else None
    fig["format"] = "json" if meta is not None else "other"
    if meta is None:
        m = run_child([sys.executable, "-c", META_CHILD, str(out)])
        meta = json.loads(m["stdout"]) if m["rc"] == 0 else {}
        if m["rc"]:
            fig["note"] = "its meta unreadable: " + last_line(m["stderr"])
        else:
            fig["load_s"] = meta.get("load_s")
    fig["paused_s"] = meta.get("paused_seconds")
    fig["walk_s"] = meta.get("walk_seconds")
    if meta.get("items_per_second"):
        fig["items"] = meta["items_per_second"] * (meta.get("walk_seconds") or 0)
    return fig


# ---------------------------------------------------------------- naive walk

def naive_walk(target: str, vmlinux: str | None) -> dict:
    """The naive drgn walk (see the module doc); runs in --naive-child."""
    from drgn.helpers.linux.mm import vma_find

    from ksmlens.lab.attach import attach
    from ksmlens.lens import helpers as H

    prog = attach(target, vmlinux=vmlinux)
    vm = prog.cache.get("ksmlens_vm") if target.startswith("vm:") else None
    q = vm.qmp(timeout=30) if vm is not None else None
    items, nodes = [], []
    try:
        if q is not None:
            q.stop()
        t = time.monotonic()
        for slot in H.for_each_ksm_mm_slot(prog):
            for item in H.for_each_mm_slot_rmap_item(slot):
                addr = H.rmap_item_address(item)
                state = H.rmap_item_state(item)
                d = {"rmap_item": item.value_(), "mm": item.mm.value_(), "address": addr,
                     "state": state,
                     "stable_node": item.head.value_() if state == "stable" else None,
                     "vma": None}
                vma = vma_find(item.mm, addr)
                if vma:
                    d["vma"] = (vma.vm_start.value_(), vma.vm_end.value_())
                    d["vm_pgoff"] = vma.vm_pgoff.value_()
                    d["linear_page_index"] = H.linear_page_index(vma, addr)
                items.append(d)
        for node in H.for_each_stable_node(prog):
            nodes.append({"stable_node": node.value_(), "kpfn": node.kpfn.value_(),
                          "rmap_items": [i.value_() for i in
                                         H.for_each_stable_node_rmap_item(node)]})
        walk = time.monotonic() - t
    finally:
        if q is not None:
            q.cont()
            q.close()
    return {"items": len(items), "stable_nodes": len(nodes),
            "stable_items": sum(len(n["rmap_items"]) for n in nodes), "walk_s": walk}


def naive_figure(target, vmlinux, *, limit=None, vm=None) -> dict:
    argv = [sys.executable, __file__, "--naive-child", target]
    if vmlinux:
        argv += ["--vmlinux", vmlinux]
    r = run_child(argv, timeout=limit or 1e9, on_timeout=lambda: resume_guest(vm))
    fig = {"wall_s": r["wall_s"], "rss_mb": r["rss_mb"]}
    if r["timed_out"]:
        fig["error"] = f"stopped after {limit:.0f} s"
    elif r["rc"]:
        fig["error"] = last_line(r["stderr"]) or f"exit {r['rc']}"
    else:
        fig.update(json.loads(last_line(r["stdout"])))
        fig["paused_s"] = fig["walk_s"] if target.startswith("vm:") else None
    return fig


# ---------------------------------------------------------------- the floor

def floor_walk(target: str, vmlinux: str | None) -> dict:
    """The physical floor of the same state (issue 21), in --floor-child: in
    one pause (the guest stopped over QMP; a vmcore holds still), ksmlens's
    paused walk (``walk_paused``, every read it makes through
    ``ksmlens.lens.layout.Memory`` logged), then the floor:

    * ``copy_all``: every 4 KiB page those reads touched (slab pages of
      ``ksm_rmap_item``, ``ksm_stable_node`` and ``ksm_mm_slot``, page
      tables, ``struct page``), read again into a fresh cache with nothing
      else, consecutive pages in one read (up to 16 MB);
    * ``copy_slab``: the slab pages of the rmap_items and stable nodes alone;
    * ``decode``: from that copy, every rmap_item and stable node decoded
      into arrays with one numpy gather per field (``Memory.gather``).

    The floor is ``copy_all + decode``. Reads ksmlens makes through drgn
    Objects (tasks, VMAs, anon_vma trees: a few per process or tree) are not
    in it."""
    import numpy as np

    from ksmlens.lab.attach import attach
    from ksmlens.lens import layout, snapshot

    prog = attach(target, vmlinux=vmlinux)
    vm = prog.cache.get("ksmlens_vm") if target.startswith("vm:") else None
    q = vm.qmp(timeout=30) if vm is not None else None
    reads: list[tuple[int, int]] = []
    orig = layout.Memory.read

    def logged(self, addr, size):
        reads.append((addr, size))
        return orig(self, addr, size)
    page = np.uint64(4095)

    def pages_of(addr, size):
        first = addr & ~page
        n = (((addr + size - np.uint64(1)) & ~page) - first) // np.uint64(4096) + np.uint64(1)
        rep = np.repeat(first, n.astype(np.int64))
        step = np.arange(rep.size, dtype=np.uint64) - np.repeat(
            np.cumsum(n) - n, n.astype(np.int64)).astype(np.uint64)
        return np.unique(rep + step * np.uint64(4096))

    def copy(pages):
        mem = layout.Memory(prog)
        t = time.monotonic()
        mem.prefetch(pages, max_run=4096)
        return mem, time.monotonic() - t
    try:
        if q is not None:
            q.stop()
        layout.Memory.read = logged
        t = time.monotonic()
        raw = snapshot.walk_paused(prog)
        walk = time.monotonic() - t
        layout.Memory.read = orig
        L = layout.Layout(prog)
        ra = np.array([r[0] for r in reads], dtype=np.uint64)
        rs = np.array([r[1] for r in reads], dtype=np.uint64)
        every = pages_of(ra, rs)
        objs = np.concatenate([raw.items["addr"], raw.nodes["addr"]]).astype(np.uint64)
        sizes = np.concatenate([np.full(raw.items["addr"].size, L.item_size, np.uint64),
                                np.full(raw.nodes["addr"].size, L.node_size, np.uint64)])
        slab = pages_of(objs, sizes)
        mem, slab_s = copy(slab)
        del mem
        mem, all_s = copy(every)
        t = time.monotonic()
        mem.gather(raw.items["addr"], L.item_size, L.item_dtype)
        mem.gather(raw.nodes["addr"], L.node_size, L.node_dtype)
        decode = time.monotonic() - t
        copied = len(mem.arena)
    finally:
        layout.Memory.read = orig
        if q is not None:
            q.cont()
            q.close()
    return {"items": int(raw.items["addr"].size), "nodes": int(raw.nodes["addr"].size),
            "walk_s": walk, "walk_reads": len(reads), "pages": int(every.size),
            "copy_mb": copied / MB, "copy_all_s": all_s, "copy_reads": mem.reads,
            "slab_pages": int(slab.size), "copy_slab_s": slab_s, "decode_s": decode,
            "floor_s": all_s + decode}


def floor_figure(target, vmlinux, vm=None) -> dict:
    argv = [sys.executable, __file__, "--floor-child", target]
    if vmlinux:
        argv += ["--vmlinux", vmlinux]
    r = run_child(argv, on_timeout=lambda: resume_guest(vm))
    fig = {"wall_s": r["wall_s"], "rss_mb": r["rss_mb"]}
    if r["timed_out"] or r["rc"]:
        fig["error"] = "stopped (--figure-limit)" if r["timed_out"] else \
            (last_line(r["stderr"]) or f"exit {r['rc']}")
    else:
        fig.update(json.loads(last_line(r["stdout"])))
    return fig


def cost_child(path) -> dict:
    """``walk_cost`` of a saved snapshot, each walk kind alone (what ``ksmlens
    cost --walk K`` computes), then every kind at once (runs in --cost-child)."""
    from ksmlens.analysis.cost import walk_cost
    from ksmlens.lens.store import load
    t = time.monotonic()
    snap = load(path)
    out = {"load_s": round(time.monotonic() - t, 2), "kinds": {}}
    kinds = ("full", "migrate", "reclaim") + (("hwpoison",) if snap.kernel.mce else ())
    for k in kinds:
        t = time.monotonic()
        c = walk_cost(snap, kinds=(k,))
        out["kinds"][k] = round(time.monotonic() - t, 2)
        del c
    t = time.monotonic()
    c = walk_cost(snap, kinds=kinds)
    out.update(cost_s=round(time.monotonic() - t, 2), rows=len(c))
    return out


def cost_figure(path: Path) -> dict:
    """The cost model on the columnar snapshot ``path``, in a fresh process:
    issue 19's "at 1M rmap_items, cost adds at most the snapshot's own time"."""
    r = run_child([sys.executable, __file__, "--cost-child", str(path)])
    fig = {"wall_s": r["wall_s"], "rss_mb": r["rss_mb"]}
    if r["rc"] or r["timed_out"]:
        fig["error"] = last_line(r["stderr"]) or f"exit {r['rc']}"
    else:
        fig.update(json.loads(last_line(r["stdout"])))
    return fig


#: issue 21's views: each drawn from the columnar file in a fresh process
VIEWS = ("stable_tree", "walk_replay", "address_space", "address_axis", "page_cost",
         "tables")


def views_child(path, view) -> dict:
    """Draw one view of a saved snapshot (runs in --views-child): load
    the file, then time the view alone (Agg backend: the figure is drawn
    to a PNG in memory, as a notebook would render it)."""
    import io
    import matplotlib
    matplotlib.use("Agg")
    from ksmlens.lens.store import load
    t = time.monotonic()
    snap = load(path)
    out = {"load_s": round(time.monotonic() - t, 2)}
    pid = int(snap.mm_slots["pid"].dropna().iloc[0])
    t = time.monotonic()
    if view == "tables":        # what %ksm stable / procs / rmap / stale print
        from ksmlens.views import report
        for text in (report.summary(snap), report.stable_table(snap),
                     report.process_table(snap), report.rmap_table(snap, pid, limit=50),
                     report.stale_table(snap, pid)):
            assert text
    else:
        from ksmlens.views import costplots, plots
        if view == "page_cost":
            from ksmlens.analysis.cost import walk_cost
            fig = costplots.page_cost(walk_cost(snap, kinds=("full",)))
        elif view in ("address_space", "address_axis"):
            fig = getattr(plots, view)(snap, pid)
        else:
            fig = getattr(plots, view)(snap)
        fig.savefig(io.BytesIO(), format="png")
    out["view_s"] = round(time.monotonic() - t, 2)
    return out


def views_figure(path: Path, limit: float = 120.0) -> dict:
    """Each of :data:`VIEWS` on the columnar snapshot ``path``, each in a
    fresh process stopped after ``limit`` seconds (issue 21: < 2 s each at
    1M, without per-item Python objects)."""
    out = {}
    for v in VIEWS:
        r = run_child([sys.executable, __file__, "--views-child", str(path), v], timeout=limit)
        if r["timed_out"]:
            out[v] = {"error": f"over {limit:.0f} s"}
        elif r["rc"]:
            out[v] = {"error": last_line(r["stderr"]) or f"exit {r['rc']}"}
        else:
            out[v] = dict(json.loads(last_line(r["stdout"])), rss_mb=round(r["rss_mb"]))
    return out


# ---------------------------------------------------------------- guest

def prepare_guest(vm, n: int) -> tuple[int, dict]:
    """Start the workload (2 x n/2 pairwise identical pages) and let ksmd
    merge them (:func:`ksmlens.lab.bigstate.merge_pairs`); returns
    (workload handle, prep seconds)."""
    from ksmlens.lab.bigstate import merge_pairs
    return merge_pairs(vm, n, say=lambda text: print("  " + text, flush=True))


# ---------------------------------------------------------------- table

def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return f"{v}{unit}"


def print_table(n: int | None, figs: dict) -> None:
    tg = TARGETS.get(n, {}) if n else {}
    rows = []

    def row(name, key, value, limit, better="le", unit=""):
        met = "-" if limit is None or value is None else \
            ("yes" if (value <= limit if better == "le" else value >= limit) else "NO")
        op = "<=" if better == "le" else ">="
        rows.append((name, fmt(value, unit), "-" if limit is None else f"{op} {limit:g}{unit}",
                     met))

    for key, label in (("json", "snapshot -o X.json"), ("columnar", "snapshot -o X.arrow"),
                       ("live", "snapshot --mode live"), ("vmcore", "snapshot of vmcore"),
                       ("naive", "naive drgn walk")):
        f = figs.get(key)
        if f is None:
            continue
        if f.get("error"):
            rows.append((f"{label}", f.get("error")[:80], "", "NO" if key != "naive" else "-"))
            continue
        own = key in ("json", "columnar", "live", "vmcore")
        row(f"{label}: end to end", key, f["wall_s"], tg.get("wall_s") if own else None,
            unit=" s")
        if f.get("paused_s") is not None and key in ("json", "columnar", "naive"):
            row(f"{label}: guest paused", key, f["paused_s"],
                tg.get("paused_s") if key in ("json", "columnar") and not figs.get("offline")
                else None, unit=" s")
        if f.get("walk_s") is not None:
            row(f"{label}: walk", key, f["walk_s"], None, unit=" s")
        row(f"{label}: peak RSS", key, f["rss_mb"], tg.get("rss_mb") if own else None,
            unit=" MB")
        if f.get("file_mb") is not None:
            row(f"{label}: file", key, f["file_mb"], tg.get("file_mb") if own else None,
                unit=" MB")
        if f.get("load_s") is not None:
            row(f"{label}: Snapshot.load", key, f["load_s"], None, unit=" s")
    cf, sn = figs.get("cost"), figs.get("columnar")
    if cf and not cf.get("error"):
        # issue 19: at 1M rmap_items the cost model adds at most the snapshot's time
        for kind, sec in cf["kinds"].items():
            row(f"cost model, --walk {kind}", "cost", sec,
                sn["wall_s"] if sn and n and n >= 1_000_000 else None, unit=" s")
        row("cost model, every kind at once", "cost", cf["cost_s"], None, unit=" s")
        row("cost: end to end (load + walk_cost)", "cost", cf["wall_s"], None, unit=" s")
        row("cost: peak RSS", "cost", cf["rss_mb"], None, unit=" MB")
    elif cf:
        rows.append(("cost model", cf["error"][:80], "", "NO"))
    if figs.get("dump"):
        d = figs["dump"]
        row("vmcore dump: guest paused", "dump", d.get("paused_s"), None, unit=" s")
        row("vmcore dump: end to end", "dump", d.get("wall_s"), None, unit=" s")
    nv = figs.get("naive")
    own = [f for k in ("json", "columnar", "vmcore") if (f := figs.get(k)) and not f.get("error")]
    js = min(own, key=lambda f: f["wall_s"]) if own else None   # the fastest way to a file
    if nv and js and not nv.get("error"):
        row("speedup vs naive (end to end)", "speedup", nv["wall_s"] / js["wall_s"],
            tg.get("speedup"), better="ge", unit="x")
        if js.get("walk_s"):
            row("speedup vs naive (walk only)", "speedup", nv["walk_s"] / js["walk_s"], None,
                better="ge", unit="x")
    fl = figs.get("floor")
    if fl and not fl.get("error"):
        row(f"floor: copy {fl['pages']} pages ({fl['copy_mb']:.0f} MB, {fl['copy_reads']} "
            "reads)", "floor", fl["copy_all_s"], None, unit=" s")
        row(f"floor: copy the {fl['slab_pages']} rmap_item + stable node slab pages alone",
            "floor", fl["copy_slab_s"], None, unit=" s")
        row("floor: decode every rmap_item and stable node", "floor", fl["decode_s"], None,
            unit=" s")
        row("floor: copy + decode", "floor", fl["floor_s"], None, unit=" s")
        row(f"walk_paused() in the same pause ({fl['walk_reads']} reads)", "floor",
            fl["walk_s"], None, unit=" s")
    elif fl:
        rows.append(("floor", fl["error"][:80], "", "NO"))
    _print_rows(rows)
    near_the_floor(n, figs)


def _print_rows(rows, head=("figure", "measured", "target", "met?")) -> None:
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                               for i, c in enumerate(r)))


# issue 21: close to the limit. (figure, attribute) -> target, per size
TARGETS_21 = {
    1_000_000: {("json", "paused_s"): 1.0, ("columnar", "wall_s"): 3.0,
                ("columnar", "rss_mb"): 512.0, ("json", "wall_s"): 15.0,
                ("json", "rss_mb"): 1024.0},
    100_000: {("columnar", "wall_s"): 0.5, ("json", "wall_s"): 1.5},
}
_NAMES_21 = {("json", "paused_s"): "guest paused (snapshot -o X.json)",
             ("columnar", "wall_s"): "end to end, snapshot -o X.arrow",
             ("columnar", "rss_mb"): "peak RSS, snapshot -o X.arrow",
             ("json", "wall_s"): "end to end, snapshot -o X.json",
             ("json", "rss_mb"): "peak RSS, snapshot -o X.json",
             ("live", "wall_s"): "end to end, snapshot --mode live",
             ("vmcore", "wall_s"): "end to end, snapshot of the vmcore"}


def near_the_floor(n: int | None, figs: dict) -> None:
    """Issue 21's table: each figure, its target at this size, and its
    ratio to the floor of the same state (copy + decode, ``floor_walk``)."""
    fl = figs.get("floor")
    floor = fl["floor_s"] if fl and not fl.get("error") else None
    tg = TARGETS_21.get(n, {}) if n else {}
    rows = []
    for (key, attr), name in _NAMES_21.items():
        f = figs.get(key)
        if not f or f.get("error") or f.get(attr) is None:
            continue
        v, limit = f[attr], tg.get((key, attr))
        unit = " MB" if attr == "rss_mb" else " s"
        ratio = f"{v / floor:.1f}x" if floor and unit == " s" else "-"
        rows.append((name, fmt(v, unit), "-" if limit is None else f"<= {limit:g}{unit}",
                     "-" if limit is None else ("yes" if v <= limit else "NO"), ratio))
    # every view, drawn from the columnar file: < 2 s each at 1M
    for v, f in (figs.get("views") or {}).items():
        if f.get("error"):
            rows.append((f"view {v}", f["error"], "< 2 s" if n == 1_000_000 else "-", "NO"
                         if n == 1_000_000 else "-", "-"))
            continue
        t = f["view_s"]
        rows.append((f"view {v} (after a {f['load_s']:.2f} s load)", fmt(t, " s"),
                     "< 2 s" if n == 1_000_000 else "-",
                     ("yes" if t < 2 else "NO") if n == 1_000_000 else "-",
                     f"{t / floor:.1f}x" if floor else "-"))
    if not rows:
        return
    print(f"  near the floor (issue 21; floor = copy + decode = {fmt(floor, ' s')}):")
    _print_rows(rows, ("figure", "measured", "target", "met?", "x floor"))


def profile(args, out: Path) -> None:
    prof = [sys.executable, "-m", "cProfile", "-s", "cumtime", "-m", "ksmlens", "snapshot",
            *args, "-o", str(out)]
    r = run_child(prof)
    lines = r["stdout"].splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip().startswith("ncalls")), None)
    print(f"  cProfile (wall {r['wall_s']:.1f} s under the profiler), top 15 by cumtime:")
    if start is None:
        print("   ", last_line(r["stderr"]))
        return
    for l in lines[start:start + 16]:
        print("   ", l)


# ---------------------------------------------------------------- main

def measure(n, target_args, work: Path, *, vm=None, vmlinux=None, naive_limit=300.0,
            naive_est=None, do_profile=False, skip=()) -> dict:
    figs = {}
    label = n if n else "vmcore"
    if "json" not in skip:
        figs["json"] = snapshot_figure(target_args, work / f"{label}.json", vm)
        print(f"  json: {figs['json']}", flush=True)
    if "columnar" not in skip:
        figs["columnar"] = snapshot_figure(target_args, work / f"{label}.arrow", vm)
        if figs["columnar"].get("format") == "json" or (
                figs["columnar"].get("error") and "rror" not in figs["columnar"]["error"]
                and "stopped" not in figs["columnar"]["error"]):
            why = figs["columnar"].get("error") or "it wrote JSON to X.arrow"
            print(f"  columnar: not supported by this ksmlens ({why})", flush=True)
            figs.pop("columnar")
        else:
            print(f"  columnar: {figs['columnar']}", flush=True)
            if "cost" not in skip and (work / f"{label}.arrow").exists():
                figs["cost"] = cost_figure(work / f"{label}.arrow")
                print(f"  cost: {figs['cost']}", flush=True)
            if "views" not in skip and (work / f"{label}.arrow").exists():
                figs["views"] = views_figure(work / f"{label}.arrow")
                print(f"  views: {figs['views']}", flush=True)
    for f in work.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    if vm is not None and "live" not in skip:
        figs["live"] = snapshot_figure([*target_args, "--mode", "live"], work / f"{label}-l.arrow",
                                       vm)
        print(f"  live: {figs['live']}", flush=True)
    target = target_args[target_args.index("--target") + 1] if "--target" in target_args \
        else f"vm:{vm.name}"
    if "floor" not in skip:
        figs["floor"] = floor_figure(target, vmlinux, vm=vm)
        print(f"  floor: {figs['floor']}", flush=True)
    if "naive" in skip:
        pass
    elif n is None or n <= 100_000 or naive_est is None or naive_est < naive_limit:
        figs["naive"] = naive_figure(target, vmlinux, vm=vm,
                                     limit=None if n and n <= 100_000 else naive_limit)
        print(f"  naive: {figs['naive']}", flush=True)
    else:
        print(f"  naive: skipped (estimated {naive_est:.0f} s > {naive_limit:.0f} s)")
    if do_profile and "json" not in skip:
        profile(target_args, work / "prof.json")
    for f in work.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    return figs


def run_size(n, a, naive_rate) -> dict:
    from ksmlens.lab import bigstate
    from ksmlens.lab.vm import VM
    mem = bigstate.guest_memory_mb(n)
    name = f"bench-walk-{n}" + ("" if a.arch == "x86_64" else f"-{a.arch}")
    print(f"N={n}: booting {a.variant} ({a.arch}) with {mem} MB, 2 vCPUs", flush=True)
    t = time.monotonic()
    vm = VM.up(name, a.variant, memory=f"{mem}M", cpus=2, numa=1, arch=a.arch)
    prep = {"boot_s": time.monotonic() - t}
    handle = None
    try:
        print(f"  boot: {prep['boot_s']:.0f} s ({vm.state.get('accel')})", flush=True)
        handle, p = prepare_guest(vm, n)
        prep.update(p)
        vml = vm.state["vmlinux"]
        with tempfile.TemporaryDirectory(dir=KEEP_DIR, prefix="work-") as d:
            work = Path(d)
            est = n / naive_rate if naive_rate else None
            figs = measure(n, ["--name", name], work, vm=vm, vmlinux=vml,
                           naive_limit=a.naive_limit, naive_est=est,
                           do_profile=a.profile and n <= 200_000, skip=a.skip)
            core = KEEP_DIR / (f"walk-{n}-{a.variant}.vmcore" if a.arch == "x86_64"
                               else f"walk-{n}-{a.arch}-{a.variant}.vmcore")
            core.unlink(missing_ok=True)
            r = run_child(ksmlens_cmd("snapshot", "--name", name, "--vmcore", str(core)))
            figs["dump"] = {"wall_s": r["wall_s"]}
            import re
            m = re.search(r"guest paused ([0-9.]+) s", r["stderr"])
            figs["dump"]["paused_s"] = float(m.group(1)) if m else None
            if r["rc"]:
                print(f"  vmcore dump failed: {last_line(r['stderr'])}")
            elif "vmcore" in a.skip:
                print(f"  vmcore {core} written; its snapshot skipped (--skip)")
            else:
                figs["vmcore"] = snapshot_figure(["--target", str(core), "--vmlinux", vml],
                                                 work / f"{n}-core.arrow")
                print(f"  vmcore {core} ({core.stat().st_size / MB:.0f} MB): "
                      f"{figs['vmcore']}", flush=True)
    finally:
        if handle is not None:
            try:
                vm.kill(handle)
            except Exception:
                pass
        vm.down()
    figs["prep"] = prep
    figs["vmcore_path"] = str(core)
    figs["vmlinux"] = vml
    return figs


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000",
                    help="rmap_items per guest, comma separated (default 100000,1000000)")
    ap.add_argument("--variant", default="union", help="kernel variant (default union)")
    ap.add_argument("--arch", default="x86_64", choices=["x86_64", "arm64"],
                    help="the guest's architecture (default x86_64; arm64: the arm64 lab, "
                    "cross-built and under qemu-system-aarch64)")
    ap.add_argument("--vmcore", help="re-measure from this kept vmcore; no guest is booted")
    ap.add_argument("--vmlinux", help="the vmcore's vmlinux (with --vmcore)")
    ap.add_argument("--naive-limit", type=float, default=300.0,
                    help="above 100k, run the naive walk only if it ends within this many "
                         "seconds (default 300)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the json snapshot (sizes <= 200k)")
    ap.add_argument("--skip", default="", type=lambda s: set(filter(None, s.split(","))),
                    help="figures to leave out: json,columnar,cost,views,live,vmcore,naive,floor")
    ap.add_argument("--mem-cap", type=int, default=LIMITS["mem_cap_mb"], metavar="MB",
                    help="address-space cap of each measured process (default 10240): a "
                         "figure over it reads 'MemoryError at the cap'")
    ap.add_argument("--figure-limit", type=float, default=LIMITS["figure_s"], metavar="S",
                    help="stop a measured process after S seconds (default 900)")
    ap.add_argument("--naive-child", metavar="TARGET", help=argparse.SUPPRESS)
    ap.add_argument("--cost-child", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--floor-child", metavar="TARGET", help=argparse.SUPPRESS)
    ap.add_argument("--views-child", nargs=2, metavar=("FILE", "VIEW"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.naive_child:
        print(json.dumps(naive_walk(a.naive_child, a.vmlinux)))
        return
    if a.cost_child:
        print(json.dumps(cost_child(a.cost_child)))
        return
    if a.views_child:
        print(json.dumps(views_child(*a.views_child)))
        return
    if a.floor_child:
        print(json.dumps(floor_walk(a.floor_child, a.vmlinux)))
        return
    LIMITS.update(mem_cap_mb=a.mem_cap, figure_s=a.figure_limit)
    KEEP_DIR.mkdir(parents=True, exist_ok=True)
    if a.vmcore:
        if not a.vmlinux:
            ap.error("--vmcore needs --vmlinux")
        with tempfile.TemporaryDirectory(dir=KEEP_DIR, prefix="work-") as d:
            figs = measure(None, ["--target", a.vmcore, "--vmlinux", a.vmlinux], Path(d),
                           vmlinux=a.vmlinux, do_profile=a.profile, skip=a.skip)
        items = (figs.get("naive") or {}).get("items") or (figs.get("json") or {}).get("items")
        n = min(TARGETS, key=lambda k: abs(k - items)) if items else None
        if n and abs(n - items) > n * 0.05:
            n = None
        print(f"\n{a.vmcore}: {items and round(items)} rmap_items"
              + (f" (targets of {n})" if n else " (no targets for this size)"))
        if "json" in figs:
            figs["vmcore"] = figs.pop("json")
        figs["offline"] = True      # a vmcore: nothing is paused
        print_table(n, figs)
        return
    results, naive_rate = {}, None
    for n in [int(x) for x in a.sizes.split(",")]:
        figs = run_size(n, a, naive_rate)
        nv = figs.get("naive") or {}
        if nv.get("items") and nv.get("wall_s"):
            naive_rate = nv["items"] / nv["wall_s"]
        results[n] = figs
        print(f"\nN={n} ({n} rmap_items, {n // 2} stable nodes), variant {a.variant}, TCG")
        p = figs["prep"]
        print(f"  prep: boot {p['boot_s']:.0f} s, fill {p['fill_s']:.0f} s, "
              f"merge {p['merge_s']:.0f} s")
        print_table(n, figs)
        print(f"  vmcore kept: {figs['vmcore_path']} (vmlinux {figs['vmlinux']}, "
              f"variant {a.variant})\n", flush=True)


if __name__ == "__main__":
    main()
