"""Every notebook in notebooks/ runs top to bottom against a real guest.

Each notebook is executed with nbclient (``ksmlens.views.notebook.run_notebook``)
and rendered to HTML; any cell error fails the test. The notebooks check
their own claims against the kernel (``check_vm`` rows, counts from the
walk against ``/sys/kernel/mm/ksm``), so a run that succeeds is a run whose
numbers agreed. Most notebooks reuse the session's lab VM (they must leave
it up); one run boots its own VM and must power it off.
"""

import os
import shutil
from pathlib import Path

import nbformat
import pytest

from ksmlens.views.notebook import notebook_paths, run_notebook
from ksmlens.lab.vm import VM, list_vms

from conftest import _live, boot

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = notebook_paths(ROOT / "notebooks")
CELL_TIMEOUT = 1200   # TCG: a scenario takes 2-30 s, a boot 10-40 s when others boot too


def _copy_out(html: Path):
    dest = ROOT / "out" / "notebooks" / "test"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(html, dest / html.name)


def test_notebooks_exist_and_are_stripped():
    names = [p.name for p in NOTEBOOKS]
    assert "01-tour.ipynb" in names and "02-stable-tree.ipynb" in names
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, \
                    f"{p.name}: outputs are committed (strip them)"


@pytest.mark.vm
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    vm = boot("union")
    html = tmp_path / (path.stem + ".html")
    nb = run_notebook(path, html, timeout=CELL_TIMEOUT, vm=vm.name, solutions=True)
    _copy_out(html)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outs)
    assert f"VM {vm.name!r}" in text and "already up, reused" in text
    assert vm.alive(), f"{path.name} powered off a VM it did not start"
    assert html.stat().st_size > 10_000


@pytest.mark.vm
def test_notebook_boots_and_downs_its_own_vm(tmp_path):
    """With no VM of that name up, a notebook boots one and powers it off."""
    for k in list(_live):             # one test VM at a time on this machine
        _live.pop(k).down(quiet=True)
    name = f"nb-test-{os.getpid()}"
    path = NOTEBOOKS[0]
    try:
        nb = run_notebook(path, tmp_path / "own.html", timeout=CELL_TIMEOUT, vm=name)
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                       for o in c.outputs)
        assert f"VM {name!r}" in text and "booted in" in text
        assert f"VM {name!r} is down" in text
        assert name not in {s["name"] for s in list_vms() if s["running"]}
    finally:
        try:
            VM(name).down(quiet=True)
        except Exception:
            pass
