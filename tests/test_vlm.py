"""VLM visual-token pruning on tiny random models of every supported family: exact at
keep-everything, cached generation equal to re-running the pruned prompt without a cache,
batch independence, positions, configs, MACs and clear errors."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers as hf
from conftest import BATCH_POSITION_DEPENDENT, tiny_vit
from vlm_fixtures import (
    BOS,
    FAMILIES,
    IMAGE,
    IMAGE_BREAK,
    IMAGE_END,
    LLAVA_FAMILIES,
    PAD,
    VIDEO,
    VISION_END,
    VISION_START,
    assert_config_reloads,
    batch_inputs,
    tiny_vlm,
)

import tokcomp
from tokcomp.adapters import find_adapter
from tokcomp.adapters.hf_vlm.families import Images
from tokcomp.adapters.hf_vlm.generation import pruned_of
from tokcomp.errors import UsageError
from tokcomp.harness.vqa import visual_tokens_kept
from tokcomp.methods import LLMStageMethod, create_method, method_class
from tokcomp.methods.visual import VisualSignal

STEPS = 4
#: Per family: (images, text tokens) per sample of a 3-sample batch; the single-sample batch.
LAYOUT = [(1, 5), (2, 3), (0, 7)]
LAYOUT_NEXT = [(1, 5), (2, 3), (1, 7)]  # anyres: every sample has an image (no pixel padding)
SINGLE = [(1, 4)]
#: Every visual-token method, on every family that gives the signals it needs (the vision
#: tower's attention: the LLaVA families, Gemma 3, Mistral 3 and Qwen3-VL only).
TOWER_ATTENTION = {*LLAVA_FAMILIES, "gemma3", "mistral3", "qwen3_vl", "qwen3_vl_video"}
VISUAL = tuple(tokcomp.methods("vlm"))


def _needs_tower_attention(method: str) -> bool:
    return bool(method_class(method).visual_needs & {VisualSignal.ATTENTION, VisualSignal.KEYS})


def _needs_frames(method: str) -> bool:
    return VisualSignal.FRAMES in method_class(method).visual_needs


def _takes_videos(family: str) -> bool:
    return find_adapter(_built(family)).spec().takes_videos


def _keep_all(method: str) -> dict:
    if method == "dycoke":  # no frame merged, no video token skipped while decoding
        return {"k": 0.0, "decode_p": 0.0}
    return {method_class(method).budget: 1.0}


def _pruning(method: str) -> dict:
    budget = {method_class(method).budget: 0.5 if method == "random" else 0.4}
    return {**budget, "decode_layer": 2} if method == "dycoke" else budget  # 3 tiny layers


def _runs_on(family: str, method: str) -> bool:
    """Whether tokcomp applies `method` to `family`'s model (the signals it needs are given)."""
    tower = not _needs_tower_attention(method) or family in TOWER_ATTENTION
    return tower and (not _needs_frames(method) or _takes_videos(family))


def _cases() -> list[tuple[str, str]]:
    """Every method on every family it runs on; those merging video frames on the fixtures
    with videos."""
    return [
        (f, m)
        for f in FAMILIES
        for m in VISUAL
        if _runs_on(f, m) and (not _needs_frames(m) or f.endswith("_video"))
    ]


@functools.cache
def _built(family: str) -> torch.nn.Module:
    return tiny_vlm(family)


def _model(family: str) -> torch.nn.Module:
    return copy.deepcopy(_built(family))


def _inputs(model, family: str, layout=None):
    layout = layout or (LAYOUT_NEXT if FAMILIES[family].kind == "llava_next" else LAYOUT)
    return batch_inputs(model, family, layout, seed=3)


def _generate(model, batch: dict, steps: int = STEPS, **options) -> torch.Tensor:
    """Greedy new tokens (never the image placeholder token)."""
    options = {"do_sample": False, **options}
    out = model.generate(
        **batch, max_new_tokens=steps, suppress_tokens=[IMAGE], pad_token_id=PAD, **options
    )
    return out[:, batch["input_ids"].shape[1] :]


def _uncached_reference(model, family: str, batch: dict, steps: int = STEPS) -> torch.Tensor:
    """Greedy decoding by re-running the whole (pruned) prompt plus the tokens so far without
    a cache, with the positions generate would give."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    new = []
    for _ in range(steps):
        for name in ("mm_token_type_ids", "token_type_ids"):
            if name in extra:
                text = ids.new_zeros(ids.shape[0], len(new), dtype=batch[name].dtype)
                extra[name] = torch.cat([batch[name], text], dim=1)
        positions = None
        if not FAMILIES[family].kind.startswith("qwen"):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra
        ).logits[:, -1]
        logits[:, IMAGE] = -torch.inf
        token = logits.argmax(dim=-1, keepdim=True)
        new.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(new, dim=1)


def _fixed(method: str, **options) -> LLMStageMethod:
    """An LLM-stage method whose choice does not depend on the query (the last visual tokens
    of each image): re-running without a cache then makes the same choice as the cached
    prefill (the query, the prompt's last token, changes as tokens are generated)."""

    class Fixed(method_class(method)):
        def select(self, visual, keep):
            index = torch.arange(visual.tokens - keep, visual.tokens, device=visual.outputs.device)
            return index.expand(visual.batch, -1)

    return Fixed(**options)


# -- exactness at keep-everything -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "batch"])
@pytest.mark.parametrize(("family", "method"), _cases())
@torch.no_grad()
def test_keep_everything_reproduces_greedy_generate(family, method, layout):
    model = _model(family)
    batch, _ = _inputs(model, family, SINGLE if layout == "single" else None)
    expected = _generate(model, batch)
    tokcomp.apply(model, method, **_keep_all(method))
    config = tokcomp.config_of(model)
    assert config.macs - config.selection_macs == config.base_macs
    assert torch.equal(_generate(model, batch), expected)
    tokcomp.remove(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_generate(model, batch), expected)


# -- pruned generation --------------------------------------------------------------------------


def _prompt_bound(method: str, **options):
    """A text-conditioned method that reads only the first three text tokens of each prompt
    (the BOS and the first image's prefix here), which generated tokens never change: re-running
    the prompt plus the tokens so far then conditions on the same text as the cached prefill."""

    class PromptBound(method_class(method)):
        def select(self, visual, keep):
            return super().select(replace(visual, text=tuple(t[:3] for t in visual.text)), keep)

    return PromptBound(**options)


def _pruned(model, family: str, method: str, positions: str):
    if issubclass(method_class(method), LLMStageMethod):
        return tokcomp.apply(model, _fixed(method, **_pruning(method), positions=positions))
    if VisualSignal.TEXT in method_class(method).visual_needs:
        return tokcomp.apply(model, _prompt_bound(method, **_pruning(method), positions=positions))
    if method == "dycoke":  # its decoding steps are replayed by test_dycoke_cached_decoding_...
        return tokcomp.apply(model, method, **_pruning(method), decode_p=0.0, positions=positions)
    return tokcomp.apply(model, method, **_pruning(method), positions=positions)


@pytest.mark.parametrize("positions", ["keep", "renumber"])
@pytest.mark.parametrize(("family", "method"), _cases())
@torch.no_grad()
def test_cached_generation_equals_rerunning_the_pruned_prompt(family, method, positions):
    model = _pruned(_model(family), family, method, positions)
    config = tokcomp.config_of(model, frames=4 if _needs_frames(method) else None)
    assert config.macs - config.selection_macs < config.base_macs
    batch, _ = _inputs(model, family)
    assert torch.equal(_generate(model, batch), _uncached_reference(model, family, batch))


@pytest.mark.parametrize("positions", ["keep", "renumber"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_cached_generation_with_merged_tokens_equals_rerunning_the_pruned_prompt(family, positions):
    """SparseVLM's recycled tokens enter the hidden stream at each cut (its ranking fixed by
    position, so that re-running chooses alike)."""

    class Ranked(method_class("sparsevlm")):
        def select(self, visual, keep):
            ranks = torch.arange(visual.tokens, dtype=torch.float).expand(visual.batch, -1)
            selection = super().select(dataclasses.replace(visual, attention=ranks), keep)
            assert keep == visual.tokens or selection.outputs is not None
            return selection

    model = tokcomp.apply(_model(family), Ranked(keep=0.4, positions=positions))
    batch, _ = _inputs(model, family)
    assert torch.equal(_generate(model, batch), _uncached_reference(model, family, batch))


@pytest.mark.parametrize(
    ("family", "method"), [c for c in _cases() if c[1] not in BATCH_POSITION_DEPENDENT]
)
@torch.no_grad()
def test_each_sample_gets_what_it_gets_alone(family, method):
    model = tokcomp.apply(_model(family), method, **_pruning(method))
    batch, alone = _inputs(model, family)
    together = _generate(model, batch)
    for row, inputs in enumerate(alone):
        assert torch.equal(together[row], _generate(model, inputs)[0]), f"sample {row}"


@pytest.mark.parametrize(
    "method", [m for m in VISUAL if _runs_on("llava", m) and m not in BATCH_POSITION_DEPENDENT]
)
@torch.no_grad()
def test_a_plain_forward_gives_each_left_padded_sample_what_it_gets_alone(method):
    """Without position ids (a plain forward and a cached step, not generate) each sample's
    real tokens are numbered from 0, as alone: DART's pivots, by the norms of keys after RoPE,
    depend on it, and the step continues the prompt's numbering."""
    model = tokcomp.apply(_model("llava"), method, **_pruning(method))
    batch, alone = _inputs(model, "llava", [(1, 5), (1, 12)])
    together = _forward_and_step(model, batch)
    for row, inputs in enumerate(alone):
        for both, one in zip(together, _forward_and_step(model, inputs), strict=True):
            torch.testing.assert_close(both[row], one[0])


def _forward_and_step(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The last logits of a forward of `batch` and of a cached step of one more token after it,
    neither given position ids."""
    out = model(**batch, use_cache=True)
    token = torch.full_like(batch["input_ids"][:, :1], BOS)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
    step = model(input_ids=token, attention_mask=mask, cache=out.cache)
    return out.logits[:, -1], step.logits[:, -1]


def _right_padded(batch: dict) -> dict:
    """`batch` with each sample's real tokens first and the padding after them (every per-token
    tensor moved alike: Qwen's mm_token_type_ids, Gemma's token_type_ids)."""
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    moved = {}
    for name, value in batch.items():
        if not (torch.is_tensor(value) and value.shape == ids.shape):
            continue
        padded = torch.full_like(value, PAD) if name == "input_ids" else torch.zeros_like(value)
        for row, keep in enumerate(real):
            padded[row, : int(keep.sum())] = value[row, keep]
        moved[name] = padded
    return {**batch, **moved}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision_video", "qwen3_vl_video"])
@torch.no_grad()
def test_a_right_padded_forward_keeps_the_caller_s_layout(family):
    """A right-padded plain forward gives each sample's logits where the caller put its tokens,
    padding after them: at keep-everything the unpatched model's (and generate, which reads
    the last column, a padding token's, gives its tokens and logits); pruned (before and
    inside the language model), the sample's own logits (as alone) at its first
    real-minus-dropped places, and a cached step after it what the sample gets alone."""
    model = _model(family)
    batch, alone = _inputs(model, family, [(1, 5), (1, 12)])
    batch = _right_padded(batch)
    real = batch["attention_mask"].bool()
    assert not real[:, -1].all() and real[:, 0].all()
    expected, generated = model(**batch).logits, _greedy_logits(model, batch)
    tokcomp.apply(model, "divprune", keep=1.0)
    torch.testing.assert_close(model(**batch).logits[real], expected[real])
    tokens, logits, _ = _greedy_logits(model, batch)
    assert torch.equal(tokens, generated[0])
    torch.testing.assert_close(logits, generated[1])
    token = torch.full_like(batch["input_ids"][:, :1], BOS)
    for method in ("divprune", "fastv"):
        tokcomp.apply(model, method, keep=0.4)
        out = model(**batch, use_cache=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        step = model(input_ids=token, attention_mask=mask, cache=out.cache).logits[:, -1]
        dropped = tokcomp.visual_tokens_dropped(out.cache)
        for row, inputs in enumerate(alone):
            one = model(**inputs, use_cache=True)
            kept = int(real[row].sum() - dropped[row])
            torch.testing.assert_close(out.logits[row, :kept], one.logits[0, -kept:])
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(token[:1])], dim=1)
            alone_step = model(input_ids=token[:1], attention_mask=mask, cache=one.cache)
            torch.testing.assert_close(step[row], alone_step.logits[0, -1], msg=f"{method} {row}")


def _ranking_scores(model, method: str, batch: dict) -> list[torch.Tensor]:
    """The attention each of `method`'s choices ranks the visual tokens by, in a forward."""
    seen = []

    class Recorded(method_class(method)):
        def select(self, visual, keep):
            seen.append(visual.attention.clone())
            return super().select(visual, keep)

    tokcomp.apply(model, Recorded(keep=0.25))
    model(**batch)
    return seen


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
@pytest.mark.parametrize(
    ("layout", "padding"),
    [([(1, 5), (1, 12)], _right_padded), ([(1, 0), (1, 4)], lambda batch: batch)],
    ids=["right-padded", "ending-with-the-image"],
)
@torch.no_grad()
def test_the_last_token_query_is_each_sample_s_last_text_token(method, layout, padding):
    """The query is each sample's last real token that is not an image placeholder, wherever
    padding lies and when a prompt ends with its image: every stage ranks by finite scores,
    those of the sample alone."""
    model = _model("llava")
    batch, alone = _inputs(model, "llava", layout)
    together = _ranking_scores(model, method, padding(batch))
    for row, inputs in enumerate(alone):
        for stage, scores in enumerate(_ranking_scores(model, method, inputs)):
            assert scores.isfinite().all()
            torch.testing.assert_close(together[stage][row], scores[0])


# -- FastV's attention scores -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "gemma3"])
@torch.no_grad()
def test_fastv_scores_equal_the_eager_attention_weights(family):
    """Gemma 3's layer 0 is a sliding-window layer whose window (12) the 20 tokens exceed."""
    from tokcomp.adapters.hf_vlm.decoder import LayerSpan, attention_received

    model = _model(family)
    language = model.model.language_model
    hidden = torch.randn(2, 20, language.config.hidden_size)
    mask = torch.tensor([[0, 0] + [1] * 18, [1] * 20])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    rope = positions[None].expand(3, -1, -1) if family.startswith("qwen") else positions
    language.config._attn_implementation = "eager"
    weights = language(
        inputs_embeds=hidden, attention_mask=mask, position_ids=rope, output_attentions=True
    ).attentions[0]
    queries = torch.zeros_like(mask, dtype=torch.bool)
    queries[:, -1] = True
    span = LayerSpan(0, 0, mask, rope, None)
    scores = attention_received(language, 0, hidden, span, queries, queries.float())
    torch.testing.assert_close(scores, weights[:, :, -1].mean(dim=1), rtol=1e-4, atol=1e-6)
    text = mask.bool()
    scores = attention_received(language, 0, hidden, span, text, text.float())
    expected = (weights.mean(dim=1) * text[..., None]).sum(dim=1) / text.sum(dim=1, keepdim=True)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    raters = text & (torch.arange(20) % 3 == 1)  # SparseVLM: a subset of the rows weighs
    scores = attention_received(language, 0, hidden, span, text, raters.float())
    rated = (weights.mean(dim=1) * raters[..., None]).sum(dim=1)
    torch.testing.assert_close(
        scores, rated / raters.sum(dim=1, keepdim=True), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("query", ["last", "text"])
@torch.no_grad()
def test_fastv_ranks_by_layer_k_minus_1_attention_from_its_query_rows(query):
    """FastV (K = 2) scores each visual token by the attention it receives in layer 1 of the
    unpruned prompt, head mean, from the last token ("last", the default) or averaged over the
    prompt's text tokens ("text"): eager attention weights, by hand."""
    model = _model("llava")
    batch, _ = _inputs(model, "llava", [(1, 5), (1, 3)])
    language = model.model.language_model
    language.config._attn_implementation = "eager"
    weights = model(**batch, output_attentions=True).attentions[1].mean(dim=1)
    placeholder = batch["input_ids"] == IMAGE
    if query == "last":
        expected = weights[:, -1]
    else:
        text = (batch["attention_mask"].bool() & ~placeholder).float()
        expected = (weights * text[..., None]).sum(dim=1) / text.sum(dim=1, keepdim=True)
    seen = []

    class Recorded(method_class("fastv")):
        def select(self, visual, keep):
            seen.append(visual.attention.clone())
            return super().select(visual, keep)

    tokcomp.apply(model, Recorded(keep=4, query=query))
    model.set_attn_implementation("sdpa")
    model(**batch)
    torch.testing.assert_close(seen[0], expected[placeholder].view(2, 16), rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_pyramiddrop_ranks_by_the_last_tokens_attention_in_each_cut_layer():
    """Stage 1 (before layer 1 of 3) ranks the unpruned prompt's visual tokens by layer 1's
    own eager attention from the last token, head mean; stage 2 (before layer 2) ranks the
    survivors; each stage keeps int(N0 * lambda^s) of the N0 = 16 tokens per image."""
    model = _model("llava")
    batch, _ = _inputs(model, "llava", [(1, 5), (1, 3)])
    language = model.model.language_model
    language.config._attn_implementation = "eager"
    expected = model(**batch, output_attentions=True).attentions[1][:, :, -1].mean(dim=1)
    placeholder = batch["input_ids"] == IMAGE
    seen = []

    class Recorded(method_class("pyramiddrop")):
        def select(self, visual, keep):
            seen.append((visual.attention.clone(), keep))
            return super().select(visual, keep)

    tokcomp.apply(model, Recorded(keep=0.25))
    model.set_attn_implementation("sdpa")
    model(**batch)
    assert [keep for _, keep in seen] == [int(16 * 0.25**0.5), 4]  # lambda = 0.5 over 2 stages
    first = seen[0][0]
    torch.testing.assert_close(first, expected[placeholder].view(2, 16), rtol=1e-4, atol=1e-6)
    assert seen[1][0].shape == (2, 8)


# -- videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video) -----------------

QWEN_VIDEO = [f for f in FAMILIES if FAMILIES[f].kind == "qwen_video"]


#: (family, layout, selectable tokens of each image and video per sample, by hand): Qwen's
#: 3 x 6 x 4- and 1 x 4 x 4-patch videos and 1 x 6 x 4-patch image, 2 x 2 merged (a video and an
#: image mixed in sample 1); LLaVA-OneVision's 3 frames of 2 x 2 pooled tokens (the newline
#: after them always kept); LLaVA-NeXT-Video's 3 frames of 2 x 2 resampled tokens.
BUDGET_CASES = [
    *[pytest.param(f, LAYOUT, [[18], [4, 6], []], id=f) for f in QWEN_VIDEO],
    pytest.param("llava_onevision_video", [(1, 5), (1, 3)], [[12], [12]], id="llava_onevision"),
    pytest.param("llava_next_video", [(1, 5), (1, 3)], [[12], [12]], id="llava_next_video"),
]


@pytest.mark.parametrize("method", ["divprune", "fastv", "pyramiddrop"])
@pytest.mark.parametrize(("family", "layout", "items"), BUDGET_CASES)
@torch.no_grad()
def test_budgets_apply_per_video_and_per_image(family, layout, items, method):
    """A count keeps that many tokens of every video and every image; a fraction keeps that
    fraction of each; the LLM-stage methods score video tokens as image tokens."""
    model = _model(family)
    batch, _ = _inputs(model, family, layout)
    for keep, kept in ((3, lambda n: 3), (0.5, lambda n: n // 2)):
        tokcomp.apply(model, method, keep=keep)
        out = model(**batch, use_cache=True)
        dropped = [sum(n - kept(n) for n in row) for row in items]
        assert tokcomp.visual_tokens_dropped(out.cache).tolist() == dropped


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@torch.no_grad()
def test_an_image_keeps_its_count_when_it_has_more_crops_than_that(family):
    """Crops whose share of an image's budget is 0 keep none of their tokens: every method
    keeps exactly its count of the image's selectable tokens (those in its crops' segments)."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model(family)
    batch, _ = _inputs(model, family, [(1, 5)])
    vlm = family_for(model)(model)
    inputs = {name: batch[name] for name in vlm.encoder_inputs if name in batch}
    images = vlm.images(vlm.encode((), inputs, frozenset()), inputs, frozenset(), 0)
    crops, (selectable,) = len(images.segments), images.selectable()
    runs = [m for m in VISUAL if _runs_on(family, m) and method_class(m).budget == "keep"]
    for method in (m for m in runs if m != "sparsevlm"):  # SparseVLM adds recycled tokens
        for keep in range(1, crops):
            tokcomp.apply(model, method, keep=keep)
            dropped = tokcomp.visual_tokens_dropped(model(**batch, use_cache=True).cache)
            assert dropped.tolist() == [selectable - keep], (method, keep)


#: (family, layout, per sample the (tokens, frames) of each video and image, by hand).
FRAME_CASES = [
    *[pytest.param(f, LAYOUT, [[(18, 3)], [(4, 1), (6, 1)], []], id=f) for f in QWEN_VIDEO],
    pytest.param("llava_onevision_video", [(1, 5), (1, 3)], [[(12, 3)], [(12, 3)]], id="onevision"),
    pytest.param("llava_next_video", [(1, 5), (1, 3)], [[(12, 3)], [(12, 3)]], id="next_video"),
]


@pytest.mark.parametrize(("family", "layout", "items"), FRAME_CASES)
@torch.no_grad()
def test_dycoke_merges_each_video_s_own_frames_and_keeps_images_whole(family, layout, items):
    """With 3 frames, frame 1 keeps int((1 - k) x its tokens); a one-frame video and an image
    keep all theirs (applying it without options warns of nothing: it prunes videos only)."""
    model = _model(family)
    batch, _ = _inputs(model, family, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokcomp.apply(model, "dycoke", decode_layer=2)  # the tiny models have 3 layers
    for k in (0.7, 0.5):
        tokcomp.apply(model, "dycoke", k=k, decode_layer=2)
        out = model(**batch, use_cache=True)
        dropped = [sum(n // f - int((1 - k) * (n // f)) for n, f in row if f > 1) for row in items]
        assert tokcomp.visual_tokens_dropped(out.cache).tolist() == dropped


@contextlib.contextmanager
def _replaying_dycoke_decoding(model, method, video: torch.Tensor):
    """Hooks that make an uncached re-run of the pruned prompt plus the tokens so far decode as
    DyCoke's cached decoding: in each run after the first, the new token's head-averaged
    attention over the prompt in layer decode_layer - 1 (by hand: its query row against every
    key, from the layer's own inputs, Qwen3's q/k norms included) gives that step's kept
    positions by `decode_kept`; in the layers from decode_layer, each generated token's row
    attends to the prompt positions kept at its own step."""
    language = model.model.language_model
    attention = language.layers[method.decode_layer - 1].self_attn
    steps, prompt = [], []

    def score(module, args, kwargs):
        mask, hidden = kwargs["attention_mask"], kwargs["hidden_states"]
        assert mask is not None and mask.dtype == torch.bool  # sdpa's, with left padding
        if not prompt:
            prompt.append(hidden.shape[1])
            return
        q, k = (
            getattr(module, norm, torch.nn.Identity())(
                projection(hidden).unflatten(-1, (-1, module.head_dim))
            ).transpose(1, 2)
            for projection, norm in ((module.q_proj, "q_norm"), (module.k_proj, "k_norm"))
        )
        q, k = sys.modules[type(module).__module__].apply_rotary_pos_emb(
            q, k, *kwargs["position_embeddings"]
        )
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q[:, :, -1:] @ k.transpose(-1, -2)).float() * module.scaling
        probs = logits.masked_fill(~mask[:, :, -1:], -torch.inf).softmax(dim=-1)
        now = probs.mean(dim=1)[:, 0, : prompt[0]]
        previous, kept = steps[-1] if steps else (None, None)
        steps.append((now, method.decode_kept(now, video, previous, kept)))

    def restrict(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        for step, (_, kept) in enumerate(steps):
            mask[:, 0, prompt[0] + step, : prompt[0]] &= kept
        return args, {**kwargs, "attention_mask": mask}

    hooks = [attention.register_forward_pre_hook(score, with_kwargs=True)]
    for layer in language.layers[method.decode_layer :]:
        hooks.append(layer.register_forward_pre_hook(restrict, with_kwargs=True))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _video_by_hand(family: str, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) the video placeholders a method chooses from: all on Qwen and LLaVA-NeXT-Video; on
    LLaVA-OneVision all but the newline ending each video."""
    video = input_ids == VIDEO
    if family == "llava_onevision_video":
        video &= torch.nn.functional.pad(video, (0, 1))[:, 1:]
    return video


def _greedy_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Greedy new tokens (B, STEPS), each step's logits (STEPS, B, V) and the cache."""
    out = model.generate(
        **batch,
        max_new_tokens=STEPS,
        do_sample=False,
        suppress_tokens=[IMAGE],
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.logits), out.cache


@pytest.mark.parametrize(("k", "reuse"), [(0.0, True), (0.5, True), (0.5, False)])
@pytest.mark.parametrize("family", [*QWEN_VIDEO, "llava_onevision_video", "llava_next_video"])
@torch.no_grad()
def test_dycoke_cached_decoding_equals_replaying_its_step_masks_without_a_cache(family, k, reuse):
    """Greedy, a left-padded batch of 3 (a video; a video and an image; text only): cached
    generation with decode-time pruning gives the tokens and logits of re-running every step
    without a cache under the same per-step key masks, and logits other than without it."""
    method = create_method("dycoke", k=k, decode_layer=2, decode_p=0.8, decode_reuse=reuse)
    model = tokcomp.apply(_model(family), method)
    batch, _ = _inputs(model, family)
    tokens, logits, cache = _greedy_logits(model, batch)
    video = pruned_of(cache).decoding.video
    assert video.sum(dim=1)[2] == 0
    if k == 0.0:
        assert torch.equal(video, _video_by_hand(family, batch["input_ids"]))
    replayed = []
    last = model.lm_head.register_forward_hook(
        lambda m, i, out: replayed.append(out[:, -1].clone())
    )
    with _replaying_dycoke_decoding(model, method, video):
        assert torch.equal(tokens, _uncached_reference(model, family, batch))
    last.remove()
    torch.testing.assert_close(logits, torch.stack(replayed), rtol=1e-4, atol=1e-5)
    tokcomp.apply(model, "dycoke", k=k, decode_p=0.0)
    unpruned = _greedy_logits(model, batch)[1]
    assert torch.equal(logits[0], unpruned[0])  # the prefill's
    assert (logits[1:, :2] - unpruned[1:, :2]).abs().amax() > 1e-3  # the samples with videos


@torch.no_grad()
def test_dycoke_refuses_a_decode_layer_the_language_model_does_not_have_when_applied():
    model = _model("qwen2_vl_video")
    with pytest.raises(ValueError, match="decode_layer must be below the language model's 3"):
        tokcomp.apply(model, "dycoke")  # decode_layer 3 of 3 layers
    tokcomp.apply(model, "dycoke", decode_p=0.0)  # no decoding pruning: no decode_layer needed


class _Forced(hf.LogitsProcessor):
    """Makes generate pick `tokens` (steps,), one per step after a `prompt`-token prompt."""

    def __init__(self, tokens: torch.Tensor, prompt: int) -> None:
        self.tokens, self.prompt = tokens, prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt]] = 0.0
        return forced


def _log_likelihood(model, inputs: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The summed log-probabilities of `tokens` (steps,) after the one prompt of `inputs`, as
    generate decodes them through the cache, one step at a time."""
    prompt = inputs["input_ids"].shape[1]
    out = model.generate(
        **inputs,
        max_new_tokens=len(tokens),
        do_sample=False,
        pad_token_id=PAD,
        logits_processor=hf.LogitsProcessorList([_Forced(tokens, prompt)]),
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert torch.equal(out.sequences[0, prompt:], tokens)
    steps = zip(out.logits, tokens, strict=True)
    return torch.stack([logits[0].float().log_softmax(-1)[t] for logits, t in steps]).sum()


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("family", [*QWEN_VIDEO, "llava_onevision_video", "llava_next_video"])
@torch.no_grad()
def test_dycoke_beams_score_each_sequence_as_it_decodes_alone(family, reuse):
    """Beam search with decode-time pruning (3 beams returned per prompt, a left-padded batch of
    3): each beam's score is its tokens' log-likelihood when that one sequence is decoded alone,
    so each beam pruned its steps with its own state, carried through generate's reordering
    (which, skipped, moves these scores by 1e-3 to 5e-2)."""
    method = create_method("dycoke", k=0.5, decode_layer=2, decode_p=0.8, decode_reuse=reuse)
    model = tokcomp.apply(_model(family), method)
    batch, alone = _inputs(model, family)
    out = model.generate(
        **batch,
        max_new_tokens=STEPS,
        do_sample=False,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,  # scores: summed log-probabilities
        suppress_tokens=[IMAGE],
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
    )
    beams = out.sequences[:, batch["input_ids"].shape[1] :]
    alone_scores = [_log_likelihood(model, alone[row // 3], seq) for row, seq in enumerate(beams)]
    torch.testing.assert_close(torch.stack(alone_scores), out.sequences_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl_video", "llava_onevision_video"])
@torch.no_grad()
def test_dycoke_sampled_copies_of_a_prompt_each_decode_as_the_prompt_alone(family):
    """Decode-time pruning on several sequences per prompt: each copy starts from its prompt's
    state, so sampling from the likeliest token gives every copy the greedy generation."""
    model = tokcomp.apply(_model(family), "dycoke", k=0.5, decode_layer=2, decode_p=0.8)
    batch, _ = _inputs(model, family)
    greedy = _generate(model, batch)
    copies = _generate(model, batch, do_sample=True, top_k=1, num_return_sequences=3)
    assert torch.equal(copies, greedy.repeat_interleave(3, dim=0))


@torch.no_grad()
def test_dycoke_refuses_a_decode_layer_after_a_sliding_window_layer():
    config = copy.deepcopy(_built("qwen2_vl_video").config)
    config.text_config.sliding_window = 8
    config.text_config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    model = tokcomp.apply(
        hf.Qwen2VLForConditionalGeneration(config).eval(), "dycoke", decode_layer=2
    )
    batch, _ = _inputs(model, "qwen2_vl_video")
    with pytest.raises(ValueError, match="layer decode_layer - 1 = 1 has sliding-window"):
        _generate(model, batch)


def test_dycoke_refuses_target_macs_naming_its_knob():
    with pytest.raises(ValueError, match="dycoke: give k instead of target_macs"):
        tokcomp.apply(_model("qwen2_vl"), "dycoke", target_macs=0.5)
    with pytest.raises(ValueError, match=r"follows from k; give k instead of schedule"):
        tokcomp.apply(_model("qwen2_vl"), "dycoke", decode_layer=2, schedule=[1])
    with pytest.raises(ValueError, match=r"give keep \(or target_macs\) instead of schedule"):
        tokcomp.apply(_model("qwen2_vl"), "divprune", schedule=[1])
    method = create_method("dycoke", decode_layer=2, schedule=[1])
    with pytest.raises(ValueError, match=r"but its schedule is \[1\]: .* follows from k;"):
        tokcomp.apply(_model("qwen2_vl"), method)


@pytest.mark.parametrize("family", QWEN_VIDEO)
@torch.no_grad()
def test_a_video_is_one_segment_of_its_frames_with_the_model_s_features(family):
    """Each video: one segment over all its t x h x w tokens with its t temporal patches as
    frames, the outputs get_video_features gives, and features the projector maps to them."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model(family)
    batch, _ = _inputs(model, family)
    vlm, needs = family_for(model)(model), frozenset({VisualSignal.FEATURES})
    inputs = {name: batch[name] for name in ("pixel_values_videos", "video_grid_thw")}
    encoded = vlm.encode_videos((), inputs, needs)
    videos = vlm.videos(encoded, inputs, needs)
    expected = model.model.get_video_features(**inputs).pooler_output
    grid = batch["video_grid_thw"].tolist()
    assert [(s.image, s.frames, s.visual.tokens) for s in videos.segments] == [
        (i, t, t * h * w // 4) for i, (t, h, w) in enumerate(grid)
    ]
    for segment, outputs in zip(videos.segments, expected, strict=True):
        torch.testing.assert_close(segment.visual.outputs[0], outputs)
        torch.testing.assert_close(segment.visual.project(segment.visual.features), outputs[None])


def _video_prompt(count: int) -> torch.Tensor:
    text = torch.arange(10, 15)
    video = torch.tensor([VISION_START, *[VIDEO] * count, VISION_END])
    return torch.cat([torch.tensor([BOS]), text, video, text])[None]


@pytest.mark.parametrize("family", ["qwen2_vl_video", "qwen2_5_vl_video"])
@torch.no_grad()
def test_renumbering_a_video_cut_to_a_sub_grid_is_the_model_s_numbering_of_that_grid(family):
    """Keeping the first 2 of 3 temporal patches and the top-left 2 x 2 of 3 x 2 merged tokens
    of each: the renumbered prompt is numbered as get_rope_index numbers a (2, 4, 4)-patch
    video (Qwen2.5-VL: at 2 s per temporal patch), text after it included."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model(family)
    vlm = family_for(model)(model)
    seconds = {"second_per_grid_ts": torch.tensor([2.0])} if "2_5" in family else {}

    def numbered(ids: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        types = (ids == VIDEO).int() * 2
        inputs = {"mm_token_type_ids": types, "video_grid_thw": torch.tensor([grid]), **seconds}
        return vlm.positions(ids, None, None, inputs)

    ids = _video_prompt(18)
    placeholder = vlm.placeholders(ids)
    t, h, w = torch.meshgrid(torch.arange(3), torch.arange(3), torch.arange(2), indexing="ij")
    pruned = placeholder.clone()
    pruned[placeholder] = ((t >= 2) | (h >= 2) | (w >= 2)).flatten()
    positions, shift = vlm.renumber(numbered(ids, (3, 6, 4)), placeholder, pruned)
    expected = numbered(_video_prompt(8), (2, 4, 4))
    assert torch.equal(positions[:, ~pruned][:, None], expected)
    assert shift.tolist() == [1]


def _qwen3_video_prompt(counts: list[int]) -> torch.Tensor:
    """A Qwen3-VL video prompt: per temporal patch, timestamp text then its run of `counts`
    placeholders between vision start and end tokens (an empty run: a patch pruned whole)."""
    text = torch.arange(10, 15)
    runs = [torch.tensor([20, 21, VISION_START, *[VIDEO] * n, VISION_END]) for n in counts]
    return torch.cat([torch.tensor([BOS]), text, *runs, text])[None]


@torch.no_grad()
def test_renumbering_qwen3_vl_video_runs_is_the_model_s_numbering_of_the_kept_grid():
    """A (3, 6, 4)-patch video, each temporal patch its own run of 3 x 2 merged tokens after
    its timestamp: keeping the top 2 x 2 of the first two runs and none of the third, the
    renumbered prompt is numbered as get_rope_index numbers the prompt that holds two runs of
    a (2, 4, 4)-patch video and the third run's timestamp and start and end tokens alone."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model("qwen3_vl_video")
    vlm = family_for(model)(model)

    def numbered(ids: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        inputs = {
            "mm_token_type_ids": (ids == VIDEO).int() * 2,
            "video_grid_thw": torch.tensor([grid]),
        }
        return vlm.positions(ids, None, None, inputs)

    ids = _qwen3_video_prompt([6, 6, 6])
    placeholder = vlm.placeholders(ids)
    t, h = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    pruned = placeholder.clone()
    pruned[placeholder] = ((t >= 2) | (h >= 2))[..., None].expand(3, 3, 2).flatten()
    positions, shift = vlm.renumber(numbered(ids, (3, 6, 4)), placeholder, pruned)
    expected = numbered(_qwen3_video_prompt([4, 4, 0]), (2, 4, 4))
    assert torch.equal(positions[:, ~pruned][:, None], expected)
    assert shift.tolist() == [1 + 1 + 3]  # each run's extent: 3 rows, then 2 rows or none


@torch.no_grad()
def test_qwen3_vl_video_cut_to_its_last_temporal_patch_is_the_model_on_the_shorter_prompt():
    """Keeping only the last temporal patch's tokens of a video ("renumber"): the earlier runs
    are pruned whole, their timestamps and start/end tokens stay. The last logits are the
    unpatched model's on the prompt without the pruned placeholders, numbered by its own
    get_rope_index as a one-patch video, given the kept tokens and their deepstack features;
    keeping the original positions instead gives other logits."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        BaseModelOutputWithDeepstackFeatures,
    )

    class Last(method_class("divprune")):
        def select(self, visual, keep):
            return torch.arange(visual.tokens - keep, visual.tokens).expand(visual.batch, -1)

    model = _model("qwen3_vl_video")
    batch, _ = _inputs(model, "qwen3_vl_video", [(1, 4)])
    ((temporal, rows, cols),) = batch["video_grid_thw"].tolist()
    keep = rows * cols // 4
    assert temporal > 1
    encoded = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    outputs = BaseModelOutputWithDeepstackFeatures(
        pooler_output=[encoded.pooler_output[0][-keep:]],
        deepstack_features=[[level[0][-keep:]] for level in encoded.deepstack_features],
    )
    ids = batch["input_ids"][0]
    video = (ids == VIDEO).nonzero().squeeze(1)
    kept = torch.ones_like(ids, dtype=torch.bool)
    kept[video[:-keep]] = False
    shorter = ids[kept][None]
    expected = model(
        input_ids=shorter,
        mm_token_type_ids=2 * (shorter == VIDEO).int(),
        video_grid_thw=torch.tensor([[1, rows, cols]]),
        mm_encoder_outputs={"video": outputs},
    ).logits[:, -1]
    tokcomp.apply(model, Last(keep=keep, positions="renumber"))
    torch.testing.assert_close(model(**batch).logits[:, -1], expected, rtol=1e-4, atol=1e-5)
    tokcomp.apply(model, Last(keep=keep, positions="keep"))
    assert not torch.allclose(model(**batch).logits[:, -1], expected, rtol=1e-3, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(f for f in TOWER_ATTENTION if "video" not in f))
def test_image_features_lacking_the_tower_layer_a_method_reads_are_refused(family):
    """mm_encoder_outputs from the unpatched get_image_features hold no tower attention input;
    the patched model's own get_image_features does, and gives what pixel_values give."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model(family)
    batch, _ = _inputs(model, family)
    encoder_inputs = family_for(model)(model).encoder_inputs
    inputs = {name: value for name, value in batch.items() if name in encoder_inputs}
    plain = model.model.get_image_features(**inputs)
    tokcomp.apply(model, "visionzip", keep=0.5)
    rest = {name: value for name, value in batch.items() if name != "pixel_values"}
    with pytest.raises(UsageError, match=r"^these image features hold no hidden state of the"):
        model(**rest, mm_encoder_outputs={"image": plain})
    own = model.model.get_image_features(**inputs)
    logits = model(**rest, mm_encoder_outputs={"image": own}).logits
    torch.testing.assert_close(logits, model(**batch).logits)


def _record_qwen3_tower_attention(model: torch.nn.Module) -> list[torch.Tensor]:
    """Switch the Qwen3-VL tower of `model` to eager attention that records each call's weights
    (of its first batch row); the list it fills."""
    from transformers import AttentionInterface
    from transformers.models.qwen3_vl.modeling_qwen3_vl import eager_attention_forward

    recorded = []

    def recording(module, *args, **kwargs):
        output, weights = eager_attention_forward(module, *args, **kwargs)
        recorded.append(weights[0])
        return output, weights

    AttentionInterface.register("tokcomp_test_recording", recording)
    model.model.visual.config._attn_implementation = "tokcomp_test_recording"
    return recorded


@torch.no_grad()
def test_qwen3_vl_video_signals_are_each_temporal_patch_s_own_attention():
    """A video's attention signal, per merged token, is the mean over its four patches of what
    each receives in the last tower block from the patches of its own temporal patch (the
    tower attends within each; eager weights averaged over queries, summed over heads), the
    temporal patches in order; the deepstack features travel with the video's tokens."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model("qwen3_vl_video")
    family, needs = family_for(model)(model), frozenset(VisualSignal)
    batch, _ = _inputs(model, "qwen3_vl_video", [(1, 3)])
    inputs = {name: batch[name] for name in family.video_encoder_inputs}
    videos = family.videos(family.encode_videos((), inputs, needs), inputs, needs)
    recorded = _record_qwen3_tower_attention(model)
    encoded = model.model.get_video_features(**inputs)
    ((temporal, rows, cols),) = batch["video_grid_thw"].tolist()
    received = [w.mean(dim=1).sum(dim=0).view(-1, 4).mean(dim=1) for w in recorded[-temporal:]]
    (segment,) = videos.segments
    assert (segment.frames, segment.visual.tokens) == (temporal, temporal * rows * cols // 4)
    torch.testing.assert_close(
        segment.visual.attention[0], torch.cat(received), rtol=1e-4, atol=1e-6
    )
    levels = [level[0] for level in encoded.deepstack_features]
    torch.testing.assert_close(videos.injected[0], torch.stack(levels, dim=1))


def _two_llava_videos(
    name: str,
) -> tuple[Images, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Two random 3-frame videos (4 x 4 patches a frame) through the tiny `name` LLaVA video
    model's family with every signal: their Images, the model's own video tokens, the tower's
    (attention, keys) in its feature layer and that layer's hidden states."""
    from tokcomp.adapters.hf_vlm.families import family_for
    from tokcomp.adapters.hf_vlm.families.llava import tower_attention

    model = _model(name)
    vlm, needs = family_for(model)(model), frozenset(VisualSignal)
    inputs = {"pixel_values_videos": torch.randn(2, 3, 3, 32, 32)}
    encoded = vlm.encode_videos((), inputs, needs)
    videos = vlm.videos(encoded, inputs, needs)
    expected = model.model.get_video_features(**inputs).pooler_output
    index = vlm.feature_index(inputs)
    signals = tower_attention(model.model.vision_tower, encoded.hidden_states[index - 1], index - 1)
    return videos, expected, signals, encoded.hidden_states[index]


@torch.no_grad()
def test_onevision_video_is_one_segment_of_its_pooled_frames_and_keeps_its_newline():
    """Two 3-frame videos of 4 x 4 patches per frame: each frame's tokens 2 x 2 pooled (its
    attention too: the 2 x 2 mean), the 12 pooled tokens one segment of 3 frames, the newline
    after them in none; features are the pooled outputs (identity projector)."""
    videos, expected, (attention, _), _ = _two_llava_videos("llava_onevision_video")
    pooled = torch.nn.functional.avg_pool2d(attention.view(6, 1, 4, 4), 2).view(2, 12)
    assert [(s.image, s.frames, s.slots.tolist()) for s in videos.segments] == [
        (0, 3, list(range(12))),
        (1, 3, list(range(12))),
    ]
    for video, segment in enumerate(videos.segments):
        torch.testing.assert_close(videos.embeds[video], expected[video])
        torch.testing.assert_close(segment.visual.outputs[0], expected[video, :12])
        torch.testing.assert_close(segment.visual.features, segment.visual.outputs)
        torch.testing.assert_close(segment.visual.attention[0], pooled[video])


@torch.no_grad()
def test_llava_next_video_is_one_segment_of_its_resampled_frames():
    """Two 3-frame videos of 4 x 4 patches per frame: each frame's feature-layer patches (class
    token dropped) 2 x 2 average-pooled by hand are the FEATURES, which the projector maps to
    the model's own video tokens; attention and keys are the same 2 x 2 means of the feature
    layer's; the 12 tokens one segment of 3 frames, no newline."""
    videos, expected, (attention, keys), feature_layer = _two_llava_videos("llava_next_video")

    def pooled(per_patch: torch.Tensor) -> torch.Tensor:  # (6, 16, C) -> (2, 12, C)
        grid = per_patch.reshape(6, 2, 2, 2, 2, -1)  # frame, row pair, row, column pair, column
        return grid.mean(dim=(2, 4)).reshape(2, 12, -1)

    features = pooled(feature_layer[:, 1:])
    assert [(s.image, s.frames, s.slots.tolist()) for s in videos.segments] == [
        (0, 3, list(range(12))),
        (1, 3, list(range(12))),
    ]
    for video, segment in enumerate(videos.segments):
        torch.testing.assert_close(segment.visual.outputs[0], expected[video])
        torch.testing.assert_close(segment.visual.features[0], features[video])
        torch.testing.assert_close(
            segment.visual.project(segment.visual.features)[0], expected[video]
        )
        torch.testing.assert_close(
            segment.visual.attention[0], pooled(attention[:, 1:, None])[video, :, 0]
        )
        torch.testing.assert_close(segment.visual.keys[0], pooled(keys[:, 1:])[video])


def test_videos_where_none_are_taken_and_bad_frame_counts_are_refused():
    qwen = tokcomp.apply(_model("qwen2_vl"), "divprune", keep=4)
    for frames in (0, 1.5, "4", True):  # 1.5 was priced, as a float the config cannot hold
        with pytest.raises(ValueError, match="frame count"):
            tokcomp.config_of(qwen, frames=frames)
        with pytest.raises(ValueError, match="frame count"):
            tokcomp.macs(qwen, frames=frames)
    assert tokcomp.macs(qwen, frames=np.int64(2)) == tokcomp.macs(qwen, frames=2)
    model = tokcomp.apply(_model("llava"), "divprune", keep=4)
    with pytest.raises(ValueError, match="takes no videos"):
        tokcomp.config_of(model, frames=4)
    with pytest.raises(ValueError, match="video inputs are not supported"):
        model(
            input_ids=torch.tensor([[BOS, IMAGE]]), pixel_values_videos=torch.zeros(1, 1, 3, 32, 32)
        )


# -- LLaVA-OneVision's crops ---------------------------------------------------------------------


@torch.no_grad()
def test_onevision_segments_are_its_crops_and_a_pooled_token_takes_the_crop_weighing_most():
    """A 64 x 64 image: a base crop, then a 2 x 2 grid of 4 x 4-token crops pooled (anyres_max_1)
    to 4 x 4 tokens, each row followed by a newline. Pooled token (i, j) lies in grid crop
    (i // 2, j // 2) and gets the 2 x 2 mean of its patches' attention; the base crop's features
    project to its tokens. With batch_num_images, each image is one crop and a newline."""
    from tokcomp.adapters.hf_vlm.families import family_for
    from tokcomp.adapters.hf_vlm.families.llava import tower_attention

    model = _model("llava_onevision")
    family, needs = family_for(model)(model), frozenset(VisualSignal)
    inputs = {"pixel_values": torch.randn(1, 5, 3, 32, 32), "image_sizes": torch.tensor([[64, 64]])}
    encoded = family.encode((), inputs, needs)
    base, *grid = family.images(encoded, inputs, needs, 0).segments
    assert base.slots.tolist() == list(range(16))
    torch.testing.assert_close(base.visual.project(base.visual.features), base.visual.outputs)
    crops = {}
    for i in range(4):
        for j in range(4):
            crops.setdefault(i // 2 * 2 + j // 2, []).append(16 + 5 * i + j)
    assert [segment.slots.tolist() for segment in grid] == [crops[c] for c in range(4)]
    index = family.feature_index(inputs)
    attention, _ = tower_attention(
        model.model.vision_tower, encoded.hidden_states[index - 1], index - 1
    )
    patches = attention[1:].view(2, 2, 4, 4).permute(0, 2, 1, 3).reshape(1, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(patches, 2).flatten()
    for segment, slots in zip(grid, crops.values(), strict=True):
        rows = [(slot - 16) // 5 * 4 + (slot - 16) % 5 for slot in slots]
        torch.testing.assert_close(segment.visual.attention[0], pooled[rows])
    several = {**inputs, "pixel_values": torch.randn(2, 5, 3, 32, 32)}
    several.update(
        image_sizes=torch.tensor([[64, 64], [32, 64]]), batch_num_images=torch.tensor([2])
    )
    images = family.images(family.encode((), several, needs), several, needs, 0)
    assert [len(e) for e in images.embeds] == [17, 17]
    assert [(s.image, s.slots.tolist()) for s in images.segments] == [
        (0, list(range(16))),
        (1, list(range(16))),
    ]
    for segment in images.segments:
        torch.testing.assert_close(
            segment.visual.project(segment.visual.features), segment.visual.outputs
        )


# -- Gemma 3's bidirectional image blocks --------------------------------------------------------


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    for row, tokens in enumerate(rows):
        ids[row, length - len(tokens) :] = tokens
    return ids, (ids != PAD).long()


@torch.no_grad()
def test_gemma3_pruned_images_attend_as_in_the_model_on_the_shorter_prompt():
    """Each image's kept tokens are one bidirectional block: the patched model's last logits are
    the unpatched model's on the prompt holding only the kept placeholders (token_type_ids
    marking them) and the kept image tokens; without token_type_ids they differ."""
    model, keep, per_image = _model("gemma3"), 5, 16

    class Last(method_class("divprune")):
        def select(self, visual, keep):
            index = torch.arange(visual.tokens - keep, visual.tokens)
            return index.expand(visual.batch, -1)

    batch, _ = _inputs(model, "gemma3", [(1, 5), (2, 3)])
    features = model.model.get_image_features(batch["pixel_values"]).pooler_output
    rows = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        ids = ids[mask.bool()]
        placeholder = ids == IMAGE
        in_image = (placeholder.long().cumsum(0) - 1) % per_image
        rows.append(ids[~placeholder | (in_image >= per_image - keep)])
    ids, mask = _left_padded(rows)
    pruned = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
        "mm_encoder_outputs": {
            "image": hf.modeling_outputs.BaseModelOutputWithPooling(
                pooler_output=features[:, -keep:]
            )
        },
    }
    expected = model(**pruned, token_type_ids=(ids == IMAGE).long()).logits[:, -1]
    causal = model(**pruned).logits[:, -1]
    tokcomp.apply(model, Last(keep=keep))
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    logits = model(**batch, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits, causal, rtol=1e-3, atol=1e-3)


# -- Mistral 3's Pixtral tower -------------------------------------------------------------------


@torch.no_grad()
def test_mistral3_signals_are_the_towers_eager_attention_pooled_over_each_merged_window():
    """Images of 4 x 6 and 4 x 4 patches in one tower pass: each merged token's attention is
    the mean over its 2 x 2 patches of what each patch receives in the last block (the eager
    weights, averaged over the image's queries, summed over heads); its features are the
    merger's inputs, which the projector takes to the model's own image features."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model("mistral3")
    family, needs = family_for(model)(model), frozenset(VisualSignal)
    batch, _ = _inputs(model, "mistral3", [(2, 3)])
    inputs = {name: batch[name] for name in ("pixel_values", "image_sizes")}
    images = family.images(family.encode((), inputs, needs), inputs, needs, 0)
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    weights = tower(**inputs, output_attentions=True).attentions[-1][0]
    start = 0
    for segment, (height, width) in zip(images.segments, [(4, 6), (4, 4)], strict=True):
        block = slice(start, start + height * width)
        received = weights[:, block, block].mean(dim=1).sum(dim=0).view(1, height, width)
        pooled = torch.nn.functional.avg_pool2d(received, 2).flatten()
        torch.testing.assert_close(segment.visual.attention[0], pooled, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            segment.visual.project(segment.visual.features), segment.visual.outputs
        )
        start += height * width


@torch.no_grad()
def test_mistral3_image_break_and_end_tokens_are_never_pruned():
    """Keeping one visual token per image, the language model still gets every image-break and
    image-end token of each prompt (their embeddings), and only the placeholders are dropped."""
    model = tokcomp.apply(_model("mistral3"), "fastervlm", keep=1)
    batch, _ = _inputs(model, "mistral3")
    seen = []
    language = model.model.language_model
    hook = language.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    output = model(**batch, use_cache=True)
    hook.remove()
    table = language.embed_tokens.weight
    for row, ids in enumerate(batch["input_ids"]):
        for token in (IMAGE_BREAK, IMAGE_END):
            found = (seen[0][row] == table[token]).all(dim=-1).sum()
            assert found == (ids == token).sum()
    images = [1, 2, 0]
    dropped = [(ids == IMAGE).sum() - n for ids, n in zip(batch["input_ids"], images, strict=True)]
    assert tokcomp.visual_tokens_dropped(output.cache).tolist() == dropped


# -- Qwen3-VL's deepstack features ---------------------------------------------------------------


@torch.no_grad()
def test_qwen3_vl_kept_tokens_take_their_own_deepstack_features():
    """The patched model's last logits are the unpatched model's on the prompt holding only the
    kept placeholders (at their original positions), given the kept tokens and the deepstack
    features of exactly those tokens; with the features of the first tokens instead they
    differ."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        BaseModelOutputWithDeepstackFeatures,
    )

    model, keep = _model("qwen3_vl"), 2

    class Last(method_class("divprune")):
        def select(self, visual, keep):
            index = torch.arange(visual.tokens - keep, visual.tokens)
            return index.expand(visual.batch, -1)

    batch, _ = _inputs(model, "qwen3_vl", [(1, 5), (2, 3)])
    encoded = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    (per_image,) = {len(e) for e in encoded.pooler_output}  # 6 tokens each
    rows, columns = [], []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        placeholder = ids == IMAGE
        in_image = (placeholder.long().cumsum(0) - 1) % per_image
        kept = mask.bool() & (~placeholder | (in_image >= per_image - keep))
        rows.append(ids[kept])
        columns.append(kept.nonzero().squeeze(1))
    ids, mask = _left_padded(rows)
    pruned_positions = torch.zeros(3, *ids.shape, dtype=torch.long)
    for row, kept in enumerate(columns):
        pruned_positions[:, row, ids.shape[1] - len(kept) :] = positions[:, row, kept]

    def run(deepstack_rows: slice) -> torch.Tensor:
        levels = encoded.deepstack_features
        outputs = BaseModelOutputWithDeepstackFeatures(
            pooler_output=[e[-keep:] for e in encoded.pooler_output],
            deepstack_features=[[f[deepstack_rows] for f in level] for level in levels],
        )
        return model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pruned_positions,
            mm_encoder_outputs={"image": outputs},
        ).logits[:, -1]

    expected, first = run(slice(-keep, None)), run(slice(0, keep))
    tokcomp.apply(model, Last(keep=keep, positions="keep"))
    logits = model(**batch).logits[:, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits, first, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_qwen3_vl_signals_are_the_last_blocks_eager_attention_averaged_per_merged_token():
    """Each merged token's attention is the mean over its four patches (consecutive in the
    tower's order) of what each receives in the last block from its own image's patches (the
    eager weights, averaged over queries, summed over heads)."""
    from tokcomp.adapters.hf_vlm.families import family_for

    model = _model("qwen3_vl")
    family, needs = family_for(model)(model), frozenset(VisualSignal)
    batch, _ = _inputs(model, "qwen3_vl", [(2, 3)])
    inputs = {name: batch[name] for name in family.encoder_inputs}
    images = family.images(family.encode((), inputs, needs), inputs, needs, 0)
    recorded = _record_qwen3_tower_attention(model)
    model.model.get_image_features(**inputs)
    for segment, weights in zip(images.segments, recorded[-2:], strict=True):
        received = weights.mean(dim=1).sum(dim=0).view(-1, 4).mean(dim=1)
        torch.testing.assert_close(segment.visual.attention[0], received, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_qwen3_vl_llm_stage_cut_keeps_the_kept_tokens_later_deepstack_features():
    """FastV cutting before layer 1 of 3 (deepstack adds after layers 0 and 1), by hand with the
    model's own layers: layer 0 and its injection on the whole prompt; the kept rows (each
    image's last two tokens) with their original positions; layer 1 and the kept tokens' own
    second-level features; layer 2. Without that second injection the logits differ."""
    model, keep = _model("qwen3_vl"), 2
    batch, _ = _inputs(model, "qwen3_vl", [(2, 3)])
    ids, inner = batch["input_ids"], model.model
    language = inner.language_model
    encoded = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    positions, _ = inner.get_rope_index(
        ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    visual = ids == IMAGE
    hidden = language.embed_tokens(ids)
    hidden[visual] = torch.cat(encoded.pooler_output)
    levels = [torch.cat(level) for level in encoded.deepstack_features]
    in_image = (visual.long().cumsum(1) - 1) % 6  # 6 tokens per image
    kept = ~visual | (in_image >= 6 - keep)

    def layer(index: int, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        mask = torch.zeros(causal.shape).masked_fill(~causal, -torch.inf)[None, None]
        rotary = language.rotary_emb(x, rope)
        return language.layers[index](x, attention_mask=mask, position_embeddings=rotary)

    def logits(second_injection: bool) -> torch.Tensor:
        x = layer(0, hidden, positions)
        x[visual] += levels[0]
        x, rope, kept_visual = x[:, kept[0]], positions[:, :, kept[0]], visual[:, kept[0]]
        x = layer(1, x, rope)
        if second_injection:
            x[kept_visual] += levels[1][kept[visual]]
        x = layer(2, x, rope)
        return model.lm_head(language.norm(x))[:, -1]

    expected, without = logits(True), logits(False)
    tokcomp.apply(model, _fixed("fastv", keep=keep, layer=1, positions="keep"))
    patched = model(**batch).logits[:, -1]
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(patched, without, rtol=1e-3, atol=1e-3)


# -- vision-transformer methods in the LLaVA tower ------------------------------------------


@torch.no_grad()
def test_vit_methods_act_inside_the_llava_vision_tower():
    model = _model("llava")
    batch, _ = _inputs(model, "llava")
    expected = _generate(model, batch)
    tokcomp.apply(model, "tome", r=0)
    assert torch.equal(_generate(model, batch), expected)
    tokcomp.apply(model, "tome", r=4)
    config = tokcomp.config_of(model)
    assert config.schedule == [17 - 4, 17 - 8, 17 - 12] and config.macs_ratio < 0.9
    assert "forward" in model.model.vision_tower.__dict__
    assert torch.equal(_generate(model, batch), _uncached_reference(model, "llava", batch))
    tokcomp.remove(model)
    assert "forward" not in model.model.vision_tower.__dict__
    assert torch.equal(_generate(model, batch), expected)


def test_vit_methods_are_refused_where_the_tower_cannot_be_compressed():
    with pytest.raises(ValueError, match=r"vision tower of LLaVA-1\.5 only"):
        tokcomp.apply(_model("qwen2_vl"), "tome", r=2)


# -- configs, MACs ----------------------------------------------------------------------------


#: (method, family, options): every method once, and the newest families.
ROUND_TRIPS = [
    ("zoo", "llava", {"keep": 5, "positions": "keep", "sketch": 8}),
    ("random", "qwen2_5_vl", {"keep_ratio": 0.5, "seed": 3}),
    ("fastv", "idefics3", {"keep": 3, "layer": 1, "query": "text"}),
    ("visionzip", "llava_next", {"keep": 0.3}),
    ("fastervlm", "llava_siglip", {"keep": 6}),
    ("vispruner", "llava", {"keep": 7, "important": 0.75}),
    ("pyramiddrop", "qwen2_vl", {"keep": 0.25, "layers": [1, 2]}),
    ("dart", "smolvlm", {"keep": 7, "layer": 1, "pivot_image": 2, "pivot_text": 3}),
    ("tome", "llava", {"r": 3}),
    ("vispruner", "mistral3", {"keep": 4, "important": 0.75}),
    ("pyramiddrop", "qwen3_vl", {"keep": 0.5, "layers": [1, 2]}),
    ("sparsevlm", "qwen2_vl", {"keep": 0.3, "layers": [0, 0, 1], "seed": 2}),
    ("cdpruner", "internvl", {"keep": 5}),
    ("divprune", "gemma3", {"keep": 4, "positions": "keep"}),
    ("fastvid", "llava_onevision_video", {"keep": 0.5, "segments": 2, "positions": "renumber"}),
    (
        "dycoke",
        "qwen2_vl_video",
        {"k": 0.5, "decode_layer": 2, "decode_p": 0.6, "positions": "keep"},
    ),
]


def test_every_visual_token_method_has_a_config_round_trip():
    assert set(VISUAL) <= {method for method, _, _ in ROUND_TRIPS}


#: Options a config holds as its schedule.
SETTLED = ("schedule", "target_macs")


@pytest.mark.parametrize(
    ("method", "family", "options"), ROUND_TRIPS, ids=[f"{m}-{f}" for m, f, _ in ROUND_TRIPS]
)
@torch.no_grad()
def test_config_round_trips_and_reapplies(method, family, options, tmp_path):
    model = tokcomp.apply(_model(family), method, **options)
    config = tokcomp.config_of(model)
    defaults = create_method(method).options()
    stated = {name: value for name, value in defaults.items() if name not in SETTLED} | options
    assert config.method == method and config.options == stated  # defaults included
    assert config.model["architecture"] == type(model).__name__
    batch, _ = _inputs(model, family)
    assert_config_reloads(config, lambda: _model(family), model, _generate, batch, tmp_path)


def test_a_config_refuses_another_architecture(tmp_path):
    path = tokcomp.config_of(tokcomp.apply(_model("llava"), "zoo", keep=5)).save(
        tmp_path / "c.json"
    )
    with pytest.raises(tokcomp.ConfigError, match="made for"):
        tokcomp.apply(_model("llava_siglip"), path)
    with pytest.raises(tokcomp.ConfigError, match="architecture"):
        tokcomp.apply(_model("llava_next"), path)


def test_macs_count_tower_projector_and_prefill_by_hand():
    model = tokcomp.apply(_model("llava"), "divprune", keep=4)
    spec = tokcomp.config_of(model).model
    text = model.config.text_config
    width, ff, heads, kv, head = (
        text.hidden_size,
        text.intermediate_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.hidden_size // text.num_attention_heads,
    )
    per_token = width * (2 * heads * head + 2 * kv * head) + 3 * width * ff
    assert spec["llm_token_macs"] == per_token and spec["llm_attn_dim"] == heads * head

    def prefill(visual: int) -> int:
        n = 40 + visual
        return text.num_hidden_layers * (n * per_token + 2 * n * n * heads * head)

    config = tokcomp.config_of(model)
    assert config.base_macs - (config.macs - config.selection_macs) == prefill(16) - prefill(4)
    assert config.selection_macs == 16 * 16 * width  # DivPrune's cosine distances
    vision = model.config.vision_config
    tower = 17 * (4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size)
    tower = vision.num_hidden_layers * (tower + 2 * 17 * 17 * vision.hidden_size)
    stem = 16 * vision.hidden_size * 3 * vision.patch_size**2
    projector = 16 * (vision.hidden_size * width + width * width)
    assert config.base_macs == stem + tower + projector + prefill(16) + width * text.vocab_size


def test_fastv_schedule_prunes_after_layer_k_and_target_macs_picks_a_budget():
    model = tokcomp.apply(_model("llava"), "fastv", keep=4, layer=1)
    assert tokcomp.config_of(model).schedule[-3:] == [16, 4, 4]
    tokcomp.apply(model, "zoo", target_macs=0.9, directions=2)
    config = tokcomp.config_of(model)
    assert abs(config.macs_ratio - 0.9) < 0.05 and isinstance(config.options["keep"], int)


# -- generation variants, re-entrancy ---------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "smolvlm", "mistral3", "qwen3_vl"])
@torch.no_grad()
def test_sampling_runs_with_sdpa_kept(family):
    model = tokcomp.apply(_model(family), "zoo", keep=0.5)
    batch, _ = _inputs(model, family)
    torch.manual_seed(0)
    first = _generate(model, batch, do_sample=True, top_k=5)
    torch.manual_seed(0)
    assert torch.equal(first, _generate(model, batch, do_sample=True, top_k=5))
    assert first.shape == (3, STEPS)
    assert model.config.text_config._attn_implementation == "sdpa"


def _manual_greedy(model, batch: dict, steps: int = STEPS) -> torch.Tensor:
    """Greedy decoding by hand through the cache, never passing position ids (the model's own
    numbering: Qwen's RoPE deltas, LLaMA's cache length)."""
    out = model(**batch, use_cache=True)
    mask, tokens = batch["attention_mask"], []
    for _ in range(steps):
        logits = out.logits[:, -1]
        logits[:, IMAGE] = -torch.inf
        tokens.append(logits.argmax(-1, keepdim=True))
        mask = torch.cat([mask, torch.ones_like(tokens[-1])], dim=1)
        out = model(input_ids=tokens[-1], attention_mask=mask, cache=out.cache)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["llava", "mistral3"])
@torch.no_grad()
def test_decoding_without_position_ids_continues_llama_numbering(family):
    model = _model(family)
    batch, _ = _inputs(model, family, [(1, 6), (1, 2)])
    expected = _manual_greedy(model, batch)
    tokcomp.apply(model, "divprune", keep=1.0)
    assert torch.equal(_manual_greedy(model, batch), expected)


@pytest.mark.parametrize("positions", ["keep", "renumber"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@torch.no_grad()
def test_decoding_without_position_ids_continues_multimodal_rope(family, positions):
    """Without position ids a Qwen decode step takes the prompt's RoPE delta (as generate's
    position ids do); the unpatched model cannot decode this way with a 2-D mask."""
    model = _model(family)
    batch, _ = _inputs(model, family, [(1, 6), (1, 2)])
    expected = _generate(model, batch)
    tokcomp.apply(model, "divprune", keep=1.0, positions=positions)
    assert torch.equal(_manual_greedy(model, batch), expected)
    tokcomp.apply(model, "zoo", keep=0.5, positions=positions)
    assert torch.equal(_manual_greedy(model, batch), _generate(model, batch))


@torch.no_grad()
def test_a_deep_copy_of_a_patched_model_is_patched_alike():
    model = tokcomp.apply(_model("llava_next"), "zoo", keep=0.3)
    other = copy.deepcopy(model)
    batch, _ = _inputs(model, "llava_next")
    assert torch.equal(_generate(other, batch), _generate(model, batch))
    tokcomp.remove(model)
    assert tokcomp.config_of(other).method == "zoo"


@torch.no_grad()
def test_two_generations_interleaved_do_not_interfere():
    model = tokcomp.apply(_model("llava"), "divprune", keep=0.3)
    first, _ = _inputs(model, "llava", [(1, 4)])
    second, _ = _inputs(model, "llava", [(2, 6), (1, 2)])
    expected = [_generate(model, first), _generate(model, second)]
    states = []
    for batch in (first, second):
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        out = model(**batch, position_ids=positions, use_cache=True)
        states.append((batch, out.cache, [out.logits[:, -1].argmax(-1, keepdim=True)]))
    for _ in range(STEPS - 1):
        for batch, cache, tokens in states:
            length = batch["input_ids"].shape[1] + len(tokens)
            mask = torch.cat([batch["attention_mask"], torch.ones(len(tokens[0]), len(tokens))], 1)
            positions = mask.long().cumsum(-1)[:, -1:] - 1
            out = model(
                input_ids=tokens[-1], attention_mask=mask, position_ids=positions, cache=cache
            )
            logits = out.logits[:, -1]
            logits[:, IMAGE] = -torch.inf
            tokens.append(logits.argmax(-1, keepdim=True))
            assert mask.shape[1] == length
    for (_, _, tokens), wanted in zip(states, expected, strict=True):
        assert torch.equal(torch.cat(tokens, dim=1), wanted)


# -- clear errors -----------------------------------------------------------------------------


@torch.no_grad()
def test_a_budget_larger_than_the_visual_tokens_is_refused():
    with pytest.raises(ValueError, match="more than the 16 visual tokens"):
        tokcomp.apply(_model("llava"), "zoo", keep=17)
    model = tokcomp.apply(_model("qwen2_vl"), "divprune", keep=7)
    batch, _ = _inputs(model, "qwen2_vl")
    with pytest.raises(ValueError, match="keep=7 is more than the 6 visual tokens"):
        model(**batch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_methods_a_family_cannot_run_are_refused_naming_the_alternatives(family):
    """Every visual-token method either runs on a family (the generic tests above) or is
    refused when applied, with the methods that do run there."""
    refused = [m for m in VISUAL if not _runs_on(family, m)]
    for method in refused:
        runnable = sorted(m for m in VISUAL if _runs_on(family, m))
        names = f"{', '.join(runnable[:-1])} or {runnable[-1]}"
        with pytest.raises(ValueError, match=f"use {names}"):
            tokcomp.apply(_model(family), method, **_pruning(method))


def test_unsupported_models_name_what_is_supported():
    with pytest.raises(tokcomp.UnsupportedModelError, match="LlavaForConditionalGeneration"):
        tokcomp.apply(hf.LlavaModel(_built("llava").config), "zoo", keep=2)
    with pytest.raises(ValueError, match="visionzip needs the vision tower's attention"):
        tokcomp.apply(_model("qwen2_vl"), "visionzip", keep=2)
    with pytest.raises(
        ValueError, match="prunes the visual tokens of a Hugging Face vision-language model"
    ):
        tokcomp.apply(tiny_vit("vit"), "fastv")


@torch.no_grad()
def test_fastv_names_the_switch_when_the_attention_cannot_be_masked():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("tokcomp_test_kernel", sdpa_attention_forward)
    model = tokcomp.apply(_model("llava"), "fastv", keep=0.5)
    batch, _ = _inputs(model, "llava")
    model.set_attn_implementation("tokcomp_test_kernel")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        model(**batch)


def test_random_reaches_a_macs_target_with_a_visual_token_schedule():
    model = _model("llava")
    config = tokcomp.config_of(tokcomp.apply(model, "random", target_macs=0.8))
    spec = find_adapter(model).spec()
    assert len(config.schedule) == spec.depth + spec.llm_depth
    assert config.schedule[spec.depth :] == [config.schedule[-1]] * spec.llm_depth
    assert abs(config.macs_ratio - 0.8) < 0.05


@pytest.mark.parametrize("option", [{"layers": [1]}, {"prop_attn": False}, {"trace_source": True}])
def test_random_refuses_vision_transformer_options_on_a_vlm(option):
    [name] = option
    with pytest.raises(ValueError, match=f"random: '{name}' has no meaning on a VLM"):
        tokcomp.apply(_model("llava"), "random", keep_ratio=0.5, **option)


BEAMS = ({"num_beams": 2}, {"num_beams": 3, "num_return_sequences": 2})


@pytest.mark.parametrize("copies", BEAMS, ids=["beams", "sequences-of-beams"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_beam_search_at_keep_everything_is_the_unpatched_one(family, copies):
    """generate copies each prompt for its beams; tokcomp's prefill runs each prompt once and
    copies its cache, which must give what generate's own copies of the images give."""
    model = _model(family)
    batch, _ = _inputs(model, family)
    expected = _generate(model, batch, steps=3, **copies)
    method = "dycoke" if family.endswith("_video") else "divprune"
    tokcomp.apply(model, method, **_keep_all(method))
    assert torch.equal(_generate(model, batch, steps=3, **copies), expected)


@pytest.mark.parametrize("method", ["divprune", "fastv", "pyramiddrop"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "idefics3", "mistral3"])
@torch.no_grad()
def test_each_sampled_copy_of_a_pruned_prompt_decodes_as_the_prompt_alone(family, method):
    """Sampling from only the likeliest token, every one of a prompt's sequences is the greedy
    generation of the pruned prompt without copies."""
    model = tokcomp.apply(_model(family), method, **_pruning(method))
    batch, _ = _inputs(model, family)
    greedy = _generate(model, batch)
    copies = _generate(model, batch, do_sample=True, top_k=1, num_return_sequences=3)
    assert torch.equal(copies, greedy.repeat_interleave(3, dim=0))


@pytest.mark.parametrize(
    ("family", "method", "options"),
    [
        *((f, m, _pruning(m)) for f in ("llava", "qwen2_vl") for m in ("divprune", "pyramiddrop")),
        ("qwen2_vl_video", "dycoke", {"decode_p": 0.0}),
    ],
)
@torch.no_grad()
def test_beam_search_on_a_pruned_batch_gives_each_prompt_its_beams_alone(family, method, options):
    model = tokcomp.apply(_model(family), method, **options)
    batch, alone = _inputs(model, family)
    together = _generate(model, batch, steps=3, num_beams=2, num_return_sequences=2)
    for row, inputs in enumerate(alone):
        own = _generate(model, inputs, steps=3, num_beams=2, num_return_sequences=2)
        assert torch.equal(together[2 * row : 2 * row + 2], own), f"sample {row}"


@torch.no_grad()
def test_beam_search_on_a_pruned_vlm_without_its_cache_is_refused_in_one_line():
    """Uncached, every step re-runs the prompts with their beams' diverging tokens, which the
    once-per-prompt prefill cannot take."""
    model = tokcomp.apply(_model("llava"), "divprune", keep=0.4)
    batch, _ = _inputs(model, "llava")
    with pytest.raises(ValueError, match=r"^beams or several .* use_cache=True \(the default\)$"):
        _generate(model, batch, steps=2, num_beams=2, use_cache=False)


@torch.no_grad()
def test_the_harness_counts_each_prompts_kept_visual_tokens_once_under_beam_search():
    model = tokcomp.apply(_model("llava"), "divprune", keep=0.4)
    batch, _ = _inputs(model, "llava")

    def kept(**options) -> int:
        out = model.generate(
            **batch, max_new_tokens=1, pad_token_id=PAD, return_dict_in_generate=True, **options
        )
        return visual_tokens_kept(out.cache, batch["input_ids"], [IMAGE])

    greedy = kept(do_sample=False)
    assert 0 < greedy < int((batch["input_ids"] == IMAGE).sum())
    assert kept(num_beams=2) == kept(num_beams=3, num_return_sequences=3) == greedy


@torch.no_grad()
def test_what_indexes_the_unpruned_sequence_is_refused_and_an_int_logits_to_keep_runs():
    """labels (and a tensor logits_to_keep) index the caller's sequence; the logits follow the
    pruned one, so the loss would score other tokens."""
    model = tokcomp.apply(_model("llava"), "divprune", keep=0.4)
    batch, _ = _inputs(model, "llava")
    with pytest.raises(UsageError, match=r"^labels index the unpruned prompt"):
        model(**batch, labels=batch["input_ids"])
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    with pytest.raises(UsageError, match=r"^a tensor logits_to_keep indexes the unpruned"):
        model(**batch, logits_to_keep=keep)
    assert model(**batch, logits_to_keep=1).logits.shape[1] == 1


@pytest.mark.parametrize(
    "options",
    [
        {"prompt_lookup_num_tokens": 2},
        {"cache_implementation": "static"},
        {"cache_implementation": "sliding_window"},
    ],
)
@torch.no_grad()
def test_decoding_modes_a_pruned_cache_cannot_follow_are_refused_in_one_line(options):
    """Prompt lookup and assisted decoding crop the pruned cache (they crashed or diverged);
    static caches have no 2-D masks (they failed inside transformers)."""
    model = tokcomp.apply(_model("qwen2_vl"), "divprune", keep=0.4)
    batch, _ = _inputs(model, "qwen2_vl")
    with pytest.raises(UsageError, match=r"(prompt-lookup decoding|needs a DynamicCache)"):
        _generate(model, batch, steps=2, **options)
    with pytest.raises(UsageError, match="assisted and prompt-lookup decoding"):
        _generate(model, batch, steps=2, assistant_model=_model("qwen2_vl"))
    static = hf.StaticCache(config=model.config.get_text_config(), max_cache_len=64)
    with pytest.raises(UsageError, match="needs a DynamicCache"):
        _generate(model, batch, steps=2, past_key_values=static)


@torch.no_grad()
def test_dycoke_refuses_a_decoding_call_of_several_tokens():
    """Its decode-time pruning follows one new token per step (a call verifying or continuing
    with several diverged from greedy decoding)."""
    model = tokcomp.apply(_model("qwen2_vl_video"), "dycoke", k=0.5, decode_layer=2)
    batch, _ = _inputs(model, "qwen2_vl_video")
    out = model(**batch, use_cache=True)
    mask = torch.cat([batch["attention_mask"], batch["attention_mask"][:, -2:]], dim=1)
    with pytest.raises(UsageError, match="one token at a time; this call brings 2"):
        model(input_ids=batch["input_ids"][:, -2:], attention_mask=mask, cache=out.cache)


@torch.no_grad()
def test_a_generation_continues_from_its_pruned_cache_with_its_last_token_only():
    """transformers' continuation pattern feeds the whole sequence, sliced by the cache's
    length, which is the pruned one: the tokens the cache holds were fed again. Refused; the
    last token alone continues as one uninterrupted generation does."""
    model = tokcomp.apply(_model("llava"), "divprune", keep=0.4)
    batch, _ = batch_inputs(model, "llava", [(1, 5)], seed=3)
    greedy = {"do_sample": False, "suppress_tokens": [IMAGE], "pad_token_id": PAD}
    whole = _generate(model, batch, steps=6)

    def first_three() -> object:
        return model.generate(**batch, max_new_tokens=3, return_dict_in_generate=True, **greedy)

    def go_on(input_ids: torch.Tensor, cache: object) -> torch.Tensor:
        mask = torch.ones(1, batch["input_ids"].shape[1] + 3, dtype=torch.long)
        return model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            cache=cache,
            max_new_tokens=3,
            **greedy,
        )

    first = first_three()
    with pytest.raises(ValueError, match="pass only the tokens after those the cache holds"):
        go_on(first.sequences, first.cache)
    again = first_three()
    more = go_on(again.sequences[:, -1:], again.cache)
    assert torch.equal(torch.cat([again.sequences[:, -3:], more[:, 1:]], dim=1), whole)
