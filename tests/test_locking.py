"""One writer per output folder: the second is refused with a message naming the first."""

import subprocess
import sys
import textwrap

import pytest

from easyref.locking import FolderLocked, output_lock


def test_second_writer_in_another_process_is_refused_and_named(tmp_path):
    holder = textwrap.dedent(
        f"""
        import sys, time
        from easyref.locking import output_lock
        with output_lock({str(tmp_path)!r}, "ingest"):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(FolderLocked, match=rf"ingest \(pid {proc.pid} on "):
            with output_lock(tmp_path, "train"):
                pass
    finally:
        proc.communicate("\n", timeout=30)
    # released when the holder leaves: the next writer gets it
    with output_lock(tmp_path, "train"):
        assert (tmp_path / ".easyref.lock.holder").exists()
    assert not (tmp_path / ".easyref.lock.holder").exists()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = f"from easyref.locking import output_lock\nimport time\nwith output_lock({str(tmp_path)!r}, 'x'):\n    print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(FolderLocked):
        with output_lock(tmp_path, "y"):
            pass
    proc.kill()
    proc.wait(timeout=30)
    with output_lock(tmp_path, "y", timeout=10):
        pass
