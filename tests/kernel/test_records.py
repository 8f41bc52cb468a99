"""The kernel variant records and the /sys/kernel/mm/ksm table, checked
against the patches, the README and mm/ksm.c (no guest)."""

import re
from pathlib import Path

import pytest

from ksmlens.errors import KsmlensError
from ksmlens.kernel import sysfs, variants
from ksmlens.kernel.constants import STORED_INDEX_MEMBERS

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ 1. variants

def test_every_variant_patch_exists_and_the_default_is_a_variant():
    assert variants.DEFAULT_VARIANT in variants.VARIANTS
    for v in variants.VARIANTS.values():
        for p in v.patches:
            assert (ROOT / "vm" / "patches" / p).is_file(), (v.name, p)


def test_stored_pgoff_follows_the_patch_text():
    """A variant stores the pgoff iff one of its patches adds the member to
    struct ksm_rmap_item; it is reset on removal iff a patch writes 0 to it."""
    for v in variants.VARIANTS.values():
        text = "".join((ROOT / "vm" / "patches" / p).read_text() for p in v.patches)
        added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
        members = "|".join(STORED_INDEX_MEMBERS)   # any of its posted names
        assert v.stored_pgoff == any(re.search(rf"\bpgoff_t ({members});", l)
                                     for l in added), v.name
        assert v.pgoff_reset_on_removal == any(re.search(rf"rmap_item->({members}) = 0;", l)
                                               for l in added), v.name
        assert (v.walk_rule == "stored") == v.stored_pgoff, v.name


def test_get_variant_and_release():
    assert variants.get_variant("v8").smartscan_reads_stable is False
    with pytest.raises(KsmlensError) as e:
        variants.get_variant("v9")
    assert "v9" in str(e.value) and all(n in str(e.value) for n in variants.VARIANTS)
    assert "\n" not in str(e.value)
    assert variants.variant_of_release("6.12.117-ksmlens-v8") == "v8"
    assert variants.variant_of_release("6.12.117-ksmlens-v9") is None
    assert variants.variant_of_release("6.12.117-ksmlens") is None


def test_the_old_names_are_the_records():
    import ksmlens.lab.kbuild as kbuild
    from ksmlens.analysis import core
    assert kbuild.VARIANTS is variants.VARIANTS
    assert kbuild.variant_of_release is variants.variant_of_release
    assert core.VARIANT_RULE == {n: v.walk_rule for n, v in variants.VARIANTS.items()}
    assert core.kernel_walk_rule("v3", False) == "v3"
    assert core.kernel_walk_rule(None, True) == "stored"
    assert core.kernel_walk_rule(None, False) is None


def test_the_readme_variants_table_is_the_records():
    """README's table: one row per variant, in order, with its walk rule
    and the record's notes."""
    searches = {"stock": "`[0, ULONG_MAX]`", "v3": "`[address >> PAGE_SHIFT]`",
                "stored": "`[rmap_item->"}   # then the member: pgoff (union), linear_page_index (v8)
    text = (ROOT / "README.md").read_text()
    head = text.index("| variant | `rmap_walk_ksm()` searches | notes |")
    rows = []
    for line in text[head:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert [r[0].split()[0].strip("`") for r in rows] == list(variants.VARIANTS)
    for (name, search, notes), v in zip(rows, variants.VARIANTS.values()):
        assert search.startswith(searches[v.walk_rule]), v.name
        if v.walk_rule == "stored":
            member = search[len(searches["stored"]):].split("]")[0]
            assert member in STORED_INDEX_MEMBERS, (v.name, member)
            assert any(f"pgoff_t {member};" in (ROOT / "vm" / "patches" / p).read_text()
                       for p in v.patches), (v.name, member)
        assert notes == v.notes, v.name
        assert ("(default)" in name) == (v.name == variants.DEFAULT_VARIANT)


# ------------------------------------------------------------------ 2. sysfs

def test_sysfs_table_matches_mm_ksm_c():
    """Each file's kind and variable as mm/ksm.c registers and prints it
    (the 6.12 source ksmlens builds from, where it is extracted)."""
    srcs = sorted(p for p in (Path.home() / ".cache/ksmlens/src").glob("6.12*/mm/ksm.c")
                  if ".pristine" not in str(p))
    if not srcs:
        pytest.skip("no extracted kernel source (ksmlens vm build extracts it)")
    c = srcs[0].read_text()
    ro = set(re.findall(r"^KSM_ATTR_RO\((\w+)\);", c, re.M))
    rw = set(re.findall(r"^KSM_ATTR\((\w+)\);", c, re.M))
    files = {f.name: f for f in sysfs.FILES if f.in_sysfs}
    assert set(files) == ro | rw
    for name, f in files.items():
        assert (f.kind == "knob") == (name in rw), name
        show = re.search(rf"{name}_show\(struct kobject.*?\n}}", c, re.S).group(0)
        if f.variable:
            assert f.variable in show, (name, f.variable)
        else:
            assert f.show, name


def test_sysfs_names_and_knob():
    assert "run" in sysfs.KNOBS and "pages_shared" in sysfs.COUNTERS
    assert "rmap_items" not in sysfs.COUNTERS           # not a file
    assert sysfs.WRITE_ORDER[0] == "advisor_mode" and sysfs.WRITE_ORDER[-1] == "run"
    assert set(sysfs.WRITE_ORDER) == set(sysfs.KNOBS)
    assert sysfs.knob("max_page_sharing").needs_unmerged
    for bad in ("pages_shared", "rnu"):
        with pytest.raises(KsmlensError):
            sysfs.knob(bad)


def test_sysfs_table_since_matches_6_1():
    """The files without ``since`` are exactly those 6.1's mm/ksm.c registers
    (each later file names the commit that added it)."""
    srcs = sorted(p for p in (Path.home() / ".cache/ksmlens/src").glob("6.1.*/mm/ksm.c")
                  if ".pristine" not in str(p))
    if not srcs:
        pytest.skip("no extracted 6.1 source (ksmlens vm build --kernel 6.1 extracts it)")
    c = srcs[0].read_text()
    have = set(re.findall(r"^KSM_ATTR(?:_RO)?\((\w+)\);", c, re.M))
    assert have == {f.name for f in sysfs.FILES if f.in_sysfs and not f.since}
    for f in sysfs.FILES:
        if f.since:
            assert re.match(r"[0-9a-f]{12} \(\".+\", 6\.\d+\)$", f.since), f.since
    assert sysfs.BY_NAME["smart_scan"].absent_as == 0
    assert sysfs.BY_NAME["advisor_mode"].absent_as == "none"
