"""benchmarks/bench.py --quick: every section runs and prints its rows with a PASS/FAIL per
target (the figures themselves depend on the machine's load, so only the exit status's meaning
is checked: 0 all targets met, 1 one missed, never a crash)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # a few minutes: it runs dvc repro and a sweep


def test_quick_benchmark_prints_every_row_and_its_verdict():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rows = {line[:36].strip(): line for line in proc.stdout.splitlines()}
    for name in (
        "featurize TFLite (pipeline)",
        "featurize max |diff| vs Keras",
        "featurize run-to-run bytes",
        "sweep, 2 jobs (process)",
        "dvc repro from clean",
        "featurize heap spread",
    ):
        assert name in rows, proc.stdout
        assert " PASS " in rows[name] or " FAIL " in rows[name], rows[name]
    assert "PASS" in rows["featurize run-to-run bytes"]  # same bytes on every machine
    assert (proc.returncode == 1) == (" FAIL " in proc.stdout)
