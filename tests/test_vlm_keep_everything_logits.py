"""At a keep-everything budget a patched VLM gives the unpatched model's logits, in a plain
forward and in cached greedy generation, for left- and right-padded batches, on the families
whose adapters have the most model-specific surgery (Qwen3-VL deepstack, InternVL and
Idefics3/SmolVLM tiles, Gemma 3's image blocks and sliding window, Mistral 3's image-break
tokens, LLaVA-OneVision crops and videos)."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from test_vlm import _greedy_logits, _right_padded
from vlm_fixtures import FAMILIES, batch_inputs, tiny_vlm

import tokcomp

LAYOUT = [(1, 5), (2, 3), (0, 7)]
IMAGE_FAMILIES = ["qwen3_vl", "internvl", "idefics3", "smolvlm", "gemma3", "mistral3"]
CASES = [
    *[(family, "divprune") for family in [*IMAGE_FAMILIES, "llava_onevision"]],
    *[(family, "fastv") for family in IMAGE_FAMILIES],
    *[(f, m) for f in ("llava_onevision_video", "qwen3_vl_video") for m in ("dycoke", "fastvid")],
]


@functools.cache
def _built(family: str) -> torch.nn.Module:
    return tiny_vlm(family)


def _keep_all(method: str) -> dict:
    return {"k": 0.0, "decode_p": 0.0} if method == "dycoke" else {"keep": 1.0}


def _batch(family: str, padding: str) -> dict:
    layout = [(1, 5), (2, 3), (1, 7)] if FAMILIES[family].kind == "llava_next" else LAYOUT
    batch, _ = batch_inputs(_built(family), family, layout, seed=3)
    if padding == "right":
        return _right_padded(batch)
    if not FAMILIES[family].kind.startswith("qwen"):  # generate's numbering of left padding
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return batch


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize(("family", "method"), CASES)
@torch.no_grad()
def test_keep_everything_gives_the_unpatched_logits_forward_and_cached(family, method, padding):
    model = copy.deepcopy(_built(family))
    batch = _batch(family, padding)
    real = batch["attention_mask"].bool()
    generate_batch = {k: v for k, v in batch.items() if k != "position_ids"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # right padding; dycoke on a prompt's image
        expected = model(**batch).logits[real]
        expected_tokens, expected_logits, _ = _greedy_logits(model, generate_batch)
        tokcomp.apply(model, method, **_keep_all(method))
        torch.testing.assert_close(model(**batch).logits[real], expected, rtol=0, atol=1e-6)
        tokens, logits, _ = _greedy_logits(model, generate_batch)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
