"""`train` and `generate` on tiny random SD1 and SDXL *single-file* checkpoints (what users have):
TOML config, buckets, samples, CSV log, periodic saves, resume, kohya metadata, diffusers loading."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from docs_pages import code_blocks

import sdadapt
from sdadapt.cli import main
from sdadapt.images import read_image, write_png

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_checkpoints import tiny_sd1_parts, tiny_sdxl_parts, write_single_file  # noqa: E402

#: kohya's training metadata a viewer (A1111, kohya's GUI, civitai) reads
KOHYA_TRAINING_KEYS = (
    "ss_session_id", "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr", "ss_unet_lr",
    "ss_num_train_images", "ss_num_reg_images", "ss_num_batches_per_epoch", "ss_num_epochs", "ss_epoch", "ss_steps",
    "ss_max_train_steps", "ss_batch_size_per_device", "ss_total_batch_size", "ss_gradient_accumulation_steps",
    "ss_lr_warmup_steps", "ss_lr_scheduler", "ss_optimizer", "ss_mixed_precision", "ss_clip_skip", "ss_resolution",
    "ss_enable_bucket", "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_info", "ss_dataset_dirs", "ss_tag_frequency",
    "ss_caption_dropout_rate", "ss_shuffle_caption", "ss_keep_tokens", "ss_seed", "ss_noise_offset", "ss_min_snr_gamma",
    "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_training_finished_at", "ss_network_module",
    "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2", "sshs_model_hash", "sshs_legacy_hash",
    "modelspec.resolution", "modelspec.architecture",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    images = root / "imgs"
    (images / "2_sks toy").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, (h, w) in {"wide": (16, 28), "tall": (28, 16), "square": (20, 20)}.items():
        write_png(images / f"{name}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
        (images / f"{name}.txt").write_text(f"sks toy, {name}, photo")
    write_png(images / "2_sks toy" / "r.png", torch.rand(3, 24, 24, generator=g) * 2 - 1)  # caption: "sks toy"
    (root / "prompts.txt").write_text("sks toy, photo --w 16 --h 16 --s 2 --d 1\n")
    # the parts built once (seeded: tiny_sd1_parts() / tiny_sdxl_parts() build these very weights each call) and
    # written as the files; test_single_files_load_as_the_models_they_hold reads them back against these parts
    sd1, sdxl = tiny_sd1_parts(), tiny_sdxl_parts()
    return {"root": root, "images": images, "prompts": root / "prompts.txt",
            "sd1": write_single_file(sd1, root / "sd1.safetensors", architecture="sd1"),
            "sd1_ckpt": write_single_file(sd1, root / "sd1.ckpt", architecture="sd1", ckpt=True),
            "sdxl": write_single_file(sdxl, root / "sdxl.safetensors", architecture="sdxl"),
            "parts": {"sd1": sd1, "sd1_ckpt": sd1, "sdxl": sdxl}}


def test_single_files_load_as_the_models_they_hold(files):
    from sdadapt.diffusers_system import DiffusersSystem

    for name, base in (("sd1", "sd1"), ("sd1_ckpt", "sd1"), ("sdxl", "sdxl")):
        system = DiffusersSystem.from_single_file(files[name])
        assert system.base_model == base
        for component, module in files["parts"][name].items():  # (the modules the file was written from)
            mine = getattr(system, component).state_dict()
            for key, value in module.state_dict().items():
                assert torch.equal(mine[key], value), (name, component, key)
    ids = system.tokenize(["a photo of a cat"])  # SDXL: both tokenizers; the second pads with "!" (0)
    assert ids.shape == (1, 2, 77) and ids[0, 0, -1] == 49407 and ids[0, 1, -1] == 0
    cond = system.condition({"ids": ids, "time_ids": torch.tensor([[20.0, 28, 0, 2, 16, 28]])})
    assert cond["context"].shape == (1, 77, 128) and cond["text_embeds"].shape == (1, 32)
    assert system.scaling_factor == pytest.approx(0.13025)


def _toml(files, out, **extra) -> str:
    lines = [
        "[model_arguments]", f"pretrained_model_name_or_path = '{files['sdxl']}'",
        "[dataset_arguments]", f"train_data_dir = '{files['images']}'", "resolution = '16,16'", "shuffle_caption = true",
        "keep_tokens = 1", "caption_dropout_rate = 0.1",
        "[training_arguments]", "max_train_steps = 3", "train_batch_size = 2", "optimizer_type = 'AdamW8bit'",
        "learning_rate = 1e-3", "text_encoder_lr = 5e-4", "lr_scheduler = 'constant_with_warmup'", "lr_warmup_steps = 1",
        "network_dim = 4", "network_alpha = 2", "network_args = ['conv_dim=2', 'conv_alpha=1']", "save_every_n_steps = 2",
        f"sample_prompts = '{files['prompts']}'", "sample_every_n_steps = 2", f"output_dir = '{out.parent}'",
        f"output_name = '{out.stem}'", "noise_offset = 0.05", "xformers = true", "mixed_precision = 'bf16'",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_sdxl_lora_from_a_toml_config_with_buckets_samples_log_and_resume(files, tmp_path, capsys):
    out = tmp_path / "xl.safetensors"
    config = tmp_path / "train.toml"
    config.write_text(_toml(files, out))
    assert main(["train", "lora", "--config", str(config), "--seed", "3"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "ignored xformers" in captured.err and "wide.png: 28x16 -> bucket" in captured.err
    assert "trained lora on 4 images for 3 steps" in captured.out

    # kohya-complete metadata, SDXL naming, the real resolution
    state, metadata = sdadapt.load_lora(out)
    assert set(state) == {"unet", "text_encoder", "text_encoder_2"}
    missing = [k for k in KOHYA_TRAINING_KEYS if k not in metadata]
    assert not missing, missing
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["modelspec.resolution"] == "16x16"
    assert metadata["ss_steps"] == "3" and metadata["ss_seed"] == "3" and metadata["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
    # (kohya's json.dumps(net_kwargs): the network_args as written, dropout = --network_dropout added, train_network.py:664-677)
    assert metadata["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1", "dropout": null}'
    assert json.loads(metadata["ss_dataset_dirs"])["2_sks toy"] == {"n_repeats": 2, "img_count": 1}
    assert json.loads(metadata["ss_tag_frequency"])["imgs"]["sks toy"] == 3  # (kohya: the folder's name)
    assert metadata["ss_sd_model_name"] == "sdxl.safetensors" and len(metadata["ss_new_sd_model_hash"]) == 64

    # the log, the samples, the periodic save and its state
    rows = list(csv.DictReader(open(out.with_name("xl-log.csv"))))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["lr"]) > 0 for r in rows[1:])
    samples = sorted(p.name for p in (tmp_path / "xl-samples").iterdir())
    assert samples == ["step000002-00.png"]  # every 2 steps (3 steps: one sample)
    assert read_image(tmp_path / "xl-samples" / samples[0]).shape == (3, 16, 16)
    assert (tmp_path / "xl-step000002.safetensors").is_file() and (tmp_path / "xl-state" / "state.json").is_file()

    # diffusers' own SDXL LoRA loader reads the file and gives the UNet sdadapt gives it
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as SDXL

    from sdadapt.diffusers_system import DiffusersSystem

    ours, theirs = DiffusersSystem.from_single_file(files["sdxl"]), DiffusersSystem.from_single_file(files["sdxl"])
    sd, alphas, meta = SDXL.lora_state_dict(str(out.parent), weight_name=out.name, unet_config=theirs.unet.config, local_files_only=True,
                                            return_lora_metadata=True)
    SDXL.load_lora_into_unet(sd, alphas, theirs.unet, adapter_name="a", metadata=meta)
    sdadapt.load_adapter(ours.unet, state["unet"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = ours.condition(ours.tokenize(["sks toy"]))
    with torch.no_grad():
        a, b = ours.denoiser()(x, torch.tensor([500]), cond), theirs.denoiser()(x, torch.tensor([500]), cond)
    assert (a - b).abs().max() < 1e-4

    # stop and resume: from the step-2 state the run ends exactly where the uninterrupted one did
    # (3 steps, not 4: the resumed run trains one step from the restored state and sampler; a step less each run)
    again = tmp_path / "again.safetensors"
    config.write_text(_toml(files, again, resume=str(tmp_path / "xl-state")))
    assert main(["train", "lora", "--config", str(config), "--seed", "3", "-q"]) == 0, capsys.readouterr().err
    assert "resumed at step 2" in capsys.readouterr().out
    first, second = sdadapt.load_lora(out)[0], sdadapt.load_lora(again)[0]
    for component in first:
        for key in first[component]:
            torch.testing.assert_close(first[component][key], second[component][key], rtol=0, atol=0)


def test_sd1_ckpt_other_methods_and_generate(files, tmp_path, capsys):
    # a LoCon on the .ckpt (weights_only), no buckets, a text-encoder lr of 0 (UNet only)
    out = tmp_path / "sd1.safetensors"
    argv = ["train", "locon", "--model", str(files["sd1_ckpt"]), "--images", str(files["images"]), "--resolution", "16",
            "--no-bucket", "--steps", "2", "--batch-size", "2", "--network-dim", "2", "--text-encoder-lr", "0",
            "--optimizer", "adafactor", "--ema-decay", "0.9", "-o", str(out), "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    state, metadata = sdadapt.load_lora(out)
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_enable_bucket"] == "False"
    assert metadata["ss_resolution"] == "(16, 16)" and metadata["ss_text_encoder_lr"] == "0.0"
    te = state["text_encoder"]
    assert all(float(v.abs().max()) == 0 for k, v in te.items() if "lora_up" in k)  # frozen: still zero

    # a full fine-tune of the single file writes a single file that loads back as the same kind of model
    tuned = tmp_path / "tuned.safetensors"
    assert main(["train", "full", "--model", str(files["sd1"]), "--images", str(files["images"]), "--resolution", "16",
                 "--steps", "1", "--batch-size", "1", "-o", str(tuned), "-q"]) == 0, capsys.readouterr().err
    from sdadapt.diffusers_system import DiffusersSystem

    back = DiffusersSystem.from_single_file(tuned)
    base = files["parts"]["sd1"]["unet"].state_dict()  # (the UNet sd1.safetensors holds: the fixture wrote it)
    assert back.base_model == "sd1"
    tuned_unet = back.unet.state_dict()
    assert tuned_unet.keys() == base.keys() and any(not torch.equal(tuned_unet[k], base[k]) for k in base)

    # generate on the checkpoint with the LoRA, Euler, a non-square size
    png = tmp_path / "img.png"
    code = main(["generate", "--model", str(files["sd1"]), "--lora", f"{out}:0.5", "--prompt", "sks toy",
                 "--negative", "blurry", "--sampler", "euler", "--steps", "2", "--width", "24", "--height", "16",
                 "--seed", "1", "-o", str(png)])
    assert code == 0, capsys.readouterr().err
    assert read_image(png).shape == (3, 16, 24)
    xl = tmp_path / "xl.png"
    assert main(["generate", "--model", str(files["sdxl"]), "--prompt", "a toy", "--steps", "2", "--width", "16",
                 "--height", "16", "-o", str(xl), "-q"]) == 0, capsys.readouterr().err
    assert read_image(xl).shape == (3, 16, 16)
    assert main(["generate", "--model", str(files["sd1"]), "--prompt", "x", "--width", "17", "-o", str(tmp_path / "b.png")]) == 2
    assert "multiples of 2" in capsys.readouterr().err  # (the tiny VAE's factor: a generated side's multiple)


def test_the_worked_example_in_docs_train_md_runs(tmp_path, monkeypatch, capsys):
    import sys
    from pathlib import Path

    make = code_blocks("train.md")[0]
    toml = code_blocks("train.md", "toml")[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(Path(__file__).parent), *sys.path])
    exec(compile(make, "docs/train.md", "exec"), {})
    (tmp_path / "train.toml").write_text(toml)
    (tmp_path / "out").mkdir()
    # the page's run, shortened on the command line (flags win over the config)
    assert main(["train", "lora", "--config", "train.toml", "--steps", "4", "--save-every-n-steps", "2",
                 "--sample-every-n-steps", "4"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "10_sks toy/wide.png: 80x48 -> bucket 40x24" in err
    assert (tmp_path / "out" / "sks-lora-step000002.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "sks-lora-samples").iterdir()) == ["step000004-00.png", "step000004-01.png"]
    assert main(["train", "lora", "--config", "train.toml", "--steps", "6", "--resume", "out/sks-lora-state",
                 "--overwrite", "--save-every-n-steps", "2", "--sample-every-n-steps", "6", "-q"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    rows = (tmp_path / "out" / "sks-lora-log.csv").read_text().split()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2", "3", "4", "5", "6"]  # the repeated steps replaced


def test_sdxl_saves_as_a_diffusers_folder_that_loads_back_and_in_diffusers(files, tmp_path):
    from sdadapt.diffusers_system import DiffusersSystem

    system = DiffusersSystem.from_single_file(files["sdxl"])
    folder = system.save_model(tmp_path / "xl-folder")
    again = DiffusersSystem.from_folder(folder)
    assert again.base_model == "sdxl" and again.is_sdxl
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        theirs = getattr(again, component).state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in getattr(system, component).state_dict().items()), component
    assert torch.equal(again.tokenize(["a photo, of a cat"]), system.tokenize(["a photo, of a cat"]))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.unet.config.addition_time_embed_dim == 8
    single = system.save_model(tmp_path / "xl.safetensors", dtype=torch.float16)
    back = DiffusersSystem.from_single_file(single)  # the exact configs travel in the file's metadata
    assert back.unet.config.addition_time_embed_dim == 8 and back.base_model == "sdxl"


def test_an_overwriting_save_that_fails_keeps_the_previous_outputs(tmp_path, monkeypatch, capsys):
    """``train --overwrite`` used to delete the old outputs before saving: an interrupted or failed save left none."""
    import sdadapt.jobs.train as train_job
    from sdadapt.cli import main
    from sdadapt.images import write_png

    images = tmp_path / "imgs"
    images.mkdir()
    write_png(images / "a.png", torch.zeros(3, 32, 32))
    (images / "a.txt").write_text("a red circle")
    out = tmp_path / "l.safetensors"
    # (--no-prior: sampling class images for each of the three runs was most of this test's time; the save is the same)
    args = ["train", "lora", "--images", str(images), "--model", "toy", "--steps", "1", "--batch-size", "1",
            "--no-save-state", "--no-prior", "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    before = out.read_bytes()
    real_save = train_job._save

    def save_then_fail(adaptation, spec, path, **kwargs):
        real_save(adaptation, spec, path, **kwargs)  # the new file is in place…
        raise OSError(28, "No space left on device")  # …and then the save fails (e.g. stamping the hashes)

    monkeypatch.setattr(train_job, "_save", save_then_fail)
    assert main([*args, "--overwrite", "--seed", "3"]) != 0
    assert out.read_bytes() == before  # the previous output is back
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("l.")) == ["l.safetensors"]
    monkeypatch.setattr(train_job, "_save", real_save)
    assert main([*args, "--overwrite", "--seed", "3"]) == 0, capsys.readouterr().err
    assert out.read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
