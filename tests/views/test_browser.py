"""JupyterLab really serves the notebooks and a real browser renders them.

JupyterLab is started on 127.0.0.1 (a free port, a random token, its own
config/runtime/settings/checkpoint dirs outside the checkout).

``test_jupyterlab_renders_a_notebook_in_chromium``: Debian's headless
chromium opens ``01-tour.ipynb`` and saves a screenshot. Checked: the
server's REST API answers, the browser's JupyterLab opened the notebook (the
server then holds a session for it: only the page's JavaScript creates one),
and the PNG is a real, non-blank picture of the window size.

``test_explorer_widget_in_chromium``: two real snapshots of a union guest
(the mremap scenario) are opened in :class:`ksmlens.views.widgets.Explorer` in a
notebook that chromium, driven by Selenium through Debian's chromedriver,
runs in JupyterLab. Checked in the browser's DOM: the dropdowns list the
snapshots and exactly the snapshot's pids, the lab buttons are disabled,
the address-space figure is a PNG, the table counts the process's
rmap_items by pgoff_status as the snapshot does; picking another process in
the browser's ``<select>`` brings its table and a new figure; its "address
axis" tab shows the two figures of ``plots.address_axis`` and
``address_axis_timeline`` drawn from the same snapshots. Screenshots go
under pytest's tmp dir and are copied to ``out/screenshots/``.

Server, kernels, chromedriver and browser are killed at the end; the widget
test checks that no process naming its tmp dir is left.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
JUPYTER = str(Path(sys.executable).with_name("jupyter"))
WIDTH, HEIGHT = 1400, 1000
NOTEBOOK = "01-tour.ipynb"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def _kill(p: subprocess.Popen):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)   # kernels the server started, browser helpers
    except ProcessLookupError:
        pass
    p.wait()


@contextlib.contextmanager
def serve_jupyterlab(root: Path, d: Path):
    """JupyterLab serving ``root`` on 127.0.0.1 (free port, random token);
    its config, runtime, workspaces, settings and checkpoints live under
    ``d`` (not in the checkout). Yields (base URL, token); at the end the
    server, and the kernels it started (their own sessions), are gone."""
    port, token = _free_port(), secrets.token_hex(16)
    settings = d / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "get notified about Jupyter news?" toast over the screenshot.
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(d / "config"),
               JUPYTER_RUNTIME_DIR=str(d / "runtime"))
    logpath = d / "jupyterlab.log"
    log = open(logpath, "w")
    p = subprocess.Popen(
        [JUPYTER, "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
         f"--LabApp.workspaces_dir={d / 'workspaces'}",
         f"--LabApp.user_settings_dir={d / 'settings'}",
         f"--FileCheckpoints.checkpoint_dir={d / 'checkpoints'}"],   # not in the checkout
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status, body = _get(f"{base}/api/status?token={token}")
                if status == 200:
                    break
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("JupyterLab did not come up:\n" + logpath.read_text()[-3000:])
            time.sleep(0.5)
        yield base, token
    finally:
        _kill(p)
        log.close()
        # Kernels run in sessions of their own; the server shuts them down on
        # SIGTERM, and any it could not are killed here (by pid: their
        # command line names a connection file in our runtime dir).
        _kill_left_under(d)


def _procs_under(d: Path) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose command line names ``d``."""
    me, mark, out = os.getpid(), str(d).encode(), []
    for e in os.scandir("/proc"):
        if not e.name.isdigit() or int(e.name) == me:
            continue
        try:
            cmd = open(f"/proc/{e.name}/cmdline", "rb").read()
        except OSError:
            continue
        if mark in cmd:
            out.append((int(e.name), cmd.replace(b"\0", b" ").decode(errors="replace")))
    return out


def _kill_left_under(d: Path):
    for pid, _ in _procs_under(d):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while _procs_under(d) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture
def jupyterlab(tmp_path):
    with serve_jupyterlab(ROOT / "notebooks", tmp_path / "jupyter") as lab:
        yield lab


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="apt-get install chromium "
                    "(./setup.sh does)")
def test_jupyterlab_renders_a_notebook_in_chromium(jupyterlab, tmp_path):
    base, token = jupyterlab
    status, body = _get(f"{base}/api/status?token={token}")
    assert status == 200 and "started" in json.loads(body)
    status, body = _get(f"{base}/api/contents/{NOTEBOOK}?token={token}")
    nb = json.loads(body)
    assert status == 200 and nb["type"] == "notebook" and nb["content"]["cells"]
    status, body = _get(f"{base}/lab?token={token}")
    assert status == 200 and b"JupyterLab" in body

    shot = tmp_path / "jupyterlab-01-tour.png"
    profile = tmp_path / "chromium-profile"
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
         "--hide-scrollbars", "--virtual-time-budget=20000", f"--screenshot={shot}",
         f"{base}/lab/tree/{NOTEBOOK}?token={token}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = browser.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        _kill(browser)
        pytest.fail("chromium did not finish its screenshot in 180 s")
    finally:
        _kill(browser)
    assert browser.returncode == 0, out.decode(errors="replace")[-2000:]
    data = shot.read_bytes()
    assert _png_size(data) == (WIDTH, HEIGHT)

    dest = ROOT / "out" / "screenshots"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, dest / shot.name)

    # Not blank: a rendered JupyterLab has text, toolbars and code cells.
    import matplotlib.image
    import numpy as np
    img = matplotlib.image.imread(shot)
    colors = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50 and img[..., :3].std() > 0.05, "the screenshot is blank"

    # The page's JavaScript opened the notebook: the server now has a session
    # (and a kernel) for it, which no plain HTTP fetch creates.
    status, body = _get(f"{base}/api/sessions?token={token}")
    assert status == 200
    assert NOTEBOOK in [s["path"] for s in json.loads(body)], body


# ---------------------------------------------------------------------------
# The Explorer widget, rendered by JupyterLab in a browser driven by Selenium.

CHROMEDRIVER = "/usr/bin/chromedriver"
WIDGET_TIMEOUT = 120
WIDGET_HEIGHT = 1300


def _chromedriver(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Debian's chromedriver on a free port, in a session of its own (so the
    chromium it starts dies with its process group). Returns (process, URL)."""
    port = _free_port()
    p = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1",
         f"--log-path={tmp_path / 'chromedriver.log'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            status, body = _get(f"{url}/status")
            if status == 200 and json.loads(body)["value"]["ready"]:
                return p, url
        except OSError:
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            _kill(p)
            pytest.fail("chromedriver did not come up")
        time.sleep(0.3)


def _wait(what: str, fn, timeout: float, driver=None, shot: Path | None = None):
    """fn()'s first truthy value, polled; fails naming ``what`` (after a
    screenshot of the page into ``shot``, if given)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:      # stale elements while the DOM updates
            last = e
        time.sleep(0.5)
    if driver is not None and shot is not None:
        try:
            driver.save_screenshot(str(shot))
        except Exception:
            pass
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}"
                + (f" (last error: {last!r})" if last else ""))


def _expected_header(snap, pid) -> tuple[str, dict]:
    from collections import Counter
    items = snap.items_of(pid)
    return f"pid {pid}: {len(items)} rmap_items", dict(Counter(i.pgoff_status for i in items))


# The widget's state as the browser shows it: dropdown options, button
# states, the items table, the images (their data: URLs, decoded).
_WIDGET_STATE_JS = r"""
const out = [...document.querySelectorAll('.jp-OutputArea-output')]
    .find(o => o.querySelector('.widget-dropdown'));
if (!out) return null;
const dd = {};
for (const d of out.querySelectorAll('.widget-dropdown')) {
  const label = d.querySelector('label');
  const sel = d.querySelector('select');
  dd[label ? label.textContent.trim() : '?'] = {
    options: [...sel.options].map(o => o.textContent.replace(/\u00a0/g, ' ')),
    selected: sel.selectedIndex};
}
const buttons = [...out.querySelectorAll('button.widget-button')].map(
    b => ({text: b.textContent.trim(), disabled: b.disabled}));
const imgs = [...out.querySelectorAll('.widget-output img')].map(
    i => ({src: i.src, w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}));
const tables = [...out.querySelectorAll('.widget-html table')].map(t => ({
    rows: t.querySelectorAll('tr').length,
    head: t.previousElementSibling ? t.previousElementSibling.textContent : ''}));
const scans = out.querySelector('.widget-inline-hbox input[type=number]');
return {dropdowns: dd, buttons, imgs, tables,
        scans_disabled: scans ? scans.disabled : null,
        text: out.innerText};
"""


# The images of the Explorer's process tab on show (not the hidden tab's).
_AXIS_TAB_JS = r"""
const out = [...document.querySelectorAll('.jp-OutputArea-output')]
    .find(o => o.querySelector('.widget-dropdown'));
const c = out && out.querySelector('.widget-tab-contents');
if (!c) return null;
return [...c.children].filter(e => !e.classList.contains('lm-mod-hidden'))
  .flatMap(e => [...e.querySelectorAll('.widget-output img')])
  .map(i => ({src: i.src, w: i.naturalWidth, h: i.naturalHeight, ok: i.complete,
              shown: i.getBoundingClientRect().width > 0}));
"""


@pytest.mark.vm
@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="apt-get install chromium chromium-driver (./setup.sh does)")
def test_explorer_widget_in_chromium(tmp_path):
    """The Explorer of two real snapshots (a union guest, the mremap
    scenario), run in a notebook in JupyterLab, rendered by headless chromium
    and driven through Selenium: what the browser shows is the snapshot's."""
    import base64

    import nbformat
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from conftest import boot

    from ksmlens.lab.attach import attach
    from ksmlens.lens.model import Snapshot
    from ksmlens.lab.scenarios import ScenarioRun
    from ksmlens.lens.snapshot import take_snapshot

    # 1. two real snapshots: merged, then re-merged after the mremap
    nbdir = tmp_path / "nb"
    nbdir.mkdir()
    paths = [nbdir / "0-merged.json", nbdir / "1-remerged.json"]
    vm = boot("union")
    with ScenarioRun(vm, "mremap") as run:
        run.step("merged")
        take_snapshot(attach("vm:" + vm.name)).save(paths[0])
        run.step("mremap")
        run.step("remerged")
        take_snapshot(attach("vm:" + vm.name)).save(paths[1])
        moved_pid = run.history[2]["result"]["pid"]
    snaps = [Snapshot.load(p) for p in paths]
    snap = snaps[-1]                            # the Explorer shows the last one
    pids = sorted({i.pid for i in snap.items() if i.pid is not None})
    assert len(pids) >= 2 and moved_pid in pids
    # the union kernel after the re-merge: the moved VMA's items (shown below)
    assert any(i.pgoff_status == "moved" for i in snap.items_of(moved_pid))

    # 2. the notebook
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell(
        "from ksmlens.views.widgets import Explorer\n"
        f"ex = Explorer({[str(p) for p in paths]!r})\n"
        "ex"))
    nbformat.write(nb, nbdir / "explorer.ipynb")

    shot = tmp_path / "jupyterlab-explorer-widget.png"
    axis_shot = tmp_path / "jupyterlab-explorer-axis-tab.png"
    failshot = tmp_path / "timed-out.png"
    t0 = time.monotonic()
    driver = chromedriver = None
    with serve_jupyterlab(nbdir, tmp_path / "jupyter") as (base, token):
        try:
            chromedriver, url = _chromedriver(tmp_path)
            opts = webdriver.ChromeOptions()
            opts.binary_location = CHROMIUM
            for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                      "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync",
                      f"--user-data-dir={tmp_path / 'chromium-profile'}",
                      f"--window-size={WIDTH},{WIDGET_HEIGHT}", "--hide-scrollbars"):
                opts.add_argument(a)
            driver = webdriver.Remote(command_executor=url, options=opts)
            driver.set_page_load_timeout(120)

            def wait(what, fn, timeout):
                return _wait(what, fn, timeout, driver, failshot)
            driver.get(f"{base}/lab/tree/explorer.ipynb?token={token}")

            # 3. the notebook is open and its kernel idle: run the cell
            def kernel_idle():
                _, body = _get(f"{base}/api/sessions?token={token}")
                return any(s["path"] == "explorer.ipynb" and s["kernel"]
                           and s["kernel"]["execution_state"] == "idle"
                           for s in json.loads(body))
            wait("the notebook's kernel to be idle", kernel_idle, 120)
            editor = wait("the code cell's editor", lambda: driver.find_element(
                By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell .cm-content"), 60)
            assert "Explorer(" in editor.text
            editor.click()
            webdriver.ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER) \
                .key_up(Keys.SHIFT).perform()

            # 4. the widget: dropdowns, buttons, the figures' PNGs
            def rendered():
                st = driver.execute_script(_WIDGET_STATE_JS)
                ok = (st and "process" in st["dropdowns"] and st["imgs"]
                      and all(i["ok"] and i["w"] > 0 for i in st["imgs"]) and st["tables"])
                return st if ok else None
            st = wait("the Explorer widget to render", rendered, WIDGET_TIMEOUT)
            t_render = time.monotonic() - t0

            frames = st["dropdowns"]["snapshot"]
            assert frames["options"] == [f"#{k} full_scans={s.counters['full_scans']}"
                                         for k, s in enumerate(snaps)]
            assert frames["selected"] == 1
            proc = st["dropdowns"]["process"]
            shown = [int(o.split()[0]) for o in proc["options"]]
            assert shown == pids, (proc, pids)
            comms = {i.pid: i.comm for i in snap.items()}
            assert proc["options"] == [f"{p} {comms[p] or ''}".strip() for p in pids]
            first = pids[proc["selected"]]
            assert first == min(pids)
            assert len(st["dropdowns"]["stable node"]["options"]) == len(snap.stable_nodes)
            buttons = {b["text"]: b["disabled"] for b in st["buttons"]}
            assert buttons == {"step": True, "wait for scans": True, "refresh": True}, buttons
            assert st["scans_disabled"] is True
            assert "2 saved snapshot(s)" in st["text"]
            assert f"kernel {snap.kernel.release}" in st["text"]
            assert snap.kernel.release.endswith("-ksmlens-union")

            def check_process(st, pid):
                head, statuses = _expected_header(snap, pid)
                table = st["tables"][0]
                assert table["head"].startswith(head + "; pgoff_status "), (table, head)
                shown = table["head"][len(head + "; pgoff_status "):].strip().split(", ")
                assert {k: int(v) for k, v in (x.split() for x in shown)} == statuses
                n = len(snap.items_of(pid))
                assert table["rows"] == 1 + min(n, 200)
                img = st["imgs"][0]
                assert img["src"].startswith("data:image/png;base64,")
                png = base64.b64decode(img["src"].split(",", 1)[1])
                assert _png_size(png) == (img["w"], img["h"])
                return img["src"]

            src_first = check_process(st, first)

            # 5. another process, picked in the browser's <select>
            def pick(pid, src_before):
                sel = driver.find_element(
                    By.XPATH, "//div[contains(@class,'widget-dropdown')]"
                              "[label[normalize-space()='process']]//select")
                Select(sel).select_by_index(pids.index(pid))

                def switched():
                    st = driver.execute_script(_WIDGET_STATE_JS)
                    ok = (st and st["tables"] and st["tables"][0]["head"].startswith(
                        f"pid {pid}:") and st["imgs"] and st["imgs"][0]["src"] != src_before
                        and st["imgs"][0]["ok"] and st["imgs"][0]["w"] > 0)
                    return st if ok else None
                st = wait(f"the table and figure of pid {pid}", switched, WIDGET_TIMEOUT)
                assert pids[st["dropdowns"]["process"]["selected"]] == pid
                return st, check_process(st, pid)

            other = moved_pid if moved_pid != first else pids[-1]
            st, src_other = pick(other, src_first)
            if other != moved_pid:
                # back to the moved process (for the screenshot): the same
                # figure as first drawn, byte for byte
                st, src = pick(moved_pid, src_other)
                assert src == src_first
            # the VMA dropdown followed: its VMAs
            vmas = {i.vma_start for i in snap.items_of(moved_pid) if i.vma_start is not None}
            assert len(st["dropdowns"]["VMA"]["options"]) == 1 + len(vmas)

            # 6. the screenshot
            driver.execute_script(
                "document.querySelector('.jp-OutputArea-output .widget-dropdown')"
                ".scrollIntoView({block: 'start'})")
            time.sleep(1)
            viewport = tuple(driver.execute_script("return [innerWidth, innerHeight]"))
            # the dropdowns and the address-space figure are inside the picture
            rects = driver.execute_script(
                "const o = [...document.querySelectorAll('.jp-OutputArea-output')]"
                "  .find(o => o.querySelector('.widget-dropdown'));"
                "return [o.querySelector('.widget-dropdown'),"
                "        o.querySelector('.widget-output img')]"
                "  .map(e => e.getBoundingClientRect().toJSON());")
            for r in rects:
                assert 0 <= r["top"] and r["bottom"] <= viewport[1] and r["right"] <= WIDTH, rects
            assert driver.save_screenshot(str(shot))

            # 7. the "address axis" tab: the moved process on one address axis
            # (plots.address_axis) and over both snapshots (the timeline)
            driver.find_element(By.XPATH, "//li[contains(@class,'lm-TabBar-tab')]"
                                          "[normalize-space()='address axis']").click()

            def axis_shown():
                im = driver.execute_script(_AXIS_TAB_JS)
                return im if im and len(im) == 2 and all(
                    i["ok"] and i["w"] > 0 and i["shown"] for i in im) else None
            im = wait("the address-axis tab's figures", axis_shown, WIDGET_TIMEOUT)
            import matplotlib
            matplotlib.use("Agg")
            from ksmlens.views import plots
            for i, fig in zip(im, (plots.address_axis(snap, moved_pid),
                                   plots.address_axis_timeline(snaps, moved_pid))):
                png = base64.b64decode(i["src"].split(",", 1)[1])
                buf = __import__("io").BytesIO()
                fig.savefig(buf, format="png", dpi=80)
                # the figure the browser shows is the one drawn from the snapshots here
                assert _png_size(png) == _png_size(buf.getvalue()) == (i["w"], i["h"])
            driver.execute_script(
                "document.querySelector('.jp-OutputArea-output .widget-tab')"
                ".scrollIntoView({block: 'start'})")
            time.sleep(1)
            assert driver.save_screenshot(str(axis_shot))
            t_total = time.monotonic() - t0
        finally:
            if driver is not None:
                try:
                    driver.quit()
                except Exception:
                    pass
            if chromedriver is not None:
                _kill(chromedriver)
            _kill_left_under(tmp_path / "chromium-profile")
    # server, kernel, chromedriver and chromium are all gone
    assert _procs_under(tmp_path) == []

    data = shot.read_bytes()
    assert _png_size(data) == viewport and viewport[0] == WIDTH    # the page, no window frame
    import matplotlib.image
    import numpy as np
    img = matplotlib.image.imread(shot)
    colors = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50 and img[..., :3].std() > 0.05, "the screenshot is blank"
    dest = ROOT / "out" / "screenshots"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, dest / shot.name)
    shutil.copy2(axis_shot, dest / axis_shot.name)
    print(f"widget rendered {t_render:.0f} s, all done {t_total:.0f} s after JupyterLab "
          f"came up; screenshot {dest / shot.name}")
