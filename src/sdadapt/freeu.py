"""FreeU (Si et al. 2024, "FreeU: Free Lunch in Diffusion U-Net"): at each skip connection of the UNet's decoder the
backbone features are amplified and the skip features' lowest frequencies damped, for detail at no cost::

    h[:, :C/2] ← h[:, :C/2] · b          skip ← IFFT(FFT(skip) · mask_s)        (then cat([h, skip]) as ever)

``mask_s`` is ``s`` on the 2×2 lowest frequencies (``threshold`` 1 around the shifted centre) and 1 elsewhere
(:func:`fourier_filter`). Two versions, both run by :class:`FreeU` with forward pre-hooks on the decoder's ResNets,
whose input is that concatenation (split where the backbone's channels end):

- ``"v2"``: ComfyUI's FreeU_V2, which Forge's built-in "FreeU Integrated" runs (``patch_freeu_v2``): applied where the
  backbone has ``4·c`` channels (``b1``, ``s1``) or ``2·c`` (``b2``, ``s2``), ``c`` the UNet's first width, the
  backbone's scale ``1 + (b − 1)·m`` with ``m`` its channel mean normalised to [0, 1] per image;
- ``"diffusers"``: diffusers' ``UNet2DConditionModel.enable_freeu`` (``apply_freeu``): every skip of the decoder's
  first block (``b1``, ``s1``) and second (``b2``, ``s2``), the backbone times ``b``; off altogether when any of the
  four is 0 (its ``is_freeu_enabled``).

Newer Forge runs it on part of a pass only: its ``freeu_start`` / ``freeu_end`` window, FreeU on a model call whose
A1111 ``sampling_step / (steps − 1)`` lies in ``[start, end]`` (its ``denoiser_callback`` on ``on_cfg_denoiser``;
``steps``: the pass's ``launch_sampling`` steps) — :meth:`FreeU.at_step`, driven per call by :class:`FreeUSteps`
(:mod:`sdadapt.a1111_sampling_step`).

Nothing is rebound or re-classed and no key changes; :meth:`FreeU.remove` takes the hooks off.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .module_hooks import ModuleHooks

__all__ = ["FREEU_DEFAULTS", "FREEU_FIELDS", "FREEU_VERSIONS", "FREEU_VERSION_FIELD", "FREEU_WINDOW_FIELDS", "FreeU",
           "FreeUSteps", "fourier_filter"]

#: the versions :class:`FreeU` runs (module docstring)
FREEU_VERSIONS = ("v2", "diffusers")
#: Forge's defaults (b1, b2, s1, s2)
FREEU_DEFAULTS = (1.01, 1.02, 0.99, 0.95)
#: Forge's infotext keys: enabled, b1, b2, s1, s2
FREEU_FIELDS = ("freeu_enabled", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2")
#: newer Forge's step window (FreeU where ``sampling_step / (steps − 1)`` lies in [start, end]; its defaults 0 and 1: every
#: call; :meth:`FreeU.at_step`)
FREEU_WINDOW_FIELDS = ("freeu_start", "freeu_end")
#: sdadapt's key for the version when it is diffusers' (Forge's is v2; no tool writes one)
FREEU_VERSION_FIELD = "FreeU version"


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """``x`` (B, C, H, W) with its centred ``2·threshold`` square of lowest frequencies times ``scale``: FFT over (H, W)
    in float32, shifted, masked, shifted back, the real part in ``x``'s dtype (ComfyUI's ``Fourier_filter``,
    diffusers' ``fourier_filter``)."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    b, c, h, w = freq.shape
    mask = torch.ones((b, c, h, w), device=x.device)
    crow, ccol = h // 2, w // 2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def _backbone_v2(h: Tensor, b: float) -> Tensor:
    """FreeU_V2's backbone scaling (B, C, H, W): the first half of the channels times ``1 + (b − 1)·m``, ``m`` the
    channel mean normalised to [0, 1] per image."""
    mean = h.mean(1).unsqueeze(1)  # (B, 1, H, W)
    flat = mean.view(mean.shape[0], -1)
    low, high = flat.min(dim=-1, keepdim=True)[0], flat.max(dim=-1, keepdim=True)[0]
    mean = (mean - low[..., None, None]) / (high - low)[..., None, None]
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * ((b - 1) * mean + 1), h[:, half:]], dim=1)


def _out_channels(module: nn.Module) -> int:
    """The channels a ResNet block (diffusers' ``ResnetBlock2D``, the toy's) puts out: its ``conv2``'s."""
    return int(module.conv2.out_channels)


class FreeU(ModuleHooks):
    """FreeU on ``unet`` (diffusers' module names: ``up_blocks.N.resnets``, ``mid_block.resnets``, ``conv_in``; module
    docstring) with ``b1``, ``b2``, ``s1``, ``s2`` (Forge's defaults) in ``version`` (:data:`FREEU_VERSIONS`). Hooks
    installed at once; :meth:`remove` (or leaving the ``with`` block) takes them off. ``skips``: how many skip
    connections it changes. ``window``: Forge's ``(freeu_start, freeu_end)``, the part of a pass it runs on
    (:meth:`at_step`; ``(0, 1)``: every call); ``active``: whether the next call runs it.

    Raises:
        ValueError: an unknown version, a non-finite factor, a window outside [0, 1], or a ``unet`` without
            diffusers' decoder layout.
    """

    def __init__(self, unet: nn.Module, *, b1: float = FREEU_DEFAULTS[0], b2: float = FREEU_DEFAULTS[1],
                 s1: float = FREEU_DEFAULTS[2], s2: float = FREEU_DEFAULTS[3], version: str = "v2",
                 window: tuple[float, float] = (0.0, 1.0)) -> None:
        if version not in FREEU_VERSIONS:
            raise ValueError(f"FreeU version is one of {', '.join(FREEU_VERSIONS)} (v2: ComfyUI's / Forge's, "
                             f"diffusers: enable_freeu), got {version!r}")
        factors = tuple(float(v) for v in (b1, b2, s1, s2))
        if not all(math.isfinite(v) for v in factors):
            raise ValueError(f"FreeU's b1, b2, s1, s2 must be finite numbers, got {factors}")
        self.b1, self.b2, self.s1, self.s2 = factors
        self.version = version
        start, end = (float(v) for v in window)
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ValueError(f"FreeU's window is (start, end), fractions of a pass in [0, 1] (Forge's freeu_start / "
                             f"freeu_end), got {tuple(window)}")
        self.window, self.active = (start, end), True
        up_blocks, mid = getattr(unet, "up_blocks", None), getattr(unet, "mid_block", None)
        if not isinstance(up_blocks, nn.ModuleList) or mid is None or not hasattr(mid, "resnets") \
                or not hasattr(unet, "conv_in"):
            raise ValueError(f"FreeU changes the skip connections of a UNet with diffusers' layout (up_blocks.N.resnets, "
                             f"mid_block, conv_in); {type(unet).__name__} has none")
        width = int(unet.conv_in.out_channels)
        by_width = {4 * width: (self.b1, self.s1), 2 * width: (self.b2, self.s2)}
        by_block = {0: (self.b1, self.s1), 1: (self.b2, self.s2)}
        on = version == "v2" or all(factors)  # (diffusers' is_freeu_enabled: all four set)
        self._handles = []
        backbone = _out_channels(mid.resnets[-1])  # (the channels of h before each decoder ResNet)
        for index, block in enumerate(up_blocks):
            for resnet in block.resnets:
                scales = by_width.get(backbone) if version == "v2" else by_block.get(index)
                if scales is not None and on:
                    self._handles.append(resnet.register_forward_pre_hook(self._hook(backbone, *scales),
                                                                          with_kwargs=True))
                backbone = _out_channels(resnet)
        self.skips = len(self._handles)

    def _hook(self, backbone: int, b: float, s: float):
        v2 = self.version == "v2"

        def change(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not self.active:
                return None
            x = args[0] if args else kwargs["input_tensor"]
            h, skip = x[:, :backbone], x[:, backbone:]
            if v2:
                h = _backbone_v2(h, b)
            else:
                half = h.shape[1] // 2
                h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
            x = torch.cat([h, fourier_filter(skip, 1, s)], dim=1)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "input_tensor": x}

        return change

    def at_step(self, sampling_step: int, sampling_steps: int) -> None:
        """Forge's ``denoiser_callback`` before a model call: :attr:`active` when ``sampling_step / (sampling_steps −
        1)`` lies in :attr:`window` (``sampling_step``: A1111's ``state.sampling_step`` at the call; ``sampling_steps``:
        the pass's ``launch_sampling`` steps; a pass of one step reads 0, where Forge divides by zero)."""
        frac = sampling_step / (sampling_steps - 1) if sampling_steps > 1 else 0.0
        self.active = self.window[0] <= frac <= self.window[1]


class FreeUSteps:
    """A ``before_model_call`` (:func:`sdadapt.samplers.sample_latents`) that runs ``freeu`` on the model calls of
    its window only, as Forge does (:meth:`FreeU.at_step` at each call's A1111 ``sampling_step`` of ``sampler``,
    :func:`sdadapt.a1111_sampling_step.a1111_sampling_step`). ``sample_latents`` tells it the pass's steps
    (:meth:`launch`); :meth:`next_pass` names a hires pass's sampler, :meth:`release` goes back to the first's."""

    def __init__(self, freeu: FreeU, *, sampler: str) -> None:
        self.freeu, self.sampler, self.first_sampler, self.sampling_steps = freeu, sampler, sampler, 1

    def launch(self, sampling_steps: int) -> None:
        """A pass starts: A1111's ``launch_sampling(steps)`` (:func:`sdadapt.samplers.run_sampling_steps`)."""
        self.sampling_steps = int(sampling_steps)

    def next_pass(self, *, sampler: str | None = None) -> None:
        """The hires pass runs ``sampler`` (``None``: the same)."""
        if sampler is not None:
            self.sampler = sampler

    def release(self) -> None:
        """Back to the first pass's sampler (the next image), FreeU on."""
        self.sampler, self.freeu.active = self.first_sampler, True

    def __call__(self, steps_done: int, calls: int) -> None:
        from .a1111_sampling_step import a1111_sampling_step

        self.freeu.at_step(a1111_sampling_step(steps_done, calls, sampler=self.sampler), self.sampling_steps)
