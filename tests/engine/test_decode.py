"""engine/decode.py's static-shape decode step against the reference forward, on the tiny model.

The configuration shrinks the window to 8 so 64 decoded tokens cross it many times; ratio 4
completes an entry every 4 positions and its indexer's top-8 starts rejecting entries after
32; ratio 128 (fixed by the architecture) is crossed by the prompts of 70 and 100 tokens.
Both paths prefill through `Transformer.forward`; the reference then decodes one token at a
time through `Transformer.forward` on its own state, the fast path through `DecodeStep` on a
slot pool. Greedy tokens must be equal at every step, logits within:

- fp32, QAT off: 2e-5 of the largest logit (measured 2.5e-6: the attention sums keys in
  another order and the indexer/ratio-128 rows carry masked tails; nothing else differs);
- fp32, QAT on: 3e-3 (measured up to 1.2e-3): the FP8/FP4 round trips turn an ulp of
  difference at a rounding boundary into one e4m3 step (1/8 relative) of one channel, which
  later layers carry on; test_cache_equivalence bounds the reference's own chunkings with QAT
  the same way (1e-2 on logits of std ~1). A state bug (a wrong slot, an entry one position
  early) moves logits by O(1).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from engine.cache import BatchState
from engine.decode import DecodeStep
from engine.kv import SlotPool
from engine.moe import MoE
from tests.engine.conftest import DEVICE, random_tokens, tiny_model

WINDOW = 8
MAX_LEN = 192
STEPS = 64
# Max relative logit error, fast step vs reference forward. fp32 without QAT: summation order
# only. With QAT every FP8/FP4 round trip of an activation turns a 1-ulp difference at a
# rounding boundary into a whole FP8 step (2^-3 relative) of that element: on the CPU that
# measured up to ~2e-3, on an H100 (cuBLAS and Triton against the CPU-free reference) 5.3e-3.
TOL = {False: 2e-5, True: 1e-2}


@functools.cache
def _model(qat: bool):
    return tiny_model(seed=3, sliding_window=WINDOW, qat=qat)


@pytest.fixture(params=[False, True], ids=["qat-off", "qat-on"])
def model(request):
    return _model(request.param)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _fast_prefill(model, pool: SlotPool, prompt: torch.Tensor):
    slot = pool.acquire()
    seq = pool.sequence_state(slot)
    logits = model(prompt, BatchState([seq]), last_only=True)
    return seq, logits


def _step(step: DecodeStep, seqs, tokens: torch.Tensor, pad_to: int | None = None):
    """One fast decode step for `seqs` (tokens [n]); padded rows use the scratch slot."""
    n = len(seqs)
    pad = (pad_to or n) - n
    slots = [s.slot for s in seqs] + [step.pool.scratch_slot] * pad
    positions = [s.length for s in seqs] + [0] * pad
    ids = torch.cat([tokens, torch.zeros(pad, dtype=torch.int64, device=tokens.device)])
    logits = step(ids, torch.tensor(slots, device=DEVICE), torch.tensor(positions, device=DEVICE))
    for s in seqs:
        s.length += 1
    return logits[:n]


@pytest.mark.parametrize(("qat", "length"), [(False, 3), (False, 70), (False, 100), (True, 3),
                                             (True, 100)])
def test_greedy_generation_and_logits_match_the_reference(qat, length):
    model = _model(qat)
    c = model.config
    assert c.sliding_window == WINDOW and length + STEPS > WINDOW
    pool = SlotPool(c, max_seqs=2, max_len=MAX_LEN, device=DEVICE, dtype=torch.float32)
    step = DecodeStep(model, pool)
    prompt = random_tokens(1, length, seed=length)
    ref_state = model.new_state(1, MAX_LEN)
    ref = model(prompt, ref_state, last_only=True)
    seq, fast = _fast_prefill(model, pool, prompt)
    tokens, worst = [], 0.0
    for i in range(STEPS):
        t_ref, t_fast = ref.argmax(-1), fast.argmax(-1)
        assert int(t_fast) == int(t_ref), f"greedy tokens differ at step {i} (prompt {length})"
        tokens.append(int(t_ref))
        ref = model(t_ref[:, None], ref_state, last_only=True)
        fast = _step(step, [seq], t_fast)
        worst = max(worst, _rel(fast, ref))
    assert worst < TOL[c.qat], f"max relative logit error {worst:.2e}"
    assert seq.length == ref_state[0].length == length + STEPS
    assert len(set(tokens)) > 1  # a degenerate generation would prove little


def test_a_batch_equals_its_rows_alone_and_padding_touches_nothing(model):
    """B=3 rows of different lengths in a bucket of 4 (one padded row on the scratch slot)
    against (a) the reference forward on the same batch shape (the padded row has no valid
    token there), and, with QAT off, (b) each row decoded alone. With QAT on a batch's rows
    are NOT equal to their rows alone in the reference itself (measured here: 0.12 relative
    at step 6, then other tokens): BLAS rounds an M=3 and an M=1 product differently, and the
    FP4 round trip of the indexer query turns that ulp into another top-k selection."""
    c = model.config
    lengths = (5, 41, 100)
    prompts = [random_tokens(1, n, seed=100 + n) for n in lengths]
    pool = SlotPool(c, max_seqs=5, max_len=MAX_LEN, device=DEVICE, dtype=torch.float32)
    alone_pool = SlotPool(c, max_seqs=3, max_len=MAX_LEN, device=DEVICE, dtype=torch.float32)
    step, alone_step = DecodeStep(model, pool), DecodeStep(model, alone_pool)
    ref_state = BatchState([*model.new_state(3, MAX_LEN).seqs, *model.new_state(1, 8).seqs])
    batch, alone = [], []
    for b, p in enumerate(prompts):
        batch.append(_fast_prefill(model, pool, p))
        alone.append(_fast_prefill(model, alone_pool, p))
        model(p, ref_state.select([b]), last_only=True)
    parked, _ = _fast_prefill(model, pool, random_tokens(1, 30, seed=7))  # not in the batch
    before = [t.clone() for layer in pool.layers for t in vars(layer).values()
              if isinstance(t, torch.Tensor)]

    seqs = [s for s, _ in batch]
    tok = torch.stack([lg.argmax(-1)[0] for _, lg in batch])
    alone_tok = [lg.argmax(-1) for _, lg in alone]
    for i in range(12):
        out = _step(step, seqs, tok, pad_to=4)
        ids = torch.cat([tok, torch.zeros(1, dtype=torch.int64, device=DEVICE)])[:, None]
        ref = model(ids, ref_state, num_tokens=[1, 1, 1, 0], last_only=True)[:3]
        assert torch.equal(out.argmax(-1), ref.argmax(-1)), f"step {i}"
        assert _rel(out, ref) < TOL[c.qat], f"step {i}"
        if not c.qat:
            for b, (seq, _) in enumerate(alone):
                one = _step(alone_step, [seq], alone_tok[b])
                assert int(out[b].argmax()) == int(one.argmax()), f"row {b}, step {i}"
                assert _rel(out[b], one[0]) < TOL[c.qat]
                alone_tok[b] = one.argmax(-1)
        tok = out.argmax(-1)

    after = [t for layer in pool.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old[parked.slot], new[parked.slot]), "a parked sequence was written"


def test_a_reused_slot_forgets_its_previous_sequence(model):
    c = model.config
    pool = SlotPool(c, max_seqs=1, max_len=MAX_LEN, device=DEVICE, dtype=torch.float32)
    step = DecodeStep(model, pool)
    first, logits = _fast_prefill(model, pool, random_tokens(1, 100, seed=11))
    for _ in range(6):
        logits = _step(step, [first], logits.argmax(-1))
    pool.release(first.slot)
    # a shorter sequence in the same slot: the old window, entries and compressor rows sit
    # where the new one has not written yet; in half of the slot they are even NaN (an owner
    # that diverged): masked reads must zero them, acquire() must reset the compressor rows
    for layer in pool.layers:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor):
                t[first.slot, t.shape[1] // 2 :] = float("nan")
    prompt = random_tokens(1, 6, seed=12)
    second, fast = _fast_prefill(model, pool, prompt)
    assert second.slot == first.slot
    ref_state = model.new_state(1, MAX_LEN)
    ref = model(prompt, ref_state, last_only=True)
    for i in range(20):
        assert torch.isfinite(fast).all(), f"step {i}"
        assert int(fast.argmax()) == int(ref.argmax()), f"step {i}"
        assert _rel(fast, ref) < TOL[c.qat]
        ref = model(ref.argmax(-1)[:, None], ref_state, last_only=True)
        fast = _step(step, [second], fast.argmax(-1))


def test_pool_views_share_memory_and_the_pool_runs_out_cleanly():
    model = tiny_model(seed=0)
    pool = SlotPool(model.config, max_seqs=2, max_len=64, device=DEVICE, dtype=torch.float32)
    seq, _ = _fast_prefill(model, pool, random_tokens(1, 9, seed=1))
    for i, (layer, st) in enumerate(zip(pool.layers, seq.layers, strict=True)):
        assert st.window.data_ptr() == layer.window[seq.slot].data_ptr()
        if i < model.config.num_hidden_layers:  # (the MTP block's state is written by MTP)
            assert torch.count_nonzero(layer.window[seq.slot]) > 0  # the prefill wrote the pool
    pool.acquire()
    with pytest.raises(ValueError, match="full"):
        pool.acquire()
    pool.release(seq.slot)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(seq.slot)
    assert pool.acquire() == seq.slot
    assert seq.clone().slot is None


def _dense_moe(self: MoE, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The MoE without its host-syncing expert loop: every expert on every token, weighted
    by a routing mask (k-moe's kernel makes the real one sync-free on CUDA)."""
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = self.gate.route(flat, ids.reshape(-1))
    y = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
    for e, expert in enumerate(self.experts):
        w = (weights * (experts == e)).sum(-1)
        y += expert(flat, w)
    if self.shared_experts is not None:
        y += self.shared_experts(flat)
    return y.to(x.dtype).view(x.shape)


def test_the_step_never_reads_a_value_back_to_the_host(monkeypatch):
    model = tiny_model(seed=0, sliding_window=WINDOW, qat=True)
    pool = SlotPool(model.config, max_seqs=2, max_len=64, device=DEVICE, dtype=torch.float32)
    step = DecodeStep(model, pool)
    seq, logits = _fast_prefill(model, pool, random_tokens(1, 33, seed=2))
    monkeypatch.setattr(MoE, "forward", _dense_moe)

    def synced(*_args, **_kwargs):
        raise AssertionError("host sync inside the decode step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, synced)
    ids = torch.cat([logits.argmax(-1), torch.zeros(1, dtype=torch.int64, device=DEVICE)])
    out = step(ids, torch.tensor([seq.slot, pool.scratch_slot], device=DEVICE),
               torch.tensor([seq.length, 0], device=DEVICE))
    monkeypatch.undo()
    assert out.shape == (2, model.config.vocab_size) and torch.isfinite(out).all()


def test_the_graph_safe_fp4_roundtrip_is_the_reference_one():
    from engine import attention
    from engine.kernels.fp4_roundtrip import fp4_roundtrip_reference

    g = torch.Generator().manual_seed(4)
    for scale in (1e-3, 1.0, 300.0):
        x = torch.randn(7, 3, 128, generator=g) * scale
        x[0, 0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])  # midpoints
        assert torch.equal(fp4_roundtrip_reference(x), attention.fp4_roundtrip(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 x bf16 -> fp32 path is CUDA's")
def test_linear_f32_without_an_fp32_weight_copy_matches_the_reference():
    from engine.decode import _mm_out_dtype, linear_f32
    from engine.linear import Linear

    g = torch.Generator(device="cuda").manual_seed(0)
    lin = Linear(512, 3000, dtype=torch.bfloat16).cuda()
    lin.weight.copy_(torch.randn(3000, 512, generator=g, device="cuda") * 512**-0.5)
    x = torch.randn(5, 512, generator=g, device="cuda").bfloat16()
    out = linear_f32(lin, x)
    assert _mm_out_dtype[0], "this torch has no mm(out_dtype=): the head upcasts its weight"
    ref = lin(x.float())
    assert out.dtype == torch.float32
    # fp32 accumulation of exact products: only the summation order differs
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()


def test_the_triton_kernels_step_equals_the_reference_step():
    """The step's kernels (hc_post_pre, rmsnorm / rmsnorm_rope / rope, the fused compressor
    projection, attention, indexer, MoE) under mode("triton") (Triton's interpreter on the
    CPU) against the same step under mode("reference"), from identical pools, over
    positions 126..128: ratio 4 and ratio 128 complete an entry at 127. fp32 with QAT: the
    kernels reorder sums (~1e-6), which an FP8/FP4 rounding boundary can turn into one e4m3
    step of a channel (the 3e-3 of TOL); the pools' entries are compared the same way."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton's first import
    from engine.kernels import mode
    from engine.moe import stack_all_experts

    model = _model(True)
    stack_all_experts(model)
    pools = [SlotPool(model.config, max_seqs=1, max_len=MAX_LEN, device=DEVICE,
                      dtype=torch.float32) for _ in range(2)]
    prompt = random_tokens(1, 126, seed=5)
    (seq_r, logits), (seq_t, _) = (_fast_prefill(model, p, prompt) for p in pools)
    steps = [DecodeStep(model, p) for p in pools]
    for _ in range(3):
        ids = logits.argmax(-1)
        with mode("reference"):
            logits = _step(steps[0], [seq_r], ids)
        with mode("triton"):
            fast = _step(steps[1], [seq_t], ids)
        assert torch.equal(fast.argmax(-1), logits.argmax(-1))
        assert _rel(fast, logits) < TOL[True], _rel(fast, logits)
    n = model.config.num_hidden_layers  # (the MTP block's layer is not the step's)
    for i, (a, b) in enumerate(zip(pools[0].layers[:n], pools[1].layers[:n], strict=True)):
        for name in ("window", "entries", "index_keys"):
            x, y = getattr(a, name, None), getattr(b, name, None)
            if x is not None and x.numel():
                assert _rel(y, x) < TOL[True], (i, name, _rel(y, x))


@pytest.mark.parametrize("kernel_mode", ["reference", "triton"])
def test_a_gguf_wo_a_takes_the_grouped_gemv_on_its_blocks(monkeypatch, kernel_mode):
    """A Q8_0 wo_a (ds4's GGUF) goes through ggml_linear_grouped on the stored blocks and
    equals the dense einsum over its dequantised weight; dequantising it per call (the
    dense path, ~34 MB of traffic a layer on the real model) is not taken."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from engine import decode, formats
    from engine.attention import Attention
    from engine.formats import WeightFormat
    from engine.kernels import mode

    c = _model(False).config
    attn = Attention(0, c, torch.float32).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    k = attn.wo_a.in_features
    w = torch.randn(attn.wo_a.out_features, k, generator=g) * k**-0.5
    attn.wo_a.load_ggml(WeightFormat.Q8_0, formats.quantize_ggml(WeightFormat.Q8_0, w).to(DEVICE))
    out = torch.randn(3, c.num_attention_heads, c.head_dim, generator=g).to(DEVICE)
    dense = attn.wo_a.dense_weight(torch.float32).view(c.o_groups, c.o_lora_rank, -1)
    want = torch.einsum("bgi,gri->bgr", out.reshape(3, c.o_groups, -1), dense)
    monkeypatch.setattr(type(attn.wo_a), "dense_weight", lambda *a, **k: pytest.fail("dequantised"))
    with mode(kernel_mode):
        got = decode._wo_a_grouped(attn, out)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5, _rel(got, want)  # fp32 sums in another order


@pytest.mark.parametrize("kernel_mode", ["reference", "triton"])
def test_fp8_projections_reading_one_x_fuse_into_one_gemv(kernel_mode):
    """fused_rows on FP8 wq_a [256, K] + wkv [136, K] (a partial last scale block): one
    Linear whose rows and E8M0 scales are the parts' (views of it afterwards, no copy kept),
    equal to the parts' own outputs; a part that does not fill whole scale blocks (but the
    last) refuses to fuse."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from engine import formats, linear
    from engine.kernels import mode
    from engine.linear import Linear

    g = torch.Generator().manual_seed(0)
    k = 256
    parts = []
    for n in (256, 136):
        lin = Linear(k, n, dtype=torch.bfloat16)
        lin.load_fp8(*formats.quantize_fp8(torch.randn(n, k, generator=g) * k**-0.5))
        parts.append(lin.to(DEVICE))
    x = torch.randn(3, k, generator=g).bfloat16().to(DEVICE)
    with mode(kernel_mode):
        want = [lin(x) for lin in parts]
        owner = torch.nn.Module()
        fused = linear.fused_rows(owner, "_f", tuple(parts))
        got = fused(x).split(256, dim=-1)
        again = [lin(x) for lin in parts]  # the parts now read views of the fused weight
    assert fused.weight.shape == (392, k) and fused.scale.shape == (4, 2)
    assert parts[1].weight.data_ptr() == fused.weight[256:].data_ptr()
    assert parts[1].scale.data_ptr() == fused.scale[2:].data_ptr()
    assert linear.fused_rows(owner, "_f", tuple(parts)) is fused
    for a, b, c in zip(got, want, again, strict=True):
        assert torch.equal(c, b)
        assert _rel(a, b) < 2**-7, _rel(a, b)  # bf16 outputs; fp32 sums in another order
    odd = [Linear(k, 136, dtype=torch.bfloat16), Linear(k, 64, dtype=torch.bfloat16)]
    for lin in odd:
        lin.load_fp8(*formats.quantize_fp8(torch.randn(lin.out_features, k, generator=g)))
    assert linear.fused_rows(torch.nn.Module(), "_f", tuple(odd)) is None


def test_the_step_refuses_indices_on_another_device():
    """A host tensor of slots for a CUDA model would reach a Triton kernel as a CPU pointer;
    the step says which arguments are wrong instead (meta stands in for the other device)."""
    model = tiny_model(seed=0, sliding_window=WINDOW)
    pool = SlotPool(model.config, max_seqs=1, max_len=16, device=DEVICE, dtype=torch.float32)
    step = DecodeStep(model, pool)
    ids = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="model's device"):
        step(ids, torch.zeros(1, dtype=torch.int64, device="meta"), torch.zeros_like(ids))
