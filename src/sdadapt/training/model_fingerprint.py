"""A cheap fingerprint of a model's weights, for cache files that must name what produced them.

The text-encoder output files (:mod:`sdadapt.training.kohya_text_files`) and the latent files
(:mod:`sdadapt.training.kohya_latent_files`) are kept beside the images across runs; a file made by another
model (another SDXL checkpoint or fine-tune, another ``--vae``) must not be trained on. Hashing every weight
(SDXL's two text encoders: about 817M parameters, 3.3 GB in float32) at each run would cost seconds; this
hashes a fixed, deterministic sample instead: for each tensor of the module's ``state_dict`` (in name order),
its name, shape and dtype and the values at ``samples`` evenly spaced flat positions (the first and the last
included). It is computed in one pass over the tensors (the sampled values gathered on the module's device,
one copy to the host), so its cost grows with the number of tensors, not with their size. Measured on a CPU
(2 cores): SDXL's two text encoders (713 tensors, 818M values) 17-21 ms; SDXL's VAE encoder (108 tensors)
2-3 ms; the tiny test encoders (73 tensors) 2 ms.

What it sees: another architecture or vocabulary (a name or shape), another dtype (an fp16 and an fp32 copy
give other outputs), and any change of a sampled value — a fine-tune, a merged LoRA or another checkpoint
changes practically every element of the tensors it touches. What it does not see: a change only at
unsampled positions (one token's embedding row retrained, a single weight edited by hand); delete the files
then.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SAMPLES_PER_TENSOR", "array_digest", "module_fingerprint", "sample_positions"]

#: values hashed per tensor (fewer when a tensor has fewer elements)
SAMPLES_PER_TENSOR = 8


def sample_positions(numel: int, *, samples: int = SAMPLES_PER_TENSOR) -> list[int]:
    """The flat positions hashed of a tensor of ``numel`` elements: ``samples`` evenly spaced ones,
    ``round(i * (numel - 1) / (samples - 1))`` for ``i < samples`` (each once; all of a smaller tensor)."""
    if numel <= samples:
        return list(range(numel))
    return sorted({round(i * (numel - 1) / (samples - 1)) for i in range(samples)})


def module_fingerprint(*modules: nn.Module | None, samples: int = SAMPLES_PER_TENSOR) -> str:
    """A hex digest (sha256, 20 characters) of ``modules`` (``None`` entries hashed as such): each one's
    ``state_dict`` tensors' names, shapes, dtypes and values at :func:`sample_positions` (cast to float64 on
    the host; exact for float16 / bfloat16 / float32 weights). The same weights give the same digest in any
    process, on any device; see the module's docstring for what a sample misses.

    Raises:
        ValueError: a tensor has no data (``meta`` device: the model is not loaded yet).
    """
    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        digest.update(f"module {index}\n".encode())
        if module is None:
            digest.update(b"none\n")
            continue
        gathered: list[Tensor] = []
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.is_meta:
                raise ValueError(f"module_fingerprint: {type(module).__name__}'s {name} has no data (meta device): "
                                 "load the model's weights first")
            digest.update(f"{name} {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}\n".encode())
            positions = sample_positions(tensor.numel(), samples=samples)
            if positions:
                flat = tensor.detach().reshape(-1)
                index_tensor = torch.tensor(positions, device=flat.device)
                gathered.append(flat[index_tensor].to(torch.float32 if flat.device.type == "mps" else torch.float64))
        if gathered:  # (one copy to the host: no sync per tensor on an accelerator)
            values = torch.cat(gathered).cpu().to(torch.float64)
            digest.update(np.ascontiguousarray(values.numpy()).tobytes())
    return digest.hexdigest()[:20]


def array_digest(values: np.ndarray) -> str:
    """The records' digest of an array (any shape; its dtype as given): sha256 of its C-order bytes, 20 hex digits
    (a latent file's ``latents``, the token ids of a probe caption)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:20]
