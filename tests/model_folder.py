"""A model folder in the train stage's format (`classifier.save_model_folder`), made from cached
features: a softmax head fitted by scikit-learn's L-BFGS and the featurized backbone.tflite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from pipeline.lib.data.prepared import open_prepared
from pipeline.lib.model.classifier import Head, ModelCard, save_model_folder
from pipeline.lib.model.features import BACKBONE_FILE

#: The ImageNet weights file the real-backbone tests use (`make weights`).
WEIGHTS = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "models"
    / ("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
)


def fit_model_folder(cfg, temperature: float = 1.0) -> Path:
    """Write `paths.models` from `paths.features` (train split) and return it."""
    dataset = open_prepared(cfg.paths.prepared, cfg.data)
    features = Path(cfg.paths.features)
    x = np.load(features / "train.npy")
    fit = LogisticRegression(C=10.0, max_iter=2000).fit(x, dataset.labels("train"))
    head = Head(fit.coef_.T.astype(np.float32), fit.intercept_.astype(np.float32))
    card = ModelCard(
        classes=dataset.classes,
        image_size=dataset.image_size,
        resize=cfg.data.resize,
        temperature=temperature,
        backbone={"name": cfg.model.name, "alpha": cfg.model.alpha, "fine_tuned": False},
    )
    models = Path(cfg.paths.models)
    models.mkdir(parents=True, exist_ok=True)
    backbone = (features / BACKBONE_FILE).read_bytes()
    save_model_folder(models, head.scaled(temperature), card, backbone)
    return models
