"""Background tasks whose failures are never lost: :func:`log_failure` makes the done-callback
that logs a task's exception once, with what the task was, so no task of the agent or the gateway
ends as asyncio's "Task exception was never retrieved" at garbage collection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable


def log_failure(what: str, logger: logging.Logger) -> Callable[[asyncio.Task], None]:
    """A done-callback: a task that raised (not one cancelled) is logged once as ``what`` failed."""

    def done(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is not None:
            logger.error("%s failed: %r", what, t.exception(), exc_info=t.exception())

    return done
