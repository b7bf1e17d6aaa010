"""The default ViT's training script: the garment mask per patch and the token-label loss,
checked against a per-patch loop of plain cross-entropies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from fixtures import eval_script
from fixtures.training import assert_a_finished_model_is_refused, killed_after_epoch, must_not_run
from safetensors import safe_open
from safetensors.torch import load_file

from tokcomp.files import torch_save_whole
from tokcomp.harness.fashion_mnist import place_on_canvas


def script():
    return eval_script("train_vit_fmnist")


def test_foreground_patches_marks_exactly_the_bright_cells():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[0, 0:4, 2:6] = 200  # cells (0, 1), (0, 2), (1, 1), (1, 2) of the 14x14 grid
    images[1, 26:28, 26:28] = 20  # below the threshold
    mask = script().foreground_patches(images, patch=2, threshold=25)
    assert mask.shape == (2, 196)
    assert sorted(mask[0].nonzero()[:, 0].tolist()) == [1, 2, 15, 16]
    assert not mask[1].any()


def test_foreground_patches_follows_the_patch_size():
    images = torch.zeros(1, 28, 28, dtype=torch.uint8)
    images[0, 4:8, 0:4] = 255
    mask = script().foreground_patches(images, patch=4, threshold=25)
    assert mask.shape == (1, 49) and mask[0].nonzero()[:, 0].tolist() == [7]


def reference_loss(logits, labels, foreground):
    """One cross-entropy per patch: the label on the garment, a uniform target elsewhere."""
    total, count = 0.0, 0
    classes = logits.shape[-1]
    uniform = torch.full((classes,), 1.0 / classes)
    for b in range(logits.shape[0]):
        for p in range(logits.shape[1]):
            target = labels[b] if foreground[b, p] else uniform
            total += F.cross_entropy(logits[b, p][None], target[None]).item()
            count += 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1])
def test_token_label_loss_matches_a_per_patch_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (3,), generator=generator)
    foreground = torch.rand(3, 7, generator=generator) < 0.5
    loss = script().token_label_loss(logits, labels, foreground)
    assert loss.item() == pytest.approx(reference_loss(logits, labels, foreground), rel=1e-5)


def test_token_label_loss_is_lowest_for_confident_garment_and_flat_background():
    labels = torch.tensor([3])
    foreground = torch.tensor([[True, False]])
    ideal = torch.zeros(1, 2, 10)
    ideal[0, 0, 3] = 50.0
    loss = script().token_label_loss(ideal, labels, foreground)
    assert loss.item() == pytest.approx(math.log(10) / 2, abs=1e-4)  # flat background: log K
    swapped = torch.zeros(1, 2, 10)
    swapped[0, 1, 3] = 50.0  # confident on the background, flat on the garment
    assert script().token_label_loss(swapped, labels, foreground) > loss + 10


def test_with_registers_inserts_zero_positions_between_class_token_and_patches():
    plain = tiny_vit().state_dict()
    target = tiny_vit(reg_tokens=2)
    state = script().with_registers(plain, target)
    target.load_state_dict(state)
    pos = state["pos_embed"][0]
    assert torch.equal(pos[0], plain["pos_embed"][0, 0])
    assert torch.equal(pos[3:], plain["pos_embed"][0, 1:])
    assert not pos[1:3].any()
    registers = state["reg_token"][0]
    assert registers.shape == (2, target.embed_dim) and not torch.equal(registers[0], registers[1])
    assert script().with_registers(state, target) is state  # nothing missing: unchanged


def test_with_registers_refuses_to_drop_registers():
    with pytest.raises(SystemExit, match="register tokens"):
        script().with_registers(tiny_vit(reg_tokens=2).state_dict(), tiny_vit())


@pytest.mark.parametrize("registers", [0, 2])
def test_init_from_a_28px_model_resamples_it_onto_the_canvas(tmp_path, registers):
    out = ["--out", str(tmp_path)]
    small = [*out, "--embed-dim", "24", "--num-heads", "2", "--depth", "2", "--patch-size"]
    full_frame = script().parse_args([*small, "2"])
    canvas = script().parse_args([*small, "3", "--canvas", "42", "--registers", str(registers)])
    torch.manual_seed(0)
    earlier = script().create(full_frame, 2)
    path = tmp_path / "model.safetensors"
    script().save_model(path, earlier, full_frame, 2, {"train_wall_s": 1, "train_cpu_s": 2})

    model, wall_s, cpu_s, _ = script().load_init(script().create(canvas, 3), str(path), canvas)
    assert model.patch_embed.patch_size == (3, 3) and model.patch_embed.grid_size == (14, 14)
    assert model.patch_embed.proj.weight.shape[-2:] == (3, 3) and (wall_s, cpu_s) == (1, 2)
    old, new = earlier.state_dict(), model.state_dict()
    for name, value in old.items():
        if not name.startswith(("patch_embed", "pos_embed")):
            assert torch.equal(new[name], value), name
    # Same 14x14 grid: the positions are kept, with zeros for the new registers.
    pos = new["pos_embed"]
    assert torch.equal(pos[:, :1], old["pos_embed"][:, :1])
    assert not pos[:, 1 : 1 + registers].any()
    assert torch.equal(pos[:, 1 + registers :], old["pos_embed"][:, 1:])
    assert script().data_config(42)["fashion_mnist_canvas"] == 42
    assert "fashion_mnist_canvas" not in script().data_config(28)


def test_paste_resized_at_28_px_is_an_exact_paste_and_other_sizes_fit_the_canvas():
    images = torch.randint(1, 256, (12, 28, 28), dtype=torch.uint8)
    pasted = script().paste_resized(images, 42, (28, 28), torch.Generator().manual_seed(0))
    for image, out in zip(images, pasted, strict=True):
        top_left = out.nonzero().min(0).values
        assert torch.equal(out, place_on_canvas(image[None], top_left[None], 42)[0])

    solid = torch.full((200, 28, 28), 255, dtype=torch.uint8)
    resized = script().paste_resized(solid, 42, (20, 42), torch.Generator().manual_seed(1))
    sides = [(out > 127).sum(1).max().item() for out in resized]  # the square's side, in px
    assert min(sides) >= 20 and max(sides) <= 42 and max(sides) - min(sides) >= 15


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--garment-sizes", "20", "28"], "needs --canvas"),
        (["--canvas", "42", "--garment-sizes", "30", "20"], "MIN <= MAX"),
        (["--canvas", "42", "--garment-sizes", "20", "50"], "MAX <= --canvas"),
    ],
)
def test_garment_sizes_that_would_be_ignored_or_not_fit_are_refused(options, message, capsys):
    with pytest.raises(SystemExit):
        script().parse_args(options)
    assert message in capsys.readouterr().err


def tiny_run(out, *options):
    """A tiny one-epoch run into `out` (no fused attention or thread count left changed)."""
    tiny = ["--embed-dim", "24", "--num-heads", "2", "--depth", "2", "--fused-attn"]
    threads = ["--threads", str(torch.get_num_threads())]
    return ["--out", str(out), "--coarse-epochs", "0", "--epochs", "1", *tiny, *threads, *options]


def test_a_finished_model_in_out_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    module = script()
    monkeypatch.setattr(module, "load_arrays", must_not_run)
    monkeypatch.setattr(module, "augment", must_not_run)
    assert_a_finished_model_is_refused(
        module.main, tiny_run(tmp_path, "--limit-steps", "1"), tmp_path, capsys
    )


@pytest.mark.parametrize("forced", [True, False], ids=["force-over-a-model", "resume-unfinished"])
def test_force_or_a_checkpoint_of_a_forced_run_resumes_and_writes_the_model(
    tmp_path, monkeypatch, forced
):
    """A checkpoint at the last epoch, of a run started with --force: resumed with --force over
    a finished model, or without it where the run has not written its model yet."""
    module = script()
    args = module.parse_args(tiny_run(tmp_path, "--force"))
    model = module.create(args, 2)
    state = {"epoch": 1, "patch": 2, "model": model.state_dict(), "elapsed_s": 1, "cpu_s": 1}
    state |= {"optimizer": module.make_optimizer(model, args).state_dict(), "history": []}
    (tmp_path / ".train_state").mkdir()
    torch_save_whole({**state, "args": vars(args)}, tmp_path / ".train_state" / "last.pt")
    if forced:
        (tmp_path / "model.safetensors").write_bytes(b"shipped")
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(module, "load_arrays", lambda root, split: (images, np.arange(4)))
    monkeypatch.setattr(module, "augment", must_not_run)
    module.main(tiny_run(tmp_path, *(["--force"] if forced else [])))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as written:
        assert written.metadata()["train_wall_s"] == "1"  # the checkpoint's time: resumed
    # finished: no checkpoint left, from which a rerun with --force would only rewrite it
    assert not (tmp_path / ".train_state" / "last.pt").exists()


def test_a_diverged_run_stops_and_writes_no_model(tmp_path, monkeypatch, capsys):
    module = script()
    images = np.zeros((8, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(module, "load_arrays", lambda root, split: (images, np.arange(8) % 10))
    nan = torch.tensor(math.nan, requires_grad=True)
    monkeypatch.setattr(F, "cross_entropy", lambda *args, **kwargs: nan * 1)
    with pytest.raises(SystemExit, match=r"loss is nan at epoch 1, step 1: the run diverged"):
        module.main(tiny_run(tmp_path, "--batch-size", "4"))
    assert not (tmp_path / "model.safetensors").exists()


def fake_fashion_mnist(monkeypatch, module, count=16):
    """Random 28x28 images with labels 0..9 in place of the Fashion-MNIST files."""
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    monkeypatch.setattr(module, "load_arrays", lambda root, split: (images, labels))


def written_tensors(out):
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("killed_after", [1, 2], ids=["at-the-stage-boundary", "mid-stage"])
def test_a_run_killed_after_an_epoch_and_restarted_writes_the_uninterrupted_model(
    tmp_path, monkeypatch, killed_after
):
    """Two stages (a coarse epoch at patch 4, two fine epochs at patch 2): resumed from its
    checkpoint, the run repatches, restores the optimiser and redraws its epochs as the
    uninterrupted run did, bit for bit, and its history lists every epoch once."""
    module = script()
    fake_fashion_mnist(monkeypatch, module)
    stages = ["--coarse-epochs", "1", "--coarse-patch", "4", "--epochs", "2"]
    small = ["--batch-size", "4", "--limit-steps", "2", "--eval-images", "4", "--drop-path", "0.1"]

    def run(out):
        module.main(tiny_run(out, *small, *stages))  # the later --coarse-epochs, --epochs win

    run(tmp_path / "whole")
    with killed_after_epoch(monkeypatch, module, killed_after):
        run(tmp_path / "resumed")
    run(tmp_path / "resumed")

    whole, resumed = written_tensors(tmp_path / "whole"), written_tensors(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    history = json.loads((tmp_path / "resumed" / ".train_state" / "history.json").read_text())
    assert [record.get("epoch") for record in history if "epoch" in record] == [1, 2, 3]
