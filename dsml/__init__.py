"""dsml: DeepSeek-V4's prompt format and tool-call markup (DSML).

Rendering OpenAI-style requests into byte-exact prompts, safe tokenization, and a streaming
parser that turns DSML tool-call blocks into validated JSON tool calls. Pure library: no
I/O, no HTTP, no torch. Names are imported lazily so `import dsml` stays cheap.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Dialect": "dsml.dialects",
    "DsmlError": "dsml.errors",
    "RenderError": "dsml.errors",
    "UnsupportedError": "dsml.errors",
    "Segment": "dsml.prompt",
    "Prompt": "dsml.prompt",
    "render_chat": "dsml.request",
    "render_messages": "dsml.render",
    "V4Tokenizer": "dsml.tokenizer",
    "load_tokenizer": "dsml.tokenizer",
    "IncrementalDetokenizer": "dsml.detokenizer",
    "StreamParser": "dsml.parser",
    "parse_completion": "dsml.parser",
    "ReasoningDelta": "dsml.events",
    "ContentDelta": "dsml.events",
    "ToolCallStart": "dsml.events",
    "ToolCallArgsDelta": "dsml.events",
    "ToolCallEnd": "dsml.events",
    "Notice": "dsml.events",
    "Event": "dsml.events",
    "CallOutcome": "dsml.events",
    "TurnOutcome": "dsml.events",
    "RepairKind": "dsml.events",
    "ToolCall": "dsml.events",
    "ParseResult": "dsml.events",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dsml' has no attribute {name!r}")
    return getattr(import_module(module), name)
