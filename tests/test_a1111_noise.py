"""A1111's noise (``sdadapt.samplers.a1111_noise``, ``generate(noise=...)``, ``generate --noise a1111``):
the NV (Philox) and CPU sources, variation seeds, "Resize seed from", ENSD, and a k-diffusion loop with A1111's
noise path, each against a transcription of A1111's ``modules/rng.py`` / ``rng_philox.py`` written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdadapt.samplers import sample_latents
from sdadapt.samplers.a1111_noise import (
    A1111Noise,
    A1111Seeds,
    PhiloxGenerator,
    paste_centre,
    philox_randn,
    slerp,
)
from sdadapt.samplers.sigma_space import training_sigmas


# ------------------------------------------------- A1111's rng_philox.py, transcribed (numpy, its own layout)
def _as_words(values: np.ndarray) -> np.ndarray:
    """(N,) uint64 -> (2, N) uint32 (low word, high word), as numpy's little-endian view gives them."""
    return values.view(np.uint32).reshape(-1, 2).transpose(1, 0)


def _reference_round(counter: np.ndarray, key: np.ndarray) -> None:
    v1 = _as_words(counter[0].astype(np.uint64) * 0xD2511F53)
    v2 = _as_words(counter[2].astype(np.uint64) * 0xCD9E8D57)
    counter[0] = v2[1] ^ counter[1] ^ key[0]
    counter[1] = v2[0]
    counter[2] = v1[1] ^ counter[3] ^ key[1]
    counter[3] = v1[0]


def reference_philox_randn(seed: int, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    n = int(np.prod(shape))
    counter = np.zeros((4, n), dtype=np.uint32)
    counter[0] = offset
    counter[2] = np.arange(n, dtype=np.uint32)
    key = np.empty(n, dtype=np.uint64)
    key.fill(seed)
    key = _as_words(key).copy()
    for _ in range(9):
        _reference_round(counter, key)
        key[0] = key[0] + 0x9E3779B9
        key[1] = key[1] + 0xBB67AE85
    _reference_round(counter, key)
    scale = np.array([2.3283064e-10], dtype=np.float32)
    scale_2pi = np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)
    u = counter[0] * scale + scale / 2
    v = counter[1] * scale_2pi + scale_2pi / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)


@pytest.mark.parametrize("seed,shape,offset", [(0, (3, 4), 0), (1234, (4, 8, 8), 0), (2**32 + 77, (2, 5, 3), 3),
                                               (4294967295, (7,), 1), (31337, (4, 16, 12), 2)])
def test_philox_randn_equals_a1111s_generator_bit_for_bit(seed, shape, offset):
    got = philox_randn(seed, shape, offset=offset)
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    assert np.array_equal(got.numpy(), reference_philox_randn(seed, shape, offset))


def test_philox_randn_gives_cudas_numbers_rng_philox_states():
    """rng_philox.py's docstring: ``Generator(seed=0).randn((3, 4))`` prints what ``torch.randn`` on CUDA gives."""
    want = torch.tensor([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    assert torch.allclose(philox_randn(0, (3, 4)), want, atol=3e-7, rtol=0)  # (printed to 8 digits)
    g = PhiloxGenerator(0)
    assert torch.equal(g.randn((3, 4)), philox_randn(0, (3, 4)))
    assert torch.equal(g.randn((3, 4)), philox_randn(0, (3, 4), offset=1))
    # the numbers are unit normals (a sanity check on the Box–Muller half)
    big = philox_randn(5, (200_000,))
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU to compare with torch.randn on CUDA")
@pytest.mark.parametrize("seed,shape", [(12345, (4, 64, 64)), (2**40 + 3, (4, 128, 128)), (0, (3, 4))])
def test_philox_randn_equals_torch_randn_on_cuda(seed, shape):
    """CUDA's ``torch.randn`` (curand's Philox, Box–Muller in float32 ``logf``/``sinf``) against the float64
    Box–Muller of rng_philox.py rounded to float32: the same numbers up to an ulp or two; the second draw of the
    generator at the next counter (``offset=1``)."""
    if torch.version.hip is not None:
        pytest.skip("ROCm's torch.randn is not curand's Philox (A1111's NV source is NVIDIA's)")
    torch.manual_seed(seed)
    first = torch.randn(shape, device="cuda").cpu()
    second = torch.randn(shape, device="cuda").cpu()
    for got, want in ((philox_randn(seed, shape), first), (philox_randn(seed, shape, offset=1), second)):
        err = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
        assert err <= 4e-6, f"philox_randn differs from CUDA's torch.randn by {err} (seed {seed}, shape {shape})"


# ------------------------------------------------- A1111's ImageRNG, transcribed
def reference_slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ReferenceImageRNG:
    """A1111's ``ImageRNG`` with its ``randn``/``create_generator`` for one source ("NV" or "CPU")."""

    def __init__(self, source, shape, seeds, subseeds=None, subseed_strength=0.0, resize_h=0, resize_w=0, ensd=0):
        self.source, self.shape, self.seeds = source, shape, seeds
        self.subseeds, self.subseed_strength, self.resize_h, self.resize_w = subseeds, subseed_strength, resize_h, resize_w
        self.ensd = ensd
        self.generators = [self.create_generator(s) for s in seeds]
        self.is_first = True

    def create_generator(self, seed):
        if self.source == "NV":
            return {"seed": seed, "offset": 0}
        return torch.Generator("cpu").manual_seed(int(seed))

    def randn(self, seed, shape, generator=None):
        if generator is None:
            generator = self.create_generator(seed)
        if self.source == "NV":
            out = torch.from_numpy(reference_philox_randn(generator["seed"], shape, generator["offset"]))
            generator["offset"] += 1
            return out
        return torch.randn(shape, generator=generator)

    def first(self):
        noise_shape = self.shape if self.resize_h <= 0 or self.resize_w <= 0 else \
            (self.shape[0], self.resize_h // 8, self.resize_w // 8)
        xs = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = 0 if i >= len(self.subseeds) else self.subseeds[i]
                subnoise = self.randn(subseed, noise_shape)
            if noise_shape != self.shape:
                noise = self.randn(seed, noise_shape)
            else:
                noise = self.randn(seed, self.shape, generator=generator)
            if subnoise is not None:
                noise = reference_slerp(self.subseed_strength, noise, subnoise)
            if noise_shape != self.shape:
                x = self.randn(seed, self.shape, generator=generator)
                dx = (self.shape[2] - noise_shape[2]) // 2
                dy = (self.shape[1] - noise_shape[1]) // 2
                w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx, ty = (max(dx, 0)), (max(dy, 0))
                dx, dy = max(-dx, 0), max(-dy, 0)
                x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
                noise = x
            xs.append(noise)
        if self.ensd:
            self.generators = [self.create_generator(seed + self.ensd) for seed in self.seeds]
        return torch.stack(xs)

    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([self.randn(None, self.shape, generator=g) for g in self.generators])


CASES = [
    {"seeds": [7], "source": "nv"},
    {"seeds": [7, 8, 9], "source": "cpu"},
    {"seeds": [100, 101], "source": "nv", "ensd": 31337},
    {"seeds": [100, 101], "source": "cpu", "ensd": 31337},
    {"seeds": [3, 4], "source": "nv", "subseeds": [50, 51], "subseed_strength": 0.3},
    {"seeds": [3, 4, 5], "source": "cpu", "subseeds": [50], "subseed_strength": 0.8},  # image past the list: subseed 0
    {"seeds": [3], "source": "nv", "resize": (48, 64)},  # smaller: pasted in the middle
    {"seeds": [3, 9], "source": "cpu", "resize": (160, 40), "subseeds": [2, 3], "subseed_strength": 0.5, "ensd": 5},  # mixed
    {"seeds": [4], "source": "cpu", "resize": (56, 72)},  # odd differences (5, 1): A1111's offsets round down
    {"seeds": [4], "source": "nv", "resize": (120, 104), "subseeds": [8], "subseed_strength": 0.6},  # odd, larger
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_start_and_sampler_noise_equal_a1111s_image_rng(case):
    shape = (4, 12, 10)  # (C, H, W) latent: 80x96 pixels
    resize = case.get("resize")
    ref = ReferenceImageRNG(case["source"].upper(), shape, case["seeds"], case.get("subseeds"),
                            case.get("subseed_strength", 0.0), *(resize or (0, 0)), ensd=case.get("ensd", 0))
    noise = A1111Noise(case["seeds"], source=case["source"], subseeds=case.get("subseeds"),
                       subseed_strength=case.get("subseed_strength", 0.0), seed_resize_from=resize,
                       ensd=case.get("ensd", 0))
    batch = (len(case["seeds"]), *shape)
    assert torch.equal(noise.start_noise(batch), ref.next())
    like = torch.zeros(batch)
    for _ in range(3):
        assert torch.equal(noise.next_noise(like), ref.next())


def test_each_image_of_a_batch_draws_what_it_draws_alone_and_ensd_moves_only_the_sampler_noise():
    shape = (2, 4, 6, 6)
    together = A1111Noise([10, 11], source="nv")
    alone = A1111Noise([11], source="nv")
    assert torch.equal(together.start_noise(shape)[1], alone.start_noise((1, 4, 6, 6))[0])
    assert torch.equal(together.next_noise()[1], alone.next_noise()[0])
    plain, delta = A1111Noise([10], source="cpu"), A1111Noise([10], source="cpu", ensd=31337)
    assert torch.equal(plain.start_noise((1, 4, 6, 6)), delta.start_noise((1, 4, 6, 6)))
    assert torch.equal(delta.next_noise(), torch.randn((4, 6, 6), generator=torch.Generator().manual_seed(31347))[None])
    assert not torch.equal(plain.next_noise(), delta.next_noise())


def test_slerp_equals_a1111s_including_its_near_parallel_case():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(4, 8, 6, generator=g), torch.randn(4, 8, 6, generator=g)
    for val in (0.0, 0.25, 1.0):
        assert torch.equal(slerp(val, low, high), reference_slerp(val, low, high))
    # (nearly) the same noise: A1111's linear fallback, its weights as written (low·val + high·(1 − val))
    near = low + 1e-4 * high
    assert torch.equal(slerp(0.2, low, near), low * 0.2 + near * 0.8)


def test_paste_centre_cuts_and_pads_as_a1111():
    full = torch.zeros(1, 6, 8)
    small = torch.arange(1 * 2 * 4, dtype=torch.float32).reshape(1, 2, 4) + 1
    out = paste_centre(small, full)
    assert torch.equal(out[:, 2:4, 2:6], small) and float(out.sum()) == float(small.sum())
    large = torch.arange(1 * 10 * 3, dtype=torch.float32).reshape(1, 10, 3)
    out = paste_centre(large, torch.zeros(1, 4, 5))  # taller (cut), narrower (pasted)
    assert torch.equal(out[:, :, 1:4], large[:, 3:7, :]) and float(out[:, :, [0, 4]].abs().sum()) == 0


def test_the_noise_is_refused_before_start_and_for_another_shape():
    noise = A1111Noise([1], source="nv")
    with pytest.raises(RuntimeError, match="start noise"):
        noise.next_noise()
    with pytest.raises(ValueError, match=r"\(1, C, H, W\)"):
        noise.start_noise((2, 4, 8, 8))
    noise.start_noise((1, 4, 8, 8))
    with pytest.raises(ValueError, match="asked"):
        noise.next_noise(torch.zeros(1, 4, 8, 9))
    with pytest.raises(ValueError, match="noise source"):
        A1111Noise([1], source="gpu-ish")
    with pytest.raises(ValueError, match="needs a subseed"):
        A1111Seeds(subseed_strength=0.5)
    assert A1111Seeds(subseed=5).for_batch(3, 2).subseeds == (5, 6)
    assert A1111Seeds(subseed=5).for_batch(3, 3).seeds == (3, 4, 5)  # A1111's all_seeds: seed + i
    # ... + (x if subseed_strength == 0 else 0): with a variation strength every image has the seed, its variation
    # seed differs (the API's several prompts drew seed + i before)
    varied = A1111Seeds(subseed=5, subseed_strength=0.4).for_batch(3, 3)
    assert varied.seeds == (3, 3, 3) and varied.subseeds == (5, 6, 7)
    with pytest.raises(ValueError, match="subseed must be >= 0"):
        A1111Seeds(subseed=-1)
    with pytest.raises(ValueError, match="seed \\+ ensd"):
        A1111Noise([3], source="cpu", ensd=-4)


# ------------------------------------------------- a k-diffusion loop with A1111's noise path
def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _stand_in(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth ε model: the sample and its timestep mixed (no weights to load)."""
    return 0.6 * x_in + 0.1 * torch.tanh(x_in.roll(1, dims=-1)) + (t.double().view(-1, 1, 1, 1) / 1000.0) * 0.05


def _kdiffusion_sigmas(train: np.ndarray, n: int) -> list[float]:
    """k-diffusion's ``DiscreteSchedule.get_sigmas(n)`` (A1111's "Uniform" / "Automatic" for Euler a)."""
    log_sigmas = np.log(train)
    out = []
    for t in np.linspace(len(train) - 1, 0, n):
        lo, hi, w = math.floor(t), math.ceil(t), t - math.floor(t)
        out.append(math.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]))
    return out + [0.0]


def _sigma_to_t(train: np.ndarray, sigma: float) -> float:
    log_sigmas, log_sigma = np.log(train), math.log(sigma)
    low = min(int(np.cumsum(log_sigma - log_sigmas >= 0).argmax()), len(train) - 2)
    w = min(max((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


@pytest.mark.parametrize("ensd", [0, 31337])
@pytest.mark.parametrize("source", ["nv", "cpu"])
def test_euler_a_with_a1111_noise_equals_a1111s_k_diffusion_loop(source, ensd):
    """A1111: ``x = rng.next() * sigmas[0]``; k-diffusion's ``sample_euler_ancestral`` with ``randn_like`` ->
    ``rng.next()`` (``TorchHijack``), on ``get_sigmas(n)``; the ε model read by ``CompVisDenoiser``."""
    ac = _sd_alphas_cumprod()
    train = training_sigmas(ac).numpy()
    steps, seeds, shape = 6, [42, 43], (2, 4, 8, 8)
    ref = ReferenceImageRNG(source.upper(), shape[1:], seeds, ensd=ensd)
    sigmas = _kdiffusion_sigmas(train, steps)
    x = ref.next().double() * sigmas[0]
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = torch.full((shape[0],), _sigma_to_t(train, s), dtype=torch.float64)
        den = x - s * _stand_in(x / (s * s + 1) ** 0.5, t)
        up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        x = x + (x - den) / s * (down - s)
        if s_next > 0:
            x = x + ref.next().double() * up
    noise = A1111Noise(seeds, source=source, ensd=ensd)
    x_T = noise.start_noise(shape).double()
    got = sample_latents(lambda x, t, c: _stand_in(x, t), x_T, None, sampler="euler_a", alphas_cumprod=ac,
                         num_steps=steps, schedule="uniform", generator=noise)
    assert float((got - x).abs().max()) < 1e-9 * max(1.0, float(x.abs().max()))


def test_dpmpp_sde_with_a1111_noise_is_batch_deterministic_per_image_seed():
    """A1111 seeds one Brownian tree per image with the image's seed: an image is the same alone or in a batch."""
    pytest.importorskip("torchsde")
    ac = _sd_alphas_cumprod()
    run = lambda seeds: sample_latents(
        lambda x, t, c: _stand_in(x, t).float(), A1111Noise(seeds, source="nv").start_noise((len(seeds), 4, 6, 6)),
        None, sampler="dpmpp_sde", alphas_cumprod=ac, num_steps=4, schedule="karras",
        generator=A1111Noise(seeds, source="nv"))
    both, second = run([5, 6]), run([6])
    assert torch.allclose(both[1], second[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-2)


@pytest.mark.parametrize("sampler", ["dpmsolver++_sde", "dpmsolver++_3m_sde"])
def test_multistep_sde_with_a1111_noise_draws_from_per_image_brownian_trees(sampler):
    pytest.importorskip("torchsde")
    ac = _sd_alphas_cumprod()

    def run(seeds):
        noise = A1111Noise(seeds, source="cpu")
        x_T = noise.start_noise((len(seeds), 4, 6, 6))
        return sample_latents(lambda x, t, c: _stand_in(x, t).float(), x_T, None, sampler=sampler, alphas_cumprod=ac,
                              num_steps=5, schedule="exponential", generator=noise)

    both, first, second = run([8, 9]), run([8]), run([9])
    assert torch.allclose(both[0], first[0], atol=1e-5) and torch.allclose(both[1], second[0], atol=1e-5)
    assert torch.isfinite(both).all()


# ------------------------------------------------- generate: A1111's noise on request, nothing changed without it
def test_generate_without_noise_is_unchanged_and_with_it_starts_from_a1111s_noise():
    from sdadapt.sampling import generate
    from sdadapt.toy import build_toy

    system = build_toy(seed=1)
    kw = {"seed": 4, "steps": 3, "sampler": "euler_a", "guidance": 2.0}
    plain = generate(system, ["a red square"], **kw)
    # the unchanged path, written out: CPU generator for the start noise and the ancestral noise after it
    probe = system.encode_images(torch.zeros(1, 3, system.image_size, system.image_size))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, *probe.shape[1:], generator=g)
    latents = sample_latents(system.denoiser(), x, system.condition(system.tokenize(["a red square"])),
                             sampler="euler_a", alphas_cumprod=system.alphas_cumprod, num_steps=3,
                             uncond=system.condition(system.tokenize([""])), guidance_scale=2.0,
                             prediction_type=getattr(system, "prediction_type", "epsilon"), generator=g)
    assert torch.equal(plain, system.decode_latents(latents))
    assert torch.equal(generate(system, ["a red square"], noise=None, **kw), plain)
    a1111 = generate(system, ["a red square"], noise=A1111Seeds(), **kw)
    noise = A1111Noise([4], source="nv")
    x = noise.start_noise((1, *probe.shape[1:]))
    latents = sample_latents(system.denoiser(), x, system.condition(system.tokenize(["a red square"])),
                             sampler="euler_a", alphas_cumprod=system.alphas_cumprod, num_steps=3,
                             uncond=system.condition(system.tokenize([""])), guidance_scale=2.0,
                             prediction_type=getattr(system, "prediction_type", "epsilon"), generator=noise)
    assert torch.equal(a1111, system.decode_latents(latents))
    assert not torch.equal(a1111, plain)


def test_generate_command_options_for_a1111_noise(tmp_path):
    from sdadapt.jobs import run_generate

    out = run_generate(prompt="a red circle", out=tmp_path / "a.png", steps=3, seed=2, sampler="Euler a",
                       noise="a1111-cpu", subseed=9, subseed_strength=0.4, ensd=31337, count=2)
    assert len(out["files"]) == 2
    # image 1 of --count 2: seed SEED (a variation strength != 0 keeps it) and variation seed SUBSEED + 1 (A1111's
    # all_seeds = [seed + (x if subseed_strength == 0 else 0) ...] / all_subseeds, processing.process_images_inner)
    run_generate(prompt="a red circle", out=tmp_path / "one.png", steps=3, seed=2, sampler="Euler a",
                 noise="a1111-cpu", subseed=10, subseed_strength=0.4, ensd=31337)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out["files"][1])), np.asarray(Image.open(tmp_path / "one.png")))
    assert not np.array_equal(np.asarray(Image.open(out["files"][0])), np.asarray(Image.open(tmp_path / "one.png")))
    with pytest.raises(ValueError, match="add --noise a1111"):
        run_generate(prompt="x", out=tmp_path / "b.png", subseed=3, subseed_strength=0.5)
    with pytest.raises(ValueError, match="--noise must be"):
        run_generate(prompt="x", out=tmp_path / "b.png", noise="comfy")
    with pytest.raises(ValueError, match="needs a subseed"):
        run_generate(prompt="x", out=tmp_path / "b.png", noise="a1111", subseed_strength=0.5)
    with pytest.raises(ValueError, match=r"--ensd -10 with --seed 3: .*SEED \+ ENSD must be >= 0"):
        run_generate(prompt="x", out=tmp_path / "b.png", noise="a1111", seed=3, ensd=-10)


def test_the_a1111_noise_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "A1111Seeds")
    assert scope["image"].shape == (1, 3, 32, 32) and scope["x"].shape == (2, 4, 64, 64)
    assert torch.equal(scope["noise"], philox_randn(1234, (4, 64, 64)))


def test_a_tiny_sd_model_draws_a1111s_noise_and_takes_the_schedule_settings(tmp_path):
    """``DiffusersSystem.sample`` takes ``noise=`` (its start noise and generator A1111's) and ``schedule_options=``."""
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.samplers.schedules import ScheduleOptions
    from sdadapt.sampling import generate

    system = DiffusersSystem.from_folder(_tiny_pipeline(tmp_path / "pipe"))
    options = ScheduleOptions(rho=4.0)
    got = generate(system, ["a photo"], seed=3, steps=3, guidance=3.0, height=32, width=32, sampler="euler_a",
                   schedule="karras", noise=A1111Seeds(source="cpu", ensd=7), schedule_options=options)
    noise = A1111Noise([3], source="cpu", ensd=7)
    x = noise.start_noise((1, *system.latent_shape(32, 32)))
    with torch.no_grad():
        latents = sample_latents(system.denoiser(), x, system.condition(system.tokenize(["a photo"])),
                                 sampler="euler_a", alphas_cumprod=system.alphas_cumprod, num_steps=3,
                                 uncond=system.condition(system.tokenize([""])), guidance_scale=3.0,
                                 prediction_type=system.prediction_type, generator=noise, schedule="karras",
                                 schedule_options=options)
        want = system.decode_latents(latents)
    assert torch.equal(got, want)
    plain = generate(system, ["a photo"], seed=3, steps=3, guidance=3.0, height=32, width=32, sampler="euler_a",
                     schedule="karras")
    assert not torch.allclose(plain, got, atol=1e-3)


def test_per_image_brownian_noise_equals_k_diffusions_batched_tree_with_a1111s_seeds():
    """k-diffusion's ``BrownianTreeNoiseSampler(x, σ_min, σ_max, seed=[seeds])`` (what A1111 builds for the
    "brownian_noise" samplers), transcribed on ``torchsde.BrownianTree``: the same noise per interval."""
    torchsde = pytest.importorskip("torchsde")
    from sdadapt.samplers.dpmpp_sde import brownian_noise

    x = torch.zeros(2, 4, 5, 5)
    lo, hi, seeds = 0.03, 14.6, (1234, 99)
    trees = [torchsde.BrownianTree(lo, torch.zeros_like(x)[0], hi, entropy=s) for s in seeds]

    def reference(sigma: float, sigma_next: float) -> torch.Tensor:
        a, b, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        return torch.stack([tree(a, b) for tree in trees]) * sign / abs(sigma_next - sigma) ** 0.5

    ours = brownian_noise(x, lo, hi, seeds)
    for s, s_next in ((14.6, 9.0), (9.0, 2.5), (2.5, 0.4), (0.4, 0.03)):
        want = reference(s, s_next)
        got = ours(torch.tensor(s), torch.tensor(s_next))
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["NV", "CPU"])
def test_brownian_noise_draws_a1111s_randn_local_inside_the_trees(source, monkeypatch):
    """A1111 replaces torchsde's ``_randn`` (``replace_torchsde_browinan``) with its ``randn_local(seed, size)``:
    the trees of DPM++ SDE / 2M SDE / 3M SDE draw NV (Philox) or CPU numbers whatever the device. Transcribed on
    ``torchsde.BrownianTree`` (k-diffusion's ``BatchedBrownianTree``), the reference runs first, under its own
    patch; ours must give the same noise per interval and leave torchsde's own draws alone without a source."""
    torchsde = pytest.importorskip("torchsde")
    from torchsde._brownian import brownian_interval

    from sdadapt.samplers.dpmpp_sde import brownian_noise

    def a1111_randn_local(seed, shape):
        if source == "NV":
            return torch.from_numpy(reference_philox_randn(int(seed), tuple(shape)))
        return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)))

    x = torch.zeros(2, 4, 5, 5)
    lo, hi, seeds = 0.03, 14.6, (1234, 99)
    steps = ((14.6, 9.0), (9.0, 2.5), (2.5, 0.4), (0.4, 0.03))
    with monkeypatch.context() as patch:
        patch.setattr(brownian_interval, "_randn",
                      lambda size, dtype, device, seed: a1111_randn_local(seed, size).to(device=device, dtype=dtype))
        trees = [torchsde.BrownianTree(lo, torch.zeros_like(x)[0], hi, entropy=s) for s in seeds]
        want = [torch.stack([tree(b, a) for tree in trees]) * -1 / (a - b) ** 0.5 for a, b in steps]
    ours = brownian_noise(x, lo, hi, seeds, source=source.lower())
    for (a, b), expected in zip(steps, want):
        assert torch.allclose(ours(torch.tensor(a), torch.tensor(b)), expected, atol=1e-5, rtol=1e-5)
    # without a source: torchsde's own generator (diffusers' path), unchanged by the hook
    plain = brownian_noise(x, lo, hi, seeds)
    plain_trees = [torchsde.BrownianTree(lo, torch.zeros_like(x)[0], hi, entropy=s) for s in seeds]
    assert torch.allclose(plain(torch.tensor(9.0), torch.tensor(2.5)),
                          torch.stack([t(2.5, 9.0) for t in plain_trees]) * -1 / 6.5**0.5, atol=1e-5, rtol=1e-5)
    if source == "NV":
        assert not torch.allclose(plain(torch.tensor(2.5), torch.tensor(0.4)), ours(torch.tensor(2.5), torch.tensor(0.4)))


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "dpmsolver++_sde", "dpmsolver++_3m_sde"])
def test_the_brownian_samplers_draw_the_trees_from_the_noise_source(sampler):
    """The same start noise and seeds, the NV or the CPU source: only the trees' draws differ (A1111's patched
    torchsde), so the images must differ."""
    pytest.importorskip("torchsde")
    ac = _sd_alphas_cumprod()
    x_T = A1111Noise([5], source="nv").start_noise((1, 4, 6, 6))
    run = lambda source: sample_latents(lambda x, t, c: _stand_in(x, t).float(), x_T, None, sampler=sampler,
                                        alphas_cumprod=ac, num_steps=4, schedule="karras",
                                        generator=A1111Noise([5], source=source))
    assert not torch.allclose(run("nv"), run("cpu"), atol=1e-4)


@pytest.mark.parametrize("sampler", ["dpmsolver++_sde", "dpmsolver++_3m_sde"])
def test_multistep_sde_asks_the_tree_for_each_step_from_sigma_to_the_next(sampler, monkeypatch):
    """k-diffusion's 2M/3M SDE add ``noise_sampler(σ_i, σ_{i+1})`` (the increment from σ_i down to σ_{i+1}, sign
    included) and none onto σ = 0; the tree spans the grid's positive σ."""
    pytest.importorskip("torchsde")
    from sdadapt.samplers import dpmpp_sde

    made, asked = [], []
    real = dpmpp_sde.brownian_noise

    def recording(like, sigma_min, sigma_max, seed, **kw):
        made.append((sigma_min, sigma_max, seed, kw.get("source")))
        tree = real(like, sigma_min, sigma_max, seed, **kw)
        return lambda a, b: asked.append((float(a), float(b))) or tree(a, b)

    monkeypatch.setattr(dpmpp_sde, "brownian_noise", recording)
    noise = A1111Noise([8, 9], source="nv")
    sample_latents(lambda x, t, c: _stand_in(x, t).float(), noise.start_noise((2, 4, 6, 6)), None, sampler=sampler,
                   alphas_cumprod=_sd_alphas_cumprod(), num_steps=5, schedule="exponential", generator=noise)
    assert len(made) == 1 and made[0][2:] == ((8, 9), "nv")
    assert asked and all(a > b > 0 for a, b in asked)
    assert made[0][1] == pytest.approx(asked[0][0], rel=1e-6) and made[0][0] == pytest.approx(asked[-1][1], rel=1e-6)
    assert all(asked[k][1] == asked[k + 1][0] for k in range(len(asked) - 1))
