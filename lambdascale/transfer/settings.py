"""Data-plane configuration section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TransferSettings(BaseModel):
    """Transport backend and emulated link capacities."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["tcp", "nixl"] = Field(default="tcp", description="data-plane transport")
    link_gbps: float | None = Field(
        default=None, gt=0, description="cap on each agent's send and receive rate, Gbit/s (None = uncapped)"
    )
    ssd_gbps: float | None = Field(
        default=None, gt=0, description="cap on reads from the SSD tier, Gbit/s (None = uncapped)"
    )
    bind: str = Field(
        default="auto",
        description="address the agent's transport listens on: an IP address, an interface name (eth1, ib0), "
        "or auto = the address this host uses to reach the controller (127.0.0.1 for local agents); "
        "0.0.0.0 listens on every interface and advertises the auto address",
    )
    advertise: str | None = Field(
        default=None,
        description="address other agents dial to reach this transport (default: the bound address); for "
        "hosts behind address translation",
    )
    digest: Literal["none", "sha256", "blake3"] = Field(
        default="none",
        description="a cryptographic digest per chunk, checked by every receiver beside the xxh64 (which "
        "catches corruption, not tampering): for networks that are not trusted. The controller computes the "
        "digests from its own copy of the model (cached next to it) and sends them with the receivers' "
        "manifest; off by default because a cluster network is normally trusted and the secret already keeps "
        "strangers out (cost: docs/BENCHMARKS.md, transfer digest)",
    )
    tls_cert: str | None = Field(
        default=None,
        description="PEM certificate every node presents on the control channel and the tcp transport (mutual "
        "TLS, standard ssl module); with tls_key and tls_ca, or none of the three (TLS off: the channels still "
        "prove the cluster secret, but bytes travel in the clear)",
    )
    tls_key: str | None = Field(default=None, description="PEM private key of tls_cert (keep it mode 0600)")
    tls_ca: str | None = Field(
        default=None, description="PEM CA certificate that signed every node's tls_cert; a peer it did not sign is refused"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="give up connecting to a peer after this long")
    stall_timeout_s: float = Field(default=10.0, gt=0, description="a peer that moves no bytes this long is declared dead")
    io_slice_bytes: int = Field(
        default=1 << 20,
        ge=4096,
        le=1 << 30,
        description="bytes per socket call / token-bucket grant; smaller slices make a rate cap smoother",
    )
    bucket_burst_bytes: int = Field(
        default=1 << 20,
        ge=4096,
        le=1 << 30,
        description="token-bucket depth: bytes a capped link may move at once after being idle",
    )
    nixl_poll_s: float = Field(
        default=0.0005, gt=0, le=0.1, description="how often the nixl backend polls for notifications and completions"
    )
