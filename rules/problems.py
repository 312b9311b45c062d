"""Problems found while loading a program, reported with file:line:column.

An error refuses the program; a warning (a value that loads but is probably wrong) is
reported beside it and the program still loads.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import msgspec


class Problem(msgspec.Struct, frozen=True, order=True):
    # Field order makes sorting give file, then position: the order a reader fixes them in.
    file: str
    line: int
    column: int
    message: str
    warning: bool = False

    def __str__(self) -> str:
        severity = "warning: " if self.warning else ""
        return f"{self.file}:{self.line}:{self.column}: {severity}{self.message}"


class ProgramError(Exception):
    """A program that does not load; it is refused as a whole.

    `warnings` are those found on the way, so a refusal can show them with the errors.
    """

    def __init__(self, problems: list[Problem], warnings: list[Problem] | None = None):
        self.problems = list(problems)
        self.warnings = list(warnings or [])
        super().__init__("\n".join(str(p) for p in self.problems))


def suggest(word: str, choices: Iterable[str]) -> str:
    """', did you mean 'x'?' for the nearest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f", did you mean '{close[0]}'?" if close else ""
