"""Joining an existing Ray cluster as its driver: token authentication, a reachable head, enough nodes.

Ray 2.5x and later can run with token authentication (``RAY_AUTH_MODE=token``). ``ray start``
turns it on by itself when it finds a token (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``
names, or ``~/.ray/auth_token``), but a driver that joins with an explicit address does not: with
the README's two commands, a head started on a machine that holds a token refuses the gateway
(``InvalidAuthToken``) while the gateway retries for 20 s. So the driver does what ``ray start``
does: where ``RAY_AUTH_MODE`` is unset and a token is available, it joins in token mode (Ray
accepts a token-mode driver on a cluster without authentication too, so this never breaks a
cluster that has none). ``RAY_AUTH_MODE`` set by the operator is always respected.

A failure to join is one line that says what to check: nothing listening at the address, or a
head that answered but refused us (its authentication, the usual cause, with what to set).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from lambdascale.errors import LambdaScaleError

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


class RayConnectError(LambdaScaleError):
    """The Ray cluster could not be joined, or offers too few agent slots."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LambdaScaleError("the ray launcher needs Ray: pip install 'lambdascale[ray]'") from None
    return ray


def token_source(environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where a Ray token is available to this process, in Ray's own order of lookup (the
    variable's name or the file's path), or None."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return TOKEN_ENV
    path = env.get(TOKEN_PATH_ENV)
    if path:
        return path if Path(path).expanduser().is_file() else None
    default = (home if home is not None else Path.home()) / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def choose_auth_mode(environ: dict[str, str] | None = None, home: Path | None = None) -> str | None:
    """The ``RAY_AUTH_MODE`` this driver should join with: the operator's setting when there is
    one, else ``token`` where a token is available (as ``ray start`` decides), else None (Ray's
    default, no authentication)."""
    env = os.environ if environ is None else environ
    if env.get(AUTH_MODE_ENV):
        return env[AUTH_MODE_ENV]
    return "token" if token_source(env, home) is not None else None


def _apply_auth_mode() -> str | None:
    mode = choose_auth_mode()
    if mode == "token" and not os.environ.get(AUTH_MODE_ENV):
        os.environ[AUTH_MODE_ENV] = "token"
        try:  # Ray caches its config at import; let this process see the mode it now has
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # an older or newer Ray without this hook reads the variable at init
            pass
        log.info("joining the Ray cluster with token authentication (a token is at %s)", token_source())
    return mode


def _head_reachable(address: str, timeout_s: float = 3.0) -> str | None:
    """None when something accepts TCP at ``address`` (HOST:PORT), else why not."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"{address!r} is not HOST:PORT"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return e.strerror or str(e)


def connect(address: str | None) -> Any:
    """``ray`` joined to the cluster at ``address`` (or the one this process already joined, or
    Ray's own ``auto`` lookup when None). Raises :class:`RayConnectError` in one line."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    explicit = address not in (None, "auto", "local")
    if explicit:
        why = _head_reachable(str(address))
        if why is not None:
            raise RayConnectError(f"no Ray cluster at {address} ({why}); start its head with "
                                  f"`ray start --head --port PORT` or fix runtime.address / --address")
    mode = _apply_auth_mode()
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # Ray raises ConnectionError / AuthenticationError / RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if mode == "token":
            hint = (f"this process joined with {AUTH_MODE_ENV}=token (token from {token_source()}); "
                    f"the head's token must be the same one ({TOKEN_ENV}, {TOKEN_PATH_ENV} or ~/.ray/auth_token)")
        else:
            hint = (f"if the cluster uses token authentication, give this process its token: set "
                    f"{AUTH_MODE_ENV}=token and {TOKEN_ENV} or {TOKEN_PATH_ENV} (or copy it to ~/.ray/auth_token)")
        raise RayConnectError(f"the Ray cluster at {address or 'auto'} refused this driver ({first}); {hint}") from None
    return ray


async def wait_for_slots(ray: Any, resource: str, need: int, timeout_s: float) -> None:
    """Wait until the cluster offers ``need`` units of ``resource`` (nodes still joining count
    once they have), or raise naming what it offers."""
    deadline = time.monotonic() + timeout_s
    have = ray.cluster_resources().get(resource, 0)
    while have < need and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # polling Ray's view of its nodes; nothing to wait on instead
        have = ray.cluster_resources().get(resource, 0)
    if have < need:
        raise RayConnectError(
            f"the Ray cluster offers {have:g} units of resource {resource!r} but {need} agents were asked for "
            f"(waited {timeout_s:g}s, runtime.register_timeout_s); start each Ray node with "
            f"--resources '{{\"{resource}\": 1}}' (runtime.ray_resource)"
        )
