"""Errors a user can act on. The CLI turns them into one line and an exit code."""


class FarmError(Exception):
    """Base of all errors farm reports to a user: one line, exit code 3 at the CLI (2 for a UsageError)."""


class UsageError(FarmError):
    """Bad input given by the user: a file, a name, a version, an option (exit code 2)."""


class OperationalError(FarmError):
    """Something outside farm failed: a host, the broker, git, the disk (exit code 3)."""
