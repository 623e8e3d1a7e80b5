"""The config: conf/ is the source of truth, params.yaml its snapshot, the schema guards both."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from pipeline.lib.config.schema import ConfigError, to_flat_dict, validate
from tests.conftest import ROOT, compose


def test_params_yaml_is_the_composition_of_conf():
    composed = compose()
    OmegaConf.resolve(composed)
    on_disk = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert OmegaConf.to_container(composed) == on_disk, "run `make params` to refresh params.yaml"


def test_params_yaml_is_what_make_params_writes(tmp_path):
    from pipeline.lib.config.compose import write_params

    out = write_params(ROOT, output=tmp_path / "params.yaml")
    assert out.read_text() == (ROOT / "params.yaml").read_text()


def test_experiment_study_is_the_study():
    """The study's exact settings are one override away; the default fits the head's optimum."""
    cfg = validate(compose(["experiment=study"]))
    assert cfg.train.solver == "keras" and cfg.train.epochs == 8 and cfg.train.batch_size == 32
    assert cfg.train.optimizer == "adam" and cfg.train.learning_rate == 0.001
    assert not cfg.train.early_stopping.enabled and cfg.train.C is None and not cfg.train.calibrate
    default = validate(compose())
    assert default.train.solver == "auto" and default.train.C == "auto"


def test_defaults_are_the_study_data_and_model():
    cfg = validate(compose())
    assert cfg.train.batch_size == 32 and cfg.train.optimizer == "adam"
    assert cfg.model.alpha == 1.0 and cfg.model.weights == "imagenet"
    assert cfg.data.image_size == 224 and cfg.data.source == "synthetic"
    s = cfg.data.synthetic
    assert (s.train_per_class, s.val_per_class, s.test_per_class) == (10, 25, 25)
    assert cfg.tracking.uri == "sqlite:///mlflow.db"


def test_params_yaml_validates_against_the_schema():
    cfg = validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert cfg.data.path is None and cfg.data.synthetic.dir == "data/raw/synthetic"


def test_folder_source_composes_with_its_path():
    cfg = validate(compose(["data=folder", "data.path=/photos"]))
    assert cfg.data.source == "folder" and cfg.data.path == "/photos"
    assert cfg.data.dependency == "/photos"  # what DVC's prepare stage watches
    assert cfg.data.synthetic is None


def test_folder_source_without_path_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.path"):
        validate(compose(["data=folder"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+train.epochz=3", "train.epochz"),
        ("train.epochs=many", "train.epochs"),
        ("train.epochs=-1", "train.epochs"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("model.alpha=0.6", "model.alpha"),
        ("data.image_size=31", "data.image_size"),  # MobileNetV2 needs 32 px or more
        ("tracking.registered_model=bad/name", "tracking.registered_model"),  # MLflow refuses
        ("tracking.registered_model='a:b'", "tracking.registered_model"),
        ("tracking.registered_model=' '", "tracking.registered_model"),
        ("train.optimizer=adamax", "train.optimizer"),
        ("data.leakage=ignore", "data.leakage"),
        ("model.dropout=1.5", "model.dropout"),
        ("audit.sufficiency_seeds=1000000", "audit.sufficiency_seeds"),  # hours, no progress
        ("featurize.engine=spark", "featurize.engine"),
        ("train.reject.value=1.5", "train.reject.value"),
    ],
)
def test_bad_values_fail_with_the_key_named(override, key):
    with pytest.raises(ConfigError) as info:
        validate(compose([override]))
    assert key in str(info.value)


@pytest.mark.parametrize("weights", ["imagenet", "null"])
@pytest.mark.parametrize("size", [32, 100, 200, 256])
def test_any_size_from_32_px_is_fine_with_or_without_imagenet_weights(size, weights):
    """Keras loads the 224 px ImageNet file for a size it has no file of (no top: any size)."""
    cfg = validate(compose([f"data.image_size={size}", f"model.weights={weights}"]))
    assert cfg.data.image_size == size


@pytest.mark.parametrize("name", ["x${oc.env:HOME}", "x\\${oc.env:HOME}", "${a.b}\\", "${"])
def test_a_dollar_brace_in_a_value_is_never_interpolated(name):
    """Plain values (params.yaml as loaded) stay as written through validation and access."""
    values = {"data": {"source": "folder", "path": f"/p/{name}"}, "tracking": {"run_name": name}}
    cfg = validate(values)
    assert cfg.data.path == f"/p/{name}" and cfg.tracking.run_name == name
    flat = to_flat_dict(cfg)
    assert flat["data.path"] == f"/p/{name}" and flat["tracking.run_name"] == name


def test_validated_config_is_read_only():
    cfg = validate(compose())
    with pytest.raises(ReadonlyConfigError):
        cfg.train.epochs = 3


def test_flat_dict_has_every_leaf():
    flat = to_flat_dict(validate(compose()))
    assert flat["train.C"] == "auto" and flat["train.early_stopping.patience"] == 20
    assert flat["data.synthetic.train_per_class"] == 10
    assert "model" not in flat


def test_cli_reports_a_bad_key_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.prepare",
            "+data.colour=red",
            f"hydra.run.dir={tmp_path}/hydra",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "data.colour" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_value_names_no_step_in_its_hint():
    """`tracking=server` leaves tracking.uri ???: the hint fits whichever step was run."""
    with pytest.raises(ConfigError) as exc:
        validate(compose(["tracking=server"]))
    assert "tracking.uri (marked ???)" in str(exc.value) and "pipeline.prepare" not in str(
        exc.value
    )
    assert "`tracking.uri=...` on the command line" in str(exc.value)
