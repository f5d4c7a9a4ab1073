"""ESRGAN upscaler models (``sdadapt.esrgan``): the network against BasicSR's RRDBNet transcribed here, the three
key layouts files have, and A1111's tiled ``upscale_with_model`` / ``Upscaler.upscale`` transcribed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdadapt.errors import WeightFileError
from sdadapt.esrgan import (
    EsrganUpscaler,
    RRDBNet,
    esrgan_state,
    esrgan_upscale,
    load_esrgan,
    upscaler_in_folder,
)
from sdadapt.formats.files import write_safetensors

PIL = pytest.importorskip("PIL")
from PIL import Image
from test_sd_upscale import _a1111_combine_grid, _a1111_split_grid, _a1111_upscale


# ------------------------------------------------------------- BasicSR's RRDBNet (basicsr/archs/rrdbnet_arch.py)
class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat=64, num_grow_ch=32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat, num_grow_ch=32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x):
        out = self.rdb1(x)
        out = self.rdb2(out)
        out = self.rdb3(out)
        return out * 0.2 + x


class BasicSRRRDBNet(nn.Module):
    def __init__(self, num_in_ch, num_out_ch, scale=4, num_feat=64, num_block=23, num_grow_ch=32):
        super().__init__()
        self.scale = scale
        if scale == 2:
            num_in_ch = num_in_ch * 4
        elif scale == 1:
            num_in_ch = num_in_ch * 16
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        if self.scale == 2:
            feat = F.pixel_unshuffle(x, downscale_factor=2)
        elif self.scale == 1:
            feat = F.pixel_unshuffle(x, downscale_factor=4)
        else:
            feat = x
        feat = self.conv_first(feat)
        body_feat = self.conv_body(self.body(feat))
        feat = feat + body_feat
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode='nearest')))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode='nearest')))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        return out


def _basicsr(scale, seed=0, nf=8, nb=2, gc=4):
    torch.manual_seed(seed)
    net = BasicSRRRDBNet(3, 3, scale=scale, num_feat=nf, num_block=nb, num_grow_ch=gc).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)  # (keeps the small random net's outputs in a useful range)
    return net


def _old_keys(state, nb, upsamples):
    """BasicSR names -> the old ESRGAN repository's ``model.N`` (A1111's ``mod2normal`` inverse, the sequential's
    indices: conv_first 0, ShortcutBlock 1, each upsampling's conv 3 + 3k, HR conv 2 + 3n, last conv 4 + 3n)."""
    out = {}
    for key, value in state.items():
        part, name = key.rsplit(".", 1)
        if key.startswith("body."):
            _, i, rdb, conv = part.split(".")
            out[f"model.1.sub.{i}.RDB{rdb[-1]}.{conv}.0.{name}"] = value
        elif part == "conv_body":
            out[f"model.1.sub.{nb}.{name}"] = value
        elif part.startswith("conv_up"):
            out[f"model.{3 + 3 * (int(part[-1]) - 1)}.{name}"] = value
        else:
            index = {"conv_first": 0, "conv_hr": 2 + 3 * upsamples, "conv_last": 4 + 3 * upsamples}[part]
            out[f"model.{index}.{name}"] = value
    return out


def _second_keys(state):  # (A1111's mod2normal's source names)
    out = {}
    for key, value in state.items():
        key = key.replace("conv_body.", "trunk_conv.").replace("body.", "RRDB_trunk.").replace(".rdb", ".RDB")
        out[key.replace("conv_up", "upconv").replace("conv_hr.", "HRconv.")] = value
    return out


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_the_network_is_basicsrs_in_every_layout(tmp_path, scale):
    reference = _basicsr(scale)
    x = torch.rand(1, 3, 12, 16)
    with torch.no_grad():
        expected = reference(x)
    state = reference.state_dict()
    files = {"basicsr.pth": {"params_ema": state}, "bare.safetensors": state,
             "old.pth": _old_keys(state, nb=2, upsamples=2), "second.pth": _second_keys(state)}
    for name, content in files.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            write_safetensors(path, {k: v.contiguous() for k, v in content.items()}, {})
        else:
            torch.save(content, path)
        model = load_esrgan(path)
        assert model.scale == scale, name
        with torch.no_grad():
            assert torch.equal(model(x), expected), name


def test_old_layouts_of_other_scales_and_what_is_refused(tmp_path):
    for upsamples in (1, 3, 0):  # (2x, 8x, 1x old-arch files)
        torch.manual_seed(upsamples)
        ours = RRDBNet(nf=8, nb=1, gc=4, upsamples=upsamples)
        state, config = esrgan_state(_old_keys(ours.state_dict(), nb=1, upsamples=upsamples))
        assert config == {"in_nc": 3, "out_nc": 3, "nf": 8, "nb": 1, "gc": 4, "upsamples": upsamples, "unshuffle": 1}
        assert state.keys() == ours.state_dict().keys()
    (tmp_path / "swinir.pth").write_bytes(b"")
    torch.save({"layers.0.residual_group.blocks.0.norm1.weight": torch.ones(4)}, tmp_path / "swinir.pth")
    with pytest.raises(WeightFileError, match="not an ESRGAN"):
        load_esrgan(tmp_path / "swinir.pth")
    plus = dict(_basicsr(4).state_dict())
    plus["body.0.rdb1.conv1x1.weight"] = torch.ones(8, 8, 1, 1)  # (ESRGAN+)
    torch.save(plus, tmp_path / "plus.pth")
    with pytest.raises(WeightFileError, match="unexpected"):
        load_esrgan(tmp_path / "plus.pth")


def _spandrel_call(model, image):
    """spandrel 0.4 ``ImageModelDescriptor.__call__`` (the wrapper A1111 >= 1.8 runs its ESRGAN models through):
    ``pad_tensor`` to the ESRGAN ``SizeRequirements(minimum=2, multiple_of=4 if shuffle_factor else 1)``, the model,
    ``clamp_(0, 1)``, the padding cropped off (spandrel __helpers/size_req.py, model_descriptor.py)."""
    w, h = image.shape[-1], image.shape[-2]
    multiple = 4 if getattr(model, "unshuffle", 1) > 1 else 1

    def ceil_modulo(x, mod):
        return x if x % mod == 0 else (x // mod + 1) * mod

    pad_w, pad_h = ceil_modulo(max(2, w), multiple) - w, ceil_modulo(max(2, h), multiple) - h
    did_pad = bool(pad_w or pad_h)
    if did_pad:
        reflect_pad_w, reflect_pad_h = min(pad_w, w - 1), min(pad_h, h - 1)
        image = torch.nn.functional.pad(image, (0, reflect_pad_w, 0, reflect_pad_h), "reflect")
        image = torch.nn.functional.pad(image, (0, pad_w - reflect_pad_w, 0, pad_h - reflect_pad_h), "replicate")
    output = model(image).clamp_(0, 1)
    return output[..., : h * model.scale, : w * model.scale] if did_pad else output


def _a1111_upscale_without_tiling(model, img):  # (modules/upscaler_utils.py upscale_pil_patch, A1111 >= 1.8 / Forge)
    img = np.array(img.convert("RGB"))
    img = img[:, :, ::-1]  # flip RGB to BGR
    img = np.transpose(img, (2, 0, 1))  # HWC to CHW
    img = np.ascontiguousarray(img) / 255  # Rescale to [0, 1]
    param = next(model.parameters())
    with torch.inference_mode():
        tensor = torch.from_numpy(img).unsqueeze(0).to(device=param.device, dtype=param.dtype)
        arr = _spandrel_call(model, tensor).squeeze(0).float().cpu().clamp_(0, 1).numpy()
    arr = 255.0 * np.moveaxis(arr, 0, 2)  # CHW to HWC, rescale
    arr = arr.round().astype(np.uint8)
    arr = arr[:, :, ::-1]  # flip BGR to RGB
    return Image.fromarray(arr, "RGB")


def _a1111_upscale_with_model(model, img, tile_size, tile_overlap):
    if tile_size <= 0:
        return _a1111_upscale_without_tiling(model, img)
    grid = _a1111_split_grid(img, tile_size, tile_size, tile_overlap)
    newtiles = []
    for y, h, row in grid.tiles:
        newrow = []
        for x, w, tile in row:
            output = _a1111_upscale_without_tiling(model, tile)
            scale_factor = output.width // tile.width
            newrow.append([x * scale_factor, w * scale_factor, output])
        newtiles.append([y * scale_factor, h * scale_factor, newrow])
    newgrid = type(grid)(newtiles, grid.tile_w * scale_factor, grid.tile_h * scale_factor, grid.image_w * scale_factor,
                         grid.image_h * scale_factor, grid.overlap * scale_factor)
    return _a1111_combine_grid(newgrid)


def _picture(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(("size", "tile", "overlap"), [((40, 28), 16, 4), ((33, 50), 24, 8), ((20, 20), 0, 0),
                                                      ((30, 18), 32, 8)])
def test_the_tiled_upscale_is_a1111s(size, tile, overlap):
    model = RRDBNet(nf=8, nb=1, gc=4, upsamples=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    image = _picture(*size)
    ours = esrgan_upscale(model, image, tile_size=tile, tile_overlap=overlap)
    theirs = _a1111_upscale_with_model(model, image, tile, overlap)
    assert ours.size == (size[0] * 2, size[1] * 2) and np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize(("size", "tile", "overlap"), [((37, 23), 0, 0), ((38, 22), 0, 0), ((45, 31), 18, 6),
                                                      ((1, 9), 0, 0)])
@pytest.mark.parametrize("unshuffle", [2, 4])
def test_an_unshuffle_model_takes_any_size_as_spandrel_pads_it(size, tile, overlap, unshuffle):
    """Real-ESRGAN x2plus / x1 (pixel-unshuffle 2 / 4) at sizes no multiple of 4: A1111 >= 1.8 runs them through
    spandrel, which pads (reflect, then replicate) and crops; sdadapt's unshuffle refused them or differed."""
    model = RRDBNet(nf=8, nb=1, gc=4, upsamples=2, unshuffle=unshuffle)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    image = _picture(*size, seed=7)
    ours = esrgan_upscale(model, image, tile_size=tile, tile_overlap=overlap)
    theirs = _a1111_upscale_with_model(model, image, tile, overlap)
    assert ours.size == (size[0] * model.scale, size[1] * model.scale)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_as_a1111s_upscaler_the_model_runs_then_lanczos_to_the_size(tmp_path):
    from sdadapt.sd_upscale import upscale_image

    torch.save(_basicsr(4).state_dict(), tmp_path / "RealESRGAN_x4plus.pth")
    upscaler = EsrganUpscaler(tmp_path / "RealESRGAN_x4plus.pth")
    assert upscaler.name == "R-ESRGAN 4x+"
    image = _picture(24, 16, seed=3)
    for scale in (2.0, 1.0, 4.0, 1.5):  # (A1111 runs the model once even at scale 1, then resizes to dest)
        ours = upscale_image(image, scale, upscaler=upscaler)
        theirs = _a1111_upscale(image, scale, upscaler)
        assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs)), scale


def test_the_hires_pass_with_an_esrgan_model_encodes_a1111s_pixels(monkeypatch, tmp_path):
    """A1111's non-latent hires input with an ESRGAN upscaler: 8-bit rounding, ``resize_image(0, ...)``: the
    model's ``Upscaler.upscale`` (its tiled upscale, Lanczos to dest), Lanczos to the size, /255, 2x − 1."""
    from test_hires_pixel_upscale_a1111 import _decoded, _run, _System

    from sdadapt.jobs.generate_hires import HiresRequest

    torch.save({"params_ema": _basicsr(2, seed=5).state_dict()}, tmp_path / "x2.pth")
    upscaler = EsrganUpscaler(tmp_path / "x2.pth")
    decoded = _decoded(2, 16, 24, seed=1)
    system = _System(decoded)
    target = (40, 56)
    _run(monkeypatch, system, torch.zeros(2, 4, 2, 3), HiresRequest(target, denoising=0.5, upscaler=upscaler))
    (encoded,) = system.encoded
    expected = []
    for x in torch.clamp((decoded + 1.0) / 2.0, 0, 1):
        image = Image.fromarray((255.0 * np.moveaxis(x.numpy(), 0, 2)).astype(np.uint8))
        scale = max(target[1] / image.width, target[0] / image.height)
        image = _a1111_upscale(image, scale, lambda img: _a1111_upscale_with_model(upscaler.model, img, 192, 8))
        if image.size != (target[1], target[0]):
            image = image.resize((target[1], target[0]), resample=Image.Resampling.LANCZOS)
        expected.append(np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0))
    assert torch.equal(encoded, torch.from_numpy(np.array(expected)) * 2 - 1)


@pytest.fixture(scope="module")
def plain_sd(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_inpaint import _plain_sd_folder

    return _plain_sd_folder(tmp_path_factory)


def test_the_cli_runs_esrgan_files_and_writes_a1111s_upscaler_names(plain_sd, tmp_path, capsys):
    from sdadapt.cli import main
    from sdadapt.images import read_png_text

    torch.save({"params_ema": _basicsr(4).state_dict()}, tmp_path / "RealESRGAN_x4plus.pth")
    write_safetensors(tmp_path / "4x-Sharp.safetensors", _old_keys(_basicsr(4, seed=2).state_dict(), nb=2,
                                                                     upsamples=2), {})
    base = ["generate", "--model", str(plain_sd), "--prompt", "a photo", "--steps", "2", "--sampler", "euler",
            "--seed", "1", "-q"]
    assert main([*base[:-1], "--width", "32", "--height", "32", "--hires-scale", "2", "--hires-upscaler",
                 str(tmp_path / "RealESRGAN_x4plus.pth"), "-o", str(tmp_path / "h.png")]) == 0
    assert "Hires upscaler: R-ESRGAN 4x+" in read_png_text(tmp_path / "h.png")["parameters"]
    said = "".join(capsys.readouterr())  # (the log names the model as the infotext does, not its object)
    assert "denoising 0.7, R-ESRGAN 4x+" in said and "object at" not in said
    # (its infotext again, the model found by A1111's name in the upscalers' folder: the same image)
    assert main(["generate", "--model", str(plain_sd), "--infotext", str(tmp_path / "h.png"), "--upscaler-dir",
                 str(tmp_path), "-q", "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "h.png").read_bytes()
    assert main([*base, "--width", "32", "--height", "32", "--init-image", str(tmp_path / "h.png"), "--sd-upscale",
                 "1.5", "--sd-upscale-upscaler", str(tmp_path / "4x-Sharp.safetensors"), "--sd-upscale-overlap", "8",
                 "--denoising-strength",
                 "0.3", "-o", str(tmp_path / "u.png")]) == 0
    text = read_png_text(tmp_path / "u.png")["parameters"]
    assert "SD upscale upscaler: 4x-Sharp" in text and Image.open(tmp_path / "u.png").size == (96, 96)
    assert main([*base, "--width", "32", "--height", "32", "--hires-scale", "2", "--hires-upscaler",
                 str(tmp_path / "missing.pth"), "-o", str(tmp_path / "m.png")]) != 0
    assert "no such file" in capsys.readouterr().err


class SRVGGNetCompactReference(nn.Module):  # (Real-ESRGAN's realesrgan/archs/srvgg_arch.py, PReLU)
    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4):
        super().__init__()
        self.upscale = upscale
        self.body = nn.ModuleList()
        self.body.append(nn.Conv2d(num_in_ch, num_feat, 3, 1, 1))
        self.body.append(nn.PReLU(num_parameters=num_feat))
        for _ in range(num_conv):
            self.body.append(nn.Conv2d(num_feat, num_feat, 3, 1, 1))
            self.body.append(nn.PReLU(num_parameters=num_feat))
        self.body.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x):
        out = x
        for i in range(0, len(self.body)):  # noqa: PIE808 - their line
            out = self.body[i](out)
        out = self.upsampler(out)
        base = F.interpolate(x, scale_factor=self.upscale, mode='nearest')
        out += base
        return out


@pytest.mark.parametrize(("num_conv", "upscale"), [(3, 4), (2, 2)])
def test_real_esrgans_compact_models_load_as_theirs(tmp_path, num_conv, upscale):
    torch.manual_seed(num_conv)
    reference = SRVGGNetCompactReference(num_feat=8, num_conv=num_conv, upscale=upscale).eval()
    torch.save({"params": reference.state_dict()}, tmp_path / "realesr-general-x4v3.pth")
    model = load_esrgan(tmp_path / "realesr-general-x4v3.pth")
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert EsrganUpscaler(tmp_path / "realesr-general-x4v3.pth").name == "R-ESRGAN General 4xV3"
    image = _picture(20, 14, seed=2)
    assert esrgan_upscale(model, image, tile_size=16, tile_overlap=4).size == (20 * upscale, 14 * upscale)
    plain = {k: v for k, v in reference.state_dict().items() if not k.startswith("body.1.")}
    torch.save(plain, tmp_path / "relu.pth")
    with pytest.raises(WeightFileError, match="without PReLU"):
        load_esrgan(tmp_path / "relu.pth")


def test_upscalers_are_found_by_a1111s_names(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("sub/4x-UltraSharp.pth", "RealESRGAN_x4plus.pth", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert upscaler_in_folder("4x-UltraSharp", tmp_path) == tmp_path / "sub" / "4x-UltraSharp.pth"
    assert upscaler_in_folder("R-ESRGAN 4x+", tmp_path) == tmp_path / "RealESRGAN_x4plus.pth"
    assert upscaler_in_folder("notes", tmp_path) is None and upscaler_in_folder("SwinIR 4x", tmp_path) is None


def test_a_file_that_is_no_upscaler_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from sdadapt.cli import main
    from sdadapt.jobs import generate as generate_job

    torch.save({"layers.0.weight": torch.ones(2)}, tmp_path / "swinir.pth")
    monkeypatch.setattr(generate_job, "load_system", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "--model", str(tmp_path / "model.safetensors"), "--prompt", "a", "--hires-scale", "2",
                 "--hires-upscaler", str(tmp_path / "swinir.pth"), "-o", str(tmp_path / "o.png")]) == 3
    assert "not an ESRGAN" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
