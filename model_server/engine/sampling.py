"""Batched sampling where every row keeps its own parameters and its own random stream.

One call handles a whole lane of the running batch: penalties, eos suppression, temperature,
top-k, top-p, min-p are applied as tensor ops over [B, V], and so is the draw
(:func:`exponential_race`); only drawing each row's uniforms loops over rows, from the row's own
``torch.Generator``, so a seeded request gets the same tokens whatever else is in the batch.

Isolation: one row can never fail another. Values that would overflow are clamped (a
temperature below ``SAMPLING_EPS`` is greedy, the repetition penalty is kept in
``[MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY]``), and a row whose logits are still not
finite fails alone (``SampleResult.failed``); the others get exactly the tokens they would
have got without it.

Per-row hooks, for structured output and logprobs: ``RowSampling.logit_masks`` edit a row's
processed logits in place (e.g. forbid tokens a grammar does not allow), and
``RowSampling.logprobs`` asks for the log-softmax of the row's *raw* logits (before penalties,
temperature or masks, as vLLM reports them). Rows without them cost nothing. The prompt's
log-probabilities (:func:`prompt_logprobs`) are the same values at every prompt position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .types import SamplingParams

MIN_REPETITION_PENALTY = 1e-2
MAX_REPETITION_PENALTY = 1e2

LogitMask = Callable[[torch.Tensor], None]


@dataclass
class RowSampling:
    """The per-row inputs the sampler needs (held by the engine's sequence state)."""

    params: SamplingParams
    generator: torch.Generator | None
    num_generated: int
    logit_masks: list[LogitMask] = field(default_factory=list)
    logprobs: int | None = None  # top-k alternatives wanted (0: only the chosen token's)


@dataclass
class TokenLogprobs:
    """Log-probabilities from the raw logits: the chosen token's and the top alternatives."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SampleResult:
    """One token per row; ``None`` where the row failed (``failed`` says why)."""

    tokens: list[int | None]
    failed: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)


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
    rep = rep.clamp(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
    pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev).unsqueeze(1)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev).unsqueeze(1)
    counts = state.output_counts
    seen = state.prompt_seen | (counts > 0)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= freq * counts + pres * (counts > 0).float()


def _not_finite(logits: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN or +inf (-inf is a legitimate "never this token"), in one pass: a row
    sum is NaN or +inf exactly then (logits are far too small for a finite sum to overflow)."""
    total = logits.sum(dim=-1)
    return torch.isnan(total) | torch.isposinf(total)


def sample(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    eos_token_ids: frozenset[int],
    penalties: PenaltyState | None = None,
    nan_guard_token_id: int | None = None,
) -> SampleResult:
    """Picks one token per row of ``logits`` ([B, V], any float dtype).

    fp32 logits are modified in place (they are the step's own output), after the raw
    log-probabilities that rows asked for are taken. Every pass over [B, V] counts (at 200 rows
    and a 49k vocabulary one costs 5-25 ms on a CPU, more when it allocates fresh memory), so
    rows are copied out only when a subset needs it.
    """
    logits = logits.float()
    n = len(rows)
    result = SampleResult(tokens=[None] * n)
    want = [i for i, r in enumerate(rows) if r.logprobs is not None]
    bad = _not_finite(logits)
    if bool(bad.any()):
        if nan_guard_token_id is not None:  # ChatGLM2's own guard: carry on with one token
            logits[bad] = 0.0
            logits[bad, nan_guard_token_id] = 5e4
        else:
            for i in bad.nonzero().squeeze(1).tolist():
                result.failed[i] = "the model produced non-finite logits (NaN/inf)"
            logits[bad] = 0.0  # keeps the batched ops below finite; the row is dropped
    # After the guard: a guarded row's raw logprobs are those of the token it forced (0 for
    # it), never NaN, which no JSON response can carry.
    raw = _RawLogprobs(logits, want, rows, penalties is not None) if want else None
    if penalties is not None:
        apply_penalties(logits, rows, penalties)
    if eos_token_ids:
        no_eos = [
            i
            for i, r in enumerate(rows)
            if r.params.ignore_eos or r.num_generated < r.params.min_tokens
        ]
        if no_eos:  # one indexing op for the batch, not one per row
            eos = torch.tensor(sorted(eos_token_ids), device=logits.device)
            logits[torch.tensor(no_eos, device=logits.device).unsqueeze(1), eos] = float("-inf")
    for i, r in enumerate(rows):
        for mask in r.logit_masks:
            mask(logits[i])
    # Finite raw logits stay finite through the clamped penalties and temperature; only masks
    # (eos suppression, logit masks) can leave a row with no token at all: its best is -inf.
    dead = "no token can be sampled (every token is masked out)"
    live = [i for i in range(n) if i not in result.failed]
    greedy = [i for i in live if rows[i].params.greedy]
    sampled = [i for i in live if not rows[i].params.greedy]
    tokens = result.tokens
    if greedy:
        best = logits if len(greedy) == n else logits[_index(greedy, logits)]
        values, ids = best.max(dim=-1)
        for i, value, token in zip(greedy, values.tolist(), ids.tolist(), strict=True):
            if value == float("-inf"):
                result.failed[i] = dead
            else:
                tokens[i] = token
    if sampled:
        # In place on the step's logits when no row needs them afterwards (a raw logprob).
        own = len(sampled) == n and raw is None
        x = logits if own else logits[_index(sampled, logits)]
        weights, states = _sampling_weights(x, [rows[i].params for i in sampled])
        drawn = exponential_race(weights, [rows[i].generator for i in sampled]).tolist()
        for i, token, state in zip(sampled, drawn, states, strict=True):
            if state == "empty":
                result.failed[i] = dead
            elif state == "broken":
                result.failed[i] = "the sampling distribution is not finite"
            else:
                tokens[i] = token
    if raw is not None:
        raw.take(logits, tokens, result)
    return result


def _index(rows: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, device=like.device)


def exponential_race(
    weights: torch.Tensor, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of ``weights`` [n, V] (non-negative, any positive sum: a softmax needs
    no normalising here), drawn with probability weight / total: the token with the largest
    ``weight / E``, where E ~ Exp(1) per token from the row's own generator (what
    ``torch.multinomial`` does for one sample). ``weights`` is overwritten.

    The uniforms are drawn per row (a row consumes the same numbers whatever else is in the
    batch, so a seed gives the same tokens in any batch); everything else is one batched op.
    ``torch.multinomial`` per row cost ~0.9 ms at a 49k vocabulary on a CPU (its exponential
    draw is scalar), half of a 200-row decode step; ``uniform_`` is ~0.1 ms. Unlike an
    inverse-CDF draw, a token only changes when two tokens' ratios tie within rounding, so the
    last-bit differences between batched and solo forwards leave seeded tokens alone."""
    noise = torch.empty_like(weights)
    for j, generator in enumerate(generators):
        noise[j].uniform_(generator=generator)
    # -log(u) ~ Exp(1); u = 0 gives +inf: that token's ratio is 0, never chosen (p = 2^-24).
    return weights.div_(noise.log_().neg_()).argmax(dim=-1)


class _RawLogprobs:
    """The raw log-probabilities rows asked for, taken before the logits are processed: each
    row's log-sum-exp and top k, from one pass each over the rows that asked (no [B, V]
    log-softmax). The chosen token's raw logit is read after sampling: eos suppression and
    masks only forbid tokens, so a chosen token's logit is untouched; penalties are the one
    edit that can change it, so with penalties the raw rows are kept."""

    def __init__(
        self,
        logits: torch.Tensor,
        want: list[int],
        rows: Sequence[RowSampling],
        penalized: bool,
    ) -> None:
        self.want = want
        subset = len(want) < logits.shape[0]
        src = logits[_index(want, logits)] if subset else logits
        self.kept = src if subset else src.clone() if penalized else None
        self.lse = src.logsumexp(dim=-1)
        self.k = [rows[i].logprobs or 0 for i in want]
        self.top: torch.return_types.topk | None = (
            src.topk(max(self.k), dim=-1) if any(self.k) else None
        )

    def take(self, logits: torch.Tensor, tokens: list[int | None], result: SampleResult) -> None:
        """The chosen tokens' log-probabilities and each row's top k, into ``result``."""
        chosen_ids = torch.tensor([tokens[i] or 0 for i in self.want], device=logits.device)
        if self.kept is not None:
            values = self.kept.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
        else:
            values = logits[_index(self.want, logits), chosen_ids]
        chosen = (values - self.lse).tolist()
        top_ids: list[list[int]] = []
        top_values: list[list[float]] = []
        if self.top is not None:  # sorted: a row's first k are its top k
            top_ids = self.top.indices.tolist()
            top_values = (self.top.values - self.lse.unsqueeze(1)).tolist()
        for j, i in enumerate(self.want):
            if i in result.failed:
                continue
            k = self.k[j]
            alternatives = list(zip(top_ids[j][:k], top_values[j][:k])) if k else []
            result.logprobs[i] = TokenLogprobs(chosen[j], alternatives)


def prompt_logprobs(
    logits: torch.Tensor, targets: Sequence[int], k: int
) -> list[TokenLogprobs] | None:
    """Each position's raw log-softmax at the token that follows it (``targets``, one per row
    of ``logits`` [n, V]) plus the top ``k``; None when the logits are not finite (the request
    then fails alone, as a row does in :func:`sample`)."""
    logits = logits.float()
    if bool(_not_finite(logits).any()):
        return None
    lp = logits.log_softmax(dim=-1)
    idx = torch.tensor(list(targets), device=lp.device).unsqueeze(1)
    chosen = lp.gather(1, idx).squeeze(1).tolist()
    if not k:
        return [TokenLogprobs(c, []) for c in chosen]
    top = lp.topk(k, dim=-1)
    return [
        TokenLogprobs(c, list(zip(i, v)))
        for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist(), strict=True)
    ]


def _sampling_weights(
    logits: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, list[str]]:
    """Each row's sampling distribution as unnormalised weights (``exp`` of the filtered,
    tempered logits less their maximum), and each row's state: "ok", "empty" (no token left
    at all) or "broken" (not finite).
    ``logits`` is edited in place (the caller's copy, or logits nothing reads afterwards)."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
    logits = logits.div_(temp)
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=dev)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill_(logits < kth, float("-inf"))
    # Decided on the host: a device tensor's .any() would sync the GPU every step.
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill_(drop, float("-inf"))
        logits = logits.scatter_(1, order, sorted_logits)
    best = logits.max(dim=-1, keepdim=True).values
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=dev).unsqueeze(1)
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps all.
        logits = logits.masked_fill_(logits < best + min_p.log(), float("-inf"))
    states = [
        "empty" if b == float("-inf") else "ok" if b == b else "broken"
        for b in best.squeeze(1).tolist()
    ]  # b != b: NaN
    # A row with nothing left would be NaN (-inf - -inf): it is failed, its weights unused.
    return logits.sub_(best.clamp(min=torch.finfo(logits.dtype).min)).exp_(), states
