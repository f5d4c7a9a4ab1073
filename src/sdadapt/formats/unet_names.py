"""Module paths of SD UNets in LDM ("compvis"/SAI) and diffusers naming, both ways, by rule.

The map is derived from the block structure, not listed: with ``L`` layers per block
(2 in SD1, SD2 and SDXL) ::

    input_blocks.{1 + i(L+1) + j}.0      <-> down_blocks.i.resnets.j          (j < L)
    input_blocks.{1 + i(L+1) + j}.1      <-> down_blocks.i.attentions.j
    input_blocks.{1 + i(L+1) + L}.0.op   <-> down_blocks.i.downsamplers.0.conv
    middle_block.0 / .1 / .2             <-> mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{i(L+1) + j}.0         <-> up_blocks.i.resnets.j            (j <= L)
    output_blocks.{i(L+1) + j}.1         <-> up_blocks.i.attentions.j
    output_blocks.{i(L+1) + L}.{1|2}.conv <-> up_blocks.i.upsamplers.0.conv   (2 when the block has attention)

plus the resnet internals (``in_layers.2`` = ``conv1`` ...), ``time_embed``, ``label_emb`` (SDXL)
and ``out``. Paths are module paths *inside* the UNet; a ``model.diffusion_model.`` prefix is the
caller's business.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ldm_to_diffusers_unet", "diffusers_to_ldm_unet", "attention_up_blocks", "is_ldm_unet_path"]

_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}

_TOP_LDM_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "input_blocks.0.0": "conv_in",
}
_TOP_DIFFUSERS_TO_LDM = {v: k for k, v in _TOP_LDM_TO_DIFFUSERS.items()}


def _rename_prefix(path: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def is_ldm_unet_path(path: str) -> bool:
    """True for paths that only LDM UNets have (``input_blocks.*``, ``middle_block.*`` ...)."""
    head = path.split(".", 1)[0]
    return head in {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}


def ldm_to_diffusers_unet(path: str, *, layers_per_block: int = 2) -> str | None:
    """Diffusers module path for an LDM UNet module path, or ``None`` if it is not a UNet path."""
    top = _rename_prefix(path, _TOP_LDM_TO_DIFFUSERS)
    if top is not None:
        return top
    parts = path.split(".")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    group = layers_per_block + 1
    block, n = parts[0], int(parts[1])
    if block == "middle_block":
        rest = ".".join(parts[2:])
        if n in (0, 2):
            inner = _rename_prefix(rest, _RESNET_LDM_TO_DIFFUSERS) if rest else ""
            return None if inner is None else _join(f"mid_block.resnets.{n // 2}", inner)
        return _join("mid_block.attentions.0", rest) if n == 1 else None
    if len(parts) < 3 or not parts[2].isdigit():
        return None
    k = int(parts[2])
    rest = ".".join(parts[3:])
    if block == "input_blocks" and n >= 1:
        i, j = divmod(n - 1, group)
        if j < layers_per_block and k == 0:
            inner = _rename_prefix(rest, _RESNET_LDM_TO_DIFFUSERS) if rest else ""
            return None if inner is None else _join(f"down_blocks.{i}.resnets.{j}", inner)
        if j < layers_per_block and k == 1:
            return _join(f"down_blocks.{i}.attentions.{j}", rest)
        if j == layers_per_block and k == 0 and (rest == "op" or rest.startswith("op.")):
            return _join(f"down_blocks.{i}.downsamplers.0.conv", rest[3:])
        return None
    if block == "output_blocks":
        i, j = divmod(n, group)
        if k == 0:
            inner = _rename_prefix(rest, _RESNET_LDM_TO_DIFFUSERS) if rest else ""
            return None if inner is None else _join(f"up_blocks.{i}.resnets.{j}", inner)
        if rest == "conv" or rest.startswith("conv."):
            return _join(f"up_blocks.{i}.upsamplers.0.conv", rest[5:]) if j == layers_per_block else None
        if k == 1:
            return _join(f"up_blocks.{i}.attentions.{j}", rest)
        return None
    return None


def attention_up_blocks(diffusers_paths: Iterable[str]) -> set[int]:
    """Indices ``i`` of ``up_blocks.i`` that have attention modules among ``diffusers_paths``."""
    found = set()
    for path in diffusers_paths:
        parts = path.split(".")
        if len(parts) > 2 and parts[0] == "up_blocks" and parts[1].isdigit() and parts[2] == "attentions":
            found.add(int(parts[1]))
    return found


def diffusers_to_ldm_unet(
    path: str, *, layers_per_block: int = 2, up_blocks_with_attention: set[int] | None = None
) -> str | None:
    """LDM module path for a diffusers UNet module path, or ``None`` if it is not a UNet path.

    ``up_blocks_with_attention`` decides whether an upsampler sits at ``.1.conv`` or ``.2.conv``;
    by default it is SD1's layout when the block index is > 0 (SD1: up blocks 1-3 have attention)
    — pass :func:`attention_up_blocks` of the model's paths for other layouts such as SDXL.
    """
    top = _rename_prefix(path, _TOP_DIFFUSERS_TO_LDM)
    if top is not None:
        return top
    parts = path.split(".")
    group = layers_per_block + 1
    if parts[0] == "mid_block" and len(parts) >= 3 and parts[2].isdigit():
        rest = ".".join(parts[3:])
        if parts[1] == "resnets":
            inner = _rename_prefix(rest, _RESNET_DIFFUSERS_TO_LDM) if rest else ""
            return None if inner is None else _join(f"middle_block.{2 * int(parts[2])}", inner)
        if parts[1] == "attentions":
            return _join("middle_block.1", rest)
        return None
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 4 or not (parts[1].isdigit() and parts[3].isdigit()):
        return None
    i, kind, j = int(parts[1]), parts[2], int(parts[3])
    rest = ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "resnets":
            inner = _rename_prefix(rest, _RESNET_DIFFUSERS_TO_LDM) if rest else ""
            return None if inner is None else _join(f"input_blocks.{1 + i * group + j}.0", inner)
        if kind == "attentions":
            return _join(f"input_blocks.{1 + i * group + j}.1", rest)
        if kind == "downsamplers" and (rest == "conv" or rest.startswith("conv.")):
            return _join(f"input_blocks.{1 + i * group + layers_per_block}.0.op", rest[5:])
        return None
    if kind == "resnets":
        inner = _rename_prefix(rest, _RESNET_DIFFUSERS_TO_LDM) if rest else ""
        return None if inner is None else _join(f"output_blocks.{i * group + j}.0", inner)
    if kind == "attentions":
        return _join(f"output_blocks.{i * group + j}.1", rest)
    if kind == "upsamplers" and (rest == "conv" or rest.startswith("conv.")):
        has_attention = (i > 0) if up_blocks_with_attention is None else (i in up_blocks_with_attention)
        return _join(f"output_blocks.{i * group + layers_per_block}.{2 if has_attention else 1}.conv", rest[5:])
    return None
