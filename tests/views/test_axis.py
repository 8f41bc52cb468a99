"""The address-axis picture (issue 12): ``analysis.core.address_axis_frame``
and ``plots.address_axis`` / ``address_axis_timeline`` on small hand-made
snapshots (mremap-like: a moved VMA, merged and written pages), then on a
union guest after mremap, checked against /proc/PID/ksm_stat, verify and
the kernel's own SmartScan state."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from ksmlens.analysis.core import (AXIS_RULE_STATUSES, AXIS_VISITS, address_axis_frame,  # noqa: E402
                                   address_axis_frames, smartscan_next)
from ksmlens.errors import KsmlensError  # noqa: E402
from ksmlens.lens.model import Snapshot  # noqa: E402
from ksmlens.views import plots, report  # noqa: E402

from smallsnap import PAGE, item, snapshot  # noqa: E402

OLD = 0x7F0000000000
NEW = OLD + (1 << 30)


def moved_snap(n=64, written=8, ages=None, full_scans=10, variant="union", walk_rule="stored"):
    """pid 10: a VMA moved 1 GiB up (vm_pgoff kept) whose first ``written``
    pages are not KSM (ages 0.. or ``ages``), the others STABLE on KSM pages
    (v3 misses them), and one item that outlived its old VMA; pid 11: an
    unmoved sharer."""
    V = (NEW, NEW + n * PAGE, OLD >> 12)
    its = []
    for k in range(n):
        if k < written:
            a = (ages or {}).get(k, k)
            it = item(10, NEW + k * PAGE, vma=V, state="unstable", age=a, skips=a % 3)
            it.page_ksm = False
        else:
            it = item(10, NEW + k * PAGE, vma=V, state="stable", node=f"n{k % 16}")
            it.walk = {"stock": True, "v3": False, "stored": True}
            it.page_ksm = True
        it.pte, it.will_visit = "present", True
        its.append(it)
    V2 = (OLD + (2 << 30), OLD + (2 << 30) + n * PAGE, (OLD + (2 << 30)) >> 12)
    for k in range(n):
        it = item(11, V2[0] + k * PAGE, vma=V2, state="stable", node=f"n{k % 16}")
        it.walk = {"stock": True, "v3": True, "stored": True}
        it.page_ksm, it.pte, it.will_visit = True, "present", True
        its.append(it)
    it = item(10, OLD + 100 * PAGE, vma=None, state="none")
    it.will_visit, it.not_visited = False, "no_vma"
    its.append(it)
    return snapshot(its, variant=variant, walk_rule=walk_rule, full_scans=full_scans)


# ------------------------------------------------------------------ data

def test_frame_rows_rules_and_smartscan():
    s = moved_snap()
    df = address_axis_frame(s, 10, visits=6)
    items = sorted(s.items_of(10), key=lambda i: i.address)
    assert list(df["item"]) == [i.id for i in items]
    assert list(df["address"]) == sorted(df["address"])
    assert set(df["rule_v3"]) <= set(AXIS_RULE_STATUSES)
    st = df.set_index("item")
    for i in items:
        r = st.loc[i.id]
        if i.vma_start is None:
            assert r["rule_stock"] == r["rule_v3"] == "no_vma" and r["next"] == "freed"
            assert r["freed_why"] == "no_vma" and pd.isna(r["visit_2"])
            continue
        assert r["vma_shift"] == i.vm_pgoff - (i.vma_start >> 12) == -(1 << 18)
        if i.state == "stable":
            for rule in ("stock", "v3", "stored"):
                assert r[f"rule_{rule}"] == ("found" if i.walk[rule] else "missed")
            assert r["schedule"] == "P" * 6          # a KSM page is never skipped
        else:
            assert r["rule_v3"] == "not_stable"
            nxt = smartscan_next(s, i, 6)
            assert r["schedule"] == nxt["schedule"] and r["skipped"] == nxt["skipped"]
            assert [r[f"visit_{k}"] for k in range(1, 7)] == [
                {"P": "processed", "S": "skipped"}[c] for c in nxt["schedule"]]
            assert (r["age_after"], r["skips_after"]) == (nxt["age"], nxt["remaining_skips"])
    assert set(df["next"]) <= set(AXIS_VISITS)
    assert (df["rule_v3"] == "missed").sum() == 56 and (df["rule_stored"] == "missed").sum() == 0
    assert df.attrs["walk_rule"] == "stored" and df.attrs["visits"] == 6
    # the ages 3..7 of the written pages do skip
    assert df["skipped"].sum() > 0


def test_frame_stored_rule_na_without_a_stored_index_and_errors():
    s = moved_snap(variant="v3", walk_rule="v3")
    df = address_axis_frame(s, 10)
    assert set(df.loc[df["vma_start"].notna(), "rule_stored"]) == {"n/a"}
    with pytest.raises(KsmlensError, match=r"pid 99 .*\[10, 11\]"):
        address_axis_frame(s, 99)
    with pytest.raises(KsmlensError):
        address_axis_frame(s, 10, visits=0)


def test_frame_same_on_a_saved_snapshot(tmp_path):
    s = moved_snap()
    for name in ("s.json", "s.ksm"):
        s.save(tmp_path / name)
        back = address_axis_frame(Snapshot.load(tmp_path / name), 10)
        a = address_axis_frame(s, 10)
        cols = [c for c in a.columns if c not in ("pgoff_cause",)]
        assert back[cols].astype(str).equals(a[cols].astype(str)), name


def test_frames_of_a_timeline():
    fr = [moved_snap(ages={k: k + f for k in range(8)}, full_scans=10 + f) for f in range(3)]
    df = address_axis_frames(fr, 10, visits=2)
    assert list(df["frame"].unique()) == [0, 1, 2]
    assert list(df.groupby("frame")["full_scans"].first()) == [10, 11, 12]
    assert len(df) == 3 * len(fr[0].items_of(10))
    with pytest.raises(KsmlensError):
        address_axis_frames(fr, 99)


# ------------------------------------------------------------------ figure

def gids(fig, prefix):
    out = {}
    for ax in fig.axes:
        for c in ax.collections:
            g = c.get_gid() or ""
            if g.startswith(prefix):
                out[g] = out.get(g, 0) + len(c.get_offsets())
    return out


def check_panels(fig, tmp_path, name, min_w=700):
    main = [ax for ax in fig.axes if ax.get_ylabel()]
    assert len(main) == 4
    assert main[0].get_title().strip()
    assert main[-1].get_xlabel().strip()
    for ax in main:
        assert ax.get_ylabel().strip()
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
    p = tmp_path / f"{name}.png"
    fig.savefig(p, dpi=80)
    import matplotlib.image as mpimg
    img = mpimg.imread(p)
    assert img.shape[1] >= min_w and img.shape[0] > 300
    return main


def test_address_axis_draws_the_frame(tmp_path):
    s = moved_snap()
    fig = plots.address_axis(s, 10, visits=5)
    main = check_panels(fig, tmp_path, "axis")
    df = address_axis_frame(s, 10, visits=5)
    for rule in ("stock", "v3", "stored"):
        got = {g.split(":")[2]: n for g, n in gids(fig, f"rule:{rule}:").items()}
        assert got == df[f"rule_{rule}"].value_counts().to_dict()
    for k in range(1, 6):
        got = {g.split(":")[2]: n for g, n in gids(fig, f"visit:{k}:").items()}
        assert got == df[f"visit_{k}"].value_counts().to_dict()
    assert sum(gids(fig, "age:").values()) == len(df)
    assert gids(fig, "age:ksm")["age:ksm"] == int(df["page_ksm"].sum())
    # one shared x axis
    lims = {ax.get_xlim() for ax in main}
    assert len(lims) == 1
    # the moved VMA is annotated, the kernel's rule is marked
    assert any(t.get_gid() == "moved" and "mremap" in t.get_text() for t in main[0].texts)
    assert any("(this kernel)" in t.get_text() for t in main[1].get_yticklabels())
    assert "65 rmap_items" in main[0].get_title()


def test_address_axis_readable_with_hundreds_of_items(tmp_path):
    s = moved_snap(n=400, written=120)
    fig = plots.address_axis(s, 10)
    main = check_panels(fig, tmp_path, "big")
    assert len(main[-1].get_xticks()) <= 12
    assert sum(gids(fig, "rule:v3:").values()) == 401


def test_address_axis_timeline(tmp_path):
    fr = [moved_snap(ages={k: k + f for k in range(8)}, full_scans=10 + f) for f in range(4)]
    for fig in (plots.address_axis(fr, 10, rules=["v3"]),
                plots.address_axis_timeline(fr, 10, rules=["v3"])):
        main = check_panels(fig, tmp_path, "tl")
        df = address_axis_frames(fr, 10)
        got = {g.split(":")[1]: n for g, n in gids(fig, "tl-rule:").items()}
        assert got == df["rule_v3"].value_counts().to_dict()
        read = int((~df["page_ksm"] & df["freed_why"].isna()).sum())
        assert gids(fig, "tl-age")["tl-age"] == read
        assert [t.get_text() for t in main[1].get_yticklabels()][0] == "#0 scans 10"
    with pytest.raises(KsmlensError, match="field"):
        plots.address_axis_timeline(fr, 10, field="oldchecksum")


# ------------------------------------------------------------------ text and %ksm

def test_axis_table_folds_runs_and_counts():
    s = moved_snap()
    txt = report.axis_table(s, 10, visits=4)
    df = address_axis_frame(s, 10, visits=4)
    lines = txt.splitlines()
    assert "filed -262144 pages away (mremap)" in lines[1]
    # the 56 merged pages fold into one row; the 8 written ones differ in age
    run = next(l for l in lines if l.split()[1:2] == ["56"])
    assert "MISSED" in run and "PPPP" in run
    assert sum(int(l.split()[1]) for l in lines[3:] if l.startswith("0x")) == len(df)
    assert f"v3 {int((df['rule_v3'] == 'missed').sum())}" in lines[-1]
    assert "stored*" in lines[2]
    short = report.axis_table(s, 10, limit=2)
    assert "more rows" in short
    with pytest.raises(KsmlensError, match="pid 99"):
        report.axis_table(s, 99)


def test_ksm_axis_is_a_view():
    from ksmlens.views import drgn_commands as dc
    assert "axis" in dc.VIEWS and "axis" in dc._VIEW_FUNCS
    assert "axis" in dc._EPILOG


def test_explorer_address_axis_tab(tmp_path):
    import base64

    from ksmlens.views.widgets import Explorer
    fr = [moved_snap(ages={k: k + f for k in range(8)}, full_scans=10 + f) for f in range(2)]
    ex = Explorer(fr[:1])
    assert ex.process_tabs.titles == ("address space", "address axis")
    assert ex.pid.value == 10
    assert "pid 10 proc10: 65 rmap_items" in ex.figures["axis"].axes[0].get_title()
    (o,) = ex.axis_out.outputs
    assert base64.b64decode(o["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert ex.figures["axis_timeline"] is None           # one snapshot: no timeline
    assert "one snapshot" in ex.axis_timeline_out.outputs[0]["data"]["text/plain"]
    ex = Explorer(fr)
    assert "over 2 snapshots" in ex.figures["axis_timeline"].axes[0].get_title()
    ex.pid.value = 11
    assert ex.figures["axis"].axes[0].get_title().startswith("pid 11")
    assert ex.figures["axis_timeline"].axes[0].get_title().startswith("pid 11")


# ------------------------------------------------------------------ a real guest

@pytest.mark.vm
def test_real_v3_after_mremap(tmp_path):
    """One v3 guest, the mremap scenario, then 8 of the moved pages written
    (they stop being KSM and age under SmartScan). Against the kernel: the
    items drawn per process == /proc/PID/ksm_stat ksm_rmap_items (ksmd held);
    the SmartScan columns == what verify_smartscan observes the kernel do;
    the moved process's items marked missed under v3 (the booted kernel's
    rule) == its mappings that stay put when verify migrates them."""
    from conftest import boot

    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.experiments.verify import verify, verify_smartscan
    from ksmlens.lab.attach import attach
    from ksmlens.lab.scenarios import ScenarioRun
    from ksmlens.lens.snapshot import take_snapshot

    vm = boot("v3")
    with ScenarioRun(vm, "mremap") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        moved = run.pids("sharer")[0]
        pids = run.pids()
        run.command(f"write {moved} data " + " ".join(map(str, range(8))))
        ksmsys.wait_full_scans(vm, 6)
        with ksmsys.held(vm):
            snap = take_snapshot(attach("vm:" + vm.name))
            stat = ksmsys.read_ksm_stat(vm, pids)
        assert snap.kernel.walk_rule == "v3"
        for pid in pids:
            df = address_axis_frame(snap, pid)
            assert len(df) == stat[pid]["ksm_rmap_items"] > 0, pid
            fig = plots.address_axis(snap, pid)
            assert sum(gids(fig, "rule:v3:").values()) == len(df)
            check_panels(fig, tmp_path, f"v3-{pid}")
        df = address_axis_frame(snap, moved)
        ages = df.loc[~df["page_ksm"], "age"]
        assert len(ages) >= 8 and ages.max() >= 3       # SmartScan state that varies

        ss = verify_smartscan(vm, full_scans=3)
        assert ss.observed > 0                          # the kernel skipped pages
        frames = {}
        checked, skipped = 0, 0
        for row in ss.items:
            pid, v = row["pid"], row["visits"]
            if (pid, v) not in frames:
                frames[(pid, v)] = address_axis_frame(ss.before, pid,
                                                      visits=max(v, 1)).set_index("item")
            r = frames[(pid, v)].loc[row["item"]]
            if row.get("freed"):
                assert r["next"] == "freed"
                continue
            if v == 0:
                continue
            skipped += r["schedule"][:v].count("S")
            assert (r["age_after"], r["skips_after"]) == (row["observed_age"],
                                                          row["observed_skips"]), row
            assert r["schedule"][:v].count("S") == row["skipped"]
            checked += pid == moved
        assert checked >= 8
        assert skipped == ss.observed

        res = verify(vm)
        assert res.agree
        stayed = {}
        for p in res.pages:
            if p["observed"] == "stayed":
                stayed.setdefault(p["pid"], set()).add(p["address"])
        missed = {}
        for pid in pids:
            d = address_axis_frame(res.snapshot, pid)
            missed[pid] = set(d.loc[d["rule_v3"] == "missed", "address"].astype(int))
        assert missed[moved] and missed[moved] == stayed.get(moved, set())
        # the other sharer's items are all found, yet its pages stay: one physical page
        others = [p for p in pids if p != moved]
        assert all(not missed[p] for p in others)
        assert any(stayed.get(p) for p in others)
        print(f"v3 after mremap: rmap_items {[stat[p]['ksm_rmap_items'] for p in pids]}, "
              f"ages of the written pages {sorted(ages.tolist())}, pages_skipped "
              f"+{ss.observed} over {ss.full_scans} scans, {checked} items of pid {moved} "
              f"checked; v3 missed {len(missed[moved])} = stayed {len(stayed[moved])}, "
              f"other sharers stayed {[len(stayed.get(p, ())) for p in others]}")


@pytest.mark.vm
def test_real_union_cow_broken_stable_items(tmp_path):
    """One union guest, the mremap scenario, then (ksmd held) 8 moved pages
    written: their rmap_items stay STABLE on pages that are no longer KSM.
    The picture's data says SmartScan's next visit reads their age /
    remaining_skips from the stored pgoff's bytes; checked against the
    kernel: items drawn == ksm_stat, the stored rule (this kernel's) misses
    nothing and verify sees every KSM page move, and the ages the kernel
    leaves after its visits are the ones the SmartScan columns predict."""
    from conftest import boot

    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.experiments.verify import verify, verify_smartscan
    from ksmlens.kernel.sysfs import RUN_STOP
    from ksmlens.lab.attach import attach
    from ksmlens.lab.scenarios import ScenarioRun
    from ksmlens.lens.snapshot import take_snapshot

    vm = boot("union")
    with ScenarioRun(vm, "mremap") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        moved = run.pids("sharer")[0]
        pids = run.pids()
        ksmsys.set_run(vm, RUN_STOP)
        run.command(f"write {moved} data " + " ".join(map(str, range(8))))
        snap = take_snapshot(attach("vm:" + vm.name))
        stat = ksmsys.read_ksm_stat(vm, pids)
        assert snap.kernel.walk_rule == "stored"
        for pid in pids:
            assert len(address_axis_frame(snap, pid)) == stat[pid]["ksm_rmap_items"] > 0
        df = address_axis_frame(snap, moved)
        broken = df[(df["state"] == "stable") & ~df["page_ksm"]]
        assert len(broken) == 8 and broken["reads_pgoff"].all()
        assert (broken["rule_stored"] == "found").all()
        fig = plots.address_axis(snap, moved)
        assert gids(fig, "age:pgoff")["age:pgoff"] == 8
        check_panels(fig, tmp_path, "union-broken")

        ss = verify_smartscan(vm, full_scans=2)          # ksmd runs again in there
        frames, checked = {}, 0
        for row in ss.items:
            pid, v = row["pid"], row["visits"]
            if pid != moved or v == 0 or row.get("freed"):
                continue
            if v not in frames:
                frames[v] = address_axis_frame(ss.before, moved, visits=v).set_index("item")
            r = frames[v].loc[row["item"]]
            assert (r["age_after"], r["skips_after"]) == (row["observed_age"],
                                                          row["observed_skips"]), row
            checked += bool(r["reads_pgoff"])
        assert checked == 8
        res = verify(vm)
        assert res.agree and res.counts()["observed_stayed"] == 0
        missed = sum(int((address_axis_frame(res.snapshot, p)["rule_stored"] == "missed").sum())
                     for p in pids)
        assert missed == 0
        print(f"union: rmap_items {[stat[p]['ksm_rmap_items'] for p in pids]}; 8 COW-broken "
              f"STABLE items read age/skips {sorted(set(zip(broken['age'], broken['remaining_skips'])))} "
              f"from the stored pgoff; {checked} checked after {ss.full_scans} scans; "
              f"verify: {res.counts()['nodes']} KSM pages, 0 stayed")
