"""`python -m pipeline.compare --photos A B` (`pipeline.lib.reporting.photo_changes`): the photos
whose prediction changed between two runs, given as MLflow run ids, git revisions or DVC
experiments, and the CI report's "Photos that changed" section."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import compare
from pipeline.evaluate import evaluate
from pipeline.featurize import featurize
from pipeline.lib.files import read_json
from pipeline.lib.reporting.ci_report import Report, Side, render_report
from pipeline.lib.reporting.photo_changes import COLUMNS, KINDS, diff_predictions, markdown
from pipeline.prepare import prepare
from pipeline.train import train
from tests.conftest import ROOT, tiny_config

# the columns in another order, and one more (as a reject option may add)
A = """path,actual,predicted,confidence,unknown
x.png,c1,c1,0.9,no
y.png,c2,c1,0.6,no
w.png,c1,c2,0.5,no
v.png,c1,c2,0.5,no
gone.png,c1,c1,0.7,no
"""
B = """confidence,predicted,actual,path
0.7,c2,c2,y.png
0.8,c1,c1,x.png
0.4,c3,c1,w.png
0.5,c2,c1,v.png
1,c1,c1,new.png
"""


def rows_of(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_diff_pairs_by_path_reads_columns_by_name_and_keeps_unpaired_photos():
    diff = diff_predictions(A, B)
    assert [row[:2] for row in diff.rows] == [
        ("wrong -> right", "y.png"),
        ("changed, both wrong", "w.png"),
        ("only in A", "gone.png"),
        ("only in B", "new.png"),
    ]
    assert dict(zip(COLUMNS, diff.rows[0], strict=True)) == {
        "change": "wrong -> right",
        "path": "y.png",
        "actual": "c2",
        "predicted_a": "c1",
        "confidence_a": "0.6",
        "predicted_b": "c2",
        "confidence_b": "0.7",
    }
    assert diff.rows[3][3:] == ("", "", "c1", "1")  # B's prediction only
    # McNemar on the 4 paired photos: x right in both, y right only in B
    assert (diff.mcnemar.n, diff.mcnemar.only_a, diff.mcnemar.only_b) == (4, 0, 1)
    assert diff.mcnemar.p_value == 1.0  # 2 * P(X <= 0), X ~ Bin(1, 1/2)
    assert diff.counts().startswith("0 right -> wrong, 1 wrong -> right, 1 changed, both wrong")
    with pytest.raises(ValueError, match="predicted"):
        diff_predictions("path,actual\nx.png,c1\n", B)


def test_sha256_pairs_photos_when_both_runs_have_it():
    a = "path,sha256,actual,predicted\nx.png,aa,c1,c1\n"
    same = diff_predictions(a, "path,sha256,actual,predicted\nx.png,aa,c1,c2\n")
    assert [row[0] for row in same.rows] == ["right -> wrong"]
    replaced = diff_predictions(a, "path,sha256,actual,predicted\nx.png,bb,c1,c1\n")
    assert [row[0] for row in replaced.rows] == ["only in A", "only in B"]  # another photo
    assert [row[0] for row in diff_predictions(a, B).rows] == ["only in B"] * 4  # by path alone


def test_ci_section_counts_and_first_paths_escaped():
    a = "path,actual,predicted\n" + "".join(f"p{i:02}<b>.png,c1,c1\n" for i in range(12))
    b = a.replace(",c1,c1", ",c1,c2")
    text = markdown(diff_predictions(a, b), top=3)
    assert text.startswith("12 right -> wrong, 0 wrong -> right")
    assert (
        "**right -> wrong**: <code>p00&lt;b&gt;.png</code>, <code>p01&lt;b&gt;.png</code>" in text
    )
    assert "and 9 more" in text and "<b>" not in text
    report = Report(Side("main", "abc1234"), Side("workspace", "workspace"))
    report.photos = diff_predictions(a, b)
    rendered = render_report(report)
    assert "#### Photos that changed" in rendered and "12 right only in base" in rendered


# --------------------------------------------------------------------------------------------
# two real runs: train.C=0.001 and train.C=1000 on the tiny synthetic data


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory):
    """Both runs (noisy features, see below) in one MLflow store; their predictions.csv committed in a git repo (two
    commits, the second also as the DVC experiment ref `exp-strong`)."""
    tmp = tmp_path_factory.mktemp("compare-photos")
    prepare(tiny_config(tmp))
    featurize(tiny_config(tmp))
    # random-weight features are all alike: noise (the same for both runs) tells photos apart
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        features = tmp / "data" / "features" / f"{split}.npy"
        alike = np.load(features)
        np.save(features, (alike + rng.normal(0, 1, alike.shape)).astype(alike.dtype))
    repo = tmp / "repo"
    (repo / "reports").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    run_ids, texts, commits = [], [], []
    for c in (0.001, 1000):
        cfg = tiny_config(tmp, **{"train.C": c})
        train(cfg)
        evaluate(cfg)
        run_ids.append(read_json(cfg.paths.run_file)["run_id"])
        texts.append((tmp / "reports" / "predictions.csv").read_text())
        (repo / "reports" / "predictions.csv").write_text(texts[-1])
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", f"C={c}"], check=True)
        commits.append(subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip())
    ref = f"refs/exps/{commits[0][:2]}/{commits[0][2:]}/exp-strong"
    subprocess.run([*git, "update-ref", ref, commits[1]], check=True)
    return {"tmp": tmp, "cfg": cfg, "repo": repo, "runs": run_ids, "texts": texts}


def expected_changes(text_a: str, text_b: str) -> dict[str, set[str]]:
    """Independently of the code under test: the photos whose prediction differs, by kind."""
    merged = pd.read_csv(io.StringIO(text_a)).merge(pd.read_csv(io.StringIO(text_b)), on="path")
    assert len(merged) == len(pd.read_csv(io.StringIO(text_a)))  # the same test photos
    differ = merged[merged.predicted_x != merged.predicted_y]
    right_a, right_b = differ.actual_x == differ.predicted_x, differ.actual_y == differ.predicted_y
    return {
        "right -> wrong": set(differ.path[right_a]),
        "wrong -> right": set(differ.path[right_b]),
        "changed, both wrong": set(differ.path[~right_a & ~right_b]),
    }


def listed(path) -> dict[str, set[str]]:
    table = pd.read_csv(path, dtype=str)
    assert list(table.columns) == list(COLUMNS)
    return {kind: set(table.path[table.change == kind]) for kind in KINDS[:3]}


@pytest.mark.slow
def test_photos_listed_are_exactly_those_whose_prediction_changed(two_runs, tmp_path, monkeypatch):
    expected = expected_changes(*two_runs["texts"])
    assert sum(map(len, expected.values())) > 0  # the two settings do disagree on some photos
    monkeypatch.chdir(two_runs["repo"])
    cfg = two_runs["cfg"]
    store = ["--tracking-uri", cfg.tracking.uri, "--experiment", cfg.tracking.experiment]
    photos = tmp_path / "photos"
    shutil.copytree(cfg.data.synthetic.dir, photos)
    pairs = {
        "runs": two_runs["runs"],
        "revisions": ["HEAD~1", "HEAD"],
        "experiment": ["HEAD~1", "exp-strong"],
        "run and revision": [two_runs["runs"][0][:8], "HEAD"],
    }
    for name, (a, b) in pairs.items():
        out = tmp_path / name / "changed.csv"
        argv = ["--photos", a, b, "--output", str(out), "--photos-root", str(photos), *store]
        assert compare.main(argv) == 0, name
        assert listed(out) == expected, name
    changed = sorted(set().union(*expected.values()))
    page = (tmp_path / "runs" / "changed.html").read_text()
    assert page.count("<img src='data:image/jpeg;base64,") == len(changed)
    # a photo that cannot be read: its path, no thumbnail
    (photos / changed[0]).write_bytes(b"not an image")
    out = tmp_path / "unreadable" / "changed.csv"
    argv = ["--photos", "HEAD~1", "HEAD", "--output", str(out), "--photos-root", str(photos)]
    assert compare.main(argv) == 0
    page = out.with_suffix(".html").read_text()
    assert page.count("<img ") == len(changed) - 1 and f"<td>{changed[0]}</td>" in page
    # no --output: into outputs/ (ignored by the project's .gitignore), not beside tracked files
    shutil.copy(ROOT / ".gitignore", two_runs["repo"])
    assert compare.main(["--photos", "HEAD~1", "HEAD", "--photos-root", str(photos)]) == 0
    assert listed(Path("outputs/photo_changes.csv")) == expected
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], capture_output=True)
    assert b"photo_changes" not in status.stdout


@pytest.mark.slow
def test_mcnemar_and_unknown_names(two_runs, monkeypatch, capsys):
    monkeypatch.chdir(two_runs["repo"])
    cfg = two_runs["cfg"]
    store = ["--tracking-uri", cfg.tracking.uri, "--experiment", cfg.tracking.experiment]
    assert compare.main(["--mcnemar", *two_runs["runs"], *store]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("McNemar's exact test on 12 paired test images")
    assert two_runs["runs"][0][:8] in printed
    assert compare.main(["--photos", "HEAD", "no-such-thing", *store]) == 2
    err = capsys.readouterr().err
    assert "'no-such-thing': no git revision or DVC experiment" in err
    assert compare.main(["--photos", "workspace", " ", *store]) == 2  # not git's staged copy
    assert "an empty run reference" in capsys.readouterr().err
