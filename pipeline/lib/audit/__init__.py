"""The audit stage's checks of the photos (label issues, near-duplicates) and its report files."""

from pipeline.lib.errors import UserError

LABEL_ISSUES_CSV = "label_issues.csv"
NEAR_DUPLICATES_CSV = "near_duplicates.csv"
AUDIT_JSON = "audit.json"


class NearDuplicateLeakage(UserError):
    """Near-duplicate photos in two splits, with `data.leakage=fail`."""
