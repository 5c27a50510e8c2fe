"""The one typed configuration tree.

Each subsystem declares its own section in ``<package>/settings.py`` (pydantic models, every field
documented and bounded); this module composes them into :class:`LambdaScaleConfig`, loads it from
YAML/JSON with clear errors, writes it out with every run, and derives command-line options from
the fields so that no default is written twice.

Precedence: defaults < config file < environment (``LAMBDASCALE_MODELS``) < command-line flags.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lambdascale.control.settings import ControlSettings
from lambdascale.engine.settings import EngineSettings
from lambdascale.runtime.settings import RuntimeSettings
from lambdascale.serve.settings import ServeSettings
from lambdascale.sim.settings import SimSettings
from lambdascale.pipe.settings import PipeSettings
from lambdascale.store.settings import StoreSettings
from lambdascale.transfer.settings import TransferSettings


def default_models_dir() -> Path:
    """``$LAMBDASCALE_MODELS`` if set, else ``~/.cache/lambdascale/models``."""
    env = os.environ.get("LAMBDASCALE_MODELS")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lambdascale" / "models"


class PathSettings(BaseModel):
    """Where models and run records live."""

    model_config = ConfigDict(extra="forbid")

    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="models directory (our block format); env LAMBDASCALE_MODELS overrides the default",
    )
    runs_dir: Path = Field(
        default=Path("runs"), description="where every run writes its config and results"
    )


class LambdaScaleConfig(BaseModel):
    """Root of the configuration tree."""

    model_config = ConfigDict(extra="forbid")

    paths: PathSettings = Field(default_factory=PathSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    sim: SimSettings = Field(default_factory=SimSettings)
    pipe: PipeSettings = Field(default_factory=PipeSettings)


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the field and the value."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> LambdaScaleConfig:
    """Load the config tree from a YAML or JSON file (or defaults), then apply dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if overrides:
        source = "command-line flags" if path is None else f"{source} and command-line flags"
    try:
        return LambdaScaleConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def dump_config(cfg: LambdaScaleConfig, path: str | Path) -> Path:
    """Write the effective config next to a run's results (YAML), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    os.replace(tmp, p)
    return p


def describe_config(model: type[BaseModel] = LambdaScaleConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, default, documentation) for every leaf field: ``lambdascale config`` prints it."""
    out: list[tuple[str, Any, str]] = []
    instance = model()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            out.extend(describe_config(type(value), dotted + "."))
        else:
            if isinstance(value, Enum):
                value = value.value
            out.append((dotted, value, field.description or ""))
    return out


# ---- CLI derivation --------------------------------------------------------------------------

def _scalar_type(annotation: Any) -> Any:
    """The argparse ``type`` for a field annotation (Optional unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _scalar_type(args[0])
        return str
    if origin is typing.Literal:
        return str
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return str
    if annotation in (int, float, str, Path):
        return annotation
    return str


def add_config_args(parser: argparse.ArgumentParser, section: str, fields: list[str]) -> None:
    """Add ``--field-name`` options for selected fields of a config section.

    The option's default is ``None`` (meaning "keep the config value"); its help text is the
    field's documentation plus the default taken from the model, so defaults live in one place.
    Booleans become ``--flag/--no-flag``.
    """
    model = LambdaScaleConfig.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    defaults = model()
    for name in fields:
        field = model.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, Enum):
            default = default.value
        help_text = f"{field.description or name} (default: {default})"
        dest = f"cfg__{section}__{name}"
        if field.annotation is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(
                flag, dest=dest, type=_scalar_type(field.annotation), default=None,
                metavar=name.upper(), help=help_text,
            )


def config_from_args(args: argparse.Namespace) -> LambdaScaleConfig:
    """The config tree from ``--config FILE`` (if the parser had it) plus derived flags."""
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__") and value is not None:
            _, section, name = key.split("__", 2)
            overrides[f"{section}.{name}"] = value
    models_dir = getattr(args, "models_dir", None)
    if models_dir is not None:
        overrides["paths.models_dir"] = str(models_dir)
    return load_config(getattr(args, "config", None), overrides)
