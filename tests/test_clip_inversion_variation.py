"""CLIP inversion on a lambdalabs image-variation diffusers folder (``sd-image-variations-diffusers``:
unet/ vae/ scheduler/ image_encoder/ feature_extractor/, no text encoder), loaded by
``sdadapt.inversion.load_image_variation``, through the library and ``clip-invert`` /
``generate --image-vectors``.

Reference: huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
``src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_image_variation.py``:
* ``_encode_image`` (144-167): ``image_encoder(feature_extractor(images).pixel_values).image_embeds``
  ``.unsqueeze(1)`` (152) — the (B, 1, D) ``encoder_hidden_states``; with CFG the unconditional
  embedding is ``torch.zeros_like(image_embeddings)`` (160), batched as ``cat([uncond, cond])`` (165).
* ``__call__`` (266): ``guidance_scale = 7.5``; 394-403: ``unet(cat([latents] * 2), t,
  encoder_hidden_states=image_embeddings)``, ``uncond + guidance_scale · (cond − uncond)``.
The pipeline has no prompt and no negative prompt: sdadapt refuses them for this model.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny_clip_vision import save_clip_image_encoder, save_clip_image_processor

from sdadapt.cli import main
from sdadapt.images import decode_png, load_image_folder, to_uint8, write_png
from sdadapt.inversion import (
    ImageVariationSystem,
    ImageVectors,
    clip_invert,
    generate_with_vectors,
    image_conditioning,
    load_image_variation,
    load_image_vectors,
    sample_image_vectors,
    save_image_vectors,
)
from sdadapt.inversion import clip as clip_module
from sdadapt.inversion.variation import is_image_variation_folder

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

D = 16  # the CLIP image-embedding width (projection_dim) = the UNet's cross_attention_dim


def _variation_folder(root, *, cross_attention_dim: int = D):
    """A tiny random image-variation folder (16-px images) as StableDiffusionImageVariationPipeline.save_pretrained
    lays it out; the scheduler is lambdalabs' PNDM (scaled_linear 0.00085..0.012)."""
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    ).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    ).save_pretrained(root / "vae")
    diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            skip_prk_steps=True).save_pretrained(root / "scheduler")
    save_clip_image_encoder(root, projection_dim=D)
    save_clip_image_processor(root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImageVariationPipeline"}))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _variation_folder(tmp_path_factory.mktemp("variation") / "sd-image-variations")


@pytest.fixture(scope="module")
def system(folder):
    return load_image_variation(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three 16x16 images (the model's and the processor's size: no resize, so pixels are exact)."""
    root = tmp_path_factory.mktemp("concept")
    rng = np.random.default_rng(4)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def _error(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_loader_reads_the_folder_as_the_pipeline(folder, system, tmp_path):
    """The schedule is the folder's scheduler's; image size = sample_size · VAE factor; the site is cross-attention;
    decoding is the pipeline's ``vae.decode(latents / scaling_factor)`` (421), encoding the posterior mean ×
    scaling_factor (as every sdadapt system: the training scripts' ``latent_dist.sample()`` without its noise)."""
    assert isinstance(system, ImageVariationSystem) and system.image_size == 16 and system.prediction_type == "epsilon"
    reference = diffusers.PNDMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod
    # (sdadapt's schedule is computed in float64, diffusers' in float32: the last bits differ)
    torch.testing.assert_close(system.alphas_cumprod, reference.float(), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in system.parameters())
    conditioning = image_conditioning(system)
    assert conditioning.site == "cross-attention" and conditioning.dim == D and conditioning.text is None
    assert conditioning.encode_image is not None and conditioning.max_vectors is None
    vae, factor = system.vae, system.vae.config.scaling_factor
    assert factor == 0.18215
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want_image = (vae.decode(latents / factor, return_dict=False)[0]).clamp(-1, 1)
        want_latents = vae.encode(pixels).latent_dist.mean * factor
    assert torch.equal(system.decode_latents(latents), want_image)
    assert torch.equal(system.encode_images(pixels), want_latents)
    # an unCLIP folder (text_encoder/ beside image_encoder/) is not an image-variation folder
    for part in ("unet", "image_encoder", "text_encoder"):
        (tmp_path / "unclip" / part).mkdir(parents=True)
    assert not is_image_variation_folder(tmp_path / "unclip") and is_image_variation_folder(folder)


def test_start_is_the_mean_of_the_pipelines_encode_image(folder, system, images):
    """init="auto" = mean over the images of StableDiffusionImageVariationPipeline._encode_image (encoder in
    float64, on the PIL images; [:, 0] drops its unsqueeze(1)), for every one of K vectors."""
    pictures, _ = load_image_folder(images, size=16, default_caption="")
    learnt = clip_invert(system, pictures, num_vectors=2, steps=1, learning_rate=1e-30, batch_size=1)
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").double().eval()
    fake = SimpleNamespace(image_encoder=encoder,
                           feature_extractor=transformers.CLIPImageProcessor.from_pretrained(folder / "feature_extractor"))
    pil = [Image.open(images / f"img{i}.png").convert("RGB") for i in range(3)]
    with torch.no_grad():
        embeds = diffusers.StableDiffusionImageVariationPipeline._encode_image(
            fake, pil, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)  # (3, 1, D)
    assert embeds.shape == (3, 1, D)
    want = embeds[:, 0].mean(0, keepdim=True).expand(2, D)
    assert learnt.info["init"] == "images" and learnt.site == "cross-attention" and learnt.vectors.shape == (2, D)
    torch.testing.assert_close(learnt.vectors.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_guided_prediction_is_the_pipelines_unet_call(system, monkeypatch, k):
    """sample_image_vectors' condition is vectors as (B, K, D) encoder_hidden_states, its unconditional zeros
    of that shape (zeros_like, 160); the guided prediction = the pipeline's batched UNet call and CFG (394-403)."""
    seen = {}

    def record(model, x_T, cond, **kwargs):
        seen.update(model=model, cond=cond, **kwargs)
        return x_T

    monkeypatch.setattr(clip_module.diffusion, "ddim_sample", record)
    conditioning = image_conditioning(system)
    vectors = torch.randn(k, D, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    sample_image_vectors(conditioning, vectors, x, alphas_cumprod=system.alphas_cumprod, guidance=7.5, steps=1)
    guided = seen["model"]  # (sample_latents guides first: the sampler gets the guided model)
    assert isinstance(guided, clip_module.diffusion.Guided) and guided.scale == 7.5
    assert guided.cond is seen["cond"] and guided.cond["context"] is None and guided.uncond["context"] is None
    assert torch.equal(guided.cond["image"], vectors[None].expand(2, k, D))
    assert torch.equal(guided.uncond["image"], torch.zeros(2, k, D))
    t = torch.tensor([500, 500])
    got = guided(x, t, None)
    # the pipeline: image_embeddings = cat([zeros_like(e), e]) with e = embeds.unsqueeze(1) (152, 160, 165)
    e = vectors[None].expand(2, k, D)
    image_embeddings = torch.cat([torch.zeros_like(e), e])
    with torch.no_grad():
        noise_pred = system.unet(torch.cat([x] * 2), 500, encoder_hidden_states=image_embeddings).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    want = noise_pred_uncond + 7.5 * (noise_pred_text - noise_pred_uncond)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # one conditional denoiser call = unet(x, t, encoder_hidden_states=vectors)
    with torch.no_grad():
        torch.testing.assert_close(guided.model(x, t, guided.cond),
                                   system.unet(x, t, encoder_hidden_states=e).sample, atol=0, rtol=0)


def test_commands_write_what_the_library_returns(folder, system, images, tmp_path, capsys):
    """clip-invert (K=2, no prompt) = clip_invert; generate --image-vectors without --prompt = generate_with_vectors
    at guidance 7.5 (the pipeline's default), PNG-rounded."""
    out = tmp_path / "concept.safetensors"
    assert main(["clip-invert", "--model", str(folder), "--images", str(images), "--vectors", "2", "--steps", "2",
                 "--batch-size", "2", "--seed", "5", "--lr", "0.1", "-q", "-o", str(out)]) == 0
    pictures, _ = load_image_folder(images, size=system.image_size, default_caption="")
    want = clip_invert(system, pictures, num_vectors=2, steps=2, batch_size=2, seed=5, learning_rate=0.1)
    got = load_image_vectors(out)
    assert got.site == "cross-attention" and got.info["init"] == "images" and got.info["captions"] == "empty"
    assert torch.equal(got.vectors, want.vectors) and got.vectors.shape == (2, D)
    # (K copies of the mean start get identical gradients and stay identical: docs/clip-inversion.md)
    torch.testing.assert_close(got.vectors[0], got.vectors[1], atol=1e-6, rtol=0)
    png = tmp_path / "v.png"
    assert main(["generate", "--model", str(folder), "--image-vectors", str(out), "--seed", "3", "--steps", "2", "-q",
                 "-o", str(png)]) == 0
    written = decode_png(png.read_bytes())
    image = generate_with_vectors(system, got, count=1, seed=3, steps=2, guidance=7.5)[0]
    assert image.shape == (3, 16, 16) and (written == to_uint8(image)).all()
    other = generate_with_vectors(system, got, count=1, seed=3, steps=2, guidance=1.5)[0]
    assert not torch.equal(other, image)  # (the guidance mattered)


def test_refusals(folder, system, images, tmp_path, capsys):
    base = ["clip-invert", "--model", str(folder), "--images", str(images), "-o", str(tmp_path / "a.safetensors")]
    for extra, name in ((["--prompt", "a cat"], "--prompt"), (["--captions"], "--captions")):
        code, err = _error([*base, *extra], capsys)
        assert code == 2 and f"{name}: an image-variation model" in err and "takes no text" in err
    code, err = _error([*base, "--noise-level", "5"], capsys)
    assert code == 2 and "no noise augmentation" in err
    assert not (tmp_path / "a.safetensors").exists()
    vectors = tmp_path / "v.safetensors"
    save_image_vectors(vectors, ImageVectors(vectors=torch.zeros(1, D), site="cross-attention"))
    for extra, name in ((["--prompt", "a cat"], "--prompt 'a cat'"), (["--negative", "blur"], "--negative 'blur'")):
        code, err = _error(["generate", "--model", str(folder), "--image-vectors", str(vectors), *extra, "-o",
                            str(tmp_path / "g.png")], capsys)
        assert code == 2 and f"{name}: an image-variation model" in err
    with pytest.raises(ValueError, match="takes no text"):
        generate_with_vectors(system, torch.zeros(1, D), prompt="a cat", count=1, steps=1)
    with pytest.raises(ValueError, match="negative prompt"):
        sample_image_vectors(image_conditioning(system), torch.zeros(1, D), torch.zeros(1, 4, 2, 2),
                             alphas_cumprod=system.alphas_cumprod, negative="blur", steps=1)
    unclip_file = tmp_path / "u.safetensors"  # vectors of another site
    save_image_vectors(unclip_file, ImageVectors(vectors=torch.zeros(1, D), site="class-labels"))
    code, err = _error(["generate", "--model", str(folder), "--image-vectors", str(unclip_file), "-o",
                        str(tmp_path / "g.png")], capsys)
    assert code == 2 and "learnt for the class-labels site" in err and "cross-attention" in err
    assert not (tmp_path / "g.png").exists()
    # --prompt stays required without --image-vectors
    code, err = _error(["generate", "-o", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "--prompt is required" in err
    # an incomplete folder, and a UNet that does not read the encoder's embedding width
    broken = tmp_path / "broken"
    for part in ("unet", "vae", "image_encoder", "feature_extractor", "scheduler"):
        (broken / part).mkdir(parents=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImageVariationPipeline"}))
    code, err = _error(["clip-invert", "--model", str(broken), "--images", str(images), "-o",
                        str(tmp_path / "b.safetensors")], capsys)
    assert code == 3 and "incomplete image-variation folder" in err and "unet/config.json" in err
    wrong = _variation_folder(tmp_path / "wrong", cross_attention_dim=24)
    with pytest.raises(ValueError, match="24-wide cross-attention tokens but image_encoder/ makes 16-wide"):
        load_image_variation(wrong)
