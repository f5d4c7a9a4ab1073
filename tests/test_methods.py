"""Every registered method: trains only its parameters, saves a loadable file, and removes exactly."""

from __future__ import annotations

import pytest
import torch

import sdadapt
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_saves_and_removes_exactly(name, tmp_path):
    system = build_toy(seed=1)
    originals = {part: {k: v.clone() for k, v in getattr(system, part).state_dict().items()} for part in ("unet", "text_encoder")}
    method = METHODS[name]
    adaptation = method.prepare(system, **({"token": "cross"} if method.trigger else {}))  # trigger-word methods learn "cross"
    images, captions = concept_data("cross", 4, seed=0)
    prior = (images.flip(0), captions[::-1], 0.5) if method.prior != "off" else None
    before = [p.detach().clone() for p in adaptation.params]
    losses = fit(system, adaptation, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=method.learning_rate),
                 prior=prior)
    assert len(losses) == 2 and all(v == v for v in losses)
    assert any(not torch.equal(p, q) for p, q in zip(adaptation.params, before))  # it trained
    path = adaptation.save(tmp_path / f"out{method.file_suffix}")
    if isinstance(adaptation, sdadapt.methods.AdapterAdaptation):
        state, _ = sdadapt.load_lora(path)
        fresh = build_toy(seed=1)
        for component, handle in adaptation.handles.items():
            loaded = sdadapt.load_adapter(getattr(fresh, component), state[component])
            assert len(loaded) == len(handle)
    elif isinstance(adaptation, sdadapt.methods.HypernetworkAdaptation):
        loaded = sdadapt.load_hypernetwork(path)  # the A1111 .pt
        handle = sdadapt.inject_hypernetwork(build_toy(seed=1).unet, loaded)
        assert len(handle) == len(adaptation.handle)
    elif isinstance(adaptation, (sdadapt.methods.TextualInversion, sdadapt.methods.DreamArtist)):
        # an embedding file (DreamArtist: + out-neg.pt); A1111's trigger is the file stem
        loaded = sdadapt.load_embedding(path)
        assert loaded.name == "out" and torch.equal(loaded.vectors["text_encoder"], adaptation.params[0].detach())
    elif isinstance(adaptation, sdadapt.methods.CustomDiffusion):
        # diffusers' Custom Diffusion file (full attn2 K/V) + the modifier token beside it
        loaded = sdadapt.load_custom_diffusion(path)
        assert loaded.tokens == ["cross"] and loaded.weights.keys() == adaptation.state_dict().keys()
    elif isinstance(adaptation, sdadapt.methods.ClipInversionAdaptation):
        loaded = sdadapt.load_image_vectors(path)  # the image-space vector and the word it is bound to
        assert loaded.tokens == ("cross",) and torch.equal(loaded.vectors[0], adaptation.params[0].detach())
    else:
        tensors, meta = sdadapt.formats.files.read_safetensors(path)
        assert torch.equal(tensors["unet.conv_in.weight"], system.unet.state_dict()["conv_in.weight"])
    adaptation.remove()
    for part, state in originals.items():
        now = getattr(system, part).state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state), part


def test_fit_rejects_bad_input():
    system = build_toy()
    adaptation = METHODS["lora"].prepare(system)
    with pytest.raises(ValueError, match="captions"):
        fit(system, adaptation, torch.zeros(2, 3, 32, 32), ["a"], config=FitConfig(steps=1))
    with pytest.raises(ValueError, match="steps"):
        FitConfig(steps=0)


def _small_toy(*, seed: int):
    """An untrained toy system with a narrower UNet (16/32 channels): what its sampler draws costs a quarter."""
    from sdadapt.toy.clip import ToyCLIP
    from sdadapt.toy.system import ToySystem
    from sdadapt.toy.text_encoder import ToyTextEncoder
    from sdadapt.toy.tokenizer import ToyTokenizer
    from sdadapt.toy.unet import ToyUNet

    torch.manual_seed(seed)
    vocab = len(ToyTokenizer())
    return ToySystem(ToyUNet(widths=(16, 32), groups=8), ToyTextEncoder(vocab_size=vocab), ToyCLIP(vocab_size=vocab))


class _RecordingToy:
    """The toy's own class prompts with a sampler that only records what it is asked to draw (blank images)."""

    def __init__(self):
        from sdadapt.toy.system import ToySystem

        self.class_prompts = ToySystem.class_prompts
        self.asked: list[list[str]] = []

    def sample(self, prompts, *, seed=0, steps=25):
        self.asked.append(list(prompts))
        return torch.zeros(len(prompts), 3, 32, 32)


def test_prior_images_follow_the_method_default_and_the_switches():
    from sdadapt.jobs import prior_images
    from sdadapt.toy.shapes import HELD_OUT_COLOURS, HELD_OUT_SHAPES

    system = _small_toy(seed=2)
    images, prompts, weight = prior_images(system, METHODS["lora"], count=2, seed=4, weight=0.5)
    assert images.shape == (2, 3, 32, 32) and weight == 0.5 and len(prompts) == 2
    # they are what the unadapted model draws for those prompts (DreamBooth's class images), as 8-bit pixels: what a
    # --class-data-dir PNG holds (sdadapt.training.class_folder.as_saved; diffusers' class images are 8-bit images too)
    from sdadapt.training.class_folder import as_saved

    drawn = system.sample(prompts, seed=4)
    torch.testing.assert_close(images, as_saved(drawn), rtol=0, atol=0)
    assert (images - drawn.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6
    # the default class prompts are held-in "a {colour} {shape}" (many drawn, on a sampler that only records)
    recorder = _RecordingToy()
    _, many, _ = prior_images(recorder, METHODS["lora"], count=40, seed=4)
    assert len(many) == 40 and sum(recorder.asked, []) == many
    assert not any(word in p.split() for p in prompts + many for word in HELD_OUT_SHAPES + HELD_OUT_COLOURS)
    assert prior_images(system, METHODS["full"], count=3) is None
    assert prior_images(system, METHODS["lora"], enabled=False, count=3) is None
    # a class prompt turns prior preservation on (even for 'full') and is what the images are drawn for
    _, prompts, _ = prior_images(recorder, METHODS["full"], class_prompt="a red circle", count=2)
    assert prompts == ["a red circle"] * 2 and recorder.asked[-1] == ["a red circle"] * 2
    # (turned off by name, DreamBooth trains without it: kohya's train_db.py without reg_data_dir, diffusers'
    # train_dreambooth.py without --with_prior_preservation)
    assert prior_images(system, METHODS["dreambooth"], enabled=False, count=3) is None
    with pytest.raises(ValueError, match="at least one"):
        prior_images(system, METHODS["dreambooth"], count=0)
    with pytest.raises(ValueError, match="weight"):
        prior_images(system, METHODS["dreambooth"], count=2, weight=-1.0)


def test_prior_images_on_a_user_model_need_a_class_prompt():
    from sdadapt.jobs import prior_images

    class NotToy:  # any system that is not the toy one: no built-in class prompts
        pass

    with pytest.raises(ValueError, match="--class-prompt"):
        prior_images(NotToy(), METHODS["dreambooth"], count=2)
    with pytest.raises(ValueError, match="--class-prompt"):
        prior_images(NotToy(), METHODS["lora"], enabled=True, count=2)
    assert prior_images(NotToy(), METHODS["lora"], count=2) is None


@pytest.mark.parametrize("name", ["lora", "loha", "dora"])
def test_same_seed_same_training_run_and_the_global_rng_is_left_alone(name):
    images, captions = concept_data("cross", 4, seed=0)
    starts, runs = [], []
    for _ in range(2):
        system = build_toy(seed=1)
        rng = torch.get_rng_state()
        adaptation = METHODS[name].adapt(system, seed=3)
        assert torch.equal(torch.get_rng_state(), rng)
        starts.append([p.detach().clone() for p in adaptation.params])
        fit(system, adaptation, images, captions, config=FitConfig(steps=2, batch_size=2, seed=3))
        runs.append([p.detach().clone() for p in adaptation.params])
    assert all(torch.equal(p, q) for p, q in zip(*starts)), "same seed, different initial adapters"
    assert all(torch.equal(p, q) for p, q in zip(*runs)), "same seed, different training run"
    other = METHODS[name].adapt(build_toy(seed=1), seed=4)  # another seed: other initial adapters
    assert any(not torch.equal(p, q) for p, q in zip(other.params, starts[0]))
