"""A kohya LoRA file for the tests' tiny Stable Diffusion pipeline (``test_cli_train._tiny_pipeline``, width 32):
rank 4 on the first text-encoder layer's q_proj and on the first cross-attention's to_k, random from ``seed``."""

from __future__ import annotations

import torch

TINY_LORA_KEYS = ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")


def tiny_lora_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The file's tensors: ``lora_down`` (4, 32), ``lora_up`` (32, 4) and ``alpha`` 4 per layer, drawn in key order
    from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in TINY_LORA_KEYS:
        state[f"{key}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        state[f"{key}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        state[f"{key}.alpha"] = torch.tensor(4.0)
    return state
