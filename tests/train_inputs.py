"""What the `train` tests feed the toy model: folders of random captioned PNGs, the command line and
kohya-style TOML configs."""

from __future__ import annotations

from pathlib import Path

import torch

from sdadapt.images import write_png

__all__ = ["captioned_pngs", "kohya_config_names", "kohya_toml_text", "lora_train_args", "random_png",
           "read_kohya_table", "read_train_toml", "resumed_train_is_the_straight_one", "toy_kohya_toml",
           "train_toy_kohya", "write_kohya_toml"]


def captioned_pngs(folder: Path, sizes: list[tuple[int, int]], *, caption: str | list[str] = "a red circle") -> Path:
    """``folder`` made and filled with ``0.png, 1.png ...`` of random pixels, one per ``(height, width)``
    in ``sizes`` (all drawn from one generator seeded 0), each with its ``.txt`` caption: ``caption``,
    or ``caption[i]`` when a list is given."""
    captions = [caption] * len(sizes) if isinstance(caption, str) else caption
    if len(captions) != len(sizes):
        raise ValueError(f"{len(captions)} captions for {len(sizes)} images")
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, ((h, w), text) in enumerate(zip(sizes, captions)):
        write_png(folder / f"{i}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
        (folder / f"{i}.txt").write_text(text)
    return folder


def resumed_train_is_the_straight_one(folder: Path, args: list[str]) -> bool:
    """``python -m sdadapt <args>`` run saving its state every step (``folder/a.safetensors``,
    ``folder/a-state``; an ``AssertionError`` unless it exits 0), then again resumed from that state
    (``folder/b.safetensors``): whether the two files hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    from sdadapt.cli import main

    for extra in (["--save-every-n-steps", "1", "-o", str(folder / "a.safetensors")],
                  ["--resume", str(folder / "a-state"), "-o", str(folder / "b.safetensors")]):
        code = main([*args, *extra])
        if code != 0:
            raise AssertionError(f"train {' '.join(extra[:2])} exited {code}")
    a, b = load_file(str(folder / "a.safetensors")), load_file(str(folder / "b.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def random_png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> None:
    """One PNG of random pixels (``size`` = (height, width), drawn from a generator seeded ``seed``) at
    ``path``, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    write_png(path, torch.rand(3, *size, generator=g) * 2 - 1)


def lora_train_args(images: Path, *extra) -> list[str]:
    """``train lora`` on ``images`` at batch size 2 without prior preservation, then ``extra`` (as text)."""
    return ["train", "lora", "--images", str(images), "--batch-size", "2", "--no-prior", *map(str, extra)]


def kohya_config_names() -> tuple[set[str], set[str]]:
    """What ``read_config`` takes as names: ``(TrainOptions fields, method options)``."""
    import dataclasses

    from sdadapt.cli.train import _method_options
    from sdadapt.jobs import TrainOptions

    return {f.name for f in dataclasses.fields(TrainOptions)} - {"method_options"}, set(_method_options())


def read_train_toml(path: Path, text: str) -> tuple[dict, dict, list[str]]:
    """``text`` written to ``path`` and read as ``train --config`` reads it (every ``TrainOptions`` field and
    method option a name): ``(train options, method options, notes)``."""
    from sdadapt.cli.train import read_config

    path.write_text(text)
    fields, methods = kohya_config_names()
    return read_config(path, fields=fields, method_options=methods)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def kohya_toml_text(table: dict) -> str:
    """``table`` as kohya's flat TOML: one ``key = value`` line per entry (booleans, strings, numbers and
    lists of them)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in table.items())


def write_kohya_toml(path: Path, table: dict) -> None:
    """``kohya_toml_text(table)`` written to ``path``."""
    path.write_text(kohya_toml_text(table), encoding="utf-8")


def read_kohya_table(path: Path, table: dict) -> tuple[dict, dict, list[str]]:
    """``table`` written to ``path`` as kohya's TOML and read as ``train --config`` reads it:
    ``(train options, method options, notes)``."""
    return read_train_toml(path, kohya_toml_text(table))


def toy_kohya_toml(folder: Path, images: Path, table: dict) -> Path:
    """``folder/kohya.toml``: kohya's LoRA settings training the toy model on ``images`` for 2 steps at
    32x32, batch 1, rank 4, lr 1e-4, saving ``folder/out/<output_name>.safetensors`` (output name
    ``kohya``; ``folder/out`` made); ``table``'s entries added or in place of those."""
    (folder / "out").mkdir(exist_ok=True)
    config = folder / "kohya.toml"
    write_kohya_toml(config, {
        "train_data_dir": str(images), "output_dir": str(folder / "out"), "output_name": "kohya",
        "pretrained_model_name_or_path": "toy", "resolution": "32,32", "max_train_steps": 2, "train_batch_size": 1,
        "network_module": "networks.lora", "network_dim": 4, "bucket_reso_steps": 8, "min_bucket_reso": 16,
        "max_bucket_reso": 64, "learning_rate": 1e-4, **table})
    return config


def train_toy_kohya(folder: Path, images: Path, table: dict) -> dict[str, str]:
    """``python -m sdadapt train lora --config <toy_kohya_toml(folder, images, table)> --no-prior`` run (an
    ``AssertionError`` unless it exits 0): the metadata of the LoRA file it saved."""
    from safetensors import safe_open

    from sdadapt.cli import main

    code = main(["train", "lora", "--config", str(toy_kohya_toml(folder, images, table)), "--no-prior"])
    if code != 0:
        raise AssertionError(f"train --config exited {code}")
    with safe_open(str(folder / "out" / f"{table.get('output_name', 'kohya')}.safetensors"), "pt") as file:
        return file.metadata()


def record_training(monkeypatch) -> tuple[list[float], list[tuple[int, float, dict]]]:
    """Spy on the train command's loop (``monkeypatch`` undoes it): ``(batch losses, logged rows)``, the
    lists filled as it runs — each batch's ``train_step`` loss, and each ``RunLog.step`` row as
    ``(step, loss, extra)`` (extra: the values with no CSV column, e.g. ``loss/average``)."""
    import importlib

    from sdadapt.training import monitor

    fit_module = importlib.import_module("sdadapt.methods.fit")  # (the package's ``fit`` is the function)
    batch_losses: list[float] = []
    logged: list[tuple[int, float, dict]] = []
    real_step, real_log = fit_module.train_step, monitor.RunLog.step

    def recording(model, batch, **kwargs):
        metrics = real_step(model, batch, **kwargs)
        batch_losses.append(float(metrics["loss"]))
        return metrics

    def log_step(self, step, epoch, loss, lr, extra=None):
        logged.append((step, loss, dict(extra or {})))
        return real_log(self, step, epoch, loss, lr, extra)

    monkeypatch.setattr(fit_module, "train_step", recording)
    monkeypatch.setattr(monitor.RunLog, "step", log_step)
    return batch_losses, logged
