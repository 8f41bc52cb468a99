"""A reviewer's own tree, for real: Debian's 6.12 unpacked into a temporary
directory outside the cache, plus a patch file outside ``vm/patches/``
(the v3 change, copied; then the same patch inside an mbox from the list),
built with ``vm build --source``, booted, and ``verify`` must find by
experiment that it unmaps like rule v3 (ksmlens does not know its rule:
it is no built-in variant and has no stored index member).

Cost: the first run compiles the tree (about 12 minutes on 2 cores, 20 on a
shared machine); the variant name and the content key are fixed, so the next
run with a warm cache finds it: the unpack and the content hash remain. In
the full suite only (marker ``full``): a cold CI with it took 90.4 minutes.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

import ksmlens.lab.kbuild as kbuild
from ksmlens.errors import KsmlensError
from ksmlens.experiments.verify import verify
from ksmlens.kernel.variants import get_variant, variant_of_release
from ksmlens.lab.owntree import build_own, tree_digest
from ksmlens.lab.paths import cache_root, vm_data
from ksmlens.lab.scenarios import ScenarioRun
from ksmlens.lab.vm import VM
from ksmlens.views.tables import verify_text

# a kernel of its own, compiled from nothing cold (12 to 20 minutes on 2
# cores): in the full suite, not the default run (CI): `pytest -m full`
pytestmark = [pytest.mark.vm, pytest.mark.full]

NAME = "owntest"       # fixed: a second run hits the content-keyed cache
V3 = "v3-0001-rmap-walk-addr-pgoff.patch"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    tarball = kbuild.get_source("6.12").tarball
    if not tarball.exists():
        pytest.fail(f"{tarball} is missing: apt-get install linux-source-6.12")
    work = tmp_path_factory.mktemp("owntree")
    assert cache_root().resolve() not in work.resolve().parents
    t0 = time.monotonic()
    subprocess.run(["tar", "xJf", str(tarball), "-C", str(work)], check=True)
    (top,) = [p for p in work.iterdir() if p.is_dir()]
    print(f"unpacked in {time.monotonic() - t0:.1f} s")
    # the patch, outside vm/patches: as a file, and inside an mbox saved
    # from the list (cover letter first, then the patch, then a reply)
    patch = work / "0001-my-change.patch"
    shutil.copy(vm_data() / "patches" / V3, patch)
    body = patch.read_text()
    mbox = work / "thread.mbox"
    mbox.write_text(
        "From a@b Mon Nov 30 21:00:00 2026\nFrom: R <r@example.org>\n"
        "Subject: [PATCH 0/1] ksm: search one pgoff\n\nThe cover letter.\n\n"
        "From a@b Mon Nov 30 21:00:01 2026\n" + body.replace(
            "Subject: [PATCH v3-like]", "Subject: [PATCH 1/1]") + "\n"
        "From a@b Mon Nov 30 21:30:00 2026\nFrom: S <s@example.org>\n"
        "Subject: Re: [PATCH 1/1] ksm: search one pgoff\n\n> quoted\nNo.\n")
    yield top, patch, mbox
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def built(tree):
    top, patch, mbox = tree
    before = tree_digest(top)
    t = {}
    k = build_own(top, [patch], NAME, timings=t)
    print(f"own tree build: {t}")
    # DIR itself is never written
    after = tree_digest(top)
    assert after["id"] == before["id"]
    assert "pgoff_start = rmap_item->address" not in (top / "mm/ksm.c").read_text()
    return k, t


def test_own_tree_builds_and_is_found_by_content(tree, built):
    top, patch, mbox = tree
    k, t = built
    version = ".".join(map(str, __import__("ksmlens.lab.owntree", fromlist=["x"])
                           .tree_version(top)))
    assert k.release == f"{version}-ksmlens-{NAME}"
    assert variant_of_release(k.release) == NAME
    v = get_variant(NAME)
    assert v.source_dir == str(top.resolve()) and v.walk_rule is None
    assert kbuild.find_kernel(NAME) == k
    # the same patch inside an mbox from the list: the same key, found
    t2 = {}
    k2 = build_own(top, [mbox], NAME, timings=t2)
    print(f"warm (mbox): {t2}")
    assert t2["cache_hit"] and k2 == k
    # the CLI says so too
    r = subprocess.run([sys.executable, "-m", "ksmlens", "vm", "build", "--source", str(top),
                        "--patch", str(patch), "--variant", NAME],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "found in the cache" in r.stderr and k.release in r.stdout


def test_patch_that_does_not_apply_is_refused(tree, built):
    top, patch, _ = tree
    # the union patch rewrites the same lines of rmap_walk_ksm() as the v3
    # change under it: its hunks there fail (exact context), before any make
    with pytest.raises(KsmlensError) as e:
        build_own(top, [patch, vm_data() / "patches" / "union-0001-stored-pgoff-union.patch"],
                  NAME)
    msg = str(e.value)
    assert msg.startswith("patch union-0001-stored-pgoff-union.patch (") and "\n" not in msg
    assert "mm/ksm.c: Hunk #" in msg and "FAILED" in msg, msg
    assert kbuild.find_kernel(NAME) == built[0]            # the good build stays


def test_own_tree_boots_and_verify_names_rule_v3(built):
    k, _ = built
    name = f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-own-{os.getpid()}"
    vm = VM.up(name, NAME, numa=2)
    try:
        assert vm.sh("uname -r").strip() == k.release
        with ScenarioRun(vm, "mremap") as run:
            for st in run.scenario.steps:
                run.step(st.name)
            res = verify(vm)
        print(verify_text(res))
        assert res.variant == NAME and res.rule is None      # not known beforehand
        assert not res.snapshot.kernel.has_stored_pgoff
        assert res.candidates == ["stock", "v3"]
        # found by experiment: what the kernel did, per KSM page
        assert {r["observed"] for r in res.rows} == {"stayed"}
        assert res.matches == ["v3"] and res.agree
        assert "this kernel unmaps like rule v3 (" in verify_text(res)
        # other commands on it: status, check
        r = subprocess.run([sys.executable, "-m", "ksmlens", "vm", "status", "--name", name,
                            "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f'"variant": "{NAME}"' in r.stdout
        r = subprocess.run([sys.executable, "-m", "ksmlens", "check", "--name", name],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        vm.down()


@pytest.mark.arm64
def test_the_same_tree_cross_built_for_arm64_boots_and_verify_names_rule_v3(tree):
    """The reviewer's tree and patch, ``vm build --source DIR --patch FILE
    --arch arm64``: cross-built (a kernel of its own: in the full suite,
    not CI), its key beside x86-64's in one record, booted on qemu-system-aarch64,
    and found by experiment to unmap like v3, as on x86-64."""
    from conftest import checked
    top, patch, _ = tree
    r = subprocess.run([sys.executable, "-m", "ksmlens", "vm", "build", "--source", str(top),
                        "--patch", str(patch), "--variant", NAME, "--arch", "arm64"],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    k = kbuild.find_kernel(NAME, arch="arm64")
    assert k is not None and k.arch == "arm64" and k.bzimage.name == "Image"
    assert "built for arm64" in r.stderr or "found in the cache for arm64" in r.stderr
    assert f"--variant {NAME} --arch arm64" in r.stderr and k.release in r.stdout
    print(r.stderr.strip().splitlines()[-1])
    assert variant_of_release(k.release) == NAME
    name = f"{os.environ.get('KSMLENS_TEST_VM_PREFIX', 'test')}-own-arm64-{os.getpid()}"
    vm = VM.up(name, NAME, numa=2, arch="arm64")
    try:
        assert vm.sh("uname -m; uname -r").split() == ["aarch64", k.release]
        with ScenarioRun(vm, "mremap") as run:
            for st in run.scenario.steps:
                run.step(st.name)
            rows, snap = checked(vm)
            assert snap.kernel.arch == "arm64" and snap.kernel.variant == NAME
            res = verify(vm)
        print(verify_text(res))
        assert res.rule is None and res.candidates == ["stock", "v3"]
        assert {r["observed"] for r in res.rows} == {"stayed"}
        assert res.matches == ["v3"] and res.agree
    finally:
        vm.down()
