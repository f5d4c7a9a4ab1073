"""ESRGAN upscaler models (RRDBNet: ESRGAN, Real-ESRGAN x4plus / x2plus / anime 6B, 4x-UltraSharp and the other
community ``.pth`` files A1111 runs from ``models/ESRGAN``), and A1111's tiled upscale with them.

:class:`RRDBNet` is the network (BasicSR's layout and names): ``conv_first``, ``nb`` residual-in-residual dense
blocks (three 5-conv dense blocks each, LeakyReLU 0.2, residuals scaled 0.2), ``conv_body`` with the long skip,
``n`` nearest 2x upsamplings each followed by a conv and LeakyReLU, ``conv_hr``, LeakyReLU, ``conv_last``; a
pixel-unshuffle first where ``conv_first`` takes 4 or 16 times the image's channels (Real-ESRGAN x2plus / x1).
:func:`load_esrgan` reads the three key layouts files have: BasicSR's (``params_ema`` / ``params`` inside, or bare),
the old ESRGAN repository's (``model.0`` ... ``model.1.sub.N.RDB1.conv1.0`` ... ``model.10``) and its second one
(``RRDB_trunk``, ``trunk_conv``, ``upconv1``, ``HRconv``), the shapes telling the width, the growth, the blocks and
the scale. :func:`esrgan_upscale` is A1111's ``upscale_with_model``: the image cut by ``split_grid`` into 192 px
tiles overlapping by 8 (its "Tile size for ESRGAN upscalers" / "Tile overlap"), each tile through the model in BGR
order and back to 8 bits rounded (A1111 ≥ 1.8, Forge; 1.7 truncated), the tiles blended by ``combine_grid`` at the
model's scale; an RRDBNet with a pixel-unshuffle takes any tile size, padded as spandrel pads it for A1111.
Real-ESRGAN's compact models (``realesr-general-x4v3``, ``realesr-animevideov3``: A1111's "R-ESRGAN General 4xV3",
"R-ESRGAN AnimeVideo") are :class:`SRVGGNetCompact`, read by the same :func:`load_esrgan`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ESRGAN_TILE", "ESRGAN_TILE_OVERLAP", "EsrganUpscaler", "RRDBNet", "SRVGGNetCompact", "esrgan_state",
           "esrgan_upscale", "load_esrgan", "upscaler_in_folder"]

#: A1111's defaults of "Tile size for ESRGAN upscalers" and "Tile overlap for ESRGAN upscalers" (pixels)
ESRGAN_TILE, ESRGAN_TILE_OVERLAP = 192, 8

#: A1111's names of the Real-ESRGAN files it downloads (``modules/realesrgan_model.py``), for its infotext
_REAL_ESRGAN_NAMES = {"RealESRGAN_x4plus": "R-ESRGAN 4x+", "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
                      "RealESRGAN_x2plus": "R-ESRGAN 2x+", "realesr-general-x4v3": "R-ESRGAN General 4xV3",
                      "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
                      "realesr-animevideov3": "R-ESRGAN AnimeVideo"}


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each fed everything before it (``nf + k·gc`` channels); ``x + 0.2 · conv5(...)``."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        for k in range(5):
            setattr(self, f"conv{k + 1}", nn.Conv2d(nf + k * gc, gc if k < 4 else nf, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for k in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{k}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class _RRDB(nn.Module):
    """Three dense blocks in a row; ``x + 0.2 · rdb3(rdb2(rdb1(x)))``."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = _DenseBlock(nf, gc), _DenseBlock(nf, gc), _DenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: ``(B, in_nc, H, W)`` in [0, 1] -> ``(B, out_nc, H·s, W·s)``, ``s = 2**upsamples /
    unshuffle``. ``nf`` features, ``nb`` RRDB blocks, ``gc`` growth channels."""

    def __init__(self, *, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32,
                 upsamples: int = 2, unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle, self.upsamples = unshuffle, upsamples
        self.conv_first = nn.Conv2d(in_nc * unshuffle * unshuffle, nf, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(nf, gc) for _ in range(nb)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        for k in range(upsamples):
            setattr(self, f"conv_up{k + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    @property
    def scale(self) -> int:
        """The factor the model enlarges by."""
        return 2 ** self.upsamples // self.unshuffle

    def forward(self, x: Tensor) -> Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(self.upsamples):
            feat = F.leaky_relu(getattr(self, f"conv_up{k + 1}")(F.interpolate(feat, scale_factor=2, mode="nearest")),
                                0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network (``srvgg_arch.py``: "R-ESRGAN General 4xV3", "R-ESRGAN AnimeVideo"): a conv
    and PReLU, ``num_conv`` more of each, a conv to ``out_nc · s²`` channels and a pixel shuffle, plus the input
    enlarged by nearest. ``(B, in_nc, H, W)`` in [0, 1] -> ``(B, out_nc, H·s, W·s)``."""

    def __init__(self, *, in_nc: int = 3, out_nc: int = 3, nf: int = 64, num_conv: int = 32, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_nc, nf, 3, 1, 1), nn.PReLU(num_parameters=nf)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(num_parameters=nf)]
        layers.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def _compact_config(state: Mapping[str, Tensor], source: str) -> dict:
    """:class:`SRVGGNetCompact`'s settings from its tensors' shapes (PReLU activations: Real-ESRGAN's models)."""
    from .errors import WeightFileError

    convs = sorted(int(key.split(".")[1]) for key in state if re.fullmatch(r"body\.\d+\.weight", key)
                   and state[key].ndim == 4)
    if any(f"body.{index + 1}.weight" not in state for index in convs[:-1]):
        raise WeightFileError(f"{source}: a compact (SRVGGNet) upscaler without PReLU activations, which sdadapt "
                              "does not run (Real-ESRGAN's own use PReLU)")
    first, last = state["body.0.weight"], state[f"body.{convs[-1]}.weight"]
    in_nc, nf = int(first.shape[1]), int(first.shape[0])
    scale = math.isqrt(int(last.shape[0]) // in_nc)
    return {"in_nc": in_nc, "out_nc": in_nc, "nf": nf, "num_conv": len(convs) - 2, "scale": scale}


def _unwrapped(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """BasicSR's ``params_ema`` (else ``params``) taken out of its wrapper (read flattened:
    ``params_ema.conv_first.weight``); another state as it is."""
    for wrapper in ("params_ema.", "params."):
        if any(key.startswith(wrapper) for key in state):
            return {key[len(wrapper):]: value for key, value in state.items() if key.startswith(wrapper)}
    return state


def _old_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The old ESRGAN repository's ``model.N`` keys as BasicSR's: ``model.0`` conv_first, ``model.1.sub.i.RDBj.
    convk.0`` the blocks, ``model.1.sub.<nb>`` conv_body, then the upsampling convs, ``conv_hr`` and ``conv_last``
    (the last two top-level convs)."""
    out: dict[str, Tensor] = {}
    blocks = {int(m[1]) for key in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", key))}
    tops = sorted({int(m[1]) for key in state if (m := re.fullmatch(r"model\.(\d+)\.weight", key))} - {0, 1})
    names = {0: "conv_first", **{index: f"conv_up{k + 1}" for k, index in enumerate(tops[:-2])},
             **({tops[-2]: "conv_hr", tops[-1]: "conv_last"} if len(tops) >= 2 else {})}
    trunk = max(blocks) + 1 if blocks else 0
    for key, value in state.items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := re.fullmatch(r"model\.1\.sub\.(\d+)\.(weight|bias)", key):
            out[f"conv_body.{m[2]}" if int(m[1]) == trunk else key] = value
        elif (m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key)) and int(m[1]) in names:
            out[f"{names[int(m[1])]}.{m[2]}"] = value
        else:
            out[key] = value  # (refused by the load, named)
    return out


def _second_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The old repository's second layout (``RRDB_trunk.i.RDBj.convk``, ``trunk_conv``, ``upconvK``, ``HRconv``)
    as BasicSR's."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2.", key)
        key = re.sub(r"^trunk_conv\.", "conv_body.", key)
        key = re.sub(r"^upconv(\d)\.", r"conv_up\1.", key)
        out[re.sub(r"^HRconv\.", "conv_hr.", key)] = value
    return out


def esrgan_state(state: Mapping[str, Tensor], *, source: str = "the file") -> tuple[dict[str, Tensor], dict]:
    """A file's tensors as :class:`RRDBNet`'s state dict and the network's settings read from their shapes
    (``in_nc``, ``out_nc``, ``nf``, ``nb``, ``gc``, ``upsamples``, ``unshuffle``). BasicSR's ``params_ema`` (else
    ``params``) is taken out of its wrapper.

    Raises:
        WeightFileError: tensors that are no ESRGAN RRDBNet (another upscaler architecture), named by ``source``.
    """
    from .errors import WeightFileError

    state = _unwrapped(state)
    if "model.0.weight" in state:
        state = _old_layout(state)
    elif "RRDB_trunk.0.RDB1.conv1.weight" in state:
        state = _second_layout(state)
    if "conv_first.weight" not in state or "body.0.rdb1.conv1.weight" not in state:
        keys = ", ".join(list(state)[:4])
        raise WeightFileError(f"{source}: not an ESRGAN (RRDBNet) upscaler — its tensors ({keys}, ...) are another "
                              "architecture (SwinIR, DAT, HAT, ...), which sdadapt does not "
                              "run; give an ESRGAN / Real-ESRGAN x4plus-style .pth")
    first, last = state["conv_first.weight"], state["conv_last.weight"]
    out_nc, nf = int(last.shape[0]), int(first.shape[0])
    factor = int(first.shape[1]) // out_nc
    unshuffle = math.isqrt(factor)
    if unshuffle * unshuffle != factor or unshuffle not in (1, 2, 4):
        raise WeightFileError(f"{source}: conv_first takes {first.shape[1]} channels for a {out_nc}-channel image; "
                              "not an ESRGAN layout sdadapt reads")
    config = {"in_nc": out_nc, "out_nc": out_nc, "nf": nf,
              "nb": 1 + max(int(key.split(".")[1]) for key in state if key.startswith("body.")),
              "gc": int(state["body.0.rdb1.conv1.weight"].shape[0]),
              "upsamples": sum(1 for key in state if re.fullmatch(r"conv_up\d+\.weight", key)), "unshuffle": unshuffle}
    return dict(state), config


def load_esrgan(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """An ESRGAN upscaler file (``.pth`` read with ``weights_only=True``, or ``.safetensors``) as an
    :class:`RRDBNet` — or, for Real-ESRGAN's compact files (``realesr-general-x4v3``, ``realesr-animevideov3``:
    ``body.N`` convs and PReLUs), an :class:`SRVGGNetCompact` — in float32, eval mode, on ``device``.

    Raises:
        WeightFileError: an unreadable file, or one of another architecture or with tensors the network does not
            have (named).
    """
    from .errors import WeightFileError
    from .formats.files import read_weights

    state, _ = read_weights(path)
    state = _unwrapped(state)
    if "body.0.weight" in state and "conv_first.weight" not in state:  # (Real-ESRGAN's compact network)
        tensors, model = dict(state), SRVGGNetCompact(**_compact_config(state, str(path)))
    else:
        tensors, config = esrgan_state(state, source=str(path))
        model = RRDBNet(**config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise WeightFileError(f"{path}: an ESRGAN layout sdadapt does not read (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); ESRGAN+ and other variants are not run here")
    return model.eval().to(device)


def _padded_call(model: nn.Module, x: Tensor) -> Tensor:
    """The model on ``x`` (1, 3, h, w) as spandrel's ``ImageModelDescriptor`` calls it for A1111: an RRDBNet's input
    padded at the right and bottom (reflect, then replicate past what reflection allows) to at least 2 px and, with
    a pixel-unshuffle, a multiple of 4 (its ``SizeRequirements``), the output cropped to ``h·scale`` x ``w·scale``;
    other models (the compact one) as they are."""
    if not isinstance(model, RRDBNet):
        return model(x)
    h, w = x.shape[-2:]
    multiple = 4 if model.unshuffle > 1 else 1
    pad_w = math.ceil(max(2, w) / multiple) * multiple - w
    pad_h = math.ceil(max(2, h) / multiple) * multiple - h
    if not (pad_w or pad_h):
        return model(x)
    reflect_w, reflect_h = min(pad_w, w - 1), min(pad_h, h - 1)
    x = F.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect") if reflect_w or reflect_h else x
    x = F.pad(x, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return model(x)[..., : h * model.scale, : w * model.scale]


def _tile_through(model: nn.Module, tile):
    """A1111's ``upscale_pil_patch`` (1.8 and later; Forge): a PIL tile as BGR floats in [0, 1] (float64 / 255, then
    the model's dtype), through the model (:func:`_padded_call`), clamped, ``· 255`` rounded to uint8, back to RGB
    (A1111 1.7 and earlier truncated)."""
    import numpy as np
    from PIL import Image

    pixels = np.ascontiguousarray(np.transpose(np.array(tile.convert("RGB"))[:, :, ::-1], (2, 0, 1))) / 255
    parameter = next(model.parameters())
    with torch.no_grad():
        out = _padded_call(model, torch.from_numpy(pixels).unsqueeze(0).to(parameter.device, parameter.dtype))
    out = 255.0 * np.moveaxis(out.squeeze(0).float().cpu().clamp_(0, 1).numpy(), 0, 2)
    return Image.fromarray(np.ascontiguousarray(out.round().astype(np.uint8)[:, :, ::-1]), "RGB")


def esrgan_upscale(model: nn.Module, image, *, tile_size: int = ESRGAN_TILE, tile_overlap: int = ESRGAN_TILE_OVERLAP):
    """A1111's ``upscale_with_model``: the PIL ``image`` (RGB) enlarged ``model.scale`` times, in ``tile_size``
    tiles overlapping by ``tile_overlap`` (:func:`sdadapt.sd_upscale.split_grid`; 0: the whole image at once) each
    through :func:`_tile_through`, blended back by :func:`sdadapt.sd_upscale.combine_grid` at the model's scale.
    Returns a PIL RGB image."""
    from .sd_upscale import TileGrid, combine_grid, split_grid

    image = image.convert("RGB")
    if tile_size <= 0:
        return _tile_through(model, image)
    grid = split_grid(image, tile_w=tile_size, tile_h=tile_size, overlap=tile_overlap)
    outputs = [_tile_through(model, tile) for tile in grid.tiles]
    s = outputs[0].width // grid.tiles[0].width
    rows = tuple((y * s, h * s, tuple((x * s, w * s) for x, w in row)) for y, h, row in grid.rows)
    scaled = TileGrid(rows, tuple(outputs), (grid.tile_size[0] * s, grid.tile_size[1] * s),
                      (grid.size[0] * s, grid.size[1] * s), grid.overlap * s)
    return combine_grid(scaled)


def upscaler_in_folder(name: str, folder: str | os.PathLike) -> Path | None:
    """The upscaler model A1111 names ``name`` under ``folder`` (its ``models/ESRGAN`` / ``models/RealESRGAN``,
    searched recursively): a ``.pth`` / ``.safetensors`` file whose stem is ``name``, or a Real-ESRGAN file A1111
    calls so ("R-ESRGAN 4x+": ``RealESRGAN_x4plus.pth``); ``None`` where there is none."""
    files = sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in (".pth", ".safetensors"))
    return next((path for path in files if name in (path.stem, _REAL_ESRGAN_NAMES.get(path.stem))), None)


class EsrganUpscaler:
    """An ESRGAN file as an A1111 upscaler (``do_upscale``: :func:`esrgan_upscale`), loaded on first use;
    :attr:`name` is A1111's name for it (the file's stem; A1111's own names for the Real-ESRGAN files it
    downloads, "R-ESRGAN 4x+" ...)."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> None:
        self.path, self.device = Path(path), device
        self.name = _REAL_ESRGAN_NAMES.get(self.path.stem, self.path.stem)
        self._model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = load_esrgan(self.path, device=self.device)
        return self._model

    def __call__(self, image):
        """A1111's ``UpscalerESRGAN.do_upscale``: the PIL image enlarged by the model's own scale."""
        return esrgan_upscale(self.model, image)
