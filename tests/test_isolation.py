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


def test_a_method_object_changed_after_apply_does_not_change_the_patched_model():
    model = tiny_vit("vit")
    method = tokcomp.create_method("evit", keep_ratio=0.7, layers=[1, 2])
    tokcomp.apply(model, method)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
    method.keep_ratio = 0.5
    method.layers.append(3)
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=0, atol=0)
    assert tokcomp.config_of(model).options["layers"] == [1, 2]
    assert tokcomp.config_of(model).options["keep_ratio"] == 0.7
