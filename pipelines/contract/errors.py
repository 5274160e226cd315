"""Typed errors shared by the worker and the HTTP front. Pure Python: no torch."""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "invalid_value",
    "invalid_json",
    "unknown_parameter",
    "missing_required_parameter",
    "invalid_api_key",
    "model_not_found",
    "image_not_found",
    "job_not_found",
    "job_finished",
    "idempotency_key_reused",
    "not_found",
    "method_not_allowed",
    "request_too_large",
    "rate_limit_exceeded",
    "worker_restarted",
    "out_of_memory",
    "model_unavailable",
    "jobs_unavailable",
    "storage_unavailable",
    "queue_timeout",
    "deadline_exceeded",
    "server_error",
    "job_crashed",
    "cancelled",
]
"""Every error code a worker or the front answers with: the `code` of the OpenAI error envelope. The front
answers each as server/declarations/errors.py's KINDS says. A mistyped code fails type checking."""

SERVER_ERROR = "The server had an error while processing your request."
"""The message of a fault the client can do nothing about (OpenAI's own words); its traceback is logged."""


class FluxdError(Exception):
    """Base class of every error fluxd raises on purpose: its `code` and `param` are what a client sees."""

    code: ErrorCode = "server_error"
    param: str | None = None
    message: str


class InvalidParameter(FluxdError, ValueError):
    """A request parameter is malformed, out of range, or not supported by the model.

    `param` names the offending field exactly as the client sent it, so the HTTP layer can answer a 400
    whose `param` points at it.
    """

    def __init__(self, param: str, message: str, code: ErrorCode = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


class ModelNotFound(FluxdError, LookupError):
    """The model id is neither a known model nor an alias."""

    code = "model_not_found"
    param = "model"

    def __init__(self, model: str, known: list[str]) -> None:
        message = f"The model '{model}' does not exist. Available models: {', '.join(sorted(known))}."
        super().__init__(message)
        self.model = model
        self.message = message


class WeightsMissing(FluxdError, FileNotFoundError):
    """A model's weights are neither in the weights folder nor in the Hugging Face cache."""

    code = "model_unavailable"
    param = "model"

    def __init__(self, model_id: str, looked_in: list[str], fetch_command: str) -> None:
        message = (
            f"No weights for '{model_id}': looked in {', '.join(looked_in)}. Fetch them with: {fetch_command}"
        )
        super().__init__(message)
        self.model_id = model_id
        self.message = message


class ModeUnfit(FluxdError, RuntimeError):
    """The mode configured for a checkpoint cannot run on this worker's device (too little memory)."""

    code = "model_unavailable"
    param = "model"

    def __init__(self, weights_id: str, reason: str) -> None:
        super().__init__(reason)
        self.weights_id = weights_id
        self.message = reason


class Cancelled(FluxdError):
    """Every request of a running batch went away: its remaining steps and its decode are skipped."""

    code = "cancelled"

    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"cancelled: {', '.join(ids)}")
        self.ids = ids
        self.message = "Every client of this batch went away."
