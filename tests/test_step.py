"""`pipeline.lib.config.step.check_git_identity`: inside `dvc exp run`, a step fails before any
work when git has no user name/email (DVC would fail only after the pipeline, when it commits
the experiment: "Git user name and email must be configured")."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.lib.config.step import GitIdentityError, check_git_identity


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
