"""Isolation: refused calls leave the model as it was; benchmark leaves process settings."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from vlm_fixtures import batch_inputs, tiny_vlm

import tokcomp
from tokcomp.bench import BenchSettings, Variant, benchmark


@torch.no_grad()
def test_apply_refused_by_the_tower_keeps_the_previous_method():
    model = tokcomp.apply(tiny_vlm("qwen2_vl"), "zoo", keep=4)
    batch, _ = batch_inputs(model, "qwen2_vl", [(1, 3)])
    expected = model(**batch).logits
    with pytest.raises(ValueError, match="text_encoder needs a CLIP vision tower"):
        tokcomp.apply(model, "cdpruner", keep=4, text_encoder="clip", prompt_tokenizer="tok")
    assert tokcomp.config_of(model).method == "zoo"
    torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)


def test_benchmark_restores_threads_and_leaves_the_global_rng():
    threads = torch.get_num_threads()
    settings = BenchSettings(batch_size=2, warmup=0, repeats=1, threads=threads + 1)
    model = tiny_vit("vit")
    rng = torch.get_rng_state()
    benchmark(model, [Variant("tome", "tome", {"r": 4})], settings, (3, 32, 32))
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


@torch.no_grad()
def test_llm_stage_method_refuses_extra_images_and_stays_usable():
    model = tokcomp.apply(tiny_vlm("llava"), "sparsevlm", keep=6)
    batch, _ = batch_inputs(model, "llava", [(1, 3)])
    expected = model(**batch).logits
    extra = {**batch, "pixel_values": torch.cat([batch["pixel_values"]] * 2)}
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**extra)
    torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)
