"""The fused RMSNorm and GLM rotary (model_server/models/fused_layers.py) compute transformers'
bits: the whole engine path (prompt, prompt over cached KV, padded group, decode steps) gives
identical logits and KV in fp32 on a Llama-shaped and a ChatGLM2 tiny model; the rotary alone
is identical in bf16 and fp16 too, and the bf16 norm is within one unit in the last place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_shapes import engine_forwards
from torch import nn
from transformers.models.glm.modeling_glm import GlmAttention, GlmRMSNorm

from model_server.engine.runner import ModelRunner
from model_server.models import registry
from model_server.models.fused_layers import FusedRMSNorm, GlmFusedRotaryAttention, fuse_layers


@pytest.mark.parametrize("which", ["llama", "chatglm2"])
@pytest.mark.parametrize("cpu_linear", ["torch", "onednn"])
def test_fused_model_is_bit_identical_in_fp32(
    which: str,
    cpu_linear: str,
    tiny_model_dir: Path,
    tiny_chatglm2_dir: Path,
) -> None:
    folder = str(tiny_model_dir if which == "llama" else tiny_chatglm2_dir)
    cpu = torch.device("cpu")
    # The loader fuses the norms on CUDA only (module docstring); here both kinds, by hand.
    served = registry.load_model(folder, cpu, "float32", None, cpu_linear=cpu_linear)
    assert not any(isinstance(m, FusedRMSNorm) for m in served.model.modules())
    fused = registry.load_model(
        folder, cpu, "float32", None, cpu_linear=cpu_linear, fused_layers=False
    )
    layers = fused.model.config.num_hidden_layers
    counts = fuse_layers(fused.model)
    assert counts["rmsnorm"] == 2 * layers + 1  # two per layer and the final one
    assert counts["rotary"] == (layers if which == "chatglm2" else 0)
    rotary = [m for m in served.model.modules() if isinstance(m, GlmFusedRotaryAttention)]
    assert len(rotary) == counts["rotary"]

    stock = registry.load_model(
        folder, cpu, "float32", None, cpu_linear=cpu_linear, fused_layers=False
    )
    assert not any(isinstance(m, GlmFusedRotaryAttention) for m in stock.model.modules())

    with torch.inference_mode():
        ours = engine_forwards(ModelRunner(fused))
        loader = engine_forwards(ModelRunner(served))
        theirs = engine_forwards(ModelRunner(stock))
    assert len(ours) == len(theirs) == len(loader)
    for a, b, c in zip(ours, theirs, loader):
        assert torch.equal(a, b) and torch.equal(c, b)


def _glm_attention(dtype: torch.dtype) -> tuple[GlmAttention, GlmAttention]:
    from transformers import GlmConfig

    cfg = GlmConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        partial_rotary_factor=0.5,
        attention_bias=True,
        num_hidden_layers=1,
        intermediate_size=32,
        vocab_size=32,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    stock = GlmAttention(cfg, layer_idx=0).to(dtype)
    model = nn.ModuleDict({"attn": GlmAttention(cfg, layer_idx=0).to(dtype)})
    model["attn"].load_state_dict(stock.state_dict())
    assert fuse_layers(model) == {"rmsnorm": 0, "rotary": 1}
    return stock, model["attn"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_glm_rotary_is_bit_identical_in_every_dtype(dtype: torch.dtype) -> None:
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    stock, fused = _glm_attention(dtype)
    rotary = GlmRotaryEmbedding(stock.config)
    hidden = torch.randn(2, 7, 64).to(dtype)
    for offset in (0, 900):  # the tables follow each forward's positions
        positions = torch.arange(offset, offset + 7)[None].expand(2, -1)
        cos, sin = rotary(hidden, positions)
        with torch.inference_mode():
            a, _ = stock(hidden, position_embeddings=(cos, sin), attention_mask=None)
            b, _ = fused(hidden, position_embeddings=(cos, sin), attention_mask=None)
        assert torch.equal(a, b)


def test_bf16_norm_is_within_one_ulp() -> None:
    norm = GlmRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(64).to(torch.bfloat16)
    x = (torch.randn(3, 5, 64) * 4).to(torch.bfloat16)
    fused = FusedRMSNorm(norm.weight, norm.variance_epsilon)
    a, b = norm(x).float(), fused(x).float()
    ulp = torch.finfo(torch.bfloat16).eps * a.abs().clamp(min=1e-3)
    assert ((a - b).abs() <= ulp).all()


def test_norm_with_another_dtype_than_its_input_is_transformers_own() -> None:
    """An fp32 weight over bf16 states: transformers promotes to fp32; so does the fused one."""
    norm = GlmRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.randn(64)
    x = (torch.randn(3, 5, 64) * 4).to(torch.bfloat16)
    out = FusedRMSNorm(norm.weight, norm.variance_epsilon)(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, norm(x))


def test_leaves_other_norms_and_hooked_modules_alone() -> None:
    class OtherNorm(nn.Module):  # Gemma-style: (1 + weight), not the standard formula
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (1.0 + self.weight)

    hooked = GlmRMSNorm(8)
    hooked._hf_hook = object()  # what accelerate's dispatch leaves on a placed module
    model = nn.ModuleDict({"other": OtherNorm(), "hooked": hooked, "plain": GlmRMSNorm(8)})
    assert fuse_layers(model) == {"rmsnorm": 1, "rotary": 0}
    assert isinstance(model["other"], OtherNorm)
    assert model["hooked"] is hooked
    assert isinstance(model["plain"], FusedRMSNorm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_chatglm2_on_cuda_matches_stock(
    tiny_chatglm2_dir: Path,
) -> None:
    """On a GPU in bf16: the fused kernel's norm rounds once, so a loose bound, not bits."""
    cuda = torch.device("cuda")
    fused = registry.load_model(str(tiny_chatglm2_dir), cuda, "bfloat16", None)
    assert any(isinstance(m, GlmFusedRotaryAttention) for m in fused.model.modules())
    assert any(isinstance(m, FusedRMSNorm) for m in fused.model.modules())
    stock = registry.load_model(str(tiny_chatglm2_dir), cuda, "bfloat16", None, fused_layers=False)
    with torch.inference_mode():
        ours = engine_forwards(ModelRunner(fused))
        theirs = engine_forwards(ModelRunner(stock))
    for a, b in zip(ours, theirs):
        a, b = a.float().cpu(), b.float().cpu()
        assert float((a - b).abs().max()) <= 0.03 * float(b.abs().max())


def test_bench_fused_layers_checks_its_results() -> None:
    """``python -m bench.fused_layers``'s measurement, a few calls on the CPU: the checks it
    reports are the real comparison (a broken rotary would read "DIFFERENT")."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.fused_layers import measure

    rows = measure(2, torch.device("cpu"), torch.float32, calls=3)
    assert [r["op"] for r in rows] == ["rmsnorm", "rotary q+k"]
    assert rows[0]["within_one_ulp"] and rows[0]["max_abs_diff"] == 0.0
    assert rows[1]["identical"]
    assert all(r["fused_host_us"] > 0 and r["transformers_host_us"] > 0 for r in rows)
