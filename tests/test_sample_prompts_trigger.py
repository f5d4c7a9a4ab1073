"""Training-time sample images spell a trained trigger of ``k`` vectors as its ``k`` tokens, as kohya's sample prompts
replace it (train_textual_inversion.py: ``token`` -> ``token token1 … tokenK-1``): the diffusers system's tokenizer
knows only the embeddings it loaded, so the samples read vector 0 alone before."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from sdadapt import sampling
from sdadapt.jobs import TrainOptions, run_train
from test_cli_train import _images, _tiny_pipeline


@pytest.mark.parametrize("method", ["textual-inversion", "dreamartist"])
def test_samples_see_every_vector_of_the_trigger(tmp_path, monkeypatch, method):
    seen: list[tuple[list[str], str | None, list]] = []
    real_generate = sampling.generate

    def spy_generate(system, prompts, *args, negative=None, **kwargs):
        ids = system.tokenize(list(prompts))
        seen.append((list(prompts), negative, ids[0].tolist()))
        return real_generate(system, prompts, *args, negative=negative, **kwargs)

    monkeypatch.setattr(sampling, "generate", spy_generate)
    root = _tiny_pipeline(tmp_path / "model", prediction_type="epsilon")
    images = _images(tmp_path / "imgs", n=2, size=32)
    (tmp_path / "prompts.txt").write_text("a <sks> --n <sks> --s 1\n")  # (the tiny tokenizer reads 12 tokens)
    run_train(method, TrainOptions(images=images, model=str(root), steps=1, out=tmp_path / f"{method}.pt",
                                   sample_prompts=tmp_path / "prompts.txt", sample_every_n_steps=1, sample_steps=1,
                                   resolution=(32, 32), method_options={"token": "<sks>", "vectors": 3}))
    assert seen
    (prompt,), negative, ids = seen[-1]
    assert prompt.count("<sks>") == 3 and negative.count("<sks>") == 3, (prompt, negative)
    added = sorted({i for i in ids if i >= 514})  # (the tiny tokenizer's vocabulary is 514 ids)
    assert len(added) == 3, (ids, prompt)
