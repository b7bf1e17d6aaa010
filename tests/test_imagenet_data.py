"""Evaluation data: labels of ImageNet and other image folders, limits, Fashion-MNIST, and
errors that name the bad file or folder."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fixtures.imagenet import IMAGENETTE, foolbox_images, image_folder, synset_folder, write_images
from PIL import Image

from tokcomp.errors import UsageError
from tokcomp.harness.data import (
    CorruptImageError,
    DataSource,
    LabelledImageFolder,
    data_source,
    describe,
    imagenet_synsets,
    limited,
    open_dataset,
    read_image,
)
from tokcomp.harness.fashion_mnist import DEFAULT_ROOT, read_idx
from tokcomp.harness.imagenet import ClassificationTask, model_dataset, topk_correct
from tokcomp.harness.vqa_data import Question, VQADataset, open_vqa, read_easy_vqa


def test_synsets_are_the_imagenet_1k_classes_in_index_order():
    synsets = imagenet_synsets()
    assert len(synsets) == len(set(synsets)) == 1000
    assert list(synsets) == sorted(synsets)
    assert synsets[0] == "n01440764" and synsets[1] == "n01443537"  # tench, goldfish
    assert synsets[409] == "n02708093" and synsets[999] == "n15075141"  # clock, toilet paper


def test_some_synset_folders_keep_their_standard_indices(tmp_path):
    picked = {0: 1, 409: 2, 999: 1}
    write_images(tmp_path, {imagenet_synsets()[i]: n for i, n in picked.items()}, size=8)
    dataset = LabelledImageFolder(tmp_path)
    assert dataset.class_to_idx == {imagenet_synsets()[i]: i for i in picked}
    assert dataset.targets == [0, 409, 409, 999]
    assert dataset.uses_imagenet_indices


def test_foolbox_validation_images_get_their_labels(tmp_path):
    images = foolbox_images()
    assert len(images) == 20
    dataset = LabelledImageFolder(synset_folder(tmp_path))
    by_name = {path.name: label for path, label in images}
    assert {path.split("/")[-1]: label for path, label in dataset.samples} == by_name


def test_synset_folders_of_a_model_trained_on_them_get_its_sorted_name_labels(tmp_path):
    folder = str(write_images(tmp_path, dict.fromkeys(IMAGENETTE, 1), size=8))
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10).eval()
    dataset = model_dataset(folder, model)
    assert dataset.class_to_idx == {name: i for i, name in enumerate(sorted(IMAGENETTE))}
    assert dataset.targets == list(range(10))
    assert describe(dataset).startswith("10 images, 10 classes (sorted names: ImageNet-1k")
    task = ClassificationTask(dataset, 10, 0, torch.device("cpu"))
    with torch.no_grad():
        [(images, labels)] = task.batches()
        hits = task.score(task.forward(model, images), labels)
    assert set(hits) == {"top1", "top5"} and hits["top5"] >= hits["top1"]


def test_synset_folders_keep_imagenet_indices_where_they_fit_the_models_outputs(tmp_path):
    folder = str(write_images(tmp_path, dict.fromkeys(IMAGENETTE, 1), size=8))
    standard = [imagenet_synsets().index(name) for name in sorted(IMAGENETTE)]
    for outputs, expected in ((10, list(range(10))), (1000, standard), (0, standard)):
        dataset = model_dataset(folder, timm.create_model("test_vit", num_classes=outputs))
        assert dataset.targets == expected, outputs  # 0 outputs: no classifier to fit
        assert dataset.uses_imagenet_indices == (expected == standard)


def test_synset_folders_that_fit_neither_way_are_refused_in_one_line(tmp_path):
    write_images(tmp_path, dict.fromkeys(IMAGENETTE[:3], 1), size=8)
    model = timm.create_model("test_vit", num_classes=5)
    with pytest.raises(UsageError) as refused:
        model_dataset(str(tmp_path), model)
    message = str(refused.value)
    assert "\n" not in message
    assert "3 ImageNet synset folders (ImageNet-1k indices up to 482)" in message
    assert "the model has 5 outputs" in message
    assert "give exactly the 5 class folders the model was trained on" in message


def test_numbered_folders_beyond_the_outputs_are_kept_and_the_scores_say_what_labels_are(
    tmp_path,
):
    folder = str(write_images(tmp_path, {"0": 1, "7": 1}, size=8))
    dataset = model_dataset(folder, timm.create_model("test_vit", num_classes=5))
    assert dataset.targets == [0, 7]
    with pytest.raises(
        ValueError,
        match=r"^labels 0\.\.7 do not fit a model with 5 outputs: "
        r"they are the data's class indices .*check that --data holds",
    ):
        topk_correct(torch.zeros(2, 5), torch.tensor(dataset.targets))


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["zebra", "apple", "mango"], {"apple": 0, "mango": 1, "zebra": 2}),
        (["n01440764", "other"], {"n01440764": 0, "other": 1}),  # not all synsets: sorted
        (["n99999999", "n01443537"], {"n01443537": 0, "n99999999": 1}),
    ],
)
def test_other_folders_number_classes_in_sorted_order(tmp_path, names, expected):
    dataset = LabelledImageFolder(write_images(tmp_path, dict.fromkeys(names, 1), size=8))
    assert dataset.class_to_idx == expected
    assert not dataset.uses_imagenet_indices


def test_hidden_folders_and_files_are_no_classes_and_no_samples(tmp_path):
    """A .thumbs folder sorted first: every synset got the next one's label."""
    write_images(tmp_path, dict.fromkeys(IMAGENETTE[:3], 1), size=8)
    write_images(tmp_path / ".thumbs", {"small": 1}, size=8)
    write_images(tmp_path / IMAGENETTE[0], {".ipynb_checkpoints": 1}, size=8)
    dataset = LabelledImageFolder(tmp_path, outputs=1000)
    assert dataset.uses_imagenet_indices and dataset.classes == sorted(IMAGENETTE[:3])
    assert len(dataset) == 3


def test_synset_folders_beside_a_stray_one_are_refused(tmp_path):
    write_images(tmp_path, dict.fromkeys([*IMAGENETTE[:3], "extra"], 1), size=8)
    with pytest.raises(UsageError, match=r"3 ImageNet synset folders and 1 other folder \(extra\)"):
        LabelledImageFolder(tmp_path, outputs=1000)


def test_synset_folders_get_imagenet_1k_indices_only_from_a_1000_class_model(tmp_path):
    """An ImageNet-21k model's (21843 outputs) classes come in another order."""
    write_images(tmp_path, dict.fromkeys(IMAGENETTE[:3], 1), size=8)
    with pytest.raises(UsageError, match="the model has 21843 outputs"):
        LabelledImageFolder(tmp_path, outputs=21843)


def test_sorted_name_folders_of_another_class_count_than_the_model_are_refused(tmp_path):
    """Three folders fit a 1000-class model's outputs and were scored as its classes 0-2."""
    write_images(tmp_path, dict.fromkeys(["cat", "dog", "emu"], 1), size=8)
    with pytest.raises(UsageError, match="3 class folders, numbered by sorted name, but the "):
        LabelledImageFolder(tmp_path, outputs=1000)
    assert LabelledImageFolder(tmp_path, outputs=3).targets == [0, 1, 2]


@pytest.mark.parametrize("damage", ["not an image", "bad header", "truncated jpeg"])
def test_a_corrupt_image_error_names_the_file(tmp_path, damage):
    write_images(tmp_path, {"a": 1}, size=8)
    bad = tmp_path / "a" / "bad.jpg"
    jpeg = foolbox_images()[0][0].read_bytes()
    content = {
        "not an image": b"<html>404</html>",
        "bad header": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        "truncated jpeg": jpeg[: len(jpeg) // 2],
    }
    bad.write_bytes(content[damage])
    dataset = LabelledImageFolder(tmp_path)
    dataset[0]  # 0.png reads fine
    with pytest.raises(CorruptImageError, match=f"cannot decode image {bad}"):
        dataset[1]


def test_a_16_bit_grayscale_png_keeps_its_contrast(tmp_path):
    """Pillow opens it as "I;16", whose conversion to RGB clipped every value above 255."""
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "eight.png")
    deep = np.asarray(read_image(str(tmp_path / "deep.png")).convert("RGB"))
    eight = np.asarray(read_image(str(tmp_path / "eight.png")).convert("RGB"))
    assert deep.min() == 0 and deep.max() == 255
    assert np.array_equal(deep, eight)


@pytest.mark.parametrize(
    ("pixels", "mode", "extrema"),
    [(np.int32([[0, 1000]]), "I", "0 to 1000"), (np.float32([[0.0, 300.5]]), "F", "0.0 to 300.5")],
)
def test_pixels_that_rgb_would_clip_are_refused_naming_the_file(tmp_path, pixels, mode, extrema):
    path = tmp_path / "wide.tif"
    Image.fromarray(pixels, mode).save(path)
    with pytest.raises(CorruptImageError, match=f"image {path} has {mode} pixels from {extrema},"):
        read_image(str(path))
    Image.fromarray(np.clip(pixels, 0, 255).astype(pixels.dtype), mode).save(path)
    assert np.asarray(read_image(str(path)).convert("L")).tolist() == [[0, 255]]


def test_a_folder_without_class_folders_says_how_to_lay_it_out(tmp_path):
    (tmp_path / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"no class folders in {tmp_path}.*per synset"):
        LabelledImageFolder(tmp_path)
    missing = f"data folder {tmp_path / 'val'} does not exist; .* or fashion-mnist for the"
    with pytest.raises(FileNotFoundError, match=missing):
        LabelledImageFolder(tmp_path / "val")


def test_an_empty_class_folder_is_named(tmp_path):
    write_images(tmp_path, {"a": 1}, size=8)
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid file for the classes n01440764"):
        LabelledImageFolder(tmp_path)


def test_limit_takes_a_deterministic_subset_spread_over_the_data(tmp_path):
    dataset = LabelledImageFolder(write_images(tmp_path, {"a": 4, "b": 4, "c": 4}, size=8))
    subset = limited(dataset, 3)
    assert list(subset.indices) == [0, 4, 8]
    assert [label for _, label in subset] == [0, 1, 2]
    assert limited(dataset, 12) is dataset and limited(dataset, None) is dataset
    with pytest.raises(ValueError, match="positive"):
        limited(dataset, 0)


def test_fashion_mnist_is_its_test_split(tmp_path):
    dataset = limited(open_dataset("fashion-mnist"), 5)
    labels = read_idx(f"{DEFAULT_ROOT}/t10k-labels-idx1-ubyte.gz")
    assert len(dataset.dataset) == 10_000
    assert [label for _, label in dataset] == [labels[i] for i in range(0, 10_000, 2000)]
    with pytest.raises(
        FileNotFoundError,
        match=f"{tmp_path}/t10k-images-idx3-ubyte.gz.*--data fashion-mnist:FOLDER",
    ):
        open_dataset(f"fashion-mnist:{tmp_path}")


@pytest.mark.parametrize("classes", [1000, 9])
def test_fashion_mnist_is_refused_for_a_model_of_another_class_count(classes):
    """Its labels 0-9 would fit a 1000-class head and be scored as its first ten classes."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=classes)
    with pytest.raises(UsageError, match=f"has 10 classes, but the model predicts {classes}: "):
        model_dataset("fashion-mnist", model)
    assert len(open_dataset("fashion-mnist", outputs=10)) == 10_000  # its own count is fine


def test_one_data_source_names_every_kind_and_each_reader_refuses_the_others(tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("")
    assert data_source("fashion-mnist").kind == "fashion-mnist"
    assert data_source(f"fashion-mnist:{tmp_path}") == DataSource("fashion-mnist", tmp_path)
    assert (data_source("easy-vqa").kind, data_source("easy-vqa").name) == ("easy-vqa", "easy-vqa")
    video = data_source("video-shapes")
    assert (video.kind, video.name) == ("video-shapes", "video-shapes")
    assert data_source(str(questions)) == DataSource("jsonl", questions)
    assert data_source(str(tmp_path)).name == tmp_path.name
    with pytest.raises(ValueError, match="holds questions, not labelled images"):
        open_dataset(str(questions))
    with pytest.raises(ValueError, match="holds questions, not labelled images"):
        open_dataset("video-shapes")
    with pytest.raises(FileNotFoundError, match=r"expected easy-vqa, video-shapes, a \.jsonl"):
        open_vqa("fashion-mnist")


def test_describe_uses_the_datasets_own_line_and_counts_a_limited_vqa_set_itself():
    questions = read_easy_vqa("test")
    limited_set = limited(VQADataset(questions), 10)
    images = {questions[i * len(questions) // 10].image for i in range(10)}
    assert describe(limited_set) == (
        f"10 questions on {len(images)} images; answer types "
        f"{sorted({q.answer_type for q in limited_set.questions})}"
    )


def test_numbered_class_folders_keep_their_numbers_as_imagenetv2_lays_them_out(tmp_path):
    images = foolbox_images()  # labels 0..999 as folder names, the ImageNetV2 layout
    dataset = LabelledImageFolder(image_folder(tmp_path, images, str))
    by_name = {path.name: label for path, label in images}
    assert {path.split("/")[-1]: label for path, label in dataset.samples} == by_name
    assert "folder numbers" in dataset.describe()


def test_a_limit_on_questions_keeps_each_kinds_share_whatever_order_they_come_in():
    kinds = 6  # video-shapes: six question kinds per clip, always in one order
    questions = [
        Question(Path(f"{i // kinds}.png"), "q", ("a",), question_type=f"kind{i % kinds}")
        for i in range(1500)
    ]
    for limit in (50, 150, 250, 500):
        picked = limited(VQADataset(questions), limit).questions
        counts = Counter(q.question_type for q in picked)
        assert len(counts) == kinds and max(counts.values()) - min(counts.values()) <= 1, counts
        for kind in counts:  # each kind's questions spread over all 250 clips
            clips = [int(q.image.stem) for q in picked if q.question_type == kind]
            widest = max(b - a for a, b in pairwise([-1, *clips, 250]))
            assert widest <= 2 * 250 / len(clips), (kind, clips)
        assert limited(VQADataset(questions), limit).questions == picked


def test_a_limit_on_questions_without_kinds_takes_the_first_of_each_run():
    questions = [Question(Path(f"{i}.png"), "q", ("a",)) for i in range(97)]
    picked = limited(VQADataset(questions), 10).questions
    assert [int(q.image.stem) for q in picked] == [i * 97 // 10 for i in range(10)]
