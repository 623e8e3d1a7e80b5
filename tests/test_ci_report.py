"""The pull-request report (`python -m pipeline.ci_report`) and the CI workflow that posts it.

The end-to-end tests use two commits of the reproduced `experiment=smoke` project (the session's
`smoke_project`), each after a real run of the pipeline: the first with the smoke params
(`train.C=auto`), the second after `dvc exp run -S train.C=0.1` (train, evaluate and export
rerun). The report compares them the way CI compares a pull request with its base branch.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.lib.reporting.ci_report import (
    Change,
    CIReportError,
    Moved,
    confusion_changes,
    confusion_from_predictions,
    confusion_table,
    main,
    render_metrics,
    resolve_revision,
    verdict,
)
from tests.conftest import ROOT
from tests.project_repo import copy_reproduced, dvc, git, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PRED = "reports/predictions.csv"


# --------------------------------------------------------------------------------------------
# pure parts


PREDICTIONS = """path,actual,predicted,confidence
a.png,cat,cat,0.9
b.png,cat,dog,0.6
c.png,dog,dog,0.8
d.png,dog,dog,0.7
e.png,bird,cat,0.5
"""


def test_confusion_from_predictions_counts_true_by_predicted():
    matrix, classes = confusion_from_predictions(PREDICTIONS)
    assert classes == ["bird", "cat", "dog"]  # sorted union of actual and predicted
    assert matrix == [
        [0, 1, 0],  # bird: predicted cat once
        [0, 1, 1],  # cat: right once, dog once
        [0, 0, 2],
    ]  # dog: right twice
    # a given order is kept; labels it lacks are appended; unseen classes get empty rows/columns
    matrix, classes = confusion_from_predictions(PREDICTIONS, ["dog", "cat", "fox"])
    assert classes == ["dog", "cat", "fox", "bird"]
    assert matrix[0] == [2, 0, 0, 0] and matrix[2] == [0, 0, 0, 0] and matrix[3] == [0, 1, 0, 0]
    assert confusion_from_predictions("path,actual,predicted,confidence\n") == ([], [])
    with pytest.raises(CIReportError, match="predicted"):
        confusion_from_predictions("path,actual\nx,cat\n")


def test_confusion_table_and_changes():
    base = confusion_from_predictions(PREDICTIONS)
    head = confusion_from_predictions(PREDICTIONS.replace("b.png,cat,dog", "b.png,cat,cat"))
    table = confusion_table(*base)
    assert table.splitlines()[0] == "| true \\ predicted | bird | cat | dog |"
    assert "| cat | 0 | **1** | 1 |" in table and "| dog | 0 | 0 | **2** |" in table
    assert confusion_changes(base, head) == [
        Moved(actual="cat", predicted="cat", base=1, head=2),
        Moved(actual="cat", predicted="dog", base=1, head=0),
    ]
    assert confusion_changes(base, base) == []
    # a class name cannot open an HTML comment or tag, or a new cell, in the PR comment
    hostile = confusion_table([[1]], ["<!--a|b&<img src=x>"])
    assert "| &lt;!--a\\|b&amp;&lt;img src=x> | **1** |" in hostile and "<" not in hostile


def _row(name: str, old, new, file: str = "reports/metrics.json") -> Change:
    return Change(file, name, old, new)


def test_change_of_numbers_and_of_other_values():
    assert _row("a", 0.5, 0.75).change == 0.25 and _row("a", 0.5, 0.75).changed
    assert _row("a", 1, 1 + 1e-13).changed is False  # within TOLERANCE
    # another CPU's ECE (the fresh-clone case): within REPRODUCED_WITHIN, so unchanged
    assert _row("test.ece", 0.03327697833379107, 0.03327696243921914).changed is False
    assert "unchanged" in verdict(_row("test.ece", 0.0332769783, 0.0332769624), "test.ece")
    assert _row("test.ece", 0.0332, 0.0334).changed  # beyond it
    assert _row("a", None, 0.5).change is None and _row("a", None, 0.5).changed
    assert _row("a", True, 1).change is None  # a bool is not a number
    assert _row("a", "x", "x").changed is False and _row("a", [1], [2]).changed


def test_verdict_up_down_unchanged_missing():
    assert "up" in verdict(_row("test.accuracy", 0.5, 0.75)) and "0.5 → 0.75" in verdict(
        _row("test.accuracy", 0.5, 0.75)
    )
    assert "Test accuracy down" in verdict(_row("test.accuracy", 0.75, 0.5))
    assert "Test accuracy unchanged" in verdict(_row("test.accuracy", 0.5, 0.5))
    assert "base has none" in verdict(_row("test.accuracy", None, 0.5))
    assert "not found" in verdict(None)


def test_a_number_becoming_nan_is_a_change_and_nan_to_nan_is_not():
    nan = float("nan")
    assert _row("test.ece", 0.02, nan).changed and _row("test.ece", nan, 0.02).changed
    assert not _row("test.ece", nan, float("nan")).changed  # two NaN objects: unchanged
    assert "⚠️ **Test accuracy became NaN**: 0.02 → nan" in verdict(_row("test.accuracy", 0.02, nan))
    assert "(was nan at the base)" in verdict(_row("test.accuracy", nan, 0.5))
    assert "Test accuracy unchanged" in verdict(_row("test.accuracy", nan, float("nan")))
    text = render_metrics([_row("test.accuracy", 0.5, 0.5), _row("test.ece", 0.02, nan)])
    assert "`test.ece` | 0.02 | nan | changed" in text and "+nan" not in text


def test_render_metrics_shows_changed_and_headline_folds_the_rest():
    rows = [
        _row("test.accuracy", 0.5, 0.5),
        _row("test.macro_f1", 0.4, 0.6),
        _row("test.support.cat", 2.0, 2.0),
        _row("loss", 1.0, 0.5, "reports/train.json"),
    ]
    text = render_metrics(rows)
    shown, folded = text.split("<details>", 1)
    assert "| `test.accuracy` | 0.5 | 0.5 | 0 |" in shown
    assert "| `test.macro_f1` | 0.4 | 0.6 | +0.2 (+50 %) |" in shown
    assert "test.support.cat" in folded.split("</details>")[0]
    assert "**`reports/train.json`**" in text and "| `loss` | 1 | 0.5 | -0.5 (-50 %) |" in text


# --------------------------------------------------------------------------------------------
# errors (a tiny git repository, no pipeline run)


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "small"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text("")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "empty project", "--allow-empty")
    return repo


def test_unknown_revision_exits_2_with_the_revision_named(
    small_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "report.md"
    assert main(["--repo", str(small_repo), "--base", "no-such-branch", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown git revision 'no-such-branch'" in err and "fetch-depth" in err
    assert not out.exists()
    assert (
        main(
            [
                "--repo",
                str(small_repo),
                "--base",
                "HEAD",
                "--head",
                "deadbeef",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "'deadbeef'" in capsys.readouterr().err
    with pytest.raises(CIReportError, match="not a git repository"):
        resolve_revision(tmp_path, "HEAD")


def test_dvc_failure_exits_2_with_dvc_stderr(
    small_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    (small_repo / ".dvc" / "config").write_text("[core]\n    no_such_option = 1\n")
    assert (
        main(["--repo", str(small_repo), "--base", "HEAD", "--output", str(tmp_path / "report.md")])
        == 2
    )
    err = capsys.readouterr().err
    assert "dvc metrics diff failed" in err and "no_such_option" in err  # dvc's own message


# --------------------------------------------------------------------------------------------
# end to end: two commits of a real pipeline


@pytest.fixture(scope="module")
def history(
    smoke_project: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str]:
    """(repo, first commit, second commit): the smoke run, then `dvc exp run -S train.C=0.1`."""
    repo = copy_reproduced(smoke_project[0], tmp_path_factory.mktemp("ci-report-project") / "repo")
    git(repo, "add", "-A")  # dvc.lock and the git-tracked reports; DVC-cached outputs are ignored
    git(repo, "commit", "-qm", "smoke run")
    first = git(repo, "rev-parse", "HEAD").strip()
    dvc(repo, "exp", "run", "-S", "experiment=smoke", "-S", "train.C=0.1")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "stronger L2 penalty")
    return repo, first, git(repo, "rev-parse", "HEAD").strip()


def _links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


@pytest.mark.slow
def test_report_between_two_commits(history: tuple[Path, str, str], tmp_path: Path):
    repo, first, second = history
    tracked = git(repo, "ls-files").split()
    assert "reports/predictions.csv" in tracked and "reports/metrics.json" in tracked
    assert "reports/eval_figures/confusion_matrix.png" not in tracked  # DVC-cached

    output = tmp_path / "out" / "report.md"
    images = tmp_path / "out" / "img"
    assert (
        main(
            [
                "--repo",
                str(repo),
                "--base",
                first,
                "--head",
                second,
                "--output",
                str(output),
                "--images-dir",
                str(images),
            ]
        )
        == 0
    )
    report = output.read_text()

    # header: both short SHAs, the verdict on test accuracy
    assert f"`{first[:7]}`" in report and f"`{second[:7]}`" in report
    lines = report.splitlines()
    assert lines[0].startswith("## Pipeline report:")
    verdict_line = next(line for line in lines if "Test accuracy" in line)
    assert re.search(r"Test accuracy (up|down|unchanged)", verdict_line), verdict_line

    # params: exactly what changed between the commits
    params = report.split("### Params", 1)[1].split("###", 1)[0]
    assert "| `train.C` | auto | 0.1 |" in params
    assert "model.alpha" not in params  # unchanged params are not listed

    # metrics: the test metrics (reports/metrics.json, the one DVC metrics file) with the
    # accuracy's interval
    metrics = report.split("### Metrics", 1)[1].split("### Params", 1)[0]
    assert re.search(r"^\| `test\.accuracy` \| [0-9.]+ \| [0-9.]+ \| ", metrics, re.M)
    assert "`test.ci_low`" in metrics and "`test.macro_f1`" in metrics

    # confusion matrices: two PNGs, linked relative to the report, plus the text tables
    assert _links(report) == ["img/confusion_base.png", "img/confusion_head.png"]
    for link in _links(report):
        _assert_png(output.parent / link)
    assert report.count("| true \\ predicted |") == 2
    assert report.count("12 test images") == 2  # smoke: 6 classes x 2 test images
    assert "Container_Small_B" in report
    assert "#### What moved" in report

    # the photos that changed: counted as the two commits' predictions.csv say
    old, new = (
        {r["path"]: r for r in csv.DictReader(io.StringIO(git(repo, "show", f"{rev}:{PRED}")))}
        for rev in (first, second)
    )
    worse = sum(old[p]["actual"] == old[p]["predicted"] != new[p]["predicted"] for p in old)
    better = sum(new[p]["actual"] == new[p]["predicted"] != old[p]["predicted"] for p in old)
    photos = report.split("#### Photos that changed", 1)[1].split("####", 1)[0].strip()
    assert photos.startswith(f"{worse} right -> wrong, {better} wrong -> right, ")


@pytest.mark.slow
def test_report_against_the_workspace_as_cli(history: tuple[Path, str, str], tmp_path: Path):
    """As CI runs it: a subprocess, head = workspace (the default), images next to the report."""
    repo, first, second = history
    output = tmp_path / "report.md"
    proc = run(
        [sys.executable, "-m", "pipeline.ci_report", "--base", first, "--output", str(output)], repo
    )
    assert "Test accuracy" in proc.stdout
    report = output.read_text()
    assert f"`{first[:7]}` → workspace" in report
    assert "| `train.C` | auto | 0.1 |" in report
    assert _links(report) == ["confusion_base.png", "confusion_head.png"]
    for link in _links(report):
        _assert_png(tmp_path / link)


# --------------------------------------------------------------------------------------------
# the CI workflow and the console script


def test_workflow_runs_pipeline_report_and_tests():
    workflow = yaml.safe_load((ROOT / ".github/workflows/pipeline.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["main"]
    jobs = workflow["jobs"]
    assert {"test", "pipeline"} <= set(jobs)

    def steps(job: str) -> list[dict]:
        return jobs[job]["steps"]

    def uses(job: str, action: str) -> dict:
        return next(s for s in steps(job) if s.get("uses", "").startswith(action))

    def script(job: str) -> str:
        return "\n".join(s.get("run", "") for s in steps(job))

    for job in ("test", "pipeline"):
        assert uses(job, "actions/checkout@")["with"]["fetch-depth"] == 0
        setup = uses(job, "actions/setup-python@")["with"]
        assert str(setup["python-version"]) == "3.11" and setup["cache"] == "pip"
        assert "make install" in script(job)
    assert "make test" in script("test")

    pipeline = script("pipeline")
    assert (
        workflow["env"]["WEIGHTS"]
        == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    )
    assert workflow["env"]["WEIGHTS_URL"].endswith("/" + workflow["env"]["WEIGHTS"])
    assert "~/.keras/models/$WEIGHTS" in pipeline and "~/.keras/models/$WEIGHTS" in script("test")
    # in order: install, weights, pipeline, report
    order = [
        pipeline.index(s)
        for s in (
            "make install",
            "~/.keras/models",
            "dvc repro",
            "python -m pipeline.ci_report",
            "GITHUB_STEP_SUMMARY",
        )
    ]
    assert order == sorted(order)
    assert "python -m pipeline.ci_report" in pipeline and "--output report.md" in pipeline
    assert "origin/${{ github.base_ref }}" in pipeline
    assert "$GITHUB_STEP_SUMMARY" in pipeline
    comment = uses("pipeline", "marocchino/sticky-pull-request-comment@")
    assert comment["with"]["path"] == "report.md" and "pull_request" in comment["if"]
    artifact = uses("pipeline", "actions/upload-artifact@v4")["with"]
    assert "report-images" in artifact["path"] and "report.md" in artifact["path"]
    assert jobs["pipeline"]["permissions"]["pull-requests"] == "write"


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["truck-ci-report"] == "pipeline.ci_report:main"
