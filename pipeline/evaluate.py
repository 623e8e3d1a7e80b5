"""Stage `evaluate`: audit the photos (label issues, near-duplicates, data sufficiency, on the
cached features: pipeline/lib/audit/steps.py); predict the test split with the model folder
(`Classifier`: the head on the cached test features when the model's backbone is the featurized
one, else its LiteRT backbone on the images); write metrics, the classification report, the
confusion matrix, the prediction gallery and the HTML report with the audit's lists; add them to
the pipeline run's MLflow run (the one `train` started). No TensorFlow.

    python -m pipeline.evaluate
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import hydra
import mlflow
from omegaconf import DictConfig

from pipeline.lib.audit.report_sections import audit_sections
from pipeline.lib.audit.steps import log_audit, run_audit
from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.class_names import class_key
from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.model.classifier import model_md5, trained_classifier
from pipeline.lib.model.reject import RejectRule, coverage_curve, coverage_figure, rule_metrics
from pipeline.lib.model.scoring import split_scores
from pipeline.lib.reporting.evaluation import (
    FIGURES_DIR,
    METRICS_FILE,
    REPORT_HTML,
    SPLIT,
    evaluation_metrics,
    write_figures,
    write_tables,
    write_text,
)
from pipeline.lib.reporting.html_report import render_report
from pipeline.lib.reporting.metrics import Predictions, classification_metrics
from pipeline.lib.reporting.tables import write_csv
from pipeline.lib.tracking import runs
from pipeline.lib.tracking.lineage import git_commit
from pipeline.lib.tracking.store import is_remote

COVERAGE_FILE = "coverage.csv"  # accuracy of the test photos accepted by energy vs coverage
UNSAID = "MLflow run, git commit"  # in the DVC copy (reproducible); the run's copy names them

log = logging.getLogger(__name__)


def evaluate(cfg: Config) -> dict[str, Any]:
    """Predict the test split with `paths.models`, write the reports into `paths.reports` and
    log them to the pipeline's MLflow run; return the metrics ({"test": {...}}). Raises
    StageInputError (no prepared data, or no trained model for its classes), NearDuplicateLeakage
    (near-duplicate photos in two splits, with `data.leakage=fail`)."""
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    classifier = trained_classifier(cfg.paths.models, dataset.classes)
    audited = run_audit(cfg, dataset)
    probs, energies = split_scores(
        classifier, dataset, SPLIT, cfg.paths.features, tta=cfg.evaluate.tta
    )
    p = Predictions(probs, dataset.labels(SPLIT), classifier.classes)
    images, paths = dataset.images(SPLIT), [row.path for row in dataset.manifest(SPLIT)]
    reports = Path(cfg.paths.reports)
    metrics = evaluation_metrics(p)
    rule = RejectRule.from_card(classifier.card.reject)
    correct = p.y_pred == p.y_true
    if rule is not None:  # the stored reject rule on the test split (accuracy of the accepted)
        metrics["reject"] = rule_metrics(rule, energies, correct)
    report_text = write_tables(p, paths, reports, metrics)
    write_csv(reports / COVERAGE_FILE, curve := coverage_curve(energies, correct))
    gallery = cfg.evaluate.gallery_size, cfg.evaluate.gallery_columns
    figures = write_figures(p, images, reports / FIGURES_DIR, *gallery)
    figures.append(reports / FIGURES_DIR / "coverage.png")
    coverage_figure(curve, rule and metrics["reject"]["coverage"]).savefig(figures[-1], dpi=100)
    # the DVC output stays reproducible (no run, commit or absolute path: `UNSAID`, folder name)
    folder = Path(cfg.data.path).name if cfg.data.path else None
    source = {"data": " ".join(filter(None, [cfg.data.source, folder]))}
    source["model"] = f"{cfg.paths.models} (md5 {model_md5(cfg.paths.models)})"
    source[UNSAID] = "see the run's copy"
    audit = audit_sections(reports, dataset, cfg.audit.show)  # the audit's lists
    audit += coverage_section(figures[-1], metrics.get("reject"))
    per_class, t = classification_metrics(p), metrics[SPLIT]
    cells = cfg.evaluate.report_images_per_cell
    html = render_report(p, images, paths, per_class | t, cells, SPLIT, source, audit)
    report = write_text(reports / REPORT_HTML, html)
    log.info("Test split: %d images\n%s", len(probs), report_text)

    with runs.stage_run(cfg, "evaluate") as run:
        flat = {f"test_{k}": float(v) for k, v in t.items()}  # accuracy, ci_low/high, F1, ece
        flat["test_weighted_f1"] = per_class["weighted_f1"]
        for kind in ("precision", "recall", "f1"):
            flat |= {f"test_{kind}_{class_key(c)}": v for c, v in per_class[kind].items()}
        log_audit(reports, audited, flat, {"evaluate_tta": str(bool(cfg.evaluate.tta)).lower()})
        runs.log_files(figures, "figures")
        tables = [METRICS_FILE, "classification_report.json", "classification_report.txt"]
        tables += [COVERAGE_FILE, "predictions.csv"]
        runs.log_files([reports / name for name in tables], "reports")
        origin = f"MLflow run: {run.info.run_id}</div><div>git commit: {git_commit() or 'unknown'}"
        html = html.replace(f"{UNSAID}: see the run&#x27;s copy", origin, 1)  # not drawn again
        mlflow.log_text(html, f"reports/{REPORT_HTML}")
    remote = is_remote(cfg.tracking.uri)
    url = f"{cfg.tracking.uri.rstrip('/') if remote else 'http://127.0.0.1:5000'}/#/experiments/"
    log.info(
        f"Test accuracy {t['accuracy']:.4f} (95 % interval {t['ci_low']:.4f}-{t['ci_high']:.4f}) "
        f"on {len(probs)} images; report: {report}\nMLflow run: {url}"
        f"{run.info.experiment_id}/runs/{run.info.run_id}{'' if remote else ' (`make ui` serves it)'}"
    )
    return metrics


def coverage_section(png: Path, rule: dict | None) -> str:
    """HTML: the accuracy-vs-coverage figure (`png`) and the stored reject rule's test figures."""
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    said = "No reject rule is stored (train.reject.target=none): every photo gets a class."
    if rule:
        kept = rule["accuracy"]
        right = "none is kept" if kept is None else f"{kept:.1%} of the rest right"
        said = (
            f"The model's rule ({rule['target']} {rule['value']:g} on val) answers <b>unknown</b> "
            f"for {1 - rule['coverage']:.1%} of the test photos; {right}."
        )
    return (
        '<h2>Accuracy vs coverage ("none of these")</h2><p>Test photos accepted in order of the '
        f'head\'s energy score. {said}</p><img src="data:image/png;base64,{image}" alt="coverage">'
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: run `evaluate` on conf/ composed with the command-line overrides."""
    run_step(evaluate, cfg)


main = entry_point(hydra_main, __doc__, sections=("evaluate",))

if __name__ == "__main__":
    main()
