"""One error family whose messages name the file or key at fault and the fix.

The CLI prints these without a traceback (add `--debug` for one); anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class SynthCXRError(Exception):
    """A problem the user can fix. `file` and `fix` end up in the message."""

    label = "error"
    """How the CLI introduces the message ("stopped" for a stop the user asked for)."""
    exit_code = 2

    def __init__(self, message: str, *, file: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.file = Path(file) if file is not None else None
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = [f"{self.file}: {self.message}" if self.file else self.message]
        if self.fix:
            parts.append(f"Fix: {self.fix}")
        return "\n".join(parts)


class ConfigError(SynthCXRError):
    """A config file or `--set` override is invalid."""


class DataError(SynthCXRError):
    """Input images, readings or manifests are missing or broken."""


class ModelError(SynthCXRError):
    """A model cannot be found or loaded."""


class TrainingError(SynthCXRError):
    """Training cannot go on (NaN loss, out of memory, bad resume state)."""


class EvaluationError(SynthCXRError):
    """A metric cannot be computed from the given images."""


class StudyError(SynthCXRError):
    """Reader-study setup or database problem."""


def did_you_mean(value: str, choices: Iterable[str], *, cutoff: float = 0.6, prefix: str = "") -> str:
    """' (did you mean 'x'?)' naming the closest choice (after `prefix`), or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


class Problem:
    """One problem with one file; many are collected and reported together."""

    __slots__ = ("file", "message", "fix")

    def __init__(self, file: str | Path, message: str, fix: str):
        self.file = Path(file)
        self.message = message
        self.fix = fix

    def __repr__(self) -> str:
        return f"Problem({str(self.file)!r}, {self.message!r})"

    def render(self) -> str:
        return f"{self.file}: {self.message} -> {self.fix}"


class ProblemsError(DataError):
    """Several problems at once: users fix them all in one pass instead of one per run."""

    def __init__(self, problems: Iterable[Problem], *, what: str = "input"):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) found in {what}:"]
        lines += [f"  - {p.render()}" for p in self.problems]
        super().__init__(
            "\n".join(lines),
            fix="fix or remove the files listed above, or set on_error: skip (--on-error skip) to leave them out",
        )
