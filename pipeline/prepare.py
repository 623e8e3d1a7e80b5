"""Stage `prepare`: read the data source, decode/convert/resize every image once, write the
prepared dataset (arrays, manifest, classes, data report).

    python -m pipeline.prepare                                  # the synthetic default
    python -m pipeline.prepare data=folder data.path=/photos    # your photo folder
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import run_step
from pipeline.lib.files import atomic_dir

log = logging.getLogger(__name__)


def prepare(cfg: Config) -> dict:
    from pipeline.lib.data.ingest import ingest
    from pipeline.lib.data.sources import synthetic

    root = Path(cfg.data.path)
    if cfg.data.source == "synthetic":
        log.info("Generating synthetic toy-truck images into %s", root)
        synthetic.generate(root, cfg.data.synthetic)
    with atomic_dir(cfg.paths.prepared) as tmp:
        report = ingest(root, cfg.data, tmp)
    log.info(
        "Prepared %d images of %d classes into %s (%s); rejected %d, skipped %d",
        report["accepted"],
        len(report["classes"]),
        cfg.paths.prepared,
        ", ".join(f"{k} {v}" for k, v in report["totals"].items()),
        len(report["rejected"]),
        len(report["skipped"]),
    )
    for warning in report.get("warnings", []):
        log.warning("%s", warning)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_step(prepare, cfg)


if __name__ == "__main__":
    main()
