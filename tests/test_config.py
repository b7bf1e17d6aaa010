"""Config files that contradict themselves or hold the wrong kinds of values are refused with
one line naming the file, the field and the fix; a config made for an explicit schedule
still applies."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_vit

import tokcomp
from tokcomp.config import ConfigError


def _saved(tmp_path, method: str = "tome", **options) -> dict:
    model = tokcomp.apply(tiny_vit("vit"), method, **options)
    return tokcomp.config_of(model).to_dict()


def _write(tmp_path, data: dict, name: str = "edited.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=0), r"'version' must be a positive int"),
        (lambda d: d.update(version=-2), r"'version' must be a positive int"),
        (lambda d: d["options"].update(target_macs=True), r"options\.target_macs cannot be"),
        (lambda d: d["options"].update(target_macs="0.5"), r"options\.target_macs cannot be"),
        (lambda d: d["options"].update(schedule=d["schedule"]), r"options\.schedule cannot be"),
        (lambda d: d["options"].update(r=True), r"options\.r is True, but tome's r takes int"),
        (lambda d: d["options"].update(inflection="x"), r"options\.inflection is 'x'"),
    ],
)
def test_options_of_the_wrong_kind_are_refused_on_load(tmp_path, edit, message):
    data = _saved(tmp_path, r=2)
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        tokcomp.Config.load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(macs=d["macs"] - 1000), r"macs is \d+, but this model costs \d+ MACs"),
        (lambda d: d.update(base_macs=d["base_macs"] + 1), r"base_macs is \d+, .* unpruned"),
        (lambda d: d["options"].update(r=3), r"options r=3 give the schedule \[62, 59, 56, 53\]"),
        (lambda d: d.update(schedule=d["schedule"][:-1]), "schedule has 3 entries"),
    ],
)
def test_a_hand_edited_config_that_contradicts_its_schedule_is_refused_on_apply(
    tmp_path, edit, message
):
    data = _saved(tmp_path, r=2)
    edit(data)
    path = _write(tmp_path, data)
    tokcomp.Config.load(path)  # nothing to see without the model
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        tokcomp.apply(tiny_vit("vit"), path)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("tome", {"schedule": [60, 55, 50, 45]}),
        ("evit", {"schedule": [65, 40, 40, 30], "layers": [1, 3]}),
        ("pitome", {"keep_ratio": 0.8}),
        ("zero_tprune", {"target_macs": 0.6}),
    ],
)
def test_every_config_tokcomp_writes_passes_the_checks(tmp_path, method, options):
    path = _write(tmp_path, _saved(tmp_path, method, **options))
    applied = tokcomp.config_of(tokcomp.apply(tiny_vit("vit"), path))
    assert applied.schedule == tokcomp.Config.load(path).schedule


def test_a_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(_saved(tmp_path, r=2)).replace("tome", "tomé").encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{path}: not UTF-8 text .*save it as UTF-8"):
        tokcomp.Config.load(path)


def test_a_config_made_with_a_classification_head_applies_to_the_headless_backbone(tmp_path):
    with_head = tokcomp.apply(tiny_vit("vit", num_classes=10), "tome", r=2)
    data = tokcomp.config_of(with_head).to_dict()
    path = _write(tmp_path, data)
    backbone = tiny_vit("vit", num_classes=0)
    applied = tokcomp.config_of(tokcomp.apply(backbone, path))
    assert data["model"]["head_macs"] - applied.model["head_macs"] == 10 * 48
    assert applied.schedule == data["schedule"]
    assert applied.macs == data["macs"] - 10 * 48  # priced for the model it runs on
    data["macs"] -= 1000
    with pytest.raises(ConfigError, match=r"macs is \d+, but this model costs \d+ MACs"):
        tokcomp.apply(backbone, _write(tmp_path, data, "edited.json"))
