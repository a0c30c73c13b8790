"""The parser's states and its transition table.

`transition_table(P)[state][token kind]` is the handler `P._on_*(parser, raw, tag)` that
consumes a lexer token (`dsml.lexer`: TEXT, THINK, END and the six DSML tag kinds) in a
state. The handlers live in `dsml.regions` (reasoning, content, after a block, and the
decisions about held text) and `dsml.block` (inside a block: invoke, body, parameter
value). A row's default handler takes every kind not named in it.

    REASONING --</think>--> CONTENT
    REASONING|CONTENT|AFTER --calls open--> OPENED --invoke open or calls close--> BLOCK
    OPENED --anything else--> the region (the opener was text; dsml.md 6.1 rule 4)
    BLOCK --invoke open--> INVOKE
    INVOKE --parameter open--> VALUE --parameter close--> INVOKE
    INVOKE --text--> BODY (a JSON object body) --invoke close--> BLOCK
    INVOKE --invoke close--> BLOCK --calls close--> AFTER --text--> CONTENT
    VALUE --any other DSML tag--> INVOKE (the tag read again there; dsml.md 6.1 rule 1)
    INVOKE|BODY --invoke open or calls close--> BLOCK (read again there; rules 2, 3)
    VALUE --invoke open--> QUOTED (held) --parameter close or EOS--> VALUE (it was text)
    QUOTED --parameter open or calls close--> BLOCK (it opened the next invoke; rule 2)
    any --EOS--> DONE
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsml.lexer import (
    CALLS_CLOSE,
    CALLS_OPEN,
    END,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    NUM_KINDS,
    PARAM_CLOSE,
    PARAM_OPEN,
    TEXT,
    THINK,
)

# Parser states.
REASONING, CONTENT, BLOCK, INVOKE, BODY, VALUE, AFTER, DONE, QUOTED, OPENED = range(10)
NUM_STATES = 10
# Fast paths of feed(): plain text in these states needs one `in` test and one event;
# FAST_PREFIX and FAST_TAG (the largest) hold a marker still arriving.
FAST_NONE, FAST_CONTENT, FAST_REASONING, FAST_VALUE, FAST_HELD_VALUE, FAST_WS = range(6)
FAST_PREFIX, FAST_TAG = 6, 7

Handler = Callable[..., None]  # (parser, raw, tag) -> None

_KIND_NAMES = {
    "TEXT": TEXT, "THINK": THINK, "END": END, "CALLS_OPEN": CALLS_OPEN, "CALLS_CLOSE": CALLS_CLOSE,
    "INVOKE_OPEN": INVOKE_OPEN, "INVOKE_CLOSE": INVOKE_CLOSE, "PARAM_OPEN": PARAM_OPEN,
    "PARAM_CLOSE": PARAM_CLOSE,
}  # fmt: skip


def _row(default: Handler, **by_kind: Handler) -> list[Handler]:
    row = [default] * NUM_KINDS
    for name, fn in by_kind.items():
        row[_KIND_NAMES[name]] = fn
    return row


def _ignore(parser: Any, raw: str, tag: Any) -> None:
    pass


def transition_table(P: Any) -> list[list[Handler]]:
    """The table for parser class `P` (its handlers are methods, looked up once here)."""
    table: list[list[Handler]] = [[]] * NUM_STATES
    table[REASONING] = _row(
        P._on_reasoning_text, THINK=P._on_think, END=P._on_eos, CALLS_OPEN=P._on_block_open,
        INVOKE_OPEN=P._on_bare_invoke, CALLS_CLOSE=P._on_reasoning_closer,
        INVOKE_CLOSE=P._on_reasoning_closer, PARAM_CLOSE=P._on_reasoning_closer,
    )  # fmt: skip
    table[CONTENT] = _row(
        P._on_content_text, THINK=P._on_content_think, END=P._on_eos, CALLS_OPEN=P._on_block_open,
        INVOKE_OPEN=P._on_bare_invoke, CALLS_CLOSE=P._on_orphan, INVOKE_CLOSE=P._on_orphan,
        PARAM_CLOSE=P._on_orphan, PARAM_OPEN=P._on_text_opener,
    )  # fmt: skip
    # Damaged blocks (dsml.md 6.1): a tag that cannot come where it is ends what is open
    # (_on_value_cut: rule 1, _on_invoke_cut: rules 2-3); a second opener is markup (rule 4).
    table[BLOCK] = _row(
        P._on_junk, TEXT=P._on_block_text, END=P._on_eos, INVOKE_OPEN=P._on_invoke_open,
        CALLS_CLOSE=P._on_block_close, CALLS_OPEN=P._on_stray_opener,
    )  # fmt: skip
    table[INVOKE] = _row(
        P._on_junk, TEXT=P._on_invoke_text, END=P._on_eos, PARAM_OPEN=P._on_param_open,
        INVOKE_CLOSE=P._on_invoke_close, INVOKE_OPEN=P._on_invoke_cut,
        CALLS_CLOSE=P._on_invoke_cut, CALLS_OPEN=P._on_stray_opener,
    )  # fmt: skip
    table[BODY] = _row(
        P._on_body_any, END=P._on_eos, INVOKE_CLOSE=P._on_invoke_close,
        INVOKE_OPEN=P._on_invoke_cut, CALLS_CLOSE=P._on_invoke_cut,
    )  # fmt: skip
    table[VALUE] = _row(
        P._on_value_cut, TEXT=P._on_value_glued, END=P._on_eos, PARAM_CLOSE=P._on_param_close,
        INVOKE_OPEN=P._on_value_invoke,
    )  # fmt: skip
    table[QUOTED] = _row(
        P._on_quoted_any, END=P._on_quoted_text, PARAM_CLOSE=P._on_quoted_text,
        PARAM_OPEN=P._on_quoted_invoke, CALLS_CLOSE=P._on_quoted_invoke,
    )  # fmt: skip
    table[AFTER] = _row(
        P._on_after_tag, TEXT=P._on_after_text, THINK=P._on_after_think, END=P._on_eos,
        CALLS_OPEN=P._on_block_open, INVOKE_OPEN=P._on_bare_invoke,
        CALLS_CLOSE=P._on_after_orphan, INVOKE_CLOSE=P._on_after_orphan,
        PARAM_CLOSE=P._on_after_orphan,
    )  # fmt: skip
    table[OPENED] = _row(
        P._unopen, TEXT=P._on_opened_text, INVOKE_OPEN=P._on_opened_confirm,
        CALLS_CLOSE=P._on_opened_confirm, CALLS_OPEN=P._on_opened_stray,
    )  # fmt: skip
    table[DONE] = _row(_ignore)
    return table
