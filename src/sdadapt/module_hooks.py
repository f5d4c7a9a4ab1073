"""What the run-time changes that hook a user's UNet share (:class:`sdadapt.freeu.FreeU`,
:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`,
:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance`, :class:`sdadapt.token_merging.TokenMerging`,
:class:`sdadapt.hypertile.Hypertile`): torch hook handles, taken off by :meth:`ModuleHooks.remove` or by leaving a
``with`` block — nothing rebound, no key changed."""

from __future__ import annotations

from torch.utils.hooks import RemovableHandle

__all__ = ["ModuleHooks"]


class ModuleHooks:
    """A holder of hooks on someone's modules: a subclass appends each handle to :attr:`_handles`."""

    _handles: list[RemovableHandle]

    def remove(self) -> None:
        """Take every hook off (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ModuleHooks:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
