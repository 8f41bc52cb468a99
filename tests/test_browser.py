"""JupyterLab really serves the notebooks and a real browser renders one.

JupyterLab is started on 127.0.0.1 (a free port, a random token, its own
config/runtime/settings dirs), Debian's headless chromium opens
``01-tour.ipynb`` in it and saves a screenshot (under pytest's tmp dir, copied
to ``out/screenshots/``). Checked: the server's REST API answers, the
browser's JupyterLab opened the notebook (the server then holds a session
for it: only the page's JavaScript creates one), and the PNG is a real,
non-blank picture of the window size. Server and browser are killed at the end.
"""

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

ROOT = Path(__file__).resolve().parent.parent
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


@pytest.fixture
def jupyterlab(tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    d = tmp_path / "jupyter"
    settings = d / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "get notified about Jupyter news?" toast over the screenshot.
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(d / "config"),
               JUPYTER_RUNTIME_DIR=str(d / "runtime"))
    log = open(tmp_path / "jupyterlab.log", "w")
    p = subprocess.Popen(
        [JUPYTER, "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT / 'notebooks'}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
         f"--LabApp.workspaces_dir={d / 'workspaces'}",
         f"--LabApp.user_settings_dir={d / 'settings'}",
         f"--FileCheckpoints.checkpoint_dir={d / 'checkpoints'}"],   # not in the checkout
        cwd=ROOT / "notebooks", env=env, stdout=log, stderr=subprocess.STDOUT,
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
                pytest.fail("JupyterLab did not come up:\n"
                            + (tmp_path / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base, token
    finally:
        _kill(p)
        log.close()


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
