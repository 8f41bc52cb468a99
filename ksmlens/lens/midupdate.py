"""Half-done KSM updates a paused walk can see, told apart from real mismatches.

QMP stops the guest at any instruction. A walk of that moment is exact, but
some of the kernel's own counts can be one step ahead of, or behind, the
structures they count, because a task on a CPU is in the middle of changing
both: ksmd in ``replace_page()`` (the folio's mapcount raised before the PTE
is set), ksmd between counting an rmap_item and linking it, a task changing a
PTE of a KSM page (COW break, zap, fork), ``munmap()`` between detaching the
VMAs and zapping them, ``exit_mmap()`` under way. Each window below is
recognised only with its evidence (who is on a CPU: :func:`on_cpu`, read in
the same pause, with each vCPU's kernel stack unwound from its registers
(:func:`cpu_stacks`), and exactly which counts differ, by how much, where),
so a real mismatch is never explained away. ``ksmlens check`` retries a pause
that landed in one; ``ksmlens selftests`` counts it as "mid-update
(classified)".
"""

from __future__ import annotations

__all__ = ["on_cpu", "cpu_stacks", "classify", "replace_page_window", "rmap_list_window",
           "pte_update_window", "munmap_window", "exit_mmap_window", "in_flight_window",
           "unmapping", "unmapping_mm", "PTE_UPDATERS", "KSM_UPDATERS", "UNMAP_CALLERS", "ZAPPERS"]

# Kernel functions (6.12) inside which a paused CPU can hold a KSM page's
# PTE and its folio's mapcount apart: the PTE is set or cleared in one step,
# the mapcount (folio_add_anon_rmap_ptes(), folio_remove_rmap_ptes(),
# folio_try_dup_anon_rmap_ptes()) in another. One CPU, one small page: one
# mapping in flight.
PTE_UPDATERS = frozenset({
    # mm/ksm.c
    "replace_page", "try_to_merge_one_page", "break_ksm", "ksm_might_unmap_zero_page",
    # mm/memory.c
    "wp_page_copy", "do_wp_page", "zap_pte_range", "zap_present_ptes",
    "zap_present_folio_ptes", "copy_pte_range", "copy_present_ptes", "copy_present_page",
    "do_swap_page", "restore_exclusive_pte",
    # mm/rmap.c, mm/migrate.c
    "folio_add_anon_rmap_ptes", "folio_remove_rmap_ptes", "try_to_unmap_one",
    "try_to_migrate_one", "remove_migration_pte",
})
# mm/ksm.c functions that change an rmap_item's lists and the counters
# that count them in more than one store: ksm_rmap_items and
# mm->ksm_rmap_items (alloc_rmap_item(), free_rmap_item()), ksm_pages_shared
# / ksm_pages_sharing / mm->ksm_merging_pages / rmap_hlist_len
# (stable_tree_append(), remove_rmap_item_from_tree()), ksm_pages_unshared
# (unstable_tree_search_insert()), the chain and dup counts, the KSM zero
# pages (ksm_map_zero_page() via replace_page(), ksm_might_unmap_zero_page()).
KSM_UPDATERS = frozenset({
    "get_next_rmap_item", "alloc_rmap_item", "free_rmap_item", "remove_trailing_rmap_items",
    "remove_rmap_item_from_tree", "stable_tree_append", "remove_node_from_stable_tree",
    "remove_stable_node", "remove_all_stable_nodes", "unstable_tree_search_insert",
    "stable_tree_insert", "stable_node_dup_del", "free_stable_node_chain",
    "__stable_node_chain", "stable_node_dup", "try_to_merge_with_ksm_page",
    "try_to_merge_two_pages", "unmerge_and_remove_all_rmap_items", "__ksm_exit",
    "replace_page", "ksm_might_unmap_zero_page", "break_ksm", "cmp_and_merge_page",
})


# The zap phase of an unmap (mm/vma.c, mm/mmap.c, mm/memory.c, 6.12): the
# VMAs are already detached (munmap) or the mm has no users (exit_mmap).
UNMAP_CALLERS = frozenset({"do_vmi_align_munmap", "vms_complete_munmap_vmas",
                           "vms_clear_ptes", "exit_mmap"})
ZAPPERS = frozenset({"unmap_vmas", "unmap_single_vma", "unmap_page_range", "zap_pte_range",
                     "zap_present_ptes", "zap_present_folio_ptes"})


def unmapping_mm(c: dict) -> str | None:
    """The mm a CPU entry of :func:`on_cpu` is unmapping, or None: its
    ``mm``, or in ``exit_mmap()`` (``current->mm`` already NULL) its
    ``active_mm``."""
    if not unmapping(c.get("stack")):
        return None
    if c.get("mm"):
        return c["mm"]
    return c.get("active_mm") if "exit_mmap" in c["stack"] else None


def unmapping(stack) -> bool:
    """Is a kernel stack (innermost first) in the zap phase of ``munmap()``
    or ``exit_mmap()``? (:data:`UNMAP_CALLERS` above :data:`ZAPPERS`)."""
    return bool(stack) and bool(UNMAP_CALLERS & set(stack)) and bool(ZAPPERS & set(stack))


def on_cpu(prog, registers=None) -> list[dict]:
    """The task each online CPU runs (``cpu_curr()``), idle tasks left out.
    With ``registers`` (each vCPU's, :meth:`ksmlens.lab.vm.VM.cpu_registers`,
    read in the same pause) each entry also has ``mode`` (``"kernel"`` or
    ``"user"``) and ``stack``, the function names of its kernel stack,
    innermost first (:func:`cpu_stacks`): drgn cannot unwind a running task
    from memory, but it can from the registers QEMU holds."""
    from drgn.helpers.linux.cpumask import for_each_online_cpu
    from drgn.helpers.linux.sched import cpu_curr
    stacks = {s["cpu"]: s for s in cpu_stacks(prog, registers)} if registers else {}
    out = []
    for cpu in for_each_online_cpu(prog):
        t = cpu_curr(prog, cpu)
        tid = t.pid.value_()
        if tid == 0:
            continue
        mm = t.mm.value_()
        e = {"cpu": cpu, "pid": t.tgid.value_(), "tid": tid,
             "comm": t.comm.string_().decode(errors="replace"),
             "mm": f"0x{mm:x}" if mm else None}
        if not mm:
            # exit_mm() clears current->mm before mmput() -> exit_mmap(): the
            # mm being torn down is still the task's active_mm (lazy TLB)
            amm = t.active_mm.value_()
            e["active_mm"] = f"0x{amm:x}" if amm else None
        if cpu in stacks:
            e.update({k: stacks[cpu][k] for k in ("mode", "ip", "stack")})
        out.append(e)
    return out


# x86-64: the kernel half of the address space (arch/x86/include/asm/page_64_types.h)
_KERNEL_HALF = 0xffff800000000000
_PT_REGS = {"ip": "rip", "sp": "rsp", "bp": "rbp", "ax": "rax", "bx": "rbx", "cx": "rcx",
            "dx": "rdx", "si": "rsi", "di": "rdi", "r8": "r8", "r9": "r9", "r10": "r10",
            "r11": "r11", "r12": "r12", "r13": "r13", "r14": "r14", "r15": "r15",
            "flags": "rfl"}
# arm64: kernel addresses are TTBR1's, bit 63 set (arch/arm64/include/asm/memory.h);
# struct pt_regs opens with user_pt_regs: u64 regs[31], sp, pc, pstate
_ARM64_KERNEL = 1 << 63


def _pt_regs(prog, regs: dict):
    """A ``struct pt_regs`` of the vCPU registers ``regs``
    (:meth:`ksmlens.lab.qmp.QMP.cpu_registers`), for drgn's unwinder."""
    import struct

    from drgn import Object
    if "pc" in regs:                                  # arm64
        size = prog.type("struct pt_regs").size
        raw = struct.pack("<34Q", *[regs.get(f"x{i:02d}", 0) for i in range(31)],
                          regs.get("sp", 0), regs["pc"], regs.get("pstate", 0))
        return Object.from_bytes_(prog, "struct pt_regs", raw.ljust(size, b"\0"))
    return Object(prog, "struct pt_regs",
                  value={k: regs[r] for k, r in _PT_REGS.items() if r in regs})


def cpu_stacks(prog, registers) -> list[dict]:
    """Unwind each vCPU's kernel stack from its registers: ``[{"cpu", "mode",
    "ip", "stack"}]``, ``stack`` the function names innermost first (a
    ``struct pt_regs`` built from the registers, unwound by drgn's
    ``Program.stack_trace()``: ORC data on x86-64, frame records on arm64),
    ``None`` with ``error`` if it cannot be unwound; a CPU in user mode has
    ``stack`` ``[]``."""
    out = []
    for regs in registers or ():
        arm64 = "pc" in regs
        ip = regs.get("pc", 0) if arm64 else regs.get("rip", 0)
        kernel = ip >= (_ARM64_KERNEL if arm64 else _KERNEL_HALF)
        e = {"cpu": regs["cpu"], "mode": "kernel" if kernel else "user",
             "ip": f"0x{ip:x}", "stack": []}
        if kernel:
            try:
                e["stack"] = [f.name or f"0x{f.pc:x}"
                              for f in prog.stack_trace(_pt_regs(prog, regs))]
            except Exception as ex:       # a frame drgn cannot unwind: say so
                e["stack"], e["error"] = None, f"{type(ex).__name__}: {ex}"
        out.append(e)
    return out


def classify(snap, bad_rows, cpus=None) -> str | None:
    """What half-done update explains every mismatch of a paused check, or
    None: :func:`replace_page_window`, :func:`rmap_list_window`,
    :func:`pte_update_window`, :func:`munmap_window`, :func:`exit_mmap_window`,
    :func:`in_flight_window` (by the CPUs' kernel stacks)."""
    return (replace_page_window(snap, bad_rows, cpus) or rmap_list_window(snap, bad_rows, cpus)
            or pte_update_window(snap, bad_rows, cpus) or munmap_window(snap, bad_rows, cpus)
            or exit_mmap_window(snap, bad_rows) or in_flight_window(snap, bad_rows, cpus))


def _mapcount_ahead(bad_rows, cpus, snap) -> list:
    """The KSM pages whose mapcount differs from the PTEs the walk read,
    when that row is the only mismatch and who runs on each CPU is known;
    else empty."""
    if not cpus or {r.what for r in bad_rows} != {"KSM pages: PTEs vs mapcount"}:
        return []
    return [n for n in snap.nodes()
            if n.kind in ("regular", "dup") and n.page_is_ksm and n.ptes is not None
            and n.mapcount is not None and n.ptes != n.mapcount]


def munmap_window(snap, bad_rows, cpus=None) -> str | None:
    """A task on a CPU is unmapping KSM pages: ``munmap()`` detaches the
    VMAs first (``do_vmi_align_munmap()``), then ``vms_clear_ptes()`` zaps
    their PTEs. The walk reads PTEs through the VMAs, so a detached range
    still mapped counts in the pages' mapcounts and not in the PTEs.

    With the CPUs' stacks (:func:`on_cpu` with registers) the walk also read,
    in the same pause, the present PTEs of each unmapping mm that it did
    not read through VMAs (``meta["unwalked_ptes"]``: those no VMA covers
    after ``munmap()`` detached them, every one of an mm in ``exit_mmap()``):
    then every KSM page's missing mappings must be exactly those, page by
    page, whether or not ksmd has freed their rmap_items yet. Without
    stacks, every missing mapping must be an rmap_item of a running task's
    mm with no VMA."""
    off = _mapcount_ahead(bad_rows, cpus, snap)
    if not off:
        return None
    det = snap.meta.get("unwalked_ptes") or {}
    busy = {unmapping_mm(c): c for c in cpus if unmapping_mm(c)}
    if det and busy:
        for n in off:
            extra = sum(det.get(mm, {}).get(n.kpfn, 0) for mm in busy)
            if n.mapcount - n.ptes != extra:
                return None
        tasks = ", ".join(f"pid {busy[m]['pid']} ({busy[m]['comm']}) in "
                          f"{next(f for f in busy[m]['stack'] if f in UNMAP_CALLERS)}()"
                          for m in sorted(busy))
        return (f"{tasks} on a CPU zapping: {len(off)} KSM page(s) still mapped "
                f"{sum(n.mapcount - n.ptes for n in off)} time(s) by PTEs the walk cannot "
                "reach, each found in that mm's page tables in this pause (munmap(): "
                "VMAs detached before vms_clear_ptes(); exit_mmap(): mm_users already 0)")
    running = {c["mm"]: c for c in cpus if c["mm"]}
    items = {i.id: i for i in snap.items()}
    who = set()
    for n in off:
        gone = [items[i] for i in n.items if i in items and items[i].mm in running
                and items[i].vma_start is None]
        if not 0 < n.mapcount - n.ptes <= len(gone):
            return None
        who |= {i.mm for i in gone}
    tasks = ", ".join(f"pid {running[m]['pid']} ({running[m]['comm']})" for m in sorted(who))
    return (f"{tasks} on a CPU unmapping: {len(off)} KSM page(s) still mapped "
            f"{sum(n.mapcount - n.ptes for n in off)} time(s) in VMAs already detached "
            "(munmap() before unmap_region())")


def _ksmd_on_cpu(snap, cpus) -> bool:
    """ksmd is running: on a CPU (when that is known), else at least not idle."""
    ksmd = snap.meta.get("ksmd") or {}
    if ksmd.get("idle") is not False:
        return False
    if cpus is None:
        return True
    return any(c["tid"] == ksmd.get("pid") for c in cpus)


def rmap_list_window(snap, bad_rows, cpus=None) -> str | None:
    """ksmd between counting an rmap_item and linking it (or unlinking it
    and uncounting it) at its scan cursor's mm: ``get_next_rmap_item()``
    counts a new item (``alloc_rmap_item()``: ``ksm_rmap_items``;
    ``mm->ksm_rmap_items``) before ``*rmap_list = rmap_item``;
    ``remove_trailing_rmap_items()`` unlinks before ``free_rmap_item()``
    uncounts. One item of the mm at ``ksm_scan.mm_slot``, nothing else."""
    ksmd = snap.meta.get("ksmd") or {}
    if not (_ksmd_on_cpu(snap, cpus) or ksmd.get("in_scan")):
        return None
    slot = next((sl for sl in snap.slots() if sl.id == snap.scan.get("mm_slot")), None)
    if slot is None:
        return None
    label = f"pid {slot.pid}" if slot.pid is not None else f"mm {slot.mm}"
    what = {r.what: r for r in bad_rows}
    if not ({"ksm_rmap_items", f"{label} ksm_rmap_items"} <= set(what)
            <= {"ksm_rmap_items", f"{label} ksm_rmap_items", "general_profit",
                "pages_unshared"}):
        return None
    g, m = what["ksm_rmap_items"], what[f"{label} ksm_rmap_items"]
    gp, un = what.get("general_profit"), what.get("pages_unshared")
    if not (g.kernel == g.walk + 1 and m.kernel == m.walk + 1
            and (gp is None or gp.kernel == gp.walk - snap.kernel.rmap_item_size)
            and (un is None or un.kernel == un.walk + 1)):
        return None
    return (f"ksmd at {label}'s rmap_list (its scan cursor's mm): an rmap_item counted "
            "(ksm_rmap_items, mm->ksm_rmap_items"
            + (", and pages_unshared: it was UNSTABLE" if un else "")
            + ") but not linked in, or unlinked and not yet removed from its tree and "
            "freed (get_next_rmap_item(), remove_trailing_rmap_items())")


def pte_update_window(snap, bad_rows, cpus=None) -> str | None:
    """A task on a CPU whose mm maps a KSM page is changing one of its PTEs:
    a COW break (``wp_page_copy()`` replaces the PTE, then
    ``folio_remove_rmap_pte()`` on the KSM page), a zap, or a fork's copy
    (``folio_try_dup_anon_rmap_pte()`` before ``set_ptes()``). A page's
    mapcount can then be ahead of its PTEs by at most the number of such
    tasks. Needs :func:`on_cpu`."""
    off = _mapcount_ahead(bad_rows, cpus, snap)
    if not off:
        return None
    running = {c["mm"]: c for c in cpus if c["mm"]}
    items = {i.id: i for i in snap.items()}
    who = set()
    for n in off:
        mms = {items[i].mm for i in n.items if i in items} & set(running)
        if not 0 < n.mapcount - n.ptes <= len(mms):
            return None
        who |= mms
    ahead = sum(n.mapcount - n.ptes for n in off)
    if ahead > len(who):
        return None
    tasks = ", ".join(f"pid {running[m]['pid']} ({running[m]['comm']})" for m in sorted(who))
    return (f"{tasks} on a CPU, its mm mapping {len(off)} KSM page(s) whose mapcount is "
            f"{ahead} ahead of the PTEs: a PTE changed (COW break, zap or fork copy) before "
            "the page's mapcount")


def exit_mmap_window(snap, bad_rows) -> str | None:
    """Are the only mismatches KSM pages still mapped by an mm in
    ``exit_mmap()``? Once ``mm_users`` is 0 the walk reads no PTEs of that
    mm, but ``unmap_vmas()`` zaps them (and drops each page's mapcount) one
    by one until ``free_pgtables()``: a paused walk can see a page's
    mapcount ahead of the PTEs it read by up to the exiting mm's rmap_items
    on that page's node. Returns what was seen, or None."""
    if {r.what for r in bad_rows} != {"KSM pages: PTEs vs mapcount"}:
        return None
    exiting = {sl.mm for sl in snap.slots() if sl.mm_users == 0}
    if not exiting:
        return None
    items = {i.id: i for i in snap.items()}
    off = [n for n in snap.nodes()
           if n.kind in ("regular", "dup") and n.page_is_ksm and n.ptes is not None
           and n.mapcount is not None and n.ptes != n.mapcount]
    for n in off:
        gone = sum(1 for i in n.items if i in items and items[i].mm in exiting)
        if not 0 < n.mapcount - n.ptes <= gone:
            return None
    pids = sorted({sl.pid for sl in snap.slots() if sl.mm in exiting and sl.pid is not None})
    return (f"exit_mmap() in progress ({len(exiting)} mm(s) with mm_users 0"
            + (f", pid {', '.join(map(str, pids))}" if pids else "")
            + f"): {len(off)} KSM page(s) still count "
            f"{sum(n.mapcount - n.ptes for n in off)} mapping(s) of it not yet zapped")


def replace_page_window(snap, bad_rows, cpus=None) -> str | None:
    """Is every mismatch one mapping that ksmd is installing right now?

    ``cmp_and_merge_page()`` takes its rmap_item off the trees
    (``remove_rmap_item_from_tree()``: state none), then ``replace_page()``
    (mm/ksm.c) counts the new mapping first, ``folio_add_anon_rmap_pte()``
    on the KSM page (or ``ksm_map_zero_page()``: ``ksm_zero_pages`` and
    ``mm->ksm_zero_pages`` for the zero page), and only then
    ``ptep_clear_flush()`` (a TLB flush IPI, long under TCG) and
    ``set_pte_at()`` install the PTE. A pause in between sees the kernel's
    count one ahead of the page tables at exactly ksmd's scan cursor
    (``ksm_scan.rmap_list`` is the address of the item being merged). Returns
    what was seen, or None if the mismatch is anything else."""
    if not _ksmd_on_cpu(snap, cpus):       # it holds the PTE lock: on a CPU
        return None
    items = {i.id: i for i in snap.items()}
    cur = items.get(snap.scan.get("rmap_list") or "")
    if cur is None or cur.state != "none":
        return None
    slot = next((sl for sl in snap.slots() if sl.mm == cur.mm), None)
    label = None if slot is None else (f"pid {slot.pid}" if slot.pid is not None
                                       else f"mm {slot.mm}")
    page = 1 << snap.kernel.page_shift
    what = {r.what: r for r in bad_rows}
    if set(what) == {"KSM pages: PTEs vs mapcount"}:
        r = what["KSM pages: PTEs vs mapcount"]
        off = [n for n in snap.nodes()
               if n.kind in ("regular", "dup") and n.page_is_ksm and n.ptes is not None
               and n.mapcount is not None and n.ptes != n.mapcount]
        if (r.kernel == r.walk + 1 and len(off) == 1 and off[0].mapcount == off[0].ptes + 1
                and cur.pfn != off[0].kpfn and cur.stable_node != off[0].id):
            return (f"ksmd in replace_page(): {label} {cur.address:#x} counted in the mapcount "
                    f"of KSM page {off[0].kpfn:#x} (node {off[0].id}), its PTE "
                    f"{cur.pte} not yet set")
        return None
    zero = {"ksm_zero_pages", "general_profit", f"{label} ksm_zero_pages"}
    if label and set(what) <= zero and "ksm_zero_pages" in what and cur.pte != "ksm_zero":
        z, pz = what["ksm_zero_pages"], what.get(f"{label} ksm_zero_pages")
        gp = what.get("general_profit")
        if (z.kernel == z.walk + 1 and pz is not None and pz.kernel == pz.walk + 1
                and (gp is None or gp.kernel == gp.walk + page)):
            return (f"ksmd in replace_page(): {label} {cur.address:#x} counted as a KSM zero "
                    f"page (ksm_map_zero_page()), its PTE {cur.pte} not yet the zero page")
    return None


def _in(stack, names) -> str | None:
    """The innermost function of ``names`` on ``stack`` (innermost first)."""
    return next((f for f in (stack or ()) if f in names), None)


def in_flight_window(snap, bad_rows, cpus=None) -> str | None:
    """Every mismatch within what the CPUs' kernel stacks show in flight.

    Needs each CPU's stack (:func:`on_cpu` with registers). A CPU inside a
    :data:`PTE_UPDATERS` function can hold one mapping of one KSM page
    apart from its mapcount; inside a :data:`KSM_UPDATERS` function, one
    rmap_item apart from each count of it. So: every KSM page whose
    mapcount differs from its PTEs must differ by at most the PTE updaters
    that may touch it (ksmd for any page; another task only if its mm has an
    rmap_item on the page's node), each counter row by at most the KSM
    updaters (for ``pid N ...`` rows, those running that mm, or ksmd), and
    ``general_profit`` exactly as the other rows' differences make it
    (``general_profit_show()``). Anything else is not explained."""
    if not cpus or any(c.get("stack") is None for c in cpus):
        return None
    ksmd_pid = (snap.meta.get("ksmd") or {}).get("pid")
    pte = [(c, _in(c["stack"], PTE_UPDATERS)) for c in cpus]
    pte = [(c, f) for c, f in pte if f]
    ksm = [(c, _in(c["stack"], KSM_UPDATERS)) for c in cpus]
    ksm = [(c, f) for c, f in ksm if f]
    if not pte and not ksm:
        return None
    items = {i.id: i for i in snap.items()}
    page = 1 << snap.kernel.page_shift
    delta = {}
    for r in bad_rows:
        if r.kernel is None or r.walk is None:
            return None
        delta[r.what] = r.kernel - r.walk
    used = set()
    for what, d in delta.items():
        if what == "KSM pages: PTEs vs mapcount":
            off = [n for n in snap.nodes()
                   if n.kind in ("regular", "dup") and n.page_is_ksm and n.ptes is not None
                   and n.mapcount is not None and n.ptes != n.mapcount]
            for n in off:
                mms = {items[i].mm for i in n.items if i in items}
                may = [(c, f) for c, f in pte if c["tid"] == ksmd_pid or c["mm"] in mms]
                if not may or abs(n.mapcount - n.ptes) > len(may):
                    return None
                used |= {(c["cpu"], f) for c, f in may}
        elif what == "general_profit":
            continue
        elif what.startswith(("pid ", "mm ")):
            label, _, counter = what.rpartition(" ")
            slot = next((sl for sl in snap.slots()
                         if (f"pid {sl.pid}" if sl.pid is not None else f"mm {sl.mm}") == label),
                        None)
            may = [(c, f) for c, f in ksm if slot is not None
                   and (c["tid"] == ksmd_pid or c["mm"] == slot.mm)]
            if not may or abs(d) > len(may):
                return None
            used |= {(c["cpu"], f) for c, f in may}
        else:
            if not ksm or abs(d) > len(ksm):
                return None
            used |= {(c["cpu"], f) for c, f in ksm}
    if "general_profit" in delta:
        want = ((delta.get("pages_sharing", 0) + delta.get("ksm_zero_pages", 0)) * page
                - delta.get("ksm_rmap_items", 0) * snap.kernel.rmap_item_size)
        if delta["general_profit"] != want:
            return None
    if not used:
        return None
    who = "; ".join(f"CPU {cpu} in {f}()" for cpu, f in sorted(used))
    return (f"{who} (its kernel stack, unwound from the paused registers): "
            + ", ".join(f"{w} {d:+d}" for w, d in delta.items()) + " in flight")
