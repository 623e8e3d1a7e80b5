"""Same inputs, same bytes, and DVC sees every change that matters: `dvc.lock` reproduced in
fresh clones, a forced featurize that reruns nothing downstream, conf/ edits and typos seen
by DVC (the `config` stage)."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.lib.files import REPRODUCED_WITHIN
from pipeline.lib.reporting.ci_report import build_report, render_report
from tests.project_repo import attempt, copy_reproduced, dvc, git, stages_run

pytestmark = pytest.mark.slow

#: The same for each test probability: <= 1.9e-3 measured, where L-BFGS stops (gtol 1e-6, C 1000).
PROBABILITIES_WITHIN = 1e-2


def lock_outputs(repo: Path) -> dict[str, str]:
    """{output path: its hash in dvc.lock} of every stage output."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


def test_two_clones_record_the_same_output_hashes(smoke_project: tuple[Path, str], tmp_path: Path):
    """Same inputs, same bytes: the smoke pipeline reproduced in a second, fresh clone at another
    path (with its own MLflow store and TFLite cache) records every output with the same hash."""
    from tests.project_repo import reproduced_smoke_project

    other, output = reproduced_smoke_project(tmp_path / "elsewhere" / "clone")
    assert "evaluate" in stages_run(output)
    first, second = lock_outputs(smoke_project[0]), lock_outputs(other)
    assert set(first) == set(second) and len(first) >= 9
    differ = {path for path in first if first[path] != second[path]}
    assert not differ, f"outputs whose bytes depend on the run: {sorted(differ)}"


def test_forced_featurize_reruns_nothing_downstream(repo: Path, first_repro: str):
    """`dvc repro -f featurize` recomputes the prepared data and the features (-f forces the
    target and what it depends on) byte for byte: train stays up to date."""
    out = dvc(repo, "repro", "-f", "featurize")
    assert stages_run(out) == ["prepare", "featurize"]
    assert json.loads(dvc(repo, "status", "--json")) == {}


def test_a_conf_edit_is_seen_by_dvc(repo: Path, first_repro: str, tmp_path: Path):
    """Editing conf/train/default.yaml: `dvc status` lists train (and the config guard), and
    `dvc repro` stops at the guard, naming the key, until params.yaml is recomposed."""
    from tests.project_repo import compose_params

    work = copy_reproduced(repo, tmp_path / "repo")
    path = work / "conf/train/default.yaml"
    path.write_text(path.read_text().replace("\nseed: 42", "\nseed: 43"))
    status = json.loads(dvc(work, "status", "--json"))
    # evaluate and export read train.fine_tune.enabled (whether the cached features still
    # describe the model), so conf/train feeds their params too; prepare and featurize: no
    assert set(status) == {"config", "train", "evaluate", "export"}, status
    proc = attempt([sys.executable, "-m", "dvc", "repro"], work)
    assert proc.returncode != 0
    assert "params.yaml is out of date with conf/: train.seed" in proc.stdout + proc.stderr
    compose_params(work, "experiment=smoke")
    ran = stages_run(dvc(work, "repro"))
    assert ran[:2] == ["config", "train"] and "featurize" not in ran and "prepare" not in ran


def test_a_typo_in_conf_stops_dvc_exp_run(repo: Path, first_repro: str, tmp_path: Path):
    """`epochz: 5` in conf/: `dvc exp run` (which recomposes params.yaml) fails, naming it."""
    work = copy_reproduced(repo, tmp_path / "repo")
    path = work / "conf/train/default.yaml"
    path.write_text(path.read_text() + "epochz: 5\n")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "typo")
    proc = attempt([sys.executable, "-m", "dvc", "exp", "run", "-S", "experiment=smoke"], work)
    assert proc.returncode != 0
    assert "train.epochz" in proc.stdout + proc.stderr
    assert "Running stage 'train'" not in proc.stdout


#: The git-tracked outputs whose numbers another CPU reproduces only within REPRODUCED_WITHIN.
NUMBERS = ["reports/metrics.json", "reports/train_metrics.json", "reports/predictions.csv"]


def numbers(value: object, name: str = "") -> dict[str, float]:
    """{dotted name: value} of every number in a JSON value."""
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return {k: v for key, item in items for k, v in numbers(item, f"{name}.{key}").items()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {name.lstrip("."): float(value)}
    return {}


def reproduced_numbers(texts: dict[str, str]) -> dict[str, float]:
    """Every metric (metrics.json, train_metrics.json's train and val) and every test
    confidence, by photo and predicted class (predictions.csv)."""
    train = json.loads(texts["reports/train_metrics.json"])
    found = numbers(json.loads(texts["reports/metrics.json"]), "metrics.json")
    found |= numbers({s: train[s] for s in ("train", "val")}, "train_metrics.json")
    for row in csv.DictReader(io.StringIO(texts["reports/predictions.csv"])):
        found[f"predictions.csv {row['path']} as {row['predicted']}"] = float(row["confidence"])
    return found


def drifts(committed: dict[str, str], repo: Path) -> dict[str, float]:
    """{name: |reproduced - committed|} of `reproduced_numbers` (inf: on one side only, e.g. a
    photo predicted as another class)."""
    a = reproduced_numbers(committed)
    b = reproduced_numbers({name: (repo / name).read_text() for name in NUMBERS})
    return {k: abs(a[k] - b[k]) if k in a and k in b else math.inf for k in a.keys() | b.keys()}


def beyond_tolerance(moved: dict[str, float]) -> str:
    """'' when every metric is within REPRODUCED_WITHIN and every test confidence within
    PROBABILITIES_WITHIN, else what differs beyond them."""
    limit = {
        k: PROBABILITIES_WITHIN if k.startswith("predictions.csv") else REPRODUCED_WITHIN
        for k in moved
    }
    beyond = {k: v for k, v in moved.items() if not v <= limit[k]}
    largest = sorted(moved.items(), key=lambda item: -item[1])[:3]
    limits = f"{REPRODUCED_WITHIN} (metrics) or {PROBABILITIES_WITHIN} (test confidences)"
    return f"beyond {limits}: {beyond} (largest drifts: {largest})" if beyond else ""


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A clone of this repository after `dvc repro`: the committed default (default data,
    ImageNet weights) made again from nothing; and that repro's output."""
    from tests.conftest import ROOT

    clone = tmp_path_factory.mktemp("fresh") / "clone"
    git(clone.parent, "clone", "-q", str(ROOT), str(clone))
    return clone, dvc(clone, "repro", timeout=1500)


def test_a_fresh_clone_reproduces_the_committed_lock(fresh_clone: tuple[Path, str]):
    """The committed default: a fresh clone's `dvc repro` ends up to date, and changes no tracked
    file on this machine. Another CPU computes other float bytes (dvc.lock's hashes and the
    git-tracked reports change there): every committed metric and test confidence is then
    reproduced within REPRODUCED_WITHIN, and nothing else changes."""
    clone, output = fresh_clone
    assert "evaluate" in stages_run(output)
    assert json.loads(dvc(clone, "status", "--json")) == {}
    changed = [line[3:] for line in git(clone, "status", "--porcelain").splitlines()]
    others = [path for path in changed if path != "dvc.lock" and not path.startswith("reports/")]
    assert not others, f"a fresh clone's `dvc repro` changed tracked files: {changed}"
    committed = {name: git(clone, "show", f"HEAD:{name}") for name in NUMBERS}
    assert not beyond_tolerance(drifts(committed, clone)), beyond_tolerance(
        drifts(committed, clone)
    )


#: Relative noise on every feature: ~80 float32 ulps, more than other kernels give (the
#: fresh-clone case: the same ECE to 1.6e-8, the same confidences to the 6th digit).
NOISE = 1e-5


def test_features_of_another_cpu_reproduce_every_number_within_the_tolerance(
    fresh_clone: tuple[Path, str], tmp_path: Path
):
    """Another CPU, simulated: the default's features x (1 + U(-NOISE, NOISE)), recorded as
    featurize's output; train and evaluate again reproduce every metric and test confidence
    within REPRODUCED_WITHIN, and the CI report calls every metric unchanged."""
    repo = copy_reproduced(fresh_clone[0], tmp_path / "repo")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "reproduced here")
    committed = {name: (repo / name).read_text() for name in NUMBERS}
    rng = np.random.default_rng(0)
    for path in sorted((repo / "data/features").glob("*.npy")):
        x = np.load(path)
        noisy = (x * (1 + rng.uniform(-NOISE, NOISE, x.shape))).astype(np.float32)
        assert (noisy != x).mean() > 0.5
        path.unlink()  # hard-linked into DVC's cache
        np.save(path, noisy)
    dvc(repo, "commit", "-f", "featurize")  # as if featurize had computed them
    assert stages_run(dvc(repo, "repro", "evaluate"))[:2] == ["train", "evaluate"]
    moved = drifts(committed, repo)
    assert not beyond_tolerance(moved), beyond_tolerance(moved)
    print(
        f"\nfeatures x (1 +- {NOISE}): largest drifts",
        sorted(moved.items(), key=lambda i: -i[1])[:4],
    )

    report = build_report(repo, "HEAD", "workspace", tmp_path / "report.md")
    assert len(report.metrics) >= 5
    assert not [row for row in report.metrics if row.changed], render_report(report)
    assert "Test accuracy unchanged" in render_report(report)
