"""The repositories the loopback Hub serves, written as their owners would upload them.

- `hf-rifle-tests/colors`, a parquet image dataset with `configs:` in its card: configuration "default" (train and
  validation splits, a ClassLabel) and "shades" (other classes). main holds four classes; branch `v1` and the first
  commit hold three, so a run pinned to either shows by its labels which data it read.
- `hf-rifle-tests/no-train`: validation and test splits only.
- `hf-rifle-tests/pets`: an imagefolder dataset (`train/cat/0.png`, ...).
- `hf-rifle-tests/tiny-resnet`: a transformers-native classifier with its image processor; main's processor
  normalizes with other means than the first commit's and branch `v1`'s.
- `hf-rifle-tests/tiny-timm`: a timm model as timm uploads it (`save_for_hf`).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..helpers import native_resnet, write_image_folders

V1_CLASSES = ["red", "green", "blue"]
MAIN_CLASSES = [*V1_CLASSES, "gray"]
SHADES_CLASSES = ["dark", "light"]
V1_MEAN, MAIN_MEAN = [0.25, 0.5, 0.75], [0.485, 0.456, 0.406]
IMAGES_PER_CLASS = {"train": 6, "validation": 2}


@dataclass
class Published:
    """Commits of the fixture's repositories that tests pin runs to."""

    colors_first: str
    colors_v1: str
    colors_main: str
    resnet_first: str
    resnet_v1: str
    resnet_main: str


def colored_images(count: int, index: int, rng) -> list:
    """Small images of one class: a channel pattern per class with noise, so a classifier can tell them apart."""
    import PIL.Image

    base = np.zeros((20, 24, 3), np.int16)
    base[..., index % 3] = 160 + 40 * (index // 3)
    return [
        PIL.Image.fromarray(np.clip(base + rng.integers(0, 60, base.shape), 0, 255).astype(np.uint8))
        for _ in range(count)
    ]


def write_parquet_dataset(folder: Path, configs: dict[str, list[str]], splits=IMAGES_PER_CLASS) -> Path:
    """A Hub-layout parquet dataset: one folder of `SPLIT-00000-of-00001.parquet` files per configuration, and a
    card whose `configs:` and `dataset_info:` give each configuration's files and its ClassLabel names."""
    import datasets

    rng = np.random.default_rng(len(configs[next(iter(configs))]))
    card = {"configs": [], "dataset_info": []}
    for config_name, classes in configs.items():
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        for split, per_class in splits.items():
            rows = {"image": [], "label": []}
            for index in range(len(classes)):
                rows["image"] += colored_images(per_class, index, rng)
                rows["label"] += [index] * per_class
            (folder / config_name).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(rows, features=features).to_parquet(
                folder / config_name / f"{split}-00000-of-00001.parquet"
            )
        card["configs"].append(
            {
                "config_name": config_name,
                **({"default": True} if config_name == "default" else {}),
                "data_files": [{"split": split, "path": f"{config_name}/{split}-*"} for split in splits],
            }
        )
        card["dataset_info"].append(
            {
                "config_name": config_name,
                "features": [
                    {"name": "image", "dtype": "image"},
                    {"name": "label", "dtype": {"class_label": {"names": dict(enumerate(classes))}}},
                ],
            }
        )
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n# {folder.name}\n")
    return folder


def write_native_model(folder: Path, image_mean: list[float]) -> Path:
    from transformers import ConvNextImageProcessor

    native_resnet().save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875, image_mean=image_mean).save_pretrained(folder)
    return folder


def write_timm_model(folder: Path, architecture: str = "test_resnet", num_classes: int = 7) -> Path:
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model(architecture, num_classes=num_classes), folder, safe_serialization=True)
    return folder


def publish_fixture_repos(hub, workdir: Path) -> Published:
    colors_first = hub.publish(
        "dataset", "hf-rifle-tests/colors", write_parquet_dataset(workdir / "colors-v1", {"default": V1_CLASSES})
    )
    colors_v1 = hub.publish("dataset", "hf-rifle-tests/colors", workdir / "colors-v1", branch="v1")
    colors_main = hub.publish(
        "dataset",
        "hf-rifle-tests/colors",
        write_parquet_dataset(workdir / "colors-main", {"default": MAIN_CLASSES, "shades": SHADES_CLASSES}),
    )
    hub.publish(
        "dataset",
        "hf-rifle-tests/no-train",
        write_parquet_dataset(workdir / "no-train", {"default": V1_CLASSES}, {"validation": 2, "test": 2}),
    )
    write_image_folders(workdir / "pets")
    hub.publish("dataset", "hf-rifle-tests/pets", workdir / "pets")
    resnet_first = hub.publish(
        "model", "hf-rifle-tests/tiny-resnet", write_native_model(workdir / "resnet-v1", V1_MEAN)
    )
    resnet_v1 = hub.publish("model", "hf-rifle-tests/tiny-resnet", workdir / "resnet-v1", branch="v1")
    resnet_main = hub.publish(
        "model", "hf-rifle-tests/tiny-resnet", write_native_model(workdir / "resnet-main", MAIN_MEAN)
    )
    hub.publish("model", "hf-rifle-tests/tiny-timm", write_timm_model(workdir / "timm"))
    return Published(colors_first, colors_v1, colors_main, resnet_first, resnet_v1, resnet_main)
