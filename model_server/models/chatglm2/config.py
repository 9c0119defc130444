"""Read a ChatGLM ``config.json`` and map it onto transformers' ``GlmConfig``.

transformers' native ``GlmForCausalLM`` computes exactly ChatGLM2's forward (see
``docs/chatglm2.md``), so we never need the checkpoint's own ``modeling_chatglm.py``.
ChatGLM2-6B-32k and ChatGLM3-6B share the tensors and differ only in what ``rope_ratio``
means, which depends on the family (told apart by the tokenizer: see ``family.py``).
Everything the mapping cannot express is refused here, before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import GlmConfig

from model_server.models.base import ModelLoadError

CHATGLM_MODEL_TYPE = "chatglm"
ROPE_BASE = 10000.0

Family = Literal["chatglm2", "chatglm3"]

# Fields a ChatGLM2 config must carry; ChatGLM-6B (v1) lacks most of them.
_REQUIRED = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_channels",
    "ffn_hidden_size",
    "padded_vocab_size",
    "seq_length",
)

# (field, value the original ChatGLM2 uses, what a different value would need).
_FIXED: tuple[tuple[str, object, str], ...] = (
    ("rmsnorm", True, "LayerNorm instead of RMSNorm"),
    ("add_bias_linear", False, "biases on dense/MLP layers"),
    ("add_qkv_bias", True, "a query_key_value without bias"),
    ("apply_residual_connection_post_layernorm", False, "post-norm residuals"),
    ("post_layer_norm", True, "no final layer norm"),
    ("fp32_residual_connection", False, "fp32 residual stream"),
)


def read_config_json(path: str | Path) -> dict[str, Any] | None:
    """The parsed ``config.json`` of a folder, or None when there is none (or it is not JSON)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class ChatGLM2Config:
    """The ChatGLM2 fields glmserve uses, validated."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_channels: int
    num_kv_groups: int
    ffn_hidden_size: int
    padded_vocab_size: int
    seq_length: int
    layernorm_epsilon: float
    rope_theta: float
    # Positions are divided by this before the rotary angles (ChatGLM2-32k's interpolation).
    position_scale: float
    # 4 or 8 for the published int4/int8 checkpoints (their linears are quantized).
    quantization_bit: int | None
    eos_token_id: int
    pad_token_id: int
    torch_dtype: str | None

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows of q, k and v inside the fused ``query_key_value`` projection, in that order."""
        d = self.kv_channels
        return self.num_attention_heads * d, self.num_kv_groups * d, self.num_kv_groups * d

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "config.json", family: Family = "chatglm2"
    ) -> ChatGLM2Config:
        """Validate a raw ChatGLM config; ModelLoadError names the first unsupported field.

        ``rope_ratio`` divides the positions in ChatGLM2 (-32k) and multiplies the rotary base
        in ChatGLM3, so its meaning comes from ``family``.
        """
        if raw.get("model_type") != CHATGLM_MODEL_TYPE:
            raise ModelLoadError(
                f"{source}: model_type is {raw.get('model_type')!r}, not 'chatglm'"
            )
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ModelLoadError(
                f"{source}: not a ChatGLM2 config (missing {', '.join(missing)}); "
                "ChatGLM-6B (v1) checkpoints are not supported"
            )
        bits = raw.get("quantization_bit") or None
        if bits not in (None, 4, 8):
            raise ModelLoadError(
                f"{source}: quantization_bit={bits!r} is not supported (4 or 8 are)"
            )
        try:
            rope_ratio = float(raw["rope_ratio"] if raw.get("rope_ratio") is not None else 1.0)
        except (TypeError, ValueError):
            rope_ratio = -1.0
        if not rope_ratio > 0:
            raise ModelLoadError(f"{source}: rope_ratio={raw.get('rope_ratio')!r} must be > 0")
        if raw.get("pre_seq_len") is not None:
            raise ModelLoadError(
                f"{source}: pre_seq_len={raw['pre_seq_len']} (P-tuning prefix) is not supported"
            )
        for key, expected, meaning in _FIXED:
            if key in raw and raw[key] != expected:
                raise ModelLoadError(
                    f"{source}: {key}={raw[key]!r} ({meaning}) is not supported; "
                    f"ChatGLM2 uses {expected!r}"
                )
        heads = int(raw["num_attention_heads"])
        groups = (
            int(raw.get("multi_query_group_num", heads))
            if raw.get("multi_query_attention", False)
            else heads
        )
        if groups <= 0 or heads % groups:
            raise ModelLoadError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"multi_query_group_num={groups}"
            )
        if int(raw["kv_channels"]) % 4:
            raise ModelLoadError(
                f"{source}: kv_channels={raw['kv_channels']} must be a multiple of 4"
            )
        eos = raw.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else 2
        pad = raw.get("pad_token_id", 0)
        return cls(
            num_layers=int(raw["num_layers"]),
            hidden_size=int(raw["hidden_size"]),
            num_attention_heads=heads,
            kv_channels=int(raw["kv_channels"]),
            num_kv_groups=groups,
            ffn_hidden_size=int(raw["ffn_hidden_size"]),
            padded_vocab_size=int(raw["padded_vocab_size"]),
            seq_length=int(raw["seq_length"]),
            layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)),
            rope_theta=ROPE_BASE * rope_ratio if family == "chatglm3" else ROPE_BASE,
            position_scale=rope_ratio if family == "chatglm2" else 1.0,
            quantization_bit=bits,
            eos_token_id=int(eos),
            pad_token_id=int(pad if pad is not None else 0),
            torch_dtype=raw.get("torch_dtype"),
        )

    def to_glm_config(self) -> GlmConfig:
        """The ``GlmConfig`` that makes ``GlmForCausalLM`` compute ChatGLM2 (spec: Checked fact)."""
        return GlmConfig(
            vocab_size=self.padded_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_kv_groups,
            head_dim=self.kv_channels,
            hidden_act="silu",
            attention_dropout=0.0,
            max_position_embeddings=self.seq_length,
            rms_norm_eps=self.layernorm_epsilon,
            use_cache=True,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": 0.5,
            },
            attention_bias=True,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=1,
        )
