"""DeepSeek-V4 mixture of experts: routed SwiGLU experts (clamped), one shared expert.

Every layer is MoE. Router scores are sqrt(softplus(x W_gate)) in fp32. Which K experts a
token uses comes either from a fixed table (`tid2eid[token_id]`, the first
`num_hash_layers` = 3 layers: "hash routing") or from top-K of score + bias (the bias steers
selection only, DeepSeek's aux-loss-free balancing). The weights are the unbiased scores of
the chosen experts normalised to sum 1, times `routed_scaling_factor` (1.5 in V4-Flash).

Expert e: g = x W1_e, u = x W3_e in fp32; routed experts clamp u to [-10, 10] and g to <= 10
(`swiglu_limit`), y = W2_e (weight * silu(g) * u). The routing weight multiplies BEFORE W2,
as DeepSeek does (it matters once W2's input is rounded to bf16/FP8). The shared expert is
the same SwiGLU with no clamp: DeepSeek's code does not clamp it; `transformers` does (spec
section 7), and we follow DeepSeek.

Shapes: N tokens (B*T flattened), H hidden, I moe_intermediate_size, E routed experts,
K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.linear import Linear


class Gate(Linear):
    """Router: weight [E, H] (a BF16 matrix in the checkpoint, hence a Linear) plus either
    `tid2eid` [V, K] int64 (hash layers) or `bias` [E] fp32 (learned layers)."""

    def __init__(self, layer_id: int, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__(config.hidden_size, config.n_routed_experts, dtype=dtype)
        self.config = config
        self.topk = config.num_experts_per_tok
        self.hash = config.is_hash_layer(layer_id)
        if self.hash:
            self.register_buffer(
                "tid2eid", torch.empty(config.vocab_size, self.topk, dtype=torch.int64)
            )
        else:
            self.bias = nn.Parameter(
                torch.empty(config.n_routed_experts, dtype=torch.float32), requires_grad=False
            )

    def route(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], ids [N] -> (weights [N, K] fp32, experts [N, K] int64)."""
        logits = F.linear(x.float(), self.dense_weight(torch.float32))  # [N, E]
        scores = F.softplus(logits).sqrt()
        if self.hash:
            experts = self.tid2eid[ids]
        else:
            # stable sort: an exact tie goes to the lower expert id whatever the batch shape
            biased = scores + self.bias
            experts = biased.sort(dim=-1, descending=True, stable=True).indices[:, : self.topk]
        weights = scores.gather(1, experts)
        if self.config.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.config.routed_scaling_factor, experts


class Expert(nn.Module):
    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype, limit: float | None) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim, dtype=dtype)
        self.w2 = Linear(inter_dim, dim, dtype=dtype)
        self.w3 = Linear(dim, inter_dim, dtype=dtype)
        self.limit = limit  # None for the shared expert

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, H], weight [n] fp32 or None -> [n, H] fp32."""
        g = self.w1(x).float()  # [n, I]
        u = self.w3(x).float()
        if self.limit is not None:
            u = u.clamp(-self.limit, self.limit)
            g = g.clamp(max=self.limit)
        h = F.silu(g) * u
        if weight is not None:
            h = weight.unsqueeze(-1) * h
        return self.w2(h.to(x.dtype)).float()


class MoE(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.num_experts = c.n_routed_experts
        self.gate = Gate(layer_id, c, dtype)
        self.experts = nn.ModuleList(
            Expert(c.hidden_size, c.moe_intermediate_size, dtype, c.swiglu_limit)
            for _ in range(c.n_routed_experts)
        )
        self.shared_experts = (
            Expert(c.hidden_size, c.moe_intermediate_size, dtype, None)
            if c.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] (ffn_norm'ed), ids [B, T] -> [B, T, H]; fp32 accumulation."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        weights, experts = self.gate.route(flat, ids.reshape(-1))  # [N, K]
        y = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        # plain reference loop: one gather per expert that received tokens (a token lists an
        # expert at most once, so `tok` has no repeats and += needs no accumulating scatter)
        for e in torch.unique(experts).tolist():
            tok, slot = torch.where(experts == e)
            y[tok] += self.experts[e](flat[tok], weights[tok, slot])
        if self.shared_experts is not None:
            y += self.shared_experts(flat)
        return y.to(x.dtype).view(shape)
