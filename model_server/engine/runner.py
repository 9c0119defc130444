"""The model runner: one forward over a left-padded batch, then batched sampling with per-row
parameters.

It knows the model (a transformers-style causal LM) and nothing of queues or memory policy.
Any causal LM whose forward takes ``input_ids, attention_mask, position_ids`` and a cache works
(Llama-family through transformers, the native ChatGLM2 port).
"""

from __future__ import annotations

import inspect

import torch

from ..models.attention import sdpa_backends, use_gqa_sdpa
from ..models.base import LoadedModel
from ..models.cpu_linear import PackedLinear
from . import kv
from .graphs import StaticDecode
from .sampling import PenaltyState, RowSampling, SampleResult, sample


class ModelRunner:
    def __init__(
        self, loaded: LoadedModel, cuda_graphs: bool = True, static_decode: bool | None = None
    ) -> None:
        """``cuda_graphs``: decode steps on CUDA replay CUDA graphs (graphs.py).
        ``static_decode``: decode steps with static shapes, captured or not; None: exactly when
        graphs can be used (the model on one CUDA device and ``cuda_graphs``). True on the CPU
        runs the static step eagerly (its tests)."""
        self.loaded = loaded
        self._model = loaded.model
        # No KV copy per layer when a prompt meets cached KV; with the linears on oneDNN
        # (--cpu-linear), such prompts' attention runs on oneDNN too.
        onednn = any(isinstance(m, PackedLinear) for m in loaded.model.modules())
        use_gqa_sdpa(loaded.model, onednn=onednn)
        self.device = loaded.device
        head = loaded.model.get_output_embeddings()  # nn.Linear, or PackedLinear on the CPU
        self.vocab = int(head.out_features)
        # Where logits land, and so the per-row sampling state: with --device-map the output
        # layer may sit on another GPU than the inputs (self.device).
        self.logits_device = next(t.device for t in (*head.parameters(), *head.buffers()))
        params = inspect.signature(self._model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # On CUDA, attention without cuDNN's per-shape plans (models/attention.py).
        self._sdpa = sdpa_backends(self.device)
        devices = {str(d) for d in getattr(loaded.model, "hf_device_map", {}).values()}
        graphable = (
            self.device.type == "cuda"
            and cuda_graphs
            and len(devices) <= 1
            and full_attention_only(loaded.model)
        )
        self.static: StaticDecode | None = None
        if graphable if static_decode is None else static_decode:
            self.static = StaticDecode(self.forward, self.device, loaded.dtype, graphable)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: kv.GrowableCache,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """Appends the new positions to ``cache``; returns the last position's logits
        ([B, V]), or with ``all_positions`` every new position's ([B, L, V]: prompt
        log-probabilities; L is one prefill step's tokens, so this stays bounded). ``mask``
        is the 2-D padding mask, or a ready 4-D one (a static step's: transformers uses it as
        is); tensors already on the device are not copied (so a CUDA graph can capture it)."""
        with self._sdpa():
            out = self._model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                logits_to_keep=0 if all_positions else 1,
                **{self._cache_kw: cache},
            )
        return out.logits if all_positions else out.logits[:, -1, :]

    def decode(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: kv.GrowableCache,
    ) -> tuple[torch.Tensor, str]:
        """One decode step of a lane (``mask`` includes the new column): the static step when
        there is one (a CUDA graph's output on a GPU: read it before the next step), else
        :meth:`forward`. Returns the logits and how the step ran (``ordinary``, ``static``,
        ``capture``, ``graph``: the metrics' modes)."""
        static = self.static
        if static is not None and StaticDecode.usable(cache):
            logits, mode = static.step(input_ids, mask, positions, cache)
            if static.failed:  # no graphs in this model: ordinary steps from now on
                self.static = None
            return logits, mode
        return self.forward(input_ids, mask, positions, cache), "ordinary"

    def sample(
        self,
        logits: torch.Tensor,
        rows: list[RowSampling],
        penalties: PenaltyState | None,
    ) -> SampleResult:
        return sample(
            logits,
            rows,
            self.loaded.eos_token_ids,
            penalties,
            self.loaded.nan_guard_token_id,
        )


def full_attention_only(model: torch.nn.Module) -> bool:
    """Every layer attends to the whole context. The static step's ready-made 4-D mask
    replaces transformers' per-layer masks, so a sliding window (Mistral, Gemma) would be
    lost: such models keep the ordinary decode step."""
    cfg = model.config.get_text_config()
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return types == {"full_attention"} and not getattr(cfg, "sliding_window", None)


def kv_bytes_per_token(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes over all layers (keys and values)."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * heads * head_dim * dtype.itemsize


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one forward reads: parameters plus buffers (quantized weights live in buffers)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
