"""Self-attention guidance (:mod:`sdadapt.self_attention_guidance`): the blur and the attention mask against diffusers'
SAG pipeline's own (its ``gaussian_blur_2d`` and ``CrossAttnStoreProcessor``) and a float64 reference written here;
the token grid against ComfyUI's ``create_blur_map`` loop (transcribed); ``generate`` against
``StableDiffusionSAGPipeline`` (ε and v, DDIM and DPM-Solver++, guidance 5 and 1); ComfyUI's / Forge's post-CFG
function (transcribed) on A1111's σ grids (ε and v); the refusals; the prompt-plan path; and ``generate --sag-scale``
end to end: Forge's infotext fields written and read back."""

from __future__ import annotations

import math

import pytest
import tiny_sd_fixtures
import torch
from guidance_terms import check_plan_is_plain_guidance, diffusers_scheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.self_attention_guidance import (
    SelfAttentionGuidance,
    attention_token_mask,
    blur_by_attention,
    check_sag_run,
    gaussian_blur_2d,
)

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd

diffusers = pytest.importorskip("diffusers")
sag_module = pytest.importorskip("diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag")


@settings(max_examples=20, deadline=None)
@given(sigma=st.floats(0.3, 4.0), size=st.integers(5, 12), seed=st.integers(0, 2**16))
def test_the_blur_is_diffusers_and_keeps_a_constant(sigma, size, seed):
    image = torch.randn(2, 3, size, size + 1, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(gaussian_blur_2d(image, 9, sigma), sag_module.gaussian_blur_2d(image, 9, sigma))
    flat = torch.full((1, 2, size, size), 0.7)
    assert torch.allclose(gaussian_blur_2d(flat, 9, sigma), flat, atol=1e-6)


def _block(seed: int = 0, dim: int = 16, heads: int = 2):
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(seed)
    return BasicTransformerBlock(dim, heads, dim // heads, cross_attention_dim=8).eval()


def test_the_mask_is_diffusers_attention_map_summed():
    """diffusers' pipeline stores ``get_attention_scores`` and thresholds ``mean over heads, sum over queries`` at 1;
    the float32 path (a layer without ``get_attention_scores``) against a float64 softmax written out."""
    block = _block(1)
    attn = block.attn1
    hidden = torch.randn(2, 9, 16) * 3
    store = sag_module.CrossAttnStoreProcessor()
    saved = attn.processor
    attn.set_processor(store)
    try:
        attn(hidden)
    finally:
        attn.set_processor(saved)
    theirs = store.attention_probs.reshape(2, 2, 9, 9).mean(1).sum(1) > 1.0
    ours = attention_token_mask(attn, hidden)
    assert torch.equal(ours, theirs) and ours.any() and not ours.all()

    class Plain(torch.nn.Module):  # (the toy's / LDM's: to_q, to_k, heads and nothing else)
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.heads = attn.to_q, attn.to_k, 2

    q = (hidden.double() @ attn.to_q.weight.double().T).reshape(2, 9, 2, 8).transpose(1, 2)
    k = (hidden.double() @ attn.to_k.weight.double().T).reshape(2, 9, 2, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    received = probs.mean(1).sum(1)
    reference = received > 1.0
    clear = (received - 1.0).abs() > 1e-4  # (not at the threshold, where float32 may round either way)
    assert torch.equal(attention_token_mask(Plain(), hidden)[clear], reference[clear])


def _comfyui_grid(total: int, lh: int, lw: int) -> tuple[int, int]:
    """ComfyUI's ``create_blur_map`` grid search, transcribed."""
    x = round(math.sqrt((lh / lw) * total))
    xx = None
    for i in range(math.floor(math.sqrt(total) / 2)):
        for j in [(x + i), max(1, x - i)]:
            if total % j == 0:
                xx = j
                break
        if xx is not None:
            break
    return xx, total // xx


def _forge_grid(total: int, lh: int, lw: int) -> tuple[int, int]:
    """Forge's SAG grid (extensions-builtin/sd_forge_sag/scripts/forge_sag.py:66-69), transcribed."""
    ratio = 2 ** (math.ceil(math.sqrt(lh * lw / total)) - 1).bit_length()
    return math.ceil(lh / ratio), math.ceil(lw / ratio)


@settings(max_examples=60, deadline=None)
@given(height=st.integers(5, 300), width=st.integers(5, 300), halvings=st.integers(0, 3))
def test_the_token_grid_is_the_halved_latent_as_forge_and_diffusers_take_it(height, width, halvings):
    """The middle block's grid is the latent halved by stride-2 convolutions rounding up (diffusers' ``map_size``),
    Forge's formula; ComfyUI's aspect-ratio guess agrees wherever it finds that grid."""
    from sdadapt.self_attention_guidance import _token_grid

    rows, cols = -(-height // 2 ** halvings), -(-width // 2 ** halvings)
    assert _token_grid(rows * cols, height, width) == (rows, cols) == _forge_grid(rows * cols, height, width)
    f = 2 ** halvings
    if height % f == 0 and width % f == 0:  # (whole cells: the first token's cell is the top-left f x f)
        x0 = torch.randn(1, 2, height, width)
        mask = torch.zeros(1, rows * cols, dtype=torch.bool)
        mask[0, 0] = True
        out = blur_by_attention(x0, mask, sigma=2.0)
        assert torch.equal(out[..., f:, :], x0[..., f:, :]) and torch.equal(out[..., :, f:], x0[..., :, f:])
        assert torch.equal(out[..., :f, :f], gaussian_blur_2d(x0, 9, 2.0)[..., :f, :f])


def test_comfyuis_guess_misses_some_sizes_no_multiple_of_64_and_the_grid_does_not():
    """Every SD 1 size from 256 to 2048 in steps of 8 (3 halvings of the latent): ComfyUI's guess is another
    grid at some (264 x 512: rows and columns swapped in shape), sdadapt's is the halved latent at all."""
    from sdadapt.self_attention_guidance import _token_grid

    missed = 0
    for height in range(256, 2049, 8):
        for width in range(256, 2049, 8):
            lh, lw = height // 8, width // 8
            grid = (-(-lh // 8), -(-lw // 8))
            assert _token_grid(grid[0] * grid[1], lh, lw) == grid
            missed += _comfyui_grid(grid[0] * grid[1], lh, lw) != grid
    assert missed > 50


# ---- against diffusers' SAG pipeline -------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def any_system(request, tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    from sdadapt.jobs.models import load_system

    folder = _tiny_pipeline(tmp_path_factory.mktemp(f"sag_{request.param}"), prediction_type=request.param)
    return load_system(str(folder), device=torch.device("cpu"))


@pytest.mark.parametrize("sampler,guidance", [("ddim", 5.0), ("dpmsolver++", 5.0), ("ddim", 1.0)])
def test_generate_is_diffusers_sag_pipeline(any_system, sampler, guidance):
    """sdadapt's txt2img with SAG (diffusers' blur σ 1) = StableDiffusionSAGPipeline's, with the scheduler sdadapt
    mimics, at guidance 5 (the negative's map) and 1 (the prompt's); SAG moves the latents far more than they
    differ."""
    from sdadapt.sampling import generate

    system_ = any_system
    run = {"seed": 5, "steps": 6, "guidance": guidance, "sampler": sampler, "negative": "blurry", "output": "latents"}
    with SelfAttentionGuidance(system_.unet, scale=0.75, blur_sigma=1.0, alphas_cumprod=system_.alphas_cumprod,
                               prediction_type=system_.prediction_type) as sag:
        ours = generate(system_, ["a photo"], self_attention_guidance=sag, **run)
    plain = generate(system_, ["a photo"], **run)
    pipe = sag_module.StableDiffusionSAGPipeline(
        vae=system_.vae, text_encoder=system_.text_encoder, tokenizer=system_.tokenizer, unet=system_.unet,
        scheduler=diffusers_scheduler(sampler, system_.prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    saved = dict(system_.unet.attn_processors)
    try:
        theirs = pipe("a photo", num_inference_steps=6, guidance_scale=guidance, sag_scale=0.75,
                      negative_prompt="blurry", generator=torch.Generator().manual_seed(5), output_type="latent").images
    finally:
        system_.unet.set_attn_processor(saved)
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-4, gap
    assert (ours - plain).abs().max().item() > 100 * max(gap, 1e-6)


# ---- A1111's σ grids: ComfyUI's / Forge's post-CFG function --------------------------------------------------------
def _comfyui_post_cfg(model_x0, x_k, sigma, uncond, cfg_result, uncond_pred, uncond_attn, scale, blur_sigma):
    """ComfyUI's SelfAttentionGuidance ``post_cfg_function`` (what Forge runs), transcribed: ``x_k`` k-diffusion's
    input, ``model_x0(x_k, cond)`` the model's x̂0 there."""
    _, hw1, hw2 = uncond_attn.shape
    b, _, lh, lw = uncond_pred.shape
    attn = uncond_attn.reshape(b, -1, hw1, hw2)
    mask = attn.mean(1, keepdim=False).sum(1, keepdim=False) > 1.0
    x, y = _comfyui_grid(mask.shape[-1], lh, lw)
    mask = torch.nn.functional.interpolate(mask.reshape(b, x, y).unsqueeze(1).type(attn.dtype), (lh, lw))
    blurred = sag_module.gaussian_blur_2d(uncond_pred, kernel_size=9, sigma=blur_sigma)
    degraded = blurred * mask + uncond_pred * (1 - mask)
    degraded_noised = degraded + x_k - uncond_pred
    sag = model_x0(degraded_noised, uncond)
    return cfg_result + (degraded - sag) * scale


def test_on_a1111s_sigma_grids_it_is_comfyuis_post_cfg_function(any_system):
    """By branch (x̂0, A1111's σ grids): the CFG combination, then ComfyUI's SAG term — its attention map taken by
    diffusers' own store processor, the degraded call's x̂0 read at its own input (ε: x − σε; v: the VP reading)."""
    from sdadapt.training.diffusion import guided

    system_ = any_system
    model = system_.denoiser()
    cond = system_.condition(system_.tokenize(["a photo"]))
    uncond = system_.condition(system_.tokenize(["blurry"]))
    g = torch.Generator().manual_seed(4)
    sigma = 1.7
    root = math.sqrt(sigma**2 + 1)
    x_k = torch.randn(1, 4, 8, 8, generator=g) * root
    x_in = x_k / root
    t = torch.tensor([420.0])
    v = system_.prediction_type == "v_prediction"

    def x0_at(x_kk, out):  # (k-diffusion's CompVisDenoiser / CompVisVDenoiser)
        return x_kk / (sigma**2 + 1) - sigma / root * out if v else x_kk - sigma * out

    def read(out):
        return x0_at(x_k, out)

    with SelfAttentionGuidance(system_.unet, scale=0.5, blur_sigma=2.0, alphas_cumprod=system_.alphas_cumprod,
                               prediction_type=system_.prediction_type) as sag:
        ours = guided(model, cond, uncond, 6.0, self_attention_guidance=sag).denoised_by_branch(read, x_in, t,
                                                                                                sigma=sigma)
    store = sag_module.CrossAttnStoreProcessor()
    layer = system_.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    saved = layer.processor
    layer.set_processor(store)
    try:
        out_u, out_c = model(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        uncond_attn = store.attention_probs.chunk(2)[0]
    finally:
        layer.set_processor(saved)
    cfg = read(out_u) + (read(out_c) - read(out_u)) * 6.0
    theirs = _comfyui_post_cfg(lambda xx, c: x0_at(xx, model(xx / root, t, c)), x_k, sigma, uncond, cfg, read(out_u),
                               uncond_attn, 0.5, 2.0)
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-4, gap
    assert (ours - cfg).abs().max().item() > 100 * gap


def test_where_it_has_no_x0_to_degrade_it_is_refused(system, tmp_path):
    for sampler, schedule in (("plms", None), ("ddim", "automatic"), ("ddim_cfgpp", None), ("unipc_a1111", None),
                              ("lcm", None)):
        with pytest.raises(ValueError, match="combines ε on timesteps: take a σ sampler"):
            check_sag_run(sampler, schedule=schedule)
    with pytest.raises(ValueError, match="an EDM model"):
        check_sag_run("euler", schedule=None, edm=True)
    check_sag_run("ddim", schedule=None)  # (diffusers' DDIM: its pipeline's)
    check_sag_run("dpmpp_2m", schedule="karras")
    with pytest.raises(ValueError, match="has no such layer"):
        SelfAttentionGuidance(torch.nn.Linear(2, 2), alphas_cumprod=system.alphas_cumprod)
    with pytest.raises(ValueError, match="blur sigma"):
        SelfAttentionGuidance(system.unet, blur_sigma=0.0, alphas_cumprod=system.alphas_cumprod)
    from sdadapt.samplers import sample_latents

    with SelfAttentionGuidance(system.unet, alphas_cumprod=system.alphas_cumprod) as sag, \
            pytest.raises(ValueError, match="plms here combines ε"):
        sample_latents(lambda x, t, c: x, torch.zeros(1, 4, 8, 8), None, sampler="plms",
                       alphas_cumprod=system.alphas_cumprod, num_steps=2, self_attention_guidance=sag)
    assert not any(m._forward_hooks for m in system.unet.modules())


def test_a_prompt_plans_guidance_is_the_plain_guidance_and_refuses_and(system):
    with SelfAttentionGuidance(system.unet, scale=0.8, alphas_cumprod=system.alphas_cumprod) as sag:
        check_plan_is_plain_guidance(system, self_attention_guidance=sag)


# ---- generate --sag-scale ------------------------------------------------------------------------------------------
def test_generate_writes_forges_fields_and_reads_them_back(tiny_sd, tmp_path):
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    base = ["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--steps", "3", "--width", "32", "--height",
            "32", "--sampler", "Euler", "--schedule", "karras", "--seed", "2"]
    assert main([*base, "--sag-scale", "0.5", "--pag-scale", "2", "--out", str(tmp_path / "a.png")]) == 0
    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert ("sag_enabled: True, sag_scale: 0.5, sag_blur_sigma: 2, PerturbedAttentionGuidance_enabled: True, "
            "PerturbedAttentionGuidance_scale: 2") in text
    options, not_taken = infotext_options(parse_infotext(text))
    assert (options["sag_scale"], options["sag_blur_sigma"]) == (0.5, 2.0)
    assert not [line for line in not_taken if "sag" in line]
    assert main([*base, "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    assert main([*base, "--pag-scale", "2", "--out", str(tmp_path / "pag.png")]) == 0
    a, b, pag = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("a", "b", "pag"))
    assert np.array_equal(a, b) and not np.array_equal(a, pag)


def test_generate_refuses_before_any_output(tiny_sd, tmp_path):
    from sdadapt.cli import main
    from sdadapt.jobs import run_generate

    run = {"model": str(tiny_sd), "steps": 2, "width": 32, "height": 32}
    with pytest.raises(ValueError, match="--sag-scale degrades .* 2 AND sub-prompts"):
        run_generate(out=tmp_path / "a.png", prompt="a cat AND a dog", sag_scale=0.5, **run)
    with pytest.raises(ValueError, match="--sag-scale: self-attention guidance degrades .* plms here"):
        run_generate(out=tmp_path / "b.png", prompt="a cat", sag_scale=0.5, sampler="PLMS", **run)
    with pytest.raises(ValueError, match="--hypertile-unet cuts into tiles"):
        run_generate(out=tmp_path / "c.png", prompt="a cat", sag_scale=0.5, hypertile_unet=True, **run)
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # (a usage error: argparse's exit 2)
        main(["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--sag-blur-sigma", "1",
              "--out", str(tmp_path / "e.png")])


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "SelfAttentionGuidance(toy.unet")
    assert scope["guided_by_sag"].shape == (1, 3, 32, 32) and torch.isfinite(scope["guided_by_sag"]).all()
    plain = scope["generate"](scope["toy"], ["a red circle"], sampler="dpmpp_2m", schedule="karras", steps=8, seed=3)
    assert (scope["guided_by_sag"] - plain).abs().max() > 1e-3  # (the toy's middle block read and degraded)


def test_the_alpha_bar_of_a_call_is_the_tables_or_that_of_its_sigma(system):
    """Integer timesteps read the table (diffusers' pipeline); the fractional ones diffusers' Euler / Heun grids
    give the model read ᾱ = 1/(1 + σ²) of the σ they came from."""
    from sdadapt.samplers.sigma_space import sigma_to_t, training_sigmas

    table = system.alphas_cumprod
    sag = SelfAttentionGuidance(system.unet, alphas_cumprod=table)
    try:
        steps = torch.tensor([0, 17, 999])
        assert torch.equal(sag.alpha_bar_at(steps), table[steps])
        sigmas = torch.tensor([0.05, 0.9, 3.3, 12.0])
        t = sigma_to_t(sigmas, training_sigmas(table).float())
        assert not bool((t == t.round()).all())
        assert torch.allclose(sag.alpha_bar_at(t), 1 / (1 + sigmas**2), rtol=1e-4)
    finally:
        sag.remove()


def test_sdxls_dict_conditions_take_it_and_scale_0_is_no_sag(tmp_path_factory):
    """SDXL (dict conditions, two text encoders, ``time_ids``): the degraded call runs under the negative's dict; at
    scale 0 the run is the one without SAG, at 0.5 another."""
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    xl = load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("sag_xl") / "xl.safetensors")), device="cpu")
    run = {"seed": 3, "steps": 4, "guidance": 4.0, "negative": "blurry", "output": "latents", "height": 48,
           "width": 48}
    for sampler, schedule in (("ddim", None), ("euler", "karras")):
        plain = generate(xl, ["a red cube"], sampler=sampler, schedule=schedule, **run)
        for scale in (0.0, 0.5):
            with SelfAttentionGuidance(xl.unet, scale=scale, alphas_cumprod=xl.alphas_cumprod,
                                       prediction_type=xl.prediction_type) as sag:
                got = generate(xl, ["a red cube"], sampler=sampler, schedule=schedule, self_attention_guidance=sag,
                               **run)
            gap = (got - plain).abs().max().item()
            assert gap < 1e-5 if scale == 0 else gap > 1e-3, (sampler, scale, gap)
