"""DeepSeek-V4-Flash in plain PyTorch: the reference forward of the embedded engine.

What this file (with attention.py, moe.py, rope.py, cache.py) owns: the module tree whose
attribute paths ARE the official checkpoint tensor names (`embed.weight`,
`layers.{L}.attn.wq_a.weight`, `layers.{L}.attn.compressor.wkv.weight`,
`layers.{L}.attn.indexer.wq_b.weight`, `layers.{L}.ffn.gate.{weight,bias,tid2eid}`,
`layers.{L}.ffn.experts.{E}.w1.weight`, `layers.{L}.ffn.shared_experts.w1.weight`,
`layers.{L}.hc_attn_fn`, `hc_head_fn`, `norm.weight`, `head.weight`, `mtp.0.e_proj.weight`,
...), so `model.state_dict()` keys equal the official names minus the FP8/FP4 `.scale`
tensors, which `engine.linear.Linear` owns. Every projection is an `engine.linear.Linear`
and stays in its checkpoint format; this file only calls it.

What it deliberately does not do: Triton kernels (the hyper-connection ops go through
engine/kernels/hc.py's switch, whose reference path is this file's hc functions), CUDA
graphs, paging, sampling, weight loading (engine/weights.py), FP8 activation quantisation
inside the Linear layers (spec section 6: we run BF16 activations; the Linear may emulate
more later), training, tensor parallelism, and V4-Flash-0731's DSpark drafter (its `mtp.*`
tensors beyond block 0 are not modelled). It is a slow, readable oracle: attention loops over batch rows because each
row has its own cache.

Public API (kept stable for the weights/runtime code):

    from engine.config import ModelConfig
    from engine.model import Transformer
    from engine.cache import BatchState

    cfg = ModelConfig.from_json(ckpt_dir)        # or ModelConfig.tiny() / .flash()
    with torch.device("meta"):                    # build without allocating (optional)
        model = Transformer(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cuda"); <engine.weights loads state_dict>   # or
    model = Transformer(cfg, dtype=torch.float32).init_random_(seed=0)  # tests

    state = model.new_state(batch_size=2, max_len=4096)   # BatchState, one row per sequence
    logits = model(tokens, state)                 # tokens [B, T] int64 -> logits [B, T, V] fp32
    logits = model(tokens, state, num_tokens=[5, 3])  # right-padded rows: row b has
                                                  # num_tokens[b] valid tokens (others ignored,
                                                  # their logits are garbage)
    last = model(tokens, state, num_tokens=n, last_only=True)     # [B, V]: each row's last
    logits, hidden = model(tokens, state, return_hidden=True)     # hidden [B, T, S, H]
    draft = model.forward_mtp(next_tokens, hidden, state, num_tokens=n, last_only=True)

Positions come from the state: row b's tokens sit at positions state[b].length + t, and
each call advances state[b].length by num_tokens[b]. Any chunking gives the same result to
fp rounding (one prefill, chunked prefill, prefill after a cached prefix, single-token
decode), and a batch gives the same result as its rows run alone. Sequences join or leave a
batch by building a new `BatchState` from `SequenceState`s (`state.select(rows)`,
`SequenceState.new(cfg, max_len, device, dtype)`); `SequenceState.clone()` forks one.
Internally the model turns (state, num_tokens) into an explicit `cache.ForwardBatch`
(starts, counts, positions) passed to every layer. `forward_mtp(next_tokens, hidden, ...)` runs
the MTP block on (token_{p+1}, main hidden state at p) for positions starting at
state[b].mtp_length, with its own window cache, and returns draft logits for position p+2.
The QAT rounding (FP8 KV, Hadamard + FP4 indexer) follows `config.qat` (default True; False
matches `transformers`). Top-k ties (indexer, router) go to the lower index, so a batch's
shape or chunking never changes a selection; near-ties still follow fp rounding.

Shape letters: B batch rows, T tokens per row, S = hc_mult (4) residual streams, H hidden
(4096), V vocab, M = (2+S)*S hyper-connection mix size (24).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import Attention, RMSNorm
from engine.cache import BatchState, ForwardBatch
from engine.config import ModelConfig
from engine.kernels import hc as hc_ops
from engine.linear import Linear
from engine.moe import MoE


# ---------------------------------------------------------------------------------------------
# Hyper-connections (mHC). The residual is S = 4 parallel copies ("streams") of the hidden
# state. Before each sub-layer a small linear map of the RMS-normalised, flattened streams
# (fn [M, S*H], then per-group scale and per-value base) yields
#   pre[S]:    sigmoid(.) + eps     -- weights that collapse the S streams into the input x;
#   post[S]:   2 * sigmoid(.)       -- how much of the sub-layer output each stream receives;
#   comb[S,S]: softmax rows + eps, then Sinkhorn (20 iterations of column/row normalisation)
#              makes it doubly stochastic, so mixing the residual streams neither grows nor
#              shrinks them across 43 layers.
# After the sub-layer: h_new[k] = post[k] * y + sum_j comb[j, k] * res[j]. All of this is
# fp32; the streams are stored in the activation dtype between sub-layers.
# ---------------------------------------------------------------------------------------------
def _hc_logits(h: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, T, S, H] -> fn . flatten(h) / rms(flatten(h)), fp32 [B, T, fn rows]."""
    xf = h.flatten(2).float()
    return F.linear(xf, fn.float()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)


def hc_mix(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, c: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre [B, T, S], post [B, T, S], comb [B, T, S, S] (comb[j, k]: stream j -> k)."""
    s = c.hc_mult
    mixes = _hc_logits(h, fn, c.rms_norm_eps)  # [B, T, M]
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mixes[..., :s] * scale[0] + base[:s]) + c.hc_eps
    post = 2 * torch.sigmoid(mixes[..., s : 2 * s] * scale[1] + base[s : 2 * s])
    comb = (mixes[..., 2 * s :] * scale[2] + base[2 * s :]).unflatten(-1, (s, s))
    comb = comb.softmax(dim=-1) + c.hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + c.hc_eps)
    for _ in range(c.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + c.hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + c.hc_eps)
    return pre, post, comb


def hc_collapse(h: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """sum_j pre[j] * h[j]: [B, T, S, H] -> [B, T, H] in h's dtype."""
    return (pre.unsqueeze(-1) * h.float()).sum(dim=2).to(h.dtype)


def hc_expand(
    y: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """h_new[k] = post[k] * y + sum_j comb[j, k] * res[j]: -> [B, T, S, H] in res's dtype."""
    mixed = torch.einsum("btjk,btjh->btkh", comb, res.float())
    return (post.unsqueeze(-1) * y.float().unsqueeze(2) + mixed).to(res.dtype)


def _f32(*shape: int) -> nn.Parameter:
    """An fp32 parameter (hc math runs in fp32), filled by the loader."""
    return nn.Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)


def hc_head_params(c: ModelConfig) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """hc_head_fn [S, S*H], hc_head_base [S], hc_head_scale [1]: the main model's and MTP's."""
    return _f32(c.hc_mult, c.hc_mult * c.hidden_size), _f32(c.hc_mult), _f32(1)


def hc_head(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, c: ModelConfig
) -> torch.Tensor:
    """The head's collapse: pre = sigmoid(mix * scale + base) + eps, y = sum pre[j] h[j]."""
    mixes = _hc_logits(h, fn, c.rms_norm_eps)  # [B, T, S]
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + c.hc_eps
    return hc_collapse(h, pre)


def hc_head_tokens(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, c: ModelConfig
) -> torch.Tensor:
    """hc_head through the kernel switch: [B, T, S, H] -> [B, T, H]."""
    B, T, S, H = h.shape
    return hc_ops.hc_head(h.reshape(B * T, S, H), fn, scale, base, c).view(B, T, H)


# ---------------------------------------------------------------------------------------------
# Block: the same for all 43 layers and the MTP block. Each sub-layer reads the collapsed
# streams through its RMSNorm and writes back through hc_expand:
#   res = h; x = hc_collapse(h); x = Attention(attn_norm(x)); h = hc_expand(x, res)
#   res = h; x = hc_collapse(h); x = MoE(ffn_norm(x), ids);   h = hc_expand(x, res)
# ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.config = c
        self.layer_id = layer_id
        self.attn = Attention(layer_id, c, dtype)
        self.ffn = MoE(layer_id, c, dtype)
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        mix, width = c.hc_mix_dim, c.hc_mult * c.hidden_size
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _f32(mix, width), _f32(mix), _f32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _f32(mix, width), _f32(mix), _f32(3)

    def forward(self, h: torch.Tensor, ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """h [B, T, S, H], ids [B, T] -> [B, T, S, H]. The hc ops (kernels.hc: the fused
        kernels or hc_mix/hc_collapse/hc_expand above) see the B*T tokens as one axis."""
        c = self.config
        B, T, S, H = h.shape
        h = h.reshape(B * T, S, H)
        x, post, comb = hc_ops.hc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, c)
        x = self.attn(self.attn_norm(x.view(B, T, H)), batch)  # [B, T, H]
        h, x, post, comb = hc_ops.hc_post_pre(  # hc_post, then the ffn's hc_pre, fused
            x.reshape(B * T, H), h, post, comb, self.hc_ffn_fn, self.hc_ffn_scale,
            self.hc_ffn_base, c,
        )  # fmt: skip
        x = self.ffn(self.ffn_norm(x.view(B, T, H)), ids)
        return hc_ops.hc_post(x.reshape(B * T, H), h, post, comb).view(B, T, S, H)


# ---------------------------------------------------------------------------------------------
# MTP block: drafts the token after next. Its input mixes the embedding of the next token
# with the main model's final streams at the current position,
#   x = e_proj(enorm(embed(token_{p+1}))) + h_proj(hnorm(h_p))   (per stream),
# then runs one ratio-0 Block and its own head collapse/norm, sharing embed and head.
# ---------------------------------------------------------------------------------------------
class MTPBlock(Block):
    def __init__(self, layer_id: int, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__(layer_id, config, dtype)
        c = config
        self.e_proj = Linear(c.hidden_size, c.hidden_size, dtype=dtype)
        self.h_proj = Linear(c.hidden_size, c.hidden_size, dtype=dtype)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = hc_head_params(c)

    def forward(  # type: ignore[override]
        self, e: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """e = embed(next tokens) [B, T, H], hidden [B, T, S, H] -> collapsed, normed [B, T, H]."""
        x = self.e_proj(self.enorm(e)).unsqueeze(2) + self.h_proj(self.hnorm(hidden))
        h = super().forward(x.to(e.dtype), ids, batch)
        return self.norm(
            hc_head_tokens(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.config)
        )


# ---------------------------------------------------------------------------------------------
# The model: embed -> S copies -> 43 Blocks -> head collapse -> norm -> head (fp32 logits).
# ---------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        c = config
        self.config = c
        self.dtype = dtype  # activation dtype; bf16 for real checkpoints, fp32 for comparisons
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, c, dtype) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.head = Linear(c.hidden_size, c.vocab_size, dtype=dtype)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = hc_head_params(c)
        self.mtp = nn.ModuleList(
            MTPBlock(c.num_hidden_layers + i, c, dtype) for i in range(c.num_nextn_predict_layers)
        )
        self.embed.weight.requires_grad_(False)

    def new_state(self, batch_size: int, max_len: int, device=None) -> BatchState:
        device = device if device is not None else self.embed.weight.device
        return BatchState.new(self.config, batch_size, max_len, device, self.dtype)

    def _batch(
        self, tokens: torch.Tensor, state: BatchState, num_tokens, lengths: list[int]
    ) -> ForwardBatch:
        B, T = tokens.shape
        if len(state) != B:
            raise ValueError(f"state has {len(state)} sequences but tokens has {B} rows")
        if num_tokens is None:
            counts = [T] * B
        else:
            counts = [
                int(n) for n in (num_tokens.tolist() if torch.is_tensor(num_tokens) else num_tokens)
            ]
        if len(counts) != B or any(not 0 <= n <= T for n in counts):
            raise ValueError(
                f"num_tokens must give 0..{T} valid tokens for each of {B} rows, got {counts}"
            )
        for b, (s, n) in enumerate(zip(lengths, counts, strict=True)):
            if s + n > state[b].max_len:
                raise ValueError(
                    f"row {b}: position {s + n - 1} exceeds the state's max_len {state[b].max_len}"
                )
        starts = torch.tensor(lengths, dtype=torch.int64, device=tokens.device)
        positions = starts.unsqueeze(1) + torch.arange(T, device=tokens.device)
        return ForwardBatch(state, list(lengths), counts, positions)

    def _logits(self, y: torch.Tensor, batch: ForwardBatch, last_only: bool) -> torch.Tensor:
        if last_only:
            last = torch.tensor([max(n - 1, 0) for n in batch.counts], device=y.device)
            y = y[torch.arange(y.shape[0], device=y.device), last]  # [B, H]
        return self.head(y.float())  # fp32 logits

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        state: BatchState,
        num_tokens: Sequence[int] | torch.Tensor | None = None,
        *,
        last_only: bool = False,
        return_hidden: bool = False,
    ):
        """tokens [B, T] -> logits [B, T, V] ([B, V] if last_only), and hidden [B, T, S, H]
        (the final streams, the MTP block's input) if return_hidden. Advances the state."""
        batch = self._batch(tokens, state, num_tokens, state.lengths)
        c = self.config
        h = self.embed(tokens).unsqueeze(2).repeat(1, 1, c.hc_mult, 1)  # [B, T, S, H]
        for layer in self.layers:
            h = layer(h, tokens, batch)
        y = self.norm(hc_head_tokens(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c))
        for seq, n in zip(state.seqs, batch.counts, strict=True):
            seq.length += n
        logits = self._logits(y, batch, last_only)
        return (logits, h) if return_hidden else logits

    @torch.no_grad()
    def forward_mtp(
        self,
        next_tokens: torch.Tensor,
        hidden: torch.Tensor,
        state: BatchState,
        num_tokens: Sequence[int] | torch.Tensor | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """MTP draft logits. next_tokens [B, T] = token p+1 for positions p of `hidden`
        [B, T, S, H] (the main model's return_hidden output at p); positions start at each
        sequence's mtp_length, which advances by num_tokens."""
        if not len(self.mtp):
            raise ValueError("config has num_nextn_predict_layers = 0: no MTP block")
        batch = self._batch(next_tokens, state, num_tokens, state.mtp_lengths)
        y = self.mtp[0](self.embed(next_tokens), hidden, next_tokens, batch)
        for seq, n in zip(state.seqs, batch.counts, strict=True):
            seq.mtp_length += n
        return self._logits(y, batch, last_only)

    # -----------------------------------------------------------------------------------------
    # random weights for tests and make_checkpoint (the real ones come from engine.weights)
    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_random_(self, seed: int = 0) -> Transformer:
        """Deterministic random weights with O(1) activations everywhere: matrices ~
        N(0, 1/in), norm weights ~ 1 + N(0, 0.1), hc bases/scales and sinks of order one,
        distinct hash-routing experts per token. Same values on any device."""
        g = torch.Generator().manual_seed(seed)
        c = self.config

        def randn(shape, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
            return torch.randn(shape, generator=g) * std + mean

        for name, p in sorted(self.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 2 and leaf in ("weight", "hc_attn_fn", "hc_ffn_fn", "hc_head_fn"):
                value = randn(p.shape, p.shape[1] ** -0.5)
            elif leaf == "weight":  # RMSNorm
                value = randn(p.shape, 0.1, 1.0)
            elif leaf.endswith("_scale"):
                value = randn(p.shape, 0.2, 1.0)
            elif leaf.endswith("_base") or leaf == "ape":
                value = randn(p.shape, 0.5)
            elif leaf == "attn_sink":
                value = randn(p.shape, 1.0)
            elif leaf == "bias":  # router bias: steers selection only
                value = randn(p.shape, 0.1)
            else:
                raise ValueError(f"init_random_ has no rule for parameter {name}")
            p.copy_(value.to(p.dtype))
        for name, buf in self.named_buffers():
            if name.endswith("tid2eid"):
                ranks = torch.rand(c.vocab_size, c.n_routed_experts, generator=g)
                buf.copy_(ranks.argsort(dim=-1)[:, : c.num_experts_per_tok])
        return self
