"""Null-text inversion follow-ups (b20 review): prompts read as the sampler reads them, --optimize-pooled refused
before the load, damaged ``sdadapt-inversion/3`` files refused.

1. ``invert_image`` / ``regenerate_image`` condition the prompt (and the edit prompt) through
   ``DiffusersSystem.prompt_condition`` — A1111 emphasis, ``BREAK`` / long-prompt chunks, as ``generate`` samples the
   text — and a plain prompt exactly as before (``condition(tokenize([prompt]))``); systems without that reader
   (the toy) keep ``condition(tokenize)``.
2. ``run_invert(optimize_pooled=True)`` on a model the folder / header tells is not SDXL raises before
   ``load_system`` runs.
3. A ``/3`` file without ``null_keys`` (or with an empty list) is refused, naming the file.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_inversion_loose_ends import DictDenoiser, _data
from test_inversion import _schedule

from sdadapt.formats.files import WeightFileError, read_safetensors, write_safetensors
from sdadapt.inversion import invert_image, invert_latents, load_inversion, regenerate_image, save_inversion

SIZE = 16


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def system(request, tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    # (clip skip 2 on SD1: the tiny encoder's final LayerNorm has no affine part, so its states' mean is 0 and
    # A1111's mean restore divides by it; the penultimate states, as SDXL's, have a mean)
    built = tiny_diffusers_system(tmp_path_factory.mktemp(request.param), max_token_length=75,
                                  sdxl=request.param == "sdxl", clip_skip=2 if request.param == "sd1" else 1)
    built.image_size = SIZE
    return built


def _image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def _sampler_conditions(system, prompt: str, negative: str):
    """(cond, uncond) that DiffusersSystem.sample hands the sampler for ``prompt`` at the native size."""
    time_ids = system._size_time_ids(1, SIZE, SIZE)
    with torch.no_grad():
        _, cond, uncond, _ = system._guidance_inputs(system.denoiser(), [prompt], negative=negative, cond=None,
                                                     plan=None, time_ids=time_ids, guidance=7.5)
    return cond, uncond


def test_emphasised_prompt_inverts_with_the_samplers_condition(system):
    prompt, negative = "a (cat:1.3) on a [mat]", "(blurry:1.5)"
    inv = invert_image(system, _image(1), prompt, method="ddim", num_steps=2, negative=negative)
    cond, uncond = _sampler_conditions(system, prompt, negative)
    assert _equal(inv.cond, cond) and _equal(inv.uncond, uncond)
    with torch.no_grad():  # (the emphasis changes the condition: the old plain reading is another tensor)
        plain = system.condition(system.tokenize([prompt]))
    key = "context" if isinstance(plain, dict) else None
    assert not torch.equal(plain[key] if key else plain, inv.cond[key] if key else inv.cond)


def test_plain_prompt_is_bit_identical_to_condition_of_tokenize(system):
    prompt = "a red cube on a blue floor"
    inv = invert_image(system, _image(2), prompt, method="ddim", num_steps=2)
    with torch.no_grad():
        before = system.condition(system.tokenize([prompt]))
    assert _equal(inv.cond, before)


def test_break_prompt_is_read_in_a1111_chunks(system):
    """``BREAK`` starts a new 77-token chunk, each encoded on its own (A1111's layout, generate's prompt plan)."""
    inv = invert_image(system, _image(3), "a red cube BREAK a blue ball", method="ddim", num_steps=1,
                       negative="blurry BREAK dark")
    with torch.no_grad():
        first, second = (system.condition(system.tokenize([p])) for p in ("a red cube", "a blue ball"))
    ctx = inv.cond["context"] if isinstance(inv.cond, dict) else inv.cond
    one, two = ((c["context"] if isinstance(c, dict) else c) for c in (first, second))
    assert ctx.shape[1] == 2 * one.shape[1]
    torch.testing.assert_close(ctx, torch.cat([one, two], dim=1), rtol=0, atol=1e-6)
    # the negative too (generate's prompt plan reads both texts so)
    with torch.no_grad():
        parts = [system.condition(system.tokenize([p])) for p in ("blurry", "dark")]
    parts = [p["context"] if isinstance(p, dict) else p for p in parts]
    null = inv.uncond["context"] if isinstance(inv.uncond, dict) else inv.uncond
    torch.testing.assert_close(null, torch.cat(parts, dim=1), rtol=0, atol=1e-6)


def test_edit_prompt_is_read_as_the_sampler_reads_it(system, monkeypatch):
    import sdadapt.inversion.invert as invert_module

    inv = invert_image(system, _image(4), "a red cube", method="ddim", num_steps=2)
    seen = {}
    real = invert_module.sample_inversion

    def spy(model, inversion, *, cond=None, **kw):
        seen["cond"] = cond
        return real(model, inversion, cond=cond, **kw)

    monkeypatch.setattr(invert_module, "sample_inversion", spy)
    regenerate_image(system, inv, prompt="a (blue:1.4) cube")
    assert _equal(seen["cond"], _sampler_conditions(system, "a (blue:1.4) cube", "")[0])


def test_a_system_without_the_reader_gets_the_text_generate_hands_it():
    """A model with neither ``prompt_condition`` nor ``tokenize_weighted`` (the toy's interface): the inversion
    conditions it on the text with A1111 emphasis taken out, as ``generate`` hands such a model its prompt."""
    class Plain:  # (the toy's interface: tokenize + condition, no prompt_condition)
        alphas_cumprod = _schedule(torch.float32)
        prediction_type, image_size = "epsilon", 8

        def encode_images(self, x):
            return x.mean(1, keepdim=True).expand(-1, 4, -1, -1)

        def tokenize(self, prompts):
            return torch.tensor([[len(p), p.count("(")] for p in prompts], dtype=torch.float32)

        def condition(self, ids):
            return ids[:, None, :].expand(-1, 3, -1).repeat(1, 1, 4)  # (B, 3, 8)

        def denoiser(self):
            model = DictDenoiser()
            return lambda x, t, cond: model(x, t, {"context": cond, "text_embeds": torch.zeros(x.shape[0], 5)})

    plain = Plain()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    inv = invert_image(plain, image, "a (cat:1.3)", method="ddim", num_steps=2)
    assert torch.equal(inv.cond, plain.condition(plain.tokenize(["a cat"])))


# ----------------------------------------------------------------------------- (2) --optimize-pooled before the load
def test_optimize_pooled_on_a_non_sdxl_model_is_refused_before_the_load(tmp_path, monkeypatch):
    import sdadapt.jobs as jobs
    from sdadapt.inversion.job import run_invert

    loads = []

    class Loaded(Exception):
        pass

    def spy(model, **kw):
        loads.append(model)
        raise Loaded

    monkeypatch.setattr(jobs, "load_system", spy)
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    sd1, xl = tmp_path / "sd1", tmp_path / "xl"
    for folder in (sd1, xl):
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
    (xl / "text_encoder_2").mkdir()
    with pytest.raises(ValueError, match=r"--optimize-pooled.*no pooled text embedding"):
        run_invert(image, model=str(sd1), prompt="a cube", out=tmp_path / "o.png", optimize_pooled=True)
    assert loads == []
    with pytest.raises(Loaded):  # an SDXL folder goes on to the load
        run_invert(image, model=str(xl), prompt="a cube", out=tmp_path / "o.png", optimize_pooled=True)
    with pytest.raises(Loaded):  # and without the option any model does
        run_invert(image, model=str(sd1), prompt="a cube", out=tmp_path / "o.png")
    assert loads == [str(xl), str(sd1)]


# ----------------------------------------------------------------------------- (3) damaged /3 files
def test_a_v3_file_without_null_keys_is_refused(tmp_path):
    x0, ctx_c, ctx_u = _data(6)
    cond = {"context": ctx_c, "text_embeds": torch.randn(1, 5, generator=torch.Generator().manual_seed(7))}
    uncond = {"context": ctx_u, "text_embeds": torch.zeros(1, 5)}
    inv = invert_latents(DictDenoiser(), x0, cond, uncond, alphas_cumprod=_schedule(torch.float32), num_steps=2,
                         inner_steps=1, extra_keys=("text_embeds",))
    tensors, meta = read_safetensors(save_inversion(tmp_path / "good.safetensors", inv))
    assert load_inversion(tmp_path / "good.safetensors").null_extra.keys() == {"text_embeds"}
    gone = {k: v for k, v in meta.items() if k != "null_keys"}
    write_safetensors(tmp_path / "nokeys.safetensors", tensors, gone)
    with pytest.raises(WeightFileError, match=r"nokeys\.safetensors.*no 'null_keys' metadata"):
        load_inversion(tmp_path / "nokeys.safetensors")
    write_safetensors(tmp_path / "empty.safetensors", tensors, {**meta, "null_keys": json.dumps([])})
    with pytest.raises(WeightFileError, match=r"empty\.safetensors.*null_keys '\[\]'"):
        load_inversion(tmp_path / "empty.safetensors")
    bare = {k: v for k, v in tensors.items() if k != "null_embeddings.text_embeds"}
    write_safetensors(tmp_path / "notensor.safetensors", bare, meta)
    with pytest.raises(WeightFileError, match=r"notensor\.safetensors.*lacks tensor 'null_embeddings\.text_embeds'"):
        load_inversion(tmp_path / "notensor.safetensors")
