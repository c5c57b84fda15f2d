"""Errors a user can act on. The CLI turns them into one line and an exit code."""


class FarmError(Exception):
    """Base of all errors farm reports to a user (exit code 2 at the CLI)."""


class UsageError(FarmError):
    """Bad input given by the user: a file, a name, a version, an option."""
