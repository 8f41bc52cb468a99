"""The package's layers import downwards only (see ksmlens/__init__.py).

Read from the source (every ``import`` / ``from ... import``, at any
depth, lazy ones inside functions too), so the test fails on the commit
that breaks the direction, not when a cycle finally bites.
"""

import ast
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


def test_the_checker_catches_an_upward_import(tmp_path):
    """The rule itself can fail: a lens module importing the lab is caught."""
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from ksmlens.lab.vm import VM\n")
    targets = [t for _, t in _imports(p, "ksmlens.lens.x")]
    assert "ksmlens.lab.vm" in targets
    assert ORDER.index(_layer("ksmlens.lab.vm")) > ORDER.index("lens")
