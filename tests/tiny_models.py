"""Tiny transformers checkpoints the tests build themselves (no hub, seconds on a CPU).

Both use the embedded SmolLM2 tokenizer and chat template, so prompts are real:
- ``make_tiny_llama``: random weights; fast, batched, output is arbitrary but deterministic.
- ``make_scripted_llama``: weights rigged so greedy decoding spells out a given text, token by
  token, then end-of-sequence. Attention and MLP outputs are zeroed, so the next token depends
  only on the current one: embedding row of token i is a unit vector, and the output row of the
  token that follows it points the same way. Tests can then check exact text, stop strings
  across token boundaries and CJK streaming.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

GEN_PROMPT_LAST_TOKEN = "\n"  # SmolLM2's generation prompt ends with "assistant\n"


def smollm_tokenizer_dir(cache: Path) -> Path:
    """The SmolLM2 tokenizer files (converted from the embedded GGUF once per test run)."""
    from transformers import AutoTokenizer

    from model_server.models.gguf import _converted_dir, embedded_gguf_path

    gguf = embedded_gguf_path()
    converted = _converted_dir(gguf)
    out = cache / "smollm2-tokenizer"
    if not out.exists():
        if (converted / "tokenizer.json").exists():
            tok = AutoTokenizer.from_pretrained(converted)
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(out)
    return out


def _llama_config(vocab: int, **kw: object):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    base.update(kw)
    return LlamaConfig(**base)


def _save(model, tokenizer_dir: Path, out: Path) -> Path:  # noqa: ANN001
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0, **config: object) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = _vocab(tokenizer_dir)
    model = LlamaForCausalLM(_llama_config(vocab, **{"tie_word_embeddings": False, **config}))
    with torch.no_grad():  # bigger logits so sampling is not uniform noise
        model.lm_head.weight.mul_(8)
    return _save(model, tokenizer_dir, out)


def _vocab(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def script_tokens(tokenizer_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok.encode(text, add_special_tokens=False)


def make_scripted_llama(out: Path, tokenizer_dir: Path, text: str) -> Path:
    """Greedy decoding after any chat prompt yields exactly ``text`` and then eos."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = tok.encode(GEN_PROMPT_LAST_TOKEN, add_special_tokens=False)
    assert len(start) == 1
    chain = start + tok.encode(text, add_special_tokens=False) + [2]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"script {text!r} repeats a token; pick text whose tokens are unique")
    hidden = 64
    if len(chain) > hidden:
        raise ValueError("script too long for the hidden size")
    vocab = len(tok)
    model = LlamaForCausalLM(_llama_config(vocab, hidden_size=hidden, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1)
            layer.post_attention_layernorm.weight.fill_(1)
        model.model.norm.weight.fill_(1)
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.02)  # other tokens: small noise, pointing nowhere in particular
        for i, t in enumerate(chain[:-1]):
            emb[t].zero_()
            emb[t, i] = 1.0
            model.lm_head.weight[chain[i + 1], i] = 1.0
    return _save(model, tokenizer_dir, out)


def make_poisoned_llama(out: Path, tokenizer_dir: Path, poison: str, *, seed: int = 0) -> Path:
    """``make_tiny_llama`` (same seed, same weights) whose embedding rows for the tokens of
    ``poison`` are NaN: any prompt containing it gives NaN logits for that request's row, and
    only that row (nothing in a transformer mixes batch rows)."""
    from transformers import LlamaForCausalLM

    make_tiny_llama(out, tokenizer_dir, seed=seed)
    model = LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for t in script_tokens(tokenizer_dir, poison):
            model.model.embed_tokens.weight[t] = float("nan")
    model.save_pretrained(out)
    return out
