"""The invariants of dsml.md 6.1 on generated damage (hypothesis, CI-sized; the long run
is bench/fuzz_parser.py): (a) no markup in values nor in the text of a turn with calls,
(b) nothing lost, (c) no parameter in another call, (d) chunking never matters."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dsml.damage import check, completion


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_damaged_blocks_keep_the_invariants(rnd: random.Random) -> None:
    pieces, thinking = completion(rnd)
    text = "".join(pieces)
    assert check(text, thinking, rnd) is None, (check(text, thinking, random.Random(0)), text)
