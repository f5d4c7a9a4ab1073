"""Adding a family touches adapters/ and the registry only.

A toy family ("scaled outer product", tensor names no other code knows) is defined and registered
in this file. With nothing else changed, every file path must handle it: saving and loading kohya
files, ``inspect``, ``apply_lora``, ``merge-lora`` into a checkpoint (with a strength and block
weights) and ``resize-lora``. If any of those lists family tensor names of its own, this test fails.

The toy family: ``ΔW = (gain / r) · outer_u ⋅ outer_v`` with ``outer_u`` (out, r), ``outer_v``
(r, in, *k), a 0-dim ``gain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402
from tiny_models import tiny_unet_sd1  # noqa: E402

import sdadapt  # noqa: E402
from sdadapt.adapters.base import AdapterModule, LayerGeometry  # noqa: E402
from sdadapt.adapters.registry import AdapterFamily, register_family, unregister_family  # noqa: E402
from sdadapt.cli import main  # noqa: E402
from sdadapt.formats import describe_file, load_lora, save_kohya  # noqa: E402
from sdadapt.formats.unet_names import diffusers_to_ldm_unet  # noqa: E402
from sdadapt.targets import UNET_KOHYA  # noqa: E402


def outer_delta(u: Tensor, v: Tensor, scale: Tensor | float) -> Tensor:
    """(out, in, *k) = scale · u (out, r) ⋅ v (r, in, *k)."""
    return scale * (u @ v.flatten(1)).reshape(u.shape[0], *v.shape[1:])


@dataclass(frozen=True)
class OuterConfig:
    rank: int = 2
    gain: float = 1.0


class OuterModule(AdapterModule):
    family: ClassVar[str] = "outer"
    file_keys: ClassVar[tuple[str, ...]] = ("outer_u", "outer_v", "gain")
    marker_keys: ClassVar[tuple[str, ...]] = ("outer_u", "outer_v")
    rank_keys: ClassVar[tuple[str, ...]] = ("outer_v",)
    linear_keys: ClassVar[tuple[str, ...]] = ("outer_u",)
    lycoris_algo: ClassVar[str] = "outer"

    def __init__(self, geometry: LayerGeometry, rank: int, gain: float, *, dtype=None, device=None) -> None:
        super().__init__(geometry)
        self.outer_u = nn.Parameter(torch.zeros(geometry.out_features, rank, dtype=dtype, device=device))
        self.outer_v = nn.Parameter(torch.randn(rank, geometry.in_features, *geometry.kernel, dtype=dtype, device=device))
        self.register_buffer("gain", torch.tensor(float(gain)))

    @property
    def rank(self) -> int:
        return self.outer_v.shape[0]

    def delta_weight(self) -> Tensor:
        return outer_delta(self.outer_u, self.outer_v, float(self.gain) / self.rank * self.multiplier)

    def forward(self, x: Tensor) -> Tensor:
        return self.geometry.conv(x, self.delta_weight().to(x.dtype))

    def file_tensors(self) -> dict[str, Tensor]:
        return {"outer_u": self.outer_u, "outer_v": self.outer_v, "gain": self.gain}

    @classmethod
    def from_config(cls, config: OuterConfig, geometry: LayerGeometry, *, dtype=None, device=None) -> OuterModule:
        return cls(geometry, config.rank, config.gain, dtype=dtype, device=device)

    @classmethod
    def from_file_tensors(cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>") -> OuterModule:
        u, v = tensors["outer_u"], tensors["outer_v"]
        if (u.shape[0], *v.shape[1:]) != geometry.weight_shape:
            raise ValueError(f"{name}: outer shapes {tuple(u.shape)} / {tuple(v.shape)} do not fit {geometry.weight_shape}")
        module = cls(geometry, v.shape[0], float(tensors.get("gain", torch.tensor(1.0))), dtype=u.dtype)
        with torch.no_grad():
            module.outer_u.copy_(u)
            module.outer_v.copy_(v)
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        return (tensors["outer_u"].shape[0], *tensors["outer_v"].shape[1:])


@pytest.fixture()
def outer_family():
    register_family(AdapterFamily("outer", OuterConfig, OuterModule, (OuterConfig(rank=2, gain=3.0),)))
    yield
    unregister_family("outer")


def _ldm_unet(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        out[f"model.diffusion_model.{diffusers_to_ldm_unet(module, up_blocks_with_attention={1})}.{param}"] = value
    return out


def _outer_lora(tmp_path):
    """A kohya file of the toy family on a tiny SD1 UNet, with random non-zero factors."""
    unet = tiny_unet_sd1()
    handle = sdadapt.inject(unet, UNET_KOHYA, OuterConfig(rank=2, gain=3.0))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    state = {k: v.detach().clone() for k, v in handle.state_dict().items()}
    handle.remove()
    path = tmp_path / "outer.safetensors"
    save_kohya(path, {"unet": state}, base_model="sd1")
    return unet, state, path


def test_a_family_defined_in_a_test_file_works_everywhere(outer_family, tmp_path, capsys):
    unet, state, path = _outer_lora(tmp_path)

    # files: load gives back the same canonical state
    components, _ = load_lora(path)
    assert set(components["unet"]) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(components["unet"][key], value)

    # inspect: the family, its rank, every module
    summary = describe_file(path)
    assert summary["kind"] == "lycoris"
    assert summary["family"] == "outer"
    assert summary["ranks"] == {"2": summary["modules"]}
    assert main(["inspect", str(path)]) == 0
    assert "outer" in capsys.readouterr().out

    # apply_lora == a naive float64 reference of the formula, and undo is exact
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    applied = sdadapt.apply_lora(unet, components["unet"], scale=0.5)
    layers = {key.rsplit(".", 1)[0] for key in state}
    for layer in layers:
        u, v = state[f"{layer}.outer_u"].double(), state[f"{layer}.outer_v"].double()
        want = base[f"{layer}.weight"].double() + 0.5 * 3.0 / 2 * (u @ v.flatten(1)).reshape(base[f"{layer}.weight"].shape)
        torch.testing.assert_close(unet.state_dict()[f"{layer}.weight"].double(), want, rtol=1e-5, atol=1e-6)
    applied.undo()
    for key, value in base.items():
        assert torch.equal(unet.state_dict()[key], value)

    # merge-lora into an LDM checkpoint == apply_lora on the model, with a strength
    checkpoint = tmp_path / "base.safetensors"
    save_file(_ldm_unet({k: v.contiguous() for k, v in base.items()}), checkpoint)
    out = tmp_path / "baked.safetensors"
    assert main(["merge-lora", str(checkpoint), str(path), "--scale", "0.5", "-o", str(out), "-q"]) == 0
    applied = sdadapt.apply_lora(unet, components["unet"], scale=0.5)
    want = _ldm_unet({k: v.clone() for k, v in unet.state_dict().items()})  # state_dict() aliases the weights
    applied.undo()
    from safetensors.torch import load_file

    baked = load_file(out)
    changed = 0
    for key, value in want.items():
        torch.testing.assert_close(baked[key], value, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, _ldm_unet(base)[key])
    assert changed == len(layers)

    # resize-lora: the toy family becomes a plain LoRA of the same delta (exact at rank 2)
    resized = tmp_path / "resized.safetensors"
    assert main(["resize-lora", str(path), "--rank", "2", "-o", str(resized), "-q"]) == 0
    lora, _ = load_lora(resized)
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in lora["unet"] if "lora" in k} <= {
        "lora_down.weight", "lora_up.weight"}
    a = sdadapt.apply_lora(unet, lora["unet"])
    via_lora = {k: v.clone() for k, v in unet.state_dict().items()}
    a.undo()
    b = sdadapt.apply_lora(unet, components["unet"])
    via_outer = {k: v.clone() for k, v in unet.state_dict().items()}
    b.undo()
    worst = max(((via_lora[k] - via_outer[k]).norm() / max((via_outer[k] - base[k]).norm(), 1e-12)).item()
                for k in via_outer if any(k.startswith(layer + ".") for layer in layers))
    assert worst < 1e-4, worst
    assert math.isfinite(worst)


def test_unregistered_family_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="no adapter family"):
        sdadapt.adapters.registry.family_of_keys({"outer_u", "outer_v"}, name="layer.x")
