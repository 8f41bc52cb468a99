"""Where ksmlens keeps things: the repository's vm/ data and the cache.

The cache (kernel sources, the shared build tree, built kernels, VM state)
lives outside the repository, under ``$KSMLENS_CACHE`` or
``${XDG_CACHE_HOME:-~/.cache}/ksmlens``, so that a fresh clone (CI) reuses it.
"""

import os
from pathlib import Path

__all__ = ["repo_root", "vm_data", "cache_root", "vms_root", "variants_root"]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def vm_data() -> Path:
    """The repository's ``vm/`` directory (config, patches, scenarios)."""
    return Path(os.environ.get("KSMLENS_VM_DATA", repo_root() / "vm"))


def cache_root() -> Path:
    env = os.environ.get("KSMLENS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "ksmlens"


def vms_root() -> Path:
    """Per-VM private directories (mode 0700): sockets, console log, state."""
    return cache_root() / "vms"


def variants_root() -> Path:
    """Records of the own-tree variants built here (``vm build --source``),
    ``NAME.json`` each; :mod:`ksmlens.kernel.variants` reads them."""
    return cache_root() / "variants"


def _register() -> None:
    from ksmlens.kernel.variants import use_custom_variants
    use_custom_variants(variants_root)


_register()
