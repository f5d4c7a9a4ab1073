"""Data-parallel training under torchrun / ``accelerate launch``: every rank trains on its slice of
the global batch, gradients averaged over the ranks, only rank 0 writes files.

What :func:`sdadapt.methods.fit.fit` (and ``python -m sdadapt train``) use when the default
process group is initialised with more than one rank:

* :func:`launched_process_group` joins the group torchrun / accelerate describe in the
  environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL on
  ``cuda:LOCAL_RANK``, gloo on the CPU; it is torn down on the way out, errors included.
* :func:`rank_rows` / :func:`shard_prepared`: every rank draws the same global batch (the data
  order, noise and timesteps are pure functions of the seed) and keeps its own rows of the prepared
  batch, so a run on ``W`` ranks takes the optimiser steps of one process with the whole batch (the
  validation pass too: :func:`~sdadapt.training.validation.validation_loss` ``shard=``, then
  :func:`mean_over_ranks` of its result).
* :func:`average_gradients`: one all-reduce per bucket of same-dtype gradients after the last
  accumulated backward, before clipping and the optimiser step (adapters are injected by hooks,
  not wrapped modules, so this replaces ``DistributedDataParallel`` and works for every method).
* :func:`mean_over_ranks` (the reported loss), :func:`broadcast_parameters` (rank 0's starting
  weights everywhere), :func:`is_main_process` (who writes), :func:`wait_for_all_ranks`.
* :func:`rank_chunks` / :func:`share_chunks`: work made once across the ranks (the class images of
  prior preservation, :func:`sdadapt.methods.class_images` ``group=``): rank ``r`` makes chunks
  ``r, r + world, ...``, then every rank receives every chunk, bit for bit. :func:`deal_out`: the same split
  for work whose result is files (kohya's cache files), each rank's summary to every rank.

A collective that fails — another process failed or was stopped first and left the group — raises
:class:`~sdadapt.errors.PeerProcessError` (exit 11) naming this rank, instead of torch's bare
``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, PeerProcessError

__all__ = ["DataParallel", "active", "average_gradients", "broadcast_parameters", "data_parallel_clashes",
           "deal_out", "is_main_process", "launched_process_group", "launched_world_size", "mean_over_ranks", "rank_chunks",
           "rank_device", "rank_rows", "shard_prepared", "share_chunks", "share_switched_weights", "wait_for_all_ranks"]

#: the gradient bucket size of :func:`average_gradients` (bytes): one flat copy of at most this much at a time
BUCKET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run: ``rank`` in ``[0, world)``."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and prints the report)."""
        return self.rank == 0


@contextlib.contextmanager
def _with_the_others(what: str) -> Iterator[None]:
    """Run collectives with the other ranks: torch's error when one fails (gloo: "Connection closed by
    peer"; NCCL: ``DistBackendError``; both ``RuntimeError``) becomes :class:`PeerProcessError`."""
    try:
        yield
    except PeerProcessError:
        raise
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        import torch.distributed as dist

        where = (f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized()
                 else f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PeerProcessError(
            f"data-parallel training, {where}: {what} with the other processes failed — another process of this run "
            "failed or was stopped first: its own output says why (torchrun prints every process's, "
            f"prefixed with its rank); this process stops too. (torch: {first})") from exc


def launched_world_size() -> int:
    """The number of processes of this run: the initialised default process group's size, else the
    launcher's ``WORLD_SIZE`` (torchrun, ``accelerate launch``), else 1.

    Raises:
        InputError: ``WORLD_SIZE`` is not a positive integer.
    """
    group = active()
    if group is not None:
        return group.world
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise InputError(f"WORLD_SIZE={raw!r} in the environment is not a process count >= 1 (torchrun sets it; "
                         "unset it to train in one process)")
    return world


def active() -> DataParallel | None:
    """The data-parallel run this process is in: ``None`` without an initialised default process
    group or with a group of one process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size())


def is_main_process() -> bool:
    """True outside a data-parallel run and on its rank 0 (``RANK`` before the group is joined)."""
    group = active()
    if group is not None:
        return group.main
    return os.environ.get("RANK", "0") == "0"


def rank_device(device: str) -> str:
    """The device this rank trains on: ``"cuda"`` becomes ``cuda:LOCAL_RANK`` under a launcher with
    more than one process; other devices are returned as they are.

    Raises:
        InputError: a numbered ``cuda:N`` with several processes (each needs its own GPU).
    """
    if launched_world_size() < 2 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise InputError(f"--device {device}: under torchrun every process picks its own GPU (cuda:LOCAL_RANK); give "
                         "--device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


@contextlib.contextmanager
def launched_process_group(device: str, *, timeout_minutes: float | None = None) -> Iterator[DataParallel | None]:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1), and leave it on the way out.

    NCCL on a CUDA ``device`` (``torch.cuda.set_device(cuda:LOCAL_RANK)`` first), gloo otherwise.
    Yields ``None`` (and does nothing) for one process or when a group is already initialised
    (yours: it is left as it is). On a normal exit every rank meets at a barrier first, so the files
    rank 0 wrote exist when any rank returns; on an error the group is destroyed at once (the
    other ranks' next collective then fails instead of waiting — gloo at once, NCCL after
    ``timeout_minutes``, torch's default 10 minutes).

    Args:
        device: the run's device (after :func:`rank_device`).
        timeout_minutes: the collectives' timeout (kohya's ``ddp_timeout``); ``None``: torch's.
    """
    import torch.distributed as dist

    if launched_world_size() < 2 or dist.is_initialized():
        yield active()
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                            **({"device_id": torch.device(device)} if cuda else {}))
    failed = True
    try:
        yield active()
        failed = False
    finally:
        try:
            if not failed:
                with _with_the_others("the wait for the others at the end"):
                    dist.barrier()
        finally:
            dist.destroy_process_group()


def data_parallel_clashes(*, cuda_graph: bool, fused_backward: bool) -> list[str]:
    """What cannot train data-parallel (empty: nothing), each with the reason."""
    return [what for what, clash in (
        (("--cuda-graph (cuda_graph): the captured step runs backward, clipping and the optimiser as one replay, "
          "with no place for the gradient all-reduce between them"), cuda_graph),
        (("--fused-backward-pass (fused_backward): its optimisers step inside backward, before the gradients of "
          "the other ranks have arrived"), fused_backward),
    ) if clash]


def rank_rows(total: int, rank: int, world: int) -> tuple[int, int, float]:
    """Rank ``rank``'s rows ``[start, stop)`` of a global batch of ``total`` and its loss factor.

    The rows are split as evenly as possible (the first ``total % world`` ranks one more, as
    ``torch.tensor_split``); the factor ``n_rank · world / total`` makes the mean over ranks of the
    per-rank mean losses the mean over the global batch when the split is uneven (1.0 when even). A
    rank left without a row (``total < world``) trains on row 0 with factor 0: its gradients are 0.
    """
    if not 0 <= rank < world or total < 1:
        raise ValueError(f"rank {rank} of {world} ranks, batch of {total}: need 0 <= rank < world and total >= 1")
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    if count == 0:
        return 0, 1, 0.0
    return start, start + count, (1.0 if extra == 0 else count * world / total)


def _rows_of(value: object, start: int, stop: int, total: int) -> object:
    """``value[start:stop]`` for every tensor (in dicts / lists / tuples) whose first dimension is the batch."""
    if isinstance(value, Tensor):
        return value[start:stop] if value.ndim >= 1 and value.shape[0] == total else value
    if isinstance(value, Mapping):
        return {k: _rows_of(v, start, stop, total) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows_of(v, start, stop, total) for v in value)
    return value


def shard_prepared(prepared: Mapping[str, object], group: DataParallel) -> dict[str, object]:
    """This rank's rows of a prepared global batch (:func:`~sdadapt.training.step.prepare_batch`'s dict:
    ``x_t``, ``t``, ``target``, ``weights``, ``cond``, ``latents``, ``loss_mask``, per-sample ``huber_c``,
    and a ``prior`` class batch, sliced with its own size).

    Every tensor whose first dimension is the batch size ``B = x_t.shape[0]`` is sliced to
    :func:`rank_rows`; when the split is uneven the ``weights`` (B,) are multiplied by the rank's
    factor and ``"share"`` holds it (:func:`~sdadapt.training.step.step_loss` multiplies a method's
    ``extra_loss`` by it: a batch mean — DreamArtist's reconstruction — or a batch-free term — textual
    inversion's norm penalty — then averages over the ranks to the one-process value).
    """
    x_t = prepared["x_t"]
    if not isinstance(x_t, Tensor):
        raise TypeError("shard_prepared takes prepare_batch's dict (x_t a tensor)")
    total = x_t.shape[0]
    start, stop, factor = rank_rows(total, group.rank, group.world)
    out: dict[str, object] = {}
    for key, value in prepared.items():
        if key == "prior" and isinstance(value, Mapping):
            out[key] = shard_prepared(value, group)
        else:
            out[key] = _rows_of(value, start, stop, total)
    if factor != 1.0:
        out["weights"] = out["weights"] * factor  # type: ignore[operator]
        out["share"] = factor
    return out


def _buckets(grads: Sequence[Tensor], limit: int) -> list[list[int]]:
    """Indices of ``grads`` in buckets of one dtype and device, each at most ``limit`` bytes (a larger
    gradient alone), in order."""
    buckets: list[list[int]] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    for i, g in enumerate(grads):
        key = (g.dtype, g.device)
        size = g.numel() * g.element_size()
        members, used = open_.get(key, ([], 0))
        if members and used + size > limit:
            buckets.append(members)
            members, used = [], 0
        members.append(i)
        open_[key] = (members, used + size)
    buckets.extend(members for members, _ in open_.values() if members)
    return buckets


def average_gradients(params: Sequence[nn.Parameter], group: DataParallel, *, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace every ``p.grad`` by its mean over the ranks (in place; call on every rank, same ``params``).

    A parameter without a gradient on one rank but with one on another gets zeros there first
    (one small all-reduce of the flags); one without a gradient on every rank stays ``None``, so
    the optimiser skips it as a one-process run would. Each bucket of same-dtype gradients is
    flattened, divided by the world size and summed with one all-reduce (gloo has no average).
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not params:
        return
    device = params[0].device
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    with _with_the_others("the gradient all-reduce"):
        dist.all_reduce(have, op=dist.ReduceOp.MAX)
    anywhere = have.tolist()
    with torch.no_grad():
        for p, flag in zip(params, anywhere):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, flag in zip(params, anywhere) if flag]
        for bucket in _buckets(grads, bucket_bytes):  # type: ignore[arg-type]
            members = [grads[i] for i in bucket]
            flat = _flatten_dense_tensors(members)  # type: ignore[arg-type]
            flat.div_(group.world)
            with _with_the_others("the gradient all-reduce"):
                dist.all_reduce(flat)
            for g, averaged in zip(members, _unflatten_dense_tensors(flat, members)):  # type: ignore[arg-type]
                g.copy_(averaged)  # type: ignore[union-attr]


def mean_over_ranks(values: Sequence[Tensor], group: DataParallel) -> list[Tensor]:
    """The mean over the ranks of each 0-dim tensor in ``values`` (one all-reduce for all of them)."""
    import torch.distributed as dist

    stacked = torch.stack([v.detach().float() for v in values])
    with _with_the_others("the loss all-reduce"):
        dist.all_reduce(stacked)
    return list(stacked.div_(group.world).unbind())


def broadcast_parameters(params: Sequence[nn.Parameter]) -> None:
    """Copy rank 0's values of ``params`` to every rank (in place; call on every rank, same ``params``)."""
    import torch.distributed as dist

    with torch.no_grad(), _with_the_others("the broadcast of rank 0's weights"):
        for p in params:
            dist.broadcast(p.data, src=0)


def share_switched_weights(params: Sequence[nn.Parameter], switched: list[bool], group: DataParallel) -> None:
    """After a step's callbacks, in train mode again: when any rank switched a schedule-free
    optimiser to its averaged weights and back (``switched[0]``; rank 0 saving or sampling), every
    rank takes rank 0's weights — the round trip rounds them, and ranks must hold the same ones.
    One small all-reduce; the broadcast only after such a step. Resets ``switched[0]``."""
    import torch.distributed as dist

    flag = torch.tensor([int(switched[0])], dtype=torch.int32, device=params[0].device)
    with _with_the_others("the schedule-free weights check"):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    switched[0] = False
    if int(flag.item()):
        broadcast_parameters(params)


#: the dtypes :func:`share_chunks` sends (a chunk's header names its dtype by its place here)
_CHUNK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int32, torch.int64)
#: the most dimensions a chunk :func:`share_chunks` sends may have
_CHUNK_DIMS = 8


def rank_chunks(count: int, group: DataParallel) -> range:
    """The chunks of ``count`` (``0 .. count - 1``) that rank ``group.rank`` makes: ``rank, rank + world, ...``
    (accelerate's ``BatchSamplerShard`` deals a data loader's batches out so, without its padding: a chunk is
    made once, the last ranks may make one fewer or none)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0 (chunks to share out), got {count!r}")
    return range(group.rank, count, group.world)


def _collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: this rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share_chunks(mine: Mapping[int, Tensor], count: int, group: DataParallel, *,
                 what: str = "the sharing of the class images") -> list[Tensor]:
    """Every rank's chunks on every rank (call on every rank, in the same order): chunk ``k`` of ``count``
    is made by rank ``k % world`` (:func:`rank_chunks`) and sent to the others as it is — dtype, shape and
    bits (a header of its dtype and shape, then the tensor: two broadcasts per chunk).

    Args:
        mine: this rank's chunks, ``{k: tensor}`` for exactly the ``k`` in ``rank_chunks(count, group)``;
            each tensor of any shape (at most 8 dimensions) in one of float32/16, bfloat16, float64,
            uint8, int32, int64 (e.g. class images (b, 3, H, W)).
        count: the number of chunks in all.
        group: this rank's place (:func:`active`).
        what: what is shared, for the :class:`~sdadapt.errors.PeerProcessError` when another rank failed.

    Returns:
        The ``count`` chunks in order, on the collectives' device (NCCL: this rank's GPU; gloo: the CPU),
        each equal bit for bit to the one its rank made.

    Raises:
        ValueError: ``mine`` does not hold exactly this rank's chunks.
        TypeError: a chunk of another dtype or of more than 8 dimensions.
        PeerProcessError: another rank failed or left the group first.
    """
    import torch.distributed as dist

    owned = list(rank_chunks(count, group))
    if sorted(mine) != owned:
        raise ValueError(f"rank {group.rank} of {group.world} makes chunks {owned} of {count} "
                         f"(rank_chunks), got {sorted(mine)}")
    for k, chunk in mine.items():
        if not isinstance(chunk, Tensor) or chunk.dtype not in _CHUNK_DTYPES or chunk.ndim > _CHUNK_DIMS:
            raise TypeError(f"share_chunks sends tensors of at most {_CHUNK_DIMS} dimensions in "
                            f"{', '.join(str(d) for d in _CHUNK_DTYPES)}; chunk {k} is "
                            + (f"{chunk.dtype} {tuple(chunk.shape)}" if isinstance(chunk, Tensor) else type(chunk).__name__))
    device = _collective_device()
    out: list[Tensor] = []
    for k in range(count):
        owner = k % group.world
        header = torch.zeros(2 + _CHUNK_DIMS, dtype=torch.int64)
        if owner == group.rank:
            chunk = mine[k].detach().to(device).contiguous()
            header[0], header[1] = _CHUNK_DTYPES.index(chunk.dtype), chunk.ndim
            header[2 : 2 + chunk.ndim] = torch.tensor(chunk.shape, dtype=torch.int64)
        header = header.to(device)
        with _with_the_others(what):
            dist.broadcast(header, src=owner)
        if owner != group.rank:
            dtype, ndim, *dims = header.tolist()
            chunk = torch.empty(dims[:ndim], dtype=_CHUNK_DTYPES[dtype], device=device)
        with _with_the_others(what):
            dist.broadcast(chunk, src=owner)
        out.append(chunk)
    return out


def deal_out(count: int, group: DataParallel, work: Callable[[list[int]], Any], *, what: str) -> list[Any]:
    """Work on ``count`` items done once across the ranks, kohya's split of its cache files
    (sd-scripts@48d368fa library/train_util.py:1182-1185 ``new_cache_latents``, 1324-1327
    ``new_cache_text_encoder_outputs``: item ``i`` by the process with ``i % num_processes == process_index``,
    then ``accelerator.wait_for_everyone()``, 2629 / 2651).

    Rank ``r`` calls ``work(items)`` with its items ``r, r + world, ...`` (:func:`rank_chunks`; possibly none),
    which does them (writes their files) and returns a summary of what it did as JSON-able data; then every rank
    receives every rank's summary (:func:`share_chunks`, which returns only once every rank has finished its work:
    the wait). Call on every rank, with the items in the same order.

    Returns:
        The ranks' summaries, ``[rank 0's, rank 1's, ...]`` (this rank's too, as JSON read it back).

    Raises:
        PeerProcessError: another rank failed or left the group first (its ``work`` raised, say).
    """
    import json

    done = work(list(rank_chunks(count, group)))
    own = torch.tensor(list(json.dumps(done).encode()), dtype=torch.uint8)
    return [json.loads(bytes(chunk.cpu().tolist()).decode()) for chunk in share_chunks({group.rank: own}, group.world,
                                                                                        group, what=what)]


def wait_for_all_ranks(what: str) -> None:
    """Block until every rank of the default process group arrives here (``what``: where, for the
    :class:`~sdadapt.errors.PeerProcessError` when another rank failed instead); nothing outside a
    data-parallel run."""
    import torch.distributed as dist

    if active() is None:
        return
    with _with_the_others(what):
        dist.barrier()
