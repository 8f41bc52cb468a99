"""Notebook support: a lab VM per notebook, and running notebooks to HTML.

In a notebook::

    from ksmlens.views.notebook import Lab
    lab = Lab.open()          # $KSMLENS_VM (default "ksmlens"): reused if up, else booted
    prog = lab.attach()       # drgn Program, live over QMP
    ...
    lab.close()               # downs the VM only if this notebook booted it

From the shell, ``ksmlens notebooks`` executes every ``notebooks/*.ipynb``
(nbclient) against one VM and writes ``out/notebooks/NAME.html``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ksmlens.errors import KsmlensError
from ksmlens.kernel.variants import DEFAULT_VARIANT

__all__ = ["Lab", "vm_name", "notebook_paths", "run_notebook", "NOTEBOOKS_DIR", "OUT_DIR"]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
OUT_DIR = ROOT / "out" / "notebooks"
ENV_VM = "KSMLENS_VM"


def vm_name() -> str:
    """The VM notebooks use: ``$KSMLENS_VM``, default ``ksmlens``."""
    from ksmlens.lab.vm import DEFAULT_NAME
    return os.environ.get(ENV_VM) or DEFAULT_NAME


class Lab:
    """A lab VM for one notebook: reused if it is up, else booted (and then
    downed by :meth:`close`)."""

    def __init__(self, vm, started: bool, seconds: float):
        self.vm = vm
        self.started = started
        self.seconds = seconds
        self._prog = None

    @classmethod
    def open(cls, name: str | None = None, variant: str = DEFAULT_VARIANT,
             numa: int = 2) -> "Lab":
        from ksmlens.lab.vm import VM, list_vms
        name = name or vm_name()
        t = time.monotonic()
        up = {s["name"]: s for s in list_vms() if s["running"]}
        if name in up:
            lab = cls(VM(name), False, time.monotonic() - t)
            if up[name].get("variant") != variant:
                print(f"note: VM {name!r} runs variant {up[name].get('variant')}, not "
                      f"{variant}; `ksmlens vm down --name {name}` to get {variant}")
        else:
            lab = cls(VM.up(name, variant, numa=numa, quiet=True), True, time.monotonic() - t)
        print(lab.describe())
        return lab

    def describe(self) -> str:
        s = self.vm.state
        how = (f"booted in {self.seconds:.0f} s" if self.started
               else "already up, reused (left up at the end)")
        return (f"VM {self.vm.name!r}: kernel {s['kernel_release']} (variant {s['variant']}), "
                f"{s.get('numa_nodes', 1)} NUMA node(s), {s['accel'].upper()}; {how}")

    def attach(self):
        """The drgn Program of this VM (live over one of its QMP sockets)."""
        from ksmlens.lab.attach import attach
        if self._prog is None:
            self._prog = attach(f"vm:{self.vm.name}")
        return self._prog

    def close(self) -> None:
        """Down the VM if this Lab booted it; say what happened."""
        self._prog = None
        if self.started:
            self.vm.down(quiet=True)
            print(f"VM {self.vm.name!r} is down")
        else:
            print(f"VM {self.vm.name!r} left up (it was up before this notebook)")

    def __repr__(self):
        return f"<Lab {self.describe()}>"


def notebook_paths(directory: Path | str = NOTEBOOKS_DIR) -> list[Path]:
    return sorted(Path(directory).glob("*.ipynb"))


def run_notebook(path, html: Path | str | None = None, *, timeout: float = 900,
                 vm: str | None = None):
    """Execute a notebook with nbclient (cell timeout ``timeout`` s) in its own
    directory, with ``$KSMLENS_VM`` set to ``vm``; write HTML to ``html``.

    Returns the executed notebook. Raises :class:`KsmlensError` naming the
    failing cell on the first error (the HTML, if asked for, is written anyway).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    old = os.environ.get(ENV_VM)
    if vm:
        os.environ[ENV_VM] = vm
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="python3", transport="ipc",   # not TCP: local only
                       ip=str(Path(tempfile.mkdtemp(prefix="ksmlens-kernel-")) / "k"))
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    err = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        err = e
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        if vm:
            if old is None:
                os.environ.pop(ENV_VM, None)
            else:
                os.environ[ENV_VM] = old
    if html is not None:
        from nbconvert import HTMLExporter
        body, _ = HTMLExporter().from_notebook_node(nb)
        Path(html).parent.mkdir(parents=True, exist_ok=True)
        Path(html).write_text(body)
    if err is not None:
        import re
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))     # IPython's colours
        lines = [l for l in text.splitlines() if l.strip()]
        last = next((l for l in reversed(lines) if "Error" in l), lines[-1] if lines else "")
        raise KsmlensError(f"notebook {path.name} failed: {last.strip()}",
                           f"open it with `.venv/bin/jupyter lab {path}`"
                           + (f" or read {html}" if html else ""))
    return nb
