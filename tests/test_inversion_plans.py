"""Inversion reads prompt plans as ``generate`` does: prompt editing, alternation, ``AND`` (with weights).

* (a) a plan whose branches are one text (``[red:red:0.5]``) is the plain prompt, bit for bit;
* (b) inversion + reconstruction of a plan equal a naive loop written here that calls the model per step with
  that step's condition — the per-step texts written out by hand from A1111's rule (model call ``k`` takes the
  first schedule entry with ``k <= end``: ``prompt_parser.reconstruct_cond_batch``; ``[a:b:0.5]`` of 4 steps ends
  its first text at 2, so calls 0, 1, 2 read ``a``; ``[a|b]`` of 4 steps has ends 1..4, entry ``e`` reading
  option ``(e - 1) % 2``, so calls 0..3 read ``a a b a``);
* (c) regenerating a plan's inversion (method ddim: the negative's embedding at every step) from generate's start
  latents gives generate's latents for that plan (``sdadapt.sampling.generate``, the DDIM sampler);
* (d) ``AND`` with weights: the null-text loop against A1111's ``u + Σ (c_j − u)·(w_j·s)`` written out, and
  generate's sampling; negative-prompt inversion of ``AND`` refused;
* (e) alternation (in (b), (c)); edits with ``source_steps`` keep the source plan's steps; the plan survives the
  file (``sdadapt-inversion/4``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sdadapt.inversion import (
    invert_image,
    load_inversion,
    regenerate_image,
    save_inversion,
)
from sdadapt.inversion.core import ConditionPlan, DDIMSteps
from sdadapt.inversion.invert import sample_inversion
from sdadapt.prompt_guidance import plan_prompt
from sdadapt.training import diffusion

SIZE = 16
STEPS = 4
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    # (clip skip 2: the tiny encoder's final LayerNorm has no affine part, as in test_inversion_followups)
    built = tiny_diffusers_system(tmp_path_factory.mktemp("sd1"), max_token_length=75, clip_skip=2)
    built.image_size = SIZE
    return built


def _image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _text(system, text: str) -> torch.Tensor:
    with torch.no_grad():
        return system.prompt_condition(text)


# ------------------------------------------------------------------------------------- naive references
def _naive_pivot(model, x0, step_out, ac, n):
    """DDIM inversion written out (Mokady et al.; diffusers' DDIMInverseScheduler with ε-prediction): sampling step
    ``i`` (t_i descending) is inverted from ``t_i − T//n`` to ``t_i`` with ``step_out(i, x, t_i)``."""
    ts = diffusion.ddim_timesteps(n, num_train_steps=ac.shape[0]).tolist()  # descending
    xs, x = [x0], x0
    for i in range(n - 1, -1, -1):
        t = ts[i]
        a_from = ac[t - ac.shape[0] // n] if t - ac.shape[0] // n >= 0 else ac[0]
        eps = step_out(i, x, torch.full((1,), t, dtype=torch.long))
        x0_hat = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        x = ac[t].sqrt() * x0_hat + (1 - ac[t]).sqrt() * eps
        xs.append(x)
    return xs


def _naive_null_text(model, pivot, conds, uncond, ac, n, *, guidance, inner, lr=1e-2, combine=None):
    """Null-text optimisation written out with step ``i``'s own condition ``conds[i]`` (a tensor, or a list of
    ``(tensor, weight)`` AND parts combined as ``u + Σ (c_j − u)·(w_j·s)``): Adam per step, the paper's
    schedule, warm start from the previous step's embedding."""
    rule = DDIMSteps(ac, n)
    ts = rule.timesteps.tolist()

    def guided(i, x, e):
        t = torch.full((1,), ts[i], dtype=torch.long)
        u = model(x, t, e)
        if isinstance(conds[i], list):  # (the sub-prompts in one batch, as generate runs them: Adam's normalised
            # step would amplify the rounding of separate calls past the tolerance)
            k = len(conds[i])
            outs = model(torch.cat([x] * k), torch.cat([t] * k), torch.cat([c for c, _ in conds[i]])).detach().chunk(k)
            out = u.clone()
            for c_out, (_, w) in zip(outs, conds[i]):
                out = out + (c_out - u) * (w * guidance)
            return out
        c = model(x, t, conds[i]).detach()
        return u + guidance * (c - u)

    e, rows, x = uncond.clone(), [], pivot[-1]
    for i in range(n):
        e = e.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([e], lr=lr * (1 - 1e-2 * i))
        for _ in range(inner):
            loss = torch.nn.functional.mse_loss(rule.step(guided(i, x, e), x, i), pivot[n - i - 1])
            e.grad = torch.autograd.grad(loss, [e])[0]
            opt.step()
            if loss.item() < 1e-5 + i * 2e-5:
                break
        e = e.detach()
        rows.append(e.clone())
        with torch.no_grad():
            x = rule.step(guided(i, x, e), x, i)
    return torch.stack(rows), x


# ------------------------------------------------------------------------------------------------- (a)
def test_a_plan_of_one_text_is_the_plain_prompt_bit_for_bit(system):
    plain = invert_image(system, _image(1), "a red cube", num_steps=3, inner_steps=2, guidance=GUIDANCE)
    planned = invert_image(system, _image(1), "a [red:red:0.5] cube", num_steps=3, inner_steps=2, guidance=GUIDANCE)
    assert planned.cond_plan is None
    for name in ("x_T", "null_embeddings", "cond", "uncond"):
        assert torch.equal(getattr(planned, name), getattr(plain, name)), name
    assert torch.equal(regenerate_image(system, planned), regenerate_image(system, plain))


# ------------------------------------------------------------------------------------------------- (b), (e)
@pytest.mark.parametrize("prompt, per_step", [
    ("a [red:blue:0.5] cube", ["a red cube", "a red cube", "a red cube", "a blue cube"]),
    ("a [red|blue] cube", ["a red cube", "a red cube", "a blue cube", "a red cube"]),
    ("a [blue::2] cube", ["a blue cube", "a blue cube", "a blue cube", "a  cube"]),
])
def test_plan_inversion_matches_a_naive_per_step_loop(system, prompt, per_step):
    inv = invert_image(system, _image(2), prompt, num_steps=STEPS, inner_steps=3, guidance=GUIDANCE)
    conds = [_text(system, t) for t in per_step]
    uncond = _text(system, "")
    model, ac = system.denoiser(), system.alphas_cumprod
    with torch.no_grad():
        x0 = system.encode_images(_image(2))
        pivot = _naive_pivot(model, x0, lambda i, x, t: model(x, t, conds[i]), ac, STEPS)
    torch.testing.assert_close(inv.x_T, pivot[-1], rtol=0, atol=1e-5)
    nulls, x = _naive_null_text(model, pivot, conds, uncond, ac, STEPS, guidance=GUIDANCE, inner=3)
    torch.testing.assert_close(inv.null_embeddings, nulls, rtol=0, atol=1e-5)
    assert inv.cond_plan is not None and len(inv.cond_plan.conds) == len(set(per_step))
    with torch.no_grad():  # (the sampler runs null and prompt as one batch of 2: the UNet's float32 rounding differs)
        latents = sample_inversion(model, inv)
    torch.testing.assert_close(latents, x, rtol=0, atol=1e-4)


def test_negative_prompt_inversion_of_a_plan_takes_each_steps_prompt(system):
    inv = invert_image(system, _image(3), "a [red|blue] cube", method="negative-prompt", num_steps=STEPS)
    want = torch.stack([_text(system, t) for t in ["a red cube", "a red cube", "a blue cube", "a red cube"]])
    assert torch.equal(inv.null_embeddings, want)


def test_a_negative_plan_gives_ddim_its_negative_per_step(system):
    inv = invert_image(system, _image(3), "a cube", method="ddim", num_steps=STEPS, negative="[dark:blurry:0.5]")
    want = torch.stack([_text(system, t) for t in ["dark", "dark", "dark", "blurry"]])
    assert inv.cond_plan is None and torch.equal(inv.null_embeddings, want)


# ------------------------------------------------------------------------------------------------- (c)
def _generated(system, prompt: str, negative: str, seed: int) -> torch.Tensor:
    from sdadapt.sampling import generate

    plan = plan_prompt(prompt, negative, steps=STEPS)
    with torch.no_grad():
        return generate(system, [prompt], negative=negative, seed=seed, steps=STEPS, guidance=GUIDANCE, sampler="ddim",
                        plan=plan, output="latents")


@pytest.mark.parametrize("prompt", ["a [red:blue:0.5] cube", "a [red|blue] cube", "a red cube AND a blue ball:0.6"])
def test_regenerate_samples_what_generate_samples(system, prompt):
    negative = "dark"
    inv = invert_image(system, _image(4), prompt, method="ddim", num_steps=STEPS, negative=negative, guidance=GUIDANCE)
    start = torch.randn(1, *inv.x_T.shape[1:], generator=torch.Generator().manual_seed(11))  # (generate's draw)
    with torch.no_grad():
        ours = sample_inversion(system.denoiser(), dataclasses.replace(inv, x_T=start))
    assert torch.equal(ours, _generated(system, prompt, negative, 11))  # (the same calls in the same batches)


# ------------------------------------------------------------------------------------------------- (d)
def test_and_with_weights_null_text_matches_the_a1111_combination(system):
    prompt = "a [red:blue:0.5] cube AND a ball:0.6"
    inv = invert_image(system, _image(5), prompt, num_steps=STEPS, inner_steps=3, guidance=GUIDANCE)
    red, blue, ball = (_text(system, t) for t in ("a red cube", "a blue cube", " a ball"))
    conds = [[(red, 1.0), (ball, 0.6)]] * 3 + [[(blue, 1.0), (ball, 0.6)]]
    uncond = _text(system, "")
    model, ac = system.denoiser(), system.alphas_cumprod

    def at_guidance_1(i, x, t):  # (generate --guidance 1 with AND: u + Σ (c_j − u)·w_j; one batch, as generate runs it)
        u, *cs = model(torch.cat([x] * 3), torch.cat([t] * 3), torch.cat([uncond, *(c for c, _ in conds[i])])).chunk(3)
        out = u.clone()
        for c_out, (_, w) in zip(cs, conds[i]):
            out = out + (c_out - u) * w
        return out

    with torch.no_grad():
        pivot = _naive_pivot(model, system.encode_images(_image(5)), at_guidance_1, ac, STEPS)
    torch.testing.assert_close(inv.x_T, pivot[-1], rtol=0, atol=1e-5)
    nulls, x = _naive_null_text(model, pivot, conds, uncond, ac, STEPS, guidance=GUIDANCE, inner=3)
    torch.testing.assert_close(inv.null_embeddings, nulls, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(sample_inversion(model, inv), x, rtol=0, atol=1e-4)


def test_and_is_refused_by_negative_prompt_inversion(system):
    with pytest.raises(ValueError, match=r"negative-prompt inversion.*AND.*null-text"):
        invert_image(system, _image(6), "a cube AND a ball", method="negative-prompt", num_steps=2)
    with pytest.raises(ValueError, match=r"init 'negative-prompt'.*AND"):
        invert_image(system, _image(6), "a cube AND a ball", init="negative-prompt", num_steps=2, inner_steps=1)


# ------------------------------------------------------------------------------------------ edits, files
def test_edit_plan_composes_with_source_steps(system):
    inv = invert_image(system, _image(7), "a [red:blue:0.5] cube", method="ddim", num_steps=STEPS, guidance=GUIDANCE)
    model = system.denoiser()
    seen = []

    def spy(x, t, cond):
        seen.append(cond[1:])  # (the batch of 2: null, then the step's condition)
        return model(x, t, cond)

    system_denoiser = system.denoiser
    system.denoiser = lambda: spy
    try:
        regenerate_image(system, inv, prompt="a [green|yellow] cube", source_steps=2)
    finally:
        system.denoiser = system_denoiser
    want = ["a red cube", "a red cube", "a yellow cube", "a green cube"]  # (source 0, 1; the edit's calls 2, 3)
    assert len(seen) == STEPS
    for got, text in zip(seen, want):
        assert torch.equal(got, _text(system, text)), text


def test_plan_survives_the_file_and_regenerates_bit_for_bit(system, tmp_path):
    inv = invert_image(system, _image(8), "a [red|blue] cube AND a ball:0.5", num_steps=STEPS, inner_steps=1,
                       guidance=GUIDANCE)
    from sdadapt.formats.files import read_safetensors

    path = save_inversion(tmp_path / "plan.safetensors", inv)
    assert read_safetensors(path)[1]["format"] == "sdadapt-inversion/4"
    back = load_inversion(path)
    assert isinstance(back.cond_plan, ConditionPlan) and back.cond_plan.steps == inv.cond_plan.steps
    assert torch.equal(regenerate_image(system, back), regenerate_image(system, inv))


# ------------------------------------------------------------------------------------------------- EDM
def test_an_edm_models_pivot_and_sampling_take_each_steps_condition():
    """An EDM model (Playground v2.5's Euler ODE): step ``i`` is inverted and sampled with ``conds[i]``."""
    from test_inversion import TinyDenoiser
    from test_playground_edm import CONFIG

    from sdadapt.inversion import invert_latents
    from sdadapt.inversion.core import EDMSteps
    from sdadapt.samplers.edm import EDMSchedule

    model, edm = TinyDenoiser(), EDMSchedule.from_config(CONFIG)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(1, 4, 8, 8, generator=g) * 0.5
    a, b, null = (torch.randn(1, 3, 8, generator=g) for _ in range(3))
    conds = [a, a, b]
    inv = invert_latents(model, x0, conds, null, edm=edm, num_steps=3, method="ddim", guidance=4.0)
    rule = EDMSteps(edm, 3)
    x = x0.float()
    with torch.no_grad():
        for i in (2, 1, 0):  # (the pivot: sampling step 2 inverted first)
            x = rule.invert_step(model, x, i, conds[i])
        assert torch.equal(inv.x_T, x)
        for i in range(3):
            out_u, out_c = model(x * rule._pre[i][2], rule._pre[i][3].expand(1), null), \
                model(x * rule._pre[i][2], rule._pre[i][3].expand(1), conds[i])
            x = rule.step(out_u + 4.0 * (out_c - out_u), x, i)
        torch.testing.assert_close(sample_inversion(model, inv), x, rtol=0, atol=1e-6)


def test_sdxl_negative_plan_keeps_its_pooled_entry_per_step_and_samples_as_generate(tmp_path):
    """SDXL: a negative plan changes the pooled ``text_embeds`` of the null branch per step too (kept per step in the
    file, /3's ``null_keys``); with ``AND`` the regeneration is generate's, bit for bit."""
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    from sdadapt.formats.files import read_safetensors

    xl = tiny_diffusers_system(tmp_path / "xl", max_token_length=75, sdxl=True)
    xl.image_size = SIZE
    prompt, negative = "a [red:blue:0.5] cube AND a ball:0.6", "[dark:blurry:0.5]"
    inv = invert_image(xl, _image(12), prompt, method="ddim", num_steps=STEPS, negative=negative, guidance=GUIDANCE)
    with torch.no_grad():
        pooled = [xl.prompt_condition(t)["text_embeds"] for t in ("dark", "dark", "dark", "blurry")]
    # (the negative schedule's texts are encoded as one batch, as A1111's: the pooled entries to a batched GEMM's rounding)
    torch.testing.assert_close(inv.null_extra["text_embeds"], torch.stack(pooled), rtol=0, atol=1e-6)
    start = torch.randn(1, *inv.x_T.shape[1:], generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        ours = sample_inversion(xl.denoiser(), dataclasses.replace(inv, x_T=start))
    assert torch.equal(ours, _generated(xl, prompt, negative, 13))
    path = save_inversion(tmp_path / "xl.safetensors", inv)
    assert json.loads(read_safetensors(path)[1]["null_keys"]) == ["text_embeds"]
    assert torch.equal(regenerate_image(xl, load_inversion(path)), regenerate_image(xl, inv))
