"""DeepSeek-V4 attention: sliding window + compressed entries (ratio 4 with indexer, or 128).

Every layer is MQA over ONE 512-d latent per position that is both key and value. A query
at position p attends to
  - the raw latents of the last `sliding_window` (128) positions <= p (ring in the cache);
  - ratio 128: every completed compressed entry j < (p+1)//128;
  - ratio 4:   the indexer's top-`index_topk` (512) of the completed entries j < (p+1)//4;
plus a learned per-head sink logit that only enlarges the softmax denominator.

A compressor turns each block of r tokens into one entry: per-token latents kv_t = x W_kv and
gate scores s_t = x W_gate + ape[p % r], softmax over the block's tokens PER CHANNEL, weighted
sum, RMSNorm, RoPE at position j*r. Ratio 4 overlaps: its projections are twice as wide and
entry j pools block j-1's first half of the channels with block j's second half (8 slots).
The indexer (ratio-4 layers) runs its own 128-d overlapping compressor for keys and scores
entry t for a query as sum_h w_h * relu(q_h . k_t); one index set serves all heads.

QAT (config.qat): DeepSeek trained with the KV's non-RoPE channels rounded through FP8 e4m3
(blocks of 64, power-of-two scales) and the indexer's q/k through a Hadamard rotation and
FP4 e2m1 (blocks of 32); the official inference code reproduces that rounding and so do we.
`transformers` omits it, so comparisons with it run with qat=False (spec section 7).

Fast path (`engine.kernels.use_triton`): a chunk's queries attend through the decode
attention kernel, each query token a row over the keys its mask allows (`key_indices`),
and the indexer scores entries through the decode indexer kernel the same way; the
reference below scores every key of the chunk in fp32 and masks (the oracle).

Shapes: B batch rows, T tokens per row, n valid tokens of one row, H hidden, Hh heads,
D head_dim (512), R rope dims (64), Q q_lora_rank, G o_groups, Hi/Di indexer heads/dim,
C compressor width (2D for ratio 4), N compressed entries visible so far.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from engine.cache import ForwardBatch, LayerState
from engine.config import (
    QAT_INDEXER_FP4_BLOCK,
    QAT_KV_FP8_BLOCK,
    RATIO_SPARSE,
    RATIO_WINDOW,
    ModelConfig,
)
from engine.kernels import use_triton
from engine.kernels.decode_attention import gathered_attention
from engine.kernels.indexer_scores import indexer_scores
from engine.linear import Linear
from engine.rope import apply_rope, rope_cos_sin, rope_inv_freq


def key_indices(allowed: torch.Tensor, max_keys: int) -> torch.Tensor:
    """allowed [n, M] bool -> int64 [n, min(M, max_keys)]: each row's allowed key indices in
    increasing order, then -1 (max_keys bounds every row's count; no host sync)."""
    order = torch.argsort((~allowed).to(torch.int8), dim=1, stable=True)[:, :max_keys]
    return torch.where(allowed.gather(1, order), order, -1)


# Queries scored at once in the reference attention and indexer: bounds the fp32 score
# tensor of a long prefill (64 heads x 256 queries x 4K keys = 256 MiB instead of 4 GiB).
QUERY_BLOCK = 256


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 with an fp32 copy of the weight."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# QAT rounding. Scales are powers of two (E8M0, as DeepSeek's ue8m0 activation scales): the
# smallest 2^k with amax / 2^k <= the format's max. amax is floored at 1e-4 like DeepSeek's
# act_quant so all-zero blocks do not divide by zero.
# ---------------------------------------------------------------------------------------------
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
_FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _pow2_scale(xb: torch.Tensor, fmt_max: float) -> torch.Tensor:
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    return torch.exp2(torch.ceil(torch.log2(amax / fmt_max)))


def fp8_roundtrip(x: torch.Tensor, block: int = QAT_KV_FP8_BLOCK) -> torch.Tensor:
    """Quantise x's last dim to e4m3 in blocks of `block` and back (fp32 math, x's dtype)."""
    xb = x.float().unflatten(-1, (-1, block))
    scale = _pow2_scale(xb, FP8_E4M3_MAX)
    q = (xb / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).flatten(-2).to(x.dtype)


def fp4_roundtrip(x: torch.Tensor, block: int = QAT_INDEXER_FP4_BLOCK) -> torch.Tensor:
    """Quantise x's last dim to e2m1 (nearest grid value) in blocks of `block` and back.
    An exact midpoint rounds toward zero here, where hardware rounds to even; random
    activations essentially never sit on one."""
    xb = x.float().unflatten(-1, (-1, block))
    scale = _pow2_scale(xb, FP4_E2M1_MAX)
    y = (xb / scale).clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX)
    grid = torch.tensor(_FP4_GRID, device=x.device)
    mids = (grid[1:] + grid[:-1]) / 2
    q = grid[torch.bucketize(y.abs(), mids)] * y.sign()
    return (q * scale).flatten(-2).to(x.dtype)


@functools.cache
def _hadamard(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:  # Sylvester construction, the order fast_hadamard_transform uses
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * n**-0.5).to(device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard transform of the last dim (a power of two), fp32."""
    return x.float() @ _hadamard(x.shape[-1], str(x.device))


# ---------------------------------------------------------------------------------------------
# Compressor: blocks of r tokens -> one entry (see the module docstring).
# ---------------------------------------------------------------------------------------------
class Compressor(nn.Module):
    def __init__(self, config: ModelConfig, ratio: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.ratio = ratio
        self.head_dim = head_dim
        self.overlap = ratio == RATIO_SPARSE
        width = 2 * head_dim if self.overlap else head_dim  # C
        self.wkv = Linear(config.hidden_size, width, dtype=dtype)
        self.wgate = Linear(config.hidden_size, width, dtype=dtype)
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(head_dim, config.rms_norm_eps, dtype)

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rows, fp32: kv [B, T, C] and gate score [B, T, C] (with ape[p % r])."""
        xf = x.float()
        kv = self.wkv(xf)
        score = self.wgate(xf) + self.ape[positions % self.ratio]
        return kv, score

    def compress_row(
        self,
        kv: torch.Tensor,  # [n, C] rows of positions start..start+n-1
        score: torch.Tensor,  # [n, C]
        start: int,
        ring_kv: torch.Tensor,  # [Rg, C] rows of earlier positions, slot p % Rg (updated)
        ring_score: torch.Tensor,
    ) -> torch.Tensor:
        """The entries completed by this chunk, [m, D] fp32 (normed, roped, before QAT)."""
        r, d, n = self.ratio, self.head_dim, kv.shape[0]
        rg = ring_kv.shape[0]
        j_lo, j_hi = start // r, (start + n) // r  # entry j completes at position j*r + r - 1
        m = j_hi - j_lo
        entries = kv.new_zeros(0, d)
        if m > 0:
            first = (j_lo - 1) * r if self.overlap else j_lo * r  # first position pooled
            old = torch.arange(max(first, 0), start, device=kv.device) % rg
            used = j_hi * r - start
            rows_kv = torch.cat([ring_kv[old], kv[:used]])
            rows_sc = torch.cat([ring_score[old], score[:used]])
            if first < 0:  # entry 0 of an overlapping compressor: no previous block
                rows_kv = torch.cat([rows_kv.new_zeros(r, rows_kv.shape[1]), rows_kv])
                rows_sc = torch.cat(
                    [rows_sc.new_full((r, rows_sc.shape[1]), float("-inf")), rows_sc]
                )
            if self.overlap:
                bkv, bsc = rows_kv.view(m + 1, r, 2 * d), rows_sc.view(m + 1, r, 2 * d)
                pool_kv = torch.cat([bkv[:-1, :, :d], bkv[1:, :, d:]], dim=1)  # [m, 2r, D]
                pool_sc = torch.cat([bsc[:-1, :, :d], bsc[1:, :, d:]], dim=1)
            else:
                pool_kv, pool_sc = rows_kv.view(m, r, d), rows_sc.view(m, r, d)
            entries = (pool_kv * pool_sc.softmax(dim=1)).sum(dim=1)  # [m, D]
            entries = self.norm(entries)
            inv_freq = rope_inv_freq(self.config, self.ratio, kv.device)
            cos, sin = rope_cos_sin(inv_freq, torch.arange(j_lo, j_hi, device=kv.device) * r)
            entries = apply_rope(entries, cos, sin)
        k = min(n, rg)
        slots = torch.arange(start + n - k, start + n, device=kv.device) % rg
        ring_kv[slots] = kv[n - k :]
        ring_score[slots] = score[n - k :]
        return entries


# ---------------------------------------------------------------------------------------------
# Indexer (ratio-4 layers): chooses which compressed entries each query attends to.
# ---------------------------------------------------------------------------------------------
class Indexer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.wq_b = Linear(config.q_lora_rank, self.num_heads * self.head_dim, dtype=dtype)
        self.weights_proj = Linear(config.hidden_size, self.num_heads, dtype=dtype)
        self.compressor = Compressor(config, RATIO_SPARSE, self.head_dim, dtype)

    def queries(
        self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, Hi, Di] (roped, QAT) and head weights w [B, T, Hi] (fp32)."""
        B, T, _ = x.shape
        q = self.wq_b(qr).view(B, T, self.num_heads, self.head_dim)
        q = apply_rope(q, cos.unsqueeze(2), sin.unsqueeze(2)).float()
        if self.config.qat:
            q = fp4_roundtrip(hadamard(q))
        # relu(q.k) is scaled by Di^-0.5 and the head weights by Hi^-0.5 (DeepSeek's scales)
        w = self.weights_proj(x).float() * (self.head_dim**-0.5 * self.num_heads**-0.5)
        return q, w

    def select_row(
        self,
        st: LayerState,
        q: torch.Tensor,  # [n, Hi, Di]
        w: torch.Tensor,  # [n, Hi]
        kv: torch.Tensor,  # [n, 2Di] indexer compressor rows
        score: torch.Tensor,
        start: int,
        positions: torch.Tensor,  # [n]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Updates the indexer keys; returns (selected [n, N] bool, scores [n, N] fp32)."""
        r = RATIO_SPARSE
        new = self.compressor.compress_row(kv, score, start, st.index_kv, st.index_score)
        if self.config.qat:
            new = fp4_roundtrip(hadamard(new))
        n_entries = (start + q.shape[0]) // r  # N
        st.index_keys[start // r : n_entries] = new.to(st.index_keys.dtype)
        if use_triton(q):  # the decode kernel, each query token a row of one slot
            rows = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
            scores = indexer_scores(q, st.index_keys[None, :n_entries], rows, positions, w)
        else:
            keys = st.index_keys[:n_entries].float()  # [N, Di]
            scores = torch.cat(
                [
                    (torch.einsum("nhd,td->nht", qb, keys).relu() * wb.unsqueeze(-1)).sum(dim=1)
                    for qb, wb in zip(q.split(QUERY_BLOCK), w.split(QUERY_BLOCK), strict=True)
                ]
            )  # [n, N]
        visible = torch.arange(n_entries, device=q.device) < ((positions + 1) // r).unsqueeze(-1)
        scores = scores.masked_fill(~visible, float("-inf"))
        # exact ties are common (ReLU zeros on every head); a stable sort gives them to the
        # earlier entry, so the selection cannot depend on how a prompt was chunked
        # (DeepSeek's top-k kernel leaves tie order unspecified: any fixed rule is faithful)
        top = scores.sort(dim=-1, descending=True, stable=True).indices[:, : self.config.index_topk]
        selected = torch.zeros_like(visible).scatter_(1, top, True) & visible
        return selected, scores


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.config = c
        self.layer_id = layer_id
        self.ratio = c.compress_ratio(layer_id)
        self.num_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.softmax_scale = c.head_dim**-0.5  # no YaRN mscale (DeepSeek)
        self.wq_a = Linear(c.hidden_size, c.q_lora_rank, dtype=dtype)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype)
        self.wq_b = Linear(c.q_lora_rank, c.num_attention_heads * c.head_dim, dtype=dtype)
        self.wkv = Linear(c.hidden_size, c.head_dim, dtype=dtype)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        # grouped output projection: each group of Hh/G heads (Hh*D/G wide) -> o_lora_rank
        self.wo_a = Linear(
            c.num_attention_heads * c.head_dim // c.o_groups,
            c.o_groups * c.o_lora_rank,
            dtype=dtype,
        )
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, c.hidden_size, dtype=dtype)
        self.attn_sink = nn.Parameter(
            torch.empty(c.num_attention_heads, dtype=torch.float32), requires_grad=False
        )
        if self.ratio != RATIO_WINDOW:
            self.compressor = Compressor(c, self.ratio, c.head_dim, dtype)
        if self.ratio == RATIO_SPARSE:
            self.indexer = Indexer(c, dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [B, T, H] (attn_norm'ed) -> [B, T, H]; reads and updates the layer's state."""
        c = self.config
        B, T, _ = x.shape
        pos = batch.positions  # [B, T]
        cos, sin = rope_cos_sin(rope_inv_freq(c, self.ratio, x.device), pos)  # [B, T, R/2]
        cos_h, sin_h = cos.unsqueeze(2), sin.unsqueeze(2)

        qr = self.q_norm(self.wq_a(x))  # [B, T, Q]; also the indexer's input
        q = self.wq_b(qr).view(B, T, self.num_heads, self.head_dim)  # [B, T, Hh, D]
        qf = q.float()
        q = (qf * torch.rsqrt(qf.square().mean(-1, keepdim=True) + c.rms_norm_eps)).to(x.dtype)
        q = apply_rope(q, cos_h, sin_h)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B, T, D]
        if c.qat:
            kv = torch.cat(
                [fp8_roundtrip(kv[..., : c.nope_head_dim]), kv[..., c.nope_head_dim :]], -1
            )

        if self.ratio != RATIO_WINDOW:
            ckv, csc = self.compressor.project(x, pos)  # [B, T, C] fp32
        if self.ratio == RATIO_SPARSE:
            # the indexer's queries use the same compressed-layer (YaRN) rotation as q
            iq, iw = self.indexer.queries(x, qr, cos, sin)
            ikv, isc = self.indexer.compressor.project(x, pos)

        out = torch.zeros_like(q)
        for b, st in enumerate(batch.layer_states(self.layer_id)):
            n, s = batch.counts[b], batch.starts[b]
            if n == 0:
                continue
            p = pos[b, :n]
            keys, allowed = self._window_row(st, kv[b, :n], s, p)
            if self.ratio != RATIO_WINDOW:
                new = self.compressor.compress_row(
                    ckv[b, :n], csc[b, :n], s, st.comp_kv, st.comp_score
                )
                if c.qat:
                    new = torch.cat(
                        [fp8_roundtrip(new[:, : c.nope_head_dim]), new[:, c.nope_head_dim :]], -1
                    )
                n_entries = (s + n) // self.ratio  # N
                st.entries[s // self.ratio : n_entries] = new.to(st.entries.dtype)
                entries = st.entries[:n_entries]
                visible = torch.arange(n_entries, device=x.device) < (
                    (p + 1) // self.ratio
                ).unsqueeze(-1)
                if self.ratio == RATIO_SPARSE:
                    visible, _ = self.indexer.select_row(
                        st, iq[b, :n], iw[b, :n], ikv[b, :n], isc[b, :n], s, p
                    )
                keys = torch.cat([keys, entries])
                allowed = torch.cat([allowed, visible], dim=1)
            if use_triton(q):  # the decode kernel, each query token a row
                bound = self._max_keys(n_entries if self.ratio != RATIO_WINDOW else 0)
                out[b, :n] = gathered_attention(q[b, :n], keys.to(q.dtype),
                                                key_indices(allowed, bound), self.attn_sink,
                                                self.softmax_scale)
            else:
                out[b, :n] = self._attend(q[b, :n], keys, allowed)

        out = apply_rope(out, cos_h, sin_h, inverse=True)  # V = K carried the keys' rotation
        G = c.o_groups
        wo_a = self.wo_a.dense_weight(out.dtype).view(G, c.o_lora_rank, -1)  # [G, o_lora, Hh*D/G]
        o = torch.einsum("btgi,gri->btgr", out.reshape(B, T, G, -1), wo_a)
        return self.wo_b(o.flatten(2))

    def _max_keys(self, n_entries: int) -> int:
        """The most keys one query can be allowed: its window, plus every visible entry
        (ratio 128) or the indexer's top-k of them (ratio 4)."""
        W = self.config.sliding_window
        if self.ratio == RATIO_SPARSE:
            return W + min(self.config.index_topk, n_entries)
        return W + n_entries

    def _window_row(
        self, st: LayerState, kv: torch.Tensor, start: int, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of positions max(0, start-W+1) .. start+n-1 and the [n, keys] window mask;
        writes the chunk's last W latents into the ring (slot p % W)."""
        W, n = st.window.shape[0], kv.shape[0]
        lo = max(0, start - W + 1)
        old = torch.arange(lo, start, device=kv.device)
        keys = torch.cat([st.window[old % W], kv.to(st.window.dtype)])
        key_pos = torch.arange(lo, start + n, device=kv.device)
        delta = positions.unsqueeze(-1) - key_pos  # query pos - key pos
        allowed = (delta >= 0) & (delta < W)
        k = min(n, W)
        st.window[torch.arange(start + n - k, start + n, device=kv.device) % W] = kv[n - k :].to(
            st.window.dtype
        )
        return keys, allowed

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q [n, Hh, D], keys [M, D] (also the values), allowed [n, M] -> [n, Hh, D]."""
        kf = keys.float()
        out = []
        for qb, ab in zip(q.split(QUERY_BLOCK), allowed.split(QUERY_BLOCK), strict=True):
            scores = torch.einsum("nhd,md->hnm", qb.float(), kf) * self.softmax_scale
            scores = scores.masked_fill(~ab, float("-inf"))
            # the sink is one extra logit per head whose value is dropped: it only adds
            # exp(sink - max) to the denominator, letting a head attend to "nothing"
            sink = self.attn_sink.float().view(-1, 1, 1).expand(-1, qb.shape[0], 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
            out.append(torch.einsum("hnm,md->nhd", probs, kf))
        return torch.cat(out).to(q.dtype)
