"""LocalKernel.run (/proc/kcore's host side): a run that times out keeps what
it printed, as text (subprocess.TimeoutExpired carries bytes even with
text=True; mypy found it)."""

from ksmlens.lab.host import LocalKernel


def test_timed_out_run_keeps_its_output_as_text():
    res = LocalKernel().run(["/bin/sh", "-c", "echo before; echo err >&2; exec sleep 30"],
                            timeout=1.0)
    assert res.timed_out and res.rc is None
    assert res.stdout == "before\n" and res.stderr == "err\n"


def test_finished_run():
    res = LocalKernel().run("echo hi; exit 3")
    assert (res.rc, res.stdout, res.timed_out) == (3, "hi\n", False)
