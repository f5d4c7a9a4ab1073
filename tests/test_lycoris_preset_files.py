"""LyCORIS preset files (``network_args = ["preset=my_preset.toml"]``) select what LyCORIS selects.

Reference: lycoris-lora's own kohya network with the same file (``lycoris.utils.preset.read_preset``
-> ``LycorisNetworkKohya.apply_preset`` -> ``LycorisNetworkKohya(...)``) on the same tiny UNet + CLIP:
the set of module names sdadapt's saved file holds equals LyCORIS' ``lora_name`` set. LyCORIS' class
defaults (for the keys a file leaves out) are set to LyCORIS 3.x's first (4.1's ``TimestepEmbedding``
class repeats ``time_embedding`` on SD UNets: tests/test_lycoris_presets.py says why), and diffusers'
``Attention`` takes kohya's class name ``CrossAttention`` where the file lists it.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from test_lycoris_presets import (
    _file_modules,
    _kohya_attention_class,
    _lycoris_gui_config,
    _te_canonical,
    load_file_metadata,
)
from tiny_models import tiny_clip, tiny_unet_sd1, tiny_unet_sdxl
from transformers_versions import TRANSFORMERS_5

from sdadapt.errors import InputError
from sdadapt.methods import prepare_lokr, prepare_lora
from sdadapt.methods.lycoris_presets import lycoris_preset

lycoris_kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora is not installed (pip install lycoris-lora)")
from lycoris.utils.preset import read_preset

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

_CLASS_STATE = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


#: LyCORIS' class defaults with LyCORIS 3.x's UNet classes (no TimestepEmbedding)
_DEFAULTS = {k: getattr(lycoris_kohya.LycorisNetworkKohya, k) for k in _CLASS_STATE}
_DEFAULTS["UNET_TARGET_REPLACE_MODULE"] = [m for m in _DEFAULTS["UNET_TARGET_REPLACE_MODULE"] if m != "TimestepEmbedding"]


@pytest.fixture
def lycoris_network_class():
    """``LycorisNetworkKohya`` with LyCORIS 3.x's UNet classes, its class-level preset restored afterwards."""
    cls = lycoris_kohya.LycorisNetworkKohya
    saved = {k: getattr(cls, k) for k in _CLASS_STATE}
    cls.UNET_TARGET_REPLACE_MODULE = [m for m in cls.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"]
    yield cls
    for k, v in saved.items():
        setattr(cls, k, v)


#: preset files: classes, regex and fnmatch names, exclusions, enable_conv, an empty text-encoder list
PRESET_FILES = {
    "classes": """
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention"]
enable_conv = false
""",
    "regex-names-exclude": r"""
unet_target_module = ["ResnetBlock2D", "CrossAttention"]
unet_target_name = ["conv_in", "time_embedding\\.linear_[12]$", "up_blocks\\.\\d+\\.attentions\\.0\\.proj_out"]
exclude_name = ["down_blocks\\.\\d+\\.resnets\\.0\\.conv1", "mid_block\\.attentions\\.0\\.transformer_blocks\\.0\\.attn2"]
text_encoder_target_module = []
text_encoder_target_name = ["encoder\\.layers\\.0\\.mlp\\.fc", "encoder\\.layers\\.1\\.self_attn\\.out_proj$"]
""",
    "fnmatch": """
use_fnmatch = true
unet_target_module = ["Downsample2D", "Upsample2D"]
unet_target_name = ["*attn1.to_q", "conv_out", "*.ff.net.2"]
exclude_name = ["up_blocks.*"]
text_encoder_target_module = []
text_encoder_target_name = ["*self_attn.q_proj"]
""",
    "defaults-no-conv-no-text": """
enable_conv = false
text_encoder_target_module = []
""",
}


def _write(tmp_path, text: str, name: str = "preset.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _lycoris_names(cls, path, unet, te):
    """LyCORIS' module names with the preset file ``path``, from LyCORIS' defaults (``apply_preset``
    keeps an earlier preset's values for the keys a file leaves out: they are reset first)."""
    for key, value in _DEFAULTS.items():
        setattr(cls, key, value)
    preset = read_preset(str(path))
    assert preset is not None
    cls.apply_preset(preset)
    net = cls(te, unet, lora_dim=2, conv_lora_dim=2, alpha=1.0, conv_alpha=1.0, network_module="locon",
              warn_on_unmatched=False)
    return {m.lora_name for m in net.unet_loras}, {_te_canonical(m.lora_name) for m in net.text_encoder_loras}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", sorted(PRESET_FILES))
def test_preset_file_adapts_and_saves_the_modules_lycoris_picks(preset, arch, lycoris_network_class, tmp_path):
    path = _write(tmp_path, PRESET_FILES[preset])
    unet = tiny_unet_sd1() if arch == "sd1" else tiny_unet_sdxl()
    _kohya_attention_class(unet)
    te = tiny_clip()
    want_unet, want_te = _lycoris_names(lycoris_network_class, path, unet, te)
    assert want_unet

    system = SimpleNamespace(unet=unet, text_encoder=te, base_model=arch)
    adaptation = prepare_lora(system, rank=2, alpha=1.0, targets=str(path))
    saved = adaptation.save(tmp_path / "lora.safetensors")
    got_unet, got_te = _file_modules(saved)
    assert got_unet == want_unet
    assert got_te == want_te
    assert json.loads(load_file_metadata(saved)["ss_network_args"])["preset"] == str(path)
    adaptation.remove()


def test_the_files_exercise_what_they_claim(lycoris_network_class, tmp_path):
    """The reference sets hold what each file's keys mean, so the comparison above compares something."""
    unet, te = tiny_unet_sd1(), tiny_clip()
    _kohya_attention_class(unet)
    classes = _lycoris_names(lycoris_network_class, _write(tmp_path, PRESET_FILES["classes"]), unet, te)
    assert all("attentions" in n for n in classes[0]) and all("self_attn" in n for n in classes[1])
    named = _lycoris_names(lycoris_network_class, _write(tmp_path, PRESET_FILES["regex-names-exclude"]), unet, te)
    assert "lora_unet_conv_in" in named[0] and "lora_unet_time_embedding_linear_2" in named[0]
    assert "lora_unet_down_blocks_0_resnets_0_conv1" not in named[0] and "lora_unet_down_blocks_0_resnets_0_conv2" in named[0]
    assert not any("mid_block_attentions_0_transformer_blocks_0_attn2" in n for n in named[0])
    assert any("mid_block_attentions_0_transformer_blocks_0_attn1" in n for n in named[0])
    # (its text-encoder regexes are transformers 5's CLIPTextModel paths; LyCORIS matches from the path's start, so on
    # transformers 4's text_model.encoder… they select nothing, for LyCORIS as for sdadapt)
    assert (bool(named[1]) == TRANSFORMERS_5) and all("layers_0_mlp_fc" in n or "layers_1_self_attn_out_proj" in n for n in named[1])
    fn = _lycoris_names(lycoris_network_class, _write(tmp_path, PRESET_FILES["fnmatch"]), unet, te)
    assert "lora_unet_conv_out" in fn[0] and not any(n.startswith("lora_unet_up_blocks") for n in fn[0])
    lin = _lycoris_names(lycoris_network_class, _write(tmp_path, PRESET_FILES["defaults-no-conv-no-text"]), unet, te)
    assert lin[1] == set() and "lora_unet_conv_in" not in lin[0]
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in lin[0]


def test_lokr_with_a_preset_file_matches_lycoris_tensor_shapes(lycoris_network_class, tmp_path):
    path = _write(tmp_path, PRESET_FILES["regex-names-exclude"])
    unet, te = tiny_unet_sd1(), tiny_clip()
    _kohya_attention_class(unet)
    adaptation = prepare_lokr(SimpleNamespace(unet=unet, text_encoder=te, base_model="sd1"), rank=2, alpha=1.0,
                              factor=2, targets=str(path))
    from safetensors.torch import load_file

    ours = load_file(str(adaptation.save(tmp_path / "lokr.safetensors")))
    adaptation.remove()
    for key, value in _DEFAULTS.items():
        setattr(lycoris_network_class, key, value)
    lycoris_network_class.apply_preset(read_preset(str(path)))
    net = lycoris_network_class(te, unet, lora_dim=2, conv_lora_dim=2, alpha=1.0, conv_alpha=1.0, network_module="lokr",
                                warn_on_unmatched=False, factor=2)
    theirs = {_te_canonical(f"{m.lora_name}.{k}"): tuple(v.shape) for m in net.unet_loras + net.text_encoder_loras
              for k, v in m.state_dict().items() if k.startswith("lokr_")}
    assert {k: tuple(v.shape) for k, v in ours.items() if ".lokr_" in k} == theirs


def test_kohyas_crossattention_class_name_selects_diffusers_attention(lycoris_network_class, tmp_path):
    path = _write(tmp_path, 'unet_target_module = ["CrossAttention"]\nunet_target_name = []\n')
    renamed = tiny_unet_sd1()
    _kohya_attention_class(renamed)
    want, _ = _lycoris_names(lycoris_network_class, path, renamed, tiny_clip())
    plain = tiny_unet_sd1()  # diffusers' own class name, Attention
    adaptation = prepare_lora(SimpleNamespace(unet=plain, text_encoder=tiny_clip(), base_model="sd1"), rank=2,
                              targets=str(path))
    got, _ = _file_modules(adaptation.save(tmp_path / "lora.safetensors"))
    assert got == want and len(want) > 4


def test_a_layer_reached_twice_is_refused_as_lycoris_stops(lycoris_network_class, tmp_path):
    path = _write(tmp_path, 'unet_target_module = ["Transformer2DModel", "BasicTransformerBlock"]\n')
    with pytest.raises(AssertionError, match="duplicated lora name"):
        _lycoris_names(lycoris_network_class, path, tiny_unet_sd1(), tiny_clip())
    with pytest.raises(InputError, match="twice"):
        prepare_lora(SimpleNamespace(unet=tiny_unet_sd1(), text_encoder=tiny_clip(), base_model="sd1"), rank=2,
                     targets=str(path))
    # a named layer inside a listed class (the default CLIPAttention): the same in the text encoder
    named = _write(tmp_path, 'use_fnmatch = true\ntext_encoder_target_name = ["*self_attn.q_proj"]\n', "te.toml")
    with pytest.raises(AssertionError, match="duplicated lora name"):
        _lycoris_names(lycoris_network_class, named, tiny_unet_sd1(), tiny_clip())
    with pytest.raises(InputError, match="twice"):
        prepare_lora(SimpleNamespace(unet=tiny_unet_sd1(), text_encoder=tiny_clip(), base_model="sd1"), rank=2,
                     targets=str(named))


@pytest.mark.parametrize("text, words", [
    ("enable_conv = true\nunet_traget_module = []\n", "unknown key(s) unet_traget_module"),
    ('[module_algo_map.CrossAttention]\nalgo = "lokr"\n', "module_algo_map sets another algorithm"),
    ('[name_algo_map."conv_in"]\ndim = 8\n', "name_algo_map sets another algorithm"),
    ('target_module = ["Transformer2DModel"]\n', "unet_target_module / text_encoder_target_module"),
    ('lora_prefix = "lora_x"\n', "lora_prefix is read by LyCORIS' own wrapper"),
    ('unet_target_module = "Transformer2DModel"\n', "must be a list of strings"),
    ("enable_conv = 1\n", "must be true or false"),
    ("unet_target_name = [\n", "not a TOML file"),
    ('unet_target_name = ["(a"]\n', "unet_target_name"),
])
def test_what_cannot_be_honoured_is_refused_naming_the_file_and_key(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=None) as info:
        lycoris_preset(str(path))
    assert words in str(info.value) and str(path) in str(info.value)


def test_missing_files_and_names(tmp_path):
    with pytest.raises(InputError, match="no such file") as info:
        lycoris_preset(str(tmp_path / "nope.toml"))
    assert str(tmp_path / "nope.toml") in str(info.value)
    with pytest.raises(InputError, match="unknown LyCORIS preset"):
        lycoris_preset("fulll")
    empty = lycoris_preset(str(_write(tmp_path, "")))  # every key LyCORIS' default: full (3.x)
    assert empty.file is not None and empty.file.enable_conv and "Transformer2DModel" in empty.file.unet_modules
    with pytest.raises(InputError, match=r"\.on\(system\)"):  # unresolved: its layers depend on the model
        empty.unet("conv_in", torch.nn.Conv2d(1, 1, 3))


def test_cli_refuses_a_bad_preset_file_before_the_model_loads(tmp_path, capsys):
    from sdadapt.cli import main

    path = _write(tmp_path, '[module_algo_map.CrossAttention]\nalgo = "loha"\n')
    rc = main(["train", "lokr", "--model", str(tmp_path / "no-model"), "--images", str(tmp_path), "--steps", "1",
               "-o", str(tmp_path / "out.safetensors"), "--network-args", f"preset={path}"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "module_algo_map" in err and str(path) in err


def test_resume_refuses_a_changed_preset_file(tmp_path):
    import dataclasses

    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train import _check_resume, _write_run_record

    path = _write(tmp_path, PRESET_FILES["classes"])
    options = TrainOptions(model="m", images=str(tmp_path), out=str(tmp_path / "o.safetensors"),
                           method_options={"targets": str(path)})
    folder = tmp_path / "state"
    folder.mkdir()
    _write_run_record(folder, "lora", options, 2, 4)
    (folder / "state.json").write_text(json.dumps({"step": 2}))
    record = json.loads((folder / "run.json").read_text())
    assert record["preset_file"]["sha256"] and record["preset_file"]["path"] == str(path.resolve())
    _check_resume(folder, "lora", options)  # the same file: resumes
    record["preset_file"]["path"] = str(tmp_path / "elsewhere" / "preset.toml")  # (run from another folder)
    (folder / "run.json").write_text(json.dumps(record))
    _check_resume(folder, "lora", options)  # the same bytes elsewhere: the same preset
    path.write_text(PRESET_FILES["fnmatch"])
    with pytest.raises(ValueError, match="preset file"):
        _check_resume(folder, "lora", options)
    builtin = dataclasses.replace(options, method_options={"targets": "full"})
    _write_run_record(folder, "lora", builtin, 2, 4)
    assert "preset_file" not in json.loads((folder / "run.json").read_text())
    _check_resume(folder, "lora", builtin)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the file's text-encoder regexes are transformers 5's CLIPTextModel paths")
def test_both_sdxl_text_encoders_take_the_files_text_encoder_layers(lycoris_network_class, tmp_path):
    from sdadapt.formats import load_lora

    path = _write(tmp_path, PRESET_FILES["regex-names-exclude"])
    unet, te1, te2 = tiny_unet_sdxl(), tiny_clip(), tiny_clip()
    _kohya_attention_class(unet)
    _lycoris_names(lycoris_network_class, path, unet, te1)  # (resets LyCORIS' class state, applies the file)
    net = lycoris_network_class([te1, te2], unet, lora_dim=2, conv_lora_dim=2, alpha=1.0, conv_alpha=1.0,
                                network_module="locon", warn_on_unmatched=False)
    want = {prefix: {m.lora_name.split("_", 2)[2] for m in net.text_encoder_loras if m.lora_name.startswith(prefix + "_")}
            for prefix in ("lora_te1", "lora_te2")}
    adaptation = prepare_lora(SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=te2, base_model="sdxl"),
                              rank=2, targets=str(path))
    components, _ = load_lora(adaptation.save(tmp_path / "xl.safetensors"))
    adaptation.remove()
    for component, prefix in (("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")):
        got = {key.rsplit(".", 2 if ".lora_" in key else 1)[0].replace(".", "_") for key in components[component]}
        assert {_te_canonical("lora_te_" + n).removeprefix("lora_te_") for n in want[prefix]} == got
        assert got


def test_a_kohya_toml_with_a_preset_file_trains(tmp_path):
    """kohya's ``network_args = ["preset=FILE", "algo=lokr", ...]`` trains LoKr on a tiny SD folder; the
    file holds the layers the preset file selects and records the preset as given."""
    from safetensors.torch import load_file
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main

    root = _tiny_pipeline(tmp_path / "model")
    images = _images(tmp_path / "images")
    preset = _write(tmp_path, PRESET_FILES["fnmatch"])
    out = tmp_path / "lokr.safetensors"
    config = _lycoris_gui_config(tmp_path, root, images, [f"preset={preset}", "algo=lokr", "factor=2"])
    assert main(["train", "lokr", "--config", str(config), "-q"]) == 0
    names = {k.split(".")[0] for k in load_file(str(out))}
    assert "lora_unet_conv_out" in names and not any(n.startswith("lora_unet_up_blocks") for n in names)
    assert any(n.endswith("attn1_to_q") for n in names) and any(n.endswith("self_attn_q_proj") for n in names)
    assert json.loads(load_file_metadata(out)["ss_network_args"])["preset"] == str(preset)


def test_a_saved_state_records_the_preset_file_the_run_started_with(tmp_path):
    """The preset file edited during the run: the states saved after the edit still record the sha256 of
    the bytes the run read when it started (the layers trained), and resuming with the edited file is refused."""
    import dataclasses
    import hashlib

    from test_cli_train import _images

    from sdadapt.jobs import TrainOptions, run_train

    path = _write(tmp_path, 'unet_target_module = []\nunet_target_name = ["conv_in"]\ntext_encoder_target_module = []\n')
    started = hashlib.sha256(path.read_bytes()).hexdigest()

    def edit_after_the_first_step(step, total, loss):
        if step == 1:
            path.write_text('unet_target_module = []\nunet_target_name = ["conv_out"]\ntext_encoder_target_module = []\n')

    options = TrainOptions(images=str(_images(tmp_path / "images", size=16)), model="toy", steps=3, save_every_n_steps=2,
                           prior=False, log_with="csv", out=str(tmp_path / "p.safetensors"),
                           method_options={"targets": str(path)})
    run_train("lora", options, progress=edit_after_the_first_step)
    record = json.loads((tmp_path / "p-state" / "run.json").read_text())
    assert record["preset_file"] == {"path": str(path.resolve()), "sha256": started}
    assert hashlib.sha256(path.read_bytes()).hexdigest() != started
    with pytest.raises(ValueError, match="preset file"):
        run_train("lora", dataclasses.replace(options, steps=4, resume=str(tmp_path / "p-state"), overwrite=True))
