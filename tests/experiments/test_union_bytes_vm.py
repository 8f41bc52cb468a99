"""The union, drawn, against the kernel: ``union_bytes_frame`` and
``plots.union_bytes`` on the ``smartscan`` scenario's ``cow-break`` step
(STABLE rmap_items on pages a write took out of KSM), before and after
ksmd's visit, on ``union`` and ``v8``.

Every claim is the kernel's: the bytes drawn are an independent drgn read
(``prog.read`` at the rmap_item's address plus ``offsetof(struct
ksm_rmap_item, oldchecksum)``) in the same QMP pause as the snapshot; the
age/remaining_skips after the visit are what ``verify_smartscan`` reads
back; on ``union`` the bytes before the visit are the pgoff the walk
reports and the age ksmd leaves is byte 4 of that pgoff plus one; on
``v8`` the bytes the index shared with age/remaining_skips are 0 after the
item left the stable tree.
"""

import contextlib

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from drgn import offsetof  # noqa: E402
from drgn.helpers.linux.mm import pfn_to_virt  # noqa: E402

import ksmlens.lab.ksmsys as ksmsys  # noqa: E402
from ksmlens.analysis.core import smartscan_visit  # noqa: E402
from ksmlens.analysis.union import union_bytes_frame  # noqa: E402
from ksmlens.experiments.verify import verify_smartscan  # noqa: E402
from ksmlens.lab.attach import attach  # noqa: E402
from ksmlens.lab.scenarios import COW_BREAK_PAGES, ScenarioRun  # noqa: E402
from ksmlens.lens.snapshot import take_snapshot  # noqa: E402
from ksmlens.views import plots  # noqa: E402
from ksmlens.views.tables import union_bytes_table  # noqa: E402

from conftest import boot  # noqa: E402

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=["union", "v8"])
def vm(request):
    return boot(request.param)


_M = (1 << 64) - 1
_P1, _P2, _P3, _P4, _P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                           9650029242287828579, 2870177450012600261)


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc, v):
    return _rotl((acc + v * _P2) & _M, 31) * _P1 & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 (lib/xxhash.c xxh64()), what ``calc_checksum()`` in mm/ksm.c
    takes of a page (``xxhash()`` on 64-bit), truncated to u32 there."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed, (seed - _P1) & _M]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], int.from_bytes(data[i + 8 * k:i + 8 * k + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for x in v:
            h = ((h ^ _round(0, x)) * _P1 + _P4) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, int.from_bytes(data[i:i + 8], "little")), 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[i:i + 4], "little") * _P1 & _M), 23) * _P2
             + _P3) & _M
        i += 4
    while i < n:
        h = _rotl(h ^ (data[i] * _P5 & _M), 11) * _P1 & _M
        i += 1
    h ^= h >> 33
    h = h * _P2 & _M
    h ^= h >> 29
    h = h * _P3 & _M
    return h ^ (h >> 32)


def paused_read(vm, prog, pid, addresses):
    """A snapshot and, in the same pause, drgn's own read of the 8 bytes at
    offsetof(struct ksm_rmap_item, oldchecksum) of each item at
    ``addresses`` of ``pid`` and of the page mapped there (the snapshot's
    pfn): ``(snap, {address: 8 bytes}, {address: page bytes}, offset)``."""
    off = offsetof(prog.type("struct ksm_rmap_item"), "oldchecksum")
    with vm.paused():
        snap = take_snapshot(prog, pause=contextlib.nullcontext)
        mine = [i for i in snap.items() if i.pid == pid and i.address in addresses]
        mem = {i.address: prog.read(int(i.id, 16) + off, 8) for i in mine}
        page = {i.address: prog.read(pfn_to_virt(prog, i.pfn).value_(), 4096) for i in mine}
    return snap, mem, page, off


def test_union_bytes_against_the_kernel(vm, tmp_path):
    variant = vm.state["variant"]
    prog = attach(f"vm:{vm.name}")
    with ScenarioRun(vm, "smartscan") as run:
        run.step("merged")
        w = run.step("cow-break")            # ksmd held (run=0) from here
        pid, addrs = w["pid"], set(w["addresses"])
        before, mem_b, _, off = paused_read(vm, prog, pid, addrs)
        # ksmd's visit: with pages_to_scan above the scenario's pages a wake is
        # one full scan; a long sleep after it keeps it to one (held again after)
        with ksmsys.knobs_set(vm, sleep_millisecs=60_000):
            r = verify_smartscan(vm, 1)
        after, mem_a, page_a, _ = paused_read(vm, prog, pid, addrs)
    assert len(mem_b) == len(addrs) == COW_BREAK_PAGES and set(mem_a) == addrs

    f = union_bytes_frame({"before": before, "after": after})
    assert set(f["address"]) == addrs and set(f["pid"]) == {pid}  # the hazard items
    assert (f["offset"] == off).all() and off == before.kernel.union_offset
    fb, fa = (f[f["moment"] == m].set_index("address") for m in ("before", "after"))
    assert len(fb) == len(fa) == COW_BREAK_PAGES
    # 1. the bytes are the kernel's, read by drgn in the same pause
    for a in addrs:
        assert bytes(fb.loc[a, "bytes"]) == mem_b[a], hex(a)
        assert bytes(fa.loc[a, "bytes"]) == mem_a[a], hex(a)
    # ...and nothing changed them while ksmd was held around verify_smartscan's
    # own snapshots
    vb = {i.address: i.raw_union for i in r.before.items() if i.pid == pid}
    va = {i.address: i.raw_union for i in r.after.items() if i.pid == pid}
    for a in addrs:
        assert vb[a] == int.from_bytes(mem_b[a], "little")
        assert va[a] == int.from_bytes(mem_a[a], "little")
    # 2. after the visit: the decoded age/remaining_skips are what verify_smartscan
    # observed, item by item
    obs = {x["address"]: x for x in r.items if x["pid"] == pid and x["address"] in addrs}
    assert set(obs) == addrs
    assert {obs[a]["visits"] for a in addrs} == {1}, "not exactly one visit"
    for a in addrs:
        assert (fa.loc[a, "age"], fa.loc[a, "remaining_skips"]) == \
            (obs[a]["observed_age"], obs[a]["observed_skips"]), hex(a)
        assert fa.loc[a, "visits"] == obs[a]["visits"] >= 1
        assert fb.loc[a, "state"] == "stable" and fa.loc[a, "state"] != "stable"
        assert fa.loc[a, "left_stable"]
    # ...and its first 4 bytes, oldchecksum, are the checksum cmp_and_merge_page()
    # took of the page after the item left the stable tree
    assert xxh64(b"abc") == 0x44BC2CF5AD770999      # the reference's test vector
    for a in addrs:
        assert mem_a[a][:4] == (xxh64(page_a[a]) & 0xFFFFFFFF).to_bytes(4, "little"), hex(a)
    # 3. before the visit the bytes are the stored index the walk reports (its
    # mapping's linear_page_index: cow-break moves nothing)
    for a in addrs:
        raw = int.from_bytes(mem_b[a], "little")
        assert raw == fb.loc[a, "index"] == fb.loc[a, "stored_pgoff"] == \
            fb.loc[a, "linear_page_index"] != 0, hex(a)
        assert fb.loc[a, "holds"] == "index"
        # what SmartScan would read there: byte 4 / byte 5 of the index
        assert (fb.loc[a, "age"], fb.loc[a, "remaining_skips"]) == (mem_b[a][4], mem_b[a][5])
    if variant == "union":
        assert before.kernel.stored_index_member == "pgoff"
        for a in addrs:
            assert fb.loc[a, "next_reads_pgoff"] and fb.loc[a, "next_reads_smartscan"]
            # the age ksmd left is the pgoff's byte 4 aged by each visit
            age, skips = mem_b[a][4], mem_b[a][5]
            for _ in range(obs[a]["visits"]):
                age, skips, _ = smartscan_visit(age, skips)
            assert (obs[a]["observed_age"], obs[a]["observed_skips"]) == (age, skips), hex(a)
            assert age > obs[a]["visits"]        # not an age a fresh item could have
            # written over the pgoff: age and skips in its bytes 4, 5; 6, 7 left
            assert mem_a[a][4:] == bytes([age, skips]) + mem_b[a][6:], (hex(a), mem_a[a].hex())
    else:
        assert before.kernel.stored_index_member == "linear_page_index"
        for a in addrs:
            assert not fb.loc[a, "next_reads_smartscan"] and not fb.loc[a, "next_reads_pgoff"]
            # not read at the first visit, and the index reset to 0 when the item
            # left the stable tree: later visits age it from 0, as a fresh item
            assert mem_b[a][4] != 0           # so an age read from the index would show
            age, skips = 0, 0
            for _ in range(obs[a]["visits"] - 1):
                age, skips, _ = smartscan_visit(age, skips)
            assert (obs[a]["observed_age"], obs[a]["observed_skips"]) == (age, skips), hex(a)
            # of the index's bytes only oldchecksum's were written again
            # (cmp_and_merge_page() stores the page's checksum)
            assert mem_a[a][4:] == bytes([age, skips, 0, 0]), (hex(a), mem_a[a].hex())
            if obs[a]["visits"] == 1:
                assert fa.loc[a, "index"] == fa.loc[a, "oldchecksum"]
    print(variant, "visits", sorted(obs[a]["visits"] for a in addrs),
          "before", mem_b[min(addrs)].hex(), "after", mem_a[min(addrs)].hex())

    # 4. the figure draws those bytes and readings
    fig = plots.union_bytes(f)
    first = min(addrs)
    hexes = {t.get_gid(): t.get_text() for ax in fig.axes for t in ax.texts
             if (t.get_gid() or "").startswith("hex:")}
    for m, mem in (("before", mem_b), ("after", mem_a)):
        assert [hexes[f"hex:{variant}:{m}:{k}"] for k in range(8)] == \
            [f"{b:02x}" for b in mem[first]]
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == [str(off + k) for k in range(8)]
    assert f"bytes {off}..{off + 7}" in fig._suptitle.get_text()
    fig.savefig(tmp_path / f"union-bytes-{variant}.png", dpi=80)
    # 5. and the text beside it
    text = union_bytes_table(f, limit=None)
    for m, mem in (("before", mem_b), ("after", mem_a)):
        for a in addrs:
            line = next(x for x in text.splitlines() if f" {m} " in x and f"{a:#x}" in x)
            assert " ".join(f"{b:02x}" for b in mem[a]) in line, (line, mem[a].hex())
