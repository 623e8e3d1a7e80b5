"""Stage `train`: fit the classification head on the cached MobileNetV2 features, log it to MLflow.

    python -m pipeline.train train.C=10                    # a fixed penalty instead of CV
    python -m pipeline.train -m train.C=0.1,1,10           # one MLflow run per job
    python -m pipeline.train experiment=study              # the study's Keras fit, 8 epochs

`train.solver=lbfgs` (the default where no images must flow) fits the exact optimum of the
L2-regularised softmax regression (pipeline.lib.training.head) in a second, without TensorFlow;
`keras` runs Keras `fit` (the study, augmentation, fine-tuning; pipeline.lib.training.keras_fit).
Either way the model folder holds one LiteRT backbone and one Dense head
(pipeline.lib.model.classifier), calibrated on the validation split.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config, RejectConfig, solver
from pipeline.lib.config.step import CONF_DIR, entry_point, in_multirun, run_step
from pipeline.lib.data.prepared import PreparedDataset, data_root, data_tags, open_prepared
from pipeline.lib.errors import StageInputError, UserError
from pipeline.lib.files import atomic_dir, dvc_md5, write_json
from pipeline.lib.model.classifier import BACKBONE_FILE, Head, ModelCard, save_model_folder
from pipeline.lib.model.features import convert_to_tflite, load_cached_features
from pipeline.lib.model.reject import UNKNOWN, energy, fit_rule
from pipeline.lib.model.saving import write_run_record
from pipeline.lib.reporting.tables import write_csv
from pipeline.lib.tracking import runs
from pipeline.lib.training.calibration import calibrate
from pipeline.lib.training.head import train_head

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """A fit by either solver: the saved `head` (temperature folded in), its LiteRT `backbone`;
    `history` per L-BFGS iteration or Keras epoch (step, loss, accuracy, val_loss, val_accuracy);
    Keras' per-batch `batches` (step, epoch, loss, accuracy; None for lbfgs); `metrics`
    (train_metrics.json); the fit's wall-clock `seconds`."""

    head: Head
    backbone: bytes
    history: dict[str, list[float]]
    batches: dict[str, list[float]] | None
    metrics: dict
    seconds: float


def train(cfg: Config, callbacks: Sequence[object] = ()) -> float | None:
    """Fit the head on `paths.features`, write `paths.models` and the train reports, log it all
    to one MLflow run; return the saved head's validation accuracy (the training accuracy without
    a validation split), the value sweeps optimise. `callbacks`: Keras callbacks added to every
    Keras phase. Raises StageInputError: the prepared data or its features are missing or stale."""
    runs.check_reachable(cfg.tracking.uri, cfg.tracking.timeout_s)
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    if cfg.train.reject.target != "none" and UNKNOWN in [
        c.strip().casefold() for c in dataset.classes
    ]:
        raise UserError(
            f"a class is named {UNKNOWN!r} ({cfg.paths.prepared}/classes.json), the label "
            "train.reject gives rejected photos: rename that class folder, or set "
            "train.reject.target=none"
        )
    prepared_md5 = dvc_md5(cfg.paths.prepared)
    features = load_cached_features(cfg, prepared_md5)
    if features is None:
        raise StageInputError(
            f"{cfg.paths.features} holds no features of {cfg.paths.prepared} for this backbone: "
            "run the featurize stage first (`dvc repro featurize`)."
        )
    tags = {"dvc_prepared_md5": prepared_md5, "data_source": cfg.data.source}
    x = {s: features[s] for s in ("train", "val")}
    y = {s: dataset.labels(s) for s in ("train", "val")}
    keras = solver(cfg) == "keras"
    checkpoint = None
    if keras:  # TensorFlow is imported only when Keras trains (~5 s)
        from pipeline.lib.training import keras_fit

        checkpoint = keras_fit.checkpoint_folder(cfg, prepared_md5)
        _check_writable(cfg.train.checkpoint_dir)
    try:
        with runs.stage_run(cfg, "train", checkpoint, tags | data_tags(dataset.report)):
            _log_inputs(cfg, dataset, prepared_md5)
            if keras:
                result = _fit_keras(cfg, dataset, x, y, prepared_md5, callbacks)
            else:
                result = _fit_lbfgs(cfg, x, y, dataset.num_classes)
            _save(cfg, dataset, result)
    except TrainingDivergedError as exc:
        if not in_multirun():
            raise
        # one diverged trial must not end a search (hydra#2237): the worst score, run FAILED
        log.error("%s: this job scores -inf, the sweep goes on", exc)
        return float("-inf")
    split = "val" if result.metrics["val"]["accuracy"] is not None else "train"
    return result.metrics[split]["accuracy"]


class TrainingDivergedError(UserError):
    """Keras' loss or the head's weights stopped being finite numbers."""


def _check_writable(folder: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise UserError(
            f"train.checkpoint_dir={folder} cannot be written ({exc.strerror or exc}): choose "
            "a writable folder"
        ) from None


def _save(cfg: Config, dataset: PreparedDataset, result: TrainResult) -> None:
    _log_training(result)
    _write_reports(cfg, result)
    if cfg.train.save_model == "always" or (cfg.train.save_model == "auto" and not in_multirun()):
        _write_model_folder(cfg, dataset, result)
        write_run_record(cfg, mlflow.active_run())
        if cfg.tracking.log_model:  # registered by evaluate, with test metrics
            runs.log_model(cfg.paths.models)
    else:
        log.info("train.save_model=%s: no model saved or logged", cfg.train.save_model)


def _scores(head: Head, x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """{"loss": mean cross-entropy (nats), "accuracy"} of `head` on features `x`, labels `y`."""
    if not len(y):
        return {"loss": None, "accuracy": None}
    p = head.probabilities(x)
    loss = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()
    return {"loss": float(loss), "accuracy": float((p.argmax(1) == y).mean())}


def _fit_lbfgs(cfg: Config, x: dict, y: dict, num_classes: int) -> TrainResult:
    start = time.perf_counter()
    trained = train_head(cfg.train, x, y, num_classes)
    seconds = time.perf_counter() - start
    fit, keys = trained.fit, ("temperature", "val_nll_before", "val_nll_after", "refit_images")
    head_info = {"solver": "lbfgs", "C": fit.C, "C_choice": trained.choice}
    head_info |= {"iterations": fit.iterations, "converged": fit.converged}
    head_info |= {key: getattr(trained, key) for key in keys}
    size = trained.head.kernel.size + len(trained.head.bias)
    params = {"trainable": size, "non_trainable": 0, "total": size}
    metrics = _metrics(trained.head, x, y, head_info, cfg.train.reject, params)
    backbone = (Path(cfg.paths.features) / BACKBONE_FILE).read_bytes()
    return TrainResult(trained.head, backbone, fit.history, None, metrics, seconds)


def _fit_keras(
    cfg: Config, dataset: PreparedDataset, x: dict, y: dict, md5: str, callbacks: Sequence[object]
) -> TrainResult:
    """Keras `fit` (keras_fit), then temperature scaling of its head on the validation split and,
    for a changed backbone, its conversion to LiteRT."""
    from pipeline.lib.training import keras_fit

    fitted = keras_fit.fit_keras(cfg, dataset, x, md5, callbacks)
    losses = np.asarray(fitted.runner.history.get("loss", []), dtype=float)
    if not (np.isfinite(fitted.head.kernel).all() and np.isfinite(losses).all()):
        raise TrainingDivergedError(
            f"Keras training diverged (loss {losses[-1] if len(losses) else 'nan'}): lower "
            f"train.learning_rate (now {cfg.train.learning_rate})"
        )
    x = fitted.features or x
    calibration = {"temperature": 1.0}
    if cfg.train.calibrate and len(y["val"]):
        calibration = calibrate(fitted.head.probabilities(x["val"]), y["val"])
    head = fitted.head.scaled(calibration["temperature"])
    runner = fitted.runner
    if fitted.extractor is None:
        backbone = (Path(cfg.paths.features) / BACKBONE_FILE).read_bytes()
    else:
        backbone = convert_to_tflite(fitted.extractor)
    info = {
        "solver": "keras",
        **calibration,
        "epochs": len(runner.history["epoch"]),
        "stopped_early_at": runner.stopped,
        "phases": runner.phases,
        "resumed_from_epoch": fitted.resumed_from_epoch,
        "replicas": fitted.replicas,
    }
    metrics = _metrics(head, x, y, info, cfg.train.reject, fitted.params)
    history = {("step" if k == "epoch" else k): v for k, v in runner.history.items()}  # epoch 1st
    return TrainResult(head, backbone, history, runner.batches, metrics, fitted.seconds)


def _metrics(head: Head, x: dict, y: dict, info: dict, reject: RejectConfig, params: dict) -> dict:
    """`train_metrics.json`: the saved head's loss and accuracy on train and val, parameter
    counts, how it was fitted (`info`), the reject rule chosen on val (None: none). No timings."""
    right = head.probabilities(x["val"]).argmax(1) == y["val"]
    rule = fit_rule(reject.target, reject.value, energy(head.logits(x["val"])), right)
    return {
        "reject": None if rule is None else asdict(rule),
        "train": _scores(head, x["train"], y["train"]),
        "val": _scores(head, x["val"], y["val"]),
        "params": params,
        "head": info,
    }


def _log_inputs(cfg: Config, dataset: PreparedDataset, prepared_md5: str) -> None:
    """The config, the prepared dataset (an MLflow input, its DVC hash as digest) and its report."""
    runs.log_config(cfg)
    runs.log_dataset(
        Path(cfg.paths.prepared) / "manifest.csv",
        prepared_md5,
        name=f"{cfg.data.source}:{Path(data_root(cfg.data)).name}",
        source=str(Path(data_root(cfg.data)).resolve()),
    )
    mlflow.log_dict(dataset.report, "data/report.json")


def _log_training(result: TrainResult) -> None:
    m, info = result.metrics, result.metrics["head"]
    log.info(
        "Trained (%s) in %.1f s: train accuracy %s, val accuracy %s, val loss %s; %d trainable, "
        "%d frozen parameters",
        *(info["solver"], result.seconds, m["train"]["accuracy"], m["val"]["accuracy"]),
        m["val"]["loss"] if m["val"]["loss"] is None else round(m["val"]["loss"], 4),
        *(m["params"]["trainable"], m["params"]["non_trainable"]),
    )
    finals = runs.final_metrics(m) | {"train_seconds": result.seconds}
    finals |= {f"{k}_params": m["params"][k] for k in ("trainable", "non_trainable")}
    finals |= {
        f"head_{k}": float(v)
        for k, v in info.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    tags = {"train_solver": info["solver"]}
    if info.get("resumed_from_epoch"):  # the curves then hold the epochs run here, at their steps
        tags["resumed_from_epoch"] = str(info["resumed_from_epoch"])
    runs.log_batch(result.history, result.batches, finals, tags=tags)
    mlflow.log_dict(info, "train_head.json")


def _write_reports(cfg: Config, result: TrainResult) -> None:
    reports = Path(cfg.paths.reports)
    write_json(reports / "train_metrics.json", result.metrics)
    write_csv(reports / "train_history.csv", result.history)
    # per batch: Keras' batches; for lbfgs one full batch (the whole training split) per step
    h = result.history
    per_batch = result.batches or {"step": h["step"], "epoch": h["step"]} | {
        k: h[k] for k in ("loss", "accuracy")
    }
    write_csv(reports / "train_batches.csv", per_batch)
    names = ["train_history.csv", "train_batches.csv", "train_metrics.json"]
    runs.log_files([reports / name for name in names], "reports")
    if in_multirun():  # a sweep job's curves are its MLflow metric histories: no PNGs (0.5 s)
        return
    from pipeline.lib.reporting.figures import save_learning_curves  # matplotlib: 0.4 s

    curves, batches = result.history, result.batches  # lbfgs: x = solver step, no batches
    if batches is not None:  # Keras: x = epoch, with the per-batch curves
        curves = {("epoch" if k == "step" else k): v for k, v in result.history.items()}
    with atomic_dir(reports / "train_figures") as tmp:
        figures = save_learning_curves(curves, tmp, batches=batches)
    runs.log_files([reports / "train_figures" / p.name for p in figures], "figures")


def _write_model_folder(cfg: Config, dataset: PreparedDataset, result: TrainResult) -> None:
    """`paths.models`, replaced whole: backbone.tflite, head.npy, model.json."""
    m = cfg.model
    card = ModelCard(
        classes=list(dataset.classes),
        image_size=int(dataset.image_size),
        resize=cfg.data.resize,
        temperature=float(result.metrics["head"]["temperature"]),
        backbone={
            "name": m.name,
            "alpha": float(m.alpha),
            "weights": m.weights,
            "fine_tuned": bool(cfg.train.fine_tune.enabled or not m.freeze_backbone),
        },
        reject=result.metrics["reject"],
    )
    with atomic_dir(cfg.paths.models, "paths.models") as tmp:
        save_model_folder(tmp, result.head, card, result.backbone)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    return run_step(train, cfg)


main = entry_point(hydra_main, __doc__, sections=("train", "model", "tracking"))

if __name__ == "__main__":
    main()
