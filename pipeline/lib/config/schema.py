"""The typed configuration schema.

`conf/` (plain YAML, composed by Hydra) is the source of truth and `params.yaml` its composed
snapshot. Both are validated here, at the start of every step, by merging them onto these
dataclasses: an unknown key, a wrong type or an out-of-range value stops the step before any work,
with the offending key named. The YAML stays free of Python references on purpose, so DVC's own
Hydra composition (`dvc exp run -S ...`) can compose `conf/` without importing this package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.lib.errors import UserError

#: Alphas and input sizes Keras offers ImageNet weights for (keras.applications.MobileNetV2).
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MOBILENET_SIZES = (96, 128, 160, 192, 224)


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


@dataclass
class SplitRatios:
    """Used when a folder has class sub-folders but no train/val/test split: the fractions of
    each class's images that go to each split (normalised to sum 1; stratified, `data.seed`)."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclass
class SyntheticConfig:
    """The deterministic toy-truck generator (the default, embedded dataset). These defaults are
    the only ones: conf/data/synthetic.yaml repeats them and the generator's CLI reads them here."""

    #: The folder the generator owns: it writes its image files there (and a marker file listing
    #: them), deletes only files it wrote, and refuses a folder holding anything else.
    dir: str = "data/raw/synthetic"
    train_per_class: int = 10
    val_per_class: int = 25
    test_per_class: int = 25
    #: Side of the generated image files, in pixels (prepare resizes them to `data.image_size`).
    size: int = 224
    #: 0 = studio shots with slight variation (like the study's photos of one toy per class);
    #: 1 = strong jitter in pose, lighting, blur and noise.
    difficulty: float = 0.0
    seed: int = 7
    format: str = "png"


@dataclass
class DataConfig:
    """The `data` group: where the images come from, how prepare decodes, resizes and splits them,
    and the checks that make it fail (leakage, rejected fraction, classes too small).
    """

    #: `synthetic` (generated toy trucks) or `folder` (your photos).
    source: str = "synthetic"
    #: `folder`: where your photos are (read only, never written to). Must be null (unset) for the
    #: `synthetic` source, which writes into its own `data.synthetic.dir`.
    path: str | None = None
    #: What DVC's prepare stage watches (dvc.yaml `${data.dependency}`): the folder of photos, or
    #: for the synthetic source the generator's code.
    dependency: str = "pipeline/lib/data/sources/synthetic.py"
    #: Every image is decoded, converted to RGB and resized to this square size once, in prepare.
    image_size: int = 224
    #: How to resize: `pad` keeps the aspect ratio (letterbox), `stretch` ignores it, `crop` centre-crops.
    resize: str = "stretch"
    #: Split ratios for a folder of class sub-folders with no split folders.
    split: SplitRatios = field(default_factory=SplitRatios)
    seed: int = 42
    #: Images larger than this many pixels are refused (decompression-bomb guard).
    max_pixels: int = 60_000_000
    #: A class with fewer usable training images than this stops prepare.
    min_images_per_class: int = 1
    #: Same image in two splits: `fail` (default) or `warn`.
    leakage: str = "fail"
    #: Fraction of rejected files above which prepare fails instead of going on.
    max_rejected_fraction: float = 0.2
    synthetic: SyntheticConfig | None = None


@dataclass
class ModelConfig:
    """The `model` group: the backbone (MobileNetV2 width `alpha`, its initial `weights`, frozen or
    not) and the new classification head (dropout, initialisation).
    """

    name: str = "mobilenet_v2"
    alpha: float = 1.0
    #: `imagenet`, a path to a Keras weights file, or null for random initialisation.
    weights: str | None = "imagenet"
    dropout: float = 0.0
    #: Initial weights of the new Dense layer. `zeros` (the default) starts the linear head from
    #: uniform class scores, so the few Adam steps of a small study (60 images x 8 epochs = 16
    #: steps) move it by what the data says rather than fighting random initial logits; Keras'
    #: default `glorot_uniform` is offered for comparison.
    head_init: str = "zeros"
    #: Seed of the backbone's random initialisation when `weights` is null.
    init_seed: int = 0
    #: The backbone stays frozen (transfer learning, as in the study).
    freeze_backbone: bool = True


@dataclass
class FineTuneConfig:
    """Phase 2: after the head has trained (phase 1), unfreeze the top of the backbone and train
    the whole model end to end on images at a much lower learning rate."""

    enabled: bool = False
    #: How many of the backbone's last layers (of its 154, counted from the top) become trainable;
    #: BatchNormalization layers among them stay frozen and in inference mode.
    unfreeze_top_n: int = 30
    #: Epochs of phase 2, numbered after phase 1's (one continuous history).
    epochs: int = 4
    learning_rate: float = 1e-5


@dataclass
class AugmentConfig:
    """Random image augmentation (Keras preprocessing layers, active only in training). When on,
    training runs end to end on images: the cached features cannot be used."""

    enabled: bool = False
    #: `horizontal`, `vertical`, `horizontal_and_vertical` or `none`.
    flip: str = "horizontal"
    #: Fractions as Keras takes them: rotation of 2 pi, zoom / translation of the image size,
    #: contrast / brightness of the range; 0 leaves that augmentation out.
    rotation: float = 0.05
    zoom: float = 0.1
    translation: float = 0.1
    contrast: float = 0.1
    brightness: float = 0.1


@dataclass
class EarlyStoppingConfig:
    """Stop when val_loss (loss without a validation split) has not improved by `min_delta` for
    `patience` epochs, and restore the best epoch's weights."""

    enabled: bool = True
    patience: int = 20
    min_delta: float = 0.0


@dataclass
class PlateauConfig:
    """`train.lr_schedule=reduce_on_plateau`: multiply the learning rate by `factor` when val_loss
    has not improved by `min_delta` for `patience` epochs (not below `min_lr`)."""

    factor: float = 0.2
    patience: int = 2
    min_delta: float = 0.0001
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """The `train` group: how the head is fitted (`solver`), its penalty, calibration and class
    weights; Keras' optimizer, epochs, schedules, early stopping, augmentation and fine-tuning
    when images must flow (`solver=keras`).
    """

    #: `lbfgs`: the exact optimum of the L2-regularised softmax regression on the cached features
    #: (pipeline.lib.training.head); `keras`: Keras `fit` (the study's Adam, augmentation,
    #: fine-tuning, an unfrozen backbone); `auto`: keras where images must flow, else lbfgs.
    solver: str = "auto"
    #: Inverse L2 strength on the Dense kernel (scikit-learn's C): `auto` = cross-validated on the
    #: training split (lbfgs; Keras uses C = 1), a number > 0, or null = no penalty (keras only).
    C: Any = "auto"
    #: lbfgs: the most solver iterations.
    max_iter: int = 1000
    seed: int = 42
    #: `none` or `auto` (sklearn's `balanced` weights from the training split's class counts).
    class_weight: str = "none"
    #: Targets (1 - eps) onehot + eps / K, as Keras' CategoricalCrossentropy(label_smoothing).
    label_smoothing: float = 0.0
    #: Temperature scaling: fit T on the validation split (minimum NLL) and fold it into the head,
    #: so the saved model's probabilities are calibrated. Skipped (with a warning) without one.
    calibrate: bool = True
    #: lbfgs: after calibrating on val, fit the head again on train + val at the same C.
    refit_on_train_val: bool = False
    #: `python -m pipeline.crossval`: stratified k-fold over train + val on the cached features.
    crossval_folds: int = 5
    #: Whether the model folder is written to `paths.models` and logged as the MLflow model:
    #: `auto` = yes, except in a Hydra sweep job (`-m`); `always`; `never`.
    save_model: str = "auto"
    # Keras `fit` only (solver=keras); with lbfgs a value other than these defaults is refused.
    epochs: int = 200
    batch_size: int = 32
    learning_rate: float = 0.001
    optimizer: str = "adam"
    shuffle: bool = True
    #: `none`, `cosine` (CosineDecay to 0 over each phase's steps) or `reduce_on_plateau`.
    lr_schedule: str = "none"
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    #: Continue an interrupted Keras run from its last per-epoch checkpoint (same config and
    #: data), reaching the same final weights and metrics; false starts afresh.
    resume: bool = False
    #: Where Keras saves the training state after every epoch (one folder per run, removed when
    #: training finishes); keep it outside the DVC-tracked paths.
    checkpoint_dir: str = "outputs/checkpoints"
    #: tf.distribute strategy: `default` (one device) or `mirrored` (every visible GPU, else CPU).
    strategy: str = "default"


#: The settings only Keras `fit` reads: with `train.solver=lbfgs` they must keep their defaults.
KERAS_ONLY = (
    "train.epochs",
    "train.batch_size",
    "train.learning_rate",
    "train.optimizer",
    "train.shuffle",
    "train.lr_schedule",
    "train.plateau",
    "train.early_stopping",
    "train.resume",
    "train.strategy",
    "model.dropout",
    "model.head_init",
)


def images_must_flow(c: Any) -> list[str]:
    """The settings that need Keras `fit` on images (empty: the head fits on cached features)."""
    reasons = {
        "model.freeze_backbone=false": not c.model.freeze_backbone,
        "train.augment.enabled=true": c.train.augment.enabled,
        "train.fine_tune.enabled=true": c.train.fine_tune.enabled,
    }
    return [name for name, applies in reasons.items() if applies]


def solver(c: Any) -> str:
    """`train.solver` resolved: `lbfgs` or `keras` (`auto`: keras where images must flow)."""
    if c.train.solver == "auto":
        return "keras" if images_must_flow(c) else "lbfgs"
    return c.train.solver


@dataclass
class FeaturizeConfig:
    """The `featurize` group: how the frozen backbone's features are computed with LiteRT for the
    cache (batch size in images, interpreter count); neither changes the features.
    """

    batch_size: int = 32
    #: Single-threaded LiteRT interpreters run side by side, each on a shard of every batch
    #: (`features.ShardedTFLite`); 0 = one per usable core. Never changes the features.
    num_threads: int = 0


@dataclass
class EvaluateConfig:
    """The `evaluate` group: the test-set prediction gallery and report (image counts, columns)
    and test-time augmentation.
    """

    #: Number of test images in the prediction gallery.
    gallery_size: int = 12
    gallery_columns: int = 3
    #: The evaluation report (reports/eval_report.html): most thumbnails one panel shows.
    report_images_per_cell: int = 48
    #: Test-time augmentation: average the probabilities of each image and its horizontal flip.
    tta: bool = False


#: Export formats (`export.formats`): a Keras whole model, and TensorFlow Lite files built from it.
EXPORT_FORMATS = ("keras", "float32", "float16", "int8")


@dataclass
class ExportTargets:
    """Top-1 agreement with the model (`Classifier`) on the test split each export should reach
    (recorded as met or not in reports/export_metrics.json; the stage does not fail below it)."""

    keras: float = 0.99
    float32: float = 0.99
    float16: float = 0.99
    int8: float = 0.97


@dataclass
class ExportConfig:
    """The `export` stage: the trained model as a Keras whole model and TensorFlow Lite files,
    each checked against the model folder's `Classifier`."""

    #: Any of `keras` (a .keras whole model), `float32`, `float16` (float16 weights) and `int8`
    #: (full-integer quantization); empty (the default): nothing is exported, no TensorFlow.
    formats: list[str] = field(default_factory=list)
    #: Input and output type of the int8 model: `uint8` (camera bytes in, as they are) or `int8`.
    int8_io: str = "uint8"
    #: Training images that calibrate the int8 quantization (all of them when there are fewer).
    representative_samples: int = 100
    targets: ExportTargets = field(default_factory=ExportTargets)
    #: Single-image latency: median of this many `invoke()` calls, after `latency_warmup` calls.
    latency_runs: int = 20
    latency_warmup: int = 3
    #: CPU threads of the TFLite interpreter (XNNPACK); 0 = all cores.
    num_threads: int = 0


#: The MLflow store, experiment and registered model every tool defaults to (one place): those
#: of the default data (the synthetic toy trucks).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "toy-trucks"
DEFAULT_REGISTERED_MODEL = "toy-truck-classifier"
#: `tracking.experiment` / `tracking.registered_model` value that means "named after the data"
#: (see `tracking_names`).
AUTO = "auto"


def tracking_names(data: Any) -> tuple[str, str]:
    """(experiment, registered model) named after the data of the `data` config: the defaults for
    the synthetic toy trucks, else the photo folder's name (`data.path`, resolved when it is "."
    or ".."), lower-cased, other characters than letters, digits, `.`, `_`, `-` made `-`:
    `../shared/data/flowers12` -> ("flowers12", "flowers12-classifier")."""
    if data.source == "synthetic":
        return DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL
    path = Path(str(data.path))
    name = path.name if path.name not in ("", ".", "..") else path.resolve().name
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "photos"
    return slug, f"{slug}-classifier"


def resolve_tracking_names(cfg: Any) -> None:
    """Replace `auto` in `cfg.tracking.experiment` / `.registered_model` by `tracking_names`."""
    experiment, registered = tracking_names(cfg.data)
    if cfg.tracking.experiment == AUTO:
        cfg.tracking.experiment = experiment
    if cfg.tracking.registered_model == AUTO:
        cfg.tracking.registered_model = registered


@dataclass
class TrackingConfig:
    """The `tracking` group: the MLflow store, experiment, artifact location, run name, model
    logging and registration, and the timeouts (s) and retries for a remote tracking server.
    """

    #: `sqlite:///mlflow.db` (a local store; a relative file is relative to the project, also
    #: for queued DVC experiments) or `http(s)://host:port` (an MLflow tracking server).
    uri: str = DEFAULT_TRACKING_URI
    #: The MLflow experiment; `auto`: named after the data (`tracking_names`: `toy-trucks` for
    #: the synthetic data, the folder's name for photos, e.g. `flowers12`).
    experiment: str = AUTO
    #: Where a new experiment keeps its artifacts: a local folder or a URI for a local store; with
    #: a tracking server null (the server's choice: `mlflow-artifacts:/`, uploaded through it to
    #: its --artifacts-destination) or a URI such as `s3://...` (a local folder is ignored there).
    artifact_location: str | None = "mlartifacts"
    run_name: str | None = None
    log_model: bool = True
    #: The MLflow Model Registry name each pipeline run's model is registered under (null: none;
    #: `auto`: named after the data, `toy-truck-classifier`, `flowers12-classifier`, ...).
    registered_model: str | None = AUTO
    #: Seconds to wait for a remote tracking server before failing, per request.
    timeout_s: float = 10.0
    #: Tracking server: retries of a failed request (MLflow's default, 7, takes minutes to give up
    #: on a dead server), and the backoff factor between them (sleeps 0, 2f, 4f, ... s).
    http_retries: int = 3
    http_backoff_factor: int = 1


@dataclass
class PathsConfig:
    """The `paths` group: the project-relative folders (and the run file) each stage reads and
    writes.
    """

    raw: str = "data/raw"
    prepared: str = "data/prepared"
    features: str = "data/features"
    models: str = "models"
    reports: str = "reports"
    exports: str = "exports"
    #: The MLflow run that trained `models` ({"run_id", "experiment_id", "tracking_uri",
    #: "model_md5"}), where evaluate and export log theirs. Not inside `models`: a run id differs on
    #: every run, and the DVC output `models` must be the same bytes for the same inputs.
    run_file: str = "outputs/mlflow_run.json"


@dataclass
class Config:
    """The whole validated configuration (Hydra's structured schema): one field per config group."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


_CHOICES = {
    "data.source": ("synthetic", "folder"),
    "data.resize": ("stretch", "pad", "crop"),
    "data.leakage": ("fail", "warn"),
    "model.name": ("mobilenet_v2",),
    "model.head_init": ("zeros", "glorot_uniform", "he_normal"),
    "train.optimizer": ("adam", "sgd", "rmsprop", "adamw"),
    "train.class_weight": ("none", "auto"),
    "train.lr_schedule": ("none", "cosine", "reduce_on_plateau"),
    "train.strategy": ("default", "mirrored"),
    "train.solver": ("auto", "lbfgs", "keras"),
    "train.save_model": ("auto", "always", "never"),
    "train.augment.flip": ("none", "horizontal", "vertical", "horizontal_and_vertical"),
}


def validate(cfg: DictConfig | dict[str, Any]) -> Config:
    """Merge `cfg` onto the schema and check ranges; return a typed, read-only `Config`.

    Raises `ConfigError` naming the key on any unknown key, wrong type or bad value.
    """
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    try:
        missing = sorted(OmegaConf.missing_keys(raw))
    except OmegaConfBaseException as exc:  # an interpolation to a missing value
        raise ConfigError(f"Invalid configuration: {_first_line(exc)}") from None
    if missing:
        raise ConfigError(
            f"Missing configuration value(s): {', '.join(missing)} (marked ???). Set it, e.g. "
            f"`python -m pipeline.prepare {missing[0]}=...`."
        )
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"Invalid configuration at key '{key}': {_first_line(exc)}") from None
    _check_values(merged)
    resolve_tracking_names(merged)
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]  # a DictConfig typed as Config


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _check_values(c: Any) -> None:
    def need(ok: bool, key: str, msg: str) -> None:
        """Raise ConfigError naming `key`, its value in the config and `msg` unless `ok`."""
        if not ok:
            value = OmegaConf.select(c, key)
            raise ConfigError(f"Invalid configuration: {key}={value!r}: {msg}")

    for key, choices in _CHOICES.items():
        need(OmegaConf.select(c, key) in choices, key, f"must be one of {', '.join(choices)}")
    d, m, t = c.data, c.model, c.train
    need(d.image_size >= 32, "data.image_size", "must be at least 32 pixels")
    for name in ("train", "val", "test"):
        need(d.split[name] >= 0, f"data.split.{name}", "must be >= 0")
    need(d.split.train > 0 and d.split.test > 0, "data.split", "train and test ratios must be > 0")
    need(d.max_pixels > 0, "data.max_pixels", "must be > 0")
    need(d.min_images_per_class >= 1, "data.min_images_per_class", "must be >= 1")
    need(0 <= d.max_rejected_fraction <= 1, "data.max_rejected_fraction", "must be in [0, 1]")
    _check_data_source(d)
    if d.source == "synthetic":
        need(d.synthetic is not None, "data.synthetic", "is required when data.source=synthetic")
        need(bool(d.synthetic.dir), "data.synthetic.dir", "must not be empty")
        s = d.synthetic
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            need(s[name] >= 1, f"data.synthetic.{name}", "must be >= 1")
        need(0 <= s.difficulty <= 1, "data.synthetic.difficulty", "must be in [0, 1]")
        need(s.size >= 32, "data.synthetic.size", "must be at least 32 pixels")
        need(s.format in ("png", "jpg"), "data.synthetic.format", "must be png or jpg")
    need(m.alpha in MOBILENET_ALPHAS, "model.alpha", f"MobileNetV2 offers alpha {MOBILENET_ALPHAS}")
    need(0 <= m.dropout < 1, "model.dropout", "must be in [0, 1)")
    if m.weights == "imagenet":
        need(
            d.image_size in MOBILENET_SIZES,
            "data.image_size",
            f"Keras has ImageNet weights for MobileNetV2 only at sizes {MOBILENET_SIZES} "
            "(set data.image_size to one of them, or model.weights=null)",
        )
    _check_solver(c)
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    _check_train_options(t, need)
    need(c.featurize.batch_size >= 1, "featurize.batch_size", "must be >= 1")
    need(c.featurize.num_threads >= 0, "featurize.num_threads", "must be >= 0")
    need(c.evaluate.gallery_size >= 0, "evaluate.gallery_size", "must be >= 0")
    need(c.evaluate.gallery_columns >= 1, "evaluate.gallery_columns", "must be >= 1")
    need(
        c.evaluate.report_images_per_cell >= 1,
        "evaluate.report_images_per_cell",
        "must be >= 1",
    )
    _check_export(c.export, need)
    need(c.tracking.timeout_s > 0, "tracking.timeout_s", "must be > 0")
    # MLflow refuses more than 10 retries and a backoff factor above 120
    need(0 <= c.tracking.http_retries <= 10, "tracking.http_retries", "must be in [0, 10]")
    need(
        0 <= c.tracking.http_backoff_factor <= 120,
        "tracking.http_backoff_factor",
        "must be in [0, 120]",
    )
    need(bool(c.tracking.uri), "tracking.uri", "must not be empty")


def _check_data_source(d: Any) -> None:
    """data.path belongs to the folder source only: a photo folder is never a synthetic target."""
    if d.source == "folder" and not d.path:
        raise ConfigError(
            "Missing configuration value: data.path (data.source=folder): set it to your photo "
            "folder, e.g. `python -m pipeline.params --use-folder /path/to/photos`."
        )
    if d.source == "synthetic" and d.path:
        raise ConfigError(
            f"Invalid configuration: data.path={d.path!r} is set, but data.source=synthetic "
            "(generated toy trucks; data.path is only where your photos are). To train on that "
            f"folder run `python -m pipeline.params --use-folder {d.path}` (or add data=folder); "
            "for the synthetic data leave data.path unset."
        )


def _check_train_options(t: Any, need: Any) -> None:
    """train.label_smoothing, .plateau, .early_stopping, .augment, .fine_tune."""
    need(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    p, e, a, f = t.plateau, t.early_stopping, t.augment, t.fine_tune
    need(0 < p.factor < 1, "train.plateau.factor", "must be in (0, 1)")
    need(p.patience >= 0, "train.plateau.patience", "must be >= 0")
    need(p.min_delta >= 0, "train.plateau.min_delta", "must be >= 0")
    need(p.min_lr >= 0, "train.plateau.min_lr", "must be >= 0")
    need(e.patience >= 0, "train.early_stopping.patience", "must be >= 0")
    need(e.min_delta >= 0, "train.early_stopping.min_delta", "must be >= 0")
    for name in ("rotation", "zoom", "translation", "contrast", "brightness"):
        need(0 <= a[name] <= 1, f"train.augment.{name}", "must be in [0, 1]")
    need(
        not a.enabled
        or a.flip != "none"
        or any(a[n] > 0 for n in ("rotation", "zoom", "translation", "contrast", "brightness")),
        "train.augment.enabled",
        "is true but flip is none and every factor is 0",
    )
    need(f.unfreeze_top_n >= 1, "train.fine_tune.unfreeze_top_n", "must be >= 1")
    need(f.epochs >= 1, "train.fine_tune.epochs", "must be >= 1")
    need(f.learning_rate > 0, "train.fine_tune.learning_rate", "must be > 0")
    c_ok = t.C in ("auto", None) or (
        isinstance(t.C, int | float) and not isinstance(t.C, bool) and t.C > 0
    )
    need(c_ok, "train.C", f"must be `auto`, a number > 0 or null, got {t.C!r}")
    need(t.max_iter >= 1, "train.max_iter", "must be >= 1")
    # fold i tests, fold i + 1 validates, the others train: 2 folds would leave none to train
    need(t.crossval_folds >= 3, "train.crossval_folds", "must be >= 3")


def _check_solver(c: Any) -> None:
    """A setting the chosen solver does not read is refused, not ignored."""
    must_flow = images_must_flow(c)
    if solver(c) == "keras":
        if c.train.refit_on_train_val:
            raise ConfigError(
                "Invalid configuration: train.refit_on_train_val=true works with "
                "train.solver=lbfgs only (set it to false)"
            )
        return
    if must_flow:
        raise ConfigError(
            f"Invalid configuration: train.solver=lbfgs fits the head on cached features, but "
            f"{', '.join(must_flow)} needs images: use train.solver=keras (or auto)"
        )
    if c.train.C is None:
        raise ConfigError(
            "Invalid configuration: train.C=null (no penalty) has no optimum with "
            "train.solver=lbfgs on separable classes: give a number > 0 or auto"
        )
    defaults = OmegaConf.structured(Config)
    changed = [
        key for key in KERAS_ONLY if OmegaConf.select(c, key) != OmegaConf.select(defaults, key)
    ]
    if changed:
        raise ConfigError(
            f"Invalid configuration: {', '.join(changed)} only matter(s) to Keras fit, and "
            "train.solver=lbfgs fits the head to its exact optimum: drop the override(s), or "
            "set train.solver=keras"
        )


def _check_export(x: Any, need: Any) -> None:
    """export.formats, .int8_io, .representative_samples, .targets, latency settings."""
    formats = list(x.formats)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    need(
        not unknown,
        "export.formats",
        f"unknown format {', '.join(map(str, unknown))}; choose from {', '.join(EXPORT_FORMATS)}",
    )
    need(len(set(formats)) == len(formats), "export.formats", "names a format twice")
    need(len(set(formats)) == len(formats), "export.formats", "lists a format twice")
    need(x.int8_io in ("uint8", "int8"), "export.int8_io", "must be uint8 or int8")
    need(x.representative_samples >= 1, "export.representative_samples", "must be >= 1")
    for name in EXPORT_FORMATS:
        need(0 <= x.targets[name] <= 1, f"export.targets.{name}", "must be in [0, 1]")
    need(x.latency_runs >= 1, "export.latency_runs", "must be >= 1")
    need(x.latency_warmup >= 0, "export.latency_warmup", "must be >= 0")
    need(x.num_threads >= 0, "export.num_threads", "must be >= 0")


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """Every resolved value under a dotted key, e.g. {'train.epochs': 8} (for MLflow params)."""
    container = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        """Record the leaves of `node` in `flat` under their dotted keys (`prefix` + key path)."""
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(container, "")
    return flat
