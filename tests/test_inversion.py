"""Null-text / negative-prompt / DDIM inversion: naive references, reproducible files, the toy ordering, the job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sdadapt.formats.files import WeightFileError, write_safetensors
from sdadapt.images import decode_png, encode_png
from sdadapt.inversion import (
    Inversion,
    guided_ddim_step,
    invert_image,
    invert_latents,
    load_inversion,
    negative_prompt_embeddings,
    null_text_objective,
    null_text_optimize,
    psnr,
    regenerate_image,
    sample_inversion,
    save_inversion,
)
from sdadapt.inversion.core import ddim_pivot
from sdadapt.inversion.job import run_invert
from sdadapt.toy import DEFAULT_WEIGHTS, load_toy
from sdadapt.toy.shapes import Scene, caption, render
from sdadapt.training import diffusion
from docs_pages import run_block

needs_toy = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="toy weights not built")


def _schedule(dtype=torch.float64) -> torch.Tensor:
    return diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).to(dtype)


class TinyDenoiser(nn.Module):
    """A small non-linear conditional model: ``model(x (B,4,8,8), t (B,), cond (B,L,D)) -> (B,4,8,8)``."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(4, 16, 3, padding=1)
        self.cond = nn.Linear(dim, 16)
        self.out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x, t, cond):
        h = self.inp(x) + self.cond(cond.mean(1))[:, :, None, None] * (1 + t.float()[:, None, None, None] / 1000)
        return self.out(torch.tanh(h)) * 0.5


# ------------------------------------------------------------------------- naive references
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t, t_prev", [(801, 781), (21, 1), (1, -19)])
def test_guided_ddim_step_matches_float64_hand_formula(pred, t, t_prev):
    ac = _schedule()
    g = torch.Generator().manual_seed(0)
    x, u, c = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    s = 7.5
    got = guided_ddim_step(u, c, x, t, t_prev, ac, guidance=s, prediction_type=pred)
    o = u + s * (c - u)
    a_t = float(ac[t])
    a_prev = float(ac[t_prev]) if t_prev >= 0 else float(ac[0])
    if pred == "epsilon":
        x0 = (x - (1 - a_t) ** 0.5 * o) / a_t**0.5
        eps = o
    else:  # v = √ᾱ ε − √(1−ᾱ) x0
        x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * o
        eps = a_t**0.5 * o + (1 - a_t) ** 0.5 * x
    want = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_null_text_objective_matches_hand_computation():
    model = TinyDenoiser().double()
    ac = _schedule()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    target = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    cond, null = (torch.randn(1, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, t_prev, s = 501, 481, 7.5
    tt = torch.tensor([t])
    with torch.no_grad():
        out_c = model(x, tt, cond)
    null.requires_grad_(True)
    loss = null_text_objective(model, x, t, t_prev, target, out_cond=out_c, uncond=null, alphas_cumprod=ac, guidance=s)
    eps = model(x, tt, null) + s * (out_c - model(x, tt, null))
    a_t, a_p = float(ac[t]), float(ac[t_prev])
    x_prev = a_p**0.5 * (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5 + (1 - a_p) ** 0.5 * eps
    want = ((x_prev - target) ** 2).mean()
    assert torch.allclose(loss.double(), want, rtol=1e-6)
    # differentiable in the null embedding, and through nothing else of the caller's
    (grad,) = torch.autograd.grad(loss, [null])
    assert grad.abs().sum() > 0


def test_negative_prompt_reconstruction_is_the_conditional_sampler():
    """With ∅_i = c the guided step is the conditional step at any scale: NPI == guidance-1 DDIM."""
    model = TinyDenoiser()
    ac = _schedule(torch.float32)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    cond, null = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    inv = invert_latents(model, x0, cond, null, alphas_cumprod=ac, method="negative-prompt", num_steps=8, guidance=7.5)
    assert inv.null_embeddings.shape == (8, 1, 3, 8) and torch.equal(inv.null_embeddings[3], cond)
    rec = sample_inversion(model, inv)
    plain = diffusion.ddim_sample(model, inv.x_T, cond, alphas_cumprod=ac, num_steps=8)
    assert torch.allclose(rec, plain, atol=1e-5)
    assert torch.equal(negative_prompt_embeddings(cond, 3)[1], cond)


def test_null_text_optimisation_beats_plain_ddim_on_a_small_model():
    model = TinyDenoiser()
    ac = _schedule(torch.float32)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    cond, null = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    errors = {}
    for name, options in (("ddim", {"method": "ddim"}), ("npi", {"method": "negative-prompt"}), ("nti", {}),
                          ("nti-long", {"inner_steps": 50, "learning_rate": 0.1}), ("nti-npi", {"init": "negative-prompt"})):
        inv = invert_latents(model, x0, cond, null, alphas_cumprod=ac, num_steps=10, guidance=7.5, **options)
        errors[name] = float(((sample_inversion(model, inv) - x0) ** 2).mean())
    # measured: ddim 55.6, nti (paper's 10 x lr 1e-2 from a far null) 20.0, nti 50 x 0.1 0.028, npi 0.0082, nti from npi 0.0069
    assert errors["nti"] < 0.5 * errors["ddim"], errors
    assert errors["nti-long"] < 1e-3 * errors["ddim"], errors
    assert errors["npi"] < 1e-3 * errors["ddim"], errors
    assert errors["nti-npi"] < errors["npi"], errors
    # the per-step embeddings differ (optimised at each timestep) and the model's weights got no grads
    assert all(p.grad is None for p in model.parameters())


def test_null_text_stops_early_and_validates_options():
    model = TinyDenoiser()
    ac = _schedule(torch.float32)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    cond = torch.randn(1, 3, 8)
    pivot = ddim_pivot(model, x0, cond, alphas_cumprod=ac, num_steps=4)
    calls = []

    def counting(x, t, c):
        calls.append(1)
        return model(x, t, c)

    # a huge threshold: one inner iteration per step (+ 1 cond and 1 advance forward)
    null_text_optimize(counting, pivot, cond, cond.clone(), alphas_cumprod=ac, epsilon=1e9)
    assert len(calls) == 4 * 3
    with pytest.raises(ValueError, match="lr_decay"):
        null_text_optimize(model, pivot, cond, cond, alphas_cumprod=ac, lr_decay=0.5)
    with pytest.raises(ValueError, match="inner_steps"):
        null_text_optimize(model, pivot, cond, cond, alphas_cumprod=ac, inner_steps=0)
    with pytest.raises(ValueError, match="unknown inversion method"):
        invert_latents(model, x0, cond, cond, alphas_cumprod=ac, method="p2p")
    with pytest.raises(ValueError, match="init"):
        invert_latents(model, x0, cond, cond, alphas_cumprod=ac, init="zeros")
    with pytest.raises(ValueError, match="embedding_key"):
        invert_latents(model, x0, cond, {"a": cond, "b": cond}, alphas_cumprod=ac)


def test_psnr():
    a = torch.zeros(3, 4, 4)
    assert psnr(a, a) == float("inf")
    assert abs(psnr(a, a + 0.2) - 10 * np.log10(4 / 0.04)) < 1e-9
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:2])


# ---------------------------------------------------------------------------- files, reruns
def test_saved_inversion_round_trips_and_regenerates_bit_for_bit(tmp_path):
    model = TinyDenoiser()
    ac = _schedule(torch.float32)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = {"context": torch.randn(1, 3, 8, generator=g), "extra": None}
    uncond = {"context": torch.randn(1, 3, 8, generator=g), "extra": None}

    def dict_model(x, t, c):
        return model(x, t, c["context"])

    inv = invert_latents(dict_model, x0, cond, uncond, alphas_cumprod=ac, num_steps=5, inner_steps=3, prompt="a cat")
    path = save_inversion(tmp_path / "inv.safetensors", inv, metadata={"model": "tiny"})
    back = load_inversion(path)
    assert back.method == "null-text" and back.guidance == 7.5 and back.embedding_key == "context" and back.prompt == "a cat"
    assert back.info["model"] == "tiny" and "inner_steps" in back.info["options"]
    for name in ("x_T", "null_embeddings", "timesteps", "alphas_cumprod"):
        assert torch.equal(getattr(back, name), getattr(inv, name)), name
    assert torch.equal(back.cond["context"], cond["context"]) and back.cond["extra"] is None
    first = sample_inversion(dict_model, back)
    assert torch.equal(first, sample_inversion(dict_model, back))  # reruns: same bits
    assert torch.equal(first, sample_inversion(dict_model, inv))  # the file loses nothing
    edit = sample_inversion(dict_model, back, cond={"context": torch.zeros(1, 3, 8), "extra": None}, source_steps=2)
    assert not torch.equal(edit, first)


def test_load_inversion_errors(tmp_path):
    other = tmp_path / "lora.safetensors"
    write_safetensors(other, {"w": torch.zeros(2)}, {"format": "something"})
    with pytest.raises(WeightFileError, match="not an sdadapt inversion file"):
        load_inversion(other)
    broken = tmp_path / "broken.safetensors"
    write_safetensors(broken, {"x_T": torch.zeros(1)}, {"format": "sdadapt-inversion/1"})
    with pytest.raises(WeightFileError, match="lacks"):
        load_inversion(broken)


def test_tensor_conditions_on_a_diffusers_unet():
    from tiny_models import tiny_unet_sd1

    unet = tiny_unet_sd1()

    def model(x, t, c):
        return unet(x, t, c).sample

    ac = _schedule(torch.float32)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    cond, null = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        ddim = invert_latents(model, x0, cond, null, alphas_cumprod=ac, method="ddim", num_steps=5)
        npi = invert_latents(model, x0, cond, null, alphas_cumprod=ac, method="negative-prompt", num_steps=5)
    # 3 inner steps (default 10): the property here is the tensor-condition path, not how far Adam gets
    nti = invert_latents(model, x0, cond, null, alphas_cumprod=ac, method="null-text", num_steps=5, init="negative-prompt",
                         inner_steps=3)
    with torch.no_grad():
        err = {name: float(((sample_inversion(model, inv) - x0) ** 2).mean())
               for name, inv in (("ddim", ddim), ("npi", npi), ("nti", nti))}
    assert err["nti"] < err["ddim"], err
    # ``nti < ddim`` holds for any run starting from the negative-prompt embeddings, even one whose Adam never moves
    # them (NPI alone is far better than DDIM); null-text inversion's own claim is that its optimisation improves on
    # that start (measured: ddim 5.3, npi 0.56, nti 0.45 at 3 inner steps)
    assert err["nti"] < 0.9 * err["npi"], err
    assert all(p.grad is None for p in unet.parameters())


# ----------------------------------------------------------------------------- the toy model
_SCENE = Scene("circle", "red", "large", "left", "gray")


@pytest.fixture(scope="module")
def toy():
    return load_toy()


@pytest.fixture(scope="module")
def docs_example(tmp_path_factory):
    """docs/null-text-inversion.md's example, run once (in its own folder: it writes red-circle.safetensors).
    Its null-text inversion of the fixed scene is also the "nti" entry of the ordering test."""
    folder = tmp_path_factory.mktemp("null-text-docs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        return folder, run_block("null-text-inversion.md")


@needs_toy
def test_toy_reconstruction_ordering_at_guidance_7_5(toy, docs_example):
    """The paper's ordering, measured on a fixed toy image at 10 DDIM steps, guidance 7.5:
    plain DDIM inversion drifts, negative-prompt inversion is far better, null-text inversion
    (started from negative-prompt) better still (docs/null-text-inversion.md has the full table)."""
    image, prompt = render(_SCENE), caption(_SCENE)
    scores = {}
    for name, options in (("ddim", {"method": "ddim"}), ("npi", {"method": "negative-prompt"})):
        inv = invert_image(toy, image, prompt, guidance=7.5, num_steps=10, **options)
        scores[name] = psnr(regenerate_image(toy, inv)[0], image)
    # "nti": the docs example's run, which is invert_image(toy, image, prompt, method="null-text", guidance=7.5,
    # num_steps=10, init="negative-prompt") on this very scene (checked here), regenerated from its file
    page = docs_example[1]
    nti = page["inversion"]
    assert torch.equal(page["image"], image) and page["prompt"] == prompt, "the docs example no longer inverts _SCENE"
    assert (nti.method, nti.guidance, nti.null_embeddings.shape[0]) == ("null-text", 7.5, 10), "docs example settings changed"
    assert "negative-prompt" in nti.info["options"], nti.info
    scores["nti"] = psnr(page["reconstruction"][0], image)
    # measured: ddim 11.6, npi 22.5, nti 33.0 dB
    assert scores["ddim"] + 5 < scores["npi"], scores
    assert scores["npi"] + 5 < scores["nti"], scores


@needs_toy
def test_toy_regeneration_from_file_is_bit_identical_and_checks_the_model(toy, tmp_path):
    image, prompt = render(_SCENE), caption(_SCENE)
    inv = invert_image(toy, image, prompt, method="null-text", num_steps=4, inner_steps=2)
    assert inv.null_embeddings.shape == (4, 1, 16, 64) and inv.embedding_key == "context"
    path = save_inversion(tmp_path / "red.safetensors", inv)
    a = regenerate_image(toy, load_inversion(path))
    b = regenerate_image(toy, load_inversion(path))
    assert torch.equal(a, b)
    edit = regenerate_image(toy, load_inversion(path), prompt="a large blue circle on the left on a gray background")
    assert edit.shape == (1, 3, 32, 32) and not torch.equal(edit, a)
    other = Inversion(**{**inv.__dict__, "alphas_cumprod": inv.alphas_cumprod * 0.5})
    with pytest.raises(ValueError, match="another noise schedule"):
        regenerate_image(toy, other)
    with pytest.raises(ValueError, match="resize it first"):
        invert_image(toy, torch.zeros(3, 40, 40), prompt, method="ddim", num_steps=2)


def _write(path, pixels: np.ndarray):
    path.write_bytes(encode_png(pixels))
    return path


@needs_toy
def test_invert_job_writes_its_files_and_resizes_like_train(tmp_path):
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[10:30, 14:34, 2] = 250
    source = _write(tmp_path / "in.png", rgba)
    seen = []
    result = run_invert(source, prompt="a large blue square", out=tmp_path / "out.png", method="negative-prompt",
                        steps=4, edit_prompt="a large green square", progress=lambda d, n, label: seen.append(label))
    files = result["files"]
    assert set(files) == {"reconstruction", "inversion", "edit"}
    for path in files.values():
        assert (tmp_path / path).exists() if not path.startswith("/") else True
    assert decode_png((tmp_path / "out.png").read_bytes()).shape == (32, 32, 3)
    assert decode_png((tmp_path / "out-edit.png").read_bytes()).shape == (32, 32, 3)
    assert load_inversion(tmp_path / "out.safetensors").info["source_size"] == "48x40"
    assert "resized 48x40 -> 32x32" in result["resized"] and result["converted"].startswith("converted RGBA -> RGB")
    assert np.isfinite(result["psnr"]) and {"invert", "reconstruct", "edit"} <= set(seen)
    with pytest.raises(FileExistsError, match="overwrite"):
        run_invert(source, prompt="x", out=tmp_path / "out.png", method="ddim", steps=2)
    gray = _write(tmp_path / "gray.png", np.full((32, 32, 1), 128, dtype=np.uint8))
    res = run_invert(gray, prompt="a gray background", out=tmp_path / "g.png", method="ddim", steps=2)
    assert res["resized"] is None and res["converted"] == "converted L -> RGB"
    with pytest.raises(ValueError, match=r"\.png"):
        run_invert(gray, prompt="x", out=tmp_path / "g.jpg", steps=2)
    with pytest.raises(ValueError, match="unknown inversion method"):
        run_invert(gray, prompt="x", out=tmp_path / "h.png", method="exact", steps=2)


@needs_toy
def test_docs_example_runs(docs_example):
    folder, namespace = docs_example
    assert (folder / "red-circle.safetensors").is_file()
    assert psnr(namespace["reconstruction"][0], namespace["image"]) > 30  # the page says ~33 dB
    assert namespace["edit"].shape == (1, 3, 32, 32)


def test_invert_job_on_a_diffusers_folder_with_v_prediction(tmp_path):
    """A Stable Diffusion folder system (tiny random pipeline, v-prediction scheduler) through the job."""
    pytest.importorskip("transformers")
    try:
        from test_cli_train import _tiny_pipeline
    except ImportError as exc:  # pragma: no cover - the CLI test module is being restructured
        pytest.skip(f"tiny pipeline builder unavailable: {exc}")
    from sdadapt.diffusers_system import DiffusersSystem

    folder = _tiny_pipeline(tmp_path / "sd")
    picture = np.zeros((40, 40, 3), dtype=np.uint8)
    picture[8:30, 10:28] = (220, 40, 40)
    source = _write(tmp_path / "in.png", picture)
    result = run_invert(source, prompt="a red box", out=tmp_path / "o.png", model=str(folder), method="negative-prompt",
                        steps=3, edit_prompt="a blue box")
    assert result["size"] == (32, 32) and "resized 40x40 -> 32x32" in result["resized"]
    inv = load_inversion(tmp_path / "o.safetensors")
    assert inv.prediction_type == "v_prediction" and inv.embedding_key is None and inv.cond.shape == (1, 12, 32)
    system = DiffusersSystem.from_folder(folder)
    again = regenerate_image(system, inv)
    assert torch.equal(again, regenerate_image(system, inv))
    nti = invert_image(system, read_image_32(source), "a red box", method="null-text", num_steps=3, inner_steps=2)
    assert nti.null_embeddings.shape == (3, 1, 12, 32) and not torch.equal(nti.null_embeddings[0], nti.null_embeddings[2])


def read_image_32(path):
    from sdadapt.images import read_image

    return read_image(path, size=32)

