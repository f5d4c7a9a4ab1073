"""``torch.compile`` with the ``inductor`` backend gives the eager gradients, on a CPU and a GPU.

On torch 2.13's CPU build, plain inductor gives a diffusers UNet the eager loss but wrong
gradients: in the backward, the zero fill of the gradient of each upsampler's ``F.interpolate``
input is fused with the kernel that reads it, ahead of the scatter that fills it, so the gradient
through every up block's upsampler is lost (tiny UNet, fp32, no adapters: input gradients
43-55 % off; with LoRA every adapter before ``up_blocks.0``'s upsampler ~100 % off). sdadapt
compiles with Inductor's fusion off on a CPU (``sdadapt.methods.fit.compiled_model``);
``test_cpu_inductor_through_sdadapt_gives_the_eager_gradients`` runs the smallest repro found
(one up block in plain torch) through that path, and ``fit`` is checked to take it.

The CUDA test checks the backend ``--torch-compile`` uses by default on the machine it is meant
for: the UNet with LoRA adapters, compiled with inductor, against the same model run eagerly —
the loss, the input gradient and every adapter gradient. ``benchmarks/gpu_check.sh`` runs it.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_unet_sd1, unet_inputs

import sdadapt
from sdadapt.methods.fit import INDUCTOR_CPU_OPTIONS, compiled_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inductor_gradients_equal_eager():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    unet = tiny_unet_sd1().requires_grad_(False).cuda()
    handle = sdadapt.inject(unet, sdadapt.by_type(torch.nn.Linear, torch.nn.Conv2d), sdadapt.LoRAConfig(rank=2))
    torch.manual_seed(3)
    adapters = [p for p in handle.parameters()]
    with torch.no_grad():
        for p in adapters:
            p.copy_(torch.randn_like(p) * 0.1)
    (x, t, ctx), kwargs = unet_inputs(unet)
    x, t, ctx = x.cuda(), t.cuda(), ctx.cuda()
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).cuda()
    results = []
    for model in (unet, torch.compile(unet, backend="inductor")):
        xi = x.clone().requires_grad_(True)
        for p in adapters:
            p.grad = None
        loss = (model(xi, t, ctx).sample * weight).sum()
        loss.backward()
        results.append((loss.detach(), xi.grad, [p.grad.clone() for p in adapters]))
    (loss_e, gx_e, ga_e), (loss_c, gx_c, ga_c) = results
    assert _rel(loss_c, loss_e) < 1e-4
    assert _rel(gx_c, gx_e) < 1e-3, "inductor's input gradient differs from eager"
    worst = max(_rel(c, e) for c, e in zip(ga_c, ga_e))
    assert worst < 1e-3, f"inductor's adapter gradients differ from eager (worst relative error {worst:.2e})"



def _up_block(h, skips, temb, ws, up):
    """A diffusers ``UpBlock2D`` in plain torch: two ``ResnetBlock2D`` on skip concatenations
    (group norm, SiLU, 3x3 conv, time embedding, 1x1 shortcut, ``/ output_scale_factor``), then
    ``Upsample2D`` (nearest x2, 3x3 conv). h, skips: (2, 64, 4, 4); temb: (2, 128) -> (2, 64, 8, 8)."""
    for skip, w in zip(skips, ws):
        x = torch.cat([h, skip], 1)
        r = F.conv2d(F.silu(F.group_norm(x, 8, w["n1"], w["b1"])), w["c1"], padding=1)
        r = r + F.linear(F.silu(temb), w["t"])[:, :, None, None]
        r = F.conv2d(F.silu(F.group_norm(r, 8, w["n2"], w["b2"])), w["c2"], padding=1)
        h = (F.conv2d(x, w["s"]) + r) / 1.0
    return F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), up, padding=1)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor on a CPU needs a C++ compiler")
def test_cpu_inductor_through_sdadapt_gives_the_eager_gradients():
    # plain torch.compile(backend="inductor") gives the first resnet's gradients as zeros here
    # (torch 2.13.0+cpu); sdadapt's compile path must give eager's
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    c = 64

    def param(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).requires_grad_()

    ws = [{"n1": param(2 * c), "b1": param(2 * c), "c1": param(c, 2 * c, 3, 3), "t": param(c, 128), "n2": param(c),
           "b2": param(c), "c2": param(c, c, 3, 3), "s": param(c, 2 * c, 1, 1)} for _ in range(2)]
    up = param(c, c, 3, 3)
    h, temb = torch.randn(2, c, 4, 4, generator=g), torch.randn(2, 128, generator=g)
    skips = [torch.randn(2, c, 4, 4, generator=g) for _ in range(2)]
    weight = torch.randn(2, c, 8, 8, generator=g)
    params = [p for w in ws for p in w.values()] + [up]
    results = []
    for fn in (_up_block, compiled_model(_up_block, backend="inductor", device_type="cpu")):
        loss = (fn(h, skips, temb, ws, up) * weight).sum()
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    torch._dynamo.reset()
    (loss_e, grads_e), (loss_c, grads_c) = results
    assert _rel(loss_c, loss_e) < 1e-5
    assert min(float(gr.norm()) for gr in grads_e) > 0
    worst = max(_rel(c_, e) for c_, e in zip(grads_c, grads_e))
    assert worst < 1e-4, f"sdadapt's CPU inductor compile gives gradients off by up to {worst:.2e}"


class _RecordedCompile:
    def __init__(self):
        self.calls = []

    def __call__(self, model, **kwargs):
        self.calls.append(kwargs)
        return model  # (eager: what is checked is how sdadapt asks for the compile)


def test_fit_compiles_inductor_on_cpu_with_fusion_off(monkeypatch):
    import dataclasses

    from sdadapt.methods import METHODS, FitConfig, fit
    from sdadapt.toy import build_toy
    from sdadapt.toy.evaluate import concept_data

    recorded = _RecordedCompile()
    monkeypatch.setattr(torch, "compile", recorded)
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, captions, config=dataclasses.replace(FitConfig(steps=1, batch_size=2),
                                                                         compile_backend="inductor"))
    assert recorded.calls == [{"backend": "inductor", "options": INDUCTOR_CPU_OPTIONS}]


def test_other_backends_and_devices_compile_unchanged(monkeypatch):
    recorded = _RecordedCompile()
    monkeypatch.setattr(torch, "compile", recorded)
    for backend, device in (("aot_eager", "cpu"), ("eager", "cpu"), ("inductor", "cuda"), ("cudagraphs", "cuda")):
        compiled_model(torch.nn.Identity(), backend=backend, device_type=device)
    compiled_model(torch.nn.Identity(), backend="inductor", device_type="cpu")
    assert recorded.calls == [{"backend": b} for b in ("aot_eager", "eager", "inductor", "cudagraphs")] + [
        {"backend": "inductor", "options": {"max_fusion_size": 1}}]
