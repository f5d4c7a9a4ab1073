"""One down-projection for LoRA adapters whose base layers read the same input (q/k/v).

In every attention block ``to_q``, ``to_k`` and ``to_v`` read the same ``hidden_states`` tensor
(self-attention), and in cross-attention ``to_k``/``to_v`` both read the text context. Each LoRA
on them runs its own down-projection ``x @ downᵢᵀ``. Grouped, the first member called on ``x``
computes all of them in one matmul and every member takes its slice::

    z = x @ cat(down_1, ..., down_n)ᵀ                          (..., Σ rᵢ)   one matmul instead of n
    z_1, ..., z_n = split(z, (r_1, ..., r_n))                  views; one cat in backward
    Δyᵢ = zᵢ @ (scaleᵢ · upᵢ)ᵀ                                  (..., outᵢ)   as the unbatched path

Counted with ``torch.profiler`` (aten ops called from Python or autograd, views left out; about
one kernel each on a GPU) for one q/k/v with rank-16 LoRAs, base layers included: self-attention
15 → 13 forward and 51 → 42 forward+backward (matmuls 24 → 18), cross-attention (k/v share) 51 → 48;
a whole SD1.5 UNet step with LoRA on attention 2789 → 2597 (``benchmarks/lora_overhead.py``).

The output and the gradients of ``down``, ``up`` and ``x`` equal the unbatched path's up to
rounding (the matmul sums in its own order): float32 to ~1e-6, bf16 to its precision.
Nothing is rebound and no key changes: the member adapters keep their parameters and their
hooks; each hook asks its group for its slice (``AdapterModule._shared_input``) and falls back
to the unbatched path whenever the group cannot serve it:

* a member whose slice is waiting is called on another tensor (cross-attention ``to_q``), or is
  not called at all before the parent module's forward returns: the group splits into the
  members served from the first tensor and the rest (it learns once; the first call computed a
  slice for nothing, so a member never called gets a zero gradient that one step, not ``None``;
  learned in a forward that records a graph, the split takes effect when its backward is over, so
  gradient checkpointing recomputes that forward on the same path; a call that raises learns nothing);
* a member called again on the same tensor (its slice was taken): its own path for that call;
* the input was changed in place between calls (its version counter moved): a fresh projection;
* training-time dropout, rank dropout or module dropout, a merged or disabled member, members of
  different dtypes or devices, or tracing by ``torch.compile`` (Inductor fuses the graph itself).
  A traced call touches none of the group's bookkeeping (no counter, no weak reference, no
  partition change), so the compiled model is one graph that never recompiles for it; its calls
  are not counted in :meth:`SharedInputBatching.stats`.

Slices wait only until the last member took its own, and never longer than the parent module's
forward (a forward hook on ``attn1``/``attn2`` drops any left) or the input tensor (the group
holds only a weak reference to it, whose callback drops them), so no activation outlives the
attention call that made it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .base import adapter_input
from .lora import LoRAModule
from .weight_casts import cast_scaled_weight, cast_weight

__all__ = [
    "SHARED_INPUT_SIBLINGS",
    "SharedInputGroup",
    "SharedInputBatching",
    "batch_shared_input_adapters",
]

#: child names of one module whose layers usually read the same input; the first is the query,
#: which reads the other tensor in cross-attention (diffusers/LDM ``to_q``, transformers ``q_proj``)
SHARED_INPUT_SIBLINGS: tuple[tuple[str, ...], ...] = (("to_q", "to_k", "to_v"), ("q_proj", "k_proj", "v_proj"))


@dataclass
class _Waiting:
    """Slices of one shared projection, by member index, until each member took its own (the
    record stays, without tensors, until the parent's call ends or the input dies)."""

    source: weakref.ref
    version: int | None
    parts: dict[int, Tensor]


def _version(x: Tensor) -> int | None:
    return None if x.is_inference() else x._version


def _tensors(output: object) -> list[Tensor]:
    """The tensors of a module's output: a tensor, or those in a tuple, list or dict (one level)."""
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [v for v in values if isinstance(v, Tensor)]


def _supports(adapter: object) -> bool:
    """Plain linear LoRA (no Tucker core, the stock ``forward``): what one shared matmul serves."""
    return (
        isinstance(adapter, LoRAModule)
        and type(adapter).forward is LoRAModule.forward
        and not adapter.geometry.is_conv
        and adapter.lora_mid is None
    )


class SharedInputGroup:
    """LoRA adapters on sibling layers that (usually) read the same input tensor.

    Members are partitioned into subsets believed to share an input; each subset's first member
    called on a tensor computes the subset's down-projections in one matmul. The partition only
    ever gets finer: when a member's slice waits on one tensor but the member is called on
    another, the subset splits into the members already served and the rest.

    Attributes:
        names: one label per member (``"<layer>:<adapter name>"``).
        served: member calls answered from a shared projection (including the one that made it).
        fallbacks: member calls that ran the unbatched path (a singleton subset, dropout, ...);
            calls traced by ``torch.compile`` are not counted (a counter read in a traced graph
            would be guarded on, and recompile it at every call).
        splits: how often the partition was refined (a split learned again by the calls before
            the backward that commits it counts again).
    """

    def __init__(self, members: Sequence[LoRAModule], names: Sequence[str], subsets: Iterable[Sequence[int]]) -> None:
        self.members = tuple(members)
        self.names = tuple(names)
        self._subset_of: list[tuple[int, ...]] = [()] * len(self.members)
        for subset in subsets:
            for index in subset:
                self._subset_of[index] = tuple(subset)
        # the partition each parent call starts from; what a call learns joins it at once when no
        # backward can recompute that call, else once its backward is over (see start_of_parent_call)
        self._committed = tuple(self._subset_of)
        self._waiting: dict[tuple[int, ...], _Waiting] = {}
        self.served = 0
        self.fallbacks = 0
        self.splits = 0

    @property
    def subsets(self) -> list[tuple[str, ...]]:
        """The current partition, as member names."""
        seen: list[tuple[int, ...]] = []
        for subset in self._subset_of:
            if subset not in seen:
                seen.append(subset)
        return [tuple(self.names[i] for i in subset) for subset in seen]

    @property
    def waiting(self) -> int:
        """Slices computed and not yet taken (0 between forwards)."""
        return sum(len(w.parts) for w in self._waiting.values())

    # ------------------------------------------------------------------ the hook's entry
    def adapted_output(self, index: int, x: Tensor, output: Tensor) -> Tensor | None:
        """``output + Δy`` (..., out) of member ``index`` for its base layer's input ``x`` (..., in)
        and output ``output``, or ``None``: the member runs its own (unbatched) path this call."""
        if torch.compiler.is_compiling():  # the unbatched path, with no Python state read or written
            return None
        subset = self._subset_of[index]
        if len(subset) < 2 or not self._usable(self.members[index]):
            self.fallbacks += 1
            return None
        waiting = self._waiting.get(subset)
        if waiting is not None:
            source = waiting.source()
            if source is x and waiting.version == _version(x):
                part = waiting.parts.pop(index, None)
                if part is None:  # called again on the same tensor: its slice was taken
                    self.fallbacks += 1
                    return None
                self.served += 1
                return self._up(index, part, output)
            del self._waiting[subset]
            if index in waiting.parts and source is not None and source is not x:
                # this member's slice waited on another tensor: it does not share that input
                rest = tuple(i for i in subset if i in waiting.parts)
                self._split(tuple(i for i in subset if i not in waiting.parts), rest)
                subset = rest
                if len(subset) < 2:
                    self.fallbacks += 1
                    return None
        parts = self._down(subset, x)
        if parts is None:
            self.fallbacks += 1
            return None
        part = parts.pop(index)
        # kept after the last slice is taken (weakly, without tensors) to tell a repeated call
        self._waiting[subset] = _Waiting(weakref.ref(x, self._forget), _version(x), parts)
        self.served += 1
        return self._up(index, part, output)

    # ------------------------------------------------------------------ the math
    def _down(self, subset: tuple[int, ...], x: Tensor) -> dict[int, Tensor] | None:
        """``{member: (..., rᵢ) slice}`` of one matmul over the subset's usable members."""
        active = [i for i in subset if self._usable(self.members[i])]
        if len(active) < 2:
            return None
        downs = [self.members[i].lora_down for i in active]
        dtype, device = downs[0].dtype, downs[0].device
        if any(d.dtype != dtype or d.device != device for d in downs):
            return None
        x = adapter_input(x, dtype, cast_by_autocast=LoRAModule.input_cast_by_autocast)  # (as the unbatched hook)
        z = F.linear(x, torch.cat([cast_weight(d) for d in downs]))  # (..., Σr) = x downᵢᵀ side by side
        return dict(zip(active, z.split([d.shape[0] for d in downs], dim=-1)))

    def _up(self, index: int, part: Tensor, output: Tensor) -> Tensor:
        """``output + part @ (scale · up)ᵀ`` (..., out), as the unbatched hook adds Δy (the same scaled
        factor: cast with the others when the step batches them). (An ``addmm`` would not save a
        launch: it copies ``output`` into its result first, on CPU and CUDA alike.)"""
        member = self.members[index]
        return output + F.linear(part, cast_scaled_weight(member.lora_up, member.scale)).to(output.dtype)

    @staticmethod
    def _usable(member: LoRAModule) -> bool:
        if member.merged or not member.enabled:
            return False
        return not (member.training and (member.dropout > 0 or member.rank_dropout > 0 or member.module_dropout > 0))

    def _forget(self, source: weakref.ref) -> None:
        """Weak-reference callback: the input died, its waiting slices go with it."""
        for subset, waiting in list(self._waiting.items()):
            if waiting.source is source:
                del self._waiting[subset]

    def start_of_parent_call(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the members' parent: the call starts from the committed partition.

        A call that learns a split (below) runs another path than the calls after it. Gradient
        checkpointing (non-reentrant) recomputes a call in backward and refuses a path that differs
        from the original's, so what a call recording a graph learned is committed only when that
        backward is over; until then every call — a recomputation, another forward before the
        backward — starts from the partition the learning call started from and learns the same."""
        if not torch.compiler.is_compiling() and tuple(self._subset_of) != self._committed:
            self._subset_of = list(self._committed)

    def end_of_parent_call(self, module: nn.Module, args: tuple, output: object) -> None:
        """Forward hook of the members' parent (``attn1``): drop what waits, so nothing computed
        in one attention call outlives it. A member whose slice was never taken does not read
        that input: it leaves the subset of the members that did — unless the call ended by an
        exception (``output`` is ``None``: an out-of-memory error, an interrupt, checkpointing
        stopping its recomputation early), which says nothing about who reads what."""
        if output is None:
            self._waiting.clear()
            return
        for subset, waiting in list(self._waiting.items()):  # (a weak-reference callback may drop one meanwhile)
            rest = tuple(i for i in subset if i in waiting.parts)
            served = tuple(i for i in subset if i not in waiting.parts)
            if served and rest:
                self._split(served, rest)
        self._waiting.clear()
        learned = tuple(self._subset_of)
        if learned == self._committed or torch.compiler.is_compiling():
            return
        if torch._C._current_graph_task_id() != -1:  # a recomputation inside backward: the original call commits
            return
        recorded = [t for t in _tensors(output) if t.requires_grad]
        if not recorded:
            self._committed = learned
            return

        def commit_after_backward(grad: Tensor) -> None:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._commit(learned))

        for tensor in recorded:
            tensor.register_hook(commit_after_backward)

    def _commit(self, learned: tuple[tuple[int, ...], ...]) -> None:
        if self._committed != learned:
            self._committed = learned
            self._subset_of = list(learned)

    def _split(self, *subsets: tuple[int, ...]) -> None:
        for subset in subsets:
            for i in subset:
                self._subset_of[i] = subset
        self.splits += 1

    def clear(self) -> None:
        """Drop waiting slices (``remove()`` does this)."""
        self._waiting.clear()


class SharedInputBatching:
    """What :func:`batch_shared_input_adapters` grouped; :meth:`remove` restores the per-adapter path."""

    def __init__(self, groups: list[SharedInputGroup], hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
        self.groups = groups
        self._hooks = hooks
        self._removed = False

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[SharedInputGroup]:
        return iter(self.groups)

    def __repr__(self) -> str:
        members = sum(len(g.members) for g in self.groups)
        return f"SharedInputBatching(groups={len(self.groups)}, members={members}, removed={self._removed})"

    def stats(self) -> dict[str, int]:
        """Totals over the groups: ``served``, ``fallbacks``, ``splits`` and ``waiting`` slices."""
        return {
            "served": sum(g.served for g in self.groups),
            "fallbacks": sum(g.fallbacks for g in self.groups),
            "splits": sum(g.splits for g in self.groups),
            "waiting": sum(g.waiting for g in self.groups),
        }

    def remove(self) -> None:
        """Ungroup: every member runs its own down-projection again; idempotent."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        for group in self.groups:
            group.clear()
            for member in group.members:
                if member._shared_input is not None and member._shared_input[0] is group:
                    member._shared_input = None
        self._removed = True


def _adapted_layers(target: nn.Module | object) -> tuple[nn.Module, dict[str, dict[str, nn.Module]]]:
    """(model, {layer name: {adapter name: adapter}}) from an AdapterHandle or a model."""
    if isinstance(target, nn.Module):
        layers: dict[str, dict[str, nn.Module]] = {}
        for name, module in target.named_modules():
            slot = module._modules.get("sdadapt")
            if isinstance(slot, nn.ModuleDict):
                layers[name] = dict(slot.items())
        return target, layers
    model, modules = getattr(target, "model", None), getattr(target, "modules", None)
    if not isinstance(model, nn.Module) or not isinstance(modules, dict):
        raise TypeError(
            f"batch_shared_input_adapters takes an AdapterHandle (from sdadapt.inject / load_adapter) or the "
            f"nn.Module holding the adapters, not {type(target).__name__}"
        )
    return model, {layer: {target.name: module} for layer, module in modules.items()}  # type: ignore[attr-defined]


def batch_shared_input_adapters(
    target: nn.Module | object,
    *,
    siblings: Sequence[Sequence[str]] = SHARED_INPUT_SIBLINGS,
) -> SharedInputBatching:
    """Group the LoRA adapters of sibling layers that read one input, so each group runs one
    down-projection matmul per input instead of one per adapter (exact; see the module docstring).

    Groups are the LoRA adapters on the children ``siblings`` names of one module (``attn1.to_q``,
    ``attn1.to_k``, ``attn1.to_v``; several adapter names on one layer join the same group) with
    the same ``in_features``. The first name of each sibling tuple is the query: it starts in its
    own subset when the parent says it is cross-attention (diffusers ``is_cross_attention``);
    otherwise the group learns it at the first forward (it splits when a member is called on
    another tensor than the one its slice waits on). Conv, Tucker and non-LoRA adapters are left
    as they are.

    Args:
        target: an :class:`~sdadapt.inject.AdapterHandle` (its adapters only) or a model (every
            LoRA adapter injected in it).
        siblings: tuples of child names that may read one input, the query first.

    Returns:
        A :class:`SharedInputBatching`; ``remove()`` restores the per-adapter path (adapters,
        hooks, ``state_dict()`` keys and files are never changed).

    Raises:
        InputError: (a ValueError) an adapter is already in another batching (``remove()`` that
            one first).
        TypeError: ``target`` is neither a handle nor a module.

    Example::

        handle = sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=16))
        batching = sdadapt.batch_shared_input_adapters(handle)
        ...train...
        batching.remove()
    """
    model, layers = _adapted_layers(target)
    groups: list[SharedInputGroup] = []
    planned: list[tuple[nn.Module, list[LoRAModule], list[str], list[list[int]]]] = []
    for parent_name, parent in model.named_modules():
        for names in siblings:
            members: list[LoRAModule] = []
            labels: list[str] = []
            keys: list[tuple[bool, int]] = []  # (is the query of a cross-attention, in_features)
            cross = bool(getattr(parent, "is_cross_attention", False))
            for position, child in enumerate(names):
                if child not in parent._modules:
                    continue
                layer_name = f"{parent_name}.{child}" if parent_name else child
                for adapter_name, adapter in layers.get(layer_name, {}).items():
                    if not _supports(adapter):
                        continue
                    if adapter._shared_input is not None:
                        raise InputError(
                            f"{layer_name}: adapter {adapter_name!r} is already batched with its siblings; "
                            "remove() the other SharedInputBatching first"
                        )
                    members.append(adapter)  # type: ignore[arg-type]
                    labels.append(f"{layer_name}:{adapter_name}")
                    keys.append((cross and position == 0, adapter.geometry.in_features))
            subsets: dict[tuple[bool, int], list[int]] = {}
            for index, key in enumerate(keys):
                subsets.setdefault(key, []).append(index)
            if any(len(s) > 1 for s in subsets.values()):
                planned.append((parent, members, labels, list(subsets.values())))
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    for parent, members, labels, subsets in planned:
        keep = [i for s in subsets if len(s) > 1 for i in s]
        renumber = {old: new for new, old in enumerate(keep)}
        group = SharedInputGroup(
            [members[i] for i in keep], [labels[i] for i in keep],
            [[renumber[i] for i in s] for s in subsets if len(s) > 1],
        )
        for index, member in enumerate(group.members):
            member._shared_input = (group, index)
        groups.append(group)
        hooks.append(parent.register_forward_pre_hook(group.start_of_parent_call))
        hooks.append(parent.register_forward_hook(group.end_of_parent_call, always_call=True))
    return SharedInputBatching(groups, hooks)
