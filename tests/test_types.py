"""The static type check CI runs (``mypy``, configured in pyproject.toml's
``[tool.mypy]``): clean on the package, and able to fail on the kind of fault
that reached a fresh machine (a call that no longer matches its definition).
"""

from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent


def test_package_type_checks_clean(monkeypatch):
    monkeypatch.chdir(ROOT)
    out, err, status = api.run([])          # files and options from pyproject.toml
    assert status == 0, out + err


def test_a_call_missing_an_argument_is_caught(tmp_path, monkeypatch):
    """What ``build_selftests()`` did with ``_need_tarball()`` after the
    latter gained its ``source`` argument."""
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.py"
    bad.write_text("from pathlib import Path\n\n"
                   "def tarball(source: str) -> Path:\n    return Path(source)\n\n"
                   "def build() -> Path:\n    return tarball()\n")
    out, err, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), str(bad)])
    assert status == 1 and "[call-arg]" in out, out + err
