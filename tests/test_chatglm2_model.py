"""ChatGLM2 on GlmForCausalLM equals a reference forward written from the spec.

The reference below is written straight from /work/shared/docs/chatglm2.md ("The forward
pass"), on the checkpoint's own tensor names, so it checks the config mapping and the weight
split/rename, not just that transformers runs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from chatglm2_fixture import make_tiny_chatglm2

from model_server.models.base import ChatMessage, LoadedModel, ModelLoadError
from model_server.models.chatglm2 import load_chatglm2

CPU = torch.device("cpu")
ATOL = 1e-4


# ---------------------------------------------------------------- reference (from the spec)
def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(torch.load(path / file, weights_only=True))
    return {k: v.float() for k, v in state.items()}


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotary(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]. Adjacent pairs (2i, 2i+1) of the first d/2 dims turn by p·θ_i."""
    rot = x.shape[-1] // 2
    theta = 10000.0 ** (-torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    angle = pos[:, None].float() * theta[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x0, x1 = x[..., :rot:2], x[..., 1:rot:2]
    turned = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([turned, x[..., rot:]], dim=-1)


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """ChatGLM2's forward for one sequence at positions 0..T-1; returns [T, padded_vocab]."""
    heads, groups, d = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps = cfg["layernorm_epsilon"]
    t = len(ids)
    pos = torch.arange(t)
    h = sd["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        a = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        qkv = a @ sd[p + "self_attention.query_key_value.weight"].T
        qkv = qkv + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
        q = rotary(q.view(t, heads, d), pos)
        k = rotary(k.view(t, groups, d), pos)
        v = v.view(t, groups, d)
        group_of_head = torch.arange(heads) // (heads // groups)
        k, v = k[:, group_of_head], v[:, group_of_head]
        scores = torch.einsum("thd,shd->hts", q, k) / d**0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        o = torch.einsum("hts,shd->thd", probs, v).reshape(t, heads * d)
        h = h + o @ sd[p + "self_attention.dense.weight"].T
        b = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        u1, u2 = (b @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(u1) * u2) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    h = rms_norm(h, sd["transformer.encoder.final_layernorm.weight"], eps)
    return h @ sd["transformer.output_layer.weight"].T


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def loaded(tiny_chatglm2_dir: Path) -> LoadedModel:
    return load_chatglm2(str(tiny_chatglm2_dir), CPU, torch.float32, None)


@pytest.fixture(scope="module")
def reference(tiny_chatglm2_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    cfg = json.loads((tiny_chatglm2_dir / "config.json").read_text())
    return read_checkpoint(tiny_chatglm2_dir), cfg


@pytest.fixture(scope="module")
def prompt_ids(loaded: LoadedModel) -> list[int]:
    msgs = [ChatMessage("user", "你好, please answer the question 今天时间?")]
    return loaded.chat_format.render(msgs)


def forward(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- equivalence
def test_full_forward_matches_reference(loaded, reference, prompt_ids):
    sd, cfg = reference
    want = reference_logits(sd, cfg, prompt_ids)
    got = forward(loaded.model, prompt_ids)
    assert got.shape == want.shape == (len(prompt_ids), cfg["padded_vocab_size"])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    # Not vacuous: the logits differ from position to position.
    assert (want[1:] - want[:-1]).abs().max() > 0.1


def test_rotary_is_interleaved_and_partial(reference):
    """Guard the reference itself: moving a token shifts only via rotary, so order matters."""
    sd, cfg = reference
    a = reference_logits(sd, cfg, [5, 6, 7, 8])
    b = reference_logits(sd, cfg, [6, 5, 7, 8])
    assert (a[-1] - b[-1]).abs().max() > 1e-3


def test_incremental_decoding_with_cache_matches_full(loaded, reference, prompt_ids):
    sd, cfg = reference
    model = loaded.model
    continuation = [17, 300, 42, 699]
    full_ids = prompt_ids + continuation
    want = reference_logits(sd, cfg, full_ids)
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        cache = out.cache
        got = [out.logits[0, -1]]
        for step, tok in enumerate(continuation):
            pos = len(prompt_ids) + step
            out = model(
                torch.tensor([[tok]]),
                position_ids=torch.tensor([[pos]]),
                attention_mask=torch.ones(1, pos + 1, dtype=torch.long),
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            got.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(got), want[len(prompt_ids) - 1 :], atol=ATOL, rtol=ATOL)


def greedy(model: torch.nn.Module, ids: list[int], steps: int) -> list[int]:
    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(steps):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = model(torch.tensor([[nxt]]), cache=res.cache, use_cache=True)
    return out


def test_greedy_is_deterministic_and_matches_reference(loaded, reference, prompt_ids):
    sd, cfg = reference
    a = greedy(loaded.model, prompt_ids, 8)
    assert a == greedy(loaded.model, prompt_ids, 8)
    ids = list(prompt_ids)
    for _ in range(8):
        ids.append(int(reference_logits(sd, cfg, ids)[-1].argmax()))
    assert a == ids[len(prompt_ids) :]


def test_left_padded_batch_equals_solo(loaded):
    """What the engine does: left padding + attention_mask + position_ids, then decode steps."""
    model = loaded.model
    tok = loaded.tokenizer
    rows = [
        loaded.chat_format.render([ChatMessage("user", text)])
        for text in ("hi", "你好, what is the time of the training data?", "问 答 world")
    ]
    width = max(map(len, rows))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    seqs = [list(r) for r in rows]
    with torch.inference_mode():
        out = model(input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for step in range(4):
            for b, seq in enumerate(seqs):
                solo = forward(model, seq)[-1]
                torch.testing.assert_close(out.logits[b, -1], solo, atol=ATOL, rtol=ATOL)
                if step == 0:  # every real position of the prefill, not just the last
                    n = len(seq)
                    full = forward(model, seq)
                    torch.testing.assert_close(out.logits[b, -n:], full, atol=ATOL, rtol=ATOL)
            nxt = out.logits[:, -1].argmax(-1)
            for b, seq in enumerate(seqs):
                seq.append(int(nxt[b]))
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                nxt[:, None],
                attention_mask=mask,
                position_ids=positions,
                cache=out.cache,
                use_cache=True,
            )


# ---------------------------------------------------------------- loading
def test_loaded_model_defaults(loaded, tiny_chatglm2_dir):
    assert loaded.architecture == "chatglm"
    assert loaded.eos_token_ids == frozenset({2})
    assert loaded.default_temperature == 0.8
    assert loaded.default_top_p == 0.8
    assert loaded.nan_guard_token_id == 5
    assert loaded.max_model_len == 32768
    assert loaded.dtype == torch.float32 and loaded.device == CPU
    assert not loaded.model.training
    assert type(loaded.model).__name__ == "GlmForCausalLM"
    assert loaded.source == str(tiny_chatglm2_dir)
    capped = load_chatglm2(str(tiny_chatglm2_dir), CPU, None, 1000)
    assert capped.max_model_len == 1000
    assert capped.dtype == torch.float32  # auto on CPU
    assert load_chatglm2(str(tiny_chatglm2_dir), CPU, None, 10**6).max_model_len == 32768


def test_half_precision_load(loaded, tiny_chatglm2_dir, prompt_ids):
    lm = load_chatglm2(str(tiny_chatglm2_dir), CPU, torch.bfloat16, None)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.model.model.rotary_emb.inv_freq.dtype == torch.float32
    half = forward(lm.model, prompt_ids).float()
    full = forward(loaded.model, prompt_ids)
    assert (half - full).abs().max() < 0.25 * full.abs().max()


def test_remote_code_is_never_imported(loaded, tiny_chatglm2_dir):
    for name in ("modeling_chatglm.py", "tokenization_chatglm.py", "configuration_chatglm.py"):
        assert "raise RuntimeError" in (tiny_chatglm2_dir / name).read_text()
    remote = {"modeling_chatglm", "tokenization_chatglm", "configuration_chatglm"}
    for module in list(sys.modules):
        assert module.rsplit(".", 1)[-1] not in remote, module
        assert not module.startswith("transformers_modules"), module


@pytest.mark.parametrize(
    ("shards", "safetensors"), [(1, False), (3, True), (1, True)], ids=["bin", "st-3", "st-1"]
)
def test_load_other_layouts(tmp_path, loaded, prompt_ids, shards, safetensors):
    path = make_tiny_chatglm2(tmp_path / "m", shards=shards, safetensors=safetensors)
    files = sorted(p.name for p in path.iterdir())
    if safetensors:
        assert not any(f.endswith(".bin") for f in files)
    lm = load_chatglm2(str(path), CPU, torch.float32, None)
    torch.testing.assert_close(forward(lm.model, prompt_ids), forward(loaded.model, prompt_ids))


# ---------------------------------------------------------------- detection and errors
def test_load_model_refuses_checkpoints_that_need_their_own_code(tmp_path):
    """The refusal path production uses: registry.load_model on a directory whose
    model_type transformers does not know (with or without auto_map) never imports its code."""
    from model_server.models.base import ModelLoadError
    from model_server.models.registry import load_model

    custom = {"model_type": "my_secret_lm", "auto_map": {"AutoModel": "modeling_x.X"}}
    (tmp_path / "config.json").write_text(json.dumps(custom))
    (tmp_path / "modeling_x.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), CPU, "float32", None)
    assert "my_secret_lm" in str(err.value) and "never runs code" in str(err.value)
    assert "auto_map" in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_secret_lm"}))
    with pytest.raises(ModelLoadError, match="not supported natively"):
        load_model(str(tmp_path), CPU, "float32", None)


def copy_fixture(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quantization_bit": 3}, "quantization_bit"),
        ({"pre_seq_len": 128}, "pre_seq_len"),
        ({"kv_channels": None, "padded_vocab_size": None}, "ChatGLM-6B (v1)"),
        ({"rope_ratio": 0}, "rope_ratio"),
        ({"_name_or_path": "THUDM/glm-4-9b-chat"}, "GLM-4"),
        ({"rmsnorm": False}, "rmsnorm"),
        ({"hidden_size": 96}, "shape"),
        ({"num_layers": 3}, "lacks"),
        ({"num_layers": 1}, "past num_layers"),
        ({"multi_query_group_num": 3}, "multiple"),
    ],
)
def test_unsupported_configs_raise(tiny_chatglm2_dir, tmp_path, changes, message):
    path = copy_fixture(tiny_chatglm2_dir, tmp_path / "m", **changes)
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_chatglm2(str(path), CPU, None, None)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "config.json"),
        ("tokenizer.model", "tokenizer.model"),
        ("pytorch_model-00002-of-00002.bin", "missing"),
        ("pytorch_model.bin.index.json", "no weights"),
    ],
)
def test_missing_files_raise(tiny_chatglm2_dir, tmp_path, remove, message):
    path = copy_fixture(tiny_chatglm2_dir, tmp_path / "m")
    (path / remove).unlink()
    with pytest.raises(ModelLoadError, match=message):
        load_chatglm2(str(path), CPU, None, None)


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_chatglm2(str(tmp_path / "absent"), CPU, None, None)


def test_bad_tokenizer_model(tiny_chatglm2_dir, tmp_path):
    path = copy_fixture(tiny_chatglm2_dir, tmp_path / "m")
    (path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelLoadError, match="SentencePiece"):
        load_chatglm2(str(path), CPU, None, None)


def test_page_release_only_touches_the_shard_file(tiny_chatglm2_dir):
    """Released mmap pages fault back in from the file; anonymous memory is never touched."""
    from model_server.models.chatglm2 import pages

    file = tiny_chatglm2_dir / "pytorch_model-00001-of-00002.bin"
    name = "transformer.embedding.word_embeddings.weight"
    state = torch.load(file, mmap=True, weights_only=True)
    mappings = pages.file_mappings(file)
    tensor = state[name]
    before = tensor.clone()
    released = pages.release(tensor, mappings)
    if sys.platform.startswith("linux"):
        assert mappings and released > 0
    assert torch.equal(tensor, before)
    anonymous = before.clone()
    assert pages.release(anonymous, mappings) == 0
    assert torch.equal(anonymous, before)
