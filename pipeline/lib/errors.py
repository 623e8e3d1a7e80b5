"""The errors a user can fix: `run_step` shows each as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or configuration; the message names the file or key and what to do."""


class StageInputError(UserError, FileNotFoundError):
    """A stage's input (an earlier stage's output) is missing or stale."""
