"""Readable tables from a :class:`~ksmlens.lens.model.Snapshot` (``ksmlens report``)."""

from __future__ import annotations

from collections import Counter

from ksmlens.lens.model import Snapshot

__all__ = ["stable_table", "process_table", "summary", "rmap_table", "stale_table",
           "knobs_table", "counters_table", "smartscan_table"]


def summary(snap: Snapshot) -> str:
    k, c = snap.kernel, snap.counters
    mode = snap.meta.get("mode", "?")
    pause = snap.meta.get("paused_seconds")
    lines = [f"kernel {k.release} (variant {k.variant or '-'}, stored pgoff: "
             f"{'yes' if k.has_stored_pgoff else 'no'}, {k.nr_node_ids} tree root(s))",
             f"walk: {len(snap.rmap_items)} rmap_items, {len(snap.stable_nodes)} stable nodes, "
             f"{len(snap.mm_slots)} mm slots in {snap.meta.get('walk_seconds', 0):.3f} s "
             f"({mode}" + (f", guest paused {pause:.3f} s" if pause else "") + ")",
             "counters: " + "  ".join(f"{n}={c.get(n)}" for n in
                                      ("pages_shared", "pages_sharing", "pages_unshared",
                                       "pages_volatile", "full_scans", "stable_node_chains",
                                       "stable_node_dups", "ksm_zero_pages"))]
    un = [n for n in snap.nodes() if n.unreachable]
    if un:
        lines.append(f"unreachable: {len(un)} KSM page(s) with {sum(n.unreachable for n in un)} "
                     "mapping(s) no rmap_item leads to (no kernel can unmap them)")
    mid = snap.meta.get("mid_update")
    if mid:
        lines.append("every paused walk landed in a half-done KSM update ("
                     + "; ".join(mid["what"]) + "; busy: " + "; ".join(mid["busy"]) + ")")
    races = snap.meta.get("races") or {}
    if races:
        lines.append("raced with the kernel: " + ", ".join(f"{k} x{v}" for k, v in races.items()))
    return "\n".join(lines)


def stable_table(snap: Snapshot, limit: int | None = 50) -> str:
    """One row per stable node: kind, kpfn, mapcount, sharers (pid:count)."""
    rows = [f"{'node':18}  {'kind':7}  {'chain':18}  {'kpfn':>8}  {'nid':>3}  {'maps':>4}  "
            f"{'items':>5}  sharers"]
    shown = 0
    for n in snap.nodes():
        if limit is not None and shown >= limit:
            rows.append(f"... {len(snap.stable_nodes) - shown} more (use --all)")
            break
        if n.kind == "chain":
            sharers = f"{len(n.dups)} dups"
        else:
            cnt = Counter(snap.item(i).pid for i in n.items)
            sharers = " ".join(f"{pid}:{c}" for pid, c in sorted(cnt.items(), key=str))
        rows.append(f"{n.id:18}  {n.kind:7}  {n.chain or '':18}  "
                    f"{'' if n.kpfn is None else n.kpfn:>8}  {n.nid:>3}  "
                    f"{'' if n.mapcount is None else n.mapcount:>4}  {len(n.items):>5}  {sharers}")
        shown += 1
    return "\n".join(rows)


def process_table(snap: Snapshot) -> str:
    """One row per mm slot: pid, comm, items by state, and pgoff mismatches."""
    rows = [f"{'pid':>7}  {'comm':16}  {'items':>6}  {'stable':>6}  {'unstable':>8}  "
            f"{'none':>5}  {'no_vma':>6}  {'addr_pgoff!=lpi':>15}  {'freed_next':>10}  "
            f"{'zero_pages':>10}  ksm_stat(items/merging/zero)"]
    for s in snap.slots():
        items = [snap.item(i) for i in s.items]
        st = Counter(i.state for i in items)
        no_vma = sum(1 for i in items if i.linear_page_index is None)
        moved = sum(1 for i in items if i.linear_page_index is not None
                    and i.linear_page_index != i.addr_pgoff)
        freed = sum(1 for i in items if i.will_visit is False)
        pids = ",".join(map(str, s.pids)) if s.pids else (
            "exited" if s.mm_users == 0 else "-")
        rows.append(f"{pids:>7}  {(s.comm or '-'):16}  "
                    f"{len(items):>6}  {st['stable']:>6}  {st['unstable']:>8}  {st['none']:>5}  "
                    f"{no_vma:>6}  {moved:>15}  {freed:>10}  {_num(s.ksm_zero_pages):>10}  "
                    f"{s.mm_ksm_rmap_items}/{s.mm_ksm_merging_pages}/{_num(s.mm_ksm_zero_pages)}")
    return "\n".join(rows)


def _hex(v) -> str:
    return "-" if v is None else f"0x{v:x}"


def _num(v) -> str:
    return "-" if v is None else str(v)


def _walk_cell(i) -> str:
    """Per rule (stock, v3, stored), does the walk find this item's mapping:
    ``+`` found, ``-`` missed, ``.`` not applicable."""
    w = i.walk or {}
    return "".join("." if w.get(r) is None else "+" if w[r] else "-"
                   for r in ("stock", "v3", "stored"))


def _next_cell(i) -> str:
    if i.will_visit is None:
        return "-"
    return "visit" if i.will_visit else f"free:{i.not_visited}"


def rmap_table(snap: Snapshot, pid: int, limit: int | None = None) -> str:
    """One row per rmap_item of ``pid``'s mm, by address: state, stable node,
    the pgoff the v3 walk uses (``address >> PAGE_SHIFT``), the mapping's
    ``linear_page_index()``, the stored index (STABLE items only) and its
    status, whether each rule's walk finds the mapping (stock, v3, stored:
    ``+`` / ``-`` / ``.``), the page table entry there (``pte``, ``*`` when
    the page mapped is KSM: ``PageKsm()``), what ksmd's next pass does with
    the item (visit, or free it unread and why) and ``pgoff_status``."""
    from ksmlens.errors import KsmlensError
    items = sorted(snap.items_of(pid), key=lambda i: i.address)
    if not items and not any(pid in (s.pids or [s.pid]) for s in snap.slots()):
        pids = ", ".join(str(p) for p in sorted(p for s in snap.slots()
                                                 for p in (s.pids or [s.pid])
                                                 if p is not None)) or "none"
        raise KsmlensError(f"pid {pid} has no KSM mm slot",
                           f"processes known to KSM: {pids}")
    if not items:        # a process sharing another's mm (CLONE_VM): its owner's items
        slot = next(s for s in snap.slots() if pid in (s.pids or []))
        items = sorted((snap.item(i) for i in slot.items), key=lambda i: i.address)
    rows = [f"{'address':>14}  {'state':8}  {'stable_node':18}  {'addr_pgoff':>10}  "
            f"{'lin_pg_idx':>10}  {'stored':>10}  {'stored_st':9}  {'S3I':3}  "
            f"{'pte':10}  {'next':18}  pgoff_status"]
    for i in items[:limit]:
        status = i.pgoff_status + (f" ({i.pgoff_cause})" if i.pgoff_cause else "")
        pte = i.pte + ("*" if i.page_ksm else "")
        rows.append(f"{i.address:>#14x}  {i.state:8}  {i.stable_node or '-':18}  "
                    f"{_hex(i.addr_pgoff):>10}  {_hex(i.linear_page_index):>10}  "
                    f"{_hex(i.stored_pgoff):>10}  {i.stored_status or '-':9}  "
                    f"{_walk_cell(i):3}  {pte:10}  {_next_cell(i):18}  {status}")
    if limit is not None and len(items) > limit:
        rows.append(f"... {len(items) - limit} more")
    st = Counter(i.pgoff_status for i in items)
    rows.append(f"pid {pid}: {len(items)} rmap_items, "
                + ", ".join(f"{k} {v}" for k, v in sorted(st.items()))
                + "; S3I: does the stock / v3 / stored walk find the mapping (+ yes, - no, "
                ". not applicable); pte * = the page mapped there is KSM")
    return "\n".join(rows)


def stale_table(snap: Snapshot, pid: int | None = None, rule: str | None = None) -> str:
    """The rmap_items some rmap walk gets wrong (:func:`ksmlens.analysis.core.stale_items`:
    a rule misses the mapping, or the stored index is stale), each rule's
    answer apart (stock, v3, stored: ``+`` found, ``-`` missed), with the
    cause, then a count per process."""
    from ksmlens.analysis.core import stale_items
    items = [i for i in stale_items(snap, rule) if pid is None or i.pid == pid]
    items.sort(key=lambda i: (str(i.pid), i.address))
    rows = [f"{'pid':>7}  {'comm':16}  {'address':>14}  {'state':8}  {'status':8}  "
            f"{'cause':6}  {'addr_pgoff':>10}  {'lin_pg_idx':>10}  {'stored':>10}  "
            f"{'stored_st':9}  {'S3I':3}  vm_pgoff"]
    for i in items:
        rows.append(f"{_num(i.pid):>7}  {(i.comm or '-'):16}  {i.address:>#14x}  {i.state:8}  "
                    f"{i.pgoff_status:8}  {i.pgoff_cause or '-':6}  {_hex(i.addr_pgoff):>10}  "
                    f"{_hex(i.linear_page_index):>10}  {_hex(i.stored_pgoff):>10}  "
                    f"{i.stored_status or '-':9}  {_walk_cell(i):3}  {_hex(i.vm_pgoff)}")
    per = Counter((i.pid, i.comm, i.pgoff_status) for i in items)
    missed = {r: sum(1 for i in items if (i.walk or {}).get(r) is False)
              for r in ("stock", "v3", "stored")}
    rows.append(f"stale: {len(items)} of {len(snap.rmap_items)} rmap_items"
                + (f" of pid {pid}" if pid is not None else "")
                + ("" if not per else ": " + ", ".join(
                    f"pid {p} ({c}) {s} {n}" for (p, c, s), n in sorted(per.items(), key=str)))
                + "; missed by rule: " + ", ".join(f"{r} {n}" for r, n in missed.items()))
    return "\n".join(rows)


_KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "max_page_sharing",
          "merge_across_nodes", "use_zero_pages", "smart_scan",
          "stable_node_chains_prune_millisecs")
_COUNTERS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
             "pages_scanned", "pages_skipped", "full_scans", "stable_node_chains",
             "stable_node_dups", "rmap_items", "ksm_zero_pages", "general_profit")


def knobs_table(snap: Snapshot) -> str:
    """The KSM knobs (``/sys/kernel/mm/ksm`` names) as the kernel's globals hold them."""
    return "\n".join(f"{k:36} {snap.counters[k]:>8}" for k in _KNOBS if k in snap.counters)


def counters_table(snap: Snapshot, sysfs: dict | None = None) -> str:
    """The KSM counters (``/sys/kernel/mm/ksm`` names) from the kernel's
    globals, beside the files as the guest read them (``sysfs``, from
    :func:`ksmlens.lab.ksmsys.read_counters`) when given."""
    if sysfs is None:
        return "\n".join(f"{k:24} {snap.counters[k]:>10}" for k in _COUNTERS
                         if k in snap.counters)
    rows = [f"{'counter':24} {'drgn':>10} {'sysfs':>10}"]
    rows += [f"{k:24} {snap.counters[k]:>10} {_num(sysfs.get(k)):>10}" for k in _COUNTERS
             if k in snap.counters and k in sysfs]
    return "\n".join(rows)


def smartscan_table(snap: Snapshot, pid: int | None = None, visits: int = 8) -> str:
    """SmartScan per rmap_item whose page is not KSM: ``age``,
    ``remaining_skips``, whether ksmd's next visit processes or skips it and
    the next ``visits`` visits (P/S), per ``ksmlens.analysis.core.smartscan_next``
    (mm/ksm.c ``should_skip_rmap_item()``, ``skip_age()``)."""
    from ksmlens.analysis.core import page_is_ksm, smartscan_next
    on = snap.counters.get("smart_scan", 1)
    rows = [f"smart_scan={on}: an rmap_item whose page is not KSM ages one step per "
            "visit; from age 3 a processed visit sets remaining_skips = skip_age(age) "
            "(1, 2, 4, then 8) and each later visit skips while it counts down "
            "(pages_skipped)." + ("" if on else " SmartScan is off: nothing is skipped."),
            f"{'pid':>7}  {'address':>14}  {'state':8}  {'age':>3}  {'skips':>5}  "
            f"{'next':9}  {'next ' + str(visits):>8}  note"]
    n = Counter()
    for i in sorted(snap.items(), key=lambda i: (str(i.pid), i.address)):
        if (pid is not None and i.pid != pid) or page_is_ksm(snap, i):
            continue
        r = smartscan_next(snap, i, visits)
        if r["freed"]:
            n["freed"] += 1
            rows.append(f"{_num(i.pid):>7}  {i.address:>#14x}  {i.state:8}  {i.age:>3}  "
                        f"{i.remaining_skips:>5}  {'freed':9}  {'-':>8}  "
                        f"ksmd frees it unread ({i.not_visited})")
            continue
        nxt = "skipped" if r["schedule"][:1] == "S" else "processed"
        n[nxt] += 1
        note = []
        if r["reads_pgoff"]:
            note.append("reads the stored pgoff's bytes (union)")
        if r["leaves_stable_tree"]:
            note.append("leaves its stable node")
        rows.append(f"{_num(i.pid):>7}  {i.address:>#14x}  {i.state:8}  {i.age:>3}  "
                    f"{i.remaining_skips:>5}  {nxt:9}  {r['schedule']:>8}  {'; '.join(note)}")
    rows.append(f"next visit: {n['processed']} processed, {n['skipped']} skipped, "
                f"{n['freed']} freed unread "
                f"(pages_skipped so far: {snap.counters.get('pages_skipped')})")
    return "\n".join(rows)


def hazard_table(snap: Snapshot) -> str:
    """The union hazard (:func:`ksmlens.analysis.core.union_hazard`): STABLE
    rmap_items on pages that are no longer KSM, the bytes 32..39 of each
    (``oldchecksum`` | ``age`` << 32 | ``remaining_skips`` << 40, or the
    stored pgoff) and what ksmd's next visit reads and writes there."""
    from ksmlens.analysis.core import union_hazard
    hz = union_hazard(snap)
    rows = [f"{'pid':>7}  {'address':>14}  {'bytes 32..39':>18}  {'stored pgoff':>12}  "
            f"{'age':>3}  {'skips':>5}  next  {'age,skips after':>15}  bytes after"]
    for h in hz:
        it = snap.item(h["item"])
        after = "-" if h["pgoff_after"] is None else f"{h['pgoff_after']:#018x}"
        rows.append(f"{_num(h['pid']):>7}  {h['address']:>#14x}  {it.raw_union:>#18x}  "
                    f"{_hex(h['stored_pgoff']):>12}  {h['age']:>3}  {h['remaining_skips']:>5}  "
                    f"{h['next_visit'] or '-':4}  {h['age_after']:>7},{h['skips_after']:<7}  "
                    f"{after}")
    reads = hz[0]["smartscan_reads_stable"] if hz else None
    rows.append(f"{len(hz)} STABLE rmap_items on non-KSM pages; " + (
        "SmartScan reads age/remaining_skips from the stored pgoff (union hazard)"
        if hz and hz[0]["hazard"] else
        "SmartScan leaves STABLE items alone (v8)" if reads is False else
        "no stored pgoff: SmartScan reads the item's own fields" if hz else "none"))
    return "\n".join(rows)
