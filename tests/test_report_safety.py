"""Reports are never lost: a re-run that is interrupted (Ctrl-C) or killed leaves the previous notebook, page and
index as they were, and Ctrl-C stops the running notebook's kernel within seconds."""

import hashlib
import os
import signal
import subprocess
import sys
import time

from anelab.report import _clear_stale_staging

ENV = dict(os.environ, MPLBACKEND="agg", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


#: Start ``python <args>`` with SIGINT at its default and unblocked (a pytest worker may run with it ignored or blocked,
#: and a child inherits both across exec), as a process started from a terminal has it.
_AS_FROM_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_an_interrupted_rerun_stops_within_seconds_and_keeps_the_previous_report(tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    for name in ("02_resolution.ipynb", "02_resolution.html", "index.html", "index.json"):  # the previous report
        (out / name).write_text('{"notebooks": []}' if name == "index.json" else f"the previous {name}")
    before = _files(out)
    command = ["-m", "anelab", "report", "--only", "02", "--out", str(out), "--runs", str(tmp_path / "r2"),
               "--store", str(tmp_path / "store2")]  # fmt: skip
    rerun = subprocess.Popen(  # as from a terminal: Ctrl-C neither ignored nor blocked, whatever this worker inherited
        [sys.executable, "-c", _AS_FROM_A_TERMINAL, *command], env=ENV, stderr=subprocess.PIPE, text=True
    )
    time.sleep(10)  # the notebook's kernel is running its cells
    assert rerun.poll() is None, "the notebook finished before the interrupt: the test needs a longer one"
    asked = time.perf_counter()
    rerun.send_signal(signal.SIGINT)
    try:
        _, err = rerun.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        status = open(f"/proc/{rerun.pid}/status").read() if os.path.exists(f"/proc/{rerun.pid}/status") else ""
        rerun.kill()
        signals = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt", "State"))]
        raise AssertionError(f"the interrupted report did not stop within 60 s; {signals}") from None
    assert rerun.returncode == 130 and time.perf_counter() - asked < 15
    assert "interrupted: every notebook process stopped" in err
    assert _files(out) == before  # nothing half-executed replaced the report, the index is the old one
    assert not list(out.glob(".*.staging"))


def test_a_killed_run_leaves_a_staging_folder_the_next_run_clears(tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    stale = out / f".01_reproduction.{2**22 + 12345}.abcd.staging"  # a pid no process has
    stale.mkdir()
    (stale / "01_reproduction.ipynb").write_text("half")
    mine = out / f".01_reproduction.{os.getpid()}.efgh.staging"  # a running report's own
    mine.mkdir()
    _clear_stale_staging(out)
    assert not stale.exists() and mine.exists()
