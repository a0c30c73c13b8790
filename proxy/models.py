"""The model names this server answers to, and what each means for thinking and dialect.

Names follow DeepSeek's API where clients expect them: `deepseek-chat` = thinking off,
`deepseek-reasoner` = thinking on; the configured name = the server default. A request's own
`thinking` / `chat_template_kwargs` / `reasoning_effort` still overrides (dsml.md 3 item 6).

The engine's own ids are served too: what the upstream engine lists at its `/v1/models`
(`deepseek-ai/DeepSeek-V4-Flash` for vLLM), so an agent that talked to the engine directly
keeps its `model`. They mean the server default (thinking and dialect of `model_name`) and
are refreshed whenever the backend lists them again (`/ready`; an unknown name asks once
more, at most every few seconds). Any other name is a 404: a name the server does not know
may be a typo or a different model, and answering it with this one would hide that.

`/v1/models` lists the default name first when its thinking is on (else
`deepseek-reasoner`): tools that take the first listed model should get reasoning.

Each name also carries a dialect (dsml.md section 2): the server's `dialect` for the three
names above, and the configured one for each entry of `Settings.models`. The name is all
that differs between them: every name goes to the same backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from dsml.dialects import Dialect
from proxy.errors import ApiError
from proxy.settings import ServedModel

OWNED_BY = "dsml-proxy"
FIXED_THINKING = {"deepseek-chat": False, "deepseek-reasoner": True}
# An unknown name asks the engine for its ids again at most this often: a client sending
# bad names must not turn into a request to the engine each.
REFRESH_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    thinking: bool  # default thinking mode of a request naming this model
    dialect: Dialect  # renders its prompts, parses its output


class ModelRegistry:
    def __init__(self, default_name: str, default_thinking: bool,
                 default_dialect: Dialect | str = Dialect.V4,
                 models: Iterable[ServedModel] = (), *, engine: Any = None) -> None:
        """`engine`: the backend, when it lists the engine's own model ids (`model_ids`, and
        `async refresh_models()` to list them again; proxy.backends.upstream)."""
        self.created = int(time.time())
        self.default_dialect = Dialect(default_dialect)
        self.default_name = default_name
        self._engine = engine
        self._refreshed_at = float("-inf")
        self._specs: dict[str, ModelSpec] = {}
        self._specs[default_name] = ModelSpec(default_name, default_thinking, self.default_dialect)
        for name, thinking in FIXED_THINKING.items():
            self._specs.setdefault(name, ModelSpec(name, thinking, self.default_dialect))
        for model in models:
            thinking = model.thinking
            if thinking is None:  # deepseek-chat keeps thinking off in any dialect
                thinking = FIXED_THINKING.get(model.name, default_thinking)
            dialect = Dialect(model.dialect) if model.dialect else self.default_dialect
            self._specs[model.name] = ModelSpec(model.name, thinking, dialect)

    @property
    def engine_names(self) -> list[str]:
        """The engine's own ids not configured here (they mean the server default)."""
        ids: Sequence[str] = getattr(self._engine, "model_ids", None) or ()
        return [name for name in ids if name not in self._specs]

    @property
    def names(self) -> list[str]:
        """Every served name; the first one thinks (see the module docstring)."""
        configured = list(self._specs)
        if not self._specs[self.default_name].thinking:
            configured.remove("deepseek-reasoner")
            configured.insert(0, "deepseek-reasoner")
        return configured[:1] + self.engine_names + configured[1:]

    @property
    def dialects(self) -> list[Dialect]:
        """Every dialect some name uses, the default first (the build_info series)."""
        out = [self.default_dialect]
        for spec in self._specs.values():
            if spec.dialect not in out:
                out.append(spec.dialect)
        return out

    def get(self, name: str) -> ModelSpec:
        """The spec of a model name; 404 for a name this server does not serve."""
        spec = self._specs.get(name)
        if spec is not None:
            return spec
        if name in self.engine_names:
            default = self._specs[self.default_name]
            return ModelSpec(name, default.thinking, default.dialect)
        raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            )

    async def resolve(self, name: str) -> ModelSpec:
        """`get(name)`, after asking the engine for its ids again when `name` is unknown
        (the engine may have been loading at start, or renamed; rate limited)."""
        if name not in self._specs and name not in self.engine_names:
            await self.refresh()
        return self.get(name)

    async def refresh(self) -> None:
        """Ask the engine for its ids again, at most every REFRESH_INTERVAL_S."""
        refresh = getattr(self._engine, "refresh_models", None)
        if refresh is not None and time.monotonic() - self._refreshed_at >= REFRESH_INTERVAL_S:
            self._refreshed_at = time.monotonic()
            await refresh()

    def thinking(self, name: str) -> bool:
        """Default thinking mode of a model name; 404 for an unknown name."""
        return self.get(name).thinking

    def dialect(self, name: str) -> Dialect:
        """The dialect of a model name; 404 for an unknown name."""
        return self.get(name).dialect

    def card(self, name: str) -> dict[str, object]:
        self.get(name)  # 404 check
        return {"id": name, "object": "model", "created": self.created, "owned_by": OWNED_BY}
