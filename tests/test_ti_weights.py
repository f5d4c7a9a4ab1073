"""kohya's ``--weights`` of textual inversion (``--init-weights``): start the trigger's vectors from an embedding file.

kohya (train_textual_inversion.py ``load_weights``) reads a ``.safetensors`` or an A1111 ``.pt``
(``string_to_param``), copies its rows into the new tokens' rows of the token table and refuses a
vector count other than ``num_vectors_per_token``; sdxl_train_textual_inversion.py reads
``clip_l`` + ``clip_g``. Files are written here by hand (safetensors' own writer, ``torch.save`` of
A1111's dict), not with sdadapt's writers, and the rows the run starts from must be the file's, bit
for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdadapt.cli import main
from sdadapt.errors import InputError, WeightFileError
from sdadapt.methods import prepare_textual_inversion
from sdadapt.toy import build_toy

WIDTH = 64  # the toy text encoder's token table


def _kohya_file(path, rows: torch.Tensor):
    save_file({"emb_params": rows.contiguous()}, str(path))
    return path


def _a1111_file(path, rows: torch.Tensor):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "start", "step": 120,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


@pytest.mark.parametrize("writer, suffix", [(_kohya_file, ".safetensors"), (_a1111_file, ".pt")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_run_starts_from_the_files_vectors_bit_for_bit(tmp_path, writer, suffix, dtype):
    rows = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(5)).to(dtype)
    file = writer(tmp_path / f"start{suffix}", rows)
    system = build_toy(seed=1)
    ti = prepare_textual_inversion(system, token="<sks>", vectors=3, init_weights=file, init_word="red")
    (param,) = ti.params
    assert param.dtype == torch.float32 and torch.equal(param.detach(), rows.float())  # (fp16 -> fp32: exact)
    assert torch.equal(ti.embedding().vectors["text_encoder"], rows.float())
    ti.remove()


def test_a_vector_count_or_width_for_another_model_is_refused_naming_the_fix(tmp_path):
    system = build_toy(seed=1)
    two = _kohya_file(tmp_path / "two.safetensors", torch.randn(2, WIDTH))
    with pytest.raises(InputError, match=r"it has 2 vector\(s\) per token, the run 4; set --vectors 2 \(kohya's "
                                         "num_vectors_per_token"):
        prepare_textual_inversion(system, token="<sks>", vectors=4, init_weights=two)
    sd1 = _kohya_file(tmp_path / "sd1.safetensors", torch.randn(1, 768))
    with pytest.raises(InputError, match="its vectors are 768 wide: SD1 .* the model's token table is 64 wide"):
        prepare_textual_inversion(system, token="<sks>", init_weights=sd1)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(sdxl))
    with pytest.raises(InputError, match=r"an SDXL embedding \(clip_l \+ clip_g\), but the model is SD1/SD2"):
        prepare_textual_inversion(system, token="<sks>", init_weights=sdxl)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    with pytest.raises(WeightFileError, match="junk.safetensors"):
        prepare_textual_inversion(system, token="<sks>", init_weights=junk)
    lora = tmp_path / "lora.safetensors"
    save_file({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(WeightFileError, match="not a textual-inversion embedding"):
        prepare_textual_inversion(system, token="<sks>", init_weights=lora)
    assert len(system.tokenizer) == len(build_toy(seed=1).tokenizer)  # (nothing was left injected)


def test_sdxl_starts_both_encoders_rows_from_clip_l_and_clip_g(tmp_path):
    pytest.importorskip("diffusers")
    from tiny_checkpoints import tiny_sdxl_parts

    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import DiffusersSystem

    parts = tiny_sdxl_parts()  # two CLIP encoders, 64 wide each
    tokenizers = [CLIPTokenizer.load(None, pad=pad).to_transformers() for pad in ("eos", "!")]
    system = DiffusersSystem(parts["unet"], parts["vae"], parts["text_encoder"], tokenizers[0], {},
                             text_encoder_2=parts["text_encoder_2"], tokenizer_2=tokenizers[1]).requires_grad_(False)
    rows = {"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 64)}
    file = tmp_path / "xl.safetensors"
    save_file(rows, str(file))
    ti = prepare_textual_inversion(system, token="<sks>", vectors=2, init_weights=file)
    assert [torch.equal(p.detach(), rows[k]) for p, k in zip(ti.params, ("clip_l", "clip_g"))] == [True, True]
    # what each encoder looks up for the trigger's tokens: clip_l in text_encoder, clip_g in text_encoder_2
    for encoder, tokenizer, key in ((system.text_encoder, system.tokenizer, "clip_l"),
                                    (system.text_encoder_2, system.tokenizer_2, "clip_g")):
        ids = tokenizer(ti.expand("<sks>"), add_special_tokens=False).input_ids
        assert torch.equal(encoder.get_input_embeddings()(torch.tensor(ids)), rows[key]), key
    ti.remove()
    one = _kohya_file(tmp_path / "one.safetensors", torch.randn(2, 64))
    with pytest.raises(InputError, match="an SD1/SD2 embedding .* but the model is SDXL"):
        prepare_textual_inversion(system, token="<sks>", vectors=2, init_weights=one)


def test_a_kohya_toml_with_weights_trains_from_the_file(three_shapes, tmp_path, capsys):
    """``weights`` and ``num_vectors_per_token`` from a kohya TOML: at a learning rate too small to
    move a float32 row, the saved embedding is the file's rows exactly; a missing file stops the run
    before the model loads."""
    rows = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(9))
    start = _a1111_file(tmp_path / "start.pt", rows)
    config = tmp_path / "ti.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{three_shapes}'\noutput_dir = "
                      f"'{tmp_path}'\noutput_name = 'sks'\ntoken_string = 'sks'\nnum_vectors_per_token = 2\n"
                      f"weights = '{start}'\nlearning_rate = 1e-30\nmax_train_steps = 1\nresolution = '32,32'\n"
                      "train_batch_size = 1\n", encoding="utf-8")
    assert main(["train", "textual-inversion", "--config", str(config), "-q"]) == 0, capsys.readouterr().err
    from sdadapt import load_embedding

    assert torch.equal(load_embedding(tmp_path / "sks.safetensors").vectors["text_encoder"], rows)
    missing = tmp_path / "missing.toml"
    missing.write_text(config.read_text().replace(str(start), str(tmp_path / "nope.pt")), encoding="utf-8")
    assert main(["train", "textual-inversion", "--config", str(missing), "-q"]) != 0
    err = capsys.readouterr().err
    assert "nope.pt: no such file" in err and "the embedding the run starts from" in err
