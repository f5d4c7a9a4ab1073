"""``sdadapt.samplers.unipc_a1111.a1111_unipc_sample`` is A1111's UniPC: ``sd_samplers_timesteps_impl.unipc`` with its
``UniPCCFG`` over ``modules/models/diffusion/uni_pc/uni_pc.py`` (``NoiseScheduleVP('discrete')``, ``interpolate_fn``,
``UniPC.sample(method="multistep")``, ``multistep_uni_pc_bh_update``, data prediction, no thresholding) transcribed
below, over A1111's ``CFGDenoiserTimesteps`` (tests/test_a1111_timesteps.py's), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_stand_ins import rel_err, sd_alphas_cumprod
from test_a1111_timesteps import AC32, _cfg, _cond, _get_timesteps, _guided, _unet, _x_T

from sdadapt.img2img import Img2ImgStart, a1111_img2img_steps
from sdadapt.samplers import sample_latents
from sdadapt.samplers.unipc_a1111 import a1111_unipc_sample


# ------------------------------------------------------------------ A1111's uni_pc.py, the parts its UniPC runs
def _interpolate_fn(x, xp, yp):
    N, K = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((N, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    start_idx = torch.where(torch.eq(x_idx, 0), torch.tensor(1),
                            torch.where(torch.eq(x_idx, K), torch.tensor(K - 2), cand_start_idx))
    end_idx = torch.where(torch.eq(start_idx, cand_start_idx), start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(torch.eq(x_idx, 0), torch.tensor(0),
                             torch.where(torch.eq(x_idx, K), torch.tensor(K - 2), cand_start_idx))
    y_positions_expanded = yp.unsqueeze(0).expand(N, -1, -1)
    start_y = torch.gather(y_positions_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_positions_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


class _NoiseScheduleVP:
    def __init__(self, alphas_cumprod):
        log_alphas = 0.5 * torch.log(alphas_cumprod)
        self.total_N = len(log_alphas)
        self.T = 1.
        self.t_array = torch.linspace(0., 1., self.total_N + 1)[1:].reshape((1, -1))
        self.log_alpha_array = log_alphas.reshape((1, -1,))

    def marginal_log_mean_coeff(self, t):
        return _interpolate_fn(t.reshape((-1, 1)), self.t_array, self.log_alpha_array).reshape(-1)

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,)), -2. * lamb)
        t = _interpolate_fn(log_alpha.reshape((-1, 1)), torch.flip(self.log_alpha_array, [1]),
                            torch.flip(self.t_array, [1]))
        return t.reshape((-1,))


def _expand_dims(v, dims):
    return v[(...,) + (None,) * (dims - 1)]


class _UniPCCFG:
    """UniPC (variant bh1/bh2, predict_x0, no thresholding) with A1111's UniPCCFG.model."""

    def __init__(self, cfg_model, noise_schedule, variant="bh1"):
        self.cfg_model, self.noise_schedule, self.variant = cfg_model, noise_schedule, variant

    def model(self, x, t):
        return self.cfg_model(x, (t - 1. / self.noise_schedule.total_N) * 1000.)

    def model_fn(self, x, t):  # data_prediction_fn
        noise = self.model(x, t)
        dims = x.dim()
        alpha_t, sigma_t = self.noise_schedule.marginal_alpha(t), self.noise_schedule.marginal_std(t)
        return (x - _expand_dims(sigma_t, dims) * noise) / _expand_dims(alpha_t, dims)

    def get_time_steps(self, skip_type, t_T, t_0, N):
        if skip_type == 'logSNR':
            lambda_T = self.noise_schedule.marginal_lambda(torch.tensor(t_T))
            lambda_0 = self.noise_schedule.marginal_lambda(torch.tensor(t_0))
            logSNR_steps = torch.linspace(lambda_T.cpu().item(), lambda_0.cpu().item(), N + 1)
            return self.noise_schedule.inverse_lambda(logSNR_steps)
        elif skip_type == 'time_uniform':
            return torch.linspace(t_T, t_0, N + 1)
        t_order = 2
        return torch.linspace(t_T**(1. / t_order), t_0**(1. / t_order), N + 1).pow(t_order)

    def update(self, x, model_prev_list, t_prev_list, t, order, use_corrector=True):
        ns = self.noise_schedule
        dims = x.dim()
        t_prev_0 = t_prev_list[-1]
        lambda_prev_0 = ns.marginal_lambda(t_prev_0)
        lambda_t = ns.marginal_lambda(t)
        model_prev_0 = model_prev_list[-1]
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        alpha_t = torch.exp(log_alpha_t)
        h = lambda_t - lambda_prev_0
        rks = []
        D1s = []
        for i in range(1, order):
            t_prev_i = t_prev_list[-(i + 1)]
            model_prev_i = model_prev_list[-(i + 1)]
            lambda_prev_i = ns.marginal_lambda(t_prev_i)
            rk = ((lambda_prev_i - lambda_prev_0) / h)[0]
            rks.append(rk)
            D1s.append((model_prev_i - model_prev_0) / rk)
        rks.append(1.)
        rks = torch.tensor(rks)
        R = []
        b = []
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.variant == 'bh1' else torch.expm1(hh)
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= (i + 1)
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R = torch.stack(R)
        b = torch.tensor(b)
        use_predictor = len(D1s) > 0
        if len(D1s) > 0:
            D1s = torch.stack(D1s, dim=1)
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            D1s = None
        if use_corrector:
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        model_t = None
        x_t_ = _expand_dims(sigma_t / sigma_prev_0, dims) * x - _expand_dims(alpha_t * h_phi_1, dims) * model_prev_0
        pred_res = torch.einsum('k,bkchw->bchw', rhos_p, D1s) if use_predictor else 0
        x_t = x_t_ - _expand_dims(alpha_t * B_h, dims) * pred_res
        if use_corrector:
            model_t = self.model_fn(x_t, t)
            corr_res = torch.einsum('k,bkchw->bchw', rhos_c[:-1], D1s) if D1s is not None else 0
            D1_t = (model_t - model_prev_0)
            x_t = x_t_ - _expand_dims(alpha_t * B_h, dims) * (corr_res + rhos_c[-1] * D1_t)
        return x_t, model_t

    def sample(self, x, steps, t_start=None, order=3, skip_type='time_uniform', lower_order_final=True):
        t_0 = 1. / self.noise_schedule.total_N
        t_T = self.noise_schedule.T if t_start is None else t_start
        assert steps >= order, "UniPC order must be < sampling steps"
        timesteps = self.get_time_steps(skip_type=skip_type, t_T=t_T, t_0=t_0, N=steps)
        vec_t = timesteps[0].expand(x.shape[0])
        model_prev_list = [self.model_fn(x, vec_t)]
        t_prev_list = [vec_t]
        for init_order in range(1, order):
            vec_t = timesteps[init_order].expand(x.shape[0])
            x, model_x = self.update(x, model_prev_list, t_prev_list, vec_t, init_order, use_corrector=True)
            if model_x is None:
                model_x = self.model_fn(x, vec_t)
            model_prev_list.append(model_x)
            t_prev_list.append(vec_t)
        for step in range(order, steps + 1):
            vec_t = timesteps[step].expand(x.shape[0])
            step_order = min(order, steps + 1 - step) if lower_order_final else order
            use_corrector = step != steps
            x, model_x = self.update(x, model_prev_list, t_prev_list, vec_t, step_order, use_corrector=use_corrector)
            for i in range(order - 1):
                t_prev_list[i] = t_prev_list[i + 1]
                model_prev_list[i] = model_prev_list[i + 1]
            t_prev_list[-1] = vec_t
            if step < steps:
                if model_x is None:
                    model_x = self.model_fn(x, vec_t)
                model_prev_list[-1] = model_x
        return x


def _a1111_unipc(model, x, timesteps, is_img2img=False, **options):
    """``sd_samplers_timesteps_impl.unipc``: NoiseScheduleVP on A1111's float32 ᾱ buffer."""
    ns = _NoiseScheduleVP(AC32)
    t_start = timesteps[-1] / 1000 + 1 / 1000 if is_img2img else None
    variant = options.pop("variant", "bh1")
    return _UniPCCFG(model, ns, variant).sample(x, steps=len(timesteps), t_start=t_start, **options)


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [3, 4, 7, 20])
@pytest.mark.parametrize("discard", [False, True])
def test_a1111_unipc_is_a1111s(prediction_type, steps, discard):
    """A1111's defaults (bh1, order 3, time_uniform, lower order final) at guidance 7.5: ``len(timesteps)`` steps
    (8 of them for 7: ``range(0, 1000, 142)``), one model call each."""
    x_T = _x_T(steps + 80)
    reference = _cfg(prediction_type, 7.5)
    want = _a1111_unipc(reference, x_T, _get_timesteps(steps + discard))
    calls = []
    got = a1111_unipc_sample(_guided(7.5), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                             prediction_type=prediction_type, discard_next_to_last_sigma=discard,
                             callback=lambda i, t, x: calls.append(i))
    assert torch.equal(got, want), rel_err(got, want)
    assert calls == list(range(len(_get_timesteps(steps + discard))))


@pytest.mark.parametrize(("variant", "order", "skip_type", "lower_order_final"), [
    ("bh2", 3, "time_uniform", True), ("bh1", 2, "time_quadratic", True), ("bh1", 1, "time_uniform", True),
    ("bh1", 4, "logSNR", True), ("bh2", 3, "logSNR", False), ("bh1", 3, "time_quadratic", False)])
def test_a1111s_unipc_settings(variant, order, skip_type, lower_order_final):
    """A1111's settings "UniPC variant", "UniPC order", "UniPC skip type", "UniPC lower order final"."""
    x_T, steps = _x_T(91), 10
    want = _a1111_unipc(_cfg("epsilon", 5.0), x_T, _get_timesteps(steps), variant=variant, order=order,
                        skip_type=skip_type, lower_order_final=lower_order_final)
    got = a1111_unipc_sample(_guided(5.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=steps,
                             variant=variant, order=order, skip_type=skip_type, lower_order_final=lower_order_final)
    assert torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("strength", [0.4, 0.75, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_img2img_and_inpainting_are_a1111s(prediction_type, strength, masked):
    """``sample_img2img`` then ``unipc(is_img2img=True)``: the init latent noised to ``timesteps[t_enc]``, the run of
    ``t_enc`` steps from ``timesteps[t_enc − 1]/1000 + 1/1000`` (A1111's own "likely off by a bit"); the mask blended
    before each call (soft edges), and after."""
    steps, x_T = 12, _x_T(23)
    init = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(24))
    latmask = None
    if masked:
        latmask = torch.zeros(1, 1, 6, 6)
        latmask[..., 1:4, 2:5] = 1.0
        latmask[..., 0, 2:5] = 0.5
    total, t_enc = a1111_img2img_steps(steps, strength)
    timesteps = _get_timesteps(total)
    a = AC32[timesteps[t_enc]]
    xi = init * torch.sqrt(a) + x_T * torch.sqrt(1 - a)
    want = _a1111_unipc(_cfg(prediction_type, 5.0, init, latmask), xi, timesteps[:t_enc], is_img2img=True)
    if masked:
        want = want * latmask + init * (1 - latmask)
    got = sample_latents(_unet, x_T, _cond(0.5), uncond=_cond(-0.25), guidance_scale=5.0, sampler="unipc_a1111",
                         alphas_cumprod=sd_alphas_cumprod(), num_steps=steps, prediction_type=prediction_type,
                         start=Img2ImgStart(init, strength=strength, mask=latmask))
    assert torch.equal(got, want), rel_err(got, want)


def test_bad_requests_are_refused():
    x_T = _x_T(1)
    with pytest.raises(ValueError, match="order 3 needs at least 3 steps, got 2"):
        a1111_unipc_sample(_guided(3.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=2)
    with pytest.raises(ValueError, match="variant must be one of bh1, bh2"):
        a1111_unipc_sample(_guided(3.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=5, variant="vary_coeff")
    with pytest.raises(ValueError, match="skip type must be one of"):
        a1111_unipc_sample(_guided(3.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=5, skip_type="karras")
    with pytest.raises(ValueError, match="reads ε or v"):
        a1111_unipc_sample(_guided(3.0), x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=5,
                           prediction_type="sample")


def test_the_label_as_a1111_writes_it_is_a1111s():
    """"UniPC" (A1111's label, its infotext) is A1111's UniPC; ``unipc`` in any other case stays diffusers'."""
    from sdadapt.sampler_tables import a1111_label
    from sdadapt.samplers.labels import sampler_schedule_from_label

    assert sampler_schedule_from_label("UniPC") == ("unipc_a1111", None)
    assert sampler_schedule_from_label(" UniPC ") == ("unipc_a1111", None)
    assert sampler_schedule_from_label("unipc") == sampler_schedule_from_label("UNIPC") == ("unipc", None)
    assert (a1111_label("unipc_a1111"), a1111_label("unipc")) == ("UniPC", None)


def test_generate_runs_it_and_reads_back(tmp_path):
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main

    base = ["--prompt", "a red circle", "--negative", "blue", "--steps", "8", "--seed", "2", "--guidance", "6"]
    assert main(["generate", *base, "--sampler", "UniPC", "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", *base, "--sampler", "unipc", "-o", str(tmp_path / "b.png")]) == 0
    assert main(["generate", "--infotext", str(tmp_path / "a.png"), "-o", str(tmp_path / "again.png")]) == 0
    a, b, again = (Image.open(tmp_path / f"{n}.png") for n in ("a", "b", "again"))
    assert ", Sampler: UniPC, " in a.text["parameters"] and ", Sampler: UniPC, " not in b.text["parameters"]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(a), np.asarray(again)) and a.text["parameters"] == again.text["parameters"]


def test_the_schedule_is_dpm_solvers_discrete_vp():
    """``VPDiscreteSchedule`` against ``NoiseScheduleVP('discrete')``: log α, σ, λ and t(λ) at every keypoint
    (where the reference's sort decides the segment), between them and beyond both ends."""
    from sdadapt.samplers.unipc_a1111 import VPDiscreteSchedule

    ours, ref = VPDiscreteSchedule(AC32), _NoiseScheduleVP(AC32)
    between = torch.rand(4000, generator=torch.Generator().manual_seed(5)) * 1.01
    for t in (ref.t_array.reshape(-1), between, torch.tensor([0.0009, 0.0004, 1.0, 1.003])):
        assert torch.equal(ours.log_alpha(t), ref.marginal_log_mean_coeff(t))
        assert torch.equal(ours.std(t), ref.marginal_std(t))
        assert torch.equal(ours.lambda_(t), ref.marginal_lambda(t))
    lambdas = torch.cat([ref.marginal_lambda(ref.t_array.reshape(-1)), torch.linspace(-8, 8, 999)])
    assert torch.equal(ours.inverse_lambda(lambdas), ref.inverse_lambda(lambdas))



@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 60), prediction_type=st.sampled_from(["epsilon", "v_prediction"]),
       sampler=st.sampled_from(["ddim", "plms", "ddim_cfgpp", "unipc_a1111"]),
       scale=st.sampled_from([1.0, 3.5, 7.5]), eta=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**16))
def test_every_step_count_is_a1111s(steps, prediction_type, sampler, scale, eta, seed):
    """Any step count (1..60: timesteps ``range(0, 1000, 1000 // n)``, as many as 1000 // (1000 // n)), both
    prediction types, three CFG scales, η for the DDIMs: each of A1111's timestep samplers bit for bit its code."""
    from test_a1111_timesteps import _a1111_ddim, _a1111_plms

    from sdadapt.samplers.a1111_timesteps import (
        a1111_ddim_cfgpp_sample,
        a1111_ddim_sample,
        a1111_plms_sample,
    )

    if scale == 1.0 and sampler != "ddim_cfgpp":  # (at CFG 1 sdadapt runs the prompt alone, A1111 u + (c − u)·1 too:
        scale = 3.5  # ulp-level apart, docs/samplers.md; CFG++ runs the negative at CFG 1, as A1111)
    timesteps = _get_timesteps(steps)
    if sampler == "unipc_a1111" and len(timesteps) < 3:
        steps, timesteps = 3, _get_timesteps(3)
    x_T = _x_T(seed)
    reference = _cfg(prediction_type, scale)
    kw = {"alphas_cumprod": sd_alphas_cumprod(), "num_steps": steps, "prediction_type": prediction_type}
    if sampler == "plms":
        want, got = _a1111_plms(reference, x_T, timesteps), a1111_plms_sample(_guided(scale), x_T, **kw)
    elif sampler == "unipc_a1111":
        want, got = _a1111_unipc(reference, x_T, timesteps), a1111_unipc_sample(_guided(scale), x_T, **kw)
    else:
        cfgpp = sampler == "ddim_cfgpp"
        want = _a1111_ddim(reference, x_T, timesteps, eta, torch.Generator().manual_seed(seed), cfgpp=cfgpp)
        run = a1111_ddim_cfgpp_sample if cfgpp else a1111_ddim_sample
        got = run(_guided(scale), x_T, eta=eta, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(got, want), rel_err(got, want)


def test_generate_refuses_fewer_steps_than_its_order_before_loading(tmp_path, capsys):
    """txt2img below 3 steps and img2img whose ``t_enc`` is below 3 (strength 0.29 of 10 steps: 2 steps) are refused
    from the options; strength 0.3 (3 steps) runs."""
    from PIL import Image as PILImage

    from sdadapt.cli import main

    PILImage.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / "i.png")
    assert main(["generate", "--prompt", "a", "--sampler", "UniPC", "--steps", "2", "-o", str(tmp_path / "a.png")]) == 2
    assert "A1111's UniPC needs at least its order, 3 steps" in capsys.readouterr().err
    img2img = ["generate", "--prompt", "a", "--sampler", "UniPC", "--init-image", str(tmp_path / "i.png"), "--steps",
               "10"]
    assert main([*img2img, "--denoising-strength", "0.29", "-o", str(tmp_path / "b.png")]) == 2
    assert "runs 2 steps, and A1111's UniPC needs at least its order, 3" in capsys.readouterr().err
    assert main([*img2img, "--denoising-strength", "0.3", "-o", str(tmp_path / "c.png")]) == 0
