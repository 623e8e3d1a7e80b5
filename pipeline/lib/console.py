"""A quiet console: a step shows its progress bars, its own lines and real problems only.
`PIPELINE_VERBOSE=1` shows every library's output again."""

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
    (r"The specified dataset source can be interpreted in multiple ways", r"mlflow\."),
    (r"Hint: Inferred schema contains integer column", r"mlflow\."),
    (r"Statistics for quantized inputs were expected", r"tensorflow\."),  # int8 conversion
)
#: Libraries whose log records below ERROR go to the log files only (Hydra's `<step>.log`), not
#: the console: matplotlib's font cache, TensorFlow's "Assets written to", absl's warnings.
LOG_FILE_ONLY = ("absl", "matplotlib", "tensorflow", "h5py")


def verbose() -> bool:
    return os.environ.get("PIPELINE_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def setup() -> None:
    """Run when `pipeline` is imported, before TensorFlow (idempotent): `TF_CPP_MIN_LOG_LEVEL=3`
    and MLflow at WARNING unless set, `NOISE_WARNINGS` ignored, tqdm redrawn every 30 s at most
    off a terminal, `TF_NOTICES` dropped from `import tensorflow`'s output, `LOG_FILE_ONLY`."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not (sys.stderr is not None and sys.stderr.isatty()):
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    for name in LOG_FILE_ONLY:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _LogFilesOnly) for h in logger.handlers):
            logger.addHandler(_LogFilesOnly())
            logger.propagate = False
    for message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    if "tensorflow" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _LogFilesOnly(logging.Handler):
    """To the root logger's file handlers; from ERROR up to all (stderr when it has none)."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in filter(None, logging.getLogger().handlers or [logging.lastResort]):
            if record.levelno >= handler.level and (
                record.levelno >= logging.ERROR or isinstance(handler, logging.FileHandler)
            ):
                handler.handle(record)


class _Finder(importlib.abc.MetaPathFinder):
    """Imports `tensorflow` (once) inside `stderr_without(*TF_NOTICES)`."""

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
    """Capture file descriptor 2 (where C++ libraries write) in the block, then write to stderr
    the lines containing none of `drop`. Captures nothing when `verbose()`."""
    if verbose() or not drop or sys.stderr is None:
        yield
        return
    captured = io.StringIO()
    try:
        with pipes(stdout=None, stderr=captured):
            yield
    finally:
        lines = captured.getvalue().splitlines(True)
        sys.stderr.write("".join(line for line in lines if not any(d in line for d in drop)))
        sys.stderr.flush()
