"""``<lora:NAME:M:start=N:stop=N>`` (hako-mikan's sd-webui-lora-block-weight) on A1111's UniPC counter and across the
hires pass, against a transcription of the extension's switching rule (``denoiser_callback``, A1111's path) and of
A1111's ``state.sampling_step`` (``launch_sampling`` sets 0; k-diffusion's callback sets ``i`` after step i's first
model call; ``UniPCCFG.after_update`` sets its index after each update's corrector call; the hires pass re-activates
the networks at the tags' multipliers, ``extra_networks.activate(p, hr_extra_network_data)``, and its sampler's
``launch_sampling`` sets the counter back to 0; the extension's ``starts`` / ``stops`` dicts live across both passes).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from png_pixels import pixels as _pixels
from sdadapt import samplers
from sdadapt.jobs.generate_lbw_steps import (
    StepRange,
    StepSwitchedLoRAs,
    a1111_sampling_step,
    spent,
    unet_on,
)

_TWO_CALLS = {"heun", "dpm_2"}  # (a second model call per step, after the callback, on every step but the last)


def _a1111_counter(sampler: str, steps: int) -> list[int]:
    """A1111's ``state.sampling_step`` seen at each model call of one pass."""
    state, seen = 0, []
    if sampler == "unipc":  # UniPCCFG: a call at t_0, then per update a corrector call (not the last) and callback
        seen.append(state)
        for index in range(steps):
            if index < steps - 1:
                seen.append(state)
            state = index
        return seen
    for i in range(steps):
        seen.append(state)
        state = i
        if sampler in _TWO_CALLS and i < steps - 1:
            seen.append(state)
    return seen


class _Extension:
    """The extension's ``starts`` / ``stops`` and ``denoiser_callback`` for one network, transcribed."""

    def __init__(self, start: int | None, stop: int | None) -> None:
        self.starts = {} if start is None else {"net": start}
        self.stops = {} if stop is None else {"net": stop}
        self.on = True  # (A1111 activates the network at the tag's multipliers before the sampler)

    def activate(self) -> None:  # (the hires pass: load_networks sets the tag's multipliers again)
        self.on = True

    def callback(self, sampling_step: int) -> bool:
        if self.starts and sampling_step == 0:
            self.on = False
        for key, step in list(self.starts.items()):
            if sampling_step > step - 2:
                self.on = True
                del self.starts[key]
        for key, step in list(self.stops.items()):
            if sampling_step > step - 2:
                self.on = False
                del self.stops[key]
        return self.on


def _announced(sampler: str, steps: int, before_model_call) -> None:
    samplers.sample_latents(lambda x, t, c: x * 0.1, torch.zeros(1, 1, 2, 2), None, sampler=sampler,
                            alphas_cumprod=torch.linspace(0.999, 0.01, 1000), num_steps=steps,
                            generator=torch.Generator().manual_seed(0), before_model_call=before_model_call)


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 8), start=st.none() | st.integers(-1, 9), stop=st.none() | st.integers(-1, 9))
def test_unipc_counts_as_a1111s_unipc(steps, start, stop):
    """sdadapt's unipc (one model call per step) reads A1111's UniPC counter: its k-th call sees ``max(k − 2, 0)``,
    so a switch comes at the call A1111's comes (with the k-diffusion counter it came one call earlier)."""
    seen: list[tuple[int, int]] = []
    _announced("unipc", steps, lambda done, calls: seen.append((done, calls)))
    counter = [a1111_sampling_step(done, calls, sampler="unipc") for done, calls in seen]
    assert counter == _a1111_counter("unipc", steps)
    extension = _Extension(start, stop)
    assert [unet_on(StepRange(start, stop), c) for c in counter] == [extension.callback(c) for c in counter]


def test_the_spent_switches_are_those_the_first_pass_reached():
    assert spent(StepRange(3, 5), [0, 0, 1, 2]) == StepRange(None, 5)  # (start fires at 2, stop at 4)
    assert spent(StepRange(3, 5), [0, 0, 1, 2, 3]) == StepRange(None, 5)
    assert spent(StepRange(3, 5), [0, 0, 1, 2, 3, 4]) == StepRange(None, None)
    assert spent(StepRange(0, None), []) == StepRange(0, None)  # (no call: nothing fired)
    assert spent(StepRange(-1, 1), [0]) == StepRange(None, None)


@settings(max_examples=40, deadline=None)
@given(first=st.sampled_from(["euler", "heun", "unipc", "dpmsolver++"]),
       hires=st.sampled_from(["euler", "heun", "unipc"]),
       steps=st.integers(1, 6), hires_steps=st.integers(1, 6),
       start=st.none() | st.integers(-1, 9), stop=st.none() | st.integers(-1, 9))
def test_the_hires_pass_switches_as_the_extension(first, hires, steps, hires_steps, start, stop):
    """Both passes through one StepSwitchedLoRAs (next_pass between them): the UNet part is merged at exactly the
    model calls where the transcribed extension has the network on — the first pass by its range, the hires pass on
    again from its first call unless a switch the first pass did not reach fires by the hires counter from 0; and
    after release the next image's first pass has the whole range again."""
    from sdadapt.apply import apply_lora

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = layer[0].weight.detach().clone()
    state = {"0.lora_down.weight": torch.randn(2, 4, generator=g), "0.lora_up.weight": torch.randn(4, 2, generator=g)}
    merged = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with torch.no_grad():
        merged[0].weight.copy_(before)
    apply_lora(merged, state, scale=0.7)
    switch = StepSwitchedLoRAs([(StepRange(start, stop), [(layer, state, 0.7)])], sampler=first)
    ours: list[bool] = []

    def call(done: int, calls: int) -> None:
        switch(done, calls)
        on = torch.equal(layer[0].weight, merged[0].weight)
        assert on or torch.equal(layer[0].weight, before)
        ours.append(on)

    extension = _Extension(start, stop)
    _announced(first, steps, call)
    switch.next_pass(sampler=hires)
    _announced(hires, hires_steps, call)
    expected = [extension.callback(c) for c in _a1111_counter(first, steps)]
    extension.activate()
    expected += [extension.callback(c) for c in _a1111_counter(hires, hires_steps)]
    assert ours == expected
    switch.release()
    assert torch.equal(layer[0].weight, before)
    ours.clear()  # (the next image: the first pass's range and sampler again)
    _announced(first, steps, call)
    again = _Extension(start, stop)
    assert ours == [again.callback(c) for c in _a1111_counter(first, steps)]
    switch.release()


# ---- the whole generate run: hires fix with a step range, against the LoRA switched by hand ----------------------

from test_prompt_lbw import pipe  # noqa: E402,F401  (the tiny pipeline and its one LoRA, "ink")


def _by_hand(pipe, wanted: list[bool]):
    """generate's image with the hires pass, the LoRA switched by hand (one UNet call per model call)."""
    from test_prompt_lbw import _switched_by_hand

    from sdadapt.jobs.generate_hires import HiresRequest

    image, made = _switched_by_hand(pipe, wanted, hires=HiresRequest((64, 64), steps=3, denoising=0.6))
    assert made == len(wanted)
    return image


def test_a_step_range_with_the_hires_fix_is_the_lora_switched_by_hand(pipe, tmp_path):
    """``stop=2``, 4 steps then a hires pass of 3: on for the first pass's first 2 calls (the stop fires at counter
    1), then on for the whole hires pass (the stop is spent; A1111 activates the network again). Were the first
    pass's switch kept with the counter from 0, the hires pass's last call (counter 1) would be off: that image
    differs. (review R1: with ``stop=3`` the kept switch fires at counter 2, which a 3-step hires pass never
    reaches, so the test passed with no hires-pass handling at all.)"""
    from sdadapt.cli import main
    from sdadapt.images import write_png

    assert main(["generate", "--model", str(pipe[0]), "--prompt", "a cat <lora:ink:0.7:stop=2>", "--seed",
                 "1", "--steps", "4", "--sampler", "euler", "--guidance", "5", "--width", "32", "--height", "32",
                 "--hires-scale", "2", "--hires-steps", "3", "--hires-denoising", "0.6", "--lora-dir", str(pipe[1]),
                 "-q", "-o", str(tmp_path / "cli.png")]) == 0
    extension = _Extension(None, 2)
    wanted = [extension.callback(c) for c in _a1111_counter("euler", 4)]
    extension.activate()
    wanted += [extension.callback(c) for c in _a1111_counter("euler", 3)]
    assert wanted == [True, True, False, False, True, True, True]
    write_png(tmp_path / "ref.png", _by_hand(pipe, wanted))
    assert _pixels(tmp_path / "cli.png") == _pixels(tmp_path / "ref.png")
    write_png(tmp_path / "kept.png", _by_hand(pipe, [*wanted[:-1], False]))
    assert _pixels(tmp_path / "kept.png") != _pixels(tmp_path / "ref.png")


# ---- review R1 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("hires_sampler", "expected"), [("UniPC", "unipc"), (None, "euler")])
def test_sample_image_starts_the_hires_pass_with_the_hires_sampler_and_the_spent_ranges(monkeypatch, hires_sampler,
                                                                                        expected):
    """(review R1) sample_image tells the switch before the hires pass, with ``--hires-sampler`` (canonical; else
    the first pass's): the hires pass counts on that sampler's counter (unipc: A1111's UniPC) from the ranges less
    the switches the first pass fired."""
    from types import SimpleNamespace

    import sdadapt.sampling as sampling
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image

    switch = StepSwitchedLoRAs([(StepRange(None, 3), []), (StepRange(30, None), [])], sampler="euler")
    passes = []

    def stand_in(system, prompts, **kwargs):
        hook = kwargs["before_model_call"]
        passes.append((kwargs["sampler"], hook.sampler, [step_range for step_range, _ in hook.parts]))
        for i in range(4):  # (a one-call sampler's 4 steps)
            hook(i, 0)
        shape = (1, 4, 4, 4) if kwargs.get("output") == "latents" else (1, 3, 32, 32)
        return torch.zeros(shape)

    monkeypatch.setattr(sampling, "generate", stand_in)
    options = {"steps": 4, "sampler": "euler", "before_model_call": switch}
    sample_image(SimpleNamespace(vae_factor=8), ["a"], options,
                 hires=HiresRequest((64, 64), steps=4, denoising=0.6, sampler=hires_sampler))
    assert passes[0] == ("euler", "euler", [StepRange(None, 3), StepRange(30, None)])
    assert passes[1][1:] == (expected, [StepRange(None, None), StepRange(30, None)])


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from sdadapt.formats.files import write_safetensors

    root = tmp_path_factory.mktemp("ranges_refused")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    write_safetensors(root / "ink.safetensors", {f"{key}.lora_down.weight": torch.ones(2, 8),
                                                 f"{key}.lora_up.weight": torch.ones(8, 2)}, {})
    return root


@pytest.mark.parametrize(("options", "words"), [
    ({"hires_sampler": "pndm"}, "pndm"),
    ({"hires_prompt": "a cat <lora:ink:0.7:stop=2>"}, "--hires-prompt whose tags or ranges differ"),
    ({"hires_prompt": "a cat <lora:ink:0.5:stop=3>"}, "--hires-prompt whose tags or ranges differ"),
    ({"hires_prompt": "a cat"}, "--hires-prompt whose tags or ranges differ"),
])
def test_step_ranges_with_a_hires_pass_that_cannot_be_counted_are_refused(lora_dir, tmp_path, monkeypatch, options,
                                                                          words):
    """(review R1) A step range with the hires fix is refused before the model is read where the hires pass cannot
    follow the extension: a ``--hires-sampler`` whose counter is not A1111's rule, a ``--hires-prompt`` whose tags
    or ranges differ from the prompt's."""
    import sdadapt.jobs.generate as job

    loaded = []
    monkeypatch.setattr(job, "load_system", lambda *args, **kwargs: loaded.append(True))
    with pytest.raises(ValueError, match=words):
        job.run_generate(prompt="a cat <lora:ink:0.7:stop=3>", out=tmp_path / "x.png", sampler="euler", steps=4,
                         lora_dir=lora_dir, hires_scale=2.0, **options)
    assert loaded == []


def test_run_generate_counts_the_first_pass_on_its_samplers_counter(lora_dir, tmp_path, monkeypatch):
    """(review R1) run_generate builds the switch with the first pass's sampler (canonical), so ``--sampler unipc``
    counts as A1111's UniPC from the first call, with or without a hires pass."""
    import sdadapt.jobs.generate as job
    import sdadapt.jobs.generate_lbw_steps as steps

    made = []

    class Recorded(steps.StepSwitchedLoRAs):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.sampler)
            raise _Built

    class _Built(Exception):
        pass

    class System:
        alphas_cumprod = torch.zeros(1000)

    monkeypatch.setattr(job, "load_system", lambda *args, **kwargs: System())
    monkeypatch.setattr(job, "_apply_lora_parts", lambda *args, **kwargs: ({"layers": 1}, []))
    monkeypatch.setattr(steps, "StepSwitchedLoRAs", Recorded)
    for sampler in ("unipc", "UniPC"):  # (diffusers' UniPC; A1111's label as A1111 writes it: A1111's UniPC)
        with pytest.raises(_Built):
            job.run_generate(prompt="a cat <lora:ink:0.7:stop=3>", out=tmp_path / "x.png", sampler=sampler, steps=4,
                             lora_dir=lora_dir)
    assert made == ["unipc", "unipc_a1111"]


def test_a1111s_own_unipc_and_plms_report_steps_as_a1111_does():
    """A1111's UniPC calls the model once before its first step and calls back after each step's corrector call, so
    its k-th model call sees ``max(k − 2, 0)``; sdadapt's ``unipc_a1111`` is made the same way, so the plain rule
    counts it (only diffusers' ``unipc`` needs the late rule). A1111's PLMS: both calls of its first step see 0."""
    from sdadapt.jobs.generate_lbw_steps import a1111_sampling_step
    from sdadapt.samplers import sample_latents

    def seen(sampler: str, steps: int) -> list[int]:
        out = []
        sample_latents(lambda x, t, c: 0.1 * x, torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
                       None, sampler=sampler, alphas_cumprod=torch.linspace(0.999, 0.01, 1000, dtype=torch.float64),
                       num_steps=steps,
                       before_model_call=lambda done, calls: out.append(a1111_sampling_step(done, calls,
                                                                                          sampler=sampler)))
        return out

    assert seen("unipc_a1111", 5) == [max(k - 2, 0) for k in range(5)]
    assert seen("plms", 5) == [0, 0, 0, 1, 2]  # (5 steps: 4 steps of A1111's 5 timesteps, the first of two calls)


