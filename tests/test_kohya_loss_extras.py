"""kohya's ``scale_v_pred_loss_like_noise_pred``, ``v_pred_like_loss``, ``ip_noise_gamma_random_strength``
and masked loss (``alpha_mask``, ``masked_loss`` with ``conditioning_data_dir``): the formulas against
float64 references written here, masks against hand-made PNGs (cropped, scaled, flipped), the step's
draws (eager and captured alike, no host sync), and ``train``'s flags, TOML keys, refusals, run
record and ``ss_*`` metadata.

Reference behaviour (kohya-ss/sd-scripts):

* custom_train_functions.py ``get_snr_scale``: ``snr = min(all_snr[t], 1000)``, ``scale = snr / (snr + 1)``;
  ``scale_v_prediction_loss_like_noise_prediction``: ``loss * scale``; ``add_v_prediction_like_loss``:
  ``loss + loss / scale * v_pred_like_loss``. train_network.py ``post_process_loss`` applies, to the
  per-sample loss (already × ``loss_weights``): min-SNR, then the scale, then the v-like loss, then
  debiased estimation. train_util.py ``verify_training_args``: ``scale_v_pred_loss_like_noise_pred``
  only with ``v_parameterization``, ``v_pred_like_loss`` not with it.
* train_util.py ``get_noise_noisy_latents_and_timesteps``: noise (and offsets), timesteps, then with
  ``ip_noise_gamma``: ``strength = torch.rand(1) * ip_noise_gamma`` when ``ip_noise_gamma_random_strength``,
  and ``add_noise(latents, noise + strength * randn_like(latents), t)`` (the target keeps ``noise``).
  train_network.py metadata: ``ss_ip_noise_gamma_random_strength`` (no ``ss_*`` key for the other
  options here).
* ``apply_masked_loss``: ``mask = conditioning_images[:, 0] / 2 + 0.5`` (red channel) if the batch has
  conditioning images, else ``alpha_masks``; ``F.interpolate(mask, size=loss.shape[2:], mode="area")``;
  ``loss * mask`` before the mean over (C, H, W). train_network.py applies it when ``masked_loss`` or
  the batch has alpha masks. Alpha masks: ``img[:, :, 3] / 255`` after ``trim_and_resize_if_required``
  (ones when the image has no alpha), ``torch.flip(mask, [1])`` with the flipped latents.
"""

from __future__ import annotations

import importlib
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny_models import ConvDenoiser

from sdadapt.cli import build_parser, main
from sdadapt.images import encode_png
from sdadapt.jobs.train import (
    TrainOptions,
    _check_resume,
    _inactive_option_notes,
    _write_run_record,
)
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.training import diffusion as D
from sdadapt.training import step as step_module
from sdadapt.training import step_capture
from sdadapt.training.data import Dataset, encode_buckets, find_images, plan_dataset
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.loss_masks import LossMaskSource
from sdadapt.training.pixel_augment import PixelAugment
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, train_step


# ------------------------------------------------------------------------------ references
def _snr_scale(ac: torch.Tensor, t: int) -> float:
    a = float(ac[t].double())
    snr = min(a / (1 - a), 1000.0) if a < 1 else 1000.0
    return snr / (snr + 1)


def _block_mean(mask: np.ndarray, f: int) -> np.ndarray:
    """Area interpolation by an integer factor, by loops (float64)."""
    h, w = mask.shape[0] // f, mask.shape[1] // f
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            out[i, j] = sum(float(mask[i * f + a, j * f + b]) for a in range(f) for b in range(f)) / (f * f)
    return out


def _ac() -> torch.Tensor:
    return D.alphas_cumprod_of(D.noise_schedule("scaled_linear"))


# ------------------------------------------------------------------------------ pure math
def test_noise_like_scale_and_the_v_like_weight_are_kohyas():
    ac = _ac()
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    snr = D.snr(t, ac)
    for i, step in enumerate(t.tolist()):
        s = _snr_scale(ac, step)
        assert math.isclose(float(D.noise_like_scale(snr)[i]), s, rel_tol=1e-12)
        loss = 0.37
        assert math.isclose(loss * float(D.v_pred_like_weight(snr, 0.2)[i]), loss + loss / s * 0.2, rel_tol=1e-12)
    assert float(D.noise_like_scale(snr)[0]) == pytest.approx(1000 / 1001)  # SNR(0) ≈ 1170 > 1000: capped
    assert float(D.noise_like_scale(torch.tensor([math.inf]))[0]) == pytest.approx(1000 / 1001)
    # why the name: s·v-loss is the ε-loss of the same prediction
    x0, eps = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(2, 4, 3, 3, dtype=torch.float64)
    tt = torch.tensor([300, 700])
    x_t = D.add_noise(x0, eps, tt, ac)
    v_hat = D.target_for("v_prediction", x0_hat, D.predicted_noise("sample", x_t, x0_hat, tt, ac), tt, ac)
    v_loss = ((v_hat - D.target_for("v_prediction", x0, eps, tt, ac)) ** 2).flatten(1).mean(1)
    eps_loss = ((D.predicted_noise("sample", x_t, x0_hat, tt, ac) - eps) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(D.noise_like_scale(D.snr(tt, ac)) * v_loss, eps_loss, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "huber", "l1"])
def test_the_masked_loss_is_kohyas_apply_masked_loss(kind):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    pixel_mask = torch.rand(2, 1, 6, 10, generator=g, dtype=torch.float64)  # an image-size mask
    w = torch.tensor([0.5, 2.0], dtype=torch.float64)
    mask = torch.nn.functional.interpolate(pixel_mask, size=(3, 5), mode="area")
    got = D.diffusion_loss(pred, target, weights=w, kind=kind, huber_c=0.3, mask=mask)
    want = 0.0
    for b in range(2):
        total = 0.0
        for c in range(4):
            for i in range(3):
                for j in range(5):
                    d = float(pred[b, c, i, j] - target[b, c, i, j])
                    e = {"l2": d * d, "l1": abs(d), "huber": 2 * 0.3 * (math.sqrt(d * d + 0.09) - 0.3)}[kind]
                    m = sum(float(pixel_mask[b, 0, 2 * i + a, 2 * j + k]) for a in range(2) for k in range(2)) / 4
                    total += e * m
        want += float(w[b]) * total / (4 * 3 * 5)
    assert float(got) == pytest.approx(want / 2, rel=1e-12)
    ones = D.diffusion_loss(pred, target, weights=w, kind=kind, huber_c=0.3, mask=torch.ones(2, 1, 3, 5, dtype=torch.float64))
    assert torch.equal(ones, D.diffusion_loss(pred, target, weights=w, kind=kind, huber_c=0.3))
    with pytest.raises(ValueError, match=re.escape("mask (2, 1, 6, 10) must be (B, 1, *spatial)")):
        D.diffusion_loss(pred, target, mask=pixel_mask)


# ------------------------------------------------------------------------------ the step
@pytest.mark.parametrize("prediction_type, extra", [
    ("v_prediction", {"scale_v_pred_loss_like_noise_pred": True}),
    ("epsilon", {"v_pred_like_loss": 0.3}),
    ("v_prediction", {"scale_v_pred_loss_like_noise_pred": True, "debiased_estimation": True}),
    ("epsilon", {"v_pred_like_loss": 0.1, "debiased_estimation": True}),
])
def test_the_step_weights_each_sample_in_kohyas_order(prediction_type, extra):
    ac = _ac()
    t = torch.tensor([0, 5, 250, 999])
    lw = torch.tensor([1.0, 0.5, 2.0, 1.0])
    config = StepConfig(prediction_type=prediction_type, min_snr_gamma=5.0, **extra)
    prepared = prepare_batch({"latents": torch.zeros(4, 4, 2, 2, dtype=torch.float64), "cond": None, "timesteps": t,
                              "loss_weight": lw}, state=TrainState(seed=0), config=config, alphas_cumprod=ac)
    v = prediction_type == "v_prediction"
    for i, step in enumerate(t.tolist()):
        a = float(ac[step].double())
        snr = a / (1 - a)
        loss = float(lw[i]) * min(snr, 5.0) / ((snr + 1) if v else snr)  # apply_snr_weight
        s = _snr_scale(ac, step)
        if extra.get("scale_v_pred_loss_like_noise_pred"):
            loss = loss * s
        if extra.get("v_pred_like_loss"):
            loss = loss + loss / s * extra["v_pred_like_loss"]
        if extra.get("debiased_estimation"):
            clamped = min(max(snr, 1e-8), 1000.0)
            loss = loss * (1 / (clamped + 1) if v else 1 / math.sqrt(clamped))
        assert float(prepared["weights"][i]) == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"scale_v_pred_loss_like_noise_pred": True},
     "scale_v_pred_loss_like_noise_pred scales a v-prediction loss, so it needs prediction_type='v_prediction' (got 'epsilon')"),
    ({"v_pred_like_loss": 0.1, "prediction_type": "v_prediction"}, "cannot go with prediction_type='v_prediction'"),
    ({"v_pred_like_loss": -0.1}, "v_pred_like_loss must be a finite number >= 0"),
    ({"v_pred_like_loss": math.inf}, "v_pred_like_loss must be a finite number >= 0"),
])
def test_the_step_config_refuses_what_kohya_refuses(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StepConfig(**kwargs)


def _reference_input(latents: torch.Tensor, seed: int, gamma: float, random_strength: bool):
    """(noise, t, the model's noisy input) in kohya's draw order."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
    strength = gamma * float(torch.rand((1,), generator=g)[0]) if random_strength else gamma
    perturbed = noise + strength * torch.randn(latents.shape, generator=g, dtype=latents.dtype)
    return noise, t, perturbed


@pytest.mark.parametrize("random_strength", [False, True])
def test_the_input_perturbation_strength_is_drawn_in_kohyas_order(random_strength):
    latents = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ac = _ac()
    config = StepConfig(input_perturbation=0.2, input_perturbation_random_strength=random_strength)
    state = TrainState(seed=4)
    prepared = prepare_batch({"latents": latents, "cond": None}, state=state, config=config, alphas_cumprod=ac)
    noise, t, perturbed = _reference_input(latents, 4, 0.2, random_strength)
    assert torch.equal(prepared["t"], t)
    torch.testing.assert_close(prepared["target"], noise, rtol=1e-12, atol=1e-12)
    a = ac[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(prepared["x_t"], a.sqrt() * latents + (1 - a).sqrt() * perturbed, rtol=1e-12, atol=1e-12)
    # one strength per batch, in [0, γ): the rows share it; a fresh one next batch
    if random_strength:
        strengths = []
        for _ in range(100):
            g = torch.Generator().set_state(state.generator.get_state())
            torch.randn(latents.shape, generator=g, dtype=torch.float64)
            torch.randint(0, 1000, (3,), generator=g)
            strengths.append(0.2 * float(torch.rand((1,), generator=g)[0]))
            prepare_batch({"latents": latents, "cond": None}, state=state, config=config, alphas_cumprod=ac)
        assert 0 <= min(strengths) < 0.02 and 0.18 < max(strengths) < 0.2 and len(set(strengths)) == 100


def test_the_new_options_off_draw_and_weigh_what_they_did():
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    ac = _ac().float()
    old = prepare_batch({"latents": latents, "cond": None}, state=TrainState(seed=3), alphas_cumprod=ac,
                        config=StepConfig(input_perturbation=0.1, min_snr_gamma=5.0))
    new = prepare_batch({"latents": latents, "cond": None}, state=TrainState(seed=3), alphas_cumprod=ac,
                        config=StepConfig(input_perturbation=0.1, min_snr_gamma=5.0, input_perturbation_random_strength=False,
                                          v_pred_like_loss=0.0, scale_v_pred_loss_like_noise_pred=False))
    assert torch.equal(old["x_t"], new["x_t"]) and torch.equal(old["weights"], new["weights"]) and "loss_mask" not in new
    # the random strength without a perturbation draws nothing
    a = TrainState(seed=3)
    prepare_batch({"latents": latents, "cond": None}, state=a, alphas_cumprod=ac,
                  config=StepConfig(input_perturbation_random_strength=True))
    b = TrainState(seed=3)
    prepare_batch({"latents": latents, "cond": None}, state=b, alphas_cumprod=ac, config=StepConfig())
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


_EXTRAS = StepConfig(input_perturbation=0.1, input_perturbation_random_strength=True, v_pred_like_loss=0.2,
                     min_snr_gamma=5.0, loss="huber", max_grad_norm=None)


def _masked_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(2, 4, 4, 4, generator=g), "cond": None, "loss_mask": torch.rand(2, 1, 4, 4, generator=g)}


def test_eager_and_captured_steps_draw_and_mask_the_same(fake_cuda_graphs, prepared_batches):
    ac = _ac().float()
    keys = ("x_t", "weights", "loss_mask")
    eager_seen, captured_seen = prepared_batches(step_module, *keys), prepared_batches(step_capture, *keys)
    torch.manual_seed(0)
    model = ConvDenoiser()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eager_state, captured_state = TrainState(seed=7), TrainState(seed=7)
    eager_losses = [train_step(model, _masked_batch(i), params=list(model.parameters()), optimizer=opt, state=eager_state,
                               config=_EXTRAS, alphas_cumprod=ac)["loss"] for i in range(4)]
    captured = step_capture.CapturedStep(model, params=list(model.parameters()), optimizer=opt, config=_EXTRAS,
                                         alphas_cumprod=ac, warmup_steps=1)
    captured_losses = [captured(_masked_batch(i), state=captured_state)["loss"] for i in range(4)]  # warm-up, capture, 2 replays
    assert captured.graph_count == 1 and len(eager_seen) == len(captured_seen) == 4
    for a, b in zip(eager_seen, captured_seen):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    for x, y in zip(eager_losses[:2], captured_losses[:2]):  # the warm-up and the capture run the step (replays: stubs)
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
    (entry,) = captured._graphs.values()  # the mask is a static input of the graph, refreshed at each replay
    assert not torch.equal(captured_seen[-1][2], captured_seen[-2][2])  # (each batch has its own mask)
    assert any(isinstance(leaf, torch.Tensor) and torch.equal(leaf, captured_seen[-1][2]) for leaf in entry.static_leaves)
    assert torch.equal(eager_state.generator.get_state(), captured_state.generator.get_state())


def test_a_zero_mask_trains_nothing():
    torch.manual_seed(0)
    model = ConvDenoiser()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    batch = {**_masked_batch(), "loss_mask": torch.zeros(2, 1, 4, 4)}
    metrics = train_step(model, batch, params=list(model.parameters()), optimizer=opt, state=TrainState(seed=0),
                         config=_EXTRAS, alphas_cumprod=_ac().float())
    assert float(metrics["loss"]) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_new_options_make_no_host_sync():
    torch.manual_seed(0)
    model = ConvDenoiser()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    state = TrainState(seed=0)
    ac = _ac().float()
    configs = [_EXTRAS, StepConfig(prediction_type="v_prediction", scale_v_pred_loss_like_noise_pred=True, input_perturbation=0.1,
                                   input_perturbation_random_strength=True)]
    batches = [_masked_batch() for _ in range(6)]  # (made before the recording: the loader's device tensors)
    with HostSyncs() as syncs:
        for config in configs:
            train_step(model, batches.pop(), params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
            for _ in range(2):
                batch = batches.pop()
                syncs.events.clear()
                train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
                assert [str(e) for e in syncs.events] == []


# ------------------------------------------------------------------------------ masks from images
def _rgba(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)


@pytest.fixture
def masked_images(tmp_path):
    """Two RGBA PNGs: 32x48 (kept, centre-cropped 8 px each side at resolution 32) and 64x64 (halved),
    and one RGB PNG (no alpha: mask of ones)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = {"a": _rgba(32, 48, 1), "b": _rgba(64, 64, 2), "c": _rgba(32, 32, 3)[..., :3].copy()}
    for name, arr in pixels.items():
        (folder / f"{name}.png").write_bytes(encode_png(arr))
        (folder / f"{name}.txt").write_text("a red circle")
    return folder, pixels


def _expected_alpha(arr: np.ndarray, *, flipped: bool = False, crop: tuple[int, int] | None = None,
                    scaled: bool = True) -> np.ndarray:
    """kohya's alpha mask of a toy-resolution (32) image at the toy latents' size (16), by hand (``scaled=False``:
    the 64x64 image's window at its own size, kohya's no-bucket random crop)."""
    alpha = arr[..., 3].astype(np.float64) / 255 if arr.shape[-1] == 4 else np.ones(arr.shape[:2])
    if alpha.shape == (64, 64) and scaled:
        alpha = _block_mean(alpha, 2)  # scaled down to cover 32x32: area
    top, left = crop if crop is not None else ((alpha.shape[0] - 32) // 2, (alpha.shape[1] - 32) // 2)
    alpha = alpha[top: top + 32, left: left + 32]
    if flipped:
        alpha = alpha[:, ::-1]
    return _block_mean(alpha, 2)  # the toy's latents are half the pixels' size


def test_alpha_masks_are_cached_at_the_latents_size_and_flip_with_them(masked_images):
    folder, pixels = masked_images
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, buckets=False)
    dataset = Dataset(records, flip=True, loss_masks=LossMaskSource())
    encode_buckets(dataset, build_toy(seed=0).encode_images, batch=2)
    (bucket,) = dataset.masks
    members = [records[i].path.stem for i in dataset.members[bucket]]
    assert dataset.masks[bucket].shape == (3, 1, 16, 16)
    for flips in ([False, False, False], [True, False, True]):
        got = dataset.batch_masks(bucket, [0, 1, 2], flips)
        for row, (name, flipped) in enumerate(zip(members, flips)):
            np.testing.assert_allclose(got[row, 0].double().numpy(), _expected_alpha(pixels[name], flipped=flipped),
                                       rtol=1e-5, atol=1e-6)
    assert dataset.latent_bytes() == sum(t.numel() * 4 for t in (*dataset.latents.values(), *dataset.latents_flipped.values(),
                                                                 *dataset.masks.values()))


def test_random_crops_crop_the_masks_as_the_pixels(masked_images):
    import random

    folder, pixels = masked_images
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, buckets=False)
    dataset = Dataset(records, loss_masks=LossMaskSource(), augment=PixelAugment(random_crop=True))
    encode_buckets(dataset, build_toy(seed=0).encode_images)
    assert dataset.masks == {}  # nothing cached
    a = next(r for r in records if r.path.stem == "a")
    seen = set()
    for seed in range(12):
        images, crops = dataset.pixel_batch([a, a], [False, True], random.Random(seed))
        masks = dataset.pixel_masks([a, a], crops, [False, True], (16, 16))
        for row, flipped in enumerate([False, True]):
            np.testing.assert_allclose(masks[row, 0].double().numpy(), _expected_alpha(pixels["a"], flipped=flipped, crop=crops[row]),
                                       rtol=1e-5, atol=1e-6)
            # the image's pixels come from the same window: its stored red channel (alpha dropped, kohya's
            # convert("RGB")), cropped and flipped by hand
            red = pixels["a"].astype(np.float64)[..., 0] / 255
            top, left = crops[row]
            window = red[top: top + 32, left: left + 32]
            np.testing.assert_allclose(images[row, 0].double().numpy(), (window[:, ::-1] if flipped else window) * 2 - 1,
                                       atol=1e-5)
            seen.add(crops[row])
    assert len(seen) > 3


def test_mask_images_are_the_red_channel_and_must_match_their_image(masked_images, tmp_path):
    folder, pixels = masked_images
    masks = tmp_path / "masks"
    masks.mkdir()
    red = {name: _rgba(*arr.shape[:2], 10 + i)[..., :3].copy() for i, (name, arr) in enumerate(pixels.items())}
    for name, arr in red.items():
        (masks / f"{name}.png").write_bytes(encode_png(arr))
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, buckets=False)
    source = LossMaskSource(masks)
    assert source.missing(records) == []
    dataset = Dataset(records, loss_masks=source)
    encode_buckets(dataset, build_toy(seed=0).encode_images)
    (bucket,) = dataset.masks
    for row, index in enumerate(dataset.members[bucket]):
        name = records[index].path.stem
        as_alpha = np.concatenate([red[name], red[name][..., :1]], axis=-1)  # the red channel where the alpha was
        np.testing.assert_allclose(dataset.masks[bucket][row, 0].double().numpy(), _expected_alpha(as_alpha), rtol=1e-5, atol=1e-6)
    (masks / "b.png").write_bytes(encode_png(_rgba(32, 32, 0)[..., :3].copy()))
    with pytest.raises(ValueError, match="the mask is 32x32 but its image .* is 64x64"):
        encode_buckets(Dataset(records, loss_masks=source), build_toy(seed=0).encode_images)
    (masks / "c.png").unlink()
    assert source.missing(records) == ["c.png"]


def test_fit_trains_on_the_masked_batches(masked_images, train_step_batches):
    folder, pixels = masked_images
    seen = train_step_batches
    system = build_toy(seed=1)
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, buckets=False)
    dataset = Dataset(records, flip=True, loss_masks=LossMaskSource())
    encode_buckets(dataset, system.encode_images)
    config = FitConfig(steps=3, batch_size=2, warmup_steps=0)
    fit(system, METHODS["lora"].adapt(system, seed=1), dataset, config=config)
    assert len(seen) == 3
    # each row's mask is that of the row's own latents (the image and the flip coin are fit's own draws):
    # the row's latents say which image and which side, and its mask must be that image's, mirrored alike
    (bucket,) = dataset.latents
    names = [records[i].path.stem for i in dataset.members[bucket]]
    latents = {(name, f): (dataset.latents_flipped if f else dataset.latents)[bucket][k]
               for k, name in enumerate(names) for f in (False, True)}
    used = set()
    for batch in seen:
        assert batch["loss_mask"].shape == (batch["latents"].shape[0], 1, 16, 16)
        for row, mask in zip(batch["latents"], batch["loss_mask"], strict=True):
            (name, flipped), = [key for key, cached in latents.items() if torch.equal(row.cpu(), cached)]
            np.testing.assert_allclose(mask[0].double().numpy(), _expected_alpha(pixels[name], flipped=flipped),
                                       rtol=1e-5, atol=1e-6)
            used.add(flipped)
    assert used == {False, True}  # both sides were drawn (else the flip of the masks went untested here)


def test_train_with_random_crops_and_flips_sends_the_masks_of_each_window(masked_images, tmp_path, train_step_batches):
    folder, pixels = masked_images
    seen = train_step_batches
    out = tmp_path / "c.safetensors"
    assert main(["train", "lora", "--images", str(folder), "--alpha-mask", "--random-crop", "--flip-aug", "--no-bucket",
                 "--steps", "3", "--batch-size", "3", "--no-prior", "-o", str(out)]) == 0
    assert len(seen) == 3
    a = pixels["a"]  # 48 px wide: 17 windows, each one's mask computed by hand, mirrored or not
    windows = [_expected_alpha(a, flipped=f, crop=(0, left)) for left in range(17) for f in (False, True)]
    # b (64x64) unscaled, a 32x32 window anywhere in it (kohya's no-bucket random crop); c (32x32) whole
    others = [_expected_alpha(pixels["b"], flipped=f, crop=(top, left), scaled=False)
              for top in range(33) for left in range(33) for f in (False, True)]
    others += [_expected_alpha(pixels["c"], flipped=f) for f in (False, True)]
    for batch in seen:
        assert batch["loss_mask"].shape == (3, 1, 16, 16)
        for row in batch["loss_mask"]:
            assert any(np.allclose(row[0].double().numpy(), c, rtol=1e-5, atol=1e-6) for c in windows + others)


# ------------------------------------------------------------------------------ train: flags, TOML, metadata
def test_a_kohya_config_with_the_options_trains_with_them_and_records_them(masked_images, tmp_path, train_fit_calls):
    folder = masked_images[0]
    toml = tmp_path / "kohya.toml"
    toml.write_text("""
[training_arguments]
ip_noise_gamma = 0.1
ip_noise_gamma_random_strength = true
v_pred_like_loss = 0.2
alpha_mask = true
""")
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(folder), "--config", str(toml), "--steps", "1", "--batch-size", "2",
                 "--no-prior", "-o", str(out)]) == 0
    ((config, dataset),) = [(call.config, call.dataset) for call in train_fit_calls]
    step = config.step
    assert (step.input_perturbation, step.input_perturbation_random_strength, step.v_pred_like_loss,
            step.scale_v_pred_loss_like_noise_pred) == (0.1, True, 0.2, False)
    assert dataset.loss_masks == LossMaskSource() and dataset.masks
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_ip_noise_gamma"], meta["ss_ip_noise_gamma_random_strength"]) == ("0.1", "True")


def test_masked_loss_reads_the_conditioning_folder(masked_images, tmp_path, monkeypatch):
    folder, pixels = masked_images
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, arr in pixels.items():
        (masks / f"{name}.png").write_bytes(encode_png(arr[..., :3].copy()))
    jobs = importlib.import_module("sdadapt.jobs.train")
    seen = []
    monkeypatch.setattr(jobs, "fit", lambda system, adaptation, dataset, *a, **k: seen.append(dataset) or [0.1])
    out = tmp_path / "m.safetensors"
    main(["train", "lora", "--images", str(folder), "--masked-loss", "--conditioning-data-dir", str(masks), "--alpha-mask",
          "--steps", "1", "--batch-size", "2", "--no-prior", "-o", str(out)])
    assert seen and seen[0].loss_masks == LossMaskSource(masks)


def test_a_dataset_tomls_subsets_give_their_own_mask_folders(tmp_path, monkeypatch, capsys):
    """kohya's masked loss from a dataset TOML (kohya_ss's masked-loss test configs): each subset's
    ``conditioning_data_dir`` holds its images' masks, found by name there only (config_util.py's ControlNet subsets,
    train_util.py ``glob_images(subset.conditioning_data_dir, basename)``). Two subsets whose images share a name
    and whose masks differ: each image gets its own subset's red channel / 255."""
    jobs = importlib.import_module("sdadapt.jobs.train")
    blocks = []
    expected: dict[str, np.ndarray] = {}
    for k, sub in enumerate(("one", "two")):
        images, masks = tmp_path / sub, tmp_path / f"{sub}_masks"
        images.mkdir()
        masks.mkdir()
        for name in ("a", "b"):
            (images / f"{name}.png").write_bytes(encode_png(_rgba(32, 32, 10 * k + ord(name))[..., :3].copy()))
            (images / f"{name}.txt").write_text("a red circle")
            mask = _rgba(32, 32, 100 + 10 * k + ord(name))[..., :3].copy()
            (masks / f"{name}.png").write_bytes(encode_png(mask))
            expected[f"{images}/{name}.png"] = mask[..., 0].astype(np.float32) / 255
        blocks.append(f"[[datasets.subsets]]\nimage_dir = '{images}'\nconditioning_data_dir = '{masks}'\n"
                      "caption_extension = '.txt'\n")
    toml = tmp_path / "dataset.toml"
    toml.write_text("[general]\nresolution = 32\n[[datasets]]\nbatch_size = 2\n" + "".join(blocks))
    seen = []
    monkeypatch.setattr(jobs, "fit", lambda system, adaptation, dataset, *a, **k: seen.append(dataset) or [0.1])
    out = tmp_path / "m.safetensors"
    cli_masks = tmp_path / "cli_masks"  # (kohya reads no --conditioning_data_dir beside a dataset config: the
    cli_masks.mkdir()  # subsets' own folders, config_util.py's BlueprintGenerator; a flag given is unused, said)
    for name in ("a", "b"):
        (cli_masks / f"{name}.png").write_bytes(encode_png(np.full((32, 32, 3), 255, np.uint8)))
    main(["train", "lora", "--dataset-config", str(toml), "--masked-loss", "--steps", "1", "--no-prior",
          "--conditioning-data-dir", str(cli_masks), "-o", str(out)])
    (dataset,) = seen
    assert dataset.loss_masks == LossMaskSource(per_subset=True)
    err = capsys.readouterr().err
    assert "--masked-loss: no masks" not in err and f"--conditioning-data-dir {cli_masks}: not used" in err
    read = {str(r.path): dataset.loss_masks.read(r)[0].numpy() for r in dataset.records}
    assert read.keys() == expected.keys()
    for path, mask in expected.items():
        np.testing.assert_array_equal(read[path], mask)
    other = tmp_path / "n.safetensors"
    assert main(["train", "lora", "--dataset-config", str(toml), "--steps", "1", "--no-prior", "-o", str(other)]) == 2
    assert "read only with --masked-loss" in capsys.readouterr().err
    (tmp_path / "two_masks" / "b.png").unlink()
    assert main(["train", "lora", "--dataset-config", str(toml), "--masked-loss", "--steps", "1", "--no-prior",
                 "-o", str(other)]) != 0
    assert "no mask image in its subset's conditioning_data_dir for 1 training image(s): b.png" in capsys.readouterr().err


def test_the_flags_reach_the_options():
    args = build_parser().parse_args(["train", "lora", "--images", ".", "--ip-noise-gamma", "0.1",
                                      "--ip-noise-gamma-random-strength", "--scale-v-pred-loss-like-noise-pred",
                                      "--v-pred-like-loss", "0.3", "--alpha-mask", "--masked-loss",
                                      "--conditioning-data-dir", "m"])
    assert (args.ip_noise_gamma_random_strength, args.scale_v_pred_loss_like_noise_pred, args.v_pred_like_loss,
            args.alpha_mask, args.masked_loss, args.conditioning_data_dir) == (True, True, 0.3, True, True, "m")


@pytest.mark.parametrize("flags, message", [
    (["--scale-v-pred-loss-like-noise-pred"],  # refused after loading: the toy predicts ε
     "--scale-v-pred-loss-like-noise-pred scales a v-prediction loss and toy predicts epsilon"),
    (["--scale-v-pred-loss-like-noise-pred", "--prediction-type", "epsilon"], "scales a v-prediction loss"),
    (["--v-pred-like-loss", "0.1", "--prediction-type", "v_prediction"], "adds a v-prediction-like loss to an epsilon"),
    (["--v-pred-like-loss", "-1"], "--v-pred-like-loss must be a finite number >= 0"),
    (["--conditioning-data-dir", "."], "read only with --masked-loss"),
    (["--masked-loss", "--conditioning-data-dir", "/no/such/folder"], "no such folder"),  # (exit 3: a missing file)
])
def test_bad_combinations_are_refused_before_training(red_circles, tmp_path, capsys, flags, message):
    out = tmp_path / "x.safetensors"
    code = 3 if "/no/such/folder" in flags else 2
    assert main(["train", "lora", "--images", str(red_circles), *flags, "--steps", "1", "-o", str(out)]) == code
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_v_pred_like_loss_is_refused_with_zero_terminal_snr():
    """Its weight ``1 + X/s`` is infinite at SNR 0 (kohya trains it: its weights read the SNR before the rescale)."""
    from sdadapt.methods.fit import zero_terminal_snr_clashes

    assert zero_terminal_snr_clashes(StepConfig(v_pred_like_loss=0.1))
    assert float(D.v_pred_like_weight(torch.tensor([0.0]), 0.1)[0]) == math.inf
    with pytest.raises(ValueError, match="--zero-terminal-snr with --v-pred-like-loss 0.1"):
        TrainOptions(images=".", zero_terminal_snr=True, v_pred_like_loss=0.1)
    system = build_toy(seed=1)
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="v_pred_like_loss 0.1 \\(its weight"):
        fit(system, METHODS["lora"].adapt(system, seed=1), images, ["a", "b"], config=FitConfig(
            steps=1, batch_size=2, warmup_steps=0, zero_terminal_snr=True, step=StepConfig(v_pred_like_loss=0.1)))


def test_missing_mask_images_are_refused_before_the_model_loads(red_circles, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "0.png").write_bytes(encode_png(_rgba(32, 32, 0)[..., :3].copy()))
    out = tmp_path / "x.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--masked-loss", "--conditioning-data-dir", str(masks),
                 "--steps", "1", "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert "no mask image for 2 training image(s): 1.png, 2.png" in captured.err
    assert "loading" not in captured.out + captured.err


def test_options_given_without_what_they_act_with_are_reported():
    notes = " | ".join(_inactive_option_notes(TrainOptions(images=".", ip_noise_gamma_random_strength=True, masked_loss=True)))
    assert "--ip-noise-gamma-random-strength: not used without --ip-noise-gamma" in notes
    assert "--masked-loss: no masks to apply" in notes
    assert not _inactive_option_notes(TrainOptions(images=".", ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                                                   masked_loss=True, alpha_mask=True))


def test_resume_refuses_a_changed_random_strength(tmp_path):
    options = TrainOptions(images=".", ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    _write_run_record(tmp_path, "lora", options, 1, 2)
    (tmp_path / "state.json").write_text(json.dumps({"step": 1}))
    assert _check_resume(tmp_path, "lora", options)["noise"]["ip_noise_gamma_random_strength"] is True
    with pytest.raises(ValueError, match="ip_noise_gamma_random_strength True \\(now False\\)"):
        _check_resume(tmp_path, "lora", TrainOptions(images=".", ip_noise_gamma=0.1))
    record = json.loads((tmp_path / "run.json").read_text())
    del record["noise"]["ip_noise_gamma_random_strength"]  # a record from before the option: trained without it
    (tmp_path / "run.json").write_text(json.dumps(record))
    _check_resume(tmp_path, "lora", TrainOptions(images=".", ip_noise_gamma=0.1))
