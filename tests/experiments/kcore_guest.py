"""Run INSIDE a lab guest by test_kcore.py (one process: the guest imports slowly).

    python kcore_guest.py WRONG_VMLINUX

ksmlens on /proc/kcore as a user runs it on their own host, each result
beside what this kernel itself reports (/sys/kernel/mm/ksm); prints one JSON
line last.
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import time


def sysfs() -> dict:
    d = "/sys/kernel/mm/ksm"
    return {k: int(open(f"{d}/{k}").read()) for k in ("pages_shared", "pages_sharing")}


def cli(*argv) -> dict:
    """``ksmlens ARGV`` in this process: rc, stdout, stderr, seconds."""
    from ksmlens.cli import main
    out, err = io.StringIO(), io.StringIO()
    t = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "seconds": round(time.monotonic() - t, 1)}


def main() -> None:
    wrong = sys.argv[1]
    res = {"sysfs_before": sysfs(), "uname": os.uname().release,
           "npy_disabled": os.environ.get("NPY_DISABLE_CPU_FEATURES")}
    t = time.monotonic()
    # a plain drgn Program, as `drgn` makes one: the ksmlens plugin's finder
    # (drgn_prog_set) finds the lab's vmlinux before drgn's standard one
    import drgn
    prog = drgn.Program()
    prog.set_kernel()
    prog.load_default_debug_info()
    res["plain_drgn"] = {"finders": prog.enabled_debug_info_finders(),
                         "vmlinux": prog.main_module().debug_file_path,
                         "seconds": round(time.monotonic() - t, 1)}
    # %ksm on the same Program
    import ksmlens.views.drgn_commands  # noqa: F401  (registers %ksm)
    from drgn.commands import DEFAULT_COMMAND_NAMESPACE
    for view in ("check", "stable"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            DEFAULT_COMMAND_NAMESPACE.run(prog, f"ksm {view}")
        res[f"ksm_{view}"] = out.getvalue()
    # attach() as the CLI does
    from ksmlens.lab.attach import attach
    p2 = attach("/proc/kcore")
    res["attach"] = p2.cache.get("ksmlens_vmlinux")
    del p2
    # the CLI: report, snapshot (one process: the kcore note once)
    res["report"] = cli("report", "--target", "/proc/kcore")
    path = os.path.join(tempfile.mkdtemp(), "kcore.ksm")
    res["snapshot"] = cli("snapshot", "--target", "/proc/kcore", "-o", path)
    from ksmlens.experiments.check import walk_counts
    from ksmlens.lens.model import Snapshot
    snap = Snapshot.load(path)
    w = walk_counts(snap)
    res["snapshot_file"] = {"counters": {k: snap.counters[k] for k in
                                         ("pages_shared", "pages_sharing")},
                            "walk": {k: w[k] for k in ("pages_shared", "pages_sharing")},
                            "mode": snap.meta.get("mode"), "races": snap.meta.get("races")}
    res["consistent"] = cli("snapshot", "--target", "/proc/kcore", "--mode", "consistent")
    # refusals: a vmlinux of another build; no vmlinux anywhere
    res["wrong"] = cli("check", "--target", "/proc/kcore", "--vmlinux", wrong)
    os.environ["KSMLENS_CACHE"] = tempfile.mkdtemp()        # no lab builds
    res["missing"] = cli("report", "--target", "/proc/kcore")
    res["sysfs_after"] = sysfs()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
