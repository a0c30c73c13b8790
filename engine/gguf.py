"""Loading antirez's ds4 GGUF of DeepSeek-V4-Flash (and files in its layout) into the model.

    model = load_gguf_model("DeepSeek-V4-Flash-IQ2XXS-w2Q2K-....gguf", mtp_path="MTP.gguf")

ds4 (github.com/antirez/ds4, `ds4.c` `weights_bind` and `gguf-tools/deepseek4-quantize.c`)
stores the release under llama.cpp-style names, `blk.L.attn_q_a.weight` for the official
`layers.L.attn.wq_a.weight`, with shapes in GGML order (reversed: `[in, out]`) over the same
row-major bytes, so no tensor is permuted or transposed. Its types:

| tensors                                                  | GGML type                    |
|----------------------------------------------------------|------------------------------|
| routed experts gate / up (`ffn_{gate,up}_exps`) / down   | IQ2_XXS / IQ2_XXS / Q2_K     |
| attention projections, shared expert, head (`output`)    | Q8_0                         |
| embedding, router, indexer, compressors, hc maps          | F16                          |
| norms, sinks, hc bases / scales, router bias              | F32                          |
| `ffn_gate_tid2eid` (hash-routing table)                  | I32                          |

Each layer's routed experts are one stacked tensor per projection `[E, out, in]`; every
expert's Linear gets a view of its slice (on the device, the stack is moved once per layer),
never a copy. Linear weights keep their stored type (the GGML blocks are decoded per call,
engine.formats); every other tensor takes the dtype the model declares when the cast is
exact (F16 -> F32, I32 -> I64, F32 -> BF16 for values that fit) and otherwise keeps its own:
RMSNorm computes in fp32 either way, and an F16 embedding whose values bf16 cannot all hold
becomes a `StoredEmbedding`, which casts the rows it looks up.

The MTP block is a separate file (`mtp.0.*`, as ds4 ships it); without it the model is
built with no MTP block. The configuration comes from the file's `deepseek4.*` metadata.
Everything is checked before a weight is read: a tensor of no known name, a missing one, an
unsupported GGML type or a wrong shape raises `GGUFError` naming it.

The tokenizer is the package's V4 tokenizer (the GGUF's own vocabulary is not read).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine import formats as fm
from engine.config import RATIO_WINDOW, ModelConfig
from engine.formats import WeightFormat
from engine.linear import Linear
from engine.model import Transformer

# The loader's shared helpers (one load unit per layer, a module's own tensors).
from engine.weights import PROGRESS_MIN_BYTES, CheckpointError, _groups, _own_tensors

GGUF_MAGIC = b"GGUF"
ARCH = "deepseek4"


class GGUFError(CheckpointError):
    """The GGUF does not match the model: names the tensor or key, expected and found."""


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a file that starts with the GGUF magic (directories and others: False)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


# ---------------------------------------------------------------------------------------------
# Names: ds4's tensor names for the official module paths (ds4's `weights_bind` tables).
# ---------------------------------------------------------------------------------------------
TOP_NAMES = {  # official -> ds4
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "head.weight": "output.weight",
    "hc_head_base": "output_hc_base.weight",
    "hc_head_fn": "output_hc_fn.weight",
    "hc_head_scale": "output_hc_scale.weight",
}
BLOCK_NAMES = {  # official, after `layers.L.` / `mtp.K.` -> ds4, after `blk.L.` / `mtp.K.`
    "hc_attn_base": "hc_attn_base.weight",
    "hc_attn_fn": "hc_attn_fn.weight",
    "hc_attn_scale": "hc_attn_scale.weight",
    "hc_ffn_base": "hc_ffn_base.weight",
    "hc_ffn_fn": "hc_ffn_fn.weight",
    "hc_ffn_scale": "hc_ffn_scale.weight",
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn.attn_sink": "attn_sinks.weight",
    "attn.wq_a.weight": "attn_q_a.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight",
    "attn.wq_b.weight": "attn_q_b.weight",
    "attn.wkv.weight": "attn_kv.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "attn.wo_a.weight": "attn_output_a.weight",
    "attn.wo_b.weight": "attn_output_b.weight",
    "attn.compressor.ape": "attn_compressor_ape.weight",
    "attn.compressor.wkv.weight": "attn_compressor_kv.weight",
    "attn.compressor.wgate.weight": "attn_compressor_gate.weight",
    "attn.compressor.norm.weight": "attn_compressor_norm.weight",
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "attn.indexer.compressor.ape": "indexer_compressor_ape.weight",
    "attn.indexer.compressor.wkv.weight": "indexer_compressor_kv.weight",
    "attn.indexer.compressor.wgate.weight": "indexer_compressor_gate.weight",
    "attn.indexer.compressor.norm.weight": "indexer_compressor_norm.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight",
    "ffn.gate.bias": "exp_probs_b.bias",
    "ffn.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
}
MTP_NAMES = {  # the MTP block's own tensors, after `mtp.K.` on both sides
    "e_proj.weight": "e_proj.weight",
    "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "norm.weight": "norm.weight",
    "hc_head_base": "hc_head_base.weight",
    "hc_head_fn": "hc_head_fn.weight",
    "hc_head_scale": "hc_head_scale.weight",
}
EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w2": "ffn_down_exps.weight",
                "w3": "ffn_up_exps.weight"}  # stacked over the layer's experts
_ROUTED = re.compile(r"(layers|mtp)\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight")
_BLOCK = re.compile(r"(layers|mtp)\.(\d+)\.(.+)")


def ds4_name(official: str) -> tuple[str, int | None]:
    """(ds4 tensor name, expert index in its stack or None) of an official tensor name."""
    if official in TOP_NAMES:
        return TOP_NAMES[official], None
    if m := _ROUTED.fullmatch(official):
        kind, block, expert, proj = m.groups()
        return f"{'blk' if kind == 'layers' else 'mtp'}.{block}.{EXPERT_NAMES[proj]}", int(expert)
    if m := _BLOCK.fullmatch(official):
        kind, block, rest = m.groups()
        table = BLOCK_NAMES if kind == "layers" else {**BLOCK_NAMES, **MTP_NAMES}
        if rest in table:
            return f"{'blk' if kind == 'layers' else 'mtp'}.{block}.{table[rest]}", None
    raise GGUFError(f"{official}: no ds4 GGUF name is known for this model tensor")


# ---------------------------------------------------------------------------------------------
# GGML types
# ---------------------------------------------------------------------------------------------
def _ggml_types() -> tuple[dict[Any, WeightFormat], dict[Any, torch.dtype]]:
    from gguf import GGMLQuantizationType as T

    blocks = {T.Q8_0: WeightFormat.Q8_0, T.Q2_K: WeightFormat.Q2_K, T.IQ2_XXS: WeightFormat.IQ2_XXS}
    plain = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16,
             T.I8: torch.int8, T.I16: torch.int16, T.I32: torch.int32, T.I64: torch.int64}
    return blocks, plain


@dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor: logical shape (row-major, GGML's reversed), type, file data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: Any
    data: np.ndarray  # memory-mapped: raw blocks [..., row bytes] or the plain values
    file: Path

    def torch(self) -> torch.Tensor:
        t = torch.from_numpy(self.data)  # shares the mapping: no read, no copy yet
        return t.view(torch.bfloat16) if self.ggml_type.name == "BF16" else t


class _Files:
    """The tensors of the main GGUF and the optional MTP GGUF, by name."""

    def __init__(self, path: Path, mtp_path: Path | None) -> None:
        from gguf import GGUFReader

        self.paths = [path] + ([mtp_path] if mtp_path else [])
        self.readers = []
        self.tensors: dict[str, _Tensor] = {}
        for file in self.paths:
            if not is_gguf_file(file):
                raise GGUFError(f"{file}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
            # "c": copy-on-write mapping, writable for torch.from_numpy, never written back
            reader = GGUFReader(file, "c")
            self.readers.append(reader)
            for t in reader.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{t.name}: in both {self.tensors[t.name].file} and {file}")
                shape = tuple(int(n) for n in reversed(t.shape))
                self.tensors[t.name] = _Tensor(t.name, shape, t.tensor_type, t.data, file)
        self.fields = self.readers[0].fields

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


# ---------------------------------------------------------------------------------------------
# Configuration from the `deepseek4.*` metadata (the keys ds4's `config_validate_model` reads)
# ---------------------------------------------------------------------------------------------
CONFIG_KEYS = {  # ModelConfig field -> key after `deepseek4.`
    "num_hidden_layers": "block_count",
    "hidden_size": "embedding_length",
    "vocab_size": "vocab_size",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "qk_rope_head_dim": "rope.dimension_count",
    "q_lora_rank": "attention.q_lora_rank",
    "o_lora_rank": "attention.output_lora_rank",
    "o_groups": "attention.output_group_count",
    "sliding_window": "attention.sliding_window",
    "index_n_heads": "attention.indexer.head_count",
    "index_head_dim": "attention.indexer.key_length",
    "index_topk": "attention.indexer.top_k",
    "n_routed_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "n_shared_experts": "expert_shared_count",
    "num_hash_layers": "hash_layer_count",
    "routed_scaling_factor": "expert_weights_scale",
    "norm_topk_prob": "expert_weights_norm",
    "hc_mult": "hyper_connection.count",
    "hc_sinkhorn_iters": "hyper_connection.sinkhorn_iterations",
    "hc_eps": "hyper_connection.epsilon",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "compress_rope_theta": "attention.compress_rope_freq_base",
    "rope_factor": "rope.scaling.factor",
    "rope_original_max_position_embeddings": "rope.scaling.original_context_length",
    "rope_beta_fast": "rope.scaling.yarn_beta_fast",
    "rope_beta_slow": "rope.scaling.yarn_beta_slow",
}
VALUE_LENGTH_KEY = "attention.value_length"  # must equal key_length: V = K in V4
RATIOS_KEY = "attention.compress_ratios"
SWIGLU_KEY = "swiglu_clamp_exp"  # one per layer, all equal in V4
OPTIONAL_KEYS = {  # read when present (ds4 prints context_length, never requires it)
    "max_position_embeddings": f"{ARCH}.context_length",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
}


def _field(fields: dict[str, Any], key: str, path: Path, required: bool = True) -> Any:
    if key not in fields:
        if required:
            raise GGUFError(f"{path}: metadata key {key} is missing")
        return None
    value = fields[key].contents()
    if isinstance(value, float):
        # GGUF floats are float32: take the shortest decimal that rounds to it (1e-06, not
        # 9.99999997e-07), the value config.json would hold.
        value = float(str(np.float32(value)))
    return value


def config_from_gguf(fields: dict[str, Any], path: Path, num_mtp: int,
                     **overrides: Any) -> ModelConfig:
    """ModelConfig from ds4's metadata; `num_mtp` MTP blocks (1 with an MTP file, else 0)."""
    arch = _field(fields, "general.architecture", path)
    if arch != ARCH:
        raise GGUFError(f"{path}: general.architecture is {arch!r}, this engine reads {ARCH!r}")
    kw: dict[str, Any] = {k: _field(fields, f"{ARCH}.{key}", path) for k, key in CONFIG_KEYS.items()}
    if (v := _field(fields, f"{ARCH}.{VALUE_LENGTH_KEY}", path)) != kw["head_dim"]:
        raise GGUFError(f"{path}: {ARCH}.{VALUE_LENGTH_KEY} {v} differs from key_length "
                        f"{kw['head_dim']} (V4 uses one latent as key and value)")
    for key in ("expert_group_count", "expert_group_used_count"):
        if (v := _field(fields, f"{ARCH}.{key}", path, required=False)) not in (None, 0):
            raise GGUFError(f"{path}: {ARCH}.{key} is {v}; V4 routes without expert groups (0)")
    layers = kw["num_hidden_layers"]
    ratios = [int(r) for r in _field(fields, f"{ARCH}.{RATIOS_KEY}", path)]
    if len(ratios) < layers:
        raise GGUFError(f"{path}: {ARCH}.{RATIOS_KEY} has {len(ratios)} values for {layers} layers")
    # The MTP block's ratio follows the layers' when the file lists it; V4-Flash's is 0
    # (sliding window only: the last entry of its config.json), which is the default here.
    ratios += [RATIO_WINDOW] * max(0, layers + num_mtp - len(ratios))
    clamps = {float(c) for c in _field(fields, f"{ARCH}.{SWIGLU_KEY}", path)[:layers]}
    if len(clamps) != 1:
        raise GGUFError(f"{path}: {ARCH}.{SWIGLU_KEY} differs between layers ({sorted(clamps)});"
                        f" this engine has one swiglu_limit")
    for k, key in OPTIONAL_KEYS.items():
        if (v := _field(fields, key, path, required=False)) is not None:
            kw[k] = int(v)
    kw.update(compress_ratios=tuple(ratios), swiglu_limit=float(str(np.float32(clamps.pop()))),
              num_nextn_predict_layers=num_mtp, norm_topk_prob=bool(kw["norm_topk_prob"]),
              expert_dtype=None, quantization_config=None)
    kw.update(overrides)
    return ModelConfig(**kw)


# ---------------------------------------------------------------------------------------------
# The embedding, kept in its stored dtype
# ---------------------------------------------------------------------------------------------
class StoredEmbedding(nn.Embedding):
    """An embedding table kept in its stored dtype (ds4's F16, when bf16 cannot hold all its
    values); the rows it looks up are cast to the activation dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(*weight.shape, _weight=weight, _freeze=True, device=weight.device,
                         dtype=weight.dtype)
        self.out_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.out_dtype)


# ---------------------------------------------------------------------------------------------
# Plan (every check, no weight read) and load
# ---------------------------------------------------------------------------------------------
def _linear_format(t: _Tensor) -> WeightFormat:
    blocks, plain = _ggml_types()
    if t.ggml_type in blocks:
        return blocks[t.ggml_type]
    if plain.get(t.ggml_type) in fm.DENSE_DTYPES:
        return WeightFormat.DENSE
    raise GGUFError(f"{t.name}: GGML type {t.ggml_type.name} is not read by this engine "
                    f"(projections: Q8_0, Q2_K, IQ2_XXS, F16, BF16, F32)")


def _stored_shape(t: _Tensor, fmt: WeightFormat) -> tuple[int, ...]:
    """The shape the Linear receives: [.., out, row bytes] for blocks, else the logical one."""
    return tuple(t.data.shape) if fmt in fm.GGML_BLOCKS else t.shape


def _plan(modules: dict[str, nn.Module], files: _Files, num_experts: int) -> dict[str, Any]:
    _, plain = _ggml_types()
    plan: dict[str, Any] = {}
    used: set[str] = set()
    problems: list[str] = []

    def find(official: str) -> tuple[_Tensor | None, int | None]:
        try:
            name, expert = ds4_name(official)
        except GGUFError as e:
            problems.append(str(e))
            return None, None
        used.add(name)
        if name not in files.tensors:
            problems.append(f"{name}: missing from the GGUF (the model's {official})")
            return None, None
        return files.tensors[name], expert

    for mpath, module in modules.items():
        prefix = f"{mpath}." if mpath else ""
        if isinstance(module, Linear):
            t, expert = find(f"{prefix}weight")
            if t is not None:
                try:
                    fmt = _linear_format(t)
                    shape = _stored_shape(t, fmt)
                    dtype = torch.uint8 if fmt in fm.GGML_BLOCKS else plain[t.ggml_type]
                    if expert is not None:
                        if len(shape) != 3 or shape[0] != num_experts:
                            raise GGUFError(f"{t.name}: expected {num_experts} stacked experts "
                                            f"[E, out, in], found shape {list(t.shape)}")
                        shape = shape[1:]
                    module.check_stored(fmt, {"weight": t.name}, {"weight": (shape, dtype)})
                    plan[mpath] = (t, expert, fmt)
                except (TypeError, ValueError) as e:
                    problems.append(str(e))
        for leaf, target, _ in _own_tensors(module):
            t, _ = find(prefix + leaf)
            if t is None:
                continue
            if t.ggml_type not in plain:
                problems.append(f"{t.name}: expected a plain tensor, found GGML type {t.ggml_type.name}")
            elif t.shape != tuple(target.shape):
                problems.append(f"{t.name}: expected shape {list(target.shape)}, found {list(t.shape)}")
            elif plain[t.ggml_type].is_floating_point != target.dtype.is_floating_point:
                problems.append(f"{t.name}: expected {target.dtype}, found {t.ggml_type.name}")
            else:
                plan[prefix + leaf] = t
    problems += [f"{n}: unexpected tensor (no model parameter has this ds4 name)"
                 for n in sorted(set(files.tensors) - used)]
    problems = list(dict.fromkeys(problems))  # a bad stack is every one of its experts' problem
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise GGUFError(f"{', '.join(map(str, files.paths))} does not match the model:\n  {shown}{more}")
    return plan


def _exact_cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """`value` in `dtype` when that changes no value (widening, or values that fit), else None."""
    if value.dtype == dtype:
        return value
    cast = value.to(dtype)
    back = cast.to(value.dtype)
    same = (back == value) | (back.isnan() & value.isnan()) if value.is_floating_point() else back == value
    return cast if bool(same.all()) else None


def load_gguf(model: Transformer, path: str | os.PathLike, mtp_path: str | os.PathLike | None = None,
              device: str | torch.device | None = None, progress: bool | None = None) -> None:
    """Fill `model` (built on meta) from ds4's GGUF at `path` (+ its MTP file)."""
    _load(model, _Files(Path(path), Path(mtp_path) if mtp_path else None), device, progress)


def load_gguf_model(path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.bfloat16, progress: bool | None = None,
                    mtp_path: str | os.PathLike | None = None, **config_overrides: Any) -> Transformer:
    """Config from the GGUF's metadata, the model built on meta, then filled from the file(s).

    `config_overrides` go to ModelConfig (e.g. `qat=False`)."""
    files = _Files(Path(path), Path(mtp_path) if mtp_path else None)
    main_names = [t.name for t in files.tensors.values() if t.file == Path(path)]
    if main_names and all(n.startswith("mtp.") for n in main_names):
        raise GGUFError(f"{path} holds only the MTP block (mtp.* tensors): give the main GGUF "
                        f"as the model and this file as its mtp_path")
    config = config_from_gguf(files.fields, Path(path), num_mtp=1 if mtp_path else 0,
                              **config_overrides)
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    _load(model, files, device, progress)
    return model.eval()


def _load(model: Transformer, files: _Files, device: str | torch.device | None,
          progress: bool | None) -> None:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules = dict(model.named_modules())
    plan = _plan(modules, files, model.config.n_routed_experts)
    show = files.size() > PROGRESS_MIN_BYTES if progress is None else progress
    groups = _groups(model)
    for key in tqdm(groups, desc="loading GGUF", unit="layer", disable=not show):
        stacks: dict[str, torch.Tensor] = {}  # this layer's stacked experts, on the device once
        for mpath in groups[key]:
            module = modules[mpath]
            prefix = f"{mpath}." if mpath else ""
            if mpath in plan:
                t, expert, fmt = plan[mpath]
                if expert is None:
                    w = t.torch().to(device)
                else:
                    if t.name not in stacks:
                        stacks[t.name] = t.torch().to(device)
                    w = stacks[t.name][expert]  # a view
                name = t.name if expert is None else f"{t.name}[{expert}]"
                if fmt in fm.GGML_BLOCKS:
                    module.load_ggml(fmt, w, name=name)
                else:
                    module.load_dense(w, name=name)
            for leaf, target, is_param in _own_tensors(module):
                value = plan[prefix + leaf].torch().to(device)
                cast = _exact_cast(value, target.dtype)
                if cast is None and isinstance(module, nn.Embedding):
                    parent, _, attr = mpath.rpartition(".")
                    setattr(modules[parent] if parent else model, attr,
                            StoredEmbedding(value, model.dtype))
                    continue
                value = value if cast is None else cast  # RMSNorm reads weight.float()
                if is_param:
                    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[leaf] = value
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise GGUFError(f"still on the meta device after loading: {left[:10]}")
