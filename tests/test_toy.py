"""The toy system: its parts are what they claim to be (checked against transformers and diffusers)."""

from __future__ import annotations

import math

import pytest
import torch

import sdadapt
from sdadapt.targets import TEXT_ENCODER, UNET_ATTENTION, UNET_KOHYA, UNET_LOCON, select
from sdadapt.toy import ToySystem, build_toy, load_toy, save_toy
from sdadapt.toy.shapes import HELD_OUT_COLOURS, HELD_OUT_SHAPES, Scene, caption, render, sample_scenes, scene_batch
from sdadapt.toy.text_encoder import ToyTextEncoder
from sdadapt.toy.tokenizer import MAX_LENGTH, SPARE_TOKENS, ToyTokenizer
from sdadapt.toy.unet import ToyUNet


# ---------------------------------------------------------------------------------- data, tokens
def test_render_is_deterministic_antialiased_and_area_correct():
    scene = Scene("circle", "red", "large", "center", "black")
    a, b = render(scene), render(scene)
    assert torch.equal(a, b) and a.shape == (3, 32, 32) and a.min() >= -1 and a.max() <= 1
    red = torch.tensor([0.90, 0.15, 0.10]) * 2 - 1
    bg = torch.tensor([0.05, 0.05, 0.05]) * 2 - 1
    cover = ((a - bg[:, None, None]) / (red - bg)[:, None, None])[0]  # fraction of each pixel covered
    assert cover.sum().item() == pytest.approx(math.pi * 9.0**2, rel=0.01)
    assert ((cover > 0.01) & (cover < 0.99)).any()  # anti-aliased edge pixels exist


def test_captions_and_held_out_sampling():
    s = Scene("cross", "purple", "small", "left", "gray")
    assert caption(s) == "a small purple cross on the left on a gray background"
    assert caption(s, parts=(False, False, False)) == "a purple cross"
    scenes = sample_scenes(300, seed=0)
    assert not any(x.shape in HELD_OUT_SHAPES or x.colour in HELD_OUT_COLOURS for x in scenes)
    assert any(x.shape == "cross" for x in sample_scenes(300, seed=0, held_out=True))
    images, captions = scene_batch(scenes[:5], seed=3)
    assert images.shape == (5, 3, 32, 32) and all(c.startswith("a ") for c in captions)
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("hexagon", "red")


def test_tokenizer_round_trip_unknowns_and_spares():
    tok = ToyTokenizer()
    ids = tok(["a large red circle on the left", "a <new0> sks"])
    assert ids.shape == (2, MAX_LENGTH) and ids[0, 0] == tok.bos_id
    assert tok.decode(ids[0]) == "a large red circle on the left"
    assert tok.decode(ids[1]) == "a <new0> sks"
    assert tok.decode(tok("a zebra")[0]) == "a <unk>"
    assert all(tok.token_id(t) >= len(tok) - len(SPARE_TOKENS) for t in SPARE_TOKENS)
    with pytest.raises(ValueError, match="at most"):
        tok(" ".join(["a"] * 20))
    with pytest.raises(KeyError, match="spare|new"):
        tok.token_id("zebra")


# ------------------------------------------------------------------ models vs the real libraries
def test_text_encoder_equals_transformers_clip_text_model():
    transformers = pytest.importorskip("transformers")
    tok = ToyTokenizer()
    torch.manual_seed(0)
    ours = ToyTextEncoder(vocab_size=len(tok)).eval()
    config = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
        pad_token_id=tok.pad_id,
    )
    theirs = transformers.CLIPTextModel(config).eval()
    flat = not any(k.startswith("text_model.") for k in theirs.state_dict())  # transformers 5 dropped the prefix
    state = {(k.removeprefix("text_model.") if flat else k): v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    ids = tok(["a large red circle", "a blue <new3> on the left", ""])
    with torch.no_grad():
        h, pooled = ours(ids)
        out = theirs(ids)
    torch.testing.assert_close(h, out.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=1e-5)


def test_unet_equals_diffusers_unet2dconditionmodel():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = ToyUNet(widths=(32, 64)).eval()
    theirs = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=12, out_channels=12, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), norm_num_groups=16,
    ).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("image_embedding.")}
    theirs.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 12, 16, 16, generator=g), torch.randn(2, 16, 64, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), theirs(x, t, ctx).sample, atol=1e-5, rtol=1e-5)


def test_every_preset_applies_to_the_toy_models():
    system = build_toy()
    n_kohya = len(select(system.unet, UNET_KOHYA))
    # per transformer: proj_in, proj_out, q/k/v/out x2, ff.net.0.proj, ff.net.2 = 12; 7 transformers (2 down, 1 mid, 4 up)
    assert n_kohya == 7 * 12
    assert len(select(system.unet, UNET_ATTENTION)) == 7 * 8
    assert len(select(system.unet, UNET_LOCON)) > n_kohya
    assert len(select(system.text_encoder, TEXT_ENCODER)) == 2 * 6


def test_toy_lora_round_trips_through_a_kohya_file(tmp_path):
    system = build_toy()
    handle = sdadapt.inject(system.unet, UNET_KOHYA, sdadapt.LoRAConfig(rank=4, init="gaussian"))
    te = sdadapt.inject(system.text_encoder, TEXT_ENCODER, sdadapt.LoRAConfig(rank=4, init="gaussian"))
    with torch.no_grad():
        for p in [*handle.parameters(), *te.parameters()]:
            p.normal_(0, 0.05)
    x = torch.randn(1, 12, 16, 16)
    cond = system.condition(["a red circle"])
    with torch.no_grad():
        want = system.unet(x, torch.tensor([50]), cond["context"])
    sdadapt.save_lora(tmp_path / "l.safetensors", {"unet": handle.state_dict(), "text_encoder": te.state_dict()})
    handle.remove()
    te.remove()
    state, _ = sdadapt.load_lora(tmp_path / "l.safetensors")
    assert set(state) == {"unet", "text_encoder"}
    sdadapt.load_adapter(system.unet, state["unet"])
    sdadapt.load_adapter(system.text_encoder, state["text_encoder"])
    with torch.no_grad():
        got = system.unet(x, torch.tensor([50]), system.condition(["a red circle"])["context"])
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------- system
def test_latents_are_an_exact_invertible_view_of_images():
    images, _ = scene_batch(sample_scenes(3, seed=1), seed=1)
    latents = ToySystem.encode_images(images)
    assert latents.shape == (3, 12, 16, 16)
    assert torch.equal(ToySystem.decode_latents(latents), images)


def test_save_load_round_trip_and_bad_files(tmp_path):
    system = build_toy(seed=3)
    save_toy(system, tmp_path / "t.safetensors", dtype=torch.float32)
    loaded = load_toy(tmp_path / "t.safetensors")
    for part in ("unet", "text_encoder", "clip"):
        a, b = getattr(system, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(sdadapt.WeightFileError, match="pretrain"):
        load_toy(tmp_path / "missing.safetensors")
    sdadapt.formats.files.write_safetensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {})
    with pytest.raises(sdadapt.WeightFileError, match="not a toy"):
        load_toy(tmp_path / "other.safetensors")


def test_image_conditioning_changes_the_prediction():
    system = build_toy()
    x = torch.randn(1, 12, 16, 16)
    cond = system.condition(["a red circle"])
    with torch.no_grad():
        plain = system.unet(x, torch.tensor([10]), cond["context"], cond["image_embeds"])
        with_image = system.unet(x, torch.tensor([10]), cond["context"], torch.randn(1, 64))
    assert not torch.allclose(plain, with_image)


def test_pretrain_is_deterministic_and_records_its_recipe_chain(tmp_path, monkeypatch):
    import functools
    import json

    from sdadapt.formats.files import read_safetensors, read_safetensors_header
    from sdadapt.toy import pretrain as module
    from sdadapt.toy.pretrain import main as pretrain

    # the real stages, CI-sized: pretrain's closing held-in check (48 images x 25 sampling steps, ~23 CPU-s a
    # run) on 4 images x 2 steps, and the judge's contrastive batch (256 rendered scenes) cut to 16
    monkeypatch.setattr(module, "held_in_accuracy", functools.partial(module.held_in_accuracy, count=4, steps=2))
    monkeypatch.setattr(module, "pretrain_clip", functools.partial(module.pretrain_clip, batch=16))
    tiny = ["--clip-steps", "2", "--unet-steps", "2", "--batch", "4"]
    first, second, third = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert pretrain([*tiny, "--out", str(first)]) == 0
    assert pretrain([*tiny, "--out", str(second)]) == 0
    a, b = read_safetensors(first)[0], read_safetensors(second)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the weights moved away from the seed's initialisation
    assert any(not torch.equal(a[k], v) for k, v in read_safetensors(_init_file(tmp_path))[0].items())
    # --init continues from a file and keeps its recipe inside the new one
    assert pretrain(["--init", str(first), "--clip-steps", "0", "--unet-steps", "1", "--batch", "4", "--seed", "1",
                     "--out", str(third)]) == 0
    recipe = json.loads(read_safetensors_header(third)[1]["recipe"])
    assert recipe["seed"] == 1 and recipe["unet_steps"] == 1 and recipe["init"]["unet_steps"] == 2
    c = read_safetensors(third)[0]
    clip_keys = [k for k in c if k.startswith("clip.")]
    assert clip_keys and all(torch.equal(a[k], c[k]) for k in clip_keys)  # --clip-steps 0 kept the judge


def _init_file(tmp_path):
    from sdadapt.toy import build_toy, save_toy

    path = tmp_path / "init.safetensors"
    save_toy(build_toy(seed=0), path)
    return path
