"""Hyper-connection kernels: hc_pre (mix GEMV + Sinkhorn + collapse), hc_post, hc_head, and
hc_post_pre (a sub-layer's hc_post fused with the next sub-layer's hc_pre).

The residual is S parallel streams h [N, S, H] (engine/model.py, "Hyper-connections"). Before
a sub-layer, with K = S*H and M = (2+S)*S mix logits (24 for S = 4):

  mixes[n, m] = fn[m] . flatten(h[n]) * rsqrt(mean(flatten(h[n])^2) + eps)       fp32
  pre  = sigmoid(mixes[:S] * scale[0] + base[:S]) + hc_eps                        [S]
  post = 2 * sigmoid(mixes[S:2S] * scale[1] + base[S:2S])                         [S]
  comb = Sinkhorn(softmax_k(mixes[2S:] * scale[2] + base[2S:]) + hc_eps)          [S, S]
  x    = sum_j pre[j] * h[n, j]                                                    [H]
after it, hc_post: h_new[n, k] = post[k] * y[n] + sum_j comb[j, k] * h[n, j]; and before the
head, hc_head: pre = sigmoid(fn . h * rstd * scale[0] + base) + hc_eps, x = sum_j pre[j] h[j].

Algorithm. The GEMV reads fn (24 x 16384 fp32 = 1.5 MB) for only 1..32 tokens (64 KB..1 MB
of h), so it is split along K, not along tokens: one program per (K block of 128, block of
16 tokens) computes partial logits [tokens, M] with an fp32 tl.dot (ieee, as the
reference's fp32 F.linear) and partial sums of squares. 128 K blocks put 128 programs on
the fn read for any batch; one program per token would put 1..32 programs on 1.5 MB each
(a single SM streams tens of GB/s: ~50 us). For a long prefill the token blocks multiply the
grid and fn's re-reads come from L2. A second kernel sums the partials: one program per
(token, H block) computes pre and writes its block of x, and one more program per token
computes post and runs the 4 x 4 Sinkhorn in registers (its ~40 dependent reductions run
beside the collapse, not before it: the collapse needs only pre) and writes post and comb.
hc_post_pre's first kernel computes its K block of h_new (one stream's H slice) from y,
res, post and comb, stores it and feeds it to the GEMV directly. With `norm` the sub-layer's
input RMSNorm (attn_norm / ffn_norm / the final norm) runs in the second kernel too: one
program then owns a token's whole row of x (H <= MAX_NORM_HIDDEN), and the separate norm
launch (~2 us, 2 a layer) is gone.

Shapes: N tokens, S streams (4), H hidden (4096), K = S*H, M mix logits, P = K / BLOCK_K
partial blocks.
    h      [N, S, H]  bf16 (fp32 in tests)      fn    [M, K] f32
    scale  [3] f32 ([1] for the head)           base  [M] f32
    x      [N, H] h's dtype   post [N, S] f32   comb  [N, S, S] f32 (comb[j, k]: stream j -> k)
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.kernels import pdl_launch, use_triton
from engine.kernels._device_math import round_bf16, wait_for_inputs
from engine.kernels._triton import cdiv, jit, next_power_of_2, store_dtype
from engine.kernels.rmsnorm_rope import rmsnorm

Norm = tuple[torch.Tensor, float]  # an RMSNorm's (weight [H], eps)

# one_token_sum: a single token's mixes by multiply and row sum instead of tl.dot (benchmark
# A/B: set_one_token_sum(False) takes the dot for every batch)
_options = {"one_token_sum": True}


def set_one_token_sum(on: bool) -> None:
    _options["one_token_sum"] = bool(on)

tl = None  # triton.language, bound at the first launch (engine/kernels/_triton.py)

BLOCK_K = 128  # 16384 / 128 = 128 programs on the fn read: about one per SM
BLOCK_HID = 512  # H block of the collapse and of hc_post: 8 (H 4096) programs per token
# With the sub-layer's RMSNorm fused in, one program owns a token's whole row of x (the norm
# needs its sum of squares): [S, H] = 4 x 4096 fp32 over 8 warps is 64 values a thread.
MAX_NORM_HIDDEN = 8192


# ---------------------------------------------------------------------------------------------
# References: the model's own functions (imported lazily: engine.model imports this module)
# ---------------------------------------------------------------------------------------------
def hc_pre_reference(h, fn, scale, base, config):
    from engine.model import hc_collapse, hc_mix

    pre, post, comb = hc_mix(h.unsqueeze(0), fn, scale, base, config)  # its [B, T, ...] form
    return hc_collapse(h.unsqueeze(0), pre)[0], post[0], comb[0]


def hc_post_reference(y, res, post, comb):
    from engine.model import hc_expand

    return hc_expand(y.unsqueeze(0), res.unsqueeze(0), post.unsqueeze(0), comb.unsqueeze(0))[0]


def hc_head_reference(h, fn, scale, base, config):
    from engine.model import hc_head as model_hc_head

    return model_hc_head(h.unsqueeze(0), fn, scale, base, config)[0]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@jit
def _hc_mixes_kernel(
    h_ptr,  # [N, K] (flattened streams, rows contiguous); written first when EXPAND
    fn_ptr,  # [M, K] f32
    part_ptr,  # [N, P, BLOCK_M] f32: partial fn . h
    sq_ptr,  # [N, P] f32: partial sum of h^2
    y_ptr,  # [N, H] sub-layer output (EXPAND only)
    res_ptr,  # [N, S, H] previous streams (EXPAND only)
    post_ptr,  # [N, S] f32 (EXPAND only)
    comb_ptr,  # [N, S, S] f32 (EXPAND only)
    num_tokens,
    num_mix,
    K,
    hidden,
    stride_h_n,
    stride_fn_m,
    stride_y_n,
    stride_r_n,
    stride_r_s,
    S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EXPAND: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid_k = tl.program_id(0)
    pid_t = tl.program_id(1)
    num_parts = tl.num_programs(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t_mask = offs_t < num_tokens
    k_mask = offs_k < K
    rows_t = offs_t.to(tl.int64)  # int64 rows: N * K passes 2^31 from 131072 prefill tokens
    tk_mask = t_mask[:, None] & k_mask[None, :]
    h_ptrs = h_ptr + rows_t[:, None] * stride_h_n + offs_k[None, :]
    # fn is a weight: loaded before the wait, it streams while the kernel before still runs
    w = tl.load(
        fn_ptr + offs_m[:, None] * stride_fn_m + offs_k[None, :],
        mask=(offs_m < num_mix)[:, None] & k_mask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_K]
    wait_for_inputs(PDL)
    if EXPAND:
        # hc_post fused in: this K block is one stream's H slice (BLOCK_K divides H), so the
        # program computes h_new[n, s, slice] = post[s] y + sum_j comb[j, s] res[j], stores it
        # and goes on with the GEMV without reading it back
        s = (pid_k * BLOCK_K) // hidden
        offs_hid = pid_k * BLOCK_K - s * hidden + tl.arange(0, BLOCK_K)
        y = tl.load(y_ptr + rows_t[:, None] * stride_y_n + offs_hid[None, :], mask=tk_mask,
                    other=0.0).to(tl.float32)  # fmt: skip
        mixed = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
        for j in tl.static_range(S):
            comb_js = tl.load(comb_ptr + rows_t * (S * S) + j * S + s, mask=t_mask, other=0.0)
            res_j = tl.load(
                res_ptr + rows_t[:, None] * stride_r_n + j * stride_r_s + offs_hid[None, :],
                mask=tk_mask,
                other=0.0,
            ).to(tl.float32)
            mixed += comb_js[:, None] * res_j
        post_s = tl.load(post_ptr + rows_t * S + s, mask=t_mask, other=0.0)
        x = post_s[:, None] * y + mixed
        if ROUND_BF16:  # the GEMV reads the bf16 streams hc_pre would read
            x = round_bf16(x)
        tl.store(h_ptrs, x.to(h_ptr.dtype.element_ty), mask=tk_mask)
    else:
        x = tl.load(h_ptrs, mask=tk_mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_K]
    if BLOCK_T == 1:  # one token: a broadcast multiply and a row sum, no tl.dot's staging
        acc = tl.sum(x * w, axis=1)[None, :]  # [1, BLOCK_M]
    else:
        acc = tl.dot(x, tl.trans(w), input_precision="ieee")  # [BLOCK_T, BLOCK_M], fp32 as F.linear
    row = rows_t * num_parts + pid_k  # [BLOCK_T] in [N, P]
    tl.store(part_ptr + row[:, None] * BLOCK_M + offs_m[None, :], acc, mask=t_mask[:, None])
    tl.store(sq_ptr + row, tl.sum(x * x, axis=1), mask=t_mask)


@jit
def _hc_finish_kernel(
    h_ptr,  # [N, S, H]
    part_ptr,  # [N, P, BLOCK_M] f32
    sq_ptr,  # [N, P] f32
    scale_ptr,  # [3] f32 ([1] when HEAD)
    base_ptr,  # [M] f32
    x_ptr,  # [N, H] out
    normw_ptr,  # [H] RMSNorm weight (NORM only)
    post_ptr,  # [N, S] f32 out (not when HEAD)
    comb_ptr,  # [N, S, S] f32 out (not when HEAD)
    num_streams,
    hidden,
    num_parts,
    rms_eps,
    hc_eps,
    sinkhorn_iters,
    norm_eps,
    stride_h_n,
    stride_h_s,
    stride_x_n,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_HID: tl.constexpr,
    HEAD: tl.constexpr,
    NORM: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0).to(tl.int64)  # int64: token * stride passes 2^31 in long prefills
    pid_h = tl.program_id(1)
    S = num_streams
    offs_p = tl.arange(0, BLOCK_P)
    offs_s = tl.arange(0, BLOCK_S)
    p_mask = offs_p < num_parts
    s_mask = offs_s < S
    parts = part_ptr + (pid_n * num_parts + offs_p) * BLOCK_M  # [BLOCK_P] partial rows
    sq = tl.sum(tl.load(sq_ptr + pid_n * num_parts + offs_p, mask=p_mask, other=0.0), axis=0)
    rstd = 1.0 / tl.sqrt(sq / (S * hidden) + rms_eps)

    if not HEAD and pid_h == tl.num_programs(1) - 1:
        # the mix program: post and comb. The collapse needs only pre, so the Sinkhorn's
        # serial iterations run beside it instead of before it
        post = tl.sum(
            tl.load(
                parts[:, None] + S + offs_s[None, :],
                mask=p_mask[:, None] & s_mask[None, :],
                other=0.0,
            ),
            axis=0,
        )
        post = post * rstd * tl.load(scale_ptr + 1) + tl.load(
            base_ptr + S + offs_s, mask=s_mask, other=0.0
        )
        post = 2.0 * tl.sigmoid(post)

        jk = offs_s[:, None] * S + offs_s[None, :]  # [BLOCK_S, BLOCK_S]: comb[j, k] at 2S + jS + k
        jk_mask = s_mask[:, None] & s_mask[None, :]
        logit = tl.sum(
            tl.load(
                parts[:, None, None] + 2 * S + jk[None, :, :],
                mask=p_mask[:, None, None] & jk_mask[None, :, :],
                other=0.0,
            ),
            axis=0,
        )
        logit = logit * rstd * tl.load(scale_ptr + 2) + tl.load(
            base_ptr + 2 * S + jk, mask=jk_mask, other=0.0
        )
        # softmax over k, then + eps; padded rows/columns (S not a power of two) stay 0
        logit = tl.where(jk_mask, logit, float("-inf"))
        row_max = tl.where(s_mask, tl.max(logit, axis=1), 0.0)
        e = tl.exp(logit - row_max[:, None])
        row_sum = tl.where(s_mask, tl.sum(e, axis=1), 1.0)
        comb = tl.where(jk_mask, e / row_sum[:, None] + hc_eps, 0.0)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
        for _ in range(sinkhorn_iters - 1):
            comb = comb / (tl.sum(comb, axis=1)[:, None] + hc_eps)
            comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
        tl.store(post_ptr + pid_n * S + offs_s, post, mask=s_mask)
        tl.store(comb_ptr + pid_n * S * S + jk, comb, mask=jk_mask)
    else:  # a collapse program: its block of x
        offs_hid = pid_h * BLOCK_HID + tl.arange(0, BLOCK_HID)
        hid_mask = offs_hid < hidden
        streams = tl.load(
            h_ptr + pid_n * stride_h_n + offs_s[:, None] * stride_h_s + offs_hid[None, :],
            mask=s_mask[:, None] & hid_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_S, BLOCK_HID]
        pre = tl.sum(
            tl.load(
                parts[:, None] + offs_s[None, :], mask=p_mask[:, None] & s_mask[None, :],
                other=0.0,
            ),
            axis=0,
        )  # [BLOCK_S]
        pre = pre * rstd * tl.load(scale_ptr) + tl.load(base_ptr + offs_s, mask=s_mask, other=0.0)
        pre = tl.sigmoid(pre) + hc_eps
        x = tl.sum(pre[:, None] * streams, axis=0)
        if NORM:  # the sub-layer's RMSNorm of the bf16 x, as rmsnorm() computes it (BLOCK_HID >= H)
            if ROUND_BF16:
                x = round_bf16(x)
            rstd_x = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + norm_eps)
            x = x * rstd_x * tl.load(normw_ptr + offs_hid, mask=hid_mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + pid_n * stride_x_n + offs_hid, x.to(x_ptr.dtype.element_ty),
                 mask=hid_mask)


@jit
def _hc_post_kernel(
    y_ptr,  # [N, H]
    res_ptr,  # [N, S, H]
    post_ptr,  # [N, S] f32
    comb_ptr,  # [N, S, S] f32
    out_ptr,  # [N, S, H]
    hidden,
    stride_y_n,
    stride_r_n,
    stride_r_s,
    stride_o_n,
    stride_o_s,
    S: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_HID: tl.constexpr,
    PDL: tl.constexpr = False,
):
    wait_for_inputs(PDL)
    pid_n = tl.program_id(0).to(tl.int64)  # int64: token * stride passes 2^31 in long prefills
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_hid = pid_h * BLOCK_HID + tl.arange(0, BLOCK_HID)
    s_mask = offs_s < S
    hid_mask = offs_hid < hidden
    y = tl.load(y_ptr + pid_n * stride_y_n + offs_hid, mask=hid_mask, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + pid_n * S + offs_s, mask=s_mask, other=0.0)
    mixed = tl.zeros([BLOCK_S, BLOCK_HID], tl.float32)  # [k, H]
    for j in tl.static_range(S):
        comb_j = tl.load(comb_ptr + pid_n * S * S + j * S + offs_s, mask=s_mask, other=0.0)
        res_j = tl.load(
            res_ptr + pid_n * stride_r_n + j * stride_r_s + offs_hid, mask=hid_mask, other=0.0
        ).to(tl.float32)
        mixed += comb_j[:, None] * res_j[None, :]
    out = post[:, None] * y[None, :] + mixed
    tl.store(
        out_ptr + pid_n * stride_o_n + offs_s[:, None] * stride_o_s + offs_hid[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=s_mask[:, None] & hid_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate (tests replace it to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_streams(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, m: int) -> None:
    if h.dim() != 3:
        raise ValueError(f"h must be [N, S, H], got shape {tuple(h.shape)}")
    _, S, H = h.shape
    if fn.shape != (m, S * H) or fn.dtype != torch.float32:
        raise ValueError(f"fn must be float32 [{m}, {S * H}], got {fn.dtype} {tuple(fn.shape)}")
    if base.shape != (m,):
        raise ValueError(f"base must be [{m}], got shape {tuple(base.shape)}")


def _check_strides(h: torch.Tensor, fn: torch.Tensor) -> None:
    """The kernels read flatten(h[n]) as one contiguous row of S*H."""
    if h.stride(2) != 1 or h.stride(1) != h.shape[2] or fn.stride(1) != 1:
        raise ValueError("h must have contiguous [S, H] rows and fn contiguous columns")


def _expand_block_k(hidden: int) -> int:
    """The largest power of two <= BLOCK_K dividing H (a K block must stay in one stream);
    0 if below tl.dot's 16."""
    block = BLOCK_K
    while block >= 16 and hidden % block:
        block //= 2
    return block if block >= 16 else 0


def _mix_and_collapse(h, fn, scale, base, config: ModelConfig, head: bool, expand=None,
                      norm=None):
    """hc_pre's (or hc_head's) two kernels on h; with expand = (y, res, post, comb) the first
    kernel also computes h = hc_post(y, res, post, comb) into the buffer h; with norm =
    (weight, eps) x comes out RMSNormed (the second kernel then owns a whole row of x, up to
    MAX_NORM_HIDDEN; wider rows take the norm kernel after it)."""
    _check_strides(h, fn)
    N, S, H = h.shape
    M, K = fn.shape
    x = _empty((N, H), store_dtype(h.dtype, h.device), h.device)
    post = _empty((N, S), torch.float32, h.device)
    comb = _empty((N, S, S), torch.float32, h.device)
    if N == 0:
        return x, post, comb
    block_k = _expand_block_k(H) if expand is not None else BLOCK_K
    num_parts = cdiv(K, block_k)
    # 16 tokens a program (tl.dot's smallest M): the ieee fp32 dot over 16 x 128 x 32 takes 76
    # registers on sm_90; at 64 tokens it spills 6 KB of stack a thread (compile_check.py).
    # One token (batch-1 decode) takes a plain multiply and row sum instead: the dot would
    # stage 16 rows (15 masked) and fn's tile through shared memory
    block_t = 1 if N == 1 and _options["one_token_sum"] else 16
    block_m = max(16, next_power_of_2(M))
    part = _empty((N, num_parts, block_m), torch.float32, h.device)
    sq = _empty((N, num_parts), torch.float32, h.device)
    y, res, post_in, comb_in = expand if expand is not None else (h, h, post, comb)
    _hc_mixes_kernel[(num_parts, cdiv(N, block_t))](
        h, fn, part, sq, y, res, post_in, comb_in,
        N, M, K, H, h.stride(0), fn.stride(0), y.stride(0), res.stride(0), res.stride(1),
        S=S, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_K=block_k,
        EXPAND=expand is not None, ROUND_BF16=h.dtype == torch.bfloat16, **pdl_launch(h),
    )  # fmt: skip
    fuse_norm = norm is not None and H <= MAX_NORM_HIDDEN
    block_hid = next_power_of_2(H) if fuse_norm else min(BLOCK_HID, next_power_of_2(H))
    # the H blocks of x, and one more program for post and comb (not for the head)
    _hc_finish_kernel[(N, cdiv(H, block_hid) + (0 if head else 1))](
        h, part, sq, scale, base, x, norm[0] if fuse_norm else x, post, comb,
        S, H, num_parts, config.rms_norm_eps, config.hc_eps, config.hc_sinkhorn_iters,
        norm[1] if fuse_norm else 0.0,
        h.stride(0), h.stride(1), x.stride(0),
        BLOCK_S=next_power_of_2(S), BLOCK_P=next_power_of_2(num_parts),
        BLOCK_M=block_m, BLOCK_HID=block_hid, HEAD=head, NORM=fuse_norm,
        ROUND_BF16=h.dtype == torch.bfloat16, num_warps=8 if fuse_norm else 4, **pdl_launch(h),
    )  # fmt: skip
    x = x.to(h.dtype)
    if norm is not None and not fuse_norm:
        x = rmsnorm(x, *norm)
    return x, post, comb


def _normed(out: tuple, norm: Norm | None) -> tuple:
    """The reference path's (x, ...) with x through rmsnorm(x, *norm) when norm is given."""
    return out if norm is None else (rmsnorm(out[0], *norm), *out[1:])


def hc_pre(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
    config: ModelConfig, norm: Norm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [N, H], post [N, S], comb [N, S, S]) == engine.model hc_mix + hc_collapse; with
    norm = (weight, eps), x is rmsnorm(x, weight, eps) (the sub-layer's input norm)."""
    S = config.hc_mult
    _check_streams(h, fn, base, (2 + S) * S)
    if h.shape[1] != S or scale.shape != (3,):
        raise ValueError(f"hc_pre wants S = hc_mult = {S} streams and 3 scales")
    if not use_triton(h):
        return _normed(hc_pre_reference(h, fn, scale, base, config), norm)
    return _mix_and_collapse(h, fn, scale, base, config, head=False, norm=norm)


def hc_head(
    h: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
    config: ModelConfig, norm: Norm | None = None,
) -> torch.Tensor:
    """x [N, H] == engine.model.hc_head (pre only: the final collapse before the norm); with
    norm = (weight, eps), rmsnorm(x, weight, eps) (the final norm)."""
    S = config.hc_mult
    _check_streams(h, fn, base, S)
    if h.shape[1] != S or scale.shape != (1,):
        raise ValueError(f"hc_head wants S = hc_mult = {S} streams and 1 scale")
    if not use_triton(h):
        return _normed((hc_head_reference(h, fn, scale, base, config),), norm)[0]
    return _mix_and_collapse(h, fn, scale, base, config, head=True, norm=norm)[0]


def _check_post(y, res, post, comb) -> None:
    if res.dim() != 3:
        raise ValueError(f"res must be [N, S, H], got shape {tuple(res.shape)}")
    N, S, H = res.shape
    if y.shape != (N, H) or post.shape != (N, S) or comb.shape != (N, S, S):
        raise ValueError(
            f"hc_post wants y [{N}, {H}], post [{N}, {S}], comb [{N}, {S}, {S}]; got "
            f"{tuple(y.shape)}, {tuple(post.shape)}, {tuple(comb.shape)}"
        )
    if post.dtype != torch.float32 or comb.dtype != torch.float32:
        raise ValueError("post and comb must be float32")


def _check_post_strides(y, res, post, comb) -> None:
    if (
        y.stride(1) != 1
        or res.stride(2) != 1
        or not (post.is_contiguous() and comb.is_contiguous())
    ):
        raise ValueError("hc_post wants contiguous hidden dims and contiguous post/comb")


def hc_post(
    y: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """h_new [N, S, H] in res's dtype == engine.model.hc_expand."""
    _check_post(y, res, post, comb)
    if not use_triton(res):
        return hc_post_reference(y, res, post, comb)
    _check_post_strides(y, res, post, comb)
    N, S, H = res.shape
    out = _empty((N, S, H), store_dtype(res.dtype, res.device), res.device)
    if N == 0:
        return out
    block_hid = min(BLOCK_HID, next_power_of_2(H))
    _hc_post_kernel[(N, cdiv(H, block_hid))](
        y, res, post, comb, out, H,
        y.stride(0), res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        S=S, BLOCK_S=next_power_of_2(S), BLOCK_HID=block_hid, **pdl_launch(res),
    )  # fmt: skip
    return out.to(res.dtype)


def hc_post_pre(
    y: torch.Tensor,
    res: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    config: ModelConfig,
    norm: Norm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sub-layer's hc_post fused with the next one's hc_pre: (h_new, x, post', comb') ==
    h_new = hc_post(y, res, post, comb); x, post', comb' = hc_pre(h_new, fn, scale, base,
    norm=norm). Two kernels instead of three (four with the norm), and h_new is not read
    back for the GEMV."""
    _check_post(y, res, post, comb)
    S = config.hc_mult
    _check_streams(res, fn, base, (2 + S) * S)
    if res.shape[1] != S or scale.shape != (3,):
        raise ValueError(f"hc_post_pre wants S = hc_mult = {S} streams and 3 scales")
    if not use_triton(res):
        h_new = hc_post_reference(y, res, post, comb)
        return (h_new, *_normed(hc_pre_reference(h_new, fn, scale, base, config), norm))
    _check_post_strides(y, res, post, comb)
    if not _expand_block_k(res.shape[2]):  # H not a multiple of 16: the unfused kernels
        h_new = hc_post(y, res, post, comb)
        return (h_new, *_mix_and_collapse(h_new, fn, scale, base, config, head=False,
                                          norm=norm))
    h_new = _empty(res.shape, res.dtype, res.device)  # bf16 values are rounded in-kernel
    x, post2, comb2 = _mix_and_collapse(
        h_new, fn, scale, base, config, head=False, expand=(y, res, post, comb), norm=norm
    )
    return h_new, x, post2, comb2
