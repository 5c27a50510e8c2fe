"""Running the gateway app under uvicorn: in a background thread (tests, benchmarks) or in front.

:class:`ServerThread` binds (port 0 = any free port), waits until uvicorn is accepting, exposes
the real URL, and on :meth:`stop` lets uvicorn finish its shutdown (lifespan closes the backend)
and joins the thread, so no test leaves a server behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI

from lambdascale.errors import LambdaScaleError


class ServerError(LambdaScaleError):
    """The gateway could not start (port in use, startup failure)."""


class _ExpectedStartupFailure(logging.Filter):
    """Drops the traceback uvicorn logs for a startup that failed with a :class:`LambdaScaleError`
    (bad input or an unreachable cluster: the error's one line is the whole story, and
    :meth:`ServerThread.start` raises it); any other failure keeps its traceback."""

    def __init__(self, app: FastAPI) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        err = getattr(self.app.state, "startup_error", None)
        return not (isinstance(err, LambdaScaleError) and str(record.msg).startswith("Traceback"))


class ServerThread:
    """uvicorn serving ``app`` on ``host:port`` in a daemon thread with its own event loop."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self._config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                      access_log=False, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._run, name="lambdascale-gateway", daemon=True)
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.host = host
        self.port = port

    def _run(self) -> None:
        quiet = _ExpectedStartupFailure(self.app)
        logging.getLogger("uvicorn.error").addFilter(quiet)
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.serve())
        except BaseException as e:  # reported to the starting thread
            self._error = e
        finally:
            loop.close()
            logging.getLogger("uvicorn.error").removeFilter(quiet)

    def start(self, timeout_s: float = 20.0) -> "ServerThread":
        self._thread.start()
        done = threading.Event()

        def wait() -> None:
            while not self._server.started and self._thread.is_alive():
                done.wait(0.01)
            done.set()

        wait_thread = threading.Thread(target=wait, daemon=True)
        wait_thread.start()
        wait_thread.join(timeout_s)
        if not self._server.started:
            died = not self._thread.is_alive()
            self.stop()
            cause = getattr(self.app.state, "startup_error", None)
            if died and cause is not None:
                raise ServerError(f"gateway failed to start on {self.host}:{self.port}: {cause}") from cause
            if died:
                raise ServerError(f"gateway failed to start on {self.host}:{self.port}: {self._error!r} "
                                  "(the log above says why)")
            raise ServerError(f"gateway did not start on {self.host}:{self.port} within {timeout_s}s")
        sockets = [s for srv in self._server.servers for s in srv.sockets]
        self.port = sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def call(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Run a coroutine function on the server's loop (tests poke the backend through this)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise ServerError(f"gateway thread did not stop within {timeout_s}s")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
