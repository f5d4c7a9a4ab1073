"""docs/lycoris.md's example runs and does what it says."""

from __future__ import annotations

from pathlib import Path

import torch
from docs_pages import code_blocks

ROOT = Path(__file__).resolve().parents[1]


def test_lycoris_page_example_runs_and_round_trips(capsys):
    blocks = code_blocks("lycoris.md")
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/lycoris.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "lycoris.kohya" in out
    assert "{'loha-tucker': 1, 'loha': 2}" in out
    # the file the example wrote, applied to a fresh copy of the base, reproduces the LoHa output
    import sdadapt

    model, x, y_base = namespace["model"], namespace["x"], namespace["y_base"]
    assert not any(".sdadapt." in k for k in model.state_dict())
    handle = sdadapt.load_adapter(model, namespace["components"]["unet"])
    with torch.no_grad():
        with_file = model(x)
    handle.remove()
    loha = sdadapt.inject(model, sdadapt.by_type(torch.nn.Conv2d, torch.nn.Linear), namespace["LoHaConfig"](rank=4, alpha=2.0, use_tucker=True))
    loha.load_state_dict(namespace["components"]["unet"])
    with torch.no_grad():
        assert torch.equal(model(x), with_file)
        assert not torch.allclose(with_file, y_base, atol=1e-4)
