"""Errors raised on bad user input. Every message names the file, field or value at fault."""

from __future__ import annotations


class SpardError(ValueError):
    """Base class for every user-facing spard error (a ``ValueError``)."""


class ConfigError(SpardError):
    """A config file or ``key=value`` override is invalid."""


class FieldError(ConfigError):
    """Raised by a config dataclass's ``__post_init__`` for one field (``name`` relative to its section,
    e.g. ``harmful_ratio`` or ``classifier.model``); the config loader adds the file and section path."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"{name}={value!r}: {reason}")


class DataError(SpardError):
    """A data file or record is missing, malformed or lacks a required field."""


class ModelError(SpardError):
    """A model path or id cannot be loaded as asked."""


class DefenseSignalError(SpardError):
    """A defense's own signal (the gradient or loss term it adds to training) is identically zero or not finite
    at the start of a run: training on would be plain fine-tuning under the defense's name."""
