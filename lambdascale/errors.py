"""User-facing error types.

Anything raised as a :class:`LambdaScaleError` is a problem with input or environment that the
user can fix; the CLI prints its message (which names the file, field or limit) without a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LambdaScaleError(Exception):
    """Base of errors whose message is meant for the user."""


class CheckpointError(LambdaScaleError):
    """A checkpoint is missing, truncated, corrupted or of an unknown format version."""


class ModelNotFoundError(LambdaScaleError):
    """A model name is not in the models directory or registry."""


class InvalidRequestError(LambdaScaleError):
    """A request is malformed or exceeds a limit (prompt too long, bad sampling values)."""


class TransferError(LambdaScaleError):
    """A peer refused, stalled or vanished, or bytes arrived corrupted."""


class BackendUnavailableError(LambdaScaleError):
    """No capacity is left for a model (its nodes died or none can start): the gateway answers 503."""


class ModelNotServedError(LambdaScaleError):
    """The backend cannot serve this model (not in the models dir / not deployed)."""
