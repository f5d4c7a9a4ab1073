"""One of each map: layer -> block, SD1/SD2/SDXL detection, OpenCLIP names, the output check.

Each map has one implementation; these tests compare the places that use it (checkpoint block
merges vs LoRA block weights, the checkpoint converter's OpenCLIP plan vs the LoRA tools' layer
slots, the merge engine vs the LoRA tools' base-model guess) on real key layouts built on the meta
device (tests/merge_layouts.py).
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from merge_layouts import TINY_CLIP, TINY_SD1_UNET, TINY_VAE, diffusers_shapes, layout, ldm_shapes  # noqa: E402

from sdadapt.formats.files import DiskSpaceError, WeightFileError, check_output_file  # noqa: E402
from sdadapt.formats.model_keys import KeyMapError, checkpoint_architecture, key_plan  # noqa: E402
from sdadapt.formats.unet_names import ldm_to_diffusers_unet  # noqa: E402
from sdadapt.loratools.block_weights import BLOCK_IDS, block_slot, lora_block_weight_fn  # noqa: E402
from sdadapt.loratools.checkpoint_layers import checkpoint_layers, detect_base_model  # noqa: E402
from sdadapt.loratools.output import check_output  # noqa: E402
from sdadapt.merge.blocks import BLOCKS_SD, BLOCKS_SDXL, diffusers_block, ldm_block  # noqa: E402
from sdadapt.merge.engine import DictSource, _architecture  # noqa: E402
from sdadapt.merge.writer import check_disk_space  # noqa: E402

U = "model.diffusion_model."


# ------------------------------------------------------------------------------- layer -> block
@pytest.mark.parametrize("name, arch", [("tiny-sd1", "sd1"), ("sd1-unet", "sd1"), ("sdxl-unet", "sdxl")])
def test_checkpoint_and_lora_block_weights_put_every_layer_in_the_same_block(name, arch):
    # LDM checkpoint keys: the merge's block vs the LoRA slot of the same module, LDM- and diffusers-named
    seen = set()
    for key in layout(name, "ldm"):
        block = ldm_block(key, architecture=arch)
        if not key.startswith(U):
            assert block == "BASE" and block_slot("text_encoder", key, base_model=arch) == 0
            continue
        module = key[len(U) :].rsplit(".", 1)[0]
        assert block is not None, key
        assert BLOCK_IDS[block_slot("unet", module, base_model=arch)] == block, key
        diffusers_module = ldm_to_diffusers_unet(module)
        if diffusers_module is not None:  # a LoRA names UNet layers by their diffusers path
            assert BLOCK_IDS[block_slot("unet", diffusers_module, base_model=arch)] == block, key
        seen.add(block)
    if name != "tiny-sd1":  # (two levels only)
        assert seen == set((BLOCKS_SDXL if arch == "sdxl" else BLOCKS_SD)[1:])  # every UNet block is reached
    # diffusers checkpoint keys, and LBW through lora_block_weight_fn (weight i on slot i)
    weigh = lora_block_weight_fn([float(i) for i in range(20 if arch == "sdxl" else 26)], arch)
    names = BLOCKS_SDXL if arch == "sdxl" else BLOCKS_SD
    for key in layout(name, "diffusers"):
        if key.startswith("unet."):
            module = key[len("unet.") :].rsplit(".", 1)[0]
            block = diffusers_block(key, architecture=arch)
            assert BLOCK_IDS[block_slot("unet", module, base_model=arch)] == block, key
            assert weigh("unet", module) == names.index(block), key


def test_time_label_embeddings_and_out_keep_their_blocks():
    for arch, last in (("sd1", "OUT11"), ("sdxl", "OUT08")):
        for ldm, diffusers, block in (
            ("time_embed.0", "time_embedding.linear_1", "IN00"), ("label_emb.0.0", "add_embedding.linear_1", "IN00"),
            ("out.2", "conv_out", last), ("out.0", "conv_norm_out", last), ("input_blocks.0.0", "conv_in", "IN00"),
        ):
            assert ldm_block(f"{U}{ldm}.weight", architecture=arch) == block
            assert diffusers_block(f"unet.{diffusers}.weight", architecture=arch) == block
            assert BLOCK_IDS[block_slot("unet", diffusers, base_model=arch)] == block
            assert BLOCK_IDS[block_slot("unet", ldm, base_model=arch)] == block
    # a block number the architecture lacks, or no UNet path: BASE for LoRAs, reported (None) for merges
    assert ldm_block(U + "input_blocks.10.0.in_layers.2.weight", architecture="sdxl") is None
    assert block_slot("unet", "input_blocks.10.0.in_layers.2", base_model="sdxl") == 0
    assert block_slot("unet", "not_a_block.proj") == 0


# ------------------------------------------------------------------------ SD1 / SD2 / SDXL detector
def _sd2_layout(naming: str) -> dict[str, tuple[int, ...]]:
    shapes = diffusers_shapes({**TINY_SD1_UNET, "use_linear_projection": True}, vae=TINY_VAE, clips=((TINY_CLIP, False),))
    return dict(shapes) if naming == "diffusers" else ldm_shapes(shapes, architecture="sd2")


def _views(arch: str) -> dict[str, dict[str, tuple[int, ...]]]:
    if arch == "sd2":
        ldm, diffusers = _sd2_layout("ldm"), _sd2_layout("diffusers")
    else:
        name = "tiny-sd1" if arch == "sd1" else "sdxl-unet"
        ldm, diffusers = layout(name, "ldm"), layout(name, "diffusers")
    return {
        "ldm": ldm,
        "ldm unet only": {k: v for k, v in ldm.items() if k.startswith(U)},
        "diffusers": diffusers,
        "diffusers unet only": {k: v for k, v in diffusers.items() if k.startswith("unet.")},
        "bare diffusers unet file": {k[len("unet.") :]: v for k, v in diffusers.items() if k.startswith("unet.")},
    }


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_one_architecture_detector_for_merges_and_lora_tools(arch):
    for view, shapes in _views(arch).items():
        assert checkpoint_architecture(shapes) == arch, view
        assert detect_base_model(shapes) == arch, view  # the LoRA tools' guess is the same detector
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        assert _architecture(DictSource(meta)) == arch, view  # and the merge engine's


def test_detector_without_evidence():
    vae = {k: v for k, v in layout("tiny-sd1", "diffusers").items() if k.startswith("vae.")}
    with pytest.raises(KeyMapError, match="architecture="):
        checkpoint_architecture(vae)
    assert checkpoint_architecture(vae, default="sd2") == "sd2"
    assert detect_base_model(vae) == "sd1"  # LoRA naming: SD1 and SD2 share it
    assert _architecture(DictSource({k: torch.empty(s, device="meta") for k, s in vae.items()})) is None
    with pytest.raises(ValueError, match="default"):
        checkpoint_architecture(vae, default="sd3")


# ---------------------------------------------------------------------------------- OpenCLIP names
@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_open_clip_lora_slots_are_the_converters_names(arch):
    ldm = _sd2_layout("ldm") if arch == "sd2" else layout("sdxl-unet", "ldm")
    prefix = "cond_stage_model.model." if arch == "sd2" else "conditioner.embedders.1.model."
    component = "text_encoder" if arch == "sd2" else "text_encoder_2"
    plan, report = key_plan(ldm, to="diffusers")
    assert report.ok, report.problems()
    slots = {name: slot for name, slot in checkpoint_layers(ldm).items() if slot.key.startswith(prefix)}
    # the converter's targets for the OpenCLIP encoder layers' Linear weights ...
    want = {}
    for target, source in plan.items():
        local = target[len(component) + 1 :]
        if target.startswith(component + ".text_model.encoder.layers.") and target.endswith(".weight") and len(source.shape) == 2:
            want[(component, local[: -len(".weight")])] = source
    assert len(want) >= 6
    # ... are exactly the LoRA slots, on the same checkpoint key and the same rows of a fused in_proj
    assert set(slots) == set(want)
    for name, slot in slots.items():
        source = want[name]
        assert source.keys == (slot.key,)
        if source.part is None:
            assert slot.rows is None
        else:
            index, count = source.part
            rows = ldm[slot.key][0] // count
            assert slot.rows == (index * rows, (index + 1) * rows)


# ----------------------------------------------------------------------------------- output check
def test_one_output_check(tmp_path, monkeypatch):
    assert check_output is check_output_file  # the LoRA tools' check is the shared one
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output(out, overwrite=False, needed_bytes=0)
    assert check_output(out, overwrite=True, needed_bytes=10) == out
    with pytest.raises(WeightFileError, match=".safetensors files only"):
        check_output(tmp_path / "out.ckpt", overwrite=False, needed_bytes=0)
    missing = tmp_path / "missing" / "deeper" / "out.safetensors"  # (the writer makes the folder; the check makes nothing)
    assert check_output(missing, overwrite=False, needed_bytes=10) == missing and not missing.parent.parent.exists()
    with pytest.raises(WeightFileError, match="is a file, not a folder"):
        check_output(out / "x.safetensors", overwrite=False, needed_bytes=0)
    with pytest.raises(WeightFileError, match="is a folder"):
        check_output(tmp_path, overwrite=True, needed_bytes=0, suffix=None)

    class Usage:
        free = 3 << 20

    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage())
    for check in (lambda: check_output(out, overwrite=True, needed_bytes=5 << 20),
                  lambda: check_disk_space(out, 1 << 20)):  # the merge writer's: needs 1 MiB + 16 MiB margin
        with pytest.raises(DiskSpaceError, match="not enough disk space") as caught:
            check()
        assert isinstance(caught.value, OSError) and isinstance(caught.value, WeightFileError)
        assert "3.0 MiB are free" in str(caught.value) and str(out) in str(caught.value)
    check_output(out, overwrite=True, needed_bytes=2 << 20)  # enough
