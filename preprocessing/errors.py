"""User-facing errors.

A `UserError` is a problem with what the user asked for or gave us (a missing
source, a bad flag value, a corrupt shard). The CLI prints its message as one
line and exits with `exit_code`; it never shows a traceback for these. The
message says what is wrong, where, and what to do.
"""

from __future__ import annotations

import argparse

# Exit codes of every job (documented in each command's --help epilog and the README).
EXIT_BAD_INPUT = 2
EXIT_TOO_MANY_ERRORS = 3  # the error report was written; no manifest


class UserError(Exception):
    """An error the user can fix; printed as one line, no traceback."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a UserError: one line, exit 2, no usage dump."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")
