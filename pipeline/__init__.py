"""Experiment-tracked MobileNetV2 transfer learning: DVC stages, Hydra config, MLflow tracking."""

from pipeline.lib import console as _console

# Before any library is imported: TensorFlow, absl and MLflow chatter silenced at the source
# (`PIPELINE_VERBOSE=1` shows it all again; see pipeline.lib.console).
_console.setup()
