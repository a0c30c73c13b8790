"""Build `transformers`' DeepseekV4ForCausalLM from an engine config and copy engine weights in.

The two layouts differ only in names and in how experts are stored (`transformers` stacks
them: gate_up_proj [E, 2I, H] = cat(w1, w3), down_proj [E, H, I] = w2). The renames below are
the inverse of `transformers.conversion_mapping`'s "deepseek_v4" entry, written out one
tensor at a time so a missing or extra name fails loudly instead of being skipped.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model import Transformer

_ATTN = {
    "attn_sink": "sinks",
    "wq_a.weight": "q_a_proj.weight",
    "q_norm.weight": "q_a_norm.weight",
    "wq_b.weight": "q_b_proj.weight",
    "wkv.weight": "kv_proj.weight",
    "kv_norm.weight": "kv_norm.weight",
    "wo_a.weight": "o_a_proj.weight",
    "wo_b.weight": "o_b_proj.weight",
    "compressor.wkv.weight": "compressor.kv_proj.weight",
    "compressor.wgate.weight": "compressor.gate_proj.weight",
    "compressor.ape": "compressor.position_bias",
    "compressor.norm.weight": "compressor.kv_norm.weight",
    "indexer.wq_b.weight": "compressor.indexer.q_b_proj.weight",
    "indexer.weights_proj.weight": "compressor.indexer.scorer.weights_proj.weight",
    "indexer.compressor.wkv.weight": "compressor.indexer.kv_proj.weight",
    "indexer.compressor.wgate.weight": "compressor.indexer.gate_proj.weight",
    "indexer.compressor.ape": "compressor.indexer.position_bias",
    "indexer.compressor.norm.weight": "compressor.indexer.kv_norm.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn",
    "hc_attn_base": "attn_hc.base",
    "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn",
    "hc_ffn_base": "ffn_hc.base",
    "hc_ffn_scale": "ffn_hc.scale",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}


def hf_config(config: ModelConfig):
    """`transformers`' config read from our config.json dict (as `from_pretrained` would),
    minus the FP8 quantization block (the reference runs dense fp32 weights) and the MTP
    layer count (`transformers` does not build MTP)."""
    from transformers import DeepseekV4Config

    d = config.to_hf_dict()
    d.pop("quantization_config", None)
    d.pop("architectures", None)
    d.pop("model_type", None)
    d.pop("expert_dtype", None)
    d["compress_ratios"] = d["compress_ratios"][: config.num_hidden_layers]
    hf = DeepseekV4Config(**d)
    hf._attn_implementation = "eager"
    return hf


def hf_name(name: str) -> str | None:
    """transformers name of one engine tensor; None for tensors it has no slot for (MTP,
    routed experts, which are stacked separately)."""
    if name in _TOP:
        return _TOP[name]
    if name.startswith("mtp.") or ".ffn.experts." in name:
        return None
    _, layer, rest = name.split(".", 2)
    prefix = f"model.layers.{layer}."
    if rest in _BLOCK:
        return prefix + _BLOCK[rest]
    if rest.startswith("attn.") and rest[5:] in _ATTN:
        return prefix + "self_attn." + _ATTN[rest[5:]]
    raise KeyError(f"no transformers name for engine tensor {name}")


def build_hf_model(model: Transformer):
    """A DeepseekV4ForCausalLM (fp32, eval) holding exactly `model`'s weights."""
    from transformers import DeepseekV4ForCausalLM

    c = model.config
    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(hf_config(c)).to(torch.float32).eval()
    ours = model.state_dict()
    theirs = hf.state_dict()
    filled: set[str] = set()
    with torch.no_grad():
        for name, value in ours.items():
            target = hf_name(name)
            if target is None:
                continue
            if theirs[target].shape != value.shape:
                raise ValueError(
                    f"{name} {tuple(value.shape)} -> {target} {tuple(theirs[target].shape)}"
                )
            theirs[target].copy_(value)
            filled.add(target)
        for layer in range(c.num_hidden_layers):
            p = f"layers.{layer}.ffn.experts."
            w1 = torch.stack([ours[f"{p}{e}.w1.weight"] for e in range(c.n_routed_experts)])
            w3 = torch.stack([ours[f"{p}{e}.w3.weight"] for e in range(c.n_routed_experts)])
            w2 = torch.stack([ours[f"{p}{e}.w2.weight"] for e in range(c.n_routed_experts)])
            q = f"model.layers.{layer}.mlp.experts."
            theirs[q + "gate_up_proj"].copy_(torch.cat([w1, w3], dim=1))
            theirs[q + "down_proj"].copy_(w2)
            filled |= {q + "gate_up_proj", q + "down_proj"}
    missing = set(theirs) - filled
    if missing:
        raise KeyError(f"transformers tensors not filled from the engine model: {sorted(missing)}")
    return hf


class Replay:
    """Makes `transformers` use the engine's recorded top-k decisions (learned routing and
    indexer), consumed in call order, while checking that its own choice agrees on every row
    whose recorded margin exceeds `clear_margin`. Counts: `checked` rows with a clear margin,
    `total` rows, `disagreements` among the checked ones."""

    def __init__(self, monkeypatch, recorder, clear_margin: float) -> None:
        import torch.nn.functional as F
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_mod

        self.checked = self.total = self.disagreements = 0
        routes, indexes = list(recorder.routes), list(recorder.indexes)
        replay = self
        indexer_forward = hf_mod.DeepseekV4Indexer.forward

        def router_forward(router, hidden_states):
            flat = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(flat, router.weight)
            scores = router.score_fn(logits)
            own = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
            experts, gap = routes.pop(0)
            replay._check(own.sort(-1).values, experts.sort(-1).values, gap, clear_margin)
            weights = scores.gather(1, experts)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * router.routed_scaling_factor, experts

        def indexer_wrapper(
            indexer, hidden_states, q_residual, position_ids, past_key_values, layer_idx
        ):
            own = indexer_forward(
                indexer, hidden_states, q_residual, position_ids, past_key_values, layer_idx
            )
            selected, gap = indexes.pop(0)  # [n, N] for batch row 0
            if own.shape[0] != 1:
                raise ValueError("selection replay supports batch size 1")
            n_entries = selected.shape[1]
            valid = own[0] >= 0  # -1 marks picks past the causal limit
            own_mask = selected.new_zeros(selected.shape[0], n_entries + 1)  # +1: dump slot
            own_mask.scatter_(1, torch.where(valid, own[0], n_entries), True)
            own_mask = own_mask[:, :n_entries]
            replay._check(own_mask, selected, gap, clear_margin)
            # our selection as indices padded with -1, the shape transformers expects
            k = own.shape[-1]
            order = torch.arange(n_entries, device=selected.device).expand_as(selected)
            keyed = torch.where(selected, order, n_entries)  # selected first after sort
            picked = keyed.sort(-1).values[:, :k]
            return torch.where(picked < n_entries, picked, -1).unsqueeze(0)

        monkeypatch.setattr(hf_mod.DeepseekV4TopKRouter, "forward", router_forward)
        monkeypatch.setattr(hf_mod.DeepseekV4Indexer, "forward", indexer_wrapper)

    def _check(
        self, own: torch.Tensor, ours: torch.Tensor, gap: torch.Tensor, clear: float
    ) -> None:
        rows = gap > clear
        self.total += gap.numel()
        self.checked += int(rows.sum())
        self.disagreements += int((own[rows] != ours[rows]).any(-1).sum())
