"""pipeline.lib.files: atomic outputs, and the temporaries of killed steps removed at the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pipeline.lib.files import atomic_dir, remove_stale_temps
from tests.conftest import ROOT

KILLED_STEP = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline.lib.files import atomic_dir
with atomic_dir({target!r}) as tmp:
    (tmp / "half.npy").write_bytes(b"x" * 100000)
    print(tmp.name, flush=True)
    time.sleep(600)
"""


def test_a_killed_step_leaves_a_temp_folder_that_the_next_run_removes(tmp_path):
    """Case killed-step-leaves-temp-folders: SIGKILL during atomic_dir, then a rerun."""
    target = tmp_path / "data" / "prepared"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_STEP.format(root=str(ROOT), target=str(target))],
        stdout=subprocess.PIPE,
        text=True,
    )
    name = proc.stdout.readline().strip()
    leftover = target.parent / name
    assert leftover.is_dir() and name.startswith(f".prepared.tmp-{proc.pid}-")
    # a live step's temporary is not touched
    assert remove_stale_temps(target) == [] and leftover.is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("ok")
    assert sorted(os.listdir(target.parent)) == ["prepared"]
    assert (target / "done").read_text() == "ok"


def test_other_names_are_left_alone(tmp_path):
    target = tmp_path / "prepared"
    keep = [
        ".prepared.tmp-notapid",
        ".features.tmp-1-x",
        "prepared.tmp-1-x",
        f".prepared.tmp-{os.getpid()}-x",
    ]
    for name in keep:
        (tmp_path / name).mkdir()
    assert remove_stale_temps(target) == []
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
