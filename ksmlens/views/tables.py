"""Every text table ksmlens prints, through one formatter: drgn's ``print_table``.

:func:`format_table` is :func:`drgn.helpers.common.format.print_table`
(drgn 0.3.0 has no string-returning counterpart) written into a string,
with a header row, one alignment per column and ``-`` for a missing value.
The snapshot tables (:mod:`ksmlens.views.report`) and the tables below
(``ksmlens check``, ``verify``, ``diff``, ``vm status``, ``scenario list``)
all go through it; the CLI and ``%ksm`` only print what these return.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

from drgn.helpers.common.format import CellFormat, print_table

from ksmlens.errors import KsmlensError

__all__ = ["format_table", "keyvalue_table", "check_table", "check_text", "verify_table",
           "verify_text", "rule_match_line", "matrix_table", "matrix_markdown",
           "replace_marked_block", "marked_block", "MATRIX_BEGIN", "MATRIX_END", "smartscan_verify_table", "diff_text", "vms_table",
           "vm_status_table", "scenario_table", "chain_growth_table", "cost_table",
           "cost_totals_table", "cost_measure_text", "walk_cost_markdown", "COST_BEGIN", "COST_END",
           "COST_COLUMNS"]


def _cell(value: Any, align: str) -> Any:
    if value is None:
        value = "-"
    elif isinstance(value, bool):     # format(True, "5") is "    1"
        value = str(value)
    return CellFormat(value, align) if align else value


def format_table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]], *,
                 align: str | None = None, sep: str = "  ") -> str:
    """The rows as a text table, columns as wide as their widest cell.

    :param header: column names (a first row aligned like its column), or None.
    :param rows: one sequence of cells per row; a cell is any value (``None``
        prints ``-``); rows may be shorter than the header.
    :param align: one character per column, ``<`` left or ``>`` right
        (default: drgn's, numbers right and anything else left).
    :param sep: between columns.
    :returns: the lines joined by ``\\n``, trailing blanks stripped, no final
        newline (``""`` for no header and no rows).
    """
    rows = list(rows)
    width = max([len(header or ())] + [len(r) for r in rows])
    if not width:
        return ""
    if align is not None and len(align) != width:
        raise ValueError(f"align {align!r} has {len(align)} columns, the table {width}")
    aligns = align or " " * width
    cells = [] if header is None else [[_cell(h, a.strip()) for h, a in zip(header, aligns)]]
    cells += [[_cell(v, a.strip()) for v, a in zip(r, aligns)] for r in rows]
    buf = io.StringIO()
    print_table(cells, sep=sep, file=buf)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def keyvalue_table(pairs: Iterable[tuple[str, Any]], *, align: str = "<<") -> str:
    """``name  value`` lines, names padded to one width (no header)."""
    return format_table(None, [(k, v) for k, v in pairs], align=align)


# ------------------------------------------------------------------ ksmlens check

def check_table(rows, *, kernel: str = "kernel", globals: str = "globals") -> str:
    """One row per :class:`ksmlens.experiments.check.Row`: the walk's count,
    the kernel's as the guest printed it (``kernel``: sysfs / ksm_stat, or
    the variables read before an unpaused walk) and the kernel's variables
    read by drgn (``globals``), and ``ok`` / ``MISMATCH``."""
    def ok(r):
        if not r.ok:
            return "MISMATCH"
        return "ok" if r.rule == "equal" else "ok (before <= paused <= after)"
    return format_table(("counter", "walk", kernel, globals, "ok"),
                        [(r.what, r.walk, r.kernel, r.globals, ok(r)) for r in rows],
                        align="<>>><")


def check_text(rows, snap, info: dict, *, notes: Sequence[str] = (), live: bool = False) -> str:
    """``ksmlens check`` (paused walk against sysfs and ksm_stat) or, with
    ``live``, ``%ksm check`` (unpaused walk against the variables read
    before and after it): the table, ``note:`` lines, then the verdict
    ``check: A/B agree (...)``."""
    out = [check_table(rows, **({"kernel": "before", "globals": "after"} if live else {}))]
    out += [f"note: {n}" for n in notes if n]
    if info.get("note"):
        out.append(f"note: {info['note']}")
    unpaused = live or snap.meta.get("mode") == "live"
    if info.get("mid_update_seen"):
        out.append(f"note: {info['mid_update_seen']} "
                   + ("unpaused walk(s) raced with KSM" if unpaused else
                      "paused walk(s) landed in a half-done KSM update")
                   + " and were taken again")
    bad = [r for r in rows if not r.ok]
    if unpaused:
        how = f"unpaused walk of {len(snap.rmap_items)} rmap_items"
    else:
        how = (f"walk of {len(snap.rmap_items)} rmap_items, guest paused "
               f"{snap.meta['paused_seconds']:.3f} s")
    out.append(f"check: {len(rows) - len(bad)}/{len(rows)} agree ({how}, "
               f"attempt {info['attempts']})")
    return "\n".join(out)


# ------------------------------------------------------------------ ksmlens verify

def verify_table(res) -> str:
    """A :class:`ksmlens.experiments.verify.VerifyResult`: per stable node
    (one KSM page) its kpfn, the pids mapping it, its mappings, how many the
    rule's ``rmap_walk_ksm()`` misses, predicted ``moves`` / ``stays`` and
    what the kernel did; then one verdict line."""
    body = format_table(
        ("stable node", "kpfn", "pids", "maps", "missed by rule", "predicted", "observed",
         "agree"),
        [(r["node"], f"0x{r['kpfn']:x}", ",".join(map(str, r["pids"])), r["mappings"],
          r["misses"], r["predicted"], r["observed"],
          "-" if r["agree"] is None else "yes" if r["agree"] else "NO") for r in res.rows],
        align="<<<<<<<<")
    c = res.counts()
    rule = (repr(res.rule) if res.rule else
            f"unknown (rows judged under {getattr(res, 'rows_rule', None)!r})")
    return body + "\n" + (
        f"{res.release}: rmap_walk_ksm() rule {rule}, proven by {res.by}; {c['nodes']} "
        f"KSM pages, {c['pages']} mappings; predicted to stay: {c['predicted_stay']}, "
        f"stayed: {c['observed_stayed']}; "
        + (f"{c['gone']} unmapped by their process meanwhile (not compared); "
           if c["gone"] else "")
        + ("prediction and kernel AGREE" if res.agree else f"{c['disagree']} DISAGREE"))


def rule_match_line(res) -> str:
    """Which rules the kernel behaved like, from a
    :class:`ksmlens.experiments.verify.VerifyResult`'s ``matches``: one rule
    named, several that this state cannot tell apart, or none; then each
    candidate's predicted-to-stay count and disagreements."""
    how = "reclaims" if res.by == "reclaim" else "unmaps"
    m, cands = list(res.matches), list(res.candidates)
    if len(m) == 1:
        head = f"this kernel {how} like rule {m[0]}"
    elif m:
        head = (f"this kernel {how} like rules {', '.join(m)}: they predict the same on this "
                "state, so the experiment cannot tell them apart (use a scenario where they "
                "differ: mremap, where v3 misses the moved mappings and stock and stored do not)")
    else:
        head = f"this kernel {how} like none of the rules {', '.join(cands)}"
    per = "; ".join(f"{r}: {b['predicted_stay']} stay, {b['disagree']} disagree"
                    for r, b in res.by_rule.items())
    return f"{head} ({per})"


def verify_text(res) -> str:
    """``ksmlens verify``: :func:`verify_table`, then how the kernel proved it
    (migration or reclaim) and how long each half took."""
    if res.by == "hwpoison":
        hw, r = res.extra["hwpoison"], res.rows[0]

        def sigs(d):
            return ", ".join(f"{p}:{'AR' if c == 4 else 'AO' if c == 5 else c}"
                             for p, c in sorted(d.items())) or "none"
        tail = (f"(pid {hw['injector']['pid']} poisoned the page with MADV_HWPOISON, "
                f"early kill {'on' if hw['early_kill'] else 'off'}, collect_procs_ksm() "
                f"rule {hw['collect_rule']!r}; madvise: predicted {r['predicted_madvise']}, "
                f"got {r['observed_madvise']}; SIGBUS predicted {sigs(r['predicted_signals'])}"
                f", observed {sigs(r['observed_signals'])}; per mapping: "
                f"{sum(bool(p['agree']) for p in res.pages)}/{len(res.pages)} as predicted)\n"
                + "\n".join(hw["dmesg"]))
    elif res.by == "reclaim":
        rc = res.extra["reclaim"]
        tail = (f"(predicted from a paused snapshot in {res.seconds['predict']} s, then "
                f"memory.reclaim of {', '.join(rc['cgroups'])}: {rc['rounds']} rounds, "
                f"{res.seconds['reclaim']} s; per page: {sum(p['agree'] for p in res.pages)}"
                f"/{len(res.pages)} mappings as predicted)")
    else:
        tail = (f"(predicted from a paused snapshot in {res.seconds['predict']} s, then "
                f"move_pages(MPOL_MF_MOVE_ALL) to the other node: "
                f"{res.seconds['migrate']} s)")
    # the rules named by experiment (migration, reclaim; hwpoison judges one rule)
    rules = rule_match_line(res) + "\n" if getattr(res, "candidates", None) else ""
    return verify_table(res) + "\n" + rules + tail


# ------------------------------------------------------------------ ksmlens matrix

MATRIX_BEGIN = ("<!-- ksmlens matrix: begin (generated by `ksmlens matrix --readme` from "
                "docs/matrix.json; do not edit by hand) -->")
MATRIX_END = "<!-- ksmlens matrix: end -->"


def _like(cells) -> str:
    """The rules the kernel behaved like in ``cells`` (one scenario, one
    kernel, each proof): one named, several alike here, every rule alike
    here, or none; per proof where the proofs differ."""
    def one(c):
        if not c.matches:
            return "like no rule"
        if len(c.matches) == 1:
            return f"like {c.matches[0]}"
        if c.matches == c.candidates:
            return "every rule alike here"
        return f"like {' or '.join(c.matches)} (alike here)"
    cells = [c for c in cells if c.candidates]      # hwpoison judges one rule
    if not cells:
        return ""
    said = {one(c) for c in cells}
    if len(said) == 1:
        return said.pop()
    return "; ".join(f"{c.by} {one(c)}" for c in cells)


def _signals_words(c) -> str:
    role = {"poisoner": "the poisoning process", "other": "the other"}
    return ("SIGBUS " + ", ".join(f"{role.get(r, r)} ({code})" for r, code in
                                  (s.split(":", 1) for s in c.signalled))
            if c.signalled else "no SIGBUS")


def _outcome_words(c) -> str:
    if c.by == "hwpoison":
        if c.outcome == "unmapped":
            words = (f"memory failure: all {c.mappings} mappings unmapped, madvise "
                     f"{c.madvise}; {_signals_words(c)}")
        else:
            words = (f"memory failure: **{c.mappings_kept} of {c.mappings} mappings stay "
                     f"mapped**, madvise {c.madvise}; {_signals_words(c)}")
    elif c.by == "migration":
        if c.outcome == "moves":
            words = "migrates"
        else:
            words = (f"**{c.outcome}**: {c.pages_stayed} of {c.pages} KSM pages stay, "
                     f"{c.mappings_kept} mappings keep them")
    else:
        if c.outcome == "reclaimed":
            words = "swapped out"
        else:
            words = (f"reclaim: **{c.outcome}**: {c.pages_stayed} of {c.pages} KSM pages never "
                     f"freed, {c.mappings_kept} mappings stay mapped, {c.mappings_unmapped} "
                     "become swap entries")
    return words + ("" if c.agree else " (**prediction disagreed**)")


def matrix_markdown(m) -> str:
    """A :class:`ksmlens.experiments.matrix.Matrix` as the README's table:
    one row per kernel (architecture, variant), one column per scenario,
    each cell what the kernel did by migration then by reclaim (then memory
    failure), and the rules it behaved like. A variant whose row reads the
    same on every architecture is one row, its arch column naming them all."""
    head = "| arch | variant | " + " | ".join(m.scenarios) + " |"
    lines = [head, "|---|---" + "|---" * len(m.scenarios) + "|"]
    rows: dict[tuple, list[str]] = {}          # (variant, cells) -> archs, in run order
    for arch, v in m.kernels:
        cells = []
        for s in m.scenarios:
            cs = [c for b in m.bys if (c := m.cell(v, s, b, arch)) is not None]
            like = _like(cs)
            cells.append("; ".join([_outcome_words(c) for c in cs] + ([like] if like else []))
                         if cs else "")
        rows.setdefault((v, tuple(cells)), []).append(arch)
    for (v, cells), archs in rows.items():
        lines.append(f"| {', '.join(archs)} | `{v}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_table(m) -> str:
    """``ksmlens matrix``: one line per cell (arch, variant, scenario, proof): the
    outcome, KSM pages that stayed, mappings unmapped / kept, the pages the
    kernel's rule predicted to stay, the rules it behaved like, agree; then
    one verdict line."""
    body = format_table(
        ("arch", "variant", "scenario", "by", "outcome", "stayed", "unmapped/kept",
         "predicted stay", "behaved like", "agree", "s"),
        [(c.arch, c.variant, c.scenario, c.by, c.outcome, f"{c.pages_stayed}/{c.pages}",
          f"{c.mappings_unmapped}/{c.mappings_kept}", c.predicted_stay,
          ",".join(c.matches) or ("none" if c.candidates else "-"),
          "yes" if c.agree else "NO", f"{c.seconds:.1f}")
         for c in m.cells], align="<<<<<>>><<>")
    bad = sum(not c.agree for c in m.cells)
    secs = m.meta.get("seconds")
    return body + "\n" + (f"matrix: {len(m.cells)} cells, "
                          + ("every prediction agrees with the kernel" if not bad
                             else f"{bad} DISAGREE")
                          + (f" ({secs} s)" if secs is not None else ""))


COST_BEGIN = ("<!-- ksmlens walk-cost: begin (generated by `benchmarks/walk_cost.py --json "
              "docs/walk-cost.json --readme`; do not edit by hand) -->")
COST_END = "<!-- ksmlens walk-cost: end -->"
# README's cost columns: (by, walk, heading)
COST_COLUMNS = (("migrate", "try_to_migrate", "migrate: `try_to_migrate`"),
                ("migrate", "remove_migration_ptes", "`remove_migration_ptes`"),
                ("reclaim", "folio_referenced", "reclaim: `folio_referenced`"),
                ("reclaim", "try_to_unmap", "`try_to_unmap`"),
                ("hwpoison", "collect_procs_ksm", "memory failure: `collect_procs_ksm`"),
                ("hwpoison", "try_to_unmap", "`try_to_unmap`"))


def walk_cost_markdown(doc: dict) -> str:
    """README's variant table with its cost columns, from the figures
    ``benchmarks/walk_cost.py --json`` wrote (schema ``ksmlens-walk-cost/1``):
    per variant and walk, the VMAs the interval tree yields per walk (mean
    over the walks) and the longest walk in ms with only its entry and exit
    probed."""
    head = ["variant", "rule", *[h for _, _, h in COST_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(COST_COLUMNS)]
    for v in doc["variants"]:
        cells = [f"`{v['variant']}`", f"`{v.get('rule')}`"]
        for by, walk, _ in COST_COLUMNS:
            x = v["kinds"].get(by, {}).get("walks", {}).get(walk)
            if not x:
                cells.append("-")
                continue
            ms = x["max_ms"] if x["max_ms"] is not None else x["max_ms_probed"]
            eq = "" if x["predicted_equal"] else " **≠ prediction**"
            cells.append(f"{x['returned_per_walk']:,.0f} · {ms:.2f} ms{eq}")
        lines.append("| " + " | ".join(cells) + " |")
    agree = all(v["agree"] for v in doc["variants"])
    lines.append("")
    lines.append(f"many-vmas `{' '.join(doc['args'])}`, {doc['date']}; each cell: VMAs the "
                 "anon_vma interval tree yields per walk, then the longest walk with only its "
                 "entry and exit probed; -: the kernel ran no such walk of these pages in the "
                 "run. "
                 + ("Every walk's counts equal the prediction of the kernel's rule."
                    if agree else "**Some walk's counts differ from the prediction.**"))
    return "\n".join(lines)


def replace_marked_block(text: str, block: str, begin: str = MATRIX_BEGIN,
                         end: str = MATRIX_END) -> str:
    """``text`` with what lies between the lines ``begin`` and ``end``
    replaced by ``block``; :class:`KsmlensError` if the markers are not
    there exactly once each, in order."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise KsmlensError(f"README.md has no single marked "
                           f"{begin.split(':')[0].removeprefix('<!-- ksmlens ')} block",
                           f"put the lines {begin!r} and {end!r} around the table")
    a = text.index(begin) + len(begin)
    b = text.index(end)
    return text[:a] + "\n" + block.rstrip("\n") + "\n" + text[b:]


def marked_block(text: str, begin: str = MATRIX_BEGIN, end: str = MATRIX_END) -> str:
    """What lies between the markers (stripped); :class:`KsmlensError` as
    :func:`replace_marked_block`."""
    replace_marked_block(text, "", begin, end)      # the same checks
    return text[text.index(begin) + len(begin):text.index(end)].strip("\n")


def smartscan_verify_table(res, limit: int | None = 20) -> str:
    """A :class:`ksmlens.experiments.verify.SmartScanResult`: the rmap_items
    that disagree, then those SmartScan skipped (first ``limit``; None: all),
    each with its visits, the forecast schedule (P processed, S skipped) and
    ``age`` / ``remaining_skips`` predicted/observed; then the
    ``pages_skipped`` verdict."""
    rows = [r for r in res.items if not r["agree"]] + \
           [r for r in res.items if r["agree"] and r["skipped"]]

    def v(x):
        return "-" if x is None else x
    body = format_table(
        ("pid", "address", "state", "visits", "sched", "age", "skips", "agree"),
        [(r["pid"] or "-", f"{r['address']:#x}", r["state"], r["visits"], r["schedule"],
          f"{v(r['predicted_age'])}/{v(r['observed_age'])}",
          f"{v(r['predicted_skips'])}/{v(r['observed_skips'])}",
          "yes" if r["agree"] else "NO") for r in rows[:limit]],
        align=">><><>><")
    return body + "\n" + (
        f"{res.release}: over {res.full_scans} full scans pages_skipped grew by "
        f"{res.observed}, predicted {res.predicted}; "
        f"{sum(r['agree'] for r in res.items)}/{len(res.items)} rmap_items "
        "as predicted (age/skips: predicted/observed)")


# ------------------------------------------------------------------ ksmlens diff

DIFF_KINDS = ("appeared", "dropped", "merged", "unmerged", "moved", "pgoff_changed")


def diff_text(d, per_kind: int = 8) -> str:
    """A :class:`ksmlens.experiments.watch.Diff`: its summary line, then per
    kind of change the first ``per_kind`` rmap_items as ``pid:address``."""
    rows = []
    for what in DIFF_KINDS:
        v = getattr(d, what)
        if v:
            rows.append(("", what, " ".join(f"{p}:{addr:#x}" for p, addr in v[:per_kind])
                         + (f" ... ({len(v)})" if len(v) > per_kind else "")))
    return "\n".join([d.summary()] + ([format_table(None, rows)] if rows else []))


# ------------------------------------------------------------------ ksmlens vm / scenario

_STATUS_KEYS = ("name", "variant", "kernel_release", "accel", "accel_reason", "running",
                "run_state", "pid", "qmp", "vmlinux", "console_log", "memory_mb", "cpus",
                "numa_nodes", "boot_seconds")


def vm_status_table(s: dict) -> str:
    """One lab VM (:meth:`ksmlens.lab.vm.VM.status`), a line per field."""
    return keyvalue_table((k, s[k]) for k in _STATUS_KEYS if k in s)


def vms_table(vms: Sequence[dict]) -> str:
    """Every lab VM ksmlens knows of (:func:`ksmlens.lab.vm.list_vms`)."""
    return format_table(("name", "kernel_release", "accel", "state", "pid"),
                        [(s["name"], s["kernel_release"], s["accel"],
                          "running" if s["running"] else "dead", s["pid"]) for s in vms],
                        align="<<<<>")


def scenario_table(scenarios: Iterable) -> str:
    """Each scenario (:data:`ksmlens.lab.scenarios.SCENARIOS`): its name and
    what it builds, then its steps."""
    rows = []
    for s in scenarios:
        rows.append((s.name, s.summary))
        rows.append(("", "steps: " + ", ".join(st.name for st in s.steps)))
    return format_table(None, rows, align="<<")


# ------------------------------------------------------------------ chains over time

def chain_growth_table(frames) -> str:
    """A timeline's chains and dups, one row per frame (the text beside
    :func:`ksmlens.views.plots.chain_growth`, from
    :func:`ksmlens.analysis.chains.chain_counts_frame` and
    :func:`~ksmlens.analysis.chains.chain_nodes_frame`): pages ksmd scanned
    since the first frame, the walk's regular nodes, chains, dups (and the
    kernel's ``stable_node_dups`` read just after the walk, where the frame
    has it), ``pages_shared`` / ``pages_sharing``, and the dups' fill as
    ``dups x rmap_hlist_len`` (e.g. ``3x16 + 1x4``)."""
    from ksmlens.analysis.chains import chain_counts_frame, chain_nodes_frame
    counts = chain_counts_frame(frames)
    nodes = chain_nodes_frame(frames, regular=False)
    first = counts["pages_scanned"].iloc[0]

    def fill(k):
        c = nodes[nodes["frame"] == k]["rmap_hlist_len"].value_counts().sort_index(
            ascending=False)
        return " + ".join(f"{m}x{n}" for n, m in c.items()) or "-"
    sysfs = "sysfs_after_stable_node_dups" in counts
    rows = []
    for r in counts.itertuples(index=False):
        scanned = None if first is None or r.pages_scanned is None or r.pages_scanned != \
            r.pages_scanned else int(r.pages_scanned - first)
        row = [r.frame, scanned, r.regular, r.chains, r.dups]
        if sysfs:
            v = getattr(r, "sysfs_after_stable_node_dups")
            row.append(None if v != v else int(v))
        rows.append(row + [r.pages_shared, r.pages_sharing, fill(r.frame)])
    head = ["frame", "+scanned", "regular", "chains", "dups"] + \
        (["sysfs dups"] if sysfs else []) + ["pages_shared", "pages_sharing", "dups x rmap_items"]
    mps = counts["max_page_sharing"].iloc[-1]
    return format_table(head, rows) + f"\nmax_page_sharing = {mps}"


# ------------------------------------------------------------------ the union, in text

__all__ += ["union_bytes_table"]


def union_bytes_table(frame, limit: int | None = 20) -> str:
    """The text beside :func:`ksmlens.views.plots.union_bytes`, from a
    :func:`ksmlens.analysis.union.union_bytes_frame` (or several,
    concatenated): one row per (kernel, moment, rmap_item), the first
    ``limit`` per kernel and moment (None: all): the 8 bytes in memory
    order (hex), the word read as the stored index, the same bytes read as
    ``oldchecksum`` / ``age`` / ``remaining_skips``, which reading the kernel
    holds, and what ksmd's next visit reads there (``age,skips``; ``PGOFF``
    when they are the stored index's bytes; ``-`` nothing)."""
    if len(frame) == 0:
        return "no rmap_items"
    off = frame["offset"].dropna()
    span = f"bytes {int(off.iloc[0])}..{int(off.iloc[0]) + 7}" if len(off) else "bytes"
    rows, left = [], 0
    for _, g in frame.groupby(["panel", "moment_index"], sort=False):
        for k, r in enumerate(g.itertuples(index=False)):
            if limit is not None and k >= limit:
                left += len(g) - limit
                break
            reads = ("PGOFF" if r.next_reads_pgoff else "age,skips") \
                if r.next_reads_smartscan else "-"
            rows.append((r.panel, r.moment, r.pid, f"{r.address:#x}", r.state,
                         " ".join(f"{b:02x}" for b in r.bytes),
                         "-" if r.index is None else f"{r.index:#x}",
                         f"{r.oldchecksum:#010x}", r.age, r.remaining_skips, r.holds, reads))
    out = format_table(("kernel", "moment", "pid", "address", "state", span,
                        "as index", "oldchecksum", "age", "skips", "holds", "next reads"),
                       rows, align="<<><<<>>>><<")
    return out + (f"\n... {left} more rows (limit={limit})" if left else "")


def cost_table(worst, rules: Sequence[str], by: str = "returned") -> str:
    """``ksmlens cost``: the pages whose walks would hold the anon_vma lock
    longest (:func:`ksmlens.analysis.cost.worst_pages`), ``by`` per rule."""
    head = ["kpfn", "rmap_items", *[f"{by} {r}" for r in rules]]
    rows = [[r["kpfn"], r["rmap_items"], *[r.get(f"{by}_{x}") for x in rules]]
            for r in worst.to_dict("records")]
    return format_table(head, rows, align=">" * len(head))


def cost_totals_table(totals) -> str:
    """Totals per rule and walk (:func:`ksmlens.analysis.cost.cost_totals`)."""
    cols = ["rule", "walk", "pages", "first", "next", "returned", "skipped", "rmap_one",
            "missed", "max_returned", "ratio"]
    return format_table(cols, totals[cols].astype(object).where(totals[cols].notna(), None)
                        .values.tolist(), align="<<" + ">" * (len(cols) - 2))


def cost_measure_text(res, limit: int | None = 20) -> str:
    """``ksmlens cost --measure``: predicted against counted, per walk, then
    the totals per walk and the rules the counts matched."""
    r = res.rule
    w = res.walks
    head = ["kpfn", "walk", "rule", "returned pred", "returned kernel", "rmap_one pred",
            "rmap_one kernel", "first/next pred", "first/next kernel", "ms", "agree"]
    rows = [[x["kpfn"], x["walk"] + (" (again)" if x["after"] else ""), x["rule"],
             x["p_returned"], x["m_returned"], x["p_rmap_one"], x["m_rmap_one"],
             f"{x['p_first']}/{x['p_next']}", f"{x['m_first']}/{x['m_next']}",
             None if x["us"] is None or x["us"] != x["us"] else round(x["us"] / 1000, 2),
             x["agree"]] for x in w.to_dict("records")]
    shown = rows if limit is None else rows[:limit]
    out = [f"{res.release}: {len(w)} walks counted in the kernel (--by {res.by}), each "
           f"predicted under the kernel's rule ({r}"
           + (f"; collect_procs_ksm() searches {res.collect_rule}" if res.collect_rule else "")
           + ")", format_table(head, shown, align="<<<" + ">" * (len(head) - 3))]
    if w["after"].any():
        out.append("(again): walked after try_to_unmap() left the page mapped (a mapping "
                   "missed): nothing left to find, the walk runs to its end")
    if limit is not None and len(rows) > limit:
        out.append(f"... {len(rows) - limit} more walks (--all)")
    s = res.summary()
    out += ["", format_table(list(s.columns), s.values.tolist(),
                             align="<" + ">" * (len(s.columns) - 1))]
    m = res.rule_matches
    out.append("")
    out.append(f"the kernel's counts equal the prediction of rule {', '.join(m)} on every "
               "rmap_walk_ksm() walk" if m else
               "the kernel's counts match no rule's prediction on every rmap_walk_ksm() walk")
    if res.collect_rule:
        cm = res.collect_matches
        out.append(f"collect_procs_ksm(): the counts equal rule {', '.join(cm)}'s" if cm else
                   "collect_procs_ksm(): the counts match no rule")
    hw = res.extra.get("hwpoison")
    if hw:
        out.append(f"madvise(MADV_HWPOISON) of {hw['address']:#x}: {hw['madvise']}; SIGBUS "
                   f"to the poisoning process: {hw['signals'] or 'none'}")
        for k in ("tasks_changed", "tasks_raced"):
            if hw.get(k):
                out.append(("RACED: " if k == "tasks_raced" else "") + hw[k])
    bad = int((~w["agree"]).sum())
    out.append(f"{'AGREE' if not bad else 'DISAGREE'}: {len(w) - bad} of {len(w)} walks equal "
               "the prediction; durations include the probes' cost (reported, not judged)")
    return "\n".join(out)
