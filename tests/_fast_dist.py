"""Test ranks as forks of the test process (the multi-process and checkpoint/resume tests' group).

A rank that starts a fresh interpreter spends most of its CPU time importing torch, torch._dynamo (the
first optimiser imports it) and sdadapt, which the test process has already imported. Where a fresh
interpreter is not what a test is about, its ranks are forks: each its own process, its own gloo rank,
the launcher's variables (``WORLD_SIZE``, ``RANK``, ...) in its environment, one thread, its own working
directory and stdout/stderr, as ``torchrun ... python -m sdadapt`` gives it. The one test about torchrun
itself (tests/test_fsdp.py's example) still starts torchrun.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_ranks(fn: Callable[..., None], args: tuple = (), nprocs: int = 2) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` with forked ranks (no re-import); a rank's
    exception is raised here as spawn raises it."""
    import torch.multiprocessing as mp

    mp.start_processes(_one_thread, args=(fn, args), nprocs=nprocs, join=True, start_method="fork")


def _one_thread(rank: int, fn: Callable[..., None], args: tuple) -> None:
    import torch

    torch.set_num_threads(1)  # (OMP_NUM_THREADS=1 of a launched rank; a fork keeps the parent's threads otherwise)
    fn(rank, *args)


def _cli_rank(argv: list[str], cwd: Path, env: dict[str, str], out: str, err: str) -> int:
    """In the forked child: the rank's environment, folder and output files, then ``sdadapt``'s ``main``."""
    import torch

    from sdadapt.cli import main

    os.chdir(cwd)
    os.environ.update(env)
    torch.set_num_threads(1)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    try:
        return int(main(argv) or 0)
    except SystemExit as exc:  # (as ``python -m sdadapt``: sys.exit(main()))
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


def cli_ranks(argv: list[str], cwd: Path, world: int = 2, *, other_cwd: Path | None = None,
              timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """``python -m sdadapt *argv`` in ``world`` ranks with the variables torchrun sets (gloo on the CPU), each
    a fork of this process; ranks > 0 in ``other_cwd`` when given. Each rank's exit code, stdout and stderr."""
    port = str(free_port())
    folder = tempfile.mkdtemp(prefix="sdadapt-ranks-")  # (outside cwd: the tests list what the ranks wrote there)
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(world):
        env = {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        out, err = f"{folder}/{rank}.out", f"{folder}/{rank}.err"
        pid = os.fork()
        if pid == 0:  # the rank: never returns into the test process
            code = 1
            try:
                code = _cli_rank(argv, other_cwd if rank and other_cwd else cwd, env, out, err)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < world:
        for rank, pid in enumerate(pids):
            if rank not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[rank] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for rank, pid in enumerate(pids):
                if rank not in codes:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    codes[rank] = -9
        time.sleep(0.05)
    done = [subprocess.CompletedProcess(["sdadapt", *argv], codes[rank], Path(f"{folder}/{rank}.out").read_text(),
                                        Path(f"{folder}/{rank}.err").read_text()) for rank in range(world)]
    for rank in range(world):
        for kind in ("out", "err"):
            os.unlink(f"{folder}/{rank}.{kind}")
    os.rmdir(folder)
    return done


def logging_writes(real: Callable, log: Path) -> Callable:
    """``real`` (a file writer ``real(path, ...)``) wrapped so that every write first appends ``[rank, file name]``
    to ``log`` (one JSON line, O_APPEND: whole lines from every rank); ``RANK`` -1 outside a rank."""
    import json

    def write(path, *args, **kwargs):
        with open(log, "a") as handle:
            handle.write(json.dumps([int(os.environ.get("RANK", "-1")), Path(path).name]) + "\n")
        return real(path, *args, **kwargs)

    return write


def logged_writes(log: Path) -> list[tuple[int, str]]:
    """The ``(rank, file name)`` of every write :func:`logging_writes` logged to ``log`` (``[]``: none)."""
    import json

    return [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []


def kohya_owner(i: int, num_processes: int) -> int:
    """Transcription of kohya's split of its cache files: process ``process_index`` skips item ``i`` unless
    ``i % num_processes == process_index`` (sd-scripts@48d368fa library/train_util.py:1182-1185
    ``new_cache_latents``, 1326-1327 ``new_cache_text_encoder_outputs``)."""
    return i % num_processes
