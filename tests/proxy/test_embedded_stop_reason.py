"""Which stop string ended an embedded-engine generation: engine.runtime reports it on the
last Step, the embedded backend passes it on as GenerateDelta.stop_reason (as vLLM's
`stop_reason`), so /v1/messages can name the `stop_sequence` that matched."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch

from dsml.tokenizer import load_tokenizer
from engine.config import ModelConfig
from engine.model import Transformer
from engine.runtime import Engine, StopStrings
from proxy.backends.base import GenerateDelta, GenerateRequest, SamplingParams
from proxy.backends.embedded import EmbeddedBackend

PROMPT = [0, 128803, 5, 77, 128804]


@pytest.mark.parametrize(("chunks", "stops", "matched"), [
    (["Hello wor", "ld!"], ["world"], "world"),
    (["xx", "STO", "P tail"], ["TOPS", "STOP"], "STOP"),
    (["a TOPS and STOP"], ["STOP", "TOPS"], "TOPS"),  # the earliest in the text, not the list
    (["ab STOP"], ["STOP", "ST"], "STOP"),  # a tie at one position: the first listed
    (["no stop here"], ["STOP"], None),
])
def test_stop_strings_name_the_match(chunks: list[str], stops: list[str],
                                     matched: str | None) -> None:
    matcher = StopStrings(stops)
    for chunk in chunks:
        matcher.feed(chunk)
    assert matcher.matched == matched


@pytest.fixture(scope="module")
def backend() -> EmbeddedBackend:
    # The tiny random model in memory (no checkpoint on disk: the loader is not under test).
    model = Transformer(ModelConfig.tiny(), dtype=torch.float32).init_random_(2)
    return EmbeddedBackend(Engine(model, load_tokenizer(), "cpu"))


async def generate(backend: EmbeddedBackend, stop: list[str]) -> tuple[str, GenerateDelta]:
    req = GenerateRequest(prompt_ids=PROMPT, prompt_text=None,
                          sampling=SamplingParams(max_tokens=16, temperature=0, stop=stop))
    deltas = [d async for d in backend.generate(req)]
    return "".join(d.text for d in deltas), deltas[-1]


async def test_embedded_backend_reports_the_matched_stop_string(backend: EmbeddedBackend) -> None:
    # The tiny random model writes nonsense, but greedily the same nonsense each time: a
    # piece of its own output is a stop string it will meet.
    text, last = await generate(backend, [])
    assert (last.finish_reason, last.stop_reason) == ("length", None)
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    cut, end = await generate(backend, ["never written \x00", stop])
    assert (end.finish_reason, end.stop_reason) == ("stop", stop)
    assert cut == text[:text.index(stop)]
