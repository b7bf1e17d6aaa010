"""The public API: apply / remove / config_of / methods, re-entrancy, and clear errors."""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import warnings
from pathlib import Path

import pytest
import timm
import torch
from conftest import tiny_vit
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch import nn
from vlm_fixtures import tiny_vlm

import tokcomp
from tokcomp.config import METHOD_DEFAULTS, ConfigError
from tokcomp.errors import UsageError
from tokcomp.methods import create_method


def test_methods_lists_tome():
    assert "tome" in tokcomp.methods()


@torch.no_grad()
def test_remove_restores_forward_and_state_dict_exactly(timm_variant, images):
    model = tiny_vit(timm_variant)
    expected = model(images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    original_dict = set(model.__dict__)
    tokcomp.apply(model, "tome", r=6)
    assert not torch.equal(model(images), expected)
    assert tokcomp.remove(model) is model
    assert set(model.__dict__) == original_dict
    assert model.forward.__func__ is type(model).forward
    assert model.forward_features.__func__ is type(model).forward_features
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(images), expected)


@torch.no_grad()
def test_apply_twice_replaces_the_previous_method(images):
    model = tiny_vit("vit")
    once = tokcomp.apply(copy.deepcopy(model), "tome", r=5)(images)
    twice = tokcomp.apply(tokcomp.apply(model, "tome", r=11), "tome", r=5)
    torch.testing.assert_close(twice(images), once, atol=0, rtol=0)
    assert tokcomp.config_of(twice).options["r"] == 5
    tokcomp.remove(twice)
    assert not tokcomp.is_patched(twice)


def test_is_patched_is_false_for_what_is_no_module():
    assert not tokcomp.is_patched(3) and not tokcomp.is_patched("model")


@torch.no_grad()
def test_patched_state_dict_is_unchanged_and_loadable(images):
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=4)
    fresh = tiny_vit("vit", seed=5)
    fresh.load_state_dict(model.state_dict())
    tokcomp.apply(fresh, "tome", r=4)
    torch.testing.assert_close(fresh(images), model(images), atol=0, rtol=0)


@torch.no_grad()
def test_deepcopy_of_patched_model_is_independent(images):
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=4)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    assert not torch.allclose(clone(images), model(images))
    tokcomp.remove(clone)
    assert tokcomp.is_patched(model)


@torch.no_grad()
def test_patched_model_survives_torch_save_and_load(images, tmp_path):
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=4)
    expected = model(images)
    torch.save(model, tmp_path / "patched.pt")
    loaded = torch.load(tmp_path / "patched.pt", weights_only=False)
    assert tokcomp.is_patched(loaded)
    assert tokcomp.config_of(loaded) == tokcomp.config_of(model)
    torch.testing.assert_close(loaded(images), expected, atol=0, rtol=0)
    tokcomp.remove(loaded)
    assert loaded.forward.__func__ is type(loaded).forward
    torch.testing.assert_close(loaded(images), tokcomp.remove(model)(images), atol=0, rtol=0)


def test_wrapped_models_are_refused_with_where_to_apply():
    with pytest.raises(tokcomp.UnsupportedModelError, match=r"apply tokcomp to the model first"):
        tokcomp.apply(torch.compile(tiny_vit("vit")), "tome", r=2)
    with pytest.raises(tokcomp.UnsupportedModelError, match="DistributedDataParallel"):
        tokcomp.apply(nn.DataParallel(tiny_vit("vit")), "tome", r=2)


def test_active_timm_patch_dropout_gets_its_own_message(images):
    model = tokcomp.apply(tiny_vit("vit", patch_drop_rate=0.5).train(), "tome", r=2)
    with pytest.raises(ValueError, match=r"patch dropout .* call model\.eval\(\)"):
        model(images)
    model.eval()(images)


def test_applying_without_options_warns_that_nothing_is_compressed():
    with pytest.warns(UserWarning, match=r"'tome'\) without options compresses nothing.*r=\.\.\."):
        tokcomp.apply(tiny_vit("vit"), "tome")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokcomp.apply(tiny_vit("vit"), "tome", r=0)  # asked for explicitly: no warning


def test_a_models_own_method_defaults_apply_where_the_caller_gives_none(images, tmp_path):
    model = tiny_vit("vit", depth=6)
    chosen = {"layers": [1, 2, 3, 4, 5], "similarity_share": 1.0}
    model.pretrained_cfg = {METHOD_DEFAULTS: {"zero_tprune": chosen}}
    assert tokcomp.model_defaults(model) == {"zero_tprune": chosen}
    options = tokcomp.config_of(tokcomp.apply(model, "zero_tprune", keep_ratio=0.9)).options
    assert options["layers"] == [1, 2, 3, 4, 5] and options["similarity_share"] == 1.0
    overridden = tokcomp.apply(model, "zero_tprune", keep_ratio=0.9, similarity_share=0.5)
    assert tokcomp.config_of(overridden).options["similarity_share"] == 0.5
    assert tokcomp.config_of(overridden).options["layers"] == [1, 2, 3, 4, 5]
    with torch.no_grad():
        expected = tokcomp.apply(tiny_vit("vit", depth=6), "zero_tprune", keep_ratio=0.9, **chosen)
        torch.testing.assert_close(
            tokcomp.apply(model, "zero_tprune", keep_ratio=0.9)(images), expected(images)
        )
    path = tokcomp.config_of(model).save(tmp_path / "chosen.json")
    elsewhere = tokcomp.apply(tiny_vit("vit", depth=6), path)  # the config states them
    assert tokcomp.config_of(elsewhere).options == tokcomp.config_of(model).options
    plain = tokcomp.apply(tiny_vit("vit", depth=6), "zero_tprune", keep_ratio=0.9)
    assert tokcomp.config_of(plain).options["similarity_share"] == 0.5  # the paper's
    tome = tokcomp.config_of(tokcomp.apply(model, "tome", r=2)).options  # other methods alone
    assert tome == tokcomp.config_of(tokcomp.apply(tiny_vit("vit", depth=6), "tome", r=2)).options


def test_config_of_reports_the_merges_tome_can_make():
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=500)
    config = tokcomp.config_of(model)
    tokens = [65, *config.schedule]
    assert config.options["r"] == [a - b for a, b in itertools.pairwise(tokens)]
    assert config.options["r"][0] == 32 and tokcomp.apply(tiny_vit("vit"), config)


@torch.no_grad()
def test_two_threads_get_what_sequential_runs_get():
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=7)
    torch.manual_seed(3)
    inputs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    sequential = [model(x) for x in inputs for _ in range(5)]
    results: dict[int, list[torch.Tensor]] = {}

    def worker(index: int) -> None:
        with torch.no_grad():
            results[index] = [model(inputs[index]) for _ in range(5)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        for got, want in zip(results[index], sequential[index * 5 : index * 5 + 5], strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_target_macs_picks_the_nearest_schedule_and_reports_it():
    model = tokcomp.apply(tiny_vit("vit"), "tome", target_macs=0.7)
    config = tokcomp.config_of(model)
    assert config.options == {
        "prop_attn": True,
        "trace_source": False,
        "r": config.options["r"],
        "inflection": None,
    }
    ratios = []
    for r in range(33):
        tokcomp.apply(model, "tome", r=r)
        ratios.append(tokcomp.config_of(model).macs_ratio)
    assert abs(config.macs_ratio - 0.7) == pytest.approx(min(abs(x - 0.7) for x in ratios))
    assert config.macs_ratio == pytest.approx(ratios[config.options["r"]])


# -- clear errors -------------------------------------------------------------------------


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'tomme'; known methods: .*tome"):
        tokcomp.apply(tiny_vit("vit"), "tomme")


def test_a_folder_given_as_the_method_is_named_as_a_folder(tmp_path):
    """It was reported as an unknown method."""
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(tmp_path))} is a folder; give a config"
    ):
        tokcomp.apply(tiny_vit("vit"), str(tmp_path))


def test_a_schedule_for_a_visual_token_method_by_name_is_refused_naming_the_budget():
    """On a VLM the schedule follows from keep: with none, the default keep was checked against
    a tiny image and the message advised a keep that, given, was refused beside schedule."""
    model = tiny_vlm("llava")
    schedule = tokcomp.config_of(tokcomp.apply(model, "divprune", keep=4)).schedule
    for options in ({}, {"keep": 4}):
        with pytest.raises(ValueError, match=r"divprune: on a VLM the schedule follows from keep"):
            tokcomp.apply(model, "divprune", schedule=schedule, **options)
    assert tokcomp.config_of(model).options["keep"] == 4  # a refused apply leaves the patch


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"no option 'ratio'; its options are: .*\br\b"):
        tokcomp.apply(tiny_vit("vit"), "tome", ratio=0.5)
    with pytest.raises(ValueError, match="no option 'foo'") as refused:
        create_method("dycoke", foo=1)
    assert "target_macs" not in str(refused.value)  # dycoke refuses it


def test_impossible_budget_states_the_reachable_range():
    with pytest.raises(ValueError, match=r"reachable range is 0\.\d+\.\.1\.000"):
        tokcomp.apply(tiny_vit("vit"), "tome", target_macs=0.05)
    with pytest.raises(ValueError, match=r"fraction of the unpruned MACs in \(0, 1\]"):
        tokcomp.apply(tiny_vit("vit"), "tome", target_macs=1.5)


def test_unsupported_model_says_what_is_supported():
    with pytest.raises(tokcomp.UnsupportedModelError, match="supported: timm VisionTransformer"):
        tokcomp.apply(nn.Sequential(nn.Linear(3, 3)), "tome", r=1)


def test_unsupported_timm_variant_names_the_block():
    model = tiny_vit("vit", global_pool="map")
    with pytest.raises(tokcomp.UnsupportedModelError, match="global_pool='map'"):
        tokcomp.apply(model, "tome", r=1)
    model = tiny_vit("vit", block_fn=ParallelScalingBlock)  # no attn: it raised AttributeError
    with pytest.raises(
        tokcomp.UnsupportedModelError, match="is ParallelScalingBlock with no attn; "
    ):
        tokcomp.apply(model, "tome", r=1)


def test_a_method_name_stays_a_method_where_a_file_of_that_name_is_at_hand(
    tmp_path, monkeypatch, images
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tome").write_text("notes")
    model = tokcomp.apply(tiny_vit(), "tome", r=2)
    assert tokcomp.config_of(model).method == "tome"


def test_a_hybrid_cnn_stem_is_refused():
    """timm's R26 hybrids embed with a ResNet stem, whose MACs the model would miss (3x)."""
    with torch.device("meta"):
        model = timm.create_model("vit_small_r26_s32_224")
    with pytest.raises(tokcomp.UnsupportedModelError, match="embeds its patches with HybridEmbed"):
        tokcomp.apply(model, "tome", r=1)


def test_timm_attention_masks_are_refused_and_their_defaults_accepted(images):
    model = tokcomp.apply(tiny_vit(), "tome", r=2)
    for call in (model, model.forward_features):
        call(images, attn_mask=None, is_causal=False)
        for given in ({"attn_mask": torch.zeros(16, 16, dtype=torch.bool)}, {"is_causal": True}):
            with pytest.raises(UsageError, match="attn_mask and is_causal are not supported"):
                call(images, **given)


@torch.no_grad()
def test_remove_gives_back_a_forward_the_instance_held(images):
    model, calls = tiny_vit("vit"), []
    unwrapped = model.forward

    def wrapped(*args, **kwargs):
        calls.append(len(calls))
        return unwrapped(*args, **kwargs)

    model.forward = wrapped
    expected = unwrapped(images)
    tokcomp.remove(tokcomp.apply(tokcomp.apply(model, "tome", r=4), "pitome", keep_ratio=0.9))
    assert model.forward is wrapped
    torch.testing.assert_close(model(images), expected, atol=0, rtol=0)
    assert calls == [0]


def test_remove_on_unpatched_model_says_so():
    with pytest.raises(ValueError, match="not patched by tokcomp"):
        tokcomp.remove(tiny_vit("vit"))


@torch.no_grad()
def test_timm_forward_head_of_forward_features_is_the_models_output(timm_variant, images):
    model = tokcomp.apply(tiny_vit(timm_variant), "tome", r=6)
    features = model.forward_features(images)
    assert features.shape[1] < tokcomp.config_of(model).schedule[0]  # tokens were merged
    torch.testing.assert_close(model.forward_head(features), model(images))


def merged_patches(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch tokens forward_tokens gives, and their mean weighted by size (a plain
    reference of the average pool)."""
    state = tokcomp.forward_tokens(model, images)
    prefix = model.num_prefix_tokens
    patches, size = state.x[:, prefix:], state.size[:, prefix:, None]
    return patches, (patches * size).sum(dim=1) / size.sum(dim=1)


@torch.no_grad()
def test_timm_pre_logits_of_merged_tokens_are_their_size_weighted_mean(images):
    model = tokcomp.apply(tiny_vit("registers_gap"), "tome", r=6)
    _, mean = merged_patches(model, images)
    pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(pre_logits, model.fc_norm(mean))


@pytest.mark.parametrize(
    ("method", "options"),
    [("random", {"keep_ratio": 0.7}), ("evit", {"keep_ratio": 0.7, "fuse": False})],
)
@torch.no_grad()
def test_timm_forward_head_of_pruned_tokens_is_the_average_pool(method, options, images):
    model = tokcomp.apply(tiny_vit("registers_gap"), method, **options)
    features = model.forward_features(images)
    assert features.shape[1] < tokcomp.config_of(model).schedule[0]  # tokens were pruned
    prefix = model.num_prefix_tokens
    pooled = model.fc_norm(features[:, prefix:].mean(dim=1))  # pruning only: a plain mean
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), pooled)
    torch.testing.assert_close(model.forward_head(features), model(images))


@torch.no_grad()
def test_timm_pool_of_merged_tokens_weighs_them_by_size(images):
    model = tokcomp.apply(tiny_vit("registers_gap"), "tome", r=6)
    patches, mean = merged_patches(model, images)
    features = model.forward_features(images)
    torch.testing.assert_close(model.pool(features), mean)
    avgmax = model.pool(features, pool_type="avgmax")
    torch.testing.assert_close(avgmax, 0.5 * (patches.amax(dim=1) + mean))
    torch.testing.assert_close(model.pool(features, pool_type=""), features, atol=0, rtol=0)
    with pytest.raises(UsageError, match=r"call model\(x\), or pool tokcomp.forward_tokens"):
        model.pool(features.clone())


@torch.no_grad()
def test_timm_models_without_pool_get_none(images, monkeypatch):
    """timm before 1.0.7 has no VisionTransformer.pool: tokcomp adds none."""
    monkeypatch.delattr(VisionTransformer, "pool", raising=False)
    model = tokcomp.apply(tiny_vit("gap"), "tome", r=6)
    assert not hasattr(model, "pool")
    model(images)
    assert not hasattr(tokcomp.remove(model), "pool")


@torch.no_grad()
def test_timm_models_without_pool_include_prefix_pool_without_the_prefix(images):
    """timm before 1.0.16 has no pool_include_prefix and leaves the prefix tokens out."""
    model = tiny_vit("registers_gap")
    expected = model(images)
    model.__dict__.pop("pool_include_prefix", None)
    tokcomp.apply(model, "tome", r=0)
    torch.testing.assert_close(model(images), expected, atol=1e-6, rtol=0)


def test_timm_average_pool_of_tokens_without_sizes_is_refused(images):
    model = tokcomp.apply(tiny_vit("gap"), "tome", r=6)
    features = model.forward_features(images).clone()  # a new tensor: the sizes stay behind
    with pytest.raises(UsageError, match=r"call model\(x\), or pool tokcomp.forward_tokens"):
        model.forward_head(features)


def test_wrong_input_size_is_explained(images):
    model = tokcomp.apply(tiny_vit("vit", dynamic_img_size=True), "tome", r=3)
    with pytest.raises(ValueError, match="built for 65 tokens per image, the input gives 17"):
        model(torch.randn(1, 3, 16, 16))


# -- configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@torch.no_grad()
def test_config_round_trip_reloads_to_same_schedule_and_outputs(tmp_path, suffix, images):
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=[8, 4, 2, 1])
    path = tokcomp.config_of(model).save(tmp_path / f"tome{suffix}")
    loaded = tokcomp.Config.load(path)
    assert loaded == tokcomp.config_of(model)
    other = tokcomp.apply(tiny_vit("vit"), path)
    assert tokcomp.config_of(other).schedule == tokcomp.config_of(model).schedule
    torch.testing.assert_close(other(images), model(images), atol=0, rtol=0)


def test_config_for_another_model_names_the_field(tmp_path):
    path = tokcomp.config_of(tokcomp.apply(tiny_vit("vit"), "tome", r=2)).save(tmp_path / "c.json")
    with pytest.raises(ConfigError, match=r"model\.depth=4, but the model has depth=6"):
        tokcomp.apply(tiny_vit("vit", depth=6), path)
    with pytest.raises(ConfigError, match=r"model\.tokens=65, but the model has tokens=66"):
        tokcomp.apply(tiny_vit("deit_distilled"), path)
    with pytest.raises(ConfigError, match=r"model\.stem_macs=\d+, but the model has stem_macs="):
        tokcomp.apply(tiny_vit("vit", in_chans=1), path)  # the same tokens from grey images


def test_options_beside_a_config_are_refused(tmp_path):
    path = tokcomp.config_of(tokcomp.apply(tiny_vit("vit"), "tome", r=2)).save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="cannot be given with a config"):
        tokcomp.apply(tiny_vit("vit"), path, r=3)


def _write(tmp_path, text: str, name: str = "bad.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _valid_dict() -> dict:
    return tokcomp.config_of(tokcomp.apply(tiny_vit("vit"), "tome", r=2)).to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schedule": "62,60"}, "'schedule' must be a list of ints"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"version": 99}, "version 99 is newer"),
        ({"colour": 1}, r"unknown field\(s\) \['colour'\]"),
        ({"macs": -3}, "'macs' must be a positive int"),
        ({"options": []}, "'options' must be a mapping"),
        ({"version": "1"}, "'version' must be an int, got '1'"),
    ],
)
def test_malformed_config_gets_a_clear_error(tmp_path, change, message):
    path = _write(tmp_path, json.dumps({**_valid_dict(), **change}))
    with pytest.raises(ConfigError, match=message):
        tokcomp.apply(tiny_vit("vit"), path)


def test_a_model_field_no_model_shape_has_is_refused(tmp_path):
    data = _valid_dict()
    data["model"]["tokenz"] = 197
    with pytest.raises(ConfigError, match=r"'model' has unknown field\(s\) \['tokenz'\]"):
        tokcomp.apply(tiny_vit("vit"), _write(tmp_path, json.dumps(data)))


def test_config_missing_fields_and_bad_syntax(tmp_path):
    data = _valid_dict()
    del data["schedule"]
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['schedule'\]"):
        tokcomp.Config.load(_write(tmp_path, json.dumps(data)))
    with pytest.raises(ConfigError, match="not valid JSON"):
        tokcomp.Config.load(_write(tmp_path, "{method: tome"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        tokcomp.Config.load(_write(tmp_path, "a: [1, 2", "bad.yaml"))
    with pytest.raises(ConfigError, match="no such config file"):
        tokcomp.apply(tiny_vit("vit"), tmp_path / "missing.json")


def test_config_with_invalid_schedule_is_refused(tmp_path):
    data = {**_valid_dict(), "schedule": [62, 63, 60, 60]}
    with pytest.raises(ValueError, match="schedule must not increase: block 1"):
        tokcomp.apply(tiny_vit("vit"), _write(tmp_path, json.dumps(data)))
    data = {**_valid_dict(), "schedule": [62, 60]}
    with pytest.raises(ValueError, match="schedule has 2 entries, the model has 4 blocks"):
        tokcomp.apply(tiny_vit("vit"), _write(tmp_path, json.dumps(data)))


def test_methods_by_kind():
    vision, vlm = tokcomp.methods("vision"), tokcomp.methods("vlm")
    assert {"tome", "pitome", "diffrate", "zero_tprune", "evit", "random"} <= set(vision)
    assert {"zoo", "divprune", "fastv", "visionzip", "random"} <= set(vlm)
    assert set(vision) | set(vlm) == set(tokcomp.methods())
    with pytest.raises(ValueError, match="kind must be one of"):
        tokcomp.methods("text")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (None, "expected a method name, a Method, a Config or a config path, got None"),
        (123, "expected a method name, a Method, a Config or a config path, got 123"),
        (Path("tome"), "no config file tome: give the path of a saved config"),
    ],
)
def test_what_is_neither_a_method_nor_a_config_is_refused_naming_what_apply_takes(given, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tokcomp.apply(tiny_vit(), given)


@pytest.mark.parametrize(
    ("method", "option"),
    [
        ("tome", {"r": 2}),
        ("tome", {"inflection": 0.5}),
        ("evit", {"layers": [1]}),
        ("random", {"layers": [1]}),
        ("zero_tprune", {"layers": [1]}),
        ("pitome", {"keep_ratio": 0.9}),
    ],
)
def test_an_option_that_only_shapes_the_derived_schedule_is_refused_beside_a_schedule(
    method, option
):
    """evit's layers=[1] beside a schedule cutting at block 2 was kept in the config, and
    ignored."""
    (name,) = option
    schedule = [60, 55, 50, 45]
    with pytest.raises(ValueError, match=f"{method}: give either schedule or {name}, not both"):
        tokcomp.apply(tiny_vit(), method, schedule=schedule, **option)
    assert tokcomp.is_patched(tokcomp.apply(tiny_vit(), method, schedule=schedule))
