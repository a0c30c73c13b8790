"""Compile every kernel for sm_90 without a GPU and report its registers and spills.

    python -m bench.kernels.compile_check          # Triton's bundled ptxas / cuobjdump
    python -m bench.kernels.compile_check --pdl    # as launched with PDL (checks the PTX waits)

Triton's NVIDIA backend (LLVM, ptxas) ships in the wheel, so the GPU path can be compiled on
a CPU-only machine: this catches what the interpreter cannot (layouts, shared memory over
the 227 KB limit, register spills) before GPU time is spent. Each kernel is compiled with
its launcher's tile sizes at V4-Flash shapes, bf16; `cuobjdump -res-usage` gives REG (per
thread, 255 max) and STACK (bytes a thread spills to local memory; 0 is the goal).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.kernels import (
    cache_rows,
    fp4_roundtrip,
    fp8_roundtrip,
    grouped_experts,
    hc,
    indexer_scores,
    indexer_topk,
    moe_router,
    rmsnorm_rope,
    routed_experts,
)
from engine.kernels import decode_attention as da
from engine.kernels import fp8_linear as fl

BF, F32, I64, I32, FP = "*bf16", "*fp32", "*i64", "i32", "fp32"
SM90_SHARED_BYTES = 232448  # a block's shared memory limit on the H100 / H200


def compile_kernel(name: str, wrapper, types: dict, consts: dict, num_warps: int,
                   pdl: bool = False, num_stages: int = 3) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from engine.kernels._triton import _bind

    fn = wrapper.fn  # engine.kernels._triton.jit, or a materialised LazyModule kernel
    _bind(fn.__globals__, triton)  # tl and the shared device functions
    kernel = triton.jit(fn)
    if pdl:
        consts = {**consts, "PDL": True}
    signature = {a: "constexpr" if a in consts else types.get(a, "constexpr")
                 for a in kernel.arg_names}  # PDL's default, when not given
    consts = {**consts, **{a: False for a in signature if a not in consts and a not in types}}
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": num_warps,
                                                               "num_stages": num_stages})
    # as a launch specialises them at V4's shapes: 16-byte aligned pointers, strides that are
    # multiples of 16 (without the hint no load is vectorised: the FP8 tile loaded byte by
    # byte took every register and spilled, which the launched kernel does not)
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]]
             for a, t in signature.items() if t.startswith("*") or a.startswith("stride")}
    src = triton.compiler.ASTSource(fn=kernel, constexprs=consts, signature=signature,
                                    attrs=attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = int(usage.split("REG:")[1].split()[0])
    stack = int(usage.split("STACK:")[1].split()[0])
    if pdl and "griddepcontrol.wait" not in compiled.asm["ptx"]:
        raise AssertionError(f"{name}: compiled with PDL but its PTX has no griddepcontrol.wait")
    return {"kernel": name, "warps": num_warps, "regs": regs, "spill_bytes": stack,
            "shared_bytes": compiled.metadata.shared}  # fmt: skip


def kernels() -> list[tuple]:
    """(name, kernel, argument types, constexprs, warps[, stages]) as the launchers use them."""
    strides = lambda *names: {n: I32 for n in names}  # noqa: E731
    attn = dict(
        q_ptr=BF,
        window_ptr=BF,
        entries_ptr=BF,
        slots_ptr=I64,
        pos_ptr=I64,
        idx_ptr=I64,
        sink_ptr=F32,
        out_ptr=BF,
        part_o_ptr=F32,
        part_ml_ptr=F32,
        cos_ptr=F32,
        sin_ptr=F32,
        num_heads=I32,
        head_dim=I32,
        window=I32,
        num_sel=I32,
        keys_per_split=I32,
        qk_scale=FP,
        rope_half=I32,
        **strides(
            "stride_q_b",
            "stride_q_h",
            "stride_w_s",
            "stride_w_w",
            "stride_e_s",
            "stride_e_n",
            "stride_i_b",
            "stride_o_b",
            "stride_o_h",
            "stride_c_b",
        ),
    )
    attn_c = dict(
        BLOCK_H=da.DEFAULT_BLOCK_H,
        BLOCK_N=da.DEFAULT_BLOCK_N,
        BLOCK_D=512,
        HAS_ENTRIES=True,
        ONE_SPLIT=False,
        DOT_PRECISION=None,
        UPCAST_DOT=False,
        ROPE=True,
        ROUND_BF16=True,
    )
    combine = dict(
        part_o_ptr=F32,
        part_ml_ptr=F32,
        sink_ptr=F32,
        out_ptr=BF,
        cos_ptr=F32,
        sin_ptr=F32,
        num_heads=I32,
        head_dim=I32,
        num_splits=I32,
        rope_half=I32,
        **strides("stride_o_b", "stride_o_h", "stride_c_b"),
    )
    mixes = dict(
        h_ptr=BF,
        fn_ptr=F32,
        part_ptr=F32,
        sq_ptr=F32,
        y_ptr=BF,
        res_ptr=BF,
        post_ptr=F32,
        comb_ptr=F32,
        num_tokens=I32,
        num_mix=I32,
        K=I32,
        hidden=I32,
        **strides("stride_h_n", "stride_fn_m", "stride_y_n", "stride_r_n", "stride_r_s"),
    )
    mixes_c = dict(S=4, BLOCK_T=16, BLOCK_M=32, BLOCK_K=hc.BLOCK_K, ROUND_BF16=True)
    finish = dict(
        h_ptr=BF,
        part_ptr=F32,
        sq_ptr=F32,
        scale_ptr=F32,
        base_ptr=F32,
        x_ptr=BF,
        normw_ptr=BF,
        post_ptr=F32,
        comb_ptr=F32,
        num_streams=I32,
        hidden=I32,
        num_parts=I32,
        rms_eps=FP,
        hc_eps=FP,
        sinkhorn_iters=I32,
        norm_eps=FP,
        **strides("stride_h_n", "stride_h_s", "stride_x_n"),
    )
    finish_c = dict(BLOCK_S=4, BLOCK_P=128, BLOCK_M=32, BLOCK_HID=4096, NORM=True,
                    ROUND_BF16=True)
    post = dict(
        y_ptr=BF,
        res_ptr=BF,
        post_ptr=F32,
        comb_ptr=F32,
        out_ptr=BF,
        hidden=I32,
        **strides("stride_y_n", "stride_r_n", "stride_r_s", "stride_o_n", "stride_o_s"),
    )
    scores = dict(
        q_ptr=BF,
        keys_ptr=BF,
        slots_ptr=I64,
        pos_ptr=I64,
        w_ptr=F32,
        out_ptr=F32,
        num_heads=I32,
        head_dim=I32,
        num_entries=I32,
        ratio=I32,
        weight_scale=FP,
        **strides(
            "stride_q_b", "stride_q_h", "stride_k_s", "stride_k_n", "stride_w_b", "stride_o_b"
        ),
    )
    topk = dict(
        scores_ptr=F32, out_ptr=I64, num_entries=I32, k=I32, **strides("stride_s_b", "stride_o_b")
    )
    norm = dict(
        x_ptr=BF,
        w_ptr=BF,
        cos_ptr=F32,
        sin_ptr=F32,
        out_ptr=BF,
        num_heads=I32,
        head_dim=I32,
        rope_half=I32,
        eps=FP,
        **strides("stride_x_n", "stride_x_h", "stride_c_n", "stride_o_n", "stride_o_h"),
    )
    norm_c = dict(NORM=True, HAS_WEIGHT=True, INVERSE=False, ROUND_BF16=True)
    rows = dict(
        x_ptr=BF, w_ptr=BF, cos_ptr=F32, sin_ptr=F32, out_ptr=BF, slot_ptr=I64, row_ptr=I64,
        num_rows=I32, heads=I32, dim=I32, rope_half=I32, eps=FP, hadamard_scale=FP,
        **strides("stride_x_n", "stride_x_h", "stride_c_n", "stride_o_a", "stride_o_b"),
    )
    fl._lazy.materialize()  # its kernel and helpers jitted in place (a LazyModule)
    fp8 = dict(
        x_ptr=BF, w_ptr="*fp8e4nv", s_ptr="*u8", out_ptr=BF, part_ptr=F32, count_ptr="*i32",
        M=I32, N=I32, K=I32, kb_per_split=I32, u_offset=I32,
        **strides("stride_xm", "stride_xg", "stride_xk", "stride_wn", "stride_sn", "stride_sk",
                  "stride_ps", "stride_om", "stride_og", "stride_on"),
    )
    fp8_c = dict(BLOCK_M=16, BLOCK_N=32, USE_DOT=False, ACT_QUANT=False, DOT_F32=False,
                 EVEN_K=True, SPLIT=True, SWIGLU=False, ROUND_BF16=True)
    router = dict(
        x_ptr=BF, w_ptr=BF, out_ptr=F32, count_ptr="*i32", bias_ptr=F32, table_ptr=I64,
        ids_ptr=I64, experts_ptr=I64, weights_ptr=F32, E=I32, H=I32, K=I32, V=I32,
        scaling=FP, **strides("stride_x_t", "stride_w_e", "stride_out_t"),
    )
    router_c = dict(BLOCK_E=moe_router.BLOCK_E, BLOCK_K=moe_router.MAX_BLOCK_K, TOPK=True,
                    HASH=False, NORM=True, BLOCK_ALL_E=256, BLOCK_TOPK=8)
    rows_c = dict(NORM=True, HAS_WEIGHT=True, ROUND_X=True, SCATTER=True, ROUND_OUT=True)
    gate_up = dict(
        xt_ptr=F32, xs_ptr=F32, w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", experts_ptr=I64,
        weights_ptr=F32, h_ptr=F32, hs_ptr=F32, num_experts=I32, K=I32, inter=I32,
        n_words=I32, num_pairs=I32, limit=FP,
        **strides("stride_xt_t", "stride_xt_j", "stride_xs_t", "stride_w_row",
                  "stride_s_row", "stride_z_row"),
    )
    down = dict(
        h_ptr=F32, hs_ptr=F32, w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", experts_ptr=I64,
        part_ptr=F32, count_ptr="*i32", add_ptr=BF, y_ptr=BF, num_experts=I32, K=I32, H=I32,
        inter=I32, n_words=I32, num_tokens=I32,
        **strides("stride_w_row", "stride_s_row", "stride_z_row", "stride_add_t",
                  "stride_y_t"),
    )
    import triton.language as tl

    int2 = dict(FORMAT=routed_experts.FMT_INT2, PW=16, OUT_DTYPE=tl.bfloat16)
    experts = [
        (f"routed {kind} INT2 {c['BLOCK_N']}x{c['BLOCK_W']}" + (" prefetch" if c["PREFETCH"]
                                                               else ""),
         kernel, types, {**int2, **extra, "BLOCK_N": c["BLOCK_N"], "BLOCK_W": c["BLOCK_W"],
                         "PREFETCH": c["PREFETCH"]}, c["num_warps"])
        for kind, kernel, types, extra in (
            ("gate_up", routed_experts._gate_up_kernel, gate_up, {"HAS_LIMIT": True}),
            ("down", routed_experts._down_kernel, down, {"HAS_ADD": True}))
        for c in routed_experts.candidate_configs(kind, routed_experts.FMT_INT2)
    ]
    tiles = dict(order_ptr=I64, tile_expert_ptr="*i32", tile_row_ptr=I64, tile_len_ptr="*i32")
    grouped_gate_up = dict(xs_ptr=BF, w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8",
                           weights_ptr=F32, h_ptr=BF, K=I32, inter=I32, n_words=I32,
                           size_class=I32, limit=FP, **tiles,
                           **strides("stride_w_row", "stride_s_row", "stride_z_row"))
    grouped_down = dict(h_ptr=BF, w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", parts_ptr=BF,
                        H=I32, inter=I32, n_words=I32, size_class=I32, **tiles,
                        **strides("stride_w_row", "stride_s_row", "stride_z_row"))
    grouped = [
        (f"grouped {kind} INT2 {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
         + (" wide" if c["WIDE"] else ""), kernel, types,
         {"FORMAT": routed_experts.FMT_INT2, "PW": 16, "DTYPE": tl.bfloat16, "IEEE": False,
          **extra, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"],
          "BLOCK_W": c["BLOCK_K"] // 16, "WIDE": bool(c["WIDE"])}, c["num_warps"],
         c["num_stages"])
        for kind, kernel, types, extra in (
            ("gate_up", grouped_experts._gate_up_kernel, grouped_gate_up, {"HAS_LIMIT": True}),
            ("down", grouped_experts._down_kernel, grouped_down, {}))
        for c in grouped_experts.candidate_configs()
    ]
    # the DENSE experts of the tiny test model, fp32 (the GPU tests): 256 values a step
    # needed 256 KB of shared memory, over the H100's 227 KB
    dense = {"FORMAT": routed_experts.FMT_DENSE, "PW": 1, "DTYPE": tl.float32, "IEEE": True,
             "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_W": 64}
    grouped += [
        (f"grouped {kind} DENSE fp32 64x64x64", kernel,
         {**types, **{k: F32 for k in types if k.endswith("_ptr") and types[k] != I64
                      and k not in ("tile_expert_ptr", "tile_len_ptr")}},
         {**dense, **extra}, 4, 3)
        for kind, kernel, types, extra in (
            ("gate_up", grouped_experts._gate_up_kernel, grouped_gate_up, {"HAS_LIMIT": True}),
            ("down", grouped_experts._down_kernel, grouped_down, {}))
    ]
    return [*experts, *grouped,
        ("decode_attention", da._decode_attention_kernel, attn, attn_c, da.DEFAULT_NUM_WARPS),
        ("decode_attention one split", da._decode_attention_kernel, attn,
         {**attn_c, "ONE_SPLIT": True}, da.DEFAULT_NUM_WARPS),
        ("decode_attention combine", da._decode_attention_combine_kernel, combine,
         dict(BLOCK_P=16, BLOCK_D=512, ROPE=True, ROUND_BF16=True), 4),
        ("hc_mixes", hc._hc_mixes_kernel, mixes, {**mixes_c, "EXPAND": False}, 4),
        ("hc_mixes expand (hc_post_pre)", hc._hc_mixes_kernel, mixes, {**mixes_c, "EXPAND": True},
         4),
        ("hc_mixes expand, one token", hc._hc_mixes_kernel, mixes,
         {**mixes_c, "EXPAND": True, "BLOCK_T": 1}, 4),
        ("hc_finish", hc._hc_finish_kernel, finish, {**finish_c, "HEAD": False}, 8),
        ("hc_finish head", hc._hc_finish_kernel, finish, {**finish_c, "HEAD": True}, 8),
        ("hc_post", hc._hc_post_kernel, post, dict(S=4, BLOCK_S=4, BLOCK_HID=hc.BLOCK_HID), 4),
        ("indexer_scores", indexer_scores._indexer_scores_kernel, scores,
         dict(BLOCK_H=64, BLOCK_D=128, BLOCK_T=indexer_scores.BLOCK_T, DOT_PRECISION=None,
              UPCAST_DOT=False), 4),
        ("indexer_topk 8192", indexer_topk._indexer_topk_kernel, topk,
         dict(BLOCK_N=8192, BLOCK_K=512), indexer_topk._num_warps(8192)),
        ("rmsnorm_rope q", rmsnorm_rope._rmsnorm_rope_kernel, norm,
         dict(BLOCK_H=rmsnorm_rope.BLOCK_H, BLOCK_D=512, BLOCK_R=32, **norm_c), 4),
        ("rmsnorm hidden", rmsnorm_rope._rmsnorm_rope_kernel, norm,
         dict(BLOCK_H=1, BLOCK_D=4096, BLOCK_R=1, **norm_c), 4),
        ("fp8_roundtrip (QAT kv)", fp8_roundtrip._fp8_roundtrip_kernel,
         dict(x_ptr=BF, out_ptr=BF, dim=I32, nope=I32, stride_x=I32, stride_o=I32),
         dict(BLOCK=64), 4),
        ("fp4_roundtrip (QAT indexer)", fp4_roundtrip._fp4_roundtrip_kernel,
         dict(x_ptr=F32, out_ptr=F32), dict(BLOCK=32), 4),
        ("fp8_linear fma split", fl._fp8_linear_kernel, fp8, fp8_c, 4),
        ("fp8_linear fma split prefetch", fl._fp8_linear_kernel, fp8,
         {**fp8_c, "PREFETCH": True}, 4),
        ("fp8_linear fma 16 prefetch", fl._fp8_linear_kernel, fp8,
         {**fp8_c, "PREFETCH": True, "BLOCK_N": 16}, 4),
        ("fp8_linear dot split", fl._fp8_linear_kernel, fp8,
         {**fp8_c, "USE_DOT": True, "BLOCK_N": 64}, 4),
        ("fp8_linear fma swiglu (w2)", fl._fp8_linear_kernel, fp8,
         {**fp8_c, "SWIGLU": True}, 4),
        ("fp8_linear dot swiglu (w2)", fl._fp8_linear_kernel, fp8,
         {**fp8_c, "SWIGLU": True, "USE_DOT": True, "BLOCK_N": 64}, 4),
        ("router + top-k (fused)", moe_router._moe_router_kernel, router, router_c,
         moe_router.NUM_WARPS),
        ("cache_rows kv (FP8, window)", cache_rows._cache_rows_kernel, rows,
         dict(BLOCK_ROWS=1, BLOCK_D=512, LOG2_D=9, QAT=1, **rows_c), 4),
        ("cache_rows entry (FP8, fp32 in)", cache_rows._cache_rows_kernel,
         {**rows, "x_ptr": F32}, dict(BLOCK_ROWS=4, BLOCK_D=512, LOG2_D=9, QAT=1, **{**rows_c,
                                                                          "ROUND_X": False}), 4),
        ("cache_rows index key (FP4)", cache_rows._cache_rows_kernel, {**rows, "x_ptr": F32},
         dict(BLOCK_ROWS=1, BLOCK_D=128, LOG2_D=7, QAT=2, **{**rows_c, "ROUND_X": False}), 4),
        ("cache_rows index query (FP4)", cache_rows._cache_rows_kernel,
         {**rows, "out_ptr": F32},
         dict(BLOCK_ROWS=4, BLOCK_D=128, LOG2_D=7, QAT=2, NORM=False, HAS_WEIGHT=False, ROUND_X=True,
              SCATTER=False, ROUND_OUT=False), 4),
    ]  # fmt: skip


def main() -> None:
    """Flags: --pdl; --only TEXT (kernels whose name contains TEXT)."""
    args = sys.argv[1:]
    pdl = "--pdl" in args
    only = args[args.index("--only") + 1] if "--only" in args else ""
    print(f"{'kernel':32} warps  regs  spill_bytes  shared_bytes" + ("  (PDL)" if pdl else ""))
    for name, kernel, types, consts, warps, *stages in kernels():  # (num_stages: default 3)
        if only not in name:
            continue
        r = compile_kernel(name, kernel, types, consts, warps, pdl, *stages)
        over = "  OVER sm_90's 227 KB" if r["shared_bytes"] > SM90_SHARED_BYTES else ""
        print(f"{name:32} {warps:5}  {r['regs']:4}  {r['spill_bytes']:11}  "
              f"{r['shared_bytes']:12}{over}")


if __name__ == "__main__":
    main()
