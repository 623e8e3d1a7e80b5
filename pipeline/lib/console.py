"""A quiet console: what TensorFlow, absl, MLflow and the TFLite converter print is silenced
where it is made, so a step shows its progress bars, its own lines and real problems only.

`setup()` runs when the `pipeline` package is imported (before TensorFlow is), once per process:

- TensorFlow's C++ log: `TF_CPP_MIN_LOG_LEVEL=3` (the `E0000 ... use_unbounded_threadpool`
  line of tf.data, `cpu_feature_guard`, the converter's `fully_quantize: ...` dump); a value the
  user set is kept. TF 2.21 prints its start-up notices (`WARNING: All log messages before
  absl::InitializeLog() ...`, `oneDNN custom operations are on ...`) before it reads that
  variable, once per shared library, whatever the level: they are written to file descriptor 2
  while `import tensorflow` runs, so that import is run with descriptor 2 captured and every
  other line it printed is passed on (`_TensorFlowImport`). oneDNN itself stays on.
- MLflow's own INFO lines ("Creating initial MLflow database tables...", "Created version '1'
  of model ...": the step says what matters in its own words): `MLFLOW_LOGGING_LEVEL=WARNING`.
- absl's Python logging (the converter's "Using new converter ...") at ERROR.
- Python warnings known to be noise for this project's use (`NOISE_WARNINGS`).
- tqdm when stderr is not a terminal (a log file, CI): a bar is redrawn every 30 s at most
  (`TQDM_MININTERVAL`, unless set), not ten times a second.

`PIPELINE_VERBOSE=1` (README, "A quiet console") turns all of this off: everything is shown.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

#: Set to 1 (or true/yes) to see every library's output again.
VERBOSE_ENV = "PIPELINE_VERBOSE"
#: TensorFlow start-up lines dropped from what `import tensorflow` prints (substrings).
TF_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "cpu_feature_guard.cc",
    "To enable the following instructions:",
    "This TensorFlow binary is optimized to use available CPU instructions",
)
#: (message regex, module regex) of warnings that say nothing to a user of this pipeline.
NOISE_WARNINGS = (
    # mlflow.data.from_pandas(source=<folder>) with a local path: two equal candidates
    (r"The specified dataset source can be interpreted in multiple ways", r"mlflow\."),
    # schema inference of the prepared data's manifest (a label column of ints)
    (r"Hint: Inferred schema contains integer column", r"mlflow\."),
    # TFLite int8 conversion: the model's float input is quantized by the converter itself
    (r"Statistics for quantized inputs were expected", r"tensorflow\."),
)

_done = False


def verbose() -> bool:
    """Whether `PIPELINE_VERBOSE` asks for every library's output."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def setup() -> None:
    """Quiet the libraries (see the module docstring); nothing when `verbose()`. Idempotent."""
    global _done
    if _done or verbose():
        _done = True
        return
    _done = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial ... tables"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # registry downloads
    if not _stderr_is_terminal():
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    logging.getLogger("absl").setLevel(logging.ERROR)
    for message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    if "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _TensorFlowImport())


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _TensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs the first `import tensorflow` with file descriptor 2 captured, then writes back what
    it printed less `TF_NOTICES`; removes itself from `sys.meta_path` after that import."""

    _loader: Any = None

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        """Claim the first `import tensorflow` (wrapping the real loader); None for any other module
        or once claimed.
        """
        if name != "tensorflow" or self._loader is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        """Create the module with TensorFlow's own loader."""
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        """Run TensorFlow's import with `TF_NOTICES` filtered from fd 2; leave `sys.meta_path`."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        with stderr_without(*TF_NOTICES):
            self._loader.exec_module(module)


class stderr_without:  # noqa: N801 (a context manager used like a function)
    """`with stderr_without("text", ...):` file descriptor 2 (where C++ libraries write) goes to
    a temporary file inside the block; on exit the lines that contain none of the texts are
    written to the real stderr. With `PIPELINE_VERBOSE=1` nothing is dropped."""

    def __init__(self, *drop: str) -> None:
        self.drop = () if verbose() else drop

    def __enter__(self) -> None:
        self.saved = None
        if not self.drop:
            return
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
        except (OSError, AttributeError, ValueError):
            self.saved = None
            return
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 2)

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        kept = [line for line in text.splitlines(True) if not any(d in line for d in self.drop)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
