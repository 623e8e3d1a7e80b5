"""Shared fixtures: compose the real config from conf/, tiny variants for fast plumbing tests."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
#: Seconds a test's call or teardown may run (its setup, which may build a whole project, twice
#: that) before it fails as timed out, so that a hang still ends in pytest's summary; 0 = none.
TEST_TIMEOUT_S = float(os.environ.get("PYTEST_TEST_TIMEOUT_S", "600"))


# -- a run that names its failures, ends, and leaves nothing running ----------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


#: This process is a pytest-xdist worker (from its config: a pytest run started by a test
#: inherits PYTEST_XDIST_WORKER from the worker that runs that test, yet is no worker).
_WORKER = False


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (`timeout`, CI cancelling a job) ends the run as Ctrl-C does: finalizers run and
    the summary names the failures so far."""
    global _WORKER
    _WORKER = hasattr(config, "workerinput")
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failure is named when it happens (and again in the summary), so a run that is cut
    short still says what failed; under pytest-xdist the controller prints it."""
    if not report.failed or _WORKER:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    why = f" - {crash.message.splitlines()[0][:200]}" if crash and crash.message else ""
    print(
        f"\n{'FAILED' if report.when == 'call' else 'ERROR'} {report.nodeid}{why}",
        file=sys.__stderr__,
        flush=True,
    )


@contextlib.contextmanager
def _time_limit(seconds: float, what: str):
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or not _in_main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        pytest.fail(f"timed out: {what} ran over {seconds:.0f} s (PYTEST_TEST_TIMEOUT_S)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _time_limit(2 * TEST_TIMEOUT_S, "setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _time_limit(TEST_TIMEOUT_S, "the test"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item):
    with _time_limit(TEST_TIMEOUT_S, "teardown"):
        return (yield)


def stop_processes_under(folder: Path) -> list[str]:
    """End every other process whose working folder or command line is under `folder` (SIGTERM,
    SIGKILL 5 s later): what tests started there and left running, e.g. `dvc queue` workers
    (detached, so not ended with their parent) or servers. Returns their command lines."""
    prefix = str(folder)
    found: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid in (os.getpid(), os.getppid()):
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone, a zombie, or not ours
            continue
        if cwd == prefix or cwd.startswith(prefix + os.sep) or any(prefix in a for a in argv):
            found[pid] = " ".join(argv).strip()
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        alive = [pid for pid in found if Path(f"/proc/{pid}/cwd").exists()]
        for pid in alive:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if Path(f"/proc/{pid}/cwd").exists()]
    return list(found.values())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist the controller ends what the workers' tests left (its temporary folder
    holds theirs), also when the workers were stopped before their own session end."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and not _WORKER:
        _report_stopped(stop_processes_under(factory.getbasetemp()))


def _report_stopped(left: list[str]) -> None:
    if left:
        print(f"\nstopped {len(left)} process(es) left running:", file=sys.__stderr__)
        print("\n".join(f"  {cmd[:200]}" for cmd in left), file=sys.__stderr__, flush=True)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left(tmp_path_factory: pytest.TempPathFactory):
    """At the end of the session (also after failures, Ctrl-C or SIGTERM), end what the tests
    started under their temporary folders and left running, and say so."""
    root = tmp_path_factory.getbasetemp()
    yield
    _report_stopped(stop_processes_under(root))


def compose(overrides: list[str] | None = None):
    """conf/ composed by Hydra, as `python -m pipeline.<stage> <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


_empty_store: Path | None = None


def seeded_store(tmp: Path) -> str:
    """`sqlite:///<tmp>/mlflow.db`, the file started (when missing) as a copy of an empty MLflow
    store made once per test process: creating a store's tables (MLflow's migrations) costs
    seconds for every new database. The tests of fresh projects (`dvc repro` in a temporary
    repository) still have MLflow create theirs."""
    global _empty_store
    db = Path(tmp) / "mlflow.db"
    if not db.exists():
        if _empty_store is None:
            import mlflow

            folder = Path(tempfile.mkdtemp(prefix="empty-mlflow-store-"))
            atexit.register(shutil.rmtree, folder, True)
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
            _empty_store = folder / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store, db)
    return f"sqlite:///{db}"


def tiny_overrides(tmp: Path, **extra: object) -> list[str]:
    """Small images, alpha 0.35, no weights, everything under `tmp`: plumbing in seconds."""
    values: dict[str, object] = {
        "data.synthetic.dir": tmp / "raw",
        "data.image_size": 32,
        "data.synthetic.size": 48,
        "data.synthetic.train_per_class": 4,
        "data.synthetic.val_per_class": 2,
        "data.synthetic.test_per_class": 2,
        "model.alpha": 0.35,
        "model.weights": "null",
        "evaluate.gallery_size": 4,
        "tracking.uri": None,  # seeded_store(tmp) unless given
        "tracking.artifact_location": tmp / "mlartifacts",
        "paths.raw": tmp / "data/raw",
        "paths.prepared": tmp / "data/prepared",
        "paths.features": tmp / "data/features",
        "paths.models": tmp / "models",
        "paths.reports": tmp / "reports",
        "paths.run_file": tmp / "outputs/mlflow_run.json",
        "train.checkpoint_dir": tmp / "checkpoints",
    }
    values.update(extra)
    if values["tracking.uri"] is None:
        values["tracking.uri"] = seeded_store(tmp)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(tmp: Path, **extra: object):
    from pipeline.lib.config.schema import validate

    return validate(compose(tiny_overrides(tmp, **extra)))


def prepared_overrides(tmp: Path) -> dict[str, object]:
    """Tiny data prepared and featurized once under `tmp`; the overrides that point a
    `tiny_config` at it (so tests that train reuse it instead of preparing their own)."""
    from pipeline.featurize import featurize
    from pipeline.prepare import prepare

    cfg = tiny_config(tmp)
    prepare(cfg)
    featurize(cfg)
    return {
        "data.synthetic.dir": tmp / "raw",
        "paths.prepared": cfg.paths.prepared,
        "paths.features": cfg.paths.features,
    }


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted TFLite backbones go to a per-session cache, not the user's."""
    os.environ["TRUCK_CACHE_DIR"] = str(tmp_path_factory.mktemp("truck-cache"))


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> tuple[Path, str]:
    """(folder, text): `build(folder)` run once per test session, shared by the pytest-xdist
    workers under a file lock; `text` is what it returned (kept beside the folder). Tests must
    not change the folder: they work on copies."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if _WORKER:
        root = root.parent  # the workers' common folder
    folder, output = root / name, root / f"{name}.out"
    with FileLock(str(root / f"{name}.lock")):
        if not output.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            output.write_text(build(folder))
    return folder, output.read_text()


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(repository, output of its first `dvc repro`): the project with `experiment=smoke` after
    one `dvc repro`; copy it with `tests.project_repo.copy_reproduced`."""
    from tests.project_repo import reproduced_smoke_project

    return built_once(
        tmp_path_factory, "smoke-project", lambda folder: reproduced_smoke_project(folder)[1]
    )


@pytest.fixture(scope="session")
def smoke_history(
    smoke_project: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """(repository, {"first", "second", "output"}): the reproduced smoke project committed
    (`first`), then `dvc exp run -S experiment=smoke -S train.C=0.01 -S
    train.label_smoothing=0.1` (its output) and the workspace committed (`second`): two commits of
    a real pipeline, as a pull request and its base. Copy it with `copy_reproduced`."""
    import json

    from tests.project_repo import smoke_experiment_history

    folder, text = built_once(
        tmp_path_factory,
        "smoke-history",
        lambda folder: json.dumps(smoke_experiment_history(smoke_project[0], folder / "repo")),
    )
    return folder / "repo", json.loads(text)


@pytest.fixture
def tiny(tmp_path: Path):
    return tiny_config(tmp_path)


def imagenet_weights_available() -> bool:
    from pipeline.lib.model.build import imagenet_weights_path

    return imagenet_weights_path(1.0, 224).is_file()


def python() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def repo(smoke_project: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the reproduced smoke project for one test module (`smoke_project`)."""
    from tests.project_repo import copy_reproduced

    return copy_reproduced(smoke_project[0], tmp_path_factory.mktemp("project") / "repo")


@pytest.fixture(scope="module")
def first_repro(smoke_project: tuple[Path, str], repo: Path) -> str:
    """The output of the project's first `dvc repro` (run in the session's template)."""
    return smoke_project[1]
