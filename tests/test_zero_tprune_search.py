"""Zero-TPrune's settings search: every setting scored as a plain loop would, the best kept,
the model left unpatched, clear errors, and the command's config reloads."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from fixtures.imagenet import fashion_mnist_checkpoint

import tokcomp
from tokcomp.cli import main
from tokcomp.config import METHOD_DEFAULTS
from tokcomp.search import zero_tprune
from tokcomp.search.zero_tprune import Trial, choose, score, search_zero_tprune


def _batches(count: int = 3, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))) for _ in range(count)]


def _plain_loss_and_top1(model, batches) -> tuple[float, float]:
    logits = torch.cat([model(images) for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    top1 = (logits.argmax(1) == labels).float().mean().item() * 100
    return F.cross_entropy(logits, labels).item(), top1


def test_score_equals_a_plain_cross_entropy_and_top1():
    model, batches = tiny_vit(), _batches()
    with torch.no_grad():
        expected = _plain_loss_and_top1(model, batches)
    losses, top1 = score(model, batches)
    assert (losses.mean().item(), top1) == pytest.approx(expected, rel=1e-5)
    assert losses.shape == (12,)


def test_search_tries_every_setting_keeps_the_chosen_one_and_leaves_the_model_unpatched():
    model, batches = tiny_vit(), _batches()
    with torch.no_grad():
        before = model(batches[0][0])
    config, trials = search_zero_tprune(
        model, batches, 0.6, shares=(0.0, 1.0), layer_sets=(None, [1, 2]), progress=False
    )
    assert [(t.options["similarity_share"], t.options.get("layers")) for t in trials] == [
        (0.0, None),
        (1.0, None),
        (0.0, [1, 2]),
        (1.0, [1, 2]),
    ]
    assert [t.layers for t in trials] == [[1, 2, 3]] * 2 + [[1, 2]] * 2
    chosen = choose(trials)
    assert config.method == "zero_tprune"
    assert config.options["similarity_share"] == chosen.options["similarity_share"]
    assert config.options["layers"] == chosen.layers
    assert config.macs_ratio == pytest.approx(0.6, abs=0.05)
    assert "Zero-TPrune search" in config.notes
    assert not tokcomp.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(batches[0][0]), before)
        tokcomp.apply(model, "zero_tprune", **trials[3].options)
        assert trials[3].loss == pytest.approx(_plain_loss_and_top1(model, batches)[0], rel=1e-5)
        tokcomp.apply(model, config)
        assert score(model, batches)[0].mean().item() == pytest.approx(chosen.loss, rel=1e-5)


def _trial(layers: list[int], losses: list[float]) -> Trial:
    return Trial({"layers": layers}, layers, torch.tensor(losses), 0.0)


def test_choose_prefers_fewer_pruning_blocks_only_within_noise():
    every = _trial([1, 2, 3, 4], [0.50, 0.30, 0.70, 0.40])
    level = _trial([2], [0.52, 0.30, 0.68, 0.42])  # 0.005 worse, paired error about 0.01
    worse = _trial([2], [0.60, 0.40, 0.80, 0.50])  # 0.1 worse on every image
    assert choose([every, worse]) is every
    assert choose([every, level, worse]) is level
    assert choose([level, every]) is level
    assert choose([_trial([1], [0.4]), _trial([1, 2], [0.3])]).layers == [1, 2]


def test_search_tries_each_sizes_setting_with_each_share():
    _, trials = search_zero_tprune(
        tiny_vit(), _batches(), 0.6, shares=(0.5, 1.0), sizes=(False, True), progress=False
    )
    settings = [(t.options["similarity_sizes"], t.options["similarity_share"]) for t in trials]
    assert settings == [(False, 0.5), (False, 1.0), (True, 0.5), (True, 1.0)]
    assert trials[1].loss != trials[3].loss  # the sizes reach the attention
    _, default = search_zero_tprune(tiny_vit(), _batches(), 0.6, shares=(1.0,), progress=False)
    assert "similarity_sizes" not in default[0].options  # the model's own setting, else off
    assert default[0].loss == trials[1].loss
    carrying = tiny_vit()
    carrying.pretrained_cfg = {METHOD_DEFAULTS: {"zero_tprune": {"similarity_sizes": True}}}
    _, own = search_zero_tprune(carrying, _batches(), 0.6, shares=(1.0,), progress=False)
    assert own[0].loss == trials[3].loss


def test_search_settings_differ_in_loss():
    # the search has something to choose from: importance-only and similarity-only pruning
    # keep different tokens on this model
    _, trials = search_zero_tprune(tiny_vit(), _batches(), 0.5, shares=(0.0, 1.0), progress=False)
    assert trials[0].loss != trials[1].loss


@pytest.mark.parametrize(
    ("shares", "layer_sets", "message"),
    [
        ((), (None,), "at least one similarity share"),
        ((0.5,), (), "at least one similarity share, block list"),
        ((1.5,), (None,), "similarity_share must be in"),
        ((0.5,), ([9],), "layers"),
    ],
)
def test_search_refuses_bad_settings_with_the_fix(shares, layer_sets, message):
    model = tiny_vit()
    with pytest.raises(ValueError, match=message):
        search_zero_tprune(model, _batches(1), 0.6, shares, layer_sets, progress=False)
    assert not tokcomp.is_patched(model)


def test_a_later_setting_that_cannot_run_is_refused_before_any_trial(monkeypatch):
    trials = []
    monkeypatch.setattr(zero_tprune, "_trial", lambda *args: trials.append(args))
    with pytest.raises(ValueError, match=r"layers \[9\] must be block indices"):
        search_zero_tprune(tiny_vit(), _batches(1), 0.6, (0.5,), ([1, 2], [9]), progress=False)
    assert trials == []


def test_search_command_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["search", "zero_tprune", "--model", "test_vit", "--data", "fashion-mnist"]
    assert main([*argv, "--target-macs", "0.7", "-o", "x.json"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_score_refuses_no_images():
    with pytest.raises(ValueError, match="no images"):
        score(tiny_vit(), [])


def test_search_command_on_fashion_mnist_prints_the_trials_and_writes_a_config(tmp_path, capsys):
    output = tmp_path / "search" / "searched.json"
    argv = ["search", "zero_tprune", "--checkpoint", str(fashion_mnist_checkpoint(tmp_path))]
    argv += ["--data", "fashion-mnist"]
    argv += ["--target-macs", "0.7", "--limit", "32", "--batch-size", "16", "--shares", "0,1"]
    argv += ["--layers", "2,1,1", "--layers", "2", "--sizes", "off,on"]  # 2,1,1: blocks 1, 2
    assert main([*argv, "-o", str(output)]) == 0
    assert list(output.parent.iterdir()) == [output]  # the search state went once it was written
    printed = capsys.readouterr().out
    assert printed.count("<- chosen") == 1 and "[1, 2]" in printed
    assert printed.count("  on ") == 4 and printed.count("  off ") == 4
    config = tokcomp.Config.load(output)
    assert config.method == "zero_tprune" and config.options["layers"] in ([1, 2], [2])
    model = tokcomp.apply(timm.create_model("test_vit"), output)
    assert tokcomp.config_of(model).schedule == config.schedule


def test_search_command_refuses_an_unknown_sizes_setting(capsys):
    argv = ["search", "zero_tprune", "--model", "test_vit", "--data", "fashion-mnist"]
    assert main([*argv, "--target-macs", "0.7", "--sizes", "yes", "-o", "x.json"]) == 2
    assert "give off, on or off,on" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["zero_tprune", "diffrate"])
def test_a_search_refuses_a_model_without_a_classifier(method, tmp_path, capsys):
    """dinov2_vits14 has no head: its 384 features were scored as logits of the 10 classes."""
    output = tmp_path / "searched.json"
    argv = ["search", method, "--model", "dinov2_vits14", "--data", "fashion-mnist"]
    argv += ["--limit", "4", "--batch-size", "4"]
    assert main([*argv, "--target-macs", "0.8", "-o", str(output)]) == 2
    assert "has no classifier (num_classes 0)" in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
