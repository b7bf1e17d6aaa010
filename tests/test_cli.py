"""The `tokcomp` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pytest
import timm
import torch
from fixtures.imagenet import save_pth, save_safetensors, write_images
from tqdm import tqdm
from vlm_fixtures import tiny_vlm

import tokcomp
from tokcomp import cli
from tokcomp.bench import parse_variant
from tokcomp.cli import main
from tokcomp.errors import UsageError
from tokcomp.harness.vqa import DEFAULT_MODEL as DEFAULT_VLM
from tokcomp.harness.vqa import VIDEO_MODEL, load_vlm
from tokcomp.models import create_model


def test_parse_variant_reads_json_values_and_lists():
    variant = parse_variant("tome:r=[3,2,1],prop_attn=false,inflection=-1")
    assert variant.method == "tome"
    assert variant.options == {"r": [3, 2, 1], "prop_attn": False, "inflection": -1}
    assert parse_variant("tome").options == {}
    python = parse_variant("tome:r=2,prop_attn=False,trace_source=True,inflection=None")
    assert python.options == {"r": 2, "prop_attn": False, "trace_source": True, "inflection": None}


def test_parse_variant_reads_a_mapping_whole():
    variant = parse_variant('fastv:keep=0.1,tower=tome,tower_options={"r":4,"inflection":-1}')
    assert variant.options == {
        "keep": 0.1,
        "tower": "tome",
        "tower_options": {"r": 4, "inflection": -1},
    }


def test_parse_variant_refuses_an_option_given_twice():
    """tome:r=4,r=5 kept the last silently."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"option r is given twice"):
        parse_variant("tome:r=4,r=5")


def test_parse_variant_refuses_a_variant_naming_no_method():
    """:r=3 went on to be read as a config path, '.', once the model had loaded."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"':r=3' names no method"):
        parse_variant(":r=3")


def test_the_offline_pretrained_model_is_a_model_bench_export_and_search_take(tmp_path):
    """`make bench-dinov2` runs tokcomp bench --model dinov2_vits14 (it was refused as an
    unknown timm model)."""
    out = tmp_path / "dinov2-tome.json"
    assert main(["export", "--model", "dinov2_vits14", "tome:r=4", "-o", str(out)]) == 0
    assert tokcomp.Config.load(out).model["name"] == "vit_small_patch14_dinov2"


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path, capsys):
    model = tokcomp.apply(timm.create_model("test_vit"), "tome", r=2)
    path = tokcomp.config_of(model).save(tmp_path / "tome.json")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Windows Notepad saves UTF-8
    assert tokcomp.Config.load(path) == tokcomp.config_of(model)


def test_export_then_show(tmp_path, capsys):
    path = tmp_path / "configs" / "deit-tome.json"  # its folder is made
    assert main(["export", "--model", "deit_tiny_patch16_224", "tome:r=13", "-o", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["method"] == "tome"
    assert data["options"] == {
        "prop_attn": True,
        "trace_source": False,
        "r": 13,
        "inflection": None,
    }
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "schedule  [184, 171" in out and "tome" in out
    config = tokcomp.Config.load(path)
    assert 0 < config.selection_macs < config.macs
    assert f"{config.selection_share:.1%} of it the method's own work" in out


def test_export_then_show_a_vlm_config_with_tower_merging(tmp_path, capsys):
    path = tmp_path / "fastv-tome.json"
    variant = 'fastv:keep=0.25,tower=tome,tower_options={"r":4,"inflection":-1}'
    argv = ["export", "--vlm", str(VIDEO_MODEL), variant, "-o", str(path)]
    assert main(argv) == 0
    assert tokcomp.Config.load(path).tower == {
        "method": "tome",
        "options": {"prop_attn": True, "trace_source": False, "r": 4, "inflection": -1},
    }
    assert main(["show", str(path)]) == 0
    tower = '{"prop_attn": true, "trace_source": false, "r": 4, "inflection": -1}'
    assert f"tower     tome {tower}" in capsys.readouterr().out


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    argv = ["bench", "--model", "deit_tiny_patch16_224", "--variant", "tome:r=13"]
    argv += ["--batch-size", "1", "--warmup", "1", "--repeats", "1", "--json", str(out_json)]
    assert main(argv) == 0
    assert "tome r=13" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["label"] for r in rows] == ["unpruned", "tome r=13"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "--model", "deit_tiny_patch16_224", "tomme", "-o", "x.json"], "unknown method"),
        (["show", "missing.json"], "no such config file"),
        (["export", "tome:r=1", "-o", "x.json"], "give a model: a timm model name (--model)"),
        (["export", "--checkpoint", "nope.pth", "tome:r=1", "-o", "x.json"], "does not exist"),
        (["bench", "--checkpoint", "nope.pth", "--variant", "tome:r=1"], "does not exist"),
    ],
)
def test_errors_are_reported_without_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# -- one line for every bad input -------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with a 3-class 32 px checkpoint, damaged copies of it, and an image folder."""
    root = tmp_path_factory.mktemp("inputs")
    kwargs = {"img_size": 32, "patch_size": 4, "num_classes": 3}
    model = timm.create_model("test_vit", **kwargs)
    data_config = {"input_size": [3, 32, 32], "crop_pct": 1.0}
    good = root / "good.safetensors"
    save_safetensors(
        model, good, timm_model="test_vit", model_kwargs=kwargs, data_config=data_config
    )
    content = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(content[: len(content) // 2])
    (root / "garbage.safetensors").write_bytes(b"not a checkpoint" * 8)
    pth = save_pth(model, root / "good.pth").read_bytes()
    (root / "truncated.pth").write_bytes(pth[: len(pth) // 2])
    torch.save({"model": model.state_dict(), "path": Path("x")}, root / "objects.pth")
    (root / "not-a-folder").write_text("")
    (root / "latin1.json").write_bytes(b'{"method": "tom\xe9"}')
    (root / "bad.yaml").write_text("method: tome\n  options: [\n")
    write_images(root / "data", {"cat": 2, "dog": 2, "emu": 2}, size=8)  # the 3 classes
    return root


EVAL = "eval imagenet --data {root}/data --workers 0 --output {root}/out"
CHECKPOINT_FIX = "save the weights where the model was made, with torch.save(model.state_dict()"


@pytest.mark.parametrize(
    ("command", "code", "expected"),
    [
        (f"{EVAL} --checkpoint {{root}}/truncated.safetensors", 2, "cannot be read (Safetensor"),
        (f"{EVAL} --checkpoint {{root}}/garbage.safetensors", 2, "cannot be read (Safetensor"),
        (f"{EVAL} --model test_vit --checkpoint {{root}}/truncated.pth", 2, "cannot be read ("),
        (f"{EVAL} --model test_vit --checkpoint {{root}}/objects.pth", 2, "besides tensors"),
        (
            f"{EVAL} --model test_vit --checkpoint {{root}}/good.pth",
            2,
            "does not fit model test_vit: pos_embed is [1, 65, 64] there but [1, 101, 64] in",
        ),
        (f"{EVAL} --model vit_nope --checkpoint {{root}}/good.pth", 2, "unknown timm model"),
        (
            f"{EVAL} --model vit_tiny_patch16_224 --checkpoint {{root}}/good.safetensors",
            2,
            "good.safetensors holds timm model test_vit, not vit_tiny_patch16_224: drop --model",
        ),
        ("export --model test_vit tome:target_macs=0.6,r=5 -o {root}/x.json", 2, "or r, not"),
        ("bench --model test_vit --force", 2, "--force overwrites the --json file; give --json"),
        ("export --model test_vit tome:schedule=[9,8],r=5 -o {root}/x.json", 2, "or r, not both"),
        (
            "export --model test_vit tome:r=2,prop_attn=maybe -o {root}/x.json",
            2,
            "tome: prop_attn='maybe', but its prop_attn takes bool",
        ),
        (
            "export --model test_vit zero_tprune:iterations=-1 -o {root}/x.json",
            2,
            "zero_tprune: iterations=-1, but its iterations takes list of int or none",
        ),
        ("bench --model test_vit --variant tome:r", 2, "option 'r' must look like key=value"),
        (
            f"{EVAL} --checkpoint {{root}}/good.safetensors --config {{root}}/none.json",
            2,
            "argument --config: {root}/none.json: no such config file",
        ),
        (
            f"{EVAL} --checkpoint {{root}}/good.safetensors --config {{root}}/data",
            2,
            "argument --config: {root}/data is a folder; give a config file in it",
        ),
        (
            "export --model test_vit tome:r=2 -o {root}/latin1.json/x.json",
            2,
            "-o {root}/latin1.json/x.json: {root}/latin1.json is a file, not a folder",
        ),
        (
            "export --model test_vit pitome:keep_ratio=0.9,bsm_layers=[99] -o {root}/x.json",
            2,
            "pitome: bsm_layers [99] must be block indices in 0..",
        ),
        (
            "export --model test_vit evit:keep_ratio=0.7,layers=[] -o {root}/x.json",
            2,
            "evit: layers [] reduces at no block; name at least one",
        ),
        (
            "export --model test_vit tome:r=4,inflection=3 -o {root}/x.json",
            2,
            "tome: inflection is in [-1, 1]",
        ),
        (
            "export --model test_vit pitome:keep_ratio=0.9,margin=NaN -o {root}/x.json",
            2,
            "pitome: margin must be a finite number, got nan",
        ),
        (
            "export --model test_vit zero_tprune:layers=[1,1] -o {root}/x.json",
            2,
            "zero_tprune: layers [1, 1] names a block twice",
        ),
        (f"{EVAL} --model test_vit --checkpoint {{root}}/data", 2, "data is a folder; give the"),
        ("show {root}/data", 2, "data is a folder; give a config file in it"),
        (
            "eval imagenet --data {root}/latin1.json --checkpoint {root}/good.safetensors",
            2,
            "--data {root}/latin1.json is a file; images are read from a folder of class folders",
        ),
        ("show {root}/bad.yaml", 2, "bad.yaml: not valid YAML: mapping values are not allowed"),
        (f"{EVAL} --checkpoint {{root}}/good.safetensors --threads -1", 2, "positive whole"),
        (f"{EVAL} --checkpoint {{root}}/good.safetensors --workers -2", 2, "must be 0 or more"),
        (f"{EVAL} --checkpoint {{root}}/good.safetensors --budgets 0.5,x", 2, "comma-separated"),
        (f"{EVAL} --checkpoint {{root}}/good.safetensors --device tpu", 2, "unknown device 'tpu'"),
        ("bench --model test_vit --repeats 0", 2, "argument --repeats: must be a positive whole"),
        (
            "eval imagenet --data {root}/data --checkpoint {root}/good.safetensors "
            "--output {root}/not-a-folder",
            2,
            "--output {root}/not-a-folder is a file; results go in a folder",
        ),
        ("show {root}/latin1.json", 2, "latin1.json: not UTF-8 text (byte 15"),
        ("eval vqa --data fashion-mnist --model {root}", 2, "expected easy-vqa, video-shapes, a"),
    ],
)
def test_a_bad_input_ends_in_one_line_naming_it(files, capsys, command, code, expected):
    argv = shlex.split(command.format(root=files))
    assert main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected.format(root=files) in lines[0], lines
    assert "weights_only=False" not in lines[0]


def test_a_head_for_other_classes_names_the_head_and_the_fix(files, capsys):
    argv = ["export", "--model", "test_vit", "--checkpoint", str(files / "good.pth"), "tome:r=1"]
    timm_default = main([*argv, "-o", str(files / "x.json")])
    assert timm_default == 2
    line = capsys.readouterr().err.strip()
    assert "does not fit model test_vit" in line and "give the --model it was trained as" in line
    with pytest.raises(UsageError, match=r"head.weight is \[3, 64\] there but \[10, 64\]"):
        create_model("test_vit", files / "good.pth", img_size=32, patch_size=4, num_classes=10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused(capsys):
    assert main(["bench", "--model", "test_vit", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible here" in capsys.readouterr().err


def test_export_writes_a_vlm_config_that_applies_to_the_vlm(tmp_path, capsys):
    path = tmp_path / "zoo.json"
    argv = ["export", "--vlm", str(DEFAULT_VLM), "zoo:keep=8", "-o", str(path)]
    assert main(argv) == 0
    model, _ = load_vlm(DEFAULT_VLM)
    config = tokcomp.config_of(tokcomp.apply(model, path))
    assert config.method == "zoo" and config.options["keep"] == 8
    assert (
        main([*argv[:-2], "--model", "deit_tiny_patch16_224", "-o", str(tmp_path / "x.json")]) == 2
    )
    assert "--vlm replaces --model and --checkpoint" in capsys.readouterr().err


def test_export_refuses_to_overwrite_without_force(tmp_path, capsys):
    path = tmp_path / "tome.json"
    argv = ["export", "--model", "deit_tiny_patch16_224", "tome:r=13", "-o", str(path)]
    assert main(argv) == 0
    path.write_text("my edits")
    assert main(argv) == 2
    assert f"-o {path} exists; pass --force to overwrite it" in capsys.readouterr().err
    assert path.read_text() == "my edits"
    assert main([*argv, "--force"]) == 0 and json.loads(path.read_text())["options"]["r"] == 13


def test_bench_refuses_to_overwrite_its_json_without_force(tmp_path, monkeypatch, capsys):
    path = tmp_path / "bench.json"
    path.write_text("an earlier run")
    argv = ["bench", "--model", "test_vit", "--batch-size", "1", "--warmup", "0", "--repeats", "1"]
    argv += ["--json", str(path)]
    real_benchmark = cli.benchmark
    monkeypatch.setattr(cli, "benchmark", lambda *_: pytest.fail("benchmarked before the check"))
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tokcomp bench: error: --json {path} exists; pass --force to overwrite it, or give "
        "another file name"
    ]
    assert path.read_text() == "an earlier run"
    monkeypatch.setattr(cli, "benchmark", real_benchmark)
    assert main([*argv, "--force"]) == 0
    assert [row["label"] for row in json.loads(path.read_text())["rows"]] == ["unpruned"]


def test_an_error_s_line_starts_after_a_progress_bar_left_open(monkeypatch, capsys):
    """Ctrl-C can land while a bar is being made, before any `with` around it closes it."""
    open_bars = []

    def interrupted(*_):
        open_bars.append(tqdm(range(3), "[2/7] tome", file=sys.stderr))  # drawn, not closed
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "benchmark", interrupted)
    assert main(["bench", "--model", "test_vit", "--warmup", "0", "--repeats", "1"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "tokcomp bench: interrupted"


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (KeyboardInterrupt(), 130, "tokcomp bench: interrupted"),
        (
            RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"),
            1,
            "tokcomp bench: error: CUDA out of memory. ... (RuntimeError; --debug shows the "
            "traceback)",
        ),
        (UsageError("the fix"), 2, "tokcomp bench: error: the fix"),
    ],
)
def test_the_handler_maps_errors_to_one_line_and_debug_shows_the_traceback(
    monkeypatch, capsys, raised, code, line
):
    def fail(*_):
        raise raised

    monkeypatch.setattr(cli, "benchmark", fail)
    argv = ["bench", "--model", "test_vit", "--warmup", "0", "--repeats", "1"]
    assert main(argv) == code
    assert capsys.readouterr().err.strip().splitlines() == [line]
    with pytest.raises(type(raised)):
        main([*argv, "--debug"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "benchmark", lambda *_: None.missing)
    with pytest.raises(AttributeError):
        main(["bench", "--model", "test_vit"])


def test_bench_of_a_checkpoint_names_it_in_its_json(files, tmp_path):
    out_json = tmp_path / "bench.json"
    argv = ["bench", "--checkpoint", str(files / "good.safetensors"), "--batch-size", "1"]
    assert main([*argv, "--warmup", "0", "--repeats", "1", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["model"] == str(files / "good.safetensors")


def test_show_states_a_reference_video_config_and_the_vlm_architecture(tmp_path, capsys):
    model = tokcomp.apply(tiny_vlm("llava_onevision_video"), "fastv", keep=0.5)
    image = tokcomp.config_of(model).save(tmp_path / "image.json")
    video = tokcomp.config_of(model, frames=4).save(tmp_path / "video.json")
    frame = tokcomp.config_of(model, frames=1).save(tmp_path / "frame.json")
    assert all(main(["show", str(path)]) == 0 for path in (image, video, frame))
    lines = capsys.readouterr().out.splitlines()
    architecture = f"(hf_vlm, {type(model).__name__})"
    models = [line for line in lines if line.startswith("model")]
    assert [line.endswith(architecture) for line in models] == [True] * 3
    macs = [line for line in lines if line.startswith("MACs")]
    assert "per reference video" not in macs[0]
    assert "per reference video (model.frames=4: for reports, not to apply)" in macs[1]
    assert "per reference video (model.frames=1: for reports, not to apply)" in macs[2]


def test_show_states_a_video_config_that_does_not_record_its_frames(tmp_path, capsys):
    """A config edited to model.video without model.frames showed a KeyError traceback."""
    model = tokcomp.apply(tiny_vlm("llava_onevision_video"), "fastv", keep=0.5)
    data = tokcomp.config_of(model, frames=4).to_dict()
    del data["model"]["frames"]
    path = tmp_path / "video.json"
    path.write_text(json.dumps(data))
    assert main(["show", str(path)]) == 0
    assert "per reference video (for reports, not to apply)" in capsys.readouterr().out


def test_a_warning_is_one_line_naming_its_category(tmp_path, capsys):
    """tokcomp export of a method without options (it compresses nothing) printed Python's
    two-line warning with tokcomp's file and line."""
    path = tmp_path / "none.json"
    assert main(["export", "--model", "test_vit", "tome", "-o", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: tokcomp.apply(model, 'tome') without options compresses")
    assert err.endswith("(UserWarning)\n") and err.count("\n") == 1
