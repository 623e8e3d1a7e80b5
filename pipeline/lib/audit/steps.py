"""The audit (evaluate, `python -m pipeline.audit`) of the photos, on the cached features, for a
person to act on (nothing is changed); one report per step in `paths.reports`, logged to MLflow:
1. near_duplicates.csv: pairs of near-identical photos; across splits as `data.leakage` says.
2. label_issues.csv: train+val photos, the most likely mislabelled first (console: `audit.show`).
3. sufficiency.csv, audit_figures/sufficiency.png: test accuracy against training photos per
   class, with the gain expected from twice as many (console: one sentence per class)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.lib import audit
from pipeline.lib.audit.label_issues import LabelIssue, out_of_fold_probabilities, rank_label_issues
from pipeline.lib.audit.near_duplicates import NearDuplicate, near_duplicates
from pipeline.lib.audit.sufficiency import sentence, sufficiency_curve
from pipeline.lib.config.schema import Config
from pipeline.lib.data.prepared import PreparedDataset, SourceImages
from pipeline.lib.errors import StageInputError
from pipeline.lib.files import dvc_md5, write_json
from pipeline.lib.model.features import load_cached_features, stacked
from pipeline.lib.tracking import runs
from pipeline.lib.training.head import choose_c

log = logging.getLogger(__name__)


def run_audit(cfg: Config, dataset: PreparedDataset) -> dict[str, dict[str, float]]:
    """Run the audit steps (module docstring) on the cached features of `dataset`; write their
    reports and audit.json into `paths.reports`; return the figures (for MLflow: `log_audit`).
    Raises StageInputError (no features of these photos), NearDuplicateLeakage."""
    features = load_cached_features(cfg, dvc_md5(cfg.paths.prepared))
    if features is None:
        raise StageInputError(
            f"{cfg.paths.features} holds no features of {cfg.paths.prepared}: run the featurize "
            "stage first (`dvc repro featurize`)."
        )
    every, reports, t = stacked(features), Path(cfg.paths.reports), cfg.train
    fit_args = {"class_weight": t.class_weight, "label_smoothing": t.label_smoothing}
    x, y, k = features["train"], dataset.labels("train"), dataset.num_classes
    auto = not isinstance(t.C, int | float)  # train's cross-validated choice (cached: paid once)
    c = choose_c(x, y, k, t.seed, **fit_args)[0] if auto else float(t.C)
    summary = {
        "near_duplicates": check_near_duplicates(cfg, dataset, every, reports),
        "label_issues": list_label_issues(cfg, dataset, every, reports, c),
    }
    summary["sufficiency"], sentences = data_sufficiency(cfg, dataset, features, reports, c)
    write_json(reports / audit.AUDIT_JSON, summary | {"sentences": sentences})
    return summary


def log_audit(
    reports: Path,
    summary: dict[str, dict[str, float]],
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Log `run_audit`'s figures (metrics audit_<step>_<name>, in one request with the caller's
    `metrics` and `tags`) and reports (artifacts under audit/) to the active MLflow run."""
    figures = {f"audit_{k}_{n}": v for k, s in summary.items() for n, v in s.items()}
    runs.log_batch(metrics=(metrics or {}) | figures, tags=tags)
    runs.log_files([reports / audit.SUFFICIENCY_PNG], "audit/audit_figures")  # each only if written
    names = [audit.AUDIT_JSON, audit.NEAR_DUPLICATES_CSV, audit.LABEL_ISSUES_CSV]
    runs.log_files([reports / name for name in [*names, audit.SUFFICIENCY_CSV]], "audit")


def check_near_duplicates(
    cfg: Config, dataset: PreparedDataset, x: np.ndarray, reports: Path
) -> dict[str, float]:
    """Step 1: near_duplicates.csv over every split (`x`: all features); leakage as configured."""
    rows = dataset.manifest()
    threshold = cfg.audit.near_duplicate_similarity
    images = SourceImages(dataset.root, rows, dataset.image_size, dataset.resize)
    pairs = near_duplicates(x, images, [r.path for r in rows], [r.split for r in rows], threshold)
    audit.write_rows(reports / audit.NEAR_DUPLICATES_CSV, NearDuplicate, pairs)
    cross = sum(p.cross_split for p in pairs)
    if cross:
        what = (
            f"{cross} pair(s) of near-duplicate photos in two splits (thumbnail similarity > "
            f"{threshold}), listed in {reports / audit.NEAR_DUPLICATES_CSV}"
        )
        if cfg.data.leakage == "fail":
            raise audit.NearDuplicateLeakage(
                f"{what}: remove one photo of each pair, or set data.leakage=warn to go on anyway."
            )
        log.warning("leakage (data.leakage=warn): %s", what)
    log.info("Near-duplicates: %d pair(s), %d across splits", len(pairs), cross)
    return {"pairs": len(pairs), "cross_split": cross, "similarity": threshold}


def list_label_issues(
    cfg: Config, dataset: PreparedDataset, every: np.ndarray, reports: Path, c: float
) -> dict[str, float]:
    """Step 2: label_issues.csv, every train and val photo ranked; the first `audit.show` logged."""
    t, k = cfg.train, dataset.num_classes
    fit_args = {"class_weight": t.class_weight, "label_smoothing": t.label_smoothing}
    rows = dataset.manifest("train") + dataset.manifest("val")
    x, y = every[: len(rows)], np.array([r.label_index for r in rows])
    folds = min(cfg.audit.folds, int(np.bincount(y, minlength=k).min()))
    if folds < 2:
        log.warning("Label issues: a class has fewer than 2 train+val photos; nothing ranked")
        audit.write_rows(reports / audit.LABEL_ISSUES_CSV, LabelIssue, [])
        return {"photos": 0, "flagged": 0}
    probs = out_of_fold_probabilities(x, y, k, c, folds, t.seed, **fit_args)
    issues = rank_label_issues(
        probs, y, [r.path for r in rows], [r.split for r in rows], dataset.classes
    )
    audit.write_rows(reports / audit.LABEL_ISSUES_CSV, LabelIssue, issues)
    flagged = sum(i.flagged for i in issues)
    # listed: the photos another class fits better out of fold (a "looks like itself" is no issue)
    other = [i for i in issues if i.flagged or i.suggested_label != i.given_label]
    lines = [
        f"{i.rank:>4}. {i.path} ({i.split}): labelled {i.given_label}, looks like "
        f"{i.suggested_label} (score {i.score:.3f}{', flagged' if i.flagged else ''})"
        for i in other[: cfg.audit.show]
    ]
    log.info(
        "Label issues: %d of %d train+val photos flagged (%d-fold, C = %g); %d flagged or closer to "
        "another class out of fold, the most likely mislabelled first (all ranked in %s)%s",
        *(flagged, len(issues), folds, c, len(other), reports / audit.LABEL_ISSUES_CSV),
        "".join(f"\n{line}" for line in lines),
    )
    return {"photos": len(issues), "flagged": flagged}


def data_sufficiency(
    cfg: Config, dataset: PreparedDataset, features: dict[str, np.ndarray], reports: Path, c: float
) -> tuple[dict[str, float], list[str]]:
    """Step 3: sufficiency.csv and its figure: test accuracy of heads fitted at C = `c` on 1, 2,
    5, ... training photos per class (`audit.sufficiency_seeds` draws each), a power law fitted;
    returns (figures for audit.json and MLflow, one sentence per curve)."""
    if not len(features["test"]):
        log.warning("Data sufficiency: no test photos to score on; no curve")
        return {}, []
    y_train, y_test, k = dataset.labels("train"), dataset.labels("test"), dataset.num_classes
    curve = sufficiency_curve(
        *(features["train"], y_train, features["test"], y_test, k, c, dataset.classes),
        seeds=cfg.audit.sufficiency_seeds,
        seed=cfg.train.seed,
    )
    curve.write_csv(reports / audit.SUFFICIENCY_CSV)
    curve.figure(reports / audit.SUFFICIENCY_PNG)
    lines = [sentence(name, fit) for name, fit in curve.fits.items()]  # "all" first
    log.info("Data sufficiency (test accuracy vs photos per class):\n%s", "\n".join(lines))
    fit = curve.fits.get("all")
    accuracy = float(curve.scores[-1, :, 0].mean())
    gain = {"expected_gain_at_2x": fit.gain[0]} if fit else {}
    return {"accuracy": accuracy} | gain, lines
