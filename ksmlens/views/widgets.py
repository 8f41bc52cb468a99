"""Notebook explorer of KSM state (ipywidgets).

:class:`Explorer` shows one snapshot at a time: pick a process, one of its
VMAs, or a stable node, and its tables and figures (from
:mod:`ksmlens.views.plots`) update in place. With a running scenario it can also
drive the lab: advance the scenario one step, wait for ksmd's full scans,
take a new snapshot.

>>> ex = Explorer(run)                      # doctest: +SKIP  (a ScenarioRun in a VM)
>>> ex                                      # doctest: +SKIP  (displays the widget)
>>> ex = Explorer(["a.json", "b.json"])     # doctest: +SKIP  (saved snapshots)

All logic is in plain methods (:meth:`Explorer.refresh`,
:meth:`Explorer.advance`, :meth:`Explorer.wait_scans`, :meth:`Explorer.render`);
the buttons and dropdowns only call them, so setting a Dropdown's ``value``
or calling ``button.click()`` drives the explorer with no browser.
Figures are put into the :class:`ipywidgets.Output` widgets as PNG
``display_data`` outputs, so they show the same in a notebook and in the
widget model's state. An error from the lab is shown as one line in
:attr:`Explorer.status` instead of being raised from a button.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

import ipywidgets as W

import ksmlens.views.plots as plots
from ksmlens.analysis.core import RULES
from ksmlens.errors import KsmlensError
from ksmlens.lens.model import Snapshot

__all__ = ["Explorer"]

ALL_VMAS = "all"
MAX_TABLE_ROWS = 200


def _png_output(fig, dpi: int = 80) -> dict:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    title = fig.axes[0].get_title() if fig.axes else ""
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(buf.getvalue()).decode(),
                     "text/plain": f"<Figure: {title}>"}}


def _text_output(text: str) -> dict:
    return {"output_type": "display_data", "metadata": {},
            "data": {"text/plain": text}}


def _table(head, rows, more: int = 0) -> str:
    e = html.escape
    out = ["<table style='font-family:monospace;font-size:11px'>",
           "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e('' if v is None else str(v))}</td>"
                                    for v in r) + "</tr>")
    out.append("</table>")
    if more:
        out.append(f"<p>... {more} more rows</p>")
    return "\n".join(out)


def _hx(v):
    return None if v is None else f"{v:#x}"


class Explorer:
    """Explore snapshots, and with a lab, drive it.

    ``source`` is either a :class:`ksmlens.lab.scenarios.ScenarioRun` (its
    ``vm`` is the lab; the first snapshot is taken at once), an object with
    ``vm`` and ``run`` attributes (the same, spelled out), or a list of
    :class:`~ksmlens.lens.model.Snapshot` objects or snapshot file paths (no lab:
    the step/wait/refresh buttons are disabled).

    Widgets (attributes): ``frame``, ``pid``, ``vma``, ``node`` (Dropdowns),
    ``step_button``, ``scans`` (IntText), ``wait_button``, ``refresh_button``,
    ``status``, ``items_table``, ``node_table`` (HTML), ``space_out``,
    ``node_out``, ``tree_out``, ``axis_out``, ``axis_timeline_out`` (Output),
    ``process_tabs`` (Tab: "address space" and "address axis", the latter
    :func:`ksmlens.views.plots.address_axis` of the process, and with two or
    more snapshots :func:`~ksmlens.views.plots.address_axis_timeline` over
    them all). ``figures`` holds the last Figure drawn for ``"space"``,
    ``"axis"``, ``"axis_timeline"``, ``"node"`` and ``"tree"``; ``widget`` is
    the whole layout (also shown when the Explorer is the cell's value).
    """

    def __init__(self, source, *, dpi: int = 80):
        self.dpi = dpi
        self.run = None
        self.vm = None
        self.frames: list[Snapshot] = []
        if hasattr(source, "scenario") and hasattr(source, "vm"):
            self.run, self.vm = source, source.vm
        elif hasattr(source, "run") and hasattr(source, "vm"):
            self.run, self.vm = source.run, source.vm
        else:
            try:
                items = list(source)
            except TypeError:
                raise KsmlensError(f"Explorer cannot read a {type(source).__name__}",
                                   "pass a ScenarioRun or a list of Snapshots/paths") from None
            for s in items:
                self.frames.append(s if isinstance(s, Snapshot) else Snapshot.load(Path(s)))
            if not self.frames:
                raise KsmlensError("Explorer got an empty list of snapshots",
                                   "pass at least one Snapshot or snapshot path")
        self.figures: dict = {"space": None, "axis": None, "axis_timeline": None,
                              "node": None, "tree": None}
        self._quiet = False

        self.frame = W.Dropdown(description="snapshot")
        self.pid = W.Dropdown(description="process")
        self.vma = W.Dropdown(description="VMA")
        self.node = W.Dropdown(description="stable node", layout=W.Layout(width="420px"))
        self.step_button = W.Button(description="step", icon="forward")
        self.scans = W.BoundedIntText(value=1, min=1, max=1000, description="full scans",
                                      layout=W.Layout(width="160px"))
        self.wait_button = W.Button(description="wait for scans", icon="hourglass")
        self.refresh_button = W.Button(description="refresh", icon="refresh")
        self.status = W.HTML()
        self.items_table = W.HTML()
        self.node_table = W.HTML()
        self.space_out = W.Output()
        self.node_out = W.Output()
        self.tree_out = W.Output()
        self.axis_out = W.Output()
        self.axis_timeline_out = W.Output()
        self.process_tabs = W.Tab(children=[self.space_out,
                                            W.VBox([self.axis_out, self.axis_timeline_out])],
                                  titles=("address space", "address axis"))
        lab = self.vm is not None
        for b in (self.step_button, self.wait_button, self.refresh_button):
            b.disabled = not lab
        self.scans.disabled = not lab

        self.frame.observe(lambda ch: self._on_frame(), names="value")
        self.pid.observe(lambda ch: self._on_pid(), names="value")
        self.vma.observe(lambda ch: self._guard(self.render_process), names="value")
        self.node.observe(lambda ch: self._guard(self.render_node), names="value")
        self.step_button.on_click(lambda b: self._action(self.advance))
        self.wait_button.on_click(lambda b: self._action(lambda: self.wait_scans(
            self.scans.value)))
        self.refresh_button.on_click(lambda b: self._action(self.refresh))

        self.widget = W.VBox([
            W.HBox([self.frame, self.step_button, self.scans, self.wait_button,
                    self.refresh_button]),
            self.status,
            W.HBox([self.pid, self.vma]),
            self.process_tabs, self.items_table,
            self.node, W.HBox([self.node_out, self.tree_out]), self.node_table])
        if lab:
            self.refresh()
        else:
            self._set_frames(len(self.frames) - 1)
            self._say(f"{len(self.frames)} saved snapshot(s)")

    # ------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def snap(self) -> Snapshot:
        """The snapshot on show."""
        return self.frames[self.frame.value]

    # ------------------------------------------------------------ lab actions
    def next_step(self) -> str | None:
        """Name of the scenario's next step ("start" if not started, None
        when every step ran), from the run's history."""
        if self.run is None:
            return None
        if self.run.handle is None:
            return "start" if not self.run.history else None
        done = {h["step"] for h in self.run.history}
        return next((s.name for s in self.run.scenario.steps if s.name not in done), None)

    def _need_lab(self, what: str):
        if self.vm is None:
            raise KsmlensError(f"cannot {what}: this Explorer shows saved snapshots",
                               "make it from a ScenarioRun to drive a VM")

    def advance(self) -> dict:
        """Run the scenario's next step (``ScenarioRun.step``), then take a
        snapshot. Returns the step's result."""
        self._need_lab("advance the scenario")
        name = self.next_step()
        if name is None:
            raise KsmlensError(f"scenario {self.run.scenario.name} has run all its steps",
                               "wait for full scans or refresh instead")
        res = self.run.start() if name == "start" else self.run.step(name)
        self.refresh(note=f"step {name} done")
        return res

    def wait_scans(self, n: int = 1) -> dict:
        """Wait for ``n`` more full scans of ksmd, then take a snapshot.
        Returns the counters read when they were done."""
        from ksmlens.lab.ksmsys import wait_full_scans
        self._need_lab("wait for full scans")
        c = wait_full_scans(self.vm, int(n))
        self.refresh(note=f"waited for {n} full scan(s)")
        return c

    def refresh(self, note: str = "snapshot taken") -> Snapshot:
        """Take a new snapshot of the lab VM and show it."""
        from ksmlens.lab.attach import attach
        from ksmlens.lens.snapshot import take_snapshot
        self._need_lab("take a snapshot")
        snap = take_snapshot(attach("vm:" + self.vm.name))
        self.frames.append(snap)
        self._set_frames(len(self.frames) - 1)
        self._say(note)
        return snap

    # ------------------------------------------------------------ selection
    def _guard(self, fn):
        if not self._quiet:
            fn()

    def _action(self, fn):
        for b in (self.step_button, self.wait_button, self.refresh_button):
            b.disabled = True
        self._say("working ...")
        try:
            fn()
        except KsmlensError as e:
            self._say(str(e), error=True)
        finally:
            for b in (self.wait_button, self.refresh_button):
                b.disabled = self.vm is None
            self._update_step_button()

    def _say(self, msg: str, error: bool = False):
        s = self.snap if self.frames else None
        c = s.counters if s else {}
        head = (f"<b>{html.escape(msg)}</b>" if not error else
                f"<b style='color:#c00'>{html.escape(msg)}</b>")
        info = ""
        if s is not None:
            info = html.escape(
                f" | kernel {s.kernel.release} | full_scans={c.get('full_scans')} "
                f"pages_shared={c.get('pages_shared')} pages_sharing={c.get('pages_sharing')} "
                f"pages_skipped={c.get('pages_skipped')} | {len(s.rmap_items)} rmap_items, "
                f"{len(s.stable_nodes)} stable nodes")
        self.status.value = head + info

    def _update_step_button(self):
        name = self.next_step()
        self.step_button.description = f"step: {name}" if name else "step"
        self.step_button.disabled = name is None

    def _frame_label(self, k, s):
        return f"#{k} full_scans={s.counters.get('full_scans', '?')}"

    def _set_frames(self, index: int):
        self._quiet = True
        try:
            self.frame.options = [(self._frame_label(k, s), k) for k, s in enumerate(self.frames)]
            self.frame.value = index
        finally:
            self._quiet = False
        self._on_frame()
        self._update_step_button()

    def _on_frame(self):
        if self._quiet:
            return
        s = self.snap
        self._quiet = True
        try:
            procs = {}
            for i in s.items():
                if i.pid is not None:
                    procs.setdefault(i.pid, i.comm)
            old = self.pid.value
            self.pid.options = [(f"{p} {c or ''}".strip(), p) for p, c in sorted(procs.items())]
            self.pid.value = old if old in procs else (min(procs) if procs else None)
            nodes = [n for n in s.nodes()]
            oldn = self.node.value
            self.node.options = [(self._node_label(n), n.id) for n in nodes]
            self.node.value = oldn if any(n.id == oldn for n in nodes) else \
                (nodes[0].id if nodes else None)
            self._vma_options()
        finally:
            self._quiet = False
        self.render()

    def _on_pid(self):
        if self._quiet:
            return
        self._quiet = True
        try:
            self._vma_options()
        finally:
            self._quiet = False
        self.render_process()

    def _vma_options(self):
        s, pid = self.snap, self.pid.value
        vmas = sorted({(i.vma_start, i.vma_end, i.vm_pgoff) for i in s.items_of(pid)
                       if i.vma_start is not None}) if pid is not None else []
        old = self.vma.value
        self.vma.options = [("all VMAs", ALL_VMAS)] + [
            (f"{a:#x}-{b:#x} pgoff {p:#x}", a) for a, b, p in vmas]
        self.vma.value = old if any(v[0] == old for v in vmas) else ALL_VMAS

    @staticmethod
    def _node_label(n):
        kp = f"kpfn {n.kpfn:#x}" if n.kpfn is not None else f"{len(n.dups)} dups"
        miss = f" missed by {','.join(n.unmappable_under)}" if n.unmappable_under else ""
        return f"{n.kind} {kp} ({len(n.items)} items){miss}"

    # ------------------------------------------------------------ rendering
    def render(self):
        """Redraw everything for the current snapshot and selection."""
        self.render_process()
        self.render_node()
        self.render_tree()

    def render_process(self):
        """The process's address space and its rmap_items table."""
        s, pid = self.snap, self.pid.value
        if pid is None:
            self.figures.update(space=None, axis=None, axis_timeline=None)
            for out in (self.space_out, self.axis_out, self.axis_timeline_out):
                out.outputs = (_text_output("no process has rmap_items"),)
            self.items_table.value = "<p>no rmap_items in this snapshot</p>"
            return
        vma = None if self.vma.value in (None, ALL_VMAS) else self.vma.value
        fig = plots.address_space(s, pid, vma=vma)
        self.figures["space"] = fig
        self.space_out.outputs = (_png_output(fig, self.dpi),)
        self.render_axis()
        items = [i for i in s.items_of(pid) if vma is None or i.vma_start == vma]
        rows = [(_hx(i.address), i.state, i.pgoff_status, i.pgoff_cause, _hx(i.vma_start),
                 _hx(i.vm_pgoff), _hx(i.addr_pgoff), _hx(i.linear_page_index),
                 _hx(i.stored_pgoff), i.age, i.remaining_skips, i.stable_node)
                for i in items[:MAX_TABLE_ROWS]]
        st = Counter(i.pgoff_status for i in items)
        self.items_table.value = (
            f"<p>pid {pid}: {len(items)} rmap_items; pgoff_status "
            + ", ".join(f"{k} {v}" for k, v in sorted(st.items())) + "</p>"
            + _table(("address", "state", "pgoff_status", "cause", "vm_start", "vm_pgoff",
                      "addr_pgoff", "linear_page_index", "stored_pgoff", "age",
                      "remaining_skips", "stable_node"), rows,
                     max(0, len(items) - MAX_TABLE_ROWS)))

    def render_axis(self):
        """The process on one address axis (its VMAs, each walk rule,
        SmartScan), and over every snapshot when there are two or more."""
        s, pid = self.snap, self.pid.value
        fig = plots.address_axis(s, pid)
        self.figures["axis"] = fig
        self.axis_out.outputs = (_png_output(fig, self.dpi),)
        if len(self.frames) < 2:
            self.figures["axis_timeline"] = None
            self.axis_timeline_out.outputs = (_text_output(
                "one snapshot: take more (wait for scans, refresh) for the timeline"),)
            return
        fig = plots.address_axis_timeline(self.frames, pid)
        self.figures["axis_timeline"] = fig
        self.axis_timeline_out.outputs = (_png_output(fig, self.dpi),)

    def render_node(self):
        """The stable node's sharers and walk replay."""
        s, nid = self.snap, self.node.value
        if nid is None:
            self.figures["node"] = None
            self.node_out.outputs = (_text_output("no stable nodes in this snapshot"),)
            self.node_table.value = "<p>no stable nodes</p>"
            return
        n = s.node(nid)
        if n.mappings:
            fig = plots.walk_replay(s, nodes=[nid])
            self.figures["node"] = fig
            self.node_out.outputs = (_png_output(fig, self.dpi),)
        else:
            self.figures["node"] = None
            self.node_out.outputs = (_text_output(
                f"{n.kind} node {nid}: no walk-replay mappings recorded"),)
        head = (f"<p>{html.escape(n.kind)} node {html.escape(nid)}: kpfn {_hx(n.kpfn)}, "
                f"nid {n.nid}, mapcount {n.mapcount}, {len(n.items)} rmap_items"
                + (f", chain {html.escape(n.chain)}" if n.chain else "")
                + (f", {len(n.dups)} dups" if n.dups else "") + "</p>")
        if n.kind == "chain":
            rows = [(d, len(s.node(d).items), _hx(s.node(d).kpfn)) for d in n.dups]
            self.node_table.value = head + _table(("dup", "items", "kpfn"), rows)
            return
        rows = []
        for m in n.mappings[:MAX_TABLE_ROWS]:
            f = m.get("found") or {}
            rows.append((m.get("pid"), m.get("comm"), _hx(m.get("address")), m.get("pass"),
                         m.get("mapped"), *(f.get(r) for r in RULES)))
        if rows:
            self.node_table.value = head + _table(
                ("pid", "comm", "address", "pass", "mapped", *RULES), rows,
                max(0, len(n.mappings) - MAX_TABLE_ROWS))
        else:
            items = [s.item(i) for i in n.items]
            self.node_table.value = head + _table(
                ("pid", "comm", "address", "pgoff_status"),
                [(i.pid, i.comm, _hx(i.address), i.pgoff_status) for i in items])

    def render_tree(self):
        """The stable tree of the current snapshot."""
        s = self.snap
        if not len(s.stable_nodes):
            self.figures["tree"] = None
            self.tree_out.outputs = (_text_output("the stable tree is empty"),)
            return
        fig = plots.stable_tree(s)
        self.figures["tree"] = fig
        self.tree_out.outputs = (_png_output(fig, self.dpi),)
