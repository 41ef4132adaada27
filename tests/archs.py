"""Tiny models of real architectures, built with transformers on the fly (random weights, bf16).

``build(kind, folder)`` saves one with ``save_pretrained`` and returns the folder; ``logits``
runs a model on fixed token ids (T5 gets decoder ids too). Nothing is downloaded.
"""

from __future__ import annotations

import torch

KINDS = ("llama", "gpt2", "t5", "mamba", "mixtral", "qwen3_moe", "gpt_oss")


def config(kind: str):
    """MoE configs route every token to every expert: with top-k < E, FP8 noise flips a tiny random
    model's routing and its logits jump (cosine 0.98 from fake-quantized attention alone)."""
    import transformers as tf
    small = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": lambda: tf.LlamaConfig(**small, intermediate_size=128, num_key_value_heads=2),
        "gpt2": lambda: tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0),
        "t5": lambda: tf.T5Config(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                                  decoder_start_token_id=0),
        "mamba": lambda: tf.MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8),
        "mixtral": lambda: tf.MixtralConfig(**small, intermediate_size=128, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=4),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**small, intermediate_size=128, moe_intermediate_size=64,
                                               num_key_value_heads=2, num_experts=4, num_experts_per_tok=4,
                                               head_dim=16),
        "gpt_oss": lambda: tf.GptOssConfig(**small, intermediate_size=64, num_key_value_heads=2,
                                           num_local_experts=4, num_experts_per_tok=4, head_dim=16),
    }[kind]()


def model_class(kind: str):
    import transformers as tf
    return {"llama": tf.LlamaForCausalLM, "gpt2": tf.GPT2LMHeadModel, "t5": tf.T5ForConditionalGeneration,
            "mamba": tf.MambaForCausalLM, "mixtral": tf.MixtralForCausalLM,
            "qwen3_moe": tf.Qwen3MoeForCausalLM, "gpt_oss": tf.GptOssForCausalLM}[kind]


def build(kind: str, folder):
    torch.manual_seed(0)
    model = model_class(kind)(config(kind))
    with torch.no_grad():   # wider weights than the default init, so FP8 noise is not hidden
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


IDS = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    kw = {"decoder_input_ids": IDS[:, :6]} if model.config.model_type == "t5" else {}
    return model(input_ids=IDS, **kw).logits.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
