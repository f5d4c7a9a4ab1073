"""What a diffusers / A1111 / kohya user met following this session's docs on tiny models (the walkthrough's fixes).

- An EDM model (Playground v2.5) given no sampler samples with its own scheduler, as its diffusers pipeline does
  (``StableDiffusionXLPipeline`` runs the ``scheduler`` the model folder names: ``EDMDPMSolverMultistepScheduler``,
  diffusers ``loaders/single_file_utils.py`` ``create_scheduler_from_ldm`` gives a Playground single file the same):
  ``generate`` without ``--sampler``, ``sdadapt.generate`` / ``DiffusersSystem.sample`` without ``sampler=``, and
  ``train``'s sample images without ``--sample-sampler``. Before, sdadapt's default ``ddim`` was refused there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))

import test_playground_edm

from sdadapt.jobs.model_size import model_default_sampler
from sdadapt.sampling import default_sampler

# the EDM tests' tiny Playground-like file (and the same weights without edm_mean/edm_std) and its system
files, system = test_playground_edm.files, test_playground_edm.system


def _folder(root: Path, config: dict) -> Path:
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


def test_the_default_sampler_is_the_models_own_scheduler_told_before_the_load(files, tmp_path):
    """Header / config only: the Playground file -> dpmsolver++ (diffusers' Playground scheduler), the same weights
    without edm_mean/edm_std -> ddim; a folder by its scheduler class and algorithm; the toy and a missing path ddim."""
    pg, plain = files
    assert model_default_sampler(pg) == "dpmsolver++" and model_default_sampler(plain) == "ddim"
    assert model_default_sampler(_folder(tmp_path / "a", {"_class_name": "EDMEulerScheduler"})) == "euler"
    assert model_default_sampler(_folder(tmp_path / "b", {"_class_name": "EDMDPMSolverMultistepScheduler",
                                                          "algorithm_type": "sde-dpmsolver++"})) == "dpmsolver++_sde"
    assert model_default_sampler(_folder(tmp_path / "c", {"_class_name": "DDIMScheduler"})) == "ddim"
    assert model_default_sampler(tmp_path / "c" / "nothing") == "ddim" and model_default_sampler("toy") == "ddim"
    # the loaded system's rule is the same one
    assert default_sampler(SimpleNamespace(edm=None, scheduler_config={"_class_name": "EDMEulerScheduler"})) == "ddim"
    assert default_sampler(SimpleNamespace(edm=object(), scheduler_config={"_class_name": "EDMEulerScheduler"})) == "euler"


def test_sampling_an_edm_model_without_a_sampler_is_its_own_scheduler(system):
    """``sdadapt.generate`` and ``DiffusersSystem.sample`` with no sampler: dpmsolver++'s latents bit for bit (not
    euler's: the check can tell them apart)."""
    from sdadapt.sampling import generate

    kw = {"seed": 3, "steps": 3, "height": 32, "width": 32, "output": "latents"}
    own = system.sample(["a cube"], sampler="dpmsolver++", **kw)
    assert default_sampler(system) == "dpmsolver++"
    assert torch.equal(system.sample(["a cube"], **kw), own)
    assert torch.equal(generate(system, ["a cube"], **kw), own)  # (both at the model card's 3: default_guidance)
    assert not torch.equal(system.sample(["a cube"], sampler="euler", guidance=3.0, **kw), own)


def test_generate_cli_without_sampler_on_playground_is_dpmsolver_and_says_so(files, system, tmp_path, capsys):
    """``python -m sdadapt generate --model pg.safetensors`` (no --sampler): it failed on ``ddim``; now the image is
    dpmsolver++'s (the pixels of the system's own dpmsolver++ sample), A1111's infotext names "DPM++ 2M", and the log
    says which sampler ran and why."""
    from sdadapt.cli import main
    from sdadapt.images import read_image_channels, read_png_text, to_uint8

    out = tmp_path / "pg.png"
    assert main(["generate", "--model", str(files[0]), "--prompt", "a cube", "--seed", "3", "--steps", "2",
                 "--width", "32", "--height", "32", "-o", str(out)]) == 0
    said = capsys.readouterr()
    assert "sampling with dpmsolver++, its own scheduler" in said.out + said.err
    assert "Sampler: DPM++ 2M," in read_png_text(out)["parameters"]
    expected = to_uint8(system.sample(["a cube"], sampler="dpmsolver++", seed=3, steps=2, height=32, width=32,
                                      guidance=3.0)[0])  # (the model card's guidance for it: test_edm_options.py)
    got = read_image_channels(out)[..., :3]
    assert got.shape == expected.shape and (got == expected).all()


def test_train_samples_an_edm_model_with_its_own_scheduler_by_default(files, tmp_path):
    """``train`` on Playground with sample prompts and no --sample-sampler: the samples use the model's own scheduler
    (said in a note, only when a sample uses the default); an explicit non-EDM sampler is still refused by name, the
    command's or a prompt's ``--ss``."""
    from sdadapt.jobs.train import TrainOptions, _edm_options

    options = TrainOptions(model=str(files[0]), images=str(tmp_path))
    notes: list[str] = []
    got = _edm_options("lora", options, notes, sample_samplers=[None, "euler"], own_sampler="dpmsolver++_sde")
    assert got.sample_sampler == "dpmsolver++_sde"
    assert any("sample images use dpmsolver++_sde, its own scheduler" in note for note in notes)
    notes = []
    assert _edm_options("lora", options, notes, sample_samplers=["euler"]).sample_sampler == "dpmsolver++"
    assert not any("sample images use" in note for note in notes)  # (no sample uses the default: nothing to say)
    with pytest.raises(ValueError, match="sample images would use euler_a"):
        _edm_options("lora", TrainOptions(model=str(files[0]), images=str(tmp_path), sample_sampler="euler_a"), [],
                     sample_samplers=[None])
    with pytest.raises(ValueError, match="sample images would use ddim"):  # (a prompt's --ss ddim is the user's)
        _edm_options("lora", options, [], sample_samplers=[None, "ddim"])


@pytest.mark.parametrize("command", ["generate", "convert", "clip-invert"])
def test_a_missing_clip_stats_file_is_refused_at_the_parse_naming_the_option(command, tmp_path, capsys):
    """``--clip-stats /typo.th`` said ``error: /typo.th: no such file`` after the model began to load; now argparse
    refuses it naming the option (one definition for the three commands: cli/options.py), and an existing file
    passes the parse."""
    from sdadapt.cli import build_parser

    parser = build_parser()
    model = {"generate": ["--model", "m.safetensors", "--prompt", "a", "-o", "a.png"],
             "convert": ["m.safetensors", "o.safetensors"], "clip-invert": []}[command]
    action = next(a for a in parser._subparsers._group_actions[0].choices[command]._actions
                  if "--clip-stats" in a.option_strings)
    with pytest.raises(SystemExit):
        parser.parse_args([command, *model, "--clip-stats", str(tmp_path / "typo.th")])
    assert f"argument --clip-stats: {tmp_path / 'typo.th'}: no such file or folder" in capsys.readouterr().err
    stats = tmp_path / "s.th"
    stats.write_bytes(b"")
    assert action.type(str(stats)) == str(stats)


def test_a_cut_lycoris_dylora_file_no_longer_says_dylora_so_a_second_cut_keeps_its_scale(tmp_path):
    """``cut-dylora`` of a LyCORIS DyLoRA file writes ``alpha · block_size`` (LyCORIS' scale at that rank,
    lycoris/modules/dylora.py:97-110) but kept ``algo=dylora`` / ``block_size``: ``inspect`` then advised applying
    the cut at strength block_size (the scale twice), and cutting the cut multiplied alpha again (2x at block size
    2). The cut is LyCORIS' LoRA now (``algo=lora``, its other args kept): cutting it again equals cutting the
    original to that rank, and every loader's ``alpha / r`` is the trained network's ``alpha / k`` (float64 here)."""
    from safetensors.torch import load_file, save_file

    from sdadapt.formats.detect import dylora_network
    from sdadapt.formats.files import read_safetensors_header
    from sdadapt.loratools.dylora import dylora_cut

    g = torch.Generator().manual_seed(0)
    name, alpha, block = "lora_unet_down_blocks_0_attentions_0_proj_in", 3.0, 2
    up, down = torch.randn(6, 8, generator=g), torch.randn(8, 5, generator=g)
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(alpha)},
              str(tmp_path / "dy.safetensors"),
              {"ss_network_module": "lycoris.kohya", "ss_network_dim": "8", "ss_network_alpha": str(alpha),
               "ss_network_args": json.dumps({"algo": "dylora", "block_size": str(block), "conv_dim": "4"})})
    once = dylora_cut(tmp_path / "dy.safetensors", tmp_path / "c4.safetensors", rank=4)
    meta = read_safetensors_header(once)[1]
    assert dylora_network(meta) is None and json.loads(meta["ss_network_args"]) == {"algo": "lora", "conv_dim": "4"}
    twice = dylora_cut(once, tmp_path / "c2.safetensors", rank=2)
    direct = load_file(str(dylora_cut(tmp_path / "dy.safetensors", tmp_path / "d2.safetensors", rank=2)))
    got = load_file(str(twice))
    assert got.keys() == direct.keys() and all(torch.equal(got[k], direct[k]) for k in got)
    applied = got[f"{name}.lora_up.weight"].double() @ got[f"{name}.lora_down.weight"].double() * (
        float(got[f"{name}.alpha"]) / 2)
    trained = up[:, :2].double() @ down[:2].double() * (alpha / 1)  # (rank 2 = 1 block: LyCORIS' alpha / blocks)
    torch.testing.assert_close(applied, trained, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("option", ["embeddings_dir", "lora_dir", "hypernetwork_dir"])
def test_a_missing_folder_is_said_before_the_model_loads(tmp_path, option):
    """``--embeddings-dir /typo`` was found out after the model's load (15 s on the tiny SDXL here), ``--lora-dir`` /
    ``--hypernetwork-dir /typo`` only when a prompt tag looked in it; each is refused first now, tags or not: with
    a model that does not exist either, the folder is what is named."""
    from sdadapt.errors import InputError
    from sdadapt.jobs.generate import run_generate

    flag = "--" + option.replace("_", "-")
    with pytest.raises(InputError, match=f"{flag} .*nowhere: no such folder"):
        run_generate(model=str(tmp_path / "no-model.safetensors"), prompt="a cat", out=tmp_path / "a.png",
                     **{option: tmp_path / "nowhere"})


@pytest.mark.parametrize("options, said", [
    # (the model's own grid asked for — "DPM++ 2M Karras", --karras — runs: test_edm_own_grid_as_its_infotext_names_it)
    ({"sampler": "DPM++ 2M", "schedule": "exponential"}, r"--sampler dpmsolver\+\+ on --model .*leave out a schedule"),
    ({"sampler": "DPM++ 2M Karras", "rho": 5.0}, r"--sampler dpmsolver\+\+ on --model .*; schedule options"),
    ({"sampler": "Euler a"}, r"--sampler euler_a on --model .*has no EDM form"),
    ({"sampler": "DPM++ SDE Karras"},  # (no EDM form whatever the grid: no label hint)
     r"--sampler dpmpp_sde on --model .*has no EDM form.*: --sampler dpmsolver\+\+\)$"),
    ({"hires_scale": 2.0, "hires_sampler": "heun"}, r"--hires-sampler heun on --model .*has no EDM form"),
    ({"sampler": "euler", "karras": True, "schedule": "exponential"}, r"karras and schedule 'exponential' both name"),
])
def test_edm_refusals_come_before_the_model_loads(files, tmp_path, monkeypatch, options, said):
    """An A1111 user's ``--sampler 'DPM++ 2M Karras'`` (A1111's default) on Playground was refused after the whole
    load with "leave out a schedule" though no --schedule was given; the header tells EDM, so the refusal comes first
    (the load is never reached) and says which label to give instead."""
    import sdadapt.jobs.generate as job

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the EDM refusal")

    monkeypatch.setattr(job, "load_system", no_load)
    with pytest.raises(ValueError, match=said):
        job.run_generate(model=str(files[0]), prompt="a cat", out=tmp_path / "a.png", steps=2, **options)
    with pytest.raises(AssertionError, match="loaded before"):  # (the plain SDXL file: no EDM refusal, it loads)
        job.run_generate(model=str(files[1]), prompt="a cat", out=tmp_path / "b.png", steps=2, sampler="DPM++ 2M Karras")


def test_edm_own_grid_as_its_infotext_names_it(files, tmp_path):
    """An EDM run's infotext says "Sampler: DPM++ 2M, Schedule type: Karras" (its σ grid is Karras' ρ grid); pasted
    back — the label "DPM++ 2M Karras", ``--schedule Karras``, ``--karras`` — it was refused ("leave out a schedule").
    The model's own grid asked for now runs as without it: the same pixels and the same infotext, said in the log; the
    plain SDXL file with the same label still runs A1111's Karras grid (a different image)."""
    from sdadapt.images import read_image_channels, read_png_text
    from sdadapt.jobs.generate import run_generate

    run = dict(model=str(files[0]), prompt="a cube", seed=3, steps=2, width=32, height=32)
    run_generate(out=tmp_path / "own.png", sampler="dpmsolver++", **run)
    said: list[str] = []
    for name, options in (("label", {"sampler": "DPM++ 2M Karras"}),
                          ("schedule", {"sampler": "DPM++ 2M", "schedule": "Karras"}),
                          ("flag", {"sampler": "dpmsolver++", "karras": True})):
        run_generate(out=tmp_path / f"{name}.png", log=said.append, **options, **run)
        assert (read_image_channels(tmp_path / f"{name}.png") == read_image_channels(tmp_path / "own.png")).all(), name
        assert read_png_text(tmp_path / f"{name}.png") == read_png_text(tmp_path / "own.png"), name
    assert sum("samples on its own σ grid, which is the karras grid asked for" in line for line in said) == 3
    text = read_png_text(tmp_path / "own.png")["parameters"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in text
    run_generate(out=tmp_path / "euler.png", sampler="euler", **run)
    run_generate(out=tmp_path / "euler_k.png", sampler="euler", karras=True, **run)
    assert (read_image_channels(tmp_path / "euler.png") == read_image_channels(tmp_path / "euler_k.png")).all()
    plain = dict(run, model=str(files[1]))
    run_generate(out=tmp_path / "p.png", sampler="dpmsolver++", **plain)
    run_generate(out=tmp_path / "pk.png", sampler="DPM++ 2M Karras", **plain)
    assert (read_image_channels(tmp_path / "p.png") != read_image_channels(tmp_path / "pk.png")).any()
