"""A quiet console: what TensorFlow, absl, MLflow and the TFLite converter print is silenced
where it is made, so a step shows its progress bars, its own lines and real problems only.

`setup()` runs when the `pipeline` package is imported (before TensorFlow is), once per process:
`TF_CPP_MIN_LOG_LEVEL=3` (a value the user set is kept); TensorFlow's start-up notices, which TF
2.21 writes to file descriptor 2 while `import tensorflow` runs whatever that level, dropped
(`TF_NOTICES`, by a finder that runs that one import inside `stderr_without`); MLflow at
WARNING; absl's Python logging at ERROR; Python warnings known to be noise (`NOISE_WARNINGS`);
tqdm redrawn every 30 s at most when stderr is not a terminal (`TQDM_MININTERVAL`, unless set).
`PIPELINE_VERBOSE=1` (README, "A quiet console") turns all of this off: everything is shown.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

from wurlitzer import pipes

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


def verbose() -> bool:
    """Whether `PIPELINE_VERBOSE` asks for every library's output."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def setup() -> None:
    """Quiet the libraries (see the module docstring); nothing when `verbose()`. Idempotent."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial ... tables"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # registry downloads
    if not (sys.stderr is not None and sys.stderr.isatty()):
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    logging.getLogger("absl").setLevel(logging.ERROR)
    for message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, as the other finders do, with its loader's `exec_module` run
    inside `stderr_without(*TF_NOTICES)`; leaves `sys.meta_path` at that first import."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                with stderr_without(*TF_NOTICES):
                    run(module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


@contextmanager
def stderr_without(*drop: str) -> Iterator[None]:
    """File descriptor 2 (where C++ libraries write) is captured inside the block; on exit the
    lines that contain none of the texts `drop` are written to stderr. With `PIPELINE_VERBOSE=1`
    nothing is captured."""
    if verbose() or not drop or sys.stderr is None:
        yield
        return
    captured = io.StringIO()
    try:
        with pipes(stdout=None, stderr=captured):
            yield
    finally:
        kept = [
            line
            for line in captured.getvalue().splitlines(True)
            if not any(d in line for d in drop)
        ]
        sys.stderr.write("".join(kept))
        sys.stderr.flush()
