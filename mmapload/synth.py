"""Generate llama-shaped bf16 checkpoints of a chosen size, one tensor in memory at a time.

For the demo, the tests and the benchmarks: nothing downloads weights here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .writer import SafetensorsWriter

__all__ = ["llama_layout", "make_llama_checkpoint"]


def _layer(i: int, h: int, inter: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter))]


def llama_layout(target_bytes: int, itemsize: int = 2) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """A (config, [(name, shape)]) of a llama-like model of about ``target_bytes``."""
    numel = lambda shapes: sum(torch.Size(s).numel() for _, s in shapes)  # noqa: E731
    for h in (4096, 2048, 1024, 512, 256, 128, 64):
        vocab, inter, kv = 16 * h, (h * 43 // 16) // 64 * 64 or 64, h // 4
        per_layer = numel(_layer(0, h, inter, kv)) * itemsize
        fixed = (2 * vocab * h + h) * itemsize
        if fixed + 4 * per_layer <= target_bytes or h == 64:
            break
    layers = max(1, round((target_bytes - fixed) / per_layer))
    names = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        names += _layer(i, h, inter, kv)
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    # 128-wide heads from h = 512 up; below, one kv head of h // 4 (k_proj / v_proj are [h // 4, h]),
    # so the config describes the shapes written (a wrong one is warned about and not trusted)
    head_dim = 128 if h >= 512 else kv
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab,
              "num_attention_heads": h // head_dim, "num_key_value_heads": kv // head_dim,
              "torch_dtype": "bfloat16"}
    if head_dim != 128:
        config["head_dim"] = head_dim
    return config, names


def make_llama_checkpoint(out_dir, target_bytes: int, *, shards: int = 2,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write ``model-0000k-of-0000n.safetensors`` shards + index + config.json to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    config, names = llama_layout(target_bytes, itemsize)
    shards = max(1, min(shards, len(names)))
    per_shard = sum(torch.Size(s).numel() for _, s in names) * itemsize / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in names:
        n = torch.Size(shape).numel() * itemsize
        if groups[-1] and acc + n / 2 > per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        acc += n
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        with SafetensorsWriter(out / fname, [(n, dtype, s) for n, s in group],
                               metadata={"format": "pt"}) as w:
            for name, shape in group:
                t = (torch.ones(shape) if len(shape) == 1 else
                     torch.randn(shape, generator=gen).mul_(0.02)).to(dtype)
                w.write(name, t)
                weight_map[name] = fname
                total += t.numel() * itemsize
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
