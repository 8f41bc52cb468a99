"""The book (ksmlens.views.book) built by Sphinx from tiny synthetic executed
notebooks: fast, no guest. The book of the real notebooks, opened in
chromium, is tested in tests/views/test_notebooks.py after they ran."""

import base64
import io
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup
from matplotlib.figure import Figure
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from ksmlens.errors import KsmlensError
from ksmlens.views.book import (GUIDE_DIR, build_book, first_image, guide_pages,
                                notebook_summary)
from ksmlens.views.notebook import notebook_paths

ROOT = Path(__file__).resolve().parents[2]


def _png(title: str) -> bytes:
    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [1, 0, 1], label="l")
    ax.set(title=title, xlabel="x", ylabel="y")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    return buf.getvalue()


def _notebook(title: str, png: bytes | None, learn=True, exercise="01-1"):
    """An executed notebook as ``run_notebook(..., solutions=True)`` leaves
    one: outputs, an exercise cell holding its solution, its hidden check."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    src = f"# {title}\n\nWhat {title} is about,\nin two lines.\n\n"
    if learn:
        src += "**You will learn**\n\n* how stable nodes are found\n* what mremap breaks\n\n"
    src += "More prose that is not the summary.\n"
    nb.cells.append(new_markdown_cell(src))
    c = new_code_cell("print('counters')", execution_count=1)
    c.outputs = [new_output("stream", name="stdout", text="pages_shared 16\n")]
    nb.cells.append(c)
    if png is not None:
        c = new_code_cell("fig", execution_count=2)
        c.outputs = [new_output("display_data", data={
            "image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"})]
        nb.cells.append(c)
    nb.cells.append(new_code_cell("answer = 16", execution_count=3, metadata={
        "tags": ["exercise"], "ksmlens": {
            "exercise": exercise, "solution": "answer = 16",
            "student_source": f"# Exercise {exercise}. How many KSM pages?\nanswer = ..."}}))
    c = new_code_cell(f"check_answer({exercise!r}, answer, int(open('pages_shared').read()))",
                      execution_count=4, metadata={"tags": ["exercise-check", "hide-input"],
                                                   "jupyter": {"source_hidden": True}})
    c.outputs = [new_output("stream", name="stdout", text=f"Exercise {exercise}: correct.\n")]
    nb.cells.append(c)
    return nb


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("executed")
    pngs = {"01-first": _png("first"), "02-second": None}
    nbformat.write(_notebook("01 · First", pngs["01-first"]), d / "01-first.ipynb")
    nbformat.write(_notebook("02 · Second", None, learn=False, exercise="02-1"),
                   d / "02-second.ipynb")
    student = _notebook("03 · Student", None, exercise="03-1")
    student.cells[-2].source = "answer = ..."           # no solution put in
    nbformat.write(student, d / "03-student.ipynb")
    out = tmp_path_factory.mktemp("book") / "book"
    index = build_book(d, out)
    return d, out, index, pngs


def _soup(path: Path) -> BeautifulSoup:
    return BeautifulSoup(path.read_text(), "html.parser")


def test_index_lists_each_notebook_with_summary_and_first_picture(built):
    d, out, index, pngs = built
    assert index == out / "index.html"
    assert (out / "_src" / "warnings.txt").read_text() == "", "Sphinx warned"
    soup = _soup(index)
    article = soup.select_one("article")
    heads = article.select("h2")
    assert [h.get_text(strip=True).rstrip("#") for h in heads] == \
        ["01 · First", "02 · Second", "03 · Student"]
    assert [h.a["href"] for h in heads] == ["01-first.html", "02-second.html", "03-student.html"]
    first, second = (h.find_parent("section") for h in heads[:2])
    assert "What 01 · First is about, in two lines." in " ".join(first.get_text().split())
    assert [li.get_text(strip=True) for li in first.select("li")] == \
        ["how stable nodes are found", "what mremap breaks"]
    assert "not the summary" not in first.get_text()
    img = first.select_one("img")
    assert (out / img["src"]).read_bytes() == pngs["01-first"]     # the first PNG output
    assert img.find_parent("a")["href"] == "01-first.html"
    assert second.select("img") == [] and second.select("li") == []
    # readable without a network: no script, style or image from another host
    for page in [index, out / "01-first.html"]:
        s = _soup(page)
        for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
            for t in s.find_all(tag):
                if t.get(attr) and not (tag == "link" and "stylesheet" not in t.get("rel", [])):
                    assert not t[attr].startswith(("http:", "https:", "//")), (page, t)


def test_notebook_page_collapses_solution_and_check(built):
    d, out, index, pngs = built
    soup = _soup(out / "01-first.html")
    assert soup.title.get_text().startswith("01 · First")
    assert "pages_shared 16" in soup.get_text()
    imgs = soup.select(".cell_output img")
    assert len(imgs) == 1 and (out / imgs[0]["src"]).read_bytes() == pngs["01-first"]
    # the student's cell, open, then the solution, collapsed
    question = soup.select_one(".cell.tag_exercise-question")
    assert "Exercise 01-1. How many KSM pages?" in question.get_text()
    assert "answer = ..." in question.get_text() and question.select("details") == []
    sol = soup.select_one(".cell.tag_exercise")
    assert question in sol.find_all_previous(class_="tag_exercise-question")
    det = sol.select_one("details")
    assert "answer = 16" in det.get_text() and not det.has_attr("open")
    assert "Show the solution of exercise 01-1" in det.summary.get_text()
    chk = soup.select_one(".cell.tag_exercise-check")
    assert "check_answer" in chk.select_one("details").get_text()
    assert "Show the check" in chk.select_one("details summary").get_text()
    # the check's output is shown, outside the collapsed source
    assert "Exercise 01-1: correct." in chk.select_one(".cell_output").get_text()
    assert not soup.select(".output.traceback, .output.error")
    # the executed notebook is there to download
    assert (out / "_sources" / "01-first.ipynb").exists()


def test_a_student_answer_stays_open(built):
    d, out, index, pngs = built
    soup = _soup(out / "03-student.html")
    cell = soup.select_one(".cell.tag_exercise")
    assert cell.select("details") == [] and "answer = ..." in cell.get_text()
    assert soup.select(".cell.tag_exercise-question") == []       # shown once


def test_refuses_unexecuted_and_foreign_dirs(tmp_path, built):
    d, out, index, pngs = built
    with pytest.raises(KsmlensError, match="not executed"):
        build_book(ROOT / "notebooks", tmp_path / "b1")        # the committed, stripped ones
    assert not (tmp_path / "b1").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(KsmlensError, match="not empty and holds no book"):
        build_book(d, tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").exists()
    with pytest.raises(KsmlensError, match="no executed notebook at"):
        build_book(tmp_path / "nothing-here", tmp_path / "b2")


def test_cli_builds_from_executed_notebooks(built, tmp_path):
    d, *_ = built
    out = tmp_path / "site"
    out.mkdir()
    (out / ".buildinfo").write_text("# Sphinx build info")   # a previous book: replaced
    (out / "stale.html").write_text("old")
    r = subprocess.run([sys.executable, "-m", "ksmlens", "book", str(d / "02-second.ipynb"),
                        str(d / "01-first.ipynb"), "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"book: {out / 'index.html'}" in r.stdout
    assert (out / "01-first.html").exists() and (out / "02-second.html").exists()
    assert not (out / "03-student.html").exists() and not (out / "stale.html").exists()
    heads = _soup(out / "index.html").select("article h2 a.reference")
    assert [a["href"] for a in heads] == ["01-first.html", "02-second.html"]   # by name
    r = subprocess.run([sys.executable, "-m", "ksmlens", "notebooks", "--help"],
                       capture_output=True, text=True, cwd=ROOT)
    assert "--book DIR" in r.stdout


def test_summaries_of_the_real_notebooks():
    """Each committed notebook has a title and a first paragraph to show;
    its "You will learn" list, where it has one, is found."""
    for p in notebook_paths(ROOT / "notebooks"):
        nb = nbformat.read(p, as_version=4)
        s = notebook_summary(nb)
        assert s["title"].startswith(p.name[:2] + " · "), (p.name, s["title"])
        assert len(s["paragraph"]) > 40, (p.name, s)
        if "**You will learn**" in nb.cells[0].source:
            assert s["learn"].count("\n") >= 2, (p.name, s["learn"])
        assert first_image(nb) is None                # committed without outputs


def test_the_guide_is_in_the_book(built):
    """Each page of docs/guide is a page of the book, in the order the guide's
    README.md gives, listed on the index and in the sidebar; its links lead
    to pages, headings and pictures of the book, none out of it."""
    d, out, index, pngs = built
    pages = guide_pages(GUIDE_DIR)
    assert [p.name for p in pages][:3] == ["lab.md", "lens.md", "proofs.md"]
    assert {p.name for p in GUIDE_DIR.glob("*.md")} == {p.name for p in pages} | {"README.md"}
    soup = _soup(index)
    hrefs = [a["href"] for a in soup.select("article p a.reference")]
    assert [h for h in hrefs if h.startswith("guide/")] == \
        [f"guide/{p.stem}.html" for p in pages]
    nav = [a["href"] for a in soup.select("nav a.reference")]
    assert all(f"guide/{p.stem}.html" in nav for p in pages)
    n_images = 0
    for p in pages:
        html = out / "guide" / f"{p.stem}.html"
        s = _soup(html)
        title = p.read_text().splitlines()[0].lstrip("# ")
        h1 = s.select_one("article h1").get_text().rstrip("#").replace("\u2019", "'")
        assert " ".join(h1.split()) == \
            " ".join(title.replace("`", "").split()), p.name
        for a in s.select("article a[href]"):
            href = a["href"]
            if href.startswith(("http:", "https:")):
                continue
            file, _, anchor = href.partition("#")
            target = (html.parent / file).resolve() if file else html
            assert target.is_file() and out.resolve() in target.parents, (p.name, href)
            if anchor:
                assert f'id="{anchor}"' in target.read_text(), (p.name, href)
        for img in s.select("article img"):
            n_images += 1
            src = (html.parent / img["src"]).resolve()
            assert src.is_file() and out.resolve() in src.parents, (p.name, img["src"])
        assert not s.select('article a[href*="README"]')            # left as text
    assert n_images >= 1                                            # docs/matrix.png


def test_guide_links_in_the_book(tmp_path):
    """A guide page's links for the book: pages and web links kept, a picture
    of docs/ copied beside, a link out of docs/ (README, sources) its text."""
    from ksmlens.views.book import _guide_page
    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "pic.png").write_bytes(b"png")
    (docs / "guide" / "b.md").write_text("# B\n")
    page = docs / "guide" / "a.md"
    page.write_text("# A\n\nSee [B](b.md#x), [web](https://example.org/a_(b)), [here](#h),\n"
                    "the [README](../../README.md), [code](../../ksmlens/x.py), "
                    "[gone](c.md), `[0, N]` and ![pic](../pic.png).\n")
    (tmp_path / "README.md").write_text("r")
    src = tmp_path / "src"
    src.mkdir()
    text = _guide_page(page, docs / "guide", src)
    assert "[B](b.md#x)" in text and "[here](#h)" in text and "https://example.org" in text
    assert "the README, code, gone, `[0, N]`" in text
    assert "![pic](../pic.png)" in text and (src / "pic.png").read_bytes() == b"png"
    assert [p.name for p in guide_pages(docs / "guide")] == ["a.md", "b.md"]
    (docs / "guide" / "README.md").write_text("* [B](b.md)\n* [A](a.md)\n")
    assert [p.name for p in guide_pages(docs / "guide")] == ["b.md", "a.md"]
    with pytest.raises(KsmlensError, match="no guide directory"):
        guide_pages(tmp_path / "nowhere")
