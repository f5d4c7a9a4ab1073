"""kohya configs as GUIs write them, not as a person would: bmaltais/kohya_ss (its ``train_model`` building
``config_toml_data``: kohya_gui/lora_gui.py, dreambooth_gui.py), LoRA Easy Training Scripts' backend (its GUI's fields
copied into config.toml) and older kohya_ss JSONs. Each key below is written as those GUIs write it; kohya's
sd-scripts trains every one of these files, and so must sdadapt (or say exactly what differs)."""

from __future__ import annotations

import os

import pytest
from safetensors import safe_open
from train_inputs import kohya_config_names

from sdadapt.cli import main
from sdadapt.cli.kohya_defaults import kohya_defaults
from sdadapt.cli.train import read_config
from sdadapt.jobs import TrainOptions


def _read(tmp_path, text: str):
    config = tmp_path / "gui.toml"
    config.write_text(text, encoding="utf-8")
    fields, method_options = kohya_config_names()
    return read_config(config, fields=fields, method_options=method_options)


def test_max_train_epochs_wins_over_the_max_train_steps_the_gui_also_writes(tmp_path):
    """kohya_ss writes max_train_steps whenever it is 0 in the form (computed from the epochs) and max_train_epochs
    when set; sd-scripts' scripts then count the steps from the epochs (train_network.py: ``if
    args.max_train_epochs is not None: args.max_train_steps = ...``). Refused before ("--steps or --epochs")."""
    options, _, notes = _read(tmp_path, "max_train_steps = 1600\nmax_train_epochs = 3\n")
    assert options.get("epochs") == 3 and "steps" not in options
    assert any("ignored max_train_steps = 1600 (max_train_epochs = 3" in note for note in notes)
    options, _, _ = _read(tmp_path, "max_train_steps = 1600\n")
    assert options["steps"] == 1600
    with pytest.raises(ValueError, match="--steps or --epochs"):  # (sdadapt's own names: both is a mistake)
        TrainOptions(model="toy", images="x", **_read(tmp_path, "steps = 5\nepochs = 2\n")[0])


@pytest.mark.parametrize("name, written", [("froddy-loha-sx_v1.0a", "froddy-loha-sx_v1.0a.safetensors"),
                                           ("char_sd1.5", "char_sd1.5.safetensors"), ("last", "last.safetensors"),
                                           ("mine.safetensors", "mine.safetensors"), ("net.pt", "net.pt")])
def test_an_output_name_with_a_dot_gets_the_extension_as_kohya_appends_it(tmp_path, name, written):
    options, _, _ = _read(tmp_path, f"output_dir = '{tmp_path}'\noutput_name = '{name}'\n")
    assert options["out"] == str(tmp_path / written)


def test_gui_only_fields_and_off_texts_are_notes_not_errors(tmp_path):
    """LoRA Easy Training Scripts' backend copies save_toml / tag_occurrence ... into config.toml (sd-scripts
    ignores them); older kohya_ss JSONs write huggingface_repo_id = "False"."""
    options, _, notes = _read(tmp_path, "save_toml = true\nsave_toml_location = '/x'\ntag_occurrence = true\n"
                                        "tag_file_location = '/y'\neasy_name = 'n'\nhuggingface_repo_id = 'False'\n")
    assert options == {}
    for key in ("save_toml", "save_toml_location", "tag_occurrence", "tag_file_location", "easy_name"):
        assert any(note.startswith(f"ignored {key} (a LoRA Easy Training Scripts GUI field") for note in notes)
    assert any("ignored huggingface_repo_id = 'False' (read as off" in note for note in notes)
    with pytest.raises(ValueError, match="uploads nothing"):
        _read(tmp_path, "huggingface_repo_id = 'me/model'\n")


def test_a_multires_discount_without_iterations_is_unused_as_in_kohya():
    """kohya_ss's DreamBooth and fine-tune tabs write multires_noise_discount = 0 whatever the iterations; kohya reads
    it only with multires_noise_iterations."""
    TrainOptions(model="toy", images="x", multires_noise_discount=0.0)
    with pytest.raises(ValueError, match="--multires-noise-discount must be in"):
        TrainOptions(model="toy", images="x", multires_noise_discount=0.0, multires_noise_iterations=6)


def test_sdxl_dreambooth_from_a_kohya_config_trains_no_text_encoder_unless_it_says(tmp_path):
    """kohya_ss runs sdxl_train.py for an SDXL DreamBooth and writes train_text_encoder only when ticked; sdxl_train.py
    trains the encoders only with it, train_db.py (SD 1/2) trains its encoder by default."""
    from tiny_checkpoints import tiny_sd1_file, tiny_sdxl_file

    sdxl = tiny_sdxl_file(tmp_path / "xl.safetensors")
    sd1 = tiny_sd1_file(tmp_path / "sd1.safetensors")
    own = {"text_encoder", "rank"}
    _, added, note = kohya_defaults(method="dreambooth", values={"model": str(sdxl)}, methods={}, method_options=own)
    assert added.get("text_encoder") is False and "train_text_encoder off (sdxl_train.py" in note
    assert "text_encoder" not in kohya_defaults(method="dreambooth", values={"model": str(sd1)}, methods={},
                                                method_options=own)[1]
    assert "text_encoder" not in kohya_defaults(method="dreambooth", values={"model": str(sdxl)},
                                                methods={"text_encoder": True}, method_options=own)[1]


def test_the_defaults_note_leaves_out_what_the_dataset_toml_sets(tmp_path):
    dataset = tmp_path / "dataset.toml"
    dataset.write_text("[general]\nenable_bucket = true\n[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\n"
                       "image_dir = 'x'\ncaption_extension = '.txt'\n", encoding="utf-8")
    _, _, note = kohya_defaults(method="lora", values={"dataset_config": str(dataset)}, methods={},
                                method_options=set())
    for shown in ("enable_bucket", "caption_extension", "train_batch_size"):
        assert shown not in note
    assert "lr_scheduler constant" in note
    _, _, plain = kohya_defaults(method="lora", values={}, methods={}, method_options=set())
    assert "enable_bucket off" in plain and "caption_extension .caption" in plain


def test_an_algo_sdadapt_does_not_train_is_named_before_its_own_args(tmp_path):
    with pytest.raises(ValueError, match=r"not dylora \(kohya's own DyLoRA, networks.dylora, is `train dylora`"):
        _read(tmp_path, "network_module = 'lycoris.kohya'\nnetwork_args = ['block_size=4', 'algo=dylora']\n")


def test_a_kohya_ss_style_config_trains_end_to_end(tmp_path, capsys):
    """One file carrying all of it (on the toy model): both step counts, a dotted output name, GUI-only fields, an
    off upload text, the DreamBooth tab's multires discount, and the folder-name captions kohya_ss's
    ``.none-use-foldername`` asks for (the .txt captions beside the images are not read, as in kohya)."""
    from train_inputs import captioned_pngs

    images = tmp_path / "img"
    images.mkdir()
    captioned_pngs(images / "2_sks shape", [(32, 32), (32, 32)], caption="a red circle")
    out = tmp_path / "out"
    config = tmp_path / "gui.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{images}'\n"
                      f"output_dir = '{out}'\noutput_name = 'shapes_v1.0a'\nmax_train_steps = 1600\n"
                      "max_train_epochs = 1\ntrain_batch_size = 2\nlearning_rate = 1e-3\nresolution = '32,32'\n"
                      "seed = 1\nsave_toml = true\nhuggingface_repo_id = 'False'\nmultires_noise_discount = 0\n"
                      "caption_extension = '.none-use-foldername'\nnetwork_module = 'networks.lora'\n", encoding="utf-8")
    assert main(["train", "lora", "--config", str(config), "--no-prior"]) == 0
    err = capsys.readouterr().err
    assert (out / "shapes_v1.0a.safetensors").is_file()
    assert "ignored max_train_steps = 1600" in err and "ignored save_toml" in err
    with safe_open(str(out / "shapes_v1.0a.safetensors"), "pt") as f:
        tags = f.metadata()["ss_tag_frequency"]
    assert "sks shape" in tags and "circle" not in tags  # (no caption file read: the folder's class tokens)


def test_rank_dropout_scale_changes_nothing_as_in_lycoris_kohya_network(monkeypatch):
    """kohya_ss's "sd15 - LoKr v1.1" / "sd15 - GLoRA v1.0" presets write rank_dropout_scale=True; LyCORIS' kohya
    ``create_network`` (what sd-scripts builds from network_args) never passes it to its modules, which keep False:
    its rank dropout trains unscaled whatever the arg says — the real module built from the same args, below."""
    from tiny_models import tiny_clip, tiny_unet_sd1

    from sdadapt.network_args import parse_network_args

    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    cls = lycoris_kohya.LycorisNetworkKohya
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP"):  # (create_network's apply_preset sets class state: restored afterwards)
        monkeypatch.setattr(cls, attr, getattr(cls, attr))
    net = lycoris_kohya.create_network(1.0, 2, 1.0, None, tiny_clip(), tiny_unet_sd1(), algo="lokr",
                                       rank_dropout="0.1", rank_dropout_scale="True", preset="attn-only")
    modules = net.unet_loras + net.text_encoder_loras
    assert modules and all(m.rank_dropout == 0.1 and m.rank_dropout_scale is False for m in modules)
    for rank_dropout in ("0", "0.1"):
        assert parse_network_args(["rank_dropout_scale=True", f"rank_dropout={rank_dropout}", "factor=4"],
                                  method_options={"factor", "rank_dropout"}) == {
            "factor": "4", "rank_dropout": rank_dropout}


def test_full_from_a_kohya_config_counts_the_unused_text_encoder_rates_as_unused():
    """The kohya_ss DreamBooth tab's SDXL Prodigy config, run as `train full` (fine_tune.py / sdxl_train.py train no
    text encoder without train_text_encoder): the learning_rate_te1 it writes names no group, so Prodigy trains."""
    _, added, _ = kohya_defaults(method="full", values={}, methods={}, method_options={"text_encoder"})
    assert added["text_encoder"] is False
    TrainOptions(model="toy", images="x", optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1e-5,
                 method_options={"text_encoder": False})
    with pytest.raises(ValueError, match="cannot train with --text-encoder-lr"):
        TrainOptions(model="toy", images="x", optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1e-5)


def test_a_dataset_toml_with_the_in_json_and_prompt_file_the_gui_writes_trains(tmp_path, capsys):
    """The kohya_ss fine-tune tab writes in_json beside dataset_config (kohya warns and ignores it), and every tab
    writes sample_prompts whatever the sampling settings (kohya reads the file only when it samples: here it is
    missing)."""
    from train_inputs import captioned_pngs

    images = captioned_pngs(tmp_path / "img", [(32, 32), (32, 32)])
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f"[general]\nresolution = 32\n[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\n"
                       f"image_dir = '{images}'\ncaption_extension = '.txt'\n", encoding="utf-8")
    config = tmp_path / "gui.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ndataset_config = '{dataset}'\n"
                      f"in_json = '{tmp_path}/meta_lat.json'\nsample_prompts = '{tmp_path}/sample/prompt.txt'\n"
                      f"output_dir = '{tmp_path / 'out'}'\noutput_name = 'ft'\nmax_train_steps = 2\n"
                      "learning_rate = 1e-3\nseed = 1\n", encoding="utf-8")
    assert main(["train", "lora", "--config", str(config), "--no-prior"]) == 0
    err = capsys.readouterr().err
    assert (tmp_path / "out" / "ft.safetensors").is_file()
    assert f"--in-json {tmp_path}/meta_lat.json: not used, --dataset-config {dataset}" in err
    assert "ignored sample_prompts" in err and "kohya samples nothing then" in err


def test_dreambooth_without_class_images_trains_as_kohyas_train_db_without_reg_data_dir(red_circles, tmp_path, capsys):
    """kohya's train_db.py / sdxl_train.py train a DreamBooth config without reg_data_dir with no prior preservation
    (a warning), diffusers' train_dreambooth.py without --with_prior_preservation too: a kohya config gets it as a
    kohya default (noted), and --no-prior turns it off by name; a class prompt is still asked for otherwise."""
    _, _, note = kohya_defaults(method="dreambooth", values={"model": "m.safetensors"}, methods={},
                                method_options=set(), prior="required")
    assert "no class images (kohya: only with reg_data_dir)" in note
    options, _, _ = kohya_defaults(method="dreambooth", values={"model": "m.safetensors", "reg_data_dir": "reg"},
                                   methods={}, method_options=set(), prior="required")
    assert "prior" not in options
    out = tmp_path / "db.safetensors"
    assert main(["train", "dreambooth", "--images", str(red_circles), "--no-prior", "--steps", "1", "--batch-size", "2",
                 "-o", str(out)]) == 0
    assert out.is_file() and "prior images" not in capsys.readouterr().out


def test_dreambooth_from_a_dataset_config_without_is_reg_trains_without_prior_preservation(tmp_path, capsys):
    """Beside a dataset config kohya reads class images from its is_reg subsets only (a reg_data_dir is unused):
    without one a DreamBooth config trains with no prior preservation — from the tiny SD folder (no default class),
    where a class prompt was asked for and the message pointed to --reg-data-dir, which the run then called unused."""
    from test_cli_train import _tiny_pipeline
    from train_inputs import captioned_pngs

    model = _tiny_pipeline(tmp_path / "sd", prediction_type="epsilon")
    images, reg = captioned_pngs(tmp_path / "img", [(64, 64)] * 2), captioned_pngs(tmp_path / "reg", [(64, 64)] * 2)
    subset = f"[[datasets.subsets]]\nimage_dir = '{images}'\ncaption_extension = '.txt'\n"
    plain, with_reg = tmp_path / "ds.toml", tmp_path / "ds_reg.toml"
    plain.write_text(f"[general]\nresolution = 64\n[[datasets]]\nbatch_size = 2\n{subset}", encoding="utf-8")
    with_reg.write_text(f"[general]\nresolution = 64\n[[datasets]]\nbatch_size = 2\n{subset}[[datasets.subsets]]\n"
                        f"image_dir = '{reg}'\nis_reg = true\ncaption_extension = '.txt'\n", encoding="utf-8")
    for name, dataset in (("db", plain), ("db_reg", with_reg)):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"pretrained_model_name_or_path = '{model}'\ndataset_config = '{dataset}'\n"
                          f"reg_data_dir = '{reg}'\nmax_train_steps = 1\noutput_dir = '{tmp_path / 'out'}'\n"
                          f"output_name = '{name}'\nseed = 1\n", encoding="utf-8")
        assert main(["train", "dreambooth", "--config", str(config)]) == 0, name
        err = capsys.readouterr().err
        assert ("no class images (kohya: only with an is_reg subset in the dataset config)" in err) == (name == "db")
        assert (tmp_path / "out" / f"{name}.safetensors").is_file()


def test_a_length_flag_replaces_the_configs_other_length(tmp_path, capsys):
    """Every kohya_ss config writes max_train_steps: `--epochs N` on the command line trains the epochs (kohya's
    flags override the file, and its scripts then count the steps from the epochs) — was "give --steps or --epochs";
    `--steps N` over a file's max_train_epochs trains N steps, as the flag asks. Both noted."""
    from train_inputs import captioned_pngs

    images = captioned_pngs(tmp_path / "img", [(32, 32), (32, 32)])
    for name, length, flag in (("a", "max_train_steps = 1600", ["--epochs", "1"]),
                               ("b", "max_train_epochs = 40", ["--steps", "1"])):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{images}'\n{length}\n"
                          f"output_dir = '{tmp_path}'\noutput_name = '{name}'\ntrain_batch_size = 2\nseed = 1\n"
                          "resolution = '32,32'\n", encoding="utf-8")
        assert main(["train", "lora", "--config", str(config), "--no-prior", *flag]) == 0, name
        err = capsys.readouterr().err
        other = "steps 1600" if name == "a" else "epochs 40"
        assert f"ignored the config's {other} ({flag[0]} {flag[1]} is given" in err
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["ss_max_train_steps"] == "1"  # (2 images, batch 2: one epoch is one step)


@pytest.mark.parametrize("value", ["C:/Users/me/img", "C:\\\\Users\\\\me\\\\img", "\\\\\\\\server\\\\share\\\\img"])
def test_a_windows_path_in_a_config_is_refused_naming_the_key(tmp_path, value, capsys):
    """The kohya_ss GUI on Windows writes C:/ paths; read on Linux one is a relative folder name — kohya would make
    ``./C:\\Users\\me\\out`` or find no images there. Refused, naming the file and the key, in a training config and in
    a dataset TOML, before anything is made."""
    if os.name == "nt":
        pytest.skip("a Windows path is a path there")
    config = tmp_path / "win.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{value}'\nmax_train_steps = 1\n"
                      f"output_dir = '{tmp_path / 'out'}'\n", encoding="utf-8")
    assert main(["train", "lora", "--config", str(config), "--no-prior"]) == 2
    assert f"--config {config}: train_data_dir = " in capsys.readouterr().err
    dataset = tmp_path / "ds.toml"
    dataset.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{value}'\n", encoding="utf-8")
    assert main(["train", "lora", "--model", "toy", "--dataset-config", str(dataset), "--steps", "1", "--no-prior",
                 "-o", str(tmp_path / "out" / "x.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "subsets[0].image_dir = " in err and "a Windows path" in err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ds.toml", "win.toml"]


def test_a_home_folder_path_in_a_config_is_the_home_folder(tmp_path, monkeypatch):
    """``output_dir = '~/outs'`` writes under the home folder (kohya would make a folder named ``~`` here)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "home.toml"
    from train_inputs import captioned_pngs

    (home / "img").mkdir()
    captioned_pngs(home / "img" / "1_circle", [(32, 32), (32, 32)])  # (~/img: the images' folder too)
    config.write_text("pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '~/img'\n"
                      "max_train_steps = 1\noutput_dir = '~/outs'\noutput_name = 'h'\n", encoding="utf-8")
    assert main(["train", "lora", "--config", str(config), "--no-prior", "-q"]) == 0
    assert (home / "outs" / "h.safetensors").is_file() and not (tmp_path / "~").exists()


def test_a_list_of_paths_in_a_config_is_read_as_its_items(tmp_path, monkeypatch):
    """``base_weights = ['~/a.safetensors']``: each item is a path as a string value is (``~`` the home folder, a
    Windows path refused naming the key)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    fields = {f.name for f in __import__("dataclasses").fields(TrainOptions)}
    from sdadapt.cli.train import _method_options

    config = tmp_path / "list.toml"
    config.write_text("base_weights = ['~/a.safetensors', 'b.safetensors']\n", encoding="utf-8")
    options, methods, _ = read_config(config, fields=fields, method_options=set(_method_options()))
    values = {**options, **methods}["base_weights"]
    assert values == [str(home / "a.safetensors"), "b.safetensors"]
    config.write_text("base_weights = ['C:/loras/a.safetensors']\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"base_weights = 'C:/loras/a.safetensors': a Windows path"):
        read_config(config, fields=fields, method_options=set(_method_options()))
