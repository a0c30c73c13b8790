"""ModelConfig: reading the shipped config.json, writing it back, and rejecting bad values."""

from __future__ import annotations

import json

import pytest

from engine.config import ConfigError, ModelConfig

# DeepSeek-V4-Flash's config.json as shipped (deepseek-ai/DeepSeek-V4-Flash): 43 layers + 1
# MTP block, so 44 compress_ratios.
FLASH_CONFIG_JSON = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "expert_dtype": "fp4",
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 512,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 512,
    "initializer_range": 0.02,
    "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 43,
    "num_hash_layers": 3,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 129280,
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_from_json_reads_the_shipped_flash_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(FLASH_CONFIG_JSON))
    for source in (FLASH_CONFIG_JSON, path, tmp_path):  # dict, file, directory
        cfg = ModelConfig.from_json(source)
        assert cfg == ModelConfig.flash()
    assert (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_nextn_predict_layers,
    ) == (
        129280,
        4096,
        43,
        1,
    )
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.nope_head_dim) == (
        64,
        512,
        64,
        448,
    )
    assert (cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank, cfg.sliding_window) == (
        1024,
        8,
        1024,
        128,
    )
    assert [cfg.compress_ratio(i) for i in (0, 1, 2, 3, 41, 42, 43)] == [0, 0, 4, 128, 128, 4, 0]
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 512)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        256,
        6,
        2048,
    )
    assert (cfg.routed_scaling_factor, cfg.swiglu_limit, cfg.num_hash_layers) == (1.5, 10.0, 3)
    assert [cfg.is_hash_layer(i) for i in (0, 2, 3)] == [True, True, False]
    assert (cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.hc_mix_dim) == (4, 20, 1e-6, 24)
    assert (cfg.rope_theta, cfg.compress_rope_theta, cfg.rope_factor) == (10000, 160000, 16)
    assert (cfg.rope_original_max_position_embeddings, cfg.rope_beta_fast, cfg.rope_beta_slow) == (
        65536,
        32,
        1,
    )
    assert cfg.qat is True and cfg.expert_dtype == "fp4"
    assert cfg.extra["topk_method"] == "noaux_tc"  # unread keys are kept verbatim


def test_to_hf_dict_round_trips(tmp_path):
    for cfg in (ModelConfig.flash(), ModelConfig.tiny(), ModelConfig.from_json(FLASH_CONFIG_JSON)):
        d = cfg.to_hf_dict()
        path = tmp_path / "config.json"
        path.write_text(json.dumps(d))
        back = ModelConfig.from_json(path)
        assert back == cfg
        assert back.to_hf_dict() == d
    shipped = ModelConfig.from_json(FLASH_CONFIG_JSON).to_hf_dict()
    assert shipped == json.loads(json.dumps(FLASH_CONFIG_JSON))  # every shipped key and value


def test_0731_variant_with_drafter_keys_loads():
    """V4-Flash-0731 ships 46 compress_ratios and dspark_* keys for its drafter."""
    raw = dict(
        FLASH_CONFIG_JSON,
        compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0, 0, 0],
        dspark_target_layer_ids=[40, 41, 42],
    )
    cfg = ModelConfig.from_json(raw)
    assert cfg.compress_ratio(43) == 0 and len(cfg.compress_ratios) == 46
    assert cfg.to_hf_dict()["dspark_target_layer_ids"] == [40, 41, 42]


def test_overrides_and_qat_switch():
    cfg = ModelConfig.from_json(FLASH_CONFIG_JSON, qat=False)
    assert cfg.qat is False and "qat" not in cfg.to_hf_dict()
    assert ModelConfig.tiny().replace(qat=False).qat is False


def test_tiny_exercises_every_mechanism():
    t = ModelConfig.tiny()
    assert t.hidden_size == 256 and t.vocab_size == 129280
    assert t.compress_ratios == (0, 0, 4, 128, 4, 0, 0)  # 6 layers + a ratio-0 MTP block
    assert (t.n_routed_experts, t.num_experts_per_tok, t.num_hash_layers, t.hc_mult) == (
        16,
        2,
        2,
        4,
    )
    assert (t.head_dim, t.qk_rope_head_dim, t.index_head_dim) == (128, 64, 128)
    assert t.num_attention_heads % t.o_groups == 0 and t.o_groups > 1
    assert t.index_topk < 300 // 4  # a 300-token prompt makes the indexer reject entries


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compress_ratios": [0, 0] + [4, 64] * 20 + [4, 0]}, "compress_ratios entries"),
        ({"compress_ratios": [0, 0, 4]}, "one value per layer"),
        ({"o_groups": 7}, "o_groups"),
        ({"num_key_value_heads": 8}, "MQA"),
        ({"qk_rope_head_dim": 96}, "FP8 QAT block"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"rope_scaling": {"type": "linear", "factor": 4}}, "YaRN"),
        ({"model_type": "deepseek_v3"}, "model_type"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ],
)
def test_invalid_configs_name_the_invariant(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_json({**FLASH_CONFIG_JSON, **change})


def test_missing_compress_ratios_is_an_error():
    raw = {k: v for k, v in FLASH_CONFIG_JSON.items() if k != "compress_ratios"}
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_json(raw)


def test_transformers_reads_our_config_json():
    """`transformers`' own config class accepts the dict we write and derives the same layer
    kinds and routing kinds from it."""
    hf = pytest.importorskip("transformers")
    cfg = ModelConfig.tiny()
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    d["compress_ratios"] = d["compress_ratios"][: cfg.num_hidden_layers]
    hc = hf.DeepseekV4Config(**d)
    kinds = {
        0: "sliding_attention",
        4: "compressed_sparse_attention",
        128: "heavily_compressed_attention",
    }
    assert hc.layer_types == [kinds[r] for r in cfg.compress_ratios[: cfg.num_hidden_layers]]
    assert hc.mlp_layer_types == ["hash_moe"] * 2 + ["moe"] * 4
    assert hc.qk_rope_head_dim == cfg.qk_rope_head_dim
    assert hc.rope_parameters["compress"]["factor"] == cfg.rope_factor


def test_flash_model_has_the_official_tensor_names_and_shapes():
    """Built on meta from the V4-Flash config, the module tree's state_dict is the official
    checkpoint's tensor set (engine.md section 4) minus the `.scale` tensors that the
    FP8/FP4 Linears add: 69,187 tensors in the release."""
    import torch

    from engine.model import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.flash())
    sd = model.state_dict()
    bf16_matrices = (
        "compressor.wkv.weight",
        "compressor.wgate.weight",
        "weights_proj.weight",
        "gate.weight",
    )
    quantized = [
        k
        for k in sd
        if k.endswith(
            (".wq_a.weight", ".wq_b.weight", ".wkv.weight", ".wo_a.weight", ".wo_b.weight")
        )
        or k.endswith(("e_proj.weight", "h_proj.weight"))
        or (".experts." in k or ".shared_experts." in k)
    ]
    quantized = [k for k in quantized if not k.endswith(bf16_matrices)]
    assert len(sd) + len(quantized) == 69187
    expected = {
        "embed.weight": (129280, 4096),
        "head.weight": (129280, 4096),
        "norm.weight": (4096,),
        "hc_head_fn": (4, 16384),
        "hc_head_base": (4,),
        "hc_head_scale": (1,),
        "layers.0.hc_attn_fn": (24, 16384),
        "layers.0.hc_ffn_base": (24,),
        "layers.0.hc_ffn_scale": (3,),
        "layers.0.attn.attn_sink": (64,),
        "layers.0.attn.wq_a.weight": (1024, 4096),
        "layers.0.attn.q_norm.weight": (1024,),
        "layers.0.attn.wq_b.weight": (32768, 1024),
        "layers.0.attn.wkv.weight": (512, 4096),
        "layers.0.attn.kv_norm.weight": (512,),
        "layers.0.attn.wo_a.weight": (8192, 4096),
        "layers.0.attn.wo_b.weight": (4096, 8192),
        "layers.2.attn.compressor.wkv.weight": (1024, 4096),
        "layers.2.attn.compressor.ape": (4, 1024),
        "layers.3.attn.compressor.wgate.weight": (512, 4096),
        "layers.3.attn.compressor.ape": (128, 512),
        "layers.3.attn.compressor.norm.weight": (512,),
        "layers.2.attn.indexer.wq_b.weight": (8192, 1024),
        "layers.2.attn.indexer.weights_proj.weight": (64, 4096),
        "layers.2.attn.indexer.compressor.wkv.weight": (256, 4096),
        "layers.2.attn.indexer.compressor.ape": (4, 256),
        "layers.2.attn.indexer.compressor.norm.weight": (128,),
        "layers.2.ffn.gate.tid2eid": (129280, 6),
        "layers.3.ffn.gate.weight": (256, 4096),
        "layers.3.ffn.gate.bias": (256,),
        "layers.3.ffn.shared_experts.w1.weight": (2048, 4096),
        "layers.3.ffn.shared_experts.w2.weight": (4096, 2048),
        "layers.42.ffn.experts.255.w1.weight": (2048, 4096),
        "layers.42.ffn.experts.255.w2.weight": (4096, 2048),
        "mtp.0.e_proj.weight": (4096, 4096),
        "mtp.0.h_proj.weight": (4096, 4096),
        "mtp.0.enorm.weight": (4096,),
        "mtp.0.hc_head_fn": (4, 16384),
        "mtp.0.ffn.gate.bias": (256,),
        "mtp.0.attn.wq_a.weight": (1024, 4096),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert "layers.3.ffn.gate.tid2eid" not in sd and "layers.2.ffn.gate.bias" not in sd
    assert "layers.3.attn.indexer.wq_b.weight" not in sd and "mtp.0.attn.compressor.ape" not in sd
    fp32 = [k for k, v in sd.items() if v.dtype == torch.float32]
    assert all(k.rsplit(".", 1)[-1].startswith(("hc_", "attn_sink", "ape", "bias")) for k in fp32)
