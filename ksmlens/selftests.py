"""``ksmlens selftests``: the kernel's own KSM selftests as a peer suite.

The kernel ships its own KSM tests in ``tools/testing/selftests/mm``:
``ksm_functional_tests.c`` (David Hildenbrand: unmerge, zero pages, uffd-wp,
PROT_NONE, ``PR_SET_MEMORY_MERGE``) and ``ksm_tests.c`` (one mode per run:
``-M`` merge, ``-Z`` zero pages, ``-N`` NUMA, ``-U`` unmerge, ``-P``/``-H``
merge time, ``-C`` COW time, ``-t 1`` prctl merging). ksmlens builds both from
Debian's ``linux-source-6.12`` (never vendored: the tarball in /usr/src is
the source), runs them in a lab guest, and while they run pauses the guest at
random moments and checks its walk against the kernel each time.

A paused check compares what can be compared while the guest is stopped (the
kernel cannot print sysfs then): the walk's own counts
(:func:`ksmlens.check.walk_counts`: stable nodes holding a page, stable and
unstable rmap_items, chains, dups) against the globals ``mm/ksm.c``'s
``*_show()`` functions print (``ksm_pages_shared``, ..., read by drgn in the
same pause); every mm slot's rmap_items and stable items against
``mm->ksm_rmap_items`` / ``mm->ksm_merging_pages`` (what
``proc_pid_ksm_stat()`` prints); every stable node's ``rmap_hlist_len``
against the items on its list. A walk that finds the kernel mid-update
(``take_snapshot`` reports "inconsistent KSM state while the guest was
paused": ksmd unlinks an rmap_item from its mm's list before it takes it off
its stable node, ``remove_node_from_stable_tree()`` clears STABLE_FLAG item by
item) is counted as "mid-update (classified)", never as agreement.

    res = run_selftests(vm)            # both suites, every ksm_tests mode
    print(res.summary()); assert res.ok

Binaries are cached per source version under ``<cache>/selftests/``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import kbuild
from .errors import KsmlensError
from .paths import cache_root, vm_data

__all__ = ["SUITES", "KSM_TESTS_MODES", "build_selftests", "PausedCheck", "SuiteResult",
           "SelftestsResult", "paused_check", "run_selftests", "mremap_selftest_binary",
           "MremapResult", "run_mremap_selftest", "MID_UPDATE"]

SUITES = ("ksm_functional_tests", "ksm_tests")
BUILD_FORMAT = 1          # bump when the build recipe changes what it produces

# ksm_tests runs one test per invocation (ksm_tests.c main()). Sizes chosen
# for a 2 GB guest under TCG: -P/-H merge 32 MiB twice over (ksm_tests sets
# pages_to_scan to -p, default 10, and sleep_millisecs 0).
KSM_TESTS_MODES: dict[str, tuple[str, ...]] = {
    "-M": ("-M", "-p", "10"),                  # check_ksm_merge, madvise
    "-Z -z 1": ("-Z", "-p", "10", "-z", "1"),  # check_ksm_zero_page_merge, use_zero_pages=1
    "-N -m 0": ("-N", "-m", "0"),              # check_ksm_numa_merge, merge_across_nodes=0
    "-N -m 1": ("-N", "-m", "1"),              # ... merge_across_nodes=1
    "-U": ("-U",),                             # check_ksm_unmerge
    "-P": ("-P", "-s", "32"),                  # ksm_merge_time
    "-H": ("-H", "-s", "32"),                  # ksm_merge_hugepages_time (THP)
    "-C": ("-C",),                             # ksm_cow_time
    "-t 1": ("-M", "-p", "10", "-t", "1"),     # check_ksm_merge, PR_SET_MEMORY_MERGE
}
KSFT_PASS, KSFT_FAIL, KSFT_SKIP = 0, 1, 4      # tools/testing/selftests/kselftest.h

# The text take_snapshot() raises when a paused walk catches ksmd mid-update.
MID_UPDATE = "inconsistent KSM state while the guest was paused"

# Paths of the source tarball a selftests build needs (headers_install, the
# selftests' own headers, include/vdso for ksm_tests.c).
_MEMBERS = ("Makefile", "Kbuild", "Kconfig", "scripts", "include", "arch/x86", "usr",
            "tools/include", "tools/arch/x86", "tools/scripts", "tools/build",
            "tools/testing/selftests/kselftest.h", "tools/testing/selftests/kselftest",
            "tools/testing/selftests/kselftest_harness.h",
            "tools/testing/selftests/lib.mk", "tools/testing/selftests/mm",
            "tools/testing/selftests/x86/check_cc.sh", "mm/gup_test.h")


# ------------------------------------------------------------------ building

class _Lock:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "w")

    def __enter__(self):
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"ksmlens: waiting for another selftests build ({self.f.name})",
                  file=sys.stderr)
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _selftests_dir() -> Path:
    ver = re.sub(r"[^A-Za-z0-9._-]", "_", kbuild.source_version())
    return cache_root() / "selftests" / f"{ver}-f{BUILD_FORMAT}"


def _run_logged(cmd, cwd, logf, what: str) -> None:
    logf.write(f"$ {' '.join(map(str, cmd))}  (in {cwd})\n")
    logf.flush()
    r = subprocess.run(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT)
    if r.returncode:
        logf.flush()
        tail = Path(logf.name).read_text(errors="replace").strip().splitlines()
        err = next((l for l in reversed(tail) if re.search(r"error|Error|cannot|No such", l)),
                   tail[-1] if tail else "")
        raise KsmlensError(f"building the kernel's KSM selftests failed ({what}): "
                           f"{err.strip()[:200]}", f"full log: {logf.name}")


def build_selftests(*, force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Build ``ksm_functional_tests`` and ``ksm_tests`` (statically linked, so
    the guest needs nothing from the host's libraries) from the
    ``linux-source-6.12`` tarball; return {name: path}. Cached by source
    version: ``<cache>/selftests/<version>-f<format>/bin/``.

    The needed part of the tarball is unpacked into a private tree there
    (the kernel builds' shared tree is never touched), ``make
    headers_install`` installs the uAPI headers into it, and the selftests'
    own Makefile (``tools/testing/selftests/mm``) builds the two targets with
    ``KHDR_INCLUDES`` pointing at them, ``-static`` added, ``-lnuma`` from
    Debian's ``libnuma-dev`` (``libnuma.a``).
    """
    top = _selftests_dir()
    bindir = top / "bin"
    want = {n: bindir / n for n in SUITES}
    if not force and (top / "meta.json").exists() and all(p.exists() for p in want.values()):
        return want

    def log(msg):
        if not quiet:
            print(f"ksmlens: {msg}", file=sys.stderr, flush=True)

    for tool, pkg in (("make", "make"), ("gcc", "gcc"), ("tar", "tar"), ("xz", "xz-utils")):
        if not shutil.which(tool):
            raise KsmlensError(f"{tool} not found (needed to build the KSM selftests)",
                               f"apt-get install {pkg} (./setup.sh does it)")
    if not Path("/usr/include/numa.h").exists():
        raise KsmlensError("numa.h not found: ksm_tests needs libnuma-dev",
                           "apt-get install libnuma-dev (./setup.sh does it)")
    tarball = kbuild._need_tarball()
    with _Lock(cache_root() / "selftests" / "build.lock"):
        if not force and (top / "meta.json").exists() and all(p.exists() for p in want.values()):
            return want
        t0 = time.monotonic()
        shutil.rmtree(top, ignore_errors=True)
        top.mkdir(parents=True)
        src, hdr, tmp_bin = top / "src", top / "headers", top / "bin.tmp"
        with open(top / "build.log", "w", buffering=1) as logf:
            first = subprocess.run(f"tar tJf {tarball} | head -1", shell=True,
                                   capture_output=True, text=True).stdout.strip()
            prefix = first.split("/", 1)[0]
            if not prefix:
                raise KsmlensError(f"cannot list {tarball}", "is linux-source-6.12 intact?")
            log(f"unpacking the selftests' part of {tarball.name} into {src}")
            src.mkdir()
            _run_logged(["tar", "xJf", str(tarball), "--strip-components=1", "-C", str(src),
                         *[f"{prefix}/{m}" for m in _MEMBERS]], top, logf, "tar")
            log("make headers_install (private copy)")
            _run_logged(["make", "ARCH=x86_64", f"-j{os.cpu_count() or 1}",
                         f"INSTALL_HDR_PATH={hdr}", "headers_install"], src, logf,
                        "headers_install")
            log("building ksm_functional_tests and ksm_tests (static)")
            tmp_bin.mkdir()
            mm = src / "tools/testing/selftests/mm"
            _run_logged(["make", "-C", str(mm), f"OUTPUT={tmp_bin}",
                         f"KHDR_INCLUDES=-isystem {hdr / 'include'}", "LDFLAGS=-static",
                         *[str(tmp_bin / n) for n in SUITES]], top, logf, "make")
        for n in SUITES:
            if not (tmp_bin / n).exists():
                raise KsmlensError(f"the selftests build produced no {n}",
                                   f"full log: {top / 'build.log'}")
        tmp_bin.rename(bindir)
        meta = {"source": kbuild.source_version(), "tarball": str(tarball),
                "format": BUILD_FORMAT, "binaries": list(SUITES),
                "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (top / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(src, ignore_errors=True)      # 170 MB; headers and binaries stay
        log(f"built the KSM selftests in {meta['build_seconds']} s: {bindir}")
    return want
