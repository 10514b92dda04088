"""pipeline/jobs.py: what every verb runs in."""
from __future__ import annotations

import subprocess
import sys
import tempfile

from pipeline.jobs import command_scratch


def test_a_commands_scratch_folder_goes_with_it_and_a_killed_commands_goes_with_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid names a process that is gone, as a command killed with SIGKILL
    left = tmp_path / f"h2t-sweep-{ended.pid}-abc"
    left.mkdir()
    (left / "outcome.json").write_text("{}")
    running = tmp_path / "h2t-sweep-1-xyz"  # pid 1 is running
    running.mkdir()
    other = tmp_path / "h2t-sweep-notapid"
    other.mkdir()
    with command_scratch() as scratch:
        assert scratch.is_dir() and scratch.parent == tmp_path
        assert not left.exists()
    assert not scratch.exists()
    assert running.is_dir() and other.is_dir()
