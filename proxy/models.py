"""The model names this server answers to, and what each means for thinking.

Names follow DeepSeek's API where clients expect them: `deepseek-chat` = thinking off,
`deepseek-reasoner` = thinking on; the configured name = the server default. A request's own
`thinking` / `chat_template_kwargs` / `reasoning_effort` still overrides (dsml.md 3 item 6).
"""

from __future__ import annotations

import time

from proxy.errors import ApiError

OWNED_BY = "dsml-proxy"


class ModelRegistry:
    def __init__(self, default_name: str, default_thinking: bool) -> None:
        self.created = int(time.time())
        self._thinking = {"deepseek-chat": False, "deepseek-reasoner": True}
        self._thinking[default_name] = default_thinking

    @property
    def names(self) -> list[str]:
        return list(self._thinking)

    def thinking(self, name: str) -> bool:
        """Default thinking mode of a model name; 404 for a name this server does not serve."""
        try:
            return self._thinking[name]
        except KeyError:
            raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            ) from None

    def card(self, name: str) -> dict[str, object]:
        self.thinking(name)  # 404 check
        return {"id": name, "object": "model", "created": self.created, "owned_by": OWNED_BY}
