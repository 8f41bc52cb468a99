"""``%ksm`` in the real drgn REPL, against a real guest after the mremap scenario.

The venv's ``drgn`` binary is started on a pseudo-terminal (so it runs its
interactive REPL, where ``%`` commands live) on the VM's ``drgn.sock``, and
fed ``%ksm ...`` lines. Every number it prints is checked against what the
guest kernel itself reports (/sys/kernel/mm/ksm, /proc/PID/ksm_stat) and
what the workload did (which VMA it moved, where to).
"""

import gc
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ksmlens.lab.attach as attach_mod
import ksmlens.lab.ksmsys as ksmsys
from ksmlens.lab.scenarios import ScenarioRun

from conftest import boot

pytestmark = pytest.mark.vm

DRGN = str(Path(sys.executable).with_name("drgn"))
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


def _free_drgn_sock(vm) -> str:
    """The VM's drgn.sock, with no Program of this test process on it."""
    attach_mod._LIVE.pop(vm.name, None)
    gc.collect()
    sock = vm.state["qmp"]
    assert attach_mod._qmp_socket_free(sock, 5.0), f"{sock} is held by another QMP client"
    return sock


def drgn_repl(vm, commands: list[str], timeout: float = 300) -> dict[str, str]:
    """Run ``commands`` in drgn's interactive REPL; {command: its output}."""
    sock = _free_drgn_sock(vm)
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="dumb", PYTHON_BASIC_REPL="1", COLUMNS="200")
    p = subprocess.Popen([DRGN, "--qemu", sock, "-s", vm.state["vmlinux"], "-q"],
                         stdin=slave, stdout=slave, stderr=slave, env=env,
                         start_new_session=True, close_fds=True)
    os.close(slave)
    script = "".join(f'print("@@" + "BEGIN {i}")\n{c}\nprint("@@" + "END {i}")\n'
                     for i, c in enumerate(commands)) + "exit()\n"
    out = b""
    deadline = time.monotonic() + timeout
    try:
        for line in script.splitlines(keepends=True):   # the pty's line queue is small
            os.write(master, line.encode())
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:   # EIO: the child closed the pty
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        else:
            pytest.fail(f"drgn REPL did not finish in {timeout} s:\n{out.decode()[-2000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        os.close(master)
    text = _ANSI.sub("", out.decode(errors="replace")).replace("\r", "")
    res = {}
    for i, c in enumerate(commands):
        m = re.search(rf"^@@BEGIN {i}\n(.*?)^@@END {i}$", text, re.M | re.S)
        assert m, f"no output for {c!r} in:\n{text[-3000:]}"
        # Drop the pty's echo of the lines typed ahead.
        body = [l for l in m.group(1).splitlines()
                if not l.lstrip(">. ").startswith(('print("@@"', "%ksm", "exit()"))]
        res[c] = "\n".join(body)
    return res


def drgn_exec(vm, code: str, timeout: float = 300) -> str:
    """Run Python ``code`` in drgn (non-interactive: stdin is the script)."""
    sock = _free_drgn_sock(vm)
    r = subprocess.run([DRGN, "--qemu", sock, "-s", vm.state["vmlinux"], "-q"],
                       input=code, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"drgn failed on:\n{code}\n{r.stderr}"
    return r.stdout


def _table(out: str, header: str) -> list[list[str]]:
    lines = out.splitlines()
    i = next(k for k, l in enumerate(lines) if l.split()[:len(header.split())] == header.split())
    rows = []
    for l in lines[i + 1:]:
        if not l.strip() or not (l.lstrip().startswith("0x") or l.split()[0].isdigit()):
            break
        rows.append(l.split())
    return rows


# the same views on the arm64 lab (its kernel read from this x86-64 host): in
# the full arm64 suite, `pytest -m arm64`
ARCHES = ["x86_64", pytest.param("arm64", marks=[pytest.mark.arm64, pytest.mark.full])]


@pytest.fixture(scope="class", params=ARCHES)
def mremapped(request):
    vm = boot("union", arch=None if request.param == "x86_64" else request.param)
    with ScenarioRun(vm, "mremap") as run:
        run.step("merged")
        moved = run.step("mremap")
        remerged = run.step("remerged")
        yield vm, run, moved, remerged


class TestAfterMremap:
    """One mremap scenario (merged, mremap, remerged) for both tests."""

    def test_ksm_commands_match_the_kernel(self, mremapped):
        vm, run, moved, remerged = mremapped
        mpid = moved["pid"]
        other = next(p for p in run.pids() if p != mpid)
        cmds = ["%ksm stable", f"%ksm rmap {mpid}", f"%ksm rmap {other}", "%ksm stale",
                "%ksm check", "%ksm rmap 999999", "%ksm --help", f"%ksm axis {mpid}",
                "%ksm axis"]
        before = ksmsys.read_counters(vm)
        stat = ksmsys.read_ksm_stat(vm, run.pids())
        out = drgn_repl(vm, cmds)
        after = ksmsys.read_counters(vm)
        assert before["pages_shared"] == after["pages_shared"] > 0, (before, after)
        shared, sharing = after["pages_shared"], after["pages_sharing"]

        # stable: one row per stable node holding a page == pages_shared; the
        # rmap_items on them == pages_shared + pages_sharing; both pids share.
        rows = _table(out["%ksm stable"], "node kind chain kpfn")
        pages = [r for r in rows if r[1] in ("regular", "dup")]
        assert len(pages) == shared, out["%ksm stable"]
        items = sum(int(r[6 if r[1] == "dup" else 5]) for r in pages)
        assert items == shared + sharing
        assert f"pages_shared = {shared})" in out["%ksm stable"]
        for pid in run.pids():
            assert f" {pid}:" in out["%ksm stable"]

        # rmap of the moved process: as many rows as /proc/PID/ksm_stat has
        # rmap_items, all in the VMA's new place, all moved by mremap, and the
        # union kernel stored the right pgoff (linear_page_index) in each.
        rows = _table(out[f"%ksm rmap {mpid}"], "address state")
        assert len(rows) == stat[mpid]["ksm_rmap_items"]
        stable = [r for r in rows if r[1] == "stable"]
        assert len(stable) == stat[mpid]["ksm_merging_pages"] == remerged["ksm_merging_pages"][mpid]
        for (addr, state, node, addr_pgoff, lpi, stored, stored_st, s3i, pte, nxt, status,
             *cause) in stable:
            assert moved["new"] <= int(addr, 16) < moved["new"] + (64 << 12)
            assert addr_pgoff != lpi and stored == lpi and stored_st == "ok"
            assert s3i == "+-+"       # stock and stored find the moved mapping, v3 misses it
            assert pte == "present*" and nxt == "visit"     # mapped, KSM, visited next pass
            assert (status, cause) == ("moved", ["(mremap)"])
        # ... and the process that did not move: every pgoff agrees.
        rows = _table(out[f"%ksm rmap {other}"], "address state")
        assert len(rows) == stat[other]["ksm_rmap_items"]
        assert all(r[3] == r[4] and r[10] == "ok" and r[7] in ("+++", "++.") for r in rows)

        # stale: exactly the moved process's moved pages.
        rows = _table(out["%ksm stale"], "pid comm address")
        assert len(rows) == remerged["ksm_merging_pages"][mpid]
        assert {(r[0], r[4], r[5], r[10]) for r in rows} == {(str(mpid), "moved", "mremap", "+-+")}
        assert f"stale: {len(rows)} of" in out["%ksm stale"]

        # axis: the moved process on one address axis: its rmap_items (folded runs
        # add up to ksm_stat's), its VMA filed away by the mremap, every merged
        # page MISSED by v3 and found by stored (this kernel's rule).
        ax = out[f"%ksm axis {mpid}"]
        rows = _table(ax, "address n state")
        assert sum(int(r[1]) for r in rows) == stat[mpid]["ksm_rmap_items"]
        assert sum(int(r[1]) for r in rows if r[2] == "stable" and r[4] == "MISSED"
                   and r[3] == r[5] == "found") == stat[mpid]["ksm_merging_pages"]
        assert re.search(r"pages away \(mremap\)", ax), ax
        assert f"v3 {stat[mpid]['ksm_merging_pages']}, stored 0" in ax
        assert out["%ksm axis"].strip().startswith("drgn: error: %ksm axis needs a PID")

        # check: every row agrees, and its kernel column is sysfs's number.
        ck = out["%ksm check"]
        m = re.search(r"check: (\d+)/(\d+) agree", ck)
        assert m and m.group(1) == m.group(2), ck
        row = next(l.split() for l in ck.splitlines() if l.startswith("pages_shared "))
        assert row[1:4] == [str(shared)] * 3
        assert "/sys/kernel/mm/ksm" in ck      # says what drgn alone cannot read

        # errors are one line; --help teaches every view.
        assert out["%ksm rmap 999999"].strip().splitlines() == [
            "drgn: error: pid 999999 has no KSM mm slot: processes known to KSM: "
            + ", ".join(str(p) for p in sorted(run.pids()))]
        for view in ("stable:", "rmap:", "stale:", "smartscan:", "axis:", "check:", "--drgn"):
            assert view in out["%ksm --help"]


    def test_drgn_flag_prints_code_that_works(self, mremapped):
        vm, run, moved, remerged = mremapped
        mpid = moved["pid"]
        cmds = ["%ksm stable --drgn", f"%ksm rmap {mpid} --drgn", "%ksm stale --drgn",
                "%ksm check --drgn", f"%ksm rmap {mpid}", f"%ksm axis {mpid} --drgn"]
        out = drgn_repl(vm, cmds)
        shared = ksmsys.read_counters(vm)["pages_shared"]

        code = out["%ksm stable --drgn"]
        assert "from ksmlens.lens.helpers import" in code
        res = drgn_exec(vm, code)
        assert res.splitlines()[-1] == f"{shared} stable nodes holding a KSM page (pages_shared)"

        code = out[f"%ksm rmap {mpid} --drgn"]
        res = drgn_exec(vm, code)
        via_code = {l.split()[0] for l in res.splitlines()}
        via_cmd = {r[0] for r in _table(out[f"%ksm rmap {mpid}"], "address state")}
        assert via_code == via_cmd and len(via_code) == remerged["ksm_merging_pages"][mpid]

        res = drgn_exec(vm, out["%ksm stale --drgn"])
        assert res.splitlines()[-1] == f"{remerged['ksm_merging_pages'][mpid]} stale rmap_items"

        res = drgn_exec(vm, out[f"%ksm axis {mpid} --drgn"])
        rows = [l.split() for l in res.splitlines()[1:]]
        assert len(rows) == ksmsys.read_ksm_stat(vm, [mpid])[mpid]["ksm_rmap_items"]
        assert sum(r[5] == "missed" for r in rows) == remerged["ksm_merging_pages"][mpid]

        res = drgn_exec(vm, out["%ksm check --drgn"])
        assert re.search(rf"^pages_shared\s+{shared}\s+{shared}\s+{shared}\s+ok$", res, re.M), res


def test_ksm_smartscan_matches_the_kernel():
    vm = boot("union")
    with ScenarioRun(vm, "smartscan") as run:
        run.step("merged")
        deadline = time.monotonic() + 120
        while ksmsys.read_counters(vm)["pages_skipped"] == 0:   # ages build up first
            assert time.monotonic() < deadline, "SmartScan skipped nothing in 120 s"
            time.sleep(1)
        # ksmd is held while the table is read: sysfs is read file by file,
        # and with ksmd running, SmartScan moves items between unshared (in
        # the unstable tree) and volatile (skipped) between two reads, so
        # even their sum is not one instant's (CI saw 128 then 111).
        with ksmsys.held(vm):
            before = ksmsys.read_counters(vm)
            out = drgn_repl(vm, ["%ksm smartscan", "%ksm smartscan --drgn"])
            after = ksmsys.read_counters(vm)
            res = drgn_exec(vm, out["%ksm smartscan --drgn"])
    def not_ksm(c):
        return c["pages_unshared"] + c["pages_volatile"]
    keys = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
            "pages_skipped", "full_scans")
    assert [before[k] for k in keys] == [after[k] for k in keys], (before, after)
    ss = out["%ksm smartscan"]
    rows = _table(ss, "pid address state age")
    # One row per rmap_item whose page is not KSM (rmap_items - pages_shared
    # - pages_sharing, as pages_volatile_show() counts).
    assert len(rows) == not_ksm(before) > 0, ss
    assert all(r[2] in ("unstable", "none") for r in rows)
    # The skips the table predicts follow the kernel's state: an item with
    # remaining_skips left is skipped next, one without is processed; and
    # some items are old enough (age >= 3) to be skipped at all.
    for pid, addr, state, age, skips, nxt, sched, *note in rows:
        if nxt == "freed":            # the next pass frees it unread: nothing to forecast
            continue
        assert nxt == ("skipped" if int(skips) else "processed"), (addr, age, skips, nxt)
        assert len(sched) == 8 and set(sched) <= {"P", "S"}
    assert any(int(r[3]) >= 3 for r in rows)
    m = re.search(r"pages_skipped so far: (\d+)", ss)
    assert before["pages_skipped"] <= int(m.group(1)) <= after["pages_skipped"]
    assert len(res.splitlines()) == len(rows)
