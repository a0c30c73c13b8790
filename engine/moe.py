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

Fast path (`engine.kernels.use_triton(x)`, decode and small batches of at most
`FAST_MAX_TOKENS` tokens): routing in two Triton kernels (engine/kernels/moe_router.py:
scores, then top-k as Gate.pick), the routed experts in three (engine/kernels/
routed_experts.py) over the experts' weights stacked once per layer (`MoE.stack_experts`,
each expert's Linear then holds views of the stack), the shared expert through its Linears,
its output added by the last routed kernel. Nothing on that path reads a device value on
the host, so it can be captured in a CUDA graph. More tokens (prefill chunks) take the
grouped kernels (engine/kernels/grouped_experts.py: tokens sorted by expert, one tensor-core
tile per group of an expert's tokens), also without a host sync. Experts stored as FP8 have
no kernel and take the reference loop below, which stays as the oracle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine import overlap
from engine.config import ModelConfig
from engine.formats import WeightFormat
from engine.kernels import use_triton
from engine.linear import Linear, fused_rows

if TYPE_CHECKING:
    from engine.kernels.routed_experts import ExpertStack
# engine.kernels.routed_experts is imported where used: its Triton kernels are defined at
# import, and TRITON_INTERPRET (the CPU tests) must be set before that

# Above this many tokens (prefill) the per-pair GEMV kernels would read each expert's weights
# once per token that uses it; the grouped kernels read them once per tile of tokens.
FAST_MAX_TOKENS = 64


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
        return self.pick(F.softplus(logits).sqrt(), ids)

    def pick(self, scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores [N, E] fp32 (sqrt(softplus(logits))), ids [N] -> (weights, experts) [N, K];
        all on the device (a stable sort, a gather), no host sync."""
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
        return self.w2(self.hidden(x, weight)).float()

    def hidden(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """W2's input: (weight *) silu(g) * u, rounded to x.dtype -> [n, I]."""
        g = self.w1(x).float()  # [n, I]
        u = self.w3(x).float()
        if self.limit is not None:
            u = u.clamp(-self.limit, self.limit)
            g = g.clamp(max=self.limit)
        h = F.silu(g) * u
        if weight is not None:
            h = weight.unsqueeze(-1) * h
        return h.to(x.dtype)


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
        # One layer's routed experts stacked over E, built by stack_experts(). A plain
        # attribute, not a buffer: the Linears' parameters are views of it and state_dict()
        # must hold each tensor once.
        self.routed_stack: ExpertStack | None = None
        self._no_kernel = False  # the experts' format has none: stack_experts() said so

    # -- stacked experts (fast path) --------------------------------------------------------

    def stack_experts(self) -> bool:
        """Stack the routed experts' stored tensors ([E, 2I, .] for W1 then W3, [E, H, .] for
        W2) and make every expert's Linear parameters views of the stack, so memory is not
        doubled. Call once after loading, on the final device, before any CUDA graph
        capture. Returns False (nothing changed) when the experts' format has no kernel
        (FP8) or they are mixed. Moving the module afterwards breaks the views: call again."""
        from engine.kernels.routed_experts import SUPPORTED_FORMATS, ExpertStack

        experts = list(self.experts)
        if self._stack_current():
            # Already the experts' storage: stacking again would copy every expert and free
            # the old stack, which graphs captured before still read (a DecodeRunner stacks
            # on creation, and several may serve one model)
            return True
        fmt = experts[0].w1.format
        linears = [lin for e in experts for lin in (e.w1, e.w2, e.w3)]
        if fmt not in SUPPORTED_FORMATS or any(lin.format != fmt for lin in linears):
            self._no_kernel = True
            return False
        if any(lin.weight.is_meta for lin in linears):
            raise RuntimeError("stack_experts: the experts have no weights yet (meta tensors)")
        inter, H = experts[0].w1.out_features, experts[0].w1.in_features

        def stacked(field: str, projs: tuple[str, ...]) -> torch.Tensor | None:
            parts = [getattr(getattr(e, p), field) for p in projs for e in experts]
            if parts[0] is None:
                return None
            dtype = parts[0].dtype
            # torch.cat has no uint32 / float8_e8m0fnu kernels: copy the bytes as int32 / uint8
            raw = {torch.uint32: torch.int32, torch.float8_e8m0fnu: torch.uint8}.get(dtype, dtype)
            n, rows = len(experts), parts[0].shape[0]
            out = torch.empty((n, len(projs) * rows, *parts[0].shape[1:]), dtype=raw,
                              device=parts[0].device)
            for i, t in enumerate(parts):  # [E, 2I, .]: expert e's W1 rows, then its W3 rows
                out[i % n, (i // n) * rows : (i // n + 1) * rows].copy_(t.view(raw))
            return out.view(dtype)

        stack = ExpertStack(fmt, H, inter,
                            stacked("weight", ("w1", "w3")), stacked("scale", ("w1", "w3")),
                            stacked("zero", ("w1", "w3")),
                            stacked("weight", ("w2",)), stacked("scale", ("w2",)),
                            stacked("zero", ("w2",)))

        def part(t: torch.Tensor | None, e: int, rows: slice) -> torch.Tensor | None:
            return None if t is None else t[e, rows]

        for e, expert in enumerate(experts):
            for lin, t, s, z, rows in ((expert.w1, stack.w13, stack.scale13, stack.zero13, slice(0, inter)),
                                       (expert.w3, stack.w13, stack.scale13, stack.zero13, slice(inter, 2 * inter)),
                                       (expert.w2, stack.w2, stack.scale2, stack.zero2, slice(None))):
                lin._set(fmt, part(t, e, rows), part(s, e, rows), part(z, e, rows))
        self.routed_stack = stack
        return True

    def _stack_current(self) -> bool:
        """Whether routed_stack is still every expert's storage (first and last expert)."""
        stack = self.routed_stack
        if stack is None:
            return False
        first, last = self.experts[0], self.experts[-1]
        inter = stack.inter
        return (first.w1.weight.data_ptr() == stack.w13.data_ptr()
                and last.w3.weight.data_ptr() == stack.w13[-1, inter:].data_ptr()
                and last.w2.weight.data_ptr() == stack.w2[-1].data_ptr()
                and first.w1.weight.device == stack.w13.device)

    def _stack_ready(self, x: torch.Tensor) -> bool:
        """Whether the fast path can run: stacked (stacking now if not, outside a capture)
        and still the Linears' storage."""
        if self._no_kernel:
            return False
        if self.routed_stack is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("MoE.stack_experts() must run before CUDA graph capture")
            if not self.stack_experts():
                return False
        stack = self.routed_stack
        if self.experts[0].w1.weight.data_ptr() != stack.w13.data_ptr() or stack.w13.device != x.device:
            raise RuntimeError("the routed experts were moved or reloaded after stack_experts(); "
                               "call it again")
        return True

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] (ffn_norm'ed), ids [B, T] -> [B, T, H]; fp32 accumulation."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        if use_triton(flat) and self._stack_ready(flat):
            if flat.shape[0] <= FAST_MAX_TOKENS:
                return self._forward_fast(flat, ids.reshape(-1)).view(shape)
            return self._forward_grouped(flat, ids.reshape(-1)).view(shape)
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

    def _route_fast(self, flat: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate.route on the fast path: (weights, experts) [N, K], no host sync."""
        from engine.kernels.moe_router import route, route_topk

        gate, c = self.gate, self.gate.config
        pick = {"table": gate.tid2eid, "ids": ids} if gate.hash else {"bias": gate.bias}
        # the release's router is BF16: one kernel for decode; a prefill chunk's scores are
        # one fp32 GEMM instead (the kernel, 128 programs a token each reading two experts'
        # rows, took 1.2 ms a layer for 2,048 tokens on an H100; Gate.route's own GEMM)
        if gate.format == WeightFormat.DENSE and flat.shape[0] <= FAST_MAX_TOKENS:
            return route(flat, gate.weight, gate.topk, c.routed_scaling_factor,
                         c.norm_topk_prob, **pick)  # [N, K], as Gate.pick
        scores = F.softplus(F.linear(flat.float(), gate.dense_weight(torch.float32))).sqrt()
        return route_topk(scores, gate.topk, c.routed_scaling_factor, c.norm_topk_prob, **pick)

    def _forward_grouped(self, flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """flat [N, H], ids [N] -> [N, H] for prefill-sized N: tokens grouped by expert
        (engine/kernels/grouped_experts.py), each expert's weights read once per tile of
        its tokens; the shared expert through its Linears (FP8 GEMMs)."""
        from engine.kernels import grouped_experts as ge

        weights, experts = self._route_fast(flat, ids)
        y = ge.grouped_experts(flat, experts, weights, self.routed_stack, self.experts[0].limit)
        if self.shared_experts is not None:
            y += _shared_expert_fast(self.shared_experts, flat).float()
        return y.to(flat.dtype)

    def _forward_fast(self, flat: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """flat [N, H], ids [N] -> [N, H]: the forward above with no host sync."""
        from engine.kernels.routed_experts import routed_experts

        # the shared expert on a side stream, beside the router and the gate/up kernel
        shared = self.shared_experts
        side = None if shared is None else overlap.fork(flat)
        with overlap.on(side):
            shared_y = None if shared is None else _shared_expert_fast(shared, flat)  # [N, H]
        weights, experts = self._route_fast(flat, ids)
        # the routed sum + the shared output, rounded to x.dtype once, by the down kernel
        return routed_experts(flat, experts, weights, self.routed_stack, self.experts[0].limit,
                              out=flat.new_empty(flat.shape), add=shared_y,
                              before_down=None if shared is None else lambda: overlap.join(side))


def fuse_shared_expert(expert: Expert) -> Linear | None:
    """The shared expert's w1 and w3 rows as one Linear (engine.linear.fused_rows; None
    where their formats do not allow it). Made before any CUDA graph capture."""
    return fused_rows(expert, "_fast_w13", (expert.w1, expert.w3))


def _shared_expert_fast(expert: Expert, x: torch.Tensor) -> torch.Tensor:
    """Expert.forward's w2(hidden(x)) for the shared expert, x [N, H] -> [N, H] x.dtype: one
    GEMV over w1|w3, then w2's GEMV applying the SwiGLU as it reads (FP8; elsewhere one
    SwiGLU kernel) instead of three GEMVs and five elementwise ops."""
    if expert.limit is not None:
        return expert.w2(expert.hidden(x))
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        fused = expert.__dict__.get("_fast_w13")  # no new tensors inside a capture
    else:
        fused = fuse_shared_expert(expert)  # made once; checks it still views w1 and w3
    if fused is None:
        return expert.w2(expert.hidden(x))
    return expert.w2.forward_swiglu(fused(x))


def stack_all_experts(model: nn.Module) -> int:
    """MoE.stack_experts() on every MoE block of `model`; returns how many were stacked."""
    return sum(m.stack_experts() for m in model.modules() if isinstance(m, MoE))
