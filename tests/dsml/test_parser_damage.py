"""Damaged blocks from real engines (dsml.md section 6.1, issue 13): one case per class of
damage, written from the rules, each checked whole and fed one character at a time."""

from __future__ import annotations

import json
import re

from dsml import markers
from dsml.events import (
    CallOutcome,
    Notice,
    RepairKind,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    TurnOutcome,
)
from dsml.parser import StreamParser
from tests.dsml.conftest import merge, parse_chunks, split

D = "｜DSML｜"
EOS = markers.EOS


def _tool(name: str, props: dict[str, str], required: tuple[str, ...] = ()) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in props.items()},
        "required": list(required)}}}  # fmt: skip


TOOLS = [
    _tool("get_weather", {"city": "string", "days": "integer"}, ("city",)),
    _tool("bash", {"command": "string"}, ("command",)),
    _tool("read_file", {"path": "string"}, ("path",)),
]


def par(key: str, value: str, string: str = "true") -> str:
    return f'<{D}parameter name="{key}" string="{string}">{value}</{D}parameter>'


def inv(name: str, body: str) -> str:
    return f'<{D}invoke name="{name}">\n{body}\n</{D}invoke>'


def block(*invokes: str) -> str:
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def run(text: str, thinking: bool = False):
    """Parse whole and char by char: both must agree (chunking never matters)."""
    parser, events = parse_chunks([text], TOOLS, thinking)
    _, by_char = parse_chunks(split(text, 1), TOOLS, thinking)
    assert merge(by_char) == merge(events)
    # As a tokenizer splits tags (`<｜DSML｜invoke`, ` name="x"`, `>\n`): the fast paths.
    _, by_tag = parse_chunks([c for c in re.split(r"(?=<)|(?<=DSML｜)|(?<=\w)(?=>)", text) if c],
                             TOOLS, thinking)  # fmt: skip
    assert merge(by_tag) == merge(events)
    frags: dict[int, str] = {}
    for ev in events:
        if isinstance(ev, ToolCallArgsDelta):
            frags[ev.index] = frags.get(ev.index, "") + ev.fragment
        elif isinstance(ev, ToolCallEnd) and ev.outcome != CallOutcome.TRUNCATED:
            assert json.loads(frags[ev.index]) == ev.arguments  # streamed == final
    return parser.result, events


def calls(r) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in r.tool_calls]


def kinds(r) -> set[str]:
    return {n.kind.value for n in r.notices}


# 1. A missing or broken parameter closer: the next parameter opener ends the value.
def test_missing_parameter_closer_does_not_swallow_the_next_parameter() -> None:
    text = "Hi" + block(inv("get_weather", f'<{D}parameter name="city" string="true">Paris'
                                           + par("days", "3", "false"))) + EOS  # fmt: skip
    r, _ = run(text)
    assert calls(r) == [("get_weather", {"city": "Paris", "days": 3})]
    assert r.tool_calls[0].outcome == CallOutcome.REPAIRED
    assert RepairKind.PARAM_CLOSER_MISSING in kinds(r)


def test_closer_without_its_gt_counts_as_the_closer() -> None:
    text = "Hi" + block(inv("get_weather", f'<{D}parameter name="city" string="true">Paris</{D}parameter\n'
                                           + par("days", "3", "false"))) + EOS  # fmt: skip
    r, _ = run(text)
    assert calls(r) == [("get_weather", {"city": "Paris", "days": 3})]
    assert RepairKind.BROKEN_CLOSER in kinds(r)


def test_an_opener_glued_to_its_value_ends_the_open_value() -> None:
    """`string="true"Paris` (the opener's `>` lost) inside an open value is rule 1's opener all
    the same: days never ends up in the city."""
    text = "Hi" + block(inv("get_weather", f'<{D}parameter name="city" string="true">Paris\n'
                                           f'<{D}parameter name="days" string="false"3</{D}parameter>'
                            )) + EOS  # fmt: skip
    r, _ = run(text)
    assert calls(r) == [("get_weather", {"city": "Paris\n", "days": 3})]
    assert RepairKind.PARAM_CLOSER_MISSING in kinds(r)


def test_a_glued_opener_after_an_invoke_opener_in_a_value_starts_the_next_call() -> None:
    """Found by bench/fuzz_parser.py (seed 1, input 9,738,090): a plain `</parameter>` left the
    command open, the next invoke opener was held as possibly quoted, and its first parameter
    opener, glued to its value, was read as text, so the held opener and the city went into
    the command. The glued opener decides for the next invoke, as a whole one does."""
    text = ("Hi" + f"\n\n<{D}tool_calls>\n" + f'<{D}invoke name="bash">\n'
            f'<{D}parameter name="command" string="true">ls</parameter>\n\n'
            f'<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true"Paris'
            f"</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>" + EOS)
    r, _ = run(text)
    assert calls(r) == [("bash", {"command": "ls</parameter>\n\n"}),
                        ("get_weather", {"city": "Paris"})]


def test_a_missing_space_between_attributes_is_no_glued_opener() -> None:
    from dsml.dialects import Dialect
    from dsml.lexer import IncrementalLexer

    lex = IncrementalLexer(Dialect.V4)
    assert lex.glued_opener(f'<{D}parameter name="city"string="true">x') is None
    assert lex.glued_opener(f'<{D}parameter name="city" >x') is None
    assert lex.glued_opener(f'</{D}parameter name="city"x') is None
    raw, tag = lex.glued_opener(f'<{D}parameter name="city" string="true"Paris')
    assert raw == f'<{D}parameter name="city" string="true"' and tag.name == "city"


# 2. A missing invoke closer: the next invoke opener closes it; nothing moves, order kept.
def test_missing_invoke_closer_keeps_each_parameter_in_its_call() -> None:
    text = "Hi" + block(f'<{D}invoke name="get_weather">\n' + par("city", "Paris"),
                        inv("bash", par("command", "ls"))) + EOS  # fmt: skip
    r, events = run(text)
    assert calls(r) == [("get_weather", {"city": "Paris"}), ("bash", {"command": "ls"})]
    order = [(type(e).__name__, e.index) for e in events if isinstance(e, ToolCallStart | ToolCallEnd)]
    assert order == [("ToolCallStart", 0), ("ToolCallEnd", 0), ("ToolCallStart", 1), ("ToolCallEnd", 1)]
    assert RepairKind.INVOKE_CLOSER_MISSING in kinds(r)


def test_a_stray_partial_closer_before_the_next_invoke_is_markup() -> None:
    text = "Hi" + block(f'<{D}invoke name="get_weather">\n' + par("city", "Oslo") + "\n</",
                        inv("bash", par("command", "ls"))).replace("\n</\n", "\n</") + EOS  # fmt: skip
    r, _ = run(text)
    assert calls(r) == [("get_weather", {"city": "Oslo"}), ("bash", {"command": "ls"})]
    assert r.content == "Hi" and RepairKind.PARTIAL_TAG in kinds(r)


# 3. An invoke left open at the block closer is complete.
def test_block_closer_completes_the_open_invoke() -> None:
    text = "Hi" + f"\n\n<{D}tool_calls>\n<{D}invoke name=\"get_weather\">\n" + par("city", "Paris") + f"\n</{D}tool_calls>" + EOS
    r, _ = run(text)
    assert calls(r) == [("get_weather", {"city": "Paris"})] and r.content == "Hi"
    assert r.turn_outcome == TurnOutcome.TOOL_CALLS
    assert RepairKind.INVOKE_CLOSED_BY_BLOCK in kinds(r)


def test_a_second_block_opener_inside_a_block_is_markup() -> None:
    text = "Hi" + block(inv("bash", par("command", "ls"))).replace(
        f"<{D}tool_calls>\n", f"<{D}tool_calls>\n<{D}tool_calls>\n", 1) + EOS
    r, _ = run(text)
    assert calls(r) == [("bash", {"command": "ls"})] and r.content == "Hi"
    assert RepairKind.STRAY_OPENER in kinds(r)


def test_a_damaged_opener_line_before_the_real_block_is_markup() -> None:
    for damaged in (f"<{D}tool_calls\n", f"<{D}tool_calls<tool_calls>\n"):
        text = f"Hi\n\n{damaged}<{D}tool_calls>\n" + inv("bash", par("command", "ls")) + f"\n</{D}tool_calls>" + EOS
        if "<tool_calls>" in damaged:
            text = text.replace(f"<{D}tool_calls>\n<{D}invoke", f"<{D}invoke", 1)
        r, _ = run(text)
        assert calls(r) == [("bash", {"command": "ls"})] and r.content == "Hi", damaged
        assert RepairKind.DAMAGED_OPENER in kinds(r)


# 5/6. Nameless invokes, prose bodies.
def test_an_invoke_with_an_empty_name_is_no_call_and_the_block_comes_back() -> None:
    blk = block(f'<{D}invoke name="">\n' + par("command", "ls") + f"\n</{D}invoke>")
    r, _ = run("Hi" + blk + EOS)
    assert r.tool_calls == [] and r.content == "Hi" + blk
    assert r.turn_outcome == TurnOutcome.MALFORMED


def test_a_nameless_invoke_beside_a_real_call_goes_to_a_notice() -> None:
    broken = f"<{D}invoke>\n" + par("command", "rm -rf /") + f"\n</{D}invoke>"
    r, _ = run("Hi" + block(broken, inv("bash", par("command", "ls"))) + EOS)
    assert calls(r) == [("bash", {"command": "ls"})] and r.content == "Hi"
    details = [n.detail for n in r.notices if n.kind == RepairKind.BROKEN_INVOKE]
    assert details and "rm -rf /" in "".join(details)


def test_an_invoke_whose_body_is_prose_is_no_call_and_its_text_is_kept() -> None:
    blk = block(inv("get_weather", "Paris, for 3 days please"))
    r, events = run("Hi" + blk + EOS)
    assert r.tool_calls == [] and r.content == "Hi" + blk
    assert not [e for e in events if isinstance(e, ToolCallStart)]


def test_prose_beside_an_lxml_repaired_invoke_is_content() -> None:
    body = 'I will check Oslo now: <invoke name="get_weather"><parameter name="city">Oslo</parameter></invoke> done'
    r, _ = run("Hi" + block(body) + EOS)
    assert calls(r) == [("get_weather", {"city": "Oslo"})]
    assert "I will check Oslo now:" in r.content and "done" in r.content
    assert "<invoke" not in r.content


# 7. Orphans.
def test_an_orphan_invoke_of_an_undeclared_tool_stays_content_with_its_closers() -> None:
    text = "Hi\n" + inv("nope", par("x", "1")) + " ok"
    r, _ = run(text + EOS)
    assert r.tool_calls == [] and r.content == text


def test_orphan_closers_go_with_the_blank_lines_before_them() -> None:
    r, _ = run(f"Hi\n\n</{D}invoke>" + EOS)
    assert r.content == "Hi" and RepairKind.ORPHAN_CLOSER in kinds(r)


# 8. A qualifying orphan invoke at the end of reasoning, then a stray block closer.
def test_orphan_invoke_in_reasoning_followed_by_closers_is_a_call() -> None:
    text = "think\n" + inv("read_file", par("path", "a.txt")) + f"\n</{D}tool_calls></think>" + EOS
    r, _ = run(text, thinking=True)
    assert calls(r) == [("read_file", {"path": "a.txt"})] and r.reasoning_content == "think"
    assert r.turn_outcome == TurnOutcome.RECOVERED_FROM_THINKING
    assert RepairKind.THINKING_ORPHAN in kinds(r)


# 10. Think tags.
def test_a_second_think_closer_and_a_doubled_think_opener_are_markup() -> None:
    r, _ = run("<think>plan</think>answer</think>" + EOS, thinking=True)
    assert (r.reasoning_content, r.content) == ("plan", "answer")
    assert RepairKind.EXTRA_THINK_TAG in kinds(r)


# Fuzzing finds: duplicated parameters, exceptions.
def test_a_duplicated_parameter_keeps_the_first_value_streamed_and_final() -> None:
    r, _ = run("Hi" + block(inv("get_weather", par("city", "Oslo") + "\n" + par("city", "Paris"))) + EOS)
    assert calls(r) == [("get_weather", {"city": "Oslo"})]
    assert json.loads(r.tool_calls[0].arguments_json) == {"city": "Oslo"}
    assert [n.detail for n in r.notices if n.kind == RepairKind.DUPLICATE_PARAMETER] == ["city: Paris"]


def test_a_lone_surrogate_inside_a_block_does_not_raise() -> None:
    blk = block(inv("get_weather", "junk \ud800 <x"))
    r, _ = run("Hi" + blk + EOS)
    assert r.tool_calls == [] and r.content == "Hi" + blk


def test_hundreds_of_markers_in_one_delta_do_not_recurse() -> None:
    for marker in (f"</{D}parameter>", "</think>", f"<{D}tool_calls>", f'<{D}invoke name="bash">'):
        for thinking in (False, True):
            p = StreamParser(TOOLS, thinking)
            p.feed("x")
            p.feed(marker * 3000)
            p.finish()
            assert p.result.raw == "x" + marker * 3000


def test_new_rules_count_as_repair_kinds_in_notices() -> None:
    _, events = run("Hi" + block(f'<{D}invoke name="get_weather">\n' + par("city", "Paris"),
                                 inv("bash", par("command", "ls"))) + EOS)  # fmt: skip
    assert any(isinstance(e, Notice) and e.kind == RepairKind.INVOKE_CLOSER_MISSING for e in events)


def test_an_invoke_opener_after_an_unclosed_value_starts_the_next_call() -> None:
    # Fuzzing find: the value's closer in an unknown spelling, then the next invoke: its
    # parameter must not join the first call (dsml.md 6.1 rules 1 and 2).
    text = "Hi" + block(
        f'<{D}invoke name="bash">\n<{D}parameter name="command" string="true">ls</ | DSML | parameter>\n'
        + inv("read_file", par("path", "a.txt")),
    ) + EOS  # fmt: skip
    r, _ = run(text)
    assert [c.name for c in r.tool_calls] == ["bash", "read_file"]
    assert r.tool_calls[1].arguments == {"path": "a.txt"}
    assert "path" not in r.tool_calls[0].arguments


def test_an_invoke_opener_quoted_inside_a_value_stays_value_text() -> None:
    value = f'echo "<{D}invoke name="x">" done'
    r, _ = run("Hi" + block(inv("bash", par("command", value))) + EOS)
    assert calls(r) == [("bash", {"command": value})]


# 4. A misspelled opener that no invoke follows is text, exactly as written.
def test_a_tolerated_misspelled_opener_in_quoted_text_stays_text() -> None:
    text = f"Example: '<{D}toolcalls>' is the tag."
    r, events = run(text + EOS)
    assert r.content == text and r.tool_calls == []
    assert r.turn_outcome == TurnOutcome.ANSWER
    assert not [e for e in events if isinstance(e, Notice)]


def test_a_block_opener_followed_by_prose_then_an_invoke_still_counts() -> None:
    r, _ = run("Hi" + block("Sure: " + inv("bash", par("command", "ls"))) + EOS)
    assert calls(r) == [("bash", {"command": "ls"})]


# 9. More spellings, only under the guards of an invoke without opener.
def test_spaced_and_double_line_bars_and_tool_use_are_read() -> None:
    canon = block(inv("bash", par("command", "ls")))
    for spelling in (" | DSML | ", "‖DSML‖"):
        r, _ = run("Hi" + canon.replace(D, spelling) + EOS)
        assert calls(r) == [("bash", {"command": "ls"})] and r.content == "Hi", spelling
        assert RepairKind.GUARDED_SPELLING in kinds(r)
    r, _ = run("Hi" + canon.replace("tool_calls", "tool_use") + EOS)
    assert calls(r) == [("bash", {"command": "ls"})]


def test_plain_tags_without_the_dsml_token_are_read() -> None:
    r, _ = run("Hi" + block(inv("bash", par("command", "ls"))).replace(D, "") + EOS)
    assert calls(r) == [("bash", {"command": "ls"})] and r.content == "Hi"
    assert r.tool_calls[0].outcome == CallOutcome.REPAIRED


def test_plain_tags_that_miss_the_guards_stay_text() -> None:
    for text in (
        block(inv("nope", par("x", "1"))).replace(D, ""),  # undeclared tool
        block(inv("read_file", par("limit", "1", "false"))).replace(D, ""),  # required missing
        "XML: <parameter>a</parameter> and </invoke> stay.",
    ):
        r, _ = run("Hi" + text + EOS)
        assert r.tool_calls == [] and r.content == "Hi" + text


def test_plain_tags_inside_a_value_are_value_text() -> None:
    value = "cat <<EOF\n<parameter name=\"a\">1</parameter>\nEOF"
    r, _ = run("Hi" + block(inv("bash", par("command", value))) + EOS)
    assert calls(r) == [("bash", {"command": value})]


# 5. DSML quoted in markdown is text, unless the fenced block ends the output.
def test_dsml_in_a_code_fence_is_quoted_text_and_never_runs() -> None:
    text = "Example:\n```\n" + block(inv("bash", par("command", "rm -rf /"))) + "\n```\nThat's it."
    r, events = run(text + EOS)
    assert r.tool_calls == [] and r.content == text
    assert not [e for e in events if isinstance(e, ToolCallStart)]


def test_dsml_in_inline_code_is_quoted_text() -> None:
    text = f'Use `<{D}invoke name="bash">` to run, or `<{D}tool_calls>`.'
    r, _ = run(text + EOS)
    assert r.tool_calls == [] and r.content == text


def test_a_fenced_block_at_the_end_of_the_output_is_a_call() -> None:
    r, _ = run("Running it:\n~~~" + block(inv("bash", par("command", "ls"))) + "\n~~~\n" + EOS)
    assert calls(r) == [("bash", {"command": "ls"})]
    assert RepairKind.FENCED in kinds(r) and r.tool_calls[0].outcome == CallOutcome.REPAIRED


def test_a_block_after_a_quoted_one_is_parsed() -> None:
    quoted = "See:\n```\n" + block(inv("bash", par("command", "rm -rf /"))) + "\n```\nNow for real."
    r, _ = run(quoted + block(inv("bash", par("command", "ls"))) + EOS)
    assert calls(r) == [("bash", {"command": "ls"})] and r.content == quoted


def test_a_block_in_reasoning_that_is_no_call_comes_back_as_written() -> None:
    text = f"think\n\n<{D}tool_calls>\nnot a call</think>done"
    r, _ = run(text + EOS, thinking=True)
    assert (r.reasoning_content, r.content, r.tool_calls) == (text.split("</think>")[0], "done", [])


def test_plain_look_alikes_of_other_tag_names_are_text_and_do_not_raise() -> None:
    # Fuzzing find: only tool_calls / invoke / parameter have a plain spelling.
    for text in ("<toolcalls>", "</toolcalls>", "<calls>x", "<function_calls>", "<tool_use>"):
        r, _ = run("Hi " + text + EOS)
        assert r.content == "Hi " + text and r.tool_calls == []


# 11. A call recovered (lxml) from text inside an open invoke comes after it: no interleaving.
def test_a_recovered_call_is_delivered_after_the_open_one_ends() -> None:
    inner = "<invoke name='get_weather'><parameter name='city'>Oslo</parameter></invoke>"
    text = "Hi" + block(f'<{D}invoke name="bash">\n' + par("command", "ls") + f"\n{inner}\n</{D}invoke>") + EOS
    r, events = run(text)
    order = [(type(e).__name__, e.index) for e in events if isinstance(e, ToolCallStart | ToolCallEnd)]
    assert order == [("ToolCallStart", 0), ("ToolCallEnd", 0), ("ToolCallStart", 1), ("ToolCallEnd", 1)]
    assert calls(r) == [("bash", {"command": "ls"}), ("get_weather", {"city": "Oslo"})]
    assert [c.name for c in r.tool_calls] == [c.name for c in sorted(r.tool_calls, key=lambda c: c.id)]
