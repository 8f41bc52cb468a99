"""An audit of every public figure of :mod:`ksmlens.views.plots` at a few
hundred nodes (issue 12's standard): each Axes that draws data has a title
(or the Figure a suptitle), a labelled x and y axis and a legend (its own or
the Figure's); panels on one shared axis (``sharex``) share its title and
label, and on the drawn figure no two tick labels of one axis, nor
two of its texts (annotations, node labels), overlap by more than a fifth.

The functions come from ``plots.__all__``, so a figure added later is
audited too: it is called with the synthetic inputs below by the names of
its required parameters (``snap``/``pid``: one snapshot of a few hundred
stable nodes and the process with most rmap_items; ``frames``: a timeline
of three such snapshots), or by an entry of :data:`CALLS`; one that can be
called neither way must be listed in :data:`CANNOT` with the reason.
The inputs are hand-made (tests/smallsnap.py): whether a figure shows the
kernel's truth is checked on real guests in the ``vm`` tests.
"""

import inspect
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ksmlens.views import plots  # noqa: E402

from smallsnap import PAGE, item, mapping, node, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NODES = 300            # stable nodes (regular, plus dups of chains)
PIDS = (101, 102, 103, 104)


def big_snapshot(scan: int = 0):
    """~300 stable nodes shared by 4 processes (one VMA each, plus a VMA of
    pid 101 moved by mremap), 4 chains of 5 dups, unstable and unscanned
    items, walk-replay mappings on every 10th node; ``scan`` shifts the
    SmartScan ages (a timeline)."""
    items, nodes = [], []
    vmas = {pid: (0x7F0000000000 + pid * 0x1000000000, 0, 0) for pid in PIDS}
    vmas = {pid: (s, s + 2048 * PAGE, s >> 12) for pid, (s, _, _) in vmas.items()}
    moved = (0x7F9000000000, 0x7F9000000000 + 64 * PAGE, 0x7F0000123)
    for k in range(NODES - 20):
        sharers = [PIDS[(k + j) % len(PIDS)] for j in range(2 + k % 3)]
        its = []
        for pid in sharers:
            s = vmas[pid][0]
            its.append(item(pid, s + k * PAGE, vma=vmas[pid], node=f"n{k}", age=0))
        if k < 32:                                       # the mremap'd VMA of pid 101
            its.append(item(101, moved[0] + k * PAGE, vma=moved, node=f"n{k}",
                            stored=moved[2] + k))
        n = node(f"n{k}", its, kpfn=0x10000 + k)
        if k % 10 == 0:
            n.mappings = [mapping(i.pid, i.address, found={"stock": True, "v3": i.address
                                                             < moved[0], "stored": True})
                          for i in its]
        items += its
        nodes.append(n)
    for c in range(4):                                   # chains: max_page_sharing reached
        dups = []
        for d in range(5):
            its = [item(PIDS[d % 4], vmas[PIDS[d % 4]][0] + (1500 + 10 * c + d) * PAGE,
                        vma=vmas[PIDS[d % 4]], node=f"c{c}d{d}")]
            dups.append(node(f"c{c}d{d}", its, kind="dup", chain=f"c{c}", kpfn=0x20000 + 8 * c + d))
            items += its
        nodes.append(node(f"c{c}", kind="chain", dups=[d.id for d in dups]))
        nodes += dups
    for k in range(200):                                 # not merged: SmartScan ages them
        pid = PIDS[k % 4]
        age = min(255, (k % 12) + scan)
        items.append(item(pid, vmas[pid][0] + (1700 + k) * PAGE, vma=vmas[pid],
                          state="unstable" if k % 3 else "none", age=age,
                          skips=plots.skip_age(age) if age >= 3 else 0))
    for it in items:                  # the union word: the pgoff, or checksum/age/skips
        it.raw_union = (it.stored_pgoff if it.state == "stable" else
                        it.oldchecksum | it.age << 32 | it.remaining_skips << 40)
    s = snapshot(items, nodes, full_scans=10 + scan)
    s.scan = {"seqnr": 10 + scan, "at_pass_start": True}    # ksmd idle at a pass start
    s.counters["smart_scan"] = 1
    s.kernel.stored_index_member = "pgoff"
    s.kernel.union_offset = 32        # offsetof(struct ksm_rmap_item, oldchecksum), x86-64
    return s


@pytest.fixture(scope="module")
def inputs():
    frames = [big_snapshot(s) for s in (0, 3, 6)]
    snap = frames[-1]
    pid = max(PIDS, key=lambda p: len(snap.items_of(p)))
    return {"snap": snap, "pid": pid, "frames": frames}


def _verify_result(snap):
    rows = [{"predicted": "moves" if k % 7 else "stays", "observed": "moved" if k % 7 else
             "stayed", "agree": True} for k in range(NODES)]
    rows[3] = {"predicted": "moves", "observed": "stayed", "agree": False}
    pages = [{"predicted": r["predicted"], "observed": r["observed"], "agree": r["agree"]}
             for r in rows for _ in range(3)]
    return {"rule": "v3", "rows": rows, "pages": pages, "release": snap.kernel.release}


def _matrix():
    from ksmlens.experiments.matrix import Matrix
    return Matrix.load(ROOT / "docs" / "matrix.json")        # the committed run


def _union_bytes(i):
    """plots.union_bytes of one STABLE item of ``pid`` before and after (union)."""
    from ksmlens.analysis.union import union_bytes_frame
    frames, pid = i["frames"], i["pid"]
    addr = next(it.address for it in frames[0].items_of(pid) if it.state == "stable")
    return plots.union_bytes(union_bytes_frame({"before": frames[0], "after": frames[-1]},
                                               addresses=[addr], pid=pid))


# Calls the parameter names do not determine (a name plots does not have yet
# is a figure another branch adds: used once it is in plots.__all__).
CALLS = {
    "union_bytes": _union_bytes,
    "verify_outcome": lambda i: plots.verify_outcome(_verify_result(i["snap"])),
    "matrix_figure": lambda i: plots.matrix_figure(_matrix()),
    "skip_schedule": lambda i: plots.skip_schedule(),
    "smartscan_heatmap": lambda i: plots.smartscan_heatmap(i["frames"], field="age"),
}
# Public figure functions the audit cannot call on synthetic inputs: name -> why.
CANNOT: dict[str, str] = {}

# Required parameters filled in by name.
BY_NAME = {"snap": "snap", "snapshot": "snap", "pid": "pid", "frames": "frames",
           "snaps": "frames", "timeline": "frames"}


def _figure_functions():
    out = []
    for name in plots.__all__:
        obj = getattr(plots, name)
        if inspect.isfunction(obj) and not name.startswith("_"):
            out.append(name)
    return out


FUNCTIONS = _figure_functions()


def _call(name, inp):
    if name in CALLS:
        return CALLS[name](inp)
    fn = getattr(plots, name)
    args = {}
    for p in inspect.signature(fn).parameters.values():
        if p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL,
                                                                  p.VAR_KEYWORD):
            continue
        if p.name not in BY_NAME:
            pytest.fail(f"plots.{name} needs {p.name!r}, which the audit cannot make: add a "
                        "call to CALLS in tests/views/test_plot_audit.py, or list it in "
                        "CANNOT with the reason")
        args[p.name] = inp[BY_NAME[p.name]]
    return fn(**args)


def _axes_problems(fig: Figure) -> list[str]:
    """What the figure lacks: per data-drawing Axes (colorbars aside), a
    title, axis labels, a legend; and overlapping tick labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)            # the figures are made without pyplot
    canvas.draw()
    r = canvas.get_renderer()
    sup = fig.get_suptitle() if hasattr(fig, "get_suptitle") else \
        (fig._suptitle.get_text() if fig._suptitle else "")
    fig_legend = bool(fig.legends)
    bad = []
    drawing = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None
               and ax.has_data()]
    if not drawing:
        return ["no Axes draws data"]
    for k, ax in enumerate(drawing):
        who = f"axes {k}" + (f" {ax.get_title()[:60]!r}" if ax.get_title() else "")
        # panels stacked on one shared x axis (sharex) are one plot: one title
        # (usually the top panel's) and one x label (the bottom one's) serve all
        xs = ax.get_shared_x_axes().get_siblings(ax)
        ys = ax.get_shared_y_axes().get_siblings(ax)
        if not (any(a.get_title(loc).strip() for a in xs for loc in ("center", "left", "right"))
                or sup.strip()):
            bad.append(f"{who}: no title")
        if not any(a.get_xlabel().strip() for a in xs):
            bad.append(f"{who}: no x label")
        if not any(a.get_ylabel().strip() for a in ys):
            bad.append(f"{who}: no y label")
        if ax.get_legend() is None and not fig_legend:
            bad.append(f"{who}: no legend")
        for what, labels in (("x tick label", ax.get_xticklabels()),
                             ("y tick label", ax.get_yticklabels()),
                             ("text (annotation)", ax.texts)):
            boxes = [t.get_window_extent(r) for t in labels
                     if t.get_visible() and t.get_text().strip()]
            hits = sum(1 for a, b in itertools.combinations(boxes, 2)
                       if _overlap_area(a, b) > 0.2 * min(a.width * a.height,
                                                          b.width * b.height))
            if hits:
                bad.append(f"{who}: {hits} overlapping {what} pair(s) of {len(boxes)}")
    return bad


def _overlap_area(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, w) * max(0.0, h)


def test_the_audit_covers_every_public_figure():
    assert {"address_space", "stable_tree", "walk_replay", "verify_outcome",
            "matrix_figure", "smartscan_heatmap", "skip_schedule"} <= set(FUNCTIONS)
    assert set(CANNOT) <= set(FUNCTIONS), "CANNOT names functions plots no longer has"


def test_the_synthetic_inputs_are_a_few_hundred_nodes(inputs):
    snap = inputs["snap"]
    nodes = snap.nodes(mappings=False)
    assert len(nodes) >= NODES
    assert len(snap.items()) > 3 * NODES
    assert {n.kind for n in nodes} == {"regular", "chain", "dup"}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_figure_has_title_labels_legend(name, inputs, tmp_path):
    if name in CANNOT:
        pytest.skip(f"plots.{name}: {CANNOT[name]}")
    fig = _call(name, inputs)
    assert isinstance(fig, Figure), f"plots.{name} returned {type(fig).__name__}, not a Figure"
    problems = _axes_problems(fig)
    path = tmp_path / f"{name}.png"
    fig.savefig(path, dpi=80)
    assert not problems, f"plots.{name} at {NODES} nodes: " + "; ".join(problems)
    w, h = fig.get_size_inches()
    assert w * h > 10 and h <= 60, f"plots.{name}: a {w:.0f}x{h:.0f} inch figure"


def test_the_audit_finds_what_is_missing():
    """The checks above can fail: a bare plot, and one with crowded ticks."""
    from matplotlib.figure import Figure as F
    fig = F(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot([0, 1], [1, 0])
    problems = _axes_problems(fig)
    assert {"axes 0: no title", "axes 0: no x label", "axes 0: no y label",
            "axes 0: no legend"} <= set(problems)
    fig = F(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot(range(200), range(200), label="l")
    ax.set(title="t", xlabel="x", ylabel="y")
    ax.legend()
    ax.set_yticks(range(200), [f"label {k}" for k in range(200)])
    assert any("overlapping y tick label" in p for p in _axes_problems(fig))
    ax.text(10, 10, "a note")
    ax.text(10, 10, "a note too")
    assert any("overlapping text (annotation) pair" in p for p in _axes_problems(fig))
    fig.suptitle("s")
    assert _axes_problems(F()) == ["no Axes draws data"]
    # stacked panels on one x axis: the top one's title, the bottom one's x label
    fig = F(figsize=(4, 5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax in (top, bottom):
        ax.plot([0, 1], [0, 1], label="l")
        ax.set_ylabel("y")
        ax.legend()
    top.set_title("t")
    bottom.set_xlabel("x")
    assert _axes_problems(fig) == []
    bottom.set_xlabel("")
    assert _axes_problems(fig) == ["axes 0 't': no x label", "axes 1: no x label"]
