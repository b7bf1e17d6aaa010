"""The eval scripts refuse bad input as the `tokcomp` command does: one line on stderr that
names the option, exit code 2, before any long work (which each test replaces by a failure)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_vit
from fixtures import EVAL, eval_script
from vlm_fixtures import tiny_vlm

from tokcomp.methods import registry


def long_work(*args, **kwargs):
    raise AssertionError("the long work started before the bad input was refused")


def llava_of_depth(layers: int):
    """The tiny LLaVA cut to its first `layers` decoder layers."""
    model = tiny_vlm("llava")
    model.model.language_model.layers = model.model.language_model.layers[:layers]
    model.config.text_config.num_hidden_layers = layers
    return model


class LongLoad:
    from_pretrained = staticmethod(long_work)


def refused(script: str, argv: list[str], option: str, capsys, monkeypatch, **patched) -> str:
    """Run eval/<script>.py's main(argv) with `patched` globals; its stderr line."""
    module = eval_script(script)
    for name, value in patched.items():
        monkeypatch.setattr(module, name, value)
    with pytest.raises(SystemExit) as done:
        module.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert option in err, err
    return err


CASES = [
    ("dtype_agreement", ["--methods", "tome", "--budgets", "2"], "target_macs", {}),
    ("dtype_agreement", ["--variant", "tome:rr=1"], "rr", {}),
    ("video_question_kinds", ["--methods", "nosuch"], "--methods", {}),
    ("video_question_kinds", ["--keep", "5"], "--keep", {}),
    ("video_question_kinds", ["--clips", "0"], "--clips", {}),
    ("video_question_kinds", ["--methods", "divprune,dycoke"], "dycoke", {}),
    ("bench_methods", ["--batch-size", "0"], "--batch-size", {"benchmark": long_work}),
    ("bench_methods", ["--batch-size", "-3"], "--batch-size", {"benchmark": long_work}),
    ("bench_methods", ["--device", "tpu"], "--device", {"benchmark": long_work}),
    ("bench_methods", ["--repeats", "0"], "--repeats", {"benchmark": long_work}),
    ("bench_methods", ["--dtype", "float64"], "--dtype", {"benchmark": long_work}),
    ("bench_encoders", ["--batch-size", "0"], "--batch-size", {"run_tower": long_work}),
    ("bench_encoders", ["--device", "tpu"], "--device", {"run_tower": long_work}),
    ("probe_cpu_attention", ["--method", "nosuch"], "--method", {"median_ms": long_work}),
    ("probe_cpu_attention", ["--option", "r"], "--option", {"median_ms": long_work}),
    ("probe_cpu_attention", ["--tokens", "197,0"], "--tokens", {"median_ms": long_work}),
    ("probe_cpu_attention", ["--multiples", "32,0"], "--multiples", {"median_ms": long_work}),
    ("bench_vlm_generate", ["--batches", "0,abc"], "--batches", {"build": long_work}),
    ("bench_compile", ["--models", "nosuch"], "--models", {"benchmark": long_work}),
    ("bench_compile", ["--variant", "tome:rr=1"], "rr", {"benchmark": long_work}),
    ("bench_compile", ["--variant", "tome:r"], "--variant", {"benchmark": long_work}),
    ("bench_compile", ["--warmup", "0"], "--warmup", {"benchmark": long_work}),
    ("bench_compile", ["--force"], "--force overwrites the --json", {"benchmark": long_work}),
    ("bench_cpp_wrapper", ["--model", "nosuch"], "--model", {"compiled": long_work}),
    ("bench_cpp_wrapper", ["--variant", "tome:rr=1"], "rr", {"compiled": long_work}),
    ("bench_gpu_models", ["--dtype", "float64"], "--dtype", {"benchmark": long_work}),
    ("bench_ops", ["--shape", "1,2"], "--shape", {"run": long_work}),
    ("bench_ops", ["--ops", "dpp", "--shape", "1,2,3"], "--shape", {"run": long_work}),
    ("bench_ops", ["--ops", "tome", "--shape", "1,1,4"], "--shape", {"run": long_work}),
    ("bench_vlm", ["--layers", "0"], "--layers", {"build": long_work}),
    ("bench_vlm_methods", ["--repeats", "0"], "--repeats", {"build": long_work}),
    ("bench_vlm_methods", ["--methods", ","], "--methods", {"build": long_work}),
    (
        "bench_vlm_methods",
        ["--methods", "dart", "--layers", "1"],
        "has 1 layer: dart prunes between decoder layers and needs at least 2",
        {"build": llava_of_depth, "interleaved": long_work},
    ),
    ("bench_vlm_video", ["--tiny", "--tower", "tome:rr=1"], "rr", {"build": long_work}),
    ("bench_vlm_video", ["--tiny", "--tower", "zoo:keep=0.1"], "zoo", {"build": long_work}),
    ("probe_dinov2_attention", ["--target", "2"], "--target", {"create_model": long_work}),
    ("profile_compiled", ["--model", "nosuch"], "--model", {"runner": long_work}),
    ("profile_compiled", ["--variant", "tome:rr=1"], "rr", {"runner": long_work}),
    ("probe_selection", ["--keep-ratios", "2"], "--keep-ratios", {"create_model": long_work}),
    ("probe_attention_precision", ["--keeps", "0"], "--keeps", {"load_vlm": long_work}),
    ("probe_attention_precision", ["--images", "0"], "--images", {"load_vlm": long_work}),
]


@pytest.mark.parametrize(("script", "argv", "option", "patched"), CASES)
def test_bad_input_is_one_line_and_exit_code_2_before_the_work(
    script, argv, option, patched, capsys, monkeypatch
):
    if script == "dtype_agreement":  # a tiny model in place of the checkpoint; no data read
        argv = ["--checkpoint", "model.safetensors", "--data", "fashion-mnist", *argv]
        patched = {
            "create_model": lambda **_: tiny_vit(),
            "model_dataset": long_work,
            "compare": long_work,
        }
    if script == "video_question_kinds":
        patched = {"AutoProcessor": LongLoad, "LlavaOnevisionForConditionalGeneration": LongLoad}
    refused(script, argv, option, capsys, monkeypatch, **patched)


def test_a_malformed_config_is_refused_before_the_data(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": ')
    argv = ["--checkpoint", "m.safetensors", "--data", "fashion-mnist", "--config", str(bad)]
    patched = {"create_model": lambda **_: tiny_vit(), "model_dataset": long_work}
    err = refused("dtype_agreement", argv, str(bad), capsys, monkeypatch, **patched)
    assert "not valid JSON" in err


@pytest.mark.parametrize("script", ["bench_methods", "bench_encoders"])
def test_an_existing_json_output_needs_force(script, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rows.json"
    out.write_text("{}")
    patched = {"benchmark": long_work} if script == "bench_methods" else {"run_tower": long_work}
    err = refused(script, ["--json", str(out)], "--force", capsys, monkeypatch, **patched)
    assert "--json" in err


@pytest.mark.parametrize("script", ["bench_methods", "bench_encoders", "probe_dinov2_attention"])
def test_force_without_a_json_file_is_refused(script, capsys, monkeypatch):
    """--force overwrites the --json file; without one it was ignored without a word."""
    work = {"bench_methods": "benchmark", "bench_encoders": "run_tower"}
    long = {work.get(script, "create_model"): long_work}
    err = refused(script, ["--force"], "--force overwrites the --json", capsys, monkeypatch, **long)
    assert "give --json FILE, or drop --force" in err


def test_bench_compile_checks_its_json_folder_before_the_run(tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    argv = ["--models", "deit_small_patch16_224", "--json", str(taken)]
    err = refused("bench_compile", argv, "--json", capsys, monkeypatch, benchmark=long_work)
    assert "give a folder" in err
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "deit_small_patch16_224-float32.json").write_text("{}")
    argv = ["--models", "deit_small_patch16_224", "--json", str(tmp_path / "rows")]
    refused("bench_compile", argv, "--force", capsys, monkeypatch, benchmark=long_work)


@pytest.mark.parametrize("content", [None, '{"schedules": '])
def test_diffrate_presets_refuse_a_missing_or_malformed_file(
    content, tmp_path, capsys, monkeypatch
):
    path = tmp_path / "published.json"
    if content is not None:
        path.write_text(content)
    patched = {"write_presets": long_work}
    err = refused("make_diffrate_presets", [str(path)], str(path), capsys, monkeypatch, **patched)
    assert ("no such file" if content is None else "not valid JSON") in err


def test_probe_cpu_attention_pads_bfloat16_rows_to_each_multiple_asked_for():
    script = eval_script("probe_cpu_attention")
    calls = script.attention_calls(197, 2, 3, 8, torch.bfloat16, multiples=[32, 64])
    rows = {name: call().shape[2] for name, call in calls.items() if name.startswith("padded")}
    assert rows == {"padded to 16": 208, "padded to 32": 224, "padded to 64": 256}
    assert "padded to 16" not in script.attention_calls(197, 2, 3, 8, torch.float32, [32])


def test_bench_ops_alternates_the_order_and_pairs_the_rounds(monkeypatch):
    """The reference always ran first, and the speed-up was a ratio of medians, no spread."""
    script = eval_script("bench_ops")
    clock, order = [0.0], []
    milliseconds = {"reference": iter([2, 2, 2, 4]), "compiled": iter([1, 1, 1, 1])}

    def timed(name):
        def call():
            order.append(name)
            clock[0] += next(milliseconds[name]) / 1e3

        return call

    monkeypatch.setattr(script.time, "perf_counter", lambda: clock[0])
    reference, compiled, speedup = script.time_pair(
        timed("reference"), timed("compiled"), torch.device("cpu"), 0, 4, 1
    )
    assert order == ["reference", "compiled", "compiled", "reference"] * 2
    assert (reference.median_ms, compiled.median_ms) == pytest.approx((2.0, 1.0))
    # per-round ratios 2, 2, 2, 4: median 2, interquartile range 2 to 2.5
    assert (speedup.ratio, speedup.spread) == pytest.approx((2.0, 0.25))
    assert not speedup.trusted


def test_bench_ops_runs_the_tome_and_energy_groups_at_any_shape_given(capsys):
    argv = ["--ops", "tome", "energy", "--shape", "2,9,8", "--repeats", "1", "--warmup", "0"]
    assert eval_script("bench_ops").main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    cases = {(row[0], row[2]) for row in rows if len(row) > 2 and row[1] == "2x9x8"}
    # r up to the most a 9-token step merges with the class token protected: 4
    assert cases == {
        ("best_match", "-"),
        ("weighted_merge", "r=4"),
        ("match+argsort+merge", "r=4"),
        ("tome_step", "r=4"),
        ("energy_score", "margin=0.5"),
    }


def test_probe_selection_finds_its_checkpoint_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = eval_script("probe_selection")
    loaded = []

    def create_model(checkpoint):
        loaded.append(checkpoint)
        raise KeyboardInterrupt  # stop here: the default path is what is checked

    monkeypatch.setattr(script, "create_model", create_model)
    with pytest.raises(KeyboardInterrupt):
        script.main([])
    assert loaded == [EVAL / "models" / "vit-fmnist" / "model.safetensors"]


@pytest.mark.parametrize("script", ["dart_pivot_order", "sparsevlm_recycling"])
def test_vqa_studies_refuse_a_non_positive_limit(script, capsys, monkeypatch):
    # importing them registers a study method: keep it out of the registry of other tests
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    refused(script, ["--limit", "0"], "--limit", capsys, monkeypatch, tokcomp_main=long_work)


@pytest.mark.parametrize(
    ("script", "argv", "option"),
    [
        ("train_vit_fmnist", ["--batch-size", "0"], "--batch-size"),
        ("train_vit_fmnist", ["--init", "nope.safetensors"], "--init"),
        ("train_vlm_easyvqa", ["--epochs", "0"], "--epochs"),
        ("train_vlm_videoshapes", ["--train-clips", "0"], "--train-clips"),
        # settings that trained a model of NaNs (exit 0), or were ignored
        ("train_vit_fmnist", ["--coarse-lr", "nan"], "--coarse-lr: must be a number above 0"),
        ("train_vit_fmnist", ["--lr=-1e-3"], "--lr: must be a number above 0"),
        ("train_vit_fmnist", ["--min-lr", "-0.5"], "--min-lr: must be a number of at least 0"),
        ("train_vit_fmnist", ["--min-lr", "0.01"], "--min-lr 0.01 is above a peak learning"),
        ("train_vit_fmnist", ["--drop-path", "1.5"], "--drop-path: must be a number in [0, 1]"),
        (
            "train_vit_fmnist",
            ["--coarse-epochs", "0", "--coarse-lr", "0.01"],
            "--coarse-lr has no effect without --coarse-epochs above 0",
        ),
        (
            "train_vit_fmnist",
            ["--foreground-threshold", "30"],
            "--foreground-threshold has no effect without --token-label-weight",
        ),
        ("train_vlm_easyvqa", ["--warmup", "7"], "--warmup: must be a number in [0, 1]"),
        ("train_vlm_easyvqa", ["--drop-visual", "-3"], "--drop-visual: must be a number in"),
        ("train_vlm_easyvqa", ["--probe-weight", "nan"], "--probe-weight: must be a number"),
        ("train_vlm_easyvqa", ["--clip-grad", "0"], "--clip-grad: must be a number above 0"),
        (
            "train_vlm_easyvqa",
            ["--min-visual", "8"],
            "--min-visual has no effect without --drop-visual",
        ),
        ("train_vlm_videoshapes", ["--lr", "inf"], "--lr: must be a number above 0"),
        # widths the heads do not divide (a traceback from timm or transformers)
        ("train_vit_fmnist", ["--embed-dim", "100"], "--embed-dim 100 is not a multiple of"),
        ("train_vlm_easyvqa", ["--vision-width", "130"], "--vision-width 130 is not a"),
        ("train_vlm_videoshapes", ["--heads", "5"], "--vision-width 128 is not a multiple"),
        ("train_vlm_videoshapes", ["--text-width", "190"], "--text-width 190 is not a"),
    ],
)
def test_training_scripts_refuse_settings_that_cannot_train(script, argv, option, capsys):
    with pytest.raises(SystemExit) as done:
        eval_script(script).parse_args(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and option in err, err


def test_refresh_preset_macs_rewrites_stale_macs_and_leaves_current_ones(tmp_path, capsys):
    for folder, name in (
        ("deit_tiny_patch16_224", "diffrate-0.6g.json"),
        ("vit-fmnist", "zero_tprune-0.5.json"),
    ):
        (tmp_path / folder).mkdir()
        shutil.copy(EVAL.parent / "configs" / folder / name, tmp_path / folder / name)
    stale = tmp_path / "deit_tiny_patch16_224" / "diffrate-0.6g.json"
    current = json.loads(stale.read_text())
    stale.write_text(json.dumps({**current, "macs": current["macs"] + 1, "base_macs": 1}))
    eval_script("refresh_preset_macs").main(["--configs", str(tmp_path)])
    said = capsys.readouterr().out.splitlines()
    assert said == [
        f"{stale}: updated",
        f"{tmp_path / 'vit-fmnist' / 'zero_tprune-0.5.json'}: unchanged",
    ]
    refreshed = json.loads(stale.read_text())
    assert (refreshed["macs"], refreshed["base_macs"]) == (current["macs"], current["base_macs"])


def test_dart_pivot_order_passes_on_a_failed_sweep_without_blaming_saved_results(
    capsys, monkeypatch
):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # as above
    module = eval_script("dart_pivot_order")
    monkeypatch.setattr(module, "tokcomp_main", lambda argv: 2)  # the sweep refused its input
    assert module.main(["--budgets", "abc"]) == 2
    assert "no DART selection ran" not in capsys.readouterr().out


def test_dart_pivot_order_counts_each_selection_once_and_says_when_none_ran(tmp_path):
    """The sweep's memory and speed probes select again on its first batch: 3 questions are 3
    selections. A rerun reuses the saved results and runs none. (A subprocess: the script
    registers a method.)"""
    argv = ["--limit", "3", "--budgets", "0.4375", "--output", str(tmp_path / "sweep")]

    def run() -> str:
        script = [sys.executable, str(EVAL / "dart_pivot_order.py"), *argv]
        done = subprocess.run(script, capture_output=True, text=True, timeout=600, check=True)
        return done.stdout

    assert "keep 28: mean Jaccard of the kept sets" in (first := run())
    assert " over 3 selections " in first
    assert "no DART selection ran: the sweep reused the results saved in" in run()


#: Every eval script with a command line (a `main`).
SCRIPTS = sorted(path.stem for path in EVAL.glob("*.py") if "def main(" in path.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_an_unknown_option_in_one_line(script, capsys, monkeypatch):
    """Before any work: a script that read no command line ran in full, ignoring it."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # studies register
    with pytest.raises(SystemExit) as done:
        eval_script(script).main(["--no-such-option"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and " error: " in err, err
