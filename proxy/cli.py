"""`dsml-proxy serve ...`: build the settings from flags, pick the backend, serve.

    dsml-proxy serve --upstream http://127.0.0.1:8001 --upstream-kind vllm
    dsml-proxy serve --model /models/DeepSeek-V4-Flash      # the embedded engine
    dsml-proxy serve --demo                                 # a tiny random model (plumbing)

Only flags given on the command line are passed on, so `DSML_PROXY_*` variables and the
`--config` TOML file fill in the rest (proxy.settings).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dsml.dialects import Dialect
from proxy.backends.base import Backend
from proxy.logs import configure_logging
from proxy.settings import Settings, UpstreamKind

log = logging.getLogger("dsml_proxy")


def _served_model(value: str) -> dict[str, str]:
    """`--served-model NAME[=DIALECT]` -> a `Settings.models` entry."""
    name, sep, dialect = value.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME[=DIALECT], got {value!r}")
    if sep and dialect not in {d.value for d in Dialect}:
        raise argparse.ArgumentTypeError(
            f"unknown dialect {dialect!r}; one of {', '.join(d.value for d in Dialect)}")
    return {"name": name, "dialect": dialect} if sep else {"name": name}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsml-proxy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="serve the OpenAI-compatible API", argument_default=argparse.SUPPRESS,
        epilog="Every setting also reads DSML_PROXY_<NAME> from the environment and <name> "
               "from the --config TOML file (flags > environment > TOML > defaults). The "
               "reasoning signing secret has no flag, as anything on a command line shows in "
               "`ps`: set DSML_PROXY_REASONING_SIGNING_SECRET or reasoning_signing_secret in "
               "the TOML file (unset: a random key per process, so reasoning replayed after a "
               "restart is dropped).")
    serve.add_argument("--upstream", metavar="URL",
                       help="base URL of an engine with /v1/completions")
    serve.add_argument("--upstream-kind", choices=[k.value for k in UpstreamKind],
                       help="vllm (default), sglang, llamacpp (start it with --special), ds4")
    serve.add_argument("--upstream-model", metavar="NAME", help="`model` sent upstream")
    serve.add_argument("--upstream-prompt", choices=["ids", "text"],
                       help="send the prompt as token ids or text (default: by kind)")
    serve.add_argument("--model", metavar="DIR", help="checkpoint dir: the embedded engine")
    serve.add_argument("--demo", action="store_true",
                       help="serve a tiny random model (the default without --upstream/--model)")
    serve.add_argument("--device", help="embedded engine device (default: cuda if available)")
    serve.add_argument("--engine-path", choices=["auto", "fast", "reference"],
                       help="embedded engine decode: auto (fast on CUDA, reference elsewhere; "
                            "default), fast, or reference (the plain PyTorch oracle)")
    serve.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction,
                       help="embedded engine: keep finished sequences' KV for prompts that "
                            "extend them (default on; --no-prefix-cache turns it off)")
    serve.add_argument("--prefix-cache-disk", metavar="DIR",
                       help="embedded engine: also keep evicted conversations' KV on disk in "
                            "DIR (read back when a prompt continues one, also after a "
                            "restart; default off)")
    serve.add_argument("--prefix-cache-disk-gib", type=float, metavar="GIB",
                       help="size limit of --prefix-cache-disk (default 20; least recently "
                            "used files go first)")
    serve.add_argument("--host", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                       help="require this Bearer key (repeatable)")
    serve.add_argument("--dialect", choices=[d.value for d in Dialect],
                       help="the prompt format of the model behind the backend (default v4): "
                            "renders prompts and parses output for --model-name, "
                            "deepseek-chat and deepseek-reasoner")
    serve.add_argument("--model-name", help="the served default model name")
    serve.add_argument("--served-model", dest="models", action="append", type=_served_model,
                       metavar="NAME[=DIALECT]",
                       help="one more model name, rendered and parsed in DIALECT (default: "
                            "--dialect); repeatable. Every name goes to the same backend. "
                            "Also `models = [{name = ..., dialect = ...}]` in the TOML file "
                            "or DSML_PROXY_MODELS as a JSON list")
    serve.add_argument("--recover-empty-turns", action=argparse.BooleanOptionalAction,
                       help="continue a turn that ended inside reasoning once (default on)")
    serve.add_argument("--constrained-decoding", choices=["all", "required", "off"],
                       help="grammar-constrained DSML: every turn (all, the default), only "
                            "turns that force a tool call or ask for JSON (required), or none (off)")
    serve.add_argument("--max-concurrency", type=int, help="turns generating at once")
    serve.add_argument("--max-queue", type=int, help="turns waiting; beyond: 429")
    serve.add_argument("--response-store-size", type=int, metavar="N",
                       help="responses kept for /v1/responses previous_response_id "
                            "(default 1024)")
    serve.add_argument("--response-store-ttl", dest="response_store_ttl_s", type=float,
                       metavar="SECONDS", help="... each for at most this long (default 3600)")
    serve.add_argument("--keepalive-interval", dest="keepalive_interval_s", type=float,
                       metavar="SECONDS",
                       help="SSE keep-alive while a streamed turn is silent (default 5)")
    serve.add_argument("--client-timeout", dest="client_timeout_s", type=float,
                       metavar="SECONDS",
                       help="to send a request's headers, and its body (default 30)")
    serve.add_argument("--max-connections", type=int,
                       help="open client connections; beyond: 503 (default 1024)")
    serve.add_argument("--config", dest="config_file", metavar="FILE", help="a TOML file")
    serve.add_argument("--log-level", help="INFO (default), DEBUG, WARNING")
    return parser


def settings_from_args(argv: list[str]) -> Settings:
    args: dict[str, Any] = vars(build_parser().parse_args(argv))
    args.pop("command")
    return Settings(**args)


def make_backend(settings: Settings) -> Backend:
    if settings.upstream:
        from proxy.backends.upstream import UpstreamBackend

        return UpstreamBackend.from_settings(settings)
    # The engine needs torch (the `engine` extra): imported only when asked for.
    from proxy.backends.embedded import EmbeddedBackend

    device = settings.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if settings.model is not None:
        return EmbeddedBackend.from_checkpoint(settings.model, device=device,
                                               engine_path=settings.engine_path,
                                               **_cache_options(settings))
    from engine.make_checkpoint import write_checkpoint

    path = settings.demo_dir
    if not (path.is_dir() and any(path.iterdir())):
        write_checkpoint(path, config_name="tiny", seed=0)
    log.warning(
        "DEMO MODE: serving a tiny RANDOM model from %s. Its output is nonsense: this shows "
        "that the server, the wire and the metrics work, nothing more. Use --upstream URL or "
        "--model DIR for a real model.", path)
    return EmbeddedBackend.from_checkpoint(path, device=device, engine_path=settings.engine_path,
                                           **_cache_options(settings))


def _cache_options(settings: Settings) -> dict[str, Any]:
    return {"prefix_cache": settings.prefix_cache, "prefix_cache_disk": settings.prefix_cache_disk,
            "prefix_cache_disk_bytes": int(settings.prefix_cache_disk_gib * (1 << 30))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = settings_from_args(argv)
    configure_logging(settings.log_level)
    from proxy import state
    from proxy.app import create_app, serve
    from proxy.turn import sends_ids

    backend = make_backend(settings)
    app = create_app(backend, settings)
    log.info("serving", extra={"fields": {
        "url": f"http://{settings.host}:{settings.port}", "backend": backend.name,
        "dialect": settings.dialect, "model_name": settings.model_name,
        "models": {m.name: m.dialect or settings.dialect for m in settings.models}}})
    text_dialects = [d.value for d in app[state.MODELS].dialects if not sends_ids(d)]
    if text_dialects:
        # dsml.md section 4: only token ids keep client text from forging control tokens.
        log.warning(
            "dialects %s: the proxy has no tokenizer of these models, so their prompts go to "
            "the engine as text and the engine tokenizes them; control strings inside client "
            "text (e.g. <｜User｜>) then become control tokens", ", ".join(text_dialects))
    serve(app, settings.host, settings.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
