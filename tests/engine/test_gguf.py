"""engine/gguf.py: ds4's GGUF, as `make_checkpoint --format gguf` writes it, loads into the
model with ds4's types kept; its logits equal those of the same model loaded from a
dequantised twin (every GGML block decoded by the `gguf` package's numpy code, written as an
official-layout F32 checkpoint), and greedy generation matches. Broken files are refused
before any weight is read, naming the tensor."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from safetensors.torch import save_file

from dsml.tokenizer import load_tokenizer
from engine.formats import WeightFormat
from engine.gguf import (
    GGUFError,
    StoredEmbedding,
    config_from_gguf,
    ds4_name,
    is_gguf_file,
    load_gguf_model,
)
from engine.make_checkpoint import (
    GGUF_FILE,
    GGUF_MTP_FILE,
    GgufTensor,
    _gguf_metadata,
    gguf_config,
    gguf_tensors,
    main,
    release_layout,
    write_gguf_file,
)
from engine.runtime import Engine
from engine.sampling import SamplingParams
from engine.weights import load_model

SEED = 5
PROMPT = [0, 5, 7, 9, 100, 2000, 31, 4]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    main(["--config", "tiny", "--format", "gguf", "--out", str(out), "--seed", str(SEED)])
    return out


@pytest.fixture(scope="module")
def tensors() -> list[GgufTensor]:
    return list(gguf_tensors(gguf_config(), SEED))


@pytest.fixture(scope="module")
def twin(tmp_path_factory, tensors):
    """The official layout, every tensor F32 as the gguf package decodes the GGUF's."""
    out = tmp_path_factory.mktemp("twin")
    dense: dict[str, torch.Tensor] = {}
    for t in tensors:
        if t.fmt is not None:
            values = quants.dequantize(t.data, GGMLQuantizationType[t.fmt.name])
        else:
            values = t.data.astype(np.float32 if t.data.dtype.kind == "f" else np.int64)
        values = torch.from_numpy(np.ascontiguousarray(values))
        for k, name in enumerate(t.official):
            dense[name] = values[k].clone() if len(t.official) > 1 else values
    save_file(dense, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(gguf_config().to_hf_dict()))
    return out


# -- names --------------------------------------------------------------------------------


def test_names_are_ds4_s():
    """A few names as ds4.c's weights_bind spells them."""
    assert ds4_name("embed.weight") == ("token_embd.weight", None)
    assert ds4_name("hc_head_fn") == ("output_hc_fn.weight", None)
    assert ds4_name("layers.7.attn.wq_a.weight") == ("blk.7.attn_q_a.weight", None)
    assert ds4_name("layers.2.attn.indexer.weights_proj.weight") == ("blk.2.indexer.proj.weight", None)
    assert ds4_name("layers.2.attn.indexer.compressor.ape") == (
        "blk.2.indexer_compressor_ape.weight", None)
    assert ds4_name("layers.0.ffn.gate.tid2eid") == ("blk.0.ffn_gate_tid2eid.weight", None)
    assert ds4_name("layers.4.ffn.gate.bias") == ("blk.4.exp_probs_b.bias", None)
    assert ds4_name("layers.3.ffn.shared_experts.w3.weight") == ("blk.3.ffn_up_shexp.weight", None)
    assert ds4_name("layers.3.ffn.experts.11.w1.weight") == ("blk.3.ffn_gate_exps.weight", 11)
    assert ds4_name("layers.3.ffn.experts.0.w2.weight") == ("blk.3.ffn_down_exps.weight", 0)
    assert ds4_name("mtp.0.ffn.experts.2.w3.weight") == ("mtp.0.ffn_up_exps.weight", 2)
    assert ds4_name("mtp.0.hc_head_fn") == ("mtp.0.hc_head_fn.weight", None)
    assert ds4_name("mtp.0.attn.attn_sink") == ("mtp.0.attn_sinks.weight", None)
    with pytest.raises(GGUFError, match=r"layers\.0\.attn\.nope: no ds4 GGUF name"):
        ds4_name("layers.0.attn.nope")
    with pytest.raises(GGUFError, match="no ds4 GGUF name"):
        ds4_name("layers.0.e_proj.weight")  # an MTP-only tensor in a main layer


def test_every_release_tensor_has_its_own_ds4_name():
    c = gguf_config()
    seen: dict[tuple[str, int | None], str] = {}
    for spec in release_layout(c):
        key = ds4_name(spec.name)
        assert key not in seen, (spec.name, seen.get(key))
        seen[key] = spec.name


# -- the file ------------------------------------------------------------------------------


def test_file_holds_ds4_s_types(gguf_dir):
    assert is_gguf_file(gguf_dir / GGUF_FILE) and not is_gguf_file(gguf_dir)
    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf_dir / GGUF_FILE).tensors}
    expected = {
        "token_embd.weight": "F16", "output.weight": "Q8_0", "output_norm.weight": "F32",
        "output_hc_fn.weight": "F16", "output_hc_base.weight": "F32",
        "blk.0.ffn_gate_exps.weight": "IQ2_XXS", "blk.0.ffn_up_exps.weight": "IQ2_XXS",
        "blk.0.ffn_down_exps.weight": "Q2_K", "blk.0.attn_q_a.weight": "Q8_0",
        "blk.0.attn_output_a.weight": "Q8_0", "blk.0.ffn_gate_shexp.weight": "Q8_0",
        "blk.0.attn_norm.weight": "F32", "blk.0.attn_sinks.weight": "F32",
        "blk.0.hc_attn_fn.weight": "F16", "blk.0.ffn_gate_inp.weight": "F16",
        "blk.0.ffn_gate_tid2eid.weight": "I32", "blk.2.exp_probs_b.bias": "F32",
        "blk.2.indexer.attn_q_b.weight": "F16", "blk.2.attn_compressor_kv.weight": "F16",
        "blk.2.attn_compressor_ape.weight": "F16",
    }
    assert {n: types[n] for n in expected} == expected
    assert not any(n.startswith("mtp.") for n in types)
    mtp = {t.name: t.tensor_type.name for t in GGUFReader(gguf_dir / GGUF_MTP_FILE).tensors}
    assert mtp["mtp.0.e_proj.weight"] == "Q8_0" and mtp["mtp.0.ffn_down_exps.weight"] == "Q2_K"
    assert all(n.startswith("mtp.0.") for n in mtp)
    gate = GGUFReader(gguf_dir / GGUF_FILE).get_tensor(0)  # GGML order is reversed
    assert gate.name == "token_embd.weight" and list(gate.shape) == [256, 129280]


@pytest.fixture(scope="module")
def model(gguf_dir):
    return load_gguf_model(gguf_dir / GGUF_FILE, device="cpu", dtype=torch.float32,
                           mtp_path=gguf_dir / GGUF_MTP_FILE)


def test_config_comes_from_the_metadata(model, gguf_dir, capsys):
    assert model.config == gguf_config()
    without_mtp = load_gguf_model(gguf_dir / GGUF_FILE, device="cpu", dtype=torch.float32,
                                  progress=True)
    assert without_mtp.config.num_nextn_predict_layers == 0 and len(without_mtp.mtp) == 0
    assert "loading GGUF" in capsys.readouterr().err  # the progress bar


def test_metadata_keys_ds4_requires_and_those_it_does_not(gguf_dir):
    path = gguf_dir / GGUF_FILE
    fields = dict(GGUFReader(path).fields)
    assert config_from_gguf(fields, path, num_mtp=1) == gguf_config()
    assert fields["deepseek4.context_length"].contents() == gguf_config().max_position_embeddings
    optional = {k: v for k, v in fields.items() if k != "deepseek4.context_length"}
    assert config_from_gguf(optional, path, num_mtp=0).num_nextn_predict_layers == 0
    without = {k: v for k, v in fields.items() if k != "deepseek4.attention.q_lora_rank"}
    with pytest.raises(GGUFError, match=r"deepseek4\.attention\.q_lora_rank is missing"):
        config_from_gguf(without, path, num_mtp=0)


def test_weights_keep_ds4_s_types_and_experts_are_views(model, gguf_dir):
    layer = model.layers[2]
    assert layer.attn.wq_a.format == WeightFormat.Q8_0 and layer.attn.wq_a.weight.dtype == torch.uint8
    assert model.head.format == WeightFormat.Q8_0
    assert layer.ffn.experts[0].w1.format == WeightFormat.IQ2_XXS
    assert layer.ffn.experts[0].w3.format == WeightFormat.IQ2_XXS
    assert layer.ffn.experts[0].w2.format == WeightFormat.Q2_K
    assert model.mtp[0].ffn.experts[1].w2.format == WeightFormat.Q2_K
    assert layer.attn.indexer.wq_b.format == WeightFormat.DENSE
    assert layer.attn.indexer.wq_b.weight.dtype == torch.float16  # F16 Linears stay F16
    assert layer.ffn.gate.weight.dtype == torch.float16
    # the stacked tensor's slices, sharing one storage (no per-expert copy)
    w1 = [e.w1.weight for e in layer.ffn.experts]
    assert len({w.untyped_storage().data_ptr() for w in w1}) == 1
    stack = next(t for t in GGUFReader(gguf_dir / GGUF_FILE).tensors
                 if t.name == "blk.2.ffn_gate_exps.weight")
    assert torch.equal(w1[5], torch.from_numpy(np.array(stack.data[5])))


def _greedy_logits(m, steps: int, mtp: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    state = m.new_state(1, 64)
    logits, hidden = m(torch.tensor([PROMPT]), state, return_hidden=True)
    out = [logits]
    for _ in range(steps):
        token = out[-1][:, -1].argmax(-1, keepdim=True)
        out.append(m(token, state))
    draft = m.forward_mtp(torch.tensor([[*PROMPT[1:], 0]]), hidden, state) if mtp else None
    return out, draft


def _twin_model(twin: Path):
    """The twin, its tensors copied into fresh memory: CPU GEMM's blocking follows the
    operands' alignment (a tensor read from a file can sit 32, not 64, bytes aligned), which
    reorders fp32 sums by ~1e-6; the GGUF model's tensors are decoded or cast into fresh
    allocations, so fresh copies make the two runs the same ops on the same values."""
    reference = load_model(twin, device="cpu", dtype=torch.float32)
    for module in reference.modules():
        for leaf, p in module.named_parameters(recurse=False):
            module._parameters[leaf] = torch.nn.Parameter(p.clone(), requires_grad=False)
    return reference


def test_logits_equal_the_dequantised_twin_s(model, twin):
    reference = _twin_model(twin)
    assert reference.layers[0].ffn.experts[0].w1.weight.dtype == torch.float32
    got, got_draft = _greedy_logits(model, 4, mtp=True)
    want, want_draft = _greedy_logits(reference, 4, mtp=True)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # the same values in the same fp32 ops
    assert torch.equal(got_draft, want_draft)
    assert 0.05 < got[0].std() < 20  # O(1) logits: a model, not noise or zeros


def _generate(engine: Engine) -> list[int]:

    async def run() -> list[int]:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        return [t async for t in engine.generate(PROMPT, params)]

    try:
        return asyncio.run(run())
    finally:
        engine.close()


def test_serving_the_gguf_file_generates_the_twin_s_greedy_tokens(gguf_dir, twin):
    # through load_model's dispatch on the file's magic
    tokens = _generate(Engine.from_checkpoint(gguf_dir / GGUF_FILE, device="cpu", dtype=torch.float32))
    assert len(tokens) == 6
    assert tokens == _generate(Engine(_twin_model(twin), load_tokenizer(), "cpu"))


def test_bf16_keeps_the_f16_embedding(gguf_dir, model):
    bf16 = load_gguf_model(gguf_dir / GGUF_FILE, device="cpu", dtype=torch.bfloat16)
    assert isinstance(bf16.embed, StoredEmbedding) and bf16.embed.weight.dtype == torch.float16
    stored = next(t for t in GGUFReader(gguf_dir / GGUF_FILE).tensors if t.name == "token_embd.weight")
    assert torch.equal(bf16.embed.weight, torch.from_numpy(np.array(stored.data)))
    ids = torch.tensor([[3, 129279]])
    assert bf16.embed(ids).dtype == torch.bfloat16
    assert torch.equal(bf16.embed(ids), model.embed(ids).to(torch.bfloat16))
    assert bf16.layers[0].attn_norm.weight.dtype == torch.bfloat16  # ones: exact in bf16
    # runs on bf16 activations (not compared with fp32: in a random tiny model bf16 rounding
    # flips near-tied routing and indexer choices, so the two runs legitimately part ways)
    logits = bf16(torch.tensor([PROMPT]), bf16.new_state(1, 16), last_only=True)
    assert torch.isfinite(logits).all() and 0.05 < logits.std() < 20


# -- refusals ------------------------------------------------------------------------------


def _variant(tmp_path: Path, tensors: list[GgufTensor], **metadata) -> Path:
    main_tensors = [t for t in tensors if not t.name.startswith("mtp.")]
    return write_gguf_file(tmp_path / "v.gguf", main_tensors, gguf_config().replace(**metadata))


def test_refuses_a_missing_tensor(tmp_path, tensors):
    path = _variant(tmp_path, [t for t in tensors if t.name != "blk.3.attn_kv.weight"])
    with pytest.raises(GGUFError, match=r"blk.3.attn_kv.weight: missing from the GGUF \(the model's layers.3.attn.wkv.weight\)"):
        load_gguf_model(path, device="cpu")


def test_refuses_an_unknown_tensor(tmp_path, tensors):
    extra = GgufTensor("blk.1.attn_q.weight", None, np.zeros((4, 4), np.float32), ("?",))
    with pytest.raises(GGUFError, match=r"blk\.1\.attn_q\.weight: unexpected tensor"):
        load_gguf_model(_variant(tmp_path, [*tensors, extra]), device="cpu")


def _write_raw(path: Path, entries: list[tuple[str, np.ndarray, GGMLQuantizationType | None]]) -> Path:
    writer = GGUFWriter(path, "deepseek4")
    _gguf_metadata(writer, gguf_config())
    for name, data, raw_type in entries:
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_refuses_an_unsupported_type_and_a_wrong_shape(tmp_path, tensors):
    entries = []
    for t in tensors:
        if t.name.startswith("mtp."):
            continue
        data, kind = t.data, None if t.fmt is None else GGMLQuantizationType[t.fmt.name]
        if t.name == "blk.1.ffn_up_exps.weight":  # Q4_K experts (ds4's 4-bit family)
            kind = GGMLQuantizationType.Q4_K
            values, size = gguf.GGML_QUANT_SIZES[kind]
            data = np.zeros((16, 256, 256 // values * size), np.uint8)  # zero blocks
        elif t.name == "blk.0.attn_q_a.weight":
            data = data[:-1]  # one row short
        elif t.name == "blk.2.ffn_down_exps.weight":
            data = data[:15]  # an expert short
        entries.append((t.name, data, kind))
    with pytest.raises(GGUFError) as e:
        load_gguf_model(_write_raw(tmp_path / "v.gguf", entries), device="cpu")
    assert "blk.1.ffn_up_exps.weight: GGML type Q4_K is not read by this engine" in str(e.value)
    assert "blk.0.attn_q_a.weight: expected shape [128, 272], found [127, 272]" in str(e.value)
    stack = "blk.2.ffn_down_exps.weight: expected 16 stacked experts [E, out, in], found shape"
    assert str(e.value).count(stack) == 1  # once, not once per expert


def test_refuses_other_files(tmp_path, gguf_dir):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf_model(not_gguf, device="cpu")
    assert not is_gguf_file(not_gguf)
    with pytest.raises(GGUFError, match="holds only the MTP block"):
        load_gguf_model(gguf_dir / GGUF_MTP_FILE, device="cpu")
    path = write_gguf_file(tmp_path / "a.gguf", [], None)  # no deepseek4 metadata
    with pytest.raises(GGUFError, match=r"metadata key deepseek4.block_count is missing"):
        load_gguf_model(path, device="cpu")
