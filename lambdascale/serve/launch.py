"""``lambdascale serve``: pick the backend, register the startup models, run the gateway until Ctrl-C.

Backends: ``cluster`` (default: ``runtime.nodes`` node agents, the controller scaling each model,
the demo model held in one node's host tier), ``engine`` (one in-process engine per model) and
``fake`` (no model).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, TextIO

from lambdascale.config import LambdaScaleConfig, dump_config
from lambdascale.errors import LambdaScaleError
from lambdascale.serve.backend import ServingBackend
from lambdascale.serve.registry import ModelRegistry
from lambdascale.serve.schemas import DeploySpec

log = logging.getLogger("lambdascale.serve")

DEMO_MODEL = "smollm2-135m"


def build_backend(cfg: LambdaScaleConfig) -> ServingBackend:
    """The backend named by ``serve.backend``."""
    kind = cfg.serve.backend
    if kind == "fake":
        from lambdascale.serve.fake import FakeBackend

        return FakeBackend(n_instances=1, slots_per_instance=cfg.engine.max_batch_size, token_delay_s=0.01)
    if kind in ("cluster", "auto"):
        from lambdascale.serve.cluster_backend import ClusterBackend

        return ClusterBackend(cfg)
    from lambdascale.serve.engine_backend import EngineBackend

    return EngineBackend(cfg)


def startup_models(cfg: LambdaScaleConfig, registry: ModelRegistry, out: TextIO) -> list[str]:
    """Register ``serve.model`` (or the demo model when nothing is registered); import the demo if missing."""
    names = list(cfg.serve.model)
    if not names and not registry.list():
        names = [DEMO_MODEL]
    if cfg.serve.backend != "fake":
        from lambdascale.model.checkpoint import list_models

        have = {m.name for m in list_models(cfg.paths.models_dir)} if cfg.paths.models_dir.is_dir() else set()
        # The demo model is imported when asked for or already registered (a registry kept from an earlier run
        # in this directory, with a models_dir that lost it or a new HOME): otherwise it could not be served.
        for n in dict.fromkeys(names + [s.name for s in registry.list()]):
            if n == DEMO_MODEL and n not in have:
                from lambdascale.model.importers import import_model

                print(f"importing the demo model {DEMO_MODEL} into {cfg.paths.models_dir} (once) ...", file=out, flush=True)
                import_model(DEMO_MODEL, cfg.paths.models_dir)
    for n in names:
        if registry.get(n) is None:
            registry.put(DeploySpec(name=n))
    return [s.name for s in registry.list()]


def openai_example(url: str, model: str, key: str) -> str:
    """A shell line that runs verbatim: this interpreter (a bare ``python`` may be another one), and
    ``pip install openai`` first when the SDK is not installed here (it is no dependency of the server)."""
    import importlib.util
    import shlex
    import sys

    py = shlex.quote(sys.executable)
    code = (f"import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='{key}'); "
            f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hello!'}}])"
            ".choices[0].message.content)")
    run = f'{py} -c "{code}"'
    if importlib.util.find_spec("openai") is None:
        return f"{py} -m pip install -q openai && {run}"
    return run


def signal_flag() -> tuple[list[int], Callable[[int, object], None]]:
    """A list and a signal handler that appends the signal to it, and does nothing else.

    Python runs a handler on the main thread between bytecodes, possibly inside ``Event.wait``,
    which holds the event's lock there: a handler that called ``stop.set()`` then waited for that
    lock forever, and Ctrl-C hung ``lambdascale serve`` now and then. The serve loop polls the list.
    """
    got: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        got.append(signum)

    return got, on_signal


def serve_forever(cfg: LambdaScaleConfig, explicit_cluster: bool = False, out: TextIO | None = None,
                  stop: threading.Event | None = None) -> int:
    """Run until Ctrl-C / SIGTERM (or ``stop`` is set); returns the exit code."""
    import sys

    from lambdascale.serve.app import create_app
    from lambdascale.serve.server import ServerThread

    out = out or sys.stdout
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if explicit_cluster and cfg.serve.backend not in ("cluster", "auto"):
        log.warning("--nodes/--launcher/--address apply to --backend cluster; serving with the %s backend",
                    cfg.serve.backend)
    registry = ModelRegistry(cfg.serve.registry_path)
    try:
        models = startup_models(cfg, registry, out)
    except LambdaScaleError:
        registry.close()
        raise
    run_dir = cfg.paths.runs_dir / "serve"
    dump_config(cfg, run_dir / "config.yaml")  # keys are SecretStr: written masked
    backend = build_backend(cfg)
    app = create_app(cfg, backend, registry=registry)
    server = ServerThread(app, cfg.serve.host, cfg.serve.port, log_level="info")
    server.start(timeout_s=600)
    url = server.url
    key = cfg.serve.api_keys[0].get_secret_value() if cfg.serve.api_keys else "none"
    model = models[0] if models else "MODEL"
    print(f"lambdascale gateway serving {models} at {url}  (backend: {cfg.serve.backend}; Ctrl-C to stop)", file=out)
    print("try:", file=out)
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
          + ("-H 'Authorization: Bearer KEY' " if cfg.serve.api_keys else "")
          + f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'", file=out)
    print("  " + openai_example(url, model, "KEY" if key != "none" else "none"), file=out, flush=True)
    stop = stop or threading.Event()
    signalled, on_signal = signal_flag()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    try:
        while not signalled and not stop.wait(0.5):
            if not server._thread.is_alive():
                log.error("gateway stopped unexpectedly")
                return 1
    finally:
        print("shutting down ...", file=out, flush=True)
        server.stop()
        registry.close()
    print("stopped cleanly", file=out, flush=True)
    return 0
