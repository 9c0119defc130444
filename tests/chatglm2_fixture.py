"""A tiny ChatGLM2 checkpoint in the real on-disk layout, for tests anywhere in the project.

``make_tiny_chatglm2(dir)`` writes config.json (the real fields, scaled down), sharded
``pytorch_model-*.bin`` (or safetensors) with the original tensor names, a SentencePiece BPE
``tokenizer.model`` with byte fallback trained in-process on generated Chinese/English text,
``tokenizer_config.json``, and remote-code ``*.py`` files that raise if anything imports them.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

SP_VOCAB_SIZE = 700
# Characters outside the training text: they can only be encoded by byte fallback.
NOT_IN_VOCAB = "龘😀"

_ZH = (
    "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出要于就下得可你年生自会那后能对着"
    "事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又"
    "定见只主没公从问答训练时间模型助手谢请今明"
)
_EN_TEXT = (
    "the model answers questions about time and training data with a helpful tone while users "
    "ask many things hello world please thank you round answer question system sop eop mask "
    "quick brown fox jumps over lazy dog python code stream token byte space newline"
)
_EN = _EN_TEXT.split(" ")

_REMOTE_CODE = (
    '"""Stand-in for the checkpoint\'s remote code: glmserve must never import it."""\n\n'
    'raise RuntimeError("remote code from the checkpoint was imported: {name}")\n'
)


def tiny_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """Mixed Chinese/English lines, including the chat format's own markers."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 3 == 0:
            words = " ".join(rng.choice(_EN) for _ in range(rng.randint(3, 12)))
            out.append(words.capitalize() + rng.choice([".", ",", "?", "!", " 123.", " 2023"]))
        elif i % 3 == 1:
            text = "".join(rng.choice(_ZH) for _ in range(rng.randint(4, 24)))
            out.append(text + rng.choice(["。", "，", "？", "！", "：", ""]))
        else:
            q = "".join(rng.choice(_ZH) for _ in range(rng.randint(2, 8)))
            a = " ".join(rng.choice(_EN) for _ in range(rng.randint(1, 4)))
            out.append(f"[Round {rng.randint(1, 9)}]  问：{q} 答：{a}  ")
    return out


def train_tokenizer(seed: int = 0, vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """A SentencePiece BPE model like ChatGLM2's (byte fallback, identity normalisation)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed=seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def chatglm2_config(
    *,
    num_layers: int,
    hidden: int,
    heads: int,
    kv_groups: int,
    kv_channels: int,
    ffn: int,
    padded_vocab_size: int,
    seq_length: int = 32768,
    torch_dtype: str = "float16",
) -> dict[str, object]:
    """config.json as THUDM/chatglm2-6b ships it, with the size fields given."""
    return {
        "_name_or_path": "THUDM/chatglm2-6b",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": (
                "modeling_chatglm.ChatGLMForSequenceClassification"
            ),
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": ffn,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": hidden,
        "kv_channels": kv_channels,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": kv_groups,
        "num_attention_heads": heads,
        "num_layers": num_layers,
        "original_rope": True,
        "padded_vocab_size": padded_vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": seq_length,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.27.1",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def tensor_specs(cfg: dict[str, object]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a ChatGLM2 checkpoint, in the original's order, with its shape."""
    h, d = int(cfg["hidden_size"]), int(cfg["kv_channels"])
    heads, groups = int(cfg["num_attention_heads"]), int(cfg["multi_query_group_num"])
    ffn, vocab = int(cfg["ffn_hidden_size"]), int(cfg["padded_vocab_size"])
    qkv = heads * d + 2 * groups * d
    specs: list[tuple[str, tuple[int, ...]]] = [
        ("transformer.embedding.word_embeddings.weight", (vocab, h)),
        ("transformer.rotary_pos_emb.inv_freq", (d // 4,)),
    ]
    for i in range(int(cfg["num_layers"])):
        p = f"transformer.encoder.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attention.query_key_value.weight", (qkv, h)),
            (p + "self_attention.query_key_value.bias", (qkv,)),
            (p + "self_attention.dense.weight", (h, heads * d)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.dense_h_to_4h.weight", (2 * ffn, h)),
            (p + "mlp.dense_4h_to_h.weight", (h, ffn)),
        ]
    specs += [
        ("transformer.encoder.final_layernorm.weight", (h,)),
        ("transformer.output_layer.weight", (vocab, h)),
    ]
    return specs


def random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """A plausible random value: norms near 1, embeddings ~1, linears ~1/sqrt(fan_in)."""
    if name.endswith("inv_freq"):
        dim = 2 * shape[0]
        return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).to(dtype)
    if name.endswith("layernorm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if name.endswith("word_embeddings.weight"):
        return torch.randn(shape, generator=gen).to(dtype)
    if name.endswith(".bias"):
        return (0.1 * torch.randn(shape, generator=gen)).to(dtype)
    return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)


def split_shards(names: list[str], shards: int) -> list[list[str]]:
    """Names cut into ``shards`` contiguous, roughly equal groups (as HF's sharding does)."""
    shards = max(1, min(shards, len(names)))
    size = -(-len(names) // shards)
    return [names[i : i + size] for i in range(0, len(names), size)]


def write_remote_code(directory: Path) -> None:
    """The original's *.py files, replaced by tripwires."""
    for name in (
        "configuration_chatglm.py",
        "modeling_chatglm.py",
        "tokenization_chatglm.py",
        "quantization.py",
    ):
        (directory / name).write_text(_REMOTE_CODE.format(name=name), encoding="utf-8")


def make_tiny_chatglm2(
    dir: Path,  # noqa: A002 - the name the project's tests use
    *,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_groups: int = 2,
    kv_channels: int = 16,
    ffn: int = 128,
    shards: int = 2,
    safetensors: bool = False,
    seed: int = 0,
    torch_dtype: str = "float16",
    quantization_bit: int | None = None,
    rope_ratio: float | None = None,
    chatglm3: bool = False,
) -> Path:
    """Write a tiny ChatGLM2 checkpoint into ``dir`` (created) and return ``dir``.

    ``quantization_bit`` (4/8): the linears in the published int4/int8 layout (see
    :func:`quantize_chatglm`). ``rope_ratio``: the -32k field. ``chatglm3``: ChatGLM3-6B's
    name and tokenizer_config.json (its role tokens).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    sp_model = train_tokenizer(seed=seed)
    (dir / "tokenizer.model").write_bytes(sp_model)
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_proto=sp_model).get_piece_size()
    padded = -(-(n + 5) // 64) * 64
    cfg = chatglm2_config(
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        kv_groups=kv_groups,
        kv_channels=kv_channels,
        ffn=ffn,
        padded_vocab_size=padded,
        torch_dtype=torch_dtype,
    )
    if quantization_bit:
        cfg["quantization_bit"] = quantization_bit
    if rope_ratio is not None:
        cfg["rope_ratio"] = rope_ratio
    tokenizer_cfg: dict[str, object] = {
        "name_or_path": "THUDM/chatglm2-6b",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    if chatglm3:
        cfg["_name_or_path"] = tokenizer_cfg["name_or_path"] = "THUDM/chatglm3-6b"
        roles = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
        names = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", *roles)
        tokenizer_cfg["added_tokens_decoder"] = {
            str(n + i): {"content": t, "special": True} for i, t in enumerate(names)
        }
    (dir / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_cfg, indent=2), encoding="utf-8"
    )
    write_remote_code(dir)

    dtype = getattr(torch, torch_dtype)
    gen = torch.Generator().manual_seed(seed)
    state = {name: random_tensor(name, shape, gen, dtype) for name, shape in tensor_specs(cfg)}
    if quantization_bit:
        state = quantize_chatglm(state, quantization_bit)
    write_state(dir, state, shards=shards, safetensors=safetensors)
    return dir


QUANTIZED_LINEARS = (
    "self_attention.query_key_value.weight",
    "self_attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)


def quantize_chatglm(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The original ``quantize()``, written from the format description (docs/chatglm2.md):
    per output row ``scale = max|w| / (2^(bits-1) - 1)`` in fp16, ``q = round(w / scale)``
    as int8; 4 bit packs column 2j into the high nibble and 2j+1 into the low one."""
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if not name.endswith(QUANTIZED_LINEARS):
            out[name] = w
            continue
        w16 = w.to(torch.float16)
        scale = (w16.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).to(torch.float16)
        q = torch.round(w16 / scale[:, None]).to(torch.int8)
        if bits == 4:
            q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)
        out[name] = q
        out[name + "_scale"] = scale
    return out


def dequantize_chatglm(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The format's reference dequantization, in fp32: ``q * scale[row]`` for each pair."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("_scale"):
            continue
        if name.endswith(QUANTIZED_LINEARS):
            q = t
            if bits == 4:
                high = q >> 4
                low = (q << 4) >> 4
                q = torch.stack((high, low), dim=-1).reshape(q.shape[0], -1)
            out[name] = q.float() * state[name + "_scale"].float()[:, None]
        else:
            out[name] = t.float()
    return out


def write_dequantized_reference(quantized: Path, dst: Path) -> Path:
    """An fp32 copy of a quantized tiny checkpoint with the reference dequantization."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((quantized / "config.json").read_text(encoding="utf-8"))
    bits = int(cfg.pop("quantization_bit"))
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (dst / name).write_bytes((quantized / name).read_bytes())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(quantized.glob("pytorch_model*.bin")):
        state.update(torch.load(shard, weights_only=True))
    write_state(dst, dequantize_chatglm(state, bits), shards=1, safetensors=False)
    return dst


def write_state(
    dir: Path,  # noqa: A002
    state: dict[str, torch.Tensor],
    *,
    shards: int,
    safetensors: bool,
) -> None:
    """Save ``state`` in the HF layout: one file, or numbered shards plus an index."""
    groups = split_shards(list(state), shards)
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"

    def save(part: dict[str, torch.Tensor], file: Path) -> None:
        if safetensors:
            from safetensors.torch import save_file

            save_file(part, str(file), metadata={"format": "pt"})
        else:
            torch.save(part, file)

    if len(groups) == 1:
        save(state, dir / f"{stem}.{ext}")
        return
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups, start=1):
        file = f"{stem}-{k:05d}-of-{len(groups):05d}.{ext}"
        save({name: state[name] for name in names}, dir / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
