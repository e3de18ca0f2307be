"""The end-to-end tests run the pipeline through ``components.testing.run_watched``: a run that hangs is stopped
before the test's own limit, with the stack of every process of its tree in the failure message."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.testing import run_watched  # noqa: E402

CHILD = "import time\ndef child_sleeps_forever():\n    time.sleep(600)\nchild_sleeps_forever()\n"
PARENT = textwrap.dedent(f"""
    import subprocess, sys, time
    def parent_waits_for_its_child():
        subprocess.run([sys.executable, "-c", {CHILD!r}])
        print("child ended", flush=True)
        time.sleep(600)
    print("parent started", flush=True)
    parent_waits_for_its_child()
""")


def test_a_hung_process_tree_is_stopped_with_each_process_stack(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_watched([sys.executable, "-c", PARENT], log=tmp_path / "run.log", timeout_s=3)
    message = str(failure.value)
    assert "still ran after 3 s" in message and "parent started" in message and "child ended" in message
    # the child (deepest) went first, its parent passed its stack on, then the parent said where it waited
    assert "child_sleeps_forever" in message and "parent_waits_for_its_child" in message
    assert time.monotonic() - started < 20


def test_a_run_that_ends_returns_its_output(tmp_path: Path) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    done = run_watched([sys.executable, "-c", code], log=tmp_path / "run.log", timeout_s=60, env=dict(os.environ))
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
