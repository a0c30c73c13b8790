"""A decode batch's grammar masks computed together (GrammarMask.prepare_batch, called by
engine.runtime.prepare_masks): the same bits as each mask alone, at every step of a turn."""

from __future__ import annotations

from typing import ClassVar

import torch

from dsml import markers
from engine.runtime import prepare_masks
from engine.sampling import SamplingParams
from proxy.backends.grammar_mask import GrammarMask
from tests.proxy.test_constraints import BLOCK, forced_opener, grammar_for, load_tokenizer, prompt


def _turn_tokens() -> tuple[str, list[int]]:
    opener = forced_opener(prompt("required"))
    grammar = grammar_for(tool_choice="required", generated=opener)
    return grammar, load_tokenizer().encode_generated(BLOCK.removeprefix(opener) + markers.EOS)


def test_batched_masks_equal_each_mask_alone_at_every_step() -> None:
    grammar, rest = _turn_tokens()
    prompt_ids = [0, 5, 6]
    # three sequences at different places of the same turn, one of them past its end
    starts = [0, 3, len(rest)]
    batched = [GrammarMask(grammar, len(prompt_ids)) for _ in starts]
    alone = [GrammarMask(grammar, len(prompt_ids)) for _ in starts]
    ids = [prompt_ids + rest[:s] for s in starts]
    for _ in range(len(rest) + 1):
        GrammarMask.prepare_batch(list(zip(batched, ids, strict=True)))
        for b, a, seq in zip(batched, alone, ids, strict=True):
            assert b._ready == len(seq)
            got = b.bitmask(seq).clone()
            assert b._ready is None  # used once
            assert torch.equal(got, a.bitmask(seq))
        for seq in ids:  # each takes the next token of the turn (EOS forever after its end)
            seq.append(rest[min(len(seq) - len(prompt_ids), len(rest) - 1)])
    assert all(m.rejected == 0 for m in alone[:2])


def test_a_mask_asked_for_other_ids_computes_its_own() -> None:
    grammar, rest = _turn_tokens()
    mask, fresh = GrammarMask(grammar, 0), GrammarMask(grammar, 0)
    GrammarMask.prepare_batch([(mask, rest[:2]), (GrammarMask(grammar, 0), rest[:1])])
    # the sequence moved on before sampling: the prepared row is stale and not used
    assert torch.equal(mask.bitmask(rest[:3]).clone(), fresh.bitmask(rest[:3]))


class _Counting:
    calls: ClassVar[list[int]] = []

    @classmethod
    def prepare_batch(cls, pairs) -> None:
        cls.calls.append(len(pairs))


class _Seq:
    def __init__(self, mask) -> None:
        self.params = SamplingParams(logits_mask=mask)
        self.ids = [1, 2]


def test_the_engine_prepares_a_class_once_for_two_rows_or_more() -> None:
    _Counting.calls = []
    prepare_masks([_Seq(_Counting()), _Seq(None), _Seq(_Counting())])
    prepare_masks([_Seq(_Counting())])  # one row: nothing to share
    assert _Counting.calls == [2]


def test_a_failing_preparation_leaves_the_masks_alone(caplog) -> None:
    class Broken:
        @classmethod
        def prepare_batch(cls, pairs) -> None:
            raise RuntimeError("boom")

    prepare_masks([_Seq(Broken()), _Seq(Broken())])
    assert "one by one" in caplog.text
