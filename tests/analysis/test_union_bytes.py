"""ksmlens.analysis.union.union_bytes_frame and plots.union_bytes on small
hand-made snapshots: the bytes, both readings, and what the figure draws
(the claims about kernels are checked on guests in
tests/experiments/test_union_bytes_vm.py)."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from ksmlens.analysis.core import skip_age, smartscan_visit  # noqa: E402
from ksmlens.analysis.union import UNION_COLUMNS, union_bytes_frame, union_word_bytes  # noqa: E402
from ksmlens.errors import KsmlensError  # noqa: E402
from ksmlens.kernel.rules import UnionLayout  # noqa: E402
from ksmlens.views import plots  # noqa: E402

from smallsnap import PAGE, item, snapshot  # noqa: E402

VMA = (0x7F12_3450_0000, 0x7F12_3450_0000 + 64 * PAGE, 0x7F12_3450_0)   # vm_pgoff = start >> 12
ADDRS = [VMA[0] + k * PAGE for k in range(3)]
CHECKSUM = 0x1234_ABCD          # what cmp_and_merge_page() stores after the removal


def _snap(variant, state, raw_of, *, full_scans, page_ksm=False):
    """One process, three rmap_items in VMA; their union word is raw_of(lpi)."""
    items = []
    for a in ADDRS:
        it = item(100, a, state=state, vma=VMA, node="n1" if state == "stable" else None)
        it.raw_union = raw_of(it.linear_page_index)
        it.oldchecksum, it.age, it.remaining_skips = UnionLayout().decode(it.raw_union)
        it.page_ksm, it.pte, it.pfn = page_ksm, "present", 0x1000 + (a >> 12 & 0xff)
        items.append(it)
    s = snapshot(items, variant=variant, full_scans=full_scans)
    s.kernel.union_offset = 32
    s.kernel.stored_index_member = "pgoff" if variant == "union" else "linear_page_index"
    s.counters["smart_scan"] = 1
    s.scan = {"seqnr": full_scans, "at_pass_start": True}
    return s


def union_moments():
    """union: STABLE items holding their pgoff on COW-broken pages, then
    after one visit: UNSTABLE, checksum stored, age 7 -> 8, skips skip_age(7)."""
    before = _snap("union", "stable", lambda lpi: lpi, full_scans=10)
    age, skips, _ = smartscan_visit(7, 0)
    after = _snap("union", "unstable",
                  lambda lpi: CHECKSUM | age << 32 | skips << 40, full_scans=11)
    return {"before": before, "after": after}


def v8_moments():
    before = _snap("v8", "stable", lambda lpi: lpi, full_scans=10)
    after = _snap("v8", "unstable", lambda lpi: CHECKSUM, full_scans=11)
    return {"before": before, "after": after}


def test_word_bytes_are_memory_order():
    assert union_word_bytes(0x0000_0007_F123_4500) == [0x00, 0x45, 0x23, 0xF1, 0x07, 0, 0, 0]
    assert union_word_bytes(-1) == [0xFF] * 8


def test_frame_reads_the_pgoff_both_ways_on_union():
    f = union_bytes_frame(union_moments())
    assert list(f.columns) == list(UNION_COLUMNS)
    assert len(f) == 2 * len(ADDRS)                     # default: the hazard items
    b = f[f["moment"] == "before"].iloc[0]
    lpi = (ADDRS[0] - VMA[0] >> 12) + VMA[2]
    assert b["index"] == b["raw"] == b["stored_pgoff"] == b["linear_page_index"] == lpi
    assert b["bytes"] == list(lpi.to_bytes(8, "little"))
    # age is byte 4 of the pgoff, remaining_skips byte 5, oldchecksum its low half
    assert (b["age"], b["remaining_skips"], b["oldchecksum"]) == \
        (lpi >> 32 & 0xFF, lpi >> 40 & 0xFF, lpi & 0xFFFFFFFF) == (7, 0, lpi & 0xFFFFFFFF)
    assert b["holds"] == "index" and b["next_reads_smartscan"] and b["next_reads_pgoff"]
    assert b["offset"] == 32 and b["index_member"] == "pgoff" and b["visits"] == 0
    a = f[f["moment"] == "after"].iloc[0]
    assert (a["age"], a["remaining_skips"]) == (8, skip_age(7)) == (8, 4)
    assert a["oldchecksum"] == CHECKSUM and a["holds"] == "smartscan" and a["visits"] == 1
    assert a["stored_pgoff"] is None and not a["next_reads_pgoff"] and a["left_stable"]
    assert not b["left_stable"]


def test_frame_on_v8_smartscan_leaves_stable_items_alone():
    f = union_bytes_frame(v8_moments(), addresses=[ADDRS[1]])
    assert len(f) == 2 and set(f["address"]) == {ADDRS[1]}
    b, a = f.iloc[0], f.iloc[1]
    assert b["holds"] == "index" and not b["next_reads_smartscan"] and not b["next_reads_pgoff"]
    assert b["index_member"] == "linear_page_index"
    assert a["raw"] == a["oldchecksum"] == CHECKSUM and (a["age"], a["remaining_skips"]) == (0, 0)


def test_frame_selection_and_errors():
    m = union_moments()
    assert union_bytes_frame(m, pid=999).empty
    assert set(union_bytes_frame(m, pid=100, panel="mine")["panel"]) == {"mine"}
    with pytest.raises(KsmlensError):
        union_bytes_frame({})
    with pytest.raises(KsmlensError):           # two kernels in one frame
        union_bytes_frame({"before": m["before"], "after": v8_moments()["after"]})
    # an item on a KSM page is no hazard: the default selects nothing
    ksm = _snap("union", "stable", lambda lpi: lpi, full_scans=10, page_ksm=True)
    assert union_bytes_frame({"now": ksm}).empty


def _texts(fig, prefix):
    return {t.get_gid(): t.get_text() for ax in fig.axes for t in ax.texts
            if (t.get_gid() or "").startswith(prefix)}


def test_figure_draws_the_bytes_and_both_readings(tmp_path):
    fu, fv = union_bytes_frame(union_moments()), union_bytes_frame(v8_moments())
    fig = plots.union_bytes([fu, fv])
    assert len(fig.axes) == 4                           # 2 moments x 2 kernels
    assert fig._suptitle.get_text().startswith("struct ksm_rmap_item bytes 32..39")
    assert fig.legends and len(fig.legends[0].get_texts()) >= 5
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(32 + k) for k in range(8)]
    hexes = _texts(fig, "hex:")
    for frame in (fu, fv):
        for _, row in frame[frame["address"] == ADDRS[0]].iterrows():
            tag = f"{row['panel']}:{row['moment']}"
            assert [hexes[f"hex:{tag}:{k}"] for k in range(8)] == \
                [f"{b:02x}" for b in row["bytes"]]
    r = _texts(fig, "reading:")
    assert "age\n7" in r["reading:union:before:age"]
    assert "pgoff = 0x" in r["reading:union:before:index"]
    assert r["reading:union:after:age"] == "age\n8"
    assert r["reading:union:after:remaining_skips"] == "skips\n4"
    assert "reset to 0" in r["reading:v8:after:index"]
    assert "UNSTABLE" in r["reading:union:after:index"] and "reset" not in r["reading:union:after:index"]
    # the hazard is hatched on union only
    hatched = {p.get_gid() for ax in fig.axes for p in ax.patches if p.get_hatch()}
    assert hatched == {"byte:union:before:4", "byte:union:before:5"}
    path = tmp_path / "union.png"
    fig.savefig(path, dpi=80)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_figure_address_and_errors():
    fu = union_bytes_frame(union_moments())
    fig = plots.union_bytes(fu, address=ADDRS[2])
    assert all(f"{ADDRS[2]:#x}" in ax.get_title() for ax in fig.axes)
    with pytest.raises(KsmlensError):
        plots.union_bytes(fu, address=0x1000)
    with pytest.raises(KsmlensError):
        plots.union_bytes(fu.iloc[0:0])


@pytest.mark.parametrize("name", ["s.json", "s.ksm"])
def test_frame_on_saved_snapshots(tmp_path, name):
    """The same frame from snapshots saved and loaded again (both formats)."""
    from ksmlens.lens.model import Snapshot
    m = union_moments()
    back = {}
    for label, snap in m.items():
        snap.save(tmp_path / f"{label}-{name}")
        back[label] = Snapshot.load(tmp_path / f"{label}-{name}")
    assert back["before"].kernel.union_offset == 32
    a, b = union_bytes_frame(m), union_bytes_frame(back)
    cols = ["moment", "address", "raw", "bytes", "index", "offset", "age",
            "remaining_skips", "holds", "next_reads_pgoff", "left_stable"]
    assert a[cols].to_dict("records") == b[cols].to_dict("records")


def test_text_table_beside_the_figure():
    from ksmlens.views.tables import union_bytes_table
    f = union_bytes_frame(union_moments())
    text = union_bytes_table(f)
    lines = text.splitlines()
    assert "bytes 32..39" in lines[0] and "as index" in lines[0]
    lpi = (ADDRS[0] - VMA[0] >> 12) + VMA[2]
    row = next(line for line in lines if f"{ADDRS[0]:#x}" in line and "before" in line)
    assert " ".join(f"{b:02x}" for b in lpi.to_bytes(8, "little")) in row
    assert f"{lpi:#x}" in row and "PGOFF" in row and row.split()[-2] == "index"
    after = next(line for line in lines if f"{ADDRS[0]:#x}" in line and "after" in line)
    assert after.split()[-4:] == ["8", "4", "smartscan", "age,skips"]
    short = union_bytes_table(f, limit=1)
    assert short.endswith("... 4 more rows (limit=1)")
    assert union_bytes_table(f.iloc[0:0]) == "no rmap_items"
