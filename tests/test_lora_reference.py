"""LoRA training semantics against kohya sd-scripts, transcribed here in float64.

Reference: kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb

* ``networks/lora.py:25-121`` ``LoRAModule``: ``lora_down`` Linear(in, r) / Conv2d(in, r, kernel,
  stride, padding), ``lora_up`` Linear(r, out) / Conv2d(r, out, 1x1); ``alpha`` None or 0 -> r,
  ``scale = alpha / r``; ``kaiming_uniform_(down, a=sqrt(5))``, ``zeros_(up)`` (:76-77).
  ``forward`` (:90-121): module dropout ``torch.rand(1) < p`` returns the base output (training
  only), then ``lx = lora_down(x)``, ``dropout`` on ``lx``, then rank dropout (mask (B, r) ``> p``,
  unsqueezed to (B, 1, r) / (B, r, 1, 1), ``scale * 1 / (1 - p)``), ``org + lora_up(lx) * multiplier * scale``.
* ``networks/lora.py:416-510`` ``create_network``, ``:515-715`` block dims/alphas and block lr weights,
  ``:719-755`` ``get_block_index``, ``:861-1060`` ``LoRANetwork.__init__`` / ``create_modules`` (targets:
  ``Transformer2DModel``; with conv dims also ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``; text
  encoder ``CLIPAttention``, ``CLIPSdpaAttention``, ``CLIPMLP``; every Linear / Conv2d child; 1x1 convs at
  the linear rank), ``:1148-1240`` ``prepare_optimizer_params`` (``assemble_params``: ``"lora_up" in name``
  -> the plus group at ``lr * ratio``; groups of lr 0 / None dropped).
* ``networks/lora.py:1369-1408`` ``apply_max_norm_regularization``, called in ``train_network.py:1462``
  after ``optimizer.step()`` (:1457).
"""

from __future__ import annotations

import math
import re
import types

import pytest
import torch
from torch import nn
from tiny_models import tiny_clip, tiny_unet_sd1

import sdadapt
from sdadapt.adapters.base import geometry_of
from sdadapt.adapters.lora import LoRAConfig, LoRAModule
from sdadapt.methods.lora import prepare_lora
from sdadapt.training.max_norm import scale_weight_norms_

D = torch.float64


# ------------------------------------------------------------------ transcriptions of kohya's code
class _KohyaLoRA(nn.Module):
    """networks/lora.py:25-121 (LoRAModule.__init__ and forward), float64."""

    def __init__(self, org: nn.Module, lora_dim: int, alpha, *, dropout=None, rank_dropout=None,
                 module_dropout=None, multiplier: float = 1.0) -> None:
        super().__init__()
        if org.__class__.__name__ == "Conv2d":
            self.lora_down = nn.Conv2d(org.in_channels, lora_dim, org.kernel_size, org.stride, org.padding,
                                       bias=False).to(D)
            self.lora_up = nn.Conv2d(lora_dim, org.out_channels, (1, 1), (1, 1), bias=False).to(D)
        else:
            self.lora_down = nn.Linear(org.in_features, lora_dim, bias=False).to(D)
            self.lora_up = nn.Linear(lora_dim, org.out_features, bias=False).to(D)
        self.lora_dim = lora_dim
        alpha = lora_dim if alpha is None or alpha == 0 else alpha
        self.scale = alpha / lora_dim
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        self.multiplier = multiplier
        self.org = org
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    def forward(self, x):
        org_forwarded = self.org(x)
        if self.module_dropout is not None and self.training:
            if torch.rand(1) < self.module_dropout:
                return org_forwarded
        lx = self.lora_down(x)
        if self.dropout is not None and self.training:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if len(lx.size()) == 3:
                mask = mask.unsqueeze(1)
            elif len(lx.size()) == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))
        else:
            scale = self.scale
        lx = self.lora_up(lx)
        return org_forwarded + lx * self.multiplier * scale


def _kohya_max_norm(state_dict: dict[str, torch.Tensor], max_norm_value: float):
    """networks/lora.py:1369-1408 (apply_max_norm_regularization), on a float64 state dict, in place."""
    downkeys, upkeys, alphakeys, norms = [], [], [], []
    keys_scaled = 0
    for key in state_dict.keys():
        if "lora_down" in key and "weight" in key:
            downkeys.append(key)
            upkeys.append(key.replace("lora_down", "lora_up"))
            alphakeys.append(key.replace("lora_down.weight", "alpha"))
    for i in range(len(downkeys)):
        down, up, alpha = state_dict[downkeys[i]], state_dict[upkeys[i]], state_dict[alphakeys[i]]
        dim = down.shape[0]
        scale = alpha / dim
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown *= scale
        norm = updown.norm().clamp(min=max_norm_value / 2)
        desired = torch.clamp(norm, max=max_norm_value)
        ratio = desired.cpu() / norm.cpu()
        sqrt_ratio = ratio**0.5
        if ratio != 1:
            keys_scaled += 1
            state_dict[upkeys[i]] *= sqrt_ratio
            state_dict[downkeys[i]] *= sqrt_ratio
        scalednorm = updown.norm() * ratio
        norms.append(scalednorm.item())
    return keys_scaled, sum(norms) / len(norms), max(norms)


_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def _kohya_block_index(lora_name: str) -> int:
    """networks/lora.py:719-738 (get_block_index, SD1/SD2)."""
    block_idx = -1
    m = _RE_UPDOWN.search(lora_name)
    if m:
        g = m.groups()
        i, j = int(g[1]), int(g[3])
        idx = 3 * i + 2 if g[2] in ("upsamplers", "downsamplers") else 3 * i + j
        block_idx = 1 + idx if g[0] == "down" else 12 + 1 + idx
    elif "mid_block_" in lora_name:
        block_idx = 12
    return block_idx


def _kohya_lr_list(value, n: int):
    """networks/lora.py:398-409 + 607-637: a comma list (empty item 0) or a preset name[+N]."""
    if value is None:
        return None
    if "," in value:
        return [(float(s) if s else 0.0) for s in value.split(",")]
    tokens = value.split("+")
    name, base_lr = tokens[0], (float(tokens[1]) if len(tokens) > 1 else 0.0)
    if name == "cosine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in reversed(range(n))]
    if name == "sine":
        return [math.sin(math.pi * (i / (n - 1)) / 2) + base_lr for i in range(n)]
    if name == "linear":
        return [i / (n - 1) + base_lr for i in range(n)]
    if name == "reverse_linear":
        return [i / (n - 1) + base_lr for i in reversed(range(n))]
    assert name == "zeros"
    return [0.0 + base_lr] * n


def _kohya_network(text_encoder, unet, network_dim: int, network_alpha: float, kwargs: dict[str, str]):
    """networks/lora.py:416-510 (create_network), 515-715 (block dims / lr weights), 945-1040 (create_modules),
    SD1/SD2 layout (25 blocks). Returns [(is_unet, lora_name, org module, dim, alpha)] and the block lr weights."""
    conv_dim, conv_alpha = kwargs.get("conv_dim"), kwargs.get("conv_alpha")
    if conv_dim is not None:
        conv_dim = int(conv_dim)
        conv_alpha = 1.0 if conv_alpha is None else float(conv_alpha)
    n_blocks = 25
    down_w, mid_w, up_w = (kwargs.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    lr_weight = None
    if down_w is not None or mid_w is not None or up_w is not None:
        threshold = float(kwargs.get("block_lr_zero_threshold", 0.0))
        down_l = _kohya_lr_list(down_w, 12)
        mid_l = [(float(s) if s else 0.0) for s in mid_w.split(",")] if mid_w is not None else None
        up_l = _kohya_lr_list(up_w, 12)
        parts = []
        for given, length in ((down_l, 12), (mid_l, 1), (up_l, 12)):
            if given is None:
                parts.append([1.0] * length)
            else:
                given = (given + [1.0] * (length - len(given)))[:length]
                parts.append([w if w > threshold else 0 for w in given])
        lr_weight = parts[0] + parts[1] + parts[2]
    block_dims = kwargs.get("block_dims")
    block_alphas = conv_block_dims = conv_block_alphas = None
    if block_dims is not None or lr_weight is not None:
        block_dims = [int(i) for i in block_dims.split(",")] if block_dims else [network_dim] * n_blocks
        block_alphas = ([float(i) for i in kwargs["block_alphas"].split(",")] if kwargs.get("block_alphas")
                        else [network_alpha] * n_blocks)
        if kwargs.get("conv_block_dims") is not None:
            conv_block_dims = [int(i) for i in kwargs["conv_block_dims"].split(",")]
            if kwargs.get("conv_block_alphas") is not None:
                conv_block_alphas = [float(i) for i in kwargs["conv_block_alphas"].split(",")]
            else:
                conv_block_alphas = [1.0 if conv_alpha is None else conv_alpha] * n_blocks
        elif conv_dim is not None:
            conv_block_dims, conv_block_alphas = [conv_dim] * n_blocks, [conv_alpha] * n_blocks
        if lr_weight is not None:  # remove_block_dims_and_alphas
            for i, lr in enumerate(lr_weight):
                if lr == 0:
                    block_dims[i] = 0
                    if conv_block_dims is not None:
                        conv_block_dims[i] = 0

    def create_modules(is_unet, root, targets):
        loras = []
        prefix = "lora_unet" if is_unet else "lora_te"
        for name, module in root.named_modules():
            if module.__class__.__name__ in targets:
                for child_name, child in module.named_modules():
                    is_linear = child.__class__.__name__ == "Linear"
                    is_conv2d = child.__class__.__name__ == "Conv2d"
                    is_conv2d_1x1 = is_conv2d and child.kernel_size == (1, 1)
                    if is_linear or is_conv2d:
                        lora_name = (prefix + "." + name + "." + child_name).replace(".", "_")
                        dim = alpha = None
                        if is_unet and block_dims is not None:
                            block_idx = _kohya_block_index(lora_name)
                            if is_linear or is_conv2d_1x1:
                                dim, alpha = block_dims[block_idx], block_alphas[block_idx]
                            elif conv_block_dims is not None:
                                dim, alpha = conv_block_dims[block_idx], conv_block_alphas[block_idx]
                        elif is_linear or is_conv2d_1x1:
                            dim, alpha = network_dim, network_alpha
                        elif conv_dim is not None:
                            dim, alpha = conv_dim, conv_alpha
                        if dim is None or dim == 0:
                            continue
                        loras.append((is_unet, lora_name, child, dim, alpha))
        return loras

    te = create_modules(False, text_encoder, ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"])
    targets = ["Transformer2DModel"]
    if conv_dim is not None or conv_block_dims is not None:
        targets = targets + ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
    return te + create_modules(True, unet, targets), lr_weight


def _kohya_param_lrs(loras, lr_weight, kwargs, *, text_encoder_lr, unet_lr, default_lr):
    """networks/lora.py:1139-1240 (set_loraplus_lr_ratio, prepare_optimizer_params): the learning rate of
    each (org module, "lora_down"/"lora_up") that gets into the optimiser."""
    def ratio_of(name):
        return float(kwargs[name]) if kwargs.get(name) is not None else None

    plus, plus_unet, plus_te = (ratio_of(n) for n in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                                      "loraplus_text_encoder_lr_ratio"))
    out = {}

    def assemble(group, lr, ratio):
        for _, _, org, _, _ in group:
            for name in ("lora_down", "lora_up"):
                key_lr = lr * ratio if (ratio is not None and "lora_up" in name and lr is not None) else lr
                if key_lr == 0 or key_lr is None:  # "NO LR skipping!"
                    continue
                out[(id(org), name)] = key_lr

    te = [lora for lora in loras if not lora[0]]
    unet = [lora for lora in loras if lora[0]]
    assemble(te, text_encoder_lr if text_encoder_lr is not None else default_lr, plus_te or plus)
    if lr_weight is not None:
        by_block: dict[int, list] = {}
        for lora in unet:
            by_block.setdefault(_kohya_block_index(lora[1]), []).append(lora)
        for idx, block in by_block.items():
            assemble(block, (unet_lr if unet_lr is not None else default_lr) * lr_weight[idx], plus_unet or plus)
    else:
        assemble(unet, unet_lr if unet_lr is not None else default_lr, plus_unet or plus)
    return out


# ------------------------------------------------------------------ one layer: init, forward, backward
def _layers():
    torch.manual_seed(0)
    return {
        "linear_2d": (nn.Linear(6, 5).to(D), (4, 6)),
        "linear_3d": (nn.Linear(6, 5).to(D), (4, 3, 6)),  # text encoder / SD2 proj_in: (B, T, in)
        "conv3x3": (nn.Conv2d(4, 6, 3, stride=2, padding=1).to(D), (4, 4, 7, 7)),
        "conv1x1": (nn.Conv2d(4, 6, 1).to(D), (4, 4, 5, 5)),
    }


@pytest.mark.parametrize("kind", ["linear_2d", "linear_3d", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("alpha", [None, 0, 1.5])
def test_init_shapes_and_scale_are_kohyas(kind, alpha):
    """kohya: down kaiming-uniform(a=√5) of shape (r, in[, kh, kw]) (bound 1/√fan_in), up zeros (out, r[, 1, 1]),
    scale alpha / r with alpha None or 0 -> r. sdadapt draws the same distribution (its own draw order)."""
    layer, _ = _layers()[kind]
    kohya = _KohyaLoRA(layer, 3, alpha)
    torch.manual_seed(7)
    ours = LoRAModule(geometry_of(layer), 3, alpha, dtype=D)
    torch.manual_seed(7)
    want_down = torch.empty_like(kohya.lora_down.weight)
    nn.init.kaiming_uniform_(want_down, a=math.sqrt(5))
    assert ours.lora_down.shape == kohya.lora_down.weight.shape
    assert ours.lora_up.shape == kohya.lora_up.weight.shape
    assert torch.equal(ours.lora_down.detach(), want_down)
    assert torch.count_nonzero(ours.lora_up) == 0
    fan_in = want_down[0].numel()
    assert float(ours.lora_down.detach().abs().max()) <= 1 / math.sqrt(fan_in)
    assert float(ours.scale) == kohya.scale
    assert float(ours.alpha) == (3 if alpha in (None, 0) else alpha)


@pytest.mark.parametrize("kind", ["linear_2d", "linear_3d", "conv3x3", "conv1x1"])
def test_training_forward_and_backward_with_every_dropout_match_kohya_draw_for_draw(kind):
    """Module dropout, (neuron) dropout on the rank activations and rank dropout at once, seeded: the
    same CPU draws in the same order (module dropout, dropout mask, rank mask), so each training call
    gives kohya's output and gradients (x, down, up) to float64 rounding; eval mode is the plain delta."""
    layer, shape = _layers()[kind]
    # (p_rank 0.5 and alpha / r = 0.5: the rescaled scale is exact in the float32 ``scale`` buffer too)
    p_module, p_drop, p_rank = 0.3, 0.25, 0.5
    kohya = _KohyaLoRA(layer, 3, 1.5, dropout=p_drop, rank_dropout=p_rank, module_dropout=p_module)
    with torch.no_grad():
        kohya.lora_up.weight.normal_()
    base = _layers()[kind][0]
    base.load_state_dict(layer.state_dict())
    handle = sdadapt.inject(nn.Sequential(base), "*", LoRAConfig(rank=3, alpha=1.5, dropout=p_drop,
                                                                    rank_dropout=p_rank, module_dropout=p_module),
                            dtype=D)
    (ours,) = handle.modules.values()
    with torch.no_grad():
        ours.lora_down.copy_(kohya.lora_down.weight)
        ours.lora_up.copy_(kohya.lora_up.weight)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=g, dtype=D)
    skipped = dropped = 0
    for seed in range(8):
        results = []
        for model, lora_params in ((kohya, (kohya.lora_down.weight, kohya.lora_up.weight)),
                                   (base, (ours.lora_down, ours.lora_up))):
            x = x0.clone().requires_grad_(True)
            torch.manual_seed(seed)
            y = model(x)
            weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=D)
            grads = torch.autograd.grad((y * weight).sum(), [x, *lora_params], allow_unused=True)
            results.append((y.detach(), [torch.zeros_like(p) if gr is None else gr for gr, p in
                                         zip(grads, [x, *lora_params])]))
        (yk, gk), (ys, gs) = results
        torch.testing.assert_close(ys, yk, rtol=1e-12, atol=1e-12)
        for a, b in zip(gs, gk):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        plain = layer(x0).detach()
        skipped += int(torch.equal(yk, plain))
        dropped += int(torch.count_nonzero(gk[2]) < gk[2].numel())
    assert skipped and skipped < 8 and dropped  # module dropout both skipped and kept; masks were drawn
    kohya.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(base(x0), kohya(x0), rtol=1e-12, atol=1e-12)


def test_rank_dropout_rescales_by_one_over_one_minus_p_not_by_the_kept_fraction():
    """kohya rescales by 1 / (1 - p) ("treat as if the rank is changed"), whatever the mask keeps."""
    layer = nn.Linear(5, 4).to(D)
    module = LoRAModule(geometry_of(layer), 4, 4.0, rank_dropout=0.5, dtype=D).train()
    with torch.no_grad():
        module.lora_up.fill_(1.0)
        module.lora_down.copy_(torch.eye(4, 5, dtype=D))
    x = torch.ones(64, 5, dtype=D)
    torch.manual_seed(0)
    mask = torch.rand(64, 4) > 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        y = module(x)
    want = mask.to(D).sum(dim=1, keepdim=True).expand(64, 4) * (1.0 / (1.0 - 0.5))
    torch.testing.assert_close(y, want, rtol=1e-15, atol=0)


# ------------------------------------------------------------------ max norm
def test_max_norm_matches_kohyas_apply_max_norm_regularization():
    """Linear, 1x1 and 3x3 LoRAs, some above the bound: factors after the pass, keys_scaled, the mean and
    max of the norms after scaling, all as kohya's (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Conv2d(6, 5, 1), nn.Conv2d(5, 7, 3, padding=1), nn.Linear(8, 3),
                          nn.Conv2d(5, 4, 3)).to(D)
    # (alpha / r exact in float32: the adapters' ``scale`` buffer is float32 whatever their dtype)
    handle = sdadapt.inject(model, "*", LoRAConfig(rank=4, alpha=2.0, conv_rank=2, conv_alpha=0.5), dtype=D)
    adapters = list(handle.modules.values())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in adapters:
            adapter.lora_down.copy_(torch.randn(adapter.lora_down.shape, generator=g, dtype=D))
            adapter.lora_up.copy_(torch.randn(adapter.lora_up.shape, generator=g, dtype=D))
        # ‖ΔW‖ of 1, 2 (under max / 2), 5 (in (max / 2, max]: kohya leaves it alone), 9 and 12 (above) for max 6
        for adapter, target in zip(adapters, (9.0, 2.0, 5.0, 1.0, 12.0), strict=True):
            adapter.lora_up.mul_(target / adapter.delta_weight().norm())
    state = {}
    for name, adapter in handle.modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = adapter.lora_down.detach().clone()
        state[f"{key}.lora_up.weight"] = adapter.lora_up.detach().clone()
        state[f"{key}.alpha"] = adapter.alpha.detach().clone().to(D)
    max_norm = 6.0
    want_scaled, want_mean, want_max = _kohya_max_norm(state, max_norm)
    assert want_scaled == 2
    stats = scale_weight_norms_(adapters, max_norm)
    for name, adapter in handle.modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        torch.testing.assert_close(adapter.lora_down.detach(), state[f"{key}.lora_down.weight"], rtol=1e-12, atol=0)
        torch.testing.assert_close(adapter.lora_up.detach(), state[f"{key}.lora_up.weight"], rtol=1e-12, atol=0)
    assert int(stats["keys_scaled"]) == want_scaled
    assert float(stats["average_key_norm"]) == pytest.approx(want_mean, rel=1e-12)
    assert float(stats["max_key_norm"]) == pytest.approx(want_max, rel=1e-12)


# ------------------------------------------------------------------ network: modules, ranks, alphas, LRs
_NET_CASES = {
    "loraplus": ({"loraplus_lr_ratio": "16"}, None, None),
    "conv_dim_block_lr_plus": ({"down_lr_weight": "sine", "mid_lr_weight": "0.5", "up_lr_weight": "1,1,1,0.75,0,0.25",
                                "loraplus_lr_ratio": "4", "loraplus_text_encoder_lr_ratio": "2"}, 3, 1.5),
    "block_dims": ({"block_dims": ",".join(str(1 + i % 3) for i in range(25)),
                    "block_alphas": ",".join(str(0.5 * (i % 4)) for i in range(25)),
                    "conv_block_dims": ",".join(str(i % 3) for i in range(25)),
                    "conv_block_alphas": ",".join(str(1 + i % 2) for i in range(25)),
                    "loraplus_unet_lr_ratio": "8", "loraplus_lr_ratio": "3"}, None, None),
    "block_dims_conv_dim_lr_threshold": ({"block_dims": ",".join(str(i % 4) for i in range(25)),
                                          "up_lr_weight": "cosine+0.1", "down_lr_weight": "1,0.2,0.5",
                                          "block_lr_zero_threshold": "0.2"}, 2, 0.5),  # (0.2: not above it, 0)
}


@pytest.mark.parametrize("case", list(_NET_CASES))
def test_network_args_give_kohyas_modules_ranks_alphas_and_learning_rates(case):
    """A network_args dict on a tiny SD1 UNet + CLIP: the layers that get a LoRA, their rank and alpha, and
    every factor's learning rate (sdadapt: the fit LR of its part times its ``lr_scales`` entry) are kohya's."""
    args, conv_dim, conv_alpha = _NET_CASES[case]
    unet, clip = tiny_unet_sd1(), tiny_clip()
    kohya_args = dict(args)
    if conv_dim is not None:
        kohya_args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alpha))
    loras, lr_weight = _kohya_network(clip, unet, 4, 2.0, kohya_args)
    # (LoRAModule.__init__, networks/lora.py:71: alpha None or 0 -> the rank)
    want_modules = {id(org): (is_unet, dim, float(dim if alpha is None or alpha == 0 else alpha))
                    for is_unet, _, org, dim, alpha in loras}
    unet_lr, te_lr = 1e-3, 5e-4
    want_lrs = _kohya_param_lrs(loras, lr_weight, kohya_args, text_encoder_lr=te_lr, unet_lr=unet_lr, default_lr=2e-6)

    system = types.SimpleNamespace(unet=unet, text_encoder=clip, base_model="sd1")
    adaptation = prepare_lora(system, rank=4, alpha=2.0, conv_rank=conv_dim, conv_alpha=conv_alpha, **args)
    try:
        got_modules = {}
        for component, handle in adaptation.handles.items():
            root = unet if component == "unet" else clip
            for layer, adapter in handle.modules.items():
                got_modules[id(root.get_submodule(layer))] = (component == "unet", adapter.rank, float(adapter.alpha))
        assert got_modules == want_modules
        scales = adaptation.lr_scales or [1.0] * len(adaptation.params)
        got_lrs = {}
        for (component, layer, name, _), scale in zip(adaptation._entries(), scales, strict=True):
            root = unet if component == "unet" else clip
            lr = (unet_lr if component == "unet" else te_lr) * scale
            if lr != 0:
                got_lrs[(id(root.get_submodule(layer)), name)] = lr
        assert set(got_lrs) == set(want_lrs)
        for key, lr in want_lrs.items():
            assert got_lrs[key] == pytest.approx(lr, rel=1e-14, abs=0), key
    finally:
        adaptation.remove()
