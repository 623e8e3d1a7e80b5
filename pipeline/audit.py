"""`python -m pipeline.audit`: the audit of the photos alone (label issues, near-duplicates,
data sufficiency: pipeline/lib/audit/steps.py), the reports the evaluate stage also writes, logged
to the pipeline's MLflow run. For a look after changing `audit.*` without evaluating again.

    python -m pipeline.audit
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.lib.audit.steps import log_audit, run_audit
from pipeline.lib.config.schema import Config
from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.tracking import runs


def audit(cfg: Config) -> dict[str, dict[str, float]]:
    """Run the audit on the prepared photos' cached features; return its figures. Raises
    StageInputError (no prepared data or features), NearDuplicateLeakage."""
    summary = run_audit(cfg, open_prepared(cfg.paths.prepared, cfg.data))
    with runs.stage_run(cfg, "audit"):
        log_audit(Path(cfg.paths.reports), summary)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: run `audit` on conf/ composed with the command-line overrides."""
    run_step(audit, cfg)


main = entry_point(hydra_main, __doc__, sections=("audit",))

if __name__ == "__main__":
    main()
