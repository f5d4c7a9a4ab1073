"""Loose ends of the EDM options work: ``--sample-sampler`` given vs default on an EDM model, Custom Diffusion on an
SDXL model refused from its header before the load, one header read per file version in ``jobs.model_size``, a
``.ckpt``'s size multiple told from its pickle's tensor names, and ``FitConfig``'s default step by the formulation.

- K kohya-ss/sd-scripts library/train_util.py ``add_training_arguments``: ``--sample_sampler`` default ``"ddim"`` (the
  value a run that gives none samples with on a DDPM model).
- D huggingface/diffusers ``AutoencoderKL`` / ``UNet2DConditionModel``: the VAE halves the side once per block after the
  first (``2 ** (len(block_out_channels) - 1)``, the pipelines' ``vae_scale_factor`` 8 for SD), the UNet once per down
  block but the last (SD1/SD2: 4 blocks, 8; SDXL: 3 blocks, 4), so 64 for SD1/SD2 and 32 for SDXL; in an LDM single
  file each halving is one ``input_blocks.N.0.op`` / ``encoder.down.N.downsample`` layer.
Tiny files here are state dicts of scalars under the LDM key names (the rules read key names and shapes only).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from sdadapt.jobs import model_size
from sdadapt.jobs.model_size import model_default_sampler, model_edm_scheduler, model_is_sdxl, model_size_multiple

#: LDM key names: the downsampling layers of SD1/SD2 (UNet input_blocks 3, 6, 9; VAE down 0-2) and of SDXL (UNet
#: input_blocks 3, 6: three blocks), with each layout's text-encoder keys (checkpoint_architecture's evidence)
_SD1_KEYS = [*(f"model.diffusion_model.input_blocks.{n}.0.op.weight" for n in (3, 6, 9)),
             *(f"first_stage_model.encoder.down.{n}.downsample.conv.weight" for n in (0, 1, 2)),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
_SDXL_KEYS = [*(f"model.diffusion_model.input_blocks.{n}.0.op.weight" for n in (3, 6)),
              *(f"first_stage_model.encoder.down.{n}.downsample.conv.weight" for n in (0, 1, 2)),
              "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
              "conditioner.embedders.1.model.token_embedding.weight", "model.diffusion_model.label_emb.0.0.weight"]


def _ckpt(path, keys, **extra):
    """A torch.save ``.ckpt`` as the LDM checkpoints are: ``{"state_dict": {key: tensor}, ...}``."""
    torch.save({"state_dict": {key: torch.zeros(1) for key in keys}, "global_step": 1, **extra}, path)
    return path


def _safetensors(path, keys):
    from safetensors.torch import save_file

    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


@pytest.fixture
def no_torch_load(monkeypatch):
    """``torch.load`` that fails the test: the header is read from the pickle stream alone (weights_only's loader is
    the load's, not the header's)."""
    def load(*args, **kwargs):
        raise AssertionError("torch.load was called to read a header")

    monkeypatch.setattr(torch, "load", load)


@pytest.fixture
def no_load(monkeypatch):
    """``load_system`` that fails the test: what is refused must be refused before the (slow) load."""
    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded("the model was loaded")

    monkeypatch.setattr("sdadapt.jobs.train.load_system", load)
    monkeypatch.setattr("sdadapt.jobs.generate.load_system", load)
    return Loaded


@pytest.fixture
def header_reads(monkeypatch):
    """Counts of the header reads of a pickle (``pickle_header``) and of a safetensors file, the cache emptied."""
    import sdadapt.formats.files as files
    import sdadapt.formats.pickles as pickles

    counts = {"pickle": 0, "safetensors": 0}
    real_pickle, real_safetensors = pickles.pickle_header, files.read_safetensors_header

    def pickle_header(*args, **kwargs):
        counts["pickle"] += 1
        return real_pickle(*args, **kwargs)

    def read_safetensors_header(*args, **kwargs):
        counts["safetensors"] += 1
        return real_safetensors(*args, **kwargs)

    monkeypatch.setattr(pickles, "pickle_header", pickle_header)
    monkeypatch.setattr(files, "read_safetensors_header", read_safetensors_header)
    model_size._cached_header_shapes.cache_clear()
    yield counts
    model_size._cached_header_shapes.cache_clear()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from caption_images import two_captioned_images

    return two_captioned_images(tmp_path_factory.mktemp("followups") / "images")


# ------------------------------------------------------------------------ (3) a .ckpt's size multiple
@pytest.mark.parametrize(("keys", "multiple", "sdxl"), [(_SD1_KEYS, 8, False), (_SDXL_KEYS, 8, True)])
def test_a_ckpts_size_multiple_and_layout_are_told_from_its_pickle_as_from_a_safetensors_header(
        tmp_path, keys, multiple, sdxl, no_torch_load):
    """A generated side's multiple: 2^(VAE halvings), 8 (A1111's and D's rule; D's UNet takes any latent size) — the
    same from the .ckpt's pickle
    stream (no torch.load, no tensor read) as from the same state as .safetensors; before, a .ckpt told nothing."""
    ckpt, st = _ckpt(tmp_path / "m.ckpt", keys), _safetensors(tmp_path / "m.safetensors", keys)
    assert model_size_multiple(ckpt) == model_size_multiple(st) == multiple
    assert model_is_sdxl(ckpt) is model_is_sdxl(st) is sdxl
    pruned = _ckpt(tmp_path / "unet-only.ckpt", [k for k in keys if not k.startswith("first_stage_model.")])
    assert model_size_multiple(pruned) is None  # (no VAE keys: the loaded model's check applies)


def test_header_questions_on_an_unsafe_or_foreign_pickle_run_nothing(tmp_path):
    """A pickle naming code is refused (UnsafeFileError, as the load's weights_only would) and its code never runs;
    a pickled object only full unpickling rebuilds is 'cannot tell' (None): the loader says why."""
    import argparse
    import pickle

    from sdadapt.errors import UnsafeFileError

    marker = tmp_path / "ran"

    class Attack:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": {_SD1_KEYS[0]: Attack()}}, protocol=2))
    for question in (model_size_multiple, model_is_sdxl, model_edm_scheduler):
        with pytest.raises(UnsafeFileError, match="exec"):
            question(bad)
    assert not marker.exists()
    foreign = _ckpt(tmp_path / "foreign.ckpt", _SD1_KEYS, optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1).defaults)
    assert model_size_multiple(foreign) == 8  # (a dict of numbers beside the state: fine)
    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {k: torch.zeros(1) for k in _SD1_KEYS}, "args": argparse.Namespace(lr=1)}, odd)
    assert model_size_multiple(odd) is None and model_is_sdxl(odd) is None


# ------------------------------------------------------------------------- (3) one header read per file version
def test_generate_reads_a_ckpts_pickle_once_and_a_rewritten_file_anew(tmp_path, header_reads, no_load):
    """``generate`` asks the default sampler, the EDM refusals and the size multiple of one --model: one pickle read
    (it was up to three); the same file rewritten (another size / mtime) is read again and its new answers given."""
    from sdadapt.jobs.generate import run_generate

    ckpt = _ckpt(tmp_path / "m.ckpt", _SDXL_KEYS)
    with pytest.raises(no_load):
        run_generate(model=str(ckpt), prompt="a cube", width=64, height=64, out=str(tmp_path / "a.png"))
    assert header_reads["pickle"] == 1
    assert (model_default_sampler(ckpt), model_size_multiple(ckpt), model_is_sdxl(ckpt)) == ("ddim", 8, True)
    assert header_reads["pickle"] == 1
    with pytest.raises(ValueError, match="image size 44x64: both sides must be multiples of 8"):  # (before the load)
        run_generate(model=str(ckpt), prompt="a cube", width=44, height=64, out=str(tmp_path / "a.png"))
    assert header_reads["pickle"] == 1
    stat = ckpt.stat()
    _ckpt(ckpt, [*_SDXL_KEYS, "edm_mean", "edm_std"])  # (Playground v2.5's keys: now an EDM model)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert model_default_sampler(ckpt) == "dpmsolver++" and model_edm_scheduler(ckpt) is not None
    assert header_reads["pickle"] == 2
    st = _safetensors(tmp_path / "m.safetensors", _SD1_KEYS)
    assert (model_default_sampler(st), model_size_multiple(st), model_is_sdxl(st)) == ("ddim", 8, False)
    assert header_reads["safetensors"] == 1


def test_a_cached_header_cannot_be_changed_by_a_caller(tmp_path):
    shapes = model_size._header_shapes(_ckpt(tmp_path / "m.ckpt", _SD1_KEYS))
    with pytest.raises(TypeError):
        shapes["edm_mean"] = (1,)  # type: ignore[index]


# ------------------------------------------------------------------- (2) Custom Diffusion on SDXL before the load
def test_custom_diffusion_on_an_sdxl_model_is_refused_from_its_header_before_the_load(tmp_path, images, no_load):
    """A .safetensors and a .ckpt by their keys, a diffusers folder by its text_encoder_2/ (the loader's rule): refused
    by name before the load (it was refused inside prepare_custom_diffusion, after it); an SD1 file goes on to load."""
    folder = tmp_path / "sdxl-folder"
    (folder / "text_encoder_2").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    models = [_safetensors(tmp_path / "xl.safetensors", _SDXL_KEYS), _ckpt(tmp_path / "xl.ckpt", _SDXL_KEYS),
              _ckpt(tmp_path / "pg.ckpt", [*_SDXL_KEYS, "edm_mean", "edm_std"]), folder]
    from sdadapt.jobs.train import run_train

    for model in models:
        with pytest.raises(ValueError, match=r"SDXL layout \(two text encoders\): custom-diffusion supports one-text"):
            run_train("custom-diffusion", images=str(images), model=str(model), out=str(tmp_path / "cd.safetensors"),
                      steps=1, method_options={"token": "<new1>"})
    with pytest.raises(no_load):  # (SD1: no refusal of its own; the header cannot tell the toy either)
        run_train("custom-diffusion", images=str(images), model=str(_ckpt(tmp_path / "sd1.ckpt", _SD1_KEYS)),
                  out=str(tmp_path / "cd.safetensors"), steps=1, method_options={"token": "<new1>"})
    (folder / "text_encoder_2").rmdir()
    assert model_is_sdxl(folder) is False and model_is_sdxl("toy") is None


# ------------------------------------------------------------------------ (1) --sample-sampler given vs default
def test_sample_sampler_given_is_kept_and_refused_on_an_edm_model_while_not_given_is_its_own(tmp_path, images):
    from sdadapt.jobs.train import DEFAULT_SAMPLE_SAMPLER, TrainOptions, _edm_options

    pg = str(_safetensors(tmp_path / "pg.safetensors", [*_SDXL_KEYS, "edm_mean", "edm_std"]))
    notes: list[str] = []
    got = _edm_options("lora", TrainOptions(model=pg, images=str(images)), notes, sample_samplers=[None])
    assert got.sample_sampler == "dpmsolver++" and "not the default --sample-sampler ddim" in notes[-1]
    for given in (DEFAULT_SAMPLE_SAMPLER, "DDIM", "euler_a"):  # (the default's name given is a sampler given)
        with pytest.raises(ValueError, match=f"sample images would use {given}: leave --sample-sampler out"):
            _edm_options("lora", TrainOptions(model=pg, images=str(images), sample_sampler=given), [],
                         sample_samplers=[None])
    assert _edm_options("lora", TrainOptions(model=pg, images=str(images), sample_sampler="euler"), [],
                        sample_samplers=[None]).sample_sampler == "euler"
    assert TrainOptions(images=str(images)).sample_sampler is None and DEFAULT_SAMPLE_SAMPLER == "ddim"  # (K)


def test_sample_sampler_ddim_on_the_command_line_or_in_a_config_is_refused_on_playground_before_the_load(
        tmp_path, images, no_load, capsys):
    from sdadapt.cli import main

    pg = _ckpt(tmp_path / "pg.ckpt", [*_SDXL_KEYS, "edm_mean", "edm_std"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube\n")
    common = ["train", "lora", "--images", str(images), "--model", str(pg), "--steps", "1", "-q",
              "--sample-prompts", str(prompts), "-o", str(tmp_path / "x.safetensors")]
    assert main([*common, "--sample-sampler", "ddim"]) != 0
    assert "sample images would use ddim: leave --sample-sampler out" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text('sample_sampler = "ddim"\n')
    assert main([*common, "--config", str(config)]) != 0
    assert "sample images would use ddim" in capsys.readouterr().err
    with pytest.raises(no_load):  # (not given: its own scheduler, no refusal; the run goes on to the load)
        from sdadapt.jobs.train import run_train

        run_train("lora", images=str(images), model=str(pg), out=str(tmp_path / "y.safetensors"), steps=1,
                  sample_prompts=str(prompts))


def test_sample_sampler_not_given_samples_a_ddpm_model_with_kohyas_ddim(tmp_path, images, monkeypatch):
    """K: a run that gives no --sample-sampler samples with ddim (the toy: a DDPM model); a prompt's --ss wins."""
    import sdadapt.sampling
    from sdadapt.jobs.train import run_train

    used: list[str] = []
    real = sdadapt.sampling.generate

    def generate(*args, sampler, **kwargs):
        used.append(sampler)
        return real(*args, sampler=sampler, **kwargs)

    monkeypatch.setattr(sdadapt.sampling, "generate", generate)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cube --s 2\na cube --s 2 --ss euler\n")
    run_train("lora", images=str(images), model="toy", out=str(tmp_path / "t.safetensors"), steps=1, batch_size=1,
              sample_prompts=str(prompts))
    assert used == ["ddim", "euler"]


# ------------------------------------------------------------------- (4) the library's default step by formulation
class _Stop(Exception):
    pass


@pytest.mark.parametrize("edm", [False, True])
def test_fit_without_a_step_config_takes_min_snr_by_the_systems_formulation(edm, monkeypatch):
    """``FitConfig()`` (no ``step``): min-SNR γ 5 on a DDPM model, none on an EDM model (it refused before: its default
    step had γ 5, which has no EDM form); a step given is the user's and stays refused with γ on EDM (diffusers'
    train_dreambooth_lora_sdxl.py 990-991)."""
    import importlib

    from sdadapt.methods import METHODS
    from sdadapt.methods.fit import DEFAULT_MIN_SNR_GAMMA, FitConfig, fit
    from sdadapt.samplers.edm import EDMSchedule
    from sdadapt.toy import load_toy
    from sdadapt.training.step import StepConfig

    system = load_toy()
    system.edm = EDMSchedule() if edm else None  # (the step's branch is chosen by system.edm; nothing trains here)
    seen: list[StepConfig] = []

    def train_step(*args, config, **kwargs):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(importlib.import_module("sdadapt.methods.fit"), "train_step", train_step)
    adaptation = METHODS["lora"].adapt(system, seed=0)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.raises(_Stop):
        fit(system, adaptation, images, ["a red cube"], config=FitConfig(steps=1, batch_size=1, warmup_steps=0))
    assert DEFAULT_MIN_SNR_GAMMA == 5.0 and seen[0].min_snr_gamma == (None if edm else 5.0)
    assert (seen[0].edm is not None) is edm
    assert FitConfig().step is None and FitConfig().step_config(edm=edm).min_snr_gamma == seen[0].min_snr_gamma
    if edm:
        with pytest.raises(ValueError, match="min_snr_gamma=5.0"):
            fit(system, adaptation, images, ["a red cube"], config=FitConfig(
                steps=1, batch_size=1, warmup_steps=0, step=StepConfig(min_snr_gamma=5.0)))
    adaptation.remove()
