"""Merging inside a VLM's vision tower with unmerge, beside a visual-token method
(tokcomp.apply(vlm, method, tower="tome", ...); docs/methods.md section 10.1): exact at r=0,
the unmerged tower equal to a by-hand ToMe scattered back by source, batch independence,
configs and clear errors. The MACs against the FLOP counter are in test_selection_macs.py."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from vlm_fixtures import IMAGE, LLAVA_FAMILIES, PAD, assert_config_reloads, batch_inputs, tiny_vlm

import tokcomp

LAYOUT = [(1, 5), (2, 3), (1, 7)]


@functools.cache
def _built(family: str) -> torch.nn.Module:
    return tiny_vlm(family)


def _model(family: str) -> torch.nn.Module:
    return copy.deepcopy(_built(family))


def _generate(model, batch: dict, steps: int = 3) -> torch.Tensor:
    out = model.generate(
        **batch, max_new_tokens=steps, do_sample=False, suppress_tokens=[IMAGE], pad_token_id=PAD
    )
    return out[:, batch["input_ids"].shape[1] :]


def _logits(model, batch: dict) -> torch.Tensor:
    return model(**batch).logits


@pytest.mark.parametrize("method", ["fastv", "visionzip", "random"])
@pytest.mark.parametrize("family", LLAVA_FAMILIES)
@torch.no_grad()
def test_tower_merging_nothing_is_the_visual_method_alone(family, method):
    model = _model(family)
    batch, _ = batch_inputs(model, family, LAYOUT, seed=3)
    budget = {"keep_ratio": 0.5} if method == "random" else {"keep": 0.5}
    tokcomp.apply(model, method, **budget)
    alone, tokens = _logits(model, batch), _generate(model, batch)
    tokcomp.apply(model, method, **budget, tower="tome", tower_options={"r": 0})
    assert "forward" in model.model.vision_tower.__dict__
    assert torch.equal(_logits(model, batch), alone)
    assert torch.equal(_generate(model, batch), tokens)
    tokcomp.apply(model, method, **budget, tower="tome", tower_options={"r": 3})
    assert not torch.allclose(_logits(model, batch), alone)
    tokcomp.remove(model)
    assert "forward" not in model.model.vision_tower.__dict__


@torch.no_grad()
def test_a_vlm_and_its_vision_tower_are_not_patched_apart():
    """The tower's own patch merged tokens the VLM's schedule and budget never saw."""
    model = _model("llava")
    tower = model.model.vision_tower
    batch, _ = batch_inputs(model, "llava", LAYOUT, seed=3)
    tokcomp.apply(model, "divprune", keep=4)
    tokcomp.apply(tower, "tome", r=2)  # nothing of the VLM's patch sits inside its tower
    with pytest.raises(ValueError, match="vision tower is patched on its own"):
        model(**batch)
    with pytest.raises(ValueError, match=r"model\.model\.vision_tower \(\w+\) is patched on"):
        tokcomp.apply(model, "divprune", keep=4, tower="tome", tower_options={"r": 2})
    tokcomp.remove(tower)
    tokcomp.apply(model, "divprune", keep=4, tower="tome", tower_options={"r": 2})
    tokcomp.apply(model, "divprune", keep=4, tower="tome", tower_options={"r": 1})  # replaces
    assert tokcomp.config_of(model).tower["options"]["r"] == 1
    with pytest.raises(ValueError, match="is part of a LlavaForConditionalGeneration"):
        tokcomp.apply(tower, "tome", r=2)
    model(**batch)


def _tome_by_hand(tower, pixels: torch.Tensor, r: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The embeddings and every layer's output of a CLIP or SigLIP tower under plain ToMe
    (eager attention with the log-size bias, keys metric, the class token never merged), each
    with its source map (B, tokens, patches)."""
    protected = int(hasattr(tower, "pre_layrnorm"))  # CLIP: a class token, pre-norm
    x = tower.embeddings(pixels)
    x = tower.pre_layrnorm(x) if protected else x
    size = torch.ones(x.shape[0], x.shape[1])
    source = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
    outputs = [(x, source)]
    for layer in tower.encoder.layers:
        attn = layer.self_attn
        normed = layer.layer_norm1(x)
        q, k, v = (
            p(normed).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
        x = x + attn.out_proj((logits.softmax(-1) @ v).transpose(1, 2).flatten(2))
        merges = min(r, (x.shape[1] - protected) // 2)
        x, size, source = _merge(x, size, source, k.mean(dim=1), merges, protected)
        x = x + layer.mlp(layer.layer_norm2(x))
        outputs.append((x, source))
    return outputs


def _merge(x, size, source, keys, r, protected):
    """ToMe's bipartite merge of x (size-weighted mean), size (sum) and source (max)."""
    metric = keys / keys.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    if protected:
        scores[:, 0] = -torch.inf
    best, dst_of = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    unmerged, src = order[:, r:].sort(dim=1).values, order[:, :r]
    dst = dst_of.gather(1, src)

    def merged(t, reduce):
        a, b = t[:, ::2], t[:, 1::2]
        rows = lambda index: index[..., None].expand(-1, -1, t.shape[-1])  # noqa: E731
        b = b.scatter_reduce(1, rows(dst), a.gather(1, rows(src)), reduce=reduce)
        return torch.cat([a.gather(1, rows(unmerged)), b], dim=1)

    size_after = merged(size[..., None], "sum")[..., 0]
    x = merged(x * size[..., None], "sum") / size_after[..., None]
    return x, size_after, merged(source, "amax")


@pytest.mark.parametrize("family", ["llava", "llava_onevision_video"])
@torch.no_grad()
def test_the_unmerged_tower_is_tome_by_hand_scattered_back_by_source(family):
    """CLIP (a class token) and SigLIP: every hidden state the patched tower returns is the
    by-hand ToMe state with each patch given the row of the token whose source holds it."""
    model = _model(family)
    tower = model.model.vision_tower
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokcomp.apply(model, "fastv", keep=0.5, tower="tome", tower_options={"r": 3})
    got = tower(pixels, output_hidden_states=True).hidden_states
    tokcomp.remove(model)
    by_hand = _tome_by_hand(tower, pixels, 3)
    assert by_hand[-1][0].shape[1] < by_hand[0][0].shape[1]  # it merged
    assert len(got) == len(by_hand)
    for layer, (mine, (x, source)) in enumerate(zip(got, by_hand, strict=True)):
        expected = torch.einsum("bnp,bnc->bpc", source, x)
        torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")


@torch.no_grad()
def test_tower_attention_after_unmerge_is_each_patch_s_share_of_its_merged_token_s():
    """What VisionZip, FasterVLM and VisPruner read at the feature layer after unmerge (SigLIP:
    the attention each patch receives, mean over the patches' queries, summed over heads) is
    the attention its merged token receives under proportional attention, queries weighted by
    their sizes, split evenly over the token's patches."""
    from tokcomp.adapters.hf_vlm.families.llava import tower_attention

    model = _model("llava_onevision_video")
    tower = model.model.vision_tower
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    x, source = _tome_by_hand(tower, pixels, 3)[-2]  # the feature (last) block's input
    assert x.shape[1] < source.shape[2]
    tokcomp.apply(model, "visionzip", keep=0.5, tower="tome", tower_options={"r": 3})
    unmerged = tower(pixels, output_hidden_states=True).hidden_states[-2]
    received, _ = tower_attention(tower, unmerged, len(tower.encoder.layers) - 1)
    layer = tower.encoder.layers[-1]
    attn, normed, size = layer.self_attn, layer.layer_norm1(x), source.sum(dim=-1)
    q, k = (
        p(normed).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)
        for p in (attn.q_proj, attn.k_proj)
    )
    probs = ((q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]).softmax(-1)
    query_weights = size / size.sum(dim=-1, keepdim=True)
    by_token = (probs * query_weights[:, None, :, None]).sum(dim=2).sum(dim=1)
    by_patch = torch.einsum("bnp,bn->bp", source, by_token / size)
    torch.testing.assert_close(received, by_patch, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "method"),
    [
        ("llava_onevision_video", "fastv"),
        ("llava_onevision_video", "dycoke"),
        ("llava", "visionzip"),
    ],
)
@torch.no_grad()
def test_each_sample_gets_what_it_gets_alone(family, method):
    """Left-padded prompts of different lengths and image counts."""
    model = _model(family)
    budget = {"k": 0.5, "decode_layer": 2} if method == "dycoke" else {"keep": 0.5}
    tokcomp.apply(model, method, **budget, tower="tome", tower_options={"r": 3})
    batch, alone = batch_inputs(model, family, LAYOUT, seed=3)
    assert batch["attention_mask"][:, 0].tolist() != [1, 1, 1]  # left padding
    together = _generate(model, batch)
    for row, inputs in enumerate(alone):
        assert torch.equal(together[row], _generate(model, inputs)[0]), f"sample {row}"


@torch.no_grad()
def test_config_records_the_tower_method_and_reloads_it(tmp_path):
    family = "llava_onevision_video"
    model = tokcomp.apply(
        _model(family), "fastv", keep=0.5, tower=tokcomp.create_method("pitome", keep_ratio=0.75)
    )
    config = tokcomp.config_of(model)
    assert config.tower["method"] == "pitome"
    assert config.tower["options"]["keep_ratio"] == 0.75
    assert config.schedule[:3] == [12, 9, 7]  # 16 SigLIP patches, 3/4 kept per block
    alone = tokcomp.config_of(tokcomp.apply(_model(family), "fastv", keep=0.5))
    assert config.schedule[3:] == alone.schedule[3:]
    assert config.macs < alone.macs and config.selection_macs > alone.selection_macs
    video = tokcomp.config_of(model, frames=4)
    assert (
        video.tower == config.tower
        and video.macs
        < tokcomp.config_of(tokcomp.apply(_model(family), "fastv", keep=0.5), frames=4).macs
    )
    batch, _ = batch_inputs(model, family, LAYOUT, seed=3)
    assert_config_reloads(config, lambda: _model(family), model, _logits, batch, tmp_path)


def test_a_config_whose_tower_is_no_merging_method_is_refused(tmp_path):
    model = tokcomp.apply(_model("llava"), "fastv", keep=0.5, tower="tome", tower_options={"r": 2})
    data = tokcomp.config_of(model).to_dict()
    with pytest.raises(tokcomp.ConfigError, match="'tower' must be null or a mapping"):
        tokcomp.Config.from_dict({**data, "tower": "tome"})
    with pytest.raises(tokcomp.ConfigError, match="tower: unknown method 'tomb'"):
        tokcomp.Config.from_dict({**data, "tower": {"method": "tomb", "options": {}}})
    config = tokcomp.Config.from_dict({**data, "tower": {"method": "evit", "options": {}}})
    with pytest.raises(tokcomp.ConfigError, match="only merges"):
        tokcomp.apply(_model("llava"), config)


@pytest.mark.parametrize(
    ("family", "method", "tower", "message"),
    [
        ("qwen2_vl", "fastv", "tome", r"vision tower of LLaVA-1\.5, .* only, not of Qwen2VL"),
        ("gemma3", "fastv", "tome", "only, not of Gemma3ForConditionalGeneration"),
        ("llava", "fastv", "fastv", "block method that only merges"),
        ("llava", "fastv", "random", "block method that only merges"),
        ("llava", "fastv", "evit", "block method that only merges"),
        ("llava", "tome", "tome", "tome is none: apply tome alone"),
    ],
)
def test_bad_tower_combinations_are_refused_in_one_line(family, method, tower, message):
    options = {"r": 2} if method == "tome" else {"keep": 0.5}
    with pytest.raises(ValueError, match=message) as error:
        tokcomp.apply(_model(family), method, **options, tower=tower)
    assert "\n" not in str(error.value)


def test_tower_options_without_a_tower_and_target_macs_with_one_are_refused():
    with pytest.raises(ValueError, match="tower_options were given without tower="):
        tokcomp.apply(_model("llava"), "fastv", keep=0.5, tower_options={"r": 2})
    with pytest.raises(
        ValueError, match=r"target_macs cannot be given with tower=; give its budget \(keep"
    ):
        tokcomp.apply(_model("llava"), "fastv", target_macs=0.5, tower="tome")
