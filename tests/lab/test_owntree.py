"""A reviewer's own tree and patches, without a build: versions, content
keys, patch files (format-patch, series, mbox from the list), patches that
do not apply, and the variant records every command reads.

The trees here are small fakes (a Makefile, mm/ksm.c); the real build and
boot of an unpacked 6.12 with a patch is ``test_owntree_vm.py``.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import ksmlens.lab.kbuild as kbuild
from ksmlens.errors import KsmlensError
from ksmlens.kernel import variants
from ksmlens.lab import owntree
from ksmlens.lab.owntree import (apply_patches, check_name, check_version, read_patches,
                                 tree_digest, tree_version)

KSM_C = "".join(f"line {i}\n" for i in range(1, 41))


def fake_tree(d: Path, version=(6, 12, 117)) -> Path:
    (d / "mm").mkdir(parents=True)
    (d / "Makefile").write_text(f"# SPDX\nVERSION = {version[0]}\nPATCHLEVEL = {version[1]}\n"
                                f"SUBLEVEL = {version[2]}\nEXTRAVERSION =\nNAME = Baby\n")
    (d / "mm" / "ksm.c").write_text(KSM_C)
    return d


def diff_of(tree: Path, rel: str, new: str) -> str:
    """A unified diff (a/ b/ prefixes) turning tree/rel into ``new``, by diff(1)."""
    a = tree / rel
    b = tree.parent / "new.tmp"
    b.write_text(new)
    r = subprocess.run(["diff", "-u", "--label", f"a/{rel}", "--label", f"b/{rel}",
                        str(a), str(b)], capture_output=True, text=True)
    b.unlink()
    assert r.returncode == 1
    return r.stdout


def mail(subject: str, body: str, n: int = 0) -> str:
    return (f"From 1234567890abcdef{n:024d} Mon Sep 17 00:00:00 2001\n"
            f"From: Reviewer <r@example.org>\nDate: Mon, 30 Nov 2026 22:00:0{n} +0000\n"
            f"Subject: {subject}\n\n{body}")


def test_version_read_and_refused(tmp_path):
    t = fake_tree(tmp_path / "a")
    assert tree_version(t) == (6, 12, 117)
    assert check_version(t, ["6.12", "6.1"]) == "6.12"
    old = fake_tree(tmp_path / "b", (5, 15, 3))
    with pytest.raises(KsmlensError, match=r"is Linux 5\.15\.3: .*written for 6\.12, 6\.1"):
        check_version(old, ["6.12", "6.1"])
    with pytest.raises(KsmlensError, match="not a kernel tree"):
        tree_version(tmp_path / "a" / "mm")
    # kbuild's sources are what the CLI passes: the versions the config supports
    assert "6.12" in kbuild.SOURCES


def test_content_digest_and_stat_cache(tmp_path):
    t = fake_tree(tmp_path / "t")
    cache = tmp_path / "stat.json"
    d1 = tree_digest(t, stat_cache=cache)
    assert d1["kind"] == "content" and d1["read"] == d1["files"] == 2
    d2 = tree_digest(t, stat_cache=cache)
    assert d2["id"] == d1["id"] and d2["read"] == 0          # nothing read again
    (t / "mm" / "ksm.c").write_text(KSM_C.replace("line 7", "line 7 changed"))
    d3 = tree_digest(t, stat_cache=cache)
    assert d3["id"] != d1["id"] and d3["read"] == 1
    (t / "mm" / "ksm.c").write_text(KSM_C)
    assert tree_digest(t)["id"] == d1["id"]                  # content, not mtimes
    (t / "mm" / "ksm.c").chmod(0o755)
    assert tree_digest(t)["id"] != d1["id"]                  # the mode counts


def test_git_tree_id_when_clean(tmp_path):
    t = fake_tree(tmp_path / "g")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(t), *cmd], check=True, env=env)
    d = tree_digest(t)
    tree_id = subprocess.run(["git", "-C", str(t), "rev-parse", "HEAD^{tree}"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert d == {**d, "kind": "git", "id": tree_id}
    (t / "untracked.c").write_text("x")
    assert tree_digest(t)["kind"] == "content"               # not clean: its files


def test_patches_format_patch_series_and_mbox(tmp_path):
    t = fake_tree(tmp_path / "t")
    d1 = diff_of(t, "mm/ksm.c", KSM_C.replace("line 5\n", "line 5 one\n"))
    step1 = KSM_C.replace("line 5\n", "line 5 one\n")
    (t / "mm" / "ksm.c").write_text(step1)
    d2 = diff_of(t, "mm/ksm.c", step1.replace("line 30\n", "line 30 two\n"))
    (t / "mm" / "ksm.c").write_text(KSM_C)
    p1 = tmp_path / "0001-one.patch"
    p2 = tmp_path / "0002-two.patch"
    p1.write_text(mail("[PATCH v2 1/2] mm/ksm: one", "why\n---\n" + d1 + "-- \n2.39.5\n", 1))
    p2.write_text(mail("[PATCH v2 2/2] mm/ksm: two", "why\n---\n" + d2 + "-- \n2.39.5\n", 2))
    series = read_patches([p1, p2])
    assert [(p.name, p.subject) for p in series] == [
        ("0001-one.patch", "[PATCH v2 1/2] mm/ksm: one"),
        ("0002-two.patch", "[PATCH v2 2/2] mm/ksm: two")]
    # an mbox from the list: cover letter, patch 2 before patch 1, a reply
    box = tmp_path / "thread.mbox"
    box.write_text(mail("[PATCH v2 0/2] mm/ksm: cover", "the series\n", 0) + "\n"
                   + p2.read_text() + "\n" + p1.read_text() + "\n"
                   + mail("Re: [PATCH v2 1/2] mm/ksm: one", "> quoted\nLooks good.\n", 3))
    got = read_patches([box])
    assert [p.subject for p in got] == [p.subject for p in series]
    assert [p.name for p in got] == ["thread.mbox#3", "thread.mbox#2"]
    work = tmp_path / "copy"
    shutil.copytree(t, work)
    apply_patches(work, got)
    assert (work / "mm/ksm.c").read_text() == \
        KSM_C.replace("line 5\n", "line 5 one\n").replace("line 30\n", "line 30 two\n")
    assert (t / "mm/ksm.c").read_text() == KSM_C              # the tree itself untouched
    # a plain diff, and the repository's own patch format (From: / Subject: lines)
    plain = tmp_path / "x.diff"
    plain.write_text(d1)
    assert read_patches([plain])[0].text == d1
    ours = read_patches([Path(kbuild.vm_data()) / "patches" / "v3-0001-rmap-walk-addr-pgoff.patch"])
    assert len(ours) == 1 and "rmap_walk_ksm" in ours[0].subject


def test_patch_that_does_not_apply_is_named(tmp_path):
    t = fake_tree(tmp_path / "t")
    bad = diff_of(t, "mm/ksm.c", KSM_C.replace("line 20\n", "line 20 x\n"))
    bad = bad.replace(" line 18\n", " line 18 not here\n")
    f = tmp_path / "0001-bad.patch"
    f.write_text(mail("[PATCH] mm/ksm: bad", "---\n" + bad))
    with pytest.raises(KsmlensError) as e:
        apply_patches(t, read_patches([f]), shown_as="/my/tree")
    msg = str(e.value)
    assert "patch 0001-bad.patch ([PATCH] mm/ksm: bad) does not apply to /my/tree" in msg
    assert "mm/ksm.c" in msg and "Hunk #1 FAILED" in msg and "\n" not in msg
    assert (t / "mm/ksm.c").read_text() == KSM_C
    with pytest.raises(KsmlensError, match="holds no diff"):
        (tmp_path / "empty.patch").write_text("nothing\n")
        read_patches([tmp_path / "empty.patch"])
    with pytest.raises(KsmlensError, match="missing.patch"):
        read_patches([tmp_path / "missing.patch"])


def test_names_and_records(tmp_path, monkeypatch):
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KsmlensError, match="built-in variant"):
        check_name("v3")
    with pytest.raises(KsmlensError, match="letters, digits"):
        check_name("my-tree")
    assert check_name("mine") == "mine"
    with pytest.raises(KsmlensError, match="unknown kernel variant 'mine'.*--source DIR"):
        variants.get_variant("mine")
    assert variants.variant_of_release("6.12.117-ksmlens-mine") is None
    owntree.write_record("mine", {"source_dir": "/src/linux", "series": "6.12", "key": "abc",
                                  "patches": [{"name": "0001-x.patch", "subject": "x",
                                               "sha": "0"}]})
    v = variants.get_variant("mine")
    assert v.source_dir == "/src/linux" and v.patches == ("0001-x.patch",)
    assert v.walk_rule is None and v.stored_pgoff is None
    assert variants.variant_of_release("6.12.117-ksmlens-mine") == "mine"
    # its walk rule is unknown unless the kernel has a stored index member
    assert variants.kernel_walk_rule("mine", False) is None
    assert variants.kernel_walk_rule("mine", True) == "stored"
    assert "mine" not in variants.VARIANTS
    # not built (no artifacts): find_kernel says None, build says how
    assert kbuild.find_kernel("mine") is None
    with pytest.raises(KsmlensError, match="vm build --source DIR --variant mine"):
        kbuild.build("mine")
    d = tmp_path / "cache" / "kernels" / "mine-abc"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"release": "6.12.117-ksmlens-mine"}))
    k = kbuild.find_kernel("mine")
    assert k.release == "6.12.117-ksmlens-mine" and k.bzimage == d / "bzImage"


def test_build_refusals_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path / "cache"))
    old = fake_tree(tmp_path / "old", (6, 6, 1))
    with pytest.raises(KsmlensError, match=r"Linux 6\.6\.1"):
        owntree.build_own(old, [], "mine")
    t = fake_tree(tmp_path / "t")
    (t / ".config").write_text("CONFIG_X=y\n")
    with pytest.raises(KsmlensError, match="built in place"):
        owntree.build_own(t, [], "mine")
    with pytest.raises(KsmlensError, match="built-in variant"):
        owntree.build_own(t, [], "union")
    assert not (tmp_path / "cache" / "kernels").exists()


def test_cli_build_source_arguments(tmp_path, monkeypatch, capsys):
    from ksmlens.cli import main
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path / "cache"))
    assert main(["vm", "build", "--patch", "x.patch"]) == 2
    assert "--patch needs --source DIR" in capsys.readouterr().err
    assert main(["vm", "build", "--source", str(tmp_path)]) == 2
    assert "--variant NAME" in capsys.readouterr().err
    old = fake_tree(tmp_path / "old", (5, 4, 0))
    assert main(["vm", "build", "--source", str(old), "--variant", "mine"]) == 2
    err = capsys.readouterr().err
    assert "Linux 5.4.0" in err and len(err.strip().splitlines()) == 1


def test_one_tree_for_both_architectures(tmp_path, monkeypatch):
    """One name is one tree and its patches: an arm64 build of the same tree
    adds its key beside x86-64's, a different tree replaces the record."""
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path / "cache"))
    rec = {"source_dir": "/src/linux", "series": "6.12", "version": "6.12.117",
           "digest": {"kind": "git", "id": "t"}, "patches": []}
    owntree.write_record("mine", dict(rec, key="aaa"))
    assert kbuild.own_build_key(kbuild.read_record("mine"), "arm64") is None
    owntree.write_record("mine", dict(rec, key="bbb"), "arm64")
    r = kbuild.read_record("mine")
    assert r["keys"] == {"x86_64": "aaa", "arm64": "bbb"} and r["key"] == "aaa"
    for arch, key, image in (("x86_64", "aaa", "bzImage"), ("arm64", "bbb", "Image")):
        prefix = "arm64-" if arch == "arm64" else ""
        d = tmp_path / "cache" / "kernels" / f"{prefix}mine-{key}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"release": "6.12.117-ksmlens-mine"}))
        k = kbuild.find_kernel("mine", arch=arch)
        assert (k.arch, k.key, k.bzimage) == (arch, key, d / image)
    # a record from before arm64 (one "key") is x86-64's
    legacy = dict(rec, name="old", key="aaa")
    (tmp_path / "cache" / "variants" / "old.json").write_text(json.dumps(legacy))
    assert kbuild.own_build_key(kbuild.read_record("old")) == "aaa"
    assert kbuild.own_build_key(kbuild.read_record("old"), "arm64") is None
    # the same content elsewhere is the same tree: both keys stay
    owntree.write_record("mine", dict(rec, source_dir="/tmp/unpacked", key="aaa"))
    assert kbuild.read_record("mine")["keys"] == {"x86_64": "aaa", "arm64": "bbb"}
    # another tree under the same name: the arm64 build is not this variant
    owntree.write_record("mine", dict(rec, digest={"kind": "git", "id": "u"}, key="ccc"))
    r = kbuild.read_record("mine")
    assert r["keys"] == {"x86_64": "ccc"}
    assert kbuild.find_kernel("mine", arch="arm64") is None
    with pytest.raises(KsmlensError, match=r"not built for arm64.*--variant mine --arch arm64"):
        kbuild.build("mine", arch="arm64")


def test_arm64_own_key_and_dirs_are_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path / "cache"))
    digest = {"kind": "git", "id": "t"}
    x = owntree.own_key(digest, "6.12", b"cfg", [])
    assert owntree.own_key(digest, "6.12", b"cfg", [], "x86_64") == x      # unchanged keys
    assert owntree.own_key(digest, "6.12", b"cfg", [], "arm64") != x
    assert owntree.own_dir("mine").name == "mine"
    assert owntree.own_dir("mine", "arm64").name == "arm64-mine"


def test_arm64_own_tree_without_cross_compiler_is_refused_before_any_copy(tmp_path, monkeypatch):
    from ksmlens.cli import main
    monkeypatch.setenv("KSMLENS_CACHE", str(tmp_path / "cache"))
    real = shutil.which
    monkeypatch.setattr(kbuild.shutil, "which",
                        lambda t: None if t == "aarch64-linux-gnu-gcc" else real(t))
    t = fake_tree(tmp_path / "t")
    with pytest.raises(KsmlensError, match=r"aarch64-linux-gnu-gcc not found.*"
                       r"apt-get install gcc-aarch64-linux-gnu"):
        owntree.build_own(t, [], "mine", arch="arm64")
    assert not (tmp_path / "cache" / "own" / "arm64-mine" / "src").exists()
    assert not (tmp_path / "cache" / "kernels").exists()


def test_a_finished_build_replaces_only_what_it_supersedes(tmp_path):
    k = tmp_path / "kernels"
    for d in ("mine-old1", "mine-new.tmp", "mine-x-old", "arm64-mine-a", "mine2-b"):
        (k / d).mkdir(parents=True)
    (k / "mine-new.tmp" / "meta.json").write_text("{}")
    kbuild.publish_build(k / "mine-new.tmp", k / "mine-new", "mine-")
    # mine-old1 is superseded; another variant, architecture or name stays
    assert sorted(p.name for p in k.iterdir()) == ["arm64-mine-a", "mine-new", "mine-x-old",
                                                  "mine2-b"]
    assert (k / "mine-new" / "meta.json").exists()
