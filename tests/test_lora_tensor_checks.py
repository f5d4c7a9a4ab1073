"""What a LoRA file's tensors must be (sdadapt.formats.lora_tensors), and the readers' refusals of inputs that
used to escape as internal errors: each a WeightFileError naming the file; the forms real writers use still load."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from sdadapt.errors import WeightFileError
from sdadapt.formats import load_embedding, load_lora
from sdadapt.formats.files import read_weights, sniff_format
from sdadapt.formats.lora_tensors import check_lora_tensors

LAYER = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _lora(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{LAYER}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"{LAYER}.lora_up.weight": torch.randn(8, 2, generator=g), f"{LAYER}.alpha": alpha}


@pytest.mark.parametrize("alpha", [torch.tensor(3), torch.tensor([3.0]), torch.tensor(3, dtype=torch.int32)])
def test_an_integer_or_one_element_alpha_reads_as_its_value(tmp_path, alpha):
    """Some writers store alpha as an integer or a (1,) tensor: the layer's scale is that number, the same
    delta as a float32 0-dim alpha gives."""
    from sdadapt.adapters.base import LayerGeometry
    from sdadapt.adapters.registry import file_layer_delta

    save_file(_lora(alpha), str(tmp_path / "odd.safetensors"))
    save_file(_lora(torch.tensor(3.0)), str(tmp_path / "plain.safetensors"))
    geometry = LayerGeometry.from_weight_shape((8, 8))
    deltas = []
    for name in ("odd", "plain"):
        (state,), _ = zip(*[(s, None) for s in load_lora(tmp_path / f"{name}.safetensors")[0].values()])
        tensors = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if "lora_" in k else "alpha": v
                   for k, v in state.items()}
        deltas.append(file_layer_delta(tensors, geometry, dtype=torch.float64)[0])
    assert torch.equal(*deltas)
    torch.testing.assert_close(deltas[1], _lora(torch.tensor(3.0))[f"{LAYER}.lora_up.weight"].double()
                               @ _lora(torch.tensor(3.0))[f"{LAYER}.lora_down.weight"].double() * 3 / 2)


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update({f"{LAYER}.lora_down.weight": s[f"{LAYER}.lora_down.weight"].to(torch.uint8)}), "is uint8"),
    (lambda s: s.update({f"{LAYER}.lora_up.weight": torch.tensor(0.5)}), "single number (0-dim)"),
    (lambda s: s.update({f"{LAYER}.alpha": torch.tensor([1.0, 2.0])}), "alpha is one number per layer"),
    (lambda s: s.update({f"{LAYER}.dora_scale": torch.ones(8, 1, dtype=torch.bool)}), "dora_scale is bool"),
])
def test_tensors_no_adapter_is_built_from_are_file_errors_naming_file_and_key(tmp_path, change, words):
    state = _lora(torch.tensor(2.0))
    change(state)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightFileError, match=rf"^{path}: unet down_blocks\.0\.attentions\.0\.proj_in\.") as caught:
        load_lora(path)
    assert words in str(caught.value)


def test_check_lora_tensors_passes_every_family_as_written():
    """The families' own file tensors pass: LyCORIS (IA)³'s bool on_input, OFT's constraint, LoKr/LoHa factors."""
    states = {"unet": {"a.on_input": torch.tensor(True), "a.weight": torch.ones(8),
                       "b.oft_blocks": torch.zeros(2, 4, 4), "b.alpha": torch.tensor(1e-3), "b.rescale": torch.ones(8, 1),
                       "c.lokr_w1": torch.ones(2, 2), "c.lokr_w2": torch.ones(4, 4).half(), "c.alpha": torch.tensor(1),
                       "d.hada_w1_a": torch.ones(8, 2).bfloat16(), "d.w_norm": torch.ones(8)}}
    check_lora_tensors(states, source="x")


def test_a_sparse_tensor_in_a_legacy_file_is_refused_by_the_reader(tmp_path):
    path = tmp_path / "sparse.pt"
    torch.save({"a.weight": torch.eye(3).to_sparse(), "b.weight": torch.ones(2)}, path)
    with pytest.raises(WeightFileError, match=rf"^{path}: a\.weight is a sparse_coo tensor.*to_dense"):
        read_weights(path)


def test_float8_embedding_vectors_load(tmp_path):
    vectors = torch.randn(2, 16).to(torch.float8_e4m3fn)
    save_file({"emb_params": vectors}, str(tmp_path / "fp8.safetensors"))
    embedding = load_embedding(tmp_path / "fp8.safetensors")
    assert embedding.vectors["text_encoder"].dtype == torch.float8_e4m3fn
    assert torch.equal(embedding.vectors["text_encoder"].float(), vectors.float())
    nan = torch.full((2, 16), float("nan")).to(torch.float8_e4m3fn)
    save_file({"emb_params": nan}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightFileError, match="NaN or inf"):
        load_embedding(tmp_path / "nan.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_sniffing_a_named_pipe_is_refused_without_blocking(tmp_path):
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    result = {}

    def sniff():
        try:
            sniff_format(pipe)
        except WeightFileError as exc:
            result["error"] = str(exc)

    worker = threading.Thread(target=sniff, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # (unblock the reader so the thread ends)
        with open(pipe, "wb"):
            pass
        pytest.fail("sniff_format blocked on a named pipe")
    assert "is a pipe, not a regular file" in result["error"]
