"""The package's layers import downwards only (see ksmlens/__init__.py).

Read from the source (every ``import`` / ``from ... import``, at any
depth, lazy ones inside functions too), so the test fails on the commit
that breaks the direction, not when a cycle finally bites.
"""

import ast
import functools
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ksmlens"
# lowest first; a module may import its own layer and any layer before it
ORDER = ["errors", "kernel", "lens", "analysis", "lab", "experiments", "views", "cli",
         "__main__"]
# ...except these: the lab puts kernels into states and never reads the lens
FORBIDDEN = {"lab": {"lens", "analysis"}}


def _layer(modname: str) -> str | None:
    parts = modname.split(".")
    if parts[0] != "ksmlens" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path, modname: str):
    tree = ast.parse(path.read_text(), str(path))
    pkg = modname.rsplit(".", 1)[0] if path.name != "__init__.py" else modname
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            for a in node.names:       # from ksmlens import vm
                yield node.lineno, f"{target}.{a.name}"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        if "guest" in rel.parts:      # scripts run inside the guest, stdlib only
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def test_every_module_is_in_a_layer():
    stray = [m for _, m in _modules() if m.count(".") and _layer(m) not in ORDER]
    assert stray == [], f"modules outside the layers {ORDER}: {stray}"


@pytest.mark.parametrize("path,modname", list(_modules()), ids=lambda x: str(x))
def test_imports_point_down(path, modname):
    mine = _layer(modname)
    if mine is None:                  # ksmlens/__init__.py
        return
    bad = []
    for line, target in _imports(path, modname):
        theirs = _layer(target)
        if theirs is None or theirs not in ORDER:
            continue
        if ORDER.index(theirs) > ORDER.index(mine) or theirs in FORBIDDEN.get(mine, ()):
            bad.append(f"{path.name}:{line} imports {target}")
    assert bad == [], f"{modname} ({mine}) reaches up or across: {bad}"


def _all_of(path: Path) -> list[str]:
    """The module's ``__all__`` (a literal list), [] without one."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                 for t in node.targets):
            return [e.value for e in getattr(node.value, "elts", [])
                    if isinstance(e, ast.Constant)]
    return []


@functools.lru_cache(maxsize=1)
def _exported() -> dict[str, set[str]]:
    return {m: set(_all_of(p)) for p, m in _modules()}


def _private_uses(path: Path, modname: str):
    """(line, "module._name") for every private name of *another* ksmlens
    module this one uses: ``from ksmlens.x import _y``, or ``x._y`` where
    ``x`` is bound by an import of a ksmlens module (``import ksmlens.lab.kbuild
    as kbuild``, ``from ksmlens.lab import kbuild``). A private name is one
    with a single leading underscore (dunders are public protocol) that its
    module does not list in ``__all__`` (the kernel's own ``_PAGE_DIRTY`` is
    public in :mod:`ksmlens.kernel.pgtable`)."""
    tree = ast.parse(path.read_text(), str(path))
    mods = {m for _, m in _modules()}
    exported = _exported()

    def private(mod: str, name: str) -> bool:
        return (name.startswith("_") and not name.startswith("__")
                and name not in exported.get(mod, ()))
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods and a.asname:
                    alias[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in mods:
                    alias[a.asname or a.name] = full
                elif node.module in mods and node.module != modname \
                        and private(node.module, a.name):
                    yield node.lineno, full
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in alias and alias[node.value.id] != modname
                and private(alias[node.value.id], node.attr)):
            yield node.lineno, f"{alias[node.value.id]}.{node.attr}"


@pytest.mark.parametrize("path,modname", list(_modules()), ids=lambda x: str(x))
def test_no_module_uses_another_modules_private_names(path, modname):
    """A ``_private`` name is its module's own: its callers are not checked
    when it changes (``selftests`` called ``kbuild._need_tarball()`` after
    its signature changed, and only a cold cache reached that line). What
    another module needs is public, in its ``__all__``, with a docstring."""
    bad = [f"{path.name}:{line} uses {name}" for line, name in _private_uses(path, modname)]
    assert bad == [], f"{modname} uses private names of other modules: {bad}"


def test_the_private_name_checker_can_fail(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("from ksmlens.lab import kbuild\nfrom ksmlens.lab.kbuild import _dirname\n"
                 "def f():\n    return kbuild._need_tarball()\n")
    found = [n for _, n in _private_uses(p, "ksmlens.experiments.x")]
    assert found == ["ksmlens.lab.kbuild._dirname", "ksmlens.lab.kbuild._need_tarball"]


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rule itself can fail: a lens module importing the lab is caught."""
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from ksmlens.lab.vm import VM\n")
    targets = [t for _, t in _imports(p, "ksmlens.lens.x")]
    assert "ksmlens.lab.vm" in targets
    assert ORDER.index(_layer("ksmlens.lab.vm")) > ORDER.index("lens")
