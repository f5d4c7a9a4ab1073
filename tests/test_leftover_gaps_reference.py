"""Five gaps left alone by earlier reviews, each against the reference it follows.

1. A 4-channel ``conv_in`` delta on an inpainting UNet's 9-channel ``conv_in`` in the live-adapter path
   (``load_adapter``), as ``apply_lora`` already merges it: A1111 AUTOMATIC1111/stable-diffusion-webui @873edba4
   ``extensions-builtin/Lora/networks.py`` ``network_apply_weights``: ``if len(self.weight.shape) == 4 and
   self.weight.shape[1] == 9: updown = F.pad(updown, (0, 0, 0, 0, 0, 5))`` (transcribed in
   tests/test_kohya_a1111_compat_reference.py); the adapter's Δy then reads the latent channels 0..3 only.
2. ``--clip-skip`` given as 1 vs not given: kohya-ss/sd-scripts @48d368fa557731ad0488c07304dfeba8c07910eb
   ``train_network.py:1028`` ``"ss_clip_skip": args.clip_skip`` (argparse default None, so "None" unless given and
   "1" when given as 1); ``library/train_util.py:4421-4422`` ``if args.v2 and args.clip_skip is not None:`` warns;
   ``library/sdxl_train_util.py:351-352`` ``if args.clip_skip is not None:`` warns.
3. ``load_system`` on a lambdalabs image-variation folder names the folder kind and the commands that take it.
4. ``require_interop``: the public home of diffusers_system's ``_require`` (same message).
5. A LoKr file whose ``lokr_w1_b`` and ``lokr_w2_b`` ranks differ: ComfyUI comfyanonymous/ComfyUI @179c2d35
   ``comfy/weight_adapter/lokr.py`` ``calculate_weight``: ``dim = w1_b.shape[0]`` when w1 is decomposed, then
   ``dim = w2_b.shape[0]`` when w2 is, ``alpha = v[2] / dim``; A1111 @17e14ed2 ``extensions-builtin/Lora/
   network_lokr.py:26-31``: ``self.dim`` from ``w1b`` then ``w2b`` (the last wins), ``network.py`` ``calc_scale`` =
   alpha / dim. LyCORIS KohakuBlueleaf/LyCORIS @f49d30d6 ``lycoris/modules/lokr.py:106-134`` makes both pairs with
   one ``lora_dim`` (it never writes such a file) and ``make_module_from_state_dict`` (247-342) takes ``lora_dim =
   w1a.size(1)`` and then fails copying a w2 pair of another rank: so the file is read as A1111/ComfyUI read it.
   (The two readers' transcriptions are tests/test_apply_reference.py's ``comfy_weight`` / ``a1111_updown``.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_apply_reference import a1111_updown, comfy_weight
from torch import nn

from sdadapt import apply_lora, load_adapter
from sdadapt.adapters.lokr import LoKrModule
from sdadapt.adapters.registry import file_layer_delta
from sdadapt.diffusers_system import ModelFolderError
from sdadapt.jobs import TrainOptions
from sdadapt.jobs.models import load_system
from sdadapt.jobs.train import _clip_skip_notes

F64 = torch.float64


# ------------------------------------------------------------------------------ 1. inpainting conv_in, live adapter
def _conv_in_model(name: str = "conv_in") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.add_module(name, nn.Conv2d(9, 6, 3, padding=1).to(F64))
    return model


def _states(prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """4-input-channel conv_in deltas of three families (out 6, kernel 3x3)."""
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    return {
        "lora": {f"{prefix}.lora_down.weight": r(2, 4, 3, 3), f"{prefix}.lora_up.weight": r(6, 2, 1, 1),
                 f"{prefix}.alpha": torch.tensor(1.0, dtype=F64)},
        "lokr": {f"{prefix}.lokr_w1": r(2, 2), f"{prefix}.lokr_w2": r(3, 2, 3, 3),
                 f"{prefix}.alpha": torch.tensor(3.0, dtype=F64)},
        "full": {f"{prefix}.diff": r(6, 4, 3, 3), f"{prefix}.diff_b": r(6)},
    }


def _a1111_lora_updown64(down, up, alpha, multiplier):
    """network_lora.py calc_updown (rebuild_conventional), network.py finalize_updown's scale, networks.py's pad."""
    updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(6, 4, 3, 3)
    updown = updown * (alpha / down.shape[0]) * multiplier
    return torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))


@pytest.mark.parametrize("family", ["lora", "lokr", "full"])
def test_load_adapter_on_an_inpainting_conv_in_equals_apply_lora(family):
    state = _states("conv_in")[family]
    x = torch.randn(2, 9, 5, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    merged = _conv_in_model()
    w0, b0 = merged.conv_in.weight.detach().clone(), merged.conv_in.bias.detach().clone()
    applied = apply_lora(merged, state, scale=0.7)
    want_w, want_y = merged.conv_in.weight.detach().clone(), merged.conv_in(x).detach()
    applied.undo()

    model = _conv_in_model()
    handle = load_adapter(model, state, dtype=F64)
    handle.set_scale(0.7)
    torch.testing.assert_close(model.conv_in(x).detach(), want_y, rtol=1e-12, atol=1e-12)  # the hook: x[:, :4]
    assert handle.state_dict().keys() == state.keys()  # the file's own keys, nothing of the padding
    assert all(torch.equal(handle.state_dict()[k], v) for k, v in state.items())
    handle.merge()
    assert torch.equal(model.conv_in.weight.detach(), want_w)  # the zero-padded delta, as apply_lora
    torch.testing.assert_close(model.conv_in(x).detach(), want_y, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.conv_in.weight.detach()[:, 4:], w0[:, 4:])  # mask / masked-image channels unchanged
    handle.unmerge()
    assert torch.equal(model.conv_in.weight.detach(), w0) and torch.equal(model.conv_in.bias.detach(), b0)
    handle.remove()
    assert list(model.state_dict()) == ["conv_in.weight", "conv_in.bias"]
    if family == "lora":  # A1111's own numbers
        want = w0 + _a1111_lora_updown64(state["conv_in.lora_down.weight"], state["conv_in.lora_up.weight"], 1.0, 0.7)
        torch.testing.assert_close(want_w, want, rtol=1e-12, atol=1e-15)


def test_load_adapter_on_an_inpainting_conv_in_takes_a_new_alpha_from_load_state_dict():
    """The handle's load_state_dict refreshes the padded adapter's scale (alpha 1 -> 2: twice the delta)."""
    state = _states("conv_in")["lora"]
    model = _conv_in_model()
    handle = load_adapter(model, state, dtype=F64)
    handle.load_state_dict({**state, "conv_in.alpha": torch.tensor(2.0, dtype=F64)})
    handle.merge()
    want = _conv_in_model()
    apply_lora(want, state, scale=2.0)
    torch.testing.assert_close(model.conv_in.weight.detach(), want.conv_in.weight.detach(), rtol=1e-12, atol=1e-14)


def test_load_adapter_pads_the_ldm_name_and_still_refuses_other_mismatches():
    ldm = nn.Module()
    ldm.add_module("input_blocks", nn.ModuleList([nn.ModuleList([_conv_in_model().conv_in])]))
    state = _states("input_blocks.0.0")["lora"]
    handle = load_adapter(ldm, state, dtype=F64)
    handle.merge()
    plain = _conv_in_model()
    apply_lora(plain, _states("conv_in")["lora"])
    assert torch.equal(ldm.input_blocks[0][0].weight.detach(), plain.conv_in.weight.detach())
    with pytest.raises(ValueError):  # a 4-channel delta on a 9-channel layer that is not conv_in
        load_adapter(_conv_in_model("conv_other"), _states("conv_other")["lora"])
    dora = {**_states("conv_in")["lora"], "conv_in.dora_scale": torch.ones(6, 1, 1, 1, dtype=F64)}
    with pytest.raises(ValueError, match="DoRA"):  # DoRA reads the 9-channel base weight: refused as apply_lora does
        load_adapter(_conv_in_model(), dora)


def test_generate_lora_on_an_inpainting_model_with_a_plain_models_lora(tmp_path_factory, tmp_path, capsys):
    """A kohya LoCon made on a plain model (conv_in of 4 channels, and an attention layer) on a 9-channel inpainting
    folder: ``generate --lora`` merges it (conv_in padded, through apply_lora) and writes the image."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from sdadapt.cli import main
    from sdadapt.images import decode_png
    from tests.test_inpaint import _plain_sd_folder, with_inpainting_unet

    root = tmp_path_factory.mktemp("inpaint_lora")
    shutil.copytree(_plain_sd_folder(tmp_path_factory), root, dirs_exist_ok=True)
    with_inpainting_unet(root)
    g = torch.Generator().manual_seed(2)
    lora = {"lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
            "lora_unet_conv_in.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
            "lora_unet_conv_in.alpha": torch.tensor(2.0)}
    save_file(lora, str(tmp_path / "locon.safetensors"))
    assert main(["generate", "--model", str(root), "--prompt", "a photo", "--steps", "1", "--sampler", "euler",
                 "--seed", "3", "--out", str(tmp_path / "lora.png"), "--lora", f"{tmp_path / 'locon.safetensors'}:0.5"]) == 0
    assert "at 0.5 (1 layer)" in capsys.readouterr().err  # (the run report: conv_in merged, padded)
    assert decode_png((tmp_path / "lora.png").read_bytes()).shape[:2] == (32, 32)


# ------------------------------------------------------------------------------ 2. --clip-skip given as 1
def test_clip_skip_given_as_1_is_told_apart_from_not_given_as_kohya_does():
    assert TrainOptions(images=".").clip_skip is None  # kohya's argparse default
    assert TrainOptions(images=".", clip_skip=1).clip_skip == 1
    with pytest.raises(ValueError, match="clip-skip"):
        TrainOptions(images=".", clip_skip=0)
    # kohya's verify_training_args / verify_sdxl_training_args: `clip_skip is not None` -> a warning, 1 included
    assert len(_clip_skip_notes(TrainOptions(images=".", clip_skip=1), "sd2")) == 1
    assert len(_clip_skip_notes(TrainOptions(images=".", clip_skip=1), "sdxl")) == 1
    assert "nothing changes" in _clip_skip_notes(TrainOptions(images=".", clip_skip=1), "sd2")[0]
    assert _clip_skip_notes(TrainOptions(images="."), "sd2") == []
    assert _clip_skip_notes(TrainOptions(images=".", clip_skip=1), "sd1") == []


@pytest.mark.parametrize("given, used", [(None, 1), (1, 1), (2, 2)])
def test_the_model_is_loaded_with_the_clip_skip_given_and_1_without(given, used, tmp_path, monkeypatch):
    from sdadapt.images import write_png
    from sdadapt.jobs import train as train_job

    images = tmp_path / "imgs"
    images.mkdir()
    write_png(images / "a.png", torch.zeros(3, 32, 32))
    (images / "a.txt").write_text("a red circle")
    seen = {}

    class Stop(Exception):
        pass

    def fake_load_system(model, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(train_job, "load_system", fake_load_system)
    with pytest.raises(Stop):
        train_job.run_train("lora", TrainOptions(images=str(images), model="toy", clip_skip=given, steps=1))
    assert seen["clip_skip"] == used


def _kohya_ss_clip_skip(clip_skip):
    """train_network.py:1028 ``"ss_clip_skip": args.clip_skip`` made text with every metadata value (1223)."""
    return str(clip_skip)


def test_ss_clip_skip_is_none_unless_given_and_1_when_given_as_1(tmp_path):
    """One toy step each way (the toy takes --clip-skip 1 only: it has one text layer to read)."""
    from safetensors import safe_open

    from sdadapt.cli import main
    from sdadapt.images import write_png

    images = tmp_path / "imgs"
    images.mkdir()
    write_png(images / "a.png", torch.zeros(3, 32, 32))
    (images / "a.txt").write_text("a red circle")
    for given, extra in ((None, []), (1, ["--clip-skip", "1"])):
        out = tmp_path / f"m{given}.safetensors"
        assert main(["train", "lora", "--images", str(images), "--model", "toy", "--steps", "1", "--batch-size", "1",
                     "--no-prior", "-q", "-o", str(out), *extra]) == 0
        with safe_open(str(out), "pt") as file:
            assert file.metadata()["ss_clip_skip"] == _kohya_ss_clip_skip(given)


# ------------------------------------------------------------------------------ 3. image-variation folder
def test_load_system_names_an_image_variation_folder_and_its_commands(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "image_encoder").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImageVariationPipeline"}))
    with pytest.raises(ModelFolderError) as info:
        load_system(str(tmp_path))
    message = str(info.value)
    assert "image-variation" in message and "clip-invert" in message and "--image-vectors" in message
    assert "missing" not in message  # not the generic "not a diffusers Stable Diffusion folder (missing ...)"


# ------------------------------------------------------------------------------ 4. require_interop
def test_require_interop_is_the_one_public_helper():
    import sdadapt.inversion.variation as variation
    from sdadapt.optional_packages import require_interop

    assert require_interop("torch") is torch
    with pytest.raises(ImportError, match=r'pip install "sdadapt\[interop\]"'):
        require_interop("sdadapt_no_such_package")
    assert "_require" not in vars(variation)  # (no private import of diffusers_system's helper any more)


# ------------------------------------------------------------------------------ 5. LoKr w1_b / w2_b ranks differ
@pytest.mark.parametrize("layout", ["both", "w1_only", "w2_only"])
def test_lokr_with_different_ranks_reads_as_a1111_and_comfyui(layout):
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    w = {}  # layer (out 8 = 2·4, in 12 = 3·4): w1 (2, 3), w2 (4, 4)
    if layout in ("both", "w1_only"):
        w["w1_a"], w["w1_b"] = r(2, 1), r(1, 3)
    else:
        w["w1"] = r(2, 3)
    if layout in ("both", "w2_only"):
        w["w2_a"], w["w2_b"] = r(4, 3), r(3, 4)
    else:
        w["w2"] = r(4, 4)
    alpha = 6.0
    tensors = {f"lokr_{k}": v for k, v in w.items()} | {"alpha": torch.tensor(alpha, dtype=F64)}
    from sdadapt.adapters.base import LayerGeometry

    geometry = LayerGeometry(8, 12)
    delta, _ = file_layer_delta(tensors, geometry, scale=0.8, dtype=F64, name="layer")
    zero = torch.zeros(8, 12, dtype=F64)
    comfy = comfy_weight(tensors, zero, 0.8)  # (ComfyUI's patched weight over a zero weight: its delta)
    torch.testing.assert_close(delta, comfy, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(delta, a1111_updown(tensors, zero, 0.8)[0], rtol=1e-12, atol=1e-14)
    module = LoKrModule.from_file_tensors(geometry, tensors, name="layer")
    assert {k: tuple(v.shape) for k, v in module.file_tensors().items() if k != "alpha"} == \
        {f"lokr_{k}": tuple(v.shape) for k, v in w.items()}  # the file's shapes back, both ranks kept
    assert float(module.file_tensors()["alpha"]) == alpha
    x = r(5, 12)
    torch.testing.assert_close(module.to(F64)(x) * 0.8, x @ comfy.T, rtol=1e-10, atol=1e-12)
    rank = 3 if "w2_b" in w else 1
    assert LoKrModule.file_rank({f"lokr_{k}": tuple(v.shape) for k, v in w.items()})[0] == rank  # the scale's rank
