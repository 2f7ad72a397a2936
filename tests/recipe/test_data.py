import gzip
import io
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import HfArgumentParser

from hf_rifle.recipe import main
from hf_rifle.recipe.data import (
    DataArguments,
    apply_transforms,
    check_class_folders,
    class_balanced_subset,
    collate_fn,
    count_class_images,
    detect_columns,
    encode_labels,
    label_names,
    load_splits,
)
from hf_rifle.recipe.demo import (
    ANIMAL_CLASS_NAMES,
    DIGIT_CLASS_NAMES,
    _load_numpy_pickle,
    animal_mnist_arrays,
    digits_demo_splits,
    load_demo_splits,
)
from hf_rifle.recipe.images import PrepareImage, normalize_pixels

from ..helpers import CLASSES, recipe_flags, save_timm_hub_folder, write_image_folders
from .test_reliability import parquet_dataset_with_a_broken_image

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture
def folders(tmp_path):
    return write_image_folders(tmp_path / "images")


def load_folders(tmp_path, seed=0, **arguments):
    return load_splits(DataArguments(**arguments), seed=seed, cache_dir=str(tmp_path / "cache"))


def image_paths(dataset):
    return [image["path"] for image in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def class_counts(dataset, label_column="label"):
    return np.bincount(dataset.with_format("numpy")[label_column][:])


# DataArguments


def test_arguments_parse_from_the_command_line():
    parser = HfArgumentParser(DataArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--dataset_name", "ethz/food101", "--samples_per_class", "30", "--train_val_split", "0.1"]
    )
    assert (args.dataset_name, args.samples_per_class, args.train_val_split) == ("ethz/food101", 30, 0.1)
    assert (args.resize_size, args.crop_size, args.dataset_revision, args.demo) == (256, 224, None, False)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "No data given"),
        ({"dataset_name": "beans", "train_dir": "x"}, "not both"),
        ({"demo": True, "dataset_name": "beans"}, "--demo"),
        ({"validation_dir": "x", "dataset_name": "beans"}, "not both"),
        ({"demo": True, "train_val_split": 1.0}, "train_val_split"),
        ({"demo": True, "samples_per_class": 0}, "samples_per_class"),
        ({"demo": True, "crop_size": 300}, "crop_size"),
        ({"demo": True, "samples_per_class": 5, "max_train_samples": 10}, "pass only one"),
        ({"demo": True, "demo_source": "emnist"}, "demo_source"),
    ],
)
def test_invalid_arguments_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        DataArguments(**arguments)


# Loading local folders


def test_local_folders_keep_train_validation_and_test(tmp_path, folders):
    splits = load_folders(
        tmp_path,
        train_dir=str(folders["train"]),
        validation_dir=str(folders["validation"]),
        test_dir=str(folders["test"]),
    )
    assert {name: len(split) for name, split in splits.items()} == {"train": 12, "validation": 4, "test": 6}
    assert label_names(splits["train"].features, "label") == list(CLASSES)
    assert splits["test"][0]["image"].size == (16, 12)


def test_missing_validation_is_carved_out_of_train_stratified_and_seeded(tmp_path, folders):
    splits = load_folders(
        tmp_path, train_dir=str(folders["train"]), test_dir=str(folders["test"]), train_val_split=1 / 3
    )
    assert set(splits) == {"train", "validation", "test"}
    assert class_counts(splits["train"]).tolist() == [4, 4]
    assert class_counts(splits["validation"]).tolist() == [2, 2]
    assert not set(image_paths(splits["train"])) & set(image_paths(splits["validation"]))
    again = load_folders(tmp_path, train_dir=str(folders["train"]), train_val_split=1 / 3)
    assert image_paths(again["validation"]) == image_paths(splits["validation"])


def test_samples_per_class_and_max_eval_samples(tmp_path, folders):
    splits = load_folders(
        tmp_path,
        train_dir=str(folders["train"]),
        validation_dir=str(folders["validation"]),
        test_dir=str(folders["test"]),
        samples_per_class=3,
        max_eval_samples=3,
    )
    assert class_counts(splits["train"]).tolist() == [3, 3]
    assert (len(splits["validation"]), len(splits["test"])) == (3, 3)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_dir .*nowhere"):
        load_folders(tmp_path, train_dir=str(tmp_path / "nowhere"))


def test_truncated_image_in_a_local_folder_stops_the_image_cache_build_naming_split_row_and_file(tmp_path, folders):
    splits = load_folders(tmp_path, train_dir=str(folders["train"]), validation_dir=str(folders["validation"]))
    broken_row = 1
    broken = Path(image_paths(splits["validation"])[broken_row])
    broken.write_bytes(broken.read_bytes()[:60])
    message = rf"Row {broken_row} of the validation split: Cannot read image {re.escape(str(broken))}: "
    with pytest.raises(OSError, match=message):
        apply_transforms(splits, "image", "label", 16, 8, cache_root=tmp_path / "images", cache_max_bytes=10**9)


def test_an_image_that_breaks_later_is_named_when_read(tmp_path, folders):
    splits = load_folders(tmp_path, train_dir=str(folders["train"]), validation_dir=str(folders["validation"]))
    broken = folders["train"] / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])
    transformed = apply_transforms(splits, "image", "label", resize_size=16, crop_size=8)  # no cache: decoded when read
    with pytest.raises(OSError, match=f"of the train split: Cannot read image {re.escape(str(broken))}: "):
        for index in range(len(transformed["train"])):
            transformed["train"][index]


# Local folder layouts that imagefolder would get wrong without a word


def only_cats(folders):
    shutil.rmtree(folders["train"] / "dog")


def dog_folder_emptied(folders):
    for image in (folders["train"] / "dog").iterdir():
        image.unlink()


def emu_only_in_validation(folders):
    (folders["validation"] / "dog").rename(folders["validation"] / "emu")


def images_outside_class_folders(folders):
    (folders["train"] / "cat" / "0.png").rename(folders["train"] / "0.png")


def no_images_at_all(folders):
    for folder in folders["train"].iterdir():
        shutil.rmtree(folder)


REFUSED_LAYOUTS = [
    (only_cats, r"--train_dir .*train holds images of only one class, 'cat' \(6 images\); .*at least two"),
    (dog_folder_emptied, r"--train_dir .*train: the class folder\(s\) 'dog' hold no images .*silently be left out"),
    (emu_only_in_validation, r"--validation_dir .*validation has classes that --train_dir .*train lacks: 'emu' \(2"),
    (images_outside_class_folders, r"--train_dir .*train holds 1 image directly, outside any class folder"),
    (no_images_at_all, r"--train_dir .*train holds no images \(files named \*.jpg, \*.png"),
]
LAYOUT_IDS = ["one-class", "empty-class-folder", "class-only-in-validation", "loose-image", "no-images"]


@pytest.mark.parametrize("change_layout, message", REFUSED_LAYOUTS, ids=LAYOUT_IDS)
def test_folders_imagefolder_would_get_wrong_are_refused_naming_folder_and_classes(folders, change_layout, message):
    change_layout(folders)
    with pytest.raises(ValueError, match=message):
        check_class_folders({split: str(folder) for split, folder in folders.items()})


def test_class_images_are_counted_as_imagefolder_labels_them_skipping_hidden_folders(folders):
    checkpoints = folders["train"] / "dog" / ".ipynb_checkpoints"  # datasets skips it: no class, not counted
    checkpoints.mkdir()
    shutil.copy(folders["train"] / "dog" / "0.png", checkpoints)
    (folders["train"] / "cat" / "notes.txt").write_text("not an image")
    (folders["train"] / "__pycache__").mkdir()
    assert count_class_images(str(folders["train"]), "--train_dir") == {"cat": 6, "dog": 6}


def test_a_training_class_missing_from_validation_is_warned_about_and_keeps_its_label_id(tmp_path, folders, caplog):
    shutil.rmtree(folders["validation"] / "cat")
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        splits = load_folders(tmp_path, train_dir=str(folders["train"]), validation_dir=str(folders["validation"]))
    assert re.search(r"--validation_dir .*validation has no images of the training classes 'cat'", caplog.text)
    assert label_names(splits["validation"].features, "label") == ["cat", "dog"]
    assert splits["validation"]["label"][:] == [1, 1]  # dog's id in training, not 0


def test_folders_at_different_depths_keep_their_labels(tmp_path):
    # imagefolder's default drops every label when the splits' images lie at different depths
    train = write_image_folders(tmp_path / "a", sizes={"train": 2})["train"]
    validation = write_image_folders(tmp_path / "b" / "c" / "d", sizes={"validation": 1})["validation"]
    splits = load_folders(tmp_path, train_dir=str(train), validation_dir=str(validation))
    assert splits["validation"]["label"][:] == [0, 1]


def test_one_image_per_class_trains_with_a_validation_folder_and_samples_per_class_1(tmp_path):
    folders = write_image_folders(tmp_path / "images", sizes={"train": 1, "validation": 1})
    splits = load_folders(
        tmp_path, train_dir=str(folders["train"]), validation_dir=str(folders["validation"]), samples_per_class=1
    )
    assert class_counts(splits["train"]).tolist() == [1, 1]


def test_one_image_per_class_without_a_validation_folder_names_the_class_the_carve_would_take(tmp_path):
    folders = write_image_folders(tmp_path / "images", sizes={"train": 1})
    with pytest.raises(ValueError, match=r"left no training images of '(cat|dog)' \(1 image\)\. .*--validation_dir"):
        load_folders(tmp_path, train_dir=str(folders["train"]))


# Column detection


def features_of(**columns):
    return datasets.Features(columns)


IMAGE = datasets.Image()


def labels(*names):
    return datasets.ClassLabel(names=list(names))


@pytest.mark.parametrize(
    "features, expected",
    [
        (features_of(image=IMAGE, label=labels("a", "b")), ("image", "label")),
        (features_of(photo=IMAGE, species=labels("a", "b")), ("photo", "species")),  # found by feature type
        (  # CIFAR-100: fine labels are the task, coarse_label is not a label candidate
            features_of(img=IMAGE, fine_label=labels("a", "b"), coarse_label=labels("x", "y")),
            ("img", "fine_label"),
        ),
        (features_of(image=IMAGE, target=datasets.Value("int64"), id=datasets.Value("int64")), ("image", "target")),
        (features_of(thumbnail=IMAGE, image=IMAGE, label=labels("a", "b")), ("image", "label")),  # found by name
    ],
)
def test_columns_are_detected(features, expected):
    assert detect_columns(features) == expected


@pytest.mark.parametrize(
    "features, message",
    [
        (features_of(image=IMAGE, species=labels("a", "b"), breed=labels("c", "d")), "several .*species, breed"),
        (features_of(image=IMAGE, label=labels("a", "b"), category=labels("c", "d")), "several .*label, category"),
        (features_of(image=IMAGE, score=datasets.Value("float32")), "no column looks like one"),
        (features_of(front=IMAGE, back=IMAGE, label=labels("a", "b")), "several columns .*front, back"),
    ],
)
def test_ambiguous_or_missing_columns_ask_for_a_flag(features, message):
    with pytest.raises(ValueError, match=message) as error:
        detect_columns(features)
    assert "Columns: " in str(error.value) and "_column_name" in str(error.value)


def test_unknown_column_name_lists_the_columns():
    features = features_of(image=IMAGE, label=labels("a", "b"))
    with pytest.raises(ValueError, match=r"--label_column_name 'lable' .*image \(Image\), label \(ClassLabel with 2"):
        detect_columns(features, label_column="lable")


def test_label_column_of_the_wrong_type_is_rejected():
    features = features_of(image=IMAGE, label=datasets.Value("float32"))
    with pytest.raises(ValueError, match="'label' is Value float32"):
        detect_columns(features)


def test_image_column_must_be_an_image_feature():
    features = features_of(image=datasets.Value("string"), label=labels("a", "b"))
    with pytest.raises(ValueError, match="'image' is Value string, not an Image"):
        detect_columns(features, image_column="image")


# Label encoding


def test_string_labels_share_one_mapping_across_splits():
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"label": ["dog", "cat", "dog"]}),
        validation=datasets.Dataset.from_dict({"label": ["emu", "cat"]}),
    )
    encoded = encode_labels(splits, "label")
    assert label_names(encoded["validation"].features, "label") == ["cat", "dog", "emu"]
    assert encoded["train"]["label"][:] == [1, 0, 1]
    assert encoded["validation"]["label"][:] == [2, 0]


def test_integer_labels_are_named_by_their_value():
    splits = datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": [0, 3, 1]}))
    assert label_names(encode_labels(splits, "label")["train"].features, "label") == ["0", "1", "2", "3"]


def test_a_single_class_is_rejected():
    splits = datasets.DatasetDict(train=datasets.Dataset.from_dict({"label": ["cat", "cat"]}))
    with pytest.raises(ValueError, match="at least 2"):
        encode_labels(splits, "label")


# Class-balanced subsets


@pytest.fixture
def unbalanced():
    label_ids = [0] * 10 + [1] * 7 + [2] * 5
    return datasets.Dataset.from_dict(
        {"row": list(range(len(label_ids))), "label": label_ids},
        features=datasets.Features(row=datasets.Value("int64"), label=labels("apple", "pear", "fig")),
    )


def test_class_balanced_subset_has_exact_counts_and_is_seeded(unbalanced):
    subset = class_balanced_subset(unbalanced, "label", 4, seed=1)
    assert class_counts(subset).tolist() == [4, 4, 4]
    assert subset["row"][:] == class_balanced_subset(unbalanced, "label", 4, seed=1)["row"][:]
    assert subset["row"][:] != class_balanced_subset(unbalanced, "label", 4, seed=2)["row"][:]


def test_class_balanced_subset_names_the_short_classes(unbalanced):
    with pytest.raises(ValueError, match=r"8 images per class .*'pear' \(7\), 'fig' \(5\)"):
        class_balanced_subset(unbalanced, "label", 8, seed=0)


# Transforms and collation


def test_inputs_are_uint8_resized_cropped_rgb_and_normalize_to_the_float_values():
    gray = PIL.Image.fromarray(np.full((8, 10), 51, dtype=np.uint8))
    splits = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"image": [gray], "label": [0]},
                features=datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"])),
            )
            for name in ("train", "validation")
        }
    )
    for split in apply_transforms(splits, "image", "label", 256, 224).values():
        pixels = split[0]["pixel_values"]
        assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
        assert (pixels == 51).all()
        normalized = normalize_pixels(pixels[None], MEAN, STD)[0]
        torch.testing.assert_close(normalized.mean(dim=(1, 2)), (0.2 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_evaluation_inputs_are_a_deterministic_center_crop():
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    encoded = {"bytes": png_bytes(ramp), "path": None}
    first, second = PrepareImage(32, center_crop=16)(encoded), PrepareImage(32, center_crop=16)(encoded)
    assert first.shape == (3, 16, 16)
    torch.testing.assert_close(first, second)
    assert first[0, 0, 0] < first[0, 0, -1]  # not flipped


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_transformed_splits_collate_into_a_uint8_batch():
    splits = digits_demo_splits(samples_per_class=2, seed=0, validation_per_class=1, test_per_class=1)
    image_col, label_col = detect_columns(splits["train"].features)
    transformed = apply_transforms(splits, image_col, label_col, resize_size=32, crop_size=28)
    batch = collate_fn([transformed["train"][index] for index in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 28, 28) and batch["pixel_values"].dtype == torch.uint8
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == splits["train"]["label"][:4]
    assert "image" in splits["train"][0]  # the input splits are left untouched


def test_transformed_split_survives_pickling_for_dataloader_workers(tmp_path):
    splits = digits_demo_splits(samples_per_class=2, seed=0, validation_per_class=1, test_per_class=1)
    image_col, label_col = detect_columns(splits["train"].features)
    cached = apply_transforms(splits, image_col, label_col, 32, 28, cache_root=tmp_path, cache_max_bytes=10**9)
    restored = pickle.loads(pickle.dumps(cached["validation"]))
    torch.testing.assert_close(restored[0]["pixel_values"], cached["validation"][0]["pixel_values"])


# Offline digits demo


@pytest.mark.parametrize(
    "source, side, names",
    [("sklearn", 8, DIGIT_CLASS_NAMES), ("mnist", 28, DIGIT_CLASS_NAMES), ("animal", 28, ANIMAL_CLASS_NAMES)],
)
def test_digits_demo_splits_are_balanced_disjoint_and_real(source, side, names):
    splits = digits_demo_splits(samples_per_class=5, seed=0, source=source, validation_per_class=3, test_per_class=4)
    assert {name: len(split) for name, split in splits.items()} == {"train": 50, "validation": 30, "test": 40}
    for name, per_class in (("train", 5), ("validation", 3), ("test", 4)):
        assert class_counts(splits[name]).tolist() == [per_class] * 10
    assert label_names(splits["train"].features, "label") == names
    pixels = {name: np.stack([np.asarray(image) for image in split["image"]]) for name, split in splits.items()}
    assert pixels["train"].shape[1:] == (side, side) and pixels["train"].max() > 200
    flattened = {name: {array.tobytes() for array in stack} for name, stack in pixels.items()}
    assert not (flattened["train"] & flattened["validation"] or flattened["train"] & flattened["test"])
    assert not flattened["validation"] & flattened["test"]
    test_labels = np.asarray(splits["test"]["label"][:])
    mean_images = [pixels["test"][test_labels == digit].mean(axis=0) for digit in range(10)]
    assert np.abs(mean_images[0] - mean_images[1]).mean() > 10  # a 0 and a 1 really look different


def test_animal_mnist_is_read_as_numpy_arrays_and_any_other_pickled_object_is_refused(tmp_path):
    images, labels = animal_mnist_arrays()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1_000] * 10

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as file:
        pickle.dump(RunsCode(), file)
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load (posix|os)\.system: only numpy arrays"):
        _load_numpy_pickle(path)


def test_digits_demo_held_out_splits_do_not_depend_on_the_shot_count():
    few, more = digits_demo_splits(5, seed=3), digits_demo_splits(30, seed=3)
    for name in ("validation", "test"):
        assert few[name]["label"][:] == more[name]["label"][:]
        assert [np.asarray(image).tobytes() for image in few[name]["image"]] == [
            np.asarray(image).tobytes() for image in more[name]["image"]
        ]


def test_digits_demo_rejects_more_shots_than_there_are_digits():
    with pytest.raises(ValueError, match="per class are needed"):
        digits_demo_splits(samples_per_class=150, seed=0)


def test_demo_arguments_load_through_load_demo_splits():
    splits = load_demo_splits(DataArguments(demo=True, samples_per_class=3, max_eval_samples=7), seed=0)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (30, 7, 7)
    assert detect_columns(splits["train"].features) == ("image", "label")


# Through the recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_timm_hub_folder(tmp_path_factory.mktemp("model"))


def folder_flags(output_dir, folders, model, *extra):
    return recipe_flags(
        output_dir,
        "--model_name_or_path",
        str(model),
        "--train_dir",
        str(folders["train"]),
        "--validation_dir",
        str(folders["validation"]),
        *extra,
    )


@pytest.mark.parametrize("change_layout, message", REFUSED_LAYOUTS, ids=LAYOUT_IDS)
def test_the_recipe_refuses_such_folders_before_writing_anything(tmp_path, folders, tiny_model, change_layout, message):
    change_layout(folders)
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        main(folder_flags(output_dir, folders, tiny_model))
    assert not output_dir.exists()


def test_the_recipe_trains_on_one_image_per_class(tmp_path, tiny_model):
    folders = write_image_folders(tmp_path / "images", sizes={"train": 1, "validation": 1})
    metrics = main(folder_flags(tmp_path / "run", folders, tiny_model, "--num_periods", "1"))
    assert 0 <= metrics["eval_accuracy"] <= 1


def test_skipped_images_reach_tensorboard(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dataset, _ = parquet_dataset_with_a_broken_image(tmp_path / "dataset")
    output_dir = tmp_path / "run"
    argv = recipe_flags(output_dir, "--model_name_or_path", str(tiny_model), "--dataset_name", str(dataset))
    main([*argv, "--skip_unreadable_images", "--logging_steps", "1", "--report_to", "tensorboard"])
    events = EventAccumulator(str(next(output_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = [(entry["step"], entry["skipped_images"]) for entry in history if "skipped_images" in entry]
    assert logged and logged[-1][1] == 1
    assert [(event.step, event.value) for event in events.Scalars("train/skipped_images")] == logged
