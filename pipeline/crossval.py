"""Tool `crossval`: stratified k-fold cross-validation of the head on the cached features, for
datasets too small for one test split to say much. Needs the prepare and featurize stages' outputs
(`dvc repro featurize`); writes no DVC output.

    python -m pipeline.crossval                          # train.crossval_folds (5) folds
    python -m pipeline.crossval train.crossval_folds=3 train.class_weight=auto

Every prepared photo (train, val, test) goes into `train.crossval_folds` folds (stratified where
the classes allow, shuffled with `train.seed`; k = N is leave-one-out): fold i is tested, fold
i + 1 (mod k) calibrates, the rest train, as `train` fits its head. Logged as one MLflow parent run
(mean and std over folds, the pooled accuracy with its 95 % Wilson interval) with one child run
per fold, tagged with this process (a killed crossval is ended like any other step's run).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.lib.config.step import CONF_DIR, entry_point, run_step
from pipeline.lib.training.crossval import crossval


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    run_step(crossval, cfg)


main = entry_point(hydra_main, __doc__, sections=("train", "tracking"))

if __name__ == "__main__":
    main()
