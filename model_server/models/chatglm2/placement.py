"""``--device-map`` for ChatGLM: which device each module of the model lives on.

The original demo's ``load_model_on_gpus(num_gpus=N)`` put the embedding, the final norm and
the output layer on the first GPU and split the 28 blocks over the rest evenly. Here the
blocks are split into contiguous runs (every block has the same size), the embedding and the
rotary table go with the first block and the final norm and output layer with the last, so
hidden states cross a GPU boundary only between runs. accelerate's hooks
(``dispatch_model``) move activations across those boundaries; the engine's KV cache
follows each layer's device.

Policies (the names accelerate uses): ``auto``, ``balanced`` and ``sequential`` split the
blocks evenly; ``balanced_low_0`` gives GPU 0 half a share (it also holds the batch's inputs
and the prefix-cache blocks; the logits and the sampler's state sit with the output layer, on
the last GPU).
"""

from __future__ import annotations

import torch

Plan = dict[str, str]


def split_blocks(num_layers: int, devices: list[str], policy: str) -> list[str]:
    """Device of each block, contiguous runs in device order."""
    weights = [1.0] * len(devices)
    if policy == "balanced_low_0" and len(devices) > 1:
        weights[0] = 0.5
    total = sum(weights)
    bounds, acc = [], 0.0
    for w in weights:
        acc += w
        bounds.append(round(num_layers * acc / total))
    out, k = [], 0
    for i in range(num_layers):
        while i >= bounds[k]:
            k += 1
        out.append(devices[k])
    return out


def plan_for(num_layers: int, policy: str, default: torch.device) -> Plan:
    """The module → device plan for a policy over the visible GPUs (``default`` without)."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if len(gpus) <= 1:
        return {"": str(gpus[0] if gpus else default)}
    blocks = split_blocks(num_layers, gpus, policy)
    plan = {f"model.layers.{i}": d for i, d in enumerate(blocks)}
    plan |= {"model.embed_tokens": blocks[0], "model.rotary_emb": blocks[0]}
    plan |= {"model.norm": blocks[-1], "lm_head": blocks[-1]}
    return plan


def device_of(plan: Plan, name: str) -> torch.device:
    """The device of a parameter or module name: its longest planned prefix."""
    best = ""
    for prefix in plan:
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) >= len(
            best
        ):
            best = prefix
    return torch.device(plan[best])
