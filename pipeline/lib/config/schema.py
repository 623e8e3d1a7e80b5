"""The typed configuration schema, checked at the start of every step.

`conf/` (plain YAML composed by Hydra, documented there) is the source of truth and `params.yaml`
its composed snapshot. `validate` merges either onto these dataclasses: an unknown key, a wrong
type or an out-of-range value raises `ConfigError` naming the key, before any work. The YAML holds
no Python references, so DVC's Hydra composition (`dvc exp run -S ...`) never imports this package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.lib.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


@dataclass
class SplitRatios:
    """Per-class split fractions of a folder without split folders (normalised to sum 1)."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15


@dataclass
class SyntheticConfig:
    """The toy-truck generator; its only defaults (conf/data/synthetic.yaml repeats them)."""

    dir: str = "data/raw/synthetic"
    train_per_class: int = 10
    val_per_class: int = 25
    test_per_class: int = 25
    size: int = 224
    difficulty: float = 0.0
    seed: int = 7
    format: str = "png"


@dataclass
class DataConfig:
    source: str = "synthetic"
    path: str | None = None
    dependency: str = "pipeline/lib/data/sources/synthetic.py"
    image_size: int = 224
    resize: str = "stretch"
    split: SplitRatios = field(default_factory=SplitRatios)
    seed: int = 42
    max_pixels: int = 60_000_000
    min_images_per_class: int = 1
    leakage: str = "fail"
    max_rejected_fraction: float = 0.2
    synthetic: SyntheticConfig | None = None


@dataclass
class ModelConfig:
    name: str = "mobilenet_v2"
    alpha: float = 1.0
    weights: str | None = "imagenet"
    dropout: float = 0.0
    head_init: str = "zeros"
    init_seed: int = 0
    freeze_backbone: bool = True


@dataclass
class FineTuneConfig:
    enabled: bool = False
    unfreeze_top_n: int = 30
    epochs: int = 4
    learning_rate: float = 1e-5


@dataclass
class AugmentConfig:
    enabled: bool = False
    flip: str = "horizontal"
    rotation: float = 0.05
    zoom: float = 0.1
    translation: float = 0.1
    contrast: float = 0.1
    brightness: float = 0.1


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 20
    min_delta: float = 0.0


@dataclass
class PlateauConfig:
    factor: float = 0.2
    patience: int = 2
    min_delta: float = 0.0001
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """conf/train/: the head's solver and penalty, then the settings only Keras `fit` reads."""

    solver: str = "auto"
    C: Any = "auto"  # "auto", a number > 0, or None (keras only)
    max_iter: int = 1000
    seed: int = 42
    class_weight: str = "none"
    label_smoothing: float = 0.0
    calibrate: bool = True
    refit_on_train_val: bool = False
    crossval_folds: int = 5
    save_model: str = "auto"
    epochs: int = 200
    batch_size: int = 32
    learning_rate: float = 0.001
    optimizer: str = "adam"
    shuffle: bool = True
    lr_schedule: str = "none"
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    resume: bool = False
    checkpoint_dir: str = "outputs/checkpoints"
    strategy: str = "default"


@dataclass
class FeaturizeConfig:
    batch_size: int = 32
    num_threads: int = 0


@dataclass
class EvaluateConfig:
    gallery_size: int = 12
    gallery_columns: int = 3
    report_images_per_cell: int = 48
    tta: bool = False


EXPORT_FORMATS = ("keras", "float32", "float16", "int8")


@dataclass
class ExportTargets:
    keras: float = 0.99
    float32: float = 0.99
    float16: float = 0.99
    int8: float = 0.97


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=list)
    int8_io: str = "uint8"
    representative_samples: int = 100
    targets: ExportTargets = field(default_factory=ExportTargets)
    latency_runs: int = 20
    latency_warmup: int = 3
    num_threads: int = 0


#: The MLflow store, experiment and registered model of the default (synthetic) data.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "toy-trucks"
DEFAULT_REGISTERED_MODEL = "toy-truck-classifier"
#: `tracking.experiment` / `.registered_model` value meaning "named after the data".
AUTO = "auto"


@dataclass
class TrackingConfig:
    uri: str = DEFAULT_TRACKING_URI
    experiment: str = AUTO
    artifact_location: str | None = "mlartifacts"
    run_name: str | None = None
    log_model: bool = True
    registered_model: str | None = AUTO
    timeout_s: float = 10.0
    http_retries: int = 3
    http_backoff_factor: int = 1


@dataclass
class PathsConfig:
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    features: str = "data/features"
    models: str = "models"
    reports: str = "reports"
    exports: str = "exports"
    run_file: str = "outputs/mlflow_run.json"


@dataclass
class Config:
    """The whole validated configuration: one field per config group."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def tracking_names(data: Any) -> tuple[str, str]:
    """(experiment, registered model) named after `data`: the defaults for synthetic data, else
    the photo folder's name as a slug (`../flowers12` -> `flowers12`, `flowers12-classifier`)."""
    if data.source == "synthetic":
        return DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL
    path = Path(str(data.path))
    name = path.name if path.name not in ("", ".", "..") else path.resolve().name
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "photos"
    return slug, f"{slug}-classifier"


#: The settings only Keras `fit` reads: with `train.solver=lbfgs` they must keep their defaults.
KERAS_ONLY = (
    *(f"train.{k}" for k in ("epochs", "batch_size", "learning_rate", "optimizer", "shuffle")),
    *(f"train.{k}" for k in ("lr_schedule", "plateau", "early_stopping", "resume", "strategy")),
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


_CHOICES: dict[str, tuple[Any, ...]] = {
    "data.source": ("synthetic", "folder"),
    "data.resize": ("stretch", "pad", "crop"),
    "data.leakage": ("fail", "warn"),
    "data.synthetic.format": ("png", "jpg"),
    "model.name": ("mobilenet_v2",),
    "model.alpha": (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),  # Keras' MobileNetV2 ImageNet weights
    "model.head_init": ("zeros", "glorot_uniform", "he_normal"),
    "train.solver": ("auto", "lbfgs", "keras"),
    "train.class_weight": ("none", "auto"),
    "train.save_model": ("auto", "always", "never"),
    "train.optimizer": ("adam", "sgd", "rmsprop", "adamw"),
    "train.lr_schedule": ("none", "cosine", "reduce_on_plateau"),
    "train.strategy": ("default", "mirrored"),
    "train.augment.flip": ("none", "horizontal", "vertical", "horizontal_and_vertical"),
    "export.int8_io": ("uint8", "int8"),
}
IMAGENET_SIZES = (96, 128, 160, 192, 224)
_AUGMENTS = ("rotation", "zoom", "translation", "contrast", "brightness")
#: Range -> the keys that must be in it (`>= n`, `> n` or an interval: also the error message).
_RANGES = {
    ">= 0": "data.split.train data.split.val data.split.test train.plateau.patience "
    "train.plateau.min_delta train.plateau.min_lr train.early_stopping.patience "
    "train.early_stopping.min_delta featurize.num_threads evaluate.gallery_size "
    "export.latency_warmup export.num_threads",
    ">= 1": "data.min_images_per_class data.synthetic.train_per_class "
    "data.synthetic.val_per_class data.synthetic.test_per_class train.max_iter train.epochs "
    "train.batch_size train.fine_tune.unfreeze_top_n train.fine_tune.epochs "
    "featurize.batch_size evaluate.gallery_columns evaluate.report_images_per_cell "
    "export.representative_samples export.latency_runs",
    ">= 3": "train.crossval_folds",  # fold i tests, i + 1 validates: 2 would leave none to train
    ">= 32": "data.image_size data.synthetic.size",
    "> 0": "data.max_pixels train.learning_rate train.fine_tune.learning_rate tracking.timeout_s",
    "in [0, 1]": "data.max_rejected_fraction data.synthetic.difficulty "
    + " ".join(f"train.augment.{k}" for k in _AUGMENTS)
    + " ".join(f" export.targets.{f}" for f in EXPORT_FORMATS),
    "in [0, 1)": "model.dropout train.label_smoothing",
    "in (0, 1)": "train.plateau.factor",
    "in [0, 10]": "tracking.http_retries",  # MLflow's limits
    "in [0, 120]": "tracking.http_backoff_factor",
}


def _in_range(value: float, spec: str) -> bool:
    if spec.startswith(">"):
        op, bound = spec.split()
        return value >= float(bound) if op == ">=" else value > float(bound)
    low, high = (float(b) for b in spec[4:-1].split(","))
    above = value >= low if spec[3] == "[" else value > low
    return above and (value <= high if spec[-1] == "]" else value < high)


def validate(cfg: DictConfig | dict[str, Any]) -> Config:
    """`cfg` merged onto the schema, range-checked, `auto` tracking names resolved, read-only.

    Raises `ConfigError` naming the key on any missing or unknown key, wrong type or bad value.
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
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"Invalid configuration at key '{key}': {_first_line(exc)}") from None
    _check_values(merged)
    experiment, registered = tracking_names(merged.data)
    if merged.tracking.experiment == AUTO:
        merged.tracking.experiment = experiment
    if merged.tracking.registered_model == AUTO:
        merged.tracking.registered_model = registered
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]  # a DictConfig typed as Config


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _invalid(c: Any, key: str, msg: str) -> ConfigError:
    return ConfigError(f"Invalid configuration: {key}={OmegaConf.select(c, key)!r}: {msg}")


def _check_values(c: Any) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(c, key)  # None: data.synthetic of the folder source
        if value not in choices and not (value is None and key.startswith("data.synthetic")):
            raise _invalid(c, key, f"must be one of {', '.join(map(str, choices))}")
    for spec, keys in _RANGES.items():
        for key in keys.split():
            value = OmegaConf.select(c, key)
            if value is not None and not _in_range(value, spec):
                raise _invalid(c, key, f"must be {spec}")
    d, t, a, formats = c.data, c.train, c.train.augment, list(c.export.formats)
    hint = "`python -m pipeline.params --use-folder /path/to/photos`"
    rules = [
        (d.source != "folder" or d.path, "data.path", f"data.source=folder needs it: {hint}"),
        (
            d.source != "synthetic" or not d.path,
            "data.path",
            f"is where your photos are, but data.source=synthetic: unset it, or {hint}",
        ),
        (
            d.source != "synthetic" or (d.synthetic is not None and d.synthetic.dir),
            "data.synthetic.dir",
            "must be set for data.source=synthetic",
        ),
        (d.split.train > 0 and d.split.test > 0, "data.split", "train and test must be > 0"),
        (
            d.image_size in IMAGENET_SIZES or c.model.weights != "imagenet",
            "data.image_size",
            f"Keras has ImageNet weights for MobileNetV2 only at sizes {IMAGENET_SIZES} "
            "(set data.image_size to one of them, or model.weights=null)",
        ),
        (
            not a.enabled or a.flip != "none" or any(a[k] > 0 for k in _AUGMENTS),
            "train.augment.enabled",
            "is true but flip is none and every factor is 0",
        ),
        (
            t.C in ("auto", None)
            or (isinstance(t.C, int | float) and not isinstance(t.C, bool) and t.C > 0),
            "train.C",
            "must be `auto`, a number > 0 or null",
        ),
        (set(formats) <= set(EXPORT_FORMATS), "export.formats", f"choose {EXPORT_FORMATS}"),
        (len(set(formats)) == len(formats), "export.formats", "lists a format twice"),
        (bool(c.tracking.uri), "tracking.uri", "must not be empty"),
        *_solver_rules(c),
    ]
    for ok, key, msg in rules:
        if not ok:
            raise _invalid(c, key, msg)


def _solver_rules(c: Any) -> list[tuple[bool, str, str]]:
    """A setting the chosen solver does not read is refused, not ignored."""
    if solver(c) == "keras":
        refit = not c.train.refit_on_train_val
        return [(refit, "train.refit_on_train_val", "works with train.solver=lbfgs only")]
    defaults = OmegaConf.structured(Config)
    changed = [k for k in KERAS_ONLY if OmegaConf.select(c, k) != OmegaConf.select(defaults, k)]
    if changed:
        raise ConfigError(
            f"Invalid configuration: {', '.join(changed)} only matter(s) to Keras fit, and "
            "train.solver=lbfgs fits the head to its exact optimum: drop the override(s), or "
            "set train.solver=keras"
        )
    must_flow = ", ".join(images_must_flow(c))
    return [
        (
            not must_flow,
            "train.solver",
            f"lbfgs fits the head on cached features, but {must_flow} needs images: "
            "use train.solver=keras (or auto)",
        ),
        (c.train.C is not None, "train.C", "has no optimum with lbfgs: give a number > 0 or auto"),
    ]


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every resolved leaf under its dotted key, e.g. {'train.C': 'auto'} (for MLflow params)."""
    node = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}
    for key, value in node.items():  # type: ignore[union-attr]
        if isinstance(value, dict):
            flat.update(to_flat_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
