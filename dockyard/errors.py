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


class AbsurdConfigError(ConfigError):
    """A size no model could have (10**9 layers, positions past any device): refused on every path."""


class WeightsError(DockyardError):
    """Checkpoint tensors do not match the model: missing, unexpected or misshapen."""


class CheckpointConversionError(WeightsError):
    """A checkpoint tensor transformers converts on load (merged or split), which the generic path does not."""


class InsufficientMemoryError(DockyardError):
    """The memory plan says the model cannot start on this device; the message gives what would fit."""


class InvalidRequestError(DockyardError):
    """A request is invalid: bad sampling value, prompt too long, empty prompt, ..."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestFailedError(DockyardError):
    """One request failed while it was being generated; the engine and the other requests go on.

    ``cause`` is the exception its rows raised (an :class:`InvalidRequestError` when the request's own
    values were at fault, anything else for a bug the server log has the traceback of)."""

    def __init__(self, request_id: str, cause: Exception) -> None:
        what = str(cause) if isinstance(cause, DockyardError) else "an internal error (the server log has the details)"
        super().__init__(f"request {request_id} failed while generating: {what}; other requests are not affected")
        self.request_id = request_id
        self.cause = cause
