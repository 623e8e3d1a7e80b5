"""The head's initialisation (`model.head_init`)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.lib.model.build import build_head
from tests.conftest import tiny_config


def test_zero_initialised_head_starts_from_uniform_class_scores():
    head = build_head(feature_dim=16, num_classes=6, dropout=0.0, init="zeros")
    features = np.random.default_rng(0).uniform(0, 6, size=(5, 16)).astype("float32")
    np.testing.assert_allclose(head.predict(features, verbose=0), np.full((5, 6), 1 / 6), atol=1e-6)
    assert head.count_params() == 16 * 6 + 6


def test_glorot_head_starts_from_random_class_scores():
    head = build_head(feature_dim=16, num_classes=6, dropout=0.0, init="glorot_uniform")
    features = np.random.default_rng(0).uniform(0, 6, size=(5, 16)).astype("float32")
    assert np.abs(head.predict(features, verbose=0) - 1 / 6).max() > 0.01


def test_default_config_uses_the_zero_initialised_head(tmp_path):
    assert tiny_config(tmp_path).model.head_init == "zeros"


def test_unknown_head_init_is_rejected_naming_the_key(tmp_path):
    from pipeline.lib.config.schema import ConfigError

    with pytest.raises(ConfigError, match="model.head_init"):
        tiny_config(tmp_path, **{"model.head_init": "ones"})
