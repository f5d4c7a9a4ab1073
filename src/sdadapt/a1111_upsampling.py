"""A1111's UNet at latent sides its halvings do not divide: each upsampler's output resized to its skip's size
*after* the upsampler's convolution (A1111's ``TorchHijackForUnet``), not before it as diffusers' UNet does.

At a size such as 520 x 776 (latents 65 x 97) SD's UNet halves unevenly (65 → 33 → 17 → 9), so on the way up each
upsampler's output must be brought to its skip's odd size before the two are concatenated:

* diffusers (and ComfyUI, Forge, SD.Next) pass the skip's size to the upsampler (``Upsample2D(h, output_size)``):
  ``conv(nearest(h, size=skip))``;
* A1111 runs LDM's ``Upsample`` as it is — ``conv(nearest(h, scale_factor=2))``, one row / column too many — and its
  ``TorchHijackForUnet.cat`` (``modules/sd_hijack_unet.py``, installed as LDM's and SGM's ``openaimodel.th``) resizes
  that to the skip's size by nearest when the shapes differ: ``nearest(conv(nearest(h, scale_factor=2)), size=skip)``.

The two differ at the last row and column of each uneven level, and through them the whole image a little.
:class:`A1111Upsampling` gives a diffusers UNet A1111's order with hooks on its ``Upsample2D`` modules: the
``output_size`` taken out of the call and the output resized to it afterwards. Nothing is rebound, no key changes,
and at sides the halvings divide nothing changes at all (the doubled size is the skip's).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .module_hooks import ModuleHooks

__all__ = ["A1111Upsampling"]


class A1111Upsampling(ModuleHooks):
    """A1111's order of upsample, convolution and resize on ``unet`` (module docstring): a forward pre-hook on each
    diffusers ``Upsample2D`` that interpolates (not a transposed convolution) drops the ``output_size`` argument
    (so it doubles ``(B, C, h, w) → (B, C, 2h, 2w)``), and a forward hook resizes its output by nearest to that size
    when they differ. :meth:`remove` (or leaving a ``with`` block) takes the hooks off.

    Raises:
        ValueError: ``unet`` has no such upsampler (not a diffusers UNet).
    """

    def __init__(self, unet: nn.Module) -> None:
        self._handles = []
        self._sizes: dict[int, tuple[int, int] | None] = {}
        upsamplers = [module for module in unet.modules() if type(module).__name__ == "Upsample2D"
                      and getattr(module, "interpolate", True) and not getattr(module, "use_conv_transpose", False)]
        if not upsamplers:
            raise ValueError(f"{type(unet).__name__} has no diffusers Upsample2D that interpolates: A1111's upsampling "
                             "order applies to SD's UNets (diffusers' UNet2DConditionModel)")
        for module in upsamplers:
            self._handles.append(module.register_forward_pre_hook(self._doubling, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._resized))
        #: the number of upsamplers hooked
        self.upsamplers = len(upsamplers)

    def _doubling(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call without its ``output_size`` (positional, as diffusers' blocks pass it, or by keyword), kept."""
        size = kwargs.pop("output_size", None)
        if len(args) > 1:
            size, args = args[1], (args[0], None, *args[2:])
        self._sizes[id(module)] = None if size is None else (int(size[0]), int(size[1]))
        return args, kwargs

    def _resized(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """The doubled, convolved output (B, C, 2h, 2w) resized by nearest to the kept size where that differs —
        A1111's ``cat`` against the skip."""
        size = self._sizes.pop(id(module), None)
        if size is None or tuple(output.shape[-2:]) == size:
            return output
        return F.interpolate(output, size, mode="nearest")
