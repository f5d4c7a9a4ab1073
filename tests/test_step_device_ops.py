"""The training step makes no device tensor it throws away (each is a kernel launch per step on a GPU,
where a batch-1 step is launch-bound: issue 16), and computes what it did before.

* the per-sample loss weights start from the first factor (min-SNR, debiased, …) or the batch's
  ``loss_weight``; ones are made only when nothing multiplies them (``1 * w == w`` exactly);
* the ``nan`` grad norm is made only when no clipped norm replaces it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from aten_ops import AtenOps
from torch import nn

from sdadapt.training import diffusion
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, train_step

_AC = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear", num_steps=1000)).float()


def _factors_reference(t: torch.Tensor, config: StepConfig, loss_weight: torch.Tensor | None) -> torch.Tensor:
    """The weights as the step made them before: ones (or the loss weights) times each factor, in order."""
    weights = torch.ones(t.shape[0]) if loss_weight is None else loss_weight.float()
    snr = diffusion.snr(t, _AC)
    if config.min_snr_gamma is not None:
        weights = weights * diffusion.min_snr_weight(snr, config.min_snr_gamma, config.prediction_type)
    if config.scale_v_pred_loss_like_noise_pred:
        weights = weights * diffusion.noise_like_scale(snr)
    if config.v_pred_like_loss:
        weights = weights * diffusion.v_pred_like_weight(snr, config.v_pred_like_loss)
    if config.debiased_estimation:
        weights = weights * diffusion.debiased_weight(snr, config.prediction_type)
    if config.p2_gamma is not None:
        weights = weights * diffusion.p2_weight(snr, gamma=config.p2_gamma)
    return weights


def _float64_weights(t: torch.Tensor, config: StepConfig, loss_weight: torch.Tensor | None) -> torch.Tensor:
    """The same product in float64, written out (min-SNR ε: min(SNR, γ)/SNR, v: min(SNR, γ)/(SNR + 1);
    debiased ε: 1/√SNR, v: 1/(SNR + 1); P2: 1/(1 + SNR)^γ)."""
    ac = _AC.double()[t]
    snr = ac / (1 - ac)
    w = torch.ones(t.shape[0], dtype=torch.float64) if loss_weight is None else loss_weight.double()
    if config.min_snr_gamma is not None:
        clipped = torch.minimum(snr, torch.full_like(snr, config.min_snr_gamma))
        w = w * (clipped / snr if config.prediction_type == "epsilon" else clipped / (snr + 1))
    if config.debiased_estimation:  # (kohya clamps the SNR to [1e-8, 1000] there)
        s = snr.clamp(1e-8, 1000)
        w = w * (1 / s.sqrt() if config.prediction_type == "epsilon" else 1 / (s + 1))
    if config.p2_gamma is not None:
        w = w * (1 / (1 + snr) ** config.p2_gamma)
    return w


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("min_snr, debiased, p2, with_weight",
                         list(itertools.product([None, 5.0], [False, True], [None, 1.0], [False, True])))
def test_loss_weights_are_the_same_product_and_no_ones_are_made_for_nothing(prediction, min_snr, debiased, p2, with_weight):
    config = StepConfig(min_snr_gamma=min_snr, debiased_estimation=debiased, p2_gamma=p2, prediction_type=prediction)
    batch = {"latents": torch.randn(5, 4, 8, 8), "cond": None, "timesteps": torch.tensor([0, 10, 300, 700, 999])}
    if with_weight:
        batch["loss_weight"] = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25])
    with AtenOps() as ops:
        prepared = prepare_batch(batch, state=TrainState(seed=0), config=config, alphas_cumprod=_AC)
    t = batch["timesteps"]
    want = _factors_reference(t, config, batch.get("loss_weight"))
    assert prepared["weights"].dtype == want.dtype and torch.equal(prepared["weights"], want)  # bit for bit
    torch.testing.assert_close(prepared["weights"].double(), _float64_weights(t, config, batch.get("loss_weight")),
                               rtol=1e-5, atol=0)
    factors = (min_snr is not None) + debiased + (p2 is not None)
    assert ops.counts["ones"] == (0 if factors or with_weight else 1)


def _model_and_params():
    torch.manual_seed(0)
    net = nn.Conv2d(4, 4, 1)
    return (lambda x, t, cond: net(x)), list(net.parameters())


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_grad_norm_is_the_clipped_norm_or_nan_and_made_once(clip, accumulation):
    model, params = _model_and_params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    config = StepConfig(max_grad_norm=clip, accumulation_steps=accumulation)
    state = TrainState(seed=0)
    batch = {"latents": torch.randn(2, 4, 8, 8), "cond": None}
    for micro in range(2 * accumulation):
        with AtenOps() as ops:
            metrics = train_step(model, batch, params=params, optimizer=optimizer, state=state, config=config,
                                 alphas_cumprod=_AC)
        stepped = (micro + 1) % accumulation == 0
        assert bool(metrics["stepped"]) == stepped
        assert ops.counts["full"] == (0 if stepped and clip is not None else 1)  # one nan when it is the answer
        if stepped and clip is not None:
            assert math.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
        else:
            assert math.isnan(float(metrics["grad_norm"]))


def test_the_clipped_norm_is_the_gradients_norm():
    """With clipping, grad_norm is the float64 norm of the gradients before the clip (reference in the test)."""
    model, params = _model_and_params()
    seen: list[float] = []

    def hook(grad):
        seen.append(grad.double().pow(2).sum().item())
        return grad

    for p in params:
        p.register_hook(hook)
    metrics = train_step(model, {"latents": torch.randn(2, 4, 8, 8), "cond": None}, params=params,
                         optimizer=torch.optim.SGD(params, lr=0.0), state=TrainState(seed=0),
                         config=StepConfig(max_grad_norm=1e-6), alphas_cumprod=_AC)
    assert float(metrics["grad_norm"]) == pytest.approx(math.sqrt(sum(seen)), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_schedule_factors_multiply_in_float32_as_ones_did(dtype):
    """A bf16/fp16 ᾱ (a system cast with ``.to(dtype)``) gives low-precision factors: the product is
    still ``ones (float32) * f1 * f2 * f3``, so each later product is in float32 (float64 stays float64)."""
    ac = _AC.to(dtype)
    t = torch.arange(0, 1000, 7)
    config = StepConfig(min_snr_gamma=5.0, debiased_estimation=True, p2_gamma=1.0)
    batch = {"latents": torch.randn(t.shape[0], 4, 2, 2), "cond": None, "timesteps": t}
    prepared = prepare_batch(batch, state=TrainState(seed=0), config=config, alphas_cumprod=ac)
    snr = diffusion.snr(t, ac)
    want = (torch.ones(t.shape[0]) * diffusion.min_snr_weight(snr, 5.0, "epsilon") * diffusion.debiased_weight(snr)
            * diffusion.p2_weight(snr, gamma=1.0))
    assert torch.equal(prepared["weights"], want.float())


@pytest.mark.parametrize("timesteps", [torch.tensor(500), torch.tensor([500])])
def test_one_timestep_for_the_batch_still_gives_one_weight_per_sample(timesteps):
    batch = {"latents": torch.randn(3, 4, 2, 2), "cond": None, "timesteps": timesteps}
    prepared = prepare_batch(batch, state=TrainState(seed=0), config=StepConfig(min_snr_gamma=5.0), alphas_cumprod=_AC)
    want = torch.ones(3) * diffusion.min_snr_weight(diffusion.snr(timesteps, _AC), 5.0, "epsilon")
    assert prepared["weights"].shape == (3,) and torch.equal(prepared["weights"], want)
