"""DiffRate's rate search: straight-through estimators, masks, frozen weights, MACs target."""

from __future__ import annotations

import argparse
import itertools
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_siglip_with_head, tiny_vit
from fixtures.imagenet import fashion_mnist_checkpoint
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import tokcomp
from tokcomp.adapters.base import attend
from tokcomp.cli import main
from tokcomp.harness.distributed import World
from tokcomp.harness.fingerprint import Fingerprint
from tokcomp.methods.diffrate_search import (
    DiffRateRates,
    DiffRateSearch,
    KeptCount,
    ceil_ste,
    min_ste,
)
from tokcomp.schedule import model_macs
from tokcomp.search import diffrate
from tokcomp.search.diffrate import (
    MixedBatches,
    SearchSettings,
    expected_macs,
    fit_counts,
    gradual_counts,
    search_diffrate,
    total_macs,
    training_batches,
)
from tokcomp.search.state import SearchState


def _batches(count: int = 6, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))) for _ in range(count)]


def test_straight_through_estimators():
    value = torch.tensor(2.3, requires_grad=True)
    out = ceil_ste(value)
    out.backward()
    assert out.item() == 3.0 and value.grad.item() == 1.0
    current, prune, merge = (torch.tensor(v, requires_grad=True) for v in (50.0, 40.0, 45.0))
    out = min_ste(current, prune, merge)
    (2 * out).backward()
    assert out.item() == 40.0
    assert current.grad is None and prune.grad.item() == 2.0 and merge.grad.item() == 2.0


def test_kept_count_and_token_mask():
    counter = KeptCount(patches=8, protected=1, granularity=2)  # candidates 8, 6, 4, 2
    assert counter.kept().item() == 1 + 5  # ceil(mean 5) + class token
    mask = counter.token_mask(kept=6, alive=8, tokens=9)
    assert mask.tolist() == pytest.approx([1, 1, 1, 1, 1, 1, 0, 0, 1], abs=1e-6)
    mask[6].backward()
    assert counter.logits.grad.abs().sum() > 0  # P_6 = p(c=8) + p(c=6) depends on the logits


def test_masked_keys_get_no_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    from tokcomp.methods import Signal

    _, signals = attend(q, k, v, 0.5, needs=frozenset({Signal.ATTN}), key_mask=mask)
    attn = signals.attn[0]
    assert attn[:, :, [2, 4]][:, [0, 1, 3]].max() < 1e-5  # others ignore masked keys
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(2, 5))


def test_search_step_moves_only_the_rates_and_keeps_weights_bit_identical():
    model = tiny_vit("vit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = DiffRateRates(tokcomp.adapters.find_adapter(model).spec(), granularity=4)
    settings = SearchSettings(0.6, max_steps=1, progress=False)
    search_diffrate(model, _batches(1), settings, rates)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    assert not tokcomp.is_patched(model)
    moved = [c.logits.abs().sum().item() for c in (*rates.prune, *rates.merge)]
    assert all(m > 0 for m in moved)  # every block's logits got a gradient step


def test_a_diverged_search_leaves_the_model_unpatched_and_trainable():
    model = tiny_vit("vit")
    images, labels = _batches(1)[0]
    settings = SearchSettings(0.6, max_steps=1, progress=False)
    with pytest.raises(FloatingPointError, match=r"diverged .*: lower --lr or --lam and rerun"):
        search_diffrate(model, [(images * math.nan, labels)], settings)
    assert all(p.requires_grad for p in model.parameters())
    assert not tokcomp.is_patched(model)


def test_micro_batches_take_the_same_step_as_whole_batches():
    spec = tokcomp.adapters.find_adapter(tiny_vit("vit")).spec()
    searched = []
    for micro_batch in (None, 3):
        model, rates = tiny_vit("vit"), DiffRateRates(spec, granularity=4)
        settings = SearchSettings(0.6, max_steps=3, progress=False, micro_batch=micro_batch)
        search_diffrate(model, _batches(3, batch=8), settings, rates)
        searched.append(torch.cat([p.detach().flatten() for p in rates.parameters()]))
    assert searched[0].abs().sum() > 0
    torch.testing.assert_close(searched[1], searched[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "option", [{"micro_batch": 0}, {"epochs": 0}, {"max_steps": -1}, {"epochs": 2.5}]
)
def test_counts_of_the_search_must_be_positive_whole_numbers(option):
    (name, value), *_ = option.items()
    with pytest.raises(ValueError, match=f"{name} must be a positive whole number, got {value}"):
        SearchSettings(0.6, **option)


@pytest.mark.parametrize("build", [lambda: tiny_vit("vit"), tiny_siglip_with_head])
def test_expected_macs_equals_the_analytic_model_of_the_selected_counts(build):
    """An attention-pooling head (SigLIP's) is priced at the tokens that reach it."""
    model = build()
    spec = tokcomp.adapters.find_adapter(model).spec()
    rates = DiffRateRates(spec, granularity=4)
    _, merged = rates.kept_lists()
    tokcomp.apply(model, "diffrate", prune_kept=rates.kept_lists()[0], merge_kept=merged)
    config = tokcomp.config_of(model)
    assert expected_macs(spec, rates).item() == pytest.approx(config.macs - config.selection_macs)


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_search_reaches_the_macs_target_within_3_percent(target, tmp_path):
    model = tiny_vit("vit", depth=6)
    settings = SearchSettings(target, epochs=10, lr=0.05, lr_min=0.005, progress=False, fit=False)
    config = search_diffrate(model, _batches(), settings)
    assert config.macs_ratio == pytest.approx(target, rel=0.03)
    path = config.save(tmp_path / "searched.json")
    reloaded = tokcomp.apply(model, path)
    assert tokcomp.config_of(reloaded).schedule == config.schedule
    images = _batches(1)[0][0]
    with torch.no_grad():
        direct = tokcomp.apply(tiny_vit("vit", depth=6), config)(images)
        torch.testing.assert_close(reloaded(images), direct, atol=0, rtol=0)


def _spec_197_tokens():
    return tokcomp.adapters.find_adapter(tiny_vit("vit", img_size=56, depth=6)).spec()


@pytest.mark.parametrize(
    ("merge_kept", "target", "grows"),
    [
        ([197, 190, 150, 120, 80, 40], 0.5, False),  # the search overshot: scale down
        ([197, 160, 100, 60, 30, 10], 0.6, True),  # it undershot: scale up to the target
    ],
)
def test_fit_counts_scales_the_searched_shape_to_the_largest_schedule_within_target(
    merge_kept, target, grows
):
    spec = _spec_197_tokens()
    prune_kept = [197] + [min(196 + 1, m + 7) for m in merge_kept[1:]]
    scale, pruned, merged = fit_counts(spec, prune_kept, merge_kept, target)
    model = tokcomp.apply(
        tiny_vit("vit", img_size=56, depth=6), "diffrate", prune_kept=pruned, merge_kept=merged
    )
    config = tokcomp.config_of(model)
    assert target - 0.01 < config.macs_ratio <= target  # DiffRate's own work included
    assert (scale > 1) == grows
    assert pruned[0] == merged[0] == 197
    assert all(m <= p for m, p in zip(merged, pruned, strict=True))
    assert merged == sorted(merged, reverse=True) and pruned == sorted(pruned, reverse=True)
    for before, after in zip(merge_kept[1:], merged[1:], strict=True):
        assert after - 1 == pytest.approx(min(196, scale * (before - 1)), abs=0.5)
    assert config.macs - config.selection_macs == model_macs(spec, merged)


@pytest.mark.parametrize("target", [0.8, 0.6])
def test_gradual_start_merges_evenly_at_the_target_without_pruning(target):
    spec = _spec_197_tokens()
    pruned, merged = gradual_counts(spec, target)
    assert pruned == [197, *merged[:-1]]  # each block prunes nothing it has
    steps = [before - after for before, after in itertools.pairwise(merged)]
    assert max(steps) - min(steps) <= 1  # the same merges per block, up to rounding
    macs = total_macs(spec, pruned, merged) / model_macs(spec)
    fewer_merges = [197] + [m + 1 for m in merged[1:]]
    assert (
        macs
        <= target
        < total_macs(spec, [197, *fewer_merges[:-1]], fewer_merges) / (model_macs(spec))
    )


def test_gradual_start_centres_the_rates_on_its_counts():
    spec = _spec_197_tokens()
    rates = DiffRateRates(spec, granularity=4)
    pruned, merged = gradual_counts(spec, 0.6)
    rates.start_at(pruned, merged, spread=8)
    searched_pruned, searched_merged = rates.kept_lists()
    # exactly, the first block's full count included (where the candidates cut the Gaussian,
    # its centre moves out: centred on 197 it started at 192)
    assert (searched_pruned, searched_merged) == (pruned, merged)
    uniform = DiffRateRates(spec, granularity=4).kept_lists()[1]
    assert uniform[1] < 110 < searched_merged[1]  # uniform starts at half the patches


@pytest.mark.parametrize("start", ["uniform", "gradual"])
def test_an_average_pooled_model_keeps_its_last_block_whole_as_the_released_mae_search(start):
    """DiffRate/patch/mae.py: non_compressed_block_index = [0, len(model.blocks) - 1]; a
    class-token model searches every block after the first."""
    pooled = tiny_vit("vit", depth=6, global_pool="avg", class_token=False)
    settings = SearchSettings(0.5, epochs=2, lr=0.05, progress=False, start=start)
    config = search_diffrate(pooled, _batches(2), settings)
    prune_kept, merge_kept = config.options["prune_kept"], config.options["merge_kept"]
    assert prune_kept[-1] == merge_kept[-1] == merge_kept[-2] < merge_kept[0]
    assert config.macs_ratio <= 0.5
    spec = tokcomp.adapters.find_adapter(pooled).spec()
    assert len(DiffRateRates(spec, whole_last=True).prune) == spec.depth - 2
    assert len(DiffRateRates(spec).prune) == spec.depth - 1
    with pytest.raises(ValueError, match="leaves its first and last blocks whole: this 2-block"):
        DiffRateRates(
            tokcomp.adapters.find_adapter(tiny_vit("vit", depth=2)).spec(), whole_last=True
        )


def test_search_from_the_gradual_start_records_it_and_refuses_unknown_starts():
    model = tiny_vit("vit", depth=6)
    settings = SearchSettings(0.6, epochs=1, lr=0.05, progress=False, start="gradual")
    config = search_diffrate(model, _batches(2), settings)
    assert "gradual start" in config.notes and config.macs_ratio <= 0.6
    with pytest.raises(ValueError, match="start must be one of uniform, gradual"):
        SearchSettings(0.6, start="ramp")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.0}, "lr must be a positive learning rate, got 0.0"),
        ({"lr_min": -0.001}, "lr_min is where the cosine schedule ends, between 0 and lr 0.01"),
        ({"lr": 0.01, "lr_min": 0.05}, "between 0 and lr 0.01; got 0.05"),
        ({"lam": -5.0}, "lam weighs the MACs loss and must be >= 0, got -5.0"),
    ],
)
def test_settings_that_would_train_the_rates_the_wrong_way_are_refused(
    options, message, tmp_path, capsys
):
    with pytest.raises(ValueError, match=re.escape(message)):
        SearchSettings(0.6, **options)
    flags = [x for name, value in options.items() for x in ("--" + name.replace("_", "-"), value)]
    argv = ["search", "diffrate", "--model", "test_vit", "--data", "fashion-mnist"]
    argv += ["--target-macs", "0.7", *map(str, flags), "-o", str(tmp_path / "searched.json")]
    assert main(argv) == 2  # refused before the model and the images load
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("granularity", [0, 64, 100])
def test_a_granularity_that_leaves_one_candidate_count_is_refused(granularity):
    settings = SearchSettings(0.6, max_steps=1, progress=False, granularity=granularity)
    with pytest.raises(ValueError, match="among 64 patch tokens: give a granularity below 64"):
        search_diffrate(tiny_vit("vit"), _batches(1), settings)


def test_fit_counts_refuses_a_target_no_schedule_reaches():
    spec = _spec_197_tokens()
    with pytest.raises(ValueError, match="raise the target"):
        fit_counts(spec, [197] * 6, [197] * 6, 0.1)


def test_search_fits_its_counts_to_the_target_by_default():
    model = tiny_vit("vit", depth=6)
    settings = SearchSettings(0.6, epochs=1, lr=0.05, progress=False)
    config = search_diffrate(model, _batches(2), settings)
    assert config.macs_ratio <= 0.6
    assert "scaled by" in config.notes


def test_a_finished_search_keeps_its_state_and_a_rerun_from_it_takes_no_step(tmp_path, monkeypatch):
    # max_steps ends the search in its first epoch, which the state records as finished
    state = SearchState(tmp_path / "state.pt", Fingerprint.of())
    settings = SearchSettings(0.6, epochs=2, max_steps=1, lr=0.05, progress=False)
    first = search_diffrate(tiny_vit("vit", depth=6), _batches(3), settings, state=state)
    assert state.path.is_file()  # the caller discards it once the config is safe
    monkeypatch.setattr(diffrate, "_backward", lambda *args: pytest.fail("a step ran"))
    again = search_diffrate(tiny_vit("vit", depth=6), _batches(3), settings, state=state)
    assert again.to_dict() == first.to_dict()


def test_search_command_on_fashion_mnist_writes_a_config_that_reloads(tmp_path):
    output = tmp_path / "search" / "searched.json"
    argv = ["search", "diffrate", "--checkpoint", str(fashion_mnist_checkpoint(tmp_path))]
    argv += ["--data", "fashion-mnist"]
    argv += ["--target-macs", "0.7", "--epochs", "1", "--limit", "32", "--batch-size", "16"]
    assert main([*argv, "-o", str(output)]) == 0
    assert list(output.parent.iterdir()) == [output]  # the search state went once it was written
    config = tokcomp.Config.load(output)
    assert config.method == "diffrate" and "DiffRate search" in config.notes
    assert "batch 16 per process, 32 images of fashion-mnist" in config.notes
    model = tokcomp.apply(timm.create_model("test_vit"), output)
    assert tokcomp.config_of(model).schedule == config.schedule


def test_class_probability_labels_take_the_same_step_as_class_indices():
    spec = tokcomp.adapters.find_adapter(tiny_vit("vit")).spec()
    searched = []
    for probabilities in (False, True):
        batches = [(x, F.one_hot(y, 10).float() if probabilities else y) for x, y in _batches(3)]
        model, rates = tiny_vit("vit"), DiffRateRates(spec, granularity=4)
        search_diffrate(model, batches, SearchSettings(0.6, max_steps=3, progress=False), rates)
        searched.append(torch.cat([p.detach().flatten() for p in rates.parameters()]))
    torch.testing.assert_close(searched[1], searched[0])


def test_mixed_batches_blend_image_pairs_into_smoothed_class_probabilities():
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    mixed = MixedBatches(loader, classes=10, seed=0)
    assert len(mixed) == 2 and mixed.sampler is loader.sampler
    for (images, labels), (plain, indices) in zip(mixed, loader, strict=True):
        assert labels.shape == (8, 10) and not torch.equal(images, plain)
        torch.testing.assert_close(labels.sum(dim=1), torch.ones(8))
        pair = F.one_hot(indices, 10).bool() | F.one_hot(indices.flip(0), 10).bool()
        assert labels[pair].sum() >= 0.9 * 8  # each image's mass: its class and its partner's
        assert labels[~pair].max() <= 0.01 + 1e-6 and labels.min() > 0  # smoothing elsewhere


def test_mixed_batches_draw_an_epoch_alike_whether_or_not_earlier_epochs_ran():
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))

    def epoch_of(epochs: list[int]) -> list[torch.Tensor]:
        sampler = DistributedSampler(data, num_replicas=1, rank=0, seed=5)
        loader = DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator())
        mixed = MixedBatches(loader, classes=10, seed=5)
        for epoch in epochs:
            mixed.set_epoch(epoch)
            drawn = [tensor for batch in mixed for tensor in batch]
        return drawn

    resumed, straight = epoch_of([1]), epoch_of([0, 1])
    for a, b in zip(resumed, straight, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(epoch_of([0])[0], straight[0])  # another epoch, other draws


def test_deit_augmented_search_command_records_it_and_refuses_odd_batches(tmp_path, capsys):
    output = tmp_path / "search" / "searched.json"
    argv = ["search", "diffrate", "--checkpoint", str(fashion_mnist_checkpoint(tmp_path))]
    argv += ["--data", "fashion-mnist"]
    argv += ["--target-macs", "0.7", "--epochs", "1", "--limit", "32", "--augment", "deit"]
    assert main([*argv, "--batch-size", "16", "-o", str(output)]) == 0
    assert "DeiT augmentation" in tokcomp.Config.load(output).notes
    assert main([*argv, "--batch-size", "15", "-o", str(output), "--force"]) == 2
    assert "give an even --batch-size" in capsys.readouterr().err


def _pruning_rates(spec, kept: list[int]) -> DiffRateRates:
    """Rates that select these prune counts (patch tokens) in blocks 1.. and merge nothing."""
    rates = DiffRateRates(spec, granularity=4)
    with torch.no_grad():
        for counter, patches in zip(rates.prune, kept, strict=True):
            counter.logits.copy_(torch.where(counter.candidates == patches, 30.0, -30.0))
        for counter in rates.merge:
            counter.logits.copy_(
                torch.where(counter.candidates == counter.candidates[0], 30.0, -30.0)
            )
    return rates


@pytest.mark.parametrize("variant", ["vit", "gap", "registers_gap"])
def test_the_search_forward_prunes_the_tokens_the_exported_config_prunes(variant):
    # masked tokens are gone at inference: without a class token the importance (attention
    # received) must not count the masked tokens' own attention rows
    model, images = tiny_vit(variant), _batches(1)[0][0]
    spec = tokcomp.adapters.find_adapter(model).spec()
    rates = _pruning_rates(spec, [40, 24, 12])
    with torch.no_grad():
        tokcomp.apply(model, DiffRateSearch(rates=rates, schedule=[spec.tokens] * spec.depth))
        searched = model(images)
        pruned, merged = rates.kept_lists()
        assert pruned == merged == [spec.tokens, *(spec.protected + k for k in (40, 24, 12))]
        exported = tokcomp.apply(model, "diffrate", prune_kept=pruned, merge_kept=merged)(images)
    torch.testing.assert_close(searched, exported, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("images", "ranks", "batch"), [(15, 2, 8), (250, 3, 21), (8, 2, 8)])
def test_no_image_is_trained_on_twice_in_an_epoch_across_ranks(images, ranks, batch):
    """torch's DistributedSampler evens out the shards by repeating images: one could be in
    two ranks' batches of the same epoch."""
    dataset = TensorDataset(torch.arange(images))
    args = argparse.Namespace(seed=0, batch_size=batch, workers=0)
    seen = [
        int(index)
        for rank in range(ranks)
        for (indices,) in training_batches(args, dataset, World(rank=rank, size=ranks))
        for index in indices
    ]
    assert len(seen) == len(set(seen)) > 0
