"""fp32 linears on the CPU through oneDNN with weights packed once at load (``--cpu-linear``).

torch sends an fp32 ``nn.Linear`` on the CPU to MKL's sgemm. On AMD CPUs MKL takes its
generic path and ignores AVX-512; oneDNN (bundled with torch as ``mkldnn``) dispatches on the
CPU's features instead, and a weight reordered once into its blocked layout skips the per-call
repacking. On the 2-core AMD EPYC of the CI box (docs/engine.md, "oneDNN linears"): a decode
step of the default model at 16 rows takes half the time, a 190-token prefill's linears
2.5-2.8x less. The arithmetic is the same fp32 dot products summed in another order, so logits
differ from MKL's in the last bits only. From two rows up, a row's result does not depend on
the other rows or their number (MKL's does at small row counts); a single row may take another
kernel.

Memory: each packed weight replaces its ``nn.Linear`` (the fp32 original is freed, and the
checkpoint file's mmap with it), except an output layer tied to the input embeddings, whose
packed copy is extra (vocab x hidden x 4 bytes; 113 MiB on the default model). The packed
tensors are buffers, so :func:`model_server.engine.runner.weight_bytes` counts them. While
packing, the checkpoint's pages and the packed copies are both resident (clean file pages the
kernel can drop under pressure): the default model peaks at ~1.5 GiB during load and settles
at ~1.05 GiB RSS, against ~0.75 GiB with ``--cpu-linear torch`` once serving has touched every
weight.
"""

from __future__ import annotations

import logging
import os
import platform

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "KERNEL_CACHE_ENTRIES",
    "PackedLinear",
    "onednn_available",
    "pack_linears",
    "packs_by_default",
]

# oneDNN compiles a kernel per (layer shape, row count) and keeps it in two LRU caches, its
# primitive cache and ideep's, of 1,024 entries each by default at ~0.5 MiB an entry. Serving
# meets every row count (decode batches, prefill chunks): 300 row counts over 4 projection
# shapes grew RSS by 614 MiB. 64 entries a cache bound that to ~65 MiB; a miss costs ~0.3 ms
# of kernel generation. Read once, at oneDNN's first use in the process; the variables, when
# set, win.
KERNEL_CACHE_ENTRIES = 64
_KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops (x86 and arm64 wheels do)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def packs_by_default() -> bool:
    """``--cpu-linear auto`` packs on x86-64, where oneDNN runs its own AVX2/AVX-512 kernels
    (measured on AMD EPYC). On arm64 torch's oneDNN goes through the Arm Compute Library,
    which was never measured here, so ``auto`` leaves arm64 to torch."""
    return platform.machine().lower() in ("x86_64", "amd64")


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward on a weight packed for oneDNN; inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(weight, None),  # None: any row count
            persistent=False,
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Replaces every fp32 CPU ``nn.Linear`` in ``model`` with a :class:`PackedLinear`; returns
    how many. Call it last in loading: nothing after it may expect ``nn.Linear`` weights."""
    for var in _KERNEL_CACHE_VARS:
        os.environ.setdefault(var, str(KERNEL_CACHE_ENTRIES))
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _packable(child):
                setattr(parent, name, PackedLinear(child))
                count += 1
    if count:
        _own_remaining_tensors(model)
    return count


def _own_remaining_tensors(model: nn.Module) -> None:
    """Copies what is left of the checkpoint (embeddings, norms, biases) into memory of the
    process's own. Weights loaded from safetensors are views of one mmap of the file, which
    stays mapped while any view lives; packing read every page of it, so without this the
    process would keep the whole file resident besides the packed copies (+513 MiB RSS on the
    default model)."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.data = param.data.clone()
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.layout == torch.strided:
                setattr(module, name, buf.clone())  # stays a buffer, persistence kept


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:  # subclasses (quantized, LoRA) keep their own forward
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.layout == torch.strided
