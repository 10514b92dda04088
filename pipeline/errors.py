"""One exception type for every user-facing failure: the CLI prints it as one line and exits non-zero."""
from __future__ import annotations

import sys
from typing import NoReturn


class H2TError(Exception):
    """A problem with the user's input (config value, model, dataset, file, layer) — never a bug."""


def fail(message: str) -> NoReturn:
    """The command's one-line error, exit status 2."""
    print(f"h2t: error: {message}", file=sys.stderr)
    sys.exit(2)
