"""MLflow's UI opens the pipeline's experiment on its runs: the experiment is tagged
`mlflow.experimentKind=custom_model_development` (`pipeline.lib.tracking.store`), the tag MLflow
3.x's UI reads (its JS bundle) to choose between the runs table and the GenAI traces overview.
Checked through the API and in a real browser (`mlflow server` on loopback, headless Chromium)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests
from omegaconf import OmegaConf

from pipeline.lib.config.schema import TrackingConfig
from pipeline.lib.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, open_store
from tests.browser import chromium
from tests.conftest import seeded_store


def _tracking(tmp: Path, **values: object):
    return OmegaConf.merge(
        OmegaConf.structured(TrackingConfig),
        {"uri": seeded_store(tmp), "artifact_location": str(tmp / "mlartifacts"), **values},
    )


def test_the_experiment_is_created_with_the_kind_the_ui_reads(tmp_path):
    client, experiment_id = open_store(_tracking(tmp_path, experiment="toy-trucks"))
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # the bundle MLflow serves knows this value (a renamed kind would fail here)
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    assert any(EXPERIMENT_KIND.encode() in f.read_bytes() for f in js.glob("main.*.js"))


def test_an_existing_experiment_is_tagged_once_and_a_users_kind_is_kept(tmp_path):
    tracking = _tracking(tmp_path, experiment="older")
    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    old = client.create_experiment("older", artifact_location=str(tmp_path / "a"))
    mine = client.create_experiment(
        "mine",
        artifact_location=str(tmp_path / "b"),
        tags={EXPERIMENT_KIND_TAG: "genai_development"},
    )
    assert open_store(tracking)[1] == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    open_store(_tracking(tmp_path, experiment="mine"))
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"


#: MLflow 3.17's UI starts in its "GenAI" workflow (the sidebar switch "GenAI | Model training",
#: kept in the browser's localStorage `mlflow.workflowType`, default genai) whatever the
#: experiment's kind; the query parameter selects "Model training" (the README's `make ui` link).
UI_QUERY = "workflowType=machine_learning"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_ui_opens_the_experiment_on_its_runs_table(tmp_path):
    tracking = _tracking(tmp_path, experiment="toy-trucks")
    client, experiment_id = open_store(tracking)
    run = client.create_run(experiment_id, run_name="smoke-run-42")
    client.log_metric(run.info.run_id, "test_accuracy", 0.5)
    client.set_terminated(run.info.run_id)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            tracking.uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    driver = None
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, "mlflow server exited"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer within 150 s"
            time.sleep(1)
        driver = chromium()
        driver.get(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}?{UI_QUERY}")
        deadline = time.monotonic() + 90
        while "smoke-run-42" not in driver.find_element("tag name", "body").text:
            assert time.monotonic() < deadline, driver.find_element("tag name", "body").text[:800]
            time.sleep(1)
        text = driver.find_element("tag name", "body").text
        assert "Token Usage" not in text  # not the GenAI overview
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
