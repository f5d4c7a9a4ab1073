"""A1111's "Pad prompt/negative prompt" and its "(v0)" (sdadapt.cond_padding) against A1111 v1.10's ``pad_cond``,
``pad_cond_uncond`` and ``pad_cond_uncond_v0`` (modules/sd_samplers_cfg_denoiser.py) transcribed below, through a
prompt plan's guidance, and ``generate --pad-conds / --pad-conds-v0`` end to end on a tiny diffusers model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdadapt.cond_padding import PAD_CONDS_FIELD, PAD_CONDS_V0_FIELD, CondPadding
from sdadapt.prompt_guidance import plan_prompt

D = 8


def _states(length: int, seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, length, D, generator=torch.Generator().manual_seed(seed))


EMPTY = _states(77, 99, batch=1)


def _a1111_pad(cond: torch.Tensor, uncond: torch.Tensor, v0: bool):
    """``pad_cond_uncond`` / ``pad_cond_uncond_v0`` as A1111 writes them (tensors; ``empty`` (1, 77, D))."""
    if v0:
        if uncond.shape[1] < cond.shape[1]:
            last = uncond[:, -1:]
            uncond = torch.hstack([uncond, last.repeat([1, cond.shape[1] - uncond.shape[1], 1])])
        elif uncond.shape[1] > cond.shape[1]:
            uncond = uncond[:, :cond.shape[1]]
        return cond, uncond
    num_repeats = (cond.shape[1] - uncond.shape[1]) // EMPTY.shape[1]
    if num_repeats < 0:
        cond = torch.cat([cond, EMPTY.repeat((cond.shape[0], -num_repeats, 1))], axis=1)
    elif num_repeats > 0:
        uncond = torch.cat([uncond, EMPTY.repeat((uncond.shape[0], num_repeats, 1))], axis=1)
    return cond, uncond


@pytest.mark.parametrize("v0", [False, True])
@pytest.mark.parametrize("lengths", [(154, 77), (77, 154), (231, 77), (77, 77)])
def test_padding_is_a1111s(v0, lengths):
    cond, uncond = _states(lengths[0], 1), _states(lengths[1], 2)
    seen = []
    (got_cond,), got_uncond = CondPadding(v0=v0, empty=None if v0 else EMPTY, seen=seen.append).pad([cond], uncond)
    want_cond, want_uncond = _a1111_pad(cond, uncond, v0)
    assert torch.equal(got_cond, want_cond) and torch.equal(got_uncond, want_uncond)
    assert seen == ([] if lengths[0] == lengths[1] else [PAD_CONDS_V0_FIELD if v0 else PAD_CONDS_FIELD])


def test_sdxl_dicts_pad_their_states_only_and_every_and_part():
    pooled = torch.randn(2, 4)
    parts = [{"context": _states(77, s), "text_embeds": pooled} for s in (1, 2)]
    uncond = {"context": _states(154, 3), "text_embeds": pooled * 2}
    padded, same = CondPadding(empty=EMPTY).pad(parts, uncond)
    for got, part in zip(padded, parts):
        assert torch.equal(got["context"], _a1111_pad(part["context"], uncond["context"], False)[0])
        assert got["text_embeds"] is pooled
    assert same is uncond
    _, cut = CondPadding(v0=True).pad(parts, uncond)
    assert torch.equal(cut["context"], uncond["context"][:, :77]) and cut["text_embeds"] is uncond["text_embeds"]


def test_bad_empty_states_are_refused():
    with pytest.raises(ValueError, match=r"empty prompt.*\(1, 77, D\), got \(2, 77, 8\)"):
        CondPadding(empty=_states(77, 1))
    with pytest.raises(ValueError, match="give CondPadding\\(empty=...\\)"):
        CondPadding().pad([_states(154, 1)], _states(77, 2))
    assert CondPadding().for_model(lambda: EMPTY).empty is EMPTY
    assert CondPadding(v0=True).for_model(lambda: EMPTY).empty is None


@pytest.mark.parametrize("v0", [False, True])
def test_a_plans_guidance_runs_the_padded_conditionings_in_one_call(v0):
    """A two-chunk prompt (``BREAK``) and a one-chunk negative: padded, both go through one model call (A1111's batch
    of cond and uncond), each row on its padded states; unpadded, two calls."""
    plan = plan_prompt("a BREAK b", "n", steps=2)
    cond, negative = _states(154, 4), _states(77, 5)
    calls = []

    def model(x, t, c):
        calls.append(c.shape)
        return x * c.mean(dim=(1, 2)).view(-1, 1, 1, 1) + c[:, -1, :4].reshape(-1, 4, 1, 1)

    x, t = torch.randn(2, 4, 3, 3), torch.full((2,), 500.0)
    got = plan.guidance(model, [cond], [negative], 7.5, pad_conds=CondPadding(v0=v0, empty=EMPTY))(x, t)
    assert calls == [torch.Size([4, 154, D])]
    cond_p, negative_p = _a1111_pad(cond, negative, v0)
    out_u, out_c = model(x, t, negative_p), model(x, t, cond_p)
    assert torch.equal(got, out_u + 7.5 * (out_c - out_u))
    calls.clear()
    plan.guidance(model, [cond], [negative], 7.5)(x, t)
    assert calls == [torch.Size([2, 77, D]), torch.Size([2, 154, D])]


def test_sample_latents_pads_a_prompt_and_negative_of_different_lengths():
    """``sample_latents(..., pad_conds=)`` (no prompt plan): the two run as one batch, each row on A1111's padded
    states — the run equals guiding the padded conditionings, and differs from the unpadded one."""
    from sampler_stand_ins import sd_alphas_cumprod

    from sdadapt.samplers import sample_latents

    cond, negative = _states(154, 6), _states(77, 7)
    calls = []

    def model(x, t, c):
        calls.append(c.shape[0])
        return x * c.mean(dim=(1, 2)).view(-1, 1, 1, 1) * 0.1

    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(8))
    run = {"sampler": "euler", "alphas_cumprod": sd_alphas_cumprod(), "num_steps": 3, "schedule": "karras",
           "guidance_scale": 5.0}
    got = sample_latents(model, x_T, cond, uncond=negative, pad_conds=CondPadding(empty=EMPTY), **run)
    assert calls == [4, 4, 4]
    cond_p, negative_p = _a1111_pad(cond, negative, False)
    assert torch.equal(got, sample_latents(model, x_T, cond_p, uncond=negative_p, **run))
    assert not torch.equal(got, sample_latents(model, x_T, cond, uncond=negative, **run))


# ---- generate --pad-conds on a tiny diffusers model ----------------------------------------------------------------
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("cond_padding"), prediction_type="epsilon")


def test_generate_pads_and_says_so(tiny_sd, tmp_path):
    from PIL import Image

    from sdadapt.jobs import run_generate

    run = {"model": str(tiny_sd), "prompt": "a cat BREAK a hat", "negative": "blurry", "steps": 3, "seed": 2,
           "sampler": "Euler", "schedule": "automatic", "width": 32, "height": 32}
    images = {}
    for name, options in (("plain", {}), ("pad", {"pad_conds": True}), ("v0", {"pad_conds_v0": True})):
        run_generate(out=tmp_path / f"{name}.png", **run, **options)
        image = Image.open(tmp_path / f"{name}.png")
        images[name] = (np.asarray(image), image.text["parameters"])
    assert "Pad conds" not in images["plain"][1]
    assert ", Pad conds: True, Version: " in images["pad"][1] and ", Pad conds v0: True, Version: " in images["v0"][1]
    assert not np.array_equal(images["pad"][0], images["plain"][0])
    assert not np.array_equal(images["v0"][0], images["plain"][0])
    # one chunk each: nothing to pad, nothing written, the same image
    run_generate(out=tmp_path / "short.png", **{**run, "prompt": "a cat"}, pad_conds=True)
    run_generate(out=tmp_path / "short_plain.png", **{**run, "prompt": "a cat"})
    short = Image.open(tmp_path / "short.png")
    assert "Pad conds" not in short.text["parameters"]
    assert np.array_equal(np.asarray(short), np.asarray(Image.open(tmp_path / "short_plain.png")))
    with pytest.raises(ValueError, match="--pad-conds and --pad-conds-v0.*give one"):
        run_generate(out=tmp_path / "x.png", **run, pad_conds=True, pad_conds_v0=True)


def test_diffusers_pads_with_its_own_states_of_the_empty_prompt(tiny_sd):
    """``DiffusersSystem.empty_prompt_states`` is the text encoder on ``""`` laid out as one chunk (77 tokens; this
    tiny model's 12; the tokenizer's own padding, diffusers' ``encode_prompt``), and ``sample`` pads with it."""
    from sdadapt.diffusers_system import DiffusersSystem

    system = DiffusersSystem.from_folder(tiny_sd)
    n = system.tokenizer.model_max_length
    ids = system.tokenizer([""], padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = system.text_encoder(ids)[0]
    empty = system.empty_prompt_states()
    assert empty.shape == want.shape == (1, n, want.shape[-1]) and torch.allclose(empty, want, atol=1e-6)
    plan = plan_prompt("a cat BREAK a hat", "blurry", steps=3)
    run = {"plan": plan, "seed": 1, "steps": 3, "sampler": "euler", "schedule": "automatic", "height": 32,
           "width": 32, "output": "latents"}
    filled = system.sample(["a cat BREAK a hat"], pad_conds=CondPadding(), **run)
    assert torch.equal(filled, system.sample(["a cat BREAK a hat"], pad_conds=CondPadding(empty=empty), **run))
    assert not torch.equal(filled, system.sample(["a cat BREAK a hat"], pad_conds=CondPadding(
        empty=torch.zeros_like(empty)), **run))



def test_generate_pads_with_the_empty_prompt_of_the_model_before_its_lora(tiny_sd, tmp_path, monkeypatch):
    """A1111 encodes ``""`` once when it loads a checkpoint, with no network active (``sd_models.get_empty_cond``
    after ``extra_networks.activate(p, {})``): a text-encoder LoRA merged for the run leaves what it pads with as the
    plain model's states of ``""`` (``DiffusersSystem.keep_empty_prompt_states`` before the merges)."""
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.jobs import run_generate
    from sdadapt.methods.lora import prepare_lora

    system = DiffusersSystem.from_folder(tiny_sd)
    plain = system.empty_prompt_states()
    adaptation = prepare_lora(system, rank=2, alpha=2.0, unet=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in adaptation.params:
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.3)
    with_lora = system.empty_prompt_states()
    assert (with_lora - plain).abs().max() > 1e-2  # (the LoRA changes the states of "": the test can tell)
    adaptation.save(tmp_path / "te.safetensors")
    adaptation.remove()
    kept = system.keep_empty_prompt_states()
    assert torch.equal(kept, plain) and "kept_empty_prompt" not in system.state_dict()
    used, real = [], CondPadding.pad

    def spied(self, conds, uncond):
        used.append(self.empty)
        return real(self, conds, uncond)

    monkeypatch.setattr(CondPadding, "pad", spied)
    run = {"model": str(tiny_sd), "prompt": "a cat BREAK a hat", "negative": "blurry", "steps": 2, "seed": 1,
           "sampler": "Euler", "schedule": "automatic", "width": 32, "height": 32, "pad_conds": True}
    run_generate(out=tmp_path / "lora.png", loras=[str(tmp_path / "te.safetensors")], **run)
    assert used and all(torch.equal(empty, plain) for empty in used)
