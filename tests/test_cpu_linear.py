"""``--cpu-linear``: fp32 CPU linears packed for oneDNN at load (model_server/models/cpu_linear.py).

The rest of the suite serves through the packed path (the default); these tests pin what the
packing itself promises: every plain fp32 linear is replaced, the model computes the same
logits up to float rounding, the packed weights are counted as weight memory, and a row's
result does not depend on the other rows of its batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model_server.engine.runner import ModelRunner, weight_bytes
from model_server.models.base import ModelLoadError
from model_server.models.cpu_linear import PackedLinear, onednn_available, pack_linears
from model_server.models.registry import load_model

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.parametrize("which", ["llama", "chatglm2"])
def test_packed_model_computes_the_plain_models_logits(
    which: str, tiny_model_dir: Path, tiny_chatglm2_dir: Path
) -> None:
    folder = str(tiny_model_dir if which == "llama" else tiny_chatglm2_dir)
    plain = load_model(folder, CPU, "float32", None, cpu_linear="torch")
    packed = load_model(folder, CPU, "float32", None, cpu_linear="onednn")
    linears = _count(plain.model, nn.Linear)
    assert linears > 0 and _count(plain.model, PackedLinear) == 0
    assert _count(packed.model, PackedLinear) == linears
    assert _count(packed.model, nn.Linear) == 0
    runner = ModelRunner(packed)
    assert runner.vocab == plain.model.get_output_embeddings().out_features
    ids = torch.randint(0, runner.vocab, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = plain.model(input_ids=ids).logits
        b = packed.model(input_ids=ids).logits
    scale = a.abs().max().item()
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * max(scale, 1.0))


def test_packed_weights_count_as_weight_memory(tiny_model_dir: Path) -> None:
    """Each packed weight replaces its fp32 original; a head tied to the embeddings is the one
    extra copy (vocab x hidden x 4 bytes)."""
    plain = load_model(str(tiny_model_dir), CPU, "float32", None, cpu_linear="torch")
    packed = load_model(str(tiny_model_dir), CPU, "float32", None, cpu_linear="onednn")
    head = plain.model.get_output_embeddings().weight
    tied = head is plain.model.get_input_embeddings().weight
    extra = head.numel() * head.element_size() if tied else 0
    assert weight_bytes(packed.model) == weight_bytes(plain.model) + extra


def test_a_rows_result_does_not_depend_on_its_batch() -> None:
    """From two rows up, row r's output is bit-identical whatever the other rows are and
    however many there are: batching a request with others, or computing a token in a prefill
    chunk instead of a decode step, changes none of its linears' outputs."""
    gen = torch.Generator().manual_seed(0)
    for fan_in, fan_out in [(64, 192), (192, 64), (64, 1000)]:
        layer = PackedLinear(nn.Linear(fan_in, fan_out))
        x = torch.randn(300, fan_in, generator=gen)
        with torch.inference_mode():
            full = layer(x)
            for rows in (2, 3, 16, 17, 64, 190, 299):
                assert torch.equal(layer(x[:rows].contiguous()), full[:rows]), (fan_in, rows)
            others = torch.randn(15, fan_in, generator=gen)
            mixed = layer(torch.cat([x[5:6], others]))
            assert torch.equal(mixed[0], full[5])


def test_only_plain_fp32_linears_are_packed() -> None:
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), Custom(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    assert pack_linears(model) == 1
    assert [type(m) for m in model] == [PackedLinear, Custom, nn.Linear]


def test_bf16_is_never_packed(tiny_model_dir: Path) -> None:
    bf16 = load_model(str(tiny_model_dir), CPU, "bfloat16", None, cpu_linear="onednn")
    assert _count(bf16.model, PackedLinear) == 0  # torch runs bf16 through oneDNN itself


def test_onednn_refused_without_onednn(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model_server.models import registry

    monkeypatch.setattr(registry, "onednn_available", lambda: False)
    with pytest.raises(ModelLoadError, match="--cpu-linear onednn"):
        load_model(str(tiny_model_dir), CPU, "float32", None, cpu_linear="onednn")
    auto = load_model(str(tiny_model_dir), CPU, "float32", None)
    assert _count(auto.model, PackedLinear) == 0


def test_packing_lets_go_of_the_checkpoint_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """safetensors weights are views of one mmap of the file; packing reads all of it, so the
    mapping (every page resident) must go once the packed copies exist."""
    import gc
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    weights = str(folder / "model.safetensors")

    def mapped() -> bool:
        return weights in Path("/proc/self/maps").read_text()

    plain = load_model(str(folder), CPU, "float32", None, cpu_linear="torch")
    assert mapped()  # what the packed load must not leave behind
    del plain
    gc.collect()
    packed = load_model(str(folder), CPU, "float32", None, cpu_linear="onednn")
    assert _count(packed.model, PackedLinear) > 0
    assert not mapped()


_ROW_COUNTS = """
import torch
from torch import nn
from model_server.models.cpu_linear import pack_linears
model = nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576))
pack_linears(model)
x = torch.randn(300, 576)
def rss():  # VmRSS: ru_maxrss would start at the parent's size (kept across fork + exec)
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024
with torch.inference_mode():
    model(x[:8])
    before = rss()
    for rows in range(1, 300):
        model(x[:rows])
print(rss() - before)
"""


def _growth_mib(env: dict[str, str]) -> int:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in env and "CACHE_CAPACITY" not in k}
    out = subprocess.run(
        [sys.executable, "-c", _ROW_COUNTS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.split()[-1])


def test_kernel_caches_stay_bounded_over_every_row_count() -> None:
    """A decode batch or prefill chunk of every size from 1 to 299 rows: with oneDNN's kernel
    caches bounded at load RSS grows ~110 MiB (the caches and the allocator's slack); at
    oneDNN's defaults ~400 MiB, and it keeps growing with the model's layer shapes."""
    bounded = _growth_mib({})
    default = _growth_mib({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
    assert bounded < 200, bounded  # measured 103-117 MiB
    assert default > bounded + 150, (default, bounded)  # measured 406 MiB


def test_auto_packs_on_x86_only(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model_server.models import registry

    monkeypatch.setattr(registry, "packs_by_default", lambda: False)  # as on arm64
    auto = load_model(str(tiny_model_dir), CPU, "float32", None)
    assert _count(auto.model, PackedLinear) == 0
    forced = load_model(str(tiny_model_dir), CPU, "float32", None, cpu_linear="onednn")
    assert _count(forced.model, PackedLinear) > 0
