"""ksmlens.views.widgets.Explorer driven through ipywidgets' own model (Dropdown
values, button clicks), on small snapshots and then on a real lab guest."""

import base64
import re

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from ksmlens.errors import KsmlensError  # noqa: E402
from ksmlens.views.widgets import ALL_VMAS, Explorer  # noqa: E402

from smallsnap import PAGE, item, mapping, node, snapshot  # noqa: E402

V1 = (0x7F0000000000, 0x7F0000000000 + 8 * PAGE, 0x7F0000000)
V2 = (0x7F1000000000, 0x7F1000000000 + 4 * PAGE, 0x7F0000100)


def title(fig):
    return fig.axes[0].get_title()


def png_of(out):
    """The PNG bytes an Output widget shows."""
    (o,) = out.outputs
    data = base64.b64decode(o["data"]["image/png"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def table_rows(html):
    return html.count("<tr>") - 1     # minus the header


def frames():
    a_items = [item(10, V1[0] + k * PAGE, vma=V1, node="n1") for k in range(3)]
    a_items += [item(11, V1[0] + k * PAGE, vma=V1, node="n1") for k in range(2)]
    n1 = node("n1", a_items, kpfn=0x100, unmappable=["v3"], mappings=[
        mapping(10, V1[0], found={"stock": True, "v3": False, "stored": True}),
        mapping(11, V1[0], found={"stock": True, "v3": True, "stored": True})])
    a = snapshot(a_items, [n1], full_scans=5)
    b_items = [item(10, V1[0] + k * PAGE, vma=V1) for k in range(3)]
    b_items += [item(10, V2[0] + k * PAGE, vma=V2, state="none") for k in range(4)]
    b_items += [item(12, V1[0], vma=V1)]
    n2 = node("n2", b_items[:1], kpfn=0x200)
    b = snapshot(b_items, [n2], full_scans=8)
    return a, b


def test_explorer_on_saved_snapshots(tmp_path):
    a, b = frames()
    paths = []
    for k, s in enumerate((a, b)):
        paths.append(tmp_path / f"{k}.json")
        s.save(paths[-1])
    ex = Explorer([str(p) for p in paths])
    assert [lbl for lbl, _ in ex.frame.options] == ["#0 full_scans=5", "#1 full_scans=8"]
    assert ex.frame.value == 1 and ex.snap.counters["full_scans"] == 8
    assert [v for _, v in ex.pid.options] == [10, 12]
    assert "2 saved snapshot(s)" in ex.status.value
    # a notebook shows the whole layout
    view = ex._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == ex.widget.model_id
    assert ex.step_button.disabled and ex.wait_button.disabled and ex.refresh_button.disabled
    # pid 10 in frame 1: 7 items in 2 VMAs
    assert ex.pid.value == 10
    assert "7 rmap_items in 2 VMA(s)" in title(ex.figures["space"])
    assert table_rows(ex.items_table.value) == 7
    png1 = png_of(ex.space_out)
    # pick one VMA: figure, table and picture follow
    assert [v for _, v in ex.vma.options] == [ALL_VMAS, V1[0], V2[0]]
    ex.vma.value = V2[0]
    assert "4 rmap_items in 1 VMA(s)" in title(ex.figures["space"])
    assert table_rows(ex.items_table.value) == 4 and "none" in ex.items_table.value
    assert png_of(ex.space_out) != png1
    # another process
    ex.pid.value = 12
    assert title(ex.figures["space"]).startswith("pid 12")
    assert [v for _, v in ex.vma.options] == [ALL_VMAS, V1[0]] and ex.vma.value == ALL_VMAS
    # back to the first snapshot: its processes and its stable node
    ex.frame.value = 0
    assert [v for _, v in ex.pid.options] == [10, 11] and ex.pid.value == 10
    assert ex.node.value == "n1" and "missed by v3" in ex.node.options[0][0]
    assert "1 of 1 stable nodes, 2 mappings" in title(ex.figures["node"])
    assert table_rows(ex.node_table.value) == 2
    assert "stable tree: 1 regular nodes" in title(ex.figures["tree"])
    png_of(ex.node_out)
    png_of(ex.tree_out)
    # no lab: the buttons say so in one line instead of raising
    ex.step_button.click()
    assert "cannot advance the scenario: this Explorer shows saved snapshots" in ex.status.value
    with pytest.raises(KsmlensError, match="cannot take a snapshot"):
        ex.refresh()
    with pytest.raises(KsmlensError, match="empty list of snapshots"):
        Explorer([])
    with pytest.raises(KsmlensError, match="cannot read a int"):
        Explorer(3)


@pytest.mark.vm
@pytest.mark.parametrize("arch", ["x86_64", pytest.param(
    "arm64", marks=[pytest.mark.arm64, pytest.mark.full])])   # arm64: `pytest -m arm64`
def test_explorer_drives_a_real_lab(tmp_path, arch):
    from conftest import boot

    import ksmlens.lab.ksmsys as ksmsys
    from ksmlens.lab.scenarios import ScenarioRun

    vm = boot("union", arch=None if arch == "x86_64" else arch)
    with ScenarioRun(vm, "mremap") as run:
        ex = Explorer(run)
        assert len(ex.frames) == 1 and ex.step_button.description == "step: merged"
        first = ex.snap
        ex.step_button.click()
        assert [h["step"] for h in run.history] == ["start", "merged"]
        assert len(ex.frames) == 2 and ex.frame.value == 1
        assert "step merged done" in ex.status.value
        assert ex.snap.counters["full_scans"] > first.counters["full_scans"]
        # the Explorer's tables agree with the kernel: per process, the
        # stable rmap_items shown are its KSM pages (smaps_rollup)
        smaps = ksmsys.read_smaps_ksm(vm, run.pids())
        for pid in run.pids():
            ex.pid.value = pid
            assert ex.items_table.value.count("<td>stable</td>") == smaps[pid] > 0
            assert title(ex.figures["space"]).startswith(f"pid {pid}")
        ex.step_button.click()                     # mremap
        ex.step_button.click()                     # remerged
        assert [h["step"] for h in run.history][1:] == ["merged", "mremap", "remerged"]
        assert ex.step_button.disabled and ex.step_button.description == "step"
        with pytest.raises(KsmlensError, match="has run all its steps"):
            ex.advance()
        moved_pid = run.history[2]["result"]["pid"]
        space = ex.figures["space"]
        ex.pid.value = moved_pid
        assert ex.figures["space"] is not space
        moved = sum(i.pgoff_status == "moved" for i in ex.snap.items_of(moved_pid))
        assert moved > 0 and f", {moved} moved" in title(ex.figures["space"])
        assert re.search(rf"moved {moved}\b", ex.items_table.value)
        # a stable node the v3 rule would miss: its walk replay and mappings
        miss = [n for n in ex.snap.nodes() if "v3" in n.unmappable_under]
        assert miss
        ex.node.value = miss[0].id
        assert "1 of 1 stable nodes" in title(ex.figures["node"])
        assert table_rows(ex.node_table.value) == len(miss[0].mappings)
        # wait for full scans, then refresh: new snapshots, later scans
        before = ex.snap.counters["full_scans"]
        ex.scans.value = 2
        ex.wait_button.click()
        assert "waited for 2 full scan(s)" in ex.status.value
        assert ex.snap.counters["full_scans"] >= before + 2
        n = len(ex.frames)
        ex.refresh_button.click()
        assert len(ex.frames) == n + 1 and ex.frame.value == n
        assert ex.pid.value == moved_pid and ex.node.value in {m.id for m in miss}
        # the same timeline, saved and reopened without the lab
        paths = []
        for k, s in enumerate(ex.frames):
            paths.append(tmp_path / f"f{k}.json")
            s.save(paths[-1])
        saved = Explorer(paths)
        assert saved.frame.options == ex.frame.options
        saved.pid.value = moved_pid
        assert title(saved.figures["space"]) == title(ex.figures["space"])
