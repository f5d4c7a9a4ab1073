"""Shared pieces of the benchmarks: peak-memory measurement on CPU and CUDA, device sync."""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import threading
import time
from pathlib import Path

import torch

__all__ = ["UNET_CONFIGS", "VAE_CONFIGS", "CLIP_CONFIGS", "RssSampler", "environment", "glibc_return_freed_memory",
           "median_times", "sd15_layout_unet", "unet_call_args",
           "malloc_trim", "sync", "write_result"]


# diffusers UNet2DConditionModel configs (random weights): a tiny one and the public SD1.5 / SDXL ones
UNET_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    ),
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        center_input_sample=False,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    ),
}

# diffusers AutoencoderKL configs: tiny, and the SD/SDXL VAE (same architecture)
VAE_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
    ),
    "sd": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    ),
}

# transformers CLIPTextConfig kwargs: tiny, OpenAI CLIP-L (SD1.5, SDXL te1) and OpenCLIP-bigG (SDXL te2)
CLIP_CONFIGS: dict[str, dict] = {
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, projection_dim=64),
    "clip-l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    "clip-bigg": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"),
}

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RssSampler:
    """Peak RSS (bytes) of this process while active, sampled by a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        try:
            import psutil

            self._process = psutil.Process()
            self.method = "psutil RSS sampling thread (0.5 ms)"
        except ImportError:  # pragma: no cover - psutil is optional
            self._process = None
            self.method = "resource.getrusage ru_maxrss (process-lifetime max; growth beyond earlier peaks only)"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        if self._process is not None:
            return self._process.memory_info().rss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> "RssSampler":
        self.peak = self.rss()
        self._stop.clear()
        if self._process is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())


def sd15_layout_unet(channels, latent: int):
    """A random diffusers ``UNet2DConditionModel`` in SD1.5's block layout (its modules, parameter tensors and torch
    calls one for one) with ``channels`` (4 block widths) and ``sample_size`` ``latent``: small enough that a step's
    host work shows on a CPU."""
    import diffusers

    return diffusers.UNet2DConditionModel(**{**UNET_CONFIGS["sd15"], "block_out_channels": tuple(channels),
                                             "sample_size": latent})


def unet_call_args(doc: str, *, extra=None) -> tuple[argparse.Namespace, torch.device]:
    """The command line of a benchmark that times UNet calls at one image size (``doc``: its module docstring, whose
    first line describes it): ``--device`` (cpu), ``--side`` (512 px), ``--steps`` (3), ``--warmup`` (1), ``--out``,
    and what ``extra(parser)`` adds; ``(args, device)``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    return args, torch.device(args.device)


def median_times(variants: dict, *, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each ``variants`` callable over ``steps`` runs after ``warmup``, interleaved (every round runs
    them all, every other round in reverse order, so drift hits each alike), under ``torch.no_grad()``."""
    import statistics

    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for step in range(warmup + steps):
        for name in (order if step % 2 == 0 else order[::-1]):
            with torch.no_grad():
                sync(device)
                start = time.perf_counter()
                variants[name]()
                sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def glibc_return_freed_memory() -> bool:
    """Make big allocations mmap-backed (returned to the OS on free) so RSS follows live memory."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def malloc_trim() -> None:
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def environment() -> dict:
    """Where a result was measured: torch's CPU threads, the torch and Python versions, the processor."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine()}


def write_result(out: str | Path, result: dict) -> Path:
    """Write a benchmark's ``result`` as indented JSON to ``out`` (its folder made when missing)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out
