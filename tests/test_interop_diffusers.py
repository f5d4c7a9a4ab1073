"""sdadapt's LoRA files against the real diffusers loaders (and diffusers' files against sdadapt).

Every test compares numeric outputs of tiny random models (no downloads): a model with the LoRA
injected by sdadapt against a fresh copy of the same base model into which *diffusers* loaded the
file sdadapt wrote — or the reverse. Alphas differ from ranks and LoRA up weights are random, so a
wrong scale, a dropped layer or a misnamed key changes the output by far more than the tolerance.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs  # noqa: E402
from transformers_versions import CLIP_TEXT_MODEL

import sdadapt  # noqa: E402
from sdadapt.formats import detect_kind, load_lora, read_weights, save_diffusers, save_kohya  # noqa: E402
from sdadapt.formats.diffusers import METADATA_KEY as METADATA  # noqa: E402
from sdadapt.targets import TEXT_ENCODER, UNET_KOHYA, UNET_LOCON, by_regex  # noqa: E402

ATOL = 1e-5
SD1 = StableDiffusionLoraLoaderMixin
SDXL = StableDiffusionXLLoraLoaderMixin




# ---------------------------------------------------------------------------------------- helpers
class _TinySDPipe(StableDiffusionLoraLoaderMixin):
    """Just enough of a pipeline for diffusers' own ``load_lora_weights`` (what users call)."""

    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet = unet
        self.text_encoder = text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def _randomise_up(handle, seed: int, std: float = 0.1) -> None:
    """A fresh LoRA's up is zero (no effect); give every layer a random, non-zero delta."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in handle.modules.values():
            adapter.lora_up.copy_(torch.randn(adapter.lora_up.shape, generator=gen) * std)


def _peft_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _assert_same(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    """``got == want`` to ATOL, and the LoRA visibly changes the base output (no trivial pass)."""
    assert (want - base).abs().max() > 1e-2, "the LoRA has no visible effect; the test would prove nothing"
    diff = (got - want).abs().max().item()
    assert diff < ATOL, f"outputs differ by {diff:.3g}"


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(seed))


def _te_out(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = text_encoder(ids)
    hidden = out.last_hidden_state.flatten()
    embeds = getattr(out, "text_embeds", None)
    return hidden if embeds is None else torch.cat([hidden, embeds.flatten()])


def _keys_and_metadata(path) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys()), handle.metadata() or {}


def _sd1_lora(kind: str, *, mlp_alpha: float = 1.5):
    """Tiny SD1 UNet + CLIP with sdadapt LoRAs (alpha != rank, random ups) and their outputs.

    The CLIP LoRA has rank 4 / alpha 7 on attention and rank 2 / ``mlp_alpha`` on the MLPs.
    """
    unet = tiny_unet_sd1()
    inputs = unet_inputs(unet)
    base = run_unet(unet, inputs)
    if kind == "locon":
        config = sdadapt.LoRAConfig(rank=4, alpha=3, conv_rank=2, conv_alpha=5)
        unet_handle = sdadapt.inject(unet, UNET_LOCON, config)
    else:
        unet_handle = sdadapt.inject(unet, UNET_KOHYA, sdadapt.LoRAConfig(rank=4, alpha=3))
    _randomise_up(unet_handle, 1)
    text_encoder = tiny_clip()
    ids = _ids()
    te_base = _te_out(text_encoder, ids)
    # two adapters with different rank/alpha on disjoint layers: one file component with per-layer ranks
    attn = sdadapt.inject(text_encoder, TEXT_ENCODER & by_regex(r"self_attn"), sdadapt.LoRAConfig(rank=4, alpha=7), name="attn")
    mlp = sdadapt.inject(text_encoder, TEXT_ENCODER & by_regex(r"mlp"), sdadapt.LoRAConfig(rank=2, alpha=mlp_alpha), name="mlp")
    _randomise_up(attn, 2)
    _randomise_up(mlp, 3)
    return {
        "inputs": inputs,
        "base": base,
        "want": run_unet(unet, inputs),
        "unet_state": unet_handle.state_dict(),
        "n_unet": len(unet_handle),
        "ids": ids,
        "te_base": te_base,
        "te_want": _te_out(text_encoder, ids),
        "te_state": {**attn.state_dict(), **mlp.state_dict()},
        "n_te": len(attn) + len(mlp),
    }


# ------------------------------------------------------------------ 1. kohya file -> diffusers (SD1)
@pytest.mark.parametrize("kind", ["kohya", "locon"])
def test_kohya_sd1_file_loads_in_diffusers_with_same_outputs(tmp_path, kind):
    # one alpha across the text encoder (ranks still differ): see the xfail test below for why
    lora = _sd1_lora(kind, mlp_alpha=7)
    path = tmp_path / "lora.safetensors"
    save_kohya(path, {"unet": lora["unet_state"], "text_encoder": lora["te_state"]}, base_model="sd1")

    keys, metadata = _keys_and_metadata(path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    # SD1 kohya files name UNet layers with diffusers paths, CLIP layers with transformers-4 paths
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    if kind == "locon":
        assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    state, _ = read_weights(path)
    alpha = state["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and float(alpha) == 3.0
    components, _ = load_lora(path)  # and sdadapt reads its kohya file back as the same components
    assert set(components) == {"unet", "text_encoder"}
    assert set(components["text_encoder"]) == set(sdadapt.formats.canonical_state("text_encoder", lora["te_state"]))

    # diffusers' SD loader: its state dict and alphas ...
    _, network_alphas = SD1.lora_state_dict(str(path.parent), weight_name=path.name, local_files_only=True)
    assert network_alphas  # kohya alphas came through
    # ... and the pipeline entry point users call (lora_state_dict, then load_lora_into_unet and
    # load_lora_into_text_encoder with those alphas: the step-by-step loaders, in one call)
    pipe = _TinySDPipe(tiny_unet_sd1(), tiny_clip())
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="sdadapt", local_files_only=True)
    assert len(_peft_layers(pipe.unet)) == lora["n_unet"]
    _assert_same(run_unet(pipe.unet, lora["inputs"]), lora["want"], lora["base"])
    assert len(_peft_layers(pipe.text_encoder)) == lora["n_te"]
    _assert_same(_te_out(pipe.text_encoder, lora["ids"]), lora["te_want"], lora["te_base"])


def test_kohya_text_encoder_with_per_layer_alphas_in_diffusers(tmp_path):
    lora = _sd1_lora("kohya", mlp_alpha=1.5)
    path = tmp_path / "lora.safetensors"
    save_kohya(path, {"text_encoder": lora["te_state"]}, base_model="sd1")
    sd, network_alphas = SD1.lora_state_dict(str(path.parent), weight_name=path.name, local_files_only=True)
    text_encoder = tiny_clip()
    flattened = not hasattr(text_encoder, "text_model")
    SD1.load_lora_into_text_encoder(sd, network_alphas, text_encoder, adapter_name="sdadapt")
    got = _te_out(text_encoder, lora["ids"])
    if flattened and (got - lora["te_want"]).abs().max() >= ATOL:
        pytest.xfail(
            "diffusers (0.42) strips `text_model.` from a kohya text encoder's keys for the flattened "
            "transformers-5 CLIPTextModel but not from its network_alphas, so per-layer alphas "
            "(alpha_pattern) match nothing and those layers get the most common alpha; sdadapt's file is right"
        )
    _assert_same(got, lora["te_want"], lora["te_base"])


def test_kohya_attention_layers_with_their_own_alpha_in_diffusers(tmp_path):
    """A kohya UNet file whose ``to_k`` layers hold alpha 0.5 among alpha-8 attention layers: sdadapt's
    load scales each layer by its own alpha (checked against the naive ``W + (α/r)·up·down`` here);
    diffusers names those alphas after its attention processors, which its ``alpha_pattern`` never
    matches (docs/formats.md)."""
    torch.manual_seed(0)
    unet = tiny_unet_sd1()
    state, naive = {}, copy.deepcopy(unet)
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and (".attn1." in name or ".attn2." in name):
            down, up = torch.randn(4, module.in_features) * 0.3, torch.randn(module.out_features, 4) * 0.3
            alpha = 0.5 if name.endswith("to_k") else 8.0
            state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                      f"{name}.alpha": torch.tensor(alpha)}
            target = naive.get_submodule(name)
            with torch.no_grad():
                target.weight += (alpha / 4) * (up.double() @ down.double()).float()
    path = tmp_path / "attn.safetensors"
    save_kohya(path, {"unet": state}, base_model="sd1")
    inputs = unet_inputs(unet)
    base, want = run_unet(unet, inputs), run_unet(naive, inputs)
    ours = copy.deepcopy(unet)
    sdadapt.apply_lora(ours, sdadapt.load_lora(path)[0]["unet"])
    _assert_same(run_unet(ours, inputs), want, base)
    sd, network_alphas = SD1.lora_state_dict(str(path.parent), weight_name=path.name, local_files_only=True)
    theirs = copy.deepcopy(unet)
    SD1.load_lora_into_unet(sd, network_alphas, theirs, adapter_name="sdadapt")
    got = run_unet(theirs, inputs)
    if (got - want).abs().max() >= ATOL:
        pytest.xfail(
            "diffusers (0.34–0.42) names a kohya file's UNet attention alphas after its attention processors "
            "(`...attn1.processor.to_k_lora.down.weight.alpha`), which the alpha_pattern it builds never "
            "matches: those layers load at the file's most common alpha; sdadapt's load is the file's model"
        )
    _assert_same(got, want, base)


# -------------------------------------------------------------- 2. diffusers file -> diffusers (SD1)
def test_diffusers_file_carries_alphas_in_metadata_and_loads_in_diffusers(tmp_path):
    lora = _sd1_lora("locon")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_diffusers(path, {"unet": lora["unet_state"], "text_encoder": lora["te_state"]})

    keys, metadata = _keys_and_metadata(path)
    assert not any(k.endswith(".alpha") for k in keys)  # diffusers files hold no alpha tensors
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in keys
    config = json.loads(metadata[METADATA])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 3
    assert config["unet.rank_pattern"] and config["unet.alpha_pattern"]  # 3x3 convs: rank 2, alpha 5
    assert config["text_encoder.rank_pattern"] and config["text_encoder.alpha_pattern"]  # mlp: rank 2

    sd, network_alphas, lora_metadata = SD1.lora_state_dict(str(path.parent), weight_name=path.name, local_files_only=True, return_lora_metadata=True)
    assert network_alphas is None and lora_metadata
    # the pipeline entry point: it reads the metadata itself and hands it to load_lora_into_unet and
    # load_lora_into_text_encoder (the step-by-step loaders, in one call). transformers 5 CLIPTextModel
    # has no `.text_model`: diffusers strips it from the tensor keys but hands the metadata to peft as
    # is, so its module names must fit both layouts
    pipe = _TinySDPipe(tiny_unet_sd1(), tiny_clip())
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="sdadapt", local_files_only=True)
    assert len(_peft_layers(pipe.unet)) == lora["n_unet"]
    _assert_same(run_unet(pipe.unet, lora["inputs"]), lora["want"], lora["base"])
    assert len(_peft_layers(pipe.text_encoder)) == lora["n_te"]
    _assert_same(_te_out(pipe.text_encoder, lora["ids"]), lora["te_want"], lora["te_base"])

    # control: the metadata matters (without it diffusers uses alpha = r, a different model)
    unet = tiny_unet_sd1()
    SD1.load_lora_into_unet(sd, None, unet, adapter_name="no_metadata")
    assert (run_unet(unet, lora["inputs"]) - lora["want"]).abs().max() > 1e-3

    # and sdadapt reads its own diffusers file back to the same tensors and alphas
    components, _ = load_lora(path)
    assert set(components) == {"unet", "text_encoder"}
    for name, state in (("unet", lora["unet_state"]), ("text_encoder", lora["te_state"])):
        expected = sdadapt.formats.canonical_state(name, state)
        assert set(components[name]) == set(expected)
        assert all(torch.allclose(components[name][k], expected[k]) for k in expected)


# ---------------------------------------------------------------------------- 3. SDXL both formats
@pytest.fixture(scope="module")
def sdxl_lora():
    """Built once for both file formats."""
    return _sdxl_lora()


def _sdxl_lora():
    unet = tiny_unet_sdxl()
    inputs = unet_inputs(unet, sdxl=True)
    base = run_unet(unet, inputs)
    handle = sdadapt.inject(unet, UNET_LOCON, sdadapt.LoRAConfig(rank=4, alpha=3, conv_rank=2, conv_alpha=5))
    _randomise_up(handle, 4)
    te1, te2 = tiny_clip(), tiny_clip(1, with_projection=True)
    ids = _ids()
    te1_base, te2_base = _te_out(te1, ids), _te_out(te2, ids)
    h1 = sdadapt.inject(te1, TEXT_ENCODER, sdadapt.LoRAConfig(rank=4, alpha=7))
    h2 = sdadapt.inject(te2, TEXT_ENCODER, sdadapt.LoRAConfig(rank=2, alpha=1))
    _randomise_up(h1, 5)
    _randomise_up(h2, 6)
    return {
        "inputs": inputs,
        "base": base,
        "want": run_unet(unet, inputs),
        "components": {"unet": handle.state_dict(), "text_encoder": h1.state_dict(), "text_encoder_2": h2.state_dict()},
        "n": (len(handle), len(h1), len(h2)),
        "ids": ids,
        "te_base": (te1_base, te2_base),
        "te_want": (_te_out(te1, ids), _te_out(te2, ids)),
    }


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_file_loads_in_diffusers_sdxl_loader_with_same_outputs(tmp_path, fmt, sdxl_lora):
    lora = copy.deepcopy(sdxl_lora)  # (a fresh copy: nothing one format's loaders do reaches the other's)
    path = tmp_path / "lora_xl.safetensors"
    if fmt == "kohya":
        save_kohya(path, lora["components"], base_model="sdxl")
        keys, metadata = _keys_and_metadata(path)
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
        # SDXL kohya files name the UNet with LDM paths (never diffusers ones)
        assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block")) for k in keys)
        for key in (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k.alpha",
            "lora_unet_middle_block_1_proj_in.lora_up.weight",
            "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2.lora_down.weight",
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight",  # resnet conv1 (LoCon)
            "lora_unet_input_blocks_3_0_op.lora_down.weight",  # downsampler
            "lora_unet_output_blocks_2_2_conv.lora_down.weight",  # upsampler of an attention up block
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha",
        ):
            assert key in keys, key
    else:
        save_diffusers(path, lora["components"])

    unet = tiny_unet_sdxl()
    sd, network_alphas, metadata = SDXL.lora_state_dict(
        str(path.parent), weight_name=path.name, unet_config=unet.config, local_files_only=True,
        return_lora_metadata=True
    )
    SDXL.load_lora_into_unet(sd, network_alphas, unet, adapter_name="sdadapt", metadata=metadata)
    assert len(_peft_layers(unet)) == lora["n"][0]
    _assert_same(run_unet(unet, lora["inputs"]), lora["want"], lora["base"])
    for index, (prefix, text_encoder) in enumerate(
        (("text_encoder", tiny_clip()), ("text_encoder_2", tiny_clip(1, with_projection=True)))
    ):
        SDXL.load_lora_into_text_encoder(
            sd, network_alphas, text_encoder, prefix=prefix, adapter_name="sdadapt", metadata=metadata
        )
        assert len(_peft_layers(text_encoder)) == lora["n"][index + 1]
        _assert_same(_te_out(text_encoder, lora["ids"]), lora["te_want"][index], lora["te_base"][index])


# ------------------------------------------------------------------ 4. diffusers/peft file -> sdadapt
def _peft_sd1(alpha_is_rank: bool = False):
    """Tiny SD1 UNet + CLIP with LoRAs made by peft (as the diffusers training scripts do)."""
    unet = tiny_unet_sd1()
    inputs = unet_inputs(unet)
    base = run_unet(unet, inputs)
    unet_config = LoraConfig(
        r=4,
        lora_alpha=4 if alpha_is_rank else 8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"],
        rank_pattern={"conv1": 2},
        alpha_pattern={"conv1": 2} if alpha_is_rank else {"to_k": 3, "conv1": 5},
        init_lora_weights=False,  # random A and B: a visible delta
    )
    torch.manual_seed(7)
    unet.add_adapter(unet_config)
    text_encoder = tiny_clip()
    ids = _ids()
    te_base = _te_out(text_encoder, ids)
    te_config = LoraConfig(
        r=4,
        lora_alpha=4 if alpha_is_rank else 6,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        init_lora_weights=False,
    )
    text_encoder = inject_adapter_in_model(te_config, text_encoder)
    return {
        "inputs": inputs,
        "base": base,
        "want": run_unet(unet, inputs),
        "unet_lora": get_peft_model_state_dict(unet),
        "unet_config": unet_config.to_dict(),
        "ids": ids,
        "te_base": te_base,
        "te_want": _te_out(text_encoder, ids),
        "te_lora": get_peft_model_state_dict(text_encoder),
        "te_config": te_config.to_dict(),
    }


def _check_sdadapt_reproduces(components, lora) -> None:
    unet = tiny_unet_sd1()
    handle = sdadapt.load_adapter(unet, components["unet"])
    assert len(handle) == len({k.rsplit(".lora", 1)[0] for k in lora["unet_lora"]})
    _assert_same(run_unet(unet, lora["inputs"]), lora["want"], lora["base"])
    if "text_encoder" in components:
        # canonical text-encoder paths (transformers-4 spelling), whatever the file had
        assert all(k.startswith("text_model.encoder.layers.") for k in components["text_encoder"])
        text_encoder = tiny_clip()
        sdadapt.load_adapter(text_encoder, components["text_encoder"])
        _assert_same(_te_out(text_encoder, lora["ids"]), lora["te_want"], lora["te_base"])


@pytest.fixture(scope="module")
def peft_sd1():
    """Built once for both spellings."""
    return _peft_sd1()


@pytest.mark.parametrize("spelling", ["peft", "new-diffusers"])
def test_diffusers_saved_lora_reads_in_sdadapt_with_same_outputs(tmp_path, spelling, peft_sd1):
    lora = copy.deepcopy(peft_sd1)  # (a fresh copy: nothing one spelling's save does reaches the other's)
    convert = convert_state_dict_to_diffusers if spelling == "new-diffusers" else dict
    SD1.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert(lora["unet_lora"]),
        text_encoder_lora_layers=convert(lora["te_lora"]),
        unet_lora_adapter_metadata=lora["unet_config"],
        text_encoder_lora_adapter_metadata=lora["te_config"],
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    keys, metadata = _keys_and_metadata(path)
    assert METADATA in metadata
    if spelling == "new-diffusers":
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in keys
        # (the text encoder's module path as the model spells it: transformers 5's CLIPTextModel has no text_model level)
        assert f"text_encoder.{CLIP_TEXT_MODEL}encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in keys
    else:
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert detect_kind(keys, metadata) == "diffusers-lora"

    components, file_metadata = load_lora(path)
    assert set(components) == {"unet", "text_encoder"} and METADATA in file_metadata
    # rank/alpha patterns from the metadata: to_k alpha 3 (rank 4), conv1 alpha 5 (rank 2)
    unet_state = components["unet"]
    assert float(unet_state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.alpha"]) == 3.0
    assert float(unet_state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha"]) == 8.0
    assert unet_state["down_blocks.0.resnets.0.conv1.lora_down.weight"].shape[0] == 2
    assert float(unet_state["down_blocks.0.resnets.0.conv1.alpha"]) == 5.0
    _check_sdadapt_reproduces(components, lora)


def test_old_diffusers_spelling_reads_in_sdadapt(tmp_path):
    """attention-processor era keys (UNet ``attn1.processor.to_q_lora.down.weight``, CLIP
    ``self_attn.to_q_lora.down.weight``), no alphas (scale 1).

    diffusers still produces this spelling: ``lora_state_dict`` of a kohya file returns it.
    """
    unet = tiny_unet_sd1()
    inputs = unet_inputs(unet)
    base = run_unet(unet, inputs)
    handle = sdadapt.inject(unet, UNET_KOHYA, sdadapt.LoRAConfig(rank=4))  # alpha = r: old files had none
    _randomise_up(handle, 8)
    text_encoder = tiny_clip()
    ids = _ids()
    te_base = _te_out(text_encoder, ids)
    te_handle = sdadapt.inject(text_encoder, TEXT_ENCODER, sdadapt.LoRAConfig(rank=2))
    _randomise_up(te_handle, 9)
    want, te_want = run_unet(unet, inputs), _te_out(text_encoder, ids)
    save_kohya(tmp_path / "k.safetensors", {"unet": handle.state_dict(), "text_encoder": te_handle.state_dict()})
    old, _ = SD1.lora_state_dict(str(tmp_path), weight_name="k.safetensors", local_files_only=True)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in old
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight" in old
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight" in old  # = q_proj
    assert "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.up.weight" in old  # = out_proj
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight" in old
    path = tmp_path / "old.safetensors"
    save_file(old, str(path), metadata={"format": "pt"})

    components, _ = load_lora(path)
    fresh = tiny_unet_sd1()
    assert len(sdadapt.load_adapter(fresh, components["unet"])) == len(handle)
    _assert_same(run_unet(fresh, inputs), want, base)
    fresh_te = tiny_clip()
    sdadapt.load_adapter(fresh_te, components["text_encoder"])
    _assert_same(_te_out(fresh_te, ids), te_want, te_base)


# --------------------------------------------------------- 5. convert_state_dict_to_kohya -> sdadapt
def test_diffusers_convert_state_dict_to_kohya_reads_in_sdadapt(tmp_path):
    # convert_state_dict_to_kohya writes alpha = r (an int64 tensor) whatever lora_alpha was, so
    # the reference peft models use lora_alpha = r for the file to mean the same model
    lora = _peft_sd1(alpha_is_rank=True)
    peft_state = {f"unet.{k}": v for k, v in lora["unet_lora"].items()}
    peft_state.update({f"text_encoder.{k}": v for k, v in lora["te_lora"].items()})
    kohya_state = convert_state_dict_to_kohya(peft_state)
    assert any(k.startswith("lora_te1_") for k in kohya_state)  # lora_te1 even for SD1
    alphas = [v for k, v in kohya_state.items() if k.endswith(".alpha")]
    assert alphas and all(a.dtype == torch.int64 for a in alphas)
    path = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in kohya_state.items()}, str(path))

    keys, metadata = _keys_and_metadata(path)
    assert detect_kind(keys, metadata) == "kohya-lora"
    components, _ = load_lora(path)
    assert set(components) == {"unet", "text_encoder"}
    assert all(v.dtype == torch.float32 for k, v in components["unet"].items() if k.endswith(".alpha"))
    _check_sdadapt_reproduces(components, lora)



def test_a_model_level_save_lora_adapter_file_loads_as_one_models_adapter(tmp_path):
    # diffusers' UNet2DConditionModel.save_lora_adapter: keys without a component, the config unprefixed
    unet = tiny_unet_sdxl()
    inputs = unet_inputs(unet, sdxl=True)
    base = run_unet(unet, inputs)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        rank_pattern={"to_k": 2}, alpha_pattern={"to_k": 5}, init_lora_weights=False)
    torch.manual_seed(1)
    unet.add_adapter(config, adapter_name="trained")  # (diffusers 0.34 deletes ".<adapter name>" from every key:
    want = run_unet(unet, inputs)                    # a name like "a" mangles ".attentions")
    unet.save_lora_adapter(tmp_path, adapter_name="trained")
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        assert not any(k.startswith("unet.") for k in f.keys()) and METADATA in f.metadata()
    assert sdadapt.formats.describe_file(path)["kind"] == "diffusers-lora"
    components, _ = load_lora(path)
    assert list(components) == ["model"]  # (as a peft folder: the caller names the model)
    fresh = tiny_unet_sdxl()
    sdadapt.load_adapter(fresh, components["model"])
    _assert_same(run_unet(fresh, inputs), want, base)


@pytest.mark.parametrize("spelling", ["attn_procs", "comfy_processor"])
def test_older_diffusers_attention_spellings_load_as_the_same_adapter(tmp_path, spelling):
    """Two spellings ComfyUI's loader maps: diffusers' ``save_attn_procs`` files (UNet only, no ``unet.`` prefix,
    ``attn1.processor.to_q_lora.up.weight``; they were called a checkpoint) and ``unet.<path>.processor.to_q.lora.up
    .weight`` (the processor kept in the layer name: applying it failed). Both are the adapter peft's names give."""
    unet = tiny_unet_sd1()
    inputs = unet_inputs(unet)
    base = run_unet(unet, inputs)
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    g = torch.Generator().manual_seed(3)
    width = unet.get_submodule(f"{attention}.to_q").in_features
    factors = {proj: (torch.randn(2, width, generator=g), torch.randn(width, 2, generator=g))
               for proj in ("to_q", "to_k", "to_v", "to_out")}
    state, canonical = {}, {}
    for proj, (down, up) in factors.items():
        module = f"{attention}.{proj}.0" if proj == "to_out" else f"{attention}.{proj}"
        canonical.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up})
        if spelling == "attn_procs":
            state.update({f"{attention}.processor.{proj}_lora.down.weight": down,
                          f"{attention}.processor.{proj}_lora.up.weight": up})
        else:
            state.update({f"unet.{attention}.processor.{proj}.lora.down.weight": down,
                          f"unet.{attention}.processor.{proj}.lora.up.weight": up})
    path = tmp_path / "old.safetensors"
    save_file(state, str(path))
    assert sdadapt.formats.describe_file(path)["kind"] == "diffusers-lora"
    components, _ = load_lora(path)
    (component, got), = components.items()
    assert component == ("model" if spelling == "attn_procs" else "unet")
    assert {k: v for k, v in got.items() if not k.endswith(".alpha")}.keys() == canonical.keys()
    assert all(torch.equal(got[k], v) for k, v in canonical.items())
    mine = tiny_unet_sd1()
    sdadapt.load_adapter(mine, got)
    reference = tiny_unet_sd1()
    sdadapt.load_adapter(reference, {**canonical, **{k: v for k, v in got.items() if k.endswith(".alpha")}})
    assert torch.equal(run_unet(mine, inputs), run_unet(reference, inputs))
    assert not torch.equal(run_unet(mine, inputs), base)
