"""StreamParser(dialect=...): every dialect's tags are read, only the native ones are clean.

The dialect vectors (tests/data/dsml/dialects/*/parse.jsonl, produced by DeepSeek's encoders
for each dialect) are parsed with their own dialect, whole, in chunks and token by token:
a call whose arguments satisfy the tool's schema must come out `valid` (its tags are the
dialect's own spelling, not a repair). Whether they satisfy it is decided by jsonschema
directly, independently of the parser's own validator.
"""

from __future__ import annotations

from functools import cache

import pytest
from jsonschema import Draft202012Validator

from dsml import markers
from dsml.detokenizer import IncrementalDetokenizer
from dsml.dialects import Dialect, texts
from dsml.events import CallOutcome, Notice, RepairKind
from dsml.lexer import PARAM_OPEN, IncrementalLexer
from dsml.parser import StreamParser, parse_completion
from dsml.tokenizer import load_tokenizer
from tests.dsml.conftest import merge, parse_chunks, split, summary, vectors

DIALECT_FILES = ["v4-0731", "v4.1", "v3.2"]


def _expected_outcome(vec: dict, name: str, arguments: dict) -> CallOutcome:
    tools = {t["function"]["name"]: t["function"].get("parameters", {}) for t in vec["tools"]}
    if name not in tools:
        return CallOutcome.UNKNOWN_TOOL
    valid = Draft202012Validator(tools[name]).is_valid(arguments)
    return CallOutcome.VALID if valid else CallOutcome.SCHEMA_INVALID


def _token_deltas(text: str) -> list[str]:
    tok = load_tokenizer()
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in tok.encode_generated(text)]
    deltas.append(detok.flush())
    return [d for d in deltas if d]


@cache
def _feeds(name: str) -> list[tuple[dict, dict[str, list[str]]]]:
    out = []
    for vec in vectors(name):
        text = vec["completion"]
        out.append((vec, {"whole": [text], "chunks of 7": split(text, 7),
                          "tokens": _token_deltas(text)}))  # fmt: skip
    return out


@pytest.mark.parametrize("feed", ["whole", "chunks of 7", "tokens"])
@pytest.mark.parametrize("name", DIALECT_FILES)
def test_dialect_vectors_with_their_own_dialect(name: str, feed: str) -> None:
    failures = []
    num_valid = 0
    for vec, feeds in _feeds(name):
        assert vec["dialect"] == name
        parser, events = parse_chunks(feeds[feed], vec["tools"], vec["thinking"], dialect=name)
        if summary(parser) != vec["expected"]:
            failures.append(f"{vec['id']}: {summary(parser)} != {vec['expected']}")
            continue
        for call in parser.result.tool_calls:
            want = _expected_outcome(vec, call.name, call.arguments)
            if call.outcome != want:
                failures.append(f"{vec['id']}: {call.name} {call.outcome} != {want} ({call.error})")
            num_valid += call.outcome == CallOutcome.VALID
        kinds = {e.kind for e in events if isinstance(e, Notice)}
        if RepairKind.TAG_SPELLING in kinds:
            failures.append(f"{vec['id']}: native tags noticed as a repair")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:10])
    assert num_valid > 300  # the vectors really exercise valid calls


@pytest.mark.parametrize("name", DIALECT_FILES)
def test_token_by_token_gives_the_same_events_as_whole_text(name: str) -> None:
    for vec, feeds in _feeds(name)[::5]:
        _, whole = parse_chunks(feeds["whole"], vec["tools"], vec["thinking"], dialect=name)
        _, tokens = parse_chunks(feeds["tokens"], vec["tools"], vec["thinking"], dialect=name)
        assert merge(tokens) == merge(whole), vec["id"]


def test_foreign_dialect_tags_are_still_read_but_repaired() -> None:
    """v4.1's vectors under v4: same calls, but the spaced tags are a TAG_SPELLING repair."""
    num_repaired = 0
    for vec in vectors("v4.1")[:80]:
        r = parse_completion(vec["completion"], vec["tools"], vec["thinking"], dialect="v4")
        assert [{"name": c.name, "arguments": c.arguments} for c in r.tool_calls] == (
            vec["expected"]["tool_calls"]
        )
        for call in r.tool_calls:
            if _expected_outcome(vec, call.name, call.arguments) == CallOutcome.VALID:
                assert call.outcome == CallOutcome.REPAIRED, vec["id"]
                num_repaired += 1
        if r.tool_calls:
            assert RepairKind.TAG_SPELLING in {n.kind for n in r.notices}
    assert num_repaired > 10


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


def _block(dialect: Dialect) -> str:
    """A canonical block in the dialect's own tag spelling (dsml.md sections 2 and 5)."""
    t, d = texts(dialect), markers.DSML
    return (
        f"<{d}{t.block_tag}>\n"
        f'<{d}{t.invoke_tag} name="get_weather">\n'
        f'<{d}{t.parameter_tag} name="city" string="true">Oslo</{d}{t.parameter_tag}>\n'
        f'<{d}{t.parameter_tag} name="days" string="false">2</{d}{t.parameter_tag}>\n'
        f"</{d}{t.invoke_tag}>\n</{d}{t.block_tag}>"
    )


# v4 and v4-0731 write the same tags; v4.1 and v3.2 each have their own.
_SAME_TAGS = {Dialect.V4: "v4", Dialect.V4_0731: "v4", Dialect.V4_1: "v4.1", Dialect.V3_2: "v3.2"}


@pytest.mark.parametrize("parser_dialect", list(Dialect))
@pytest.mark.parametrize("block_dialect", list(Dialect))
def test_only_the_native_spelling_is_clean(block_dialect: Dialect, parser_dialect: Dialect) -> None:
    text = "Sure.\n\n" + _block(block_dialect) + markers.EOS
    for size in (0, 1, 3):
        chunks = [text] if size == 0 else split(text, size)
        parser, events = parse_chunks(chunks, [WEATHER], False, dialect=parser_dialect)
        r = parser.result
        assert [(c.name, c.arguments) for c in r.tool_calls] == [
            ("get_weather", {"city": "Oslo", "days": 2})
        ]
        notices = {e.kind for e in events if isinstance(e, Notice)}
        if _SAME_TAGS[block_dialect] == _SAME_TAGS[parser_dialect]:
            assert notices == set()
            assert r.tool_calls[0].outcome == CallOutcome.VALID
        else:
            assert notices == {RepairKind.TAG_SPELLING}
            # A block-tag spelling is noticed but is not the call's repair (v3.2 and v4
            # differ only there); an invoke or parameter spelling is.
            same_invoke = texts(block_dialect).invoke_tag == texts(parser_dialect).invoke_tag
            want = CallOutcome.VALID if same_invoke else CallOutcome.REPAIRED
            assert r.tool_calls[0].outcome == want


@pytest.mark.parametrize(
    ("dialect", "repairs"),
    [
        ("v4.1", {RepairKind.DOUBLED_BARS}),
        ("v4", {RepairKind.DOUBLED_BARS, RepairKind.TAG_SPELLING}),
    ],
)
def test_doubled_bars_around_spaced_tags(dialect: str, repairs: set) -> None:
    """V4.1-Flash in the wild: `<｜｜DSML｜｜ invoke name="x">` (doubled bars, spaced tags)."""
    block = _block(Dialect.V4_1).replace("｜DSML｜", "｜｜DSML｜｜")
    assert '<｜｜DSML｜｜ invoke name="get_weather">' in block
    text = "Sure.\n\n" + block + markers.EOS
    whole = None
    for size in (0, 1, 2, 5):
        chunks = [text] if size == 0 else split(text, size)
        parser, events = parse_chunks(chunks, [WEATHER], False, dialect=dialect)
        r = parser.result
        assert r.content == "Sure."
        assert [(c.name, c.arguments) for c in r.tool_calls] == [
            ("get_weather", {"city": "Oslo", "days": 2})
        ]
        assert r.tool_calls[0].outcome == CallOutcome.REPAIRED
        assert {e.kind for e in events if isinstance(e, Notice)} == repairs
        whole = whole or merge(events)
        assert merge(events) == whole


@pytest.mark.parametrize(
    ("tag", "dialect", "repairs"),
    [
        ('<｜DSML｜ parameter name="k" string="true">', "v4.1", ()),
        ('<｜DSML｜ parameter name="k" string="true">', "v4-0731", (RepairKind.TAG_SPELLING,)),
        ('<｜DSML｜parameter name="k" string="true">', "v4.1", (RepairKind.TAG_SPELLING,)),
        ('<｜DSML｜parameter name="k" string="true">', "v3.2", ()),
        ('<｜｜DSML｜｜ parameter name="k" string="true">', "v4.1", (RepairKind.DOUBLED_BARS,)),
    ],
)
def test_lexer_repairs_depend_on_the_dialect(tag: str, dialect: str, repairs: tuple) -> None:
    lex = IncrementalLexer(dialect)
    lex.push(tag)
    kind, raw, parsed = lex.next(False, True)
    assert (kind, raw, parsed.repairs) == (PARAM_OPEN, tag, repairs)


@pytest.mark.parametrize("closer", ["</｜DSML｜ calls>", "</｜DSML｜function_calls>"])
def test_block_closer_is_native_too(closer: str) -> None:
    dialect = "v4.1" if " " in closer else "v3.2"
    lex = IncrementalLexer(dialect)
    lex.push(closer)
    assert lex.next(False, True)[2].repairs == ()
    lex = IncrementalLexer("v4")
    lex.push(closer)
    assert lex.next(False, True)[2].repairs == (RepairKind.TAG_SPELLING,)


def test_unknown_dialect_is_refused() -> None:
    with pytest.raises(ValueError, match="v5"):
        StreamParser(None, False, dialect="v5")


def test_dialect_accepts_the_enum_and_its_value() -> None:
    a = StreamParser(None, False, dialect=Dialect.V4_1)
    b = StreamParser(None, False, dialect="v4.1")
    assert a.dialect is b.dialect is Dialect.V4_1
    assert StreamParser(None, False).dialect is Dialect.V4
