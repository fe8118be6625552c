"""The quantized layer every method produces, and the activation quantizer it may carry.

``QuantizedLayer`` replaces one ``nn.Linear`` or ``nn.Conv2d``.  Its weight is held as packed
codes (``packing.py``) into a table of values: a scalar format's table (int or FP, one code per
weight, times a per-output-channel scale) or a vector codebook (one code per sub-vector of
``vector`` consecutive input weights of a row: VQ4DiT).  The forward dequantizes the weight
(table look-up, times the scale) and runs the float layer: quantization here is *simulated*,
with the memory of the packed codes but no low-bit kernel (the benchmark tables say so).
``ActivationQuantizer`` rounds the layer's input to a format before the matmul, with one scale
per calibrated timestep where a method calibrated them (TFM-PTQ's finite-set calibration): the
scale of the step is chosen by the step context's model timestep (the nearest calibrated one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..context import current_step
from .formats import Format, table_format
from .packing import pack, packed_bytes, unpack

KINDS = {torch.nn.Linear: "linear", torch.nn.Conv2d: "conv2d"}


def is_conv2d(module: torch.nn.Module) -> bool:
    """A Conv2d, full precision or quantized (both have its attributes and ``weight``)."""
    return isinstance(module, torch.nn.Conv2d) or getattr(module, "kind", None) == "conv2d"


def _quantize_input(module, args):
    return (module.act(args[0]), *args[1:])


def kind_of(module: torch.nn.Module) -> str | None:
    return KINDS.get(type(module))


def conv_args(module: torch.nn.Module) -> dict:
    """A Conv2d's stride, padding, dilation and groups ({} for a Linear)."""
    if kind_of(module) != "conv2d":
        return {}
    if module.padding_mode != "zeros":
        raise ValueError(f"a Conv2d with padding_mode={module.padding_mode!r} is not quantized")
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {"stride": list(module.stride), "padding": padding, "dilation": list(module.dilation),
            "groups": module.groups}


class ActivationQuantizer(torch.nn.Module):
    """Rounds a tensor to ``values`` times a scale plus an offset (0 where symmetric): one pair, or one
    per calibrated timestep."""

    def __init__(self, fmt: Format, scales: torch.Tensor, times: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None):
        super().__init__()
        self.format_name = fmt.name
        self.register_buffer("values", fmt.values.clone())
        # the rounding thresholds, derived once (not stored: the file keeps the table)
        self.register_buffer("mids", (fmt.values[1:] + fmt.values[:-1]) / 2, persistent=False)
        self.register_buffer("scales", scales.reshape(-1).float().clone())
        # asymmetric (affine) quantization: x ~ v * scale + offset, the offset a whole number of steps
        offsets = torch.zeros_like(self.scales) if offsets is None else offsets.reshape(-1).float().clone()
        if offsets.shape != self.scales.shape:
            raise ValueError("one activation offset per activation scale")
        self.register_buffer("offsets", offsets)
        times = torch.empty(0) if times is None else times.reshape(-1).float().clone()
        if times.numel() and times.numel() != self.scales.numel():
            raise ValueError("one activation scale per calibrated timestep")
        self.register_buffer("times", times)

    @property
    def format(self) -> Format:
        return table_format(self.format_name, self.values)

    @property
    def per_timestep(self) -> bool:
        return self.times.numel() > 1

    def index_at(self, model_t: float | None) -> int:
        """The calibrated timestep nearest ``model_t`` (0 with one scale)."""
        if not self.per_timestep:
            return 0
        if model_t is None:
            raise RuntimeError("this layer's activation scales are per timestep and no step context is set; "
                               "call the model inside a sampling loop or a pipeline")
        return int(torch.argmin((self.times - float(model_t)).abs()))

    def index_now(self) -> int:
        ctx = current_step()
        return self.index_at(ctx.model_t if ctx is not None else None)

    def scale_now(self) -> torch.Tensor:
        return self.scales[self.index_now()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.index_now()
        scale, offset = self.scales[i].to(x.device), self.offsets[i].to(x.device)
        scaled = ((x.float() - offset) / scale).contiguous()
        return (self.values[torch.bucketize(scaled, self.mids.to(scaled.dtype))] * scale + offset).to(x.dtype)


class QuantizedLayer(torch.nn.Module):
    """A Linear / Conv2d whose weight is packed codes into ``values`` times ``scale`` (plus ``offset``)."""

    def __init__(self, kind: str, weight_shape: tuple[int, ...], format_name: str, code_bits: int,
                 vector: int, values: torch.Tensor, scale: torch.Tensor, packed: torch.Tensor,
                 bias: torch.Tensor | None, conv: dict | None = None, act: ActivationQuantizer | None = None,
                 offset: torch.Tensor | None = None):
        super().__init__()
        self.kind, self.weight_shape = kind, tuple(int(s) for s in weight_shape)
        self.format_name, self.code_bits, self.vector = format_name, int(code_bits), int(vector)
        self.conv = dict(conv or {})
        self.register_buffer("packed", packed)
        self.register_buffer("values", values.float())
        self.register_buffer("scale", scale.float().reshape(self.weight_shape[0], 1))
        # an affine weight format: w = v * scale + offset per output channel (None: symmetric)
        self.register_buffer("offset", None if offset is None else offset.float().reshape(self.weight_shape[0], 1))
        self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.act = act
        if act is not None:   # a pre-hook, so that a hook replacing forward (DistriFusion's halo conv) keeps it
            self.register_forward_pre_hook(_quantize_input)

    @classmethod
    def from_codes(cls, original: torch.nn.Module, codes: torch.Tensor, values: torch.Tensor,
                   scale: torch.Tensor | None, format_name: str, vector: int = 1,
                   act: ActivationQuantizer | None = None, offset: torch.Tensor | None = None) -> "QuantizedLayer":
        """The layer that replaces ``original`` (a Linear or Conv2d), ``codes`` indexing ``values``
        (a (K,) table, or (K, vector) codewords) times ``scale`` plus ``offset`` (per output channel)."""
        kind = kind_of(original)
        if kind is None:
            raise ValueError(f"only Linear and Conv2d layers are quantized, not {type(original).__name__}")
        shape = tuple(original.weight.shape)
        code_bits = max(1, (int(values.shape[0]) - 1).bit_length())
        conv = conv_args(original)
        scale = torch.ones(shape[0]) if scale is None else scale
        layer = cls(kind, shape, format_name, code_bits, vector, values, scale, pack(codes, code_bits),
                    original.bias, conv, act, offset)
        return layer.to(original.weight.device)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n

    @property
    def format(self) -> Format:
        return table_format(self.format_name, self.values)

    def codes(self) -> torch.Tensor:
        return unpack(self.packed, self.code_bits, self.numel // self.vector)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        table = self.values[self.codes()]                       # (n,) or (n / vector, vector)
        w = table.reshape(self.weight_shape[0], -1) * self.scale
        if self.offset is not None:
            w = w + self.offset
        return w.reshape(self.weight_shape).to(dtype or self.values.dtype)

    def storage_bits(self) -> int:
        """Bits this layer's weight takes on disk: codes, table and scales (bias not counted)."""
        offsets = self.offset.numel() if self.offset is not None else 0
        return self.packed.numel() * 8 + (self.values.numel() + self.scale.numel() + offsets) * 16

    # a Conv2d's attributes, for code that computes the convolution itself (DistriFusion's halos)
    weight = property(lambda self: self.dequantized_weight())
    stride = property(lambda self: tuple(self.conv["stride"]))
    padding = property(lambda self: self.conv["padding"] if isinstance(self.conv["padding"], str)
                       else tuple(self.conv["padding"]))
    dilation = property(lambda self: tuple(self.conv["dilation"]))
    groups = property(lambda self: self.conv["groups"])
    kernel_size = property(lambda self: tuple(self.weight_shape[2:]))
    padding_mode = "zeros"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.kind == "linear":
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def layout(self) -> dict:
        """What rebuilds this layer from its tensors (the file's per-layer metadata)."""
        out = {"kind": self.kind, "weight_shape": list(self.weight_shape), "format": self.format_name,
               "code_bits": self.code_bits, "vector": self.vector, "conv": self.conv, "bias": self.bias is not None,
               "offset": self.offset is not None}
        if self.act is not None:
            out["act_format"] = self.act.format_name
        return out

    @classmethod
    def from_layout(cls, layout: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedLayer":
        act = None
        if "act_format" in layout:
            act = ActivationQuantizer(table_format(layout["act_format"], tensors["act.values"]),
                                      tensors["act.scales"], tensors["act.times"], tensors.get("act.offsets"))
        offset = tensors["offset"] if layout.get("offset") else None
        layer = cls(layout["kind"], tuple(layout["weight_shape"]), layout["format"], layout["code_bits"],
                    layout["vector"], tensors["values"], tensors["scale"], tensors["packed"],
                    tensors.get("bias"), layout.get("conv"), act, offset)
        layer.check()
        return layer

    def check(self) -> None:
        """Refuse tensors that do not fit the layout (a damaged file): ``ValueError``."""
        codes = self.numel // self.vector
        if self.packed.dtype != torch.uint8 or self.packed.numel() != packed_bytes(codes, self.code_bits):
            raise ValueError(f"{self.packed.numel()} packed bytes for {codes} codes of {self.code_bits} bits")
        if self.values.shape[0] > 2 ** self.code_bits or (self.vector > 1 and self.values.shape[1:] != (self.vector,)):
            raise ValueError(f"a value table of shape {tuple(self.values.shape)} for {self.code_bits}-bit codes")

    def extra_repr(self) -> str:
        act = f", act={self.act.format_name}" if self.act is not None else ""
        return f"{self.kind}, weight={self.weight_shape}, format={self.format_name}{act}"
