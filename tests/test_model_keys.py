"""Whole-checkpoint key map LDM <-> diffusers, checked against diffusers' own single-file converters.

Tiny random SD1 / SD2 / SDXL pipelines (UNet, CLIP text encoders, VAE) are turned into LDM files by
``diffusers_to_ldm``; diffusers' ``convert_ldm_*_checkpoint`` must read those back to exactly the
original tensors (so our LDM side is the real LDM naming), and our own ``ldm_to_diffusers`` must
agree with them, round-trip exactly and load strictly into the diffusers/transformers models.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.formats import files
from sdadapt.formats.model_keys import (
    DIFFUSERS_COMPONENTS,
    KeyMapError,
    KeySource,
    apply_plan,
    checkpoint_architecture,
    checkpoint_naming,
    convert_checkpoint,
    diffusers_to_ldm,
    join_components,
    key_plan,
    ldm_to_diffusers,
    split_components,
)

from tiny_models import tiny_clip, tiny_unet_sd1, tiny_unet_sd2, tiny_unet_sdxl
from docs_pages import run_block

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- tiny models


def tiny_vae(seed: int = 0, *, blocks: int = 2, layers: int = 1):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(8 * 2**i for i in range(blocks)),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=layers,
    ).eval()


def tiny_open_clip_h(seed: int = 0, *, layers: int = 2):
    """A CLIPTextModel shaped like SD2's text encoder (gelu), tiny."""
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=layers,
        vocab_size=99, max_position_embeddings=7, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        hidden_act="gelu", projection_dim=8,
    )
    return transformers.CLIPTextModel(config).eval()


def pipeline(arch: str, seed: int = 0) -> dict:
    if arch == "sd1":
        return {"unet": tiny_unet_sd1(seed), "text_encoder": tiny_clip(seed), "vae": tiny_vae(seed)}
    if arch == "sd2":
        return {"unet": tiny_unet_sd2(seed), "text_encoder": tiny_open_clip_h(seed), "vae": tiny_vae(seed)}
    return {
        "unet": tiny_unet_sdxl(seed),
        "text_encoder": tiny_clip(seed),
        "text_encoder_2": tiny_clip(seed + 1, with_projection=True),
        "vae": tiny_vae(seed),
    }


def file_spelling(model) -> dict[str, torch.Tensor]:
    """A model's state dict as diffusers files spell it (transformers-4 ``text_model.`` for CLIP; transformers 5's
    ``CLIPTextModel`` has no ``text_model`` level)."""
    state = model.state_dict()
    if isinstance(model, transformers.CLIPTextModel):
        return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    return dict(state)


def flat(models: dict) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c, m in models.items() for k, v in file_spelling(m).items()}


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def arch_models(request):
    return request.param, pipeline(request.param)


@pytest.fixture(scope="module")
def arch_ldm(arch_models):
    arch, models = arch_models
    return arch, models, diffusers_to_ldm(flat(models))


# ---------------------------------------------------------------- (1) diffusers' converters read our LDM


LDM_TEXT_PREFIX = {
    ("sd1", "text_encoder"): "cond_stage_model.transformer.",
    ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}


def test_ldm_prefixes_are_the_single_file_ones(arch_ldm):
    arch, models, ldm = arch_ldm
    heads = {k.split(".", 1)[0] for k in ldm}
    assert heads <= {"model", "first_stage_model", "cond_stage_model", "conditioner"}
    for (a, component), prefix in LDM_TEXT_PREFIX.items():
        if a == arch:
            assert any(k.startswith(prefix) for k in ldm), prefix


def test_diffusers_unet_and_vae_converters_read_our_ldm_back_exactly(arch_ldm):
    _, models, ldm = arch_ldm
    unet = single_file.convert_ldm_unet_checkpoint(ldm, models["unet"].config)
    assert_same_state(unet, models["unet"].state_dict())
    vae = single_file.convert_ldm_vae_checkpoint(ldm, models["vae"].config)
    assert_same_state(vae, models["vae"].state_dict())


def test_diffusers_clip_converters_read_our_ldm_back_exactly(arch_ldm):
    arch, models, ldm = arch_ldm
    for component in ("text_encoder", "text_encoder_2"):
        if component not in models:
            continue
        model, prefix = models[component], LDM_TEXT_PREFIX[(arch, component)]
        if prefix.endswith(".model."):
            theirs = single_file.convert_open_clip_checkpoint(model, ldm, prefix=prefix)
        else:
            theirs = single_file.convert_ldm_clip_checkpoint(ldm)
        assert_same_state(theirs, file_spelling(model))


def test_our_ldm_to_diffusers_matches_diffusers_converters(arch_ldm):
    arch, models, ldm = arch_ldm
    ours = split_components(ldm_to_diffusers(ldm))
    assert set(ours) == set(models)
    assert_same_state(ours["unet"], single_file.convert_ldm_unet_checkpoint(ldm, models["unet"].config))
    assert_same_state(ours["vae"], single_file.convert_ldm_vae_checkpoint(ldm, models["vae"].config))
    if arch == "sd2":
        theirs = single_file.convert_open_clip_checkpoint(models["text_encoder"], ldm)
    else:
        theirs = single_file.convert_ldm_clip_checkpoint(ldm)
    assert_same_state(ours["text_encoder"], theirs)
    if arch == "sdxl":
        prefix = "conditioner.embedders.1.model."
        theirs = single_file.convert_open_clip_checkpoint(models["text_encoder_2"], ldm, prefix=prefix)
        assert_same_state(ours["text_encoder_2"], theirs)


def test_vae_attention_is_1x1_conv_in_ldm_and_linear_in_diffusers(arch_ldm):
    _, models, ldm = arch_ldm
    q = ldm["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (16, 16, 1, 1)
    assert torch.equal(q[:, :, 0, 0], models["vae"].state_dict()["encoder.mid_block.attentions.0.to_q.weight"])
    assert "first_stage_model.decoder.mid.attn_1.proj_out.weight" in ldm


def test_open_clip_fused_qkv_and_text_projection_transpose_by_hand():
    """Naive reference written here: in_proj = cat(q, k, v); LDM text_projection = W.T."""
    model = tiny_clip(3, with_projection=True)
    state = model.state_dict()
    ldm = diffusers_to_ldm(flat({"text_encoder": tiny_clip(4), "text_encoder_2": model}), architecture="sdxl")
    prefix = "conditioner.embedders.1.model."
    attn = "text_model.encoder.layers.1.self_attn."
    fused = torch.cat([state[attn + f"{x}_proj.weight"] for x in "qkv"]).double()
    assert torch.equal(ldm[prefix + "transformer.resblocks.1.attn.in_proj_weight"].double(), fused)
    assert torch.equal(ldm[prefix + "text_projection"], state["text_projection.weight"].T)
    assert torch.equal(ldm[prefix + "positional_embedding"], state["text_model.embeddings.position_embedding.weight"])


# ---------------------------------------------------------------- (2) round trips


def test_round_trip_ldm_diffusers_ldm_is_exact_and_key_complete(arch_ldm):
    _, _, ldm = arch_ldm
    back, report = convert_checkpoint(ldm_to_diffusers(ldm), to="ldm")
    assert report.ok and not report.dropped
    assert_same_state(back, ldm)


def test_round_trip_diffusers_ldm_diffusers_is_exact(arch_models):
    _, models = arch_models
    state = flat(models)
    assert_same_state(ldm_to_diffusers(diffusers_to_ldm(state)), state)


def test_round_trip_keeps_dtypes_and_shares_no_storage(tmp_path):
    models = pipeline("sdxl")
    state = {k: v.to(torch.float16) for k, v in flat(models).items()}
    ldm = diffusers_to_ldm(state)
    assert {v.dtype for v in ldm.values()} == {torch.float16}
    path = files.write_safetensors(tmp_path / "x.safetensors", ldm)  # safetensors refuses shared storage
    assert Path(path).stat().st_size > 0
    assert_same_state(ldm_to_diffusers(ldm), state)


# ---------------------------------------------------------------- (3) loads strictly into the real models


def test_converted_state_loads_strictly_into_fresh_models(arch_ldm):
    arch, models, ldm = arch_ldm
    fresh = pipeline(arch, seed=7)
    parts = split_components(ldm_to_diffusers(ldm), expected={c: m.state_dict() for c, m in fresh.items()})
    for component, model in fresh.items():
        model.load_state_dict(parts[component], strict=True)
        assert_same_state(dict(model.state_dict()), dict(models[component].state_dict()))


def test_vae_decodes_the_same_after_a_round_trip_through_ldm():
    vae = tiny_vae(0)
    fresh = tiny_vae(9)
    parts = split_components(ldm_to_diffusers(diffusers_to_ldm(flat({"vae": vae}))))
    fresh.load_state_dict(parts["vae"], strict=True)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh.decode(z).sample, vae.decode(z).sample)


# ---------------------------------------------------------------- LDM-only tensors: drops, aliases, SD2's 24th layer


def test_ldm_extras_are_dropped_with_reasons():
    ldm = diffusers_to_ldm(flat(pipeline("sd1")))
    extras = {
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(7)[None],
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(32, 4, 3, 3),
        "betas": torch.linspace(1e-4, 2e-2, 10),
        "alphas_cumprod": torch.linspace(1, 0, 10),
    }
    converted, report = convert_checkpoint({**ldm, **extras}, to="diffusers")
    assert report.ok and set(report.dropped) == set(extras)
    notes = " ".join(report.notes)
    assert "extract_ema" in notes and "position_ids" in notes and "scheduler" in notes
    assert_same_state(converted, ldm_to_diffusers(ldm))


def test_position_ids_diffusers_to_ldm_is_kept_and_open_clip_drops_it():
    te = tiny_clip(0)
    state = flat({"unet": tiny_unet_sd1(), "text_encoder": te})
    state["text_encoder.text_model.embeddings.position_ids"] = torch.arange(te.config.max_position_embeddings)[None]
    ldm, report = convert_checkpoint(state, to="ldm")
    assert ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    sd2 = flat({"unet": tiny_unet_sd2(), "text_encoder": tiny_open_clip_h()})
    sd2["text_encoder.text_model.embeddings.position_ids"] = torch.arange(7)[None]
    _, report = convert_checkpoint(sd2, to="ldm")
    assert report.dropped == ("text_encoder.text_model.embeddings.position_ids",)


def test_sd2_drops_layer_23_and_projection_like_diffusers():
    """A 24-layer OpenCLIP (as in SD2 files) becomes diffusers' 23-layer encoder; same as diffusers."""
    full = tiny_open_clip_h(0, layers=24)
    ldm = diffusers_to_ldm(flat({"text_encoder": full}), architecture="sd2")
    ldm["cond_stage_model.model.text_projection"] = torch.randn(8, 8)
    ldm["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    converted, report = convert_checkpoint(ldm, to="diffusers")
    dropped = set(report.dropped)
    assert {k for k in dropped if ".resblocks." in k} == {k for k in ldm if ".resblocks.23." in k}
    assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= dropped
    assert any("penultimate" in n for n in report.notes)
    short = tiny_open_clip_h(5, layers=23)
    theirs = single_file.convert_open_clip_checkpoint(short, ldm)
    assert_same_state(split_components(converted)["text_encoder"], theirs)
    parts = split_components(converted, expected={"text_encoder": short.state_dict()})
    short.load_state_dict(parts["text_encoder"], strict=True)


def test_other_spellings_read_transformers5_and_old_ldm_clip():
    models = pipeline("sd1")
    canonical = diffusers_to_ldm(flat(models))
    # transformers-5 CLIPTextModel.state_dict() spelling on the diffusers side (no text_model. level; written out,
    # as transformers 4's model has it)
    t5 = {f"{c}.{k.removeprefix('text_model.') if type(m) is transformers.CLIPTextModel else k}": v
          for c, m in models.items() for k, v in m.state_dict().items()}
    ldm, report = convert_checkpoint(t5, to="ldm")
    assert_same_state(ldm, canonical)
    assert any("without 'text_model.'" in n for n in report.notes)
    # old SD1 files: cond_stage_model.transformer.encoder... (A1111 renames the same way)
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in canonical.items()}
    assert any(k.startswith("cond_stage_model.transformer.encoder.") for k in old)
    assert_same_state(ldm_to_diffusers(old), ldm_to_diffusers(canonical))


def test_an_old_spelling_next_to_the_new_one_is_reported_not_used():
    ldm = diffusers_to_ldm(flat(pipeline("sd1")))
    new = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    old = "cond_stage_model.transformer.final_layer_norm.weight"
    converted, report = convert_checkpoint({**ldm, old: torch.full_like(ldm[new], 7.0)}, to="diffusers", strict=False)
    assert report.unmatched == (old,)
    assert torch.equal(converted["text_encoder.text_model.final_layer_norm.weight"], ldm[new])


# ---------------------------------------------------------------- (4) errors name the keys


def test_unknown_keys_raise_with_their_names_or_are_reported():
    ldm = diffusers_to_ldm(flat(pipeline("sd1")))
    bad = {
        **ldm,
        "model.diffusion_model.input_blocks.1.0.not_a_layer.weight": torch.zeros(1),
        "model.diffusion_model.middle_block.3.weight": torch.zeros(1),
        "first_stage_model.encoder.mid.attn_2.q.weight": torch.zeros(1),
        "cond_stage_model.transformer.text_model.pooler.weight": torch.zeros(1),
        "other_model.embedder.weight": torch.zeros(1),
    }
    unknown = set(bad) - set(ldm)
    bad["embedding_manager.embedder.weight"] = torch.zeros(1)  # (an old TI repository's leftover: dropped, reported)
    with pytest.raises(KeyMapError) as err:
        ldm_to_diffusers(bad)
    for key in unknown:
        assert key in str(err.value)
    assert "strict=False" in str(err.value)
    assert set(err.value.report.unmatched) == unknown
    converted, report = convert_checkpoint(bad, to="diffusers", strict=False)
    assert set(report.unmatched) == unknown
    assert_same_state(converted, ldm_to_diffusers(ldm))


def test_unknown_diffusers_keys_raise():
    state = flat(pipeline("sd1"))
    state["unet.mid_block.attentions.1.norm.weight"] = torch.zeros(1)
    state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q.weight"] = torch.zeros(1)
    with pytest.raises(KeyMapError, match=re.escape("unet.mid_block.attentions.1.norm.weight")) as err:
        diffusers_to_ldm(state)
    assert "attn3" in str(err.value)


def test_missing_fused_part_is_named():
    state = flat({"unet": tiny_unet_sd2(), "text_encoder": tiny_open_clip_h()})
    gone = "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.weight"
    del state[gone]
    with pytest.raises(KeyMapError, match=re.escape(gone)):
        diffusers_to_ldm(state)
    ldm, report = convert_checkpoint(state, to="ldm", strict=False)
    assert report.missing == (gone,)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" not in ldm
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias" in ldm


def test_shape_mismatches_are_named():
    ldm = diffusers_to_ldm(flat({"unet": tiny_unet_sd2(), "text_encoder": tiny_open_clip_h(), "vae": tiny_vae()}))
    in_proj = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    attn_q = "first_stage_model.decoder.mid.attn_1.q.weight"
    bad = {**ldm, in_proj: torch.zeros(25, 8), attn_q: torch.zeros(16, 16, 3, 3)}
    with pytest.raises(KeyMapError) as err:
        ldm_to_diffusers(bad)
    assert in_proj in str(err.value) and attn_q in str(err.value)
    assert len(err.value.report.mismatched) == 2


def test_target_shapes_report_missing_unexpected_mismatched_and_fit_1x1():
    models = pipeline("sd1")
    ldm = diffusers_to_ldm(flat(models))
    target = {k: tuple(v.shape) for k, v in flat(models).items()}
    plan, report = key_plan({k: tuple(v.shape) for k, v in ldm.items()}, to="diffusers", target_shapes=target)
    assert report.ok
    gone, extra, wrong = "unet.conv_in.bias", "unet.extra.weight", "vae.quant_conv.bias"
    target = {**{k: v for k, v in target.items() if k != gone}, extra: (1,), wrong: (3,)}
    _, report = key_plan(ldm, to="diffusers", target_shapes=target)
    assert report.unexpected == (gone,) and report.missing == (extra,)
    assert report.mismatched == (f"{wrong}: planned shape (8,), target model has (3,)",)
    with pytest.raises(KeyMapError, match=re.escape(wrong)):
        convert_checkpoint(ldm, to="diffusers", target_shapes=target)
    # an SD1 file (1x1 conv proj_in) fitted to a model built with use_linear_projection=True
    linear = diffusers.UNet2DConditionModel(**{**models["unet"].config, "use_linear_projection": True})
    target = {"unet." + k: tuple(v.shape) for k, v in linear.state_dict().items()}
    unet_ldm = {k: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    converted, report = convert_checkpoint(unet_ldm, to="diffusers", target_shapes=target)
    assert any("reshaped" in n and "proj_in" in n for n in report.notes)
    linear.load_state_dict(split_components(converted)["unet"], strict=True)


def test_apply_plan_names_the_key_when_a_tensor_does_not_fit():
    plan = {"vae.encoder.mid_block.attentions.0.to_q.weight": KeySource(("q",), (4, 4))}
    with pytest.raises(KeyMapError, match="to_q.weight"):
        list(apply_plan(plan, lambda key: torch.zeros(5, 5)))
    plan = {"k": KeySource(("a",), (2, 2), part=(1, 3))}
    with pytest.raises(KeyMapError, match="3 equal parts"):
        list(apply_plan(plan, lambda key: torch.zeros(7, 2)))


def test_naming_and_architecture_detection(arch_ldm):
    arch, models, ldm = arch_ldm
    state = flat(models)
    assert checkpoint_naming(ldm) == "ldm" and checkpoint_naming(state) == "diffusers"
    assert checkpoint_architecture({k: v.shape for k, v in ldm.items()}) == arch
    assert checkpoint_architecture({k: v.shape for k, v in state.items()}) == arch
    unet_only = {k: v.shape for k, v in state.items() if k.startswith("unet.")}
    assert checkpoint_architecture(unet_only) == arch
    with pytest.raises(KeyMapError, match="mixes"):
        checkpoint_naming([*ldm, *state])
    with pytest.raises(KeyMapError, match="prefix"):
        checkpoint_naming(["conv_in.weight"])
    with pytest.raises(KeyMapError, match="architecture="):
        checkpoint_architecture({k: v.shape for k, v in state.items() if k.startswith("vae.")})
    # a text encoder with no other evidence needs the architecture spelled out
    with pytest.raises(KeyMapError, match="architecture="):
        diffusers_to_ldm(flat({"text_encoder": tiny_clip()}))
    assert set(DIFFUSERS_COMPONENTS) >= set(split_components(state))


def test_split_components_refuses_unprefixed_keys():
    with pytest.raises(KeyMapError, match="conv_in.weight"):
        split_components({"conv_in.weight": torch.zeros(1)})


# ---------------------------------------------------------------- real-size configs (meta device: keys and shapes)


def _clip_config(hidden, layers, **kw):
    return transformers.CLIPTextConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=hidden // 64,
        num_hidden_layers=layers, **kw
    )


def real_size(arch: str) -> dict:
    """The public SD1.5 / SD2.1 / SDXL-base component configs, built on the meta device."""
    down = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
        )
        if arch == "sd1":
            unet = diffusers.UNet2DConditionModel(
                block_out_channels=(320, 640, 1280, 1280), down_block_types=down, up_block_types=up,
                cross_attention_dim=768, attention_head_dim=8,
            )
            return {"unet": unet, "text_encoder": transformers.CLIPTextModel(_clip_config(768, 12)), "vae": vae}
        if arch == "sd2":
            unet = diffusers.UNet2DConditionModel(
                block_out_channels=(320, 640, 1280, 1280), down_block_types=down, up_block_types=up,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            )
            te = transformers.CLIPTextModel(_clip_config(1024, 23, hidden_act="gelu"))
            return {"unet": unet, "text_encoder": te, "vae": vae}
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        te2 = transformers.CLIPTextModelWithProjection(_clip_config(1280, 32, hidden_act="gelu", projection_dim=1280))
        return {"unet": unet, "text_encoder": transformers.CLIPTextModel(_clip_config(768, 12)), "text_encoder_2": te2,
                "vae": vae}


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_real_size_layouts_are_what_diffusers_expects(arch):
    models = real_size(arch)
    state = flat(models)
    plan, report = key_plan({k: v.shape for k, v in state.items()}, to="ldm")
    assert report.ok
    ldm = dict(apply_plan(plan, state.__getitem__))
    # diffusers' detector keys on real LDM names at real shapes
    assert single_file.infer_diffusers_model_type(ldm) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[arch]
    assert checkpoint_architecture({k: v.shape for k, v in ldm.items()}) == arch
    converters = {"unet": single_file.convert_ldm_unet_checkpoint, "vae": single_file.convert_ldm_vae_checkpoint}
    for name, convert in converters.items():
        theirs = convert(ldm, models[name].config)
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in models[name].state_dict().items()}
    counts = {p: sum(k.startswith(p) for k in ldm) for p in ("model.", "first_stage_model.", "cond_", "conditioner.")}
    # UNet 686 (SD1/SD2) / 1680 (SDXL), VAE 248, CLIP-L 196, OpenCLIP-H 23 layers x 12 + 4, bigG 32 x 12 + 5:
    # the real single files have these plus position_ids (CLIP-L) and logit_scale / layer 23 (OpenCLIP)
    assert counts == {
        "sd1": {"model.": 686, "first_stage_model.": 248, "cond_": 196, "conditioner.": 0},
        "sd2": {"model.": 686, "first_stage_model.": 248, "cond_": 23 * 12 + 4, "conditioner.": 0},
        "sdxl": {"model.": 1680, "first_stage_model.": 248, "cond_": 0, "conditioner.": 196 + 32 * 12 + 5},
    }[arch]
    back, report = key_plan({k: v.shape for k, v in ldm.items()}, to="diffusers")
    assert report.ok and set(back) == set(state)


# ---------------------------------------------------------------- (5) plans from shapes only, streamed


def test_key_plan_from_a_safetensors_header_streams_the_same_result(tmp_path, arch_ldm):
    from safetensors import safe_open

    _, _, ldm = arch_ldm
    path = files.write_safetensors(tmp_path / "model.safetensors", ldm)
    header, _ = files.read_safetensors_header(path)
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    plan, report = key_plan(shapes, to="diffusers")
    assert report.ok
    with safe_open(str(path), framework="pt") as f:
        streamed = dict(apply_plan(plan, f.get_tensor))
    assert_same_state(streamed, ldm_to_diffusers(ldm))


# ---------------------------------------------------------------- property: any block layout


@settings(max_examples=6, deadline=None)
@given(blocks=st.integers(1, 3), layers=st.integers(1, 3))
def test_vae_any_layout_matches_diffusers(blocks, layers):
    vae = tiny_vae(blocks * 10 + layers, blocks=blocks, layers=layers)
    ldm = diffusers_to_ldm(flat({"vae": vae}))
    assert_same_state(single_file.convert_ldm_vae_checkpoint(ldm, vae.config), vae.state_dict())
    assert_same_state(ldm_to_diffusers(ldm), flat({"vae": vae}))


@settings(max_examples=5, deadline=None)
@given(layers=st.integers(1, 3), attention=st.lists(st.booleans(), min_size=2, max_size=3), linear=st.booleans())
def test_unet_any_layout_matches_diffusers(layers, attention, linear):
    torch.manual_seed(layers)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers,
        block_out_channels=tuple(8 * (i + 1) for i in range(len(attention))),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4, use_linear_projection=linear,
    )
    state = flat({"unet": unet})
    ldm = diffusers_to_ldm(state)
    assert_same_state(single_file.convert_ldm_unet_checkpoint(ldm, unet.config), unet.state_dict())
    assert_same_state(ldm_to_diffusers(ldm), state)


def test_join_components_is_split_components_inverse():
    t = torch.arange(3.0)
    parts = {"unet": {"conv_in.weight": t},
             "text_encoder": {"encoder.layers.0.mlp.fc1.weight": t, "embeddings.position_ids": t},  # transformers 5
             "text_encoder_2": {"text_model.final_layer_norm.weight": t, "text_projection.weight": t}}
    joined = join_components(parts)
    assert sorted(joined) == ["text_encoder.text_model.encoder.layers.0.mlp.fc1.weight",
                              "text_encoder_2.text_model.final_layer_norm.weight", "text_encoder_2.text_projection.weight",
                              "unet.conv_in.weight"]
    assert all(v is t for v in joined.values())
    back = split_components(joined, expected={c: dict(p) for c, p in parts.items()})
    assert back == {c: {k: v for k, v in p.items() if not k.endswith("position_ids")} for c, p in parts.items()}


# ---------------------------------------------------------------- docs


def test_docs_page_example_runs():
    namespace = run_block("keys.md")
    assert namespace["report"].ok
