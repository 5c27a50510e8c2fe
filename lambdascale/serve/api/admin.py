"""The admin API (``/admin/models``, ``/admin/status``): deployments kept in the registry, and the backend's state.

Every change goes to the backend first, then to the registry (so a restart re-deploys it), then
into the app's specs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import Request

from lambdascale.serve.api.errors import ApiError
from lambdascale.serve.api.state import GatewayState
from lambdascale.serve.backend import ModelNotServedError
from lambdascale.serve.schemas import DeploySpec, UpdateSpec
from lambdascale.serve.timeline_log import format_timeline

log = logging.getLogger("lambdascale.serve")


class AdminHandler:
    def __init__(self, state: GatewayState, check_key: Callable[[Request], None]) -> None:
        self.state, self.check_key = state, check_key

    def _not_deployed(self, name: str) -> ApiError:
        return ApiError(404, f"model '{name}' is not deployed; deployed: {sorted(self.state.specs)}",
                        "invalid_request_error", "model_not_found")

    async def admin_list(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        return {"data": [s.model_dump() for s in self.state.specs.values()]}

    async def admin_deploy(self, spec: DeploySpec, request: Request) -> dict[str, Any]:
        self.check_key(request)
        st = self.state
        if spec.name in st.specs:
            raise ApiError(409, f"model '{spec.name}' is already deployed; use PATCH /admin/models/{spec.name}",
                           "invalid_request_error", "already_deployed", "name")
        try:
            await st.backend.deploy(spec)
        except ModelNotServedError as e:
            raise ApiError(404, str(e), "invalid_request_error", "model_not_found", "name") from None
        st.registry.put(spec)
        st.specs[spec.name] = spec
        log.info("deployed model %s: %s", spec.name, spec.model_dump_json())
        return spec.model_dump()

    async def admin_update(self, name: str, patch: UpdateSpec, request: Request) -> dict[str, Any]:
        self.check_key(request)
        st = self.state
        current = st.specs.get(name)
        if current is None:
            raise self._not_deployed(name)
        try:
            spec = DeploySpec.model_validate(current.model_dump() | patch.model_dump(exclude_none=True))
        except ValueError as e:
            raise ApiError(400, f"invalid update for '{name}': {e}", "invalid_request_error") from None
        await st.backend.deploy(spec)
        st.registry.put(spec)
        st.specs[name] = spec
        log.info("updated model %s: %s", name, spec.model_dump_json())
        return spec.model_dump()

    async def admin_delete(self, name: str, request: Request) -> dict[str, Any]:
        self.check_key(request)
        st = self.state
        if name not in st.specs:
            raise self._not_deployed(name)
        await st.backend.undeploy(name)
        st.registry.delete(name)
        del st.specs[name]
        log.info("deleted model %s", name)
        return {"id": name, "deleted": True}

    async def admin_status(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        st = self.state.backend.status()
        return {
            "nodes": [{"node_id": n.node_id, "alive": n.alive, "state": n.state, "incarnation": n.incarnation,
                       "restarts": n.restarts,
                       "tiers": {m: [t.value for t in ts] for m, ts in n.tiers.items()}} for n in st.nodes],
            "instances": [asdict(i) | {"state": i.state.value, "nodes": list(i.nodes)} for i in st.instances],
            "queues": st.queues,
            "admitted": dict(self.state.admitted),
            "deployments": [s.model_dump() for s in self.state.specs.values()],
            "bytes_multicast": st.bytes_multicast,
            "kv_moves": st.kv_moves,
            "kv_bytes_shipped": st.kv_bytes_shipped,
            "scale_events": st.scale_events,
            "tier_hits": st.tier_hits,
            "timeline": [format_timeline(t) for t in st.timeline],
            "scale_timelines": [t.to_dict() for t in st.timeline],
        }
