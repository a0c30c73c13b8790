"""Token-level matching of turn grammars with the real V4 tokenizer (llguidance).

`matcher(spec)` / `compiled_matcher(grammar_text)` return a fresh `llguidance.LLMatcher`
at the start of the grammar. Compiling a grammar (Lark + the JSON schemas in it) is the
cost; a compiled matcher is kept per grammar text and each request gets a `deep_copy()`.
"""

from __future__ import annotations

from functools import cache

import llguidance

from dsml.grammar import TurnSpec, turn_lark
from dsml.lru import SizedLRU
from dsml.tokenizer import tokenizer_json_path

# The model's vocabulary (ids above the tokenizer's 129,283 are padding the mask forbids).
MODEL_VOCAB = 129280
EOS_ID = 1


class GrammarError(ValueError):
    """The grammar did not compile (a tool schema llguidance cannot take)."""


# Token slices llguidance precomputes, so that a mask in free text need not walk the whole
# vocabulary: its JSON-string slices, plus tokens that cannot begin or continue a forbidden
# spelling (dsml.grammar.FORBIDDEN_IN_TEXT all start with "D", "<" or hold "｜"). Mean mask
# time over bench/grammar_mask.py's turn: 256 -> 181 us.
TEXT_SLICES = [r"[^D<｜\x00]+", r"[^D<｜\x00]{1,10}"]


@cache
def ll_tokenizer(n_vocab: int = MODEL_VOCAB) -> llguidance.LLTokenizer:
    """llguidance's view of the V4 tokenizer (about 3 s to build: once per process)."""
    with open(tokenizer_json_path(), encoding="utf-8") as f:
        return llguidance.LLTokenizer(f.read(), n_vocab=n_vocab, eos_token=EOS_ID,
                                      slices=llguidance.LLTokenizer.general_slices()
                                      + TEXT_SLICES)


def validate(grammar: str) -> str:
    """"" when llguidance compiles `grammar`, else its error (no tokenizer needed)."""
    return llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar))


MATCHER_CACHE_MAX_ENTRIES = 64  # compiled grammars kept (one per tools section and phase)


def matcher(spec: TurnSpec, n_vocab: int = MODEL_VOCAB) -> llguidance.LLMatcher:
    """A fresh matcher at the start of `spec`'s grammar. Raises GrammarError."""
    return compiled_matcher(turn_lark(spec), n_vocab)


_by_text: SizedLRU[tuple[str, int], llguidance.LLMatcher] = SizedLRU(
    MATCHER_CACHE_MAX_ENTRIES, MATCHER_CACHE_MAX_ENTRIES)


def compiled_matcher(grammar: str, n_vocab: int = MODEL_VOCAB) -> llguidance.LLMatcher:
    """A fresh matcher of a grammar's text (a backend gets the text, not the spec)."""
    template = _by_text.get((grammar, n_vocab))
    if template is None:
        template = llguidance.LLMatcher(ll_tokenizer(n_vocab),
                                        llguidance.grammar_from("lark", grammar), log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        _by_text.put((grammar, n_vocab), template, 1)
    return template.deep_copy()


def first_rejected(spec: TurnSpec, token_ids: list[int]) -> int | None:
    """The index of the first token of `token_ids` the grammar rejects, None if all are
    accepted (EOS included: it is accepted only where the turn may end)."""
    m = matcher(spec)
    for i, token in enumerate(token_ids):
        if not m.consume_token(token):
            return i
    return None
