"""Prometheus metrics of one gateway, in a registry of its own (never the process-global one).

Request-path metrics (outcomes, TTFT, inter-token latency) are recorded as requests run; the
serving side's state (queues, instances by state, bytes multicast, scale events, tier hits) is
read from :meth:`ServingBackend.status` at scrape time, so the numbers are never stale copies.
"""

from __future__ import annotations

from enum import Enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lambdascale.serve.backend import BackendStatus, InstanceState


class Outcome(str, Enum):
    """How a request ended, as counted by ``lambdascale_requests_total``."""

    OK = "ok"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    OVERLOADED = "overloaded"       # 429
    UNAVAILABLE = "unavailable"     # 503
    CLIENT_GONE = "client_gone"     # disconnect mid-stream
    ERROR = "error"                 # 500: a bug


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    """All series of one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lambdascale_requests", "requests by endpoint, model and outcome", ["endpoint", "model", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "lambdascale_time_to_first_token_seconds", "time from admission to the first token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "lambdascale_inter_token_latency_seconds", "time between consecutive tokens of a stream", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter("lambdascale_generated_tokens", "tokens generated", ["model"], registry=r)
        self.in_flight = Gauge("lambdascale_in_flight_requests", "requests admitted and not finished", ["model"], registry=r)
        self.queue = Gauge("lambdascale_queue_length", "requests waiting for a slot", ["model"], registry=r)
        self.instances = Gauge(
            "lambdascale_instances", "serving units by model and state", ["model", "state"], registry=r
        )
        self.nodes_alive = Gauge("lambdascale_nodes_alive", "live nodes", registry=r)
        self.node_state = Gauge("lambdascale_node_state", "1 for each node's membership state (alive, suspect, "
                                "dead, rejoining)", ["node", "state"], registry=r)
        self.node_incarnation = Gauge("lambdascale_node_incarnation", "each node's incarnation (grows on every "
                                      "(re)join)", ["node"], registry=r)
        self.node_restarts = Gauge("lambdascale_node_restarts_total", "times the gateway restarted a node's agent "
                                   "after it died", ["node"], registry=r)
        self.node_holdings = Gauge("lambdascale_node_holdings", "1 for each model copy a live node holds, by tier "
                                   "(a dead node holds none)", ["node", "model", "tier"], registry=r)
        self.bytes_multicast = Gauge("lambdascale_bytes_multicast_total", "bytes sent by block multicast", registry=r)
        self.scale_events = Gauge(
            "lambdascale_scale_events_total", "scale events by direction", ["direction"], registry=r
        )
        self.tier_hits = Gauge("lambdascale_tier_hits_total", "instance starts served from each tier", ["tier"], registry=r)
        self.kv_moves = Gauge("lambdascale_kv_moves_total", "requests moved off dissolving pipelines, by how their KV "
                              "moved (shipped, recomputed)", ["how"], registry=r)
        self.kv_bytes_shipped = Gauge("lambdascale_kv_bytes_shipped_total", "KV bytes shipped on dissolution", registry=r)

    def refresh(self, status: BackendStatus, models: list[str]) -> None:
        """Copy the serving side's state into the gauges (called on every scrape)."""
        for m in models:
            self.queue.labels(m).set(status.queues.get(m, 0))
            for st in InstanceState:
                self.instances.labels(m, st.value).set(
                    sum(1 for i in status.instances if i.model == m and i.state == st)
                )
        self.nodes_alive.set(sum(1 for n in status.nodes if n.alive))
        self.node_holdings.clear()  # only what the nodes hold now: a node that died drops out
        for n in status.nodes:
            for st in ("alive", "suspect", "dead", "rejoining"):
                self.node_state.labels(n.node_id, st).set(1 if n.state == st else 0)
            self.node_incarnation.labels(n.node_id).set(n.incarnation)
            self.node_restarts.labels(n.node_id).set(n.restarts)
            for model, tiers in n.tiers.items():
                for t in tiers:
                    self.node_holdings.labels(n.node_id, model, t.value).set(1)
        self.bytes_multicast.set(status.bytes_multicast)
        for direction, n in status.scale_events.items():
            self.scale_events.labels(direction).set(n)
        for tier, n in status.tier_hits.items():
            self.tier_hits.labels(tier).set(n)
        for how, n in status.kv_moves.items():
            self.kv_moves.labels(how).set(n)
        self.kv_bytes_shipped.set(status.kv_bytes_shipped)

    def render(self) -> bytes:
        return generate_latest(self.registry)
