"""The kernel sources the lab builds from (ksmlens.lab.kbuild.SOURCES) and the
config-fragment handling across them; nothing is built or booted."""

import re
from pathlib import Path

import pytest

import ksmlens.lab.kbuild as kbuild
from ksmlens.errors import KsmlensError
from ksmlens.kernel import variants
from ksmlens.lab.paths import vm_data


def test_sources_records():
    assert kbuild.DEFAULT_SOURCE == "6.12" and set(kbuild.SOURCES) >= {"6.12", "6.1"}
    for s in kbuild.SOURCES.values():
        assert s.package == f"linux-source-{s.name}"
        assert s.tarball == Path(f"/usr/src/linux-source-{s.name}.tar.xz")
        assert s.variants and set(s.variants) <= set(variants.VARIANTS)
        assert "stock" in s.variants
        if s.config:
            assert (vm_data() / "config" / s.config).is_file()
    assert kbuild.SOURCES["6.12"].variants == tuple(variants.VARIANTS)
    assert kbuild.SOURCES["6.1"].variants == ("stock", "v3")
    # setup.sh installs every source's package
    apt = (vm_data().parent / "setup.sh").read_text()
    for s in kbuild.SOURCES.values():
        assert re.search(rf"\b{re.escape(s.package)}\b", apt), s.package


def test_default_variant_and_unknowns():
    assert kbuild.default_variant() == variants.DEFAULT_VARIANT
    assert kbuild.default_variant("6.1") == "stock"
    with pytest.raises(KsmlensError, match="unknown kernel source '5.10'"):
        kbuild.get_source("5.10")
    with pytest.raises(KsmlensError, match="'union' does not exist for 6.1"):
        kbuild.find_kernel("union", "6.1")


def test_build_dirs_and_keys_are_per_source():
    """The default source's directories keep their old names (its warm cache
    stays warm); another source's carry its name, so a variant's superseded
    builds of one source never match the other's."""
    assert kbuild.get_source("6.12").prefix == ""
    assert kbuild.get_source("6.1").prefix == "6.1-"
    for name, s in kbuild.SOURCES.items():
        if not s.tarball.exists():
            continue
        v = variants.get_variant("stock")
        d = kbuild._kernel_dir(v, kbuild.artifact_key(v, s), s)
        assert d.name.startswith(f"{s.prefix}stock-")
    if all(s.tarball.exists() for s in kbuild.SOURCES.values()):
        v = variants.get_variant("stock")
        assert kbuild.artifact_key(v, "6.12") != kbuild.artifact_key(v, "6.1")


def test_patches_per_source():
    """A port under vm/patches/<patch_dir>/ replaces the patch for its source
    only; every patch named exists."""
    for s in kbuild.SOURCES.values():
        for name in s.variants:
            for p in kbuild.patch_files(name, s):
                assert (vm_data() / "patches" / p).is_file(), p
    assert kbuild.patch_files("v3", "6.12") == list(variants.get_variant("v3").patches)


def test_fragments_and_stamp_bytes():
    """6.12 hashes the shared fragment alone (its keys did not change when
    sources became several); 6.1 adds its own fragment, named in the hash."""
    assert kbuild.fragments("6.12") == [vm_data() / "config" / "ksmlens.config"]
    f61 = kbuild.fragments("6.1")
    assert f61[0].name == "ksmlens.config" and f61[1].name == "6.1.config"
    assert kbuild._fragments_bytes(kbuild.get_source("6.12")) == f61[0].read_bytes()
    b = kbuild._fragments_bytes(kbuild.get_source("6.1"))
    assert b"6.1.config\0" in b and f61[1].read_bytes() in b


def test_unset_lines_splits_missing_from_absent():
    config = "CONFIG_KSM=y\nCONFIG_ZRAM=y\n# CONFIG_SWAP is not set\n"
    frag = ["# a comment", "CONFIG_KSM=y", "CONFIG_ZRAM=y", "CONFIG_SWAP=y",
            "CONFIG_ZRAM_BACKEND_LZO=y", "CONFIG_VMCORE_INFO=y"]
    syms = {"KSM", "ZRAM", "SWAP"}
    assert kbuild.unset_lines(config, frag, syms) == (
        ["CONFIG_SWAP=y"], ["CONFIG_ZRAM_BACKEND_LZO=y", "CONFIG_VMCORE_INFO=y"])
    # without the symbol table every unset line is an error
    missing, absent = kbuild.unset_lines(config, frag, None)
    assert absent == [] and len(missing) == 3


def test_kconfig_symbols(tmp_path):
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "Kconfig").write_text(
        "config KSM\n\tbool \"x\"\nmenuconfig ZRAM\n  tristate\nchoice\n\tconfig IN_CHOICE\n"
        "\tbool\n\thelp\n\t  configures NOT_ONE\n")
    (tmp_path / "Kconfig.debug").write_text("config DEBUG_INFO\n")
    (tmp_path / "Makefile").write_text("config MAKEFILE_IS_NOT_KCONFIG\n")
    assert kbuild.kconfig_symbols(tmp_path) == {"KSM", "ZRAM", "IN_CHOICE", "DEBUG_INFO"}


@pytest.mark.parametrize("name", ["6.1", "6.12"])
def test_fragment_symbols_exist_or_are_known_absent(name):
    """Against an extracted source (a build extracts it): every fragment line
    names a Kconfig symbol of that source, except the ones kbuild documents as
    absent there."""
    src = kbuild.get_source(name)
    if not src.tarball.exists():
        pytest.skip(f"{src.package} not installed")
    try:
        tree = kbuild.cache_root() / "src" / kbuild._dirname(src)
    except KsmlensError:
        pytest.skip("no source version")
    if not (tree / "Makefile").exists():
        pytest.skip(f"{src.name} not extracted (ksmlens vm build --kernel {src.name})")
    syms = kbuild.kconfig_symbols(tree)
    lines = [l for f in kbuild.fragments(src) for l in f.read_text().splitlines()
             if l.startswith("CONFIG_")]
    absent = {l.split("=")[0][7:] for l in lines} - syms
    assert absent == ({"ZRAM_BACKEND_LZO", "VMCORE_INFO"} if name == "6.1" else set())
