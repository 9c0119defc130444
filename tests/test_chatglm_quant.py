"""ChatGLM's int4/int8 checkpoints and ``--quantize``, loaded natively (no remote code).

The tiny checkpoints are written in the published layout by ``chatglm2_fixture`` (its own
implementation of the original ``quantize()``); the reference is an fp32 checkpoint holding
the format's reference dequantization ``q * scale[row]``. Served greedy tokens must equal the
reference's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from chatglm2_fixture import make_tiny_chatglm2, quantize_chatglm, write_dequantized_reference
from grpc_client import chat_request, collect
from procs import start_model_server

from glmserve.v1 import chat_pb2_grpc
from model_server.models.base import ChatMessage, ModelLoadError
from model_server.models.quant import QuantLinear
from model_server.models.registry import load_model

CPU = torch.device("cpu")
PROMPTS = ["hi", "你好，请问现在几点了？", "tell me a story about the world and the time"]
# Wider than the default tiny model so that int4 takes the packed CPU kernel (in % 32 == 0).
SHAPE = {"hidden": 64, "ffn": 96, "num_layers": 2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant")
    dirs = {"fp16": make_tiny_chatglm2(root / "fp16", **SHAPE)}
    for bits in (4, 8):
        q = make_tiny_chatglm2(root / f"int{bits}", quantization_bit=bits, **SHAPE)
        dirs[f"int{bits}"] = q
        dirs[f"ref{bits}"] = write_dequantized_reference(q, root / f"ref{bits}")
    return dirs


def greedy_ids(loaded, prompt: str, n: int = 16) -> list[int]:
    """Plain greedy decoding with the model's own forward and cache (no engine)."""
    from transformers import DynamicCache

    ids = loaded.chat_format.render([ChatMessage("user", prompt)])
    cache, out = DynamicCache(), []
    x = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            logits = loaded.model(input_ids=x, cache=cache, use_cache=True).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_checkpoint_matches_reference_dequantization(checkpoints, bits):
    quant = load_model(str(checkpoints[f"int{bits}"]), CPU, "float32", None)
    ref = load_model(str(checkpoints[f"ref{bits}"]), CPU, "float32", None)
    linears = [m for m in quant.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 6 * SHAPE["num_layers"]  # q, k, v, o, gate_up, down per layer
    assert quant.quantization is not None and quant.quantization.startswith(f"int{bits}")
    if bits == 4:
        assert {m.kernel for m in linears} == {"int4pack-cpu"}
    x = torch.tensor([quant.chat_format.render([ChatMessage("user", PROMPTS[2])])])
    with torch.inference_mode():
        a, b = quant.model(input_ids=x).logits, ref.model(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    for prompt in PROMPTS:
        assert greedy_ids(quant, prompt) == greedy_ids(ref, prompt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_checkpoint_on_cuda_matches_reference(checkpoints, bits):
    """On a GPU: int4 through tinygemm, int8 through the cast; bf16, so a looser bound."""
    cuda = torch.device("cuda")
    quant = load_model(str(checkpoints[f"int{bits}"]), cuda, "bfloat16", None)
    ref = load_model(str(checkpoints[f"ref{bits}"]), CPU, "float32", None)
    kernels = {m.kernel for m in quant.model.modules() if isinstance(m, QuantLinear)}
    assert kernels == ({"tinygemm"} if bits == 4 else {"dequant"})
    x = torch.tensor([quant.chat_format.render([ChatMessage("user", PROMPTS[2])])])
    with torch.inference_mode():
        got = quant.model(input_ids=x.to(cuda)).logits.float().cpu()
        want = ref.model(input_ids=x).logits
    assert float((got - want).abs().max()) <= 0.03 * float(want.abs().max())


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_at_load_equals_the_published_quantization(checkpoints, tmp_path, bits):
    """``--quantize intN`` on the fp16 checkpoint == the int-N checkpoint of the same weights."""
    fp16 = checkpoints["fp16"]
    # torch's own linears throughout: this compares quantizations, not CPU kernels.
    plain = {"cpu_linear": "torch"}
    at_load = load_model(str(fp16), CPU, "float32", None, quantize=f"int{bits}", **plain)
    # The same weights quantized offline, in the published layout, then dequantized.
    state = torch.load(next(fp16.glob("pytorch_model-00001-*.bin")), weights_only=True)
    for shard in sorted(fp16.glob("pytorch_model-0000[2-9]-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    offline = tmp_path / "offline"
    shutil.copytree(fp16, offline)
    for f in offline.glob("pytorch_model*"):
        f.unlink()
    torch.save(quantize_chatglm(state, bits), offline / "pytorch_model.bin")
    cfg = json.loads((offline / "config.json").read_text())
    (offline / "config.json").write_text(json.dumps({**cfg, "quantization_bit": bits}))
    ref_dir = write_dequantized_reference(offline, tmp_path / "ref")
    ref = load_model(str(ref_dir), CPU, "float32", None, **plain)
    full = load_model(str(fp16), CPU, "float32", None, **plain)
    for prompt in PROMPTS:
        assert greedy_ids(at_load, prompt) == greedy_ids(ref, prompt)
    packed = sum(b.numel() * b.element_size() for b in at_load.model.buffers())
    dense = sum(
        p.numel() * p.element_size()
        for n, p in full.model.named_parameters()
        if n.endswith("proj.weight")
    )
    assert packed < dense / (3 if bits == 8 else 5)


def served_greedy(model_dir: Path, prompts: list[str]) -> tuple[list[list[int]], str]:
    """Greedy ids of each prompt from a real model server, and its log."""
    with (
        start_model_server(str(model_dir), "--dtype", "float32") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        out = []
        for prompt in prompts:
            req = chat_request(prompt, max_tokens=16, temperature=0.0, ignore_eos=True)
            _, msgs = collect(stub.Chat(req, timeout=60))
            out.append([t for m in msgs for t in m.token_ids])
        return out, server.log_text()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_checkpoint_served_over_grpc_gives_reference_tokens(checkpoints, bits):
    ref = load_model(str(checkpoints[f"ref{bits}"]), CPU, "float32", None)
    served, log = served_greedy(checkpoints[f"int{bits}"], PROMPTS)
    assert served == [greedy_ids(ref, p) for p in PROMPTS]
    assert f"quantization=int{bits}" in log


def test_32k_checkpoint_served_over_grpc_gives_reference_tokens(checkpoints, tmp_path):
    """ChatGLM2-6B-32k: the reference divides the position index by rope_ratio."""
    long = make_tiny_chatglm2(tmp_path / "32k", rope_ratio=8, **SHAPE)
    base = load_model(str(checkpoints["fp16"]), CPU, "float32", None)
    served, _ = served_greedy(long, PROMPTS)
    for prompt, got in zip(PROMPTS, served, strict=True):
        ids = base.chat_format.render([ChatMessage("user", prompt)])
        want: list[int] = []
        with torch.inference_mode():
            for _ in range(16):
                positions = torch.arange(len(ids)) / 8
                logits = base.model(input_ids=torch.tensor([ids]), position_ids=positions[None])
                nxt = int(logits.logits[0, -1].argmax())
                want.append(nxt)
                ids.append(nxt)
        assert got == want


@pytest.mark.parametrize(
    ("change", "quantize", "message"),
    [
        ({"quantization_bit": 3}, None, "quantization_bit=3"),
        ({}, "int4", "already int8"),
    ],
)
def test_bad_quantization_settings_are_refused(checkpoints, tmp_path, change, quantize, message):
    d = tmp_path / "m"
    shutil.copytree(checkpoints["int8"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(d), CPU, "float32", None, quantize=quantize)


def test_quantized_weight_with_wrong_shape_is_refused(checkpoints, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(checkpoints["int4"], d)
    (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "quantization_bit": 8})
    )
    with pytest.raises(ModelLoadError, match="expected"):
        load_model(str(d), CPU, "float32", None)


def test_quantize_refuses_non_chatglm_models(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="only ChatGLM"):
        load_model(str(tiny_model_dir), CPU, "float32", None, quantize="int8")
