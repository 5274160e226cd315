"""Typed errors shared by the worker and the HTTP front. Pure Python: no torch."""

from __future__ import annotations


class FluxdError(Exception):
    """Base class of every error fluxd raises on purpose."""


class InvalidParameter(FluxdError, ValueError):
    """A request parameter is malformed, out of range, or not supported by the model.

    `param` names the offending field exactly as the client sent it, so the HTTP layer can answer a 400
    whose `param` points at it.
    """

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


class ModelNotFound(FluxdError, LookupError):
    """The model id is neither a known model nor an alias."""

    def __init__(self, model: str, known: list[str]) -> None:
        message = f"The model '{model}' does not exist. Available models: {', '.join(sorted(known))}."
        super().__init__(message)
        self.model = model
        self.message = message


class WeightsMissing(FluxdError, FileNotFoundError):
    """A model's weights are neither in the weights folder nor in the Hugging Face cache."""

    def __init__(self, model_id: str, looked_in: list[str], fetch_command: str) -> None:
        message = (
            f"No weights for '{model_id}': looked in {', '.join(looked_in)}. Fetch them with: {fetch_command}"
        )
        super().__init__(message)
        self.model_id = model_id
        self.message = message


class ModeUnfit(FluxdError, RuntimeError):
    """The mode configured for a checkpoint cannot run on this worker's device (too little memory)."""

    def __init__(self, weights_id: str, reason: str) -> None:
        super().__init__(reason)
        self.weights_id = weights_id
        self.message = reason


class Cancelled(FluxdError):
    """Every request of a running batch went away: its remaining steps and its decode are skipped."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"cancelled: {', '.join(ids)}")
        self.ids = ids
