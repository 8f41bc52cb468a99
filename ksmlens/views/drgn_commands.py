"""``%ksm``: ksmlens as drgn REPL commands (drgn 0.3.0 command API).

Installed as a ``drgn.plugins`` entry point (see pyproject.toml): any drgn
started from the ksmlens venv has them, e.g.::

    $ drgn --qemu ~/.cache/ksmlens/vms/ksmlens/drgn.sock -s VMLINUX
    >>> %ksm stable            # stable tree: chains, dups, regular nodes, sharers
    >>> %ksm rmap 1234         # pid 1234's rmap_items and their pgoffs
    >>> %ksm stale             # rmap_items an rmap walk would look up at the wrong pgoff
    >>> %ksm smartscan         # SmartScan: age, remaining_skips, next visit
    >>> %ksm axis 1234         # pid 1234 on one address axis: VMAs, walk rules, SmartScan
    >>> %ksm check             # the walk against the kernel's own counters
    >>> %ksm cost              # rmap_walk_ksm()'s work per KSM page and rule, worst first
    >>> %ksm stale --drgn      # print the ksmlens/drgn code instead of running

Each view walks the kernel unpaused (``take_snapshot(prog, mode="live")``)
and prints a table from :mod:`ksmlens.views.report`; this module only parses
arguments and prints: no analysis lives here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from drgn import Program
from drgn.commands import DrgnCodeBuilder, argument, drgn_argument
from drgn.commands.linux import linux_kernel_command

from ksmlens.errors import KsmlensError

__all__: list[str] = []

VIEWS = {
    "stable": "the stable tree: chain heads, their dups and regular nodes, each "
              "with its KSM page (kpfn), mapcount and sharers (pid:rmap_items)",
    "rmap": "PID's rmap_items (one per scanned page of its mm): address, state, stable "
            "node, address >> PAGE_SHIFT vs linear_page_index(), stored pgoff, "
            "pgoff_status",
    "stale": "rmap_items whose pgoff an rmap walk would get wrong (pgoff_status != ok: "
             "moved by mremap, a file or the stack; a stored pgoff left stale), with "
             "the cause",
    "smartscan": "per non-KSM rmap_item: age, remaining_skips and whether ksmd's next "
                 "visit processes it or skips it (mm/ksm.c should_skip_rmap_item(), "
                 "skip_age())",
    "axis": "PID's rmap_items on one address axis: its VMAs and how far each sits from "
            "its vm_pgoff (mremap), whether each rmap walk rule (stock, v3, stored) finds "
            "each item's mapping, and SmartScan's age, remaining_skips and next visits "
            "(processed / skipped / freed); the text of plots.address_axis",
    "check": "the walk's counts against the kernel's own counters (the variables "
             "/sys/kernel/mm/ksm and /proc/PID/ksm_stat print)",
    "cost": "rmap_walk_ksm()'s work per KSM page under each rule (stock, v3, stored): the "
            "VMAs the anon_vma interval tree yields per walk, worst first (the pages that "
            "would hold the anon_vma lock longest), then the totals "
            "(ksmlens.analysis.cost.walk_cost)",
}

_EPILOG = "Views:\n\n" + "\n\n".join(f"{k}: {v}." for k, v in VIEWS.items()) + """

The walk does not pause the guest (drgn holds the QMP socket ksmlens would
pause it with): what raced with ksmd is counted and shown. For a paused walk
checked against sysfs, run `ksmlens check` on the host. On /proc/kcore (drgn
on the running kernel, as root) nothing can pause the kernel: hold ksmd with
`echo 0 > /sys/kernel/mm/ksm/run` for a steady state; `%ksm check` there
reads /sys/kernel/mm/ksm and /proc/PID/ksm_stat itself."""


def _kcore_note(prog: Program) -> None:
    """On /proc/kcore, say once per Program that nothing pauses the kernel."""
    from ksmlens.lab.host import KCORE_NOTE, is_kcore
    if is_kcore(prog) and not prog.cache.get("ksmlens_kcore_said"):
        prog.cache["ksmlens_kcore_said"] = True
        print(f"note: {KCORE_NOTE}")


def _snapshot(prog: Program):
    from ksmlens.lab.attach import check_ksm_kernel
    from ksmlens.lens.snapshot import take_snapshot
    check_ksm_kernel(prog)
    _kcore_note(prog)
    return take_snapshot(prog, mode="live")


def _races(snap) -> None:
    races = snap.meta.get("races") or {}
    if races:
        print("note: the unpaused walk raced with the kernel: "
              + ", ".join(f"{k} x{v}" for k, v in races.items()))


# ------------------------------------------------------------------ --drgn code

def _code_stable(code: DrgnCodeBuilder, args) -> None:
    code.add_from_import("ksmlens.lens.helpers", "for_each_stable_tree_node", "is_stable_node_chain",
                         "for_each_stable_node_dup", "for_each_stable_node_rmap_item",
                         "for_each_migrate_node", "rmap_item_tasks")
    code.append('''\
def sharers(node):
    pids = [task.pid.value_() for item in for_each_stable_node_rmap_item(node)
            for task in rmap_item_tasks(item)]
    return " ".join(f"{pid}:{pids.count(pid)}" for pid in sorted(set(pids)))


# A tree node is a chain head (rmap_hlist_len == STABLE_NODE_CHAIN, its dups
# on ->hlist) or a regular node (its rmap_items on ->hlist). Nodes whose page
# changed NUMA node wait on migrate_nodes.
pages = 0
for node in for_each_stable_tree_node(prog):
    if is_stable_node_chain(node):
        print(f"chain   {node.value_():#x}")
        for dup in for_each_stable_node_dup(node):
            pages += 1
            print(f"  dup   {dup.value_():#x} kpfn {dup.kpfn.value_()} {sharers(dup)}")
    else:
        pages += 1
        print(f"regular {node.value_():#x} kpfn {node.kpfn.value_()} {sharers(node)}")
for node in for_each_migrate_node(prog):
    pages += 1
    print(f"migrate {node.value_():#x} kpfn {node.kpfn.value_()} {sharers(node)}")
print(f"{pages} stable nodes holding a KSM page (pages_shared)")
''')


def _code_rmap(code: DrgnCodeBuilder, args) -> None:
    code.add_from_import("drgn.helpers.linux.pid", "find_task")
    code.add_from_import("ksmlens.lens.helpers", "for_each_ksm_mm_slot", "for_each_mm_slot_rmap_item",
                         "rmap_item_address", "rmap_item_state", "rmap_item_vma",
                         "rmap_item_addr_pgoff", "rmap_item_stored_pgoff", "linear_page_index")
    code.append(f'''\
pid = {args.pid}
mm = find_task(prog, pid).mm
# mm_slots_hash would find the slot in O(1); the scan list is simpler.
slot = next(s for s in for_each_ksm_mm_slot(prog) if s.slot.mm == mm)
for item in for_each_mm_slot_rmap_item(slot):
    address = rmap_item_address(item)
    state = rmap_item_state(item)
    node = item.head.value_() if state == "stable" else None
    vma = rmap_item_vma(item)
    lpi = linear_page_index(vma, address) if vma is not None else None
    # The v3 walk searches address >> PAGE_SHIFT; the mapping is at lpi.
    print(f"{{address:#x}} {{state}} node={{node and hex(node)}} "
          f"addr_pgoff={{rmap_item_addr_pgoff(item):#x}} "
          f"lpi={{lpi and hex(lpi)}} stored={{rmap_item_stored_pgoff(item)}}")
''')


def _code_stale(code: DrgnCodeBuilder, args) -> None:
    code.add_from_import("ksmlens.lens.snapshot", "take_snapshot")
    code.add_from_import("ksmlens.analysis.core", "stale_items")
    code.append("# One fast walk into plain data; ksmlens.analysis.core has set, on every\n"
                "# rmap_item, pgoff_status (address >> PAGE_SHIFT vs linear_page_index),\n"
                "# stored_status and walk (does each rule's walk find the mapping).\n"
                'snap = take_snapshot(prog, mode="live")\n')
    cond = "True" if args.pid is None else f"item.pid == {args.pid}"
    code.append(f'''\
stale = [item for item in stale_items(snap) if {cond}]
for item in stale:
    print(item.pid, item.comm, hex(item.address), item.state, item.pgoff_status,
          item.pgoff_cause, item.stored_status, item.walk)
print(len(stale), "stale rmap_items")
''')


def _code_smartscan(code: DrgnCodeBuilder, args) -> None:
    code.add_from_import("ksmlens.lens.snapshot", "take_snapshot")
    code.add_from_import("ksmlens.analysis.core", "page_is_ksm", "smartscan_next")
    code.append('snap = take_snapshot(prog, mode="live")\n')
    cond = "not page_is_ksm(snap, item)"
    if args.pid is not None:
        cond += f" and item.pid == {args.pid}"
    code.append(f'''\
for item in snap.items():
    if {cond}:
        # what mm/ksm.c should_skip_rmap_item() does at ksmd's next 8 visits:
        # "P" processed, "S" skipped
        # (or "freed": the next pass frees the item unread, item.not_visited says why)
        nxt = smartscan_next(snap, item, 8)
        print(item.pid, hex(item.address), item.state, item.age, item.remaining_skips,
              nxt["schedule"] or "freed:" + str(nxt["freed"]))
''')


def _code_axis(code: DrgnCodeBuilder, args) -> None:
    code.add_from_import("ksmlens.lens.snapshot", "take_snapshot")
    code.add_from_import("ksmlens.analysis.core", "address_axis_frame")
    code.append(f'''\
snap = take_snapshot(prog, mode="live")
# one row per rmap_item of the pid: the VMA (vma_shift = vm_pgoff - vm_start >> 12),
# rule_stock / rule_v3 / rule_stored (found, missed, not_stable, no_vma, n/a),
# age, remaining_skips and visit_1..visit_8 (processed, skipped, freed)
df = address_axis_frame(snap, {args.pid}, visits=8)
print(df[["address", "state", "vma_shift", "rule_stock", "rule_v3", "rule_stored",
          "page_ksm", "age", "remaining_skips", "schedule"]].to_string())
''')


def _code_check(code: DrgnCodeBuilder, args) -> None:
    code.add_from_import("ksmlens.experiments.check", "check_live")
    code.add_from_import("ksmlens.views.tables", "check_table")
    code.append('''\
# The walk's counts vs the kernel variables /sys/kernel/mm/ksm and
# /proc/PID/ksm_stat print, read before and after an unpaused walk.
rows, snap, info = check_live(prog)
print(check_table(rows, kernel="before", globals="after"))
''')


# ------------------------------------------------------------------ views

def _view_stable(prog, args) -> None:
    from ksmlens.views.report import stable_table, summary
    snap = _snapshot(prog)
    print(summary(snap))
    pages = sum(1 for n in snap.nodes() if n.kind != "chain" and n.items)
    print(f"{pages} stable nodes hold a KSM page (pages_shared = "
          f"{snap.counters.get('pages_shared')}), "
          f"{sum(1 for n in snap.nodes() if n.kind == 'chain')} chains")
    print(stable_table(snap, limit=args.limit))
    _races(snap)


def _view_rmap(prog, args) -> None:
    from ksmlens.views.report import rmap_table
    if args.pid is None:
        raise KsmlensError("%ksm rmap needs a PID", "e.g. %ksm rmap 1234 (see %ksm check "
                           "or %ksm stable for the pids KSM knows)")
    snap = _snapshot(prog)
    print(rmap_table(snap, args.pid))
    _races(snap)


def _view_stale(prog, args) -> None:
    from ksmlens.views.report import stale_table
    snap = _snapshot(prog)
    k = snap.kernel
    print(f"kernel {k.release} (stored pgoff: {'yes' if k.has_stored_pgoff else 'no'}, its "
          f"rmap walk rule: {k.walk_rule or 'unknown'}). An rmap walk searches one index "
          "and finds every VMA whose pgoff range holds it: moved = address >> PAGE_SHIFT "
          "(what v3 searches) is not the mapping's linear_page_index(); stored_st = the "
          "stored index (union, v8) against it; S3I = does the stock / v3 / stored walk "
          "find the mapping (+/-), replayed on the real trees")
    print(stale_table(snap, args.pid))
    _races(snap)


def _view_smartscan(prog, args) -> None:
    from ksmlens.views.report import smartscan_table
    snap = _snapshot(prog)
    print(smartscan_table(snap, args.pid))
    _races(snap)


def _view_axis(prog, args) -> None:
    from ksmlens.views.report import axis_table
    if args.pid is None:
        raise KsmlensError("%ksm axis needs a PID", "e.g. %ksm axis 1234 (see %ksm stable "
                           "for the pids KSM knows)")
    snap = _snapshot(prog)
    print(axis_table(snap, args.pid, limit=args.limit))
    _races(snap)


def _view_check(prog, args) -> None:
    from ksmlens.experiments.check import LIVE_NOTE, check_live, check_vm, unreachable_note
    from ksmlens.lab.attach import check_ksm_kernel
    from ksmlens.lab.host import LocalKernel, is_kcore
    from ksmlens.views.tables import check_text
    check_ksm_kernel(prog)
    if is_kcore(prog):      # this machine's kernel: its sysfs and ksm_stat are here
        _kcore_note(prog)
        rows, snap, info = check_vm(LocalKernel(), prog, mode="live")
        print(check_text(rows, snap, info, notes=[unreachable_note(snap)]))
        return
    rows, snap, info = check_live(prog)
    print(check_text(rows, snap, info, live=True))
    print("note: " + LIVE_NOTE)


def _code_cost(code: DrgnCodeBuilder, args) -> None:
    code.add_from_import("ksmlens.lens.snapshot", "take_snapshot")
    code.add_from_import("ksmlens.analysis.cost", "walk_cost", "worst_pages", "cost_totals")
    code.append(f'''\
snap = take_snapshot(prog, mode="live")
cost = walk_cost(snap, kinds=("full",))   # a DataFrame: one row per (page, rule, walk)
print(worst_pages(cost, {args.limit or 20}).to_string(index=False))
print(cost_totals(cost).to_string(index=False))
''')


def _view_cost(prog, args) -> None:
    from ksmlens.analysis.cost import cost_totals, walk_cost, worst_pages
    from ksmlens.views.tables import cost_table, cost_totals_table
    snap = _snapshot(prog)
    c = walk_cost(snap, kinds=("full",))
    print(f"kernel {snap.kernel.release}: VMAs the anon_vma interval tree yields per full "
          "rmap_walk_ksm() of each KSM page (the anon_vma lock held), worst first")
    print(cost_table(worst_pages(c, args.limit or 20), list(c["rule"].unique())))
    print(cost_totals_table(cost_totals(c)))
    _races(snap)


_VIEW_FUNCS = {"stable": (_view_stable, _code_stable), "rmap": (_view_rmap, _code_rmap),
               "stale": (_view_stale, _code_stale),
               "smartscan": (_view_smartscan, _code_smartscan),
               "axis": (_view_axis, _code_axis),
               "check": (_view_check, _code_check),
               "cost": (_view_cost, _code_cost)}


@linux_kernel_command(
    name="ksm",
    description="KSM state (stable tree, rmap_items, stale pgoffs, SmartScan) via ksmlens",
    usage="**ksm** {stable,rmap,stale,smartscan,axis,check,cost} [*PID*] [--limit *N*] [--drgn] [-h]",
    long_description="Walk the kernel's KSM structures (mm/ksm.c) with ksmlens and "
    "print one view of them.",
    epilog=_EPILOG,
    arguments=(
        argument("view", nargs="?", choices=list(VIEWS), help="what to show (see views below)"),
        argument("pid", nargs="?", type=int,
                 help="process ID: required for rmap and axis, a filter for stale and "
                 "smartscan"),
        argument("--limit", type=int, default=None, metavar="N",
                 help="stable: show only the first N nodes; axis: the first N rows "
                 "(default: all); cost: the N worst pages (default 20)"),
        argument("-h", "--help", action="store_true", help="show this help"),
        drgn_argument,
    ),
)
def _cmd_ksm(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    if args.help or args.view is None:
        sys.stdout.write(kwargs["parser"].format_help())
        return
    view, code_fn = _VIEW_FUNCS[args.view]
    if args.drgn:
        if args.view in ("rmap", "axis") and args.pid is None:
            raise KsmlensError(f"%ksm {args.view} needs a PID",
                               f"e.g. %ksm {args.view} 1234 --drgn")
        code = DrgnCodeBuilder(prog)
        code_fn(code, args)
        code.print()
        return
    try:
        view(prog, args)
    except BrokenPipeError:
        pass
    sys.stdout.flush()


def drgn_prog_set(prog: Program) -> None:
    """drgn plugin hook, called when a Program is set to a kernel: importing
    this module (the entry point) registers ``%ksm``; for a kernel this adds
    ksmlens' vmlinux finder (the lab's builds, the standard debug paths, by
    build ID: :mod:`ksmlens.lab.debuginfo`) before drgn's own, so a plain
    ``drgn`` on /proc/kcore in a lab guest finds the lab's vmlinux."""
    from drgn import ProgramFlags
    if prog.flags & ProgramFlags.IS_LINUX_KERNEL:
        from ksmlens.lab.debuginfo import register_finder
        register_finder(prog)
