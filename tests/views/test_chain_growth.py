"""chain_growth: a chain and its dups along a timeline. Unit tests on
hand-made frames (data, figure, a saved and reloaded timeline); one vm test
that steps ksmd batch by batch through the ``chain`` scenario and checks
every frame's counts and bars against the kernel's sysfs read around it."""

import dataclasses
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from ksmlens.analysis.chains import chain_counts_frame, chain_nodes_frame  # noqa: E402
from ksmlens.errors import KsmlensError  # noqa: E402
from ksmlens.experiments.watch import Timeline  # noqa: E402
from ksmlens.views import plots  # noqa: E402

from smallsnap import PAGE, item, node, snapshot  # noqa: E402

VMA = (0x10000000, 0x20000000, 0x10000)


def frame(fill, mps=4, scanned=0, chain=True, sysfs=None):
    """A snapshot of one content's KSM pages: ``fill`` = items per page; as
    dups of one chain (``chain``) or regular nodes. Node ids are stable
    across frames (node k is "n<k>"), as the kernel's addresses are."""
    its, nodes = [], []
    for k, n in enumerate(fill):
        mine = [item(1 + j % 3, 0x10000000 + (k * 64 + j) * PAGE, vma=VMA, node=f"n{k}")
                for j in range(n)]
        its += mine
        nodes.append(node(f"n{k}", mine, kind="dup" if chain else "regular",
                          chain="c0" if chain else None, kpfn=0x1000 + k))
    if chain and fill:
        nodes.append(node("c0", kind="chain", dups=[f"n{k}" for k in range(len(fill))]))
    s = snapshot(its, nodes)
    s.counters.update(max_page_sharing=mps, pages_scanned=scanned)
    if sysfs is not None:
        s.meta["sysfs_after"] = sysfs
    return s


def timeline():
    return [frame([], scanned=100), frame([3], chain=False, scanned=106),
            frame([4, 2], scanned=112), frame([4, 4, 4, 1], scanned=118,
                                              sysfs={"stable_node_dups": 4,
                                                     "stable_node_chains": 1})]


def bars(fig):
    """(frame, kind) -> [heights] of the top panel's node bars."""
    out = {}
    for p in fig.axes[0].patches:
        gid = p.get_gid() or ""
        if gid.startswith("node:"):
            _, f, kind = gid.split(":")
            out.setdefault((int(f), kind), []).append(p.get_height())
    return out


def test_chain_nodes_and_counts_per_frame():
    fr = timeline()
    nodes = chain_nodes_frame(fr)
    assert nodes.groupby("frame").size().to_dict() == {1: 1, 2: 2, 3: 4}
    f3 = nodes[nodes.frame == 3].sort_values("order")
    assert f3["rmap_hlist_len"].tolist() == [4, 4, 4, 1] == f3["items"].tolist()
    assert f3["new"].tolist() == [False, False, True, True]
    # the regular node of frame 1 is dup n0 of frame 2: same node, same place
    assert nodes[nodes.node == "n0"][["kind", "order", "new"]].values.tolist() == \
        [["regular", 0, True], ["dup", 0, False], ["dup", 0, False]]
    assert chain_nodes_frame(fr, regular=False).groupby("frame").size().to_dict() == {2: 2, 3: 4}
    c = chain_counts_frame(fr)
    assert c[["regular", "chains", "dups", "full_dups"]].values.tolist() == \
        [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 2, 1], [0, 1, 4, 3]]
    assert c["pages_shared"].tolist() == [0, 1, 2, 4]
    assert c["pages_sharing"].tolist() == [0, 2, 4, 9]
    assert c["pages_scanned"].tolist() == [100, 106, 112, 118]
    assert c["sysfs_after_stable_node_dups"].isna().tolist() == [True] * 3 + [False]
    with pytest.raises(KsmlensError, match="no snapshots"):
        chain_counts_frame([])


def test_chain_growth_table():
    from ksmlens.views.tables import chain_growth_table
    lines = chain_growth_table(timeline()).splitlines()
    assert lines[0].split()[:6] == ["frame", "+scanned", "regular", "chains", "dups", "sysfs"]
    assert lines[3].split() == ["2", "12", "0", "1", "2", "-", "2", "4", "1x4", "+", "1x2"]
    assert lines[4].split() == ["3", "18", "0", "1", "4", "4", "4", "9", "3x4", "+", "1x1"]
    assert lines[-1] == "max_page_sharing = 4"


def test_chain_growth_figure(tmp_path):
    fr = timeline()
    fig = plots.chain_growth(fr)
    top, bot = fig.axes[:2]
    b = bars(fig)
    assert set(b) == {(1, "regular"), (2, "dup"), (2, "newdup"), (3, "dup"), (3, "newdup")}
    assert sorted(b[(3, "dup")] + b[(3, "newdup")]) == [1, 4, 4, 4]
    assert b[(2, "dup")] == [4] and b[(2, "newdup")] == [2] and b[(1, "regular")] == [3]
    # the max_page_sharing line, once per frame at mps
    line = [c for c in top.collections if c.get_gid() == "max_page_sharing"][0]
    assert {round(seg[0][1]) for seg in line.get_segments()} == {4}
    steps = {l.get_gid(): l.get_ydata().tolist() for l in bot.lines}
    assert steps["count:dups"] == [0, 0, 2, 4] and steps["count:chains"] == [0, 0, 1, 1]
    assert steps["sysfs:stable_node_dups"] == [4]
    for ax in (top, bot):
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() and ax.get_legend().get_texts()
    assert "1 chain(s) with 4 dups after 4 frames (max_page_sharing=4)" in top.get_title()
    assert [t.get_text() for t in top.get_xticklabels()] == ["0\n+0", "1\n+6", "2\n+12",
                                                             "3\n+18"]
    fig.savefig(tmp_path / "g.png", dpi=60)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(KsmlensError, match="two panels"):
        plots.chain_growth(fr, ax=top)


def test_chain_growth_from_a_saved_timeline_and_at_hundreds_of_dups(tmp_path):
    fr = [frame([8] * k * 40, mps=8, scanned=k * 320) for k in range(1, 9)]   # up to 320 dups
    Timeline(fr).save(tmp_path / "tl")
    back = Timeline.load(tmp_path / "tl").frames
    assert chain_counts_frame(back).equals(chain_counts_frame(fr))
    Timeline(timeline()).save(tmp_path / "col", suffix=".ksm")      # columnar, with meta
    col = chain_counts_frame(Timeline.load(tmp_path / "col").frames)
    assert col.equals(chain_counts_frame(timeline()))
    assert chain_nodes_frame(Timeline.load(tmp_path / "col").frames).equals(
        chain_nodes_frame(timeline()))
    fig = plots.chain_growth(back)
    b = bars(fig)
    assert sum(len(v) for k, v in b.items() if k[0] == 7) == 320
    # 320 bars in one frame: no edges (a filled profile), all inside the frame's slot
    ps = [p for p in fig.axes[0].patches if (p.get_gid() or "").startswith("node:7:")]
    assert all(p.get_linewidth() == 0 for p in ps)
    assert min(p.get_x() for p in ps) >= 7 - 0.43 and max(p.get_x() + p.get_width()
                                                          for p in ps) <= 7 + 0.43
    many = [frame([2] * k, mps=2, scanned=k) for k in range(40)]
    fig = plots.chain_growth(many, max_labels=10)
    assert len(fig.axes[0].get_xticks()) <= 10
    fig.savefig(tmp_path / "many.png", dpi=60)


def test_watch_batches_option_is_checked_before_any_vm(capsys):
    from ksmlens.cli import main
    assert main(["watch", "--name", "no-such-vm", "--batches", "12,0"]) == 2
    assert "--batches '12,0': give pages_to_scan per batch" in capsys.readouterr().err


# ------------------------------------------------------------------ the kernel

@pytest.mark.vm
def test_chain_growth_against_the_kernel(tmp_path, capsys):
    """Step ksmd through the ``chain`` scenario (max_page_sharing=16, 384
    mappings of one content) with ``ksmlens watch --batches``: at each frame
    the walk's chains and dups, and the figure's bars and lines, equal sysfs
    stable_node_chains/dups read just before and after the pause; no dup
    holds more than max_page_sharing; the last frame equals the kernel's
    counts after the watch."""
    from conftest import boot

    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.cli import main
    from ksmlens.lab.scenarios import ScenarioRun, get_scenario

    vm = boot("union")
    sc = get_scenario("chain")
    sc = dataclasses.replace(sc, knobs={**sc.knobs, "run": 0, "sleep_millisecs": 500})
    with ScenarioRun(vm, sc) as run:
        total = sum(run.pages_of(p) for p in run.pids())
        capsys.readouterr()
        pages_to_scan = ksmsys.read_counters(vm)["pages_to_scan"]
        assert main(["watch", "--name", vm.name, "--batches", "2000,12" + ",64" * 6,
                     "-o", str(tmp_path / "tl")]) == 0
        out = capsys.readouterr().out
        final = ksmsys.read_counters(vm)
        # the watch put ksmd back as it found it
        assert (final["run"], final["pages_to_scan"]) == (0, pages_to_scan)
    mps = final["max_page_sharing"]
    frames = Timeline.load(tmp_path / "tl").frames            # the figure of saved frames
    counts = chain_counts_frame(frames)
    nodes = chain_nodes_frame(frames)
    fig = plots.chain_growth(frames)
    b = bars(fig)
    steps = {l.get_gid(): l.get_ydata().tolist() for l in fig.axes[1].lines}
    for k, f in enumerate(frames):
        for when in ("before", "after"):
            sysfs = f.meta[f"sysfs_{when}"]
            assert counts.loc[k, "dups"] == sysfs["stable_node_dups"], (k, when)
            assert counts.loc[k, "chains"] == sysfs["stable_node_chains"], (k, when)
            assert counts.loc[k, "pages_shared"] == sysfs["pages_shared"], (k, when)
            assert counts.loc[k, "pages_sharing"] == sysfs["pages_sharing"], (k, when)
        drawn_dups = len(b.get((k, "dup"), [])) + len(b.get((k, "newdup"), []))
        assert drawn_dups == f.meta["sysfs_after"]["stable_node_dups"]
        assert steps["count:dups"][k] == f.meta["sysfs_after"]["stable_node_dups"]
        assert steps["count:chains"][k] == f.meta["sysfs_after"]["stable_node_chains"]
    assert (nodes["rmap_hlist_len"] <= mps).all()
    assert (nodes["items"] == nodes["rmap_hlist_len"]).all()
    # the story: a regular node fills, then a chain of dups, all of them
    # filled to max_page_sharing in the end
    assert (counts["regular"] == 1).any() and (counts["chains"] == 0).any()
    last = counts.iloc[-1]
    assert last["dups"] == final["stable_node_dups"] == -(-total // mps)
    assert last["chains"] == final["stable_node_chains"] == 1
    assert last["pages_shared"] + last["pages_sharing"] == total
    assert steps["count:full_dups"][-1] == final["stable_node_dups"]
    # the CLI's table: its last row is the kernel's final state
    row = [l for l in out.splitlines() if l.split()[:1] == [str(len(frames) - 1)]][-1].split()
    assert row[4:8] == [str(final["stable_node_dups"])] * 2 + \
        [str(final["pages_shared"]), str(final["pages_sharing"])]
    fig.savefig(tmp_path / "chain-growth.png", dpi=80)
    print("inspect:", tmp_path / "chain-growth.png")


@pytest.mark.vm
def test_the_merge_stable_tree_of_notebook_01():
    """01-tour's figure, ``plots.stable_tree`` of the ``merge`` scenario:
    one mark per KSM page (sysfs pages_shared), one per process, and each
    process's label says its rmap_items as /proc/PID/ksm_stat does; the
    labels' per-node counts add up to pages_shared + pages_sharing."""
    import re

    from conftest import boot

    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.lab.attach import attach
    from ksmlens.lab.scenarios import ScenarioRun
    from ksmlens.lens.snapshot import take_snapshot

    vm = boot("union")
    with ScenarioRun(vm, "merge") as run:
        run.step("merged")
        with ksmsys.held(vm):
            snap = take_snapshot(attach("vm:" + vm.name), vm=vm)
            sysfs = ksmsys.read_counters(vm)
            stat = run.ksm_stat()
    ax = plots.stable_tree(snap).axes[0]
    marks = {c.get_gid(): len(c.get_offsets()) for c in ax.collections
             if c.get_gid() in ("nodes:regular", "procs")}
    assert marks == {"nodes:regular": sysfs["pages_shared"], "procs": len(stat)}
    texts = [t.get_text() for t in ax.texts]
    per_node = [int(m.group(1)) for t in texts
                if (m := re.match(r"kpfn 0x[0-9a-f]+ \((\d+)\)", t))]
    assert len(per_node) == sysfs["pages_shared"]
    assert sum(per_node) == sysfs["pages_shared"] + sysfs["pages_sharing"]
    for pid, st in stat.items():
        label = f"\n{st['ksm_rmap_items']} rmap_items"
        assert any(t.startswith(f"pid {pid} ") and t.endswith(label) for t in texts), (pid, st)
    assert f"{sysfs['pages_shared']} regular nodes" in ax.get_title()
