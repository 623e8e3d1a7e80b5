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


def _umask_child(mask: int, target: str) -> None:
    """In a subprocess (the umask is per process): write a file and a folder atomically."""
    code = (
        "import os, sys; from pathlib import Path\n"
        "from pipeline.lib.files import atomic_dir, write_json\n"
        f"os.umask({mask})\n"
        "root = Path(sys.argv[1])\n"
        "write_json(root / 'metrics.json', {'a': 1})\n"
        "with atomic_dir(root / 'models') as tmp:\n"
        "    (tmp / 'classes.json').write_text('[]')\n"
        "    (tmp / 'sub').mkdir()\n"
    )
    subprocess.run([sys.executable, "-c", code, target], check=True, cwd=ROOT, timeout=120)


def test_outputs_honour_the_umask(tmp_path):
    """Temporary files and folders (0600/0700 from tempfile) are renamed into place with the
    permissions `open`/`mkdir` give: 0644/0755 under umask 022, 0640/0750 under 027."""
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        root = tmp_path / oct(mask)
        root.mkdir()
        _umask_child(mask, str(root))
        mode = {p.name: p.stat().st_mode & 0o777 for p in root.rglob("*")}
        assert mode["metrics.json"] == file_mode, oct(mode["metrics.json"])
        assert mode["models"] == dir_mode, oct(mode["models"])
        assert mode["classes.json"] == file_mode and mode["sub"] == dir_mode


FULL_FILE = """
import resource, sys
sys.path.insert(0, {root!r})
from pipeline.lib.files import atomic_file
resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))  # EFBIG past 100 kB, as a full disk
with atomic_file({target!r}, "wb") as fh:
    fh.write(b"x" * 200000)
"""


def test_a_full_disk_while_writing_a_file_is_one_line_naming_it(tmp_path):
    target = tmp_path / "reports" / "metrics.json"
    code = FULL_FILE.format(root=str(ROOT), target=str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pipeline.lib.files.NoSpaceError: No space left to write {target} ")
    assert "During handling" not in proc.stderr  # the OSError is not chained under it
    assert list(target.parent.iterdir()) == []  # no temporary left, no half file
