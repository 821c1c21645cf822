"""Exceptions with enough context (file, line, field) for a user to fix their input without a debugger."""

from __future__ import annotations

from pathlib import Path


class GAGError(Exception):
    """Base class for errors the user is expected to act on."""


class RecordError(GAGError, ValueError):
    """A malformed input record; names the file, the 1-based line number and the field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}, line {line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}".replace(":  ", ": "))


class MissingArtifactError(GAGError, FileNotFoundError):
    """A stage's input artifact is missing; the message names the stage that produces it."""


class SchemaMismatchError(GAGError, ValueError):
    """An artifact was made with settings that differ from what the caller asks for."""


class UnfinishedArtifactError(MissingArtifactError):
    """An upstream folder given by path has no finished manifest (its stage was killed, or it was not made here)."""


class NonFiniteError(GAGError, FloatingPointError):
    """NaN or inf in a loss, a gradient or a loaded tensor; the message names the step, file or record."""


class ContextLengthError(GAGError, ValueError):
    """A prompt plus the tokens to generate does not fit the model's positions."""
