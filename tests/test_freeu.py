"""FreeU (:mod:`sdadapt.freeu`): the Fourier filter against diffusers' own and a float64 reference written here;
the hooks against diffusers' ``UNet2DConditionModel.enable_freeu`` and against ComfyUI's FreeU_V2 patch (Forge's
"FreeU Integrated", transcribed and run through diffusers' own FreeU call site), SD1- and SDXL-shaped UNets; removal
restores the model; ``generate --freeu`` end to end: Forge's infotext fields written and read back."""

from __future__ import annotations

import copy

import pytest
import tiny_sd_fixtures
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.freeu import FreeU, fourier_filter

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd

diffusers = pytest.importorskip("diffusers")


@settings(max_examples=25, deadline=None)
@given(h=st.integers(2, 12), w=st.integers(2, 12), scale=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
def test_the_fourier_filter_scales_the_lowest_frequencies(h, w, scale, seed):
    from diffusers.utils.torch_utils import fourier_filter as diffusers_filter

    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    got = fourier_filter(x, 1, scale)
    assert torch.equal(got, diffusers_filter(x, threshold=1, scale=scale))
    freq = torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(-2, -1)), dim=(-2, -1))  # (float64, by hand)
    cr, cc = h // 2, w // 2
    freq[..., cr - 1:cr + 1, cc - 1:cc + 1] *= scale
    reference = torch.fft.ifftn(torch.fft.ifftshift(freq, dim=(-2, -1)), dim=(-2, -1)).real
    assert torch.allclose(got.double(), reference, atol=1e-5)


def _unet(kind: str):
    torch.manual_seed(0)
    if kind == "sd1":  # (four levels, CrossAttn and plain up blocks: SD1.5's shape in small)
        return diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=16).eval()
    return diffusers.UNet2DConditionModel(  # (SDXL's: no attention at the first level, widths c, 2c, 4c)
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16).eval()


def _run(unet):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([300, 700]), ctx).sample


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_diffusers_version_is_enable_freeu(kind):
    unet = _unet(kind)
    plain = _run(unet)
    theirs_unet = copy.deepcopy(unet)
    theirs_unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    theirs = _run(theirs_unet)
    keys = list(unet.state_dict())
    with FreeU(unet, b1=1.3, b2=1.4, s1=0.9, s2=0.2, version="diffusers") as freeu:
        ours = _run(unet)
        assert freeu.skips == 6 and list(unet.state_dict()) == keys  # (the first two decoder blocks, 3 skips each)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (ours - plain).abs().max() > 1e-3
    assert torch.equal(_run(unet), plain)  # (removed)
    with FreeU(unet, b1=1.3, b2=1.4, s1=0.9, s2=0.0, version="diffusers") as off:  # (diffusers: any 0 turns it off)
        assert off.skips == 0 and torch.equal(_run(unet), plain)


def _comfyui_freeu_v2(model_channels, b1, b2, s1, s2):
    """ComfyUI's FreeU_V2 ``output_block_patch`` (Forge's ``patch_freeu_v2``), transcribed; its Fourier filter is
    diffusers' (the same code)."""
    from diffusers.utils.torch_utils import fourier_filter as filter_

    scale_dict = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def output_block_patch(h, hsp):
        scale = scale_dict.get(h.shape[1], None)
        if scale is not None:
            hidden_mean = h.mean(1).unsqueeze(1)
            B = hidden_mean.shape[0]
            hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
            hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
            hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (
                hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
            h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((scale[0] - 1) * hidden_mean + 1)
            hsp = filter_(hsp, threshold=1, scale=scale[1])
        return h, hsp

    return output_block_patch


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_v2_version_is_comfyuis_freeu_v2(kind, monkeypatch):
    """ComfyUI's patch runs at every skip concatenation of its output blocks; diffusers' up blocks call
    ``apply_freeu`` at each of theirs: the transcribed patch put there (every block enabled) is the reference."""
    from diffusers.models.unets import unet_2d_blocks

    unet = _unet(kind)
    plain = _run(unet)
    patch = _comfyui_freeu_v2(32, 1.3, 1.4, 0.9, 0.2)
    reference_unet = copy.deepcopy(unet)
    monkeypatch.setattr(unet_2d_blocks, "apply_freeu", lambda index, h, hsp, **_: patch(h, hsp))
    reference_unet.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    theirs = _run(reference_unet)
    with FreeU(unet, b1=1.3, b2=1.4, s1=0.9, s2=0.2) as freeu:
        ours = _run(unet)
    assert freeu.skips > 0
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (ours - plain).abs().max() > 1e-3


def test_a_unet_without_diffusers_decoder_or_a_bad_setting_is_refused():
    with pytest.raises(ValueError, match="diffusers' layout"):
        FreeU(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="FreeU version is one of v2, diffusers"):
        FreeU(_unet("sd1"), version="comfy")
    with pytest.raises(ValueError, match="finite"):
        FreeU(_unet("sd1"), b1=float("nan"))


# ---- generate --freeu ------------------------------------------------------------------------------------------------
def test_generate_writes_forges_fields_and_reads_them_back(tiny_sd, tmp_path):
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    base = ["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--steps", "3", "--width", "32", "--height",
            "32", "--sampler", "Euler", "--schedule", "karras", "--seed", "2"]
    assert main([*base, "--freeu", "--out", str(tmp_path / "a.png")]) == 0
    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert "freeu_enabled: True, freeu_b1: 1.01, freeu_b2: 1.02, freeu_s1: 0.99, freeu_s2: 0.95" in text
    assert main([*base, "--freeu", "1.3", "1.4", "0.9", "0.2", "--freeu-version", "diffusers",
                 "--out", str(tmp_path / "b.png")]) == 0
    text = Image.open(tmp_path / "b.png").text["parameters"]
    assert "freeu_b1: 1.3, freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2, FreeU version: diffusers" in text
    options, not_taken = infotext_options(parse_infotext(text))
    assert (options["freeu"], options["freeu_version"]) == ([1.3, 1.4, 0.9, 0.2], "diffusers")
    assert not [line for line in not_taken if "freeu" in line.lower()]
    assert main([*base, "--infotext", str(tmp_path / "b.png"), "--out", str(tmp_path / "c.png")]) == 0
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    a, b, c, plain = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("a", "b", "c", "plain"))
    assert np.array_equal(b, c) and not np.array_equal(a, plain) and not np.array_equal(b, a)


def test_generate_with_a_window_on_both_passes_writes_it_and_reads_it_back(tiny_sd, tmp_path, monkeypatch):
    """``--freeu-window`` with a hires pass on its own sampler: each pass launched with A1111's steps (the txt2img
    steps, then the hires pass's ``t_enc + 1``, its own steps) and counted with its own sampler; Forge's ``freeu_start`` /
    ``freeu_end`` written after ``freeu_s2`` and ``--infotext`` makes the same image."""
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.freeu import FreeUSteps

    launched = []
    original = FreeUSteps.launch
    monkeypatch.setattr(FreeUSteps, "launch", lambda self, steps: (launched.append((self.sampler, steps)),
                                                                   original(self, steps)))
    base = ["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--steps", "4", "--width", "32", "--height",
            "32", "--sampler", "Euler", "--schedule", "karras", "--seed", "2", "--hires-scale", "1.5",
            "--hires-steps", "4", "--hires-denoising", "0.5", "--hires-sampler", "Heun"]
    assert main([*base, "--freeu", "--freeu-window", "0.3", "0.7", "--out", str(tmp_path / "a.png")]) == 0
    # (A1111's hires pass: setup_img2img_steps with its steps given, t_enc = steps − 1: launch_sampling(t_enc + 1))
    assert launched == [("euler", 4), ("heun", 4)]
    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert "freeu_s2: 0.95, freeu_start: 0.3, freeu_end: 0.7" in text
    assert main([*base, "--infotext", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    assert main([*base, "--freeu", "--out", str(tmp_path / "every.png")]) == 0
    a, b, every = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("a", "b", "every"))
    assert np.array_equal(a, b) and not np.array_equal(a, every)


def test_generate_refuses_a_wrong_count_and_orphan_options(tiny_sd, tmp_path):
    from sdadapt.cli import main
    from sdadapt.jobs import run_generate

    with pytest.raises(ValueError, match="--freeu takes no value .* or four"):
        run_generate(model=str(tiny_sd), prompt="a cat", freeu=[1.1, 1.2], out=tmp_path / "a.png", steps=2)
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):  # (a usage error: argparse's exit 2)
        main(["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--freeu-version", "diffusers",
              "--out", str(tmp_path / "e.png")])
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_sd), "--prompt", "a cat", "--freeu-window", "0.2", "0.8",
              "--out", str(tmp_path / "f.png")])
    with pytest.raises(ValueError, match="--freeu-window is START END, fractions"):
        run_generate(model=str(tiny_sd), prompt="a cat", freeu=[], freeu_window=(0.5, 2.0), out=tmp_path / "g.png",
                     steps=2)
    assert not list(tmp_path.iterdir())


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "FreeU(toy.unet")
    assert not any(m._forward_pre_hooks for m in scope["toy"].unet.modules())


def test_newer_forges_window_is_read_back():
    """Newer Forge writes ``freeu_start`` / ``freeu_end``: taken as ``--freeu-window`` (0 and 1 too: every call)."""
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    head = "a cat\nSteps: 20, freeu_enabled: True, freeu_b1: 1.01, freeu_b2: 1.02, freeu_s1: 0.99, freeu_s2: 0.95, "
    for window in ((0.0, 1.0), (0.2, 0.8)):
        options, not_taken = infotext_options(parse_infotext(head + f"freeu_start: {window[0]}, freeu_end: {window[1]}"))
        assert options["freeu"] == [1.01, 1.02, 0.99, 0.95] and tuple(options["freeu_window"]) == window
        assert not [line for line in not_taken if "freeu" in line]
    with pytest.raises(ValueError, match="not the numbers Forge writes"):
        infotext_options(parse_infotext(head + "freeu_start: early"))


class _ForgeFreeU:
    """Forge's FreeU script's window, transcribed: ``denoiser_callback`` sets ``doFreeU`` before each model call from
    ``params.sampling_step / (params.total_sampling_steps − 1)``."""

    def __init__(self, start, end):
        self.freeu_start, self.freeu_end, self.doFreeU = start, end, True

    def denoiser_callback(self, sampling_step, total_sampling_steps):
        this_step = sampling_step / (total_sampling_steps - 1)
        self.doFreeU = self.freeu_start <= this_step <= self.freeu_end


def _a1111_sampling_steps(sampler: str, steps: int) -> list[int]:
    """A1111's ``state.sampling_step`` at each model call of a k-diffusion run of ``steps`` steps, written out: 0 until
    the first step's callback, then ``i`` after step ``i``'s callback, which comes after the step's first call (Euler:
    one call a step; Heun: two, one on the last step)."""
    seen, state = [], 0
    for i in range(steps):
        calls = 1 if sampler == "euler" or i == steps - 1 else 2
        for call in range(calls):
            seen.append(state)
            if call == 0:
                state = i  # (callback_state after the step's first call)
    return seen


@pytest.mark.parametrize("sampler,steps,window", [("euler", 8, (0.2, 0.6)), ("heun", 5, (0.0, 0.5)),
                                                   ("euler", 6, (0.5, 1.0))])
def test_the_window_runs_freeu_on_forges_calls(sampler, steps, window):
    """On A1111's grid the calls FreeU runs on (seen by its hook) are the ones Forge's callback turns on at A1111's
    sampling step of each call; the run equals one whose FreeU is switched by that list, and differs from FreeU on
    every call."""
    from sdadapt.freeu import FreeU, FreeUSteps
    from sdadapt.samplers import sample_latents
    from sdadapt.toy import build_toy

    toy = build_toy(seed=1)
    cond = toy.condition(toy.tokenize(["a red circle"]))
    uncond = toy.condition(toy.tokenize([""]))
    x = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(2))  # (the toy's latents of 32 px)
    forge = _ForgeFreeU(*window)
    expected = []
    for state in _a1111_sampling_steps(sampler, steps):
        forge.denoiser_callback(state, steps)
        expected.append(forge.doFreeU)
    assert any(expected) and not all(expected)

    def run(freeu, hook):
        seen = []
        probe = toy.unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda m, a: seen.append(freeu.active))
        try:
            out = sample_latents(toy.denoiser(), x, cond, uncond=uncond, guidance_scale=3.0, sampler=sampler,
                                 schedule="karras", alphas_cumprod=toy.alphas_cumprod, num_steps=steps,
                                 before_model_call=hook)
        finally:
            probe.remove()
        return out, seen

    with FreeU(toy.unet, b1=1.5, b2=1.6, s1=0.6, s2=0.4, window=window) as freeu:
        ours, seen = run(freeu, FreeUSteps(freeu, sampler=sampler))
        assert seen == expected
        calls = iter(expected)
        listed, _ = run(freeu, lambda done, call: setattr(freeu, "active", next(calls)))
        freeu.active = True
        everywhere, _ = run(freeu, None)
    assert torch.equal(ours, listed) and not torch.allclose(ours, everywhere)


def test_a_pass_of_one_step_and_a_bad_window():
    from sdadapt.freeu import FreeU
    from sdadapt.toy import build_toy

    toy = build_toy(seed=1)
    with FreeU(toy.unet, window=(0.0, 0.5)) as freeu:
        freeu.at_step(0, 1)  # (Forge divides by zero: 0 here, the window's start)
        assert freeu.active
        freeu.at_step(3, 5)
        assert not freeu.active
    with pytest.raises(ValueError, match="window"):
        FreeU(toy.unet, window=(0.2, 1.5))


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.6, 0.75, 1.0])
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_an_img2img_pass_launches_a1111s_t_enc_plus_one(strength, sampler):
    """``run_sampling_steps`` (what ``launch`` hears) of an img2img run on A1111's grid is A1111's
    ``setup_img2img_steps`` without "fix steps" (``t_enc = int(min(strength, 0.999)·steps)``), ``t_enc + 1``; the
    run's ``total_steps`` that, doubled for a second-order sampler."""
    from sdadapt.img2img import Img2ImgStart
    from sdadapt.samplers import run_sampling_steps, run_total_steps

    start = Img2ImgStart(torch.zeros(1, 4, 4, 4), strength=strength)
    t_enc = int(min(strength, 0.999) * 20)
    assert run_sampling_steps(sampler, 20, start=start, schedule="karras") == t_enc + 1
    assert run_total_steps(sampler, 20, start=start, schedule="karras") == (t_enc + 1) * (2 if sampler == "heun" else 1)


def test_the_window_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "FreeUSteps(freeu")
    plain = scope["generate"](scope["toy"], ["a red circle"], sampler="euler", schedule="karras", steps=8, seed=3)
    first_half, every_call = scope["first_half"], scope["every_call"]
    assert not torch.equal(first_half, every_call) and not torch.equal(first_half, plain)
    assert not any(m._forward_pre_hooks for m in scope["toy"].unet.modules())
