"""FSDP2 (``fully_shard``) training: two gloo ranks on CPU equal one process with the global batch,
for LoRA on a frozen base and for a full fine-tune; the torchrun example runs."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fast_dist import fork_ranks  # noqa: E402
from tiny_models import tiny_unet_sd1  # noqa: E402

import sdadapt  # noqa: E402
from sdadapt.targets import by_regex  # noqa: E402
from sdadapt.training.step import StepConfig, TrainState, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = by_regex(r"(down|up)_blocks\.\d+|mid_block")
STEPS = 3
#: SGD with momentum, not AdamW: the ranks sum gradients in another order than one process does, and
#: AdamW's m/√v would turn a rounding-level difference of a near-zero gradient into a full ±lr step
#: on single elements. SGD keeps the comparison elementwise and float32-tight.
LR, RTOL, ATOL = 0.5, 1e-4, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(4)
    return {"latents": torch.randn(4, 4, 8, 8, generator=g), "cond": torch.randn(4, 5, 32, generator=g),
            "noise": torch.randn(4, 4, 8, 8, generator=g), "timesteps": torch.tensor([3, 250, 600, 990])}


def _alphas():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _build(mode: str):
    unet = tiny_unet_sd1(3).train()
    if mode == "lora":
        handle = sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=4, init="gaussian"))
        return unet, handle
    unet.requires_grad_(True)
    return unet, None


def _train(unet, batch) -> dict[str, torch.Tensor]:
    """Three steps; returns the trained parameters by name (gathered to full tensors)."""
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(named.values()), lr=LR, momentum=0.9)
    state = TrainState(seed=1)
    for _ in range(STEPS):
        train_step(lambda x, t, c: unet(x, t, c).sample, batch, params=list(named.values()), optimizer=optimizer,
                   state=state, config=StepConfig(), alphas_cumprod=_alphas())
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in named.items()}


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from sdadapt.training.distributed import fully_shard_blocks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    batch = _batch()
    per = 4 // world
    shard = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    results = {}
    for mode in ("lora", "full"):
        unet, _ = _build(mode)
        names = fully_shard_blocks(unet, BLOCKS)
        assert sorted(names) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
        sharded = [p for p in unet.parameters() if p.requires_grad]
        assert all(type(p.data).__name__ == "DTensor" for p in sharded)
        results[mode] = _train(unet, shard)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # no rank tears gloo down while another still uses it (aborts under load)
    del unet, sharded  # the sharded model holds the process group: free it before destroying the group
    gc.collect()
    dist.destroy_process_group()


def test_fsdp2_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    # the one-process references first: their first build imports diffusers' UNet and sdadapt's LoRA here, once,
    # so the forked ranks inherit those imports instead of each paying for them again
    single, before, handles = {}, {}, {}
    for mode in ("lora", "full"):
        unet, handles[mode] = _build(mode)
        before[mode] = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
        single[mode] = _train(unet, _batch())
        if mode == "full":
            assert set(single[mode]) == {n for n, _ in unet.named_parameters()}
    out = str(tmp_path / "fsdp.pt")
    fork_ranks(_fsdp_worker, args=(2, _free_port(), out), nprocs=2)  # (tests/_fast_dist.py: forked ranks, no re-import)
    sharded = torch.load(out, weights_only=True)
    for mode in ("lora", "full"):
        assert set(single[mode]) == set(sharded[mode])
        if mode == "lora":
            lora = single[mode]
            assert all(".sdadapt." in n for n in lora) and len(lora) == len(list(handles[mode].parameters()))
        moved = 0
        for name, value in single[mode].items():
            torch.testing.assert_close(sharded[mode][name], value, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, where=f"{mode} {name}": f"{where}: {m}")
            moved += int((value - before[mode][name]).abs().max() > 100 * ATOL)
        assert moved > 0.5 * len(single[mode])  # trained copies compared (LoRA downs barely move, ups start at 0)


def test_fully_shard_blocks_needs_a_process_group():
    from sdadapt.errors import InputError
    from sdadapt.training.distributed import fully_shard_blocks

    with pytest.raises(InputError, match="init_process_group"):
        fully_shard_blocks(tiny_unet_sd1(0), BLOCKS)


def test_torchrun_example_trains_on_two_ranks():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         str(ROOT / "examples" / "train_distributed.py"), "--steps", "2", "--global-batch", "2", "--fsdp", "--full"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks agree: True" in out.stdout and "loss" in out.stdout
