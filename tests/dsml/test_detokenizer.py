"""IncrementalDetokenizer: token by token, the deltas add up to the text, never splitting a char."""

from __future__ import annotations

import json
import random
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


def completions() -> list[tuple[str, str]]:
    out = []
    for path in PARSE_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            out.append((f"{path.parent.name}/{path.name}:{record['id']}", record["completion"]))
    return out


def pending_bytes(detok: IncrementalDetokenizer) -> bytes:
    return detok._decoder.getstate()[0]


def test_vector_completions_round_trip_token_by_token(tok: V4Tokenizer) -> None:
    num_held = 0  # tokens that ended inside a character, so push returned ""
    records = completions()
    assert len(records) > 2000
    for name, text in records:
        ids = tok.encode_generated(text)
        detok = IncrementalDetokenizer(tok)
        deltas = []
        for token_id in ids:
            delta = detok.push(token_id)
            assert isinstance(delta, str)
            delta.encode("utf-8")  # a lone surrogate (half a character) would raise here
            assert "\ufffd" not in delta, name
            # No history is kept: at most the 3 leading bytes of a 4-byte character wait.
            assert len(pending_bytes(detok)) <= 3
            num_held += delta == "" and tok.token_bytes(token_id) != b""
            deltas.append(delta)
        deltas.append(detok.flush())
        assert "".join(deltas) == text, name
    assert num_held > 100  # the vectors do split emoji across tokens


@pytest.mark.parametrize(
    "text",
    [
        "😀😀",  # [F0 9F 98][80] twice
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # 4-byte chars split 2+1+1
        "👨\u200d👩\u200d👧 family",  # emoji with zero-width joiners
        "北京 résumé Ελληνικά عربى",  # CJK and accented
        "</think>😀<｜end▁of▁sentence｜>",  # special tokens between multi-byte chars
    ],
)
def test_characters_split_across_tokens(tok: V4Tokenizer, text: str) -> None:
    ids = tok.encode_generated(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    # Each delta is whole characters of the text, in order.
    pos = 0
    for delta in deltas:
        assert text.startswith(delta, pos)
        pos += len(delta)


def test_emoji_is_held_until_complete(tok: V4Tokenizer) -> None:
    ids = tok.encode_text("😀")
    assert len(ids) == 2
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[0]) == ""
    assert detok.push(ids[1]) == "😀"
    assert detok.flush() == ""


def test_special_tokens_come_out_as_text(tok: V4Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    assert detok.push(128822) == "</think>"
    assert detok.push(128825) == "｜DSML｜"
    assert detok.push(1) == "<｜end▁of▁sentence｜>"


def test_flush_releases_an_incomplete_character_as_replacement(tok: V4Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.encode_text("😀")[0]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_push_many_equals_pushes(tok: V4Tokenizer) -> None:
    text = "a😀b 北京</think>𝔘"
    ids = tok.encode_generated(text)
    for cut in range(len(ids) + 1):
        detok = IncrementalDetokenizer(tok)
        out = detok.push_many(ids[:cut]) + detok.push_many(ids[cut:]) + detok.flush()
        assert out == text
    assert IncrementalDetokenizer(tok).push_many([]) == ""


def test_random_ids_match_whole_decode(tok: V4Tokenizer) -> None:
    """Any id sequence, including invalid UTF-8, detokenizes exactly like `decode`."""
    rng = random.Random(4)
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.token_to_text(i)]
    assert len(partial) > 1000
    for _ in range(3000):
        pool = partial if rng.random() < 0.7 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 9))]
        detok = IncrementalDetokenizer(tok)
        out = "".join(detok.push(i) for i in ids) + detok.flush()
        assert out == tok.decode(ids), ids
