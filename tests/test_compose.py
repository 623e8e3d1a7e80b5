"""`pipeline.lib.config.compose` and `python -m pipeline.params`: params.yaml is conf/ composed,
validated before it is written, and checked against conf/ by the `config` stage."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lib.config.compose import (
    HEADER,
    check_params,
    compose,
    load_params,
    warn_data_from_conf,
    write_params,
)
from pipeline.lib.config.schema import ConfigError, literal
from tests.conftest import ROOT


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """conf/ copied to a temporary project folder, params.yaml composed from it."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    write_params(tmp_path)
    return tmp_path


def params_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.params", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's package
    )


def test_params_yaml_is_what_dvc_composes(project: Path, tmp_path: Path):
    """The same values DVC's Hydra integration writes on `dvc exp run` (dvc.utils.hydra)."""
    from dvc.utils.hydra import compose_and_dump

    dvc_file = tmp_path / "dvc_params.yaml"
    compose_and_dump(dvc_file, str(project / "conf"), None, "config", str(project), ["train.C=3"])
    ours = write_params(project, ["train.C=3"], output=tmp_path / "ours.yaml")
    text = ours.read_text()
    assert text.startswith(HEADER + '["train.C=3"]\n')
    assert text.split("\n", 1)[1] == dvc_file.read_text()  # byte for byte after the header


def test_the_committed_params_yaml_is_composed_from_conf():
    """The repository's params.yaml is up to date with its conf/ (what `dvc repro` runs on)."""
    check_params(ROOT)


def test_recorded_overrides_round_trip(project: Path):
    write_params(project, ["experiment=smoke", "train.C=3"])
    values, overrides = load_params(project / "params.yaml")
    assert overrides == ["experiment=smoke", "train.C=3"]
    assert values["train"]["C"] == 3
    check_params(project)  # up to date with conf/ + its overrides


def test_a_typo_in_conf_names_the_key_and_the_file(project: Path):
    path = project / "conf/train/default.yaml"
    path.write_text(path.read_text().replace("\nepochs:", "\nepochz:"))
    with pytest.raises(ConfigError, match=r"conf/train/default\.yaml:\d+: .*'train\.epochz'"):
        write_params(project)
    proc = params_cli(project)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "train.epochz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_composition_rejects_wrong_types_and_ranges(project: Path):
    with pytest.raises(ConfigError, match="train.C"):
        write_params(project, ["train.C=0"])
    with pytest.raises(ConfigError, match="model.dropout"):
        write_params(project, ["model.dropout=high"])
    with pytest.raises(ConfigError, match="train.epochz"):
        write_params(project, ["train.epochz=3"])


def test_nothing_is_written_when_composition_fails(project: Path):
    before = (project / "params.yaml").read_bytes()
    assert params_cli(project, "train.C=-1").returncode == 2
    assert (project / "params.yaml").read_bytes() == before


def test_yaml_syntax_errors_are_one_line_with_file_and_line(project: Path):
    (project / "conf/evaluate/default.yaml").write_text("gallery_size: 12\n  bad: [\n")
    proc = params_cli(project)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "conf/evaluate/default.yaml" in proc.stderr and "line 2" in proc.stderr
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "  bad: [\n")
    with pytest.raises(ConfigError, match=r"params\.yaml:\d+: invalid YAML"):
        load_params(project / "params.yaml")


def test_an_uncomposed_conf_edit_stops_the_config_stage(project: Path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    path = project / "conf/train/default.yaml"
    path.write_text(path.read_text().replace("\nmax_iter: ", "\nmax_iter: 1"))
    proc = params_cli(project, "--check")
    assert proc.returncode == 2
    assert "params.yaml is out of date with conf/: train.max_iter" in proc.stderr
    assert "python -m pipeline.params" in proc.stderr
    # a plain `dvc exp run` (no -S) does not recompose params.yaml: refused there too
    monkeypatch.setenv("DVC_EXP_NAME", "some-exp")
    with pytest.raises(ConfigError, match=r"train\.max_iter"):
        check_params(project)


def test_a_dvc_experiments_params_yaml_is_recorded_then_checked(project: Path, monkeypatch):
    """`dvc exp run -S` writes params.yaml without our header; the config stage records the
    overrides that reproduce it, so that after `dvc exp apply` the check passes, a later conf/
    edit is still caught, and the advised command keeps the experiment's values."""
    from dvc.utils.hydra import compose_and_dump

    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    dash_s = ["experiment=smoke", "train.C=0.01", "tracking.run_name='it\\'s \\${x}'"]
    params = project / "params.yaml"
    compose_and_dump(params, str(project / "conf"), None, "config", str(project), dash_s)
    dvc_text = params.read_text()
    monkeypatch.setenv("DVC_EXP_NAME", "some-exp")
    check_params(project)  # inside `dvc exp run`: records
    header, rest = params.read_text().split("\n", 1)
    assert rest == dvc_text and header.startswith(HEADER)
    assert "train.C=0.01" in header and "data.image_size=32" in header
    monkeypatch.delenv("DVC_EXP_NAME")
    check_params(project)  # `dvc exp apply` + `dvc repro`
    assert yaml.safe_load(params.read_text())["tracking"]["run_name"] == "it's ${x}"
    path = project / "conf/train/default.yaml"
    path.write_text(path.read_text().replace("\nmax_iter: ", "\nmax_iter: 1"))
    proc = params_cli(project, "--check")
    assert proc.returncode == 2 and "train.max_iter" in proc.stderr
    advice = proc.stderr.split("Recompose it with `", 1)[1].split("`", 1)[0]
    assert advice.startswith("python -m pipeline.params ")
    assert params_cli(project, *shlex.split(advice)[3:]).returncode == 0
    values = yaml.safe_load(params.read_text())
    assert values["train"]["C"] == 0.01 and values["data"]["image_size"] == 32
    assert values["train"]["max_iter"] == 11000 and values["tracking"]["run_name"] == "it's ${x}"


def test_a_dollar_brace_folder_is_literal_in_params_yaml(project: Path):
    """conf/ escapes a folder's `${`; params.yaml holds it as written, as DVC writes it."""
    folder = "/photos/x${oc.env:HOME}/a\\${b}"
    (project / "conf/data/photos.yaml").write_text(
        "defaults:\n  - folder\n  - _self_\n" + yaml.safe_dump({"path": literal(folder)})
    )
    write_params(project, ["data=photos"])
    values, _ = load_params(project / "params.yaml")
    assert values["data"]["path"] == folder and values["data"]["dependency"] == folder
    assert compose(project / "conf", ["data=photos"]).data.path == folder
    assert check_params(project).data.path == folder


def test_check_validates_params_yaml_edited_by_hand(project: Path):
    data = yaml.safe_load((project / "params.yaml").read_text())
    data["train"]["epochz"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(data))
    proc = params_cli(project, "--check")
    assert proc.returncode == 2 and "train.epochz" in proc.stderr


def test_compose_needs_no_hydra_app_and_leaves_none(project: Path):
    from hydra.core.global_hydra import GlobalHydra

    cfg = compose(project / "conf", ["train.C=5"])
    assert cfg.train.C == 5 and "hydra" not in cfg
    assert not GlobalHydra.instance().is_initialized()


def test_data_taken_from_conf_by_dvc_exp_run_is_named_when_the_last_run_differs(
    project: Path, capsys, monkeypatch
):
    """After `dvc exp run -S data=folder -S data.path=P`, a plain `dvc exp run -S train.C=2`
    reads conf/'s data again (DVC composes conf/ with only its own -S): the config stage says so,
    also when an -S (here experiment=smoke: data.image_size=32) sets other data keys."""
    from dvc.utils.hydra import compose_and_dump

    lock = {"stages": {"prepare": {"params": {"params.yaml": {"data": {"source": "folder"}}}}}}
    lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["path"] = "/my/photos"
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.setenv("DVC_EXP_NAME", "some-exp")
    for dash_s in (["train.C=2"], ["experiment=smoke", "train.C=2"]):
        conf = str(project / "conf")
        compose_and_dump(project / "params.yaml", conf, None, "config", str(project), dash_s)
        check_params(project)  # the config stage inside `dvc exp run`
        err = capsys.readouterr().err
        assert (
            err.startswith("WARNING: this experiment reads data.source=synthetic")
            and err.count("\n") == 1
        ), dash_s
        assert "data.path=/my/photos" in err and "--use-folder" in err
    values, _ = load_params(project / "params.yaml")
    warn_data_from_conf(project, values, ["data.source=synthetic", "train.C=2"])  # asked for
    warn_data_from_conf(project, values, ["data=synthetic"])  # the data group chosen by name
    values["data"].update(source="folder", path="/my/photos")
    warn_data_from_conf(project, values, ["data.image_size=32", "train.C=2"])  # the same data
    assert capsys.readouterr().err == ""
