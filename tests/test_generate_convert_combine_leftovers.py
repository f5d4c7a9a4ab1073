"""Small things users met in generate / convert / combine-loras (brief P): each test fails on the
behaviour before its fix."""

from __future__ import annotations

import math

import pytest
import torch

from sdadapt.cli import main


# ------------------------------------------------------------------ generate: a bad size before the load
@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    """A tiny SD1 diffusers folder, SD1 and SDXL LDM single files (.safetensors) and an SD1 .ckpt."""
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline
    from tiny_checkpoints import tiny_sd1_parts, tiny_sdxl_file, write_single_file

    root = tmp_path_factory.mktemp("models")
    sd1 = tiny_sd1_parts()  # (one model, written as both files)
    return {"folder": _tiny_pipeline(root / "pipe", prediction_type="epsilon"),
            "sd1": write_single_file(sd1, root / "sd1.safetensors", architecture="sd1"),
            "sdxl": tiny_sdxl_file(root / "sdxl.safetensors"),
            "ckpt": write_single_file(sd1, root / "sd1.ckpt", architecture="sd1", ckpt=True)}


def test_the_size_rule_read_without_weights_is_the_loaded_models(sd_models):
    from sdadapt.diffusers_system import load_model
    from sdadapt.jobs.model_size import model_size_multiple

    for name in ("folder", "sd1", "sdxl", "ckpt"):  # (a .ckpt by its pickle's tensor names: no tensor read)
        assert model_size_multiple(sd_models[name]) == load_model(str(sd_models[name])).vae_factor, name
    assert model_size_multiple("toy") is None


@pytest.mark.parametrize("name", ["folder", "sd1", "ckpt"])
def test_generate_refuses_a_bad_size_before_loading_the_model(sd_models, tmp_path, monkeypatch, name):
    import sdadapt.jobs.generate as job
    from sdadapt.jobs.model_size import model_size_multiple

    m = model_size_multiple(sd_models[name])
    loads = []
    monkeypatch.setattr(job, "load_system", lambda *a, **k: loads.append(a) or pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=rf"image size {5 * m - 1}x{3 * m + 1}: both sides must be multiples of {m} "):
        job.run_generate(prompt="a", model=str(sd_models[name]), out=tmp_path / "x.png", width=5 * m - 1,
                         height=3 * m + 1, steps=1)
    assert loads == [] and not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ emphasis: one text-encoder pass
def _two_pass(system, prompts):
    """The conditioning as it was made before: a plain pass and a second, weighted pass of the text
    encoder(s), then each prompt's mean restored (the formula the one-pass code must equal bit for bit)."""
    from sdadapt.diffusers_system import _restore_mean

    weighted = system.tokenize_weighted(prompts)
    plain = system.condition({"ids": weighted["ids"]} if system.is_sdxl else weighted["ids"])
    cond = system.condition(weighted)
    if not system.is_sdxl:
        return _restore_mean(cond, plain)
    width = int(system.text_encoder.config.hidden_size)
    context = torch.cat([_restore_mean(cond["context"][..., :width], plain["context"][..., :width]),
                         _restore_mean(cond["context"][..., width:], plain["context"][..., width:])], dim=-1)
    return {**cond, "context": context}


@pytest.mark.parametrize("sdxl", [False, True])
def test_emphasis_runs_the_text_encoder_once_with_the_two_pass_result_bit_for_bit(tmp_path, sdxl):
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    system = tiny_diffusers_system(tmp_path, max_token_length=150, sdxl=sdxl, clip_skip=2)
    with torch.no_grad():
        for encoder in (system.text_encoder, getattr(system, "text_encoder_2", None)):
            if encoder is not None:
                encoder.get_input_embeddings().weight += 0.5
    prompts = ["a (red:1.8) circle, " + ", ".join(["[green] square"] * 12), "(blue:0.4) ring"]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1))
             for m in (system.text_encoder, getattr(system, "text_encoder_2", None)) if m is not None]
    with torch.no_grad():
        got = system._prompt_condition(prompts, None)
    for hook in hooks:
        hook.remove()
    assert len(calls) == len(hooks)  # before: twice per encoder (a plain and a weighted pass)
    with torch.no_grad():
        want = _two_pass(system, prompts)
    if sdxl:
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    else:
        assert torch.equal(got, want)


# ------------------------------------------------------------------ aesthetic_sample takes the schedule
def test_aesthetic_sample_passes_the_schedule_to_generate():
    import sdadapt
    from sdadapt.aesthetic import aesthetic_conditioning, aesthetic_embedding
    from sdadapt.sampling import generate
    from sdadapt.toy.system import build_toy

    toy = build_toy(seed=0).eval()
    embedding = aesthetic_embedding(torch.rand(2, 3, 32, 32) * 2 - 1, toy.clip.encode_image)
    options = {"aesthetic_steps": 2, "lr": 3e-3}
    got = sdadapt.aesthetic_sample(toy, ["a ring"], embedding, seed=1, steps=3, sampler="euler", schedule="exponential",
                                   **options)
    cond = aesthetic_conditioning(toy, ["a ring"], embedding, **options)
    assert torch.equal(got, generate(toy, ["a ring"], seed=1, steps=3, sampler="euler", schedule="exponential", cond=cond))
    assert not torch.equal(got, generate(toy, ["a ring"], seed=1, steps=3, sampler="euler", cond=cond))
    with pytest.raises(ValueError, match="takes no schedule"):  # (before the text encoder is personalised)
        sdadapt.aesthetic_sample(toy, ["a ring"], embedding, sampler="ddim", schedule="exponential", **options)


# ------------------------------------------------------------------ convert: NaN read back honestly, -q quiet
def test_convert_read_back_tells_a_nan_that_appears_or_vanishes():
    from pathlib import Path

    from sdadapt.jobs.convert_model import _max_delta

    nan, inf = float("nan"), float("inf")

    def delta(written, read):
        return _max_delta({k: torch.tensor(v) for k, v in written.items()},
                          {k: torch.tensor(v) for k, v in read.items()}, name="unet", path=Path("x"))

    both = {"a": [1.0, nan, inf, -inf], "b": [0.5, 2.0]}
    assert delta(both, both) == 0.0  # (the same NaN / infinity at the same place: equal)
    assert delta(both, {**both, "b": [0.5, 2.25]}) == 0.25
    vanished = delta(both, {"a": [1.0, 3.0, inf, -inf], "b": [0.5, 2.25]})  # before: 0.25, the NaN skipped
    appeared = delta({"a": [1.0, 2.0], "b": [0.5, 2.0]}, {"a": [1.0, nan], "b": [0.5, 2.25]})
    assert math.isnan(vanished) and math.isnan(appeared)
    assert delta({"a": [1.0, inf]}, {"a": [1.0, 5.0]}) == inf and delta({"a": [inf]}, {"a": [-inf]}) == inf
    assert delta({"a": [1.0, 2.0], "i": [1, 2]}, {"a": [1.0, 2.0], "i": [1, 3]}) == inf
    # the NaN wins over an infinity met later, and over a larger difference
    assert math.isnan(delta({"a": [nan], "b": [1.0]}, {"a": [0.0], "b": [inf]}))


def test_convert_prints_a_nan_delta_with_what_it_means(sd_models, tmp_path, monkeypatch, capsys):
    import sdadapt.jobs.convert_model as job

    def fake(source, out, **options):
        return job.ModelConversion(path=tmp_path / "o", target="diffusers", source_format="ldm", base_model="sd1",
                                   tensors={"unet": 1}, dtypes={"float32": 1}, size_in=1, size_out=1, ema="none",
                                   ema_tensors=0, max_delta=float("nan"))

    monkeypatch.setattr(job, "convert_model", fake)
    assert main(["convert", str(sd_models["sd1"]), "-o", str(tmp_path / "o"), "--to", "diffusers", "-q"]) == 0
    assert "max |Δ| nan (read back: a NaN appeared or vanished)" in capsys.readouterr().out


def test_convert_keeps_a_nan_of_the_input_and_quiet_prints_no_library_bar(sd_models, tmp_path):
    import os
    import subprocess
    import sys

    from sdadapt.formats.files import read_safetensors, write_safetensors

    state, _ = read_safetensors(sd_models["sd1"])
    key = next(k for k in state if k.endswith("input_blocks.1.0.in_layers.2.weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    source = tmp_path / "nan.safetensors"
    write_safetensors(source, state, {})
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run([sys.executable, "-m", "sdadapt", "convert", str(source), "-o", str(tmp_path / "out"),
                          "--to", "diffusers", "-q"], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    # before the global -q: transformers' "Writing model shards" and "Loading weights" bars on stderr
    assert run.stderr == "", run.stderr
    assert run.stdout.rstrip().endswith("max |Δ| 0 (read back)")  # (the NaN written and read back where it was)


# ------------------------------------------------------------------ combine-loras reports its layers as resize does
def _naive_delta(tensors) -> torch.Tensor:
    """(alpha / r) · up ⋅ down in float64, (out, in · k)."""
    down, up = tensors["lora_down.weight"].double(), tensors["lora_up.weight"].double()
    r = down.shape[0]
    return float(tensors["alpha"]) / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))


@pytest.mark.parametrize(("mode", "options"), [("concat", {"dtype": torch.float16}), ("svd", {"rank": 1})])
def test_combine_reports_each_layers_rank_and_error_of_the_file_it_wrote(tmp_path, mode, options):
    from hostile_files import kohya_lora

    from sdadapt.formats import load_lora
    from sdadapt.formats.files import write_safetensors
    from sdadapt.formats.layers import group_by_layer
    from sdadapt.loratools.combine import combine_loras

    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    write_safetensors(a, kohya_lora(0, alpha=2.0, rank=2), {})
    write_safetensors(b, kohya_lora(1, alpha=0.5, rank=3), {})
    report = combine_loras([a, b], out, strengths=[0.5, -1.5], mode=mode, **options)
    inputs = [load_lora(path)[0] for path in (a, b)]
    written = load_lora(out)[0]
    names = set()
    for component, state in written.items():
        layers_a, layers_b = group_by_layer(inputs[0][component]), group_by_layer(inputs[1][component])
        for layer, tensors in group_by_layer(state).items():
            info = report.layers[f"{component}:{layer}"]
            names.add(f"{component}:{layer}")
            target = 0.5 * _naive_delta(layers_a[layer]) - 1.5 * _naive_delta(layers_b[layer])
            residual = float((target - _naive_delta(tensors)).norm())  # (the file read back, in float64)
            assert info.rank == tensors["lora_down.weight"].shape[0] == (5 if mode == "concat" else 1)
            assert info.alpha == float(tensors["alpha"])
            assert info.norm == pytest.approx(float(target.norm()), rel=1e-9)
            assert info.residual_norm == pytest.approx(residual, rel=1e-6, abs=1e-12)
            if mode == "svd":  # the best rank-1 error
                best = float(torch.linalg.svdvals(target)[1:].square().sum().sqrt())
                assert info.residual_norm == pytest.approx(best, rel=1e-4)
            else:  # exact up to the fp16 rounding of the written factors (the error of the file, not before the cast)
                assert 1e-6 * info.norm < info.residual_norm < 1e-2 * info.norm
    assert names == set(report.layers) and len(names) == 5  # before: no layers in the report


def test_combine_loras_prints_the_summary_extract_and_resize_print(tmp_path, capsys):
    from hostile_files import kohya_lora

    from sdadapt.formats.files import write_safetensors

    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    write_safetensors(a, kohya_lora(0, rank=2), {})
    write_safetensors(b, kohya_lora(1, rank=3), {})
    assert main(["combine-loras", str(a), str(b), "--mode", "svd", "--rank", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"combined 2 files (svd), wrote {out}: 5 layers (text_encoder 2, unet 3), rank 2, "
                              "base model sd1\nlargest relative error ‖Δ − LoRA‖/‖Δ‖ = "), printed
