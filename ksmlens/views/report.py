"""Readable tables from a :class:`~ksmlens.lens.model.Snapshot` (``ksmlens report``)."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from ksmlens.kernel import sysfs as ksm_sysfs
from ksmlens.lens.model import Snapshot, column_values
from ksmlens.views.tables import format_table, keyvalue_table

__all__ = ["stable_table", "process_table", "summary", "rmap_table", "stale_table",
           "knobs_table", "counters_table", "smartscan_table", "hazard_table",
           "replay_text", "smartscan_text", "axis_table"]


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
    un = snap.stable_nodes["unreachable"]
    if (un > 0).any():
        lines.append(f"unreachable: {int((un > 0).sum())} KSM page(s) with {int(un.sum())} "
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
    nd = snap.stable_nodes
    more = None
    if limit is not None and len(nd) > limit:
        more = f"... {len(nd) - limit} more (use --all)"
        nd = nd.iloc[:limit]
    it = snap.rmap_items
    it = it[it["stable_node"].isin(nd["id"])]
    per = it.groupby(["stable_node", "pid"], observed=True, dropna=False).size()
    sharers: dict = {}
    for (node, pid), c in per.items():
        sharers.setdefault(node, []).append((pid, c))
    n_items = it.groupby("stable_node", observed=True).size().to_dict()
    dups = snap.stable_nodes["chain"].value_counts().to_dict()
    rows = []
    for r in nd.itertuples(index=False):
        if r.kind == "chain":
            sh = f"{dups.get(r.id, 0)} dups"
            items = dups.get(r.id, 0)
        else:
            sh = " ".join(f"{'None' if p is pd.NA else p}:{c}" for p, c in
                          sorted(sharers.get(r.id, []), key=lambda pc: str(pc[0])))
            items = n_items.get(r.id, 0)
        rows.append((r.id, r.kind, r.chain if isinstance(r.chain, str) else "",
                     "" if r.kpfn is pd.NA else r.kpfn, r.nid,
                     "" if r.mapcount is pd.NA else r.mapcount, items, sh))
    return "\n".join([format_table(("node", "kind", "chain", "kpfn", "nid", "maps", "items",
                                    "sharers"), rows, align="<<<>>>><")]
                     + ([more] if more else []))


def process_table(snap: Snapshot) -> str:
    """One row per mm slot: pid, comm, items by state, and pgoff mismatches."""
    it = snap.rmap_items
    lpi = it["linear_page_index"]
    per = pd.DataFrame({
        "mm": it["mm"].astype(object), "stable": it["state"] == "stable",
        "unstable": it["state"] == "unstable", "none": it["state"] == "none",
        "no_vma": lpi.isna(),
        "moved": (lpi.notna() & (lpi != it["addr_pgoff"])).fillna(False).astype(bool),
        "freed": (it["will_visit"] == False).fillna(False).astype(bool),  # noqa: E712
    }).groupby("mm").agg(["sum", "size"]) if len(it) else None
    rows = []
    for s in snap.mm_slots.itertuples(index=False):
        have = per is not None and s.mm in per.index
        cnt = (lambda c: int(per.at[s.mm, (c, "sum")]) if have else 0)
        n = int(per.at[s.mm, ("stable", "size")]) if have else 0
        pids = ",".join(map(str, s.pids)) if s.pids is not None and len(s.pids) else (
            "exited" if s.mm_users == 0 else "-")
        rows.append((pids, s.comm if isinstance(s.comm, str) else "-", n, cnt("stable"),
                     cnt("unstable"), cnt("none"), cnt("no_vma"), cnt("moved"), cnt("freed"),
                     None if s.ksm_zero_pages is pd.NA else s.ksm_zero_pages,
                     f"{s.mm_ksm_rmap_items}/{s.mm_ksm_merging_pages}/"
                     f"{_num(None if s.mm_ksm_zero_pages is pd.NA else s.mm_ksm_zero_pages)}"))
    return format_table(("pid", "comm", "items", "stable", "unstable", "none", "no_vma",
                         "addr_pgoff!=lpi", "freed_next", "zero_pages",
                         "ksm_stat(items/merging/zero)"), rows, align="><" + ">" * 8 + "<")


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
    df = snap.rmap_items
    mine = df[(df["pid"] == pid).fillna(False).to_numpy(dtype=bool)]
    if not len(mine):       # a process sharing another's mm (CLONE_VM): its owner's items
        sl = snap.mm_slots
        mm = next((m for m, ps in zip(column_values(sl, "mm"), column_values(sl, "pids"))
                   if ps is not None and pid in [int(x) for x in ps]), None)
        mine = df[(df["mm"] == mm).fillna(False).to_numpy(dtype=bool)] if mm else mine
    mine = mine.sort_values("address", kind="stable")
    n_items = len(mine)
    items = snap.item_records(mine.iloc[:limit] if limit is not None else mine)
    if not n_items and not any(pid in (s.pids or [s.pid]) for s in snap.slots()):
        pids = ", ".join(str(p) for p in sorted(p for s in snap.slots()
                                                 for p in (s.pids or [s.pid])
                                                 if p is not None)) or "none"
        raise KsmlensError(f"pid {pid} has no KSM mm slot",
                           f"processes known to KSM: {pids}")
    body = []
    for i in items:
        status = i.pgoff_status + (f" ({i.pgoff_cause})" if i.pgoff_cause else "")
        pte = i.pte + ("*" if i.page_ksm else "")
        body.append((f"{i.address:#x}", i.state, i.stable_node, _hex(i.addr_pgoff),
                     _hex(i.linear_page_index), _hex(i.stored_pgoff), i.stored_status,
                     _walk_cell(i), pte, _next_cell(i), status))
    rows = [format_table(("address", "state", "stable_node", "addr_pgoff", "lin_pg_idx",
                          "stored", "stored_st", "S3I", "pte", "next", "pgoff_status"),
                         body, align="><<>>><<<<<")]
    if limit is not None and n_items > limit:
        rows.append(f"... {n_items - limit} more")
    st = Counter(column_values(mine, "pgoff_status"))
    rows.append(f"pid {pid}: {n_items} rmap_items, "
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
    rows = [format_table(("pid", "comm", "address", "state", "status", "cause", "addr_pgoff",
                          "lin_pg_idx", "stored", "stored_st", "S3I", "vm_pgoff"),
                         [(i.pid, i.comm, f"{i.address:#x}", i.state, i.pgoff_status,
                           i.pgoff_cause, _hex(i.addr_pgoff), _hex(i.linear_page_index),
                           _hex(i.stored_pgoff), i.stored_status, _walk_cell(i),
                           _hex(i.vm_pgoff)) for i in items],
                         align=">><<<<>>><<<")]
    per = Counter((i.pid, i.comm, i.pgoff_status) for i in items)
    missed = {r: sum(1 for i in items if (i.walk or {}).get(r) is False)
              for r in ("stock", "v3", "stored")}
    rows.append(f"stale: {len(items)} of {len(snap.rmap_items)} rmap_items"
                + (f" of pid {pid}" if pid is not None else "")
                + ("" if not per else ": " + ", ".join(
                    f"pid {p} ({c}) {s} {n}" for (p, c, s), n in sorted(per.items(), key=str)))
                + "; missed by rule: " + ", ".join(f"{r} {n}" for r, n in missed.items()))
    return "\n".join(rows)


# /sys/kernel/mm/ksm names, in the table's order (rmap_items too: not a file)
_KNOBS = ksm_sysfs.KNOBS
_COUNTERS = tuple(f.name for f in ksm_sysfs.FILES if f.kind == "counter")


def knobs_table(snap: Snapshot) -> str:
    """The KSM knobs (``/sys/kernel/mm/ksm`` names) as the kernel's globals hold them."""
    return keyvalue_table(((k, snap.counters[k]) for k in _KNOBS if k in snap.counters),
                          align="<>")


def counters_table(snap: Snapshot, sysfs: dict | None = None) -> str:
    """The KSM counters (``/sys/kernel/mm/ksm`` names) from the kernel's
    globals, beside the files as the guest read them (``sysfs``, from
    :func:`ksmlens.lab.ksmsys.read_counters`) when given."""
    if sysfs is None:
        return keyvalue_table(((k, snap.counters[k]) for k in _COUNTERS if k in snap.counters),
                              align="<>")
    return format_table(("counter", "drgn", "sysfs"),
                        [(k, snap.counters[k], sysfs.get(k)) for k in _COUNTERS
                         if k in snap.counters and k in sysfs], align="<>>")


def smartscan_table(snap: Snapshot, pid: int | None = None, visits: int = 8) -> str:
    """SmartScan per rmap_item whose page is not KSM: ``age``,
    ``remaining_skips``, whether ksmd's next visit processes or skips it and
    the next ``visits`` visits (P/S), per ``ksmlens.analysis.core.smartscan_next``
    (mm/ksm.c ``should_skip_rmap_item()``, ``skip_age()``)."""
    from ksmlens.analysis.core import page_is_ksm, require_smartscan, smartscan_next
    require_smartscan(snap.kernel.smartscan, "%ksm smartscan")
    on = snap.counters.get("smart_scan", 1)
    rows = [f"smart_scan={on}: an rmap_item whose page is not KSM ages one step per "
            "visit; from age 3 a processed visit sets remaining_skips = skip_age(age) "
            "(1, 2, 4, then 8) and each later visit skips while it counts down "
            "(pages_skipped)." + ("" if on else " SmartScan is off: nothing is skipped.")]
    body = []
    n = Counter()
    for i in sorted(snap.items(), key=lambda i: (str(i.pid), i.address)):
        if (pid is not None and i.pid != pid) or page_is_ksm(snap, i):
            continue
        r = smartscan_next(snap, i, visits)
        if r["freed"]:
            n["freed"] += 1
            body.append((i.pid, f"{i.address:#x}", i.state, i.age, i.remaining_skips, "freed",
                         "-", f"ksmd frees it unread ({i.not_visited})"))
            continue
        nxt = "skipped" if r["schedule"][:1] == "S" else "processed"
        n[nxt] += 1
        note = []
        if r["reads_pgoff"]:
            note.append("reads the stored pgoff's bytes (union)")
        if r["leaves_stable_tree"]:
            note.append("leaves its stable node")
        body.append((i.pid, f"{i.address:#x}", i.state, i.age, i.remaining_skips, nxt,
                     r["schedule"], "; ".join(note)))
    rows.append(format_table(("pid", "address", "state", "age", "skips", "next",
                              f"next {visits}", "note"), body, align=">><>><><"))
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
    body = []
    for h in hz:
        it = snap.item(h["item"])
        after = "-" if h["pgoff_after"] is None else f"{h['pgoff_after']:#018x}"
        body.append((h["pid"], f"{h['address']:#x}", f"{it.raw_union:#x}",
                     _hex(h["stored_pgoff"]), h["age"], h["remaining_skips"], h["next_visit"],
                     f"{h['age_after']},{h['skips_after']}", after))
    rows = [format_table(("pid", "address", "bytes 32..39", "stored pgoff", "age", "skips",
                          "next", "age,skips after", "bytes after"), body,
                         align=">>>>>><><")]
    reads = hz[0]["smartscan_reads_stable"] if hz else None
    rows.append(f"{len(hz)} STABLE rmap_items on non-KSM pages; " + (
        "SmartScan reads age/remaining_skips from the stored pgoff (union hazard)"
        if hz and hz[0]["hazard"] else
        "SmartScan leaves STABLE items alone (v8)" if reads is False else
        "no stored pgoff: SmartScan reads the item's own fields" if hz else "none"))
    return "\n".join(rows)


def replay_text(snap: Snapshot, rule: str | None = None, limit: int | None = 20) -> str:
    """``ksmlens replay``: the rules (:data:`ksmlens.analysis.core.RULES`),
    then per rule how many KSM pages have every mapped mapping found by
    ``rmap_walk_ksm()`` replayed on the recorded anon_vma trees, and a table
    of the mappings it misses (first ``limit``; None: all): stable node,
    kpfn, pid, address, the VMA and its ``vm_pgoff``, the walk's pass
    (``search_new_forks``)."""
    from ksmlens.analysis.core import RULE_HELP, RULES, walk_misses
    rules = [rule] if rule else [r for r in RULES
                                 if r != "stored" or snap.kernel.has_stored_pgoff]
    out = [f"{snap.kernel.release}: rmap_walk_ksm() uses "
           f"{snap.kernel.walk_rule or 'an unknown rule'!s}"]
    for r in RULES:
        mark = ("  (n/a: struct ksm_rmap_item has no pgoff)"
                if r == "stored" and not snap.kernel.has_stored_pgoff else "")
        out.append(f"  {r:7} {RULE_HELP[r]}{mark}")
    n_pages = int((snap.stable_nodes["kind"] != "chain").sum())
    for r in rules:
        misses = walk_misses(snap, r)
        bad = {m["node"] for m in misses}
        out.append(f"\nrule {r}: {n_pages - len(bad)}/{n_pages} KSM pages: every mapping "
                   f"found; {len(bad)} pages miss {len(misses)} mappings")
        if misses:
            table = format_table(
                ("node", "kpfn", "pid", "address", "vma_start", "vma_end", "vm_pgoff", "pass"),
                [(m["node"], f"{m['kpfn']:#x}", m["pid"], f"{m['address']:#x}",
                  f"{m['vma_start']:#x}", f"{m['vma_end']:#x}", f"{m['vm_pgoff']:#x}",
                  m["pass"]) for m in misses[:limit]], align="<>>>>>>>")
            out += ["  " + line for line in table.splitlines()]
        if limit is not None and len(misses) > limit:
            out.append(f"  ... {len(misses) - limit} more (--all)")
    return "\n".join(out)


def smartscan_text(snap: Snapshot, scans: int = 8, limit: int | None = 20) -> str:
    """``ksmlens smartscan``: the forecast ``pages_skipped`` increase after
    each of the next ``scans`` full scans
    (:func:`ksmlens.analysis.core.smartscan_forecast`), then the union hazard
    (:func:`ksmlens.analysis.core.union_hazard`): STABLE rmap_items on pages
    that are no longer KSM, what SmartScan reads from them and what ksmd's
    next visit leaves (first ``limit``; None: all)."""
    from ksmlens.analysis.core import require_smartscan, smartscan_forecast, union_hazard
    require_smartscan(snap.kernel.smartscan, "ksmlens smartscan")
    deltas = smartscan_forecast(snap, scans)["pages_skipped_delta"]
    out = [f"{snap.kernel.release}: smart_scan={snap.counters.get('smart_scan')} "
           f"full_scans={snap.scan.get('seqnr')} "
           f"pages_skipped={snap.counters.get('pages_skipped')}",
           "forecast pages_skipped increase after n more full scans: "
           + ", ".join(f"n={n}: +{d}" for n, d in enumerate(deltas) if n)]
    hz = union_hazard(snap)
    if hz:
        out.append(f"\n{len(hz)} STABLE rmap_items on pages that are no longer KSM "
                   "(ksmd's next visit runs should_skip_rmap_item() on them):")
        rows = []
        for h in hz[:limit]:
            if h["smartscan_reads_stable"] is False:
                what = "SmartScan does not read a STABLE item (v8); its removal zeroes them"
            else:
                src = "the stored pgoff's bytes" if h["hazard"] else "its own fields"
                what = (f"reads age={h['age']} remaining_skips={h['remaining_skips']} "
                        f"from {src}")
            rows.append((h["pid"], f"{h['address']:#x}", h["next_visit"],
                         f"age={h['age_after']} skips={h['skips_after']}", what))
        table = format_table(("pid", "address", "next", "then", "SmartScan"), rows,
                             align=">><<<")
        out += ["  " + line for line in table.splitlines()]
        if limit is not None and len(hz) > limit:
            out.append(f"  ... {len(hz) - limit} more (--all)")
    return "\n".join(out)


_AXIS_WORDS = {"found": "found", "missed": "MISSED", "not_stable": "not stable",
               "no_vma": "no vma", "n/a": "n/a"}


def axis_table(snap: Snapshot, pid: int, visits: int = 8, limit: int | None = 40) -> str:
    """``%ksm axis PID``: the address-axis picture as text
    (:func:`ksmlens.analysis.core.address_axis_frame`; the figure is
    :func:`ksmlens.views.plots.address_axis`). First ``pid``'s VMAs with
    their ``vm_pgoff`` and how far it is from ``vm_start >> PAGE_SHIFT``,
    then the rmap_items by address, runs of neighbouring pages alike in
    every column folded into one row: state, what each rmap walk rule
    does for the item's own mapping (found / MISSED / not stable), whether
    the page is KSM, SmartScan's ``age`` / ``remaining_skips`` and the next
    ``visits`` visits (P processed, S skipped, F freed). ``limit``: rows
    shown (None: all). :class:`KsmlensError` if ``pid`` has no rmap_items."""
    from ksmlens.analysis.core import address_axis_frame
    from ksmlens.kernel.rules import RULES
    df = address_axis_frame(snap, pid, visits)
    a = df.attrs
    shift = a["page_shift"]
    rules = [r for r in RULES if r != "stored" or a["has_stored_pgoff"]]
    out = [f"pid {pid} {a['comm'] or ''}: {len(df)} rmap_items; kernel {a['release']} walks "
           f"{a['walk_rule'] or 'an unknown rule'}; smart_scan "
           f"{'on' if a['smartscan_on'] else 'off'}; full_scans={a['full_scans']}"]
    vm = df[df["vma_start"].notna()].drop_duplicates("vma_start")
    for r in vm.itertuples():
        pages = (int(r.vma_end) - int(r.vma_start)) >> shift
        d = int(r.vma_shift)
        where = ("at its vm_pgoff" if d == 0 else
                 f"filed {'+' if d > 0 else '-'}{abs(d)} pages away"
                 + (f" ({r.pgoff_cause})" if isinstance(r.pgoff_cause, str) else ""))
        out.append(f"  VMA {int(r.vma_start):#x}-{int(r.vma_end):#x} ({pages} pages) "
                   f"vm_pgoff {int(r.vm_pgoff):#x}: {where}")
    keys = ["vma_start", "state", *[f"rule_{r}" for r in rules], "page_ksm", "age",
            "remaining_skips", "reads_pgoff", "schedule"]
    rows, start = [], 0
    recs = df.to_dict("records")
    for k in range(1, len(recs) + 1):
        if (k < len(recs) and recs[k]["vpn"] == recs[k - 1]["vpn"] + 1
                and all(str(recs[k][c]) == str(recs[start][c]) for c in keys)):
            continue
        r0, r1 = recs[start], recs[k - 1]
        span = (f"{int(r0['address']):#x}" if k - 1 == start else
                f"{int(r0['address']):#x}-{int(r1['address']):#x}")
        age = f"{r0['age']}" + ("*" if r0["reads_pgoff"] else "")
        rows.append((span, k - start, r0["state"], *[_AXIS_WORDS[r0[f"rule_{r}"]] for r in rules],
                     "yes" if r0["page_ksm"] else "no", age, r0["remaining_skips"],
                     r0["schedule"]))
        start = k
    more = 0
    if limit is not None and len(rows) > limit:
        more, rows = len(rows) - limit, rows[:limit]
    kr = a["walk_rule"]
    out.append(format_table(("address", "n", "state",
                             *[f"{r}{'*' if r == kr else ''}" for r in rules],
                             "KSM", "age", "skips", f"next {visits}"),
                            rows, align="<><" + "<" * len(rules) + "<>><"))
    if more:
        out.append(f"... {more} more rows (--limit)")
    miss = ", ".join(f"{r} {int((df[f'rule_{r}'] == 'missed').sum())}" for r in rules)
    nxt = Counter(df["next"])
    out.append(f"missed own mappings: {miss}"
               + (f" ({kr}* is this kernel's rule)" if kr in rules else "")
               + f"; next visit: {nxt.get('processed', 0)} processed, "
               f"{nxt.get('skipped', 0)} skipped, {nxt.get('freed', 0)} freed "
               "(P processed, S skipped, F freed unread; a KSM page is never skipped"
               + ("; age* = bytes of the stored pgoff (union)" if df["reads_pgoff"].any()
                  else "") + ")")
    return "\n".join(out)
