"""Experiment-tracked MobileNetV2 transfer learning: DVC stages, Hydra config, MLflow tracking."""

from pipeline.lib import console

console.setup()  # before any library is imported: see pipeline.lib.console
