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
  written into entries[slot, p // r] only where (p + 1) % r == 0 (other rows write that
  entry of the scratch slot, which nobody reads: one scatter); the ring write and the
  pooling are one kernel (engine/kernels/compress_pool.py), the entry's norm, RoPE, QAT
  rounding and scatter another (engine/kernels/cache_rows.py, as the kv's ring write);
- ratio 128: every entry j < (p+1)//128 of entries[slot, :N_max] is attended (index -1 masks
  the rest); ratio 4: the indexer scores index_keys[slot, :N_max], masks entries
  j >= (p+1)//4 with -inf and keeps the top min(index_topk, N_max) (engine/kernels/
  indexer_scores.py, indexer_topk.py: an exact tie goes to the earlier entry as in
  Indexer.select_row's stable sort; -1 where fewer are visible);
- attention over window + selected entries with the sink (engine/kernels/decode_attention.py),
  inverse RoPE, grouped wo_a, wo_b;
- QAT round trips (config.qat) exactly where the reference applies them (the Hadamard's
  fp32 sums in another order).

What differs from the reference to fp rounding only: the attention's keys are summed in ring
/ score order instead of position order, the static N_max-long indexer and ratio-128 score
rows carry masked (-inf) tails, and on CUDA the fp32 products of BF16 weights (head,
compressors) multiply bf16 values with fp32 accumulation instead of upcasting the weight
(`linear_f32`), and projections that read the same x run as one GEMV over their
concatenated rows (`engine.linear.fused_rows`: each row's dot product is the same, its summation order
may not be). Per-step index / rotation tensors are made once and shared by the layers
(`_StepRows`). The MoE is the block's own module (sync-free on the fast
path); the hyper-connection maps are engine/kernels/hc.py's hc_pre / hc_post / hc_head.
Every kernel takes its PyTorch reference when the switch (engine.kernels) says so. Not here: the MTP block (drafting), prefill (the
reference Transformer.forward writes the pool through the pool's views).

Shapes: B rows, S pool slots, H hidden, Hh heads, D head_dim, W window, N_max entries of a
slot (max_len // r), Hi/Di indexer heads/dim, C compressor width, G o_groups.
"""

from __future__ import annotations

import torch

from engine import overlap
from engine.attention import Attention, Compressor, Indexer
from engine.config import RATIO_SPARSE, RATIO_WINDOW
from engine.formats import GGML_BLOCKS, WeightFormat
from engine.kernels import use_triton
from engine.kernels.cache_rows import finish_rows, write_cache_rows
from engine.kernels.compress_pool import compress_pool, overlap_rows
from engine.kernels.decode_attention import decode_attention
from engine.kernels.gguf_gemv import ggml_linear_grouped
from engine.kernels.hc import hc_head, hc_post, hc_post_pre, hc_pre
from engine.kernels.indexer_scores import indexer_scores
from engine.kernels.indexer_topk import indexer_topk
from engine.kernels.rmsnorm_rope import rmsnorm, rmsnorm_rope
from engine.kv import PoolLayer, SlotPool
from engine.linear import Linear, fused_rows
from engine.model import Transformer
from engine.moe import fuse_shared_expert
from engine.rope import rope_cos_sin, rope_inv_freq

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
class _StepRows:
    """Index, mask and rotation tensors that depend only on the step's positions and slots,
    made once a step and shared by every layer: each would otherwise cost its few launches
    (arange, remainder, floor_divide, cos, sin, ...) in each of the 43 layers."""

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor, scratch_slot: int,
                 inv_freq: dict[int, torch.Tensor]) -> None:
        self.slots, self.positions, self.scratch_slot = slots, positions, scratch_slot
        self.inv_freq = inv_freq
        self._memo: dict[tuple, object] = {}

    def _get(self, key: tuple, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def rope(self, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, R/2] of the token's position (the layer's frequencies)."""
        return self._get(("rope", ratio), lambda: rope_cos_sin(self.inv_freq[ratio], self.positions))

    def entry(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(j = p // r [B], cos, sin of the entry's position j * r, complete now [B] bool)."""
        def make():
            j = self.positions // r
            cos, sin = rope_cos_sin(self.inv_freq[r], j * r)
            return j, cos, sin, (self.positions + 1) % r == 0
        return self._get(("entry", r), make)

    def ring(self, width: int) -> torch.Tensor:
        return self._get(("ring", width), lambda: self.positions % width)

    def entry_target(self, r: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, entry) rows where the step writes its would-be entry of an [S, n] table:
        (slots[b], j[b]) where the entry completes now (and j < n), else the scratch slot,
        whose contents nobody reads (padded rows already write there)."""
        def make():
            j, _, _, complete = self.entry(r)
            keep = complete & (j < n)
            return torch.where(keep, self.slots, self.scratch_slot), j.clamp(max=n - 1)
        return self._get(("target", r, n), make)

    def overlap_rows(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ratio 4's pooled ring rows (engine.kernels.compress_pool.overlap_rows)."""
        return self._get(("overlap", r), lambda: overlap_rows(self.positions, r))


def _query_projections(attn: Attention, qr: torch.Tensor,
                       sparse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """wq_b(qr) [B, Hh * D] and, on ratio-4 layers, the indexer's wq_b(qr) [B, Hi * Di]
    (one GEMV where they fuse; views into its output)."""
    if not sparse:
        return attn.wq_b(qr), None
    fused = _fused_q_b(attn)
    if fused is not None:
        return fused(qr).split(attn.wq_b.weight.shape[0], dim=-1)
    return attn.wq_b(qr), attn.indexer.wq_b(qr)


def _weight_scale(ix: Indexer) -> float:
    """Indexer.queries' constant on the head weights (indexer_scores applies it)."""
    return ix.head_dim**-0.5 * ix.num_heads**-0.5


def _fused_projection(comp: Compressor) -> Linear | None:
    """The compressor's wkv and wgate rows as one GEMV (engine.linear.fused_rows)."""
    return fused_rows(comp, "_decode_wkv_gate", (comp.wkv, comp.wgate))


def _side_parts(attn: Attention) -> tuple[Linear, ...]:
    ix = attn.indexer
    return (attn.compressor.wkv, attn.compressor.wgate, ix.compressor.wkv, ix.compressor.wgate,
            ix.weights_proj)


def _fused_side_rows(attn: Attention) -> Linear | None:
    """Ratio-4 layers: every BF16 projection of the layer input the side stream needs (the
    compressor's wkv and wgate, the indexer compressor's, the indexer's head weights) as one
    GEMM (engine.linear.fused_rows). Where it exists, the compressors' own fusions are never
    made: two fusions of one weight would re-point its views in turn."""
    return fused_rows(attn, "_decode_side_rows", _side_parts(attn))


def _fused_q_kv(attn: Attention) -> Linear | None:
    """The attention's wq_a and wkv rows as one GEMV (engine.linear.fused_rows)."""
    return fused_rows(attn, "_decode_wq_a_wkv", (attn.wq_a, attn.wkv))


def _fused_q_b(attn: Attention) -> Linear | None:
    """Ratio-4 layers: the attention's wq_b and the indexer's wq_b rows (both read qr) as one
    GEMV (engine.linear.fused_rows)."""
    return fused_rows(attn, "_decode_wq_b", (attn.wq_b, attn.indexer.wq_b))


def _fuse_projections(attn: Attention) -> None:
    """Every fusion the step uses, made once before any capture."""
    _fused_q_kv(attn)
    comp = getattr(attn, "compressor", None)
    ix = getattr(attn, "indexer", None)
    if ix is not None:
        _fused_q_b(attn)
    if ix is not None and _fused_side_rows(attn) is not None:
        return
    for c in (comp, getattr(ix, "compressor", None)):
        if c is not None:
            _fused_projection(c)


def _compressor_projection(comp: Compressor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Compressor.project for one token per row: kv [B, C], score [B, C] fp32."""
    fused = _fused_projection(comp)
    if fused is not None:
        return linear_f32(fused, x).split(comp.wkv.weight.shape[0], dim=-1)
    return linear_f32(comp.wkv, x), linear_f32(comp.wgate, x)


def _side_projections(attn: Attention, x: torch.Tensor, sparse: bool):
    """((kv, score) of the compressor, (kv, score) of the indexer's or None, the indexer's
    head weights [B, Hi] in x's dtype as weights_proj gives them, or None)."""
    if sparse:
        fused = _fused_side_rows(attn)
        if fused is not None:
            sizes = [lin.weight.shape[0] for lin in _side_parts(attn)]
            kv, score, ikv, iscore, w = linear_f32(fused, x).split(sizes, dim=-1)
            return (kv, score), (ikv, iscore), w.to(x.dtype)
        ix = attn.indexer
        return (_compressor_projection(attn.compressor, x),
                _compressor_projection(ix.compressor, x), ix.weights_proj(x))
    return _compressor_projection(attn.compressor, x), None, None


def _compress_step(comp: Compressor, ring_kv: torch.Tensor, ring_score: torch.Tensor,
                   projected: tuple[torch.Tensor, torch.Tensor], rows: _StepRows) -> torch.Tensor:
    """Write the token's projected row (kv, score) into its ring slot; return the entry
    p // r [B, D] fp32 pooled as it stands once this row is in, before its norm and RoPE
    (rows.entry(r): its index and whether it completes now)."""
    r = comp.ratio
    kv, score = projected
    pooled = rows.overlap_rows(r) if comp.overlap and not use_triton(kv) else None
    return compress_pool(kv, score, comp.ape, ring_kv, ring_score, rows.slots, rows.positions,
                         r, comp.overlap, pooled)  # [B, d] fp32


def _write_entry(dst: torch.Tensor, comp: Compressor, entry: torch.Tensor, rows: _StepRows,
                 qat: str | None, nope: int = 0) -> None:
    """dst[slots[b], j[b]] = the normed, roped (and QAT-rounded) entry where entry j[b] =
    p // r completes now (and j[b] < N); other rows write the scratch slot
    (rows.entry_target): one kernel, no gather + where."""
    tslot, jc = rows.entry_target(comp.ratio, dst.shape[1])
    _, cos, sin, _ = rows.entry(comp.ratio)
    write_cache_rows(dst, tslot, jc, entry, cos, sin, norm=(comp.norm.weight, comp.norm.eps),
                     qat=qat, nope=nope)


def _update_index_keys(ix: Indexer, pl: PoolLayer, projected, rows: _StepRows) -> None:
    """The indexer's compressor step and its key write (reads only x's projections and the
    pool)."""
    entry = _compress_step(ix.compressor, pl.index_kv, pl.index_score, projected, rows)
    _write_entry(pl.index_keys, ix.compressor, entry, rows, "fp4" if ix.config.qat else None)


def _index_select(ix: Indexer, pl: PoolLayer, q: torch.Tensor, w: torch.Tensor,
                  rows: _StepRows) -> torch.Tensor:
    """The selected entry indices [B, min(topk, N_max)] (-1 where fewer entries are
    visible), in ascending order, from the indexer queries and the updated keys."""
    scores = indexer_scores(q, pl.index_keys, rows.slots, rows.positions, w,
                            weight_scale=_weight_scale(ix))  # [B, N_max]
    # the top min(index_topk, N_max); an exact tie (ReLU zeros on every head are common)
    # goes to the earlier entry, the reference's stable-sort rule; -1 past the visible count
    return indexer_topk(scores, ix.config.index_topk)


def _update_entries(attn: Attention, pl: PoolLayer, projected, rows: _StepRows) -> None:
    """The attention compressor's step and its entry write (reads only x's projections and
    the pool)."""
    entry = _compress_step(attn.compressor, pl.comp_kv, pl.comp_score, projected, rows)
    _write_entry(pl.entries, attn.compressor, entry, rows, "fp8" if attn.config.qat else None,
                 attn.config.nope_head_dim)


def _wo_a_grouped(attn: Attention, out: torch.Tensor) -> torch.Tensor:
    """out [B, Hh, D] -> [B, G, o_lora]: group g of heads through wo_a rows g*o_lora.. ."""
    c = attn.config
    G, B = c.o_groups, out.shape[0]
    fmt = attn.wo_a.format
    if fp8_linear_grouped is not None and fmt == WeightFormat.FP8:
        return fp8_linear_grouped(out.reshape(B, G, -1), attn.wo_a.weight, attn.wo_a.scale,
                                  act_quant=act_quant_enabled())
    if fmt in GGML_BLOCKS:  # the GGUF's blocks as stored, never dequantised per call
        return ggml_linear_grouped(out.reshape(B, G, -1), attn.wo_a.weight, fmt)
    w = attn.wo_a.dense_weight(out.dtype).view(G, c.o_lora_rank, -1)  # [G, o_lora, Hh*D/G]
    return torch.einsum("bgi,gri->bgr", out.reshape(B, G, -1), w)


def attention_decode(attn: Attention, pl: PoolLayer, x: torch.Tensor,
                     rows: _StepRows) -> torch.Tensor:
    """x [B, H] (attn_norm'ed) -> [B, H]; reads and updates pool layer `pl` at rows.slots."""
    c = attn.config
    B = x.shape[0]
    slots, positions = rows.slots, rows.positions
    cos, sin = rows.rope(attn.ratio)  # [B, R/2]

    compressed = attn.ratio != RATIO_WINDOW and pl.entries.shape[1] > 0
    sparse = compressed and attn.ratio == RATIO_SPARSE
    # the compressors read only x: a side stream runs them beside the query / kv chain
    side = overlap.fork(x) if compressed else None
    with overlap.on(side):
        if compressed:
            comp_in, index_in, index_w = _side_projections(attn, x, sparse)
            _update_entries(attn, pl, comp_in, rows)
        if sparse:
            _update_index_keys(attn.indexer, pl, index_in, rows)

    fused = _fused_q_kv(attn)
    if fused is not None:  # wq_a and wkv read the same x: one GEMV
        qr, kv = fused(x).split(attn.wq_a.weight.shape[0], dim=-1)
    else:
        qr, kv = attn.wq_a(x), attn.wkv(x)
    qr = rmsnorm(qr, attn.q_norm.weight, attn.q_norm.eps)  # [B, Q]; the indexer's too
    q, index_q = _query_projections(attn, qr, sparse)
    # per-head RMSNorm without weight, rounded to x's dtype, then RoPE: one kernel
    q = rmsnorm_rope(q.view(B, attn.num_heads, attn.head_dim), None, cos, sin, c.rms_norm_eps)
    # kv_norm, RoPE, QAT's FP8 and the ring write: one kernel
    write_cache_rows(pl.window, slots, rows.ring(pl.window.shape[1]), kv, cos, sin,
                     norm=(attn.kv_norm.weight, attn.kv_norm.eps),
                     qat="fp8" if c.qat else None, nope=c.nope_head_dim)
    if sparse:  # Indexer.queries' q: roped (+ Hadamard and FP4 under QAT) fp32 [B, Hi, Di]
        ix = attn.indexer
        index_q = finish_rows(index_q.view(B, ix.num_heads, ix.head_dim), cos, sin,
                              qat="fp4" if c.qat else None)
    overlap.join(side)

    entries = entry_idx = None
    if compressed:
        entries = pl.entries
        if sparse:
            entry_idx = _index_select(attn.indexer, pl, index_q, index_w, rows)
        else:
            entry_idx = rows._get(("all_entries", attn.ratio, entries.shape[1]), lambda: (
                _visible_entries(entries.shape[1], attn.ratio, positions)))

    # V = K carried the keys' rotation: the kernel turns the output back by the query's
    out = decode_attention(q, pl.window, entries, slots, positions, entry_idx, attn.attn_sink,
                           attn.softmax_scale, rope=(cos, sin))
    return attn.wo_b(_wo_a_grouped(attn, out).flatten(1))


def _visible_entries(n: int, r: int, positions: torch.Tensor) -> torch.Tensor:
    """[B, n]: entry j where it is complete (j < (p + 1) // r), else -1 (ratio 128)."""
    all_j = torch.arange(n, device=positions.device)
    return torch.where(all_j < ((positions + 1) // r).unsqueeze(-1), all_j, -1)


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
        # one frequency table per ratio (layers of a ratio share it, and its cos / sin a step)
        self.inv_freq = {r: rope_inv_freq(c, r, device)
                         for r in {c.compress_ratio(i) for i in range(c.num_hidden_layers)}}
        for layer in model.layers:  # before any capture: the fused projections
            _fuse_projections(layer.attn)
            shared = getattr(layer.ffn, "shared_experts", None)
            if shared is not None:
                fuse_shared_expert(shared)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """ids, slots, positions [B] int64 -> logits [B, V] fp32. Writes the pool."""
        m, c = self.model, self.config
        device = m.embed.weight.device
        if not (ids.device == slots.device == positions.device == device):
            raise ValueError(f"ids, slots and positions must be on the model's device ({device})")
        rows = _StepRows(slots, positions, self.pool.scratch_slot, self.inv_freq)
        layers = m.layers
        h = m.embed(ids).unsqueeze(1).repeat(1, c.hc_mult, 1)  # [B, S, H]
        first = layers[0]
        # x below is always the sub-layer's normed input: the hc kernels apply attn_norm /
        # ffn_norm / the final norm themselves. A sub-layer's hc_post and the next one's
        # hc_pre are one fused pair of kernels (hc_post_pre): between attention and MoE and
        # between layers; the last layer's MoE output takes a plain hc_post before the head
        x, post, comb = hc_pre(h, first.hc_attn_fn, first.hc_attn_scale, first.hc_attn_base, c,
                               norm=_norm(first.attn_norm))
        for i, layer in enumerate(layers):
            y = attention_decode(layer.attn, self.pool.layers[i], x, rows)
            h, x, post, comb = hc_post_pre(y, h, post, comb, layer.hc_ffn_fn, layer.hc_ffn_scale,
                                           layer.hc_ffn_base, c, norm=_norm(layer.ffn_norm))
            y = layer.ffn(x.unsqueeze(1), ids.unsqueeze(1))[:, 0]
            if i + 1 < len(layers):
                nxt = layers[i + 1]
                h, x, post, comb = hc_post_pre(y, h, post, comb, nxt.hc_attn_fn,
                                               nxt.hc_attn_scale, nxt.hc_attn_base, c,
                                               norm=_norm(nxt.attn_norm))
            else:
                h = hc_post(y, h, post, comb)
        y = hc_head(h, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, c, norm=_norm(m.norm))
        return linear_f32(m.head, y)


def _norm(norm) -> tuple[torch.Tensor, float]:
    """An RMSNorm module as the hc kernels' norm argument."""
    return norm.weight, norm.eps
