"""The one configuration object. Nothing else in the project reads the environment.

Precedence (highest first): command-line flags (passed as init arguments by `proxy.cli`),
`DSML_PROXY_*` environment variables, a TOML file (`--config FILE`), the defaults below.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class UpstreamKind(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMACPP = "llamacpp"
    DS4 = "ds4"


def _dialect_value(value: str) -> str:
    from dsml.dialects import Dialect

    try:
        return Dialect(value).value
    except ValueError:
        raise ValueError(
            f"unknown dialect {value!r}; one of {', '.join(d.value for d in Dialect)}"
        ) from None


class ServedModel(BaseModel):
    """One extra model name this server answers to, and the dialect it renders and parses
    with. Every name goes to the same backend: the name only picks the prompt format, so one
    server can front e.g. a V3.2 and a V4 deployment behind a router, or tests compare them.

        models = [{name = "deepseek-v3.2", dialect = "v3.2"}, {name = "v4.1", dialect = "v4.1"}]
        DSML_PROXY_MODELS='[{"name": "deepseek-v3.2", "dialect": "v3.2"}]'
        dsml-proxy serve --served-model deepseek-v3.2=v3.2
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    dialect: str | None = None  # None: the server's `dialect`
    thinking: bool | None = None  # default thinking mode; None: as for the server default

    @field_validator("dialect")
    @classmethod
    def _check_dialect(cls, value: str | None) -> str | None:
        return None if value is None else _dialect_value(value)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSML_PROXY_", extra="forbid")

    # -- serving ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str = "deepseek-v4"  # the server default model (thinking = default_thinking)
    dialect: str = "v4"  # a dsml.Dialect value: of model_name, deepseek-chat/-reasoner
    models: list[ServedModel] = Field(default_factory=list)  # more names, each its dialect
    default_thinking: bool = True  # DeepSeek's API default when a request says nothing

    # -- backend -----------------------------------------------------------------------------
    upstream: str | None = None  # base URL of an engine, e.g. http://127.0.0.1:8001
    upstream_kind: UpstreamKind = UpstreamKind.VLLM
    upstream_model: str | None = None  # `model` sent upstream (None: omitted / server default)
    upstream_prompt: str | None = None  # "ids" | "text"; None: what the kind accepts best
    upstream_connect_timeout_s: float = Field(10.0, gt=0)
    upstream_read_timeout_s: float = Field(600.0, gt=0)  # max silence between two chunks
    model: Path | None = None  # checkpoint dir for the embedded engine
    demo: bool = False  # serve a tiny random checkpoint (plumbing demo)
    demo_dir: Path = Path("~/.cache/dsml-proxy/demo").expanduser()
    device: str | None = None  # embedded engine: None = cuda if available, else cpu
    # embedded engine decode: "auto" = fast path (CUDA graphs, Triton kernels) on CUDA and the
    # reference elsewhere; "fast" everywhere; "reference" = the plain PyTorch oracle
    engine_path: Literal["auto", "fast", "reference"] = "auto"
    # keep finished sequences' KV slots and continue them when a prompt extends one (issue
    # 17: an agent's tool loop does not prefill its conversation again); fast path only
    prefix_cache: bool = True
    # its second tier on disk (off by default): evicted conversations are written here and
    # read back when a prompt continues one, also after a restart; bounded in size
    prefix_cache_disk: Path | None = None
    prefix_cache_disk_gib: float = Field(20.0, gt=0)

    # -- turn policy -------------------------------------------------------------------------
    recover_empty_turns: bool = True
    reasoning_cache_size: int = Field(4096, ge=0)  # tool-call ids remembered (LRU)
    strict_tool_calls: bool = False  # hold calls until validated (dsml.md section 6)
    # Constrained decoding (README "Constrained decoding"): "all" turns, only "required"
    # (forced tool choice, or a JSON response_format) ones, or "off".
    constrained_decoding: Literal["all", "required", "off"] = "all"

    # -- Anthropic messages and Responses ------------------------------------------------------
    # HMAC key of the signatures on reasoning sent to clients (thinking blocks, reasoning
    # items). None: a random key per process, so reasoning replayed after a restart is dropped.
    reasoning_signing_secret: SecretStr | None = None
    response_store_size: int = Field(1024, ge=0)  # responses kept for previous_response_id
    response_store_ttl_s: float = Field(3600.0, gt=0)  # ... each for at most this long
    keepalive_interval_s: float = Field(5.0, gt=0)  # SSE ping / comment while a turn is silent

    # -- limits and auth -----------------------------------------------------------------------
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    # Work one request may ask for (issue 14): each is refused with a 400 before the work.
    max_tools: int = Field(1024, ge=0)
    max_messages: int = Field(16384, ge=1)  # messages / Responses input items
    max_prompt_tokens: int = Field(1_048_576, ge=1)  # the model's context (V4: 1M tokens)
    offload_bytes: int = Field(256 * 1024, ge=0)  # bigger bodies: parsed/rendered off the loop
    worker_threads: int = Field(2, ge=1)  # ... on this many threads
    client_timeout_s: float = Field(30.0, gt=0)  # to send a request's headers, and its body
    max_connections: int = Field(1024, ge=1)  # open client connections; beyond: 503, closed
    max_concurrency: int = Field(64, ge=1)  # turns generating at once
    max_queue: int = Field(256, ge=0)  # turns waiting for a slot; beyond: 429
    retry_after_s: int = Field(1, ge=0)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    public_health: bool = True  # /health and /ready without a key
    public_metrics: bool = True  # /metrics without a key

    # -- logging -------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_requests: bool = True

    config_file: Path | None = Field(None, exclude=True)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        # DSML_PROXY_API_KEYS="k1,k2" as well as a JSON list.
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("upstream_prompt")
    @classmethod
    def _check_prompt(cls, value: str | None) -> str | None:
        if value not in (None, "ids", "text"):
            raise ValueError("upstream_prompt must be 'ids' or 'text'")
        return value

    @field_validator("dialect")
    @classmethod
    def _check_dialect(cls, value: str) -> str:
        return _dialect_value(value)

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[ServedModel]) -> list[ServedModel]:
        names = [m.name for m in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models lists these names more than once: {duplicates}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = init_settings.init_kwargs.get("config_file")  # type: ignore[attr-defined]
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def api_key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]
