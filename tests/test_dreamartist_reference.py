"""DreamArtist against 7eu7d7's webui extension, transcribed here (never imported):
7eu7d7/DreamArtist-sd-webui-extension@95b2d44f2e834c700a61a0f56b9451720d360772, ``scripts/dream_artist/``.

The training loss (``cptuning.py`` ``p_losses_hook`` + the reconstruction term of ``train_embedding``),
the two embeddings' starting rows (``create_embedding``, called by ``ui.py`` for ``name`` and ``name-neg``),
the negative's learning rate (``neg_lr_w``) and the ``<name>.pt`` / ``<name>-neg.pt`` pair (``Embedding.save``,
``save_embedding``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdadapt.embeddings.table import find_token_embedding
from sdadapt.errors import InputError
from sdadapt.embeddings.tokens import tokenizer_side
from sdadapt.methods import FitConfig, fit
from sdadapt.methods.dreamartist import negative_files, prepare_dreamartist
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, step_loss


@pytest.fixture(scope="module")
def data():
    return concept_data("purple", 2, seed=0)


# ------------------------------------------------------------------------------ the reference, transcribed
def _reference_p_losses(apply_model, x_start, c_in, t, noise, sqrt_ac, sqrt_1m_ac, *, scale, dy_cfg_f, num_timesteps):
    """cptuning.py:262-329 ``p_losses_hook`` for an eps model (``logvar`` 0, ``l_simple_weight`` 1,
    ``original_elbo_weight`` 0: SD's config), float64 arithmetic; returns ``(loss, img)``."""
    x_noisy = sqrt_ac[t].view(-1, 1, 1, 1) * x_start + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise  # q_sample
    t_raw, x_noisy_raw = t, x_noisy
    if scale[1] != 1.0:  # :270-272
        x_noisy = torch.cat([x_noisy] * 2)
        t = torch.cat([t] * 2)
    model_output = apply_model(x_noisy, t, c_in).double()  # :274, c_in = [negative captions; positive captions]
    if scale[1] != 1.0:
        e_t_uncond, e_t = model_output.chunk(2)  # :278
        if scale[0] != scale[1]:
            rate = t_raw.double() / (num_timesteps - 1)  # :280
            if dy_cfg_f == "cos":
                rate = torch.cos((rate - 1) * math.pi / 2)  # :282
            elif dy_cfg_f == "cos2":
                rate = 1 - torch.cos(rate * math.pi / 2)  # :284
        else:
            rate = 1
        # :291 (the reference broadcasts a (B,) rate against (B, C, H, W): right for its batch size 1)
        model_output = e_t_uncond + ((scale[1] - scale[0]) * rate + scale[0]) * (e_t - e_t_uncond)
    loss_simple = ((model_output - noise) ** 2).mean([1, 2, 3])  # :303-306, get_loss l2, mean=False
    loss = loss_simple.mean()  # :309-316 with logvar = 0, l_simple_weight = 1 (+ 0 × loss_vlb, :324)
    img = (x_noisy_raw - sqrt_1m_ac[t_raw].view(-1, 1, 1, 1) * model_output) / sqrt_ac[t_raw].view(-1, 1, 1, 1)  # :327
    return loss, img


def _reference_rows(table: torch.Tensor, init_ids: list[int], k: int) -> torch.Tensor:
    """cptuning.py:190-197 ``create_embedding`` without the ``-neg`` noise: the tokenizer keeps the first
    ``k`` ids (``max_length=k``), row ``i`` is ``embedded[i * n // k]``."""
    embedded = table[torch.tensor(init_ids[:k])]
    n = embedded.shape[0]
    return torch.stack([embedded[i * n // k] for i in range(k)])


# ------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize(("low", "high", "schedule", "rec"), [
    (3.0, None, "ln", 0.0),      # the extension's default "3.0"
    (1.5, 3.0, "ln", 0.0),       # "1.5-3.0"
    (1.5, 3.0, "cos", 0.0),      # "1.5-3.0:cos"
    (2.0, 5.0, "cos2", 0.5),     # "2.0-5.0:cos2" with use_rec, rec_loss_w 0.5
])
def test_training_loss_and_gradients_are_the_extensions(data, low, high, schedule, rec):
    images, captions = data
    images, captions = images[:1], captions[:1]  # batch size 1: the extension's default (and the only one its dynamic CFG broadcasts)
    system = build_toy(seed=7)
    da = prepare_dreamartist(system, token="purple", negative_vectors=2, cfg_scale=low, cfg_high=high,
                             cfg_schedule=schedule, rec_weight=rec)
    ids = da.tokenize(captions)
    latents = system.encode_images(images)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([731])
    config = StepConfig()
    prepared = prepare_batch({"latents": latents, "cond": ids, "noise": noise, "timesteps": t}, state=TrainState(seed=0),
                             config=config, alphas_cumprod=system.alphas_cumprod)
    ours = step_loss(da.training_model(system), prepared, config, da.extra_loss)
    ours_grads = torch.autograd.grad(ours, da.params)

    denoiser = system.denoiser()
    ac = system.alphas_cumprod.double()
    # :524-525: c_in = the negative captions (token -> token-neg) then the captions
    c_in = system.condition(torch.cat([ids[:, 1], ids[:, 0]]))
    ref, img = _reference_p_losses(lambda x, tt, c: denoiser(x.float(), tt, c), latents.double(), c_in, t, noise.double(),
                                   ac.sqrt(), (1 - ac).sqrt(), scale=(low, high if high is not None else low),
                                   dy_cfg_f=schedule, num_timesteps=1000)
    if rec:  # :538 decode with grad, :544 loss = output[0] + l1(timg, x_samples) * rec_loss_w
        x_samples = system.decode_latents(img.float())
        ref = ref + F.l1_loss(images.double(), x_samples.double()) * rec
    ref_grads = torch.autograd.grad(ref, da.params)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-7)
    for a, b in zip(ours_grads, ref_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-8)
    da.remove()


# ------------------------------------------------------------------------------ the starting rows
@pytest.mark.parametrize(("init_word", "vectors", "negative_vectors"), [
    ("a red circle", 1, 2),   # the negative takes the init word's first two tokens, not the positive's one row twice
    ("a red circle", 1, 3),
    ("a red circle", 3, 2),
    ("red", 3, 6),            # the extension's 3 / 6 with a one-token init word
    ("a red circle", 6, 6),   # 1 < n < k: each token repeated in place (a a red red circle circle), not cycled
    ("red circle", 3, 6),
])
def test_both_embeddings_start_as_create_embedding_makes_them(init_word, vectors, negative_vectors):
    system = build_toy(seed=2)
    _, table = find_token_embedding(system.text_encoder)
    init_ids = tokenizer_side(system.tokenizer).word_ids(init_word)
    weight = table.weight.detach()
    da = prepare_dreamartist(system, token="purple", init_word=init_word, vectors=vectors,
                             negative_vectors=negative_vectors, noise=0.0)
    positive, negative = (p.detach() for p in da.params)
    da.remove()
    # ui.py:13-14 create_embedding(name, nvpt, init_text) and create_embedding(name + '-neg', nvpt_neg, init_text_neg),
    # both init texts the same word here
    torch.testing.assert_close(positive, _reference_rows(weight, init_ids, vectors), rtol=0, atol=0)
    torch.testing.assert_close(negative, _reference_rows(weight, init_ids, negative_vectors), rtol=0, atol=0)

    # cptuning.py:196-197: the negative's rows get N(0, 1e-3²) noise, the positive's none
    torch.manual_seed(0)
    da = prepare_dreamartist(system, token="purple", init_word=init_word, vectors=vectors, negative_vectors=negative_vectors)
    noisy_pos, noisy_neg = (p.detach() for p in da.params)
    da.remove()
    assert torch.equal(noisy_pos, positive)
    step = noisy_neg - negative
    assert step.abs().max() > 0 and 0.5e-3 < float(step.std()) < 2e-3


def test_the_negative_init_word_is_its_own_create_embedding():
    """The extension's two init texts (ui.py: "Initialization text" and "Initialization text (negative)"):
    ``negative_init_word`` starts the negative from its own word; the positive keeps ``init_word``'s rows."""
    system = build_toy(seed=2)
    _, table = find_token_embedding(system.text_encoder)
    weight, side = table.weight.detach(), tokenizer_side(system.tokenizer)
    da = prepare_dreamartist(system, token="purple", init_word="circle", negative_init_word="a blue square", vectors=1,
                             negative_vectors=2, noise=0.0)
    positive, negative = (p.detach() for p in da.params)
    da.remove()
    torch.testing.assert_close(positive, _reference_rows(weight, side.word_ids("circle"), 1), rtol=0, atol=0)
    torch.testing.assert_close(negative, _reference_rows(weight, side.word_ids("a blue square"), 2), rtol=0, atol=0)


# ------------------------------------------------------------------------------ the negative's learning rate
def test_the_negative_learns_at_neg_lr_w_times_the_rate(data):
    images, captions = data
    system = build_toy(seed=3)
    da = prepare_dreamartist(system, token="purple", negative_vectors=2, neg_lr_weight=0.25)
    start = [p.detach().clone() for p in da.params]
    lr = 1e-3
    # cptuning.py:487-490: AdamW groups {embedding.vec} at lr and {embedding_neg.vec} at lr * neg_lr_w (weight decay
    # off here: the extension's is AdamW's default 0.01, as sdadapt's). Adam's first step moves each entry by
    # lr_group * g / (|g| + eps): ±lr_group wherever the gradient is not tiny, whatever the clipping did.
    fit(system, da, images, captions, config=FitConfig(steps=1, batch_size=2, learning_rate=lr, weight_decay=0.0,
                                                              schedule="constant", warmup_steps=0))
    for p, s, rate in zip(da.params, start, (lr, lr * 0.25)):
        moved = (p.detach() - s).abs()
        assert float(moved.max()) <= rate * (1 + 1e-4)
        assert float(moved.median()) > rate * 0.9
    da.remove()


# ------------------------------------------------------------------------------ the files
def test_the_pair_has_the_extensions_layout(tmp_path):
    system = build_toy(seed=4)
    da = prepare_dreamartist(system, token="purple", vectors=3, negative_vectors=6)
    path = da.save(tmp_path / "purple.pt")
    da.remove()
    # save_embedding (cptuning.py:718, 725-726): '<name>.pt' and f'{filename[:-3]}-neg.pt' named name / name + '-neg'
    assert negative_files(path) == (tmp_path / "purple-neg.pt",)
    for file, name, k in ((path, "purple", 3), (tmp_path / "purple-neg.pt", "purple-neg", 6)):
        data = torch.load(file, weights_only=True)
        # Embedding.save (cptuning.py:41-51)
        assert {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"} <= set(data)
        assert data["string_to_token"] == {"*": 265} and data["name"] == name
        vec = data["string_to_param"]["*"]
        assert list(data["string_to_param"]) == ["*"] and vec.shape == (k, 64) and vec.dtype == torch.float32


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize(("low", "high", "want"), [(3.0, None, 3.0), (1.5, 3.5, 2.5)])
def test_sample_guides_at_the_training_scale_with_the_negative_trigger(monkeypatch, low, high, want):
    # cptuning.py:616-617 / 632-634: the preview's negative prompt holds '<name>-neg', at the training cfg_scale (a
    # dynamic "low-high" has no single number there: sdadapt takes the mean)
    system = build_toy(seed=5)
    da = prepare_dreamartist(system, token="purple", cfg_scale=low, cfg_high=high)
    seen = {}
    monkeypatch.setattr(system, "sample", lambda prompts, **kw: seen.update(kw, prompts=prompts))
    da.sample(["a purple circle"], steps=2)
    negative = da.negative.expand("purple-neg")
    da.remove()
    assert seen["guidance"] == want and seen["negative"] == negative


# ------------------------------------------------------------------------------ the extension's fields
@pytest.mark.parametrize(("text", "want"), [
    ("3.0", (3.0, None, "ln")), ("1.5-3.0", (1.5, 3.0, "ln")), ("1.5-3.5:cos", (1.5, 3.5, "cos")),
    (" 2-5:cos2 ", (2.0, 5.0, "cos2")), (7.5, (7.5, None, "ln")),
])
def test_the_cfg_field_reads_as_get_cfg_range(text, want):
    """cptuning.py:331-340 ``get_cfg_range``: ``low-high:type``; the type defaults to ln."""
    from sdadapt.methods.dreamartist import parse_dynamic_cfg

    assert parse_dynamic_cfg(text) == want


def test_a_cfg_field_trains_as_its_three_options(data):
    from sdadapt.methods.dreamartist import parse_dynamic_cfg

    images, captions = data
    with pytest.raises(ValueError, match="unknown schedule 'sin'"):
        parse_dynamic_cfg("1-3:sin")
    with pytest.raises(ValueError, match="low-high"):
        parse_dynamic_cfg("high")
    system = build_toy(seed=7)
    losses = []
    for options in ({"cfg_scale": "1.5-3.5:cos"}, {"cfg_scale": 1.5, "cfg_high": 3.5, "cfg_schedule": "cos"}):
        torch.manual_seed(0)
        da = prepare_dreamartist(system, token="purple", vectors=2, negative_vectors=3, **options)
        assert (da.cfg_scale, da.cfg_high, da.cfg_schedule) == (1.5, 3.5, "cos")
        losses.append(fit(system, da, images, captions, config=FitConfig(steps=3, learning_rate=1e-2, seed=0)))
        da.remove()
    assert losses[0] == losses[1]
    with pytest.raises(ValueError, match="whole CFG field"):
        prepare_dreamartist(system, token="purple", cfg_scale="1-3", cfg_high=4.0)


def test_init_weights_continues_a_saved_pair(tmp_path, data):
    """The extension trains an existing ``name`` / ``name-neg`` pair on (cptuning.py:394-402): ``init_weights`` starts
    both embeddings from the pair's files, exactly (no noise)."""
    images, captions = data
    system = build_toy(seed=4)
    da = prepare_dreamartist(system, token="purple", vectors=2, negative_vectors=3)
    fit(system, da, images, captions, config=FitConfig(steps=3, learning_rate=1e-2, seed=0))
    trained = [p.detach().clone() for p in da.params]
    path = da.save(tmp_path / "purple.pt")
    da.remove()
    again = prepare_dreamartist(system, token="purple", vectors=2, negative_vectors=3, init_weights=path)
    for a, b in zip(again.params, trained):
        assert torch.equal(a.detach(), b)
    again.remove()
    with pytest.raises(InputError, match="--negative-vectors 3"):
        prepare_dreamartist(system, token="purple", vectors=2, negative_vectors=2, init_weights=path)
    (tmp_path / "purple-neg.pt").unlink()
    with pytest.raises(InputError, match="purple-neg.pt .the negative. is not beside it"):
        prepare_dreamartist(system, token="purple", vectors=2, negative_vectors=3, init_weights=path)


def test_the_reconstruction_loss_decodes_a_vae_with_gradients(tmp_path):
    """The extension decodes with ``decode_first_stage.__wrapped__`` (gradients, cptuning.py:537-544): a diffusers
    system's VAE decodes x̂0 with autograd (checkpointed per block; it was refused), the same loss and gradients as a
    plain differentiable decode, the VAE's checkpointing flag as it was."""
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_systems import tiny_diffusers_system

    from sdadapt.training import diffusion

    system = tiny_diffusers_system(tmp_path, max_token_length=75)
    da = prepare_dreamartist(system, token="sks", rec_weight=0.5)
    g = torch.Generator().manual_seed(0)
    latents, x_t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    prediction = torch.randn(2, 4, 8, 8, generator=g) * (1 + da.params[0].sum() * 1e-2)  # (depends on the rows)
    loss = da.extra_loss({"x_t": x_t, "t": t, "latents": latents}, prediction)
    (grad,) = torch.autograd.grad(loss, da.params[0], retain_graph=True)
    assert not system.vae.is_gradient_checkpointing
    x0_hat = diffusion.predicted_x0("epsilon", x_t, prediction, t, system.alphas_cumprod)
    scale = system.scaling_factor
    with torch.enable_grad():
        decoded = system.vae.decode(x0_hat / scale).sample  # (no checkpointing, unclamped)
    target = system.vae.decode(latents / scale).sample.detach()
    ref = 0.5 * (decoded.float() - target.float()).abs().mean()
    (ref_grad,) = torch.autograd.grad(ref, da.params[0])
    assert float(grad.abs().max()) > 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    da.remove()
