"""One decode token for B rows with static shapes and no host sync: what a CUDA graph captures.

    step = DecodeStep(model, pool)               # model: engine.model.Transformer
    logits = step(ids, slots, positions)         # [B] int64 each, on the device -> [B, V] fp32

Row b is the sequence in pool slot `slots[b]`, its token `ids[b]` at position `positions[b]`
(its `SequenceState.length`; the caller advances it). The step reads and writes only
`engine.kv.SlotPool` memory, through `slots`: no `.item()`, no `.tolist()`, no Python branch
on a tensor's value, no shape that depends on data, so one capture replays for any
positions. Padded rows point at the pool's scratch slot (position 0, id 0): they compute
garbage that nobody reads. The caller keeps positions below the pool's max_len.

It mirrors the reference (engine/model.py Block and Transformer, engine/attention.py
Attention) op for op, with masks where the reference slices:

- window: the token's kv goes to ring slot p % W, attention reads the whole ring and masks
  slot i unless i <= p or p >= W-1 (the ring then holds positions p-W+1..p);
- compressor: the token's row goes to its ring slot; the entry that WOULD complete at p
  (entry p // r, pooled from the ring exactly as Compressor.compress_row pools it, incl. the
  overlapping ratio-4 case and entry 0's empty previous block) is computed every step and
  written into entries[slot, p // r] only where (p + 1) % r == 0 (torch.where);
- ratio 128: every entry j < (p+1)//128 of entries[slot, :N_max] is attended (index -1 masks
  the rest); ratio 4: the indexer scores index_keys[slot, :N_max], masks entries
  j >= (p+1)//4 with -inf and keeps the top min(index_topk, N_max) (engine/kernels/
  indexer_scores.py, indexer_topk.py: an exact tie goes to the earlier entry as in
  Indexer.select_row's stable sort; -1 where fewer are visible);
- attention over window + selected entries with the sink (engine/kernels/decode_attention.py),
  inverse RoPE, grouped wo_a, wo_b;
- QAT round trips (config.qat) exactly where the reference applies them.

What differs from the reference to fp rounding only: the attention's keys are summed in ring
/ score order instead of position order, the static N_max-long indexer and ratio-128 score
rows carry masked (-inf) tails, and on CUDA the fp32 products of BF16 weights (head,
compressors) multiply bf16 values with fp32 accumulation instead of upcasting the weight
(`linear_f32`). The MoE is the block's own module (sync-free on the fast
path); the hyper-connection maps are engine/kernels/hc.py's hc_pre / hc_post / hc_head.
Every kernel takes its PyTorch reference when the switch (engine.kernels) says so. Not here: the MTP block (drafting), prefill (the
reference Transformer.forward writes the pool through the pool's views).

Shapes: B rows, S pool slots, H hidden, Hh heads, D head_dim, W window, N_max entries of a
slot (max_len // r), Hi/Di indexer heads/dim, C compressor width, G o_groups.
"""

from __future__ import annotations

import functools

import torch

from engine.attention import (
    _FP4_GRID,
    FP4_E2M1_MAX,
    Attention,
    Compressor,
    Indexer,
    _pow2_scale,
    fp8_roundtrip,
    hadamard,
)
from engine.config import QAT_INDEXER_FP4_BLOCK, RATIO_SPARSE, RATIO_WINDOW
from engine.formats import WeightFormat
from engine.kernels.decode_attention import decode_attention
from engine.kernels.hc import hc_head, hc_post, hc_pre
from engine.kernels.indexer_scores import indexer_scores
from engine.kernels.indexer_topk import indexer_topk
from engine.kv import PoolLayer, SlotPool
from engine.linear import Linear
from engine.model import Transformer
from engine.rope import apply_rope, rope_cos_sin, rope_inv_freq

try:  # the FP8 GEMV of issue 15 (k-fp8); until it is merged, wo_a runs dense as the reference
    from engine.kernels.fp8_linear import act_quant_enabled, fp8_linear_grouped
except ImportError:
    fp8_linear_grouped = None


# ---------------------------------------------------------------------------------------------
# fp32 products of BF16 weights without an fp32 copy of the weight.
# ---------------------------------------------------------------------------------------------
_mm_out_dtype = [True]  # cleared once if this torch lacks mm(..., out_dtype=) on CUDA


def linear_f32(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """lin(x.float()) -> [..., out] fp32, as the reference computes the head and the
    compressor projections. The reference upcasts the whole BF16 weight to fp32 per call
    (the 1.06 GB head becomes ~5 GB of traffic a token); on CUDA this multiplies the bf16
    values directly with fp32 output and accumulation instead (torch.mm out_dtype, cuBLAS):
    bf16 x bf16 products are exact in fp32, so only the summation order differs. Elsewhere,
    for other formats or dtypes, and where the overload is missing: the reference call."""
    w = lin.weight
    if (_mm_out_dtype[0] and x.is_cuda and lin.format == WeightFormat.DENSE
            and w.dtype in (torch.bfloat16, torch.float16) and x.dtype == w.dtype):
        try:
            out = torch.mm(x.reshape(-1, x.shape[-1]), w.t(), out_dtype=torch.float32)
            return out.view(*x.shape[:-1], w.shape[0])
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_out_dtype[0] = False  # decided in the warm-up, before any graph capture
    return lin(x.float())


# ---------------------------------------------------------------------------------------------
# Compressor and indexer, one token per row.
# ---------------------------------------------------------------------------------------------
@functools.cache
def _fp4_tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.tensor(_FP4_GRID, device=device)
    return grid, (grid[1:] + grid[:-1]) / 2


def fp4_roundtrip(x: torch.Tensor, block: int = QAT_INDEXER_FP4_BLOCK) -> torch.Tensor:
    """engine.attention.fp4_roundtrip with its e2m1 grid made once per device: the
    reference builds it with torch.tensor on every call, a host-to-device copy that a CUDA
    graph cannot capture (the warm-up before a capture fills this cache)."""
    xb = x.float().unflatten(-1, (-1, block))
    scale = _pow2_scale(xb, FP4_E2M1_MAX)
    y = (xb / scale).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX)
    grid, mids = _fp4_tables(str(x.device))
    q = grid[torch.bucketize(y.abs(), mids)] * y.sign()
    return (q * scale).flatten(-2).to(x.dtype)


def _indexer_queries(ix: Indexer, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer.queries for one token per row (x [B, H], qr [B, Q], cos/sin [B, R/2]):
    q [B, Hi, Di] roped (+ Hadamard and FP4 under QAT) fp32, w [B, Hi] fp32."""
    q = ix.wq_b(qr).view(x.shape[0], ix.num_heads, ix.head_dim)
    q = apply_rope(q, cos.unsqueeze(1), sin.unsqueeze(1)).float()
    if ix.config.qat:
        q = fp4_roundtrip(hadamard(q))
    w = ix.weights_proj(x).float() * (ix.head_dim**-0.5 * ix.num_heads**-0.5)
    return q, w

def _compress_step(
    comp: Compressor, ring_kv: torch.Tensor, ring_score: torch.Tensor, x: torch.Tensor,
    slots: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write the token's row into its ring slot; return (entry [B, D] fp32 normed and roped,
    before QAT: the entry p // r as it stands once this row is in, its index j = p // r [B],
    and whether it completes now [B] bool)."""
    r, d = comp.ratio, comp.head_dim
    # Compressor.project, one token per row: kv [B, C] and score [B, C] fp32
    kv = linear_f32(comp.wkv, x)
    score = linear_f32(comp.wgate, x) + comp.ape[positions % r]
    ring = positions % ring_kv.shape[1]
    ring_kv[slots, ring] = kv
    ring_score[slots, ring] = score
    j = positions // r
    if comp.overlap:
        # ring slot of position q is q % 2r: block j sits at offset (j % 2) * r, block j-1 at
        # the other half; entry j pools block j-1's channels [:D] and block j's [D:]
        cur = (j % 2) * r
        offs = torch.arange(r, device=x.device)
        s = slots.unsqueeze(-1)
        cur_rows, prev_rows = cur.unsqueeze(-1) + offs, (r - cur).unsqueeze(-1) + offs
        # entry 0: no previous block (zeros, -inf). A fresh slot's ring already holds those
        # (SlotPool.acquire); explicit so the step does not rest on the reset
        first = (j == 0).view(-1, 1, 1)
        kv_prev = torch.where(first, 0.0, ring_kv[s, prev_rows, :d])
        sc_prev = torch.where(first, float("-inf"), ring_score[s, prev_rows, :d])
        pool_kv = torch.cat([kv_prev, ring_kv[s, cur_rows, d:]], dim=1)  # [B, 2r, D]
        pool_sc = torch.cat([sc_prev, ring_score[s, cur_rows, d:]], dim=1)
    else:
        pool_kv, pool_sc = ring_kv[slots], ring_score[slots]  # slot i = position j*r + i
    entry = (pool_kv * pool_sc.softmax(dim=1)).sum(dim=1)  # [B, D]
    entry = comp.norm(entry)
    cos, sin = rope_cos_sin(inv_freq, j * r)
    return apply_rope(entry, cos, sin), j, (positions + 1) % r == 0


def _masked_write(dst: torch.Tensor, slots: torch.Tensor, j: torch.Tensor,
                  complete: torch.Tensor, value: torch.Tensor) -> None:
    """dst[slots[b], j[b]] = value[b] where complete[b] (and j[b] < N); else unchanged."""
    n = dst.shape[1]
    jc = j.clamp(max=n - 1)
    old = dst[slots, jc]
    keep = (complete & (j < n)).unsqueeze(-1)
    dst[slots, jc] = torch.where(keep, value.to(dst.dtype), old)


def _index_select(
    ix: Indexer, pl: PoolLayer, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
) -> torch.Tensor:
    """Update the indexer keys; return the selected entry indices [B, min(topk, N_max)]
    (-1 where fewer entries are visible), in ascending order."""
    c = ix.config
    q, w = _indexer_queries(ix, x, qr, cos, sin)  # [B, Hi, Di] fp32, [B, Hi]
    new, j, complete = _compress_step(ix.compressor, pl.index_kv, pl.index_score, x, slots,
                                      positions, inv_freq)
    if c.qat:
        new = fp4_roundtrip(hadamard(new))
    _masked_write(pl.index_keys, slots, j, complete, new)
    scores = indexer_scores(q, pl.index_keys, slots, positions, w)  # [B, N_max], -inf unseen
    # the top min(index_topk, N_max); an exact tie (ReLU zeros on every head are common)
    # goes to the earlier entry, the reference's stable-sort rule; -1 past the visible count
    return indexer_topk(scores, c.index_topk)


def _wo_a_grouped(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    """out [B, Hh, D] -> [B, G, o_lora]: group g of heads through wo_a rows g*o_lora.. ."""
    c = attn.config
    G, B = c.o_groups, out.shape[0]
    if fp8_linear_grouped is not None and attn.wo_a.format == WeightFormat.FP8:
        return fp8_linear_grouped(out.reshape(B, G, -1), attn.wo_a.weight, attn.wo_a.scale,
                                  act_quant=act_quant_enabled())
    w = attn.wo_a.dense_weight(out.dtype).view(G, c.o_lora_rank, -1)  # [G, o_lora, Hh*D/G]
    return torch.einsum("bgi,gri->bgr", out.reshape(B, G, -1), w)


def attention_decode(attn: Attention, pl: PoolLayer, x: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [B, H] (attn_norm'ed) -> [B, H]; reads and updates pool layer `pl` at `slots`."""
    c = attn.config
    B = x.shape[0]
    cos, sin = rope_cos_sin(inv_freq, positions)  # [B, R/2]
    cos_h, sin_h = cos.unsqueeze(1), sin.unsqueeze(1)

    qr = attn.q_norm(attn.wq_a(x))  # [B, Q]; also the indexer's input
    q = attn.wq_b(qr).view(B, attn.num_heads, attn.head_dim)
    qf = q.float()
    q = (qf * torch.rsqrt(qf.square().mean(-1, keepdim=True) + c.rms_norm_eps)).to(x.dtype)
    q = apply_rope(q, cos_h, sin_h)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)  # [B, D]
    if c.qat:
        kv = torch.cat([fp8_roundtrip(kv[..., : c.nope_head_dim]), kv[..., c.nope_head_dim :]], -1)
    pl.window[slots, positions % pl.window.shape[1]] = kv.to(pl.window.dtype)

    entries = entry_idx = None
    if attn.ratio != RATIO_WINDOW and pl.entries.shape[1] > 0:
        new, j, complete = _compress_step(attn.compressor, pl.comp_kv, pl.comp_score, x, slots,
                                          positions, inv_freq)
        if c.qat:
            new = torch.cat([fp8_roundtrip(new[:, : c.nope_head_dim]), new[:, c.nope_head_dim :]], -1)
        _masked_write(pl.entries, slots, j, complete, new)
        entries = pl.entries
        if attn.ratio == RATIO_SPARSE:
            entry_idx = _index_select(attn.indexer, pl, x, qr, cos, sin, slots, positions,
                                      inv_freq)
        else:
            all_j = torch.arange(entries.shape[1], device=x.device)
            done = all_j < ((positions + 1) // attn.ratio).unsqueeze(-1)
            entry_idx = torch.where(done, all_j, -1)  # [B, N_max]

    out = decode_attention(q, pl.window, entries, slots, positions, entry_idx, attn.attn_sink,
                           attn.softmax_scale)
    out = apply_rope(out, cos_h, sin_h, inverse=True)  # V = K carried the keys' rotation
    return attn.wo_b(_wo_a_grouped(attn, out).flatten(1))


class DecodeStep:
    """The model's decode forward over a slot pool (see the module docstring)."""

    def __init__(self, model: Transformer, pool: SlotPool) -> None:
        c = model.config
        if pool.config.num_hidden_layers != c.num_hidden_layers:
            raise ValueError("the pool was built for another configuration")
        self.model = model
        self.pool = pool
        self.config = c
        device = model.embed.weight.device
        self.inv_freq = [rope_inv_freq(c, c.compress_ratio(i), device)
                         for i in range(c.num_hidden_layers)]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """ids, slots, positions [B] int64 -> logits [B, V] fp32. Writes the pool."""
        m, c = self.model, self.config
        h = m.embed(ids).unsqueeze(1).repeat(1, c.hc_mult, 1)  # [B, S, H]
        for i, layer in enumerate(m.layers):
            x, post, comb = hc_pre(h, layer.hc_attn_fn, layer.hc_attn_scale, layer.hc_attn_base, c)
            x = attention_decode(layer.attn, self.pool.layers[i], layer.attn_norm(x), slots,
                                 positions, self.inv_freq[i])
            h = hc_post(x, h, post, comb)
            x, post, comb = hc_pre(h, layer.hc_ffn_fn, layer.hc_ffn_scale, layer.hc_ffn_base, c)
            x = layer.ffn(layer.ffn_norm(x).unsqueeze(1), ids.unsqueeze(1))[:, 0]
            h = hc_post(x, h, post, comb)
        y = m.norm(hc_head(h, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, c))
        return linear_f32(m.head, y)
