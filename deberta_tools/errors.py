"""One error type for problems a user can fix, and the wrapper every script runs under."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (missing file, wrong graph, conflicting flags): printed as one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main(); a UserError becomes one 'error: ...' line on stderr and a non-zero exit code."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.exit(code or 0)
