"""Every seed method on every timm ViT variant, and hand-checkable cases per method."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BATCH_POSITION_DEPENDENT, tiny_vit
from method_options import keep_all, middle

import tokcomp
from tokcomp.adapters.base import attend
from tokcomp.methods import BlockPosition, Signal, Signals, TokenState, create_method
from tokcomp.methods.base import MAX_SEED
from tokcomp.methods.zero_tprune import head_filter
from tokcomp.ops import attention_pagerank, energy_score

#: The methods that act in a vision transformer's blocks (the others prune a VLM's visual
#: tokens and are tested in test_vlm*.py).
METHODS = tokcomp.methods("vision")
#: Methods that only merge (every input patch stays in some token).
MERGE_ONLY = {"tome", "pitome"}


def _geometry(model) -> tuple[int, int]:
    return model.patch_embed.num_patches + model.num_prefix_tokens, len(model.blocks)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_keep_everything_reproduces_the_unpatched_model(method, timm_variant, images):
    model = tiny_vit(timm_variant)
    expected = model(images)
    tokcomp.apply(model, method, **keep_all(method, *_geometry(model)))
    assert tokcomp.config_of(model).macs_ratio == 1.0
    torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(set(METHODS) - BATCH_POSITION_DEPENDENT))
@torch.no_grad()
def test_each_sample_gets_what_it_gets_alone(method, timm_variant, images):
    model = tiny_vit(timm_variant)
    tokcomp.apply(model, method, **middle(method, *_geometry(model)))
    assert tokcomp.config_of(model).macs_ratio < 0.85
    alone = torch.cat([model(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(model(images), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_are_those_of_the_pure_pytorch_ops(method, images, monkeypatch):
    """The compiled kernels have no backward: with autograd on, gradients reach the input and
    the stem as they do through the reference ops (ToMe's weighted average, EViT's fused token)."""
    model = tiny_vit()
    tokcomp.apply(model, method, **middle(method, *_geometry(model)))
    grads = []
    for backend in ("auto", "reference"):
        monkeypatch.setenv("TOKCOMP_BACKEND", backend)
        model.zero_grad()
        x = images.clone().requires_grad_()
        model(x).square().sum().backward()
        grads.append((x.grad, model.patch_embed.proj.weight.grad.clone()))
    (x_grad, stem_grad), (x_expected, stem_expected) = grads
    assert x_grad is not None and x_grad.abs().sum() > 0
    torch.testing.assert_close(x_grad, x_expected)
    torch.testing.assert_close(stem_grad, stem_expected)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_protected_tokens_stay_and_patches_are_never_duplicated(method, timm_variant, images):
    model = tiny_vit(timm_variant)
    tokens, depth = _geometry(model)
    tokcomp.apply(model, method, trace_source=True, **middle(method, tokens, depth))
    state = tokcomp.forward_tokens(model, images)
    protected = state.protected
    assert state.tokens == tokcomp.config_of(model).schedule[-1]
    identity = torch.eye(tokens)[:protected].expand(len(images), -1, -1)
    assert torch.equal(state.source[:, :protected], identity)
    assert state.source.sum(dim=1).max() <= 1  # no patch in two tokens
    if method in MERGE_ONLY:
        assert torch.equal(state.source.sum(dim=1), torch.ones(len(images), tokens))
        torch.testing.assert_close(state.size.sum(dim=1), torch.full((len(images),), 1.0 * tokens))


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_exported_config_round_trips(method, tmp_path, images):
    model = tiny_vit("vit")
    tokcomp.apply(model, method, **middle(method, *_geometry(model)))
    path = tokcomp.config_of(model).save(tmp_path / f"{method}.json")
    other = tokcomp.apply(tiny_vit("vit"), path)
    assert tokcomp.config_of(other) == tokcomp.config_of(model)
    torch.testing.assert_close(other(images), model(images), atol=0, rtol=0)


# -- PiToMe -------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 3])
def test_fused_attention_s_class_row_is_the_softmax_with_the_size_bias(padding):
    """The fused path computes the class-token row apart: softmax(q_0 k^T * scale + log
    size), by hand, the padding rows after the tokens left out."""
    torch.manual_seed(0)
    tokens, scale = 7, 0.5
    q, k, v = (torch.randn(2, 3, tokens + padding, 4) for _ in range(3))
    sizes = torch.randint(1, 5, (2, tokens)).float()
    bias = sizes.log()[:, None, None, :]
    needs = frozenset({Signal.CLS_ATTN})
    _, signals = attend(q, k, v, scale, bias, needs, tokens=tokens)
    logits = (q[:, :, 0, None] * k[:, :, :tokens]).sum(dim=-1) * scale + sizes.log()[:, None]
    torch.testing.assert_close(signals.cls_attn, logits.softmax(dim=-1))


def _state(tokens: int = 21, channels: int = 8, protected: int = 1, batch: int = 2) -> TokenState:
    torch.manual_seed(7)
    x = torch.randn(batch, tokens, channels)
    source = torch.eye(tokens).expand(batch, -1, -1)
    return TokenState(x, protected, source=source)


def _singletons(state: TokenState) -> list[set[int]]:
    """Per sample, the input tokens that are still alone in their token."""
    alone = state.source.sum(dim=2) == 1
    return [set(state.source[b][alone[b]].argmax(dim=1).tolist()) for b in range(len(alone))]


def test_pitome_merges_exactly_r_and_never_the_lowest_energy_tokens():
    state = _state()
    method = create_method("pitome", margin=0.5, metric="hidden", bsm_layers=[])
    keep = 21 - 6
    out = method.reduce(state, Signals(), keep, BlockPosition(index=0, depth=12))
    assert out.tokens == keep
    assert torch.equal(out.size.sum(dim=1), torch.full((2,), 21.0))
    energy = energy_score(state.x[:, 1:], 0.5)
    for b, alone in enumerate(_singletons(out)):
        lowest = set((energy[b].argsort()[: 20 - 12] + 1).tolist())  # T - 2r lowest
        assert lowest <= alone


def test_pitome_margin_decays_linearly_with_depth():
    method = create_method("pitome", margin=0.8)
    margins = [method.margin_at(BlockPosition(index, 4)) for index in range(4)]
    assert margins == pytest.approx([0.8, 0.6, 0.4, 0.2])


def test_pitome_family_defaults_are_settled_into_the_config():
    model = tokcomp.apply(tiny_vit("vit"), "pitome", keep_ratio=0.8)
    options = tokcomp.config_of(model).options
    assert options["margin"] == 0.75 and options["metric"] == "keys"
    assert options["bsm_layers"] == [0, 1, 2, 3]


def test_energy_score_matches_its_definition():
    metric = torch.randn(1, 5, 3)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sim = unit[0] @ unit[0].T
    expected = torch.where(sim - 0.3 >= 0, sim - 0.3, torch.exp(sim - 0.3) - 1).mean(dim=1)
    torch.testing.assert_close(energy_score(metric, 0.3)[0], expected)


# -- Zero-TPrune --------------------------------------------------------------------------


def test_weighted_pagerank_converges_to_the_dominant_left_eigenvector():
    torch.manual_seed(0)
    matrix = torch.rand(6, 6, dtype=torch.float64) + 0.05
    matrix = matrix / matrix.sum(dim=1, keepdim=True)
    values, vectors = torch.linalg.eig(matrix.T)
    stationary = vectors[:, values.real.argmax()].real
    stationary = stationary / stationary.sum()
    scores = attention_pagerank(matrix.float()[None, None], iterations=200)[0, 0]
    torch.testing.assert_close(scores.double(), stationary, atol=1e-6, rtol=1e-5)
    uniform = attention_pagerank(matrix.float()[None, None], 0)[0, 0]
    assert torch.equal(uniform, torch.full((6,), 1 / 6))


def test_variance_head_filter_drops_heads_outside_the_band():
    flat = torch.full((10,), 0.1)
    mild = torch.linspace(0.05, 0.15, 10)  # scaled variance ~0.09
    peaked = torch.tensor([0.91] + [0.01] * 9)  # scaled variance ~7
    scores = torch.stack([flat, mild, peaked])[None]
    assert head_filter(scores, 0.01, 0.7).tolist() == [[0.0, 1.0, 0.0]]
    assert head_filter(scores, 10.0, 20.0).tolist() == [[1.0, 1.0, 1.0]]  # none inside: all


def _duplicate_pair(tokens: int = 9, heads: int = 2) -> Signals:
    """Signals of one image where token 5 duplicates token 2 and is the less important."""
    torch.manual_seed(3)
    keys = torch.randn(1, tokens, 4)
    keys[0, 5] = keys[0, 2]  # token 5 duplicates token 2
    attn = torch.full((1, heads, tokens, tokens), 0.01)
    attn[..., 2] = 0.5  # everyone attends to token 2 most, then to 5: 2 and 5 lead the
    attn[..., 5] = 0.3  # two importance-alternated groups, and 5 is the weaker
    return Signals(keys=keys, attn=attn / attn.sum(dim=-1, keepdim=True))


def _reduce_duplicate_pair(**options) -> tuple[TokenState, TokenState]:
    """(input, output) of a Zero-TPrune block removing one of 9 tokens of `_duplicate_pair`."""
    options = {"similarity_share": 1.0, "variance_band": [0.0, 1e9], **options}
    method = create_method("zero_tprune", **options).with_options(iterations=[3] * 4)
    state = _state(tokens=9, protected=1, batch=1)
    return state, method.reduce(state, _duplicate_pair(), 8, BlockPosition(0, 4))


def test_zero_tprune_s_stage_prunes_the_less_important_of_a_duplicate_pair():
    _, out = _reduce_duplicate_pair()
    assert 5 not in _singletons(out)[0] and 2 in _singletons(out)[0]


def test_zero_tprune_similarity_sizes_hand_the_pruned_twins_size_to_its_twin():
    state, out = _reduce_duplicate_pair(similarity_sizes=True)
    kept = out.source[0].argmax(dim=1)
    twin = kept.tolist().index(2)
    assert 5 not in kept.tolist() and out.source[0, twin, 5] == 1
    assert out.size[0, twin] == 2 and out.size.sum() == 9
    torch.testing.assert_close(out.x[0], state.x[0, kept])  # values stay the kept tokens'


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_zero_tprune_similarity_sizes_change_sizes_not_which_tokens_or_their_values(share):
    tokens, heads, batch = 40, 3, 4
    torch.manual_seed(11)
    attn = torch.rand(batch, heads, tokens, tokens)
    signals = Signals(keys=torch.randn(batch, tokens, 8), attn=attn / attn.sum(-1, keepdim=True))
    method = create_method("zero_tprune", similarity_share=share, layers=[1])
    method = method.with_options(iterations=[5] * 4, variance_band=[0.0, 1e9])
    state = _state(tokens=tokens, batch=batch)
    plain = method.reduce(state, signals, 24, BlockPosition(1, 4))
    sized = method.with_options(similarity_sizes=True).reduce(
        state, signals, 24, BlockPosition(1, 4)
    )
    assert plain.size is None
    assert (sized.source >= plain.source).all()  # the same tokens kept, with their twins
    torch.testing.assert_close(sized.x, plain.x)
    assert torch.equal(sized.size, sized.source.sum(dim=2))  # every carried size is a patch
    pruned_by_similarity = method.similar_pairs(tokens, 24, 1)
    carried = sized.size.sum(dim=1) - 24
    assert (carried > 0).all() and (carried <= pruned_by_similarity).all()


# -- DiffRate -----------------------------------------------------------------------------


def test_diffrate_prunes_least_attended_and_merges_into_most_similar():
    x = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0.1], [0, 0.2, 1], [1, 1, 1]]])
    cls_attn = torch.tensor([[[0.3, 0.3, 0.2, 0.1, 0.08, 0.02]]])  # token 5 least attended
    state = TokenState(x, protected=1, source=torch.eye(6)[None])
    method = create_method("diffrate", prune_kept=[6, 5], merge_kept=[6, 3])
    out = method.reduce(state, Signals(cls_attn=cls_attn), 3, BlockPosition(1, 2))
    # order by attention: 1, 2, 3, 4; prune 5; dst = [cls, 1, 2]; 3 -> 1, 4 -> 2
    assert out.source[0].argmax(dim=1).tolist() == [0, 1, 2]
    torch.testing.assert_close(out.x[0, 1], (x[0, 1] + x[0, 3]) / 2)
    torch.testing.assert_close(out.x[0, 2], (x[0, 2] + x[0, 4]) / 2)
    cos13 = torch.nn.functional.cosine_similarity(x[0, 1], x[0, 3], dim=0)
    torch.testing.assert_close(out.size[0, 1], 1 + cos13)
    assert out.source[0, :, 5].sum() == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prune_kept": [65] * 3, "merge_kept": [65] * 3}, "prune_kept lists 3 blocks"),
        ({"prune_kept": [65, 60, 62, 50], "merge_kept": [65] * 4}, "must not increase"),
        ({"prune_kept": [65, 60, 50, 40], "merge_kept": [65, 61, 50, 40]}, "merges to 61"),
        ({"prune_kept": [60] * 4, "merge_kept": [60] * 4}, "never compresses block 0"),
        ({"prune_kept": [65] * 4}, "give both"),
        ({"target_macs": 0.6}, "tokcomp search diffrate"),
    ],
)
def test_diffrate_bad_lists_get_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        tokcomp.apply(tiny_vit("vit"), "diffrate", **options)


# -- EViT and random ----------------------------------------------------------------------


def test_evit_fuses_the_dropped_tokens_into_their_attention_weighted_sum():
    state = _state(tokens=7, batch=1)
    attn = torch.tensor([[[0.4, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02]]])
    method = create_method("evit", keep_ratio=0.5)
    out = method.reduce(state, Signals(cls_attn=attn), 5, BlockPosition(1, 4))
    assert out.source[0, :4].argmax(dim=1).tolist() == [0, 1, 2, 3]
    fused = sum(attn[0, 0, i] * state.x[0, i] for i in (4, 5, 6))
    torch.testing.assert_close(out.x[0, 4], fused)
    assert out.size[0, 4] == 3


def test_random_draws_a_seeded_subset_per_image_whatever_the_batch_size():
    method = create_method("random", seed=4)
    first = method.reduce(_state(tokens=30, batch=3), Signals(), 12, BlockPosition(2, 4))
    again = method.reduce(_state(tokens=30, batch=3), Signals(), 12, BlockPosition(2, 4))
    larger = method.reduce(_state(tokens=30, batch=5), Signals(), 12, BlockPosition(2, 4))
    assert torch.equal(first.source, again.source)
    assert torch.equal(first.source, larger.source[:3])
    assert not torch.equal(first.source[0], first.source[1])
    assert (first.source[:, 0, 0] == 1).all() and (first.source.sum(dim=1) <= 1).all()
    other = create_method("random", seed=5).reduce(
        _state(tokens=30, batch=3), Signals(), 12, BlockPosition(2, 4)
    )
    assert not torch.equal(other.source, first.source)


def test_random_keeps_every_token_equally_often():
    state = _state(tokens=21, batch=4000)
    kept = create_method("random").reduce(state, Signals(), 11, BlockPosition(0, 4)).source
    frequency = kept[:, 1:, 1:].sum(dim=(0, 1)) / 4000
    torch.testing.assert_close(frequency, torch.full((20,), 0.5), atol=0.04, rtol=0)


def test_random_follows_another_methods_schedule(tmp_path):
    tome = tokcomp.config_of(tokcomp.apply(tiny_vit("vit"), "tome", r=7))
    model = tokcomp.apply(tiny_vit("vit"), "random", schedule=tome.schedule)
    assert tokcomp.config_of(model).schedule == tome.schedule
    assert json.loads(json.dumps(tokcomp.config_of(model).to_dict()))["method"] == "random"


def test_random_positions_apply_to_vlms_only():
    model = tiny_vit()
    with pytest.raises(ValueError, match="positions applies to a VLM"):
        tokcomp.apply(model, "random", keep_ratio=0.5, positions="keep")
    with pytest.raises(ValueError, match="positions must be one of"):
        tokcomp.apply(model, "random", keep_ratio=0.5, positions="shuffle")


@pytest.mark.parametrize("method", ["random", "zoo", "sparsevlm"])
@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 10**14])
def test_a_seed_out_of_range_is_refused_when_the_method_is_made(method, seed):
    """random's 10**14 was taken, then overflowed its 64-bit generator seed at the first call."""
    with pytest.raises(ValueError, match=f"{method}: seed must be an int from 0 to {MAX_SEED}"):
        create_method(method, seed=seed)


def test_random_runs_at_the_largest_seed():
    model = tokcomp.apply(tiny_vit(), "random", keep_ratio=0.5, seed=MAX_SEED)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
