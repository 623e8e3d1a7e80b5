"""Tool `crossval`: stratified k-fold cross-validation of the head on the cached features, for
small datasets whose test split says little (see `pipeline.lib.training.crossval`).

    python -m pipeline.crossval                          # train.crossval_folds (5) folds
    python -m pipeline.crossval train.crossval_folds=3 train.class_weight=auto

Needs the prepare and featurize stages' outputs (`dvc repro featurize`). Pools every photo (train, val, test), trains
one head per fold exactly as `train` does, logs one MLflow parent run (mean ± std, pooled accuracy
and its 95 % Wilson interval) with one child run per fold. Writes no DVC output.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.training.crossval import crossval


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: run `crossval` on conf/ composed with the command-line overrides."""
    run_step(crossval, cfg)


main = entry_point(hydra_main, __doc__, sections=("train", "tracking"))

if __name__ == "__main__":
    main()
