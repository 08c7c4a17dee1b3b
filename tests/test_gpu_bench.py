"""tools/gpu_bench.sh, the one call a lent GPU machine gets, run here with a stand-in python3."""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bench.py's stand-in: its training part ignores SIGTERM, as a process stuck inside a CUDA call or a
# compiler does (for a minute, so that it never outlives the test by long: `timeout` gives it a process
# group of its own); everything else (pip, the version line, --targets-from) succeeds at once.
STUCK_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *"--only train"*) trap '' TERM; echo "training (stuck)"; for _ in $(seq 60); do sleep 1; done ;;
esac
exit 0
"""


@pytest.mark.slow
def test_a_part_that_ignores_sigterm_is_killed_at_its_cap(tmp_path):
    # The device budget is one call: a part that outlives its cap would eat every part after it and
    # the call itself, losing the figures already measured.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    python3 = fake_bin / "python3"
    python3.write_text(STUCK_PYTHON)
    python3.chmod(python3.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(out), "DEADLINE": "21"}
    started = time.monotonic()
    script = subprocess.Popen(["bash", str(ROOT / "tools" / "gpu_bench.sh")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        returncode = script.wait(timeout=50)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already where the script ended
            os.killpg(script.pid, signal.SIGKILL)
    took = time.monotonic() - started
    log = (out / "bench.log").read_text()
    assert took < 45, f"the stuck part ran {took:.0f}s past its 21s cap:\n{log}"
    assert "== train: exit 137" in log, log  # killed, not ended by SIGTERM (124)
    assert "== rest: skipped" in log and returncode == 0, log
