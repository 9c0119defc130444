"""Weight-only int8/int4 linears in ChatGLM's published layout, without its remote code.

ChatGLM's quantized checkpoints (``quantization_bit`` 4 or 8) store, per replaced linear, an
int8 ``weight`` (8 bit: the codes, ``[out, in]``; 4 bit: two signed nibbles per byte,
``[out, in / 2]``, column 2j in the high nibble) and an fp16 ``weight_scale`` per output row:
``w = q * scale[row]`` (docs/chatglm2.md, "int4 and int8 checkpoints").

How each is computed was chosen by measurement (``python -m bench.quant_kernels``; numbers in
docs/chatglm2.md):

- int4 on CUDA: torch's tinygemm kernel (``_weight_int4pack_mm``, what torchao's int4
  weight-only uses). The per-row scale becomes every group's scale and the signed nibble an
  unsigned code with zero point 0, so the result is the format's own dequantization. On an
  H100 it is faster than a bf16 matmul at one row and stays in packed memory.
- int4 on the CPU: torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``), same mapping.
- int8: the codes are cast to the compute dtype inside each matmul and the per-row scale is
  applied to the output (it commutes with the matmul). torch's fused ``_weight_int8pack_mm``
  was slower on both devices at batch sizes above one.

Anything the fast kernels cannot take (an unsupported dtype or shape) falls back to expanding
the weight per matmul, never to a different result.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Bits = Literal[4, 8]
# tinygemm's group sizes; the largest that divides in_features is used (fewer scale bytes).
_TINYGEMM_GROUPS = (256, 128, 64, 32)


def quantize_rows(w: torch.Tensor, bits: Bits) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM's quantization of an fp weight: (int8 codes or packed nibbles, fp16 scales).

    ``scale = max|w_row| / (2^(bits-1) - 1)`` in fp16, ``q = round(w / scale)``, as the
    original ``quantize()`` does; 4-bit codes are then packed two per byte.
    """
    w = w.to(torch.float16)
    top = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1) / top
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    # fp16 division, as the original does it (its rounding decides ties between codes).
    q = torch.round(w / safe[:, None]).clamp(-top - 1, top).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes ``[out, in]`` (int8 in -8..7) → ChatGLM's bytes ``[out, in / 2]``."""
    hi = q[:, 0::2].to(torch.int16) & 0xF
    lo = q[:, 1::2].to(torch.int16) & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ChatGLM's packed bytes ``[out, in / 2]`` → signed codes ``[out, in]`` (int8)."""
    packed = packed.view(torch.int8)
    hi = packed >> 4  # arithmetic shift of a signed byte: the high nibble, sign-extended
    lo = (packed << 4) >> 4
    return torch.stack((hi, lo), dim=-1).reshape(packed.shape[0], -1)


def _tinygemm_group(in_features: int) -> int | None:
    return next((g for g in _TINYGEMM_GROUPS if in_features % g == 0), None)


class QuantLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with the weight kept quantized in memory.

    Built empty (on any device) and filled once with :meth:`set_weight`, which packs the
    codes for the kernel this device uses; ``bias`` is a normal parameter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: Bits,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and in_features % 2:
            raise ValueError(f"int4 needs an even in_features, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits: Bits = bits
        self.compute_dtype = dtype
        self.kernel = "unset"
        self._group = 0
        # The packed weight and its scales are buffers (they follow .to() and count in
        # state_dict); their layout depends on ``kernel``.
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(0, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def like(cls, linear: nn.Linear, bits: Bits, dtype: torch.dtype, device: torch.device):
        """An empty QuantLinear with the shape of ``linear`` (which may live on meta)."""
        return cls(
            linear.in_features, linear.out_features, bits, linear.bias is not None, dtype, device
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, kernel={self.kernel}, bias={self.bias is not None}"
        )

    def set_weight(self, weight: torch.Tensor, scale: torch.Tensor, device: torch.device) -> None:
        """Take ChatGLM's (weight, weight_scale) pair and pack it for this device's kernel."""
        cols = self.in_features // 2 if self.bits == 4 else self.in_features
        if tuple(weight.shape) != (self.out_features, cols):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, expected {(self.out_features, cols)} "
                f"for int{self.bits}"
            )
        if tuple(scale.shape) != (self.out_features,):
            raise ValueError(
                f"weight_scale has shape {tuple(scale.shape)}, expected ({self.out_features},)"
            )
        if weight.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"quantized weight must be int8, got {weight.dtype}")
        weight = weight.view(torch.int8)
        group = _tinygemm_group(self.in_features)
        if self.bits == 4 and group is not None and self._tinygemm_ok(device):
            self._pack_tinygemm(weight, scale, device, group)
        else:
            self.kernel = "dequant"
            self.qweight = weight.to(device).contiguous()
            self.scales = scale.to(device, self.compute_dtype)

    def _tinygemm_ok(self, device: torch.device) -> bool:
        if self.in_features % 32 or self.out_features % 8:  # the kernels' tile sizes
            return False
        if device.type == "cuda":
            major, _ = torch.cuda.get_device_capability(device)
            return major >= 8 and hasattr(torch, "_weight_int4pack_mm")
        if device.type == "cpu":
            return hasattr(torch, "_weight_int4pack_mm_for_cpu")
        return False

    def _pack_tinygemm(
        self, weight: torch.Tensor, scale: torch.Tensor, device: torch.device, group: int
    ) -> None:
        # Signed nibble s in -8..7 → unsigned code s + 8; tinygemm computes
        # (code - 8) * scale + zero, so zero = 0 reproduces q * scale exactly.
        codes = unpack_int4(weight.to(device)).to(torch.int32) + 8
        # Tiles of 16 input columns, up to 8 per inner step: the most that divide the width.
        inner = next(t for t in (8, 4, 2, 1) if self.in_features % (16 * t) == 0)
        if device.type == "cuda":
            sz_dtype = torch.bfloat16  # the only dtype tinygemm takes on CUDA
            u8 = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), inner)
            self.kernel = "tinygemm"
        else:
            sz_dtype = self.compute_dtype
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), inner)
            self.kernel = "int4pack-cpu"
        del codes
        sz = torch.zeros(
            self.in_features // group, self.out_features, 2, dtype=sz_dtype, device=device
        )
        sz[..., 0] = scale.to(device, sz_dtype)[None, :]
        self._group = group
        self.qweight = packed
        self.scales = sz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(
                x2.to(torch.bfloat16), self.qweight, self._group, self.scales
            ).to(x.dtype)
        elif self.kernel == "int4pack-cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(self.scales.dtype), self.qweight, self._group, self.scales
            ).to(x.dtype)
        elif self.kernel == "dequant":
            q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
            y = F.linear(x2, q.to(x.dtype)) * self.scales.to(x.dtype)
        else:
            raise RuntimeError("QuantLinear used before set_weight()")
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)
