"""Constrained decoding for a turn (issue 16): which grammar each generation gets, and how
each engine is sent it.

The grammar is `dsml.grammar`'s Lark text for llguidance. Every engine below runs it with
llguidance, each in its own spelling (checked against the engines' documentation):

| kind     | request field                        | the engine must run                          |
|----------|--------------------------------------|----------------------------------------------|
| vllm     | `structured_outputs: {"grammar": …}` | `--structured-outputs-config.backend guidance`, no `--reasoning-parser` |
| sglang   | `ebnf: …` (`%llguidance {}` first)   | `--grammar-backend llguidance`               |
| llamacpp | `grammar: …` (`%llguidance` first)   | a build with `-DLLAMA_LLGUIDANCE=ON`         |
| ds4      | none: it has no grammar input        |                                              |
| embedded | the engine's logits-mask hook        | (proxy.backends.grammar_mask)                |

Modes (`constrained_decoding`): "all" constrains every turn it can, "required" only turns
whose tool choice forces a call or that declare a `strict` tool (what vLLM itself does for
V4) or whose `response_format` asks for JSON (which vLLM and OpenAI enforce: the proxy sends
an engine a prompt, not the request's response_format, so only the grammar can carry it),
"off" none.

A `response_format` (json_object / json_schema, on every endpoint: /v1/responses'
`text.format` and Anthropic's `output_config.format` arrive as one, proxy.translate) reaches
the grammar through `Prompt.response_format`: the turn's content is then that JSON.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from dsml.dialects import Dialect
from dsml.grammar import GRAMMAR_DIALECTS, phase_of, turn_lark, turn_spec
from dsml.lru import SizedLRU
from dsml.prompt import Prompt
from proxy.settings import UpstreamKind

Mode = Literal["all", "required", "off"]
MODES: tuple[Mode, ...] = ("all", "required", "off")

log = logging.getLogger(__name__)

# Grammars are built on the event loop (a few ms for a tools section, once: cached); a tools
# section (with the response format's schema) past this size goes unconstrained rather than
# hold the loop.
MAX_TOOLS_CHARS = 256 * 1024
VALIDATED_MAX_ENTRIES = 256


class TurnConstraints:
    """Picks the grammar of one generation of a turn (None: unconstrained)."""

    def __init__(self, mode: Mode = "all") -> None:
        if mode not in MODES:
            raise ValueError(f"constrained_decoding must be one of {MODES}, got {mode!r}")
        self.mode = mode
        # Grammar text -> whether llguidance compiles it (checked once, before any engine
        # is sent it: a schema llguidance refuses means an unconstrained turn, not an error).
        self._valid: SizedLRU[str, bool] = SizedLRU(VALIDATED_MAX_ENTRIES, VALIDATED_MAX_ENTRIES)

    def applies(self, prompt: Prompt, forced: str, dialect: Dialect | str) -> bool:
        """Whether turns of this prompt are constrained at all."""
        if self.mode == "off" or Dialect(dialect) not in GRAMMAR_DIALECTS:
            return False
        if prompt.prefix:  # the turn continues client text: no grammar knows its state
            return False
        return (self.mode == "all" or bool(forced) or prompt.response_format is not None
                or any(_is_strict(tool) for tool in prompt.tools))

    def grammar(self, prompt: Prompt, generated: str, *, forced: str,
                dialect: Dialect | str, parallel_tool_calls: bool = True) -> str | None:
        """The grammar of a generation that starts after `generated` (model-side text of
        the turn so far, forced text included); `forced` is the turn's forced opener."""
        if not self.applies(prompt, forced, dialect):
            return None
        if not generated and forced and prompt.text.endswith(forced):
            generated = forced  # the renderer ended the prompt with the opener
        phase = phase_of(generated, thinking=prompt.thinking, forced=forced)
        if phase is None:
            return None
        spec = turn_spec(prompt.tools, tool_choice=prompt.tool_choice,
                         parallel_tool_calls=parallel_tool_calls, thinking=prompt.thinking,
                         response_format=prompt.response_format,
                         phase=phase[0], invoke_name=phase[1])
        if len(spec.tools_json) + len(spec.response_format_json) > MAX_TOOLS_CHARS:
            return None
        try:
            text = turn_lark(spec)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # a shape it refuses
            log.warning("no grammar for this turn: %s", e)
            return None
        valid = self._valid.get(text)
        if valid is None:
            from dsml.grammar_match import validate

            error = validate(text)
            if error:
                log.warning("no grammar for this turn: llguidance refuses it: %s", error[:500])
            valid = not error
            self._valid.put(text, valid, 1)
        return text if valid else None


def _is_strict(tool: Any) -> bool:
    """An OpenAI function tool with `strict: true` (its calls must follow its schema)."""
    function = tool.get("function") if isinstance(tool, dict) else None
    return isinstance(function, dict) and function.get("strict") is True


def upstream_fields(kind: UpstreamKind, grammar: str | None) -> dict[str, Any]:
    """The request fields that carry `grammar` to an engine of this kind ({} for none)."""
    if grammar is None:
        return {}
    if kind is UpstreamKind.VLLM:
        return {"structured_outputs": {"grammar": grammar}}
    if kind is UpstreamKind.SGLANG:
        return {"ebnf": grammar}
    if kind is UpstreamKind.LLAMACPP:
        return {"grammar": grammar}
    return {}  # ds4: no grammar input
