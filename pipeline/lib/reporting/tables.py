"""Plain tables written next to the figures (DVC plots read them)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.lib.files import atomic_file


def write_csv(path: Path, columns: dict[str, list[Any]]) -> None:
    """Write `columns` ({name: values}, equal lengths) as a CSV with a header row, atomically."""
    names = list(columns)
    with atomic_file(path) as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        writer.writerows(zip(*(columns[n] for n in names), strict=False))
