"""README.md's Python examples, run as written on a real guest.

The blocks are executed in order in one namespace (the lab example boots
the VM the lens example walks and powers off), with the VM renamed so a
user's own ``demo`` VM is never touched. The lens example's own asserts
and the checks below hold it to the kernel: the DataFrame's rows are the
kernel's rmap_items (/sys/kernel/mm/ksm/ksm_rmap_items... via check).
"""

import os
import re
from pathlib import Path

import pytest

from ksmlens.lab.vm import VM

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_and_guide_links_lead_somewhere():
    """Every relative link of README.md and docs/guide/*.md names a file of
    the checkout, and its #anchor a heading of that file (GitHub's slugs);
    README links each guide page and shows one picture."""
    docs = sorted((README.parent / "docs" / "guide").glob("*.md"))
    assert docs
    for md in [README, *docs]:
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^()\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (md.parent / file).resolve() if file else md
            assert dest.exists(), (md.name, target)
            if anchor:
                heads = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", dest.read_text(),
                                                        flags=re.S), re.M)
                assert anchor in {_slug(h) for h in heads}, (md.name, target)
    readme = README.read_text()
    for page in docs:
        assert f"](docs/guide/{page.name})" in readme, page.name
    assert len(re.findall(r"!\[[^\]]*\]\(", readme)) == 1


def test_readme_has_the_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert any("VM.up(" in b for b in blocks) and any("take_snapshot(" in b for b in blocks)


@pytest.mark.vm
def test_readme_python_examples_run(tmp_path, monkeypatch):
    name = f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-readme-{os.getpid()}"
    code = "\n".join(python_blocks()).replace('"demo"', repr(name)).replace(
        '"vm:demo"', repr(f"vm:{name}"))
    assert "demo" not in code.replace("# ", "")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    try:
        exec(compile(code, str(README), "exec"), ns)
    finally:
        try:
            VM(name).down(quiet=True)
        except Exception:
            pass
    snap, items = ns["snap"], ns["items"]
    # what the kernel itself counted in the same pause (ksm_rmap_items and
    # the per-process ksm_stat), against the table the example printed
    from ksmlens.experiments.check import walk_counts
    assert walk_counts(snap)["rmap_items"] == len(items) == snap.counters["rmap_items"]
    assert (items.state == "stable").sum() == snap.counters["pages_shared"] + \
        snap.counters["pages_sharing"]
    # mremap moved one sharer's VMA: v3 misses exactly the moved items' mappings
    moved = items[(items.pgoff_status == "moved") & (items.state == "stable")]
    assert len(moved) > 0 and not moved.walk_v3.any() and moved.walk_stored.all()
    assert (tmp_path / "snap.ksm").stat().st_size < 40 * len(items) + 200_000


def test_readme_cost_block_is_the_committed_benchmark():
    """README's cost columns are docs/walk-cost.json (benchmarks/walk_cost.py),
    a full run: every variant, every kind of walk, every count equal to the
    prediction."""
    import json

    from ksmlens.views.tables import COST_BEGIN, COST_END, marked_block, walk_cost_markdown
    doc = json.loads((README.parent / "docs" / "walk-cost.json").read_text())
    assert doc["schema"] == "ksmlens-walk-cost/1"
    readme = README.read_text()
    assert marked_block(readme, COST_BEGIN, COST_END) == walk_cost_markdown(doc)
    assert [v["variant"] for v in doc["variants"]] == ["stock", "v3", "union", "v8"]
    for v in doc["variants"]:
        assert set(v["kinds"]) == {"migrate", "reclaim", "hwpoison"} and v["agree"], v
