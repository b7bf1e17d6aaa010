"""`tokcomp eval backbone`: the k-NN and linear heads, the fidelity figures, and the sweep
(resume included), on a tiny ViT and generated images."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from fixtures.imagenet import save_safetensors, write_images
from torch.utils.data import ConcatDataset

import tokcomp
from tokcomp.cli import main
from tokcomp.config import METHOD_DEFAULTS
from tokcomp.errors import UsageError
from tokcomp.harness import backbone, sweep
from tokcomp.harness.distributed import World
from tokcomp.harness.fashion_mnist import DEFAULT_ROOT, read_idx
from tokcomp.models import create_model


def brute_force_knn(bank, bank_labels, query, k, temperature):
    """DINO's weighted vote for one query, written out."""
    sims = [float(F.cosine_similarity(query, row, dim=0)) for row in bank]
    nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
    votes = {}
    for i in nearest:
        label = int(bank_labels[i])
        votes[label] = votes.get(label, 0.0) + torch.tensor(sims[i] / temperature).exp().item()
    return max(votes, key=votes.get)


def test_knn_is_dinos_weighted_vote():
    torch.manual_seed(0)
    bank, labels = torch.randn(60, 8), torch.randint(0, 4, (60,))
    queries = torch.randn(12, 8)
    for k, temperature in ((20, 0.07), (5, 1.0), (1, 0.07)):
        got = backbone.knn_predict(bank, labels, queries, k, temperature)
        expected = [brute_force_knn(bank, labels, q, k, temperature) for q in queries]
        assert got.tolist() == expected


def test_linear_head_learns_separable_classes_and_picks_a_listed_penalty():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 4
    labels = torch.arange(300) % 3
    features = centres[labels] + torch.randn(300, 16)
    head = backbone.fit_linear_head(features, labels)
    assert head.weight_decay in backbone.WEIGHT_DECAYS
    test_labels = torch.arange(90) % 3
    test = centres[test_labels] + torch.randn(90, 16)
    assert (head.logits(test).argmax(1) == test_labels).float().mean() > 0.95


def test_features_of_a_patched_model_weight_merged_tokens_by_size():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=4, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    tokcomp.apply(model, "tome", r=8)
    with torch.inference_mode():
        cls, patch = backbone.backbone_features(model, images)
        state = tokcomp.forward_tokens(model, images)
    size = state.size[:, 1:, None]
    expected = (state.x[:, 1:] * size).sum(1) / size.sum(1)
    torch.testing.assert_close(patch, expected)
    torch.testing.assert_close(cls, state.x[:, 0])
    assert float(state.size[:, 1:].sum(1).min()) == 64  # every patch is counted once


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint of a 32 px ViT without head, train folder, test folder, photo folder)."""
    root = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4, "num_classes": 0}
    data = {"input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear"}
    model = timm.create_model("test_vit", **kwargs)
    checkpoint = save_safetensors(
        model,
        root / "tiny.safetensors",
        timm_model="test_vit",
        model_kwargs=kwargs,
        data_config=data,
    )
    train = write_images(root / "train", {"a": 6, "b": 6, "c": 6}, size=32, seed=1)
    test = write_images(root / "test", {"a": 3, "b": 3, "c": 3}, size=32, seed=2)
    photos = write_images(root / "photos", {"any": 5}, size=48, seed=3)
    return checkpoint, train, test, photos


def run_backbone(setup, output, *extra):
    checkpoint, train, test, photos = setup
    argv = [
        "eval",
        "backbone",
        "--checkpoint",  # it names its model: no --model (nor the default DINOv2)
        str(checkpoint),
        "--data",
        str(test),
        "--train-data",
        str(train),
        "--photos",
        str(photos),
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--output",
        str(output),
        *extra,
    ]
    assert main(argv) == 0
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


def test_the_sweep_reports_fidelity_and_drop_in_accuracy_and_resumes(setup, tmp_path, monkeypatch):
    rows = run_backbone(setup, tmp_path, "--methods", "tome,random", "--budgets", "0.7")
    unpruned, tome, random = rows
    for name in ("cls_cos", "cls_cos_min", "patch_cos", "patch_cos_min", "test_cls_cos"):
        assert unpruned[name] == pytest.approx(1.0, abs=1e-5)
        assert tome[name] < 1.0 and random[name] < 1.0
        assert -1.0 <= random[name] <= 1.0
    assert tome["cls_cos_min"] <= tome["cls_cos"]
    assert all(row["samples"] == 5 + 9 for row in rows)
    assert {"results.csv", "results.png", "fidelity.png"} <= {p.name for p in tmp_path.iterdir()}
    saved = next(tmp_path.glob("reference-*.pt"))

    def refuse(*_, **__):
        raise AssertionError("a resumed run must reuse the saved reference and rows")

    monkeypatch.setattr(backbone, "build_reference", refuse)
    monkeypatch.setattr(backbone.BackboneTask, "forward", refuse)
    again = run_backbone(setup, tmp_path, "--methods", "tome,random", "--budgets", "0.7")
    assert again == rows and saved.is_file()


def test_bfloat16_runs_under_autocast_against_the_float32_reference(
    setup, tmp_path, monkeypatch, capsys
):
    run_backbone(setup, tmp_path / "float32")
    reference = next((tmp_path / "float32").glob("reference-*.pt"))
    lowered = tmp_path / "bfloat16"
    lowered.mkdir()
    (lowered / reference.name).write_bytes(reference.read_bytes())
    probes = []
    real_probe = backbone.SpeedProbe
    monkeypatch.setattr(backbone, "SpeedProbe", lambda *a: probes.append(a) or real_probe(*a))
    monkeypatch.setattr(backbone, "build_reference", lambda *_: pytest.fail("not reused"))
    unpruned, tome = run_backbone(
        setup,
        lowered,
        "--dtype",
        "bfloat16",
        "--methods",
        "tome",
        "--budgets",
        "0.7",
        "--speed-repeats",
        "2",
    )
    assert 0.98 < unpruned["cls_cos"] < 1.0  # bfloat16's own rounding against float32
    assert tome["cls_cos"] < 1.0
    assert probes == [(2, False)]  # --speed-repeats reaches the speed probe (eager)
    with pytest.raises(AssertionError):  # another dtype: another folder
        run_backbone(setup, tmp_path / "float32", "--dtype", "bfloat16")
    assert "dtype" in capsys.readouterr().err


def test_compile_runs_each_points_features_compiled_with_the_eager_figures(
    setup, tmp_path, monkeypatch, capsys
):
    """--compile: the features of the unpruned copy and of each point compile in one graph
    (fullgraph; aot_eager stands in for inductor) and give the eager figures; the option is
    part of the results' fingerprint."""
    compiled = []

    def aot_eager(module: torch.nn.Module) -> torch.nn.Module:
        compiled.append(module)
        return torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(sweep, "compiled", aot_eager)
    options = ("--methods", "tome,zero_tprune", "--budgets", "0.7", "--speed-repeats", "2")
    rows = run_backbone(setup, tmp_path / "compiled", *options, "--compile")
    eager = run_backbone(setup, tmp_path / "eager", *options)
    assert [type(module) for module in compiled] == [backbone.Features] * 4  # copy, points
    assert compiled[0].backbone is not compiled[1].backbone  # the unpruned copy
    figures = ("linear", "knn", "cls_cos", "cls_cos_min", "patch_cos", "test_cls_cos")
    for row, reference in zip(rows, eager, strict=True):
        assert row["method"] == reference["method"] and row["speedup"] > 0
        for name in figures:
            assert row[name] == pytest.approx(reference[name], abs=1e-5), (row["method"], name)
    with pytest.raises(AssertionError):  # eager results are not compiled ones
        run_backbone(setup, tmp_path / "eager", *options, "--compile")
    assert "compile" in capsys.readouterr().err


def test_unpruned_accuracy_is_the_heads_accuracy_on_the_reference(setup, tmp_path):
    (unpruned,) = run_backbone(setup, tmp_path)
    saved = torch.load(next(tmp_path.glob("reference-*.pt")), weights_only=True)
    reference = backbone.Reference(**{**saved, "head": backbone.LinearHead(**saved["head"])})
    test = reference.labels >= 0
    cls, labels = reference.cls[test], reference.labels[test]
    linear = reference.head.logits(cls).argmax(1)
    knn = backbone.knn_predict(reference.bank, reference.bank_labels, cls)
    assert unpruned["linear"] == pytest.approx(100 * float((linear == labels).float().mean()))
    assert unpruned["knn"] == pytest.approx(100 * float((knn == labels).float().mean()))


def test_a_folder_without_training_images_is_refused(setup, tmp_path, capsys):
    checkpoint, _, test, photos = setup
    argv = [
        "eval",
        "backbone",
        "--checkpoint",
        str(checkpoint),
        "--model",
        "test_vit",
        "--data",
        str(test),
        "--photos",
        str(photos),
        "--output",
        str(tmp_path),
    ]
    assert main(argv) == 2
    assert "needs --train-data" in capsys.readouterr().err


def test_an_unknown_model_name_is_refused_in_one_line(capsys):
    assert main(["eval", "backbone", "--model", "deit_smal_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown timm model 'deit_smal_patch16_224'" in err
    assert "dinov2_vits14" in err


def test_a_saved_head_makes_a_timm_classifier_with_the_heads_logits(tmp_path):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4}
    model = timm.create_model("test_vit", num_classes=0, **kwargs).eval()
    defaults = {"zero_tprune": {"similarity_share": 1.0}}
    model.pretrained_cfg = {**model.pretrained_cfg, METHOD_DEFAULTS: defaults}
    images = torch.randn(6, 3, 32, 32)
    with torch.inference_mode():
        cls, _ = backbone.backbone_features(model, images)
    head = backbone.fit_logistic(cls, torch.arange(6) % 3, 3, 1e-3)
    path = tmp_path / "with-head.safetensors"
    backbone.save_with_head(model, head, path, kwargs)
    classifier = create_model(checkpoint=path)
    with torch.inference_mode():
        torch.testing.assert_close(classifier(images), head.logits(cls), atol=1e-4, rtol=1e-4)
    assert tokcomp.model_defaults(classifier) == defaults  # the chosen options travel along


@pytest.mark.parametrize(
    ("folder", "named"), [("test", "data"), ("train", "train_data"), ("photos", "photos")]
)
def test_results_of_other_image_content_are_refused_naming_the_split(
    setup, tmp_path, capsys, folder, named
):
    checkpoint, *folders = setup
    copies = [shutil.copytree(path, tmp_path / path.name) for path in folders]
    inputs = (checkpoint, *copies)
    run_backbone(inputs, tmp_path / "out")
    edited = tmp_path / folder
    write_images(edited, {next(edited.iterdir()).name: 1}, size=48, seed=9)  # other pixels
    capsys.readouterr()
    with pytest.raises(AssertionError):
        run_backbone(inputs, tmp_path / "out")
    assert f"{named}: " in capsys.readouterr().err


def test_fresh_builds_the_reference_again(setup, tmp_path, monkeypatch, capsys):
    run_backbone(setup, tmp_path)
    [earlier] = tmp_path.glob("reference-*.pt")
    builds = []
    real_build = backbone.build_reference
    monkeypatch.setattr(backbone, "build_reference", lambda *a: builds.append(a) or real_build(*a))
    run_backbone(setup, tmp_path, "--fresh")
    assert len(builds) == 1 and earlier.is_file()
    [aside] = set(tmp_path.glob("reference-*.pt")) - {earlier}
    assert f"--fresh: earlier reference set aside in {aside}" in capsys.readouterr().out


def test_a_timm_model_without_weights_is_fingerprinted_by_its_random_weights(
    setup, tmp_path, capsys
):
    _, train, test, photos = setup
    argv = ["eval", "backbone", "--model", "test_vit", "--data", str(test)]
    argv += ["--train-data", str(train), "--photos", str(photos), "--workers", "0"]
    argv += ["--output", str(tmp_path)]
    torch.manual_seed(0)
    assert main(argv) == 0
    torch.manual_seed(1)  # another initialisation: other results
    capsys.readouterr()
    assert main(argv) == 2
    assert "weights: tensors " in capsys.readouterr().err


def test_a_shards_unpruned_features_match_its_own_reference(setup):
    checkpoint, train, test, photos = setup
    model = create_model(checkpoint=checkpoint).eval()
    options = {"train_data": str(train), "train_limit": 100, "limit": None}
    args = argparse.Namespace(data=str(test), photos=str(photos), **options)
    train_set, photo_set, test_set = backbone._datasets(args, model)
    world = World(rank=0, size=2)  # as under torchrun
    shard = world.shard(ConcatDataset([photo_set, test_set]))
    cpu = torch.device("cpu")
    reference = backbone.build_reference(model, train_set, shard, len(photo_set), 4, 0, cpu)
    task = backbone.BackboneTask(shard, reference, 4, 0, cpu)
    totals = dict.fromkeys(task.tallies, 0.0)
    with torch.inference_mode():
        for images, positions in task.batches():
            outputs = task.forward(task.module(model), images)
            for name, value in task.score(outputs, positions).items():
                totals[name] += value
    on_shard = list(range(world.rank, len(photo_set), world.size))
    assert [totals[f"cls_cos_{i}"] for i in on_shard] == pytest.approx([1.0] * len(on_shard))
    assert totals["test_images"] == len(shard) - len(on_shard)
    assert totals["test_cls_cos"] == pytest.approx(totals["test_images"])


def test_each_number_of_processes_keeps_its_own_reference(tmp_path):
    context = {"task": "backbone"}
    paths = {backbone.reference_path(tmp_path, context, World(0, size)) for size in (1, 2)}
    assert len(paths) == 2


def test_a_saved_head_is_kept_when_the_same_and_another_is_refused(tmp_path):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4}
    model = timm.create_model("test_vit", num_classes=0, **kwargs).eval()
    with torch.inference_mode():
        cls, _ = backbone.backbone_features(model, torch.randn(6, 3, 32, 32))
    head = backbone.fit_logistic(cls, torch.arange(6) % 3, 3, 1e-3)
    path = tmp_path / "with-head.safetensors"
    assert backbone.save_with_head(model, head, path, kwargs)
    written = path.read_bytes()
    assert not backbone.save_with_head(model, head, path, kwargs)  # a resumed run
    other = backbone.fit_logistic(cls, torch.arange(6) % 2, 2, 1e-3)
    with pytest.raises(UsageError, match=f"--save-head {path} exists and holds another"):
        backbone.save_with_head(model, other, path, kwargs)
    assert path.read_bytes() == written


@pytest.mark.parametrize(
    ("name", "refusal"),
    [("head.txt", "give a name ending in .safetensors"), ("folder", "is a folder; give a file")],
)
def test_a_head_file_that_could_not_be_read_back_is_refused_before_any_work(
    tmp_path, name, refusal
):
    (tmp_path / "folder").mkdir()
    args = argparse.Namespace(model="dinov2_vits14", save_head=tmp_path / name)
    with pytest.raises(UsageError, match=f"--save-head {tmp_path / name}.*{refusal}"):
        backbone._check_head_output(args)
    backbone._check_head_output(
        argparse.Namespace(**{**vars(args), "save_head": tmp_path / "h.SAFETENSORS"})
    )


def _split_sets(setup, train, test, **options):
    """backbone._datasets of the tiny model on a train and a test folder."""
    checkpoint, *_, photos = setup
    train = None if train is None else str(train)
    options = {"train_data": train, "train_limit": 100, "limit": None, **options}
    args = argparse.Namespace(data=str(test), photos=str(photos), **options)
    return backbone._datasets(args, create_model(checkpoint=checkpoint))


def test_test_folders_take_the_training_folders_class_indices(setup, tmp_path):
    _, train, *_ = setup  # classes a, b, c: indices 0, 1, 2
    test = write_images(tmp_path / "test", {"a": 1, "c": 2}, size=32)
    train_set, _, test_set = _split_sets(setup, train, test)
    by_name = train_set.class_to_idx  # the indices the heads predict
    expected = [by_name[Path(path).parent.name] for path, _ in test_set.samples]
    assert backbone.labels_of(test_set).tolist() == expected == [0, 2, 2]
    write_images(tmp_path / "test", {"d": 1}, size=32)
    with pytest.raises(UsageError, match=r"class folders \['d'\] of .* not among the training"):
        _split_sets(setup, train, test)


def test_test_images_that_are_training_images_are_refused(setup, tmp_path):
    _, train, *_ = setup
    linked = tmp_path / "test"
    linked.symlink_to(train)  # the same files by another name
    with pytest.raises(UsageError, match="--data and --train-data share 18 images"):
        _split_sets(setup, train, linked)


def test_fashion_mnist_from_its_own_folder_needs_no_training_folder(setup):
    data = f"fashion-mnist:{DEFAULT_ROOT}"
    train, _, test = _split_sets(setup, None, data, train_limit=10, limit=5)
    train_labels = read_idx(f"{DEFAULT_ROOT}/train-labels-idx1-ubyte.gz")
    test_labels = read_idx(f"{DEFAULT_ROOT}/t10k-labels-idx1-ubyte.gz")
    assert backbone.labels_of(train).tolist() == train_labels[::6000].tolist()
    assert backbone.labels_of(test).tolist() == test_labels[::2000].tolist()
