"""``lambdascale import`` and ``lambdascale models``.

Heavy libraries (torch, gguf, tokenizers) are imported inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lambdascale.config import add_config_args, config_from_args


def _add_models_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", type=Path, default=None,
                   help="models directory (default: $LAMBDASCALE_MODELS or ~/.cache/lambdascale/models)")
    p.add_argument("--config", default=None, help="config file (YAML/JSON) to read defaults from")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _cmd_import(args: argparse.Namespace) -> int:
    from lambdascale.model.importers import import_model

    cfg = config_from_args(args)
    ck = import_model(
        args.spec,
        cfg.paths.models_dir,
        name=args.name,
        n_blocks=args.blocks,
        chunks_per_block=cfg.store.chunks_per_block,
        layers=args.layers,
        dtype=args.dtype,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
        settings=cfg.store,
    )
    m = ck.manifest
    print(f"{m.name}: {_fmt_bytes(m.total_bytes)}, {m.n_blocks} blocks, {m.n_chunks} chunks, {m.dtype.value} -> {ck.dir}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from lambdascale.model.checkpoint import list_models

    cfg = config_from_args(args)
    rows = list_models(cfg.paths.models_dir)
    if not rows:
        print(f"no models in {cfg.paths.models_dir} (try `lambdascale import smollm2-135m`)")
        return 0
    print(f"{'NAME':<32} {'SIZE':>10} {'BLOCKS':>6} {'CHUNKS':>6} {'DTYPE':<9} {'FAMILY':<8} {'LAYERS':>6}  SOURCE")
    for r in rows:
        if r.error is not None:
            print(f"{r.name:<32} BROKEN: {r.error}")
            continue
        print(f"{r.name:<32} {_fmt_bytes(r.total_bytes):>10} {r.n_blocks:>6} {r.n_chunks:>6} {r.dtype:<9} "
              f"{r.family:<8} {r.layers:>6}  {r.source}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``import`` and ``models`` to the top-level parser."""
    p = sub.add_parser(
        "import",
        help="import a model into our block format (smollm2-135m | HF directory | synthetic:SHAPE)",
        description="Convert a model into lambdascale's block format, once (a second import is a no-op unless --force).",
    )
    p.add_argument("spec", help="smollm2-135m, a local Hugging Face directory, or synthetic:SHAPE (e.g. synthetic:llama2-7b)")
    _add_models_dir(p)
    p.add_argument("--name", default=None, help="model name in the models directory (default derived from the spec)")
    p.add_argument("--blocks", type=int, default=None,
                   help="execution blocks (default: store.n_blocks, capped at the layer count)")
    add_config_args(p, "store", ["chunks_per_block"])
    p.add_argument("--layers", type=int, default=None, help="synthetic only: shrink the shape to N layers")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="storage dtype (default: float32 for the demo and tiny shapes, the HF dtype, bfloat16 for synthetic)")
    p.add_argument("--seed", type=int, default=0, help="synthetic only: random seed")
    p.add_argument("--force", action="store_true", help="re-import even when the model exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_import)

    m = sub.add_parser("models", help="list models in the models directory with sizes and blocks")
    _add_models_dir(m)
    m.set_defaults(func=_cmd_models)
