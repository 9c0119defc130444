"""``--device-map`` for ChatGLM: the block split and per-tensor placement.

No test machine has two GPUs, so the split is checked as a plan (which module goes where) and
the loader is checked to place by that plan and to serve the plain load's tokens when the plan
is one device. The H100 sessions had one GPU; a real split is not tested here.
"""

from __future__ import annotations

import torch
from test_chatglm_quant import greedy_ids

from model_server.models.chatglm2.placement import device_of, plan_for, split_blocks
from model_server.models.registry import load_model

CPU = torch.device("cpu")


def test_blocks_are_split_in_contiguous_runs():
    two = ["cuda:0", "cuda:1"]
    assert split_blocks(28, two, "balanced") == ["cuda:0"] * 14 + ["cuda:1"] * 14
    assert split_blocks(28, two, "balanced_low_0") == ["cuda:0"] * 9 + ["cuda:1"] * 19
    three = split_blocks(28, ["a", "b", "c"], "auto")
    assert [three.count(d) for d in "abc"] == [9, 10, 9] and three == sorted(three)


def test_each_tensor_goes_to_its_module_device():
    plan = {"model.layers.1": "cuda:0", "model.layers.10": "cuda:1", "": "cpu"}
    assert device_of(plan, "model.layers.1.mlp.down_proj.weight") == torch.device("cuda:0")
    assert device_of(plan, "model.layers.10.self_attn.q_proj.bias") == torch.device("cuda:1")
    assert device_of(plan, "lm_head.weight") == CPU


def test_with_at_most_one_gpu_the_plan_is_one_device():
    want = "cuda:0" if torch.cuda.device_count() == 1 else "cpu"
    if torch.cuda.device_count() > 1:
        assert len(set(plan_for(28, "auto", CPU).values())) == torch.cuda.device_count()
    else:
        assert plan_for(28, "auto", CPU) == {"": want}


def test_device_map_loads_and_serves_the_plain_tokens(tiny_chatglm2_dir):
    plain = load_model(str(tiny_chatglm2_dir), CPU, "float32", None)
    mapped = load_model(str(tiny_chatglm2_dir), CPU, "float32", None, device_map="auto")
    assert {p.device for p in mapped.model.parameters()} == {CPU}
    assert greedy_ids(mapped, "hello world") == greedy_ids(plain, "hello world")
