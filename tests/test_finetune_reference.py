"""Native fine-tuning against the code it follows, transcribed here (float64 where numeric).

References (read at these commits):

* huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
  - ``src/diffusers/training_utils.py:745-818``: ``EMAModel.get_decay`` / ``EMAModel.step``
    (defaults ``decay=0.9999, min_decay=0, update_after_step=0, use_ema_warmup=False``);
    ``:81`` ``compute_snr``.
  - ``examples/text_to_image/train_text_to_image.py:969-1039``: the training step — noise, noise
    offset ``noise += offset·randn(B, C, 1, 1)``, input perturbation (``new_noise`` for the noisy
    latents only), uniform timesteps, the ε / ``get_velocity`` target, Min-SNR ``min(SNR, γ)/SNR``
    (ε) or ``/(SNR + 1)`` (v), the loss "mean over non-batch dims, times the weight, mean".
* kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb
  - ``library/train_util.py:6071-6107`` ``get_noise_noisy_latents_and_timesteps``: the draw order
    sdadapt keeps (noise, offset, multires, timesteps, then the perturbation's draw; diffusers draws
    the perturbation before the timesteps — same distribution, another order of one generator).
  - ``fine_tune.py:217-228``: every UNet parameter trains (and every text-encoder one with
    ``--train_text_encoder``), one LR unless ``--learning_rate_te``.
"""

from __future__ import annotations

import pytest
import torch

from sdadapt.methods.finetune import prepare_full
from sdadapt.toy import load_toy
from sdadapt.training.step import EMA, StepConfig, TrainState, prepare_batch, step_loss


# ------------------------------------------------------------------------------------ EMA
def _diffusers_get_decay(optimization_step: int, decay: float) -> float:
    """diffusers training_utils.py:745-763, defaults (update_after_step 0, min_decay 0, no warm-up)."""
    update_after_step, min_decay = 0, 0.0
    step = max(0, optimization_step - update_after_step - 1)
    if step <= 0:
        return 0.0
    cur_decay_value = (1 + step) / (10 + step)
    cur_decay_value = min(cur_decay_value, decay)
    return max(cur_decay_value, min_decay)


@pytest.mark.parametrize("decay", [0.5, 0.8, 0.9999])
def test_ema_decay_is_diffusers_get_decay_at_every_update(decay):
    ema = EMA([torch.nn.Parameter(torch.zeros(1))], decay=decay)
    assert [ema.decay_at(n) for n in range(1, 60)] == [_diffusers_get_decay(n, decay) for n in range(1, 60)]


def test_ema_shadows_follow_diffusers_emamodel_step():
    """Same parameters walked through 14 optimiser steps: sdadapt's float32 shadows against a float64
    transcription of ``EMAModel.step`` (``s -= (1 - d)·(s - p)``) and against diffusers' own EMAModel."""
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    decay = 0.6  # reached at update 15 (n / (9 + n)): the steps below stay in the warm-up, the cap is tested above
    ema = EMA(params, decay=decay)
    theirs = EMAModel(params, decay=decay)
    shadow = [p.detach().double().clone() for p in params]
    for n in range(1, 15):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        theirs.step(params)
        d = _diffusers_get_decay(n, decay)
        shadow = [s - (1 - d) * (s - p.detach().double()) for s, p in zip(shadow, params)]
        if n == 1:  # get_decay(1) = 0: the first update copies the weights
            assert all(torch.equal(s, p.detach()) for s, p in zip(ema.shadow, params))
        for mine, ref, their in zip(ema.shadow, shadow, theirs.shadow_params):
            torch.testing.assert_close(mine.double(), ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(mine, their, rtol=1e-6, atol=1e-6)
    assert ema.updates == theirs.optimization_step == 14


def test_ema_refuses_a_decay_outside_zero_one():
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\]"):
        EMA([torch.nn.Parameter(torch.zeros(1))], decay=1.5)


# ------------------------------------------------------------------------- the training step
def _sd_alphas_cumprod() -> torch.Tensor:
    """DDPMScheduler(beta_schedule="scaled_linear", 0.00085, 0.012, 1000).alphas_cumprod in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _model(x: torch.Tensor, t: torch.Tensor, _cond: object) -> torch.Tensor:
    """A fixed stand-in UNet: depends on x, on t and across pixels (B, C, H, W) -> (B, C, H, W)."""
    return 0.7 * x + 0.3 * x.flip(-1) * (t.to(x.dtype) / 1000).view(-1, 1, 1, 1) - 0.05


def _diffusers_step_loss(latents, seed, *, prediction_type, snr_gamma, noise_offset, input_perturbation, ac):
    """train_text_to_image.py:969-1039 in float64, drawing from one generator in kohya's order
    (train_util.py:6075-6100: the perturbation's draw after the timesteps)."""
    g = torch.Generator().manual_seed(seed)
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=g, dtype=torch.float64)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((bsz, latents.shape[1], 1, 1), generator=g, dtype=torch.float64)
    timesteps = torch.randint(0, 1000, (bsz,), generator=g).long()
    if input_perturbation:
        new_noise = noise + input_perturbation * torch.randn(latents.shape, generator=g, dtype=torch.float64)
    a = ac[timesteps].view(-1, 1, 1, 1)
    noisy_latents = a.sqrt() * latents + (1 - a).sqrt() * (new_noise if input_perturbation else noise)  # add_noise
    if prediction_type == "epsilon":
        target = noise
    else:  # DDPMScheduler.get_velocity
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    model_pred = _model(noisy_latents, timesteps, None)
    if snr_gamma is None:
        return ((model_pred - target) ** 2).mean()
    alpha, sigma = ac[timesteps].sqrt(), (1 - ac[timesteps]).sqrt()
    snr = (alpha / sigma) ** 2  # compute_snr
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    else:
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = ((model_pred - target) ** 2).mean(dim=list(range(1, 4))) * mse_loss_weights
    return loss.mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize(("noise_offset", "input_perturbation"), [(0.0, 0.0), (0.1, 0.0), (0.0, 0.2), (0.1, 0.2)])
def test_the_step_loss_is_diffusers_train_text_to_image(prediction_type, snr_gamma, noise_offset, input_perturbation):
    ac = _sd_alphas_cumprod()
    latents = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    config = StepConfig(prediction_type=prediction_type, min_snr_gamma=snr_gamma, noise_offset=noise_offset,
                        input_perturbation=input_perturbation, max_grad_norm=None)
    prepared = prepare_batch({"latents": latents, "cond": None}, state=TrainState(seed=7), config=config, alphas_cumprod=ac)
    loss = step_loss(_model, prepared, config)
    reference = _diffusers_step_loss(latents, 7, prediction_type=prediction_type, snr_gamma=snr_gamma,
                                     noise_offset=noise_offset, input_perturbation=input_perturbation, ac=ac)
    # (step_loss takes prediction and target in float32, as diffusers' model_pred.float(), target.float())
    torch.testing.assert_close(loss.double(), reference, rtol=2e-6, atol=1e-9)


# ----------------------------------------------------------------------------- what trains
def test_full_fine_tune_trains_every_unet_and_text_encoder_parameter_as_kohya_fine_tune():
    """fine_tune.py:217-228: ``m.requires_grad_(True)`` for the UNet (and the text encoder with
    ``--train_text_encoder``), all their parameters optimised; ``remove`` restores the frozen model."""
    system = load_toy()
    before = {id(p): (p.requires_grad, p.detach().clone()) for p in [*system.unet.parameters(), *system.text_encoder.parameters()]}
    for text_encoder in (False, True):
        adaptation = prepare_full(system, text_encoder=text_encoder)
        expected = [*system.unet.parameters(), *(system.text_encoder.parameters() if text_encoder else ())]
        assert [id(p) for p in adaptation.params] == [id(p) for p in expected]
        assert all(p.requires_grad for p in expected)
        assert text_encoder or not any(p.requires_grad for p in system.text_encoder.parameters())
        with torch.no_grad():
            for p in adaptation.params:
                p.add_(1.0)
        adaptation.remove()
        for p in [*system.unet.parameters(), *system.text_encoder.parameters()]:
            flag, value = before[id(p)]
            assert p.requires_grad == flag and torch.equal(p.detach(), value)
