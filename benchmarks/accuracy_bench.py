#!/usr/bin/env python
"""Benchmark: the pipeline's default head against a three-line baseline, on the same features.

    python benchmarks/accuracy_bench.py                          # default data + ../shared/data/flowers12
    python benchmarks/accuracy_bench.py --datasets default --work /tmp/acc   # keep / reuse a folder

For each dataset (`default`: the synthetic toy trucks; `flowers12`: a folder of real photos, read
through `data=folder`), the pipeline's own prepare and featurize steps run once into a work
folder (a fresh temporary one unless --work; nothing is written into the repository or the data
folder), then on those cached features:

- `pipeline`: the default train and evaluate steps (the head, early stopping, L2, temperature
  scaling), with MLflow in the work folder;
- `study`: the same with `experiment=study` (8 epochs, batch 32, Adam 1e-3, no L2, no scaling);
- `probe`: scikit-learn's LogisticRegression on the same cached features, C chosen on the
  validation split from `C_GRID` (validation accuracy, then validation log-loss).

Printed side by side: test accuracy, its 95 % Wilson interval, macro F1, ECE (15 bins), seconds
(training, plus for the pipeline its evaluate step; the probe: the whole C search), then the
targets with PASS/FAIL (pipeline accuracy >= probe on both, ECE <= 0.05 on flowers12, default
data >= 0.95). flowers12 has one photo in both training/ and validation/: it runs with
`data.leakage=warn`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
FLOWERS = ROOT.parent / "shared" / "data" / "flowers12"


def compose_cfg(work: Path, dataset: str, extra: list[str]) -> Any:
    """The validated config of `dataset` with every path in `work`."""
    from hydra import compose, initialize_config_dir

    from pipeline.lib.config.schema import validate

    ov = [f"paths.{p}={work}/{p}" for p in ("raw", "prepared", "features", "models", "reports")]
    ov += [
        f"paths.exports={work}/exports",
        f"paths.run_file={work}/mlflow_run.json",
        f"train.checkpoint_dir={work}/checkpoints",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"tracking.artifact_location={work}/mlartifacts",
    ]
    if dataset == "default":
        ov.append(f"data.synthetic.dir={work}/raw/synthetic")
    else:
        ov += ["data=folder", f"data.path={FLOWERS}", "data.leakage=warn"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return validate(compose(config_name="config", overrides=ov + extra))


@contextlib.contextmanager
def quiet() -> Any:
    """Progress bars and INFO logs off (stderr swallowed) while the steps run."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def prepared(work: Path, dataset: str) -> Any:
    """Prepare and featurize once (skipped when `work` already holds the features)."""
    cfg = compose_cfg(work, dataset, [])
    if not (Path(cfg.paths.features) / "meta.json").is_file():
        from pipeline.featurize import featurize
        from pipeline.prepare import prepare

        start = time.perf_counter()
        with quiet():
            prepare(cfg)
            featurize(cfg)
        print(f"[{dataset}] prepare + featurize: {time.perf_counter() - start:.1f} s", flush=True)
    return cfg


def run_pipeline(work: Path, dataset: str, extra: list[str]) -> dict[str, Any]:
    """The train and evaluate steps: test metrics.json's section and the seconds they took."""
    from pipeline.evaluate import evaluate
    from pipeline.lib.data.prepared import PreparedDataset
    from pipeline.train import train

    cfg = compose_cfg(work, dataset, extra)
    start = time.perf_counter()
    with quiet():
        train(cfg)
        metrics = evaluate(cfg)["test"]
    seconds = time.perf_counter() - start
    return {
        **metrics,
        "images": PreparedDataset(cfg.paths.prepared).size("test"),
        "seconds": seconds,
    }


def run_probe(cfg: Any) -> dict[str, Any]:
    """LogisticRegression on the cached features, C chosen on the validation split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from pipeline.lib.data.prepared import PreparedDataset
    from pipeline.lib.reporting.metrics import Predictions, headline_metrics

    ds = PreparedDataset(cfg.paths.prepared)
    x = {s: np.load(Path(cfg.paths.features) / f"{s}.npy") for s in ("train", "val", "test")}
    y = {s: ds.labels(s) for s in x}
    labels = list(range(ds.num_classes))
    start = time.perf_counter()
    best = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=5000).fit(x["train"], y["train"])
        pv = model.predict_proba(x["val"])
        key = ((pv.argmax(1) == y["val"]).mean(), -log_loss(y["val"], pv, labels=labels))
        if best is None or key > best[0]:
            best = (key, c, model)
    _, c, model = best
    probs = np.zeros((len(y["test"]), ds.num_classes), np.float32)
    probs[:, model.classes_] = model.predict_proba(x["test"])
    metrics = headline_metrics(Predictions(probs, y["test"], ds.classes))
    return {**metrics, "images": len(y["test"]), "seconds": time.perf_counter() - start, "C": c}


def row(dataset: str, name: str, m: dict[str, Any]) -> str:
    ci = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    note = f"C={m['C']:g}" if "C" in m else ""
    return (
        f"{dataset:<10} {name:<9} {m['accuracy']:>8.4f} {ci:>16} {m['macro_f1']:>8.4f} "
        f"{m['ece']:>7.4f} {m['images']:>5} {m['seconds']:>8.1f}  {note}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="default,flowers12")
    parser.add_argument("--work", type=Path, help="work folder to keep / reuse (default: temp)")
    parser.add_argument("--no-study", action="store_true", help="skip the experiment=study row")
    args = parser.parse_args()
    base = args.work or Path(tempfile.mkdtemp(prefix="accuracy-bench-"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset in args.datasets.split(","):
        work = base / dataset
        cfg = prepared(work, dataset)
        res = {"pipeline": run_pipeline(work, dataset, [])}
        if not args.no_study:
            res["study"] = run_pipeline(work, dataset, ["experiment=study"])
        res["probe"] = run_probe(cfg)
        results[dataset] = res
        print(f"[{dataset}] done", flush=True)
    print()
    print(
        f"{'dataset':<10} {'model':<9} {'accuracy':>8} {'95% interval':>16} {'macro_f1':>8} "
        f"{'ECE':>7} {'test':>5} {'seconds':>8}"
    )
    for dataset, res in results.items():
        for name, m in res.items():
            print(row(dataset, name, m))
    print()
    checks = []
    for dataset, res in results.items():
        p, q = res["pipeline"], res["probe"]
        checks.append((f"{dataset}: pipeline accuracy >= probe", p["accuracy"] >= q["accuracy"]))
        if dataset == "flowers12":
            checks.append(("flowers12: pipeline ECE <= 0.05", p["ece"] <= 0.05))
        if dataset == "default":
            checks.append(("default: pipeline accuracy >= 0.95", p["accuracy"] >= 0.95))
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"(work folder: {base})")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
