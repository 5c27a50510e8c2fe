"""Fixtures of the gateway tests: apps over the fake backend, in-process or under real uvicorn."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI

from lambdascale.config import LambdaScaleConfig, load_config
from lambdascale.serve.app import create_app
from lambdascale.serve.fake import FakeBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec

MODEL = "fake-llm"


def make_config(**serve: Any) -> LambdaScaleConfig:
    return load_config(None, {f"serve.{k}": v for k, v in serve.items()})


@pytest.fixture
def make_app(tmp_path) -> Callable[..., tuple[FastAPI, FakeBackend]]:
    """Build an app over a fresh fake backend with ``MODEL`` registered."""

    def build(backend: FakeBackend | None = None, **serve: Any) -> tuple[FastAPI, FakeBackend]:
        be = backend or FakeBackend()
        serve.setdefault("registry_path", str(tmp_path / "registry.sqlite"))
        cfg = make_config(**serve)
        reg = ModelRegistry(cfg.serve.registry_path)
        if reg.get(MODEL) is None:
            reg.put(DeploySpec(name=MODEL))
        reg.close()
        return create_app(cfg, be), be

    return build


@pytest.fixture
def client(make_app) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    app, _ = make_app()
    with TestClient(app) as c:
        yield c
