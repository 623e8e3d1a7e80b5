"""The audit of the photos (label issues, near-duplicates, data sufficiency): its report files."""

import csv
from dataclasses import astuple, fields
from pathlib import Path

from pipeline.lib.errors import UserError
from pipeline.lib.files import atomic_file

LABEL_ISSUES_CSV = "label_issues.csv"
NEAR_DUPLICATES_CSV = "near_duplicates.csv"
AUDIT_JSON = "audit.json"
SUFFICIENCY_CSV = "sufficiency.csv"
SUFFICIENCY_PNG = "audit_figures/sufficiency.png"


class NearDuplicateLeakage(UserError):
    """Near-duplicate photos in two splits, with `data.leakage=fail`."""


def write_rows(path: Path, kind: type, rows: list) -> None:
    """CSV: a header of dataclass `kind`'s field names, then one line per row of that kind."""
    with atomic_file(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerows([[f.name for f in fields(kind)], *map(astuple, rows)])
