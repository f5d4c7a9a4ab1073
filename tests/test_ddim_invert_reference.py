"""``ddim_invert`` for v- and x0-predicting models against diffusers' ``DDIMInverseScheduler.step``.

Reference: huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
``src/diffusers/schedulers/scheduling_ddim_inverse.py:340-380``: the step from ``t_from = t − T/n``
(``timestep``) to the model's timestep ``t`` (``prev_timestep``) converts the prediction with
``alpha_prod_t = ᾱ[t_from]`` (``initial_alpha_cumprod`` = ᾱ[0] under ``set_alpha_to_one=False`` before
the first step), the ᾱ of the latent's own level, not the model's timestep's:

    v:   x̂0 = √ᾱ_from·x − √(1−ᾱ_from)·v,  ε = √ᾱ_from·v + √(1−ᾱ_from)·x
    x0:  x̂0 = out,                        ε = (x − √ᾱ_from·x̂0)/√(1−ᾱ_from)
    x_t = √ᾱ_t·x̂0 + √(1−ᾱ_t)·ε

The transcription below runs in float64; the library class itself is compared too.
"""

from __future__ import annotations

import pytest
import torch

from sdadapt.training import diffusion as D

diffusers = pytest.importorskip("diffusers")

_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _model(x, t, c):
    """A smooth model whose output depends on the latent and the timestep (float64)."""
    return (0.3 * torch.tanh(x) + torch.sin(t.double() / 131).reshape(-1, 1, 1, 1) + c.reshape(-1, 1, 1, 1)).to(x.dtype)


def _transcribed_inverse(x, ac, n, prediction_type):
    """diffusers' DDIMInverseScheduler (leading spacing, steps_offset=1, set_alpha_to_one=False), float64."""
    T = ac.shape[0]
    ratio = T // n
    timesteps = [i * ratio + 1 for i in range(n)]  # set_timesteps: arange(0, n) * ratio + steps_offset
    cond = torch.tensor([0.05, -0.02], dtype=torch.float64)
    for t in timesteps:  # step(model_output, t, sample)
        out = _model(x, torch.full((x.shape[0],), t), cond)
        t_from = min(t - ratio, T - 1)
        a_from = ac[t_from] if t_from >= 0 else ac[0]  # initial_alpha_cumprod (set_alpha_to_one=False)
        a_to = ac[t]
        if prediction_type == "v_prediction":
            x0 = a_from ** 0.5 * x - (1 - a_from) ** 0.5 * out
            eps = a_from ** 0.5 * out + (1 - a_from) ** 0.5 * x
        else:  # "sample"
            x0 = out
            eps = (x - a_from ** 0.5 * x0) / (1 - a_from) ** 0.5
        x = a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps
    return x


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddim_invert_converts_the_prediction_with_the_latents_own_alpha_as_diffusers(prediction_type):
    ref = diffusers.DDIMInverseScheduler(**_SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                         prediction_type=prediction_type)
    ref.set_timesteps(10)
    ac = ref.alphas_cumprod.double()
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = torch.tensor([0.05, -0.02], dtype=torch.float64)
    latents = D.ddim_invert(_model, x0, cond, alphas_cumprod=ac, num_steps=10, prediction_type=prediction_type)
    expected = _transcribed_inverse(x0.clone(), ac, 10, prediction_type)
    torch.testing.assert_close(latents[-1], expected, atol=1e-12, rtol=1e-12)
    x = x0.clone()  # the library class (its ᾱ in float32, promoted)
    for t in ref.timesteps:
        x = ref.step(_model(x, t.expand(2), cond), t, x).prev_sample
    torch.testing.assert_close(latents[-1], x, atol=1e-6, rtol=1e-5)
