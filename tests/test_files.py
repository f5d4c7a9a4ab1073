"""Reading and writing weight files: atomic writes, safe legacy loading, errors that name the file."""

from __future__ import annotations

import collections
import math
import os
import struct
from pathlib import Path

import pytest
import torch

import sdadapt
import sdadapt.errors
from sdadapt.formats import files as files_mod
from sdadapt.formats import load_diffusers, load_kohya, read_weights, write_safetensors
from sdadapt.formats.files import read_safetensors, read_safetensors_header

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.lora_down.weight": torch.randn(4, 8, generator=g),
        "a.lora_up.weight": torch.randn(8, 4, generator=g).half(),
        "a.alpha": torch.tensor(2.5),
        "conv": torch.randn(3, 2, 3, 3, generator=g).to(torch.bfloat16),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False]),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------- writing
def test_round_trip_of_tensors_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    meta = {"ss_network_dim": "4", "title": "ünïcode ✓", "empty": ""}
    returned = write_safetensors(path, _tensors(), meta)
    assert Path(returned) == path
    tensors, metadata = read_safetensors(path)
    _assert_same(tensors, _tensors())
    assert metadata == meta
    # read_weights gives the same for a safetensors file, header agrees
    tensors2, metadata2 = read_weights(path)
    _assert_same(tensors2, _tensors())
    assert metadata2 == meta
    header, metadata3 = read_safetensors_header(path)
    assert metadata3 == meta
    assert header["conv"]["shape"] == [3, 2, 3, 3]
    assert _listing(tmp_path) == ["w.safetensors"]  # no temp file left behind


def test_write_makes_contiguous_copies_of_views_and_shared_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"t": base.T, "same": base, "alias": base, "row": base[1]}
    write_safetensors(tmp_path / "v.safetensors", tensors)
    got, _ = read_weights(tmp_path / "v.safetensors")
    for key, value in tensors.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(base, torch.arange(12.0).reshape(3, 4))  # caller's tensors untouched


@pytest.mark.parametrize(
    "metadata",
    [{"ss_network_dim": 4}, {"alpha": 1.5}, {"args": {"conv_dim": "4"}}, {"x": None}, {1: "one"}],
    ids=["int", "float", "dict", "none", "int-key"],
)
def test_non_string_metadata_is_rejected_and_nothing_is_written(tmp_path, metadata):
    path = tmp_path / "m.safetensors"
    with pytest.raises(sdadapt.WeightFileError) as info:
        write_safetensors(path, _tensors(), metadata)
    assert "m.safetensors" in str(info.value)
    assert "str" in str(info.value)
    assert _listing(tmp_path) == []


def _failing_save_file(written: list[str]):
    def save_file(filename, head, offsets, payload):
        # write part of a file, then die the way a full disk or a kill would
        with open(filename, "wb") as handle:
            handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
        written.append(filename)
        raise OSError(28, "No space left on device")

    return save_file


def test_write_is_atomic_no_file_and_no_temp_left_on_failure(tmp_path, monkeypatch):
    written: list[str] = []
    monkeypatch.setattr(files_mod, "_write_payload", _failing_save_file(written))
    path = tmp_path / "lora.safetensors"
    with pytest.raises(OSError, match="disk filled up") as info:  # a DiskSpaceError naming the file
        write_safetensors(path, _tensors(), {"a": "b"})
    assert isinstance(info.value, sdadapt.errors.DiskSpaceError) and str(path) in str(info.value)
    assert written, "the patched save_file was not used"
    assert Path(written[0]).parent == tmp_path  # the temp file lives next to the target
    assert Path(written[0]).name != "lora.safetensors"
    assert not path.exists()
    assert _listing(tmp_path) == []


def test_failed_write_leaves_an_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, {"old": torch.ones(3)}, {"version": "1"})
    before = path.read_bytes()
    stat = path.stat()
    monkeypatch.setattr(files_mod, "_write_payload", _failing_save_file([]))
    with pytest.raises(OSError):
        write_safetensors(path, {"new": torch.zeros(5)}, {"version": "2"})
    assert path.read_bytes() == before
    assert path.stat().st_ino == stat.st_ino
    assert _listing(tmp_path) == ["lora.safetensors"]
    tensors, metadata = read_weights(path)
    assert list(tensors) == ["old"] and metadata == {"version": "1"}


def test_interrupt_during_write_also_cleans_up(tmp_path, monkeypatch):
    def interrupted(filename, head, offsets, payload):
        Path(filename).write_bytes(b"xx")
        raise KeyboardInterrupt

    monkeypatch.setattr(files_mod, "_write_payload", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path / "k.safetensors", _tensors())
    assert _listing(tmp_path) == []


def test_successful_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, {"old": torch.ones(3)})
    write_safetensors(path, {"new": torch.zeros(2)}, {"v": "2"})
    tensors, metadata = read_weights(path)
    assert list(tensors) == ["new"] and metadata == {"v": "2"}
    assert _listing(tmp_path) == ["lora.safetensors"]


def test_write_into_a_missing_folder_makes_it(tmp_path):
    """As kohya's os.makedirs(output_dir): the folder and its parents are made; a file in the way is named."""
    path = write_safetensors(tmp_path / "nope" / "deeper" / "x.safetensors", _tensors())
    assert sorted(read_weights(path)[0]) == sorted(_tensors())
    assert _listing(tmp_path / "nope" / "deeper") == ["x.safetensors"]
    with pytest.raises(sdadapt.WeightFileError, match="is a file, not a folder"):
        write_safetensors(path / "y.safetensors", _tensors())



def test_the_output_folder_check_and_its_making_on_awkward_paths(tmp_path, monkeypatch):
    """make_output_folder / check_output_file: a relative path (from the current folder, '' parent
    too), a link to a folder (written through), a dangling link or a file in the way (named, nothing
    made), and a folder that cannot be made (the folder, the reason and the fix named)."""
    from sdadapt.formats.files import check_output_file, make_output_folder

    monkeypatch.chdir(tmp_path)
    assert make_output_folder("x.safetensors") == Path(".")  # ('' parent: the current folder)
    assert check_output_file("rel/a/x.safetensors", overwrite=False) == Path("rel/a/x.safetensors")
    assert not (tmp_path / "rel").exists()  # (the check makes nothing)
    assert make_output_folder(Path("rel/a/x.safetensors")) == Path("rel/a") and (tmp_path / "rel" / "a").is_dir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    write_safetensors(tmp_path / "link" / "sub" / "x.safetensors", _tensors())
    assert _listing(tmp_path / "real" / "sub") == ["x.safetensors"]
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "afile").write_text("x")
    for bad, what in ((Path("dangling") / "x.safetensors", "a link to a missing folder"),
                      (Path("dangling") / "deeper" / "x.safetensors", "a link to a missing folder"),
                      (Path("afile") / "deeper" / "x.safetensors", "a file, not a folder")):
        for call in (lambda b: check_output_file(b, overwrite=False), make_output_folder,
                     lambda b: write_safetensors(b, _tensors())):
            with pytest.raises(sdadapt.errors.OutputError, match=what):
                call(bad)
    assert not (tmp_path / "gone").exists()

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(sdadapt.errors.OutputError, match=r"cannot make folder new.*no permission to write in \."):
        write_safetensors(Path("new") / "x.safetensors", _tensors())


# --------------------------------------------------------------------------------- read errors
def _real_safetensors(tmp_path: Path) -> Path:
    path = tmp_path / "real.safetensors"
    write_safetensors(path, _tensors(), {"k": "v"})
    return path


def _error_for(path) -> str:
    with pytest.raises(sdadapt.WeightFileError) as info:
        read_weights(path)
    message = str(info.value)
    assert str(path) in message, f"the error does not name the file: {message}"
    assert "\x1b[" not in message  # no terminal colour codes from torch
    return message


def test_missing_file(tmp_path):
    assert "no such file" in _error_for(tmp_path / "absent.safetensors")


def test_folder_instead_of_file(tmp_path):
    assert "folder" in _error_for(tmp_path)


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.pt", "empty.ckpt"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert "empty" in _error_for(path)


@pytest.mark.parametrize("cut", [1, 7, 100], ids=["1-byte", "7-bytes", "100-bytes"])
def test_truncated_safetensors_data(tmp_path, cut):
    data = _real_safetensors(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-cut])
    message = _error_for(path)
    assert "truncated" in message
    assert str(len(data) - cut) in message  # says how big the file is


@pytest.mark.parametrize("keep", [3, 8, 30], ids=["inside-length", "length-only", "inside-header"])
def test_safetensors_cut_inside_the_header(tmp_path, keep):
    data = _real_safetensors(tmp_path).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:keep])
    message = _error_for(path)
    assert "truncated" in message or "too short" in message


def test_random_bytes(tmp_path):
    g = torch.Generator().manual_seed(1)
    junk = bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    for name in ("junk.safetensors", "junk.pt", "junk.bin"):
        path = tmp_path / name
        path.write_bytes(junk)
        message = _error_for(path)
        assert "safetensors" in message or "torch.save" in message


def test_random_bytes_that_start_like_a_pickle(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    message = _error_for(path)
    assert "corrupt" in message


def test_safetensors_with_a_malformed_header(tmp_path):
    header = b'{"a": {"dtype": "F32", "shape": [2]}}'  # no data_offsets
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert "header" in _error_for(path)


def test_safetensors_with_non_string_metadata_in_the_header(tmp_path):
    header = b'{"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert "metadata" in _error_for(path)


def test_truncated_torch_save_archive(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _error_for(path)
    assert "corrupt or truncated" in message


def test_pickle_under_a_safetensors_name_is_read_as_legacy(tmp_path):
    path = tmp_path / "actually_pickle.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    tensors, _ = read_weights(path)
    assert torch.equal(tensors["w"], torch.ones(2))


def _mark(path: str) -> None:  # what a malicious pickle would run
    Path(path).write_text("code ran")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_mark, (self.marker,))


class _Custom:
    def __init__(self) -> None:
        self.weight = torch.ones(2)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda marker: {"w": torch.ones(2), "payload": _Evil(marker)}, "_mark"),
        (lambda marker: {"w": torch.ones(2), "obj": _Custom()}, "_Custom"),
        (lambda marker: torch.nn.Linear(2, 2), "Linear"),
        # old A1111 embeddings: string_to_param is an nn.ParameterDict (FORMATS.md §10.11)
        (
            lambda marker: {"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(1, 8))})},
            "ParameterDict",
        ),
    ],
    ids=["reduce-callable", "custom-class", "nn-module", "parameterdict"],
)
def test_pickle_that_needs_full_unpickling_is_refused_and_never_run(tmp_path, make, needle):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "unsafe.pt"
    torch.save(make(str(marker)), path)
    message = _error_for(path)
    assert needle in message, message
    assert "weights_only" in message
    assert not marker.exists(), "sdadapt executed code from a pickle"


def test_full_unpickling_really_runs_the_evil_payload(tmp_path):
    # guards the test above: the payload is live, so 'marker not created' means something
    marker = tmp_path / "marker.txt"
    path = tmp_path / "unsafe.pt"
    torch.save({"payload": _Evil(str(marker))}, path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


# --------------------------------------------------------------------------------- legacy reads
def test_legacy_dict_of_tensors_is_read_and_nested_dicts_flattened(tmp_path):
    g = torch.Generator().manual_seed(2)
    a, b, c = torch.randn(3, 4, generator=g), torch.randn(5, generator=g).half(), torch.randn(2, 2, generator=g)
    obj = {
        "state_dict": {"model.a": a, "inner": collections.OrderedDict(b=b)},
        "top": c,
        "epoch": 7,
        "name": "run-1",
        "lr": 1e-4,
        "flags": [1, 2, 3],
    }
    path = tmp_path / "legacy.ckpt"
    torch.save(obj, path)
    tensors, metadata = read_weights(path)
    assert set(tensors) == {"state_dict.model.a", "state_dict.inner.b", "top"}
    assert torch.equal(tensors["state_dict.model.a"], a)
    assert torch.equal(tensors["state_dict.inner.b"], b) and tensors["state_dict.inner.b"].dtype == torch.float16
    assert torch.equal(tensors["top"], c)
    assert metadata == {"epoch": "7", "name": '"run-1"', "lr": "0.0001", "flags": "[1, 2, 3]"}
    assert all(t.device.type == "cpu" for t in tensors.values())


def test_legacy_tuples_of_state_dicts_are_flattened_not_stringified(tmp_path):
    # A1111 hypernetwork layout: {dim: (k_state_dict, v_state_dict), ...}
    k = {"linear.0.weight": torch.randn(8, 4), "linear.0.bias": torch.zeros(8)}
    v = {"linear.0.weight": torch.randn(8, 4), "linear.0.bias": torch.ones(8)}
    path = tmp_path / "hn.pt"
    torch.save({768: (k, v), "layer_structure": [1, 2, 1], "activation_func": "relu"}, path)
    tensors, metadata = read_weights(path)
    assert set(tensors) == {"768.0.linear.0.weight", "768.0.linear.0.bias", "768.1.linear.0.weight", "768.1.linear.0.bias"}
    assert torch.equal(tensors["768.1.linear.0.bias"], torch.ones(8))
    assert metadata == {"layer_structure": "[1, 2, 1]", "activation_func": '"relu"'}
    assert all(len(value) < 100 for value in metadata.values())  # no tensor text in metadata


@pytest.mark.parametrize("low_bytes", [b"\x80", b"PK"], ids=["0x80", "PK"])
@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_safetensors_whose_header_length_looks_like_a_pickle_magic(tmp_path, low_bytes, name):
    # the first bytes of a safetensors file are its header length (little-endian): a length of
    # 128 mod 256 starts with 0x80, 19280 mod 65536 with "PK" -- still safetensors
    path = tmp_path / name
    tensors = {"a": torch.ones(2)}
    write_safetensors(path, tensors, {"pad": ""})
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    unpadded = len(data[8 : 8 + length].rstrip(b" "))  # safetensors pads the JSON to 8 bytes
    target = 128 if low_bytes == b"\x80" else 0x4B50  # both multiples of 8
    pad = target - unpadded
    write_safetensors(path, tensors, {"pad": "x" * pad})
    assert path.read_bytes().startswith(low_bytes)
    got, metadata = read_weights(path)
    assert torch.equal(got["a"], torch.ones(2)) and len(metadata["pad"]) == pad
    assert sdadapt.formats.describe_file(path)["tensors"] == 1


def test_safetensors_content_under_a_pt_name_is_read(tmp_path):
    path = tmp_path / "renamed.pt"
    path.write_bytes(_real_safetensors(tmp_path).read_bytes())
    tensors, metadata = read_weights(path)
    _assert_same(tensors, _tensors())
    assert metadata == {"k": "v"}


# --------------------------------------------------------------------------------- NaN / inf
def _kohya_state(bad: float | None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    if bad is not None:
        up[3, 1] = bad
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=g).to(dtype),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=g).to(dtype),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down.to(dtype),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up.to(dtype),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0),
    }


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_nan_or_inf_in_a_kohya_file_names_the_tensor(tmp_path, bad, dtype):
    path = tmp_path / "diverged.safetensors"
    write_safetensors(path, _kohya_state(bad, dtype))
    with pytest.raises(sdadapt.WeightFileError) as info:
        load_kohya(path)
    message = str(info.value)
    assert str(path) in message
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in message
    assert "proj_in" not in message  # only the bad tensor is named
    assert "NaN or inf" in message


def test_nan_in_a_legacy_pt_lora_is_caught_too(tmp_path):
    path = tmp_path / "diverged.pt"
    torch.save(_kohya_state(math.nan), path)
    with pytest.raises(sdadapt.WeightFileError, match="lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up"):
        load_kohya(path)


def test_nan_in_a_diffusers_file_names_the_tensor(tmp_path):
    down = torch.randn(4, 32)
    up = torch.randn(32, 4)
    up[0, 0] = math.inf
    state = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight": down,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight": up,
    }
    path = tmp_path / "pytorch_lora_weights.safetensors"
    write_safetensors(path, state, {"format": "pt"})
    with pytest.raises(sdadapt.WeightFileError) as info:
        load_diffusers(path)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight" in str(info.value)
    assert str(path) in str(info.value)
    # and load_lora, which auto-detects, refuses it as well
    with pytest.raises(sdadapt.WeightFileError, match="to_k.lora_B.weight"):
        sdadapt.load_lora(path)


def test_finite_file_loads(tmp_path):
    path = tmp_path / "fine.safetensors"
    write_safetensors(path, _kohya_state(None))
    components, _ = load_kohya(path)
    assert set(components) == {"unet", "text_encoder"}


# --------------------------------------------------------------------------------- real fixtures
_AESTHETIC = {
    # file: (shape, dtype, L2 norm) as the fixtures README states
    "sac_8plus.pt": ((768,), torch.float32, 3.26),
    "aivazovsky.pt": ((1, 768), torch.float16, 17.24),
}


@pytest.mark.parametrize("name", sorted(_AESTHETIC))
def test_cuda_saved_aesthetic_embeddings_read_on_cpu(name):
    path = FIXTURES / "aesthetic" / name
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent (needs the shared/fixtures folder beside the repo)")
    shape, dtype, norm = _AESTHETIC[name]
    tensors, metadata = read_weights(path)
    assert len(tensors) == 1 and metadata == {}
    (tensor,) = tensors.values()
    assert tuple(tensor.shape) == shape
    assert tensor.dtype == dtype
    assert tensor.device.type == "cpu"
    assert abs(float(tensor.float().norm()) - norm) < 0.01
    assert bool(torch.isfinite(tensor).all())


def test_truncated_copy_of_a_real_fixture_is_reported(tmp_path):
    source = FIXTURES / "aesthetic" / "sac_8plus.pt"
    if not source.is_file():
        pytest.skip(f"real fixture {source} is absent (needs the shared/fixtures folder beside the repo)")
    data = source.read_bytes()
    path = tmp_path / "sac_8plus.pt"
    path.write_bytes(data[: len(data) - 200])
    assert "corrupt or truncated" in _error_for(path)


def test_check_finite_ignores_integer_tensors():
    files_mod.check_finite({"ids": torch.arange(3), "mask": torch.tensor([True])}, source="x")


def test_no_stray_files_in_cwd(tmp_path, monkeypatch):
    # a relative target path writes its temp file in the current folder, not elsewhere
    monkeypatch.chdir(tmp_path)
    write_safetensors("rel.safetensors", {"a": torch.ones(1)})
    assert os.listdir(tmp_path) == ["rel.safetensors"]


def test_a_name_with_no_room_for_the_files_made_beside_it_is_refused_before_any_work(tmp_path, red_circles):
    """A legal name (255 bytes is the limit) whose write needs a temporary file ``.NAME.<pid>-<random>.tmp`` too long
    for the file system, or whose run derives a step save ``NAME-step000001.safetensors`` that is: a whole training
    ran and then failed at the save. Refused up front, naming the longest output name that fits; that one trains,
    saves every step and writes its files."""
    from sdadapt.cli import main
    from sdadapt.formats.files import NAME_ROOM, OutputError, check_output_file

    out = tmp_path / "out"
    out.mkdir()
    limit = os.pathconf(out, "PC_NAME_MAX")
    with pytest.raises(OutputError, match=f"a name of {limit - NAME_ROOM + 1} bytes is too long to write here.*at "
                                          f"most {limit - NAME_ROOM} bytes"):
        check_output_file(out / ("n" * (limit - NAME_ROOM + 1 - 4) + ".png"), overwrite=False, suffix=None)
    fits = limit - NAME_ROOM - len("-step999999")  # (the longest -o whose derived step save fits)
    train = ["train", "lora", "--model", "toy", "--images", str(red_circles), "--no-prior", "-q", "--steps", "2",
             "--save-every-n-steps", "1"]
    too_long = "n" * (fits + 1 - len(".safetensors")) + ".safetensors"
    assert main([*train, "-o", str(out / too_long)]) == 7
    assert list(out.iterdir()) == []  # (nothing trained, nothing written)
    name = too_long[1:]
    assert main([*train, "-o", str(out / name)]) == 0
    assert (out / name).is_file() and any(p.name.endswith("-step000001.safetensors") for p in out.iterdir())


def test_generate_checks_the_numbered_names_of_its_images_before_sampling(tmp_path):
    """``--count 2`` writes ``NAME-00.png`` / ``NAME-01.png``: an ``-o`` that fits alone but whose numbered names do
    not is refused before any image is made, naming the longest name that fits."""
    from sdadapt.cli import main
    from sdadapt.formats.files import NAME_ROOM

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "n" * (limit - NAME_ROOM - len(".png")) + ".png"  # (fits alone)
    run = ["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "1", "-q"]
    assert main([*run, "--count", "2", "-o", str(tmp_path / name)]) == 7
    assert list(tmp_path.iterdir()) == []
    assert main([*run, "-o", str(tmp_path / name)]) == 0 and (tmp_path / name).is_file()
