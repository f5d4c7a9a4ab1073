"""Every save of a run carries the run's output name as its ModelSpec title, the step saves too (kohya's
train_network.py passes ``output_name`` to every save's ``build_metadata``); the step file's own stem was written
(``a-step000001``), which A1111's and ComfyUI's model lists show as the LoRA's name."""

from __future__ import annotations

from safetensors import safe_open

from sdadapt.cli import main


def _meta(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_step_saves_are_titled_by_the_run(red_circles, tmp_path):
    out = tmp_path / "a.safetensors"
    common = ["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--steps", "2",
              "--save-every-n-steps", "1", "-q"]
    assert main([*common, "-o", str(out)]) == 0
    saves = sorted(p for p in tmp_path.glob("a*.safetensors") if p != out)
    assert saves, sorted(p.name for p in tmp_path.iterdir())
    for path in [*saves, out]:
        meta = _meta(path)
        assert (meta["modelspec.title"], meta["ss_output_name"]) == ("a", "a"), path.name
    titled = tmp_path / "t" / "b.safetensors"
    assert main([*common, "-o", str(titled), "--metadata-title", "My LoRA"]) == 0
    for path in titled.parent.glob("b*.safetensors"):
        assert (_meta(path)["modelspec.title"], _meta(path)["ss_output_name"]) == ("My LoRA", "b"), path.name
