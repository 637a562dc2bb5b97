"""Errors a user can act on.

Every reader raises :class:`InputError` for bad input. Its message names the file, the record (line, row,
gene, sample or site) and what was expected, so that the command line can print it as it is and exit non-zero.
"""

from __future__ import annotations

from pathlib import Path


class GeximputeError(Exception):
    """Base class of the errors the command line reports without a traceback."""


class ConfigError(GeximputeError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class InputError(GeximputeError, ValueError):
    """An input file is missing, unreadable or violates its expected format.

    Args:
        path: the offending file.
        problem: what is wrong, in a sentence.
        record: where in the file (``"line 12"``, ``"gene ENSG..."``); optional.
        expected: what was expected instead; optional.
        hint: what the user can do about it; optional.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        record: str | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = str(path)
        self.problem = problem
        self.record = record
        self.expected = expected
        self.hint = hint
        parts = [f"{self.path}: {problem}"]
        if record:
            parts.append(f"at {record}")
        if expected:
            parts.append(f"expected {expected}")
        message = "; ".join(parts)
        if hint:
            message += f". {hint}"
        super().__init__(message)

    def __reduce__(self):
        # rebuilt from its parts where it crosses processes (a Ray task's error: pickled with the message alone,
        # the required ``problem`` was missing and the driver got Ray's UnserializableException, a traceback)
        return _input_error, (self.path, self.problem, self.record, self.expected, self.hint)


def _input_error(path: str, problem: str, record: str | None, expected: str | None, hint: str | None) -> InputError:
    return InputError(path, problem, record=record, expected=expected, hint=hint)
