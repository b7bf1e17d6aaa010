"""The default VLM's training script: visual-token dropout builds prompts with placeholders
for the kept tokens only and fills them with exactly those tokens' features."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from fixtures import eval_script
from fixtures.training import (
    Reached,
    assert_a_finished_model_is_refused,
    killed_after_epoch,
    must_not_run,
    reach,
)
from fixtures.vqa import VISUAL_TOKENS, tiny_llava, tiny_processor, training_script, write_jsonl

from tokcomp.files import torch_save_whole
from tokcomp.harness.vqa_data import read_jsonl

IMAGE = 9


def test_keep_placeholders_keeps_the_text_around_the_image():
    prompt = [1, 5, IMAGE, IMAGE, IMAGE, IMAGE, 6, 7]
    kept = torch.tensor([0, 3])
    assert training_script().keep_placeholders(prompt, IMAGE, kept) == [1, 5, IMAGE, IMAGE, 6, 7]


@pytest.mark.parametrize("drop", [0.0, 1.0])
def test_visual_subsets_are_sorted_distinct_and_within_bounds(drop):
    args = Namespace(drop_visual=drop, min_visual=3)
    generator = torch.Generator().manual_seed(0)
    subsets = training_script().visual_subsets(200, 16, args, generator)
    for kept in subsets:
        assert kept.tolist() == sorted(set(kept.tolist()))
        assert int(kept.min()) >= 0 and int(kept.max()) < 16
    sizes = {len(kept) for kept in subsets}
    if drop == 0:
        assert sizes == {16}
    else:
        assert min(sizes) >= 3 and max(sizes) <= 15 and len(sizes) > 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    questions = read_jsonl(write_jsonl(tmp_path_factory.mktemp("data") / "questions.jsonl"))
    processor = tiny_processor(questions)
    torch.manual_seed(0)
    model = tiny_llava(processor).eval()
    split = training_script().encode(processor, questions)
    return model, split, processor.tokenizer.eos_token_id


def test_keeping_every_visual_token_is_the_plain_batch(tiny):
    model, split, eos = tiny
    script = training_script()
    images = list(range(len(split.by_image)))
    pixels = split.pixels[images]
    everything = [torch.arange(split.visual_tokens)] * len(images)
    plain = script.forward(model, script.make_batch(split, images, eos, pixels))[0]
    full = script.forward(model, script.make_batch(split, images, eos, pixels, None, everything))
    torch.testing.assert_close(full[0].loss, plain.loss)


def test_a_dropped_image_is_seen_through_its_kept_tokens_only(tiny):
    """The answer logits of a prompt cut to some visual tokens equal those of the model
    given exactly those tokens' projected features, consecutively numbered."""
    model, split, eos = tiny
    script = training_script()
    kept = [torch.tensor([0, 5, 6, 15]), torch.arange(3, 11), torch.tensor([2, 9])]
    images = list(range(len(kept)))
    batch = script.make_batch(split, images, eos, split.pixels[images], None, kept)
    assert split.visual_tokens == VISUAL_TOKENS
    with torch.no_grad():
        logits = script.forward(model, batch, labels=False)[0].logits
        features = torch.stack(model.model.get_image_features(batch.pixels).pooler_output)
        for row in range(len(batch.ids)):
            image = int(batch.owner[row])
            ids = batch.ids[row, : int(batch.mask[row].sum())][None]
            placeholders = (ids == split.image_token)[0].nonzero().flatten()
            assert len(placeholders) == len(kept[image])
            embeds = model.get_input_embeddings()(ids).clone()
            embeds[0, placeholders] = features[image, kept[image]]
            alone = model(inputs_embeds=embeds).logits
            last = int(batch.last[row])
            torch.testing.assert_close(logits[row, last], alone[0, last], atol=1e-5, rtol=1e-5)


def test_shape_patches_marks_the_patches_a_shape_covers():
    pixels = torch.full((1, 3, 32, 32), -1.0)
    pixels[:, 0, 8:24, 16:32] = 1.5  # a 16 px square: patches (1, 2), (1, 3), (2, 2), (2, 3)
    pixels[:, 1, 0:8, 0] = 1.0  # one pixel column of patch (0, 0): an eighth of it
    on_shape = training_script().shape_patches(pixels, 8)
    assert on_shape.view(4, 4).nonzero().tolist() == [[1, 2], [1, 3], [2, 2], [2, 3]]


def test_the_tower_probe_asks_shape_and_colour_of_the_patches_on_the_shape_only():
    """With zero weights every logit is 0: objectness costs log 2 per patch, and a shape (3
    classes) and colour (8) term, log 3 + log 8, appear only when some patch shows a shape."""
    script = training_script()
    probe = script.TowerProbe(width=8, patch_size=8)
    torch.nn.init.zeros_(probe.linear.weight)
    torch.nn.init.zeros_(probe.linear.bias)
    states = torch.randn(2, 5, 8, requires_grad=True)  # class token + 4 patches
    facts = torch.tensor([[1, 4], [2, 3]])
    blank = torch.full((2, 3, 16, 16), -1.0)
    shown = blank.clone()
    shown[0, :, :8, :8] = 1.0  # image 0: its first patch shows the shape
    log = torch.log(torch.tensor(2.0)), torch.log(torch.tensor(3.0)), torch.log(torch.tensor(8.0))
    torch.testing.assert_close(probe.loss(states, blank, facts), log[0])
    torch.testing.assert_close(probe.loss(states, shown, facts), sum(log))
    probe.loss(states, shown, facts).backward()
    assert states.grad[:, 0].abs().sum() == 0  # the class token is not probed


def run(out, *options):
    """A smoke run into `out`, at the thread count of now (the script sets it)."""
    threads = ["--threads", str(torch.get_num_threads())]
    return ["--out", str(out), "--epochs", "1", "--limit-steps", "1", *threads, *options]


#: The VLM training scripts and their first work (reading or making the data).
FIRST_WORK = {"train_vlm_easyvqa": "read_easy_vqa", "train_vlm_videoshapes": "make_clips"}


@pytest.mark.parametrize("name", sorted(FIRST_WORK))
def test_a_finished_model_in_out_is_refused_before_any_work(name, tmp_path, monkeypatch, capsys):
    script = eval_script(name)
    monkeypatch.setattr(script, FIRST_WORK[name], must_not_run)
    monkeypatch.setattr(script, "fit", must_not_run)
    assert_a_finished_model_is_refused(script.main, run(tmp_path), tmp_path, capsys)


@pytest.mark.parametrize("name", sorted(FIRST_WORK))
@pytest.mark.parametrize(
    ("existing", "options"),
    [("model.safetensors", ["--force"]), (".train_state/last.pt", [])],
    ids=["force-over-a-model", "resume-unfinished"],
)
def test_force_or_an_unfinished_run_goes_on_to_its_work(
    name, tmp_path, monkeypatch, existing, options
):
    script = eval_script(name)
    monkeypatch.setattr(script, FIRST_WORK[name], reach)
    (tmp_path / existing).parent.mkdir(exist_ok=True)
    (tmp_path / existing).write_bytes(b"earlier")
    with pytest.raises(Reached):
        script.main(run(tmp_path, *options))


def test_a_checkpoint_of_a_forced_run_resumes_without_force(tmp_path):
    """--force is no training setting: the checkpoint of a run started with it resumes
    without it."""
    script = training_script()
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    forced = script.parse_args(["--out", str(tmp_path), "--force"])
    state = {"epoch": 3, "elapsed_s": 5.0, "history": [], "model": layer.state_dict()}
    state |= {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    state["args"] = {k: str(v) if k == "out" else v for k, v in vars(forced).items()}
    torch_save_whole(state, tmp_path / "last.pt")
    again = script.parse_args(["--out", str(tmp_path)])
    assert script.resume(tmp_path / "last.pt", again, (layer, optimizer, schedule))["epoch"] == 3


def test_a_diverged_epoch_stops_before_the_step(tmp_path):
    """A non-finite loss ends the run at once: no optimiser step, so nothing is saved."""
    script = training_script()
    args = script.parse_args(["--out", str(tmp_path)])
    layer = torch.nn.Linear(2, 2)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def step_loss(items, generator):
        return layer(torch.ones(1, 2)).sum() * math.inf

    with pytest.raises(SystemExit, match=r"loss is (nan|inf) at epoch 1, step 1: the run"):
        script.train_epoch(layer, optimizer, schedule, 0, 2, 4, 2, step_loss, args)
    assert torch.equal(layer.weight, before)


class SavedLinear(torch.nn.Linear):
    """A linear layer that `fit` can write as it writes a Hugging Face model."""

    def save_pretrained(self, folder):
        torch_save_whole(self.state_dict(), Path(folder) / "weights.pt")


class NoProcessor:
    """Writes nothing; its tokenizer's length is the vocabulary `fit` prints."""

    tokenizer = ()

    def save_pretrained(self, folder):
        pass


def fit_linear(script, out):
    """`fit` three epochs of a seeded linear model and probe on 8 noisy items, 2 a step."""
    args = script.parse_args(["--out", str(out), "--epochs", "3", "--threads", "1"])
    torch.manual_seed(0)
    model, probe, items = SavedLinear(4, 2), torch.nn.Linear(4, 1), torch.randn(8, 4)
    (out / ".train_state").mkdir(parents=True, exist_ok=True)

    def step_loss(chosen, generator):
        noisy = items[chosen] + torch.randn(len(chosen), 4, generator=generator)
        return model(noisy).pow(2).mean() + probe(noisy).abs().mean()

    def monitor():
        return {"weight": round(model.weight.sum().item(), 4)}

    script.fit(args, out / ".train_state", model, probe, NoProcessor(), 8, 2, step_loss, monitor)
    return torch.load(out / "weights.pt")


@pytest.mark.parametrize("killed_after", [1, 2])
def test_a_run_killed_after_an_epoch_and_restarted_writes_the_uninterrupted_model(
    tmp_path, monkeypatch, killed_after
):
    """Resumed from its checkpoint, `fit` restores model, probe, optimiser and schedule and
    redraws its epochs as the uninterrupted run did, bit for bit."""
    script = training_script()
    whole = fit_linear(script, tmp_path / "whole")
    with killed_after_epoch(monkeypatch, script, killed_after):
        fit_linear(script, tmp_path / "resumed")
    resumed = fit_linear(script, tmp_path / "resumed")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    history = json.loads((tmp_path / "resumed" / ".train_state" / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert not (tmp_path / "resumed" / ".train_state" / "last.pt").exists()
