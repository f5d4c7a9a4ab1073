"""A kohya config's ``cache_latents = true`` with ``random_crop`` / ``color_aug``: refused, as kohya refuses it.

sd-scripts@48d368fa train_network.py:581-584 (and train_db.py:113-115, fine_tune.py:117-119, sdxl_train.py:201-203):
``if cache_latents: assert train_dataset_group.is_latent_cacheable(), "when caching latents, either color_aug or
random_crop cannot be used"``, with library/train_util.py:1099-1100 ``is_latent_cacheable``, transcribed in
:func:`_kohya_is_latent_cacheable` over the subsets as kohya's config_util fills them (a subset's value, else its
dataset block's, else ``[general]``'s).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from train_inputs import captioned_pngs, toy_kohya_toml

from sdadapt.cli import main


def _kohya_is_latent_cacheable(subsets) -> bool:
    """Transcription of kohya's BaseDataset.is_latent_cacheable (library/train_util.py:1099-1100)."""
    return all([not subset.color_aug and not subset.random_crop for subset in subsets])  # noqa: C419 (kohya's form)


def _subsets(table: dict) -> list[SimpleNamespace]:
    """The subsets of a dataset TOML table with kohya's fill order (subset, then dataset block, then general)."""
    general = table.get("general", {})
    out = []
    for block in table.get("datasets", []):
        for subset in block.get("subsets", []):
            out.append(SimpleNamespace(**{k: next((t[k] for t in (subset, block, general) if k in t), False)
                                          for k in ("random_crop", "color_aug")}))
    return out


def _write(path, table: dict) -> str:
    lines = []
    for key, value in table.get("general", {}).items():
        lines.append(("[general]\n" if not lines else "") + f"{key} = {str(value).lower()}")
    for block in table["datasets"]:
        lines.append("[[datasets]]\nresolution = 32")
        lines += [f"{k} = {str(v).lower()}" for k, v in block.items() if k != "subsets"]
        for subset in block["subsets"]:
            lines.append("[[datasets.subsets]]\nimage_dir = 'imgs'")
            lines += [f"{k} = {str(v).lower()}" for k, v in subset.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("table", [
    {"datasets": [{"subsets": [{}, {"random_crop": True}]}]},
    {"general": {"color_aug": True}, "datasets": [{"subsets": [{}]}]},
    {"general": {"random_crop": True}, "datasets": [{"random_crop": False, "subsets": [{}]}]},
    {"general": {"random_crop": True}, "datasets": [{"subsets": [{"random_crop": False}]}]},
    {"datasets": [{"color_aug": True, "subsets": [{"color_aug": False}, {}]}]},
    {"datasets": [{"subsets": [{"random_crop": False}]}]},
], ids=["subset", "general", "block-off", "subset-off", "block-on", "none"])
def test_the_dataset_toml_rule_is_kohyas_is_latent_cacheable(tmp_path, table):
    from sdadapt.cli.train import (
        _check_cached_pixel_changes,
        _dataset_toml_pixel_changes,
    )

    path = _write(tmp_path / "data.toml", table)
    assert (not _dataset_toml_pixel_changes(path)) == _kohya_is_latent_cacheable(_subsets(table))
    config = tmp_path / "k.toml"
    config.write_text("cache_latents = true\n")
    refused = not _kohya_is_latent_cacheable(_subsets(table))
    if refused:
        with pytest.raises(ValueError, match=r"cache_latents = true with .*a subset of dataset_config"):
            _check_cached_pixel_changes(config, {"dataset_config": path})
    else:
        _check_cached_pixel_changes(config, {"dataset_config": path})
    config.write_text("cache_latents = false\n")  # (no caching asked: kohya trains, so does sdadapt)
    _check_cached_pixel_changes(config, {"dataset_config": path})


@pytest.mark.parametrize("table, flags, named", [
    ({"cache_latents": True, "random_crop": True}, [], "random_crop"),
    ({"cache_latents": True, "color_aug": True}, [], "color_aug"),
    ({"cache_latents": True}, ["--random-crop"], "random_crop"),  # (a flag with the file's cache_latents)
])
def test_a_kohya_toml_caching_latents_with_pixel_changes_is_refused(tmp_path, capsys, table, flags, named):
    images = captioned_pngs(tmp_path / "imgs", [(32, 32)])
    code = main(["train", "lora", "--config", str(toy_kohya_toml(tmp_path, images, table)), "--no-prior", *flags])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and f"cache_latents = true with {named}" in last and "Leave out cache_latents" in last, last
    assert not any((tmp_path / "out").iterdir())


def test_without_cache_latents_random_crop_still_trains(tmp_path, capsys):
    images = captioned_pngs(tmp_path / "imgs", [(32, 32)])
    code = main(["train", "lora", "--config", str(toy_kohya_toml(tmp_path, images, {"random_crop": True})), "--no-prior"])
    assert code == 0, capsys.readouterr().err
