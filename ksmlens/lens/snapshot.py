"""Walk a kernel's whole KSM state into a :class:`~ksmlens.lens.model.Snapshot`, fast.

The helpers in :mod:`ksmlens.lens.helpers` are the readable reference (one drgn
Object per step); this walk reads the same structures as raw bytes:
one ``prog.read()`` of a whole ``struct ksm_rmap_item`` per item, decoded
with offsets taken from the kernel's own DWARF (``offsetof``), one VMA pass
per mm instead of a lookup per item, and one task pass for all pids.

Modes: ``consistent`` pauses a lab VM over QMP for the walk (the pause time is
reported); ``live`` walks a running kernel and counts what raced with it
(freed or relinked objects, short lists) instead of crashing.
"""

from __future__ import annotations

import bisect
import random
import struct
import time

from drgn import FaultError, Object, Program, ProgramFlags, offsetof
from drgn.helpers.linux.mm import for_each_vma
from drgn.helpers.linux.pid import for_each_task

import numpy as np

import ksmlens.lab.kbuild as kbuild
import ksmlens.kernel.pgtable as pgtable
from ksmlens.errors import KsmlensError
from ksmlens.analysis.core import (kernel_walk_rule, pgoff_status, replay_walks, stored_status,
                       walk_candidates)
from ksmlens.lens.midupdate import on_cpu
from ksmlens.lens.model import KernelInfo, MmSlot, RmapItem, Snapshot, StableNode
from ksmlens.lens.helpers import (SEQNR_MASK, STABLE_FLAG, STABLE_NODE_CHAIN, UNSTABLE_FLAG,
                   PAGE_MAPPING_ANON, PAGE_MAPPING_FLAGS, PAGE_MAPPING_KSM, VM_MERGEABLE,
                   ksm_counters, ksm_settings, ksm_unstable_tree_seqnr)

__all__ = ["take_snapshot", "take_idle_snapshot", "MID_UNLINKED", "MID_HLIST_NOT_STABLE"]

_Q = struct.Struct("<Q")

# Half-done updates a paused walk can land in (the guest stops at any
# instruction, and ksmd can sleep in folio_lock() in the middle of them):
MID_UNLINKED = ("stable rmap_item not on any mm slot: get_next_rmap_item() or "
                "remove_trailing_rmap_items() unlinked it from its rmap_list and has "
                "not yet taken it off its stable node (remove_rmap_item_from_tree())")
MID_HLIST_NOT_STABLE = ("rmap_item on a stable node without STABLE_FLAG: "
                        "remove_node_from_stable_tree() is clearing the node's items")
_MAX_LIST = 50_000_000  # bound on any list walk: a cycle in a live walk is a race


def _hx(v: int | None) -> str | None:
    return None if not v else f"0x{v:x}"


class _Layout:
    def __init__(self, prog: Program):
        it = prog.type("struct ksm_rmap_item")
        self.item_size = it.size
        self.i_next = offsetof(it, "rmap_list")
        self.i_anon_vma = offsetof(it, "anon_vma")
        self.i_nid = offsetof(it, "nid") if it.has_member("nid") else None
        self.i_mm = offsetof(it, "mm")
        self.i_address = offsetof(it, "address")
        self.i_oldchecksum = offsetof(it, "oldchecksum")
        self.i_age = offsetof(it, "age")
        self.i_skips = offsetof(it, "remaining_skips")
        self.i_pgoff = offsetof(it, "pgoff") if it.has_member("pgoff") else None
        self.i_head = offsetof(it, "head")
        self.i_hlist = offsetof(it, "hlist")
        sn = prog.type("struct ksm_stable_node")
        self.node_size = sn.size
        self.n_rb = offsetof(sn, "node")
        rb = prog.type("struct rb_node")
        self.rb_right = offsetof(rb, "rb_right")
        self.rb_left = offsetof(rb, "rb_left")
        self.n_head = offsetof(sn, "head")
        self.n_hlist_dup = offsetof(sn, "hlist_dup")
        self.n_list = offsetof(sn, "list")
        self.n_hlist = offsetof(sn, "hlist")
        self.n_kpfn = offsetof(sn, "kpfn")
        self.n_len = offsetof(sn, "rmap_hlist_len")
        self.n_nid = offsetof(sn, "nid") if sn.has_member("nid") else None
        ms = prog.type("struct ksm_mm_slot")
        self.slot_size = ms.size
        self.s_mm_node = offsetof(ms, "slot.mm_node")
        self.s_mm = offsetof(ms, "slot.mm")
        self.s_rmap_list = offsetof(ms, "rmap_list")
        pg = prog.type("struct page")
        self.page_size_struct = pg.size
        self.p_mapping = offsetof(pg, "mapping")
        self.p_mapcount = offsetof(pg, "_mapcount")
        self.p_compound_head = offsetof(pg, "compound_head")


class _Walker:
    def __init__(self, prog: Program, live: bool):
        self.prog = prog
        self.live = live
        self.L = _Layout(prog)
        self.shift = prog["PAGE_SHIFT"].value_()
        self.races: dict[str, int] = {}
        self.reads = 0
        self.pages: dict[int, bytes] = {}   # slab pages of rmap_items, read once

    def race(self, what: str):
        """A live walk raced with the kernel; a paused one saw an update half
        done (classified by :func:`take_snapshot`). Counted by kind."""
        self.races[what] = self.races.get(what, 0) + 1

    def page_flags(self, vmemmap: int, pfn: int) -> tuple[bool, bool] | None:
        """``(folio_test_anon(), PageKsm())`` of the page at ``pfn`` (its
        folio's ``mapping`` low bits), or None if unreadable."""
        L = self.L
        addr = vmemmap + pfn * L.page_size_struct
        b, off = self._cached(addr, L.page_size_struct)
        if b is None:
            return None
        head = _Q.unpack_from(b, off + L.p_compound_head)[0]
        if head & 1:                               # a tail page: the folio's head
            b, off = self._cached(head - 1, L.page_size_struct)
            if b is None:
                return None
        mapping = _Q.unpack_from(b, off + L.p_mapping)[0]
        return (bool(mapping & PAGE_MAPPING_ANON),
                (mapping & PAGE_MAPPING_FLAGS) == PAGE_MAPPING_KSM)

    def _cached(self, addr: int, size: int):
        """(buffer, offset) of ``size`` bytes at ``addr`` through a cache of
        whole 4 KiB pages (slab pages of rmap_items, vmemmap pages of struct
        page); an object straddling two pages is read alone."""
        page = addr & ~0xFFF
        off = addr - page
        if off + size > 0x1000:
            return self.read(addr, size), 0
        buf = self.pages.get(page)
        if buf is None:
            buf = self.read(page, 0x1000)
            if buf is None:
                return None, 0
            self.pages[page] = buf
        return buf, off

    def read(self, addr: int, size: int) -> bytes | None:
        self.reads += 1
        try:
            return self.prog.read(addr, size)
        except FaultError:
            self.race("fault reading kernel memory")
            return None

    def item_bytes(self, addr: int):
        """(buffer, offset) holding the ksm_rmap_item at ``addr``: items come
        from a slab cache, so one read of the whole 4 KiB page serves about
        64 items (the walk's main cost was one read per item)."""
        return self._cached(addr, self.L.item_size)

    def ptr(self, addr: int) -> int | None:
        b = self.read(addr, 8)
        return None if b is None else _Q.unpack(b)[0]

    # ---------------------------------------------------------------- tasks, vmas
    def mm_owners(self) -> dict[int, list[tuple[int, str]]]:
        """mm -> [(tgid, comm)] of every process using it, lowest tgid first:
        a clone(CLONE_VM) child that is not a thread (or a vfork child before
        exec) shares its owner's mm, and /proc/PID/ksm_stat of either shows it."""
        owners: dict[int, dict[int, str]] = {}
        for task in for_each_task(self.prog):
            try:
                mm = task.mm.value_()
                if not mm:
                    continue
                tgid = task.tgid.value_()
                procs = owners.setdefault(mm, {})
                if tgid not in procs:
                    procs[tgid] = task.comm.string_().decode(errors="replace")
            except FaultError:
                self.race("task freed during walk")
        return {mm: sorted(p.items()) for mm, p in owners.items()}

    def vmas(self, mm: int) -> list[tuple]:
        out = []
        mmobj = Object(self.prog, "struct mm_struct *", mm)
        try:
            for vma in for_each_vma(mmobj):
                out.append((vma.vm_start.value_(), vma.vm_end.value_(),
                            vma.vm_pgoff.value_(), vma.anon_vma.value_(),
                            bool(vma.vm_file.value_()), vma.vm_flags.value_()))
        except FaultError:
            self.race("VMA tree changed during walk")
        out.sort()
        return out

    # ---------------------------------------------------------------- stable tree
    def rb_inorder(self, root_node: int):
        """In-order addresses of rb_nodes under ``root_node`` (raw reads)."""
        L = self.L
        stack, node, n = [], root_node, 0
        while stack or node:
            while node:
                stack.append(node)
                node = self.ptr(node + L.rb_left) or 0
                n += 1
                if n > _MAX_LIST:
                    self.race("rbtree walk did not end")
                    return
            node = stack.pop()
            yield node
            node = self.ptr(node + L.rb_right) or 0

    def hlist(self, first: int, member_off: int):
        """Container addresses along an hlist starting at ``first``."""
        n, pos = 0, first
        while pos:
            yield pos - member_off
            pos = self.ptr(pos) or 0  # hlist_node.next at offset 0
            n += 1
            if n > _MAX_LIST:
                self.race("hlist walk did not end")
                return

    def read_node(self, addr: int) -> dict | None:
        L = self.L
        b = self.read(addr, L.node_size)
        if b is None:
            return None
        return {
            "addr": addr,
            "head": _Q.unpack_from(b, L.n_head)[0],
            "first": _Q.unpack_from(b, L.n_hlist)[0],
            "kpfn": _Q.unpack_from(b, L.n_kpfn)[0],
            "len": struct.unpack_from("<i", b, L.n_len)[0],
            "nid": struct.unpack_from("<i", b, L.n_nid)[0] if L.n_nid is not None else 0,
        }


def _item_struct(L: _Layout):
    """One struct.Struct for the words of ``struct ksm_rmap_item`` the walk
    needs, laid out from DWARF offsets: rmap_list, anon_vma/nid, mm, address,
    the 8-byte {oldchecksum, age, remaining_skips} / pgoff union, head,
    hlist.next."""
    fields = [L.i_next, L.i_anon_vma, L.i_mm, L.i_address, L.i_oldchecksum, L.i_head,
              L.i_hlist]
    if sorted(fields) != fields or any(b - a < 8 for a, b in zip(fields, fields[1:])):
        raise KsmlensError("struct ksm_rmap_item has an unexpected layout",
                           "this kernel's ksm.c differs from what ksmlens knows")
    if not (0 < L.i_age - L.i_oldchecksum < 8 and 0 < L.i_skips - L.i_oldchecksum < 8):
        raise KsmlensError("ksm_rmap_item age/remaining_skips are not next to oldchecksum",
                           "this kernel's ksm.c differs from what ksmlens knows")
    if L.i_pgoff is not None and L.i_pgoff != L.i_oldchecksum:
        raise KsmlensError("ksm_rmap_item pgoff does not share oldchecksum's bytes",
                           "this kernel's pgoff patch differs from what ksmlens knows")
    fmt, pos = "<", 0
    for off in fields:
        fmt += "x" * (off - pos) + "Q"
        pos = off + 8
    return (struct.Struct(fmt), L.i_nid is not None, L.i_pgoff is not None,
            (L.i_age - L.i_oldchecksum) * 8, (L.i_skips - L.i_oldchecksum) * 8)


def _page_info(w: _Walker, vmemmap: int, pfn: int):
    L = w.L
    b = w.read(vmemmap + pfn * L.page_size_struct, L.page_size_struct)
    if b is None:
        return None, None, None
    mapping = _Q.unpack_from(b, L.p_mapping)[0]
    mapcount = struct.unpack_from("<i", b, L.p_mapcount)[0] + 1
    is_ksm = (mapping & PAGE_MAPPING_FLAGS) == PAGE_MAPPING_KSM
    return mapcount, is_ksm, (mapping & ~PAGE_MAPPING_FLAGS) if is_ksm else None


def take_snapshot(prog: Program, *, mode: str = "consistent", vm=None,
                  pages: bool = True, retries: int = 8) -> Snapshot:
    """Walk the KSM state of ``prog`` into a :class:`Snapshot`.

    ``mode="consistent"`` pauses ``vm`` (a :class:`ksmlens.lab.vm.VM`, taken from
    :func:`ksmlens.lab.attach.attach` when not given) over QMP during the walk;
    for a vmcore nothing moves and no VM is needed. ``mode="live"`` never
    pauses and counts races in ``meta["races"]``.

    A pause stops the guest at any instruction, so a paused walk can land in
    an update ksmd (or an exiting task) has half done: an rmap_item already
    off its mm's list but still on its stable node, a node whose items lose
    STABLE_FLAG one by one (:data:`MID_UNLINKED`, :data:`MID_HLIST_NOT_STABLE`).
    Such a walk is classified (``meta["mid_update_seen"]``: what, and who was
    busy in mm/ksm.c or on a CPU) and retried up to ``retries`` times; if
    every try lands in one, the last snapshot carries ``meta["mid_update"]``
    and callers must not compare its counts. Only an inconsistency while no
    task could be updating KSM raises :class:`KsmlensError`.
    """
    if mode not in ("consistent", "live"):
        raise KsmlensError(f"unknown snapshot mode {mode!r}", "use consistent or live")
    vm = vm or prog.cache.get("ksmlens_vm")
    is_live_target = bool(prog.flags & ProgramFlags.IS_LIVE)
    pause = mode == "consistent" and is_live_target
    if pause and vm is None:
        raise KsmlensError("a consistent walk of a live kernel needs a lab VM to pause",
                           "use mode='live', or attach to a lab VM / a vmcore")
    t_start = time.monotonic()
    q = vm.qmp(timeout=30) if pause else None
    seen = []
    paused_total = 0.0
    try:
        for attempt in range(1, max(1, retries) + 1):
            if q is not None:
                q.stop()
            t_paused = time.monotonic()
            busy = None
            try:
                snap = _walk(prog, live=(mode == "live" and is_live_target), pages=pages)
                if pause:       # who runs on each CPU in this pause (ksmlens.lens.midupdate)
                    snap.meta["on_cpu"] = on_cpu(prog)
                if mode == "consistent" and snap.meta["races"]:
                    busy = _ksm_busy(prog, snap.meta.get("ksmd"))
            finally:
                if q is not None:
                    q.cont()
            t_end = time.monotonic()
            paused_total += t_end - t_paused
            if mode == "live" or not snap.meta["races"]:
                break
            what = dict(snap.meta["races"])
            if not busy:
                raise KsmlensError(
                    "inconsistent KSM state in a paused guest where no task was in mm/ksm.c "
                    f"or on a CPU: {'; '.join(what)}",
                    "report this with the snapshot's kernel release: the walk or the kernel "
                    "is wrong")
            seen.append({"attempt": attempt, "what": what, "busy": busy})
            if attempt < retries:
                time.sleep(random.uniform(0.002, 0.03))
    finally:
        if q is not None:
            q.close()
    if mode == "consistent":
        snap.meta["mid_update_seen"] = seen
        if snap.meta["races"]:
            snap.meta["mid_update"] = seen[-1]
            snap.meta["races"] = {}
    # The replay itself is pure computation on what the walk recorded (trees,
    # PTEs): done after the guest runs again.
    replay_walks(snap, snap.__dict__.pop("_mapped"), stock=snap.__dict__.pop("_stock_candidates"))
    snap.meta["replay_seconds"] = round(time.monotonic() - t_end, 4)
    orphans = [n for n in snap.stable_nodes if n.unreachable]
    if orphans and pages:
        # No rmap_item leads to some mappings of these pages: find them in
        # the page tables of every process (a second, short pause).
        q = vm.qmp(timeout=30) if pause else None
        try:
            if q is not None:
                q.stop()
            _find_orphan_mappings(prog, orphans)
        finally:
            if q is not None:
                q.cont()
                q.close()
    snap.meta.update({
        "mode": mode if is_live_target else "static",
        "paused_seconds": round(paused_total, 4) if pause else 0.0,
        "walk_seconds": round(t_end - t_paused, 4),
        "total_seconds": round(t_end - t_start, 4),
        "attempts": attempt,
        "taken_at": time.time(),
    })
    if snap.rmap_items:
        snap.meta["items_per_second"] = round(len(snap.rmap_items) /
                                              max(snap.meta["walk_seconds"], 1e-9))
    return snap


def _ksm_busy(prog: Program, ksmd: dict | None) -> list[str]:
    """Who could be in the middle of a KSM update while the guest is
    paused: ksmd inside a scan, any task whose stack is in mm/ksm.c, and
    any task running on a CPU (drgn cannot unwind those). Empty when
    nobody could be."""
    out = []
    if ksmd and not ksmd.get("idle"):
        out.append(f"ksmd (pid {ksmd.get('pid')}) "
                   + ("in its scan" if ksmd.get("in_scan") else "running"))
    for task in for_each_task(prog):
        try:
            comm = task.comm.string_().decode(errors="replace")
            pid = task.pid.value_()
            if comm == "ksmd":
                continue
            try:
                trace = prog.stack_trace(task)
            except ValueError:
                out.append(f"pid {pid} ({comm}) on a CPU")
                continue
            for frame in trace:
                try:
                    src = frame.source()[0]
                except LookupError:
                    continue
                if src.endswith("mm/ksm.c"):
                    out.append(f"pid {pid} ({comm}) in {frame.name}()")
                    break
        except FaultError:
            continue
    return out


def take_idle_snapshot(prog: Program, vm=None, tries: int = 40) -> Snapshot:
    """A consistent snapshot taken while ksmd sleeps between batches, so the
    scan cursor and every rmap_item's SmartScan bytes are at rest (paused
    in the middle of a batch, an item can be half processed). Retries the
    pause up to ``tries`` times."""
    for _ in range(tries):
        snap = take_snapshot(prog, vm=vm)
        if (snap.meta.get("ksmd") or {}).get("idle"):
            return snap
        time.sleep(0.05)
    raise KsmlensError(f"ksmd was busy in {tries} paused snapshots in a row",
                       "lower pages_to_scan or raise sleep_millisecs in the guest")


def _walk(prog: Program, *, live: bool, pages: bool) -> Snapshot:
    w = _Walker(prog, live)
    L = w.L
    shift = w.shift
    page_mask = ~((1 << shift) - 1)
    release = prog["UTS_RELEASE"].string_().decode()
    kernel = KernelInfo(release=release, variant=kbuild.variant_of_release(release),
                        has_stored_pgoff=L.i_pgoff is not None,
                        nr_node_ids=prog["ksm_nr_node_ids"].value_(), page_shift=shift,
                        rmap_item_size=L.item_size)
    kernel.walk_rule = kernel_walk_rule(kernel.variant, kernel.has_stored_pgoff)
    counters = ksm_counters(prog)
    counters.update(ksm_settings(prog))
    scan_obj = prog["ksm_scan"]
    seqnr = scan_obj.seqnr.value_()
    scan = {"mm_slot": _hx(scan_obj.mm_slot.value_()), "address": scan_obj.address.value_(),
            "seqnr": seqnr, "rmap_list": _hx(scan_obj.rmap_list.value_()),
            # ksm_scan.mm_slot == &ksm_mm_head: the next visit starts a new pass
            "at_pass_start": scan_obj.mm_slot.value_() == prog["ksm_mm_head"].address_}
    owners = w.mm_owners()

    # ---- mm slots and their rmap_items
    item_struct, has_nid, has_pgoff, age_shift, skips_shift = _item_struct(L)
    bisect_right = bisect.bisect_right
    hex_cache: dict[int, str] = {}
    page_cache = w.pages
    item_size = L.item_size

    def node_hex(v: int) -> str:
        h = hex_cache.get(v)
        if h is None:
            h = hex_cache[v] = _hx(v)
        return h

    head = prog["ksm_mm_head"].address_ + L.s_mm_node
    items: dict[int, RmapItem] = {}
    hnext: dict[int, int] = {}   # item -> its hlist.next (stable items)
    slots: list[MmSlot] = []
    pt = pgtable.PageTables.of(prog, w.read) if pages else None
    zero_pfn = prog["zero_pfn"].value_() if pages else None
    vmemmap = None
    if pages:
        from drgn.helpers.linux.mm import pfn_to_page
        vmemmap = pfn_to_page(prog, 0).value_()
    mapped_pfns: list = []       # every pfn mapped in the mergeable VMAs, all mms
    sel = ksm_unstable_tree_seqnr(prog)   # between passes: the previous pass's
    pos, n = w.ptr(head), 0
    while pos and pos != head:
        slot_addr = pos - L.s_mm_node
        b = w.read(slot_addr, L.slot_size)
        if b is None:
            break
        mm = _Q.unpack_from(b, L.s_mm)[0]
        first = _Q.unpack_from(b, L.s_rmap_list)[0]
        procs = owners.get(mm, [])
        pid, comm = procs[0] if procs else (None, None)
        mmo = Object(prog, "struct mm_struct *", mm)
        try:
            mm_items = mmo.ksm_rmap_items.value_()
            mm_merging = mmo.ksm_merging_pages.value_()
            mm_zero = mmo.ksm_zero_pages.counter.value_() if pages else None
            mm_users = mmo.mm_users.counter.value_()
            pgd = mmo.pgd.value_()
        except FaultError:
            w.race("mm freed during walk")
            mm_items = mm_merging = -1
            mm_zero, mm_users, pgd = None, None, 0
        # ksm_test_exit(): an exited mm's VMA tree and page tables are gone
        alive = bool(mm_users)
        vmas = w.vmas(mm) if mm and alive else []
        starts = [v[0] for v in vmas]
        slot = MmSlot(id=_hx(slot_addr), mm=_hx(mm), pid=pid, comm=comm, rmap_items=0,
                      mm_ksm_rmap_items=mm_items, mm_ksm_merging_pages=mm_merging,
                      pids=[p for p, _ in procs], mm_users=mm_users,
                      mm_ksm_zero_pages=mm_zero)
        slot_items = slot.items
        mm_objs: list[RmapItem] = []
        ip, count = first, 0
        mm_hex = _hx(mm)
        vma_hex = {}
        while ip:
            off = ip & 0xFFF
            ib = page_cache.get(ip - off)
            if ib is None or off + item_size > 0x1000:
                ib, off = w.item_bytes(ip)
                if ib is None:
                    break
            (nxt, anon_or_nid, _mm, addr_raw, raw_union, head_ptr,
             hnext_ptr) = item_struct.unpack_from(ib, off)
            address = addr_raw & page_mask
            if addr_raw & STABLE_FLAG:
                state, stable, unstable = "stable", True, False
            elif addr_raw & UNSTABLE_FLAG:
                state, stable, unstable = "unstable", False, True
            else:
                state, stable, unstable = "none", False, False
            vi = bisect_right(starts, address) - 1
            iid = f"0x{ip:x}"
            if vi >= 0 and address < vmas[vi][1]:
                vs, ve, vpg, van, vfile, vflags = vmas[vi]
                vah = vma_hex.get(van)
                if vah is None:
                    vah = vma_hex[van] = _hx(van)
                lpi = ((address - vs) >> shift) + vpg
            else:
                vs = ve = vpg = vah = vfile = vflags = lpi = None
            item = RmapItem(
                iid, mm_hex, pid, comm, address, addr_raw & ~page_mask, state,
                addr_raw & SEQNR_MASK, unstable and (addr_raw & SEQNR_MASK) == sel,
                node_hex(head_ptr) if stable else None,
                node_hex(anon_or_nid) if stable else None,
                (anon_or_nid & 0xFFFFFFFF) if unstable and has_nid else None,
                vs, ve, vpg, vah, vfile, address >> shift, lpi,
                raw_union if has_pgoff and stable else None,
                raw_union & 0xFFFFFFFF, (raw_union >> age_shift) & 0xFF,
                (raw_union >> skips_shift) & 0xFF, raw_union, vflags)
            item.pgoff_status, item.pgoff_cause = pgoff_status(item, has_pgoff, shift)
            item.stored_status = stored_status(item, has_pgoff)
            items[ip] = item
            mm_objs.append(item)
            if stable:
                hnext[ip] = hnext_ptr
            slot_items.append(iid)
            count += 1
            if count > _MAX_LIST:
                w.race("rmap_list did not end")
                break
            ip = nxt
        slot.rmap_items = count
        if pt is not None:
            if alive and pgd:
                pfns = _read_ptes(w, pt, pgd, vmas, mm_objs, slot, zero_pfn, vmemmap, shift)
                mapped_pfns.append(pfns)
            else:
                # exit_mmap() zapped the page tables (each KSM zero page
                # decremented the counters as it went): nothing is mapped
                slot.ksm_zero_pages = 0
                for it in mm_objs:
                    it.will_visit, it.not_visited = False, "mm_exited"
        slots.append(slot)
        pos = _Q.unpack_from(b, L.s_mm_node)[0]
        n += 1
        if n > _MAX_LIST:
            w.race("mm slot list did not end")
            break

    # ---- stable tree: chains, dups, regular nodes; migrate_nodes
    nodes: list[StableNode] = []

    def items_of(first: int) -> list[str]:
        out, p, k = [], first, 0
        while p:
            ia = p - L.i_hlist
            out.append(_hx(ia))
            p = hnext.get(ia)
            if p is None:  # not a STABLE item met on the mm lists: read it directly
                w.race(MID_HLIST_NOT_STABLE if ia in items else MID_UNLINKED)
                p = w.ptr(ia + L.i_hlist) or 0
            k += 1
            if k > _MAX_LIST:
                w.race("stable node hlist did not end")
                break
        return out

    def add_page_node(nd: dict, kind: str, chain: str | None, migrate=False) -> StableNode:
        sn = StableNode(id=_hx(nd["addr"]), kind=kind, chain=chain, kpfn=nd["kpfn"],
                        nid=nd["nid"], rmap_hlist_len=nd["len"], items=items_of(nd["first"]),
                        migrate_list=migrate)
        if vmemmap is not None:
            sn.mapcount, sn.page_is_ksm, back = _page_info(w, vmemmap, nd["kpfn"])
            sn.page_stable_node = _hx(back)
        nodes.append(sn)
        return sn

    roots = prog["root_stable_tree"]
    for nid in range(kernel.nr_node_ids):
        rb_root = (roots + nid).rb_node.value_()
        for rbn in w.rb_inorder(rb_root):
            nd = w.read_node(rbn - L.n_rb)
            if nd is None:
                continue
            if nd["len"] == STABLE_NODE_CHAIN:
                # a chain head's nid is never set (alloc_stable_node_chain()
                # leaves it uninitialised): its tree root says which node
                chain = StableNode(id=_hx(nd["addr"]), kind="chain", chain=None, kpfn=None,
                                   nid=nid, rmap_hlist_len=nd["len"])
                nodes.append(chain)
                for dup_addr in w.hlist(nd["first"], L.n_hlist_dup):
                    dn = w.read_node(dup_addr)
                    if dn is None:
                        continue
                    add_page_node(dn, "dup", chain.id)
                    chain.dups.append(_hx(dup_addr))
                chain.items = list(chain.dups)
            else:
                add_page_node(nd, "regular", None)
    mhead = prog["migrate_nodes"].address_
    p, k = w.ptr(mhead), 0
    while p and p != mhead:
        nd = w.read_node(p - L.n_list)
        if nd is None:
            break
        add_page_node(nd, "regular", None, migrate=True)
        p = w.ptr(p)
        k += 1
        if k > _MAX_LIST:
            w.race("migrate_nodes did not end")
            break

    snap = Snapshot(kernel=kernel, counters=counters, stable_nodes=nodes,
                    rmap_items=list(items.values()), mm_slots=slots, scan=scan)
    # ---- anon_vma trees of the stable items, and the rmap walk replayed on them
    t = time.monotonic()
    snap.anon_vmas = _record_anon_vmas(w, {i.anon_vma for i in snap.rmap_items
                                           if i.state == "stable" and i.anon_vma})
    snap._stock_candidates = {}
    snap._mapped = _mapped(w, pt, snap, snap._stock_candidates) if pt is not None else {}
    if pt is not None:
        counts = _pfn_counts(mapped_pfns)
        for node in nodes:
            if node.kpfn is not None and node.kind != "chain":
                node.ptes = counts.get(node.kpfn, 0)
    snap.meta["pte_seconds"] = round(time.monotonic() - t, 4)
    snap.meta["ksmd"] = _ksmd_state(prog)
    snap.meta["races"] = dict(w.races)
    snap.meta["reads"] = w.reads
    return snap


def _record_anon_vmas(w: _Walker, anon_vmas: set) -> dict:
    """Each anon_vma's interval tree (``anon_vma->rb_root``) as plain
    records: per ``struct anon_vma_chain``, its rb links, the augmented
    ``rb_subtree_last`` and its VMA's range, pgoff and mm."""
    prog = w.prog
    out = {}
    for av in sorted(anon_vmas):
        try:
            avo = Object(prog, "struct anon_vma *", int(av, 16))
            rbroot = avo.rb_root
            root = rbroot.rb_root.rb_node.value_()
            leftmost = rbroot.rb_leftmost.value_()
            rb_off = offsetof(prog.type("struct anon_vma_chain"), "rb")
            nodes = {}
            stack = [root] if root else []
            while stack:
                rb = stack.pop()
                a = rb - rb_off
                avc = Object(prog, "struct anon_vma_chain *", a)
                vma = avc.vma
                left, right = avc.rb.rb_left.value_(), avc.rb.rb_right.value_()
                parent = avc.rb.__rb_parent_color.value_() & ~3
                nodes[_hx(a)] = {
                    "vma": _hx(vma.value_()), "mm": _hx(vma.vm_mm.value_()),
                    "vm_start": vma.vm_start.value_(), "vm_end": vma.vm_end.value_(),
                    "vm_pgoff": vma.vm_pgoff.value_(),
                    "left": _hx(left - rb_off) if left else None,
                    "right": _hx(right - rb_off) if right else None,
                    "parent": _hx(parent - rb_off) if parent else None,
                    "subtree_last": avc.rb_subtree_last.value_()}
                stack += [x for x in (right, left) if x]
                if len(nodes) > _MAX_LIST:
                    w.race("anon_vma tree walk did not end")
                    break
            out[av] = {"root": _hx(root - rb_off) if root else None,
                       "leftmost": _hx(leftmost - rb_off) if leftmost else None,
                       "nodes": nodes}
        except FaultError:
            w.race("anon_vma freed during walk")
    return out


_NOT_VISITED_PTE = {pgtable.KIND_NONE: "no_page", pgtable.KIND_SWAP: "swapped"}


def _read_ptes(w: _Walker, pt, pgd: int, vmas: list, items: list, slot: MmSlot,
               zero_pfn: int, vmemmap: int, shift: int) -> np.ndarray:
    """Read the page tables of one live mm's VM_MERGEABLE VMAs: set each
    rmap_item's ``pte``, ``pfn``, ``page_ksm``, ``will_visit`` and
    ``not_visited``, and the slot's KSM zero pages. Returns the pfns mapped
    there (present or PROT_NONE), for the mapcount check.

    Follows ``scan_get_next_rmap_item()``: only VM_MERGEABLE VMAs with an
    anon_vma are scanned, and ``ksm_next_page_pmd_entry()`` stops only at a
    present PTE (or PMD leaf) whose ``vm_normal_page()`` is an anonymous,
    non-device page; an rmap_item anywhere else is freed unread by
    ``get_next_rmap_item()`` / ``remove_trailing_rmap_items()``. KSM zero
    pages (include/linux/ksm.h ``is_ksm_zero_pte()``): the zero pfn, dirty.
    """
    mergeable = [v for v in vmas if v[5] & VM_MERGEABLE]
    parts = [pt.leaves(pgd, v[0], v[1]) for v in mergeable]
    if parts:
        leaves = tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
    else:
        e = np.zeros(0, dtype=np.uint64)
        leaves = (e, e, np.zeros(0, dtype=np.uint8))
    la, le, ls = leaves
    # KSM zero pages: 4 KiB present (or PROT_NONE) entries of the zero pfn, dirty
    small = ls == pgtable.PAGE_SHIFT
    kinds, pfns, ents = pgtable.decode(leaves, la[small])
    is_page = (kinds == pgtable.KIND_PRESENT) | (kinds == pgtable.KIND_PROT_NONE)
    zero = is_page & (pfns == np.uint64(zero_pfn))
    dirty = (ents & np.uint64(pgtable._PAGE_DIRTY | pgtable._PAGE_SAVED_DIRTY)) != 0
    kz = zero & dirty
    slot.zero_pages = [int(a) for a in la[small][kz]]
    slot.ksm_zero_pages = len(slot.zero_pages)
    mapped = pfns[is_page & ~zero]
    if not items:
        return mapped
    q = np.fromiter((it.address for it in items), dtype=np.uint64, count=len(items))
    ik, ip, ie = pgtable.decode(leaves, q)
    flags_of: dict[int, tuple | None] = {}
    for it, k, pfn, e in zip(items, ik.tolist(), ip.tolist(), ie.tolist()):
        if it.vma_start is None:
            it.pte = "unread"
            it.will_visit, it.not_visited = False, "no_vma"
            continue
        if not it.vm_flags & VM_MERGEABLE:
            it.pte = "unread"
            it.will_visit, it.not_visited = False, "not_mergeable"
            continue
        it.pte = pgtable.KIND_NAMES[k]
        if k in (pgtable.KIND_PRESENT, pgtable.KIND_PROT_NONE):
            it.pfn = pfn
            if pfn == zero_pfn:
                it.pte = "ksm_zero" if pgtable.pte_dirty(e) else "zero"
            else:
                f = flags_of.get(pfn, False)
                if f is False:
                    f = flags_of[pfn] = w.page_flags(vmemmap, pfn)
                if f is not None:
                    it.page_ksm = f[1]
        if it.vma_anon_vma is None:
            it.will_visit, it.not_visited = False, "no_anon_vma"
        elif k in _NOT_VISITED_PTE:
            it.will_visit, it.not_visited = False, _NOT_VISITED_PTE[k]
        elif it.pte in ("zero", "ksm_zero"):
            it.will_visit, it.not_visited = False, "zero_page"
        elif pgtable.pte_special(e):
            it.will_visit, it.not_visited = False, "special"
        elif it.page_ksm is None or not flags_of.get(pfn, (False,))[0]:
            it.will_visit, it.not_visited = False, "not_anon"
        else:
            it.will_visit = True
    return mapped


def _find_orphan_mappings(prog: Program, nodes: list[StableNode]) -> None:
    """Fill ``orphan_mappings`` of ``nodes``: every (process, address)
    whose PTE maps one of their KSM pages, from the page tables of every
    live mm's anonymous VMAs (VMAs with an anon_vma)."""
    w = _Walker(prog, live=False)
    pt = pgtable.PageTables.of(prog, w.read)
    by_pfn = {n.kpfn: n for n in nodes}
    want = np.array(sorted(by_pfn), dtype=np.uint64)
    for mm, procs in w.mm_owners().items():
        try:
            mmo = Object(prog, "struct mm_struct *", mm)
            if not mmo.mm_users.counter.value_():
                continue
            pgd = mmo.pgd.value_()
        except FaultError:
            continue
        for vs, ve, _pg, anon, _f, _fl in w.vmas(mm):
            if not anon:
                continue
            leaves = pt.leaves(pgd, vs, ve)
            la = leaves[0][leaves[2] == pgtable.PAGE_SHIFT]
            kinds, pfns, _ = pgtable.decode(leaves, la)
            hit = np.isin(pfns, want) & ((kinds == pgtable.KIND_PRESENT)
                                         | (kinds == pgtable.KIND_PROT_NONE))
            for a, pfn in zip(la[hit].tolist(), pfns[hit].tolist()):
                pid, comm = procs[0]
                by_pfn[pfn].orphan_mappings.append(
                    {"pid": pid, "comm": comm, "mm": _hx(mm), "address": a})
    for n in nodes:
        known = {(m["mm"], m["address"]) for m in n.mappings if m["mapped"]}
        n.orphan_mappings = [m for m in n.orphan_mappings
                             if (m["mm"], m["address"]) not in known]


def _pfn_counts(parts: list) -> dict[int, int]:
    if not parts:
        return {}
    u, c = np.unique(np.concatenate(parts), return_counts=True)
    return dict(zip(u.tolist(), c.tolist()))


def _mapped(w: _Walker, pt, snap: Snapshot, stock: dict) -> dict:
    """For every (stable node, mm, address) the stock walk visits: does a
    PTE of mm map the node's page there (``pte_present()``: PROT_NONE
    mappings count)?"""
    pgds: dict[str, int] = {}
    out = {}
    cache: dict = {}
    for node in snap.stable_nodes:
        if node.kind == "chain" or node.kpfn is None:
            continue
        try:
            cands = stock[node.id] = walk_candidates(snap, node, "stock", cache)
        except KsmlensError:
            w.race("stable rmap_item's anon_vma not recorded")
            continue
        for c in cands:
            pgd = pgds.get(c["mm"])
            if pgd is None:
                try:
                    mmo = Object(w.prog, "struct mm_struct *", int(c["mm"], 16))
                    pgd = mmo.pgd.value_() if mmo.mm_users.counter.value_() else 0
                except FaultError:
                    pgd = 0
                pgds[c["mm"]] = pgd
            out[(node.id, c["mm"], c["address"])] = bool(pgd) and \
                pt.lookup(pgd, c["address"])[1] == node.kpfn
    return out


def _ksmd_state(prog: Program) -> dict | None:
    """ksmd's task state: idle between batches (the scan cursor is at a
    batch boundary) or in the middle of one."""
    for task in for_each_task(prog):
        try:
            if task.comm.string_() != b"ksmd":
                continue
            state = task.__state.value_()
            frames = None
            try:
                frames = [f.name for f in prog.stack_trace(task) if f.name]
            except (ValueError, FaultError, LookupError):
                pass
            in_scan = None if frames is None else any(
                n in ("ksm_do_scan", "scan_get_next_rmap_item", "cmp_and_merge_page")
                for n in frames)
            return {"pid": task.pid.value_(), "state": state, "in_scan": in_scan,
                    "idle": state != 0 and in_scan is False}
        except FaultError:
            return None
    return None
