"""Walk a kernel's whole KSM state into a columnar :class:`~ksmlens.lens.model.Snapshot`.

The helpers in :mod:`ksmlens.lens.helpers` are the readable reference (one
drgn Object per step); this walk reads the same structures as raw bytes
and decodes them in bulk (:mod:`ksmlens.lens.layout`): it follows each mm
slot's ``rmap_list`` and the stable tree pointer by pointer through a
cache of slab pages, then decodes every ``struct ksm_rmap_item``,
``struct ksm_stable_node`` and ``struct page`` it met with one numpy
gather each. Nothing on the way creates a Python object per rmap_item.

Parts, each returning values: :func:`walk_paused` (everything that must
see one instant, run while the guest is paused: a
:class:`~ksmlens.lens.raw.Raw` of arrays), :func:`~ksmlens.lens.tables.finish`
(pure computation on it: the tables, with the rmap walk replayed by
:mod:`ksmlens.lens.replay`), and :func:`take_snapshot`, which pauses,
retries half-done updates and calls both. ``pause`` is explicit: a context manager factory that stops the
target (a lab VM's QMP ``stop``/``cont``: :func:`ksmlens.lab.attach.attach`
registers one for its Program with :func:`register_pause`).

Modes: ``consistent`` pauses for the walk (the pause time is reported);
``live`` walks a running kernel and counts what raced with it (freed or
relinked objects, short lists) instead of crashing.
"""

from __future__ import annotations

import contextlib
from array import array
import random
import struct
import time

import numpy as np
import pandas as pd
from drgn import FaultError, Object, Program, ProgramFlags, offsetof
from drgn.helpers.linux.mm import for_each_vma
from drgn.helpers.linux.pid import for_each_task

from ksmlens.errors import KsmlensError
from ksmlens.kernel import pgtable, rules
from ksmlens.kernel.constants import STABLE_NODE_CHAIN, VM_MERGEABLE
from ksmlens.lens.helpers import ksm_counters, ksm_settings, ksm_unstable_tree_seqnr
from ksmlens.lens.layout import Layout, Memory
from ksmlens.lens.midupdate import on_cpu
from ksmlens.lens.model import ORPHAN_COLUMNS, KernelInfo, Snapshot, table
from ksmlens.lens.raw import NOT_VISITED_CODE, PTE_NAMES, PTE_UNREAD, Raw, hx, hex_ids, release_memory
from ksmlens.lens.replay import node_kpfn_of_pairs, visit_pairs, replay_tables  # noqa: F401
from ksmlens.lens.tables import finish

__all__ = ["take_snapshot", "take_idle_snapshot", "register_pause", "walk_paused", "finish",
           "replay_tables", "mce_tasks", "MID_UNLINKED", "MID_HLIST_NOT_STABLE", "hex_ids"]

_Q = struct.Struct("<Q")

# Half-done updates a paused walk can land in (the guest stops at any
# instruction, and ksmd can sleep in folio_lock() in the middle of them):
MID_UNLINKED = ("stable rmap_item not on any mm slot: get_next_rmap_item() or "
                "remove_trailing_rmap_items() unlinked it from its rmap_list and has "
                "not yet taken it off its stable node (remove_rmap_item_from_tree())")
MID_HLIST_NOT_STABLE = ("rmap_item on a stable node without STABLE_FLAG: "
                        "remove_node_from_stable_tree() is clearing the node's items")
_MAX_LIST = 50_000_000  # bound on any list walk: a cycle in a live walk is a race
_U = np.uint64


# ------------------------------------------------------------------ pausing

def register_pause(prog: Program, pause) -> None:
    """Give ``prog`` a pause: ``pause()`` returns a context manager that
    holds the target still (the lab's attach registers QMP stop/cont)."""
    prog.cache["ksmlens_pause"] = pause


def _registers(held):
    """Each vCPU's registers from what a pause yielded (a lab VM's
    ``paused()`` yields the VM: ``cpu_registers()``), or None where the
    pause gives none (the CPUs' stacks are then not unwound)."""
    read = getattr(held, "cpu_registers", None)
    if read is None:
        return None
    try:
        return read()
    except Exception:       # an older QEMU without HMP passthrough: no stacks
        return None


def _pause_of(prog: Program, pause):
    return pause or prog.cache.get("ksmlens_pause")


# ------------------------------------------------------------------ the paused walk

class _Walker:
    def __init__(self, prog: Program, live: bool):
        self.prog = prog
        self.live = live
        self.races: dict[str, int] = {}
        self.mem = Memory(prog, self.race)
        self.L = Layout(prog)
        self.shift = prog["PAGE_SHIFT"].value_()
        self.cand_items: tuple | None = None    # the slab scan's rmap_item candidates

    def race(self, what: str):
        """A live walk raced with the kernel; a paused one saw an update half
        done (classified by :func:`take_snapshot`). Counted by kind."""
        self.races[what] = self.races.get(what, 0) + 1

    def follow(self, first: int, next_off: int, stop: int = 0) -> array:
        """Addresses (an ``array('Q')``: no int object per element) along a
        singly linked list whose next pointer sits at ``next_off``, until a
        NULL or ``stop``."""
        out = array("Q")
        mem = self.mem
        slot, arena = mem.slot, mem.arena
        ip = first
        while ip and ip != stop:
            off = ip & 0xFFF
            o = off + next_off
            b = slot.get(ip - off) if o <= 0xFF8 else None
            if b is None:
                v = mem.u64(ip + next_off)
                if v is None:
                    break
            else:
                v = _Q.unpack_from(arena, b + o)[0]
            out.append(ip)
            ip = v
            if len(out) > _MAX_LIST:
                self.race("list walk did not end")
                break
        return out

    def rb_inorder(self, root: int) -> array:
        """In-order rb_node addresses under ``root`` (raw reads through the
        page cache: stable nodes are slab objects, a few dozen per page)."""
        L, mem = self.L, self.mem
        slot, arena = mem.slot, mem.arena
        lo, ro = L.rb_left, L.rb_right

        def ptr(a):
            off = a & 0xFFF
            b = slot.get(a - off) if off <= 0xFF8 else None
            if b is None:
                return mem.u64(a) or 0
            return _Q.unpack_from(arena, b + off)[0]
        out, stack, node = array("Q"), [], root
        while stack or node:
            while node:
                stack.append(node)
                node = ptr(node + lo)
                if len(stack) > 256:          # an rbtree of 2**64 nodes is 128 deep
                    self.race("rbtree walk did not end")
                    return out
            node = stack.pop()
            out.append(node)
            node = ptr(node + ro)
            if len(out) > _MAX_LIST:
                self.race("rbtree walk did not end")
                break
        return out

    def mm_owners(self) -> dict[int, list[tuple[int, str]]]:
        """mm -> [(tgid, comm)] of every process using it, lowest tgid first:
        a clone(CLONE_VM) child that is not a thread (or a vfork child before
        exec) shares its owner's mm, and /proc/PID/ksm_stat of either shows it."""
        owners: dict[int, dict[int, str]] = {}
        # for memory failure's collect_procs_ksm(): each process's leader mm
        # and its threads' task->flags (see KernelInfo.mce)
        self.leader_mm: dict[int, int] = {}
        self.thread_flags: dict[int, list[int]] = {}
        for task in for_each_task(self.prog):
            try:
                mm = task.mm.value_()
                tgid = task.tgid.value_()
                self.thread_flags.setdefault(tgid, []).append(task.flags.value_())
                if task.pid.value_() == tgid:
                    self.leader_mm[tgid] = mm
                if not mm:
                    continue
                procs = owners.setdefault(mm, {})
                if tgid not in procs:
                    procs[tgid] = task.comm.string_().decode(errors="replace")
            except FaultError:
                self.race("task freed during walk")
        return {mm: sorted(p.items()) for mm, p in owners.items()}

    def vmas(self, mm: int) -> np.ndarray:
        """The VMAs of ``mm`` sorted by start: a structured array (start,
        end, pgoff, anon_vma, file, flags)."""
        out = []
        try:
            for vma in for_each_vma(Object(self.prog, "struct mm_struct *", mm)):
                out.append((vma.vm_start.value_(), vma.vm_end.value_(), vma.vm_pgoff.value_(),
                            vma.anon_vma.value_(), bool(vma.vm_file.value_()),
                            vma.vm_flags.value_()))
        except FaultError:
            self.race("VMA tree changed during walk")
        a = np.array(out, dtype=_VMA_DTYPE)
        a.sort(order="start")
        return a

    def page_structs(self, vmemmap: int, pfns: np.ndarray) -> dict[str, np.ndarray]:
        """``struct page`` of each pfn, the folio's head for ``mapping``:
        ``mapping`` (the head's), ``mapcount`` (the page's ``_mapcount + 1``)
        and ``ok`` (readable)."""
        L = self.L
        pfns = np.asarray(pfns, dtype=np.uint64)
        addr = _U(vmemmap) + pfns * _U(L.page_size_struct)
        rec, ok = self.mem.gather(addr, L.page_size_struct, L.page_dtype, drop=True)
        mapping = rec["mapping"].copy()
        head = rec["compound_head"]
        tail = ok & ((head & _U(1)) != 0)
        if tail.any():
            hrec, hok = self.mem.gather(head[tail] - _U(1), L.page_size_struct, L.page_dtype,
                                        drop=True)
            mapping[tail] = hrec["mapping"]
            ok = ok.copy()
            ok[tail] &= hok
        return {"mapping": mapping, "mapcount": rec["mapcount"].astype(np.int64) + 1, "ok": ok}


_VMA_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("pgoff", "<u8"), ("anon_vma", "<u8"),
                       ("file", "?"), ("flags", "<u8")])


def _mce(prog: Program, w: "_Walker") -> dict | None:
    """What mm/memory-failure.c ``collect_procs_ksm()`` needs of the tasks:
    ``early_kill`` (sysctl ``vm.memory_failure_early_kill``) and, per process
    whose leader has an mm (``task_early_kill()``: ``for_each_process``,
    ``tsk->mm``), ``[tgid, mm, [task->flags of each thread]]``. None on a
    kernel without CONFIG_MEMORY_FAILURE. Call after :meth:`_Walker.mm_owners`."""
    try:
        early = prog["sysctl_memory_failure_early_kill"].value_()
    except (KeyError, LookupError):
        return None
    return _mce_record(early, w.leader_mm, w.thread_flags)


def _mce_record(early: int, leader_mm: dict, thread_flags: dict) -> dict:
    procs = [[tgid, hx(mm), thread_flags.get(tgid, [])]
             for tgid, mm in sorted(leader_mm.items()) if mm]
    return {"early_kill": int(early), "processes": procs}


def mce_tasks(prog: Program) -> dict | None:
    """``KernelInfo.mce`` read now, alone (for_each_task: no KSM structure):
    who mm/memory-failure.c ``collect_procs_ksm()`` would collect at this
    moment. For a prediction made before a poisoning in a running guest,
    whose processes may come and go after the snapshot. None on a kernel
    without CONFIG_MEMORY_FAILURE; tasks freed while read are left out
    (compare two reads to know the set held still)."""
    try:
        early = prog["sysctl_memory_failure_early_kill"].value_()
    except (KeyError, LookupError):
        return None
    for attempt in range(5):        # the task list itself changed under the read: again
        leader_mm: dict[int, int] = {}
        thread_flags: dict[int, list[int]] = {}
        try:
            for task in for_each_task(prog):
                try:
                    tgid = task.tgid.value_()
                    thread_flags.setdefault(tgid, []).append(task.flags.value_())
                    if task.pid.value_() == tgid:
                        leader_mm[tgid] = task.mm.value_()
                except FaultError:
                    continue
        except FaultError:
            if attempt == 4:
                raise
            continue
        break
    return _mce_record(early, leader_mm, thread_flags)


def _kernel_info(prog: Program, L: Layout, shift: int) -> KernelInfo:
    # The variant and its walk rule: a lab kernel names itself in its release
    # (ksmlens.kernel.variants); elsewhere a stored index means "stored".
    from ksmlens.kernel.variants import kernel_walk_rule, variant_of_release
    release = prog["UTS_RELEASE"].string_().decode()
    k = KernelInfo(release=release, variant=variant_of_release(release),
                   has_stored_pgoff=L.stored_member is not None,
                   nr_node_ids=prog["ksm_nr_node_ids"].value_(), page_shift=shift,
                   rmap_item_size=L.item_size, stored_index_member=L.stored_member,
                   union_layout={"oldchecksum": L.union.oldchecksum, "age": L.union.age,
                                 "remaining_skips": L.union.remaining_skips},
                   union_offset=L.i["oldchecksum"],
                   smartscan=L.kernel.smartscan, zero_pages=L.kernel.zero_pages)
    k.walk_rule = kernel_walk_rule(k.variant, k.has_stored_pgoff)
    k.arch, k.va_bits = _arch_facts(prog)
    return k


def _arch_facts(prog: Program) -> tuple[str, int]:
    """``(arch, user VA bits)`` of the kernel: x86-64 47 (4-level) or 56
    (``__pgtable_l5_enabled``), arm64 its vmcoreinfo's ``VA_BITS``."""
    from ksmlens.kernel.arch import ARM64, arch_of_program
    a = arch_of_program(prog)
    if a is ARM64:
        from ksmlens.kernel.pgtable_arm64 import vmcoreinfo_numbers
        return a.name, int(vmcoreinfo_numbers(prog).get("VA_BITS", 48))
    try:
        l5 = bool(prog["__pgtable_l5_enabled"].value_())
    except (KeyError, LookupError):
        l5 = False
    return a.name, 56 if l5 else 47


def walk_paused(prog: Program, *, live: bool = False, pages: bool = True,
                slab_scan: bool | None = None) -> Raw:
    """Read everything a snapshot needs, as arrays (run while the target
    holds still; :func:`finish` turns it into tables). Follows
    ``ksm_mm_head`` (every ``ksm_mm_slot`` and its ``rmap_list``), the
    stable trees ``root_stable_tree[nid]`` with their chains and dups,
    ``migrate_nodes``, each KSM mm's VMAs and page tables, the ``struct
    page`` of every mapped and every KSM pfn, the anon_vma interval trees
    of stable rmap_items, and the pairs ``rmap_walk_ksm()`` would visit
    with whether a PTE maps the page there.

    ``slab_scan``: find the lists' nodes by copying every slab of
    ``rmap_item_cache`` and ``stable_node_cache`` first and ordering the
    copy with array operations (:mod:`ksmlens.lens.slabscan`), True; chase
    them pointer by pointer, False; None (the default) scans when the
    memmap it reads is at most :data:`SCAN_RATIO` times the slabs' bytes
    the counters predict. Both give the same Raw (tested)."""
    w = _Walker(prog, live)
    L, mem, shift = w.L, w.mem, w.shift
    kernel = _kernel_info(prog, L, shift)
    counters = ksm_counters(prog)
    counters.update(ksm_settings(prog))
    so = prog["ksm_scan"]
    scan = {"mm_slot": hx(so.mm_slot.value_()), "address": so.address.value_(),
            "seqnr": so.seqnr.value_(), "rmap_list": hx(so.rmap_list.value_()),
            # ksm_scan.mm_slot == &ksm_mm_head: the next visit starts a new pass
            "at_pass_start": so.mm_slot.value_() == prog["ksm_mm_head"].address_}
    owners = w.mm_owners()
    kernel.mce = _mce(prog, w)
    pt = pgtable.page_tables(prog, mem.read) if pages else None
    zero_pfn = prog["zero_pfn"].value_() if pages else 0
    vmemmap: int | None = None        # read only when pages (the stable tree tests it)
    if pages:
        from drgn.helpers.linux.mm import pfn_to_page
        vmemmap = pfn_to_page(prog, 0).value_()

    # ---- mm slots: their fields and VMAs, and the first rmap_item of each
    head = prog["ksm_mm_head"].address_ + L.s_mm_node
    slots, firsts = [], []
    for pos in w.follow(mem.u64(head) or 0, 0, stop=head):
        slot_addr = pos - L.s_mm_node
        b = mem.read(slot_addr, L.slot_size)
        if b is None:
            break
        mm = _Q.unpack_from(b, L.s_mm)[0]
        first = _Q.unpack_from(b, L.s_rmap_list)[0]
        procs = owners.get(mm, [])
        mmo = Object(prog, "struct mm_struct *", mm)
        try:
            f = {"mm_ksm_rmap_items": mmo.ksm_rmap_items.value_(),
                 "mm_ksm_merging_pages": mmo.ksm_merging_pages.value_(),
                 # mm->ksm_zero_pages: commit e2942062e01d (6.6)
                 "mm_ksm_zero_pages": mmo.ksm_zero_pages.counter.value_()
                 if pages and L.kernel.zero_pages else None,
                 "mm_users": mmo.mm_users.counter.value_()}
            pgd = mmo.pgd.value_()
        except FaultError:
            w.race("mm freed during walk")
            f = {"mm_ksm_rmap_items": -1, "mm_ksm_merging_pages": -1,
                 "mm_ksm_zero_pages": None, "mm_users": None}
            pgd = 0
        alive = bool(f["mm_users"])     # ksm_test_exit(): VMAs and page tables are gone
        firsts.append(first)
        slots.append(dict(f, id=slot_addr, mm=mm, pid=procs[0][0] if procs else None,
                          comm=procs[0][1] if procs else None, pids=[p for p, _ in procs],
                          rmap_items=0, alive=alive, pgd=pgd if alive else 0,
                          vmas=w.vmas(mm) if mm and alive else np.zeros(0, _VMA_DTYPE)))

    # ---- each slot's rmap_list: from a copy of the rmap_item slabs where the
    # memmap is small beside them (slabscan), else pointer by pointer
    slabs = _slab_scan(w, counters, slab_scan)
    item_addrs = _rmap_lists(w, firsts, slabs)
    for s, a in zip(slots, item_addrs):
        s["rmap_items"] = a.size

    # ---- every rmap_item, decoded at once
    n_per = np.array([s["rmap_items"] for s in slots], dtype=np.int64)
    item_ptrs = np.concatenate(item_addrs) if item_addrs else np.zeros(0, np.uint64)
    rec, ok = _item_records(w, item_ptrs)
    if not ok.all():
        w.race("rmap_item freed during walk")
    slot_of = np.repeat(np.arange(len(slots)), n_per)
    items = _decode_items(w, kernel, rec, item_ptrs, slot_of, slots, prog)
    del rec, item_ptrs, item_addrs
    release_memory()

    # ---- page tables of each live mm's mergeable VMAs
    if pages:
        assert vmemmap is not None      # read above whenever pages
        _read_ptes(w, pt, items, slots, zero_pfn, vmemmap)
        if not L.kernel.zero_pages:
            # before commit e2942062e01d (6.6) KSM's zero-page PTEs are not
            # marked: no count of them can be decoded, nor compared
            for s in slots:
                s["ksm_zero_pages"] = None

    # ---- the stable trees, chains, dups and migrate_nodes
    nodes = _walk_stable_tree(w, kernel, vmemmap, slabs)
    _link_hlists(w, items, nodes)

    # ---- anon_vma trees of the stable items, and the rmap_walk_ksm() pairs
    stable = items["state"] == rules.STATE_STABLE
    av = np.unique(items["anon_vma"][stable])
    anon_vmas = _record_anon_vmas(w, [hx(int(a)) for a in av.tolist() if a])
    raw = Raw(kernel=kernel, counters=counters, scan=scan, meta={}, items=items, nodes=nodes,
              slots=slots, anon_vmas=anon_vmas)
    t = time.monotonic()
    raw.cand = visit_pairs(raw)
    if pages:
        raw.cand["mapped"] = _mapped_from_ptes(w, pt, raw, raw.cand)
    raw.meta["pte_seconds"] = round(time.monotonic() - t, 4)
    raw.meta["ksmd"] = _ksmd_state(prog)
    raw.meta["races"] = dict(w.races)
    raw.meta["reads"] = mem.reads
    raw.meta["slab_scan"] = slabs is not None
    raw.races = dict(w.races)
    del w, mem, pt
    release_memory()
    return raw


#: walk_paused(slab_scan=None) scans the memmap when it is at most this many
#: times the bytes of the rmap_item and stable node slabs the counters
#: predict: reading it costs about what chasing that many bytes' pointers does
SCAN_RATIO = 16


def _slab_scan(w: _Walker, counters: dict, want: bool | None) -> dict | None:
    """The object addresses of every slab of ``rmap_item_cache`` and
    ``stable_node_cache`` (``{"items": array, "nodes": array}``, each sorted
    uint64), or None to chase pointers: ``want`` False, a kernel without
    ``struct slab`` (before 5.17), no virtual memmap (``vmemmap``) or a
    direct map that is not linear over the slabs, or
    (``want`` None) a memmap larger than :data:`SCAN_RATIO` times the
    slabs. ``meta["slab_scan"]`` says which the walk did."""
    from ksmlens.lens import slabscan
    if want is False:
        return None
    prog, L = w.prog, w.L
    layout = slabscan.slab_layout(prog)
    try:
        caches = [prog["rmap_item_cache"], prog["stable_node_cache"]]
        prog["vmemmap"]     # SPARSEMEM_VMEMMAP: the memmap is one array to read
    except LookupError:
        layout = None
    if layout is None:
        return None
    ranges = slabscan.page_ranges(prog)
    if want is None:
        nodes = (counters.get("pages_shared", 0) + counters.get("stable_node_chains", 0)
                 + counters.get("stable_node_dups", 0))
        slabs = counters.get("rmap_items", 0) * L.item_size + nodes * L.node_size
        if slabscan.memmap_bytes(prog, ranges) > SCAN_RATIO * slabs:
            return None
    try:
        found = slabscan.slab_objects(prog, caches, w.mem.read, layout, ranges)
    except ValueError:      # a direct map the scan cannot address: chase pointers
        return None
    return {"items": found[caches[0].value_()], "nodes": found[caches[1].value_()],
            # s->size: the distance between objects of one slab (slabscan.index_of)
            "item_stride": caches[0].size.value_(), "node_stride": caches[1].size.value_()}


def _prefetch_objects(mem: Memory, addrs: np.ndarray, size: int) -> None:
    """Copy the pages under objects ``addrs`` into ``mem``'s cache, runs of
    consecutive pages (up to 16 MiB) in one read each."""
    mask = _U(0xFFF)
    first = addrs & ~mask
    last = (addrs + _U(size - 1)) & ~mask
    mem.prefetch(np.concatenate([first, last[last != first]]), max_run=4096)


def _rmap_lists(w: _Walker, firsts: list[int], slabs: dict | None) -> list[np.ndarray]:
    """Each slot's rmap_item addresses along its ``rmap_list`` (uint64
    arrays). With ``slabs``, ordered from a copy of the candidates
    (:func:`ksmlens.lens.slabscan.list_order`); a list that leaves them
    goes on by pointer, as does one that does not end among them (a cycle,
    counted as a race by :meth:`_Walker.follow`)."""
    from ksmlens.lens import slabscan
    L, mem = w.L, w.mem
    off = L.i["rmap_list"]
    if slabs is None:
        return [np.frombuffer(a, dtype=np.uint64) if len(a) else np.zeros(0, np.uint64)
                for a in (w.follow(f, off) for f in firsts)]
    cand = slabs["items"]
    _prefetch_objects(mem, cand, L.item_size)
    rec, ok = mem.gather(cand, L.item_size, L.item_dtype)
    w.cand_items = (cand, rec, ok, slabs["item_stride"])   # for _item_records()
    out = []
    for (nodes, how, at) in slabscan.list_order(cand, rec["next"], firsts,
                                                stride=slabs["item_stride"]):
        if how != slabscan.END:     # outside the candidates, or a cycle: by pointer
            rest = w.follow(at, off)    # (which counts a list that does not end)
            nodes = np.concatenate([nodes, np.frombuffer(rest, dtype=np.uint64)]) \
                if len(rest) else nodes
        out.append(nodes)
    return out


def _item_records(w: _Walker, ptrs: np.ndarray) -> tuple[dict, np.ndarray]:
    """``struct ksm_rmap_item`` fields of the rmap_items at ``ptrs`` (the
    walked ones, in walk order) and which could be read; from the
    candidates' records when the slabs were copied, else one gather. The
    page cache is dropped after."""
    from ksmlens.lens.slabscan import index_of
    cand = getattr(w, "cand_items", None)
    if cand is not None:
        w.cand_items = None
        idx = index_of(cand[0], ptrs, cand[3])
        if (idx >= 0).all():
            w.mem.clear()
            return {f: v[idx] for f, v in cand[1].items()}, cand[2][idx]
    return w.mem.gather(ptrs, w.L.item_size, w.L.item_dtype, drop=True)


def _stable_rb(w: _Walker, slabs: dict):
    """``root -> rb_node addresses in order`` from a copy of the stable node
    candidates (:func:`ksmlens.lens.slabscan.rb_inorder`); a tree with a
    pointer that leaves them (a race, or a node in no slab the scan found)
    is walked again by pointer, whole."""
    from ksmlens.lens import slabscan
    L, mem = w.L, w.mem
    cand = slabs["nodes"]
    _prefetch_objects(mem, cand, L.node_size)
    rec, _ = mem.gather(cand, L.node_size, L.node_rb)
    off = _U(L.n_rb)
    # rb_node pointers as the node addresses they sit in (0 stays 0): the
    # candidates' own addresses keep one slab's objects evenly spaced in a page
    left, right = (np.where(rec[k] != 0, rec[k] - off, _U(0)) for k in ("rb_left", "rb_right"))

    def inorder(root: int) -> np.ndarray:
        order, faults = slabscan.rb_inorder(cand, left, right, root - int(off) if root else 0,
                                            stride=slabs["node_stride"])
        if faults:      # a race or an unknown slab: the whole tree by pointer
            return np.frombuffer(w.rb_inorder(root), dtype=np.uint64)
        return order + off
    return inorder


def _decode_items(w: _Walker, kernel: KernelInfo, rec, addrs, slot_of, slots, prog) -> dict:
    shift = w.shift
    n = addrs.size
    raw_addr = rec["address"]
    address = rules.rmap_item_page_address(raw_addr, shift)
    state = rules.rmap_item_state(raw_addr)
    stable = state == rules.STATE_STABLE
    unstable = state == rules.STATE_UNSTABLE
    seqnr = rules.rmap_item_seqnr(raw_addr).astype(np.uint8)
    sel = ksm_unstable_tree_seqnr(prog)   # between passes: the previous pass's
    oldsum, age, skips = w.L.union.decode(rec["union"])
    it = {"addr": addrs, "mm": np.zeros(n, np.uint64), "slot": slot_of,
          "address": address, "flags": (raw_addr & ~rules.rmap_item_page_address(
              np.full(n, (1 << 64) - 1, dtype=np.uint64), shift)).astype(np.uint16),
          "state": state, "seqnr": seqnr,
          "in_unstable_tree": unstable & (seqnr == sel),
          "head": np.where(stable, rec["head"], _U(0)),
          "hnext": np.where(stable, rec["hnext"], _U(0)),
          "anon_vma": np.where(stable, rec["anon_vma"], _U(0)),
          "nid": (rec["anon_vma"] & _U(0xFFFFFFFF)).astype(np.int64),
          "nid_ok": unstable & w.L.has_nid,
          "union": rec["union"], "oldchecksum": oldsum, "age": age, "remaining_skips": skips}
    # per item: its mm, its VMA (one searchsorted per mm)
    vs = np.zeros(n, np.uint64)
    ve = np.zeros(n, np.uint64)
    vpg = np.zeros(n, np.uint64)
    van = np.zeros(n, np.uint64)
    vfile = np.zeros(n, bool)
    vflags = np.zeros(n, np.uint64)
    has_vma = np.zeros(n, bool)
    start = 0
    for k, s in enumerate(slots):
        m = s["rmap_items"]
        sl = slice(start, start + m)
        start += m
        it["mm"][sl] = s["mm"]
        v = s["vmas"]
        if not m or not v.size:
            continue
        a = address[sl]
        vi = np.searchsorted(v["start"], a, side="right") - 1
        hit = vi >= 0
        vi = np.where(hit, vi, 0)
        hit &= a < v["end"][vi]
        has_vma[sl] = hit
        for dst, col in ((vs, "start"), (ve, "end"), (vpg, "pgoff"), (van, "anon_vma"),
                         (vflags, "flags")):
            dst[sl] = np.where(hit, v[col][vi], 0)
        vfile[sl] = hit & v["file"][vi]
    it.update(vma_start=vs, vma_end=ve, vm_pgoff=vpg, vma_anon_vma=van, vma_file=vfile,
              vm_flags=vflags, has_vma=has_vma)
    it["addr_pgoff"] = address >> _U(shift)
    it["lpi"] = np.where(has_vma, rules.linear_page_index(address, vs, vpg, shift), _U(0))
    # the stored index: only STABLE items' bytes hold one
    it["has_stored"] = stable & kernel.has_stored_pgoff
    # page tables (filled by _read_ptes): kind code, pfn, page flags, visit
    it["pte"] = np.full(n, PTE_UNREAD, np.uint8)
    it["pfn"] = np.zeros(n, np.uint64)
    it["pfn_ok"] = np.zeros(n, bool)
    it["page_ksm"] = np.zeros(n, np.int8) - 1      # -1: no page
    it["not_visited"] = np.full(n, -1, np.int8)    # -1: visited (or unknown, see visit_known)
    it["visit_known"] = np.zeros(n, bool)
    return it


def _read_ptes(w: _Walker, pt, it: dict, slots: list, zero_pfn: int, vmemmap: int) -> None:
    """Read the page tables of each live mm's VM_MERGEABLE VMAs: each
    rmap_item's PTE kind, pfn, PageKsm, and whether ksmd's next pass visits
    it; each slot's KSM zero pages and the pfns mapped there.

    Follows ``scan_get_next_rmap_item()``: only VM_MERGEABLE VMAs with an
    anon_vma are scanned, and ``ksm_next_page_pmd_entry()`` stops only at a
    present PTE (or PMD leaf) whose ``vm_normal_page()`` is an anonymous,
    non-device page; an rmap_item anywhere else is freed unread by
    ``get_next_rmap_item()`` / ``remove_trailing_rmap_items()``. KSM zero
    pages (include/linux/ksm.h ``is_ksm_zero_pte()``): the zero pfn, dirty.
    """
    n = it["addr"].size
    ents = np.zeros(n, np.uint64)
    kinds = np.zeros(n, np.uint8)
    mapped_parts = []
    start = 0
    for s in slots:
        m = s["rmap_items"]
        sl = slice(start, start + m)
        start += m
        s["leaves"] = None
        if not s["alive"] or not s["pgd"]:
            # exit_mmap() zapped the page tables (each KSM zero page
            # decremented the counters as it went): nothing is mapped
            s["ksm_zero_pages"], s["zero_pages"] = 0, []
            it["not_visited"][sl] = NOT_VISITED_CODE["mm_exited"]
            it["visit_known"][sl] = True
            continue
        v = s["vmas"]
        merg = v[(v["flags"] & _U(VM_MERGEABLE)) != 0]
        s["mergeable"] = merg
        parts = [pt.leaves(s["pgd"], int(a), int(b)) for a, b in zip(merg["start"], merg["end"])]
        if parts:
            leaves = tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
        else:
            e = np.zeros(0, dtype=np.uint64)
            leaves = (e, e, np.zeros(0, dtype=np.uint8))
        s["leaves"] = leaves
        la, le, ls = leaves
        small = ls == pgtable.PAGE_SHIFT
        k, pfns, en = pt.decode(leaves, la[small])
        is_page = (k == pgtable.KIND_PRESENT) | (k == pgtable.KIND_PROT_NONE)
        zero = is_page & (pfns == _U(zero_pfn))
        dirty = pt.dirty(en)
        s["zero_pages"] = la[small][zero & dirty].tolist()
        s["ksm_zero_pages"] = len(s["zero_pages"])
        mapped_parts.append(pfns[is_page & ~zero])
        if m:
            k, pfns, en = pt.decode(leaves, it["address"][sl])
            kinds[sl], it["pfn"][sl], ents[sl] = k, pfns, en
            it["visit_known"][sl] = True
    it["mapped_pfns"] = (np.concatenate(mapped_parts) if mapped_parts
                         else np.zeros(0, np.uint64))
    known = it["visit_known"] & (it["not_visited"] < 0)     # live mms
    has_vma = it["has_vma"]
    merg = (it["vm_flags"] & _U(VM_MERGEABLE)) != 0
    nv = it["not_visited"]
    nv[known & ~has_vma] = NOT_VISITED_CODE["no_vma"]
    nv[known & has_vma & ~merg] = NOT_VISITED_CODE["not_mergeable"]
    read = known & has_vma & merg
    is_page = read & ((kinds == pgtable.KIND_PRESENT) | (kinds == pgtable.KIND_PROT_NONE))
    zero = is_page & (it["pfn"] == _U(zero_pfn))
    dirty = pt.dirty(ents)
    pte = it["pte"]
    pte[read] = kinds[read] + 1                      # KIND_NAMES shifted past "unread"
    pte[zero] = np.where(dirty[zero], PTE_NAMES.index("ksm_zero"), PTE_NAMES.index("zero"))
    it["pfn_ok"] = is_page
    page = is_page & ~zero
    anon = np.zeros(it["addr"].size, bool)
    if page.any():
        pfns = it["pfn"][page]
        u, inv = np.unique(pfns, return_inverse=True)
        ps = w.page_structs(vmemmap, u)
        ksm = rules.folio_is_ksm(ps["mapping"])
        an = rules.folio_is_anon(ps["mapping"])
        it["page_ksm"][page] = np.where(ps["ok"][inv], ksm[inv].astype(np.int8), -1)
        anon[page] = ps["ok"][inv] & an[inv]
    special = pt.special(ents)
    rest = read.copy()
    for cond, why in ((it["vma_anon_vma"] == 0, "no_anon_vma"),
                      (kinds == pgtable.KIND_NONE, "no_page"),
                      (kinds == pgtable.KIND_SWAP, "swapped"), (zero, "zero_page"),
                      (special, "special"), ((it["page_ksm"] < 0) | ~anon, "not_anon")):
        hit = rest & cond
        nv[hit] = NOT_VISITED_CODE[why]
        rest &= ~cond


def _walk_stable_tree(w: _Walker, kernel: KernelInfo, vmemmap: int | None,
                      slabs: dict | None = None) -> dict:
    """Every stable node: tree nodes in order per nid root (chain heads
    followed by their dups), then ``migrate_nodes``."""
    L, mem, prog = w.L, w.mem, w.prog
    roots = prog["root_stable_tree"]
    parts, nids = [], []
    rb_of = _stable_rb(w, slabs) if slabs is not None else None
    for nid in range(kernel.nr_node_ids):
        root = (roots + nid).rb_node.value_()
        rb = rb_of(root) if rb_of else np.frombuffer(w.rb_inorder(root), dtype=np.uint64)
        parts.append(rb - _U(L.n_rb))
        nids.append(np.full(rb.size, nid, np.int32))
    tree = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    tree_nid = np.concatenate(nids) if nids else np.zeros(0, np.int32)
    rec, ok = mem.gather(tree, L.node_size, L.node_dtype)
    if not ok.all():
        w.race("stable node freed during walk")
    # order: each chain head followed by its dups (only chain heads need a loop)
    seg_addr, seg_kind, seg_chain, seg_nid = [], [], [], []
    start = 0
    for ci in np.flatnonzero(rec["len"] == STABLE_NODE_CHAIN).tolist():
        seg_addr.append(tree[start:ci + 1])
        k = np.zeros(ci + 1 - start, np.int8)
        k[-1] = 1
        seg_kind.append(k)
        seg_chain.append(np.zeros(ci + 1 - start, np.uint64))
        seg_nid.append(tree_nid[start:ci + 1])
        dups = np.frombuffer(w.follow(int(rec["first"][ci]), 0), dtype=np.uint64)
        seg_addr.append(dups - _U(L.n_hlist_dup))
        seg_kind.append(np.full(dups.size, 2, np.int8))
        seg_chain.append(np.full(dups.size, tree[ci], np.uint64))
        seg_nid.append(np.full(dups.size, -1, np.int32))
        start = ci + 1
    seg_addr.append(tree[start:])
    seg_kind.append(np.zeros(tree.size - start, np.int8))
    seg_chain.append(np.zeros(tree.size - start, np.uint64))
    seg_nid.append(tree_nid[start:])
    mhead = prog["migrate_nodes"].address_
    mig = np.frombuffer(w.follow(mem.u64(mhead) or 0, 0, stop=mhead), dtype=np.uint64)
    n_tree = sum(x.size for x in seg_addr)
    seg_addr.append(mig - _U(L.n_list))
    seg_kind.append(np.zeros(mig.size, np.int8))
    seg_chain.append(np.zeros(mig.size, np.uint64))
    seg_nid.append(np.full(mig.size, -1, np.int32))
    addr = np.concatenate(seg_addr)
    kind = np.concatenate(seg_kind)
    chain = np.concatenate(seg_chain)
    nid_root = np.concatenate(seg_nid)
    del seg_addr, seg_kind, seg_chain, seg_nid, tree, tree_nid, parts, nids
    rec, ok = mem.gather(addr, L.node_size, L.node_dtype, drop=True)
    nid = rec["nid"].astype(np.int32) if "nid" in rec else np.zeros(addr.size,
                                                                              np.int32)
    # a chain head's nid is never set (alloc_stable_node_chain() leaves it
    # uninitialised): its tree root says which node
    nid = np.where(kind == 1, nid_root, nid)
    nodes = {"addr": addr, "kind": kind, "chain": chain,
             "kpfn": rec["kpfn"], "nid": nid, "len": rec["len"], "first": rec["first"],
             "migrate": np.arange(addr.size) >= n_tree}
    page = kind != 1
    nodes["mapcount"] = np.zeros(addr.size, np.int64)
    nodes["page_ok"] = np.zeros(addr.size, bool)
    nodes["page_ksm"] = np.zeros(addr.size, bool)
    nodes["page_node"] = np.zeros(addr.size, np.uint64)
    if vmemmap is not None and page.any():
        ps = w.page_structs(vmemmap, rec["kpfn"][page])
        nodes["page_ok"][page] = ps["ok"]
        nodes["mapcount"][page] = ps["mapcount"]
        nodes["page_ksm"][page] = rules.folio_is_ksm(ps["mapping"])
        nodes["page_node"][page] = rules.folio_stable_node(ps["mapping"])
    return nodes


def _link_hlists(w: _Walker, it: dict, nodes: dict) -> None:
    """Each stable item's position on its node's hlist (``hlist_pos``, -1
    if no node's hlist reaches it), by list ranking over the items'
    ``hlist.next``. An hlist that leads to an rmap_item no mm slot lists
    (:data:`MID_UNLINKED`) or to one without STABLE_FLAG
    (:data:`MID_HLIST_NOT_STABLE`) is a half-done update: counted as a race."""
    n = it["addr"].size
    stable = it["state"] == rules.STATE_STABLE
    it["hlist_pos"] = np.full(n, -1, np.int64)
    page_nodes = nodes["kind"] != 1
    firsts = np.where(page_nodes, nodes["first"], _U(0))
    nexts = np.where(stable, it["hnext"], _U(0))
    if not n:
        if (firsts != 0).any():
            for _ in range(int((firsts != 0).sum())):
                w.race(MID_UNLINKED)
        return
    hl = it["addr"] + _U(w.L.i["hlist"])          # each item's hlist_node
    order = np.argsort(hl)
    shl = hl[order]

    def index_of(ptrs):
        j = np.minimum(np.searchsorted(shl, ptrs), n - 1)
        found = (ptrs != 0) & (shl[j] == ptrs)
        return np.where(found, order[j], -1)
    fi, ni = index_of(firsts), index_of(nexts)
    for ptrs, idx in ((firsts, fi), (nexts, ni)):
        for _ in range(int(((ptrs != 0) & (idx < 0)).sum())):
            w.race(MID_UNLINKED)
        for _ in range(int(((idx >= 0) & ~stable[np.maximum(idx, 0)]).sum())):
            w.race(MID_HLIST_NOT_STABLE)
    succ = np.where(stable & (ni >= 0), ni, -1)
    nxt = np.where(succ >= 0, succ, np.arange(n))
    dist = (succ >= 0).astype(np.int64)          # to the list's tail
    for _ in range(64):
        if np.array_equal(nxt[nxt], nxt):
            break
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    heads = fi[fi >= 0]
    head_of_tail = np.full(n, -1, np.int64)
    head_of_tail[nxt[heads]] = heads
    h = head_of_tail[nxt]
    it["hlist_pos"] = np.where(stable & (h >= 0), dist[np.maximum(h, 0)] - dist, -1)


def _record_anon_vmas(w: _Walker, anon_vmas: list) -> dict:
    """Each anon_vma's interval tree (``anon_vma->rb_root``) as plain
    records: per ``struct anon_vma_chain``, its rb links, the augmented
    ``rb_subtree_last`` and its VMA's range, pgoff and mm."""
    prog = w.prog
    out = {}
    rb_off = offsetof(prog.type("struct anon_vma_chain"), "rb")
    for av in anon_vmas:
        try:
            rbroot = Object(prog, "struct anon_vma *", int(av, 16)).rb_root
            root = rbroot.rb_root.rb_node.value_()
            leftmost = rbroot.rb_leftmost.value_()
            nodes = {}
            stack = [root] if root else []
            while stack:
                rb = stack.pop()
                a = rb - rb_off
                avc = Object(prog, "struct anon_vma_chain *", a)
                vma = avc.vma
                left, right = avc.rb.rb_left.value_(), avc.rb.rb_right.value_()
                parent = avc.rb.__rb_parent_color.value_() & ~3
                nodes[hx(a)] = {
                    "vma": hx(vma.value_()), "mm": hx(vma.vm_mm.value_()),
                    "vm_start": vma.vm_start.value_(), "vm_end": vma.vm_end.value_(),
                    "vm_pgoff": vma.vm_pgoff.value_(),
                    "left": hx(left - rb_off) if left else None,
                    "right": hx(right - rb_off) if right else None,
                    "parent": hx(parent - rb_off) if parent else None,
                    "subtree_last": avc.rb_subtree_last.value_()}
                stack += [x for x in (right, left) if x]
                if len(nodes) > _MAX_LIST:
                    w.race("anon_vma tree walk did not end")
                    break
            out[av] = {"root": hx(root - rb_off) if root else None,
                       "leftmost": hx(leftmost - rb_off) if leftmost else None,
                       "nodes": nodes}
        except FaultError:
            w.race("anon_vma freed during walk")
    return out


def _mapped_from_ptes(w: _Walker, pt, raw: Raw, c: dict) -> np.ndarray:
    """Per pair: does a PTE of the avc's mm map the node's page at that
    address (``pte_present()``: PROT_NONE mappings count)? From the page
    tables read in this pause (the slots' mergeable VMAs; one lookup each
    for the rest)."""
    it = raw.items
    kpfn = node_kpfn_of_pairs(raw, c)
    mapped = np.zeros(c["item"].size, bool)
    by_mm = {s["mm"]: s for s in raw.slots}
    cm = c["avc_mm"][c["avc"]]
    addr = it["address"][c["item"]]
    for mm in np.unique(cm).tolist():
        sel = np.nonzero(cm == _U(mm))[0]
        s = by_mm.get(mm)
        q = addr[sel]
        covered = np.zeros(sel.size, bool)
        if s is not None and s.get("leaves") is not None and s["mergeable"].size:
            mv = s["mergeable"]
            vi = np.searchsorted(mv["start"], q, side="right") - 1
            covered = (vi >= 0) & (q < mv["end"][np.maximum(vi, 0)])
            k, pfns, _ = pt.decode(s["leaves"], q[covered])
            mapped[sel[covered]] = (((k == pgtable.KIND_PRESENT) | (k == pgtable.KIND_PROT_NONE))
                                    & (pfns == kpfn[sel[covered]]))
        rest = sel[~covered]
        if rest.size:       # outside the mm's mergeable VMAs: one lookup each
            pgd = s["pgd"] if s is not None else _pgd_of(w, mm)
            for r in rest.tolist():
                mapped[r] = bool(pgd) and pt.lookup(pgd, int(addr[r]))[1] == int(kpfn[r])
    return mapped


def _pgd_of(w: _Walker, mm: int) -> int:
    try:
        mmo = Object(w.prog, "struct mm_struct *", mm)
        return mmo.pgd.value_() if mmo.mm_users.counter.value_() else 0
    except FaultError:
        return 0


# ------------------------------------------------------------------ the snapshot

def take_snapshot(prog: Program, *, mode: str = "consistent", pause=None,
                  pages: bool = True, retries: int = 8, vm=None,
                  slab_scan: bool | None = None) -> Snapshot:
    """Walk the KSM state of ``prog`` into a :class:`Snapshot`.

    ``mode="consistent"`` holds the target still during the walk with
    ``pause`` (a context manager factory; default: the one the lab's
    ``attach()`` registered for ``prog``); a vmcore needs none.
    ``mode="live"`` never pauses and counts races in ``meta["races"]``.
    ``pages=False`` skips page tables and ``struct page`` reads (faster;
    no PTE columns, no mapped/unreachable answers). ``slab_scan``: how the
    walk finds rmap_items and stable nodes (see :func:`walk_paused`).

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
    if vm is not None and pause is None:
        pause = vm.paused
    pause = _pause_of(prog, pause)
    is_live_target = bool(prog.flags & ProgramFlags.IS_LIVE)
    hold = mode == "consistent" and is_live_target
    if hold and pause is None:
        raise KsmlensError("a consistent walk of a live kernel needs a way to pause it",
                           "use mode='live', or attach to a lab VM / a vmcore")
    from ksmlens.kernel.pgtable import check_platform
    check_platform(prog)
    t_start = time.monotonic()
    seen = []
    paused_total = 0.0
    for attempt in range(1, max(1, retries) + 1):
        busy = None
        with (pause() if hold else contextlib.nullcontext()) as held:
            t_paused = time.monotonic()
            raw = walk_paused(prog, live=(mode == "live" and is_live_target), pages=pages,
                              slab_scan=slab_scan)
            if hold:        # who runs on each CPU in this pause, and its kernel stack
                raw.meta["on_cpu"] = on_cpu(prog, _registers(held))
                unwalked = _unwalked_ptes(prog, raw.meta["on_cpu"])
                if unwalked:
                    raw.meta["unwalked_ptes"] = unwalked
            if mode == "consistent" and raw.races:
                busy = _ksm_busy(prog, raw.meta.get("ksmd"))
            t_end = time.monotonic()
        paused_total += t_end - t_paused
        if mode == "live" or not raw.races:
            break
        what = dict(raw.races)
        if not busy:
            raise KsmlensError(
                "inconsistent KSM state in a paused guest where no task was in mm/ksm.c "
                f"or on a CPU: {'; '.join(what)}",
                "report this with the snapshot's kernel release: the walk or the kernel "
                "is wrong")
        seen.append({"attempt": attempt, "what": what, "busy": busy})
        if attempt < retries:
            time.sleep(random.uniform(0.002, 0.03))
    if mode == "consistent":
        raw.meta["mid_update_seen"] = seen
        if raw.races:
            raw.meta["mid_update"] = seen[-1]
            raw.meta["races"] = {}
    # Tables and the replay are pure computation on what the walk read:
    # done after the guest runs again.
    t = time.monotonic()
    snap = finish(raw)
    snap.meta["replay_seconds"] = round(time.monotonic() - t, 4)
    orphans = snap.stable_nodes[snap.stable_nodes["unreachable"] > 0]
    if len(orphans) and pages:
        # No rmap_item leads to some mappings of these pages: find them in
        # the page tables of every process (a second, short pause).
        with (pause() if hold else contextlib.nullcontext()):
            snap.orphans = _find_orphan_mappings(prog, snap, orphans)
    snap.kernel.source = snap.kernel.source or _source(prog)
    snap.meta.update({
        "mode": mode if is_live_target else "static",
        "paused_seconds": round(paused_total, 4) if hold else 0.0,
        "walk_seconds": round(t_end - t_paused, 4),
        "total_seconds": round(time.monotonic() - t_start, 4),
        "attempts": attempt,
        "taken_at": time.time(),
    })
    if len(snap.rmap_items):
        snap.meta["items_per_second"] = round(len(snap.rmap_items) /
                                              max(snap.meta["walk_seconds"], 1e-9))
    return snap


def _source(prog: Program) -> str:
    return prog.cache.get("ksmlens_source", "")


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


def take_idle_snapshot(prog: Program, vm=None, tries: int = 40, pause=None) -> Snapshot:
    """A consistent snapshot taken while ksmd sleeps between batches, so the
    scan cursor and every rmap_item's SmartScan bytes are at rest (paused
    in the middle of a batch, an item can be half processed). Retries the
    pause up to ``tries`` times."""
    for _ in range(tries):
        snap = take_snapshot(prog, vm=vm, pause=pause)
        if (snap.meta.get("ksmd") or {}).get("idle"):
            return snap
        time.sleep(0.05)
    raise KsmlensError(f"ksmd was busy in {tries} paused snapshots in a row",
                       "lower pages_to_scan or raise sleep_millisecs in the guest")


def _unwalked_ptes(prog: Program, cpus) -> dict:
    """For each mm a CPU is unmapping (:func:`ksmlens.lens.midupdate.unmapping`:
    its kernel stack is in the zap phase of ``munmap()`` or ``exit_mmap()``),
    the present PTEs of its page tables that the walk does not read, counted
    per pfn: ``{"0xMM": {pfn: count}}``. ``munmap()`` detaches the VMAs
    (``vms_gather_munmap_vmas()``) before ``vms_clear_ptes()`` zaps them:
    the PTEs no VMA covers. ``exit_mmap()`` zaps with ``mm_users`` already 0,
    when the walk reads none of the mm's PTEs: all of them. Until zapped,
    these mappings still count in their pages' mapcounts. Read in the same
    pause as the walk; empty when no CPU is unmapping."""
    from ksmlens.lens.midupdate import unmapping_mm
    mms = sorted({int(m, 16) for c in cpus or () if (m := unmapping_mm(c))})
    if not mms:
        return {}
    w = _Walker(prog, live=False)
    pt = pgtable.page_tables(prog, w.mem.read)
    top = pt.user_top                       # the user half (TASK_SIZE)
    out = {}
    for mm in mms:
        try:
            mmo = Object(prog, "struct mm_struct *", mm)
            pgd, users = mmo.pgd.value_(), mmo.mm_users.counter.value_()
        except FaultError:
            continue
        if not pgd:
            continue
        leaves = pt.leaves(pgd, 0, top)
        la = leaves[0][leaves[2] == pgtable.PAGE_SHIFT]
        if users and la.size:               # munmap(): only what no VMA covers
            v = w.vmas(mm)
            covered = np.zeros(la.size, dtype=bool)
            for vs, ve in zip(v["start"].tolist(), v["end"].tolist()):
                covered |= (la >= np.uint64(vs)) & (la < np.uint64(ve))
            la = la[~covered]
        if not la.size:
            continue
        kinds, pfns, _ = pt.decode(leaves, la)
        pfns = pfns[kinds == pgtable.KIND_PRESENT]
        if pfns.size:
            u, n = np.unique(pfns, return_counts=True)
            out[hx(mm)] = dict(zip(u.tolist(), n.tolist()))
    return out


def _find_orphan_mappings(prog: Program, snap: Snapshot, nodes: pd.DataFrame) -> pd.DataFrame:
    """Every (process, address) whose PTE maps one of ``nodes``' KSM pages
    and that the replayed walk does not reach, from the page tables of
    every live mm's anonymous VMAs (VMAs with an anon_vma)."""
    w = _Walker(prog, live=False)
    pt = pgtable.page_tables(prog, w.mem.read)
    kpfn = nodes["kpfn"].to_numpy(dtype=np.int64)
    by_pfn = dict(zip(kpfn.tolist(), nodes["id"].tolist()))
    want = np.array(sorted(by_pfn), dtype=np.uint64)
    rows = {c: [] for c in ORPHAN_COLUMNS}
    for mm, procs in w.mm_owners().items():
        pgd = _pgd_of(w, mm)
        if not pgd:
            continue
        v = w.vmas(mm)
        for vs, ve in zip(v["start"][v["anon_vma"] != 0].tolist(),
                          v["end"][v["anon_vma"] != 0].tolist()):
            leaves = pt.leaves(pgd, vs, ve)
            la = leaves[0][leaves[2] == pgtable.PAGE_SHIFT]
            kinds, pfns, _ = pt.decode(leaves, la)
            hit = np.isin(pfns, want) & ((kinds == pgtable.KIND_PRESENT)
                                         | (kinds == pgtable.KIND_PROT_NONE))
            for a, pfn in zip(la[hit].tolist(), pfns[hit].tolist()):
                pid, comm = procs[0]
                for c, val in (("node", by_pfn[pfn]), ("pid", pid), ("comm", comm),
                               ("mm", hx(mm)), ("address", a)):
                    rows[c].append(val)
    m = snap.mappings
    known = set(zip(m["node"][m["mapped"].fillna(False)].tolist(),
                    m["mm"][m["mapped"].fillna(False)].tolist(),
                    m["address"][m["mapped"].fillna(False)].tolist()))
    keep = [k for k in range(len(rows["node"]))
            if (rows["node"][k], rows["mm"][k], rows["address"][k]) not in known]
    return table({c: [v[k] for k in keep] for c, v in rows.items()}, ORPHAN_COLUMNS)


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
