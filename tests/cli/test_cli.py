"""Fast tests (no VM): the command line teaches and fails in one line."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ksmlens.lab.kbuild as kbuild
from ksmlens.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ksmlens", *args], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.mark.parametrize("args", [[], ["vm"], ["vm", "build"], ["vm", "up"], ["vm", "run"],
                                  ["vm", "status"], ["vm", "down"], ["scenario"],
                                  ["scenario", "run"], ["demo"], ["notebooks"], ["book"]])
def test_help_everywhere(args):
    r = run_cli(*args, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: ksmlens" in r.stdout


def test_help_names_variants_and_default():
    out = run_cli("vm", "up", "--help").stdout
    for v in kbuild.VARIANTS:
        assert v in out
    assert "default: union" in out


@pytest.mark.parametrize("args,needle", [
    (["vm", "build", "--variant", "v9"], "unknown kernel variant 'v9': choose one of stock, v3, union, v8"),
    (["vm", "up", "--variant", "nope"], "unknown kernel variant 'nope'"),
    (["vm", "status", "--name", "no-such-vm"], "no VM named 'no-such-vm' is up"),
    (["vm", "run", "--name", "no-such-vm", "--", "true"], "no VM named 'no-such-vm' is up"),
    (["scenario", "run", "bogus", "--name", "no-such-vm"], "unknown scenario 'bogus'"),
])
def test_bad_input_one_line(args, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ksmlens", *args], capture_output=True,
                       text=True, cwd=ROOT, env={"KSMLENS_CACHE": str(tmp_path / "c"),
                                                 "PATH": "/usr/bin:/bin",
                                                 "HOME": str(tmp_path)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert lines[0].startswith("ksmlens: ")


def test_missing_qemu_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    rc = main(["vm", "up", "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["ksmlens: error: qemu-system-x86_64 not found: run ./setup.sh, or apt-get "
                   "install qemu-system-x86"]


@pytest.mark.parametrize("kernel", ["6.12", "6.1"])
def test_missing_kernel_source_is_one_line(monkeypatch, capsys, kernel):
    import dataclasses
    src = kbuild.SOURCES[kernel]
    monkeypatch.setitem(kbuild.SOURCES, kernel, dataclasses.replace(
        src, tarball=Path(f"/nonexistent/{src.tarball.name}")))
    rc = main(["vm", "build", "--kernel", kernel, "--variant", "stock"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert f"{src.package} is not installed" in err and "apt-get install" in err
    assert len(err.splitlines()) == 1


def test_variant_missing_for_a_source_is_one_line(capsys):
    rc = main(["vm", "build", "--kernel", "6.1", "--variant", "union"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "'union' does not exist for 6.1" in err and "stock" in err


def test_scenario_list_names_steps():
    out = run_cli("scenario", "list").stdout
    for name in ("merge", "chain", "mremap", "smartscan", "fork", "file-cow"):
        assert re.search(rf"^{re.escape(name)}\s", out, re.M)
    assert "steps: merged, mremap, remerged" in out


def test_environment_yml_mirrors_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = set(py["dependencies"]) | set(py["optional-dependencies"]["test"])
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    indent = len(lines[start]) - len(lines[start].lstrip())
    pip = set()
    for l in lines[start + 1:]:
        if not l.strip() or l.lstrip().startswith("#"):
            continue
        if len(l) - len(l.lstrip()) <= indent:
            break
        pip.add(l.strip()[2:].strip())
    assert pip == want


def test_variant_of_release():
    assert kbuild.variant_of_release("6.12.117-ksmlens-v3") == "v3"
    assert kbuild.variant_of_release("6.12.117-ksmlens-union") == "union"
    assert kbuild.variant_of_release("6.18.0-1-amd64") is None


def test_patches_touch_only_ksm_c():
    for source in kbuild.SOURCES.values():
        assert kbuild._all_patched_files(source) == {"mm/ksm.c"}


# ------------------------------------------------------------------ the parser itself

def _leaves(parser, path=()):
    """(path, parser) of every runnable command, e.g. (("vm", "up"), <parser>)."""
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, p in subs[0].choices.items():
        yield from _leaves(p, path + (name,))


def _commands():
    from ksmlens.cli import build_parser
    return dict(_leaves(build_parser()))


@pytest.mark.parametrize("path", sorted(_commands()), ids=" ".join)
def test_every_command_help_names_its_flags(path):
    """`ksmlens CMD --help` exits 0, says what CMD does, and lists every
    flag with a help text of its own."""
    parser = _commands()[path]
    r = run_cli(*path, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: ksmlens {' '.join(path)}")
    assert parser.description and len(parser.description.split()) >= 4, path
    for action in parser._actions:
        if action.dest == "help":
            continue
        what = action.option_strings or action.dest
        assert action.help, f"ksmlens {' '.join(path)}: {what} has no help"
        for flag in action.option_strings:
            assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", r.stdout), (flag, r.stdout)


def _readme_commands():
    """Every command the README's command tables list: rows whose first cell
    starts with `ksmlens ...`; `ksmlens scenario list` / `run NAME` is two."""
    found = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("| `ksmlens "):
            continue
        cell = line.split(" | ")[0]
        group = ()
        for k, code in enumerate(re.findall(r"`([^`]*)`", cell)):
            words = code.split()
            if k == 0:
                words = words[1:]          # "ksmlens"
            else:
                words = list(group) + words
            path = []
            for w in words:
                if not re.fullmatch(r"[a-z][a-z0-9-]*", w):
                    break
                path.append(w)
            found.add(tuple(path))
            group = tuple(path[:-1])
    return found


def test_readme_tables_list_exactly_the_commands():
    readme = _readme_commands()
    assert ("scenario", "run") in readme and ("vm", "up") in readme    # the parse works
    assert readme == set(_commands())


def test_errors_print_one_line_with_the_hint(capsys):
    """A KsmlensError from a handler: `ksmlens: error: CAUSE: HINT`, exit 2."""
    rc = main(["vm", "run", "--name", "x"])        # no command: refused before any VM
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        "ksmlens: error: no command given: usage: ksmlens vm run [--detach] -- CMD..."]
