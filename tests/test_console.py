"""`pipeline.lib.console`: TensorFlow's start-up notices and the libraries' chatter are silenced
where they are made, real output is kept, and `PIPELINE_VERBOSE=1` shows everything again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

#: A child that imports the package, then TensorFlow, prints a line of its own, and logs a
#: pandas dataset to MLflow's data API as train does.
CHILD = """
import os, sys
import pipeline
import tensorflow as tf
print("own line", file=sys.stderr)
import mlflow, pandas as pd  # the prepared data logged as train logs it: two UserWarnings
mlflow.data.from_pandas(pd.DataFrame({"label": [1, 2]}), source=os.getcwd(), targets="label")
print("TF_CPP_MIN_LOG_LEVEL=" + os.environ.get("TF_CPP_MIN_LOG_LEVEL", ""), file=sys.stderr)
"""


def _child(**env: str) -> str:
    base = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PIPELINE_VERBOSE")
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_tensorflow_start_up_notices_are_silenced_and_come_back_with_the_switch():
    quiet = _child()
    assert "oneDNN custom operations" not in quiet and "absl::InitializeLog" not in quiet
    assert "own line" in quiet and "TF_CPP_MIN_LOG_LEVEL=3" in quiet
    assert "interpreted in multiple ways" not in quiet  # MLflow's dataset-source warning
    assert "integer column" not in quiet
    assert quiet.strip().splitlines() == ["own line", "TF_CPP_MIN_LOG_LEVEL=3"]
    loud = _child(PIPELINE_VERBOSE="1")
    assert "oneDNN custom operations" in loud and "interpreted in multiple ways" in loud
    assert "TF_CPP_MIN_LOG_LEVEL=\n" in loud or loud.rstrip().endswith("TF_CPP_MIN_LOG_LEVEL=")


def test_a_level_the_user_chose_is_kept():
    assert "TF_CPP_MIN_LOG_LEVEL=1" in _child(TF_CPP_MIN_LOG_LEVEL="1")


def test_what_tensorflow_prints_on_import_besides_the_notices_is_passed_on(tmp_path):
    """The capture of file descriptor 2 around `import tensorflow` drops only the notices: a
    fake `tensorflow` package that writes other lines to fd 2 has them shown."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os\n"
        "os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "os.write(2, b'a real problem\\n')\n"
    )
    code = "import pipeline, sys; import tensorflow; print('after', file=sys.stderr)"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("PIPELINE_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["a real problem", "after"]


def test_libraries_log_records_reach_the_log_file_not_the_console(tmp_path):
    """Below ERROR, matplotlib's, TensorFlow's and absl's records go to the log file only (a
    console and a file handler on the root logger, as Hydra sets them up); errors to both."""
    code = (
        "import logging, sys\n"
        "import pipeline\n"
        f"logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout),"
        f" logging.FileHandler({str(tmp_path / 'step.log')!r})])\n"
        "logging.getLogger('matplotlib.font_manager').warning("
        "'Matplotlib is building the font cache; this may take a moment.')\n"
        "logging.getLogger('tensorflow').info('Assets written to: /tmp/x/assets')\n"
        "logging.getLogger('absl').warning('Compiled the loaded model')\n"
        "logging.getLogger('tensorflow').error('a real TensorFlow error')\n"
        "logging.getLogger('pipeline.x').info('own line')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_VERBOSE"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "ERROR:tensorflow:a real TensorFlow error",
        "INFO:pipeline.x:own line",
    ]
    assert proc.stderr == ""
    logged = (tmp_path / "step.log").read_text()
    for line in ("font cache", "Assets written", "Compiled the loaded", "real TensorFlow", "own"):
        assert line in logged


def test_a_stage_converting_the_backbone_leaks_no_library_lines(tmp_path):
    """featurize with an empty conversion cache and no matplotlib font cache (a fresh home):
    the console has the step's own lines only; the log file keeps the libraries' records."""
    from pipeline.prepare import prepare
    from tests.conftest import tiny_config, tiny_overrides

    overrides = tiny_overrides(tmp_path)
    prepare(tiny_config(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_VERBOSE"}
    env.update(TRUCK_CACHE_DIR=str(tmp_path / "cache"), MPLCONFIGDIR=str(tmp_path / "mpl"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.featurize", *overrides, f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "Converted the backbone to TFLite" in console  # a conversion did happen
    for leak in ("fontManager", "font cache", "Assets written", "absl", "[tensorflow]", "W0000"):
        assert leak not in console, console
    logged = (tmp_path / "run" / "featurize.log").read_text()
    assert "Assets written" in logged and "fontManager" in logged


TOY_TESTS = """
import subprocess, time
def test_fails():
    assert 1 == 2, "one is not two"
def test_leaves_a_detached_process(tmp_path):
    subprocess.Popen(["sleep", "300"], cwd=tmp_path, start_new_session=True)
def test_hangs():
    time.sleep(300)
"""


def _toy_run(tmp_path, name: str, timeout_s: str, *prefix: str) -> tuple[int, str, str]:
    """This suite's conftest.py with three toy tests, run as `make test` runs (pytest-xdist):
    (exit status, stdout + stderr, stderr)."""
    suite = tmp_path / name / "tests"
    suite.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", suite)
    (suite / "__init__.py").write_text("")
    (suite / "test_toy.py").write_text(TOY_TESTS)
    env = {**os.environ, "PYTEST_TEST_TIMEOUT_S": timeout_s}
    cmd = [*prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "tests"]
    proc = subprocess.run(
        cmd, cwd=suite.parent, env=env, capture_output=True, text=True, timeout=180
    )
    return proc.returncode, proc.stdout + proc.stderr, proc.stderr


def _sleepers() -> list[str]:
    return [
        cmd for entry in Path("/proc").glob("[0-9]*") if (cmd := _cmdline(entry)) == "sleep 300"
    ]


def _cmdline(entry: Path) -> str:
    try:
        return entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_a_cut_short_test_run_names_its_failures_and_leaves_nothing_running(tmp_path):
    """Case make-test-under-load-40min-2-failures: a failure is named when it happens, a hanging
    test fails as timed out (the run ends with its summary), SIGTERM (`timeout`) still prints the
    summary, and a detached process a test started is ended with the session."""
    before = len(_sleepers())
    rc, out, err = _toy_run(tmp_path, "timed", "3")
    assert rc == 1, out
    # named on stderr when it fails (pytest's own summary is on stdout, at the end)
    assert "FAILED tests/test_toy.py::test_fails - AssertionError: one is not two" in err
    assert "test_hangs - Failed: timed out" in out  # the summary line may be cut at 80 columns
    assert "short test summary info" in out and "2 failed, 1 passed" in out
    assert len(_sleepers()) == before, out

    rc, out, err = _toy_run(tmp_path, "terminated", "0", "timeout", "20")
    assert "FAILED tests/test_toy.py::test_fails" in err, out
    assert rc == 124, out  # ended by `timeout`'s SIGTERM
    summary = out[out.index("short test summary info") :]
    assert "FAILED tests/test_toy.py::test_fails" in summary and "1 failed, 1 passed" in summary
    assert len(_sleepers()) == before, out


def test_the_readme_answers_the_push_hint_dvc_prints_itself():
    """DVC's `repro` ends with a `dvc push` hint even with no remote (it writes it whenever a stage
    ran; no setting turns it off): the README's troubleshooting row quotes it as DVC writes it."""
    import inspect

    from dvc.commands.repro import CmdRepro

    hint = "Use `dvc push` to send your updates to remote storage."
    assert hint in inspect.getsource(CmdRepro.run)
    assert f"``{hint}`` at the end of `dvc repro`" in (ROOT / "README.md").read_text()
