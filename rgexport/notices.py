"""One-line notices for the person at the terminal (an earlier name still accepted, a choice made for them).

Written to the process's stderr, outside any captured build log: a notice is meant to be read."""

from __future__ import annotations

import sys


def notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr, flush=True)
