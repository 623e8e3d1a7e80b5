"""The typed configuration schema that every step validates `conf/` (documented there, free of
Python references so DVC composes it alone) or its snapshot `params.yaml` against first."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.lib.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


def _in(default: Any, bounds: str) -> Any:
    """A field whose value must be in `bounds`: `>= n`, `> n` or an interval like `in [0, 1)`."""
    return field(default=default, metadata={"bounds": bounds})


def _one_of(*choices: Any) -> Any:
    """A field whose value must be one of `choices`; the first is the default."""
    return field(default=choices[0], metadata={"choices": choices})


UNIT = "in [0, 1]"
#: `data.max_pixels`' default (a decompression-bomb guard), and its highest usable value: Pillow's
#: Image.open refuses larger images (2 x Image.MAX_IMAGE_PIXELS).
MAX_PIXELS, PILLOW_MAX_PIXELS = 60_000_000, 178_956_970


@dataclass
class SplitRatios:
    """Per-class split fractions of a folder without split folders (normalised to sum 1)."""

    train: float = _in(0.7, "> 0")
    val: float = _in(0.15, ">= 0")
    test: float = _in(0.15, "> 0")


@dataclass
class SyntheticConfig:
    """The toy-truck generator; its only defaults (conf/data/synthetic.yaml repeats them)."""

    dir: str = "data/raw/synthetic"
    train_per_class: int = _in(10, ">= 1")
    val_per_class: int = _in(25, ">= 1")
    test_per_class: int = _in(25, ">= 1")
    size: int = _in(224, ">= 32")
    difficulty: float = _in(0.0, UNIT)
    seed: int = 7
    format: str = _one_of("png", "jpg")


@dataclass
class DataConfig:
    source: str = _one_of("synthetic", "folder")
    path: str | None = None
    dependency: str = "pipeline/lib/data/sources/synthetic.py"
    image_size: int = _in(224, ">= 32")
    resize: str = _one_of("stretch", "pad", "crop")
    split: SplitRatios = field(default_factory=SplitRatios)
    seed: int = 42
    max_pixels: int = _in(MAX_PIXELS, f"in [1, {PILLOW_MAX_PIXELS}]")
    min_images_per_class: int = _in(1, ">= 1")
    leakage: str = _one_of("fail", "warn")
    max_rejected_fraction: float = _in(0.2, UNIT)
    synthetic: SyntheticConfig | None = None


@dataclass
class ModelConfig:
    name: str = _one_of("mobilenet_v2")
    alpha: float = _one_of(1.0, 0.35, 0.5, 0.75, 1.3, 1.4)  # Keras' ImageNet weights
    weights: str | None = "imagenet"
    dropout: float = _in(0.0, "in [0, 1)")
    head_init: str = _one_of("zeros", "glorot_uniform", "he_normal")
    init_seed: int = 0
    freeze_backbone: bool = True


@dataclass
class FineTuneConfig:
    enabled: bool = False
    unfreeze_top_n: int = _in(30, ">= 1")
    epochs: int = _in(4, ">= 1")
    learning_rate: float = _in(1e-5, "> 0")


@dataclass
class AugmentConfig:
    enabled: bool = False
    flip: str = _one_of("horizontal", "none", "vertical", "horizontal_and_vertical")
    rotation: float = _in(0.05, UNIT)
    zoom: float = _in(0.1, UNIT)
    translation: float = _in(0.1, UNIT)
    contrast: float = _in(0.1, UNIT)
    brightness: float = _in(0.1, UNIT)


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = _in(20, ">= 0")
    min_delta: float = _in(0.0, ">= 0")


@dataclass
class PlateauConfig:
    factor: float = _in(0.2, "in (0, 1)")
    patience: int = _in(2, ">= 0")
    min_delta: float = _in(0.0001, ">= 0")
    min_lr: float = _in(0.0, ">= 0")


@dataclass
class RejectConfig:
    target: str = _one_of("none", "accuracy", "coverage")  # pipeline/lib/model/reject.py
    value: float = _in(0.99, "in (0, 1]")


@dataclass
class TrainConfig:
    solver: str = _one_of("auto", "lbfgs", "keras")
    C: Any = "auto"  # "auto", a number > 0, or None (keras only)
    max_iter: int = _in(1000, ">= 1")
    seed: int = 42
    class_weight: str = _one_of("none", "auto")
    label_smoothing: float = _in(0.0, "in [0, 1)")
    calibrate: bool = True
    refit_on_train_val: bool = False
    crossval_folds: int = _in(5, ">= 3")  # fold i tests, i + 1 validates, at least one trains
    save_model: str = _one_of("auto", "always", "never")
    epochs: int = _in(200, ">= 1")
    batch_size: int = _in(32, ">= 1")
    learning_rate: float = _in(0.001, "> 0")
    optimizer: str = _one_of("adam", "sgd", "rmsprop", "adamw")
    shuffle: bool = True
    lr_schedule: str = _one_of("none", "cosine", "reduce_on_plateau")
    plateau: PlateauConfig = field(default_factory=PlateauConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    resume: bool = False
    checkpoint_dir: str = "outputs/checkpoints"
    strategy: str = _one_of("default", "mirrored")
    reject: RejectConfig = field(default_factory=RejectConfig)


@dataclass
class FeaturizeConfig:
    batch_size: int = _in(32, ">= 1")
    num_threads: int = _in(0, ">= 0")
    engine: str = _one_of("local", "ray")
    ray_address: str | None = None
    ray_actors: int = _in(0, ">= 0")


@dataclass
class EvaluateConfig:
    gallery_size: int = _in(12, ">= 0")
    gallery_columns: int = _in(3, ">= 1")
    report_images_per_cell: int = _in(48, ">= 1")
    tta: bool = False


@dataclass
class AuditConfig:
    folds: int = _in(5, ">= 2")
    show: int = _in(10, ">= 0")
    near_duplicate_similarity: float = _in(0.95, "in (0, 1]")
    sufficiency_seeds: int = _in(5, "in [1, 100]")


EXPORT_FORMATS = ("keras", "float32", "float16", "int8")


@dataclass
class ExportTargets:
    keras: float = _in(0.99, UNIT)
    float32: float = _in(0.99, UNIT)
    float16: float = _in(0.99, UNIT)
    int8: float = _in(0.97, UNIT)


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=list)
    int8_io: str = _one_of("uint8", "int8")
    representative_samples: int = _in(100, ">= 1")
    targets: ExportTargets = field(default_factory=ExportTargets)
    latency_runs: int = _in(20, ">= 1")
    latency_warmup: int = _in(3, ">= 0")
    num_threads: int = _in(0, ">= 0")


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
    timeout_s: float = _in(10.0, "> 0")
    http_retries: int = _in(3, "in [0, 10]")  # MLflow's limits
    http_backoff_factor: int = _in(1, "in [0, 120]")


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
    audit: AuditConfig = field(default_factory=AuditConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


#: The schema with its defaults, built once (~10 ms CPU; `validate` runs for each sweep job).
_schema = functools.cache(lambda: OmegaConf.structured(Config))


def name_after_data(tracking: Any, data: Any) -> None:
    """Set `tracking.experiment` / `.registered_model` that are `auto` after `data`: the defaults
    for synthetic data, else the photo folder's name as a slug (`../flowers12` -> `flowers12`,
    `flowers12-classifier`)."""
    names = DEFAULT_EXPERIMENT, DEFAULT_REGISTERED_MODEL
    if data.source != "synthetic":
        path = Path(str(data.path))
        name = path.name if path.name not in ("", ".", "..") else path.resolve().name
        slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "photos"
        names = slug, f"{slug}-classifier"
    for key, name in zip(("experiment", "registered_model"), names, strict=True):
        if tracking[key] == AUTO:
            tracking[key] = name


#: The settings only Keras `fit` reads (sub-keys too: e.g. train.augment.rotation with augment
#: off): with `train.solver=lbfgs` they must keep their defaults.
_KERAS_TRAIN = "epochs batch_size learning_rate optimizer shuffle lr_schedule plateau"
_KERAS_TRAIN += " early_stopping resume strategy augment fine_tune"
KERAS_ONLY = (*(f"train.{k}" for k in _KERAS_TRAIN.split()), "model.dropout", "model.head_init")


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


def _in_range(value: float, spec: str) -> bool:
    if spec.startswith(">"):
        op, bound = spec.split()
        return value >= float(bound) if op == ">=" else value > float(bound)
    low, high = (float(b) for b in spec[4:-1].split(","))
    above = value >= low if spec[3] == "[" else value > low
    return above and (value <= high if spec[-1] == "]" else value < high)


def validate(cfg: DictConfig | dict[str, Any]) -> Config:
    """`cfg` merged onto the schema, range-checked, `auto` tracking names resolved, read-only.
    A DictConfig's interpolations are resolved once; a dict's values (and the result's) are
    literal: a `${` in a value (a folder's name) is never interpolated. Raises `ConfigError`
    naming the key on any missing or unknown key, wrong type or bad value."""
    try:
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        values = literal(values)
        leaves = to_flat_dict(values).items()  # OmegaConf's missing_keys: 12 ms, this 0.05
        if missing := sorted(k for k, v in leaves if "???" in (v if isinstance(v, list) else [v])):
            raise ConfigError(
                f"Missing configuration value(s): {', '.join(missing)} (marked ???). Set it, "
                f"e.g. `{missing[0]}=...` on the command line."
            )
        merged = OmegaConf.merge(_schema(), values)  # merge copies it
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        first_line = str(exc).strip().splitlines()[0]
        raise ConfigError(f"Invalid configuration at key '{key}': {first_line}") from None
    _check_values(merged)
    name_after_data(merged.tracking, merged.data)
    OmegaConf.set_readonly(merged, True)
    return merged  # type: ignore[return-value]  # a DictConfig typed as Config


def literal(value: Any) -> Any:
    """`value` (nested dicts, lists, strings) with every `${` escaped, so that OmegaConf reads
    each string as written (`\\` runs before `${` doubled, as its grammar wants)."""
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [literal(v) for v in value]
    if isinstance(value, str) and "${" in value:
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    return value


def _invalid(key: str, value: Any, msg: str) -> ConfigError:
    return ConfigError(f"Invalid configuration: {key}={value!r}: {msg}")


def _check_fields(node: DictConfig, prefix: str) -> None:
    """The `_in` bounds and `_one_of` choices of every field below `node`."""
    for f in fields(OmegaConf.get_type(node)):  # type: ignore[arg-type]
        value, key = node[f.name], f"{prefix}{f.name}"
        if isinstance(value, DictConfig):
            _check_fields(value, f"{key}.")
        elif "bounds" in f.metadata and not _in_range(value, f.metadata["bounds"]):
            raise _invalid(key, value, f"must be {f.metadata['bounds']}")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            choices = ", ".join(map(str, f.metadata["choices"]))
            raise _invalid(key, value, f"must be one of {choices}")


def _check_values(c: Any) -> None:
    _check_fields(c, "")
    d, t, a, formats = c.data, c.train, c.train.augment, list(c.export.formats)
    synthetic, use = d.source == "synthetic", "`python -m pipeline.params --use-folder PATH`"
    not_synthetic = f"is for data.source=folder, not data.source=synthetic: unset it, or {use}"
    mlflow_refuses = "MLflow refuses it (no '/' or ':', not empty, '.' or '..'): rename it, or null"
    augments = a.flip != "none" or any(v > 0 for k, v in a.items() if k not in ("enabled", "flip"))
    c_ok = t.C in ("auto", None) or type(t.C) in (int, float) and 0 < t.C < 1e12
    keras, flow = solver(c) == "keras", ", ".join(images_must_flow(c))
    changed = [k for k in KERAS_ONLY if OmegaConf.select(c, k) != OmegaConf.select(_schema(), k)]
    lbfgs_only = f"fits the head with lbfgs, to its exact optimum: {', '.join(changed)} only "
    lbfgs_only += "matter(s) to Keras fit: drop the override(s), or set train.solver=keras"
    name = c.tracking.registered_model
    name_ok = name is None or name.strip() not in ("", ".", "..") and not {"/", ":"} & set(name)
    rules = [
        (synthetic or d.path, "data.path", f"data.source=folder needs your photos' folder: {use}"),
        (not (synthetic and d.path), "data.path", not_synthetic),
        (not synthetic or d.synthetic and d.synthetic.dir, "data.synthetic.dir", "must be set"),
        (not a.enabled or augments, "train.augment.enabled", "does nothing: flip none, factors 0"),
        (c_ok, "train.C", "must be `auto`, a number in (0, 1e12) or null"),
        (set(formats) <= set(EXPORT_FORMATS), "export.formats", f"choose {EXPORT_FORMATS}"),
        (len(set(formats)) == len(formats), "export.formats", "lists a format twice"),
        (c.tracking.uri, "tracking.uri", "must not be empty"),
        (name_ok, "tracking.registered_model", mlflow_refuses),
        # a setting the chosen solver does not read is refused, not ignored
        (not (keras and t.refit_on_train_val), "train.refit_on_train_val", "needs solver=lbfgs"),
        (keras or not flow, "train.solver", f"fits cached features; {flow} needs images (keras)"),
        (keras or t.C is not None, "train.C", "has no lbfgs optimum: give a number > 0 or auto"),
        (keras or not changed, "train.solver", lbfgs_only),
    ]
    for ok, key, msg in rules:
        if not ok:
            raise _invalid(key, OmegaConf.select(c, key), msg)


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every resolved leaf under its dotted key, e.g. {'train.C': 'auto'} (for MLflow params)."""
    node = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}
    for key, value in node.items():  # type: ignore[union-attr]
        leaf = {f"{prefix}{key}": value}
        flat.update(to_flat_dict(value, f"{prefix}{key}.") if isinstance(value, dict) else leaf)
    return flat
