"""Every notebook in notebooks/ runs top to bottom against a real guest.

Each notebook is executed with nbclient (``ksmlens.views.notebook.run_notebook``)
and rendered to HTML; any cell error fails the test. The notebooks check
their own claims against the kernel (``check_vm`` rows, counts from the
walk against ``/sys/kernel/mm/ksm``), so a run that succeeds is a run whose
numbers agreed. Most notebooks reuse the session's lab VM (they must leave
it up); one run boots its own VM and must power it off.

Each run saves the executed notebook beside its HTML
(``out/notebooks/test/NAME.ipynb``); after them
``test_book_of_the_executed_notebooks_in_chromium`` builds the book of those
(:func:`ksmlens.views.book.build_book`, into ``out/book``) and opens it in
Debian's headless chromium through Selenium: the index lists every notebook
with its summary and a picture that loaded, every page shows its figures and
no error, every link leads to a page of the book. Run alone, it builds from
whichever executed notebooks ``out/notebooks/test`` holds (skipped if none).
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


EXECUTED = ROOT / "out" / "notebooks" / "test"     # NAME.html and NAME.ipynb of the runs
BOOK = ROOT / "out" / "book"


def _copy_out(html: Path):
    EXECUTED.mkdir(parents=True, exist_ok=True)
    shutil.copy2(html, EXECUTED / html.name)


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
    executed = EXECUTED / path.name
    executed.unlink(missing_ok=True)        # no stale one in the book if this run fails
    nb = run_notebook(path, html, timeout=CELL_TIMEOUT, vm=vm.name, solutions=True)
    _copy_out(html)
    nbformat.write(nb, executed)
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


# ---------------------------------------------------------------------------
# The book of the executed notebooks, in a real browser.

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# What the browser shows of a page of the book: sections of the index, the
# figures (loaded or not), error outputs, links.
_PAGE_JS = r"""
const art = document.querySelector('article.bd-article');
if (!art || document.readyState !== 'complete') return null;
const img = i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,
                   w: i.naturalWidth});
return {
  title: document.title,
  h1: (art.querySelector('h1') || {}).textContent,
  entries: [...art.querySelectorAll('section > h2')].map(h => {
    const sec = h.parentElement;
    return {title: h.textContent.replace(/#$/, '').trim(),
            href: h.querySelector('a') ? h.querySelector('a').href : null,
            text: sec.innerText, imgs: [...sec.querySelectorAll('img')].map(img)};
  }),
  figures: [...art.querySelectorAll('.cell_output img')].map(img),
  errors: [...art.querySelectorAll('.output.traceback, .output.error')].map(
      e => e.innerText.slice(0, 300)),
  solutions: [...art.querySelectorAll('.cell.tag_exercise')].map(c => ({
      collapsed: !!c.querySelector('details:not([open])'),
      summary: (c.querySelector('details summary') || {}).innerText || ''})),
  questions: [...art.querySelectorAll('.cell.tag_exercise-question')].map(c => ({
      text: c.innerText, open: !c.querySelector('details')})),
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
};
"""


def _words(markdown: str) -> str:
    """The paragraph as a browser shows it: markup gone, words kept."""
    import re
    text = re.sub(r"[`*]", "", markdown)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return " ".join(text.split())


@pytest.mark.browser
@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="apt-get install chromium chromium-driver (./setup.sh does)")
def test_book_of_the_executed_notebooks_in_chromium(tmp_path):
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from ksmlens.views.book import build_book, first_image, notebook_summary

    names = {p.name for p in NOTEBOOKS}
    paths = sorted(p for p in EXECUTED.glob("*.ipynb") if p.name in names)
    if not paths:
        pytest.skip(f"no executed notebooks in {EXECUTED}: run test_notebook_runs "
                    "(pytest -m vm tests/views/test_notebooks.py) first")
    nbs = {p.stem: nbformat.read(p, as_version=4) for p in paths}
    for stem, nb in nbs.items():
        assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                    if o.output_type == "error"], f"{stem}.ipynb holds an error output"
    index = build_book(paths, BOOK)
    assert index == BOOK / "index.html"

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
              "--window-size=1300,1600", "--hide-scrollbars"):
        opts.add_argument(a)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        driver.set_page_load_timeout(60)

        def page(url):
            import time
            driver.get(url)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = driver.execute_script(_PAGE_JS)
                if st is not None:
                    return st
                time.sleep(0.3)
            pytest.fail(f"{url} did not render")

        st = page(index.as_uri())
        shots = ROOT / "out" / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shots / "book-index.png"))

        # the index: every notebook, its summary, its first picture (loaded)
        assert [e["title"] for e in st["entries"]] == \
            [_words(notebook_summary(nb)["title"]) for nb in nbs.values()]
        for (stem, nb), e in zip(nbs.items(), st["entries"]):
            s = notebook_summary(nb)
            text = " ".join(e["text"].split())
            assert _words(s["paragraph"])[:80] in text, (stem, text[:300])
            if s["learn"]:
                assert "You will learn" in text, stem
            assert e["href"] == (BOOK / f"{stem}.html").as_uri()
            picture = first_image(nb) is not None
            assert picture, f"{stem} draws no figure (issue 12: every notebook shows its picture)"
            assert len(e["imgs"]) == 1 and e["imgs"][0]["ok"], (stem, e["imgs"])

        # every page: its figures loaded, no error, exercise solutions collapsed
        for stem, nb in nbs.items():
            st = page((BOOK / f"{stem}.html").as_uri())
            assert st["h1"].rstrip("#").strip() == _words(notebook_summary(nb)["title"])
            n_pictures = sum(1 for c in nb.cells if c.cell_type == "code"
                             for o in c.outputs if "image/png" in o.get("data", {}))
            assert len(st["figures"]) == n_pictures > 0, (stem, st["figures"])
            assert all(f["ok"] for f in st["figures"]), (stem, st["figures"])
            assert st["errors"] == [], (stem, st["errors"])
            n_ex = sum(1 for c in nb.cells if "exercise" in c.metadata.get("tags", []))
            assert len(st["solutions"]) == n_ex
            assert all(x["collapsed"] and "solution" in x["summary"] for x in st["solutions"])
            # above each solution, open, the student's cell (its question, answer = ...)
            assert len(st["questions"]) == n_ex
            assert all(q["open"] and "answer = ..." in q["text"] for q in st["questions"])
            driver.save_screenshot(str(tmp_path / f"book-{stem}.png"))
            # links: every link into the book leads to one of its files
            for url in st["links"]:
                u = urlparse(url)
                if u.scheme == "file":
                    target = Path(url2pathname(u.path))
                    assert target.is_file() and BOOK in target.parents, (stem, url)

        # and a click from the index reaches the page
        page(index.as_uri())
        first = next(iter(nbs))
        driver.find_element("css selector", f"article h2 a[href='{first}.html']").click()
        st = page(driver.current_url)
        assert driver.current_url == (BOOK / f"{first}.html").as_uri()
        assert st["h1"].rstrip("#").strip() == _words(notebook_summary(nbs[first])["title"])
    finally:
        driver.quit()
