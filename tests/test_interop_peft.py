"""peft adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``) <-> sdadapt.

Both directions compare numeric outputs of tiny random models: what peft computes with its own
adapter against what sdadapt computes with the same file, and the reverse. Alphas differ from ranks,
ranks and alphas differ per layer (``rank_pattern``/``alpha_pattern``) and rsLoRA scales
(``alpha / sqrt(r)``) are covered, so a wrong scale or a dropped layer fails the comparison.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, unet_inputs  # noqa: E402

import sdadapt  # noqa: E402
from sdadapt.formats import load_lora, load_peft, save_peft  # noqa: E402
from sdadapt.targets import TEXT_ENCODER, UNET_KOHYA, UNET_LOCON  # noqa: E402

ATOL = 1e-5
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut"]
CLIP_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]




def _ids() -> torch.Tensor:
    return torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(5))


def _model(kind: str):
    """(fresh model, run(model) -> output tensor) for ``"unet"`` (tiny SD1) or ``"clip"``."""
    if kind == "unet":
        unet = tiny_unet_sd1()
        inputs = unet_inputs(unet)
        return unet, lambda model: run_unet(model, inputs)
    text_encoder = tiny_clip()
    ids = _ids()

    def run(model):
        with torch.no_grad():
            return model(ids).last_hidden_state

    return text_encoder, run


def _peft_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _assert_same(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-2, "the adapter has no visible effect; the test would prove nothing"
    diff = (got - want).abs().max().item()
    assert diff < ATOL, f"outputs differ by {diff:.3g}"


# ------------------------------------------------------------------------- peft folder -> sdadapt
PEFT_CASES = {
    "plain": ("unet", dict(r=4, lora_alpha=8)),
    "patterns": (
        "unet",
        dict(r=4, lora_alpha=8, rank_pattern={"conv1": 2, "attn2.to_k": 6}, alpha_pattern={"to_v": 3, "conv1": 5}),
    ),
    "rslora": (
        "unet",
        dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"conv1": 2}, alpha_pattern={"to_v": 3, "conv1": 5}),
    ),
    "clip-rslora": ("clip", dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"fc1": 2}, alpha_pattern={"fc2": 1})),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_saved_adapter_reads_in_sdadapt_with_same_outputs(tmp_path, case):
    kind, options = PEFT_CASES[case]
    model, run = _model(kind)
    base = run(model)
    config = LoraConfig(
        target_modules=UNET_MODULES if kind == "unet" else CLIP_MODULES, init_lora_weights=False, **options
    )
    torch.manual_seed(11)
    peft_model = get_peft_model(model, config)
    want = run(peft_model)
    n_layers = len(_peft_layers(peft_model))
    peft_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()

    state = load_peft(tmp_path)
    if case == "plain":  # load_lora() recognises the folder as a peft adapter
        components, _ = load_lora(tmp_path)
        assert set(components) == {"model"} and set(components["model"]) == set(state)
    if case == "patterns":
        layer = "down_blocks.0.attentions.0.transformer_blocks.0"
        assert state[f"{layer}.attn2.to_k.lora_down.weight"].shape[0] == 6
        assert float(state[f"{layer}.attn2.to_k.alpha"]) == 8.0
        assert float(state[f"{layer}.attn1.to_v.alpha"]) == 3.0
        assert float(state["down_blocks.0.resnets.0.conv1.alpha"]) == 5.0
    if case == "rslora":  # stored alpha' = alpha * sqrt(r), so alpha' / r == alpha / sqrt(r)
        assert float(state["down_blocks.0.resnets.0.conv1.alpha"]) == pytest.approx(5 * 2**0.5)

    fresh, _ = _model(kind)
    handle = sdadapt.load_adapter(fresh, state)
    assert len(handle) == n_layers
    _assert_same(run(fresh), want, base)


# ------------------------------------------------------------------------- sdadapt -> peft folder
SDADAPT_CASES = {
    "lora": ("unet", UNET_KOHYA, sdadapt.LoRAConfig(rank=4, alpha=3)),
    "locon": ("unet", UNET_LOCON, sdadapt.LoRAConfig(rank=4, alpha=3, conv_rank=2, conv_alpha=5)),
    "rslora": ("unet", UNET_LOCON, sdadapt.LoRAConfig(rank=4, alpha=3, conv_rank=2, conv_alpha=5, rank_stabilized=True)),
    "clip": ("clip", TEXT_ENCODER, sdadapt.LoRAConfig(rank=2, alpha=7)),
}


@pytest.mark.parametrize("loader", ["from_pretrained", "set_peft_model_state_dict"])
@pytest.mark.parametrize("case", sorted(SDADAPT_CASES))
def test_sdadapt_peft_folder_loads_in_peft_with_same_outputs(tmp_path, case, loader):
    kind, target, config = SDADAPT_CASES[case]
    model, run = _model(kind)
    base = run(model)
    handle = sdadapt.inject(model, target, config)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for adapter in handle.modules.values():
            adapter.lora_up.copy_(torch.randn(adapter.lora_up.shape, generator=gen) * 0.1)
    want = run(model)
    save_peft(tmp_path, handle.state_dict())

    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == config.rank
    if case != "lora" and kind == "unet":
        assert adapter_config["rank_pattern"] and adapter_config["alpha_pattern"]  # 3x3 convs differ

    fresh, _ = _model(kind)
    if loader == "from_pretrained":
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path))
    else:
        peft_config = LoraConfig.from_pretrained(str(tmp_path))
        loaded = inject_adapter_in_model(peft_config, fresh)
        weights = load_file(str(tmp_path / "adapter_model.safetensors"))
        weights = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
        result = set_peft_model_state_dict(loaded, weights)
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if "lora_" in k]
    assert len(_peft_layers(loaded)) == len(handle)
    _assert_same(run(loaded), want, base)
