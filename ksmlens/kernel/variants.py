"""The lab's kernel variants: one record each, read by the lab (which
builds them), the lens (which names the variant of a release) and the
analysis (which replays their ``rmap_walk_ksm()`` and SmartScan).

A built-in variant is a Debian kernel source (6.12, the default, or the 6.1
LTS where its patches apply: :data:`ksmlens.lab.kbuild.SOURCES`) with the
patch series ``vm/patches/<patches...>`` applied in order; a reviewer's own
tree (``ksmlens vm build --source``) gets a record too, kept in the cache
(walk rule unknown: ``verify`` finds it by experiment). A build names itself in
``uname -r`` as ``<version>-ksmlens-<name>`` (``CONFIG_LOCALVERSION`` is
``-ksmlens``, ``make LOCALVERSION=-<name>`` adds the rest).

What a record says is behaviour, not structure: the walk rule and whether
SmartScan reads a STABLE item are known for these kernels only; for another
kernel the lens can tell ``stored`` from the DWARF of ``struct
ksm_rmap_item`` (a stored index member under any of
:data:`ksmlens.kernel.constants.STORED_INDEX_MEMBERS`) and nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ksmlens.errors import KsmlensError

__all__ = ["Variant", "VARIANTS", "DEFAULT_VARIANT", "RELEASE_TAG", "WalkRule",
           "get_variant", "variant_of_release", "kernel_walk_rule", "custom_variants",
           "use_custom_variants", "VARIANT_NAME"]

# What rmap_walk_ksm() hands anon_vma_interval_tree_foreach() as [start, last]:
#   stock   [0, ULONG_MAX], then the address filter (unmodified 6.12)
#   v3      [address >> PAGE_SHIFT, same]  (the series v1-v3)
#   stored  [stored index, same]           (union: ->pgoff; v8: ->linear_page_index)
WalkRule = Literal["stock", "v3", "stored"]

RELEASE_TAG = "-ksmlens"  # CONFIG_LOCALVERSION of vm/config/ksmlens.config
VARIANT_NAME = r"[A-Za-z0-9_]+"   # what a variant's name may be: the end of `uname -r`


@dataclasses.dataclass(frozen=True)
class Variant:
    """One lab kernel.

    ``name``: str, also the ``uname -r`` suffix and the build directory's prefix.
    ``description``: str, one line (``ksmlens vm build --help``).
    ``patches``: file names under ``vm/patches/``, applied in order with ``patch -p1``.
    ``walk_rule``: the pgoff range ``rmap_walk_ksm()`` searches (see :data:`WalkRule`).
    ``stored_pgoff``: ``struct ksm_rmap_item`` stores the page index (``pgoff``
    on union, ``linear_page_index`` on v8) in the union with ``{oldchecksum, age,
    remaining_skips}``.
    ``smartscan_reads_stable``: ``should_skip_rmap_item()`` reads ``age`` /
    ``remaining_skips`` of a STABLE item (whose page is no longer KSM); False
    where the patch returns before (v8).
    ``pgoff_reset_on_removal``: ``remove_rmap_item_from_tree()`` zeroes the
    stored pgoff (and so the SmartScan bytes sharing it).
    ``notes``: str, the README table's notes column.
    ``source_dir``: for a reviewer's own tree (``ksmlens vm build --source DIR``),
    the DIR it was built from, else None. Such a variant's behaviour is not
    known: ``walk_rule``, ``stored_pgoff`` and ``smartscan_reads_stable`` are
    None (the lens reads a stored index from the DWARF; ``verify`` finds the
    walk rule by experiment).
    """

    name: str
    description: str
    patches: tuple[str, ...]
    walk_rule: WalkRule | None
    stored_pgoff: bool | None
    smartscan_reads_stable: bool | None
    pgoff_reset_on_removal: bool | None = False
    notes: str = ""
    source_dir: str | None = None


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("stock", "unmodified 6.12: rmap_walk_ksm() searches [0, ULONG_MAX]", (),
            walk_rule="stock", stored_pgoff=False, smartscan_reads_stable=True,
            notes="unmodified 6.12"),
    Variant("v3", "series v1-v3: rmap_walk_ksm() searches only address >> PAGE_SHIFT",
            ("v3-0001-rmap-walk-addr-pgoff.patch",),
            walk_rule="v3", stored_pgoff=False, smartscan_reads_stable=True,
            notes="the series v1–v3: misses VMAs moved by mremap"),
    Variant("union", "seed-mail proposal: stored pgoff in a union with "
            "{oldchecksum, age, remaining_skips}",
            ("union-0001-stored-pgoff-union.patch",),
            walk_rule="stored", stored_pgoff=True, smartscan_reads_stable=True,
            notes="the seed mail's proposal: `pgoff` in a union with "
                  "`{oldchecksum, age, remaining_skips}`"),
    Variant("v8", "the series as posted in v8 (2026-06-09) plus the two collect_procs_ksm() "
            "follow-ups: linear_page_index in the union, reset on removal, SmartScan "
            "ignores stable items",
            ("v8-0001-ksm-add-linear_page_index-into-ksm_rmap_item.patch",
             "v8-0002-ksm-optimize-rmap_walk_ksm-by-passing-a-suitable-page-index.patch",
             "v8-0003-mm-ksm-initialize-the-addr-only-once-in-collect_procs_ksm.patch",
             "v8-0004-ksm-use-precise-linear_page_index-in-collect_procs_ksm.patch"),
            walk_rule="stored", stored_pgoff=True, smartscan_reads_stable=False,
            pgoff_reset_on_removal=True,
            notes="v8 of the series (2026-06-09) and the two memory-failure follow-ups, "
                  "as merged: `linear_page_index` in the union, reset on removal and in "
                  "`break_cow()`, SmartScan leaves stable items alone, "
                  "`collect_procs_ksm()` searches `[linear_page_index]` too"),
]}
DEFAULT_VARIANT = "union"


# Where the records of built own-tree variants live: the lab registers its
# cache's directory (ksmlens.lab.paths); the kernel layer only reads it.
_custom_dirs: list[Callable[[], Path]] = []


def use_custom_variants(directory: Callable[[], Path]) -> None:
    """Read own-tree variants' records (``NAME.json``, written by
    ``ksmlens vm build --source``) from ``directory()`` too."""
    if directory not in _custom_dirs:
        _custom_dirs.append(directory)


def custom_variants() -> dict[str, Variant]:
    """The own-tree variants built so far (``ksmlens vm build --source DIR
    --variant NAME``), by name, read from their records each call (another
    process may have built one); unreadable records are skipped."""
    out: dict[str, Variant] = {}
    for d in _custom_dirs:
        try:
            files = sorted(d().glob("*.json"))
        except OSError:
            continue
        for f in files:
            try:
                r = json.loads(f.read_text())
                name = r["name"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if name in VARIANTS or not re.fullmatch(VARIANT_NAME, name):
                continue
            out[name] = Variant(
                name, f"own tree {r.get('source_dir')}"
                + (f" + {len(r.get('patches', []))} patch(es)" if r.get("patches") else ""),
                tuple(p["name"] for p in r.get("patches", [])), walk_rule=None,
                stored_pgoff=None, smartscan_reads_stable=None, pgoff_reset_on_removal=None,
                notes="a reviewer's own tree: walk rule found by `verify`",
                source_dir=r.get("source_dir"))
    return out


def get_variant(name: str) -> Variant:
    """The record of variant ``name`` (built-in, or an own tree built with
    ``vm build --source``); :class:`KsmlensError` naming the known ones."""
    if name in VARIANTS:
        return VARIANTS[name]
    custom = custom_variants()
    try:
        return custom[name]
    except KeyError:
        raise KsmlensError(f"unknown kernel variant {name!r}",
                           f"choose one of {', '.join([*VARIANTS, *custom])}, or build your "
                           f"own tree: `ksmlens vm build --source DIR --variant {name}`") \
            from None


def variant_of_release(release: str) -> str | None:
    """``6.12.117-ksmlens-v3`` -> ``v3`` (an own tree's name too); None for a
    kernel not built here."""
    m = re.search(re.escape(RELEASE_TAG) + r"-(" + VARIANT_NAME + r")$", release)
    if not m:
        return None
    name = m.group(1)
    return name if name in VARIANTS or name in custom_variants() else None


def kernel_walk_rule(variant: str | None, has_stored_pgoff: bool) -> str | None:
    """The rule a kernel's ``rmap_walk_ksm()`` uses: from the lab variant, or
    for another kernel from ``struct ksm_rmap_item`` (a stored index means
    ``stored``; without one it is ``stock`` or a v3-like patch, which the
    structures cannot tell apart: None)."""
    if variant in VARIANTS:
        return VARIANTS[variant].walk_rule
    return "stored" if has_stored_pgoff else None
