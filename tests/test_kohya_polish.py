"""kohya sd-scripts parity loose ends of ``train`` and the LoRA tools (sd-scripts@48d368fa).

1. ``network_alpha = "4"`` (a TOML string): sd-scripts does not convert a config's values
   (``train_util.read_config_from_file``: ``parser.parse_args(namespace=config_args)``,
   library/train_util.py:4759-4760; argparse applies ``type=float`` to command-line text only), so
   ``networks/lora.py:72`` divides a string by the rank and stops: refused here, naming the fix.
2. ``ss_network_dim`` / ``ss_network_alpha`` / ``ss_network_args`` of each writer, bit for bit against a
   transcription of its kohya twin's metadata code: ``extract-lora`` (extract_lora_from_models.py:242-254),
   ``combine-loras --mode svd`` (svd_merge_lora.py:389-396, 426), ``combine-loras`` concat (merge_lora.py:205-222),
   ``resize-lora`` (resize_lora.py:342-358: ``ss_network_args`` untouched) and ``train`` (train_network.py:664-677,
   1203-1204: ``json.dumps(net_kwargs)``).
3. The progress bar's number: tqdm's ``format_num`` (tqdm/std.py), in the tqdm bar and the plain-text one.
4. The skipped-layers report: numbers that vary together (shapes) are not folded into per-number ranges.
5. A resume on another number of data-parallel processes is named as the cause (``state.json``'s ``processes``).
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdadapt.cli.loratools import skipped_lines
from sdadapt.cli.options import ProgressBar, tqdm_number
from sdadapt.cli.train import kohya_network_args_text, read_config
from sdadapt.formats import save_kohya
from sdadapt.loratools import combine_loras, extract_lora, resize_lora


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def _network(meta: dict[str, str]) -> dict[str, str]:
    return {k: meta[k] for k in NETWORK_KEYS if k in meta}


# ------------------------------------------------------------------ 1. a quoted network_alpha
def _kohya_reads(config: dict, argv: list[str]) -> argparse.Namespace:
    """sd-scripts' reading of a config (train_util.read_config_from_file, library/train_util.py:4748-4760): the
    TOML's values put in a Namespace as they are, then the command line parsed over it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--network_dim", type=int, default=None)
    parser.add_argument("--network_alpha", type=float, default=1)  # (train_network.py:1791-1796)
    return parser.parse_args(argv, namespace=argparse.Namespace(**config))


def _kohya_lora_scale(alpha, lora_dim: int):
    """networks/lora.py:69-72 (LoRAModule.__init__)."""
    if type(alpha) == torch.Tensor:  # (kohya's test)
        alpha = alpha.detach().float().numpy()
    alpha = lora_dim if alpha is None or alpha == 0 else alpha
    return alpha / lora_dim


def test_kohya_stops_on_a_quoted_network_alpha_and_so_does_the_config(tmp_path):
    args = _kohya_reads({"network_alpha": "4"}, [])
    assert args.network_alpha == "4"  # (no type= for a config's value)
    with pytest.raises(TypeError):
        _kohya_lora_scale(args.network_alpha, 4)
    assert _kohya_reads({"network_alpha": "4"}, ["--network_alpha", "4"]).network_alpha == 4.0  # (the command line's)

    config = tmp_path / "train.toml"
    for text in ('network_alpha = "4"', 'network_alpha = "4.0"', 'network_alpha = " 2 "', "network-alpha = 'x'"):
        config.write_text(text + "\n")
        with pytest.raises(ValueError, match=r"is a string; write it as a number without quotes \(network.alpha = ") as info:
            read_config(config, fields={"steps"}, method_options={"alpha"})
        assert str(config) in str(info.value) and "networks/lora.py:72" in str(info.value)
    config.write_text('network_alpha = "4"\n')
    with pytest.raises(ValueError, match=r"\(network_alpha = 4\)"):
        read_config(config, fields={"steps"}, method_options={"alpha"})
    for text, want in (("network_alpha = 4", 4), ("network_alpha = 0.5", 0.5), ('alpha = "2"', 2)):
        config.write_text(text + "\n")  # (numbers as before; sdadapt's own key keeps the quoted-number reading)
        assert read_config(config, fields={"steps"}, method_options={"alpha"})[1] == {"alpha": want}
    config.write_text('network_alpha = ""\n')  # (the GUI's "not given")
    assert read_config(config, fields={"steps"}, method_options={"alpha"})[1] == {}


# ------------------------------------------------------------------ 2. each writer's network metadata
def kohya_extract_metadata(dim: int, conv_dim: int | None) -> dict[str, str]:
    """extract_lora_from_models.py:242-254, the network keys."""
    net_kwargs = {}
    if conv_dim is not None:
        net_kwargs["conv_dim"] = str(conv_dim)
        net_kwargs["conv_alpha"] = str(float(conv_dim))
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)),
            "ss_network_args": json.dumps(net_kwargs)}


def kohya_svd_merge_metadata(new_rank: int, new_conv_rank: int | None) -> dict[str, str]:
    """svd_merge_lora.py:389-396 with merge()'s default (:426) and train_util.build_minimum_network_metadata."""
    new_conv_rank = new_conv_rank if new_conv_rank is not None else new_rank
    network_args = {"conv_dim": new_conv_rank, "conv_alpha": new_conv_rank} if new_conv_rank is not None else None
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": f"{new_rank}", "ss_network_alpha": f"{new_rank}"}
    if network_args is not None:
        meta["ss_network_args"] = json.dumps(network_args)
    return meta


def kohya_merge_metadata(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """merge_lora.py:136-156 and 205-222 (the dims and alphas of every module, conv ones too; no network args),
    over the layers of ``state``."""
    dims, alphas = {}, {}
    for key, value in state.items():
        if "alpha" in key:
            alphas[key[: key.rfind(".alpha")]] = float(value.detach().numpy())
        elif "lora_down" in key:
            dims[key[: key.rfind(".lora_down")]] = value.size()[0]
    for name, dim in dims.items():
        alphas.setdefault(name, dim)
    dims_list, alphas_list = list(set(dims.values())), list(set(alphas.values()))
    return {"ss_network_module": "networks.lora",
            "ss_network_dim": f"{dims_list[0]}" if all(d == dims_list[0] for d in dims_list) else "Dynamic",
            "ss_network_alpha": f"{alphas_list[0]}" if all(a == alphas_list[0] for a in alphas_list) else "Dynamic"}


def kohya_train_network_args(network_args: list[str] | None, network_dropout=None, dim_from_weights=False):
    """train_network.py:664-677 and 1203-1204: ``ss_network_args`` (``None``: not written)."""
    net_kwargs = {}
    if network_args is not None:
        for net_arg in network_args:
            key, value = net_arg.split("=", 1)
            net_kwargs[key] = value
    if not dim_from_weights and "dropout" not in net_kwargs:
        net_kwargs["dropout"] = network_dropout
    return json.dumps(net_kwargs) if network_args else None


ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def test_extract_lora_network_metadata_is_extract_lora_from_models(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {f"{ATTN}.weight": torch.randn(16, 16, generator=g), f"{CONV}.weight": torch.randn(8, 8, 3, 3, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    for rank, conv_rank in ((4, None), (4, 2), (3, 5)):
        out = tmp_path / f"r{rank}c{conv_rank}.safetensors"
        extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, rank=rank, conv_rank=conv_rank,
                     device="cpu")
        assert _network(_meta(out)) == kohya_extract_metadata(rank, conv_rank), (rank, conv_rank)
    assert json.loads(_network(_meta(tmp_path / "r4c2.safetensors"))["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": "2.0"}  # (the old writer's "2")
    out = tmp_path / "alphas.safetensors"  # (sdadapt's own --alpha / --conv-alpha: the same forms)
    extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, rank=4, alpha=1, conv_rank=2,
                 conv_alpha=0.5, device="cpu")
    meta = _network(_meta(out))
    assert (meta["ss_network_alpha"], json.loads(meta["ss_network_args"])) == ("1.0", {"conv_dim": "2", "conv_alpha": "0.5"})


def _lora_state(rank, *, conv_rank=None, seed=0, alpha=None, conv_alpha=None):
    g = torch.Generator().manual_seed(seed)
    state = {f"{ATTN}.lora_down.weight": torch.randn(rank, 32, generator=g),
             f"{ATTN}.lora_up.weight": torch.randn(32, rank, generator=g) * 0.1,
             f"{ATTN}.alpha": torch.tensor(float(rank if alpha is None else alpha))}
    if conv_rank:
        state[f"{CONV}.lora_down.weight"] = torch.randn(conv_rank, 8, 3, 3, generator=g)
        state[f"{CONV}.lora_up.weight"] = torch.randn(8, conv_rank, 1, 1, generator=g) * 0.1
        state[f"{CONV}.alpha"] = torch.tensor(float(conv_rank if conv_alpha is None else conv_alpha))
    return state


def test_combine_network_metadata_is_svd_merge_lora_and_merge_lora(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_kohya(a, {"unet": _lora_state(8, conv_rank=4, seed=1)})
    save_kohya(b, {"unet": _lora_state(4, seed=2)})
    for rank, conv_rank in ((4, None), (2, 3), (3, 3)):
        out = tmp_path / f"svd{rank}{conv_rank}.safetensors"
        combine_loras([a, b], out, mode="svd", rank=rank, conv_rank=conv_rank)
        assert _network(_meta(out)) == kohya_svd_merge_metadata(rank, conv_rank), (rank, conv_rank)
    assert _meta(tmp_path / "svd23.safetensors")["ss_network_args"] == '{"conv_dim": 3, "conv_alpha": 3}'  # (numbers)
    for inputs, name in (([a, b], "ab"), ([b, b], "bb"), ([a], "a")):
        out = tmp_path / f"concat-{name}.safetensors"
        combine_loras(inputs, out)
        tensors = {}
        with safe_open(str(out), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        assert _network(_meta(out)) == kohya_merge_metadata(tensors), name
    assert _network(_meta(tmp_path / "concat-bb.safetensors"))["ss_network_alpha"] == "8.0"  # (4 + 4, a float)
    assert _network(_meta(tmp_path / "concat-ab.safetensors"))["ss_network_dim"] == "Dynamic"  # (12 and the conv's 4)


def test_resize_keeps_the_network_args_text_while_it_is_true(tmp_path):
    src = tmp_path / "src.safetensors"
    args = '{"conv_dim": "4", "conv_alpha": "1.0", "dropout": null}'  # (train_network.py's json.dumps(net_kwargs))
    save_kohya(src, {"unet": _lora_state(8, conv_rank=4, alpha=4, conv_alpha=1)},
               metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_network_args": args})
    out = tmp_path / "same-conv.safetensors"
    resize_lora(src, out, rank=4, conv_rank=4)  # (the conv layer keeps its rank and alpha)
    assert _meta(out)["ss_network_args"] == args  # resize_lora.py:342-358 leaves it untouched: bit for bit
    out = tmp_path / "new-conv.safetensors"
    resize_lora(src, out, rank=4, conv_rank=2)  # (conv rank 2, alpha 0.5: kohya would keep the stale conv_dim 4)
    assert json.loads(_meta(out)["ss_network_args"]) == {"dropout": None, "conv_dim": "2", "conv_alpha": "0.5"}


@pytest.mark.parametrize("items, dropout, from_weights", [
    (["conv_dim=4", "conv_alpha=1"], None, False),
    (["conv_dim=4", "conv_alpha=1.0"], 0.1, False),
    (["conv_alpha=1", "conv_dim=4", "conv_alpha=2"], 0.25, False),  # (a later key replaces; the first place stays)
    (["dropout=0.1", "down_lr_weight=sine+.5", "x=a=b"], 0.3, False),
    (["conv_dim=4"], 0.1, True),
    (["conv_dim=4", "conv_alpha= 1.0 "], None, False),  # (kohya does not strip the value)
    ([], 0.1, False),
])
def test_train_network_args_text_is_train_networks(items, dropout, from_weights):
    want = kohya_train_network_args(items or None, dropout, from_weights)
    assert kohya_network_args_text(items, dropout=dropout, from_weights=from_weights) == ("" if want is None else want)
    if dropout is not None:  # (a command-line --network-dropout is text here, kohya's argparse float there)
        assert kohya_network_args_text(items, dropout=str(dropout), from_weights=from_weights) == ("" if want is None else want)


def test_a_kohya_lora_run_records_its_network_args_as_written(monkeypatch, tmp_path):
    """``train lora --config kohya.toml``: the text reaches TrainOptions (run_train replaced: no training)."""
    from sdadapt import jobs
    from sdadapt.cli import main

    seen = {}

    def fake_run(*args, options=None, **_):
        seen["options"] = options if options is not None else next(a for a in args if hasattr(a, "kohya_network_args"))
        raise SystemExit(0)

    monkeypatch.setattr(jobs, "run_train", fake_run)
    images = tmp_path / "imgs"
    images.mkdir()
    config = tmp_path / "k.toml"
    for lines, want in (
        (['network_args = ["conv_dim=2", "conv_alpha=1.0"]', "network_dropout = 0.1"],
         '{"conv_dim": "2", "conv_alpha": "1.0", "dropout": 0.1}'),
        (['network_args = ["conv_dim=2"]'], '{"conv_dim": "2", "dropout": null}'),  # (no conv_alpha: kohya writes none)
        ([], ""),  # (no network_args: no ss_network_args)
    ):
        config.write_text("\n".join([f"train_data_dir = '{images}'", "network_module = 'networks.lora'",
                                     "network_dim = 4", *lines]) + "\n")
        with pytest.raises(SystemExit):
            main(["train", "lora", "--config", str(config), "--model", "m", "-o", str(tmp_path / "o.safetensors")])
        assert seen["options"].kohya_network_args == want, lines


def test_the_metadata_writer_leaves_out_a_none_key():
    from sdadapt.formats.kohya import kohya_metadata

    state = {"unet": _lora_state(4, conv_rank=2)}
    assert "ss_network_args" in kohya_metadata(state)
    meta = kohya_metadata(state, extra={"ss_network_args": None, "ss_network_alpha": "1"})
    assert "ss_network_args" not in meta and meta["ss_network_alpha"] == "1"


# ------------------------------------------------------------------ 3. the progress bar's number
# tqdm/std.py format_num ('{0:.3g}', the exponent's zero dropped, str(n) when not longer), by hand
FORMAT_NUM = [(0.123456, "0.123"), (0.5, "0.5"), (0.25, "0.25"), (0.125, "0.125"), (0.1234, "0.123"), (1.0, "1"),
              (12, "12"), (0.0, "0"), (1.5e-05, "1.5e-5"), (0.00012345, "0.000123"), (123456.0, "1.23e+5"),
              (1e-100, "1e-100"), (2.5e20, "2.5e+20"), (0.09999, "0.1"), (-0.0421337, "-0.0421"),
              (float("nan"), "nan"), (float("inf"), "inf"), (1234.5, "1234.5"), (12345.6, "12345.6"), (123456.7, "1.23e+5")]


@pytest.mark.parametrize("value, text", FORMAT_NUM)
def test_tqdm_number_is_tqdms_format_num(value, text):
    assert tqdm_number(value) == text
    tqdm = pytest.importorskip("tqdm")
    assert tqdm.tqdm.format_num(value) == text


def test_tqdm_number_on_many_values():
    tqdm = pytest.importorskip("tqdm")
    g = torch.Generator().manual_seed(0)
    values = (torch.rand(400, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-12, 12, (400,), generator=g)).tolist()
    values += [round(v, 4) for v in values[:100]] + list(range(-5, 200, 7))
    assert [tqdm_number(v) for v in values] == [tqdm.tqdm.format_num(v) for v in values]


def test_both_bars_show_avr_loss_as_tqdm_does(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain-text bar
    bar = ProgressBar("lora", unit="step", min_interval=0.0, info_name="avr_loss")
    bar(1, 2, 0.123456)
    bar(2, 2, 1.5e-05)
    err = capsys.readouterr().err
    assert "avr_loss=0.123" in err and "avr_loss=1.5e-5" in err and "0.1235" not in err
    monkeypatch.delitem(sys.modules, "tqdm")
    pytest.importorskip("tqdm")
    for value, text in ((0.123456, "avr_loss=0.123"), (1.5e-05, "avr_loss=1.5e-5")):
        bar = ProgressBar("lora", unit="step", info_name="avr_loss")
        bar(1, 1, value)
        err = capsys.readouterr().err
        assert text in err and "0.1235" not in err and "0.0000" not in err


# ------------------------------------------------------------------ 4. the skipped-layers report
def test_numbers_that_vary_together_are_not_ranges():
    skipped = {"unet:a": "shape (320, 640) does not match (320, 320)", "unet:b": "shape (640, 320) does not match (320, 320)",
               "unet:c": "shape (320, 640) does not match (320, 320)"}
    assert skipped_lines(skipped) == [
        "  2 × shape (320, 640) does not match (320, 320): unet:a, unet:c",
        "  1 × shape (640, 320) does not match (320, 320): unet:b",
    ]  # (not "shape (320..640, 320..640)", which names shapes no layer had)
    one = {f"unet:l{i}": f"shape ({w}, 4)" for i, w in enumerate((320, 640, 1280, 640))}
    assert skipped_lines(one) == ["  4 × shape (320, 640 or 1280, 4): unet:l0, unet:l1, unet:l2, ... (1 more)"]
    two = {"unet:x": "bias (diff_b, norm 0.3)", "unet:y": "bias (diff_b, norm 0.5)"}
    assert skipped_lines(two) == ["  2 × bias (diff_b, norm 0.3 or 0.5): unet:x, unet:y"]
    many = {f"unet:m{i}": f"max |Δ| = {v} <= min_layer_diff 0.01" for i, v in enumerate(("0", "3e-06", "0.0004", "1e-05"))}
    assert skipped_lines(many)[0].startswith("  4 × max |Δ| = 0..0.0004 <= min_layer_diff 0.01: ")
    te = "text encoder unchanged: its max |Δ| = {} <= min_diff 0.01 (kohya's rule; --min-diff {} keeps it)"
    both = {"text_encoder:a": te.format("0.002", "0.0019"), "text_encoder_2:a": te.format("0.003", "0.0029")}
    assert skipped_lines(both) == [f"  1 × {te.format('0.002', '0.0019')}: text_encoder:a",
                                   f"  1 × {te.format('0.003', '0.0029')}: text_encoder_2:a"]


# ------------------------------------------------------------------ 5. a resume on another process count
def _state(step, micro):
    from types import SimpleNamespace

    return SimpleNamespace(step=step, micro_step=micro)


def test_a_resume_on_another_process_count_is_named():
    from sdadapt.methods.fit import _check_resumed_position

    with pytest.raises(ValueError, match=r"had 10 batches an epoch on 2 data-parallel processes, this one runs on 1 .*"
                                         r"resume on 2 \(torchrun --nproc-per-node 2\)"):
        _check_resumed_position("s", _state(4, 8), 4, accumulation=2, per_epoch=5,
                                saved={"batches_per_epoch": 10, "processes": 2}, processes=1)
    with pytest.raises(ValueError, match="on 1 data-parallel process, this one runs on 4"):
        _check_resumed_position("s", _state(4, 8), 4, accumulation=2, per_epoch=5,
                                saved={"batches_per_epoch": 10, "processes": 1}, processes=4)
    with pytest.raises(ValueError, match=r"had 10 batches an epoch \(images added") as info:  # (same count: the data)
        _check_resumed_position("s", _state(4, 8), 4, accumulation=2, per_epoch=5,
                                saved={"batches_per_epoch": 10, "processes": 2}, processes=2)
    assert "process" not in str(info.value)
    with pytest.raises(ValueError, match=r"had 10 batches an epoch \(images added"):  # (older states: no processes)
        _check_resumed_position("s", _state(4, 8), 4, accumulation=2, per_epoch=5, saved={"batches_per_epoch": 10},
                                processes=2)
    _check_resumed_position("s", _state(4, 8), 8, accumulation=2, per_epoch=5,  # (in place: another count is fine,
                            saved={"batches_per_epoch": 5, "processes": 2}, processes=1)  # the global batch the same)


def test_a_saved_state_records_its_process_count(monkeypatch, tmp_path):
    from test_epoch_end_accumulation_reference import _fit

    _fit(3, 2, monkeypatch, schedule="constant", save_at=3, state_dir=tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "state.json").read_text())
    assert (meta["processes"], meta["batches_per_epoch"], meta["micro_step"]) == (1, 5, 5)
    meta["processes"] = 2  # (as a 2-process run with a per-process batch would have saved: another epoch length)
    (tmp_path / "s" / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="on 2 data-parallel processes, this one runs on 1"):
        _fit(5, 2, monkeypatch, count=6, schedule="constant", resume=tmp_path / "s")


def test_the_lora_file_takes_the_kohya_text_and_what_was_applied_beside_it(tmp_path):
    """AdapterAdaptation.save: a kohya text (train's) is written as it is, options applied from elsewhere (a top-level
    key, a flag) after it; ``None`` (kohya writes none) leaves the key out unless such an option exists; no text at all:
    the generated conv keys and the options, as before."""
    from sdadapt.methods import METHODS
    from sdadapt.toy import build_toy

    adaptation = METHODS["lora"].adapt(build_toy(seed=1), seed=1)

    def saved(network_args, metadata):
        adaptation.network_args = dict(network_args)
        out = tmp_path / "x.safetensors"
        adaptation.save(out, metadata=dict(metadata))
        return _meta(out).get("ss_network_args")

    text = '{"conv_dim": "2", "loraplus_text_encoder_lr_ratio": "2", "dropout": null}'
    assert saved({"loraplus_text_encoder_lr_ratio": "2.0", "dropout": "0.1"}, {"ss_network_args": text}) == text
    assert saved({"loraplus_text_encoder_lr_ratio": "2.0", "loraplus_unet_lr_ratio": "4.0"}, {"ss_network_args": text}) \
        == text[:-1] + ', "loraplus_unet_lr_ratio": "4.0"}'  # (the text's "2" as written, the top-level ratio after)
    assert saved({"dropout": "0.1"}, {"ss_network_args": None}) is None
    assert saved({}, {"ss_network_args": None}) is None
    assert json.loads(saved({"dropout": "0.1", "rank_dropout": "0.2"}, {"ss_network_args": None})) == {
        "dropout": "0.1", "rank_dropout": "0.2"}
    assert json.loads(saved({"dropout": "0.1"}, {})) == {"dropout": "0.1"}


def test_resize_gives_conv_rank_to_every_conv_layer_1x1_included_as_kohya(tmp_path):
    """kohya's ``resize_lora.py`` decides "conv" by the factors' four dimensions (``len(lora_down.size()) == 4``):
    a 1x1 conv (SD1's ``proj_in`` / ``proj_out``) takes ``--new_conv_rank`` as the 3x3 convs do; a Linear ``--rank``.
    Each keeps alpha/r (kohya's ``new_alpha = alpha · new_rank / old_rank``), so the delta is the truncated SVD."""
    from sdadapt.formats import load_lora

    proj = "down_blocks.0.attentions.0.proj_in"
    g = torch.Generator().manual_seed(5)
    state = _lora_state(8, conv_rank=4, alpha=4)
    state.update({f"{proj}.lora_down.weight": torch.randn(6, 8, 1, 1, generator=g),
                  f"{proj}.lora_up.weight": torch.randn(8, 6, 1, 1, generator=g) * 0.1, f"{proj}.alpha": torch.tensor(3.0)})
    src, out = tmp_path / "src.safetensors", tmp_path / "out.safetensors"
    save_kohya(src, {"unet": state})
    resize_lora(src, out, rank=4, conv_rank=2)
    got = load_lora(out)[0]["unet"]
    ranks = {layer: int(got[f"{layer}.lora_down.weight"].shape[0]) for layer in (ATTN, CONV, proj)}
    assert ranks == {ATTN: 4, CONV: 2, proj: 2}
    assert float(got[f"{proj}.alpha"]) == pytest.approx(3.0 * 2 / 6)
    # the 1x1 layer's delta: the rank-2 truncation of (alpha/r)·up·down, in float64
    up, down = state[f"{proj}.lora_up.weight"].double().flatten(1), state[f"{proj}.lora_down.weight"].double().flatten(1)
    u, s, vh = torch.linalg.svd(up @ down * (3.0 / 6))
    want = (u[:, :2] * s[:2]) @ vh[:2]
    mine = (got[f"{proj}.lora_up.weight"].double().flatten(1) @ got[f"{proj}.lora_down.weight"].double().flatten(1)
            * float(got[f"{proj}.alpha"]) / 2)
    torch.testing.assert_close(mine, want, atol=1e-6, rtol=1e-5)
