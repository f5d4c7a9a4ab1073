"""Data-parallel training with sdadapt's step: DDP or FSDP2, LoRA or full fine-tune, under torchrun.

    torchrun --nproc-per-node 2 examples/train_distributed.py --fsdp            # LoRA, FSDP2
    torchrun --nproc-per-node 2 examples/train_distributed.py --ddp --full      # full fine-tune, DDP
    torchrun --nproc-per-node 8 examples/train_distributed.py --fsdp --full --steps 100

Runs on CPUs (gloo) or GPUs (NCCL, one GPU per rank) with a small random UNet (no downloads).
Each rank trains on its own slice of the global batch with its own noise (``TrainState(seed=seed +
rank)``); gradients are averaged across ranks in backward, so every rank ends with the same
weights, which the script checks at the end ("ranks agree: True").
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist

import sdadapt
from sdadapt.targets import by_regex
from sdadapt.training import diffusion
from sdadapt.training.distributed import fully_shard_blocks
from sdadapt.training.step import StepConfig, TrainState, train_step


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parallel = parser.add_mutually_exclusive_group()
    parallel.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard per block (default)")
    parallel.add_argument("--ddp", action="store_true", help="DistributedDataParallel")
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA r8 on attention")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the {world} ranks")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    unet = tiny_unet().to(device).train()
    if args.full:
        unet.requires_grad_(True)
    else:
        sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=8, init="gaussian"))
    if args.ddp:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if cuda else None)
    else:
        fully_shard_blocks(unet, by_regex(r"(down|up)_blocks\.\d+|mid_block"))
        model = unet
    params = [p for p in unet.parameters() if p.requires_grad]  # taken after sharding: DTensors under FSDP2
    optimizer = torch.optim.AdamW(params, lr=1e-3 if args.full else 1e-2)

    # a fixed toy data set; rank r takes rows r, r + world, ... of every global batch
    g = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(args.global_batch, 4, 16, 16, generator=g).to(device)
    cond = torch.randn(args.global_batch, 7, 32, generator=g).to(device)
    mine = slice(rank, None, world)
    batch = {"latents": latents[mine], "cond": cond[mine]}
    ac = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).float().to(device)
    state = TrainState(seed=args.seed + rank, device=device)  # each rank its own noise
    config = StepConfig(mixed_precision="bf16" if cuda else None)
    losses = []
    for _ in range(args.steps):
        metrics = train_step(lambda x, t, c: model(x, t, c).sample, batch, params=params, optimizer=optimizer,
                             state=state, config=config, alphas_cumprod=ac)
        losses.append(metrics["loss"])
    mean_loss = torch.stack(losses)
    dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG) if cuda else dist.all_reduce(mean_loss.div_(world))

    # every rank must hold the same weights: compare a checksum of the full (gathered) parameters
    with torch.no_grad():
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
        checksum = torch.stack([t.double().sum() for t in full]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        kind = ("FSDP2" if not args.ddp else "DDP") + (" full fine-tune" if args.full else " LoRA")
        print(f"{kind} on {world} ranks ({device.type}): {sum(p.numel() for p in full)} trained parameters, "
              f"loss {mean_loss[:3].mean():.4f} -> {mean_loss[-3:].mean():.4f}")
        print(f"ranks agree: {all(torch.equal(s, sums[0]) for s in sums)}")
    dist.barrier()  # every rank done before the group is torn down
    model = unet = params = optimizer = full = None  # FSDP2/DDP state holds the process group: free it before destroying
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
