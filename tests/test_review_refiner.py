"""Review of the SDXL refiner (commits e8f1f0c, ed8d8f2): what the refiner's own tests left open.

- Emphasis on the refiner: A1111's "Original" emphasis (modules/sd_hijack_clip.py, ``process_tokens``:
  ``original_mean = z.mean(); z = z * multipliers; z = z * (original_mean / z.mean())``), written here in float64
  on the refiner's one encoder's states.
- A long prompt (kohya's ``--max_token_length 150``) on the refiner pools the first 75-token window, as the SDXL
  base does in sdadapt (``DiffusersSystem.condition``: ``pooled[::n]``) and kohya's SDXL strategy does
  (strategy_sdxl.py ``encode_tokens``: the pool of the first chunk): the same as the prompt cut to 75 tokens.
- The base -> refiner handoff decodes with the refiner's VAE: diffusers' ensemble of experts decodes in the
  second (refiner) pipeline (pipeline_stable_diffusion_xl_img2img.py ``self.vae.decode``).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from test_sdxl_refiner_reference import _open_clip_g, _system, _unet  # noqa: E402


@pytest.fixture(scope="module")
def refiner():
    return _system(None)


def test_refiner_emphasis_is_a1111s_mean_restored_weighting(refiner):
    prompt = "a (red:1.5) cube on a [blue] table"
    got = refiner._prompt_condition([prompt], None)
    weighted = refiner.tokenize_weighted([prompt])
    ids, weights = weighted["ids"], weighted["weights"]  # (1, L) each: the refiner's one tokenizer
    assert ids.ndim == 2 and bool((weights != 1).any())
    with torch.no_grad():
        plain = refiner.condition({"ids": ids})
    z = plain["context"].double()  # (1, L, 1280-wide states of the tiny encoder)
    want = z * weights.double()[..., None]
    want = want * (z.mean() / want.mean())
    torch.testing.assert_close(got["context"].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["text_embeds"], plain["text_embeds"])  # (the pooled output is not weighted)
    assert got["time_ids"].shape == (1, 5)


def test_refiner_long_prompt_pools_its_first_window_as_the_prompt_cut_to_75_tokens(refiner):
    words = " ".join(["red", "blue", "green", "cube", "ball"] * 24)  # 120 tokens: two 75-token windows, unequal
    refiner.max_token_length = 150
    try:
        with torch.no_grad():
            long = refiner.condition(refiner.tokenize([words, "a red cube"]))
    finally:
        refiner.max_token_length = 75
    with torch.no_grad():
        cut = refiner.condition(refiner.tokenize([words, "a red cube"]))
    torch.testing.assert_close(long["text_embeds"], cut["text_embeds"])
    torch.testing.assert_close(long["context"][:, :76], cut["context"][:, :76])  # (BOS + the first 75 tokens' states)
    assert long["context"].shape[1] == 152 and cut["context"].shape[1] == 77


def test_refiner_condition_without_time_ids_is_diffusers_add_time_ids_at_the_native_size(refiner):
    """``condition`` without ``time_ids`` (the API's and validation's path): diffusers' img2img
    ``_get_add_time_ids(original_size, (0, 0), target_size, aesthetic_score, ...)`` with
    ``requires_aesthetics_score``: ``original_size + crops_coords_top_left + (aesthetic_score,)``."""
    refiner.aesthetic_score = 7.25
    try:
        with torch.no_grad():
            cond = refiner.condition(refiner.tokenize(["a red cube", "a ball"]))
    finally:
        refiner.aesthetic_score = 6.0
    size = float(refiner.image_size)
    assert cond["time_ids"].tolist() == [[size, size, 0.0, 0.0, 7.25]] * 2


@pytest.fixture(scope="module")
def pair_with_own_vae(tmp_path_factory):
    """(tiny SDXL base, tiny refiner whose VAE is the base's with other decoder weights: one latent space)."""
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import SD_SCHEDULE, DiffusersSystem
    from sdadapt.jobs.models import load_system

    base = load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("review_handoff") / "xl.safetensors")), device="cpu")
    vae = copy.deepcopy(base.vae)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=g) * 0.05)
    tokenizer = CLIPTokenizer.load(None, max_length=77, pad="!").to_transformers()
    tokenizer.add_special_tokens({"pad_token": "!"})
    refiner = DiffusersSystem(_unet(3), vae, None, None, dict(SD_SCHEDULE),
                              text_encoder_2=_open_clip_g(vocab=49408, positions=77), tokenizer_2=tokenizer)
    return base, refiner.requires_grad_(False).eval()


def test_handoff_images_are_the_refiners_vae_decoding_its_latents(pair_with_own_vae):
    from sdadapt.jobs.generate_refiner import sample_base_then_refiner

    base, refiner = pair_with_own_vae
    options = dict(switch_at=0.5, seed=3, steps=2, guidance=5.0, sampler="ddim", height=64, width=64)
    with torch.no_grad():
        latents = sample_base_then_refiner(base, refiner, ["a photo"], output="latents", **options)
        images = sample_base_then_refiner(base, refiner, ["a photo"], **options)
        by_refiner, by_base = refiner.decode_latents(latents), base.decode_latents(latents)
    assert not torch.allclose(by_refiner, by_base, atol=1e-3)  # (the two VAEs decode differently)
    torch.testing.assert_close(images, by_refiner)


def test_elemental_rules_on_refiners_are_refused_by_name(tmp_path):
    """supermerger's elemental merge names SD1/SDXL blocks; the refiner has neither layout (refused as block
    weights and beta are, commit e8f1f0c's engine check)."""
    from test_sdxl_refiner_reference import _parts_and_ldm

    from sdadapt.errors import InputError
    from sdadapt.formats.files import write_safetensors
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep

    _, a = _parts_and_ldm()
    write_safetensors(tmp_path / "a.safetensors", dict(a), {})
    write_safetensors(tmp_path / "b.safetensors", dict(a), {})
    step = MergeStep("weighted-sum", (str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")),
                     alpha=0.5, elemental="IN04:attn2:0.5")
    with pytest.raises(InputError, match="SDXL refiner has no block-weight layout"):
        merge_file(step, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_refiner_on_another_training_schedule_is_refused(pair_with_own_vae):
    """The one sampler grid both models run on is the base's: a refiner trained on another schedule (here diffusers'
    scaled_linear with beta_end 0.02) cannot take over at the same timesteps; refused naming the schedule."""
    from sdadapt.diffusers_system import SD_SCHEDULE, DiffusersSystem
    from sdadapt.jobs.generate_refiner import check_refiner_pair

    base, refiner = pair_with_own_vae
    other = DiffusersSystem(refiner.unet, refiner.vae, None, None, {**SD_SCHEDULE, "beta_end": 0.02},
                            text_encoder_2=refiner.text_encoder_2, tokenizer_2=refiner.tokenizer_2)
    check_refiner_pair(base, refiner)
    with pytest.raises(ValueError, match="training schedule"):
        check_refiner_pair(base, other)
