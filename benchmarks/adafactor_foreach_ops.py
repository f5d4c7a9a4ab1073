"""What sdadapt's Adafactor dispatches per step: the per-parameter step against ``foreach=True``,
eager against ``capturable=True``.

Counts the aten ops one ``step()`` dispatches (views left out: on a GPU each of the others is
about one kernel launch, or one node of a captured CUDA graph) and how many are multi-tensor
``_foreach`` ops, over the parameters of a full UNet fine-tune. The parameters live on the
``meta`` device, so SD1.5's and SDXL's real shapes cost no memory and no arithmetic: the count is
the Python step's, which does not depend on the values. (A ``_foreach`` op counts once; on CUDA it
is one launch per list when its tensors pair up in shape — element-wise ops of a parameter with
its own state — and one per tensor otherwise: broadcasts, lists of per-parameter 0-dim scalars.)

Usage::

    python benchmarks/adafactor_foreach_ops.py            # seconds; prints a Markdown table

Writes ``benchmarks/results/adafactor_foreach_ops.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import UNET_CONFIGS
from aten_ops import AtenOps

from sdadapt.training.optim import Adafactor

CONFIGS = {  # kohya's Adafactor (relative step, parameter scale) and an explicit LR with β₁ and decay
    "relative_step+scale": dict(relative_step=True, scale_parameter=True),
    "lr+beta1+decay": dict(lr=1e-5, beta1=0.9, weight_decay=0.01),
}


def unet_shapes(name: str) -> list[torch.Size]:
    """The parameter shapes of diffusers' UNet in ``UNET_CONFIGS[name]`` (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[name])
    return [p.shape for p in unet.parameters()]


def count(shapes: list[torch.Size], config: dict, *, dtype: torch.dtype, foreach: bool, capturable: bool) -> tuple[int, int]:
    """(aten ops, ``_foreach`` ops among them) of the second ``step()`` (the first makes the state)."""
    params = [torch.empty(s, dtype=dtype, device="meta", requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = Adafactor(params, foreach=foreach, capturable=capturable, **config)
    if capturable and "lr" in config:  # fit's tensor LR (set after the constructor, which reads its value)
        opt.param_groups[0]["lr"] = torch.tensor(config["lr"], dtype=torch.float64, device="meta")
    opt.step()
    with AtenOps() as counter:
        opt.step()
    return counter.ops, counter.foreach


def main() -> None:
    rows = []
    for model in ("sd15", "sdxl"):
        shapes = unet_shapes(model)
        factored = sum(len(s) >= 2 for s in shapes)
        for config_name, config in CONFIGS.items():
            for dtype in (torch.float32, torch.bfloat16):
                for capturable in (False, True):
                    per_param = count(shapes, config, dtype=dtype, foreach=False, capturable=capturable)
                    batched = count(shapes, config, dtype=dtype, foreach=True, capturable=capturable)
                    rows.append(dict(model=model, params=len(shapes), factored=factored, config=config_name,
                                     weights=str(dtype).removeprefix("torch."), capturable=capturable,
                                     per_parameter_ops=per_param[0], foreach_ops=batched[0], foreach_multi_tensor=batched[1]))
    print("| model | params (factored) | config | weights | capturable | per-parameter ops | foreach ops (_foreach) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params']} ({r['factored']}) | {r['config']} | {r['weights']} | {r['capturable']} | "
              f"{r['per_parameter_ops']} | {r['foreach_ops']} ({r['foreach_multi_tensor']}) |")
    out = Path(__file__).parent / "results" / "adafactor_foreach_ops.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
