"""Fixtures for engine tests: tiny random models with a byte-level tokenizer."""

from __future__ import annotations


import pytest

from lambdascale.engine.engine import Engine
from lambdascale.engine.settings import EngineSettings
from lambdascale.model.tokenizer import Tokenizer

from .hf_ref import hf_model
from .toy_tokenizer import write_toy_tokenizer


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine their
    spin-waits cost more than the work; restored afterwards for other test folders."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(write_toy_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture()
def make_engine(toy_tokenizer: Tokenizer):
    """``make_engine(shape="tiny-llama", **settings)`` -> a fresh CPU float32 engine."""

    def make(shape: str = "tiny-llama", tokenizer: bool = True, **settings) -> Engine:
        arch, _model, sd = hf_model(shape)
        s = EngineSettings(device="cpu", dtype="float32", **settings)
        return Engine.from_tensors(arch, sd, toy_tokenizer if tokenizer else None, s)

    return make
