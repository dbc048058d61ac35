"""User-facing errors: one line that says what and where, and an exit code that says what happened."""

from __future__ import annotations

# Exit codes the CLI returns; scripts and CI can branch on them.
EXIT_USAGE = 2  # bad recipe, unknown name, bad option
EXIT_DATA = 1  # a data file has unusable records / is missing
EXIT_NOT_FOUND = 3  # a file, folder or model that does not exist


class TuneloopError(Exception):
    """An error the user can fix. The CLI prints `message` alone (no traceback) and exits `exit_code`."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TuneloopError):
    exit_code = EXIT_USAGE


class DataError(TuneloopError):
    """A problem in a data file; messages read `file:line: field: what is wrong`."""

    exit_code = EXIT_DATA


class NotFoundError(TuneloopError):
    exit_code = EXIT_NOT_FOUND
