"""Perturbed-attention guidance (:mod:`sdadapt.perturbed_attention`): the identity-attention output against a float64
``to_out(to_v(h))`` written here and against diffusers' own PAG processor; the perturbed rows (a share of the batch,
under Hypertile's tiles too); the layers against diffusers' ``pag_applied_layers`` selection; ``generate`` against
``StableDiffusionPAGPipeline`` / ``StableDiffusionXLPAGPipeline`` (guidance scales 5 and 1, adaptive scale, with
guidance rescale); Forge's / ComfyUI's post-CFG function (transcribed) on A1111's grids; the prompt-plan path; and
``generate --pag-scale`` end to end: the infotext written and read back, AND and the refiner refused."""

from __future__ import annotations

import pytest
import tiny_sd_fixtures
import torch
from guidance_terms import (
    branch_inputs,
    check_plan_is_plain_guidance,
    diffusers_scheduler,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.perturbed_attention import (
    PerturbedAttentionGuidance,
    check_pag_scale,
    pag_layers,
)

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd

diffusers = pytest.importorskip("diffusers")


def _attention_block(seed: int = 0, dim: int = 16):
    """A diffusers transformer block (self- and cross-attention) inside a module named like a UNet's middle."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(seed)
    block = BasicTransformerBlock(dim, 2, dim // 2, cross_attention_dim=8).eval()
    holder = torch.nn.Module()
    holder.mid_block = torch.nn.Module()
    holder.mid_block.block = block
    return holder, block


def _reference_identity(attn, hidden: torch.Tensor) -> torch.Tensor:
    """``to_out(to_v(h))`` in float64, the Linear layers written out."""
    h = hidden.double()
    v = h @ attn.to_v.weight.double().T + (0 if attn.to_v.bias is None else attn.to_v.bias.double())
    out = attn.to_out[0]
    return v @ out.weight.double().T + out.bias.double()


def test_the_perturbed_layer_gives_to_out_of_to_v_and_nothing_else_changes():
    holder, block = _attention_block()
    attn = block.attn1
    keys = list(holder.state_dict())
    forward = type(attn).forward
    x = torch.randn(3, 10, 16)
    before = attn(x)
    with PerturbedAttentionGuidance(holder, scale=2.0) as pag:
        assert pag.names == ("mid_block.block.attn1",)
        assert torch.equal(attn(x), before)  # (idle outside perturbing)
        with pag.perturbing():
            got = attn(x)
        assert torch.allclose(got.double(), _reference_identity(attn, x), atol=1e-5)
        assert not torch.allclose(got, before, atol=1e-3)
        assert list(holder.state_dict()) == keys and type(attn).forward is forward
    assert torch.equal(attn(x), before)  # (removed)
    assert not attn._forward_hooks


def test_it_is_diffusers_pag_processor_on_the_perturbed_half():
    """diffusers' ``PAGIdentitySelfAttnProcessor2_0`` (no CFG: batch ``[c, c̃]``) against ours perturbing the last of
    two chunks."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

    holder, block = _attention_block(1)
    x = torch.randn(2, 12, 16)
    with PerturbedAttentionGuidance(holder) as pag, pag.perturbing(1, 2):
        ours = block.attn1(x)
    block.attn1.set_processor(PAGIdentitySelfAttnProcessor2_0())
    theirs = block.attn1(x)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), chunks=st.integers(1, 4), data=st.data())
def test_only_the_last_share_of_rows_is_perturbed(batch, chunks, data):
    first = data.draw(st.integers(0, chunks - 1))
    holder, block = _attention_block(2)
    attn = block.attn1
    x = torch.randn(batch * chunks, 6, 16)
    plain = attn(x)
    with PerturbedAttentionGuidance(holder) as pag, pag.perturbing(first, chunks):
        got = attn(x)
    cut = batch * first
    assert torch.equal(got[:cut], plain[:cut])
    assert torch.allclose(got[cut:].double(), _reference_identity(attn, x[cut:]), atol=1e-5)


def test_under_hypertiles_tiles_the_same_images_are_perturbed():
    """Hypertile splits the layer's batch into tiles (batch-major); the share still picks the perturbed images'
    tiles, and identity attention is token by token, so the output is the untiled one's."""
    from sdadapt.hypertile import Hypertile, HypertileSettings

    _, block = _attention_block(3)
    unet = torch.nn.Module()  # (A1111's depth-0 layer, where Hypertile's tiles are smallest)
    unet.down_blocks = torch.nn.ModuleList([torch.nn.Module()])
    unet.down_blocks[0].attentions = torch.nn.ModuleList([torch.nn.Module()])
    unet.down_blocks[0].attentions[0].transformer_blocks = torch.nn.ModuleList([block])
    x = torch.randn(4, 32 * 32, 16)  # (a 32x32 latent grid: a 256x256 image)
    with PerturbedAttentionGuidance(unet, layers=["down_blocks.0"]) as pag:
        with pag.perturbing(1, 2):
            untiled = block.attn1(x)
        with Hypertile(unet, None, sdxl=False) as tiles:
            tiles.configure(256, 256, unet=HypertileSettings(enabled=True, max_depth=0, max_tile_size=128,
                                                             swap_size=1))
            tiles.seed(0)
            with pag.perturbing(1, 2):
                tiled = block.attn1(x)
    assert torch.allclose(tiled[2:], untiled[2:], atol=1e-5)
    assert not torch.allclose(tiled[:2], untiled[:2], atol=1e-4)  # (the tiles did change the unperturbed rows)


def _diffusers_pag_names(unet, layers) -> set[str]:
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    class Holder(PAGMixin):
        pass

    holder = Holder()
    holder.unet = unet
    saved = dict(unet.attn_processors)
    try:
        holder.set_pag_applied_layers(layers)
        holder._set_pag_attn_processor(holder.pag_applied_layers, True)
        return {name.removesuffix(".processor") for name in holder.pag_attn_processors}
    finally:
        unet.set_attn_processor(saved)


@pytest.mark.parametrize("layers", ["mid", ["down_blocks.0"], ["mid", "up"], ["up_blocks.1.attentions.0"],
                                    ["transformer_blocks.0"], ["down_blocks.(0|1)"]])
def test_the_layers_are_diffusers_pag_applied_layers(system, layers):
    ours = set(pag_layers(system.unet, layers))
    assert ours == _diffusers_pag_names(system.unet, layers)
    assert ours and all(name.endswith("attn1") for name in ours)


def test_a_layer_that_names_nothing_or_is_no_pattern_is_refused(system):
    with pytest.raises(ValueError, match=r"PAG layer 'down_blocks.9' names no self-attention layer of "
                                         r"UNet2DConditionModel \(its self-attention layers: down_blocks"):
        PerturbedAttentionGuidance(system.unet, layers=["down_blocks.9"])
    with pytest.raises(ValueError, match="is no regular expression"):
        PerturbedAttentionGuidance(system.unet, layers=["down_blocks.("])
    assert not any(m._forward_hooks for m in system.unet.modules())


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_a_bad_scale_is_refused(scale):
    with pytest.raises(ValueError, match="PAG scale is a guidance strength"):
        check_pag_scale(scale)


def test_the_adaptive_scale_is_diffusers():
    holder, _ = _attention_block()
    pag = PerturbedAttentionGuidance(holder, scale=3.0, adaptive_scale=0.01)
    assert pag.scale_at(torch.tensor([999.0, 999.0])) == pytest.approx(3.0 - 0.01)
    assert pag.scale_at(500) == 0.0  # (3 − 0.01·500 < 0: clamped)
    assert PerturbedAttentionGuidance(holder, scale=3.0).scale_at(1) == 3.0


# ---- against diffusers' PAG pipelines ------------------------------------------------------------------------------
def _run_pipeline(pipe, unet, **call):
    saved = dict(unet.attn_processors)  # (the pipeline leaves its processors set on an error)
    try:
        return pipe(**call).images
    finally:
        unet.set_attn_processor(saved)


@pytest.mark.parametrize("sampler,guidance,extra", [
    ("ddim", 5.0, {}), ("dpmsolver++", 5.0, {}), ("ddim", 1.0, {}),
    ("dpmsolver++", 5.0, {"pag_adaptive_scale": 0.004}), ("ddim", 5.0, {"guidance_rescale": 0.7}),
    ("ddim", 5.0, {"pag_applied_layers": ["down_blocks.0", "up"]})])
def test_generate_is_diffusers_pag_pipeline(system, sampler, guidance, extra):
    """sdadapt's txt2img with PAG = StableDiffusionPAGPipeline's with the scheduler sdadapt mimics (the branches
    batched as diffusers batches them), at guidance 5 and 1 (no CFG: ``c + p·(c − c̃)``), with the adaptive scale,
    with guidance rescale (taken after PAG, as diffusers takes it), on other layers; PAG moves the latents far more
    than the two differ."""
    from sdadapt.sampling import generate

    run = {"seed": 5, "steps": 6, "guidance": guidance, "sampler": sampler, "negative": "blurry",
           "output": "latents", "guidance_rescale": extra.get("guidance_rescale", 0.0)}
    layers = extra.get("pag_applied_layers", "mid")
    with PerturbedAttentionGuidance(system.unet, scale=3.0, adaptive_scale=extra.get("pag_adaptive_scale", 0.0),
                                    layers=layers) as pag:
        ours = generate(system, ["a photo"], perturbed_attention=pag, **run)
    plain = generate(system, ["a photo"], **run)
    pipe = diffusers.StableDiffusionPAGPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=diffusers_scheduler(sampler, system.prediction_type), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    theirs = _run_pipeline(pipe, system.unet, prompt="a photo", num_inference_steps=6, guidance_scale=guidance,
                           pag_scale=3.0, negative_prompt="blurry", generator=torch.Generator().manual_seed(5),
                           output_type="latent", **{k: v for k, v in extra.items() if k != "pag_applied_layers"})
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-4, gap
    assert (ours - plain).abs().max().item() > 100 * max(gap, 1e-6)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.jobs.models import load_system

    return load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("pag_xl") / "xl.safetensors")), device="cpu")


def test_generate_is_diffusers_sdxl_pag_pipeline(tiny_sdxl):
    """SDXL's dict conditions batch as three branches too: = StableDiffusionXLPAGPipeline (its middle block's two
    transformer blocks perturbed)."""
    from sdadapt.sampling import generate

    xl = tiny_sdxl
    assert len(pag_layers(xl.unet, "mid")) == 2
    run = {"seed": 3, "steps": 5, "guidance": 4.0, "sampler": "ddim", "negative": "blurry", "output": "latents",
           "height": 32, "width": 32}
    with PerturbedAttentionGuidance(xl.unet, scale=2.5) as pag:
        ours = generate(xl, ["a red cube"], perturbed_attention=pag, **run)
    plain = generate(xl, ["a red cube"], **run)
    pipe = diffusers.StableDiffusionXLPAGPipeline(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, scheduler=diffusers_scheduler("ddim", xl.prediction_type),
        pag_applied_layers="mid")
    pipe.set_progress_bar_config(disable=True)
    theirs = _run_pipeline(pipe, xl.unet, prompt="a red cube", negative_prompt="blurry", num_inference_steps=5,
                           guidance_scale=4.0, pag_scale=2.5, height=32, width=32,
                           generator=torch.Generator().manual_seed(3), output_type="latent")
    gap = (ours - theirs).abs().max().item()
    assert gap < 1e-4, gap
    assert (ours - plain).abs().max().item() > 100 * max(gap, 1e-6)


# ---- A1111's grids: Forge's / ComfyUI's post-CFG function ----------------------------------------------------------
def _forge_post_cfg(denoised, cond_denoised, degraded, scale):
    """Forge's "PerturbedAttentionGuidance Integrated" ``post_cfg_function`` (ComfyUI's node's), transcribed."""
    if scale == 0:
        return denoised
    return denoised + (cond_denoised - degraded) * scale


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_on_a1111s_grids_it_is_forges_post_cfg_function_on_x0(system, rescale):
    """By branch (x̂0, A1111's grids): the CFG combination (rescaled first, ComfyUI's order: RescaleCFG is its CFG
    function), then Forge's post-CFG term from the perturbed branch — here taken by diffusers' own PAG processor."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

    from sdadapt.guidance_rescale import rescale_guidance
    from sdadapt.training.diffusion import guided

    model, cond, uncond, x, t = branch_inputs(system, seed=4, t=400)
    sigma = 1.3

    def read(out):
        return x * (sigma**2 + 1) ** 0.5 - sigma * out

    with PerturbedAttentionGuidance(system.unet, scale=2.0) as pag:
        ours = guided(model, cond, uncond, 6.0, guidance_rescale=rescale,
                      perturbed_attention=pag).denoised_by_branch(read, x, t, sigma=sigma)
    out_c, out_u = model(x, t, cond), model(x, t, uncond)
    saved = dict(system.unet.attn_processors)
    try:
        system.unet.set_attn_processor({name: PAGIdentitySelfAttnProcessor2_0() if name.startswith("mid_block") and
                                        "attn1" in name else proc for name, proc in saved.items()})
        degraded = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond])).chunk(2)[1]
    finally:
        system.unet.set_attn_processor(saved)
    denoised = read(out_u) + (read(out_c) - read(out_u)) * 6.0
    if rescale:
        denoised = rescale_guidance(denoised, read(out_c), rescale)
    theirs = _forge_post_cfg(denoised, read(out_c), read(degraded), 2.0)
    gap = (ours - theirs).abs().max().item()  # (x̂0 ~ 3: float32 rounding of 3 batches against 4 calls)
    assert gap < 1e-4, gap
    assert (ours - denoised).abs().max().item() > 100 * gap


def test_conditions_that_do_not_batch_run_the_perturbed_branch_on_its_own(system):
    """A negative of another length cannot batch with the prompt: the perturbed branch is its own call (Forge's
    way), the same guidance as the batched one."""
    from sdadapt.training.diffusion import guided

    model, cond, uncond, x, t = branch_inputs(system, seed=6, t=600)
    short = uncond[:, :-2]
    calls = []

    def counted(x_, t_, c_):
        calls.append(x_.shape[0])
        return model(x_, t_, c_)

    with PerturbedAttentionGuidance(system.unet, scale=3.0) as pag:
        batched = guided(counted, cond, uncond, 5.0, perturbed_attention=pag)(x, t)
        assert calls == [3]
        calls.clear()
        apart = guided(counted, cond, short, 5.0, perturbed_attention=pag)(x, t)
        assert calls == [1, 1, 1]
        reference = guided(model, cond, short, 5.0)(x, t)
        with pag.perturbing():
            perturbed = model(x, t, cond)
    assert torch.allclose(apart, reference + 3.0 * (model(x, t, cond) - perturbed), atol=1e-5)
    assert not torch.allclose(batched, apart, atol=1e-3)  # (another negative: another result)


def test_a_prompt_plans_guidance_is_the_plain_guidance_and_refuses_and(system):
    with PerturbedAttentionGuidance(system.unet, scale=2.0) as pag:
        check_plan_is_plain_guidance(system, perturbed_attention=pag)


# ---- generate --pag-scale --------------------------------------------------------------------------------------------
def _png_text(path) -> str:
    from PIL import Image

    return Image.open(path).text["parameters"]


def test_generate_writes_forges_fields_and_reads_them_back(tiny_sd, tmp_path, capsys):
    pytest.importorskip("PIL")
    from sdadapt.cli import main

    base = ["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--steps", "3", "--width", "32", "--height",
            "32", "--sampler", "Euler", "--schedule", "karras", "--seed", "2"]
    assert main([*base, "--pag-scale", "2.5", "--out", str(tmp_path / "a.png")]) == 0
    text = _png_text(tmp_path / "a.png")
    assert "PerturbedAttentionGuidance_enabled: True, PerturbedAttentionGuidance_scale: 2.5" in text
    assert "PAG adaptive" not in text and "PAG layers" not in text
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    assert _png_text(tmp_path / "b.png") == text
    import numpy as np
    from PIL import Image

    a, b, plain = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("a", "b", "plain"))
    assert np.array_equal(a, b) and not np.array_equal(a, plain)
    assert main([*base, "--pag-scale", "3", "--pag-adaptive-scale", "0.002", "--pag-layers", "mid", "up_blocks.1",
                 "--out", str(tmp_path / "c.png")]) == 0
    text = _png_text(tmp_path / "c.png")
    assert "PerturbedAttentionGuidance_scale: 3, PAG adaptive: 0.002, PAG layers: mid up_blocks.1" in text
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    options, not_taken = infotext_options(parse_infotext(text))
    assert (options["pag_scale"], options["pag_adaptive_scale"], options["pag_layers"]) == (3.0, 0.002,
                                                                                           ["mid", "up_blocks.1"])
    assert not [line for line in not_taken if "PAG" in line or "Perturbed" in line]
    sdnext, _ = infotext_options(parse_infotext("a cat\nSteps: 20, PAG scale: 1.5, PAG adaptive: 0.1"))
    assert (sdnext["pag_scale"], sdnext["pag_adaptive_scale"]) == (1.5, 0.1)


def test_generate_refuses_and_the_refiner_and_orphan_options_before_any_output(tiny_sd, tmp_path, capsys):
    from sdadapt.cli import main
    from sdadapt.jobs import run_generate

    run = {"model": str(tiny_sd), "steps": 2, "width": 32, "height": 32}
    with pytest.raises(ValueError, match="--pag-scale steers away .* 2 AND sub-prompts"):
        run_generate(out=tmp_path / "a.png", prompt="a cat AND a dog", pag_scale=3.0, **run)
    with pytest.raises(ValueError, match="runs only with --pag-scale F"):
        run_generate(out=tmp_path / "c.png", prompt="a cat", pag_adaptive_scale=0.1, **run)
    with pytest.raises(ValueError, match="names no self-attention layer"):
        run_generate(out=tmp_path / "d.png", prompt="a cat", pag_scale=3.0, pag_layers=["nowhere"], **run)
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # (a usage error: argparse's exit 2)
        main(["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--pag-layers", "mid",
              "--out", str(tmp_path / "e.png")])
    assert "--pag-layers only applies with --pag-scale F" in capsys.readouterr().err


def test_a_systems_sample_refuses_another_unets_pag_and_a_refiner(system, tiny_sdxl):
    with PerturbedAttentionGuidance(tiny_sdxl.unet) as other, pytest.raises(ValueError, match="on this model's unet"):
        system.sample(["a cat"], steps=2, perturbed_attention=other)
    with PerturbedAttentionGuidance(system.unet) as pag, pytest.raises(ValueError, match="leave PAG out with a refiner"):
        system.sample(["a cat"], steps=2, sampler="euler", perturbed_attention=pag, refiner=object())
    assert not any(m._forward_hooks for m in system.unet.modules())


def test_every_guided_call_of_a_hires_run_is_perturbed(tiny_sd, tmp_path, monkeypatch):
    """Both passes of a hires run on A1111's grid add the PAG term (x̂0, by branch), a scheduled prompt's too."""
    from sdadapt import perturbed_attention
    from sdadapt.jobs import run_generate

    seen, real = [], perturbed_attention.PerturbedAttentionGuidance.guide

    def spy(self, combined, cond, perturbed, t):
        seen.append(self.scale)
        return real(self, combined, cond, perturbed, t)

    monkeypatch.setattr(perturbed_attention.PerturbedAttentionGuidance, "guide", spy)
    run = {"model": str(tiny_sd), "negative": "blurry", "steps": 3, "seed": 2, "sampler": "Euler",
           "schedule": "karras", "width": 32, "height": 32, "guidance": 6.0, "hires_scale": 1.5,
           "hires_denoising": 0.6, "hires_steps": 2}
    run_generate(out=tmp_path / "a.png", prompt="a cat", pag_scale=2.0, **run)
    assert seen == [2.0] * (3 + 2)
    seen.clear()
    run_generate(out=tmp_path / "b.png", prompt="a [cat:dog:2]", pag_scale=2.0, **run)
    assert seen == [2.0] * (3 + 2)


def test_the_example_in_docs_samplers_md_runs():
    """The toy model has SD's module names: ``"mid"`` finds its middle block's self-attention, and the protocol
    path (``sample_latents`` on ``toy.denoiser()``) perturbs it."""
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "PerturbedAttentionGuidance(toy.unet")
    assert scope["perturbed"].shape == (1, 3, 32, 32) and torch.isfinite(scope["perturbed"]).all()
    assert not scope["toy"].unet.mid_block.attentions[0].transformer_blocks[0].attn1._forward_hooks


def test_without_a_negative_pass_it_is_the_prompt_pushed_from_its_perturbed_self(system):
    """Guidance 1 (and a call Skip Early CFG skips): diffusers' no-CFG PAG, ``c + p·(c − c̃)``, on the outputs and on
    x̂0."""
    from sdadapt.training.diffusion import guided
    from sdadapt.uncond_skip import UncondSkip

    model, cond, uncond, x, t = branch_inputs(system, seed=8, t=300)

    def read(out):
        return x * 1.5 - 0.8 * out

    with PerturbedAttentionGuidance(system.unet, scale=2.5) as pag:
        with pag.perturbing():
            c_tilde = model(x, t, cond)
        c = model(x, t, cond)
        by_hand = c + 2.5 * (c - c_tilde)
        assert torch.allclose(guided(model, cond, uncond, 1.0, perturbed_attention=pag)(x, t), by_hand, atol=1e-5)
        skipping = guided(model, cond, uncond, 6.0, perturbed_attention=pag, uncond_skip=UncondSkip(skip_early=1.0),
                          total_steps=4)
        assert torch.allclose(skipping(x, t), by_hand, atol=1e-5)
        on_x0 = guided(model, cond, uncond, 1.0, perturbed_attention=pag).denoised_by_branch(read, x, t, sigma=1.0)
        assert torch.allclose(on_x0, read(c) + 2.5 * (read(c) - read(c_tilde)), atol=1e-5)
