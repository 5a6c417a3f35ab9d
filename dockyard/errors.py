"""User-facing errors.

Anything a user can cause (a bad path, a broken file, an unsupported config, an invalid
sampling value, a prompt that is too long) raises a subclass of :class:`DockyardError` with a
message that names the input and says what to do. The CLI prints such messages without a
traceback; anything else escaping is a bug in dockyard.
"""

from __future__ import annotations


class DockyardError(Exception):
    """Base class of every error a user can cause and fix."""


class ModelNotFoundError(DockyardError):
    """The model path does not exist or holds nothing dockyard can load."""


class InvalidModelFileError(DockyardError):
    """A model file exists but is not what it claims to be (bad GGUF header, bad JSON, ...)."""


class ConfigError(DockyardError):
    """A config value fails validation; the message names the field and the value."""


class UnsupportedArchitectureError(DockyardError):
    """The config names an architecture no dockyard model class implements."""


class WeightsError(DockyardError):
    """Checkpoint tensors do not match the model: missing, unexpected or misshapen."""


class InsufficientMemoryError(DockyardError):
    """The memory plan says the model cannot start on this device; the message gives what would fit."""


class InvalidRequestError(DockyardError):
    """A request is invalid: bad sampling value, prompt too long, empty prompt, ..."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
