"""The pipeline against a real MLflow tracking server (SQL store, served artifacts) on loopback.

The module starts `mlflow server` as a subprocess (SQLite backend, artifacts served through the
server), prepares tiny features once, and checks:
- a pipeline run (train + evaluate) logs params, metrics, artifacts and the model to the server,
  all read back through its REST API (artifact downloaded and model loaded through the server);
- load: a sweep of 8 jobs run in parallel by Hydra's joblib launcher, every job a finished child
  run with all its per-epoch, per-batch and final metrics;
- faults: the server killed mid-sweep (in the middle of a job's run) fails that job with an error
  naming the tracking URI within seconds, runs finished before the kill stay intact, and after a
  restart (same store, same port) the same sweep completes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import ROOT, tiny_config, tiny_overrides

pytestmark = pytest.mark.slow

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow server` with a SQLite store and served artifacts, in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")  # noqa: SIM115 (kept by Popen)
        self.proc = subprocess.Popen(
            [
                MLFLOW,
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # a tracking server only: no background job executor (saves two processes)
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()

    def wait_healthy(self, timeout_s: float = 240) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(
            f"{self.uri}/health did not answer in {timeout_s} s\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def log_tail(self) -> str:
        logs = sorted(self.root.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-3000:] if logs else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()  # starts while the data is prepared
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from pipeline.featurize import featurize
    from pipeline.prepare import prepare

    cfg = tiny_config(tmp_path_factory.mktemp("scale-data"))
    prepare(cfg)
    featurize(cfg)
    return {
        "data.synthetic.dir": cfg.data.synthetic.dir,
        "paths.prepared": cfg.paths.prepared,
        "paths.features": cfg.paths.features,
    }


@pytest.fixture(scope="module")
def live(server: Server, data: dict) -> Server:
    server.wait_healthy()
    return server


def server_overrides(tmp: Path, server: Server, data: dict, experiment: str, **extra) -> list[str]:
    # tiny_overrides sets a local tracking.artifact_location: ignored with a server (asserted below)
    return [
        "tracking=server",
        *tiny_overrides(
            tmp, **data, **{"tracking.uri": server.uri, "tracking.experiment": experiment}, **extra
        ),
    ]


def sweep_cmd(tmp: Path, server: Server, data: dict, experiment: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.train",
        "-m",
        *server_overrides(tmp, server, data, experiment),
        "tracking.log_model=false",
        f"hydra.sweep.dir={tmp}/sweep",
        *args,
    ]


def family(client: mlflow.MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return exp, parents, children


def full_history(client: mlflow.MlflowClient, run) -> dict[str, list[int]]:
    """Steps logged per metric, read back through the server."""
    return {
        key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def check_complete_child(client: mlflow.MlflowClient, run) -> int:
    """A finished sweep job with all its metrics; returns how many metric values it holds."""
    assert run.info.status == "FINISHED", run.info
    history = full_history(client, run)
    steps = int(run.data.metrics["head_iterations"]) + 1  # L-BFGS: the start, then each iteration
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert history[key] == list(range(steps)), (key, history[key])
    assert not any(key.startswith("batch_") for key in history), "no Keras batches with lbfgs"
    for key in (
        "final_loss",
        "final_accuracy",
        "final_val_loss",
        "final_val_accuracy",
        "train_seconds",
        "trainable_params",
    ):
        assert len(history[key]) == 1, key
    assert run.data.metrics["trainable_params"] == 7686
    return sum(len(steps) for steps in history.values())


def test_server_config_needs_a_uri_and_bounds_retries():
    from pipeline.lib.config.schema import ConfigError, validate
    from pipeline.lib.tracking.store import apply_http_settings
    from tests.conftest import compose

    with pytest.raises(ConfigError, match="tracking.uri"):
        validate(compose(["tracking=server"]))
    with pytest.raises(ConfigError, match="tracking.http_retries"):
        validate(
            compose(["tracking=server", "tracking.uri=http://h:1", "tracking.http_retries=11"])
        )
    cfg = validate(
        compose(["tracking=server", "tracking.uri=http://h:1", "tracking.timeout_s=2.5"])
    )
    assert cfg.tracking.artifact_location is None
    env = apply_http_settings(cfg.tracking)
    assert env == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
    }
    assert all(os.environ[k] == v for k, v in env.items())


def test_pipeline_run_is_read_back_through_the_server(live, data, tmp_path):
    from pipeline.evaluate import evaluate
    from pipeline.lib.config.schema import validate
    from pipeline.lib.data.prepared import open_prepared
    from pipeline.train import train
    from tests.conftest import compose

    cfg = validate(compose(server_overrides(tmp_path, live, data, "pipeline", **{"train.C": 2})))
    train(cfg)
    evaluate(cfg)
    run_id = json.loads(Path(cfg.paths.run_file).read_text())["run_id"]

    client = mlflow.MlflowClient(tracking_uri=live.uri)
    exp = client.get_experiment_by_name("pipeline")
    # created by the pipeline so that artifacts go through the server's proxy
    assert exp.artifact_location.startswith("mlflow-artifacts:/")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    params = run.data.params
    assert params["tracking.uri"] == live.uri and params["data.image_size"] == "32"
    assert params["train.C"] == "2" and params["tracking.http_retries"] == "3"
    metrics = run.data.metrics
    assert {"final_val_accuracy", "test_accuracy", "test_macro_f1"} <= set(metrics)
    steps = int(metrics["head_iterations"]) + 1
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [*range(steps)]
    report = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(report["test"]["accuracy"])

    # artifacts: listed and downloaded through the server; stored at its --artifacts-destination
    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "figures", "reports"} <= listed
    got = Path(client.download_artifacts(run_id, "reports/train_metrics.json", str(tmp_path)))
    assert json.loads(got.read_text()) == json.loads(
        (tmp_path / "reports" / "train_metrics.json").read_text()
    )
    stored = list((live.root / "artifacts").rglob("train_metrics.json"))
    assert any(run_id in str(p) for p in stored)
    assert not (tmp_path / "mlartifacts").exists(), "nothing written beside the client"

    # the model, loaded through the server, predicts probabilities for the test images
    mlflow.set_tracking_uri(live.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = np.asarray(
        open_prepared(cfg.paths.prepared, cfg.data).images("test"), dtype=np.float32
    )
    out = model.predict(images)  # the serving model: label, probability, scores
    probs = np.array([list(s.values()) for s in out["scores"]])
    assert probs.shape == (len(images), 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    versions = client.search_model_versions("name='toy-truck-classifier'")
    assert run_id in {v.run_id for v in versions}
    assert list((live.root / "artifacts").rglob("MLmodel")), "the model went to the server's store"


def test_a_sweep_stopped_early_ends_its_parent_failed(live, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.lib.tracking.sweep import MlflowSweepCallback, read_parent_run_id

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        config = hydra_compose(
            "config",
            overrides=[
                "tracking=server",
                f"tracking.uri={live.uri}",
                "tracking.experiment=stopped",
                f"hydra.sweep.dir={tmp_path}/sweep",
            ],
            return_hydra_config=True,
        )
    callback = MlflowSweepCallback()
    callback.on_multirun_start(config)
    parent_id = read_parent_run_id(tmp_path / "sweep")
    client = mlflow.MlflowClient(tracking_uri=live.uri)
    assert client.get_run(parent_id).info.status == "RUNNING"
    callback._close_if_open()  # what runs at exit when a job stopped the sweep
    assert client.get_run(parent_id).info.status == "FAILED"


def test_parallel_sweep_of_8_jobs_against_the_server(live, data, tmp_path):
    rates = ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2"]
    start = time.monotonic()
    proc = subprocess.run(
        sweep_cmd(
            tmp_path,
            live,
            data,
            "load",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "train.C=" + ",".join(rates),
        ),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]

    client = mlflow.MlflowClient(tracking_uri=live.uri)
    exp, parents, children = family(client, "load")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["children"] == "8"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert sorted(c.data.params["train.C"] for c in children) == sorted(rates)
    values = sum(check_complete_child(client, c) for c in children)
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []
    keys = sum(len(c.data.metrics) for c in children)
    # the jobs ran side by side: at some moment two runs were open on the server at once
    spans = [(c.info.start_time, c.info.end_time) for c in children]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap == 2, spans
    print(
        f"\nLOAD: jobs=8 n_jobs=2 runs_found={len(children)} (+1 parent) max_open_at_once="
        f"{overlap} metric_keys_found={keys} metric_values_found={values} wall_s={wall:.1f}"
    )


def test_server_killed_mid_sweep_then_restarted(live, data, tmp_path):
    # enough jobs (~1 s each) that the server is stopped while the sweep still runs, on any machine
    rates = ["0.01", "0.03", "0.1", "0.3", "1", "3", "10", "30", "100", "300"]
    # one retry, short backoff: the test waits for the failure (defaults: 3 retries, ~30 s)
    cmd = sweep_cmd(
        tmp_path,
        live,
        data,
        "fault",
        "tracking.http_retries=1",
        "tracking.http_backoff_factor=1",
        "train.C=" + ",".join(rates),
    )
    client = mlflow.MlflowClient(tracking_uri=live.uri)
    out, err = open(tmp_path / "out.txt", "w+"), open(tmp_path / "err.txt", "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
    finished: dict[str, dict[str, float]] = {}
    running: list[str] = []
    try:
        # the sweep runs its jobs one by one: stop the server once a job has finished and the
        # next one is in the middle of its run
        while proc.poll() is None and not (finished and running):
            time.sleep(0.3)
            exp = client.get_experiment_by_name("fault")
            if exp is None:
                continue
            runs = [
                r
                for r in client.search_runs([exp.experiment_id])
                if "mlflow.parentRunId" in r.data.tags
            ]
            finished = {r.info.run_id: r.data.metrics for r in runs if r.info.status == "FINISHED"}
            running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
        assert proc.poll() is None, "the sweep ended before the server was stopped"
        live.stop()  # the server goes away abruptly, between or during jobs
        stopped = time.monotonic()
        rc = proc.wait(timeout=300)
        fail_s = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    out.seek(0), err.seek(0)
    _stdout, stderr = out.read(), err.read()
    assert rc == 2, stderr[-4000:]
    # the error names the server
    assert f"ERROR: tracking.uri={live.uri}: the MLflow tracking server" in stderr, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert fail_s < 60, f"the sweep took {fail_s:.0f} s to give up on the dead server"

    restart_s = (live.start(), live.wait_healthy())[1]  # same store, same port
    exp, parents, children = family(client, "fault")
    now = {c.info.run_id: c for c in children}
    for run_id, metrics in finished.items():  # finished before the kill: intact
        assert now[run_id].info.status == "FINISHED"
        assert now[run_id].data.metrics == metrics
        check_complete_child(client, now[run_id])
    statuses = sorted(c.info.status for c in children)
    assert statuses.count("FINISHED") < len(rates), "the stopped sweep did not complete"
    # the run killed in the middle could not be told it failed: RUNNING, unless it was ending
    assert now[running[0]].info.status in ("RUNNING", "FINISHED")
    print(
        f"\nFAULT: {len(finished)} jobs finished before the kill, sweep exit {rc} after "
        f"{fail_s:.1f} s, child statuses after restart {statuses}, parent "
        f"{parents[0].info.status}; server restart {restart_s:.1f} s"
    )
    failure = [line for line in stderr.splitlines() if "ERROR" in line][-1:]
    print(f"FAULT message: {failure}")

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Best job of {len(rates)}" in proc.stdout
    exp, parents, children = family(client, "fault")
    rerun = [p for p in parents if p.info.status == "FINISHED"]
    assert len(parents) == 2 and len(rerun) == 1
    jobs = [c for c in children if c.data.tags["mlflow.parentRunId"] == rerun[0].info.run_id]
    assert sorted(c.data.params["train.C"] for c in jobs) == sorted(rates)
    for job in jobs:
        check_complete_child(client, job)
