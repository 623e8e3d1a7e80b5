"""The errors a user can fix: every step shows them as one line and exits with status 2.

Each concern raises its own subclass (`ConfigError`, `DataError`, `WeightsNotFoundError`,
`TrackingError`, `StageInputError`); `pipeline.lib.config.step.run_step` catches `UserError`.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: shown as a one-line message naming the file or key, exit 2."""


class StageInputError(UserError, FileNotFoundError):
    """A stage's input (an earlier stage's output) is missing or stale."""
