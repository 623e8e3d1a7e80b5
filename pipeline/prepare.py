"""Stage `prepare`: check every image of the data source (it decodes) and record it in the
prepared dataset (manifest with each file's sha256, classes, data report); no pixels are
copied: featurize and every later reader decode the photos themselves.

    python -m pipeline.prepare                                  # the configured data (conf/)
    python -m pipeline.prepare data=folder data.path=/photos    # your photo folder, this once

Point the project at your photos for good with `python -m pipeline.params --use-folder /photos`."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.ingest import ingest
from pipeline.lib.data.prepared import data_root
from pipeline.lib.data.sources import synthetic
from pipeline.lib.data.sources.folder import HIDDEN_REASON, DataError
from pipeline.lib.files import atomic_dir

log = logging.getLogger(__name__)


def prepare(cfg: Config) -> dict:
    """Run the prepare stage on `cfg`; return the data report (also in report.json). Raises
    UserErrors: DataError (unusable data, or data folder and `paths.prepared` overlap),
    SyntheticDirError, a full disk."""
    root, prepared = Path(data_root(cfg.data)), Path(cfg.paths.prepared)
    a, b = root.resolve(), prepared.resolve()  # links and `..` must not hide an overlap
    if a == b or a in b.parents or b in a.parents:
        raise DataError(
            f"paths.prepared '{prepared}' and the data folder '{root}' overlap: set "
            "paths.prepared outside it."
        )
    if cfg.data.source == "synthetic":
        log.info("Data source: synthetic toy trucks (generated into %s)", root)
        synthetic.generate(root, cfg.data.synthetic)
    else:
        log.info("Data source: your photo folder %s (read only)", root)
    with atomic_dir(cfg.paths.prepared, "paths.prepared") as tmp:  # a full disk: one line
        report = ingest(root, cfg.data, tmp)
    totals = ", ".join(f"{k} {v}" for k, v in report["totals"].items())
    lost = sum(s["reason"] != HIDDEN_REASON for s in report["skipped"])  # .DS_Store is no photo
    log.info(
        "Recorded %d images of %d classes from %s '%s' into %s (%s); rejected %d, skipped %d",
        *(report["accepted"], len(report["classes"]), report["source"], report["root"]),
        *(cfg.paths.prepared, totals, len(report["rejected"]), lost),
    )
    for warning in report.get("warnings", []):
        log.warning("%s", warning)
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    run_step(prepare, cfg)


main = entry_point(hydra_main, __doc__, sections=("data", "paths"))

if __name__ == "__main__":
    main()
