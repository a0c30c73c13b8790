"""Token ids in, text deltas out, never splitting a UTF-8 character.

A byte-level BPE token can end in the middle of a character (an emoji is often two or three
tokens), so each token's bytes go through an incremental UTF-8 decoder that holds an
incomplete sequence until the bytes that finish it arrive. The work per token is one table
lookup and one decode of a few bytes: no re-decoding of the history, unlike the
"decode the last N tokens and diff" scheme some engines use.

Special tokens come out as their text (`</think>`, `<｜end▁of▁sentence｜>`), because the
parser needs them. Bytes that can never form a character become U+FFFD, as
`V4Tokenizer.decode` does, so the concatenated deltas equal `decode(all ids)`.
"""

from __future__ import annotations

import codecs

from dsml.tokenizer import V4Tokenizer


class IncrementalDetokenizer:
    """One per generated sequence: `push` each new token id, `flush` at the end."""

    def __init__(self, tokenizer: V4Tokenizer) -> None:
        self._bytes_by_id = tokenizer.bytes_by_id
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still incomplete)."""
        return self._decoder.decode(self._bytes_by_id[token_id])

    def push_many(self, token_ids: list[int]) -> str:
        """Text completed by these tokens, in one decode."""
        bytes_by_id = self._bytes_by_id
        return self._decoder.decode(b"".join([bytes_by_id[i] for i in token_ids]))

    def flush(self) -> str:
        """End of sequence: a still-incomplete character is released as U+FFFD."""
        return self._decoder.decode(b"", final=True)
