"""Textual inversion and DreamBooth's prior preservation against transcriptions of the reference scripts.

References (transcribed below, never imported):

* huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
  ``examples/textual_inversion/textual_inversion.py`` (TI) and ``examples/dreambooth/train_dreambooth.py`` (DB);
* kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb ``train_db.py`` and
  ``library/custom_train_functions.py`` (kohya's regularisation images as per-sample loss weights).

sdadapt trains the trigger's rows as their own ``(k, D)`` parameter instead of the whole token table followed by
diffusers' ``index_no_updates`` restore; the two must take the same steps (AdamW's weight decay included).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from embedding_models import tiny_clip_text, tiny_tokenizer
from transformers_versions import float64_clip

LENGTH = 32  # the byte-level tiny tokenizer spends one token per character


def _denoiser(dim: int, seed: int = 3):
    """``model(x (B,4,H,W), t, hidden (B,L,D)) -> (B,4,H,W)`` in float64, depending on every position's state."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(dim, 4, generator=g, dtype=torch.float64) / dim ** 0.5  # (D, 4)
    pos = torch.linspace(0.5, 1.5, LENGTH, dtype=torch.float64)  # (L,)

    def model(x, t, hidden):
        h = torch.einsum("bld,l,dc->bc", hidden.to(torch.float64), pos, proj) / LENGTH  # (B, 4)
        return 0.8 * x + torch.tanh(h)[:, :, None, None] * (1 + x * x).sqrt()

    return model


def _schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@float64_clip
@pytest.mark.parametrize("vectors", [1, 3])
def test_textual_inversion_steps_match_diffusers_whole_table_adamw_with_index_no_updates(tmp_path, vectors):
    """k vectors from a one-token initializer, 3 AdamW steps at diffusers' defaults (weight decay 1e-2, eps 1e-8,
    no clipping): sdadapt's separate rows end where diffusers' table rows end, and every other row is untouched."""
    from sdadapt.embeddings import initial_embedding, inject_embedding
    from sdadapt.methods import FitConfig
    from sdadapt.methods.optimizers import make_optimizer
    from sdadapt.methods.textual_inversion import template_captions
    from sdadapt.training.step import StepConfig, TrainState, train_step

    tok_ref = tiny_tokenizer(tmp_path / "ref", max_length=LENGTH)
    tok = tiny_tokenizer(tmp_path / "ours", max_length=LENGTH)
    te = tiny_clip_text(max_length=LENGTH).double()
    te_ref = copy.deepcopy(te)
    te.requires_grad_(False)
    table_before = te.get_input_embeddings().weight.detach().clone()
    model = _denoiser(te.config.hidden_size)
    scheduler = _schedule()
    lr, steps, batch = 5e-2, 3, 2
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(batch, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(steps)]
    noises = [torch.randn(batch, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(steps)]
    timesteps = [torch.randint(0, 1000, (batch,), generator=g) for _ in range(steps)]

    # ---- diffusers textual_inversion.py, transcribed (L665-700 tokens + init, L735-746 optimizer, L867-917 loop)
    placeholder = "<sks>"
    placeholder_tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, vectors)]
    assert tok_ref.add_tokens(placeholder_tokens) == vectors
    token_ids = tok_ref.encode("a", add_special_tokens=False)
    assert len(token_ids) == 1  # diffusers: "The initializer token must be a single token."
    initializer_token_id = token_ids[0]
    placeholder_token_ids = tok_ref.convert_tokens_to_ids(placeholder_tokens)
    te_ref.resize_token_embeddings(len(tok_ref))
    token_embeds = te_ref.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_token_ids:
            token_embeds[token_id] = token_embeds[initializer_token_id].clone()
    # diffusers freezes encoder, final_layer_norm and position_embedding (L702-708): all but the token table
    te_ref.requires_grad_(False)
    te_ref.get_input_embeddings().requires_grad_(True)
    optimizer = torch.optim.AdamW(te_ref.get_input_embeddings().parameters(), lr=lr, betas=(0.9, 0.999),
                                  weight_decay=1e-2, eps=1e-08)
    orig_embeds_params = te_ref.get_input_embeddings().weight.data.clone()
    placeholder_string = " ".join(tok_ref.convert_ids_to_tokens(placeholder_token_ids))  # TextualInversionDataset
    captions = [template_captions(placeholder_string, batch, seed=s) for s in range(steps)]
    ref_ids = []
    for s in range(steps):
        input_ids = tok_ref(captions[s], padding="max_length", truncation=True, max_length=LENGTH,
                            return_tensors="pt").input_ids
        ref_ids.append(input_ids)
        noisy_latents = scheduler.add_noise(latents[s], noises[s], timesteps[s])
        encoder_hidden_states = te_ref(input_ids)[0]
        model_pred = model(noisy_latents, timesteps[s], encoder_hidden_states)
        target = noises[s]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        index_no_updates = torch.ones((len(tok_ref),), dtype=torch.bool)
        index_no_updates[min(placeholder_token_ids): max(placeholder_token_ids) + 1] = False
        with torch.no_grad():
            te_ref.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]
    ref_rows = te_ref.get_input_embeddings().weight.detach()[min(placeholder_token_ids): max(placeholder_token_ids) + 1]

    # ---- sdadapt: the rows as their own parameter, the shared step, FitConfig's default optimiser
    emb = initial_embedding(te, tok, placeholder, vectors=vectors, init_word="a")
    handle = inject_embedding(te, tok, emb, trainable=True)
    try:
        params = handle.parameters()
        opt = make_optimizer([{"params": params}], FitConfig(learning_rate=lr))
        state = TrainState(seed=0)
        config = StepConfig(max_grad_norm=None)  # diffusers' TI clips nothing
        for s in range(steps):
            ids = tok([handle.expand(c) for c in template_captions(placeholder, batch, seed=s)], padding="max_length",
                      truncation=True, max_length=LENGTH, return_tensors="pt").input_ids
            assert torch.equal(ids, ref_ids[s])  # `<sks>` spelled `<sks> <sks>_1 …`, the same token ids
            train_step(lambda x, t, i: model(x, t, te(i)[0]), {"latents": latents[s], "cond": ids, "noise": noises[s],
                       "timesteps": timesteps[s]}, params=params, optimizer=opt, state=state, config=config,
                       alphas_cumprod=scheduler.alphas_cumprod.double())
        rows = handle.rows["text_encoder"].rows.detach().double()
        assert handle.token_ids["text_encoder"] == placeholder_token_ids
        assert (rows - table_before[initializer_token_id]).abs().max() > 1e-2  # the steps moved the rows
        torch.testing.assert_close(rows, ref_rows, rtol=0, atol=2e-6)
        # every other row is the original, as index_no_updates leaves diffusers' table
        assert torch.equal(te.get_input_embeddings().weight, table_before)
        assert torch.equal(te_ref.get_input_embeddings().weight[: len(table_before)], table_before)
        with torch.no_grad():
            torch.testing.assert_close(te(ref_ids[0])[0], te_ref(ref_ids[0])[0], rtol=0, atol=1e-5)
    finally:
        handle.remove()


def _prior_model(seed: int = 5):
    """A per-sample float64 denoiser ``model(x, t, cond (B, 3))`` with a trainable 1x1 convolution."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(4, 4, 1).double()
    mix = torch.randn(3, 4, dtype=torch.float64)

    def model(x, t, cond):
        return conv(x) * (1 + torch.tanh(cond.to(x.dtype) @ mix)[:, :, None, None]) + 1e-4 * t[:, None, None, None]

    return conv, model


def _prior_batches(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)

    def one():
        return {"latents": torch.randn(batch, 4, 4, 4, generator=g, dtype=torch.float64),
                "cond": torch.randn(batch, 3, generator=g, dtype=torch.float64),
                "noise": torch.randn(batch, 4, 4, 4, generator=g, dtype=torch.float64),
                "timesteps": torch.randint(0, 1000, (batch,), generator=g)}

    return one(), one()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prior_preservation_loss_and_gradients_match_diffusers_chunked_batch(prediction_type):
    """``prepare_batch(prior=(class_batch, w))`` + ``step_loss`` is diffusers' ``--with_prior_preservation``:
    instance + class concatenated, ``chunk(2)``, ``mse(instance) + prior_loss_weight · mse(class)``."""
    from sdadapt.training.step import StepConfig, TrainState, prepare_batch, step_loss

    scheduler = _schedule()
    scheduler.register_to_config(prediction_type=prediction_type)
    ac = scheduler.alphas_cumprod.double()
    inst, cls = _prior_batches(3)
    weight = 0.7
    conv, model = _prior_model()

    # ---- diffusers train_dreambooth.py L710-730 (collate: instance then class), L1247-1332 (the loss)
    model_input = torch.cat([inst["latents"], cls["latents"]])
    noise = torch.cat([inst["noise"], cls["noise"]])
    timesteps = torch.cat([inst["timesteps"], cls["timesteps"]])
    encoder_hidden_states = torch.cat([inst["cond"], cls["cond"]])
    noisy_model_input = scheduler.add_noise(model_input, noise, timesteps)
    model_pred = model(noisy_model_input, timesteps, encoder_hidden_states)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(model_input, noise, timesteps)
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    ref = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    ref = ref + weight * prior_loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()

    config = StepConfig(prediction_type=prediction_type)
    prepared = prepare_batch(inst, state=TrainState(seed=0), config=config, alphas_cumprod=ac, prior=(cls, weight))
    loss = step_loss(model, prepared, config)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-6, atol=0)
    for ours, theirs in zip((p.grad for p in conv.parameters()), ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)


def test_class_images_in_the_batch_are_kohyas_per_sample_loss_weights_with_min_snr():
    """``fit``'s image-tensor path puts the class images into the batch with ``loss_weight`` = the prior weight:
    kohya's ``train_db.py`` loss (per-sample mean × ``loss_weights``, then min-SNR, then the batch mean)."""
    from sdadapt.training.step import StepConfig, TrainState, prepare_batch, step_loss

    scheduler = _schedule()
    ac = scheduler.alphas_cumprod.double()
    inst, cls = _prior_batches(2, seed=4)
    weight, gamma = 0.6, 5.0
    batch = {k: torch.cat([inst[k], cls[k]]) for k in inst}
    batch["loss_weight"] = torch.tensor([1.0, 1.0, weight, weight])  # fit's prior_weights: ones, then the weight
    _, model = _prior_model()

    # ---- kohya train_db.py L386-403 and custom_train_functions.py L16-27, L68-76 (apply_snr_weight), transcribed
    all_snr = (ac.sqrt() / (1.0 - ac).sqrt()) ** 2
    noisy_latents = scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    noise_pred = model(noisy_latents, batch["timesteps"], batch["cond"])
    loss = F.mse_loss(noise_pred.float(), batch["noise"].float(), reduction="none")
    loss = loss.mean([1, 2, 3])
    loss = loss * batch["loss_weight"]
    snr = torch.stack([all_snr[t] for t in batch["timesteps"]])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    loss = loss * torch.div(min_snr_gamma, snr).float()
    ref = loss.mean()

    config = StepConfig(min_snr_gamma=gamma)
    ours = step_loss(model, prepare_batch(batch, state=TrainState(seed=0), config=config, alphas_cumprod=ac), config)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=0)


def test_fit_puts_as_many_class_images_as_instance_images_into_each_batch_at_the_prior_weight(monkeypatch):
    """``fit(images, captions, prior=(class_images, class_captions, w))``: each step's batch is B instance rows then
    B class rows, no second forward, with ``loss_weight`` 2 then ``2·w``: the mean over the 2B samples is
    ``instance + w · class``, DreamBooth's loss (diffusers' ``train_dreambooth.py``), as a dataset's class batch
    gives it (it was ``½(instance + w · class)`` here, half the dataset path's for the same ``prior``)."""
    import sys

    from sdadapt.methods import FitConfig, fit, prepare_lora
    from sdadapt.toy import load_toy

    fit_module = sys.modules["sdadapt.methods.fit"]

    seen = []
    real = fit_module.train_step

    def spy(model, batch, **kwargs):
        seen.append((batch["latents"].shape[0], batch.get("loss_weight"), kwargs.get("prior")))
        return real(model, batch, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", spy)
    system = load_toy()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    adaptation = prepare_lora(system, rank=1)
    try:
        fit(system, adaptation, images, ["a red circle", "a blue square"], config=FitConfig(steps=1, batch_size=2),
            prior=(images.flip(0), ["a green circle", "a red square"], 0.25))
    finally:
        adaptation.remove()
    (rows, weights, prior), = seen
    assert rows == 4 and prior is None
    assert weights.tolist() == [2.0, 2.0, 0.5, 0.5]


def test_prior_weight_defaults_to_the_references_1():
    """diffusers' ``--prior_loss_weight`` (train_dreambooth.py L293) and kohya's (train_util.py L4233) default 1.0."""
    from sdadapt.jobs.train import TrainOptions

    assert TrainOptions(images=".").prior_weight == 1.0


def test_trainable_rows_are_float32_over_a_half_precision_table():
    """diffusers and kohya train the token table in float32 (diffusers casts only the frozen parts to the weight
    dtype); sdadapt's trainable rows are float32 over an fp16/bf16 table, spliced in the lookup's dtype."""
    from torch import nn

    from sdadapt.embeddings.table import TokenRows

    for dtype in (torch.float16, torch.bfloat16):
        table = nn.Embedding(10, 4).to(dtype)
        rows = TokenRows(table, [3, 12], torch.randn(2, 4), trainable=True)
        try:
            assert rows.rows.dtype == torch.float32 and rows.rows.requires_grad
            out = table(torch.tensor([[3, 1, 12]]))
            assert out.dtype == dtype and torch.equal(out[0, 2], rows.rows[1].detach().to(dtype))
        finally:
            rows.remove()
        frozen = TokenRows(table, [3], torch.randn(1, 4))
        assert frozen.rows.dtype == dtype and not frozen.rows.requires_grad
        frozen.remove()


def test_init_weights_with_more_vectors_than_the_run_are_refused_as_kohya_asserts(tmp_path):
    """kohya train_textual_inversion.py L272-274 asserts ``len(token_ids) == len(embeddings)``: a file with more
    vectors than ``num_vectors_per_token`` is refused too, not cut."""
    from safetensors.torch import save_file

    from sdadapt.errors import InputError
    from sdadapt.methods import prepare_textual_inversion
    from sdadapt.toy import build_toy

    system = build_toy(seed=1)
    width = system.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"emb_params": torch.randn(3, width)}, str(tmp_path / "three.safetensors"))
    with pytest.raises(InputError, match=r"it has 3 vector\(s\) per token, the run 1; set --vectors 3"):
        prepare_textual_inversion(system, token="<sks>", vectors=1, init_weights=tmp_path / "three.safetensors")


def test_class_images_give_each_chunk_its_own_seed():
    """``class_images`` samples ``batch`` prompts at a time from ``seed + i`` (i the chunk's first prompt), so a
    chunk never repeats another's noise (diffusers' class images come from one advancing generator)."""
    from sdadapt.methods.finetune import class_images

    calls = []

    class Recorder:
        def sample(self, prompts, *, seed, steps):
            calls.append((list(prompts), seed, steps))
            return torch.full((len(prompts), 3, 2, 2), float(seed))

    images, prompts = class_images(Recorder(), ["a", "b", "c", "d", "e"], seed=7, steps=3, batch=2)
    assert calls == [(["a", "b"], 7, 3), (["c", "d"], 9, 3), (["e"], 11, 3)]
    assert prompts == ["a", "b", "c", "d", "e"] and images[:, 0, 0, 0].tolist() == [7, 7, 9, 9, 11]


def test_two_rows_sets_beyond_the_table_each_splice_their_own_token():
    """Two embeddings on one table, both with ids a tokenizer added beyond it (the first's slot table ends before the
    second's id): each position gets its own embedding's row, the table's rows stay elsewhere."""
    from torch import nn

    from sdadapt.embeddings.table import TokenRows

    table = nn.Embedding(10, 4)
    first = TokenRows(table, [10], torch.full((1, 4), 1.0))
    second = TokenRows(table, [11, 12], torch.stack([torch.full((4,), 2.0), torch.full((4,), 3.0)]))
    try:
        out = table(torch.tensor([[12, 10, 11, 4]]))
        assert out[0, :3, 0].tolist() == [3.0, 1.0, 2.0] and torch.equal(out[0, 3], table.weight[4])
    finally:
        second.remove()
        first.remove()


def test_textual_inversion_freezes_the_models_and_gives_back_each_flag_as_it_was():
    """While it trains only the rows have gradients (diffusers freezes UNet, VAE and the encoder); ``remove()``
    puts every ``requires_grad`` back as it was, a frozen UNet staying frozen."""
    from sdadapt.methods import prepare_textual_inversion
    from sdadapt.toy import build_toy

    system = build_toy(seed=1)
    system.unet.requires_grad_(False)
    system.text_encoder.requires_grad_(True)
    ti = prepare_textual_inversion(system, token="<sks>", vectors=2)
    try:
        assert not any(p.requires_grad for m in (system.unet, system.text_encoder) for p in m.parameters())
        assert [tuple(p.shape) for p in ti.params] == [(2, system.text_encoder.get_input_embeddings().weight.shape[1])]
        assert all(p.requires_grad and p.dtype == torch.float32 for p in ti.params)
    finally:
        ti.remove()
    assert not any(p.requires_grad for p in system.unet.parameters())
    assert all(p.requires_grad for p in system.text_encoder.parameters())


def test_save_names_the_embedding_after_the_file_as_a1111_does(tmp_path):
    """A1111 prompts with the file stem; ``save`` writes the stem as the name inside the file too."""
    from sdadapt.methods import prepare_textual_inversion
    from sdadapt.toy import build_toy

    system = build_toy(seed=1)
    ti = prepare_textual_inversion(system, token="<sks>")
    try:
        path = ti.save(tmp_path / "sks.pt")
    finally:
        ti.remove()
    obj = torch.load(path, weights_only=True)
    assert obj["name"] == "sks" and list(obj["string_to_param"]) == ["*"]
