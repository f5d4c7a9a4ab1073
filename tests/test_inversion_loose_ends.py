"""Null-text inversion loose ends: one loss (the public objective is what the loop runs), EDM inversion files that
carry only what they mean (and the previous version's /2 files still read), SDXL's unconditional branch (the pooled
``text_embeds`` too) and optimising the pooled null embedding.

References:
- D huggingface/diffusers 0.42.1, pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py ``encode_prompt``
  424-427: with ``force_zeros_for_empty_prompt`` and no negative prompt, ``negative_prompt_embeds`` AND
  ``negative_pooled_prompt_embeds`` are zeros (the unconditional branch's ``added_cond_kwargs["text_embeds"]``).
- ugiugi0823/Null-SDXL null-sdxl.ipynb ``NullInversion.null_optimization``: one Adam over the unconditional text
  states and the pooled embedding per step (``Adam([uncond_embeddings, uncond_embeddings_p], ...)``).
- Miyake et al. 2023 (negative-prompt inversion): the null condition is the prompt's, so the guided step is the
  conditional one at any scale.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_inversion import TinyDenoiser, _schedule
from torch.nn import functional as F

from sdadapt.formats.files import WeightFileError, read_safetensors, write_safetensors
from sdadapt.inversion import (
    EDMSteps,
    core,
    invert_latents,
    load_inversion,
    null_text_objective,
    null_text_optimize,
    sample_inversion,
    save_inversion,
)
from sdadapt.inversion.core import ddim_pivot, null_text_optimize_entries
from sdadapt.samplers.edm import EDMSchedule, edm_precondition
from sdadapt.training import diffusion

EDM = EDMSchedule.from_config({"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras",
                               "rho": 7.0, "prediction_type": "epsilon", "final_sigmas_type": "zero"})


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g))


class DictDenoiser(TinyDenoiser):
    """TinyDenoiser on SDXL-like dict conditions: ``{"context": (B, L, 8), "text_embeds": (B, 5)}``; the pooled
    entry enters non-linearly (through the tanh), as SDXL's added embedding does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.pool = torch.nn.Linear(5, 16)

    def forward(self, x, t, cond):
        h = self.inp(x) + self.cond(cond["context"].mean(1))[:, :, None, None] * (1 + t.float()[:, None, None, None] / 1000)
        return self.out(torch.tanh(h + self.pool(cond["text_embeds"])[:, :, None, None])) * 0.5


# ------------------------------------------------------------------------------------ (1) one loss
def _hand_loop(model, pivot, cond, uncond, rule, guidance, inner, lr, keys):
    """The paper's loop written out (Mokady et al. §3.3; google/prompt-to-prompt null_text_w_ptp.ipynb
    ``null_optimization``): per step Adam over the null entries, loss = MSE(step(guided), z*_prev), early stop."""
    embeddings = [uncond[k].clone().float() for k in keys]
    rows = []
    x = pivot[-1]
    n = len(pivot) - 1
    for i in range(n):
        with torch.no_grad():
            c = rule.model_output(model, x, i, cond)
        embeddings = [e.detach().clone().requires_grad_(True) for e in embeddings]
        opt = torch.optim.Adam(embeddings, lr=lr * (1 - 1e-2 * i))
        for _ in range(inner):
            u = rule.model_output(model, x, i, {**uncond, **dict(zip(keys, embeddings))})
            loss = F.mse_loss(rule.step(u + guidance * (c - u), x, i).float(), pivot[n - i - 1].float())
            grads = torch.autograd.grad(loss, embeddings)
            for e, gr in zip(embeddings, grads):
                e.grad = gr
            opt.step()
            if loss.item() < 1e-5 + i * 2e-5:
                break
        embeddings = [e.detach() for e in embeddings]
        rows.append([e.clone() for e in embeddings])
        with torch.no_grad():
            u = rule.model_output(model, x, i, {**uncond, **dict(zip(keys, embeddings))})
            x = rule.step(u + guidance * (c - u), x, i)
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(keys)}


@pytest.mark.parametrize("edm", [None, EDM])
def test_the_loop_runs_the_public_objective_and_equals_a_hand_loop(edm, monkeypatch):
    model = DictDenoiser()
    ac = _schedule(torch.float32)
    x0, ctx_c, ctx_u = _data(1)
    g = torch.Generator().manual_seed(2)
    cond = {"context": ctx_c, "text_embeds": torch.randn(1, 5, generator=g)}
    uncond = {"context": ctx_u, "text_embeds": torch.zeros(1, 5)}
    kw = {"alphas_cumprod": None if edm else ac, "edm": edm}
    pivot = ddim_pivot(model, x0, cond, num_steps=4, **kw)
    rule = core.inversion_steps(4, **kw)
    calls = []
    real = core.null_text_objective
    monkeypatch.setattr(core, "null_text_objective", lambda *a, **k: calls.append(k["step"]) or real(*a, **k))
    got = null_text_optimize(model, pivot, cond, uncond, guidance=5.0, embedding_key="context", inner_steps=3, **kw)
    assert sorted(set(calls)) == [0, 1, 2, 3] and len(calls) > 4  # every inner iteration's loss is the public one
    both = null_text_optimize_entries(model, pivot, cond, uncond, keys=("context", "text_embeds"), guidance=5.0,
                                      inner_steps=3, **kw)
    monkeypatch.undo()
    want = _hand_loop(model, pivot, cond, uncond, rule, 5.0, 3, 1e-2, ("context",))
    assert torch.equal(got, want["context"])
    want2 = _hand_loop(model, pivot, cond, uncond, rule, 5.0, 3, 1e-2, ("context", "text_embeds"))
    assert torch.equal(both["context"], want2["context"]) and torch.equal(both["text_embeds"], want2["text_embeds"])
    assert not torch.equal(both["text_embeds"][0], uncond["text_embeds"])  # (it moved)


def test_objective_on_an_edm_step_is_a_float64_transcription():
    """null_text_objective(rule=EDMSteps, step=i) = mean‖x + (x − D)/σ_i·(σ_{i+1} − σ_i) − z‖², D = c_skip·x + c_out·o,
    o = u + s·(c − u) of the UNet at c_in(σ_i)·x, c_noise(σ_i) (diffusers EDMEulerScheduler.step)."""
    model = TinyDenoiser().double()
    rule = EDMSteps(EDM, 5)
    g = torch.Generator().manual_seed(3)
    x, target = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) * 10 for _ in range(2))
    cond, null = (torch.randn(1, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    i, s = 2, 4.0
    sigma, nxt = float(rule.sigmas[i]), float(rule.sigmas[i + 1])
    c_skip, c_out, c_in, c_noise = (float(v) for v in edm_precondition(torch.tensor(sigma, dtype=torch.float64),
                                                                        sigma_data=0.5))
    tt = torch.full((1,), c_noise, dtype=torch.float64)
    with torch.no_grad():
        out_c = model(x * c_in, tt, cond)
    null.requires_grad_(True)
    loss = null_text_objective(model, x, None, None, target, out_cond=out_c, uncond=null, guidance=s, rule=rule, step=i)
    o = model(x * c_in, tt, null) + s * (out_c - model(x * c_in, tt, null))
    x32 = x.float().double()  # (the step runs in float32, the scheduler's upcast)
    denoised = c_skip * x32 + c_out * o
    want = ((x32 + (x32 - denoised) / sigma * (nxt - sigma) - target) ** 2).mean()
    assert torch.allclose(loss.double(), want, rtol=1e-5)
    assert torch.autograd.grad(loss, [null])[0].abs().sum() > 0
    for bad in ({"rule": rule}, {"rule": rule, "step": 1, "t": 5}, {"step": 1}, {}):
        t = bad.pop("t", None)
        with pytest.raises(ValueError, match="null_text_objective"):
            null_text_objective(model, x, t, None, target, out_cond=out_c, uncond=null, guidance=s, **bad)
    with pytest.raises(ValueError, match="keys must name distinct"):
        null_text_optimize_entries(model, [x, x], cond, null, keys=(None, None), guidance=s, edm=EDM)


# ------------------------------------------------------------------------------------ (2) the files
def _previous_writer(path, inv, metadata):
    """The previous version's save_inversion (sdadapt 0.x before this change), transcribed: the DDPM fields always."""
    tensors = {"x_T": inv.x_T, "null_embeddings": inv.null_embeddings,
               "timesteps": inv.timesteps.long() if inv.edm is None else inv.timesteps.float(),
               "alphas_cumprod": inv.alphas_cumprod, "cond": inv.cond, "uncond": inv.uncond}
    meta = {**metadata, "format": "sdadapt-inversion/1" if inv.edm is None else "sdadapt-inversion/2",
            "method": inv.method, "guidance": repr(float(inv.guidance)), "embedding_key": "",
            "prediction_type": inv.prediction_type, "spacing": inv.spacing, "steps_offset": str(int(inv.steps_offset)),
            "prompt": inv.prompt, "cond_layout": json.dumps({"kind": "tensor"}),
            "uncond_layout": json.dumps({"kind": "tensor"}),
            **({} if inv.edm is None else {"edm": json.dumps(dataclasses.asdict(inv.edm), sort_keys=True)})}
    return write_safetensors(path, tensors, meta)


def test_ddim_files_are_byte_identical_to_the_previous_writer(tmp_path):
    model = TinyDenoiser()
    x0, cond, null = _data(4)
    inv = invert_latents(model, x0, cond, null, alphas_cumprod=_schedule(torch.float32), num_steps=3, guidance=7.5,
                         inner_steps=2, prompt="a cube")
    ours = save_inversion(tmp_path / "ours.safetensors", inv, metadata={"model": "tiny"})
    theirs = _previous_writer(tmp_path / "theirs.safetensors", inv, {"options": inv.info["options"], "model": "tiny"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_edm_files_carry_the_schedule_only_and_previous_files_still_read(tmp_path):
    model = TinyDenoiser()
    x0, cond, null = _data(5)
    ac = _schedule(torch.float32)
    edm = dataclasses.replace(EDM, prediction_type="v_prediction")
    # (alphas_cumprod / spacing / steps_offset passed as a system would: nothing of them is kept for an EDM model)
    inv = invert_latents(model, x0, cond, null, alphas_cumprod=ac, edm=edm, num_steps=3, guidance=5.0,
                         inner_steps=2, spacing="trailing", steps_offset=0)
    assert inv.alphas_cumprod.shape == (0,) and (inv.spacing, inv.steps_offset) == ("leading", 1)
    path = save_inversion(tmp_path / "new.safetensors", inv)
    tensors, meta = read_safetensors(path)
    assert "alphas_cumprod" not in tensors and meta["format"] == "sdadapt-inversion/2"
    assert not {"prediction_type", "spacing", "steps_offset"} & set(meta)
    assert json.loads(meta["edm"])["prediction_type"] == "v_prediction"
    again = load_inversion(path)
    assert again.prediction_type == "v_prediction" and again.edm == edm
    assert torch.equal(again.null_embeddings, inv.null_embeddings) and torch.equal(again.x_T, inv.x_T)
    reference = sample_inversion(model, inv)
    assert torch.equal(sample_inversion(model, again), reference)
    # the previous version's /2 file: the system's alphas_cumprod and DDPM metadata in it, read and ignored
    old_inv = dataclasses.replace(inv, alphas_cumprod=ac, spacing="trailing", steps_offset=0)
    old = load_inversion(_previous_writer(tmp_path / "old.safetensors", old_inv, {}))
    assert old.edm == edm and old.prediction_type == "v_prediction" and old.alphas_cumprod.shape == (0,)
    assert not {"prediction_type", "spacing", "steps_offset"} & set(old.info)
    assert torch.equal(sample_inversion(model, old), reference)
    # a DDIM file still needs its schedule
    ddim = invert_latents(model, x0, cond, null, alphas_cumprod=ac, num_steps=3, method="ddim")
    tensors, meta = read_safetensors(save_inversion(tmp_path / "d.safetensors", ddim))
    write_safetensors(tmp_path / "broken.safetensors", {k: v for k, v in tensors.items() if k != "alphas_cumprod"}, meta)
    with pytest.raises(WeightFileError, match="broken.safetensors.*lacks alphas_cumprod"):
        load_inversion(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("edm", [None, EDM])
def test_pooled_null_embeddings_round_trip_through_a_v3_file(edm, tmp_path):
    model = DictDenoiser()
    x0, ctx_c, ctx_u = _data(6)
    cond = {"context": ctx_c, "text_embeds": torch.randn(1, 5, generator=torch.Generator().manual_seed(7))}
    uncond = {"context": ctx_u, "text_embeds": torch.zeros(1, 5)}
    kw = {"alphas_cumprod": _schedule(torch.float32), "edm": edm}
    inv = invert_latents(model, x0, cond, uncond, num_steps=4, guidance=5.0, inner_steps=3,
                         extra_keys=("text_embeds",), **kw)
    assert set(inv.null_extra) == {"text_embeds"} and inv.null_extra["text_embeds"].shape == (4, 1, 5)
    path = save_inversion(tmp_path / "p.safetensors", inv)
    tensors, meta = read_safetensors(path)
    assert meta["format"] == "sdadapt-inversion/3" and json.loads(meta["null_keys"]) == ["text_embeds"]
    assert ("edm" in meta) == (edm is not None)
    again = load_inversion(path)
    assert again.edm == edm and torch.equal(again.null_extra["text_embeds"], inv.null_extra["text_embeds"])
    rec = sample_inversion(model, again)
    assert torch.equal(rec, sample_inversion(model, inv))
    # the per-step pooled values are used: regenerating without them is another image
    assert not torch.equal(rec, sample_inversion(model, dataclasses.replace(inv, null_extra={})))
    kept = {k: v for k, v in tensors.items() if k != "null_embeddings.text_embeds"}
    write_safetensors(tmp_path / "b.safetensors", kept, meta)
    with pytest.raises(WeightFileError, match="b.safetensors.*null_embeddings.text_embeds"):
        load_inversion(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="extra_keys"):
        invert_latents(model, x0, cond, uncond, num_steps=2, extra_keys=("context",), **kw)


# ------------------------------------------------------------------------------------ (3) SDXL
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_playground_edm import playground_files

    from sdadapt.diffusers_system import DiffusersSystem

    system = DiffusersSystem.from_single_file(playground_files(tmp_path_factory.mktemp("sdxl"))[1])
    system.image_size = 16
    return system


def test_sdxl_unconditional_branch_is_the_pipelines(sdxl):
    """invert_image's null condition is what sampling pairs with the prompt: an empty negative is zeros in the text
    states AND the pooled text_embeds (diffusers encode_prompt 424-427), time_ids the prompt's; a named negative
    is encoded."""
    from sdadapt.inversion import invert_image

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    inv = invert_image(sdxl, image, "a red cube", method="ddim", num_steps=2)
    assert sdxl.zero_empty_negative
    for key in ("context", "text_embeds"):
        assert inv.uncond[key].abs().max() == 0 and inv.cond[key].abs().max() > 0
    assert torch.equal(inv.uncond["time_ids"], inv.cond["time_ids"])
    with torch.no_grad():
        named = sdxl.condition(sdxl.tokenize(["blurry"]))
    inv2 = invert_image(sdxl, image, "a red cube", method="ddim", num_steps=2, negative="blurry")
    assert torch.equal(inv2.uncond["text_embeds"], named["text_embeds"])


def test_sdxl_negative_prompt_inversion_is_the_conditional_sampler(sdxl):
    """With the prompt's pooled embedding too, NPI's guided step is the conditional step: its reconstruction is
    guidance-1 DDIM from the same x_T (with the empty pooled one it was not)."""
    from sdadapt.inversion import invert_image

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    inv = invert_image(sdxl, image, "a red cube", method="negative-prompt", num_steps=3, guidance=7.5)
    assert torch.equal(inv.null_extra["text_embeds"][1], inv.cond["text_embeds"])
    with torch.no_grad():
        model = sdxl.denoiser()
        rec = sample_inversion(model, inv)
        plain = diffusion.ddim_sample(model, inv.x_T, inv.cond, alphas_cumprod=sdxl.alphas_cumprod, num_steps=3,
                                      prediction_type=sdxl.prediction_type)
        before = sample_inversion(model, dataclasses.replace(inv, null_extra={}))
    scale = float(plain.abs().max())
    torch.testing.assert_close(rec, plain, rtol=0, atol=1e-5 * scale)
    assert float((before - plain).abs().max()) > 1e-3 * scale


def test_sdxl_optimising_the_pooled_null_embedding_reconstructs_better(sdxl):
    from sdadapt.inversion import invert_image

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(10)) * 2 - 1
    with torch.no_grad():
        x0 = sdxl.encode_images(image)
    err = {}
    for name, extra in (("context", ()), ("pooled", ("text_embeds",))):
        inv = invert_image(sdxl, image, "a red cube", num_steps=4, guidance=7.5, inner_steps=4, extra_keys=extra)
        with torch.no_grad():
            err[name] = float(((sample_inversion(sdxl.denoiser(), inv) - x0) ** 2).mean())
    assert err["pooled"] < err["context"], err
    assert all(p.grad is None for p in sdxl.unet.parameters())


def test_invert_command_optimize_pooled(sdxl, tmp_path, capsys):
    """``python -m sdadapt invert --optimize-pooled`` on a tiny SDXL folder writes a /3 file whose pooled rows
    regenerate its PNG; on a model without a pooled embedding, or with another --method, it is refused by name."""
    import json as _json

    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.inversion import regenerate_image

    folder = tmp_path / "xl"
    sdxl.save_model(folder)
    config = _json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(_json.dumps({**config, "sample_size": 8}))
    source = tmp_path / "in.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(11)) * 255).to(torch.uint8).numpy()).save(source)
    out = tmp_path / "out.png"
    assert main(["invert", str(source), "--prompt", "a red cube", "--model", str(folder), "--steps", "3",
                 "--optimize-pooled", "-q", "-o", str(out)]) == 0
    inv = load_inversion(tmp_path / "out.safetensors")
    assert set(inv.null_extra) == {"text_embeds"} and inv.null_extra["text_embeds"].shape == (3, 1, 32)
    system = DiffusersSystem.from_folder(folder)
    png = ((regenerate_image(system, inv)[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    written = torch.tensor(list(Image.open(out).convert("RGB").getdata()), dtype=torch.uint8).view(16, 16, 3)
    assert (png.int() - written.int()).abs().max() <= 1
    capsys.readouterr()
    assert main(["invert", str(source), "--prompt", "a red cube", "--steps", "2", "--optimize-pooled", "-q",
                 "-o", str(tmp_path / "toy.png")]) != 0
    assert "--optimize-pooled" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (a usage error: argparse's exit 2)
        main(["invert", str(source), "--prompt", "a red cube", "--model", str(folder), "--method", "ddim",
              "--optimize-pooled", "-o", str(tmp_path / "d.png")])
    assert "--optimize-pooled only applies with --method null-text" in capsys.readouterr().err
