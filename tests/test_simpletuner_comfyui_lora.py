"""SimpleTuner's ``lora_format: comfyui`` files: kohya keys and diffusers keys in one file, read as one adapter.

SimpleTuner (bc8e6ab, ``simpletuner/helpers/training/lora_format.py`` ``convert_diffusers_to_comfyui_sd_lora``)
renames the diffusers file's ``lora_A`` / ``lora_B`` / ``lora.down`` / ``lora.up`` keys to kohya's
``lora_unet_*`` / ``lora_te_*`` names, adds ``.alpha`` from the adapter config, and leaves every other key as it was:
a DoRA's ``lora_magnitude_vector`` and a text encoder's ``lora_linear_layer.down/up`` (diffusers' spelling). The
converter is transcribed below; the adapters are peft's, saved by diffusers' own ``save_lora_weights``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from test_interop_diffusers import _assert_same, _ids, _te_out
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, unet_inputs

import sdadapt
from sdadapt.formats import load_lora, read_weights
from sdadapt.formats.detect import describe_file


def _simpletuner_comfyui(state: dict, configs: dict) -> dict:
    """``convert_diffusers_to_comfyui_sd_lora(state, component_adapter_metadata=configs, sdxl=False)``: the four
    down/up spellings renamed ``lora_unet_`` / ``lora_te_`` + the module path with ``.processor.`` dropped and dots as
    underscores, each layer's ``.alpha`` its config's ``alpha_pattern[path]``, else ``lora_alpha``, else the rank;
    every other key kept as it is."""
    suffixes = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight",
                ".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
    prefixes = {"unet.": "lora_unet", "text_encoder.": "lora_te"}
    out, alphas = {}, {}
    for key, weight in state.items():
        component = next((p for p in prefixes if key.startswith(p)), None)
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if component is None or suffix is None:
            out[key] = weight
            continue
        path = key[: -len(suffix)].removeprefix(component)
        name = f"{prefixes[component]}_{path.replace('.processor.', '.').replace('.', '_')}"
        out[name + suffixes[suffix]] = weight
        if suffixes[suffix] == ".lora_down.weight" and name not in alphas:
            config = configs[component[:-1]]
            alpha = config.get("alpha_pattern", {}).get(path, config.get("lora_alpha", weight.shape[0]))
            alphas[name] = torch.tensor(float(alpha), dtype=torch.float32)
    out.update({f"{name}.alpha": alpha for name, alpha in alphas.items()})
    return out


@pytest.mark.parametrize("dora", [False, True])
def test_a_simpletuner_comfyui_file_reads_as_the_adapter_peft_trained(tmp_path, dora):
    unet, text_encoder = tiny_unet_sd1(), tiny_clip()
    inputs, ids = unet_inputs(unet), _ids()
    base, te_base = run_unet(unet, inputs), _te_out(text_encoder, ids)
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                             init_lora_weights=False, use_dora=dora)
    te_config = LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                           init_lora_weights=False)
    torch.manual_seed(7)
    unet.add_adapter(unet_config)
    text_encoder = inject_adapter_in_model(te_config, text_encoder)
    if dora:  # (a trained magnitude, not the base's own row norms)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.0 + 0.2 * torch.rand(param.shape, generator=torch.Generator().manual_seed(3)))
    want, te_want = run_unet(unet, inputs), _te_out(text_encoder, ids)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict())
    state, metadata = read_weights(tmp_path / "pytorch_lora_weights.safetensors")
    mixed = _simpletuner_comfyui(state, {"unet": unet_config.to_dict(), "text_encoder": te_config.to_dict()})
    kinds = {"kohya": [k for k in mixed if k.startswith("lora_")], "diffusers": [k for k in mixed if k.startswith(("unet.", "text_encoder."))]}
    assert kinds["kohya"] and kinds["diffusers"]  # (the text encoder's lora_linear_layer keys stay; DoRA magnitudes)
    path = tmp_path / "comfyui.safetensors"
    save_file(mixed, path, metadata)
    components, _ = load_lora(path)
    assert set(components) == {"unet", "text_encoder"}
    summary = describe_file(path)  # (inspect: each layer once, whichever spelling its keys have)
    layers = {k.rsplit(".lora_", 1)[0] for k in get_peft_model_state_dict(unet)} | \
        {k.rsplit(".lora_", 1)[0] for k in get_peft_model_state_dict(text_encoder)}
    assert summary["modules"] == len(layers) and summary["family"] == ("mixed: lora, lora+dora" if dora else "lora")  # (the TE: LoRA)
    fresh_unet, fresh_te = tiny_unet_sd1(), tiny_clip()
    sdadapt.load_adapter(fresh_unet, components["unet"])
    sdadapt.load_adapter(fresh_te, components["text_encoder"])
    _assert_same(run_unet(fresh_unet, inputs), want, base)
    _assert_same(_te_out(fresh_te, ids), te_want, te_base)
