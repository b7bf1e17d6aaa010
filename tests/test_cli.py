"""The `tokcomp` command line."""

from __future__ import annotations

import json

import pytest

from tokcomp.bench import parse_variant
from tokcomp.cli import main


def test_parse_variant_reads_json_values_and_lists():
    variant = parse_variant("tome:r=[3,2,1],prop_attn=false,inflection=-1")
    assert variant.method == "tome"
    assert variant.options == {"r": [3, 2, 1], "prop_attn": False, "inflection": -1}
    assert parse_variant("tome").options == {}


def test_export_then_show(tmp_path, capsys):
    path = tmp_path / "deit-tome.json"
    assert main(["export", "--model", "deit_tiny_patch16_224", "tome:r=13", "-o", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["method"] == "tome" and data["options"] == {"r": 13}
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "schedule  [184, 171" in out and "tome" in out


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
        (["export", "tome:r=1", "-o", "x.json"], "give a model name"),
    ],
)
def test_errors_are_reported_without_a_traceback(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
