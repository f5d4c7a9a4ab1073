"""SDXL's size / crop conditioning (``time_ids``) stays float32 whatever the text states' dtype: a bfloat16 text
encoder (``train full --text-encoder --full-bf16``, ``dreambooth --full-bf16``) rounded sizes above 256 before the
UNet embedded them (1365 -> 1368: 77 of 256 embedding channels moved by > 0.1), where kohya embeds the exact
integers in float32 (``sdxl_train_util.get_size_embeddings``) and casts the embedding."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_systems import tiny_diffusers_system


def _kohya_size_embedding(ids: torch.Tensor, dim: int) -> torch.Tensor:
    """kohya's get_timestep_embedding / get_size_embeddings (sd-scripts 48d368fa library/sdxl_train_util.py:182-216),
    transcribed in float64: each id's sinusoidal embedding (cos first), concatenated."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = ids.to(torch.float64).reshape(-1, 1) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).reshape(ids.shape[0], -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_size_ids_stay_exact_with_half_text_encoders(tmp_path, dtype):
    system = tiny_diffusers_system(tmp_path, sdxl=True, max_token_length=75)
    system.text_encoder.to(dtype)
    system.text_encoder_2.to(dtype)
    sizes = torch.tensor([[771.0, 1365.0, 3.0, 21.0, 768.0, 1344.0], [3000.0, 4000.0, 0.0, 0.0, 1024.0, 1024.0]])
    cond = system.condition({"ids": system.tokenize(["ab cd", ""]), "time_ids": sizes})
    assert cond["context"].dtype == dtype
    assert cond["time_ids"].dtype == torch.float32 and torch.equal(cond["time_ids"], sizes)
    assert sizes.to(torch.bfloat16).to(torch.float32)[0, 1].item() == 1368.0  # (what bfloat16 ids were)
    # the UNet's size embedding of what it is given: kohya's exact float32 embedding of the integers
    proj = system.unet.add_time_proj
    got = proj(cond["time_ids"].flatten()).reshape(2, -1)
    want = _kohya_size_embedding(sizes, proj.num_channels)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3)  # (float32 sin/cos of arguments up to 4000)
    default = system.condition({"ids": system.tokenize(["ab cd"])})["time_ids"]  # (no ids: the native size)
    assert default.dtype == torch.float32 and default[0, 2:4].tolist() == [0.0, 0.0]
