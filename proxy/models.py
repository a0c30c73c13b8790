"""The model names this server answers to, and what each means for thinking and dialect.

Names follow DeepSeek's API where clients expect them: `deepseek-chat` = thinking off,
`deepseek-reasoner` = thinking on; the configured name = the server default. A request's own
`thinking` / `chat_template_kwargs` / `reasoning_effort` still overrides (dsml.md 3 item 6).

Each name also carries a dialect (dsml.md section 2): the server's `dialect` for the three
names above, and the configured one for each entry of `Settings.models`. The name is all
that differs between them: every name goes to the same backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from dsml.dialects import Dialect
from proxy.errors import ApiError
from proxy.settings import ServedModel

OWNED_BY = "dsml-proxy"
FIXED_THINKING = {"deepseek-chat": False, "deepseek-reasoner": True}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    thinking: bool  # default thinking mode of a request naming this model
    dialect: Dialect  # renders its prompts, parses its output


class ModelRegistry:
    def __init__(self, default_name: str, default_thinking: bool,
                 default_dialect: Dialect | str = Dialect.V4,
                 models: Iterable[ServedModel] = ()) -> None:
        self.created = int(time.time())
        self.default_dialect = Dialect(default_dialect)
        self._specs: dict[str, ModelSpec] = {}
        for name, thinking in FIXED_THINKING.items():
            self._specs[name] = ModelSpec(name, thinking, self.default_dialect)
        self._specs[default_name] = ModelSpec(default_name, default_thinking, self.default_dialect)
        for model in models:
            thinking = model.thinking
            if thinking is None:  # deepseek-chat keeps thinking off in any dialect
                thinking = FIXED_THINKING.get(model.name, default_thinking)
            dialect = Dialect(model.dialect) if model.dialect else self.default_dialect
            self._specs[model.name] = ModelSpec(model.name, thinking, dialect)

    @property
    def names(self) -> list[str]:
        return list(self._specs)

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
        try:
            return self._specs[name]
        except KeyError:
            raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            ) from None

    def thinking(self, name: str) -> bool:
        """Default thinking mode of a model name; 404 for an unknown name."""
        return self.get(name).thinking

    def dialect(self, name: str) -> Dialect:
        """The dialect of a model name; 404 for an unknown name."""
        return self.get(name).dialect

    def card(self, name: str) -> dict[str, object]:
        self.get(name)  # 404 check
        return {"id": name, "object": "model", "created": self.created, "owned_by": OWNED_BY}
