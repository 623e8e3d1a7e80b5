"""What every stage's thin Hydra entry point shares: validation, multirun outputs, user errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.lib.config.schema import Config, validate
from pipeline.lib.errors import StageInputError, UserError

__all__ = ["StageInputError", "run_step"]

log = logging.getLogger("pipeline")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def redirect_outputs(cfg: DictConfig, out_dir: Path) -> DictConfig:
    """A sweep job writes its models, reports and exports into its own Hydra job folder, never
    into the DVC-tracked paths that `dvc repro` owns (inputs such as prepared data stay shared)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.paths.models = str(out_dir / "models")
        cfg.paths.reports = str(out_dir / "reports")
        if "exports" in cfg.paths:
            cfg.paths.exports = str(out_dir / "exports")
    return cfg


def run_step(step: Callable[[Config], Any], cfg: DictConfig) -> Any:
    """Validate `cfg`, run `step`; turn user errors into a clear message and exit status 2."""
    try:
        if in_multirun() and "paths" in cfg:
            cfg = redirect_outputs(cfg, job_output_dir())  # type: ignore[arg-type]
        return step(validate(cfg))
    except UserError as exc:
        log.error("%s", exc)
        print(f"\nERROR: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
