"""DiffRate, Zero-TPrune and PiToMe against plain transcriptions of docs/methods.md sections 2-4,
at the blocks the shorter hand checks in test_methods.py leave out: tokens whose sizes are not
one, negative similarities, heads outside the variance band, iteration counts per block,
PiToMe's alpha and its default (bsm) matching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

import tokcomp
from tokcomp.methods import (
    AttentionStyle,
    BlockPosition,
    Geometry,
    Signals,
    TokenState,
    create_method,
)

# -- a plain forward of the tiny ViT, with a hand reduction between attention and MLP ------


def _hand_forward(model, images: torch.Tensor, reduce) -> torch.Tensor:
    """The timm ViT's forward with eager attention (log sizes on the logits) and, per image,
    `reduce(index, x, size, attn, keys) -> (x, size)` after the attention residual."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    rows = [(x[i], torch.ones(x.shape[1])) for i in range(len(x))]
    for index, block in enumerate(model.blocks):
        reduced = []
        for x, size in rows:
            out, attn, keys = _attention(block.attn, block.norm1(x), size)
            x, size = reduce(index, x + block.ls1(out), size, attn, keys)
            reduced.append((x + block.ls2(block.mlp(block.norm2(x))), size))
        rows = reduced
    return model.forward_head(model.norm(torch.stack([x for x, _ in rows])))


def _attention(attn, x: torch.Tensor, size: torch.Tensor):
    """One image's attention output (N, C), probabilities (heads, N, N), head-mean keys."""
    tokens, channels = x.shape
    q, k, v = attn.qkv(x).reshape(tokens, 3, attn.num_heads, -1).permute(1, 2, 0, 3)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1) + size.log()).softmax(dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(tokens, channels)
    return attn.proj(out), probs, k.mean(dim=0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _fold(x: torch.Tensor, size, into: dict[int, int], weight, added) -> tuple:
    """Fold each token `src` of `into` into token `into[src]` (the others stay, in order):
    features averaged with `weight`, sizes summed with `added` for the folded tokens."""
    kept = [t for t in range(len(x)) if t not in into]
    members = {t: [t] for t in kept}
    for src, dst in into.items():
        members[dst].append(src)
    new_x, new_size = [], []
    for t in kept:
        w = torch.stack([weight[m] for m in members[t]])
        new_x.append((w[:, None] * x[members[t]]).sum(dim=0) / w.sum())
        new_size.append(size[t] + sum(added[m] for m in members[t][1:]))
    return torch.stack(new_x), torch.stack(new_size)


# -- DiffRate (section 3.1) -------------------------------------------------------------


def _diffrate_block(x, size, cls_attn, pruned: int, keep: int):
    """One image's DiffRate reduction with one class token: rank by head-mean class attention,
    keep `pruned`, fold the rest of them into the most similar of the first `keep` (never the
    class token): plain mean, sizes scaled by the best cosine clamped at 0."""
    order = [0, *(cls_attn.mean(dim=0)[1:].argsort(descending=True) + 1).tolist()]
    x, size = x[order[:pruned]], size[order[:pruned]]  # ranked: dst the first `keep`, then src
    best, match = _cosine(x[keep:], x[1:keep]).max(dim=1)
    into = {keep + i: 1 + int(match[i]) for i in range(pruned - keep)}
    added = {keep + i: size[keep + i] * best[i].clamp_min(0) for i in range(pruned - keep)}
    return _fold(x, size, into, torch.ones(pruned), added)


def test_diffrate_merges_sized_tokens_by_plain_mean_and_clamps_negative_similarity():
    """Every token has a size other than one; one src (token 7) points away from every dst."""
    angles = torch.tensor([100.0, 80, 90, 100, 0, 170, 30, 210])  # token 0: the class token
    lengths = torch.tensor([1.0, 2, 0.5, 3, 1, 1, 4, 2])
    rad = angles.deg2rad()
    x = (lengths[:, None] * torch.stack([rad.cos(), rad.sin()], dim=1))[None]
    size = torch.tensor([[1.0, 2, 3, 1, 4, 5, 2, 3]])
    # importance ranks 4 > 2 > 6 > 1 > 7 > 3 > 5: prune 5; dst [cls, 4, 2]; src 6, 1, 7, 3
    attn = torch.tensor([0.2, 0.11, 0.16, 0.06, 0.2, 0.02, 0.14, 0.09])
    cls_attn = torch.stack([attn + 0.01, attn - 0.01])[None]
    state = TokenState(x, protected=1, size=size, source=torch.eye(8)[None])
    method = create_method("diffrate", prune_kept=[8, 7], merge_kept=[8, 3])
    out = method.reduce(state, Signals(cls_attn=cls_attn), 3, BlockPosition(1, 2))

    cos = [math.cos(math.radians(d)) for d in (30, 10, 120, 10)]  # 6->4, 1->2, 7->2, 3->2
    assert cos[2] < 0 and torch.equal(out.source[0][:, [0, 4, 2]], torch.eye(3))
    torch.testing.assert_close(out.x[0, 1], (x[0, 4] + x[0, 6]) / 2)
    torch.testing.assert_close(out.x[0, 2], (x[0, 2] + x[0, 1] + x[0, 7] + x[0, 3]) / 4)
    torch.testing.assert_close(out.size[0, 1], torch.tensor(4 + 2 * cos[0]))
    torch.testing.assert_close(out.size[0, 2], torch.tensor(3 + 2 * cos[1] + 0 + 1 * cos[3]))
    expected = _diffrate_block(x[0], size[0], cls_attn[0], 7, 3)
    torch.testing.assert_close((out.x[0], out.size[0]), expected)


def test_diffrate_reduces_tokens_merged_at_an_earlier_block_as_its_hand_transcription():
    """Two blocks in a row on random tokens of 2 channels (negative best cosines occur)."""
    torch.manual_seed(5)
    batch, tokens = 4, 16
    state = TokenState(torch.randn(batch, tokens, 2), protected=1)
    method = create_method("diffrate", prune_kept=[16, 13, 5], merge_kept=[16, 6, 3])
    expected = [(state.x[b], torch.ones(tokens)) for b in range(batch)]
    negative = 0  # srcs whose best cosine to a dst is below 0
    for index, (pruned, keep) in enumerate([(13, 6), (5, 3)], start=1):
        cls_attn = torch.rand(batch, 2, state.tokens).softmax(dim=-1)
        state = method.reduce(state, Signals(cls_attn=cls_attn), keep, BlockPosition(index, 3))
        for b, (x, size) in enumerate(expected):
            ranked = cls_attn[b].mean(dim=0)[1:].argsort(descending=True) + 1
            dst, src = ranked[: keep - 1], ranked[keep - 1 : pruned - 1]
            negative += int((_cosine(x[src], x[dst]).max(dim=1).values < 0).sum())
            expected[b] = _diffrate_block(x, size, cls_attn[b], pruned, keep)
    assert negative > 0 and not torch.allclose(state.size, torch.ones_like(state.size))
    torch.testing.assert_close(state.x, torch.stack([x for x, _ in expected]))
    torch.testing.assert_close(state.size, torch.stack([s for _, s in expected]))


@torch.no_grad()
def test_diffrate_tiny_vit_matches_a_plain_forward_through_blocks_with_merged_sizes(images):
    prune_kept, merge_kept = [65, 57, 45, 40], [65, 51, 37, 30]
    model = tiny_vit("vit")

    def reduce(index, x, size, attn, keys):
        if merge_kept[index] == len(x):
            return x, size
        pruned = min(prune_kept[index], len(x))
        return _diffrate_block(x, size, attn[:, 0], pruned, merge_kept[index])

    expected = _hand_forward(model, images, reduce)
    tokcomp.apply(model, "diffrate", prune_kept=prune_kept, merge_kept=merge_kept)
    torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)


# -- Zero-TPrune (section 4.1) ----------------------------------------------------------


def _zero_tprune_kept(attn, keys, keep: int, iterations: int, band, share: float) -> list[int]:
    """One image's kept tokens (one class token), in order: per-head PageRank, heads whose
    mean-scaled score variance lies outside `band` left out (all kept if none is inside),
    root mean square over the others; the S-stage marks, then the top by importance."""
    heads, tokens, _ = attn.shape
    scores = torch.full((heads, tokens), 1 / tokens)
    for _ in range(iterations):
        scores = torch.stack([attn[h].T @ scores[h] for h in range(heads)])
    patches = scores[:, 1:]
    variance = (patches / patches.mean(dim=1, keepdim=True)).var(dim=1, unbiased=False)
    inside = (variance >= band[0]) & (variance <= band[1])
    if not inside.any():
        inside = torch.ones(heads, dtype=torch.bool)
    importance = patches[inside].square().mean(dim=0).sqrt()
    marked = set()
    pairs = min(round((tokens - keep) * share), (tokens - 1) // 2)
    if pairs:
        order = importance.argsort(descending=True)
        a, b = order[::2], order[1::2]
        best, match = _cosine(keys[1:][a], keys[1:][b]).max(dim=1)
        for i in best.argsort(descending=True)[:pairs].tolist():
            first, second = int(a[i]), int(b[match[i]])
            marked.add(first if importance[first] < importance[second] else second)
    ranked = [t for t in importance.argsort(descending=True).tolist() if t not in marked]
    return [0, *sorted(t + 1 for t in ranked[: keep - 1])]


def _identical_rows(distributions: list[list[float]], tokens: int) -> torch.Tensor:
    """(1, heads, N, N) attention in which every query of head h attends with distributions[h]:
    its PageRank scores are that distribution after any number of steps >= 1."""
    rows = torch.tensor(distributions)
    return (rows / rows.sum(dim=1, keepdim=True))[None, :, None, :].expand(-1, -1, tokens, -1)


@pytest.mark.parametrize(
    ("distributions", "kept"),
    [
        # heads 0 and 1 in the band; RMS favours 1 and 2 (strong in one head) over 3 and 4
        # (a higher head mean, spread over both); head 2 is too peaked (variance 1.6) on 5, 6
        (
            [
                [1, 1.8, 0.6, 1.3, 1.2, 0.6, 0.6],
                [1, 0.6, 1.8, 1.2, 1.3, 0.6, 0.6],
                [1, 0.1, 0.1, 0.1, 0.1, 3, 3],
            ],
            [0, 1, 2],
        ),
        # only head 1 in the band (head 0 is flat, head 2 too peaked): a head mean ranks 3 first
        (
            [[1, 1, 1, 1, 1, 1, 1], [1, 1.4, 1.3, 0.7, 1.2, 0.7, 0.7], [1, 0.1, 0.1, 6, 0.1, 0, 0]],
            [0, 1, 2],
        ),
    ],
)
def test_zero_tprune_importance_is_the_rms_over_the_heads_in_the_band(distributions, kept):
    tokens = len(distributions[0])
    attn = _identical_rows(distributions, tokens)
    state = TokenState(torch.randn(1, tokens, 4), protected=1, source=torch.eye(tokens)[None])
    method = create_method("zero_tprune", similarity_share=0.0, variance_band=[0.01, 0.7])
    method = method.with_options(iterations=[4] * 4)
    signals = Signals(keys=torch.randn(1, tokens, 4), attn=attn)
    assert _zero_tprune_kept(attn[0], signals.keys[0], len(kept), 4, [0.01, 0.7], 0.0) == kept
    out = method.reduce(state, signals, len(kept), BlockPosition(1, 4))
    assert out.source[0].argmax(dim=1).tolist() == kept


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_zero_tprune_runs_each_blocks_own_iteration_count(share):
    """Random attention at block 2 of iterations [1, 1, 12, 1]: 12 steps, not block 0's 1."""
    torch.manual_seed(2)
    batch, heads, tokens, keep = 6, 3, 17, 9
    attn = (2 * torch.randn(batch, heads, tokens, tokens)).softmax(dim=-1)
    signals = Signals(keys=torch.randn(batch, tokens, 4), attn=attn)
    state = TokenState(
        torch.randn(batch, tokens, 4), 1, source=torch.eye(tokens).expand(batch, -1, -1)
    )
    band = [0.0, 1e9]
    method = create_method("zero_tprune", similarity_share=share, variance_band=band)
    method = method.with_options(iterations=[1, 1, 12, 1])
    out = method.reduce(state, signals, keep, BlockPosition(2, 4))
    expected = [
        _zero_tprune_kept(attn[b], signals.keys[b], keep, 12, band, share) for b in range(batch)
    ]
    one_step = [
        _zero_tprune_kept(attn[b], signals.keys[b], keep, 1, band, share) for b in range(batch)
    ]
    assert one_step != expected  # the count matters on these matrices
    assert out.source.argmax(dim=2).tolist() == expected


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"variance_band": [0.05, 0.3], "similarity_share": 0.0},
        {"iterations": [1, 1, 3, 6]},
    ],
)
@torch.no_grad()
def test_zero_tprune_tiny_vit_matches_a_plain_forward(options, images):
    """Pruning at blocks 1-3; by default 30, 30, 5, 1 iterations (by thirds of 4 blocks)."""
    schedule = [65, 50, 38, 28]
    model = tiny_vit("vit")
    band = options.get("variance_band", [0.01, 0.7])
    share = options.get("similarity_share", 0.5)
    counts = options.get("iterations", [30, 30, 5, 1])

    def reduce(index, x, size, attn, keys):
        if schedule[index] == len(x):
            return x, size
        kept = _zero_tprune_kept(attn, keys, schedule[index], counts[index], band, share)
        return x[kept], size[kept]

    expected = _hand_forward(model, images, reduce)
    tokcomp.apply(model, "zero_tprune", schedule=schedule, **options)
    torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)


# -- PiToMe (section 2) ------------------------------------------------------------------


def _energy(metric: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """E_i = mean_j ELU_alpha(cos_ij - margin), j over all tokens, i included."""
    u = _cosine(metric, metric) - margin
    return torch.where(u >= 0, u, alpha * (u.exp() - 1)).mean(dim=1)


def _pitome_into(metric, merges: int, margin: float, alpha: float, bsm: bool) -> dict[int, int]:
    """One image's PiToMe choice over its unprotected tokens: {source: destination}."""
    order = _energy(metric, margin, alpha).argsort(descending=True)
    if not bsm:
        a, b = order[: 2 * merges : 2], order[1 : 2 * merges : 2]
        match = _cosine(metric[a], metric[b]).argmax(dim=1)
        return {int(a[i]): int(b[match[i]]) for i in range(merges)}
    a, b = order[::2], order[1::2]
    best, match = _cosine(metric[a], metric[b]).max(dim=1)
    sources = best.argsort(descending=True)[:merges].tolist()  # ToMe's top r: best matches
    return {int(a[i]): int(b[match[i]]) for i in sources}


def _pitome_block(x, size, metric, merges: int, margin: float, alpha: float, bsm: bool):
    """One image's PiToMe reduction with one class token: size-weighted merge, sizes summed
    (the output's token order is not the spec's; the model's output does not depend on it)."""
    into = _pitome_into(metric[1:], merges, margin, alpha, bsm)
    into = {src + 1: dst + 1 for src, dst in into.items()}
    return _fold(x, size, into, size, size)


def _settled_pitome(**options):
    """PiToMe as `apply` settles it on a 4-block timm model (bsm_layers left to its default)."""
    geometry = Geometry(
        tokens=9,
        protected=1,
        depth=4,
        class_token=True,
        attention=AttentionStyle.FUSED_QKV,
        width=2,
        heads=1,
        attn_dim=2,
    )
    return create_method("pitome", metric="hidden", **options).settle(geometry)


def _by_first_patch(state: TokenState, b: int) -> list[list[int]]:
    """Image b's tokens as the sorted input patches inside each, in order of their first."""
    groups = [row.nonzero().flatten().tolist() for row in state.source[b]]
    return sorted(groups)


def test_pitome_default_matching_merges_the_best_matched_high_energy_tokens():
    """8 patches on a circle: 1, 2, 3 close together (high energy), 4 and 6 close, 5, 7, 8
    apart. Energy order 3, 2, 1, 4, 6, 8, 7, 5 (A = 3, 1, 6, 7; B = 2, 4, 8, 5): the two best
    A-to-B matches are 1 -> 2 and 3 -> 2 (then 6 -> 4, and 7 -> 5 the worst)."""
    angles = torch.tensor([0.0, 10, 14, 20, 90, 200, 100, 245, 300]).deg2rad()
    x = torch.stack([angles.cos(), angles.sin()], dim=1)[None]
    method = _settled_pitome(margin=0.5)
    assert method.bsm_layers == [0, 1, 2, 3]
    state = TokenState(x, 1, source=torch.eye(9)[None])
    out = method.reduce(state, Signals(), 7, BlockPosition(0, 4))
    assert _by_first_patch(out, 0) == [[0], [1, 2, 3], [4], [5], [6], [7], [8]]
    energy = _energy(x[0, 1:], 0.5, 1.0)
    assert (energy.argsort(descending=True) + 1).tolist() == [3, 2, 1, 4, 6, 8, 7, 5]
    merged = out.source[0, :, 1].argmax()
    torch.testing.assert_close(out.x[0, merged], (x[0, 1] + x[0, 2] + x[0, 3]) / 3)


@pytest.mark.parametrize("bsm_layers", [None, []])
@pytest.mark.parametrize("alpha", [0.0, 4.0])
def test_pitome_alpha_weighs_the_energy_of_the_dissimilar_pairs(alpha, bsm_layers):
    """ELU's alpha scales the negative terms (dissimilar pairs): another alpha, another choice."""
    torch.manual_seed(4)
    batch, tokens, merges = 6, 13, 4
    x = torch.randn(batch, tokens, 3)
    method = _settled_pitome(margin=0.4, alpha=alpha, bsm_layers=bsm_layers)
    bsm = bsm_layers is None
    state = TokenState(x, 1, source=torch.eye(tokens).expand(batch, -1, -1))
    out = method.reduce(state, Signals(), tokens - merges, BlockPosition(0, 4))
    choices = [_pitome_into(x[b, 1:], merges, 0.4, alpha, bsm) for b in range(batch)]
    assert choices != [_pitome_into(x[b, 1:], merges, 0.4, 1.0, bsm) for b in range(batch)]
    for b in range(batch):
        members = {t: [t] for t in range(tokens) if t - 1 not in choices[b]}
        for src, dst in choices[b].items():
            members[dst + 1].append(src + 1)
        assert _by_first_patch(out, b) == sorted(sorted(m) for m in members.values())


@pytest.mark.parametrize("options", [{}, {"alpha": 3.0}, {"bsm_layers": [0, 2]}])
@torch.no_grad()
def test_pitome_tiny_vit_matches_a_plain_forward(options, images):
    """timm defaults: head-mean keys, m0 = 0.75 decaying by block, bsm everywhere, wavg."""
    schedule = [57, 50, 44, 39]
    alpha, bsm_layers = options.get("alpha", 1.0), options.get("bsm_layers", [0, 1, 2, 3])
    model = tiny_vit("vit")

    def reduce(index, x, size, attn, keys):
        margin = 0.75 * (1 - index / 4)
        bsm = index in bsm_layers
        return _pitome_block(x, size, keys, len(x) - schedule[index], margin, alpha, bsm)

    expected = _hand_forward(model, images, reduce)
    tokcomp.apply(model, "pitome", schedule=schedule, **options)
    torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)
