"""Write a small random checkpoint in DeepSeek-V4-Flash's official on-disk layout.

    python -m engine.make_checkpoint --config tiny --out DIR [--seed N] [--int2]
    python -m engine.make_checkpoint --config tiny --format gguf --out DIR [--seed N]

The directory holds what a downloaded release holds, so the loader, the server and the tests
exercise the real formats: `config.json` (Hugging Face keys), safetensors shards named
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`, the release's tensor
names and storage (engine.md section 4: FP8 E4M3 + E8M0 128x128 block scales for the
attention and shared-expert projections, packed FP4 + E8M0 per-32 scales for the routed
experts, BF16 norms / embeddings / compressors / router, F32 hyper-connection, sink, ape and
router-bias tensors, I64 `tid2eid` for the hash layers), and a copy of the V4 `tokenizer.json`
so the directory is self-contained. With `--int2` it also writes one `layer_NN.safetensors`
per main layer in the INT2-G64 layout, beside the release files (as the INT2 download sits
beside the official one).

`release_layout(config)` is the layout as a table, derived from the spec alone, so that
loading what this writes into `engine.model` checks the model's module paths against the
release. One unconfirmed choice: the MTP block's `e_proj` / `h_proj` are written as FP8
(DeepSeek's reference builds every `Linear` in the checkpoint dtype); the loader accepts
whichever stored format it finds.

With `--format gguf` it writes the same kind of random model as antirez's ds4 GGUF instead
(`model.gguf`, and the MTP block in `mtp.gguf` as ds4 ships it): ds4's tensor names, GGML
types (routed gate/up IQ2_XXS, down Q2_K, attention / shared expert / head Q8_0, embedding /
router / indexer / compressors / hc maps F16, norms / sinks / bias F32, `tid2eid` I32) and
`deepseek4.*` metadata, read by `engine.gguf`. Its config is `gguf_config()`: tiny with an
expert width of 256, since Q2_K and IQ2_XXS blocks hold 256 values (tiny's 128 fits none).

Weights are random, scaled so activations stay O(1): projections ~ N(0, 1/fan_in), norms 1.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from engine import formats as fm
from engine.config import RATIO_SPARSE, RATIO_WINDOW, ModelConfig
from engine.formats import WeightFormat

INDEX_FILE = "model.safetensors.index.json"
ROUTED_PROJS = ("w1", "w2", "w3")
_MAIN_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight")


@dataclass(frozen=True)
class TensorSpec:
    """One entry of the release layout. `fmt` is set for projections (weight [+ scale])."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None  # plain tensors
    fmt: WeightFormat | None = None   # projections: stored as `name` (+ `.scale`)
    init: str = "normal"              # "normal" (std 1/sqrt(fan_in)), "ones", "small", "tid2eid"


def _proj(name: str, out_features: int, in_features: int, fmt: WeightFormat) -> TensorSpec:
    return TensorSpec(f"{name}.weight", (out_features, in_features), fmt=fmt)


def _block(c: ModelConfig, prefix: str, ratio: int, hash_layer: bool) -> Iterator[TensorSpec]:
    """Tensors of one main layer or MTP block."""
    H, F32, BF16 = c.hidden_size, torch.float32, torch.bfloat16
    FP8, DENSE = WeightFormat.FP8, WeightFormat.DENSE
    expert_fmt = {"fp4": WeightFormat.FP4, None: FP8, "fp8": FP8, "bf16": DENSE}[c.expert_dtype]
    for norm in ("attn_norm", "ffn_norm"):
        yield TensorSpec(f"{prefix}.{norm}.weight", (H,), BF16, init="ones")
    for hc in ("hc_attn", "hc_ffn"):
        yield TensorSpec(f"{prefix}.{hc}_fn", (c.hc_mix_dim, c.hc_mult * H), F32)
        yield TensorSpec(f"{prefix}.{hc}_base", (c.hc_mix_dim,), F32, init="small")
        yield TensorSpec(f"{prefix}.{hc}_scale", (3,), F32, init="small")
    a = f"{prefix}.attn"
    yield TensorSpec(f"{a}.attn_sink", (c.num_attention_heads,), F32, init="small")
    yield _proj(f"{a}.wq_a", c.q_lora_rank, H, FP8)
    yield TensorSpec(f"{a}.q_norm.weight", (c.q_lora_rank,), BF16, init="ones")
    yield _proj(f"{a}.wq_b", c.num_attention_heads * c.head_dim, c.q_lora_rank, FP8)
    yield _proj(f"{a}.wkv", c.head_dim, H, FP8)
    yield TensorSpec(f"{a}.kv_norm.weight", (c.head_dim,), BF16, init="ones")
    yield _proj(f"{a}.wo_a", c.o_groups * c.o_lora_rank, c.heads_per_group * c.head_dim, FP8)
    yield _proj(f"{a}.wo_b", H, c.o_groups * c.o_lora_rank, FP8)
    if ratio != RATIO_WINDOW:
        width = 2 * c.head_dim if ratio == RATIO_SPARSE else c.head_dim  # r=4 overlaps
        yield from _compressor(f"{a}.compressor", H, ratio, width, c.head_dim)
    if ratio == RATIO_SPARSE:
        yield _proj(f"{a}.indexer.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank, FP8)
        yield _proj(f"{a}.indexer.weights_proj", c.index_n_heads, H, DENSE)
        yield from _compressor(f"{a}.indexer.compressor", H, ratio, 2 * c.index_head_dim,
                               c.index_head_dim)
    f = f"{prefix}.ffn"
    E, inter = c.n_routed_experts, c.moe_intermediate_size
    yield TensorSpec(f"{f}.gate.weight", (E, H), BF16)
    if hash_layer:
        yield TensorSpec(f"{f}.gate.tid2eid", (c.vocab_size, c.num_experts_per_tok), torch.int64,
                         init="tid2eid")
    else:
        yield TensorSpec(f"{f}.gate.bias", (E,), F32, init="small")
    if c.n_shared_experts:
        yield from _swiglu(f"{f}.shared_experts", H, inter, FP8)
    for e in range(E):
        yield from _swiglu(f"{f}.experts.{e}", H, inter, expert_fmt)


def _compressor(p: str, H: int, ratio: int, width: int, norm_dim: int) -> Iterator[TensorSpec]:
    yield _proj(f"{p}.wkv", width, H, WeightFormat.DENSE)
    yield _proj(f"{p}.wgate", width, H, WeightFormat.DENSE)
    yield TensorSpec(f"{p}.ape", (ratio, width), torch.float32, init="small")
    yield TensorSpec(f"{p}.norm.weight", (norm_dim,), torch.bfloat16, init="ones")


def _swiglu(p: str, H: int, inter: int, fmt: WeightFormat) -> Iterator[TensorSpec]:
    yield _proj(f"{p}.w1", inter, H, fmt)
    yield _proj(f"{p}.w2", H, inter, fmt)
    yield _proj(f"{p}.w3", inter, H, fmt)


def release_layout(c: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the official release for config `c`, in shard order."""
    H, F32, BF16 = c.hidden_size, torch.float32, torch.bfloat16
    specs = [
        TensorSpec("embed.weight", (c.vocab_size, H), BF16, init="embed"),
        TensorSpec("head.weight", (c.vocab_size, H), BF16),
        TensorSpec("norm.weight", (H,), BF16, init="ones"),
        TensorSpec("hc_head_fn", (c.hc_mult, c.hc_mult * H), F32),
        TensorSpec("hc_head_base", (c.hc_mult,), F32, init="small"),
        TensorSpec("hc_head_scale", (1,), F32, init="small"),
    ]
    for layer in range(c.num_hidden_layers):
        specs += _block(c, f"layers.{layer}", c.compress_ratio(layer), c.is_hash_layer(layer))
    for k in range(c.num_nextn_predict_layers):
        p = f"mtp.{k}"
        specs += [
            _proj(f"{p}.e_proj", H, H, WeightFormat.FP8),
            _proj(f"{p}.h_proj", H, H, WeightFormat.FP8),
            TensorSpec(f"{p}.enorm.weight", (H,), BF16, init="ones"),
            TensorSpec(f"{p}.hnorm.weight", (H,), BF16, init="ones"),
            TensorSpec(f"{p}.norm.weight", (H,), BF16, init="ones"),
            TensorSpec(f"{p}.hc_head_fn", (c.hc_mult, c.hc_mult * H), F32),
            TensorSpec(f"{p}.hc_head_base", (c.hc_mult,), F32, init="small"),
            TensorSpec(f"{p}.hc_head_scale", (1,), F32, init="small"),
        ]
        specs += _block(c, p, c.compress_ratio(c.num_hidden_layers + k), hash_layer=False)
    return specs


def _random(spec: TensorSpec, c: ModelConfig, g: torch.Generator) -> torch.Tensor:
    if spec.init == "ones":
        return torch.ones(spec.shape)
    if spec.init == "small":
        return torch.randn(spec.shape, generator=g) * 0.1
    if spec.init == "embed":
        return torch.randn(spec.shape, generator=g)
    if spec.init == "tid2eid":
        # Each token's K experts are distinct, as a real routing table's are.
        order = torch.rand(c.vocab_size, c.n_routed_experts, generator=g).argsort(dim=-1)
        return order[:, : c.num_experts_per_tok].contiguous()
    return torch.randn(spec.shape, generator=g) * spec.shape[-1] ** -0.5


def _stored(spec: TensorSpec, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The release tensors for one spec: a plain tensor, or a projection's weight [+ scale]."""
    if spec.fmt is None:
        return {spec.name: value.to(spec.dtype)}
    scale_name = spec.name.removesuffix(".weight") + ".scale"
    if spec.fmt == WeightFormat.FP8:
        q, s = fm.quantize_fp8(value)
        return {spec.name: q, scale_name: s}
    if spec.fmt == WeightFormat.FP4:
        q, s = fm.quantize_fp4(value)
        return {spec.name: q, scale_name: s}
    return {spec.name: value.to(torch.bfloat16)}


def _shard_key(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("layers", "mtp") else "top"


def write_checkpoint(out_dir: str | Path, config_name: str = "tiny", seed: int = 0,
                     int2: bool = False, config: ModelConfig | None = None) -> Path:
    """Write a random checkpoint to `out_dir` (created) and return its path.

    `config_name` picks `ModelConfig.tiny()`; pass `config` for another (small) shape. The
    real V4-Flash shape is refused: it would be a 160 GB random file.
    """
    if config is None:
        if config_name != "tiny":
            raise ValueError(f"unknown config {config_name!r}: only 'tiny' is written "
                             "(the real V4-Flash shape would be 160 GB of random weights)")
        config = ModelConfig.tiny()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for spec, value in random_tensors(config, seed):
        shards.setdefault(_shard_key(spec.name), {}).update(_stored(spec, value))
    weight_map: dict[str, str] = {}
    total_size = 0
    for k, tensors in enumerate(shards.values(), start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total_size += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    if int2:
        for layer, tensors in int2_expert_files(config, seed):
            save_file(tensors, out / fm.int2_file_name(layer), metadata={"format": "pt"})
    from dsml.tokenizer import tokenizer_json_path  # the V4 tokenizer, copied verbatim

    shutil.copyfile(tokenizer_json_path(), out / "tokenizer.json")
    return out


def random_tensors(c: ModelConfig, seed: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    """The dense random value (float32) of every release tensor, in layout order.

    Deterministic in `seed`, so tests can regenerate what `write_checkpoint` quantised.
    """
    g = torch.Generator().manual_seed(seed)
    for spec in release_layout(c):
        yield spec, _random(spec, c, g)


def random_int2_experts(c: ModelConfig, seed: int) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(layer, projection, dense [E, out, in] float32) of the routed experts, per main layer.

    The release's own dense experts (what its FP4 files quantise): the INT2 release is a
    quantisation of the same model, and the loader checks that an INT2 file dequantises
    close to the FP4 experts beside it (engine.weights).
    """
    E = c.n_routed_experts
    experts: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    for spec, value in random_tensors(c, seed):
        m = _MAIN_EXPERT.fullmatch(spec.name)
        if m is not None:
            experts.setdefault((int(m.group(1)), m.group(3)), [None] * E)[int(m.group(2))] = value
    for layer in range(c.num_hidden_layers):
        for proj in ROUTED_PROJS:
            yield layer, proj, torch.stack(experts[layer, proj])  # type: ignore[arg-type]


def int2_expert_files(c: ModelConfig, seed: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(layer, tensors of `layer_NN.safetensors`) in the INT2-G64 layout, stacked over E."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, proj, w in random_int2_experts(c, seed):
        for field, t in zip(fm.INT2_FIELDS, fm.quantize_int2(w), strict=True):
            tensors[fm.int2_key(proj, field)] = t
        if proj == ROUTED_PROJS[-1]:
            yield layer, tensors
            tensors = {}


# -- ds4's GGUF ----------------------------------------------------------------------------

GGUF_FILE = "model.gguf"
GGUF_MTP_FILE = "mtp.gguf"
GGUF_EXPERT_WIDTH = 256  # one Q2_K / IQ2_XXS block: the down projection's input needs it
# ds4's types (its `weights_validate_layout`), by ds4 name after `blk.L.` / `mtp.K.` / top.
_DS4_Q8_0 = frozenset({
    "attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight", "attn_output_a.weight",
    "attn_output_b.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
    "ffn_down_shexp.weight", "e_proj.weight", "h_proj.weight", "output.weight"})
_DS4_EXPERTS = {"ffn_gate_exps.weight": WeightFormat.IQ2_XXS,
                "ffn_up_exps.weight": WeightFormat.IQ2_XXS,
                "ffn_down_exps.weight": WeightFormat.Q2_K}


def gguf_config() -> ModelConfig:
    """The tiny configuration as a ds4-layout GGUF holds it (see the module docstring)."""
    return ModelConfig.tiny().replace(moe_intermediate_size=GGUF_EXPERT_WIDTH, expert_dtype=None,
                                      quantization_config=None)


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF: ds4 name, stored type, data (GGML blocks as uint8 rows, or the
    plain values), and the official tensor(s) it holds (a routed stack: one per expert)."""

    name: str
    fmt: WeightFormat | None  # None: plain, stored as `data.dtype`
    data: np.ndarray
    official: tuple[str, ...]


def ds4_format(name: str) -> WeightFormat | None:
    """ds4's GGML block format for its tensor `name`; None for its F16 / F32 / I32 ones."""
    leaf = name.split(".", 2)[-1] if name.startswith(("blk.", "mtp.")) else name
    return _DS4_EXPERTS.get(leaf, WeightFormat.Q8_0 if leaf in _DS4_Q8_0 else None)


def _ds4_stored(name: str, value: torch.Tensor) -> tuple[WeightFormat | None, np.ndarray]:
    fmt = ds4_format(name)
    if fmt is not None:
        return fmt, fm.quantize_ggml(fmt, value).numpy()
    if not value.is_floating_point():
        return None, value.to(torch.int32).numpy()
    return None, value.to(torch.float16 if value.dim() >= 2 else torch.float32).numpy()


def gguf_tensors(c: ModelConfig, seed: int) -> Iterator[GgufTensor]:
    """The GGUF's tensors for config `c`: `random_tensors(c, seed)` in ds4's names and types,
    each layer's routed experts stacked per projection [E, out, in] (expert order)."""
    from engine.gguf import ds4_name

    stacks: dict[str, list[tuple[int, str, torch.Tensor]]] = {}
    for spec, value in random_tensors(c, seed):
        name, expert = ds4_name(spec.name)
        if expert is None:
            yield GgufTensor(name, *_ds4_stored(name, value), (spec.name,))
            continue
        stacks.setdefault(name, []).append((expert, spec.name, value))
        if len(stacks[name]) == c.n_routed_experts:
            entries = sorted(stacks.pop(name), key=lambda e: e[0])
            stacked = torch.stack([v for _, _, v in entries])
            yield GgufTensor(name, *_ds4_stored(name, stacked), tuple(n for _, n, _ in entries))


def _gguf_metadata(writer, c: ModelConfig) -> None:
    a = "deepseek4"
    for key, value in (
        ("block_count", c.num_hidden_layers), ("embedding_length", c.hidden_size),
        ("vocab_size", c.vocab_size),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("attention.key_length", c.head_dim), ("attention.value_length", c.head_dim),
        ("rope.dimension_count", c.qk_rope_head_dim), ("attention.q_lora_rank", c.q_lora_rank),
        ("attention.output_lora_rank", c.o_lora_rank),
        ("attention.output_group_count", c.o_groups),
        ("attention.sliding_window", c.sliding_window),
        ("attention.indexer.head_count", c.index_n_heads),
        ("attention.indexer.key_length", c.index_head_dim),
        ("attention.indexer.top_k", c.index_topk), ("expert_count", c.n_routed_experts),
        ("expert_used_count", c.num_experts_per_tok),
        ("expert_feed_forward_length", c.moe_intermediate_size),
        ("expert_shared_count", c.n_shared_experts), ("hash_layer_count", c.num_hash_layers),
        ("expert_group_count", 0), ("expert_group_used_count", 0),
        ("hyper_connection.count", c.hc_mult),
        ("hyper_connection.sinkhorn_iterations", c.hc_sinkhorn_iters),
    ):
        writer.add_uint32(f"{a}.{key}", value)
    writer.add_uint64(f"{a}.context_length", c.max_position_embeddings)  # ds4 reads both as u64
    writer.add_uint64(f"{a}.rope.scaling.original_context_length",
                      c.rope_original_max_position_embeddings)
    for key, value in (
        ("expert_weights_scale", c.routed_scaling_factor), ("hyper_connection.epsilon", c.hc_eps),
        ("attention.layer_norm_rms_epsilon", c.rms_norm_eps), ("rope.freq_base", c.rope_theta),
        ("attention.compress_rope_freq_base", c.compress_rope_theta),
        ("rope.scaling.factor", c.rope_factor), ("rope.scaling.yarn_beta_fast", c.rope_beta_fast),
        ("rope.scaling.yarn_beta_slow", c.rope_beta_slow),
    ):
        writer.add_float32(f"{a}.{key}", value)
    writer.add_bool(f"{a}.expert_weights_norm", c.norm_topk_prob)
    layers = c.num_hidden_layers + c.num_nextn_predict_layers
    writer.add_array(f"{a}.attention.compress_ratios", list(c.compress_ratios[:layers]))
    writer.add_array(f"{a}.swiglu_clamp_exp", [float(c.swiglu_limit)] * c.num_hidden_layers)
    writer.add_uint32("tokenizer.ggml.bos_token_id", c.bos_token_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", c.eos_token_id)


def write_gguf_file(path: str | Path, tensors: Iterable[GgufTensor],
                    config: ModelConfig | None = None) -> Path:
    """One GGUF file of `tensors`, with `config`'s `deepseek4.*` metadata when given (the
    main file; ds4's MTP file carries tensors only)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(path, "deepseek4")
    if config is not None:
        _gguf_metadata(writer, config)
    for t in tensors:
        if t.fmt is None:
            writer.add_tensor(t.name, t.data)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=GGMLQuantizationType[t.fmt.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_gguf_checkpoint(out_dir: str | Path, config_name: str = "tiny", seed: int = 0,
                          config: ModelConfig | None = None) -> tuple[Path, Path | None]:
    """Write a random model as ds4's GGUF to `out_dir`: (model.gguf, mtp.gguf or None)."""
    if config is None:
        if config_name != "tiny":
            raise ValueError(f"unknown config {config_name!r}: only 'tiny' is written")
        config = gguf_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = list(gguf_tensors(config, seed))
    main_path = write_gguf_file(out / GGUF_FILE, [t for t in tensors if not t.name.startswith("mtp.")],
                                config)
    mtp = [t for t in tensors if t.name.startswith("mtp.")]
    return main_path, write_gguf_file(out / GGUF_MTP_FILE, mtp) if mtp else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.make_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=["tiny"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int2", action="store_true", help="also write INT2-G64 expert files")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "gguf"],
                        help="the official release layout, or antirez's ds4 GGUF")
    args = parser.parse_args(argv)
    if args.format == "gguf":
        if args.int2:
            parser.error("--int2 belongs to the safetensors layout")
        files = write_gguf_checkpoint(args.out, args.config, seed=args.seed)
        print("wrote " + " and ".join(str(f) for f in files if f is not None))
        return
    path = write_checkpoint(args.out, args.config, seed=args.seed, int2=args.int2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
