"""The SDXL refiner (Stability's ``sd_xl_refiner_1.0``; diffusers' ``stable-diffusion-xl-refiner-1.0``): read, convert,
merge and condition on it as the references do. Tiny models with the refiner's layout (4 blocks, attention in
down 1-2 / up 1-2, one transformer depth everywhere, an add-embedding of pooled + 5 size embeddings; OpenCLIP-G
alone); no downloads.

- D huggingface/diffusers 0.42.1 (the installed package, imported):
  src/diffusers/loaders/single_file_utils.py — ``CHECKPOINT_KEY_NAMES["xl_refiner"]`` (:66) and
  ``["open_clip_sdxl_refiner"]`` (:83), ``infer_diffusers_model_type`` "xl_refiner" (:625),
  ``convert_ldm_unet_checkpoint`` (:1216), ``convert_open_clip_checkpoint`` (:1632) with
  ``prefix="conditioner.embedders.0.model."`` (:1776-1778);
  src/diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py — ``encode_prompt`` with
  ``text_encoder=None`` and ``_get_add_time_ids`` with ``requires_aesthetics_score=True``.
- S Stability-AI/generative-models configs/inference/sd_xl_refiner.yaml: model_channels 384, channel_mult
  [1, 2, 4, 4], attention_resolutions [4, 2], transformer_depth 4, context_dim 1280, adm_in_channels 2560,
  num_head_channels 64; conditioner embedder 0 = FrozenOpenCLIPEmbedder2 (layer penultimate, pooled) and the
  size/crop/aesthetic-score embedders (256 wide each).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from sdadapt.formats.model_keys import (
    checkpoint_architecture,
    diffusers_to_ldm,
    is_sdxl_refiner,
    ldm_to_diffusers,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

PREFIX = "conditioner.embedders.0.model."


def _unet(seed: int = 0, *, pooled: int = 8):
    """The refiner's UNet layout, tiny: 4 blocks, attention in down 1-2 / up 1-2, depth 2 everywhere (mid too)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, attention_head_dim=(1, 2, 2, 2), cross_attention_dim=pooled,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=5 * 4 + pooled, norm_num_groups=4,
    ).eval()


def _vae(seed: int = 1):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        scaling_factor=0.13025,
    ).eval()


def _open_clip_g(seed: int = 2, *, vocab: int = 99, positions: int = 7):
    """OpenCLIP-G's layout, tiny: 10 layers (D tells the refiner by resblocks.9), projection as wide as the states
    (bigG: 1280 -> 1280; D splits the fused qkv by the projection's width)."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=10, vocab_size=vocab,
        max_position_embeddings=positions, hidden_act="gelu", projection_dim=8, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1,
    )
    return transformers.CLIPTextModelWithProjection(config).eval()


@functools.cache
def _parts_and_ldm() -> tuple[dict, dict]:
    """``({component: diffusers file-spelled state}, sdadapt's LDM state)`` of the tiny refiner."""
    parts = {"unet": _unet().state_dict(), "vae": _vae().state_dict(),
             "text_encoder_2": {k: v for k, v in _open_clip_g().state_dict().items() if not k.endswith("position_ids")}}
    flat = {f"{c}.{k}": v for c, part in parts.items() for k, v in part.items()}
    return parts, diffusers_to_ldm(flat)


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) - set(want))[:6], sorted(set(want) - set(got))[:6])
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


# ------------------------------------------------------------------------------------------------ read and convert


def test_the_refiner_is_detected_as_diffusers_detects_it():
    _, ldm = _parts_and_ldm()
    assert any(k.startswith(PREFIX + "transformer.resblocks.") for k in ldm)
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in ldm)
    assert single_file_utils.infer_diffusers_model_type(ldm) == "xl_refiner"  # D:625
    assert single_file_utils.is_open_clip_sdxl_refiner_model(ldm)  # D:578 (text_projection under embedders.0.model)
    assert checkpoint_architecture({k: v.shape for k, v in ldm.items()}) == "sdxl"
    assert is_sdxl_refiner(ldm)
    parts, _ = _parts_and_ldm()
    assert is_sdxl_refiner({f"{c}.{k}" for c, p in parts.items() for k in p})
    base = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "conditioner.embedders.1.model.ln_final.weight"}
    assert not is_sdxl_refiner(base) and not is_sdxl_refiner({"text_encoder.x", "text_encoder_2.y"})


def test_ldm_refiner_reads_as_diffusers_own_converters_read_it():
    """D convert_ldm_unet_checkpoint / convert_open_clip_checkpoint(prefix="conditioner.embedders.0.model.") /
    convert_ldm_vae_checkpoint, called on the LDM state, give sdadapt's diffusers keys and values."""
    parts, ldm = _parts_and_ldm()
    ours = ldm_to_diffusers(ldm)
    unet = single_file_utils.convert_ldm_unet_checkpoint(ldm, _unet().config)
    te2 = single_file_utils.convert_open_clip_checkpoint(_open_clip_g(), ldm, prefix=PREFIX)  # D:1776-1778
    vae = single_file_utils.convert_ldm_vae_checkpoint(ldm, _vae().config)
    theirs = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"vae.{k}": v for k, v in vae.items()},
              **{f"text_encoder_2.{k}": v for k, v in te2.items()}}
    _assert_same(ours, theirs)
    _assert_same(ours, {f"{c}.{k}": v for c, p in parts.items() for k, v in p.items()})


def test_ldm_to_diffusers_to_ldm_is_the_same_bytes_per_key():
    _, ldm = _parts_and_ldm()
    with_scale = {**ldm, PREFIX + "logit_scale": torch.tensor(4.6052)}  # (Stability's file has it; no diffusers twin)
    back = diffusers_to_ldm(ldm_to_diffusers(with_scale, strict=False))
    _assert_same(back, ldm)
    # SGM's names: OpenCLIP's own under embedder 0 (the base keeps CLIP-L there and OpenCLIP-G under embedder 1)
    assert {PREFIX + k for k in ("positional_embedding", "token_embedding.weight", "ln_final.weight", "text_projection",
                                 "transformer.resblocks.0.attn.in_proj_weight")} <= set(ldm)
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm and "model.diffusion_model.input_blocks.11.0.in_layers.0.weight" in ldm


#: the hub's stable-diffusion-xl-refiner-1.0 unet/config.json entries the shapes decide (= S's yaml)
HUB_REFINER_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [384, 768, 1536, 1536],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 1280, "attention_head_dim": [6, 12, 24, 24], "use_linear_projection": True,
    "transformer_layers_per_block": 4, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,
}


def test_unet_config_from_real_size_refiner_shapes_is_the_public_one():
    from sdadapt.formats.single_file import unet_config

    config = {k: v for k, v in HUB_REFINER_UNET.items() if k != "sample_size"}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    got = unet_config(unet.state_dict(), architecture="sdxl", pooled_dim=1280, refiner=True)
    assert {k: got.get(k) for k in HUB_REFINER_UNET} == HUB_REFINER_UNET
    with torch.device("meta"):  # the mid block's depth is the last block's in diffusers: built from the config, same shapes
        again = diffusers.UNet2DConditionModel(**got)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}


def test_unet_config_gives_the_mid_block_its_own_depth_when_the_last_block_has_no_attention():
    """diffusers' mid block takes ``transformer_layers_per_block[-1]``: with a last block without attention (the
    refiner's layout) that entry must be the mid block's depth, not 1."""
    from sdadapt.formats.single_file import unet_config

    layout = {k: v for k, v in _unet().config.items() if not k.startswith("_")}
    layout.update(transformer_layers_per_block=(1, 2, 3, 3))
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**layout)
    got = unet_config(unet.state_dict(), architecture="sdxl", pooled_dim=8, refiner=True)
    assert got["transformer_layers_per_block"] == [1, 2, 3, 3]
    got.update(norm_num_groups=4, attention_head_dim=(1, 2, 2, 2))
    with torch.device("meta"):
        again = diffusers.UNet2DConditionModel(**got)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in unet.state_dict().items()}


def _system(folder):
    """A tiny refiner DiffusersSystem with sdadapt's shipped CLIP vocabulary as tokenizer_2 (pad "!")."""
    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import SD_SCHEDULE, DiffusersSystem

    tokenizer = CLIPTokenizer.load(None, max_length=77, pad="!").to_transformers()
    tokenizer.add_special_tokens({"pad_token": "!"})
    te2 = _open_clip_g(vocab=49408, positions=77)
    system = DiffusersSystem(_unet(), _vae(), None, None, dict(SD_SCHEDULE), text_encoder_2=te2, tokenizer_2=tokenizer)
    return system.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def refiner_files(tmp_path_factory):
    """(a tiny refiner LDM file as sdadapt writes it, the diffusers folder `convert` makes of it)."""
    from sdadapt.jobs.convert_model import convert_model

    root = tmp_path_factory.mktemp("refiner")
    file = _system(root).save_model(root / "refiner.safetensors")
    folder = root / "refiner"
    result = convert_model(file, folder, to="diffusers")
    assert result.max_delta == 0.0 and result.base_model == "sdxl"
    return file, folder


def test_convert_file_to_folder_and_back_is_exact_and_diffusers_loads_the_folder(refiner_files, tmp_path):
    from sdadapt.formats.files import read_weights
    from sdadapt.jobs.convert_model import convert_model

    file, folder = refiner_files
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert not (folder / "text_encoder").exists() and (folder / "tokenizer_2" / "vocab.json").is_file()
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.config.requires_aesthetics_score is True and pipe.config.force_zeros_for_empty_prompt is False
    ldm, metadata = read_weights(file)
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner"
    _assert_same(ldm_to_diffusers(ldm), {f"{c}.{k}": v for c in ("unet", "vae", "text_encoder_2")
                                         for k, v in getattr(pipe, c).state_dict().items() if not k.endswith("position_ids")})
    back = tmp_path / "back.safetensors"
    result = convert_model(folder, back, to="ldm")
    assert result.max_delta == 0.0
    _assert_same(read_weights(back)[0], ldm)


def test_a_stability_refiner_file_without_sdadapt_configs_loads(tmp_path):
    """Stability's file has no ``sdadapt.configs``: the configs come from the shapes (refiner: 5 size embeddings)."""
    from sdadapt.formats.single_file import read_single_file, unet_config

    parts, ldm = _parts_and_ldm()
    from sdadapt.formats.files import write_safetensors

    path = write_safetensors(tmp_path / "plain.safetensors", dict(ldm), {})
    checkpoint = read_single_file(path)
    assert checkpoint.refiner and checkpoint.architecture == "sdxl" and checkpoint.configs == {}
    assert sorted(checkpoint.components) == ["text_encoder_2", "unet", "vae"]
    config = unet_config(checkpoint.components["unet"], architecture="sdxl", pooled_dim=8, refiner=True)
    assert config["addition_time_embed_dim"] == 4 and config["projection_class_embeddings_input_dim"] == 28
    assert config["transformer_layers_per_block"] == 2
    with pytest.raises(Exception, match="not 8 pooled \\+ 6 size embeddings"):
        unet_config(checkpoint.components["unet"], architecture="sdxl", pooled_dim=8)


# ------------------------------------------------------------------------------------------------------ merge


def test_weighted_sum_of_two_refiners(tmp_path):
    from safetensors.torch import load_file

    from sdadapt.cli import main
    from sdadapt.formats.files import write_safetensors

    _, a = _parts_and_ldm()
    b = {k: (v + 1 if v.is_floating_point() else v) for k, v in a.items()}
    write_safetensors(tmp_path / "a.safetensors", dict(a), {})
    write_safetensors(tmp_path / "b.safetensors", b, {})
    out = tmp_path / "m.safetensors"
    assert main(["merge", "weighted-sum", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "--alpha", "0.25", "-o", str(out), "-q"]) == 0
    merged = load_file(out)
    assert set(merged) == set(a)
    for key, tensor in a.items():  # supermerger's weighted sum: A * (1 - alpha) + B * alpha
        torch.testing.assert_close(merged[key], (tensor.double() * 0.75 + b[key].double() * 0.25).to(tensor.dtype))


# ------------------------------------------------------------------------------------------------- generation


def test_sampling_conditions_as_diffusers_img2img_pipeline(refiner_files):
    """What the UNet is given while sampling = D's ``encode_prompt`` (text_encoder=None: OpenCLIP-G's penultimate
    states and projected pooled output; the empty negative encoded, force_zeros_for_empty_prompt False) and
    ``_get_add_time_ids`` (requires_aesthetics_score: original size + crop + aesthetic score, the negative's with
    negative_aesthetic_score), on the pipeline diffusers loads from the converted folder."""
    from sdadapt.jobs.models import load_system

    _, folder = refiner_files
    system = load_system(str(folder))
    assert system.is_refiner and system.text_encoder is None and system.base_model == "sdxl"
    system.aesthetic_score, system.negative_aesthetic_score = 7.0, 1.5
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None), kwargs["added_cond_kwargs"]))

    hook = system.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        system.sample(["a red cube"], steps=1, guidance=5.0, negative="")
    finally:
        hook.remove()
    context = torch.cat([c for c, _ in seen])  # (cond and uncond rows, in whatever order the sampler batches them)
    embeds = torch.cat([a["text_embeds"] for _, a in seen])
    time_ids = torch.cat([a["time_ids"] for _, a in seen])
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt("a red cube", device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=True, negative_prompt=None)
    add, neg = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), 7.0, 1.5, (64, 64), (0, 0), (64, 64),
                                      dtype=torch.float32, text_encoder_projection_dim=8)
    assert add.tolist() == [[64, 64, 0, 0, 7.0]] and neg.tolist() == [[64, 64, 0, 0, 1.5]]
    for want_context, want_embeds, want_ids in ((pe, ppe, add), (npe, nppe, neg)):
        rows = [i for i in range(len(time_ids)) if torch.equal(time_ids[i], want_ids[0])]
        assert rows, (time_ids, want_ids)
        torch.testing.assert_close(context[rows[0]], want_context[0])
        torch.testing.assert_close(embeds[rows[0]], want_embeds[0])
    assert not torch.equal(npe, torch.zeros_like(npe))


def test_generate_img2img_with_a_refiner_and_its_options(refiner_files, tmp_path):
    from PIL import Image

    from sdadapt.jobs.generate import run_generate

    file, folder = refiner_files
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "init.png")
    kwargs = dict(prompt="a red cube", steps=2, init_image=tmp_path / "init.png", denoising_strength=0.5, device="cpu")
    run_generate(model=str(file), out=tmp_path / "a.png", aesthetic_score=6.0, negative_aesthetic_score=2.5, **kwargs)
    run_generate(model=str(file), out=tmp_path / "b.png", **kwargs)
    run_generate(model=str(file), out=tmp_path / "c.png", aesthetic_score=1.0, **kwargs)
    a, b, c = (torch.tensor(list(Image.open(tmp_path / f"{n}.png").getdata())) for n in "abc")
    assert torch.equal(a, b)  # (the defaults are diffusers' 6.0 / 2.5)
    assert not torch.equal(a, c)  # (the option reaches the UNet's time_ids)
    with pytest.raises(ValueError, match="not the SDXL refiner"):
        run_generate(model="toy", out=tmp_path / "d.png", prompt="x", steps=1, aesthetic_score=6.0)


def test_block_weights_on_a_refiner_are_refused_by_name(tmp_path):
    from sdadapt.cli import main
    from sdadapt.formats.files import write_safetensors
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep
    from sdadapt.errors import InputError

    _, a = _parts_and_ldm()
    write_safetensors(tmp_path / "a.safetensors", dict(a), {})
    write_safetensors(tmp_path / "b.safetensors", dict(a), {})
    step = MergeStep("weighted-sum", (str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")),
                     block_weights=tuple([0.5] * 20))
    with pytest.raises(InputError, match="SDXL refiner has no block-weight layout"):
        merge_file(step, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_refiner_and_an_sdxl_base_are_refused_before_merging(tmp_path):
    """Both read as "sdxl", but every UNet block and the text encoders differ in shape: refused naming which file is
    the refiner, before a tensor is read or a byte written (in either order)."""
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.errors import MergeError
    from sdadapt.formats.files import write_safetensors
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep

    _, refiner = _parts_and_ldm()
    write_safetensors(tmp_path / "refiner.safetensors", dict(refiner), {})
    base = tiny_sdxl_file(tmp_path / "base.safetensors")
    for pair in ((tmp_path / "refiner.safetensors", base), (base, tmp_path / "refiner.safetensors")):
        step = MergeStep("weighted-sum", tuple(map(str, pair)), alpha=0.5)
        with pytest.raises(MergeError, match=r"refiner\.safetensors is an SDXL refiner and base\.safetensors an SDXL base"):
            merge_file(step, tmp_path / "m.safetensors")
        assert not (tmp_path / "m.safetensors").exists()


def test_train_refuses_a_refiner(refiner_files, tmp_path):
    """kohya's sd-scripts train no SDXL refiner (sdxl_train*.py load base models with two text encoders): refused."""
    from caption_images import two_captioned_images
    from sdadapt.jobs.train import run_train

    file, _ = refiner_files
    images = two_captioned_images(tmp_path / "images")
    with pytest.raises(ValueError, match="SDXL refiner is not trained here"):
        run_train("lora", images=str(images), model=str(file), out=str(tmp_path / "out.safetensors"), steps=1)


def test_inspect_names_the_refiner(tmp_path):
    from sdadapt.formats.detect import describe_file
    from sdadapt.formats.files import write_safetensors

    _, ldm = _parts_and_ldm()
    summary = describe_file(write_safetensors(tmp_path / "r.safetensors", dict(ldm), {}))
    assert summary["kind"] == "checkpoint" and summary["model"] == "Stable Diffusion XL refiner (sdxl)"


def test_diffusers_from_single_file_reads_sdadapts_refiner_file(refiner_files):
    """D's own single-file loader (configs from the converted folder, no hub) reads the LDM file sdadapt writes."""
    from sdadapt.formats.files import read_weights

    file, folder = refiner_files
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score is True
    theirs = {f"{c}.{k}": v for c in ("unet", "vae", "text_encoder_2") for k, v in getattr(pipe, c).state_dict().items()
              if not k.endswith("position_ids")}
    _assert_same(ldm_to_diffusers(read_weights(file)[0]), theirs)
