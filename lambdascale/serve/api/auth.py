"""Bearer-key checks: ``/v1`` accepts inference and admin keys, ``/admin`` admin keys only.

With no key configured at all, every endpoint is open. Keys are compared in constant time and the
presented key is never echoed or logged.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from lambdascale.config import LambdaScaleConfig
from lambdascale.serve.api.errors import ApiError
from lambdascale.serve.metrics import Outcome


class KeyCheck:
    """Raises a 401 :class:`ApiError` unless the request carries a key this class of endpoints accepts."""

    def __init__(self, config: LambdaScaleConfig, admin: bool) -> None:
        self._config, self.admin = config, admin

    def _keys(self) -> list[str]:
        s = self._config.serve
        keys = [k.get_secret_value() for k in s.admin_api_keys]
        if not self.admin:
            keys += [k.get_secret_value() for k in s.api_keys]
        return keys

    def enabled(self) -> bool:
        return bool(self._config.serve.api_keys or self._config.serve.admin_api_keys)

    def __call__(self, request: Request) -> None:
        if not self.enabled():
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        ok = scheme.lower() == "bearer" and token and any(
            hmac.compare_digest(token.encode(), k.encode()) for k in self._keys()
        )
        if not ok:
            # Never echo or log the presented key.
            what = "an admin API key" if self.admin else "a valid API key"
            raise ApiError(401, f"this endpoint needs {what} (Authorization: Bearer KEY)",
                           "authentication_error", "invalid_api_key", outcome=Outcome.UNAUTHORIZED)
