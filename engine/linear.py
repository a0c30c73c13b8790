"""Linear layers whose weight stays in its checkpoint format.

Every projection of the model is an `engine.linear.Linear`. Its weight is stored the way
the checkpoint stores it and dequantised on the fly, one layer at a time, per forward on
the plain PyTorch path; the fast GPU kernels replace `forward` without touching the model.
Never dequantise the whole model at load: with INT2 experts about 80% of the bytes read per
token are the FP8 attention projections (engine.md section 5), which must stay FP8.

Stored formats (engine/formats.py has the bit layouts):

| format | `weight`                   | `scale`                        | `zero`             |
|--------|----------------------------|--------------------------------|--------------------|
| DENSE  | bf16/fp16/fp32 [out, in]   | -                              | -                  |
| FP8    | float8_e4m3fn [out, in]    | E8M0 [ceil(out/128), ceil(in/128)] | -              |
| FP4    | int8 [out, in/2]           | E8M0 [out, in/32]              | -                  |
| INT2   | uint32 [out, in/16]        | fp16 [out, in/64]              | int8 [out, in/128] |
| Q8_0, Q2_K, IQ2_XXS | uint8 [out, in/B * S] GGML blocks (ds4's GGUF) | -  | -                  |

`weight` and `scale` carry the release's tensor names (`...wq_a.weight`, `...wq_a.scale`).

Numerics: the activation stays in its own dtype (bf16 in the model) and meets the exactly
dequantised weight in `F.linear`. DeepSeek's reference instead quantises the activation to
FP8 per 128 channels (engine.md section 6), so this path is close to it, not bit-exact;
`engine.kernels.fp8_linear.set_act_quant(True)` switches FP8 layers to DeepSeek's way.
FP8 layers go through `engine.kernels.fp8_linear` (Triton on CUDA, the same F.linear on the
reference path, see engine.kernels' switch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import formats as fm
from engine.formats import WeightFormat
from engine.kernels.fp8_linear import act_quant_enabled, fp8_linear
from engine.kernels.gguf_gemv import ggml_linear


def _check(name: str, shape: tuple[int, ...], dtype: torch.dtype, want_shape: tuple[int, ...],
           dtypes: tuple[torch.dtype, ...]) -> None:
    if dtype not in dtypes:
        expected = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, found {str(dtype).removeprefix('torch.')}")
    if tuple(shape) != tuple(want_shape):
        raise ValueError(f"{name}: expected shape {list(want_shape)}, found {list(shape)}")


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Linear(nn.Module):
    """y = x @ W.T (no bias: DeepSeek-V4 projections have none)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format = WeightFormat.DENSE
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        # None parameters are left out of state_dict(): a dense Linear has only `weight`.
        self.register_parameter("scale", None)
        self.register_parameter("zero", None)

    # -- loaders: one per stored format; `name` labels error messages ----------------------

    def stored_spec(self, fmt: WeightFormat) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """Expected (shape, allowed dtypes) of `weight` / `scale` / `zero` in format `fmt`."""
        out_f, in_f = self.out_features, self.in_features
        if fmt == WeightFormat.DENSE:
            return {"weight": ((out_f, in_f), fm.DENSE_DTYPES)}
        if fmt == WeightFormat.FP8:
            return {"weight": ((out_f, in_f), (torch.float8_e4m3fn,)),
                    "scale": (fm.fp8_scale_shape(out_f, in_f), fm.E8M0_DTYPES)}
        if fmt == WeightFormat.FP4:
            if in_f % fm.FP4_GROUP:
                raise ValueError(f"FP4 needs in_features divisible by {fm.FP4_GROUP}, this Linear has {in_f}")
            return {"weight": ((out_f, in_f // 2), (torch.int8, torch.uint8)),
                    "scale": ((out_f, in_f // fm.FP4_GROUP), fm.E8M0_DTYPES)}
        if fmt in fm.GGML_BLOCKS:  # scales live inside the blocks
            return {"weight": ((out_f, fm.ggml_row_bytes(fmt, in_f)), (torch.uint8,))}
        packed, scale, zero = fm.int2_shapes(out_f, in_f)
        return {"weight": (packed, (torch.uint32, torch.int32)), "scale": (scale, (torch.float16,)),
                "zero": (zero, (torch.int8, torch.uint8))}

    def check_stored(self, fmt: WeightFormat, names: dict[str, str],
                     found: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Raise TypeError / ValueError naming `names[field]` unless `found` fits `fmt`."""
        for field, (shape, dtypes) in self.stored_spec(fmt).items():
            _check(names[field], found[field][0], found[field][1], shape, dtypes)

    def load_dense(self, weight: torch.Tensor, name: str = "weight") -> None:
        self._load(WeightFormat.DENSE, {"weight": weight}, name)

    def load_fp8(self, weight: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> None:
        self._load(WeightFormat.FP8, {"weight": weight, "scale": scale}, name)

    def load_fp4(self, weight: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> None:
        self._load(WeightFormat.FP4, {"weight": weight, "scale": scale}, name)

    def load_int2(self, w_packed: torch.Tensor, w_scale: torch.Tensor, w_zero_packed: torch.Tensor,
                  name: str = "weight") -> None:
        self._load(WeightFormat.INT2, {"weight": w_packed, "scale": w_scale, "zero": w_zero_packed},
                   name)

    def load_ggml(self, fmt: WeightFormat, blocks: torch.Tensor, name: str = "weight") -> None:
        """GGML blocks (Q8_0 / Q2_K / IQ2_XXS) as the GGUF stores them, kept as they are."""
        if fmt not in fm.GGML_BLOCKS:
            raise ValueError(f"{name}: {fmt} is no GGML block format")
        self._load(fmt, {"weight": blocks}, name)

    def _load(self, fmt: WeightFormat, tensors: dict[str, torch.Tensor], name: str) -> None:
        names = tensor_names(name, fmt)
        self.check_stored(fmt, names, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()})
        self._set(fmt, tensors["weight"], tensors.get("scale"), tensors.get("zero"))

    def _set(self, fmt: WeightFormat, weight: torch.Tensor, scale: torch.Tensor | None,
             zero: torch.Tensor | None) -> None:
        self.format = fmt
        self.weight = _param(weight)
        self.scale = None if scale is None else _param(scale)
        self.zero = None if zero is None else _param(zero)

    # -- use -------------------------------------------------------------------------------

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense [out, in] tensor of `dtype` (dequantised when stored quantised)."""
        if self.format == WeightFormat.DENSE:
            return self.weight.to(dtype)
        if self.format == WeightFormat.FP8:
            return fm.dequantize_fp8(self.weight, self.scale, dtype)
        if self.format == WeightFormat.FP4:
            return fm.dequantize_fp4(self.weight, self.scale, dtype)
        if self.format in fm.GGML_BLOCKS:  # dequantised per call, never kept
            return fm.dequantize_ggml(self.format, self.weight, dtype)
        return fm.dequantize_int2(self.weight, self.scale, self.zero, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == WeightFormat.FP8:
            # the Triton GEMV on the fast path; exactly the line below on the reference path
            # (unless act_quant was switched on, which quantises x as DeepSeek does)
            return fp8_linear(x, self.weight, self.scale, act_quant=act_quant_enabled())
        if self.format in fm.GGML_BLOCKS:
            # the Triton GEMV decoding blocks in registers on the fast path; exactly the line
            # below (blocks decoded for this call only) on the reference path
            return ggml_linear(x, self.weight, self.format)
        return F.linear(x, self.dense_weight(x.dtype))

    def forward_swiglu(self, gu: torch.Tensor) -> torch.Tensor:
        """self(swiglu(gu)) for gu = gate | up [..., 2 * in_features] (the shared expert's
        w2): an FP8 layer applies the SwiGLU inside its GEMV (engine.kernels.fp8_linear)."""
        if self.format == WeightFormat.FP8:
            return fp8_linear(gu, self.weight, self.scale, act_quant=act_quant_enabled(),
                              swiglu=True)
        from engine.kernels.swiglu import swiglu

        return self(swiglu(gu.reshape(-1, gu.shape[-1])).view(*gu.shape[:-1], -1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def tensor_names(name: str, fmt: WeightFormat) -> dict[str, str]:
    """Labels of the stored tensors: the release's `X.weight` / `X.scale`, INT2's field names."""
    if fmt == WeightFormat.INT2:
        return {"weight": f"{name} w_packed", "scale": f"{name} w_scale",
                "zero": f"{name} w_zero_packed"}
    if fmt == WeightFormat.DENSE or fmt in fm.GGML_BLOCKS:
        return {"weight": name}
    base = name.removesuffix(".weight") if name.endswith(".weight") else None
    return {"weight": name, "scale": f"{base}.scale" if base is not None else f"{name} scale"}


_FP8_ROWS = 128  # rows of an E8M0 scale block


def fused_rows(owner: torch.nn.Module, key: str, parts: tuple[Linear, ...]) -> Linear | None:
    """One Linear whose rows are `parts`' rows in order, for projections that read the same x
    (one GEMV instead of several: each output row is the same dot product, and one bigger
    read streams better than small ones). Made once and kept on `owner` (outside its
    submodules: no new state_dict keys); the parts' weights (and FP8 scales) become views of
    it, so memory is not doubled and every other path reads the same values. None where the
    formats do not allow it: not all DENSE or all FP8 of one dtype and width, or an FP8 part
    (but the last) whose rows do not fill whole 128-row scale blocks."""
    fused = owner.__dict__.get(key)
    if fused is not None:
        offset, ok = 0, True
        for lin in parts:
            ok &= lin.weight.data_ptr() == fused.weight[offset:].data_ptr()
            offset += lin.weight.shape[0]
        if ok:
            return fused
    fmt = parts[0].format
    if (fmt not in (WeightFormat.DENSE, WeightFormat.FP8)
            or any(lin.format != fmt or lin.weight.dtype != parts[0].weight.dtype
                   or lin.weight.shape[1] != parts[0].weight.shape[1] for lin in parts)
            or (fmt == WeightFormat.FP8
                and any(lin.weight.shape[0] % _FP8_ROWS for lin in parts[:-1]))):
        return None
    weight = torch.cat([lin.weight.data for lin in parts])
    scale = torch.cat([lin.scale.data for lin in parts]) if fmt == WeightFormat.FP8 else None
    fused = Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    fused._set(fmt, weight, scale, None)
    row = 0
    for lin in parts:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row : row + n]
        if scale is not None:
            lin.scale.data = scale[row // _FP8_ROWS : -(-(row + n) // _FP8_ROWS)]
        row += n
    owner.__dict__[key] = fused
    return fused
