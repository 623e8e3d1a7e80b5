"""`pipeline.lib.config.step.check_git_identity`: inside `dvc exp run`, a step fails before any
work when git has no user name/email (DVC would fail only after the pipeline, when it commits
the experiment: "Git user name and email must be configured")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.lib.config import compose as compose_module
from pipeline.lib.config.step import GitIdentityError, check_git_identity, overrides, preflight
from tests.conftest import ROOT


@pytest.fixture
def no_identity(tmp_path, monkeypatch):
    """A git repository as cwd, a HOME without ~/.gitconfig, no system config, no identity env."""
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for who in ("AUTHOR", "COMMITTER"):
        for what in ("NAME", "EMAIL"):
            monkeypatch.delenv(f"GIT_{who}_{what}", raising=False)
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_outside_dvc_exp_run_nothing_is_checked(no_identity):
    check_git_identity()


def test_inside_dvc_exp_run_a_missing_identity_is_one_clear_error(no_identity):
    no_identity.setenv("DVC_EXP_NAME", "exp-1")
    with pytest.raises(GitIdentityError, match=r"no user.name and no user.email.*git config"):
        check_git_identity()
    subprocess.run(["git", "config", "user.name", "Ada"], check=True)
    with pytest.raises(GitIdentityError, match=r"no user.email"):
        check_git_identity()
    subprocess.run(["git", "config", "user.email", "ada@example.com"], check=True)
    check_git_identity()


def test_the_identity_variables_are_enough(no_identity):
    no_identity.setenv("DVC_EXP_NAME", "exp-1")
    for who in ("AUTHOR", "COMMITTER"):
        no_identity.setenv(f"GIT_{who}_NAME", "Ada")
        no_identity.setenv(f"GIT_{who}_EMAIL", "ada@example.com")
    check_git_identity()


def stage(cwd, *args: str) -> subprocess.CompletedProcess:
    """`python -m <args>` in `cwd` on this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--cfg", "job", "train.C=3"], ["train.C=3"]),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "--cfg", "hydra"], []),
        (["--info", "config", "a=1"], ["a=1"]),
        (["--info", "a=1", "-cn", "params", "--config-path", "..", "b=2"], ["a=1", "b=2"]),
        (["--cfg=job", "--package", "train", "+x=1"], ["+x=1"]),
    ],
)
def test_hydras_flags_and_their_values_are_not_overrides(args, expected):
    assert overrides(args) == expected


def test_cfg_in_two_words_prints_the_config_and_params_has_a_help():
    job = stage(ROOT, "pipeline.prepare", "--cfg", "job", "train.C=3")
    assert job.returncode == 0 and "C: 3" in job.stdout, job.stderr
    hydra = stage(ROOT, "pipeline.train", "hydra/launcher=joblib", "--cfg", "hydra")
    assert hydra.returncode == 0 and "hydra:" in hydra.stdout, hydra.stderr
    usage = stage(ROOT, "pipeline.params", "--help")
    assert usage.returncode == 0 and "--use-folder PATH" in usage.stdout
    wrong = stage(ROOT, "pipeline.params", "--chek")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "--chek" in wrong.stderr


@pytest.mark.parametrize("name", ["x${oc.env:HOME}", "y${oc.env:PATH,z}$"])
def test_a_dollar_brace_folder_is_read_under_its_own_name_by_every_stage(tmp_path, name):
    """--use-folder escapes it in conf/; params.yaml holds it as written (as DVC writes it); the
    stages, which load params.yaml with Hydra, read the folder named so, not $HOME."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "conf", project / "conf")
    photos = tmp_path / name
    for k, c in enumerate(("car", "bus", "van")):
        (photos / c).mkdir(parents=True)
        for i in range(6):
            pixels = np.random.default_rng(10 * k + i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(photos / c / f"{i}.png")
    assert stage(project, "pipeline.params", "--use-folder", str(photos)).returncode == 0
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["path"] == str(photos)
    assert stage(project, "pipeline.params", "--check").returncode == 0
    prepared = stage(
        project, "pipeline.prepare", "--config-path", str(project), "--config-name", "params",
        "data.image_size=32", f"paths.prepared={tmp_path / 'prepared'}",
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    assert f"your photo folder {photos} " in prepared.stdout + prepared.stderr


@pytest.mark.parametrize(
    ("argv", "job", "key"),
    [
        (["-m", "train.C=1,-5"], "#1 (train.C=-5)", "train.C"),
        (["-m", "train.solver=lbfgs,keras", "train.epochs=3"], "#0 (train.solver=lbfgs train.epochs=3)", "train.epochs"),
        (["hparams_search=head_grid", "train.solver=lbfgs", "train.epochs=4"], "#0 (train.C=0.01 train.label_smoothing=0.0 hparams_search", "train.epochs"),
        (["--multirun", "data=synthetic,folder", "data.path=/photos"], "#0 (data=synthetic data.path=/photos)", "data.path"),
        (["-m", "data=glob(*)", "train.C=2"], "#0 (data=folder train.C=2)", "data.path"),
        (["-m", "hparams_search=optuna", "train.solver=lbfgs", "model.dropout=0.1,0.3"], "lbfgs model.dropout=0.1)", "model.dropout"),
    ],
)  # fmt: skip
def test_every_job_of_a_sweep_is_validated_before_any_runs(argv, job, key, capsys):
    with pytest.raises(SystemExit) as exc:
        preflight(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert (
        err.startswith("ERROR: multirun job #") and job in err and key in err and "none ran" in err
    )


def test_a_sweep_composes_once_per_set_of_group_overrides(monkeypatch):
    """Key=value jobs are applied to one Hydra composition; a sampled interval (Optuna) is left to
    each job's own check."""
    calls, compose = [], compose_module.compose
    monkeypatch.setattr(
        compose_module, "compose", lambda *a, **k: calls.append(a) or compose(*a, **k)
    )
    preflight(["-m", "train.C=0.1,1,10,100,1000", "train.label_smoothing=0,0.1"])
    assert len(calls) == 1
    preflight(["-m", "experiment=smoke,study", "train.solver=keras", "train.C=2,3"])
    assert len(calls) == 1 + 3
    preflight(["hparams_search=optuna"])
    preflight(["-m", "hparams_search=optuna", "train.C=interval(0.1,5)", "train.solver=keras", "train.epochs=2,3"])  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["hydra.mode=MULTIRUN", "train.C=1,2"],  # Hydra's documented equivalent of -m
        ["hydra.mode=multirun", "train.C=1,2"],
        ["train.checkpoint_dir=${hydra:runtime.output_dir}/ckpt"],  # resolved in the job only
        ["-m", "train.C=1,2", "paths.models=${hydra:runtime.output_dir}/models"],
    ],
)
def test_valid_hydra_commands_pass_the_upfront_check(argv):
    preflight(argv)


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["-m", "tracking.experiment=exA,exB"], "tracking.experiment=exA,exB: a sweep cannot vary"),
        (["-m", "tracking.uri=sqlite:///a.db,sqlite:///b.db"], "run one sweep per tracking store / experiment"),
        (["--multirun", "tracking=local,server"], "tracking=local,server: a sweep cannot vary"),
        (["-m", "train.C=interval(1,2)"], "train.C=interval(1,2): interval() is sampled: add hparams_search=optuna"),
        (["-m", "train.C=range(1,3,0)"], "train.C=range(1,3,0): Hydra cannot expand this override (range() arg 3"),
        (["-m", "train.C=range(1,101),-1"], "train.C=range(1,101),-1: Hydra cannot expand this override"),
        (["-m", "experiment=null,smoke"], "multirun job #0 (experiment=null), none ran: "),
        (["experiment=null"], "experiment=null: Config group override must be a string"),
        (["-m", "train.C=range(5,1)"], "train.C=range(5,1): the sweep has no jobs"),
        (["-m", "train.C=1,2", "train.label_smoothing=range(5,1)"], "the sweep has no jobs"),
    ],
)  # fmt: skip
def test_a_sweep_hydra_cannot_run_well_is_one_line_before_any_run(argv, text, capsys):
    with pytest.raises(SystemExit) as exc:
        preflight(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and text in err, err


def test_a_sweep_whose_jobs_would_log_to_two_experiments_is_refused(tmp_path, capsys):
    """A `data.path` sweep with `tracking.experiment: auto` (named after each folder) would put
    its jobs in two MLflow experiments, away from the sweep's parent run: refused before any
    job, naming both; with one experiment set, the same sweep passes."""
    a, b = tmp_path / "roses", tmp_path / "tulips"
    a.mkdir(), b.mkdir()
    sweep = ["-m", "data=folder", f"data.path={a},{b}"]
    with pytest.raises(SystemExit) as exc:
        preflight(sweep)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert "two MLflow experiments (roses in" in err and "; tulips in" in err, err
    preflight([*sweep, "tracking.experiment=flowers"])


def test_an_invalid_job_of_a_sweep_stops_it_before_the_first_job(tmp_path):
    sweep = tmp_path / "multirun"
    proc = stage(
        ROOT, "pipeline.train", "-m", "train.C=1,-5", f"hydra.sweep.dir={sweep}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"paths.models={tmp_path}/models",
    )  # fmt: skip
    assert proc.returncode == 2 and "multirun job #1 (train.C=-5 " in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not sweep.exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "models").exists()
