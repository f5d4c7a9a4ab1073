"""SD 2.1 unCLIP single files (Stability's sd21-unclip-h / -l, LDM keys): read, converted both ways, used.

Tiny random unCLIP models are written as LDM files the way Stability's ``ImageEmbeddingConditionedLatentDiffusion``
lays them out (``label_emb``, ``embedder.model.visual.*`` + the embedder's text leftovers, ``noise_augmentor.*``
buffers); diffusers' own ``convert_ldm_unet_checkpoint`` must agree with our key map, the vision tower must compute
what an OpenCLIP ``VisionTransformer`` (written out below in float64) computes, and the noise augmentation must be
LDM's ``CLIPEmbeddingNoiseAugmentation`` (transcribed below)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdadapt.formats.files import write_safetensors
from sdadapt.formats.model_keys import convert_checkpoint, diffusers_to_ldm, join_components, ldm_to_diffusers

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

D = 16  # the image-embedding width (the UNet's class input is 2D)


def _ldm_cosine_alphas_cumprod(steps: int = 1000) -> np.ndarray:
    """stablediffusion ldm/modules/diffusionmodules/util.py make_beta_schedule("squaredcos_cap_v2") -> betas_for_alpha_bar,
    then upscaling.py register_schedule's cumprod (float64 numpy)."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)])
    return np.cumprod(1.0 - betas)


def _augmentor_buffers() -> dict[str, torch.Tensor]:
    ac = _ldm_cosine_alphas_cumprod()
    prev = np.append(1.0, ac[:-1])
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"noise_augmentor.betas": t(1 - ac / prev), "noise_augmentor.alphas_cumprod": t(ac),
            "noise_augmentor.alphas_cumprod_prev": t(prev), "noise_augmentor.sqrt_alphas_cumprod": t(np.sqrt(ac)),
            "noise_augmentor.sqrt_one_minus_alphas_cumprod": t(np.sqrt(1 - ac)),
            "noise_augmentor.log_one_minus_alphas_cumprod": t(np.log(1 - ac)),
            "noise_augmentor.sqrt_recip_alphas_cumprod": t(np.sqrt(1 / ac)),
            "noise_augmentor.sqrt_recipm1_alphas_cumprod": t(np.sqrt(1 / ac - 1))}


def tiny_models(variant: str, seed: int = 0, *, heads: int = 1) -> dict:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=[1, 1], use_linear_projection=True, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * D, norm_num_groups=32).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=1, num_hidden_layers=2, vocab_size=49408,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  latent_channels=4, norm_num_groups=32).eval()
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads, image_size=28,
        patch_size=14, projection_dim=D, hidden_act="quick_gelu" if variant == "l" else "gelu")).eval()
    with torch.no_grad():  # (transformers' init makes every LayerNorm ones / zeros: a swap of two would not show)
        for parameter in vision.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return {"unet": unet, "text_encoder": text, "vae": vae, "image_encoder": vision}


def stability_file(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny unCLIP LDM state as Stability's files hold it."""
    models = tiny_models(variant, seed)
    state = diffusers_to_ldm(join_components({c: m.state_dict() for c, m in models.items()}), architecture="sd2")
    g = torch.Generator().manual_seed(seed + 7)
    text_width = 768 if variant == "l" else 1024  # (A1111 tells L from H by embedder.model.ln_final.weight's width)
    state.update({"embedder.model.ln_final.weight": torch.randn(text_width, generator=g),
                  "embedder.model.ln_final.bias": torch.randn(text_width, generator=g),
                  "embedder.model.token_embedding.weight": torch.randn(11, 8, generator=g),
                  "embedder.model.positional_embedding": torch.randn(5, 8, generator=g),
                  "embedder.model.text_projection": torch.randn(8, D, generator=g),
                  "embedder.model.logit_scale": torch.tensor(4.6)})
    if variant == "l":  # (ClipImageEmbedder keeps OpenAI CLIP's whole text transformer)
        state["embedder.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(24, 8, generator=g)
    state.update(_augmentor_buffers())
    return state


@pytest.fixture(scope="module", params=["h", "l"])
def unclip_file(request, tmp_path_factory):
    variant = request.param
    state = stability_file(variant)
    path = tmp_path_factory.mktemp(f"unclip-{variant}") / f"sd21-unclip-{variant}.safetensors"
    write_safetensors(path, state, {})
    return variant, state, path


# ------------------------------------------------------------------------------- the key map
def test_unet_class_embedding_matches_diffusers_converter():
    """diffusers' convert_ldm_unet_checkpoint (class_embed_type "projection": label_emb -> class_embedding) and ours agree
    on every UNet tensor, and both give back the original UNet."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    models = tiny_models("h")
    state = stability_file("h")
    theirs = convert_ldm_unet_checkpoint(dict(state), dict(models["unet"].config))
    ours = {k[len("unet."):]: v for k, v in ldm_to_diffusers(state).items() if k.startswith("unet.")}
    assert set(ours) == set(theirs) == set(models["unet"].state_dict())
    assert "class_embedding.linear_1.weight" in ours and not any(k.startswith("add_embedding") for k in ours)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
        assert torch.equal(value, models["unet"].state_dict()[key]), key


def test_round_trips_and_drops(unclip_file):
    variant, state, _ = unclip_file
    converted, report = convert_checkpoint(state, to="diffusers")
    assert report.ok
    kept = {k for k in state if k not in report.dropped}
    dropped = set(report.dropped)
    assert {k for k in state if k.startswith("noise_augmentor.")} <= dropped
    assert {k for k in state if k.startswith("embedder.model.") and not k.startswith("embedder.model.visual.")} <= dropped
    assert not any(k.startswith("embedder.model.visual.") for k in dropped)
    back = diffusers_to_ldm(converted, architecture="sd2")
    assert set(back) == kept
    for key in kept:
        assert torch.equal(back[key], state[key]), key
    # and the other way: the diffusers state -> LDM -> diffusers exactly
    again = ldm_to_diffusers(back)
    assert set(again) == set(converted) and all(torch.equal(again[k], converted[k]) for k in converted)


def _openclip_visual(state: dict[str, torch.Tensor], images: torch.Tensor, *, heads: int, quick_gelu: bool) -> torch.Tensor:
    """OpenCLIP's VisionTransformer.forward (open_clip transformer.py; OpenAI CLIP's VisionTransformer is the same)
    over LDM ``embedder.model.visual.*`` keys, float64."""
    p = {k[len("embedder.model.visual."):]: v.double() for k, v in state.items() if k.startswith("embedder.model.visual.")}
    x = F.conv2d(images.double(), p["conv1.weight"], stride=p["conv1.weight"].shape[-1])  # (B, W, g, g)
    b, w = x.shape[:2]
    x = x.reshape(b, w, -1).permute(0, 2, 1)  # (B, g², W)
    x = torch.cat([p["class_embedding"].expand(b, 1, w), x], dim=1) + p["positional_embedding"]
    x = F.layer_norm(x, (w,), p["ln_pre.weight"], p["ln_pre.bias"], eps=1e-5)
    layers = len({k.split(".")[2] for k in p if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        q = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (w,), p[q + "ln_1.weight"], p[q + "ln_1.bias"], eps=1e-5)
        qkv = h @ p[q + "attn.in_proj_weight"].T + p[q + "attn.in_proj_bias"]
        qs, ks, vs = (t.reshape(b, -1, heads, w // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        att = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(w // heads), dim=-1) @ vs
        att = att.transpose(1, 2).reshape(b, -1, w)
        x = x + att @ p[q + "attn.out_proj.weight"].T + p[q + "attn.out_proj.bias"]
        h = F.layer_norm(x, (w,), p[q + "ln_2.weight"], p[q + "ln_2.bias"], eps=1e-5)
        h = h @ p[q + "mlp.c_fc.weight"].T + p[q + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else F.gelu(h)
        x = x + h @ p[q + "mlp.c_proj.weight"].T + p[q + "mlp.c_proj.bias"]
    pooled = F.layer_norm(x[:, 0], (w,), p["ln_post.weight"], p["ln_post.bias"], eps=1e-5)
    return pooled @ p["proj"]


@pytest.mark.parametrize("variant", ["h", "l"])
def test_vision_tower_computes_the_ldm_embedders_output(variant):
    """The converted CLIPVisionModelWithProjection (config read from the shapes) gives the OpenCLIP tower's embedding."""
    from sdadapt.formats.single_file import split_single_file
    from sdadapt.formats.unclip import image_encoder_config

    models = tiny_models(variant, seed=3, heads=2)
    state = diffusers_to_ldm(join_components({c: m.state_dict() for c, m in models.items()}), architecture="sd2")
    part = split_single_file(state).components["image_encoder"]
    config = image_encoder_config(part, variant=variant)
    config["num_attention_heads"] = 2  # (a tiny width: the head rule is for the real towers)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config)).double().eval()
    model.load_state_dict(part, strict=True)
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    want = _openclip_visual(state, images, heads=2, quick_gelu=variant == "l")
    with torch.no_grad():
        got = model(pixel_values=images.double()).image_embeds
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_ldm_pixels_match_kornia_resize():
    """ldm_clip_pixels = kornia.geometry.resize(bicubic, align_corners=True, antialias=True) then CLIP normalisation;
    diffusers' SVD pipeline carries a transcription of that kornia resize (_resize_with_antialiasing)."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    from sdadapt.formats.unclip import ldm_clip_pixels

    images = torch.rand(2, 3, 96, 72, generator=torch.Generator().manual_seed(0)) * 2 - 1
    resized = _resize_with_antialiasing(images, (40, 40))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(ldm_clip_pixels(images, size=40), ((resized + 1) / 2 - mean) / std, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------- loading and using
@pytest.fixture(scope="module")
def loaded(unclip_file):
    from sdadapt.jobs.models import load_system

    variant, state, path = unclip_file
    return variant, state, path, load_system(str(path))


def test_load_system_reads_the_unclip_file(loaded):
    variant, state, path, system = loaded
    assert system.unet.config.class_embed_type == "projection"
    assert system.unet.config.projection_class_embeddings_input_dim == 2 * D
    assert system.prediction_type == "v_prediction"  # (the LDM configs' parameterization "v")
    assert system.model_index["_class_name"] == "StableUnCLIPImg2ImgPipeline"
    parts = system.unclip
    assert parts.variant == variant and parts.dim == D
    assert torch.equal(parts.noise_alphas_cumprod, state["noise_augmentor.alphas_cumprod"])
    if variant == "h":  # identity, as LDM's CLIPEmbeddingNoiseAugmentation without clip_stats_path
        assert torch.equal(parts.normalizer[0], torch.zeros(1, D)) and torch.equal(parts.normalizer[1], torch.ones(1, D))
    else:
        assert parts.normalizer is None
    expect = tiny_models(variant)["image_encoder"].state_dict()
    got = parts.image_encoder.state_dict()
    assert all(torch.equal(got[k], expect[k]) for k in expect)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    from sdadapt.formats.unclip import ldm_clip_pixels

    with torch.no_grad():
        want = tiny_models(variant)["image_encoder"](pixel_values=ldm_clip_pixels(images, size=28)).image_embeds
    torch.testing.assert_close(parts.encode_image(images), want, rtol=0, atol=1e-6)


def _ldm_noise_augmentor(state, embeds, level, noise, mean, std):
    """stablediffusion modules.py:341 CLIPEmbeddingNoiseAugmentation.forward: scale, q_sample with the file's sqrt
    buffers, unscale, then Timestep(dim) (openaimodel timestep_embedding: [cos ‖ sin])."""
    x = (embeds.double() - mean) / std
    t = torch.full((embeds.shape[0],), level)
    z = state["noise_augmentor.sqrt_alphas_cumprod"].double()[t, None] * x + \
        state["noise_augmentor.sqrt_one_minus_alphas_cumprod"].double()[t, None] * noise.double()
    z = z * std + mean
    half = embeds.shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None].double() * freqs[None]
    return torch.cat([z, torch.cos(args), torch.sin(args)], dim=1)


def test_noise_levels_follow_the_ldm_normaliser(loaded, tmp_path):
    from sdadapt.inversion import image_conditioning
    from sdadapt.unclip import unclip_image_input, unclip_parts_from_file
    from sdadapt.formats.single_file import read_single_file

    variant, state, path, system = loaded
    embeds = torch.randn(3, D, generator=torch.Generator().manual_seed(4))
    if variant == "h":
        cond = image_conditioning(system, noise_level=300)  # (H: identity stats, levels above 0 are fine)
        assert cond.normalizer is not None
        mean, std = torch.zeros(1, D, dtype=torch.float64), torch.ones(1, D, dtype=torch.float64)
        parts = system.unclip
    else:
        with pytest.raises(ValueError, match="--clip-stats"):
            image_conditioning(system, noise_level=300)
        image_conditioning(system, noise_level=0)  # (level 0: accepted, as today)
        g = torch.Generator().manual_seed(5)
        mean, std = torch.randn(D, generator=g).double(), (torch.rand(D, generator=g) + 0.5).double()
        stats = tmp_path / "ViT-L-14_stats.th"
        torch.save((mean.float(), std.float()), stats)  # (karlo's file: torch.save((mean, std)))
        parts = unclip_parts_from_file(read_single_file(path).unclip, None, clip_stats=stats)
        torch.testing.assert_close(parts.normalizer[0][0].double(), mean)
        mean, std = mean.float().double()[None], std.float().double()[None]
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    got = unclip_image_input(parts, embeds, noise_level=300, generator=g1)
    noise = torch.randn(embeds.shape, generator=g2)
    want = _ldm_noise_augmentor(state, embeds, 300, noise, mean, std)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_clip_stats_refused_with_a_clear_message(unclip_file, tmp_path):
    from sdadapt.errors import WeightFileError
    from sdadapt.unclip import unclip_parts_from_file
    from sdadapt.formats.single_file import read_single_file

    variant, _, path = unclip_file
    wrong = tmp_path / "wide.th"
    torch.save((torch.zeros(768), torch.ones(768)), wrong)
    if variant == "h":  # (H takes no stats at all: tests/test_unclip_gaps.py)
        with pytest.raises(ValueError, match="unCLIP-H model, whose noise augmentor takes no CLIP stats"):
            unclip_parts_from_file(read_single_file(path).unclip, None, clip_stats=wrong)
        return
    with pytest.raises(WeightFileError, match="768"):
        unclip_parts_from_file(read_single_file(path).unclip, None, clip_stats=wrong)


def spy_class_labels(unet) -> list:
    """Record the ``class_labels`` (B, 2·D) of every call of ``unet`` (an instance ``forward`` that calls the real
    one; ``del unet.forward`` restores it): the list it fills (the unCLIP tests share it: import it from here)."""
    seen = []
    original = unet.forward

    def spy(x, t, encoder_hidden_states, class_labels=None, **kw):
        seen.append(class_labels.detach().clone())
        return original(x, t, encoder_hidden_states, class_labels=class_labels, **kw)

    unet.forward = spy
    return seen


def test_generation_conditions_like_a1111(loaded):
    """A1111's CFGDenoiser for crossattn-adm models: the conditional branch gets c_adm (img2img: the init image's
    augmented embedding; txt2img: zeros), the unconditional one zeros."""
    _, _, _, system = loaded
    seen = spy_class_labels(system.unet)
    try:
        system.sample(["a"], steps=2, guidance=3.0, height=32, width=32)
        assert seen and all(torch.equal(c, torch.zeros_like(c)) for c in seen)
        seen.clear()
        image = torch.randn(1, 2 * D, generator=torch.Generator().manual_seed(3))
        system.unclip_image = image
        system.sample(["a", "b"], steps=2, guidance=3.0, height=32, width=32)
        for labels in seen:  # (uncond first, then cond: training.diffusion.guided)
            uncond, cond = labels.chunk(2)
            assert torch.equal(uncond, torch.zeros_like(uncond))
            assert torch.equal(cond, image.expand(2, -1))
    finally:
        system.unclip_image = None
        del system.unet.forward


# ------------------------------------------------------------------------------- writing
def test_folder_loads_in_diffusers_and_back_to_ldm(loaded, tmp_path):
    variant, state, path, system = loaded
    folder = tmp_path / "unclip-folder"
    if variant == "l":
        with pytest.raises(ValueError, match="--clip-stats"):
            system.save_model(folder)
        assert not folder.exists()
        return
    system.save_model(folder)
    pipe = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(folder, local_files_only=True)
    torch.testing.assert_close(pipe.image_noising_scheduler.alphas_cumprod, state["noise_augmentor.alphas_cumprod"],
                               rtol=0, atol=1e-6)
    assert torch.equal(pipe.image_normalizer.mean.detach(), torch.zeros(1, D))
    assert torch.equal(pipe.image_normalizer.std.detach(), torch.ones(1, D))
    expect = tiny_models("h")["image_encoder"].state_dict()
    assert all(torch.equal(pipe.image_encoder.state_dict()[k], expect[k]) for k in expect)
    # the folder back to one LDM file: every mapped tensor as in the original file, the schedule buffers recomputed
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.formats.files import read_weights

    again = DiffusersSystem.from_folder(folder)
    assert again.unclip is not None and again.unclip.has_encoder
    out = tmp_path / "back.safetensors"
    again.save_model(out)
    written, _ = read_weights(out)
    for key, value in state.items():
        if key.startswith("noise_augmentor."):
            torch.testing.assert_close(written[key], value, rtol=1e-5, atol=1e-6)
        elif key.startswith("embedder.model.") and not key.startswith("embedder.model.visual."):
            continue  # (the text tower's leftovers are not kept; ln_final comes back as A1111's marker)
        elif key.startswith("cond_stage_model.model.transformer.resblocks.") or key.endswith("text_projection"):
            continue
        else:
            assert torch.equal(written[key], value), key
    assert written["embedder.model.ln_final.weight"].shape == (D,)


def test_convert_l_needs_clip_stats(tmp_path):
    """convert --to diffusers of an unCLIP-L file: refused without --clip-stats (diffusers' clip_stats_path), and with it
    the folder's image_normalizer holds karlo's (mean, std); an unCLIP-H file needs none."""
    from sdadapt.jobs.convert_model import convert_model

    path = tmp_path / "l.safetensors"
    write_safetensors(path, stability_file("l"), {})
    with pytest.raises(ValueError, match="--clip-stats"):
        convert_model(path, tmp_path / "no-stats", to="diffusers")
    g = torch.Generator().manual_seed(11)
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    torch.save((mean, std), tmp_path / "ViT-L-14_stats.th")
    convert_model(path, tmp_path / "folder", to="diffusers", clip_stats=tmp_path / "ViT-L-14_stats.th")
    normalizer = diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer.StableUnCLIPImageNormalizer
    loaded = normalizer.from_pretrained(tmp_path / "folder" / "image_normalizer")
    assert torch.equal(loaded.mean.detach(), mean[None]) and torch.equal(loaded.std.detach(), std[None])
    vision = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "folder" / "image_encoder")
    assert vision.config.hidden_act == "quick_gelu"  # (OpenAI CLIP's ViT-L/14)


def test_inspect_names_the_unclip_file_and_its_variant(unclip_file):
    from sdadapt.formats import describe_file

    variant, _, path = unclip_file
    summary = describe_file(path)
    assert summary["model"].startswith("Stable Diffusion 2.1 unCLIP, " + variant.upper()), summary["model"]
    assert ("--clip-stats" in summary["model"]) == (variant == "l")  # (only L needs karlo's stats)
    plain = {k: v for k, v in stability_file(variant).items() if not k.startswith("model.diffusion_model.label_emb")}
    other = path.with_name("plain.safetensors")
    write_safetensors(other, plain, {})
    assert "unCLIP" not in describe_file(other).get("model", "")  # (the label_emb is what says unCLIP)
