"""``lambdascale generate MODEL "prompt"``: stream an answer to the terminal.

Sampling flags default to :class:`SamplingParams` except ``--temperature``, which defaults to 0
(greedy) here: the command is for reproducible answers from small models, which ramble at the
API's default of 1.0. Engine flags (device, dtype, context) are derived from the config tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lambdascale.engine.sampling import SamplingParams

#: The CLI's sampling defaults: the dataclass's, made greedy.
CLI_SAMPLING = dataclasses.replace(SamplingParams(), temperature=0.0)


def _open_model(model: str, models_dir: Path, quiet: bool):
    """A checkpoint by name (importing the demo model on first use) or by directory path."""
    from lambdascale.errors import ModelNotFoundError
    from lambdascale.model.checkpoint import Checkpoint, find_model
    from lambdascale.model.manifest import MANIFEST_NAME

    p = Path(model).expanduser()
    if (p / MANIFEST_NAME).is_file():
        return Checkpoint(p)
    try:
        return find_model(models_dir, model)
    except ModelNotFoundError:
        from lambdascale.model.importers import DEMO_MODEL, import_model

        if model != DEMO_MODEL:
            raise
        if not quiet:
            print(f"importing {DEMO_MODEL} into {models_dir} (once)...", file=sys.stderr)
        return import_model(DEMO_MODEL, models_dir, progress=not quiet)


def _cmd_generate(args: argparse.Namespace) -> int:
    from lambdascale.config import config_from_args
    from lambdascale.engine.engine import Engine

    cfg = config_from_args(args)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos,
    )
    ckpt = _open_model(args.model, cfg.paths.models_dir, args.quiet)
    engine = Engine.from_checkpoint(ckpt, cfg.engine)
    use_chat = engine.tokenizer is not None and engine.tokenizer.is_chat and not args.raw
    if use_chat:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": args.prompt})
        stream = engine.generate(messages=messages, params=params)
    else:
        stream = engine.generate(args.prompt, params)
    out = sys.stdout
    last = None
    for delta in stream:
        if delta.text:
            out.write(delta.text)
            out.flush()
        last = delta
    out.write("\n")
    if args.verbose and last is not None:
        print(f"[{last.num_output_tokens} tokens, finish_reason={last.finish_reason.value if last.finish_reason else None}]",
              file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from lambdascale.config import add_config_args

    helps = SamplingParams.field_help()
    d = CLI_SAMPLING
    p = sub.add_parser("generate", help="stream a model's answer to a prompt (chat template applied for chat models)")
    p.add_argument("model", help="model name in the models directory (smollm2-135m is imported on first use) or a model directory")
    p.add_argument("prompt", help="the prompt (the user message for chat models)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"{helps['max_tokens']} (default: {d.max_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"{helps['temperature']} (default here: {d.temperature}, greedy)")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"{helps['top_p']} (default: {d.top_p})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"{helps['top_k']} (default: {d.top_k})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"{helps['seed']} (default: {d.seed})")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help=f"{helps['stop']}; repeatable")
    p.add_argument("--ignore-eos", action="store_true", help=helps["ignore_eos"])
    p.add_argument("--system", default=None, help="system message for chat models (default: the template's own)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="models directory (default: $LAMBDASCALE_MODELS or ~/.cache/lambdascale/models)")
    p.add_argument("--config", default=None, help="config file (YAML/JSON) to read defaults from")
    p.add_argument("--quiet", action="store_true", help="no import progress")
    p.add_argument("-v", "--verbose", action="store_true", help="print token count and finish reason to stderr")
    add_config_args(p, "engine", ["device", "dtype", "max_model_len", "threads"])
    p.set_defaults(func=_cmd_generate)
