"""The engine's SDPA attention (model_server/models/attention.py) gives exactly the bits of
transformers' own ``sdpa`` in every shape the engine runs: a prompt meeting cached KV, a
left-padded group, decode steps with padding; on a Llama-shaped and a ChatGLM2 tiny model.
With the linears on oneDNN, prompts over cached KV run as oneDNN matmuls: transformers' results
up to rounding, the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_shapes import engine_forwards

from model_server.engine import kv
from model_server.engine.runner import ModelRunner
from model_server.models import attention
from model_server.models.attention import NAME, NAME_ONEDNN, sdpa_backends, use_gqa_sdpa
from model_server.models.cpu_linear import onednn_available
from model_server.models.registry import load_model


@pytest.mark.parametrize("which", ["llama", "chatglm2"])
def test_engine_attention_is_bit_identical_to_sdpa(
    which: str, tiny_model_dir: Path, tiny_chatglm2_dir: Path
) -> None:
    folder = tiny_model_dir if which == "llama" else tiny_chatglm2_dir
    loaded = load_model(str(folder), torch.device("cpu"), "float32", None, cpu_linear="torch")
    model = loaded.model
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[0].self_attn.num_key_value_groups > 1  # the case it changes
    runner = ModelRunner(loaded)  # switches the model to the engine's attention
    assert model.config._attn_implementation == NAME
    with torch.inference_mode():
        ours = engine_forwards(runner)
        model.set_attn_implementation("sdpa")
        stock = engine_forwards(runner)
    assert len(ours) == len(stock)
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)
    use_gqa_sdpa(model)
    assert model.config._attn_implementation == NAME


@pytest.mark.parametrize("which", ["llama", "chatglm2"])
def test_decode_steps_skip_the_lanes_padding_in_runs(
    which: str, tiny_model_dir: Path, tiny_chatglm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of very different lengths in one lane: a decode step reads each run of rows
    from its own first column (several SDPA calls), and its logits are transformers' own
    up to rounding (the same keys, fewer of them masked), with the same greedy tokens."""
    folder = tiny_model_dir if which == "llama" else tiny_chatglm2_dir
    loaded = load_model(str(folder), torch.device("cpu"), "float32", None, cpu_linear="torch")
    runner = ModelRunner(loaded)
    runs_seen: list[int] = []
    split = attention._decode_by_runs

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        runs_seen.append(len(args[4]))
        return split(*args, **kwargs)

    monkeypatch.setattr(attention, "_decode_by_runs", counted)
    lengths = [300, 290, 12, 8]
    width = max(lengths)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, runner.vocab, (len(lengths), width + 4), generator=gen)

    def steps() -> list[torch.Tensor]:
        cache = kv.new_cache()
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        positions = torch.zeros(len(lengths), width, dtype=torch.long)
        for r, n in enumerate(lengths):
            mask[r, width - n :] = 1
            positions[r, width - n :] = torch.arange(n)
        outs = [runner.forward(ids[:, :width], mask, positions, cache)]
        for step in range(3):
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.long)], dim=1)
            positions = torch.tensor([[n + step] for n in lengths])
            outs.append(
                runner.forward(ids[:, width + step : width + step + 1], mask, positions, cache)
            )
        return outs

    with torch.inference_mode():
        ours = steps()
        assert runs_seen and all(n > 1 for n in runs_seen)  # every decode step was split
        loaded.model.set_attn_implementation("sdpa")
        stock = steps()
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.argmax(dim=-1), b.argmax(dim=-1))


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("which", ["llama", "chatglm2"])
def test_prompts_over_cached_kv_run_on_onednn(
    which: str, tiny_model_dir: Path, tiny_chatglm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linears on oneDNN: the prompt over cached KV and the second chunk of the padded group
    (whose padding columns no query reads) run as oneDNN matmuls, the group's first chunk
    (padding queries that read nothing) keeps the flash kernel; every logit is transformers'
    own up to rounding, with the same greedy tokens, and so is the final KV."""
    folder = tiny_model_dir if which == "llama" else tiny_chatglm2_dir
    loaded = load_model(str(folder), torch.device("cpu"), "float32", None, cpu_linear="onednn")
    runner = ModelRunner(loaded)
    assert loaded.model.config._attn_implementation == NAME_ONEDNN
    seen: list[tuple[int, ...]] = []
    dense = attention._prefill_onednn

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(tuple(args[0].shape))
        return dense(*args, **kwargs)

    monkeypatch.setattr(attention, "_prefill_onednn", counted)
    with torch.inference_mode():
        ours = engine_forwards(runner)
        layers = len(loaded.model.model.layers)
        # per layer: the 24 tokens over 64 cached, the group's second chunk of 16
        assert len(seen) == 2 * layers
        assert {s[0] for s in seen} == {1, 2} and {s[2] for s in seen} == {24, 16}
        loaded.model.set_attn_implementation("sdpa")
        stock = engine_forwards(runner)
    for a, b in zip(ours, stock):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if a.dim() == 2:  # logits [rows, vocab]; the rest are KV [rows, heads, positions, dim]
            assert torch.equal(a.argmax(dim=-1), b.argmax(dim=-1))


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))


def test_prefill_columns_find_what_no_query_reads_and_where_the_mask_starts() -> None:
    n, cached = 5, 12
    causal = torch.ones(n, cached + n, dtype=torch.bool)
    causal[:, cached:] = torch.ones(n, n, dtype=torch.bool).tril()
    padded = causal.clone()
    padded[:, :3] = False  # three columns of left padding
    full = torch.ones(n, cached + n, dtype=torch.bool)  # nothing masked
    mask = _additive(torch.stack([causal, padded, full]))[:, None]
    assert attention.prefill_columns(mask) == [(0, cached + 1), (3, cached + 1), (0, cached + n)]
    padded[0] = False  # a query that reads nothing: the flash kernel's case
    assert attention.prefill_columns(_additive(padded)[None, None]) is None


@needs_onednn
@pytest.mark.parametrize("values_by_sgemm", [False, True])
@pytest.mark.parametrize("block_bytes", [attention.SCORE_BYTES, 4 * 3 * 40 * 7])
def test_prefill_on_onednn_is_sdpa_up_to_rounding(
    block_bytes: int, values_by_sgemm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two rows (one with left padding), grouped heads, values wider than keys, in one block
    of query rows and in blocks of 7, the values product on oneDNN and on MKL (which one a
    CPU gets depends on its features): the result is SDPA's on the same mask."""
    monkeypatch.setattr(attention, "SCORE_BYTES", block_bytes)
    monkeypatch.setattr(attention, "VALUES_BY_SGEMM", values_by_sgemm)
    gen = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, n, cached, dim = 2, 6, 2, 19, 24, 16
    q = torch.randn(rows, heads, n, dim, generator=gen)
    k = torch.randn(rows, kv_heads, cached + n, dim, generator=gen)
    v = torch.randn(rows, kv_heads, cached + n, dim + 8, generator=gen)  # wider values
    allowed = torch.ones(rows, n, cached + n, dtype=torch.bool)
    allowed[:, :, cached:] = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[1, :, :5] = False
    mask = _additive(allowed)[:, None]
    columns = attention.prefill_columns(mask)
    assert columns == [(0, cached + 1), (5, cached + 1)]
    ours = attention._prefill_onednn(q, k, v, mask, columns, heads // kv_heads, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_cuda_forwards_run_sdpa_without_cudnn():
    """cuDNN attention plans every new key length anew (a decode step's is new at every step):
    on CUDA the runner's context leaves it out, keeps the others, and restores torch's flags."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with sdpa_backends(torch.device("cuda"))():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with sdpa_backends(torch.device("cpu"))():
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
