"""Searches save their progress beside their output: an interrupted search ends with one line
saying so, the same command resumes where it stopped, and a command with other inputs or
settings is refused naming what changed (--fresh starts again). The state goes only once the
config is written: a failed write loses nothing, and the rerun finishes at once from it."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from fixtures.imagenet import fashion_mnist_checkpoint

from tokcomp.cli import main
from tokcomp.config import Config
from tokcomp.harness.fingerprint import Fingerprint
from tokcomp.search import diffrate, zero_tprune
from tokcomp.search.state import SearchState


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The searched model: a 10-class test_vit, as Fashion-MNIST's labels need."""
    return fashion_mnist_checkpoint(tmp_path_factory.mktemp("model"))


def _argv(method: str, options: dict[str, str], output, checkpoint) -> list[str]:
    argv = ["search", method, "--checkpoint", str(checkpoint), "--data", "fashion-mnist"]
    return [*argv, *(x for pair in options.items() for x in pair), "-o", str(output)]


def _refusal(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


DIFFRATE = {"--target-macs": "0.7", "--epochs": "2", "--limit": "32"}
DIFFRATE["--batch-size"] = "16"


def test_an_interrupted_diffrate_search_resumes_after_its_last_epoch(
    checkpoint, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "configs" / "searched.json"  # a folder the search makes
    state = tmp_path / "configs" / "searched.json.search-state.pt"
    steps = []
    real_backward = diffrate._backward

    def backward_until_ctrl_c(*args):
        if len(steps) == 3:  # two steps an epoch: the second epoch's second step
            raise KeyboardInterrupt
        steps.append(len(steps))
        return real_backward(*args)

    monkeypatch.setattr(diffrate, "_backward", backward_until_ctrl_c)
    assert main(_argv("diffrate", DIFFRATE, output, checkpoint)) == 130
    assert _refusal(capsys) == (
        f"tokcomp search diffrate: interrupted: the rates after each finished epoch are saved "
        f"in {state}; the same command resumes"
    )
    assert state.is_file() and not output.exists()
    assert torch.load(state, weights_only=True)["epoch"] == 1

    steps[:] = [0]  # resumed: only the second epoch's two steps run
    assert main(_argv("diffrate", DIFFRATE, output, checkpoint)) == 0
    assert len(steps) == 3 and not state.exists() and output.is_file()


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--limit", "16", "limit: 32 then, 16 now"),
        ("--batch-size", "8", "batch_size: 16 then, 8 now"),
        ("--lr", "0.05", "lr: 0.01 then, 0.05 now"),
        ("--augment", "deit", "preprocessing: "),
        ("--target-macs", "0.6", "target_macs: 0.7 then, 0.6 now"),
    ],
)
def test_a_diffrate_state_of_other_inputs_is_refused_and_fresh_starts_again(
    checkpoint, tmp_path, capsys, option, value, named
):
    output = tmp_path / "searched.json"
    state = SearchState.beside(output, Fingerprint.of())
    saved_inputs = {**DIFFRATE, "--epochs": "1"}
    _save_first_epoch(saved_inputs, output, state, checkpoint)
    changed = {**saved_inputs, option: value}
    assert main(_argv("diffrate", changed, output, checkpoint)) == 2
    line = _refusal(capsys)
    assert f"the search state {state.path} was saved from other inputs (" in line
    assert named in line and line.endswith(
        "rerun with --fresh to discard it and start again, or give another -o"
    )
    assert main([*_argv("diffrate", changed, output, checkpoint), "--fresh"]) == 0
    assert f"--fresh: discarded the earlier search state {state.path}" in capsys.readouterr().out


def test_a_deit_augmented_diffrate_state_is_refused_for_another_worker_count(
    checkpoint, tmp_path, capsys
):
    # each loader worker draws its own augmentations, so the images change with their number
    output = tmp_path / "searched.json"
    state = SearchState.beside(output, Fingerprint.of())
    saved_inputs = {**DIFFRATE, "--epochs": "1", "--augment": "deit"}
    _save_first_epoch(saved_inputs, output, state, checkpoint)
    assert main(_argv("diffrate", {**saved_inputs, "--workers": "2"}, output, checkpoint)) == 2
    assert "workers: 0 then, 2 now" in _refusal(capsys)


def _save_first_epoch(options: dict[str, str], output, state: SearchState, checkpoint) -> None:
    """Run the search and keep its state as it was after the first epoch."""
    real_discard = SearchState.discard
    SearchState.discard = lambda self: False  # the command keeps the finished state
    try:
        assert main(_argv("diffrate", options, output, checkpoint)) == 0
    finally:
        SearchState.discard = real_discard
    output.unlink()
    assert state.path.is_file()


# random weights: --seed (default 0) draws the same ones on every run, so the search resumes
ZERO_TPRUNE = {"--target-macs": "0.7", "--limit": "16"}
ZERO_TPRUNE["--shares"] = "0,0.5,1"


def test_an_interrupted_zero_tprune_search_resumes_its_trials_to_the_same_config(
    checkpoint, tmp_path, monkeypatch, capsys
):
    whole = tmp_path / "whole.json"
    assert main(_argv("zero_tprune", ZERO_TPRUNE, whole, checkpoint)) == 0
    output = tmp_path / "searched.json"
    state = tmp_path / "searched.json.search-state.pt"
    tried = []
    real_trial = zero_tprune._trial

    def trial_until_ctrl_c(model, batches, options):
        if len(tried) == 2:
            raise KeyboardInterrupt
        tried.append(options["similarity_share"])
        return real_trial(model, batches, options)

    monkeypatch.setattr(zero_tprune, "_trial", trial_until_ctrl_c)
    assert main(_argv("zero_tprune", ZERO_TPRUNE, output, checkpoint)) == 130
    assert _refusal(capsys) == (
        f"tokcomp search zero_tprune: interrupted: the finished trials are saved in {state}; "
        "the same command resumes"
    )
    for option, value, named in [
        ("--limit", "8", "limit: 16 then, 8 now"),
        ("--target-macs", "0.6", "target_macs: 0.7 then, 0.6 now"),
    ]:
        assert main(_argv("zero_tprune", {**ZERO_TPRUNE, option: value}, output, checkpoint)) == 2
        assert named in _refusal(capsys)

    tried.clear()
    assert main(_argv("zero_tprune", ZERO_TPRUNE, output, checkpoint)) == 0
    assert tried == [1.0] and not state.exists()
    assert json.loads(output.read_text()) == json.loads(whole.read_text())


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (b"not a state", 1, "is not a readable search state (UnpicklingError)"),
        (None, 2, "was saved without a fingerprint of the inputs (by an older tokcomp)"),
    ],
)
def test_a_damaged_or_unfingerprinted_state_is_refused_in_one_line(
    checkpoint, tmp_path, capsys, content, code, message
):
    output = tmp_path / "searched.json"
    state = tmp_path / "searched.json.search-state.pt"
    if content is None:
        torch.save({"trials": []}, state)
    else:
        state.write_bytes(content)
    assert main(_argv("zero_tprune", ZERO_TPRUNE, output, checkpoint)) == code
    line = _refusal(capsys)
    assert line.startswith("tokcomp search zero_tprune: error: ") and message in line
    assert "--fresh" in line


def _fail_config_writes(monkeypatch) -> list[dict]:
    """Make every config write fail as on a full disk; the configs it was given."""
    given = []

    def no_space(config: Config, path, overwrite: bool = True) -> None:
        given.append(json.loads(json.dumps(config.to_dict())))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Config, "save", no_space)
    return given


def _count_calls(monkeypatch, module, name: str) -> list[tuple]:
    """Record each call of module.name (still made); the list of their arguments."""
    calls, real = [], getattr(module, name)

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(
    ("method", "options", "module", "work", "finished"),
    [
        ("diffrate", DIFFRATE, diffrate, "_backward", lambda saved: saved["epoch"] == 2),
        (
            "zero_tprune",
            ZERO_TPRUNE,
            zero_tprune,
            "_trial",
            lambda saved: len(saved["trials"]) == 3,
        ),
    ],
)
def test_a_search_whose_config_write_fails_keeps_its_state_and_reruns_no_work(
    checkpoint, tmp_path, monkeypatch, capsys, method, options, module, work, finished
):
    """A full disk at the end loses nothing: every epoch or trial stays saved, and the rerun
    writes the config without training or trying anything again."""
    output = tmp_path / "searched.json"
    state = tmp_path / "searched.json.search-state.pt"
    with monkeypatch.context() as failing:
        given = _fail_config_writes(failing)
        assert main(_argv(method, options, output, checkpoint)) == 1
    assert "No space left on device" in _refusal(capsys)
    assert state.is_file() and not output.exists()
    assert finished(torch.load(state, weights_only=True))

    calls = _count_calls(monkeypatch, module, work)
    assert main(_argv(method, options, output, checkpoint)) == 0
    assert calls == [] and not state.exists()
    assert json.loads(output.read_text()) == given[0]
