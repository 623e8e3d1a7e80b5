"""Shared fixtures: compose the real config from conf/, tiny variants for fast plumbing tests."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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
    if os.environ.get("PYTEST_XDIST_WORKER"):
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
