"""Batched sampling where every row keeps its own parameters and its own random stream.

One call handles the whole running batch: penalties, eos suppression, temperature, top-k, top-p
are applied as tensor ops over [B, V]; only the final draw loops over rows, so each request's
seeded ``torch.Generator`` gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .types import SamplingParams


@dataclass
class RowSampling:
    """The per-row inputs the sampler needs (held by the engine's sequence state)."""

    params: SamplingParams
    generator: torch.Generator | None
    num_generated: int


class PenaltyState:
    """Token counts per row, kept aligned with the batch, for repetition/presence/frequency."""

    def __init__(
        self,
        histories: Sequence[tuple[Sequence[int], Sequence[int]]],
        vocab: int,
        device: torch.device,
    ) -> None:
        b = len(histories)
        self.prompt_seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(b, vocab, dtype=torch.float32, device=device)
        for i, (prompt, output) in enumerate(histories):
            if prompt:
                self.prompt_seen[i, torch.tensor(prompt, device=device)] = True
            if output:
                ids = torch.tensor(output, device=device)
                self.output_counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))

    def record(self, tokens: torch.Tensor) -> None:
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.output_counts[rows, tokens] += 1


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowSampling], state: PenaltyState) -> None:
    """In place. Repetition penalty (CTRL) over prompt+output; presence/frequency (OpenAI)."""
    dev = logits.device
    rep = torch.tensor([r.params.repetition_penalty for r in rows], device=dev).unsqueeze(1)
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev).unsqueeze(1)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev).unsqueeze(1)
    counts = state.output_counts
    seen = state.prompt_seen | (counts > 0)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= freq * counts + pres * (counts > 0).float()


def sample(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    eos_token_ids: frozenset[int],
    penalties: PenaltyState | None = None,
    nan_guard_token_id: int | None = None,
) -> list[int]:
    """Picks one token per row of ``logits`` ([B, V], any float dtype).

    fp32 logits are modified in place (they are the step's own output; copying [B, V] every
    step would cost more than the sampling itself).
    """
    logits = logits.float()
    if nan_guard_token_id is not None:
        bad = ~torch.isfinite(logits).all(dim=-1)
        if bool(bad.any()):
            logits[bad] = 0.0
            logits[bad, nan_guard_token_id] = 5e4
    if penalties is not None:
        apply_penalties(logits, rows, penalties)
    if eos_token_ids:
        eos = list(eos_token_ids)
        for i, r in enumerate(rows):
            if r.params.ignore_eos or r.num_generated < r.params.min_tokens:
                logits[i, eos] = float("-inf")

    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        out[idx] = logits[idx].argmax(dim=-1)
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        probs = _filtered_probs(logits[idx], [rows[i].params for i in sampled])
        for j, i in enumerate(sampled):
            out[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    return out.tolist()


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
    logits = logits / temp
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=dev)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(dim=-1)
