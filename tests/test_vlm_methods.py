"""The visual-token methods and the greedy max-min op on hand-checkable inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from fixtures.clip import save_prompt_tokenizer, save_tiny_clip
from torch import nn
from vlm_fixtures import batch_inputs, tiny_vlm

import tokcomp
from tokcomp.adapters.hf_vlm.families import Images, Segment
from tokcomp.adapters.hf_vlm.selection import _budget_shares, with_prompt, with_text
from tokcomp.adapters.hf_vlm.sequence import Prompt
from tokcomp.methods import create_method, density_peaks
from tokcomp.methods import fastvid as fastvid_module
from tokcomp.methods import zoo as zoo_module
from tokcomp.methods.cdpruner import clip_relevance, instruction_relevance, load_clip
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
from tokcomp.ops.maxmin import _greedy_maxmin_fast


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
            _greedy_maxmin_fast(dist, weight, first, 17),
            greedy_maxmin_reference(dist, weight, first, 17),
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
    sensitivity = zoo.sensitivity(visual)
    low, high = sensitivity.amin(), sensitivity.amax()
    weight = (sensitivity - low) / (high - low)  # min-max, by hand
    torch.testing.assert_close(minmax(sensitivity), weight)
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


# -- CDPruner's released relevance (CLIP's text tower) ------------------------------------------


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Per family, a tiny CLIP checkpoint whose vision model is that tiny VLM's tower, and the
    tokenizer reading vlm_fixtures' ids back as words."""
    root = tmp_path_factory.mktemp("clip")
    tokenizer = str(save_prompt_tokenizer(root / "prompt"))
    folders = {
        family: str(save_tiny_clip(root / family, tiny_vlm(family).model.vision_tower))
        for family in ("llava", "llava_next")
    }
    return folders, tokenizer


def _clip_pruner(clip_folders, family: str = "llava", **options):
    folders, tokenizer = clip_folders
    return create_method(
        "cdpruner", text_encoder=folders[family], prompt_tokenizer=tokenizer, **options
    )


def _released_relevance(clip, tokenizer, features: torch.Tensor, text: str) -> torch.Tensor:
    """The released clip_encoder.py / encode_images relevance for one image, by hand: every
    context window of the zero-padded text through the text tower and text_projection, the
    patches through post_layernorm and visual_projection, minus each window's cosine, averaged
    over the windows, min-max normalised."""
    tokens = tokenizer(text)
    window = clip.config.text_config.max_position_embeddings
    windows = math.ceil(len(tokens["input_ids"]) / window)
    ids, mask = (
        torch.tensor(tokens[name] + [0] * (windows * window - len(tokens[name])))
        for name in ("input_ids", "attention_mask")
    )
    image = clip.visual_projection(clip.vision_model.post_layernorm(features))
    negatives = []
    for start in range(0, windows * window, window):
        part = slice(start, start + window)
        pooled = clip.text_model(input_ids=ids[None, part], attention_mask=mask[None, part])
        embed = clip.text_projection(pooled.pooler_output)
        negatives.append(-F.cosine_similarity(image, embed, dim=-1))
    relevance = torch.stack(negatives).mean(dim=0)
    return (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def _clip_visual(outputs: torch.Tensor, features: torch.Tensor, prompts) -> VisualTokens:
    return _visual(outputs, features=features, prompt=tuple(torch.tensor(p) for p in prompts))


@torch.no_grad()
def test_cdpruner_clip_relevance_is_the_released_formula(clip_folders):
    """A 12-word text takes two of the tiny text tower's 8-token windows, a 3-word one one."""
    clip, tokenizer = load_clip(clip_folders[0]["llava"])
    features = torch.randn(2, 16, clip.config.vision_config.hidden_size)
    texts = [_words(range(10, 22)), _words([5, 9, 40])]
    assert len(tokenizer(texts[0])["input_ids"]) > 8
    relevance = clip_relevance(clip, tokenizer, features, texts)
    for row, text in enumerate(texts):
        expected = _released_relevance(clip, tokenizer, features[row], text)
        torch.testing.assert_close(relevance[row], expected)


@torch.no_grad()
def test_cdpruner_keeps_a_clip_per_device_and_scoring_moves_none(clip_folders):
    """Models on two devices in one process each get their own CLIP: scoring on one device
    never moves the copy another device is using (the meta device stands for a GPU)."""
    folder = clip_folders[0]["llava"]
    on_meta, on_cpu = load_clip(folder, "meta")[0], load_clip(folder)[0]
    visual = _clip_visual(
        torch.randn(1, 16, 12),
        torch.randn(1, 16, on_cpu.config.vision_config.hidden_size),
        [[1, 30, 31]],
    )
    assert _clip_pruner(clip_folders).relevance(visual, visual.outputs).isfinite().all()
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    assert load_clip(folder, torch.device("cpu"))[0] is on_cpu


@torch.no_grad()
def test_cdpruner_clip_picks_the_greedy_map_of_its_kernel_and_follows_the_text(clip_folders):
    generator = torch.Generator().manual_seed(4)
    method = _clip_pruner(clip_folders, keep=4)
    clip, tokenizer = load_clip(clip_folders[0]["llava"])
    outputs = torch.randn(1, 16, 12, generator=generator)
    features = torch.randn(1, 16, clip.config.vision_config.hidden_size, generator=generator)
    prompt = [1, 30, 31, 32, 127, 33]  # <s> and <image> are special: the text is "w30 ... w33"
    relevance = _released_relevance(clip, tokenizer, features[0], _words([30, 31, 32, 33]))
    similarity = cosine_similarity_matrix(outputs)[0]
    kernel = relevance[:, None] * similarity * relevance[None, :]
    picks = method.select(_clip_visual(outputs, features, [prompt]), 4)
    assert picks[0].tolist() == _greedy_determinants(kernel.double(), 4)
    firsts = {
        int(method.select(_clip_visual(outputs, features, [[word, word + 1]]), 1))
        for word in range(2, 100, 7)
    }
    assert len(firsts) > 1  # the instruction moves the choice


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@torch.no_grad()
def test_cdpruner_clip_chooses_per_sample_as_alone(clip_folders, family):
    """Samples with one image, two, none (LLaVA-NeXT: crops share their image's text)."""
    layout = [(1, 12), (2, 3), (0, 7)] if family == "llava" else [(1, 12), (2, 3), (1, 5)]
    model = tiny_vlm(family)
    tokcomp.apply(model, _clip_pruner(clip_folders, family, keep=0.5))
    batch, alone = batch_inputs(model, family, layout, seed=5)
    together = model(**batch).logits[:, -1]
    for row, inputs in enumerate(alone):
        torch.testing.assert_close(together[row], model(**inputs).logits[0, -1])


@torch.no_grad()
def test_cdpruner_clip_config_round_trips(clip_folders, tmp_path):
    model = tokcomp.apply(tiny_vlm("llava"), _clip_pruner(clip_folders, keep=5))
    batch, _ = batch_inputs(model, "llava", [(1, 6), (1, 9)], seed=6)
    path = tokcomp.config_of(model).save(tmp_path / "cdpruner.json")
    reloaded = tokcomp.apply(tiny_vlm("llava"), str(path))
    assert tokcomp.config_of(reloaded).options["text_encoder"] == clip_folders[0]["llava"]
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    default = tokcomp.apply(tiny_vlm("llava"), "cdpruner", keep=5)
    assert not torch.allclose(default(**batch).logits, model(**batch).logits)


def test_cdpruner_clip_refuses_another_clip_checkpoint(clip_folders, tmp_path):
    unrelated = save_tiny_clip(tmp_path / "clip", tiny_vlm("llava", seed=1).model.vision_tower)
    method = create_method(
        "cdpruner", keep=4, text_encoder=str(unrelated), prompt_tokenizer=clip_folders[1]
    )
    with pytest.raises(ValueError, match=r"is not the CLIP checkpoint this model's vision tower"):
        tokcomp.apply(tiny_vlm("llava"), method)
    with pytest.raises(ValueError, match=r"is not the CLIP checkpoint"):  # another tower
        tokcomp.apply(tiny_vlm("llava_next"), _clip_pruner(clip_folders, "llava", keep=4))
    missing = create_method(
        "cdpruner", keep=4, text_encoder=str(tmp_path / "none"), prompt_tokenizer=clip_folders[1]
    )
    with pytest.raises(ValueError, match="is no CLIP checkpoint folder"):
        tokcomp.apply(tiny_vlm("llava"), missing)


@pytest.mark.parametrize("family", ["llava_siglip", "qwen2_vl"])
def test_cdpruner_clip_refuses_a_model_without_a_clip_tower(clip_folders, family):
    with pytest.raises(ValueError, match="leave text_encoder unset to score relevance against"):
        tokcomp.apply(tiny_vlm(family), _clip_pruner(clip_folders, keep=4))


def test_cdpruner_clip_options_come_together():
    with pytest.raises(ValueError, match=r"give text_encoder .* and prompt_tokenizer"):
        create_method("cdpruner", text_encoder="clip")


def test_cdpruner_clip_refuses_a_prompt_without_text_after_its_image(clip_folders):
    visual = _clip_visual(torch.randn(1, 4, 8), torch.randn(1, 4, 32), [[1, 127]])
    with pytest.raises(ValueError, match="cdpruner: a prompt has no text after its images"):
        _clip_pruner(clip_folders).select(visual, 2)


def test_each_image_gets_the_token_ids_after_its_prompts_last_image():
    placeholder = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7], dtype=torch.bool)
    input_ids = torch.arange(14).reshape(2, 7)
    prompt = Prompt(torch.zeros(2, 7, 1), placeholder, valid, torch.zeros(1, 2, 7), None)
    segments = [Segment(i, torch.arange(2), _visual(torch.zeros(1, 2, 1))) for i in range(3)]
    images = with_prompt(Images([torch.zeros(2, 1)] * 3, segments), prompt, input_ids)
    assert [s.visual.prompt[0].tolist() for s in images.segments] == [[5, 6], [13], [13]]


# -- VisionZip, FastV, random -----------------------------------------------------------------


def test_visionzip_splits_64_into_54_dominant_and_10_contextual():
    zip_ = create_method("visionzip")
    assert zip_.split(64) == (54, 10)
    assert zip_.split(1) == (1, 0)


def test_visionzip_keeps_nothing_of_a_budget_of_0():
    signals = dict(features=torch.randn(1, 16, 4), attention=torch.rand(1, 16))
    visual = _visual(torch.randn(1, 16, 4), [], keys=torch.randn(1, 16, 4), **signals)
    zip_ = create_method("visionzip", keep=1)
    assert zip_.split(0) == (0, 0)
    assert zip_.select(visual, 0).index.shape == (1, 0)


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


def test_pyramiddrop_default_schedule_is_the_released_ratio_list_at_its_layers():
    """The released pdrop_forward keeps int(N0 * ratio) before each of layers [8, 16, 24] with
    the ratio list [0.5, 0.25, 0.125] (lambda = 0.5): the default keep 0.125 on LLaVA-1.5's 32
    layers and 576 tokens, and the same with the released counts given as a count."""
    released_layers, ratios = [8, 16, 24], [0.5**s for s in (1, 2, 3)]
    expected, start, current = [], 0, 576
    for layer, ratio in zip(released_layers, ratios, strict=True):
        expected += [current] * (layer - start)
        start, current = layer, int(576 * ratio)
    expected += [current] * (32 - start)
    for keep in (0.125, int(576 * ratios[-1])):
        method = create_method("pyramiddrop", keep=keep)
        assert method.boundaries(32) == released_layers
        assert method.llm_schedule(32, 576, 0) == expected


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
    """The unpatched model's own cache, numbering each sample's real tokens from 0 (as DART
    does without position ids), gives layer 1's post-RoPE keys (GQA: repeated per query head)
    and its hidden states the input of layer 2; each image's pivots (text: the real tokens
    after that image, left padding and the other image's placeholders excluded) and claims
    from those, by hand, are what DART keeps before layer 2."""
    from vlm_fixtures import IMAGE, batch_inputs, tiny_vlm

    model = tiny_vlm("llava")
    batch, _ = batch_inputs(model, "llava", [(1, 5), (2, 3)], seed=3)
    language = model.model.language_model
    torch.manual_seed(0)
    language.norm.weight.uniform_(0.5, 1.5)  # the initial ones leave cosines unchanged
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    out = model(**batch, position_ids=positions, use_cache=True, output_hidden_states=True)
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
    """Per frame, the positions DyCoke's TTM keeps, by the loops of KD-TAO/DyCoke@dd74634
    llava_arch.py `dycole_ttm` in plain Python: pairs (i, i + 1), each pruning its second frame
    by its own similarities, then windows of four whose first frame i < count - 4 replace frame
    i + 2 by its least similar tokens to frame i. One deliberate difference (docs/methods.md
    6.12): an odd last frame is kept whole (dropped there)."""
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
    for k in (1.5, -0.1):
        with pytest.raises(ValueError, match="dycoke: k is the share of a pruned frame"):
            create_method("dycoke", k=k)
    for k in (True, "0.7"):
        with pytest.raises(ValueError, match=r"dycoke: k=.*, but its k takes float"):
            create_method("dycoke", k=k)


def _dycoke_step_by_hand(attention, video, previous, kept, p, reuse):
    """The prompt positions one DyCoke decoding step keeps, in plain Python: when the attention
    over the video tokens has cosine >= 0.9 with the previous step's, the previous step's
    (`reuse`) or all; else every non-video position and the int(n (1 - p)) most attended video
    tokens."""
    tokens = [i for i, is_video in enumerate(video) if is_video]
    if previous is not None and tokens:
        dot = sum(attention[i] * previous[i] for i in tokens)
        norms = math.sqrt(sum(attention[i] ** 2 for i in tokens))
        norms *= math.sqrt(sum(previous[i] ** 2 for i in tokens))
        if dot / norms >= 0.9:
            return kept if reuse else [True] * len(video)
    top = sorted(tokens, key=lambda i: (-attention[i], i))[: int(len(tokens) * (1 - p))]
    return [not is_video or i in top for i, is_video in enumerate(video)]


def _attention_steps() -> list[torch.Tensor]:
    """Per decoding step, (3, 12) attention over a prompt: step 1 swaps, in row 0, its 3rd and
    4th most attended video tokens (cosine about 0.99: the kept set stays though the top-3
    changed), step 2 reverses every row (a shift), step 3 doubles step 2 (cosine 1)."""
    first = torch.rand(3, 12, generator=torch.Generator().manual_seed(0))
    swapped = first.clone()
    ranked = first[0, 2:10].argsort(descending=True) + 2
    swapped[0, ranked[2]], swapped[0, ranked[3]] = first[0, ranked[3]], first[0, ranked[2]]
    return [first, swapped, swapped.flip(1), 2 * swapped.flip(1)]


@pytest.mark.parametrize("reuse", [True, False])
def test_dycoke_decoding_re_chooses_the_video_tokens_only_when_the_attention_shifts(reuse):
    """Rows: 8 video tokens at 2..9; 6 at odd positions; none (every position kept)."""
    video = torch.zeros(3, 12, dtype=torch.bool)
    video[0, 2:10] = True
    video[1, 1::2] = True
    method = create_method("dycoke", decode_p=0.6, decode_reuse=reuse)
    previous = kept = None
    expected_previous = expected = [None] * 3
    for attention in _attention_steps():
        kept = method.decode_kept(attention, video, previous, kept)
        expected = [
            _dycoke_step_by_hand(a, v, b, k, 0.6, reuse)
            for a, v, b, k in zip(
                attention.tolist(), video.tolist(), expected_previous, expected, strict=True
            )
        ]
        assert kept.tolist() == expected
        previous, expected_previous = attention, attention.tolist()
    kept_last = [4 + 3, 6 + 2, 12] if reuse else [12] * 3  # int(8 x 0.4), int(6 x 0.4)
    assert kept.sum(dim=1).tolist() == kept_last
    steps = _attention_steps()
    first = method.decode_kept(steps[0], video, None, None)
    stays = method.decode_kept(steps[1], video, steps[0], first)
    assert torch.equal(stays, first if reuse else torch.ones_like(first))
    assert not torch.equal(stays, method.decode_kept(steps[1], video, None, None))


def test_dycoke_decoding_keeps_the_most_attended_video_tokens_by_hand():
    method = create_method("dycoke", decode_p=0.5)
    attention = torch.tensor([[0.5, 0.1, 0.4, 0.3, 0.2, 0.9]])
    video = torch.tensor([[False, True, True, True, True, False]])
    assert method.decode_kept(attention, video, None, None).tolist() == [
        [True, False, True, True, False, True]
    ]


def test_dycoke_refuses_bad_decoding_options():
    for options, match in (
        ({"decode_layer": 0}, "decode_layer is the first layer"),
        ({"decode_layer": True}, "decode_layer=True, but its decode_layer takes int"),
        ({"decode_layer": 2.0}, "decode_layer=2.0, but its decode_layer takes int"),
        ({"decode_p": 1.5}, "decode_p is the share of the video tokens"),
        ({"decode_p": -0.1}, "decode_p is the share of the video tokens"),
        ({"decode_reuse": 1}, "decode_reuse=1, but its decode_reuse takes bool"),
    ):
        with pytest.raises(ValueError, match=f"dycoke: {match}"):
            create_method("dycoke", **options)
    assert create_method("dycoke", decode_p=0).decode_boundary() is None
    assert create_method("dycoke").decode_boundary() == 3


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


@pytest.mark.parametrize(("keep", "tokens"), [(0.35, 2880), (0.7, 2880), (0.29, 100), (0.58, 100)])
def test_a_fraction_of_a_whole_product_keeps_that_product(keep, tokens):
    """keep * tokens in floats is a hair below the whole number for these."""
    exact = Fraction(str(keep)) * tokens
    assert exact.denominator == 1
    for name in ("zoo", "divprune", "fastv"):
        assert create_method(name, keep=keep).kept_of(tokens) == exact, name


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

    encoder_methods = ", ".join(tokcomp.methods("vision")[:-1])
    with pytest.raises(ValueError, match=f"vision encoder .*: use {encoder_methods} or"):
        tokcomp.apply(tiny_vit("vit"), "zoo", keep=8)
    assert "zoo" not in tokcomp.methods("vision") and "zoo" in tokcomp.methods("vlm")
    assert "random" in tokcomp.methods("vision") and "random" in tokcomp.methods("vlm")


# -- FastVID ----------------------------------------------------------------------------------


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(column) / len(rows) for column in zip(*rows, strict=True)]


def _dyseg_by_hand(frames: list[list[float]], c: int, tau: float) -> list[int]:
    """Cut after the c - 1 least similar transitions and after any below tau."""
    similarity = [_cosine(frames[t], frames[t + 1]) for t in range(len(frames) - 1)]
    lowest = sorted(range(len(similarity)), key=lambda t: similarity[t])[: c - 1]
    cuts = sorted(set(lowest) | {t for t, s in enumerate(similarity) if s < tau})
    bounds = [-1, *cuts, len(frames) - 1]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def _dpc_knn_by_hand(tokens: list[list[float]]) -> list[float]:
    """Density (k = 4 nearest, itself included) times distance to the nearest denser token (of
    equally dense ones, e.g. duplicates, the earlier counts as the denser)."""
    width = len(tokens[0])
    distance = [[math.dist(a, b) / math.sqrt(width) for b in tokens] for a in tokens]
    density = [
        math.exp(-sum(d * d for d in sorted(row)[: min(4, len(row))]) / min(4, len(row)))
        for row in distance
    ]
    largest = max(max(row) for row in distance)
    return [
        density[i]
        * min(
            [distance[i][j] for j in range(len(tokens)) if (density[j], -j) > (density[i], -i)],
            default=largest,
        )
        for i in range(len(tokens))
    ]


def _top(scores: list[float], count: int, among: list[int]) -> list[int]:
    return sorted(among, key=lambda i: (-scores[i], i))[:count]


def _fastvid_by_hand(
    outputs: list[list[float]], attention: list[float], frames: int, keep: int, method
) -> tuple[list[int], list[list[float]]]:
    """FastVID on one video in plain Python: kept indices and their (merged) tokens. Frame
    budgets even (earlier frames the extra); anchors in the last frame of a segment and every
    p-th before it, the segment's context shared evenly over them (later ones the extra)."""
    per = len(outputs) // frames
    frame_rows = [outputs[f * per : (f + 1) * per] for f in range(frames)]
    budgets = [keep // frames + (f < keep % frames) for f in range(frames)]
    sizes = _dyseg_by_hand([_mean(rows) for rows in frame_rows], method.segments, method.tau)
    kept, values, start = [], {}, 0
    for size in sizes:
        seg = range(start, start + size)
        context = [int(budgets[f] * method.context) for f in seg]
        salient = []
        for f, ctx in zip(seg, context, strict=True):
            salient += _top(attention, budgets[f] - ctx, list(range(f * per, (f + 1) * per)))
        anchor_frames = list(range(start + size - 1, start - 1, -method.anchor_stride))
        total, shares = sum(context), [0] * len(anchor_frames)
        for i in range(total):
            shares[i % len(anchor_frames)] += 1
        anchors = []
        for f, share in zip(anchor_frames, shares, strict=True):
            others = [i for i in range(f * per, (f + 1) * per) if i not in salient]
            scores = _dpc_knn_by_hand([outputs[i] for i in others])
            best = _top(scores, share, list(range(len(others))))
            group = [others[b] for b in best]
            members = [i for i in range(start * per, (start + size) * per) if i not in salient]
            joined = {a: [] for a in group}
            for m in members:
                cosines = [_cosine(outputs[m], outputs[a]) for a in group]
                joined[group[cosines.index(max(cosines))]].append(outputs[m])
            for a, rows in joined.items():
                w = max(1 / (len(rows) + 1), method.beta)
                mean = _mean(rows) if rows else outputs[a]
                values[a] = [w * x + (1 - w) * y for x, y in zip(outputs[a], mean, strict=True)]
            anchors += group
        for i in salient:
            values[i] = outputs[i]
        kept += salient + anchors
        start += size
    kept.sort()
    return kept, [values[i] for i in kept]


def test_fastvid_dyseg_cuts_the_least_similar_transitions_and_those_below_tau():
    """Frames 0-1, 2-4 and 5 point three ways: c = 2 cuts once (after 1, the least similar),
    tau = 0.5 adds the cut after 4; with c = 1 and tau below every similarity, one segment."""
    features = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1], [0, 1], [1, 0.2]])
    sizes = fastvid_module.dynamic_segments(features, 2, 0.5)
    assert sizes == _dyseg_by_hand(features.tolist(), 2, 0.5) == [2, 3, 1]
    assert fastvid_module.dynamic_segments(features, 2, -1.0) == [2, 4]
    assert fastvid_module.dynamic_segments(features, 1, -1.0) == [6]
    assert fastvid_module.dynamic_segments(features, 8, -1.0) == [1] * 6


def test_fastvid_anchor_merge_weighs_the_anchor_by_max_of_one_over_n_plus_one_and_beta():
    """Anchor a joined by 1 member (w = max(1/2, 0.3) = 0.5) and b by 3 (w = max(1/4, 0.3) =
    0.3); an anchor nobody joins stays as it is; with beta = 0.6, one member gives w = 0.6."""
    anchors = torch.tensor([[1.0, 0], [0, 2], [-1, -1]])
    members = torch.tensor([[3.0, 0.1], [0.1, 1], [0, 3], [0.2, 5]])
    merged = fastvid_module.merge_into_anchors(anchors, members, beta=0.3)
    b_mean = torch.tensor([0.3, 9]) / 3
    expected = [
        [0.5 * 1 + 0.5 * 3, 0.5 * 0.1],
        (0.3 * torch.tensor([0, 2]) + 0.7 * b_mean).tolist(),
    ]
    torch.testing.assert_close(merged, torch.tensor([*expected, [-1.0, -1]]))
    torch.testing.assert_close(
        fastvid_module.merge_into_anchors(anchors[:1], members[:1], beta=0.6),
        torch.tensor([[0.6 * 1 + 0.4 * 3, 0.4 * 0.1]]),
    )


def test_density_peak_scores_match_the_plain_definition():
    torch.manual_seed(1)
    tokens = torch.randn(9, 5)
    expected = torch.tensor(_dpc_knn_by_hand(tokens.tolist()))
    torch.testing.assert_close(fastvid_module.anchor_scores(tokens), expected)


@pytest.mark.parametrize(
    ("frames", "keep", "options"),
    [
        (6, 24, {"segments": 3, "tau": 0.2, "context": 0.5}),
        (6, 17, {"segments": 2, "tau": -1.0}),
        (9, 40, {"segments": 1, "tau": -1.0, "anchor_stride": 2, "context": 0.3}),
        (1, 5, {}),
    ],
)
def test_fastvid_selects_and_merges_as_the_plain_python_reference(frames, keep, options):
    """Salient tokens per frame by attention, DPC-kNN anchors in each segment's anchor frames
    absorbing its other tokens, on videos of drifting frames (several segments, multi-frame
    segments with one or more anchor frames, a one-frame video); each row of a batch alone."""
    torch.manual_seed(frames + keep)
    drift = torch.randn(frames, 1, 8).cumsum(0)
    outputs = drift + 0.7 * torch.randn(2, frames, 10, 8)
    attention = torch.rand(2, frames * 10)
    visual = VisualTokens(
        outputs.reshape(2, frames * 10, 8), (), attention=attention, frames=frames
    )
    method = create_method("fastvid", **options)
    selection = method.select(visual, keep)
    assert selection.index.shape == (2, keep)
    for row in range(2):
        index, values = _fastvid_by_hand(
            visual.outputs[row].tolist(), attention[row].tolist(), frames, keep, method
        )
        assert selection.index[row].tolist() == index
        torch.testing.assert_close(selection.outputs[row], torch.tensor(values))


@torch.no_grad()
def test_fastvid_and_dycoke_at_their_defaults_choose_each_row_of_a_batch_as_by_hand():
    """Default options, a batch of three 16-frame videos of 49 tokens (FastVID: 78 kept, 5 or 4
    per frame, DySeg's 7 cuts and tau's; DyCoke: k = 0.7, 11 pruned frames keep int(0.3 x 49) = 14),
    attention in three levels (ties: the earlier token): each row as the plain-Python rules
    choose it, and as alone."""
    generator = torch.Generator().manual_seed(5)
    drift = torch.randn(16, 1, 8, generator=generator).cumsum(0)
    outputs = (drift + 0.8 * torch.randn(3, 16, 49, 8, generator=generator)).view(3, 784, 8)
    attention = torch.randint(0, 3, (3, 784), generator=generator).float()
    visual = VisualTokens(outputs, (), attention=attention, frames=16)
    fastvid, dycoke = create_method("fastvid"), create_method("dycoke")
    keep = fastvid.kept_of(784, 16)
    selection, ttm = fastvid.select(visual, keep), dycoke.select(visual, 0)
    assert keep == 78 and ttm.shape == (3, dycoke.kept_of(784, 16)) == (3, 784 - 11 * 35)
    for row in range(3):
        alone = VisualTokens(
            outputs[row : row + 1], (), attention=attention[row : row + 1], frames=16
        )
        index, values = _fastvid_by_hand(
            outputs[row].tolist(), attention[row].tolist(), 16, keep, fastvid
        )
        assert selection.index[row].tolist() == index
        torch.testing.assert_close(selection.outputs[row], torch.tensor(values))
        assert torch.equal(fastvid.select(alone, keep).index[0], selection.index[row])
        frames = _released_ttm_by_hand(outputs[row].view(16, 49, 8).tolist(), 0.7)
        assert ttm[row].tolist() == [f * 49 + t for f, kept in enumerate(frames) for t in kept]
        assert torch.equal(dycoke.select(alone, 0)[0], ttm[row])


def test_fastvid_gives_anchor_frames_overflow_back_as_salient_tokens():
    """Keeping every token: the anchor frame cannot hold the segment's context tokens, the rest
    of them are kept as further salient tokens, and every token comes back unchanged."""
    torch.manual_seed(0)
    outputs = torch.randn(1, 3 * 4, 6)
    visual = VisualTokens(outputs, (), attention=torch.rand(1, 12), frames=3)
    method = create_method("fastvid", keep=1.0, segments=1, tau=-1.0)
    assert method.segment_plan([4, 4, 4], 4) == fastvid_module.SegmentPlan((3, 3, 3), (0, 0, 1), 2)
    selection = method.select(visual, 12)
    assert selection.index.tolist() == [list(range(12))]
    assert torch.equal(selection.outputs, outputs)


def test_fastvid_makes_one_of_duplicate_tokens_an_anchor_as_the_released_noise_does():
    """Two copies of a token, the densest: released, the 1e-6 density noise makes one copy the
    other's denser neighbour (distance 0, score 0), so only one is an anchor (unless the noise
    ties too); tokcomp (no noise) counts the earlier copy as the denser: its anchors are those
    of one of the released draws."""
    torch.manual_seed(3)  # the copies are the densest of the non-salient tokens
    outputs = torch.randn(1, 12, 6)
    outputs[0, 9] = outputs[0, 2]
    attention = torch.linspace(0, 1, 12)[None].flip(1)  # salient: tokens 0 and 1
    visual = VisualTokens(outputs, (), attention=attention, frames=1)
    method = create_method("fastvid", context=0.6)  # of 5 kept: 2 salient, 3 anchors
    index = method.select(visual, 5).index[0].tolist()
    expected, _ = _fastvid_by_hand(outputs[0].tolist(), attention[0].tolist(), 1, 5, method)
    assert index == expected and 2 in index and 9 not in index
    others = outputs[0, 2:]
    distance = density_peaks.scaled_distances(others)
    released = set()
    for seed in range(20):
        noise = 1e-6 * torch.rand(10, generator=torch.Generator().manual_seed(seed))
        scores = density_peaks.density_peak_scores(distance, 4, noise)[1]
        released.add(tuple(sorted((scores.topk(3).indices + 2).tolist())))
    assert tuple(index[2:]) in released


def test_fastvid_refuses_images_only_models_and_bad_options():
    from vlm_fixtures import tiny_vlm

    with pytest.raises(ValueError, match=r"fastvid prunes videos .* use cdpruner, "):
        tokcomp.apply(tiny_vlm("llava"), "fastvid")
    with pytest.raises(ValueError, match="segments"):
        create_method("fastvid", segments=0)
    with pytest.raises(ValueError, match="beta must be in"):
        create_method("fastvid", beta=1.5)
    with pytest.raises(ValueError, match=r"fastvid: tau is the cosine similarity .* got nan"):
        create_method("fastvid", tau=float("nan"))


# -- SparseVLM ------------------------------------------------------------------------------------


def _sparsevlm_raters_by_hand(images: list[torch.Tensor], texts: list[torch.Tensor]) -> list[int]:
    """The released rater rule with plain Python arithmetic: each text token's softmax (over
    the text) of its raw dot products with each visual token, averaged over the visual ones;
    the raters exceed the mean."""
    received = [0.0] * len(texts)
    for image in images:
        logits = [
            sum(a * b for a, b in zip(image.tolist(), t.tolist(), strict=True)) for t in texts
        ]
        total = sum(math.exp(v - max(logits)) for v in logits)
        for j, v in enumerate(logits):
            received[j] += math.exp(v - max(logits)) / total / len(images)
    mean = sum(received) / len(received)
    return [j for j, v in enumerate(received) if v > mean]


def _sparsevlm_clusters_by_hand(points: list[list[float]], count: int, noise: list[float]):
    """cluster_and_merge of the released utils.py, one token at a time: (the merged tokens in
    centre order, the centres)."""
    width = len(points[0])

    def distance(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True))) / math.sqrt(width)

    d = [[distance(a, b) for b in points] for a in points]
    density = [
        math.exp(-sum(v * v for v in sorted(row)[:count]) / count) + noise[i]
        for i, row in enumerate(d)
    ]
    farthest = max(max(row) for row in d)
    separation = [
        min([d[i][j] for j in range(len(points)) if density[j] > density[i]] or [farthest])
        for i in range(len(points))
    ]
    score = [s * p for s, p in zip(separation, density, strict=True)]
    centres = sorted(range(len(points)), key=lambda i: (-score[i], i))[:count]
    members = [[] for _ in centres]
    for i in range(len(points)):
        nearest = (
            centres.index(i)
            if i in centres
            else min(range(count), key=lambda c: (d[centres[c]][i], c))
        )
        members[nearest].append(points[i])
    merged = [[sum(col) / (len(m) + 1e-6) for col in zip(*m, strict=True)] for m in members]
    return merged, centres


def _sparsevlm_by_hand(scores: list[float], states: torch.Tensor, keep: int, noise):
    """One SparseVLM stage by hand: (the kept indices, the merged tokens, their places)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept, deleted = sorted(order[:keep]), order[keep:]
    recycled = deleted[: int(0.3 * len(deleted)) + 1]
    count = int(len(recycled) / 10) + 1
    merged, centres = _sparsevlm_clusters_by_hand(
        [states[i].tolist() for i in recycled], count, noise(len(recycled)).tolist()
    )
    return kept, merged, [recycled[c] for c in centres]


def _noise(count: int) -> torch.Tensor:
    return create_method("sparsevlm").density_noise(count, torch.device("cpu"))


@pytest.mark.parametrize("keep", [2, 9, 20, 39])
def test_sparsevlm_keeps_the_most_rated_and_recycles_deleted_tokens_as_by_hand(keep):
    """39 of 40: one deleted token recycled into itself; 2: 38 deleted, 12 recycled into 2."""
    torch.manual_seed(0)
    attention, outputs = torch.rand(2, 40), torch.randn(2, 40, 6)
    selection = create_method("sparsevlm").select(_visual(outputs, attention=attention), keep)
    for row in range(2):
        kept, merged, places = _sparsevlm_by_hand(
            attention[row].tolist(), outputs[row], keep, _noise
        )
        assert selection.index[row].tolist() == sorted(kept + places), f"row {row}"
        expected = torch.cat([outputs[row, kept], torch.tensor(merged)])
        torch.testing.assert_close(selection.outputs[row], expected, rtol=1e-4, atol=1e-5)
    everything = create_method("sparsevlm").select(_visual(outputs, attention=attention), 40)
    assert everything.tolist() == [list(range(40))] * 2


def test_sparsevlm_density_peaks_cluster_two_groups_into_their_means():
    """Two tight groups far apart: one centre each, each merged token its group's mean."""
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]])
    from tokcomp.methods.sparsevlm import cluster_and_merge

    merged, centres = cluster_and_merge(points[None], 2, _noise(5))
    groups = sorted(merged[0].tolist())
    torch.testing.assert_close(torch.tensor(groups[0]), points[:3].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(groups[1]), points[3:].mean(0), atol=1e-5, rtol=0)
    assert sorted(c // 3 for c in centres[0].tolist()) == [0, 1]


def test_sparsevlm_raters_are_the_text_after_the_image_it_attends_above_the_mean():
    """Row 0: left padding, text before and after its image; row 1: two images (all its
    visual tokens rate the text after the last); row 2: no image (every text row weighs)."""
    torch.manual_seed(0)
    embeds = torch.randn(3, 12, 5)
    visual = torch.zeros(3, 12, dtype=torch.bool)
    visual[0, 4:7] = visual[1, 1:3] = visual[1, 5:8] = True
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[0, :2] = False
    text = valid & ~visual
    method = create_method("sparsevlm")
    rows = method.queries(text)
    weights = method.query_weights(rows, visual, embeds)
    for row in range(2):
        last = int(visual[row].nonzero().max())
        after = [i for i in range(last + 1, 12) if text[row, i]]
        images = [embeds[row, i] for i in visual[row].nonzero().squeeze(1).tolist()]
        raters = _sparsevlm_raters_by_hand(images, [embeds[row, i] for i in after])
        expected = torch.zeros(12)
        expected[[after[j] for j in raters]] = 1.0
        assert weights[row].tolist() == expected.tolist(), f"row {row}"
    assert weights[2].tolist() == text[2].float().tolist()


def test_sparsevlm_budgets_are_the_released_lists_and_their_recycled_tokens():
    method = create_method("sparsevlm")
    assert method.boundaries(32) == [3, 7, 16]  # pruned after layers 2, 6, 15
    released = {64: [66, 30, 17], 128: [303, 110, 36], 192: [300, 200, 110]}
    with_recycled = {64: [82, 32, 18], 128: [312, 117, 39], 192: [309, 204, 113]}
    for label, counts in released.items():
        for keep in (label, label / 576):
            chosen = create_method("sparsevlm", keep=keep)
            assert [chosen.kept_at(s, 576, 32) for s in range(3)] == counts
        schedule = create_method("sparsevlm", keep=label).llm_schedule(32, 576, 0)
        assert (
            schedule
            == [576] * 3
            + [with_recycled[label][0]] * 4
            + [with_recycled[label][1]] * 9
            + [with_recycled[label][2]] * 16
        )
    half = create_method("sparsevlm", keep=0.5)
    average = 2 * 576 + sum(n * half.kept_at(s, 576, 32) for s, n in enumerate((4, 10, 16)))
    assert average / 32 == pytest.approx(288, rel=0.01)  # the released 2/4/10/16 weighting
    assert create_method("sparsevlm", keep=1.0).llm_schedule(32, 576, 0) == [576] * 32


def test_sparsevlm_scales_its_layers_to_the_depth_and_refuses_bad_layers():
    assert create_method("sparsevlm").boundaries(24) == [3, 6, 12]  # 1.5, 4.5, 11.25 half up
    three = create_method("sparsevlm", keep=0.25)
    assert three.boundaries(3) == [1, 2]  # layers 0, 1, 1: the last two stages prune once
    assert three.kept_at(1, 576, 3) == three.kept_at(2, 576, 32)
    for layers in ([2, 6], [6, 2, 15], [-1, 2, 6]):
        with pytest.raises(ValueError, match="layers must be 3 ascending ints >= 0"):
            create_method("sparsevlm", layers=layers)
    with pytest.raises(ValueError, match=r"ascending in 1\.\.2 \(the language model has 3"):
        tokcomp.apply(_tiny_llava(), "sparsevlm", layers=[0, 1, 2])


def _tiny_llava():
    from vlm_fixtures import tiny_vlm

    return tiny_vlm("llava")


@torch.no_grad()
def test_sparsevlm_in_a_model_cuts_to_the_by_hand_choice_from_the_unpatched_layer_states():
    """The unpatched model's input embeddings give the raters, its eager layer-0 attention the
    scores, its layer-0 outputs the kept and recycled states: by hand, each sample's sequence
    entering layer 1 (left-padded batch; sample 1 has two images, each chosen alone)."""
    from vlm_fixtures import IMAGE, batch_inputs

    model = _tiny_llava()
    batch, _ = batch_inputs(model, "llava", [(1, 5), (2, 3)], seed=3)
    language = model.model.language_model
    language.config._attn_implementation = "eager"
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    language.config._attn_implementation = "sdpa"
    embeds, states = out.hidden_states[0], out.hidden_states[1]
    attention = out.attentions[0].mean(dim=1)
    method = create_method("sparsevlm", keep=0.25, layers=[0, 1, 1])
    keep = method.kept_at(0, 16, 3)
    expected = []
    for row, ids in enumerate(batch["input_ids"]):
        valid = batch["attention_mask"][row].bool()
        image = (ids == IMAGE).nonzero().squeeze(1)
        after = [i for i in range(int(image.max()) + 1, len(ids)) if valid[i]]
        picked = _sparsevlm_raters_by_hand(
            [embeds[row, i] for i in image], [embeds[row, i] for i in after]
        )
        raters = [after[j] for j in picked]
        chosen = {}  # each image's first place -> its kept states, then its merged tokens
        for span in image.split(16):
            scores = attention[row, raters][:, span].mean(dim=0).tolist()
            kept, merged, _ = _sparsevlm_by_hand(scores, states[row, span], keep, _noise)
            chosen[int(span[0])] = [states[row, span[k]] for k in kept] + [
                torch.tensor(m) for m in merged
            ]
        tokens = []
        for i in range(len(ids)):
            if valid[i] and ids[i] != IMAGE:
                tokens.append(states[row, i])
            tokens.extend(chosen.get(i, []))
        expected.append(torch.stack(tokens))
    seen = []
    tokcomp.apply(model, method)
    handle = language.layers[1].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model(**batch)
    handle.remove()
    entering = seen[0]
    for row, tokens in enumerate(expected):
        torch.testing.assert_close(entering[row, -len(tokens) :], tokens, rtol=1e-4, atol=1e-5)
