"""Notebook support: a lab VM per notebook, and running notebooks to HTML.

In a notebook::

    from ksmlens.views.notebook import Lab
    lab = Lab.open()          # $KSMLENS_VM (default "ksmlens"): reused if up, else booted
    prog = lab.attach()       # drgn Program, live over QMP
    ...
    lab.close()               # downs the VM only if this notebook booted it

From the shell, ``ksmlens notebooks`` executes every ``notebooks/*.ipynb``
(nbclient) against one VM and writes ``out/notebooks/NAME.html``.

Exercises. Each notebook ends with one or two exercises. The student's cell
is tagged ``exercise`` and carries ``metadata["ksmlens"] = {"exercise":
"03-1", "solution": "<code>"}``; it starts as ``answer = ...``. The cell
after it is tagged ``exercise-check`` and ``hide-input``
(``metadata["jupyter"]["source_hidden"]``): it works out the truth from the
kernel (a ``verify`` result, ``/proc/PID/ksm_stat``, sysfs) and calls
:func:`check_answer`. ``run_notebook(..., solutions=True)`` (what the tests
do) puts each exercise's ``solution`` in its cell and makes a wrong answer
an error, so a solution that no longer matches the kernel fails the run::

    answer = ...                                   # tagged exercise
    check_answer("03-1", answer, truth, hint="...")   # tagged exercise-check
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ksmlens.errors import KsmlensError
from ksmlens.kernel.variants import DEFAULT_VARIANT

__all__ = ["Lab", "vm_name", "notebook_paths", "run_notebook", "check_answer", "exercises",
           "NOTEBOOKS_DIR", "OUT_DIR", "ENV_EXERCISES"]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
OUT_DIR = ROOT / "out" / "notebooks"
ENV_VM = "KSMLENS_VM"
ENV_EXERCISES = "KSMLENS_EXERCISES"   # "strict": a wrong or missing answer raises


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


def _same(answer, truth) -> bool:
    """Answers compare as values; a list, tuple or set of hashables compares
    as a set (the order a student lists pids or addresses in is no answer)."""
    def norm(x):
        if isinstance(x, (list, tuple, set, frozenset)):
            try:
                return frozenset(norm(v) for v in x)
            except TypeError:
                return x
        if isinstance(x, dict):
            return {k: norm(v) for k, v in x.items()}
        return x
    return norm(answer) == norm(truth)


def check_answer(exercise: str, answer, truth, *, hint: str = "", explain: str = "") -> bool | None:
    """Check a student's ``answer`` to ``exercise`` (e.g. ``"03-1"``) against
    ``truth``, which the calling cell works out from the kernel.

    Prints one line: not answered yet (``answer`` is ``...``), correct (with
    ``explain``), or not yet (with ``hint``; the truth is not printed).
    Returns None, True or False. With ``$KSMLENS_EXERCISES=strict`` (set by
    ``run_notebook(solutions=True)``) anything but a correct answer raises
    ``AssertionError``, so a test run fails on it.
    """
    strict = os.environ.get(ENV_EXERCISES) == "strict"
    if answer is ...:
        print(f"Exercise {exercise}: not answered yet: set `answer` in the cell above and "
              "run both cells again")
        if strict:
            raise AssertionError(f"exercise {exercise} has no answer")
        return None
    if _same(answer, truth):
        print(f"Exercise {exercise}: correct." + (f" {explain}" if explain else ""))
        return True
    print(f"Exercise {exercise}: not yet." + (f" Hint: {hint}" if hint else ""))
    if strict:
        raise AssertionError(f"exercise {exercise}: answer {answer!r} is not the kernel's {truth!r}")
    return False


def exercises(nb) -> list[dict]:
    """The exercises of a notebook node: ``[{"exercise", "solution", "cell",
    "check"}]`` (cell indexes of the student's cell and its check cell).
    Raises :class:`KsmlensError` for an exercise cell without a solution or
    a check cell right after it."""
    found = []
    for i, c in enumerate(nb.cells):
        tags = c.get("metadata", {}).get("tags", [])
        if "exercise" not in tags:
            continue
        meta = c.metadata.get("ksmlens", {})
        nxt = nb.cells[i + 1] if i + 1 < len(nb.cells) else None
        if not meta.get("exercise") or not meta.get("solution"):
            raise KsmlensError(f"cell {i} is tagged exercise but has no "
                               "metadata.ksmlens.exercise/solution",
                               "add both (see ksmlens.views.notebook)")
        if nxt is None or "exercise-check" not in nxt.get("metadata", {}).get("tags", []):
            raise KsmlensError(f"exercise {meta['exercise']} (cell {i}) has no "
                               "exercise-check cell after it", "add the hidden check cell")
        found.append({"exercise": meta["exercise"], "solution": meta["solution"],
                      "cell": i, "check": i + 1})
    return found


def notebook_paths(directory: Path | str = NOTEBOOKS_DIR) -> list[Path]:
    return sorted(Path(directory).glob("*.ipynb"))


def run_notebook(path, html: Path | str | None = None, *, timeout: float = 900,
                 vm: str | None = None, solutions: bool = False):
    """Execute a notebook with nbclient (cell timeout ``timeout`` s) in its own
    directory, with ``$KSMLENS_VM`` set to ``vm``; write HTML to ``html``.

    ``solutions``: put each exercise's solution in its cell (see
    :func:`exercises`; the student's source is kept in the cell's
    ``metadata.ksmlens.student_source``, which :mod:`ksmlens.views.book`
    shows above the collapsed solution) and run with
    ``$KSMLENS_EXERCISES=strict``, so a solution the kernel no longer agrees
    with fails the run.

    Returns the executed notebook. Raises :class:`KsmlensError` naming the
    failing cell on the first error (the HTML, if asked for, is written anyway).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if solutions:
        for ex in exercises(nb):
            cell = nb.cells[ex["cell"]]
            cell.metadata["ksmlens"]["student_source"] = cell.source   # the book shows it
            cell.source = ex["solution"]
    saved = {k: os.environ.get(k) for k in (ENV_VM, ENV_EXERCISES)}
    if vm:
        os.environ[ENV_VM] = vm
    if solutions:
        os.environ[ENV_EXERCISES] = "strict"
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
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
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
