"""engine/runner.py: the on-device sampler, the runner's eager path (what CPU runs), the
engine on the fast path, and (CUDA only) graph replay == eager.

The runner's correctness rests on engine.decode (tests/engine/test_decode.py); here: the
static buffers, bucket padding, the in-graph sampler's rules against engine.sampling's, and
the Engine's integration (slots taken and given back, the reference sampler for the rows the
graph cannot sample).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import kernels
from engine.cache import BatchState
from engine.kv import SlotPool
from engine.make_checkpoint import write_checkpoint
from engine.runner import DecodeRunner, graph_can_sample, sample_rows
from engine.runtime import Engine
from engine.sampling import SamplingParams, filter_top_k_top_p
from tests.engine.conftest import DEVICE, random_tokens, tiny_model

MAX_LEN = 96


def test_graph_can_sample_only_what_it_reproduces():
    assert graph_can_sample(SamplingParams(temperature=0))
    assert graph_can_sample(SamplingParams(temperature=0, seed=3))  # greedy ignores the seed
    assert graph_can_sample(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, stop=("x",)))
    assert not graph_can_sample(SamplingParams(temperature=0.7, seed=3))  # its own stream
    assert not graph_can_sample(SamplingParams(temperature=0, logits_mask=lambda ids, lg: lg))
    mask = torch.ones(8, dtype=torch.bool)
    assert not graph_can_sample(SamplingParams(temperature=0, logits_mask=mask))


def test_sample_rows_follows_the_reference_filters():
    g = torch.Generator().manual_seed(0)
    V, n = 12, 40000
    logits = torch.randn(V, generator=g) * 2
    cases = [(0.7, 5, 0.8), (1.3, 0, 0.6), (1.0, 3, 1.0), (0.5, 0, 1.0)]
    for t, k, p in cases:
        out = sample_rows(logits.expand(n, V).contiguous(), torch.full((n,), t),
                          torch.full((n,), k), torch.full((n,), p), g)
        want = torch.softmax(filter_top_k_top_p(logits / t, k, p), dim=-1)
        freq = torch.bincount(out, minlength=V).float() / n
        # binomial std <= 0.0025 at n = 40000: 0.015 is six of them
        assert (freq - want).abs().max() < 0.015, (t, k, p, freq, want)
        assert freq[want == 0].sum() == 0  # never a filtered token
    greedy = sample_rows(torch.randn(5, V, generator=g), torch.zeros(5), torch.zeros(5, dtype=torch.int64),
                         torch.ones(5), g)
    assert greedy.shape == (5,)
    rows = torch.randn(6, V, generator=g)
    assert torch.equal(sample_rows(rows, torch.zeros(6), torch.zeros(6, dtype=torch.int64),
                                   torch.ones(6), g), rows.argmax(-1))
    # top-k 1 and a tiny nucleus are argmax whatever the temperature
    assert torch.equal(sample_rows(rows, torch.full((6,), 2.0), torch.ones(6, dtype=torch.int64),
                                   torch.ones(6), g), rows.argmax(-1))
    assert torch.equal(sample_rows(rows, torch.full((6,), 2.0), torch.zeros(6, dtype=torch.int64),
                                   torch.full((6,), 1e-6), g), rows.argmax(-1))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5, sliding_window=8)


def test_the_eager_runner_pads_to_a_bucket_and_matches_the_reference(model):
    c = model.config
    pool = SlotPool(c, max_seqs=3, max_len=MAX_LEN, device=DEVICE, dtype=torch.float32)
    runner = DecodeRunner(model, pool)
    assert runner.buckets == (1, 2, 4) and runner.bucket(3) == 4 and not runner.graphs
    ref_state = model.new_state(3, MAX_LEN)
    states, nxt = [], []
    for b, n in enumerate((4, 19, 37)):
        prompt = random_tokens(1, n, seed=n)
        model(prompt, ref_state.select([b]), last_only=True)
        seq = pool.sequence_state(pool.acquire())
        nxt.append(int(model(prompt, BatchState([seq]), last_only=True).argmax()))
        states.append(seq)
    greedy = [SamplingParams(temperature=0)] * 3
    for i in range(6):
        tokens, logits = runner.decode(states, nxt, greedy)
        ref = model(torch.tensor(nxt, device=DEVICE)[:, None], ref_state, last_only=True)
        assert torch.equal(tokens, logits.argmax(-1))
        assert torch.equal(tokens, ref.argmax(-1)), f"step {i}"
        assert float((logits - ref).abs().max() / ref.abs().max()) < 2e-5
        nxt = tokens.tolist()
    assert [s.length for s in states] == [s.length for s in ref_state.seqs]
    # the padded row ran on the scratch slot at position 0 with id 0
    assert int(runner.slots[3]) == pool.scratch_slot and int(runner.positions[3]) == 0

    # a row the graph cannot sample gets a greedy token here (the engine resamples it)
    masked = SamplingParams(temperature=1.0, logits_mask=torch.ones(c.vocab_size, dtype=torch.bool))
    tokens, logits = runner.decode(states[:2], nxt[:2], [masked, SamplingParams(temperature=0)])
    assert torch.equal(tokens, logits.argmax(-1)) and runner.bucket(2) == 2
    with pytest.raises(ValueError, match="distinct"):
        runner.step([0, 0], [1, 1], [1, 1], greedy[:2])
    with pytest.raises(ValueError, match="positions"):
        runner.step([0], [MAX_LEN], [1], greedy[:1])


def _engine(path, engine_path: str) -> Engine:
    return Engine.from_checkpoint(path, device=DEVICE, dtype=torch.float32, max_seq_len=128,
                                  max_batch_size=3, engine_path=engine_path)


async def _run(engine: Engine, prompts, params):
    async def one(prompt, p):
        return [t async for t in engine.generate(prompt, p)]
    return await asyncio.gather(*(one(pr, p) for pr, p in zip(prompts, params, strict=True)))


async def test_the_engine_on_the_fast_path_generates_what_the_reference_does(tmp_path):
    path = write_checkpoint(tmp_path / "tiny", seed=2)
    fast, ref = _engine(path, "fast"), _engine(path, "reference")
    try:
        assert fast.fast_path and not ref.fast_path
        assert kernels.get_mode() == "reference"  # the last engine built set the switch
        prompts = [[0, 128803, 5, 77, 128804], [0, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [0, 3]]
        params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                  SamplingParams(max_tokens=6, temperature=0.8, seed=7, ignore_eos=True),
                  SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)]
        got = await _run(fast, prompts, params)
        want = await _run(ref, prompts, params)
        assert got == want  # greedy rows on the graph sampler, the seeded row on its Sampler
        assert [len(g) for g in got] == [8, 6, 4]
        assert fast._pool.num_free == 3  # every slot given back
        # more requests than slots: they wait for one, and still match
        more = [[0, 40 + i] for i in range(4)]
        greedy = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)] * 4
        assert await _run(fast, more, greedy) == await _run(ref, more, greedy)
        assert fast._pool.num_free == 3
    finally:
        fast.close()
        ref.close()
        kernels.set_mode("auto")  # engine_path "reference" switched the process to the oracle


def test_an_unknown_engine_path_is_an_error(model):
    with pytest.raises(ValueError, match="engine_path"):
        Engine(model, tokenizer=None, device=DEVICE, engine_path="quick")


def _graph_steps(model, graphs: bool, dtype=torch.float32) -> list[torch.Tensor]:
    """Ten decode steps' logits from a fresh pool and runner on CUDA: three rows (bucket 4
    with a padded row), then two (bucket 2), then the sampling graph."""
    c = model.config
    pool = SlotPool(c, max_seqs=4, max_len=MAX_LEN, device="cuda", dtype=dtype)
    runner = DecodeRunner(model, pool, graphs=graphs)
    errors = runner.capture()
    assert not errors, f"capture failed (a host sync in the step?): {errors}"
    assert bool(runner.graphs) == graphs
    states, nxt = [], []
    for n in (3, 30, 61):
        seq = pool.sequence_state(pool.acquire())
        nxt.append(int(model(random_tokens(1, n, seed=n).cuda(), BatchState([seq]),
                             last_only=True).argmax()))
        states.append(seq)
    steps = []
    for _ in range(8):  # bucket 4 with a padded row, then bucket 2
        tokens, logits = runner.decode(states, nxt, [SamplingParams(temperature=0)] * 3)
        steps.append(logits.clone())
        nxt = tokens.tolist()
    tokens, logits = runner.decode(states[:2], nxt[:2], [SamplingParams(temperature=0)] * 2)
    steps.append(logits.clone())
    # the sampling graph: top-k 1 is argmax whatever the temperature
    top1 = SamplingParams(temperature=1.5, top_k=1)
    tokens, logits = runner.decode(states[:2], tokens.tolist(), [top1, top1])
    assert torch.equal(tokens, logits.argmax(-1))
    steps.append(logits.clone())
    return steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("qat", [False, True])
def test_graph_replay_equals_the_eager_step(qat):
    """Fails while the MoE reference syncs the host (k-moe's routed-experts kernel removes
    that); the QAT case also covers the FP4/Hadamard round trips inside a capture."""
    model = tiny_model(seed=5, sliding_window=8, qat=qat).to("cuda")
    outs = {graphs: _graph_steps(model, graphs) for graphs in (False, True)}
    for i, (eager, graph) in enumerate(zip(outs[False], outs[True], strict=True)):
        assert torch.allclose(eager, graph, rtol=0, atol=1e-5), f"step {i}"


def test_pdl_applies_only_inside_graph_launches_on_a_capable_device():
    """Eager launches never take PDL (its launch path doubled an eager step's host time), a
    graph's warm-up and capture do on sm_90+, and the CPU interpreter never does."""
    cpu = torch.zeros(1)
    assert kernels.pdl_launch(cpu) == {}
    with pytest.raises(RuntimeError), kernels.graph_launches():
        assert kernels.pdl_launch(cpu) == {}
        if torch.cuda.is_available():
            gpu = cpu.cuda()
            want = ({"PDL": True, "launch_pdl": True}
                    if torch.cuda.get_device_capability()[0] >= 9 else {})
            assert kernels.pdl_launch(gpu) == want
            kernels.set_pdl(False)
            try:
                assert kernels.pdl_launch(gpu) == {}
            finally:
                kernels.set_pdl(True)
        raise RuntimeError("the block is left")
    assert kernels._pdl["graph"] == 0 and kernels.pdl_launch(cpu) == {}


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm_90+")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_programmatic_dependent_launch_changes_no_bit(dtype):
    """Every kernel launched with PDL waits for the one before it (engine/kernels/
    __init__.py): a kernel that read or wrote before its wait would race, and a race
    changes bits somewhere in ten replayed steps (split-K partials, arrival counters,
    buffers reused across layers). Both graphs with the overlap side stream."""
    model = tiny_model(seed=7, sliding_window=8, qat=True, dtype=dtype).to("cuda")
    outs, was = {}, kernels.pdl_enabled()
    for pdl in (False, True, False, True):  # twice each: a race need not show the first time
        kernels.set_pdl(pdl)
        try:
            outs.setdefault(pdl, []).append(_graph_steps(model, graphs=True, dtype=dtype))
        finally:
            kernels.set_pdl(was)
    want = outs[False][0]
    for got in (*outs[False][1:], *outs[True]):
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            assert torch.equal(a, b), f"step {i}: max |diff| {(a - b).abs().max().item()}"


def test_slots_come_back_after_a_cancelled_prefill_and_an_abandoned_event_loop(tmp_path):
    path = write_checkpoint(tmp_path / "tiny", seed=3)
    engine = _engine(path, "fast")
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    try:
        prefill = engine._prefill

        def prefill_then_cancel(seq):  # the consumer goes away while its prefill runs
            token = prefill(seq)
            seq.done = True
            return token

        async def cancelled_during_prefill():
            engine._prefill = prefill_then_cancel
            stream = engine.stream([0, 5, 6], params)
            await stream.__anext__()
            await stream.aclose()
            await engine._scheduler
            engine._prefill = prefill

        asyncio.run(cancelled_during_prefill())
        assert engine._pool.num_free == 3

        async def abandoned():  # asyncio.run cancels the scheduler with two rows running
            streams = [engine.stream([0, 7 + i], params) for i in range(2)]
            for s in streams:
                await s.__anext__()

        asyncio.run(abandoned())

        async def next_loop():
            return [t async for t in engine.generate([0, 9], SamplingParams(
                max_tokens=2, temperature=0, ignore_eos=True))]

        assert len(asyncio.run(next_loop())) == 2
        assert engine._pool.num_free == 3
    finally:
        engine.close()
        kernels.set_mode("auto")
