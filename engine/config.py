"""DeepSeek-V4-Flash model configuration: one frozen dataclass built from a release's config.json.

Field names are the Hugging Face keys exactly as DeepSeek ships them in `config.json`
(`num_hidden_layers`, `compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`,
...), so `ModelConfig.from_json(path)` is a plain key lookup and `to_hf_dict()` writes a file the
official release, `transformers` and this engine all read. The numbers that are fixed by the
architecture rather than by a release (the allowed compression ratios, the FP8/FP4 QAT block
sizes, the size of the hyper-connection mixing vector) live in the constants below and
`validate()` checks every release against them, so the model code can assume them.

`qat` is the single engine switch (not an HF key): True runs DeepSeek's quantisation-aware
steps (FP8 round trip of the non-RoPE KV dims, Hadamard + FP4 on the indexer) as the official
inference code does; False gives the plain-precision path that `transformers` implements.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------
# Fixed DeepSeek-V4 constants (architecture, not release): the model code relies on them.
# ---------------------------------------------------------------------------------------------
RATIO_WINDOW = 0  # sliding-window only (layers 0, 1 and the MTP block in V4-Flash)
RATIO_SPARSE = 4  # overlapping compressor + indexer top-k ("compressed sparse attention")
RATIO_HEAVY = 128  # plain compressor, every completed entry visible ("heavily compressed")
COMPRESS_RATIOS = (RATIO_WINDOW, RATIO_SPARSE, RATIO_HEAVY)
HC_MIX_GROUPS = 3  # hc_pre emits pre[hc], post[hc], comb[hc, hc]: three scales
QAT_KV_FP8_BLOCK = 64  # kv[:nope] is round-tripped through e4m3 in blocks of 64 channels
QAT_INDEXER_FP4_BLOCK = 32  # indexer q/k are round-tripped through e2m1 in blocks of 32
SCORING_FUNC = "sqrtsoftplus"  # score = sqrt(softplus(logit)); the only router V4 ships
MODEL_TYPE = "deepseek_v4"

# Keys of a shipped config.json that this engine reads into typed fields. Anything else
# (architectures, torch_dtype, transformers_version, dspark_* of V4-Flash-0731, ...) is kept
# verbatim in `ModelConfig.extra` so `to_hf_dict()` writes the file back unchanged.
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")


class ConfigError(ValueError):
    """A config.json value violates an invariant the engine relies on."""


@dataclass(frozen=True)
class ModelConfig:
    # --- sizes ---
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_nextn_predict_layers: int = 1  # MTP blocks (V4-Flash ships one)
    # --- attention ---
    num_attention_heads: int = 64
    num_key_value_heads: int = 1  # MQA: one 512-d latent is both K and V
    head_dim: int = 512
    qk_rope_head_dim: int = 64  # RoPE on the LAST 64 dims of q, kv and compressed entries
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # one ratio per main layer followed by one per MTP block (V4-Flash: 43 + 1 = 44 values;
    # V4-Flash-0731 ships 46 - the trailing extras belong to its drafter and are ignored)
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    rope_theta: float = 10000.0  # ratio-0 layers, no YaRN
    compress_rope_theta: float = 160000.0  # compressed layers, with YaRN below
    rope_factor: float = 16.0
    rope_original_max_position_embeddings: int = 65536
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    max_position_embeddings: int = 1048576
    # --- indexer (ratio-4 layers) ---
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # --- MoE ---
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3  # layers < this take experts from tid2eid[token]; others gate + bias
    scoring_func: str = SCORING_FUNC
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0  # routed experts only (DeepSeek's code leaves the shared one)
    # --- hyper-connections ---
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- misc ---
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_id: int = 1
    expert_dtype: str | None = "fp4"  # routed experts on disk: "fp4" (packed e2m1) or None (=fp8)
    quantization_config: Mapping[str, Any] | None = field(
        default_factory=lambda: {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
        hash=False,
    )
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # --- engine switch (not an HF key) ---
    qat: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        self.validate()

    # -----------------------------------------------------------------------------------------
    # derived values
    # -----------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        """Dims of the 512-d latent without RoPE (448 in V4-Flash): the FP8-QAT part."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    @property
    def hc_mix_dim(self) -> int:
        """Length of hc_pre's mixing vector: pre[hc] + post[hc] + comb[hc*hc] (24 for hc 4)."""
        return (2 + self.hc_mult) * self.hc_mult

    def compress_ratio(self, layer: int) -> int:
        """Ratio of main layer `layer` (0..L-1) or MTP block `layer - L`."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    # -----------------------------------------------------------------------------------------
    # validation
    # -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        n_ratios = self.num_hidden_layers + self.num_nextn_predict_layers
        need(
            self.num_hidden_layers > 0,
            f"num_hidden_layers must be positive, got {self.num_hidden_layers}",
        )
        need(
            len(self.compress_ratios) >= n_ratios,
            f"compress_ratios needs one value per layer and MTP block ({n_ratios}), got {len(self.compress_ratios)}",
        )
        bad = [r for r in self.compress_ratios[:n_ratios] if r not in COMPRESS_RATIOS]
        need(not bad, f"compress_ratios entries must be in {COMPRESS_RATIOS}, got {bad}")
        need(
            self.num_key_value_heads == 1,
            f"V4 attention is MQA (num_key_value_heads 1), got {self.num_key_value_heads}",
        )
        need(
            0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0,
            f"qk_rope_head_dim must be even and inside head_dim {self.head_dim}, got {self.qk_rope_head_dim}",
        )
        need(
            self.nope_head_dim % QAT_KV_FP8_BLOCK == 0,
            f"head_dim - qk_rope_head_dim ({self.nope_head_dim}) must be a multiple of the FP8 QAT block {QAT_KV_FP8_BLOCK}",
        )
        need(
            self.index_head_dim > self.qk_rope_head_dim
            and self.index_head_dim % QAT_INDEXER_FP4_BLOCK == 0,
            f"index_head_dim ({self.index_head_dim}) must exceed qk_rope_head_dim and be a multiple of {QAT_INDEXER_FP4_BLOCK}",
        )
        need(
            self.index_head_dim & (self.index_head_dim - 1) == 0,
            f"index_head_dim ({self.index_head_dim}) must be a power of two for the Hadamard transform",
        )
        need(
            self.num_attention_heads % self.o_groups == 0,
            f"o_groups ({self.o_groups}) must divide num_attention_heads ({self.num_attention_heads})",
        )
        need(self.sliding_window > 0, f"sliding_window must be positive, got {self.sliding_window}")
        need(
            0 < self.num_experts_per_tok <= self.n_routed_experts,
            f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts ({self.n_routed_experts})",
        )
        need(
            self.n_shared_experts in (0, 1),
            f"V4 has at most one shared expert, got {self.n_shared_experts}",
        )
        need(
            0 <= self.num_hash_layers <= self.num_hidden_layers,
            f"num_hash_layers ({self.num_hash_layers}) must be within num_hidden_layers",
        )
        need(
            self.scoring_func == SCORING_FUNC,
            f"scoring_func must be {SCORING_FUNC!r}, got {self.scoring_func!r}",
        )
        need(
            self.hc_mult >= 1 and self.hc_sinkhorn_iters >= 1,
            "hc_mult and hc_sinkhorn_iters must be positive",
        )
        need(self.index_topk > 0, f"index_topk must be positive, got {self.index_topk}")
        need(
            self.expert_dtype in (None, "fp4", "fp8", "bf16"),
            f"expert_dtype must be fp4/fp8/bf16/None, got {self.expert_dtype!r}",
        )

    # -----------------------------------------------------------------------------------------
    # construction
    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_json(
        cls, source: str | os.PathLike | Mapping[str, Any], **overrides: Any
    ) -> ModelConfig:
        """Build from a config.json path (file or its directory) or an already-parsed dict.

        Reads the keys as shipped; `overrides` (field names, e.g. qat=False) win over the file.
        """
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ConfigError(f"model_type must be {MODEL_TYPE!r}, got {raw.get('model_type')!r}")
        raw.pop("model_type", None)

        kwargs: dict[str, Any] = {}
        rope = raw.pop("rope_scaling", None)
        if rope is not None:
            kind = rope.get("type", rope.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"rope_scaling must be YaRN (type 'yarn'), got {kind!r}")
            for key in _YARN_KEYS:
                if key in rope:
                    kwargs[f"rope_{key}"] = rope[key]
        if isinstance(raw.get("eos_token_id"), list):
            raw["eos_token_id"] = raw["eos_token_id"][0]

        names = (
            {f.name for f in dataclasses.fields(cls)}
            - {"extra", "qat"}
            - {f"rope_{k}" for k in _YARN_KEYS}
        )
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            if key in names:
                kwargs[key] = tuple(value) if key == "compress_ratios" else value
            else:
                extra[key] = value
        if "compress_ratios" not in kwargs:
            raise ConfigError("config.json lacks compress_ratios (one per layer and MTP block)")
        kwargs["extra"] = extra
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dict (HF keys as DeepSeek ships them); from_json(to_hf_dict()) == self."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": MODEL_TYPE}
        out.update(json.loads(json.dumps(dict(self.extra))))
        for f in dataclasses.fields(self):
            if f.name in ("extra", "qat") or (
                f.name.startswith("rope_") and f.name != "rope_theta"
            ):
                continue
            value = getattr(self, f.name)
            if f.name == "compress_ratios":
                value = list(value)
            elif f.name == "quantization_config" and value is not None:
                value = json.loads(json.dumps(dict(value)))
            out[f.name] = value
        out["rope_scaling"] = {
            "beta_fast": self.rope_beta_fast,
            "beta_slow": self.rope_beta_slow,
            "factor": self.rope_factor,
            "original_max_position_embeddings": self.rope_original_max_position_embeddings,
            "type": "yarn",
        }
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def flash(cls) -> ModelConfig:
        """DeepSeek-V4-Flash as released (spec section 1): the dataclass defaults."""
        return cls(
            extra={
                "torch_dtype": "bfloat16",
                "tie_word_embeddings": False,
                "topk_method": "noaux_tc",
            }
        )

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A small random-weight configuration exercising every mechanism, for CPU tests.

        Six layers cover all attention kinds: two hash-routed window layers, a ratio-4 layer
        with the indexer, a ratio-128 layer, a second ratio-4 and a window layer, plus one
        ratio-0 MTP block. head_dim 128 / rope 64 / indexer head 128 are the smallest sizes
        DeepSeek's kernels accept (spec section 7). The vocabulary stays the real 129280 so the
        real tokenizer works with it. index_topk 8 < the 75 entries of a 300-token prompt, so
        the top-k selection is exercised. Storage formats (FP8 attention, FP4 experts) are the real
        release's, so a tiny checkpoint exercises the same loaders.
        """
        return cls(
            hidden_size=256,
            num_hidden_layers=6,
            num_nextn_predict_layers=1,
            num_attention_heads=8,
            head_dim=128,
            qk_rope_head_dim=64,
            q_lora_rank=128,
            o_groups=2,
            o_lora_rank=64,
            compress_ratios=(0, 0, 4, 128, 4, 0, 0),
            index_n_heads=8,
            index_head_dim=128,
            index_topk=8,
            n_routed_experts=16,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            num_hash_layers=2,
        )
