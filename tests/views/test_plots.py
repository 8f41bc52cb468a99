"""ksmlens.views.plots: rendering checked on small hand-made snapshots, then every
figure drawn from real snapshots of a booted union guest and its content
checked against the snapshot and the kernel's counters."""

import re
from collections import Counter

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ksmlens.views import plots  # noqa: E402
from ksmlens.analysis.core import RULES, item_status  # noqa: E402
from ksmlens.errors import KsmlensError  # noqa: E402

from smallsnap import PAGE, item, mapping, node, snapshot  # noqa: E402

# ------------------------------------------------------------------ helpers


def the_ax(fig):
    return fig.axes[0]


def marks(fig, prefix="items:"):
    """gid -> number of points, for the scatter collections whose gid starts with prefix."""
    out = Counter()
    for c in the_ax(fig).collections:
        gid = c.get_gid() or ""
        if gid.startswith(prefix):
            out[gid] += len(c.get_offsets())
    return out


def legend_labels(fig):
    leg = the_ax(fig).get_legend()
    assert leg is not None, "figure has no legend"
    return [t.get_text() for t in leg.get_texts()]


def texts(fig, gid=None):
    return [t.get_text() for t in the_ax(fig).texts if gid is None or t.get_gid() == gid]


def check_figure(fig, tmp_path, name):
    """Title, axis labels and legend are there; the figure saves as a PNG."""
    ax = the_ax(fig)
    assert ax.get_title().strip()
    assert ax.get_xlabel().strip() and ax.get_ylabel().strip()
    assert legend_labels(fig)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=80)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 400
    return path


# ------------------------------------------------------------------ unit: address_space

V1 = (0x7F0000000000, 0x7F0000000000 + 8 * PAGE, 0x7F0000000)          # linear
V2 = (0x7F1000000000, 0x7F1000000000 + 4 * PAGE, 0x7F0000100)          # moved (mremap)


def small_space():
    its = [item(10, V1[0] + k * PAGE, vma=V1, state=s)
           for k, s in enumerate(["stable", "stable", "unstable", "none"])]
    its += [item(10, V2[0] + k * PAGE, vma=V2, state="stable",
                 stored=0x7F0000100 + k) for k in range(3)]           # stored right: moved
    its += [item(10, V2[0] + 3 * PAGE, vma=V2, state="stable", stored=0)]  # stored_unset
    its += [item(10, 0x7F2000000000, vma=None, state="none")]          # no_vma
    its += [item(11, V1[0], vma=V1)]                                   # another process
    return snapshot(its)


def test_address_space_marks_bands_and_pgoff_annotation(tmp_path):
    snap = small_space()
    fig = plots.address_space(snap, 10)
    m = marks(fig)
    assert sum(m.values()) == len(snap.items_of(10)) == 9
    by_status = Counter()
    for gid, n in m.items():
        by_status[gid.split(":")[1]] += n
    assert by_status == Counter(item_status(i) for i in snap.items_of(10)) == \
        {"ok": 4, "moved": 3, "stored_unset": 1, "no_vma": 1}
    assert Counter(i.pgoff_status for i in snap.items_of(10)) == \
        {"ok": 4, "moved": 4, "no_vma": 1}          # the stored index is a separate question
    assert m["items:ok:unstable"] == 1 and m["items:ok:none"] == 1
    ax = the_ax(fig)
    bands = [p for p in ax.patches if p.get_gid() == "vma"]
    assert sorted(round(b.get_width()) for b in bands) == [4, 8]
    # exactly one VMA's vm_pgoff differs from vm_start >> PAGE_SHIFT
    notes = [t for t in texts(fig) if "vm_pgoff" in t]
    assert len(notes) == 1 and f"{V2[2]:#x}" in notes[0] and f"{V2[0] >> 12:#x}" in notes[0]
    assert "cause: mremap" in notes[0]
    labels = legend_labels(fig)
    for s in plots.STATUS_COLORS:
        assert any(l.startswith(f"pgoff {s} (") for l in labels), (s, labels)
    assert "pgoff moved (3)" in labels and "stable (6)" in labels
    assert any("no VMA" in t.get_text() for t in ax.get_yticklabels())
    assert "pid 10" in ax.get_title() and "9 rmap_items" in ax.get_title()
    check_figure(fig, tmp_path, "space")
    # one VMA only
    fig2 = plots.address_space(snap, 10, vma=V2[0])
    assert sum(marks(fig2).values()) == 4


def test_address_space_errors_name_the_pids():
    snap = small_space()
    with pytest.raises(KsmlensError, match=r"pid 99 has no rmap_items.*\[10, 11\]"):
        plots.address_space(snap, 99)
    with pytest.raises(KsmlensError, match="no rmap_items in a VMA at 0x1000"):
        plots.address_space(snap, 10, vma=0x1000)


def test_a_figure_shows_as_png_in_a_notebook():
    """IPython's display formatter (what a notebook cell's value goes
    through) gets a PNG from a figure made without pyplot."""
    from IPython.core.interactiveshell import InteractiveShell
    fig = plots.address_space(small_space(), 10)
    data, _ = InteractiveShell.instance().display_formatter.format(fig)
    png = data["image/png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_draws_into_a_given_axes():
    from matplotlib.figure import Figure
    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    assert plots.address_space(small_space(), 11, ax=ax2) is fig
    assert plots.skip_schedule(ax=ax1) is fig
    assert ax2.get_title().startswith("pid 11") and "SmartScan" in ax1.get_title()


# ------------------------------------------------------------------ unit: stable_tree

def tree_snapshot(n_regular):
    its, nodes = [], []
    sharer_sets = [(1, 2), (1, 3), (2, 3, 4)]
    for k in range(n_regular):
        mine = [item(p, 0x10000000 + (k * 8 + j) * PAGE, vma=(0x10000000, 0x20000000, 0x10000))
                for j, p in enumerate(sharer_sets[k % 3])]
        for i in mine:
            i.stable_node = f"n{k}"
        its += mine
        nodes.append(node(f"n{k}", mine, kpfn=0x1000 + k))
    dups = []
    for d in range(3):
        mine = [item(5, 0x30000000 + (d * 4 + j) * PAGE, vma=(0x30000000, 0x40000000, 0x30000))
                for j in range(4)]
        its += mine
        dups.append(node(f"d{d}", mine, kind="dup", chain="c0", kpfn=0x9000 + d))
    nodes += [node("c0", kind="chain", dups=[d.id for d in dups])] + dups
    return snapshot(its, nodes)


def test_stable_tree_rows_blocks_then_groups(tmp_path):
    snap = tree_snapshot(30)                     # 33 nodes: one labelled row each
    fig = plots.stable_tree(snap)
    m = marks(fig, "nodes:")
    assert m == {"nodes:regular": 30, "nodes:dup": 3, "nodes:chain": 1}
    assert marks(fig, "procs") == {"procs": 5}
    assert "30 regular nodes, 1 chains with 3 dups, 5 sharer processes" in the_ax(fig).get_title()
    assert not texts(fig, "group")
    assert sum(t.startswith("kpfn 0x") for t in texts(fig)) == 33
    check_figure(fig, tmp_path, "tree")
    mid = plots.stable_tree(tree_snapshot(100))  # a dot per node, blocks by sharer set
    assert marks(mid, "nodes:") == {"nodes:regular": 100, "nodes:dup": 3, "nodes:chain": 1}
    assert sorted(int(t.split()[0]) for t in texts(mid, "group")) == [3, 33, 33, 34]
    check_figure(mid, tmp_path, "tree-blocks")
    big = tree_snapshot(400)
    fig = plots.stable_tree(big, max_nodes=300)
    groups = [int(re.match(r"(\d+) nodes", t).group(1)) for t in texts(fig, "group")]
    # the 400 regular nodes fall in 3 sharer sets, the 3 dups (one sharer) in one
    assert sorted(groups) == [3, 133, 133, 134]
    assert marks(fig, "nodes:") == {"nodes:regular": 3, "nodes:dup": 1, "nodes:chain": 1}
    assert "403 nodes > max_nodes=300" in the_ax(fig).get_title()
    check_figure(fig, tmp_path, "tree-grouped")


def test_grouped_boxes_from_the_tables_are_the_node_by_node_ones():
    """Past max_nodes the boxes come from integer codes over the tables
    (no record per node, the 1M path); they must be the boxes the node by
    node path builds, in the same order: chains and dups, an exited
    process (no pid), a dup on migrate_nodes (not drawn), a node no item
    names."""
    from ksmlens.views import treeplots
    snap = tree_snapshot(40)
    extra = [item(7, 0x50000000 + k * PAGE, vma=(0x50000000, 0x60000000, 0x50000))
             for k in range(3)]
    for i in extra:
        i.pid, i.comm, i.stable_node = None, None, "n0"      # its process exited
    lone = node("n-lone", kpfn=0x7777)
    mig = node("d-mig", kind="dup", chain="c0", kpfn=0x8888)
    mig.migrate_list = True
    nodes = list(snap.nodes())
    nodes[0].items += [i.id for i in extra]
    snap = snapshot(list(snap.items()) + extra, nodes + [lone, mig])
    tab = treeplots._leaf_table(snap)
    got = treeplots._grouped_boxes(snap, tab)
    want = treeplots._node_boxes(snap, "blocks")
    for b in want:
        b["node_items"] = []
    assert got == want and len(got) >= 5


# ------------------------------------------------------------------ unit: SmartScan

def test_skip_schedule_is_the_kernels(tmp_path):
    fig = plots.skip_schedule()
    ax = the_ax(fig)
    bars = [p for p in ax.patches if p.get_gid() == "skip_age"]
    # mm/ksm.c skip_age(): <=3 -> 1, <=5 -> 2, <=8 -> 4, else 8
    assert [b.get_height() for b in bars] == [1] * 4 + [2] * 2 + [4] * 3 + [8] * 12
    proc = [int(x) for x, _ in marks_xy(fig, "processed")]
    skip = [int(x) for x, _ in marks_xy(fig, "skipped")]
    # should_skip_rmap_item() by hand: ages 0-2 never skip; age 3 processed
    # (remaining_skips = 1), 4 skipped, 5 processed (2), 6-7 skipped, 8
    # processed (4), 9-12 skipped, 13 processed (8), 14-21 skipped.
    assert proc == [0, 1, 2, 3, 5, 8, 13]
    assert sorted(proc + skip) == list(range(21))
    assert "processed (7)" in legend_labels(fig) and "skipped (14)" in legend_labels(fig)
    check_figure(fig, tmp_path, "schedule")


def marks_xy(fig, gid):
    return [tuple(o) for c in the_ax(fig).collections if c.get_gid() == gid
            for o in c.get_offsets()]


def test_smartscan_heatmap_rows_columns_and_gaps(tmp_path):
    V = (0x5000000, 0x5000000 + 4 * PAGE, 0x5000)
    a = snapshot([item(3, V[0] + k * PAGE, vma=V, state="none", age=k, skips=1)
                  for k in range(3)], full_scans=7)
    b = snapshot([item(3, V[0] + k * PAGE, vma=V, state="none" if k else "stable",
                       age=k + 2, skips=0) for k in (0, 1, 3)], full_scans=9)
    fig = plots.smartscan_heatmap([a, b])
    arr = the_ax(fig).images[0].get_array()
    assert arr.shape == (4, 2)
    assert list(arr.mask[:, 0]) == [False, False, False, True]
    assert list(arr.mask[:, 1]) == [False, False, True, False]
    assert arr[0, 0] == 0 and arr[1, 1] == 3 and arr[3, 1] == 5
    assert [t.get_text() for t in the_ax(fig).get_xticklabels()] == ["7", "9"]
    assert len(marks_xy(fig, "stable")) == 1
    check_figure(fig, tmp_path, "heat")
    fig = plots.smartscan_heatmap([a, b], field="remaining_skips")
    assert list(the_ax(fig).images[0].get_array()[:3, 0]) == [1, 1, 1]
    with pytest.raises(KsmlensError, match="field 'pgoff' is not a SmartScan field"):
        plots.smartscan_heatmap([a], field="pgoff")
    with pytest.raises(KsmlensError, match="at least one snapshot"):
        plots.smartscan_heatmap([])


# ------------------------------------------------------------------ unit: walk replay

def test_walk_replay_cells_and_order(tmp_path):
    ok = node("ok", kpfn=0x10, mappings=[
        mapping(1, 0x1000, found={"stock": True, "v3": True, "stored": True})])
    bad = node("bad", kpfn=0x20, unmappable=["v3"], mappings=[
        mapping(1, 0x2000, found={"stock": True, "v3": True, "stored": True}),
        mapping(2, 0x9000, found={"stock": True, "v3": False, "stored": True}),
        mapping(3, 0xa000, mapped=False, found={"stock": False, "v3": False, "stored": True})])
    snap = snapshot([], [ok, bad])
    fig = plots.walk_replay(snap)
    arr = np.asarray(the_ax(fig).images[0].get_array())
    # node with a miss first; columns stock, v3, stored
    assert arr.tolist() == [[1, 1, 1], [1, 2, 1], [3, 3, 1], [1, 1, 1]]
    this = [p for p in the_ax(fig).patches if p.get_gid() == "this_rule"]
    assert len(this) == 1 and this[0].get_x() == RULES.index("stored") - 0.5
    assert "missed (1 cells)" in legend_labels(fig)
    assert "stock 0, v3 1, stored 0" in the_ax(fig).get_title()
    check_figure(fig, tmp_path, "replay")
    # no stored pgoff: that column is n/a
    for m in bad.mappings + ok.mappings:
        m["found"]["stored"] = None
    fig = plots.walk_replay(snapshot([], [ok, bad], variant="v3", walk_rule="v3"),
                            max_nodes=1)
    arr = np.asarray(the_ax(fig).images[0].get_array())
    assert arr.tolist() == [[1, 1, 0], [1, 2, 0], [3, 3, 0]]
    assert "1 of 2 stable nodes" in the_ax(fig).get_title()
    with pytest.raises(KsmlensError, match="no stable node .* walk-replay mappings"):
        plots.walk_replay(snapshot([], [node("x", kpfn=1)]))


def test_walk_replay_groups_rows_past_max_rows():
    maps = [mapping(1, 0x1000 * k, found={"stock": True, "v3": k % 2 == 0, "stored": True})
            for k in range(1, 9)]
    snap = snapshot([], [node("n", kpfn=1, mappings=maps, unmappable=["v3"])])
    fig = plots.walk_replay(snap, max_rows=4)
    arr = np.asarray(the_ax(fig).images[0].get_array())
    assert sorted(arr.tolist()) == [[1, 1, 1], [1, 2, 1]]
    assert all("4 mappings" in t.get_text() for t in the_ax(fig).get_yticklabels())


# ------------------------------------------------------------------ unit: verify_outcome

def test_verify_outcome_from_a_dict(tmp_path):
    rows = [{"node": f"n{k}", "kpfn": k, "pids": [1, 2], "mappings": 2, "predicted": p,
             "observed": o, "agree": (p == "moves") == (o == "moved")}
            for k, (p, o) in enumerate([("moves", "moved")] * 3 + [("stays", "stayed")]
                                       + [("stays", "moved")])]
    pages = [{"pid": 1, "address": k, "node": r["node"], "predicted": r["predicted"],
              "observed": r["observed"], "agree": r["agree"]} for k, r in enumerate(rows * 2)]
    fig = plots.verify_outcome({"rule": "v3", "rows": rows, "pages": pages})
    cnt = {t.get_gid(): t.get_text() for t in the_ax(fig).texts}
    assert cnt["count:moves:moved"] == "3 nodes\n6 pages"
    assert cnt["count:stays:stayed"] == "1 nodes\n2 pages"
    assert cnt["count:stays:moved"] == "1 nodes\n2 pages"
    assert cnt["count:moves:mixed"] == "0 nodes\n0 pages"
    face = {p.get_gid(): matplotlib.colors.to_hex(p.get_facecolor())
            for p in the_ax(fig).patches}
    assert face["cell:moves:moved"] == face["cell:stays:stayed"] != face["cell:stays:moved"]
    assert "4/5 stable nodes and 8/10 mapped pages agree" in the_ax(fig).get_title()
    assert "rule 'v3'" in the_ax(fig).get_ylabel()
    check_figure(fig, tmp_path, "verify")


def test_verify_outcome_of_reclaim(tmp_path):
    """verify --by reclaim's words: v3's shape (16 nodes stay, the moved
    process's 64 mappings stay mapped, the other's 64 are swapped out)."""
    rows = [{"node": f"n{k}", "predicted": "stays", "observed": "stayed", "agree": True}
            for k in range(16)]
    pages = [{"pid": 1 + k % 2, "address": k, "node": f"n{k % 16}",
              "predicted": "mapped" if k % 2 else "unmapped",
              "observed": "mapped" if k % 2 else "swapped", "agree": True} for k in range(128)]
    fig = plots.verify_outcome({"rule": "v3", "by": "reclaim", "rows": rows, "pages": pages})
    cnt = {t.get_gid(): t.get_text() for t in the_ax(fig).texts}
    assert cnt["count:stays:stayed"] == "16 nodes\n0 pages"
    assert cnt["count:unmapped:swapped"] == "0 nodes\n64 pages"
    assert cnt["count:mapped:mapped"] == "0 nodes\n64 pages"
    assert "count:moves:moved" not in cnt
    assert "reclaim" in the_ax(fig).get_xlabel()
    check_figure(fig, tmp_path, "verify-reclaim")


# ------------------------------------------------------------------ real guests

@pytest.fixture(scope="module")
def real():
    """Snapshots of a booted union guest: mremap (with the verification
    experiment), chain, and a SmartScan timeline; with the kernel's own
    counters and smaps KSM pages read right after each snapshot."""
    from conftest import boot

    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.lab.attach import attach
    from ksmlens.lab.scenarios import ScenarioRun
    from ksmlens.lens.snapshot import take_snapshot
    from ksmlens.experiments.verify import verify

    vm = boot("union")

    def snap():
        return take_snapshot(attach("vm:" + vm.name))
    out = {"vm": vm}
    with ScenarioRun(vm, "mremap") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        out["mremap"] = snap()
        out["mremap_smaps"] = ksmsys.read_smaps_ksm(vm, run.pids())
        out["moved_pid"] = run.history[2]["result"]["pid"]
        out["verify"] = verify(vm)
    with ScenarioRun(vm, "chain") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        out["chain"] = snap()
        out["chain_sysfs"] = ksmsys.read_counters(vm)
        out["chain_pids"] = run.pids()
    with ScenarioRun(vm, "smartscan") as run:
        for st in run.scenario.steps:
            run.step(st.name)
        frames = [snap()]
        for _ in range(3):
            ksmsys.wait_full_scans(vm, 1)
            frames.append(snap())
        out["smartscan"] = frames
    return out


@pytest.mark.vm
def test_real_address_space(real, tmp_path):
    snap, moved_pid = real["mremap"], real["moved_pid"]
    pids = sorted({i.pid for i in snap.items() if i.pid is not None})
    assert moved_pid in pids and len(pids) >= 2
    moved_marks = 0
    for pid in pids:
        fig = plots.address_space(snap, pid)
        m = marks(fig)
        items = snap.items_of(pid)
        assert sum(m.values()) == len(items)
        moved_marks += sum(n for g, n in m.items() if g.split(":")[1] == "moved")
        # stable marks in a live VMA == KSM pages the kernel reports for the pid
        stable_mapped = sum(n for g, n in m.items()
                            if g.endswith(":stable") and ":no_vma:" not in g)
        assert stable_mapped == real["mremap_smaps"][pid], pid
        notes = [t for t in texts(fig) if t.startswith("vm_pgoff")]
        if pid == moved_pid:
            # mremap kept vm_pgoff: the band and its pgoff range part
            assert notes and all("!= vm_start>>12" in t and "cause: mremap" in t
                                 for t in notes)
            assert "64 moved" in the_ax(fig).get_title() or \
                f"{sum(i.pgoff_status == 'moved' for i in items)} moved" in the_ax(fig).get_title()
            path = check_figure(fig, tmp_path, f"space-{pid}")
        else:
            assert not notes
    assert moved_marks == sum(i.pgoff_status == "moved" for i in snap.items()) > 0
    print("inspect:", path)


@pytest.mark.vm
def test_real_stable_tree(real, tmp_path):
    snap, sysfs = real["chain"], real["chain_sysfs"]
    fig = plots.stable_tree(snap)
    m = marks(fig, "nodes:")
    assert m["nodes:chain"] == sysfs["stable_node_chains"] > 0
    assert m["nodes:dup"] == sysfs["stable_node_dups"] > 0
    assert m.get("nodes:regular", 0) == sysfs["pages_shared"] - sysfs["stable_node_dups"]
    assert marks(fig, "procs") == {"procs": len(real["chain_pids"])}
    assert f"{sysfs['stable_node_dups']} dups" in the_ax(fig).get_title()
    check_figure(fig, tmp_path, "tree-chain")
    grouped = plots.stable_tree(snap, max_nodes=5)
    groups = [int(re.match(r"(\d+) nodes", t).group(1)) for t in texts(grouped, "group")]
    singles = marks(grouped, "nodes:dup")["nodes:dup"] - len(groups)
    assert sum(groups) + singles == sysfs["stable_node_dups"]
    check_figure(grouped, tmp_path, "tree-chain-grouped")
    blocks = plots.stable_tree(snap, label_nodes=5)
    assert marks(blocks, "nodes:dup") == {"nodes:dup": sysfs["stable_node_dups"]}
    assert sum(int(t.split()[0]) for t in texts(blocks, "group")) + \
        sum(t.startswith("kpfn") for t in texts(blocks)) == sysfs["stable_node_dups"]
    mre = plots.stable_tree(real["mremap"])
    assert marks(mre, "nodes:regular") == {"nodes:regular": real["mremap"].counters["pages_shared"]}
    print("inspect:", tmp_path / "tree-chain.png")


@pytest.mark.vm
def test_real_smartscan_heatmap(real, tmp_path):
    frames = real["smartscan"]
    scans = [f.counters["full_scans"] for f in frames]
    assert scans == sorted(set(scans))
    fig = plots.smartscan_heatmap(frames)
    arr = the_ax(fig).images[0].get_array()
    keys = sorted({(i.pid, i.address) for f in frames for i in f.items()})
    assert arr.shape == (len(keys), len(frames))
    assert [t.get_text() for t in the_ax(fig).get_xticklabels()] == [str(s) for s in scans]
    assert len(marks_xy(fig, "stable")) == sum(i.state == "stable" for f in frames
                                               for i in f.items())
    # should_skip_rmap_item() increments the age of every non-KSM item it
    # visits (skipped or not), and nothing lowers it
    never_stable = [r for r, k in enumerate(keys)
                    if all(i.state != "stable" for f in frames for i in f.items()
                           if (i.pid, i.address) == k)]
    assert never_stable
    first, last = arr[never_stable, 0], arr[never_stable, -1]
    assert not np.ma.is_masked(first) and not np.ma.is_masked(last)
    assert (last >= first).all() and (last > first).any()
    path = check_figure(fig, tmp_path, "heat")
    skips = plots.smartscan_heatmap(frames, field="remaining_skips")
    sarr = the_ax(skips).images[0].get_array()
    assert sarr[never_stable].max() <= 8       # skip_age() never gives more
    assert sarr[never_stable].max() >= 1       # and SmartScan did set some
    check_figure(skips, tmp_path, "heat-skips")
    print("inspect:", path)


@pytest.mark.vm
def test_real_walk_replay(real, tmp_path):
    snap = real["mremap"]
    assert snap.kernel.walk_rule == "stored"
    fig = plots.walk_replay(snap, max_nodes=1000)
    arr = np.asarray(the_ax(fig).images[0].get_array())
    n_maps = sum(len(n.mappings) for n in snap.nodes())
    assert arr.shape == (n_maps, len(RULES))
    col = {r: Counter(arr[:, k].tolist()) for k, r in enumerate(RULES)}
    moved = sum(i.pgoff_status == "moved" and i.state == "stable" for i in snap.items())
    # v3 searches address >> PAGE_SHIFT: it misses exactly the moved pages
    assert col["v3"][2] == moved > 0
    assert col["stock"][2] == 0 and col["stored"][2] == 0
    this = [p for p in the_ax(fig).patches if p.get_gid() == "this_rule"]
    assert this and this[0].get_x() == RULES.index("stored") - 0.5
    assert f"v3 {moved}" in the_ax(fig).get_title()
    path = check_figure(fig, tmp_path, "replay")
    print("inspect:", path)


@pytest.mark.vm
def test_real_verify_outcome(real, tmp_path):
    res = real["verify"]
    assert res.rows
    fig = plots.verify_outcome(res)
    cells = {t.get_gid(): t.get_text() for t in the_ax(fig).texts}
    for (p, o), n in Counter((r["predicted"], r["observed"]) for r in res.rows).items():
        pages = sum(1 for g in res.pages if (g["predicted"], g["observed"]) == (p, o))
        assert cells[f"count:{p}:{o}"] == f"{n} nodes\n{pages} pages"
    agree = sum(r["agree"] for r in res.rows)
    assert f"{agree}/{len(res.rows)} stable nodes" in the_ax(fig).get_title()
    # union: the stored pgoff finds every mapping, so every page can move
    assert cells["count:moves:moved"].startswith(f"{len(res.rows)} nodes")
    path = check_figure(fig, tmp_path, "verify")
    print("inspect:", path)


def test_address_space_shows_ksm_zero_pages(tmp_path):
    """KSM zero pages have no rmap_item: their own row, one mark each."""
    snap = small_space()
    k = snap.mm_slots.index[snap.mm_slots["pid"] == 10][0]
    snap.mm_slots.at[k, "zero_pages"] = [0x7F3000000000 + j * PAGE for j in range(5)]
    snap.changed()
    fig = plots.address_space(snap, 10)
    check_figure(fig, tmp_path, "zero")
    assert sum(marks(fig, "zero_pages").values()) == 5
    assert "5 KSM zero pages" in the_ax(fig).get_title()
    assert "KSM zero page (5)" in legend_labels(fig)
    only = snapshot([item(12, 0x7F4000000000, vma=None, state="none")])
    only.rmap_items = only.rmap_items.iloc[0:0]
    only.mm_slots.at[0, "zero_pages"] = [0x7F4000000000]
    only.changed()
    fig = plots.address_space(only, 12)      # a process with zero pages only
    assert sum(marks(fig, "zero_pages").values()) == 1
