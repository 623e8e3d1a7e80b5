"""Data, features and models on S3-compatible object storage: `dvc push`, `dvc pull`, a fresh clone.

Real components on loopback: moto's S3 server (`python -m moto.server`, the same HTTP API as AWS S3
or MinIO) in its own process, DVC's S3 remote (dvc-s3: s3fs/aiobotocore) talking to it over HTTP,
and a temporary git + DVC copy of the project with `experiment=smoke` (tiny images, alpha 0.35, no
weights) after its first `dvc repro` (the session's `smoke_project`). The remote is configured the way the
README tells users to: `dvc remote add -d storage s3://...`, `dvc remote modify storage endpointurl`,
credentials from the standard AWS environment variables.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.project_repo import copy_reproduced, dvc, git, stages_run

pytestmark = pytest.mark.slow

BUCKET = "truck-dvc"
PREFIX = "toy-trucks"


def pipeline(repo: Path) -> tuple[list[str], list[str]]:
    """dvc.yaml's stages and its DVC-cached outputs (the `cache: false` metrics, plots and reports
    live in git, not in the remote)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    cached = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                if (opts or {}).get("cache", True) is not False:
                    cached.append(path)
    return list(stages), cached


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory: pytest.TempPathFactory):
    """Dummy credentials in the standard AWS variables (what DVC's S3 remote reads, like boto3),
    and nothing of the user's ~/.aws."""
    tmp = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_CA_BUNDLE",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="module")
def s3(aws_env, tmp_path_factory: pytest.TempPathFactory):
    """moto's S3 server on a free loopback port with one empty bucket; yields (endpoint, client)."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (
                f"moto server exited ({server.returncode}), see {log.name}"
            )
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()  # noqa: S310  (http://127.0.0.1)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert time.monotonic() < deadline, "moto server did not answer within 60 s"
                time.sleep(0.25)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def file_hashes(repo: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every file of every cached output, by path relative to the repo."""
    hashes = {}
    for out in outs:
        root = repo / out
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                hashes[path.relative_to(repo).as_posix()] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return hashes


def lock_hashes(repo: Path, outs: list[str]) -> dict[str, str]:
    """What dvc.lock records for each cached output (the md5 DVC addresses it by)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] in outs
    }


def cache_files(repo: Path) -> set[str]:
    root = repo / ".dvc" / "cache" / "files" / "md5"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def referenced_objects(repo: Path, outs: list[str]) -> set[str]:
    """The cache objects dvc.lock needs, as `ab/cdef...` names: each output's `.dir` listing and
    every file in it (the local cache may also hold superseded versions, which are not pushed)."""
    root = repo / ".dvc" / "cache" / "files" / "md5"
    names = set()
    for md5 in lock_hashes(repo, outs).values():
        names.add(f"{md5[:2]}/{md5[2:]}")
        if md5.endswith(".dir"):
            for entry in json.loads((root / md5[:2] / md5[2:]).read_text()):
                names.add(f"{entry['md5'][:2]}/{entry['md5'][2:]}")
    return names


def remote_objects(client) -> set[str]:
    keys = set()
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/"
    ):
        keys |= {obj["Key"] for obj in page.get("Contents", [])}
    return keys


def assert_up_to_date(repo: Path) -> None:
    status = dvc(repo, "status")
    assert "Data and pipelines are up to date." in status, status


@pytest.fixture(scope="module")
def pushed(s3, smoke_project, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reproduced project, the remote configured and committed, `dvc push`."""
    endpoint, _ = s3
    template, repro_output = smoke_project
    repo = copy_reproduced(template, tmp_path_factory.mktemp("project") / "repo")
    stages, outs = pipeline(repo)
    assert sorted(stages_run(repro_output)) == sorted(stages)
    assert stages_run(dvc(repo, "repro")) == []  # the copy is up to date
    dvc(repo, "remote", "add", "-d", "storage", f"s3://{BUCKET}/{PREFIX}")
    dvc(repo, "remote", "modify", "storage", "endpointurl", endpoint)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "pipeline outputs and the S3 remote")
    assert not git(repo, "status", "--porcelain").strip(), "everything not cached by DVC is in git"
    push = dvc(repo, "push")
    return {
        "repo": repo,
        "stages": stages,
        "outs": outs,
        "push": push,
        "files": file_hashes(repo, outs),
        "lock": lock_hashes(repo, outs),
    }


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def test_push_uploads_every_cached_output(pushed, s3):
    _, client = s3
    repo, outs = pushed["repo"], pushed["outs"]
    assert {"data/prepared", "data/features", "models"} <= set(outs)
    assert set(pushed["lock"]) == set(outs)
    assert {
        "data/prepared/manifest.csv",
        "data/features/train.npy",
        "models/head.npy",
        "reports/eval_figures/confusion_matrix.png",
    } <= set(pushed["files"])
    # the bucket holds every object dvc.lock needs, under DVC's content-addressed layout
    keys = remote_objects(client)
    needed = referenced_objects(repo, outs)
    assert keys == {f"{PREFIX}/files/md5/{name}" for name in needed}
    # one object per distinct file, plus one listing per folder output (a single-file output's
    # hash in dvc.lock is that file's own object)
    listings = {h for h in pushed["lock"].values() if h.endswith(".dir")}
    assert len(needed) == len(set(pushed["files"].values())) + len(listings)
    assert f"{len(keys)} files pushed" in pushed["push"], pushed["push"]
    status = dvc(repo, "status", "--cloud")
    assert "Cache and remote 'storage' are in sync." in status, status
    assert "Everything is up to date." in dvc(repo, "push")


def test_pull_restores_outputs_after_cache_and_outputs_are_deleted(pushed):
    repo, outs = pushed["repo"], pushed["outs"]
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in outs:
        remove(repo / out)
    status = dvc(repo, "status")
    assert "deleted:" in status and "data/prepared" in status, status
    dvc(repo, "pull")
    assert file_hashes(repo, outs) == pushed["files"]
    assert lock_hashes(repo, outs) == pushed["lock"]
    assert cache_files(repo) == referenced_objects(repo, outs)  # exactly what the remote held
    assert_up_to_date(repo)
    assert not git(repo, "status", "--porcelain").strip()


def test_fresh_clone_pulls_and_repro_reruns_nothing(pushed, tmp_path: Path):
    clone = tmp_path / "clone"
    git(pushed["repo"], "clone", "-q", str(pushed["repo"]), str(clone))
    for out in pushed["outs"]:
        assert not (clone / out).exists(), out
    assert not (clone / "mlflow.db").exists()  # the MLflow store is never shipped with the data
    assert "s3://" in (clone / ".dvc" / "config").read_text()
    dvc(clone, "pull")
    assert file_hashes(clone, pushed["outs"]) == pushed["files"]
    out = dvc(clone, "repro")
    assert stages_run(out) == [], out
    for stage in pushed["stages"]:
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert_up_to_date(clone)
    assert not (clone / "mlflow.db").exists()  # nothing ran, so nothing was tracked
    assert not git(clone, "status", "--porcelain").strip()
