"""The visual-token methods and the greedy max-min op on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tokcomp
from tokcomp.adapters.hf_vlm.families import Images, Segment
from tokcomp.adapters.hf_vlm.selection import _budget_shares, with_text
from tokcomp.adapters.hf_vlm.sequence import Prompt
from tokcomp.methods import create_method
from tokcomp.methods import zoo as zoo_module
from tokcomp.methods.cdpruner import instruction_relevance
from tokcomp.methods.divprune import farthest_from_neighbours
from tokcomp.methods.dycoke import pruned_frames
from tokcomp.methods.visual import Selection, VisualTokens, visual_budget
from tokcomp.methods.zoo import minmax, unit_directions
from tokcomp.ops import (
    cosine_distances,
    cosine_similarity_matrix,
    greedy_dpp,
    greedy_dpp_reference,
    greedy_maxmin,
    greedy_maxmin_reference,
)


def _visual(outputs: torch.Tensor, projector=(), **signals) -> VisualTokens:
    return VisualTokens(outputs, tuple(projector), **signals)


# -- greedy max-min -------------------------------------------------------------------------


def _brute_force_maxmin(points: list[list[float]], weights: list[float], first: int, k: int):
    """Greedy max-min picks with plain Python arithmetic, every candidate checked."""

    def distance(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        return 1 - dot / norms

    picks = [first]
    while len(picks) < k:
        scores = {
            j: min(distance(points[i], points[j]) for i in picks) * weights[j]
            for j in range(len(points))
            if j not in picks
        }
        best = max(scores.values())
        picks.append(min(j for j, s in scores.items() if s == best))
    return picks


def test_greedy_maxmin_matches_brute_force_and_the_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 12, 5, dtype=torch.float64)
    weight = torch.rand(3, 12, dtype=torch.float64)
    first = torch.tensor([0, 5, 11])
    dist = cosine_distances(x)
    picks = greedy_maxmin(dist, weight, first, 7)
    assert torch.equal(picks, greedy_maxmin_reference(dist.float(), weight.float(), first, 7))
    for b in range(3):
        expected = _brute_force_maxmin(x[b].tolist(), weight[b].tolist(), int(first[b]), 7)
        assert picks[b].tolist() == expected


def test_greedy_maxmin_ties_go_to_the_lowest_index_and_picks_never_repeat():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]])
    dist = cosine_distances(x)
    picks = greedy_maxmin(dist, torch.ones(1, 5), torch.tensor([0]), 5)
    assert picks.tolist() == [[0, 4, 2, 1, 3]]
    zero = greedy_maxmin(dist, torch.zeros(1, 5), torch.tensor([3]), 5)
    assert zero.tolist() == [[3, 0, 1, 2, 4]]
    assert torch.equal(greedy_maxmin_reference(dist, torch.zeros(1, 5), torch.tensor([3]), 5), zero)


def test_greedy_maxmin_fast_form_equals_reference_on_many_inputs():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randint(-2, 3, (2, 30, 4), generator=generator).float() + 0.01  # many ties
        weight = torch.randint(0, 3, (2, 30), generator=generator).float() / 2
        first = torch.randint(0, 30, (2,), generator=generator)
        dist = cosine_distances(x)
        assert torch.equal(
            greedy_maxmin(dist, weight, first, 17), greedy_maxmin_reference(dist, weight, first, 17)
        )


def test_greedy_maxmin_refuses_bad_inputs():
    dist = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.4"):
        greedy_maxmin(dist, torch.ones(1, 4), torch.tensor([0]), 5)
    with pytest.raises(ValueError, match=">= 0"):
        greedy_maxmin(dist, -torch.ones(1, 4), torch.tensor([0]), 2)


# -- DivPrune -----------------------------------------------------------------------------------


def test_divprune_first_pick_is_farthest_from_its_nearest_neighbour_then_max_min():
    outputs = torch.tensor([[[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [-1.0, 0.05]]])
    dist = cosine_distances(outputs)
    assert farthest_from_neighbours(dist).tolist() == [4]
    picks = create_method("divprune", keep=3).select(_visual(outputs), 3)
    expected = sorted(_brute_force_maxmin(outputs[0].tolist(), [1.0] * 5, 4, 3))
    assert picks.tolist() == [expected]


# -- ZOO-Prune ----------------------------------------------------------------------------------


def test_zoo_sensitivity_of_a_linear_projector_is_mean_norm_of_w_u():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    zoo = create_method("zoo", directions=16, seed=3)
    features = torch.randn(2, 5, 6)
    u = unit_directions(16, 6, 3, torch.device("cpu"))
    expected = (u @ linear.weight.detach().T).norm(dim=-1).mean()
    visual = _visual(linear(features).detach(), [linear], features=features)
    torch.testing.assert_close(zoo.sensitivity(visual), expected.expand(2, 5))
    general = _visual(linear(features).detach(), [linear, nn.Identity()], features=features)
    torch.testing.assert_close(zoo.sensitivity(general), expected.expand(2, 5), rtol=1e-4, atol=0)
    assert torch.equal(minmax(zoo.sensitivity(visual)), torch.ones(2, 5))


def _relu_projector() -> tuple[nn.Linear, nn.ReLU, nn.Linear]:
    first, second = nn.Linear(4, 4), nn.Linear(4, 3)
    with torch.no_grad():
        first.weight.copy_(torch.eye(4))
        first.bias.zero_()
        second.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 4.0]]))
        second.bias.fill_(0.5)
    return first, nn.ReLU(), second


@torch.no_grad()
def test_zoo_ranks_tokens_by_their_jacobian_norms_computed_by_hand():
    """Away from ReLU's kink the central difference is exact: the Jacobian of token i is
    W2 diag(active_i) W1, so S_i = mean_j ||W2 diag(active_i) u_j|| (float32 product)."""
    first, relu, second = _relu_projector()
    active = torch.tensor([[1.0, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    features = (active * 2 - 1)[None] * 5.0
    zoo = create_method("zoo", directions=32, seed=1, precision="float32")
    u = unit_directions(32, 4, 1, torch.device("cpu"))
    by_hand = torch.stack([(u * a) @ second.weight.T for a in active]).norm(dim=-1).mean(dim=1)
    visual = _visual(second(relu(first(features))), [first, relu, second], features=features)
    sensitivity = zoo.sensitivity(visual)[0]
    torch.testing.assert_close(sensitivity, by_hand, rtol=1e-4, atol=1e-5)
    assert sensitivity.argsort(descending=True).tolist() == [0, 1, 4, 2, 3]
    assert zoo.select(visual, 1).tolist() == [[0]]
    assert create_method("zoo", sketch=3).sensitivity(visual).shape == (1, 5)


@torch.no_grad()
def test_zoo_selection_weights_distance_by_normalised_sensitivity():
    first, relu, second = _relu_projector()
    active = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    features = (active * 2 - 1)[None] * 5.0
    visual = _visual(second(relu(first(features))), [first, relu, second], features=features)
    zoo = create_method("zoo", directions=32, seed=1)
    weight = minmax(zoo.sensitivity(visual))
    dist = cosine_distances(visual.outputs)
    picks = [int(weight.argmax())]
    while len(picks) < 3:
        score = dist[0][picks].amin(dim=0) * weight[0]
        score[picks] = -torch.inf
        picks.append(int(score.argmax()))
    assert zoo.select(visual, 3).tolist() == [sorted(picks)]


@torch.no_grad()
def test_zoo_bfloat16_product_is_float_noise_and_auto_picks_it_where_native(monkeypatch):
    """The bfloat16 second-layer product changes S by bfloat16 rounding (two roundings of
    2^-9 relative each) and keeps the same tokens; "auto" takes it only where the device
    multiplies bfloat16 in hardware."""
    torch.manual_seed(0)
    first, second = nn.Linear(32, 128), nn.Linear(128, 256)
    features = torch.randn(2, 60, 32) * 3
    outputs = second(nn.functional.gelu(first(features)))
    visual = _visual(outputs, [first, nn.GELU(), second], features=features)
    exact = create_method("zoo", keep=12, precision="float32")
    fast = create_method("zoo", keep=12, precision="bfloat16")
    torch.testing.assert_close(
        fast.sensitivity(visual), exact.sensitivity(visual), rtol=4e-3, atol=0
    )
    assert torch.equal(fast.select(visual, 12), exact.select(visual, 12))
    cpu = torch.device("cpu")
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(zoo_module, "native_bfloat16", lambda device, n=native: n)
        assert create_method("zoo").product_dtype(cpu) == dtype
    assert exact.product_dtype(cpu) == torch.float32
    with pytest.raises(ValueError, match="precision is one of"):
        create_method("zoo", precision="float16")


@torch.no_grad()
@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU()], ids=str)
def test_zoo_linearised_differences_are_as_close_as_float32_finite_differences(act):
    """2 d act'(z) is no farther than float32's act(z + d) - act(z - d) from the float64
    finite differences: both are float32 rounding away from it."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(40, 128, generator=generator) * 3
    delta = torch.randn(16, 128, generator=generator) * 2e-3
    truth = zoo_module._differences(z.double(), delta.double(), act)
    linear = zoo_module._linearised(z, delta, act).double()
    finite = zoo_module._differences(z, delta, act).double()
    assert (linear - truth).abs().max() <= (finite - truth).abs().max()


@torch.no_grad()
@pytest.mark.parametrize(
    ("act", "step", "precision", "path"),
    [
        (nn.GELU(), 0.01, "bfloat16", "_linearised"),
        (nn.GELU(), 0.01, "float32", "_differences"),  # the float32 reference
        (nn.GELU(), 5.0, "bfloat16", "_differences"),  # a step too large to linearise
        (nn.Softmax(dim=-1), 0.01, "bfloat16", "_differences"),  # not elementwise
    ],
    ids=str,
)
def test_zoo_takes_the_linearised_path_only_where_it_stands_for_the_differences(
    act, step, precision, path, monkeypatch
):
    torch.manual_seed(0)
    first, second = nn.Linear(32, 128), nn.Linear(128, 256)
    features = torch.randn(1, 20, 32)
    visual = _visual(second(act(first(features))), [first, act, second], features=features)
    taken = []
    for name in ("_linearised", "_differences"):
        real = getattr(zoo_module, name)
        monkeypatch.setattr(zoo_module, name, lambda *a, f=real, n=name: taken.append(n) or f(*a))
    create_method("zoo", step=step, precision=precision).sensitivity(visual)
    assert set(taken) == {path}


def test_zoo_sketch_approximates_the_exact_scores():
    torch.manual_seed(0)
    first, second = nn.Linear(16, 64), nn.Linear(64, 256)
    features = torch.randn(1, 40, 16)
    with torch.no_grad():
        visual = _visual(
            second(nn.functional.gelu(first(features))),
            [first, nn.GELU(), second],
            features=features,
        )
        exact = create_method("zoo").sensitivity(visual)
        sketched = create_method("zoo", sketch=128).sensitivity(visual)
    torch.testing.assert_close(sketched, exact, rtol=0.2, atol=0)


# -- greedy DPP and CDPruner ------------------------------------------------------------------


def _greedy_determinants(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by hand: each step adds the token whose addition gives the picked sub-kernel
    the largest determinant (float64, every candidate's determinant computed afresh)."""
    picks: list[int] = []
    for _ in range(k):
        gains = {
            j: float(torch.linalg.det(kernel[[*picks, j]][:, [*picks, j]]))
            for j in range(kernel.shape[0])
            if j not in picks
        }
        picks.append(max(gains, key=gains.get))
    return sorted(picks)


def test_greedy_dpp_picks_what_maximises_the_determinant_step_by_step():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 14, 6, generator=generator, dtype=torch.float64)
    relevance = torch.rand(3, 14, generator=generator, dtype=torch.float64) + 0.1
    similarity = cosine_similarity_matrix(x).double()
    picks = greedy_dpp(similarity, relevance, 5)
    assert torch.equal(picks, greedy_dpp_reference(similarity.float(), relevance.float(), 5))
    for b in range(3):
        kernel = relevance[b, :, None] * similarity[b] * relevance[b, None, :]
        assert picks[b].tolist() == _greedy_determinants(kernel, 5)


def test_greedy_dpp_refuses_bad_inputs():
    similarity, relevance = torch.rand(2, 4, 4), torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"similarity must be \(B, N, N\)"):
        greedy_dpp(similarity[:, :3], relevance, 2)
    with pytest.raises(ValueError, match=r"k must be in 1..4, got 0"):
        greedy_dpp(similarity, relevance, 0)


def _text_and_tokens(generator: torch.Generator) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """Eight visual tokens of width 16 and a three-token text whose words token 5 repeats."""
    outputs = torch.randn(1, 8, 16, generator=generator)
    words = torch.randn(3, 16, generator=generator)
    outputs[0, 5] = words.sum(dim=0)
    return outputs, (words,)


def test_cdpruner_relevance_is_the_mean_text_cosine_normalised_per_sample():
    generator = torch.Generator().manual_seed(1)
    first, (words,) = _text_and_tokens(generator)
    second = torch.randn(1, 8, 16, generator=generator)
    texts = (words, torch.randn(5, 16, generator=generator))
    relevance = instruction_relevance(F.normalize(torch.cat([first, second]), dim=-1), texts)
    for row, (tokens, text) in enumerate(zip(torch.cat([first, second]), texts, strict=True)):
        cosine = F.cosine_similarity(tokens[:, None], text[None], dim=-1).mean(dim=1)
        expected = (cosine - cosine.min() + 1e-6) / (cosine.max() - cosine.min())
        torch.testing.assert_close(relevance[row], expected)
        assert relevance[row].min() == pytest.approx(1e-6 / float(cosine.max() - cosine.min()))
    assert int(relevance[0].argmax()) == 5  # the token made of the text's words


def test_cdpruner_prefers_the_token_matching_the_text_then_diverse_ones():
    generator = torch.Generator().manual_seed(2)
    outputs, text = _text_and_tokens(generator)
    method = create_method("cdpruner", keep=3)
    assert method.select(_visual(outputs, text=text), 1).tolist() == [[5]]
    relevance = instruction_relevance(F.normalize(outputs, dim=-1), text)
    similarity = cosine_similarity_matrix(outputs)
    kernel = relevance[0, :, None] * similarity[0] * relevance[0, None, :]
    picks = method.select(_visual(outputs, text=text), 3)
    assert picks[0].tolist() == _greedy_determinants(kernel.double(), 3)
    # Another instruction moves the choice: a text made of token 2's direction picks token 2.
    other = (outputs[0, 2:3] * 2,)
    assert method.select(_visual(outputs, text=other), 1).tolist() == [[2]]


def test_cdpruner_chooses_per_sample_as_alone():
    generator = torch.Generator().manual_seed(3)
    outputs = torch.randn(3, 20, 16, generator=generator)
    texts = tuple(torch.randn(n, 16, generator=generator) for n in (2, 7, 4))
    method = create_method("cdpruner", keep=6)
    together = method.select(_visual(outputs, text=texts), 6)
    for row in range(3):
        alone = method.select(_visual(outputs[row : row + 1], text=texts[row : row + 1]), 6)
        assert torch.equal(together[row], alone[0])


def test_each_image_gets_its_own_prompts_text_tokens():
    """Left-padded prompts, 1 and 2 images (2 placeholders each): every segment gets the real,
    non-placeholder tokens of the prompt its image's placeholders are in."""
    placeholder = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)
    embeds = torch.arange(14.0).reshape(2, 7, 1)
    prompt = Prompt(embeds, placeholder, valid, torch.zeros(1, 2, 7), None)
    segments = [Segment(i, torch.arange(2), _visual(torch.zeros(1, 2, 1))) for i in range(3)]
    images = with_text(Images([torch.zeros(2, 1)] * 3, segments), prompt)
    texts = [s.visual.text[0].flatten().tolist() for s in images.segments]
    assert texts == [[1.0, 2.0, 5.0, 6.0], [7.0, 10.0, 13.0], [7.0, 10.0, 13.0]]


def test_cdpruner_refuses_a_prompt_without_text():
    method = create_method("cdpruner", keep=2)
    visual = _visual(torch.randn(1, 4, 8), text=(torch.empty(0, 8),))
    with pytest.raises(ValueError, match="cdpruner: a prompt has no text tokens"):
        method.select(visual, 2)


# -- VisionZip, FastV, random -----------------------------------------------------------------


def test_visionzip_splits_64_into_54_dominant_and_10_contextual():
    zip_ = create_method("visionzip")
    assert zip_.split(64) == (54, 10)
    assert zip_.split(1) == (1, 0)


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_targets():
    """Dominant: 1 and 3 (most attention). The rest, in order, is [0, 2, 4, 5, 6, 7]; stride 3
    makes 0 and 5 the targets; by key direction 2 and 7 join 0, 4 and 6 join 5. A contextual
    token is its target's features plus the mean of its joiners' (identity projector)."""
    features = torch.arange(8.0)[None, :, None].repeat(1, 1, 2)
    attention = torch.tensor([[0.1, 0.9, 0.0, 0.8, 0.2, 0.3, 0.0, 0.1]])
    keys = torch.tensor([[[1.0, 0], [0, 1], [1, 0.1], [0, 1], [0.1, 1], [0, 1], [0.2, 1], [1, 0]]])
    visual = _visual(features * 10, [], features=features, attention=attention, keys=keys)
    selection = create_method("visionzip", keep=4, contextual=0.5).select(visual, 4)
    assert isinstance(selection, Selection)
    assert selection.index.tolist() == [[0, 1, 3, 5]]
    expected = [[0 + 4.5] * 2, [10.0] * 2, [30.0] * 2, [5 + 5.0] * 2]
    torch.testing.assert_close(selection.outputs[0], torch.tensor(expected))


def test_fastv_keeps_the_most_attended_tokens_lowest_index_on_ties():
    attention = torch.tensor([[0.1, 0.5, 0.5, 0.0, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    picks = create_method("fastv").select(_visual(torch.zeros(2, 5, 1), attention=attention), 2)
    assert picks.tolist() == [[1, 2], [0, 1]]


def _dart_by_hand(keys, states, text_keys, text_states, keep, image_pivots=4, text_pivots=4):
    """DART's rule token by token, as the released get_retained_image_token runs it, with its
    pivots in tokcomp's order (image, then text, each by descending key L1 norm) and the claims
    split evenly (the released T // 8 each when keep = 4 + T)."""

    def by_norm(rows):
        return sorted(range(len(rows)), key=lambda i: (-float(rows[i].abs().sum()), i))

    image = by_norm(keys)[: min(image_pivots, keep)]
    pivots = [states[i] for i in image] + [text_states[i] for i in by_norm(text_keys)[:text_pivots]]
    claims = keep - len(image)
    quotas = [claims // len(pivots) + (n < claims % len(pivots)) for n in range(len(pivots))]
    pool, kept = [i for i in range(len(states)) if i not in image], set(image)
    for pivot, quota in zip(pivots, quotas, strict=True):
        similarity = {i: float(torch.cosine_similarity(pivot, states[i], dim=0)) for i in pool}
        claimed = sorted(pool, key=lambda i: (similarity[i], i))[:quota]
        kept.update(claimed)
        pool = [i for i in pool if i not in claimed]
    return sorted(kept)


@pytest.mark.parametrize("keep", [3, 13, 36, 40])
def test_dart_pivots_claim_their_least_similar_tokens_as_by_hand(keep):
    """36 = 4 pivots + 8 x 4: the released T = 32 (each pivot claims T // 8); 13: uneven
    claims; 3: fewer tokens than image pivots. Row 1 has 2 text tokens after its image (2 text
    pivots), row 2 none."""
    torch.manual_seed(0)
    keys, states = torch.randn(3, 40, 8), torch.randn(3, 40, 16)
    text_keys, text_states = torch.randn(3, 6, 8), torch.randn(3, 6, 16)
    valid = torch.tensor([[True] * 6, [False] * 4 + [True] * 2, [False] * 6])
    visual = _visual(
        torch.zeros(3, 40, 1),
        keys=keys,
        states=states,
        text_keys=text_keys,
        text_states=text_states,
        text_valid=valid,
    )
    picks = create_method("dart", keep=keep).select(visual, keep)
    for row in range(3):
        real = valid[row]
        expected = _dart_by_hand(
            keys[row], states[row], text_keys[row][real], text_states[row][real], keep
        )
        assert picks[row].tolist() == expected, f"row {row}"


@torch.no_grad()
def test_dart_in_a_model_uses_layer_k_minus_1_cached_keys_and_normed_layer_k_inputs():
    """The unpatched model's own cache gives layer 1's post-RoPE keys (GQA: repeated per query
    head) and its hidden states the input of layer 2; each image's pivots (text: the real
    tokens after that image, left padding and the other image's placeholders excluded) and
    claims from those, by hand, are what DART keeps before layer 2."""
    from vlm_fixtures import IMAGE, batch_inputs, tiny_vlm

    model = tiny_vlm("llava")
    batch, _ = batch_inputs(model, "llava", [(1, 5), (2, 3)], seed=3)
    language = model.model.language_model
    torch.manual_seed(0)
    language.norm.weight.uniform_(0.5, 1.5)  # the initial ones leave cosines unchanged
    out = model(**batch, use_cache=True, output_hidden_states=True)
    keys = out.cache.layers[1].keys
    keys = keys.repeat_interleave(language.config.num_attention_heads // keys.shape[1], dim=1)
    keys = keys.transpose(1, 2).flatten(2)
    states = language.norm(out.hidden_states[2])
    expected = []
    for row, ids in enumerate(batch["input_ids"]):
        text = (ids != IMAGE) & batch["attention_mask"][row].bool()
        image = (ids == IMAGE).nonzero().squeeze(1)
        for span in image.split(16):
            after = text.nonzero().squeeze(1)
            after = after[after > span[-1]]
            expected.append(
                _dart_by_hand(
                    keys[row, span], states[row, span], keys[row, after], states[row, after], 13
                )
            )
    seen = []

    class Recorded(type(create_method("dart"))):
        def select(self, visual, keep):
            picks = super().select(visual, keep)
            seen.extend(picks.tolist())
            return picks

    tokcomp.apply(model, Recorded(keep=13))
    model(**batch)
    assert seen == expected


def test_dart_counts_pivots_in_keep_and_refuses_bad_pivot_counts():
    assert create_method("dart").kept_of(576) == 132  # the released T = 128: 4 + 8 x 16
    with pytest.raises(ValueError, match="pivot_image must be an int >= 1"):
        create_method("dart", pivot_image=0)
    with pytest.raises(ValueError, match="pivot_text must be an int >= 0"):
        create_method("dart", pivot_text=-1)


@pytest.mark.parametrize("family", ["llava", "llava_siglip"])
@torch.no_grad()
def test_fastervlm_keeps_the_tokens_the_feature_layer_class_token_attends_to_most(family):
    """Against the tower's own eager attention weights of the feature layer (attentions[-2]
    for LLaVA's vision_feature_layer=-2): class-token row (SigLIP: mean over queries), head
    mean, class column dropped, top-k in raster order."""
    from vlm_fixtures import batch_inputs, tiny_vlm

    from tokcomp.adapters import find_adapter
    from tokcomp.adapters.hf_vlm.selection import choose

    model = tiny_vlm(family)
    batch, _ = batch_inputs(model, family, [(1, 4), (1, 6)], seed=5)
    pixels, keep = batch["pixel_values"], 5
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    layer = model.config.vision_feature_layer
    weights = tower(pixels, output_attentions=True).attentions[layer]
    drop = 1 if model.config.vision_feature_select_strategy == "default" else 0
    received = weights[:, :, 0] if drop else weights.mean(dim=2)
    expected = received.mean(dim=1)[:, drop:].topk(keep, dim=1).indices.sort(dim=1).values

    method = create_method("fastervlm", keep=keep)
    vlm = find_adapter(model).vlm
    encoded = vlm.encode((), {"pixel_values": pixels}, method.visual_needs)
    images = vlm.images(encoded, {}, method.visual_needs, vlm.spec().visual_tokens)
    assert torch.equal(torch.stack([c.slots for c in choose(method, images)]), expected)


def _vispruner_by_hand(
    attention: list[float], features: list[list[float]], keep: int, share: float
):
    """VisPruner's rule in plain Python: important by attention, then rounds that drop at most
    8 best-matched tokens of the alternate half A (matched against B by cosine)."""

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    order = sorted(range(len(attention)), key=lambda i: (-attention[i], i))
    important = int(keep * share)
    chosen, rest, wanted = order[:important], order[important:], keep - important
    while wanted and len(rest) > wanted:
        drop = min(8, len(rest) - wanted)
        a, b = rest[0::2], rest[1::2]
        score = {i: max(cosine(features[i], features[j]) for j in b) for i in a}
        ranked = sorted(a, key=lambda i: -score[i])  # stable: equal scores keep A's order
        rest = ranked[drop:] + b
    return sorted(chosen + (rest if wanted else []))


@pytest.mark.parametrize(("keep", "share"), [(12, 0.5), (5, 0.75), (9, 1.0), (30, 0.0)])
def test_vispruner_keeps_important_then_diverse_tokens_as_by_hand(keep, share):
    generator = torch.Generator().manual_seed(4)
    attention = torch.rand(3, 40, generator=generator)
    features = torch.randn(3, 40, 6, generator=generator)
    visual = _visual(torch.zeros(3, 40, 2), attention=attention, features=features)
    chosen = create_method("vispruner", keep=keep, important=share).select(visual, keep)
    for row in range(3):
        expected = _vispruner_by_hand(attention[row].tolist(), features[row].tolist(), keep, share)
        assert chosen[row].tolist() == expected


def test_random_select_draws_a_seeded_subset_per_image():
    method = create_method("random", seed=4)
    picks = method.select(_visual(torch.zeros(3, 10, 1)), 4)
    assert picks.shape == (3, 4) and not torch.equal(picks[0], picks[1])
    assert torch.equal(picks, method.select(_visual(torch.zeros(3, 10, 1)), 4))
    assert all(row == sorted(set(row)) for row in picks.tolist())


# -- DyCoke ---------------------------------------------------------------------------------------


def _released_ttm_by_hand(frames: list[list[list[float]]], k: float) -> list[list[int]]:
    """Per frame, the positions DyCoke's TTM keeps, by the loops of KD-TAO/DyCoke llava_arch.py
    `dycole_ttm` in plain Python: pairs (i, i + 1), then windows of four whose first frame i
    < count - 4 replace frame i + 2 by its least similar tokens to frame i. Two deliberate
    differences (docs/methods.md 6.12): a pair compares its own two frames (the released code
    takes pair i - 1's similarities), and an odd last frame is kept whole (dropped there)."""
    count, per = len(frames), len(frames[0])
    keep = int((1 - k) * per)

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def least_similar(pruned: int, compared: int) -> list[int]:
        similarity = [cosine(frames[pruned][t], frames[compared][t]) for t in range(per)]
        return sorted(sorted(range(per), key=lambda t: similarity[t])[:keep])

    kept = [list(range(per)) for _ in range(count)]
    for i in range(0, count - 1, 2):
        kept[i + 1] = least_similar(i + 1, i)
    for i in range(0, count - 4, 4):
        kept[i + 2] = least_similar(i + 2, i)
    return kept


@pytest.mark.filterwarnings("ignore:dycoke merges the frames of videos")
@pytest.mark.parametrize("count", range(1, 11))
def test_dycoke_keeps_per_frame_what_the_released_pairs_and_windows_keep(count):
    torch.manual_seed(count)
    video = torch.randn(1, count * 5, 3, dtype=torch.float64)
    method = create_method("dycoke", k=0.6)
    by_frame = video[0].view(count, 5, 3).tolist()
    expected = [
        f * 5 + t for f, kept in enumerate(_released_ttm_by_hand(by_frame, 0.6)) for t in kept
    ]
    index = method.select(_visual(video, frames=count), method.kept_of(count * 5, count))
    assert index[0].tolist() == expected
    assert method.kept_of(count * 5, count) == len(expected)


def test_dycoke_windows_skip_the_last_four_frames_and_the_paper_count_follows():
    """The released window loop stops before count - 4; 32 frames of 196 tokens at k = 0.7 keep
    9 whole frames and 23 of 58 tokens: 3098 (+ the newline), the released count."""
    assert pruned_frames(8) == [(1, 0), (3, 2), (5, 4), (7, 6), (2, 0)]
    assert pruned_frames(9) == [(1, 0), (3, 2), (5, 4), (7, 6), (2, 0), (6, 4)]
    assert create_method("dycoke").kept_of(32 * 196, 32) == 9 * 196 + 23 * 58 == 3098
    assert create_method("dycoke", k=0.0).kept_of(32 * 196, 32) == 32 * 196
    assert create_method("dycoke").kept_of(196, 1) == 196  # an image: nothing to merge


def test_dycoke_chooses_each_video_of_a_batch_as_alone():
    torch.manual_seed(0)
    videos = torch.randn(3, 6 * 4, 8)
    method = create_method("dycoke", k=0.5)
    together = method.select(_visual(videos, frames=6), 18)
    for row in range(3):
        assert torch.equal(
            together[row], method.select(_visual(videos[row : row + 1], frames=6), 18)[0]
        )


def test_dycoke_keeps_an_image_whole_and_warns_that_it_merges_video_frames_only():
    method = create_method("dycoke")
    with pytest.warns(UserWarning, match="images \\(one frame\\) keep all their visual tokens"):
        index = method.select(_visual(torch.randn(2, 6, 4)), method.kept_of(6))
    assert index.tolist() == [list(range(6))] * 2


def test_dycoke_refuses_a_share_outside_0_1():
    for k in (1.5, -0.1, True, "0.7"):
        with pytest.raises(ValueError, match="dycoke: k is the share of a pruned frame"):
            create_method("dycoke", k=k)


# -- budgets ------------------------------------------------------------------------------------


def test_visual_budget_fractions_counts_and_the_error_for_too_many():
    assert visual_budget("zoo", 64, 576) == 64
    assert visual_budget("zoo", 0.111, 576) == 63  # int(63.936): the released code's floor
    assert visual_budget("zoo", 0.1112, 576) == 64
    assert visual_budget("zoo", 0.25, 576) == 144
    assert visual_budget("zoo", 1e-6, 576) == 1
    with pytest.raises(ValueError, match="keep=600 is more than the 576 visual tokens"):
        visual_budget("zoo", 600, 576)


def test_fractional_budgets_round_as_each_methods_released_code():
    """ZOO-Prune keeps int(r * N), DivPrune int(round(r * N)), FastV round(r * N)."""
    kept = {name: create_method(name, keep=0.1).kept_of(576) for name in ("zoo", "divprune")}
    kept["fastv"] = create_method("fastv", keep=0.1).kept_of(576)
    assert kept == {"zoo": 57, "divprune": 58, "fastv": 58}
    assert create_method("zoo", keep=0.125).kept_of(576) == 72
    with pytest.raises(ValueError, match="keep must be"):
        create_method("zoo", keep=0)


def test_crop_budgets_split_evenly_and_what_a_full_crop_cannot_take_goes_elsewhere():
    sizes = [16, 4, 12, 12]
    segments = [Segment(0, torch.arange(n), _visual(torch.zeros(1, n, 1))) for n in sizes]
    images = Images([torch.zeros(44, 1)], segments)

    def shares(keep: int | float) -> list[int]:
        return _budget_shares(create_method("divprune", keep=keep), images)

    assert shares(40) == [12, 4, 12, 12]
    assert shares(10) == [2, 3, 3, 2]
    assert sum(shares(0.5)) == 22


def test_vlm_methods_refuse_vision_encoders_with_what_to_use():
    from conftest import tiny_vit

    with pytest.raises(ValueError, match="prunes the visual tokens of a vision-language model"):
        tokcomp.apply(tiny_vit("vit"), "zoo", keep=8)
    assert "zoo" not in tokcomp.methods("vision") and "zoo" in tokcomp.methods("vlm")
    assert "random" in tokcomp.methods("vision") and "random" in tokcomp.methods("vlm")
