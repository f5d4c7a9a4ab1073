"""``.pt`` / ``.bin`` outputs pass A1111's safe unpickler and load in torch as they were written.

A1111 / Forge / SD.Next run every ``torch.load`` of an embedding, hypernetwork or aesthetic embedding through
``modules/safe.py`` ``check_pt``; files torch >= 2.x writes itself (``.format_version``, ``.storage_alignment``)
are refused there. The check below is A1111's, transcribed (AUTOMATIC1111/stable-diffusion-webui
``modules/safe.py``, the same in Forge HEAD dfdcbab :23-100): its zip-name rule and its restricted unpickler.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.embeddings.embedding import Embedding
from sdadapt.formats.aesthetic import save_aesthetic_embedding
from sdadapt.formats.custom_diffusion import save_custom_diffusion_file
from sdadapt.formats.embeddings import save_embedding
from sdadapt.formats.hypernetworks import a1111_to_canonical, write_hypernetwork_file
from sdadapt.formats.torch_files import torch_save_bytes
from tests.test_custom_diffusion import _random_state
from tests.tiny_models import tiny_unet_sd1

# --- A1111 modules/safe.py, transcribed -------------------------------------------------------------------
_ALLOWED_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")


class _RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ["_rebuild_tensor_v2", "_rebuild_parameter",
                                                 "_rebuild_device_tensor_from_numpy"]:
            return getattr(torch._utils, name)
        if module == "torch" and name in ["FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                          "ByteStorage", "float32", "BFloat16Storage"]:
            return getattr(torch, name)
        if module == "torch.nn.modules.container" and name in ["ParameterDict"]:
            return torch.nn.modules.container.ParameterDict
        if module == "__builtin__" and name == "set":
            return set
        raise Exception(f"global '{module}/{name}' is forbidden")  # noqa: TRY002 (A1111's)


def a1111_check_pt(filename) -> None:
    """A1111's ``check_pt`` (zip branch): raises as A1111 does on a file it refuses to load."""
    with zipfile.ZipFile(filename) as z:
        for name in z.namelist():
            if not _ALLOWED_ZIP_NAMES.match(name):
                raise Exception(f"bad file inside {filename}: {name}")  # noqa: TRY002 (A1111's)
        found = [f for f in z.namelist() if _DATA_PKL.match(f)]
        if len(found) != 1:
            raise Exception(f"{len(found)} data.pkl in {filename}")  # noqa: TRY002 (A1111's)
        with z.open(found[0]) as file:
            _RestrictedUnpickler(file).load()


def _data_offsets(path) -> dict[str, int]:
    """Where each zip record's data starts (from its local header)."""
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            out[info.filename] = info.header_offset + 30 + name_len + extra_len
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_plain_torch_save_is_refused_by_the_transcribed_check(tmp_path):
    """The transcription bites: what torch itself writes now (``.format_version``) is refused, as in A1111."""
    path = tmp_path / "plain.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 4)}}, path)
    names = zipfile.ZipFile(path).namelist()
    if all(_ALLOWED_ZIP_NAMES.match(n) for n in names):
        pytest.skip(f"torch {torch.__version__} writes only records A1111 allows")
    with pytest.raises(Exception, match="bad file inside"):
        a1111_check_pt(path)


def _hypernetwork_dict() -> dict:
    g = torch.Generator().manual_seed(0)

    def mlp():
        return {"linear.0.weight": torch.randn(16, 8, generator=g), "linear.0.bias": torch.randn(16, generator=g),
                "linear.1.weight": torch.randn(8, 16, generator=g), "linear.1.bias": torch.randn(8, generator=g)}

    return {8: (mlp(), mlp()), "step": 3, "name": "hn", "layer_structure": [1, 2, 1], "activation_func": "linear",
            "is_layer_norm": False, "weight_initialization": "Normal", "use_dropout": False, "activate_output": False,
            "sd_checkpoint": None}


def _write_each(tmp_path):
    """Every writer of a ``.pt``/``.bin`` (name -> (path, the object it is meant to hold or None))."""
    out = {}
    embedding = Embedding("purple", {"text_encoder": torch.randn(3, 8, dtype=torch.float16)})
    out["embedding"] = save_embedding(tmp_path / "purple.pt", embedding)
    sdxl = Embedding("both", {"clip_l": torch.randn(2, 8), "clip_g": torch.randn(2, 12)})
    out["sdxl embedding"] = save_embedding(tmp_path / "both.pt", sdxl)
    out["diffusers embedding"] = save_embedding(tmp_path / "learned_embeds.bin", embedding, format="diffusers")
    tensors, settings_ = a1111_to_canonical(_hypernetwork_dict())
    out["hypernetwork"] = write_hypernetwork_file(tmp_path / "hn.pt", tensors, settings_)
    out["aesthetic"] = save_aesthetic_embedding(tmp_path / "style.pt", torch.randn(12))
    state = _random_state(tiny_unet_sd1())
    files = save_custom_diffusion_file(tmp_path / "cd.bin", state, embeddings=[Embedding("<new1>", {"text_encoder": torch.randn(1, 8)})])
    out["custom diffusion"], out["custom diffusion token"] = files[0], files[1]
    return out


def test_every_pt_writer_passes_a1111s_safe_unpickler_and_torch_load(tmp_path):
    for what, path in _write_each(tmp_path).items():
        a1111_check_pt(path)  # (raises naming the record A1111 would refuse)
        with zipfile.ZipFile(path) as z:
            assert {n.split("/", 1)[0] for n in z.namelist()} == {path.stem}, what  # (as torch.save(obj, path) names it)
        misaligned = {k: v for k, v in _data_offsets(path).items() if v % 64}
        assert not misaligned, (what, misaligned)
        plain = torch.load(path, weights_only=True)
        mapped = torch.load(path, weights_only=True, mmap=True)
        assert _same(plain, mapped), what


def test_hypernetwork_pt_holds_the_a1111_dict_bit_for_bit(tmp_path):
    original = _hypernetwork_dict()
    tensors, settings_ = a1111_to_canonical(original)
    back = torch.load(write_hypernetwork_file(tmp_path / "hn.pt", tensors, settings_), weights_only=True)
    for key in ("step", "name", "layer_structure", "activation_func"):
        assert back[key] == original[key]
    for k_or_v in (0, 1):
        assert _same(dict(back[8][k_or_v]), original[8][k_or_v])


_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8])


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5), dtype=_DTYPES,
       name=st.text(min_size=1, max_size=8))
def test_torch_save_bytes_round_trips_any_tensors(shapes, dtype, name):
    g = torch.Generator().manual_seed(len(shapes))
    obj = {f"t{i}": (torch.randn(shape, generator=g) * 50).to(dtype) for i, shape in enumerate(shapes)}
    obj["nested"] = {"step": 7, "name": name, "pair": (torch.arange(3), [1, 2.5, None])}
    data = torch_save_bytes(obj, name=name)
    back = torch.load(io.BytesIO(data), weights_only=True)
    assert _same(back, obj)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        folders = {n.split("/", 1)[0] for n in z.namelist()}
        assert len(folders) == 1 and (folders == {name} or (folders == {"archive"}
                                                             and not re.fullmatch(r"[A-Za-z0-9._-]+", name)))
