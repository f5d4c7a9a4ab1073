"""Textual inversion and DreamArtist as methods on the toy system: what trains, the CFG math, files, removal."""

from __future__ import annotations

import math

import pytest
import torch

import sdadapt
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.dreamartist import (
    cfg_combine,
    cfg_scale_at,
    load_dreamartist,
    prepare_dreamartist,
    replace_word,
    sample_dreamartist,
)
from sdadapt.methods.textual_inversion import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    mentions,
    norm_penalty,
    prepare_textual_inversion,
    template_captions,
    trigger_captions,
)
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data


@pytest.fixture(scope="module")
def data():
    return concept_data("purple", 4, seed=0)


def _snapshot(system):
    return {part: {k: v.clone() for k, v in getattr(system, part).state_dict().items()} for part in ("unet", "text_encoder")}


def _unchanged(system, snapshot) -> bool:
    for part, state in snapshot.items():
        now = getattr(system, part).state_dict()
        if now.keys() != state.keys() or not all(torch.equal(now[k], state[k]) for k in state):
            return False
    return True


# ------------------------------------------------------------------------------ pure pieces
def test_cfg_combination_and_schedules_match_hand_formulas_in_float64():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    scale = cfg_scale_at(t, low=2.0, high=6.0, schedule="ln").view(-1, 1, 1, 1)
    got = cfg_combine(pos, neg, scale)
    for i, ti in enumerate(t.tolist()):
        s = 2.0 + 4.0 * ti / 999
        want = neg[i] + s * (pos[i] - neg[i])
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    r = t.double() / 999
    torch.testing.assert_close(cfg_scale_at(t, low=1.0, high=3.0, schedule="cos"),
                               1 + 2 * torch.cos((r - 1) * math.pi / 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cfg_scale_at(t, low=1.0, high=3.0, schedule="cos2"),
                               1 + 2 * (1 - torch.cos(r * math.pi / 2)), rtol=1e-12, atol=1e-12)
    assert torch.equal(cfg_scale_at(t, low=5.0), torch.full((3,), 5.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown CFG schedule 'exp'"):
        cfg_scale_at(t, low=1.0, high=2.0, schedule="exp")


def test_caption_helpers():
    captions = template_captions("<sks>", 5, seed=3)
    assert len(captions) == 5 and all("<sks>" in c and c.replace("<sks>", "{}") in OBJECT_TEMPLATES for c in captions)
    assert captions == template_captions("<sks>", 5, seed=3)
    assert mentions("a Purple circle", "purple") and not mentions("a purple-neg circle", "purple")
    assert replace_word("a purple circle, purple", "purple", "purple-neg") == "a purple-neg circle, purple-neg"
    rows = torch.randn(3, 8, dtype=torch.float64)
    want = sum((float(r.norm()) - 2.0) ** 2 for r in rows) / 3
    assert math.isclose(float(norm_penalty(rows, 2.0)), want, rel_tol=1e-9)


# ------------------------------------------------------------------------------ textual inversion
def test_textual_inversion_trains_only_the_rows_saves_and_removes_exactly(tmp_path, data):
    images, captions = data
    system = build_toy(seed=1)  # requires_grad everywhere, as a user's model may be
    snapshot = _snapshot(system)
    adaptation = prepare_textual_inversion(system, token="purple", vectors=2, init_word="red")
    table = system.text_encoder.get_input_embeddings().weight
    assert [tuple(p.shape) for p in adaptation.params] == [(2, 64)]
    assert torch.equal(adaptation.params[0].detach(), table[[system.tokenizer.token_id("red")] * 2].detach())
    start = adaptation.params[0].detach().clone()
    fit(system, adaptation, images, captions, config=FitConfig(steps=3, batch_size=2, learning_rate=1e-2))
    assert not torch.equal(adaptation.params[0].detach(), start)
    assert table.grad is None and all(p.grad is None for p in system.unet.parameters())
    assert _unchanged(system, snapshot)  # the base table (and everything else) kept its bits
    saved = adaptation.save(tmp_path / "purple.safetensors", metadata={"note": "test"})
    emb = sdadapt.load_embedding(saved)
    assert emb.name == "purple" and emb.metadata["note"] == "test"
    assert emb.metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert torch.equal(emb.vectors["text_encoder"], adaptation.params[0].detach())
    a1111 = torch.load(adaptation.save(tmp_path / "purple.pt"), weights_only=True)
    assert a1111["name"] == "purple" and torch.equal(a1111["string_to_param"]["*"], adaptation.params[0].detach())
    adaptation.remove()
    assert _unchanged(system, snapshot) and system.tokenizer.added == {}
    assert all(p.requires_grad for p in system.text_encoder.parameters())  # flags back as they were


def test_a_trained_embedding_reproduces_the_adapted_model(tmp_path, data):
    images, captions = data
    system = build_toy(seed=2)
    adaptation = prepare_textual_inversion(system, token="<sks>", vectors=2)
    captions = [c.replace("purple", "<sks>") for c in captions]
    fit(system, adaptation, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=1e-1))
    with torch.no_grad():
        adapted = system.sample(["a <sks> circle"], seed=4, steps=4)
    path = adaptation.save(tmp_path / "<sks>.pt")
    adaptation.remove()
    fresh = build_toy(seed=2)
    handle = sdadapt.inject_embedding(fresh.text_encoder, fresh.tokenizer, sdadapt.load_embedding(path))
    with torch.no_grad():
        again = fresh.sample(["a <sks> circle"], seed=4, steps=4)
        plain = build_toy(seed=2).sample(["a <sks> circle"], seed=4, steps=4)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    assert not torch.equal(again, plain)
    handle.remove()


def test_norm_weight_adds_the_penalty_to_the_step(data):
    images, captions = data
    runs = []
    for weight in (0.0, 10.0):
        system = build_toy(seed=3)
        adaptation = prepare_textual_inversion(system, token="purple", norm_weight=weight)
        if weight:
            target = float(system.text_encoder.get_input_embeddings().weight.norm(dim=-1).mean())
            want = weight * float(norm_penalty(adaptation.params[0].detach(), target))
            assert math.isclose(float(adaptation.extra_loss({}, torch.zeros(1)).detach()), want, rel_tol=1e-5)
        else:
            assert adaptation.extra_loss is None
        runs.append(fit(system, adaptation, images, captions, config=FitConfig(steps=1, batch_size=2, learning_rate=1e-2))[0])
    assert runs[1] > runs[0]  # same batch, same noise: the loss carries the penalty


def test_trigger_captions_fill_templates_and_refuse_captions_without_the_word():
    got = trigger_captions(["a <sks> on a table", None, ""], "<sks>", seed=1)
    assert got[0] == "a <sks> on a table" and all(c.replace("<sks>", "{}") in OBJECT_TEMPLATES for c in got[1:])
    assert trigger_captions([None], "x", templates=STYLE_TEMPLATES)[0].replace("x", "{}") in STYLE_TEMPLATES
    with pytest.raises(ValueError, match="1 caption\\(s\\) do not mention the trigger word '<sks>'"):
        trigger_captions(["a <sks>", "a red circle"], "<sks>")
    with pytest.raises(ValueError, match="'\\{\\}'"):
        template_captions("x", 2, templates=("no slot",))


def test_registered_methods_need_the_trigger_word():
    system = build_toy(seed=1)
    for name in ("textual-inversion", "dreamartist"):
        assert METHODS[name].trigger
        with pytest.raises(ValueError, match="--token"):
            METHODS[name].adapt(system)
    adaptation = METHODS["textual-inversion"].adapt(system, seed=0, token="purple", vectors=2)
    assert adaptation.params[0].shape == (2, 64)
    adaptation.remove()


# ------------------------------------------------------------------------------ DreamArtist
def test_dreamartist_prediction_is_the_cfg_of_two_unet_calls(data):
    system = build_toy(seed=4)
    da = prepare_dreamartist(system, token="purple", negative_vectors=2, cfg_scale=2.0, cfg_high=4.0, cfg_schedule="cos")
    ids = da.tokenize(["a purple circle", "a red square"])
    assert ids.shape == (2, 2, 16)
    neg_ids = system.tokenize(["a purple-neg circle"])[0]
    assert torch.equal(ids[0, 1], neg_ids) and torch.equal(ids[1, 0], ids[1, 1])  # no trigger: same caption twice
    assert neg_ids[2:4].tolist() == da.negative.token_ids["text_encoder"]
    x, t = torch.randn(2, 12, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        got = da.training_model(system)(x, t, ids)
        den = system.denoiser()
        e_pos, e_neg = den(x, t, system.condition(ids[:, 0])), den(x, t, system.condition(ids[:, 1]))
    r = t.double() / 999
    s = (2.0 + 2.0 * torch.sin(r * math.pi / 2)).view(-1, 1, 1, 1)
    want = e_neg.double() + s * (e_pos.double() - e_neg.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    da.remove()


def test_dreamartist_trains_both_embeddings_writes_the_a1111_pair_and_samples(tmp_path, data):
    images, captions = data
    system = build_toy(seed=5)
    snapshot = _snapshot(system)
    da = prepare_dreamartist(system, token="purple", vectors=1, negative_vectors=2, neg_lr_weight=0.0)
    pos0, neg0 = (p.detach().clone() for p in da.params)
    assert da.lr_scales == [1.0, 0.0] and neg0.shape == (2, 64)
    fit(system, da, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=1e-2))
    assert not torch.equal(da.params[0].detach(), pos0) and torch.equal(da.params[1].detach(), neg0)  # neg lr 0: frozen
    path = da.save(tmp_path / "purple.pt")
    assert path.name == "purple.pt" and (tmp_path / "purple-neg.pt").is_file()
    neg_file = torch.load(tmp_path / "purple-neg.pt", weights_only=True)
    assert neg_file["name"] == "purple-neg" and neg_file["string_to_param"]["*"].shape == (2, 64)
    positive, negative = load_dreamartist(path)
    assert positive.name == "purple" and negative.name == "purple-neg"
    ours = da.sample(["a purple circle"], seed=3, steps=4)
    da.remove()
    assert _unchanged(system, snapshot) and system.tokenizer.added == {}
    again = sample_dreamartist(system, ["a purple circle"], positive, negative, guidance=da.cfg_scale, seed=3, steps=4)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    assert system.tokenizer.added == {}  # the helper removes what it injected


def test_dreamartist_reconstruction_loss_goes_through_the_decoder(data):
    images, captions = data
    system = build_toy(seed=6)
    da = prepare_dreamartist(system, token="purple", rec_weight=0.5)
    latents = system.encode_images(images[:2])
    t = torch.tensor([100, 600])
    x_t = torch.randn_like(latents)
    prediction = torch.randn_like(latents, requires_grad=True)
    loss = da.extra_loss({"x_t": x_t, "t": t, "latents": latents}, prediction)
    a = system.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
    want = 0.5 * (system.decode_latents(x0) - images[:2].clamp(-1, 1)).abs().mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    fit(system, da, images, captions, config=FitConfig(steps=1, batch_size=2, learning_rate=1e-2))
    da.remove()

    class NoGradDecoder(type(system)):
        @torch.no_grad()
        def decode_latents(self, latents):
            return super().decode_latents(latents)

    blind = build_toy(seed=6)
    blind.__class__ = NoGradDecoder
    da = prepare_dreamartist(blind, token="purple", rec_weight=1.0)
    with pytest.raises(ValueError, match="no gradients"):
        fit(blind, da, images, captions, config=FitConfig(steps=1, batch_size=2))
    da.remove()


def test_sdxl_system_trains_clip_l_and_clip_g_rows_together(tmp_path):
    pytest.importorskip("diffusers")
    from tiny_checkpoints import tiny_sdxl_parts

    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import DiffusersSystem

    parts = tiny_sdxl_parts()  # two 49408-token CLIP encoders (64 wide), the shipped CLIP vocabulary
    tokenizers = [CLIPTokenizer.load(None, pad=pad).to_transformers() for pad in ("eos", "!")]
    system = DiffusersSystem(parts["unet"], parts["vae"], parts["text_encoder"], tokenizers[0], {},
                             text_encoder_2=parts["text_encoder_2"], tokenizer_2=tokenizers[1]).requires_grad_(False)
    assert system.base_model == "sdxl"
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    captions = ["a photo of <sks>", "<sks> on a table"]
    ti = prepare_textual_inversion(system, token="<sks>", vectors=2, init_word="dog")
    assert [tuple(p.shape) for p in ti.params] == [(2, 64), (2, 64)]  # clip_l and clip_g rows (tiny widths)
    start = [p.detach().clone() for p in ti.params]
    fit(system, ti, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=1e-1))
    assert all(not torch.equal(p.detach(), s) for p, s in zip(ti.params, start))  # both encoders' rows trained
    emb = sdadapt.load_embedding(ti.save(tmp_path / "sks.safetensors"))
    assert emb.is_sdxl and emb.count == 2 and emb.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    ti.remove()
    assert len(system.tokenizer) == len(system.tokenizer_2) == 49408
    da = prepare_dreamartist(system, token="<sks>")
    ids = da.tokenize(captions)
    assert ids.shape == (2, 2, 2, 77)  # (N, positive/negative, both tokenizers, L)
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([5, 500])
    side = float(system.image_size)  # the default size conditioning, given explicitly
    sizes = torch.tensor([[side, side, 0, 0, side, side]]).expand(2, 6)
    with torch.no_grad():  # the size-conditioned (dict) batch form splits the same way
        plain = da.training_model(system)(x, t, ids)
        sized = da.training_model(system)(x, t, {"ids": ids, "time_ids": sizes})
    torch.testing.assert_close(plain, sized)
    fit(system, da, images, captions, config=FitConfig(steps=1, batch_size=2, learning_rate=1e-2))
    da.remove()


def test_sdxl_norm_penalty_holds_each_encoders_rows_at_its_own_tables_scale():
    """``norm_weight`` on SDXL: clip_l's rows are pulled to CLIP-L's mean row norm, clip_g's to CLIP-G's (one
    averaged target pulled both away from their tables); rows started from a word sit at their table's scale."""
    pytest.importorskip("diffusers")
    from tiny_checkpoints import tiny_sdxl_parts

    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.methods.textual_inversion import norm_penalty

    parts = tiny_sdxl_parts()
    with torch.no_grad():
        parts["text_encoder_2"].get_input_embeddings().weight.mul_(3.0)  # (the two tables' scales differ)
    tokenizers = [CLIPTokenizer.load(None, pad=pad).to_transformers() for pad in ("eos", "!")]
    system = DiffusersSystem(parts["unet"], parts["vae"], parts["text_encoder"], tokenizers[0], {},
                             text_encoder_2=parts["text_encoder_2"], tokenizer_2=tokenizers[1]).requires_grad_(False)
    ti = prepare_textual_inversion(system, token="<sks>", vectors=2, init_word="dog", norm_weight=0.5)
    try:
        want, means = 0.0, {}
        for key, encoder in (("clip_l", parts["text_encoder"]), ("clip_g", parts["text_encoder_2"])):
            table = encoder.get_input_embeddings().weight.detach().double()
            means[key] = float(table.norm(dim=-1).mean())
            rows = ti.handle.rows[key].rows.detach().double()
            want += float(((rows.norm(dim=-1) - means[key]) ** 2).mean())
        got = float(ti.extra_loss(None, None))
        assert got == pytest.approx(0.5 * want, rel=1e-4)
        shared = sum(means.values()) / 2  # (the one averaged target it used: far from both, a much larger penalty)
        before = 0.5 * sum(float(norm_penalty(ti.handle.rows[key].rows, shared)) for key in means)
        assert before > 2 * got
    finally:
        ti.remove()
