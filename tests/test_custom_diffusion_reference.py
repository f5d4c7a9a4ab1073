"""Custom Diffusion against transcriptions of its reference code (float64 where numeric).

References (read, transcribed here, never imported):

* huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
  ``examples/custom_diffusion/train_custom_diffusion.py`` (the training loop, L1144-1215) and
  ``src/diffusers/models/attention_processor.py`` (``CustomDiffusionAttnProcessor``, the detach trick, L1250-1255);
* adobe-research/custom-diffusion@7c19c9a7820d07389f5390e09d7b85d702bafd7b ``src/composenW.py``
  (``gdupdateWexact``, L40-56: the closed-form merge) and ``src/model.py`` (which parameters train, L118-131).
"""

from __future__ import annotations

import pytest
import torch

from sdadapt.custom_diffusion import concept_features, merge_custom_diffusion_weights, solve_concepts
from sdadapt.embeddings import find_token_embedding
from sdadapt.methods import FitConfig
from sdadapt.methods.custom_diffusion import prepare_custom_diffusion
from sdadapt.methods.optimizers import make_optimizer
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.step import StepConfig, TrainState, train_step

F64 = {"dtype": torch.float64}


# ------------------------------------------------------------------------------ the merge (adobe composenW.py)
def _adobe_gdupdateWexact(K, V, Ktarget1, Vtarget1, W):
    """adobe-research/custom-diffusion@7c19c9a src/composenW.py:40-56, line for line (scipy's
    ``lu_factor``/``lu_solve`` as torch's; the loss print dropped). ``K`` (n, in): regularisation
    features; ``Ktarget1`` (s, in): concept features; ``Vtarget1`` (s, out): their target values."""
    input_ = K
    C = input_.T @ input_  # composenW.py:43
    lu, piv = torch.linalg.lu_factor(C)  # :45
    d = [torch.linalg.lu_solve(lu, piv, Ktarget1[i].reshape(-1, 1)) for i in range(Ktarget1.size(0))]  # :46-48
    d = torch.cat(d, 1).T  # :50
    e2 = d @ Ktarget1.T  # :52
    e1 = Vtarget1.T - W @ Ktarget1.T  # :53
    delta = e1 @ torch.linalg.inv(e2)  # :54
    return W + delta @ d  # :56


def test_merge_equals_adobe_gdupdateWexact():
    """With independent feature rows and enough regularisation rows (adobe's setting), sdadapt's
    exact merge (``ridge=0``, a pseudo-inverse that cuts nothing) is adobe's closed form."""
    g = torch.Generator().manual_seed(7)
    out, inp, sizes, n = 12, 10, (3, 4), 40
    w0 = torch.randn(out, inp, generator=g, **F64)
    ws = [w0 + 0.2 * torch.randn(out, inp, generator=g, **F64) for _ in sizes]
    cs = [torch.randn(s, inp, generator=g, **F64) for s in sizes]
    creg = torch.randn(n, inp, generator=g, **F64)
    # compose(): uc_values = (W_i @ uc_targets.T).T per concept, concatenated (composenW.py:166, :179)
    ktarget = torch.cat(cs)
    vtarget = torch.cat([(w @ c.T).T for w, c in zip(ws, cs)])
    values = (w0 @ creg.T).T  # composenW.py:187 (unused by the formula, passed as adobe does)
    expected = _adobe_gdupdateWexact(creg, values, ktarget, vtarget, w0.clone())
    got = merge_custom_diffusion_weights(w0, ws, cs, creg, ridge=0.0, rtol=1e-12)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(solve_concepts(cs, creg, ridge=0.0, rtol=1e-12).merge(w0, ws), expected, atol=1e-10, rtol=1e-10)
    # the relative ridge is ridge·tr(M)/in on M's diagonal: adobe's formula with that M
    ridge = 1e-2
    m = creg.T @ creg
    # K with Kᵀ K = M + ridge·tr(M)/in·I: append √(ridge·tr(M)/in)·I rows
    lift = torch.cat([creg, (ridge * torch.trace(m) / inp).sqrt() * torch.eye(inp, **F64)])
    torch.testing.assert_close(merge_custom_diffusion_weights(w0, ws, cs, creg, ridge=ridge, rtol=1e-12),
                               _adobe_gdupdateWexact(lift, None, ktarget, vtarget, w0.clone()), atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------ one training step (diffusers' loop)
def _diffusers_step(system, token_id: int, ids, latents, noise, timesteps, *, lr: float, eps: float, train_q_out: bool,
                    loss_scale: float = 1.0):
    """One step of diffusers' train_custom_diffusion.py@58eb52c on ``system`` (no prior, no augmentation):
    the whole token table trains with every other row's gradient zeroed (L1191-1205), K/V of every
    attn2 (+ Q/out with ``--freeze_model crossattn``, L934-936 / adobe model.py:118-131), BOS key/value
    detached by the processor's mask (attention_processor.py L1250-1255), loss = masked MSE with a mask of
    ones (L1186-1188), clip at max_grad_norm 1.0 (L1207-1213), AdamW(lr, betas (0.9, 0.999), wd 1e-2,
    eps 1e-8; ``eps`` here) (L1009-1018, defaults L538-542). The loss is multiplied by ``loss_scale`` before
    ``backward``; returns (the unscaled loss, the token row, the UNet's parameters) after the step."""
    system.requires_grad_(False)
    _, table = find_token_embedding(system.text_encoder)
    with torch.no_grad():  # sdadapt trains the row as a float32 parameter: start from the same value
        table.weight[token_id] = table.weight[token_id].float().to(table.weight.dtype)
    table.weight.requires_grad_(True)
    names = ("to_k", "to_v") + (("to_q", "to_out") if train_q_out else ())
    # every attention but the attn1 ones is a cross-attention (L940-941)
    layers = [module for path, module in system.unet.named_modules() if path.endswith("attn2")]
    weights = [p for layer in layers for name in names for p in getattr(layer, name).parameters()]
    for p in weights:
        p.requires_grad_(True)

    def mask_detach(module, inputs, key):  # attention_processor.py:1252-1255
        detach = torch.ones_like(key)
        detach[:, :1, :] = detach[:, :1, :] * 0.0
        return detach * key + (1 - detach) * key.detach()

    hooks = [getattr(layer, p).register_forward_hook(mask_detach) for layer in layers for p in ("to_k", "to_v")]
    optimizer = torch.optim.AdamW([table.weight, *weights], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=eps)
    a = system.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)  # DDPMScheduler.add_noise
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    model_pred = system.denoiser()(noisy, timesteps, system.condition(ids))
    mask = torch.ones_like(latents[:, :1])
    loss = torch.nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="none")
    loss = ((loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])).mean()
    (loss * loss_scale).backward()
    index_grads_to_zero = torch.arange(table.num_embeddings) != token_id
    table.weight.grad.data[index_grads_to_zero, :] = table.weight.grad.data[index_grads_to_zero, :].fill_(0)
    torch.nn.utils.clip_grad_norm_([table.weight, *weights], 1.0)
    optimizer.step()
    for h in hooks:
        h.remove()
    return loss.detach(), table.weight[token_id].detach().clone(), {n: p.detach().clone() for n, p in system.unet.named_parameters()}


def test_one_step_equals_diffusers_training_loop():
    """``prepare_custom_diffusion`` + the step and optimiser ``fit`` uses, one step, against diffusers'
    loop on an identical toy: the same K/V (and Q/out) weights, the same token row, every other weight
    untouched. ``token_lr_scale=1`` is diffusers' (one AdamW group); sdadapt's default is 10.

    The loss scale differs (docs/custom-diffusion.md): diffusers' instance loss divides the summed squared
    error (C, h, w) by the sum of a one-channel mask (h, w), C × the mean sdadapt (and diffusers' own prior
    term) takes; the step is compared with diffusers' loss / C.

    Both sides in float64 (the loss itself is float32 in both, as diffusers' ``.float()``) and with
    ε = 1e-4: Adam's first step is lr·g/(|g| + ε), so with ε = 1e-8 a gradient entry near 1e-8 (float32
    rounding of the loss) would flip its update; the default optimiser is checked against diffusers'
    defaults separately (``ε`` included)."""
    lr, eps = 3e-3, 1e-4
    defaults = make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}], FitConfig(learning_rate=lr)).defaults
    assert (defaults["betas"], defaults["eps"], defaults["weight_decay"]) == ((0.9, 0.999), 1e-8, 1e-2)  # L538-542
    assert StepConfig().max_grad_norm == 1.0  # L542
    images, captions = concept_data("cross", 2, seed=0)
    for train_q_out in (False, True):
        ours, ref = build_toy(seed=1).double(), build_toy(seed=1).double()
        token_id = ref.tokenizer.token_id("cross")
        cd = prepare_custom_diffusion(ours, token="cross", train_q_out=train_q_out, token_lr_scale=1.0)
        assert cd.lr_scales == [1.0] * len(cd.params)
        g = torch.Generator().manual_seed(3)
        latents = ours.encode_images(images.double())
        noise, timesteps = torch.randn(latents.shape, generator=g, **F64), torch.tensor([100, 700])
        optimizer = make_optimizer([{"params": cd.params, "lr": lr}],
                                   FitConfig(learning_rate=lr, optimizer_args=(("eps", eps),)))
        denoiser = ours.denoiser()
        metrics = train_step(lambda x, t, ids: denoiser(x, t, ours.condition(ids)),
                   {"latents": latents, "cond": cd.tokenize(captions), "noise": noise, "timesteps": timesteps},
                   params=cd.params, optimizer=optimizer, state=TrainState(seed=0), config=StepConfig(),
                   alphas_cumprod=ours.alphas_cumprod)
        channels = latents.shape[1]
        loss, row, weights = _diffusers_step(ref, token_id, ref.tokenize(captions), latents, noise, timesteps, lr=lr,
                                             eps=eps, train_q_out=train_q_out, loss_scale=1 / channels)
        torch.testing.assert_close(metrics["loss"].double() * channels, loss.double(), atol=0, rtol=1e-6)
        # the row: a float32 parameter in sdadapt (float64 here): one float32 rounding of the step
        torch.testing.assert_close(cd.params[0].detach().reshape(-1).double(), row, atol=1e-7, rtol=1e-6)
        for name, value in ours.unet.named_parameters():
            torch.testing.assert_close(value.detach(), weights[name], atol=1e-9, rtol=1e-7, msg=name)
        cd.remove()


def test_default_token_row_learning_rate_is_ten_times_the_weights():
    """sdadapt's documented default (docs/custom-diffusion.md): the row ×10; diffusers/adobe: ×1."""
    cd = prepare_custom_diffusion(build_toy(seed=1), token="cross")
    assert cd.lr_scales == [10.0] + [1.0] * (len(cd.params) - 1)
    cd.remove()


def test_concept_features_are_the_states_at_tokens_1_to_the_first_eos():
    """adobe composenW.py:105, :110 (``[:, 1:end+1]``, ``end`` the first EOS) and diffusers_composenW.py:68-70
    (unpadded, ``[:, 1:]``): the text states from the token after BOS through EOS; ``through="all"``: every
    position after BOS (sdadapt's regularisation features)."""
    system = build_toy(seed=1)
    prompts = ["a red circle", "a small blue square on the left"]
    ids = system.tokenize(prompts)
    with torch.no_grad():
        states = system.condition(ids)["context"].double()
    eos = system.tokenizer.eos_id
    expected = torch.cat([states[i, 1 : int((ids[i] == eos).nonzero().min()) + 1] for i in range(len(prompts))])
    torch.testing.assert_close(concept_features(system, prompts), expected, atol=0, rtol=0)
    torch.testing.assert_close(concept_features(system, prompts, through="all"), states[:, 1:].reshape(-1, states.shape[-1]),
                               atol=0, rtol=0)


def test_only_captions_with_the_token_are_recorded_for_the_merge():
    """The merge's concept prompts are the training captions that use the token; class-image captions
    (prior preservation) go through the same tokenizer and must not be recorded."""
    cd = prepare_custom_diffusion(build_toy(seed=1), token="cross")
    cd.tokenize(["a red cross", "a red circle", "a red cross", "a blue square"])
    assert cd.prompts == ["a red cross"]
    cd.remove()


def test_train_token_lr_scale_reaches_the_method(tmp_path, monkeypatch):
    """``train custom-diffusion --token-lr-scale 1`` is diffusers' one rate for the row and the weights; the value
    reaches ``prepare_custom_diffusion`` (default 10), and a negative scale is refused."""
    import sdadapt.jobs
    from sdadapt.cli import build_parser
    from sdadapt.methods import METHODS

    seen = {}

    class _Stop(Exception):
        pass

    def fake_run_train(method_name, options, **kw):
        seen["options"] = options
        raise _Stop

    monkeypatch.setattr(sdadapt.jobs, "run_train", fake_run_train)
    images = tmp_path / "images"
    images.mkdir()
    args = build_parser().parse_args(["train", "custom-diffusion", "--model", "toy", "--images", str(images), "--token",
                                      "cross", "--token-lr-scale", "1", "-o", str(tmp_path / "cd.safetensors")])
    with pytest.raises(_Stop):
        args.run(args)
    chosen = {k: v for k, v in seen["options"].method_options.items() if v is not None}
    assert chosen["token_lr_scale"] == 1.0
    cd = METHODS["custom-diffusion"].prepare(build_toy(seed=1), **chosen)
    assert cd.lr_scales == [1.0] * len(cd.params)
    cd.remove()
    with pytest.raises(ValueError, match="token_lr_scale"):
        prepare_custom_diffusion(build_toy(seed=1), token="cross", token_lr_scale=-1.0)
