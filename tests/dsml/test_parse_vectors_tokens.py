"""Every parse vector fed token by token, as an engine delivers it, gives the expected result.

The completion is tokenized as the model would have produced it (`</think>`, `｜DSML｜` and
EOS as their ids), each id goes through the incremental detokenizer, and each non-empty
delta is fed to the StreamParser. The result must equal the vector's `expected` and the
result of parsing the whole completion at once.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from dsml.detokenizer import IncrementalDetokenizer
from dsml.tokenizer import V4Tokenizer, load_tokenizer

DATA = Path(__file__).parent.parent / "data" / "dsml"
PARSE_FILES = [
    DATA / "parse.jsonl",
    DATA / "wild.jsonl",
    *sorted((DATA / "dialects").glob("*/parse.jsonl")),
]


@pytest.fixture(scope="module")
def tok() -> V4Tokenizer:
    return load_tokenizer()


def id_factory():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def summary(result) -> dict:
    return {
        "reasoning_content": result.reasoning_content,
        "content": result.content,
        "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in result.tool_calls],
    }


def full_state(result) -> dict:
    """Everything a response is built from, to compare streamed with whole-text parsing."""
    return {
        **summary(result),
        "calls": [(c.id, c.arguments_json, c.outcome, c.error) for c in result.tool_calls],
        "turn_outcome": result.turn_outcome,
        "notice_kinds": sorted(n.kind for n in result.notices),
        "raw": result.raw,
    }


def parse_token_by_token(tok: V4Tokenizer, record: dict):
    from dsml.parser import StreamParser

    parser = StreamParser(record["tools"], record["thinking"], id_factory=id_factory())
    detok = IncrementalDetokenizer(tok)
    num_deltas = 0
    for token_id in tok.encode_generated(record["completion"]):
        delta = detok.push(token_id)
        if delta:
            parser.feed(delta)
            num_deltas += 1
    parser.feed(detok.flush())
    parser.finish()
    return parser.result, num_deltas


@pytest.mark.parametrize("path", PARSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_vectors_token_by_token(tok: V4Tokenizer, path: Path) -> None:
    from dsml.parser import StreamParser

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records
    failures = []
    for record in records:
        streamed, num_deltas = parse_token_by_token(tok, record)
        whole = StreamParser(record["tools"], record["thinking"], id_factory=id_factory())
        whole.feed(record["completion"])
        whole.finish()
        if summary(streamed) != record["expected"]:
            failures.append(
                f"{record['id']}: expected {record['expected']}, got {summary(streamed)}"
            )
        elif full_state(streamed) != full_state(whole.result):
            failures.append(f"{record['id']}: token-by-token differs from whole text")
        # Token by token really is many small deltas.
        assert num_deltas >= len(record["completion"]) // 16, record["id"]
    assert not failures, f"{len(failures)}/{len(records)} differ:\n" + "\n".join(failures[:10])
