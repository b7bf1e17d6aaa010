"""Config files that contradict themselves or hold the wrong kinds of values are refused with
one line naming the file, the field and the fix; a config made for an explicit schedule
still applies."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TIMM_VARIANTS, tiny_vit
from method_options import middle
from torch import nn
from vlm_fixtures import tiny_vlm

import tokcomp
from tokcomp.config import Config, ConfigError
from tokcomp.methods import method_class, option_names


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
        (
            lambda d: d["options"].update(rr=3),
            r"options has 'rr', which tome does not take: remove",
        ),
        (lambda d: d["options"].update(r=-1), r"options: tome: r must be a non-negative int"),
        (lambda d: d["options"].update(keep_ratio=0.8), r"options has 'keep_ratio', which tome"),
        (
            lambda d: d.update(tower={"method": "tome", "options": {"r": 2, "ratio": 1}}),
            r"tower\.options has 'ratio', which tome does not take",
        ),
        (lambda d: d.update(selection_macs="5"), r"'selection_macs' must be a non-negative int"),
        (lambda d: d.update(selection_macs=-1), r"'selection_macs' must be a non-negative int"),
        (
            lambda d: d["model"].update(head_macs="480"),
            r"model\.head_macs must be an int, got '480'",
        ),
        (lambda d: d["model"].update(tokens="65"), r"model\.tokens must be an int, got '65'"),
        (lambda d: d["model"].update(protected=True), r"model\.protected must be an int, got True"),
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


def test_a_config_saved_before_selection_macs_were_counted_still_applies(tmp_path):
    """Such configs load with selection_macs 0 and macs without them (docs/methods.md); a
    hand edit of macs is still refused."""
    data = _saved(tmp_path, r=2)
    selection = data.pop("selection_macs")
    assert selection > 0
    data["macs"] -= selection
    model = tokcomp.apply(tiny_vit("vit"), _write(tmp_path, data))
    assert tokcomp.config_of(model).selection_macs == selection
    data["macs"] -= 1
    with pytest.raises(ConfigError, match="macs is"):
        tokcomp.apply(tiny_vit("vit"), _write(tmp_path, data))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("tome", {"schedule": [60, 55, 50, 45]}),
        ("evit", {"schedule": [65, 40, 40, 30]}),
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


@pytest.mark.parametrize("method", tokcomp.methods("vision"))
def test_a_config_states_every_option_it_ran_with(method):
    """Defaults included, so that a saved config runs the same after a default changes; only
    a budget knob left at its default beside an explicit schedule is left out (it had no part
    in the schedule)."""
    names = set(option_names(method_class(method))) - {"schedule", "target_macs"}
    for options in _vision_options(method):
        options = {"target_macs": 0.7} if "target_macs" in options else options  # reachable
        config = tokcomp.config_of(tokcomp.apply(tiny_vit(), method, **options))
        knob = method_class(method).budget
        left_out = {knob} if "schedule" in options and knob not in options else set()
        assert set(config.options) == names - left_out, options


def _vision_options(method: str) -> list[dict]:
    """Option sets of `method` on the tiny ViTs: a middle budget, a target_macs low enough
    that ToMe's r is clipped at the last blocks, and an explicit schedule."""
    if method == "diffrate":
        return [middle(method, 65, 4)]
    return [middle(method, 65, 4), {"target_macs": 0.45}, {"schedule": [60, 55, 50, 45]}]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("method", tokcomp.methods("vision"))
@torch.no_grad()
def test_every_vision_config_reloads_to_the_same_config_and_outputs(tmp_path, method, suffix):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for variant in sorted(TIMM_VARIANTS):
        for number, options in enumerate(_vision_options(method)):
            model = _applied_where_admitted(method, variant, options)
            if model is None:
                continue
            config = tokcomp.config_of(model)
            path = config.save(tmp_path / f"{variant}-{number}{suffix}")
            assert tokcomp.Config.load(path) == config
            other = tokcomp.apply(tiny_vit(variant), path)
            assert tokcomp.config_of(other) == config, (variant, options)
            assert torch.equal(other(images), model(images)), (variant, options)


def _applied_where_admitted(method: str, variant: str, options: dict) -> nn.Module | None:
    """`method` with `options` on tiny ViT `variant`; a target_macs the method cannot reach
    there is raised to 0.7; None for DiffRate's counts that the variant's tokens do not admit."""
    try:
        return tokcomp.apply(tiny_vit(variant), method, **options)
    except ValueError as err:
        if method == "diffrate":
            return None
        if "target_macs" not in options or "cannot reach target_macs" not in str(err):
            raise
    return tokcomp.apply(tiny_vit(variant), method, target_macs=0.7)


@pytest.mark.parametrize("variant", ["vit", "registers"])
@pytest.mark.parametrize("target", [0.45, 0.6])
def test_a_target_macs_config_states_the_merges_it_makes(tmp_path, variant, target):
    config = tokcomp.config_of(tokcomp.apply(tiny_vit(variant), "tome", target_macs=target))
    by_options = tokcomp.config_of(tokcomp.apply(tiny_vit(variant), "tome", **config.options))
    assert by_options == config
    path = config.save(tmp_path / "target.json")
    assert tokcomp.config_of(tokcomp.apply(tiny_vit(variant), path)) == config


@pytest.mark.parametrize("frames", [1, 4])
def test_a_config_of_a_reference_video_is_refused_with_what_to_export(tmp_path, frames):
    family = "llava_onevision_video"
    model = tokcomp.apply(tiny_vlm(family), "fastv", keep=0.5)
    path = tokcomp.config_of(model, frames=frames).save(tmp_path / "video.json")
    with pytest.raises(ConfigError, match=rf"^{path} holds .* reference video \(model\.video"):
        tokcomp.apply(tiny_vlm(family), path)
    image = tokcomp.config_of(model).save(tmp_path / "image.json")
    assert tokcomp.config_of(tokcomp.apply(tiny_vlm(family), image)).schedule == (
        tokcomp.config_of(model).schedule
    )


def test_a_video_config_saved_before_model_video_is_known_by_its_frames(tmp_path):
    model = tokcomp.apply(tiny_vlm("llava_onevision_video"), "fastv", keep=0.5)
    data = tokcomp.config_of(model, frames=4).to_dict()
    del data["model"]["video"]
    assert Config.from_dict(data).on_video
    del data["model"]["frames"]
    assert not Config.from_dict(data).on_video


@torch.no_grad()
def test_a_config_applies_to_any_model_of_its_shape_whatever_its_name_and_weights(tmp_path):
    """docs/methods.md section 8: model.name is informational."""
    data = _saved(tmp_path, r=2)
    data["model"]["name"] = "another_model_of_the_same_shape"
    other = tokcomp.apply(tiny_vit("vit", seed=1), _write(tmp_path, data))
    by_name = tokcomp.apply(tiny_vit("vit", seed=1), "tome", r=2)
    assert tokcomp.config_of(other) == tokcomp.config_of(by_name)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(other(images), by_name(images))


@pytest.mark.parametrize(
    ("method", "given", "plain"),
    [
        ("evit", {"keep_ratio": 0.7, "layers": (1, 3)}, {"keep_ratio": 0.7, "layers": [1, 3]}),
        (
            "random",
            {"keep_ratio": 0.8, "layers": range(1, 3)},
            {"keep_ratio": 0.8, "layers": [1, 2]},
        ),
        ("zero_tprune", {"variance_band": (0.01, 0.5)}, {"variance_band": [0.01, 0.5]}),
        ("pitome", {"keep_ratio": np.float64(0.9)}, {"keep_ratio": 0.9}),
        ("evit", {"layers": [np.int64(1), 3]}, {"layers": [1, 3]}),
    ],
)
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@torch.no_grad()
def test_options_given_as_tuples_ranges_or_numpy_numbers_save_and_reload_equal(
    tmp_path, method, given, plain, suffix
):
    model = tokcomp.apply(tiny_vit("vit"), method, **given)
    config = tokcomp.config_of(model)
    assert config == tokcomp.config_of(tokcomp.apply(tiny_vit("vit"), method, **plain))
    path = config.save(tmp_path / f"config{suffix}")
    assert tokcomp.Config.load(path) == config
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokcomp.apply(tiny_vit("vit"), path)(images), model(images))


def test_save_refuses_a_file_that_appeared_unless_asked_and_never_leaves_half_a_file(
    tmp_path, monkeypatch
):
    """A search checks -o at its start and writes at its end: a file made meanwhile was
    replaced without --force; and a write interrupted halfway left a truncated config."""
    config = tokcomp.config_of(tokcomp.apply(tiny_vit(), "tome", r=2))
    path = tmp_path / "tome.json"
    path.write_text("another run's config")
    with pytest.raises(ConfigError, match=r"tome\.json exists: .* overwrite=True in Config\.save"):
        config.save(path)
    assert path.read_text() == "another run's config" and list(tmp_path.iterdir()) == [path]

    def half_then_interrupted(self, text, *args, **kwargs):
        with open(self, "w") as file:
            file.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(type(path), "write_text", half_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            config.save(path)
    assert path.read_text() == "another run's config" and list(tmp_path.iterdir()) == [path]
    assert Config.load(config.save(path, overwrite=True)) == config


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_key_given_twice_is_refused_not_the_last_one_taken(tmp_path, suffix):
    config = tokcomp.config_of(tokcomp.apply(tiny_vit(), "tome", r=2))
    saved = config.save(tmp_path / f"tome{suffix}")
    assert Config.load(saved) == config
    text = saved.read_text()
    if suffix == ".json":
        text = text.replace('"r": 2', '"r": 2, "r": 3')
    else:
        text = text.replace("  r: 2\n", "  r: 2\n  r: 3\n")
    edited = tmp_path / f"edited{suffix}"
    edited.write_text(text)
    with pytest.raises(ConfigError, match=r"edited\.\w+: key 'r' is given twice; keep one"):
        Config.load(edited)


def test_save_refuses_a_folder_or_a_file_in_the_way_in_one_line(tmp_path):
    config = tokcomp.config_of(tokcomp.apply(tiny_vit(), "tome", r=2))
    (tmp_path / "taken.json").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(ConfigError, match=r"taken\.json is a folder; give a config file name"):
        config.save(tmp_path / "taken.json", overwrite=True)
    with pytest.raises(ConfigError, match=r"notes\.txt is a file, not a folder; save elsewhere"):
        config.save(tmp_path / "notes.txt" / "sub" / "tome.json")
    assert (tmp_path / "notes.txt").read_text() == "a file"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda config: {"version": 99}, "config version 99 is newer"),
        (lambda config: {"macs": float(config.macs)}, "'macs' must be a positive int"),
        (lambda config: {"schedule": [float(n) for n in config.schedule]}, "schedule"),
    ],
)
def test_a_config_object_is_checked_as_a_file_would_be(change, message):
    """apply() took a Config object as it was: an edited one skipped every check of a file."""
    config = tokcomp.config_of(tokcomp.apply(tiny_vit(), "tome", r=2))
    with pytest.raises(ConfigError, match=message):
        tokcomp.apply(tiny_vit(), dataclasses.replace(config, **change(config)))
    assert tokcomp.config_of(tokcomp.apply(tiny_vit(), config)) == config


@pytest.mark.parametrize(
    ("method", "shaper", "edited"),
    [
        ("evit", "layers", [1, 2]),
        ("zero_tprune", "layers", [1, 3]),
        ("random", "layers", [2]),
        ("tome", "inflection", 0.5),
    ],
)
def test_an_edit_of_an_option_the_explicit_schedule_overrides_is_refused(method, shaper, edited):
    """It was accepted and changed nothing: the schedule sets every block's count."""
    schedule = [65, 57, 49, 41]
    config = tokcomp.config_of(tokcomp.apply(tiny_vit(), method, schedule=schedule))
    assert shaper in config.options
    changed = dataclasses.replace(config, options={**config.options, shaper: edited})
    with pytest.raises(ConfigError, match=rf"options\.{shaper} is .*, which the explicit schedule"):
        tokcomp.apply(tiny_vit(), changed)
    assert tokcomp.config_of(tokcomp.apply(tiny_vit(), config)) == config
