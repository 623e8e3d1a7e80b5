"""Experiment-tracked MobileNetV2 transfer learning: DVC stages, Hydra config, MLflow tracking."""

import os as _os

# TensorFlow's C++ start-up chatter hides the messages users need; keep warnings and errors.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
