"""Tiny real models and data, built offline, shared by the tests."""

from pathlib import Path

import numpy as np
import PIL.Image
import timm
import torch
from timm.models import save_for_hf
from transformers import ResNetConfig, ResNetForImageClassification, TimmWrapperConfig, TimmWrapperForImageClassification

NUM_LABELS = 4


class RandomImages(torch.utils.data.Dataset):
    """Fixed random 3x32x32 images with labels, as dicts the Trainer's default collator stacks."""

    def __init__(self, size: int = 16, seed: int = 0, num_labels: int = NUM_LABELS):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, num_labels, (size,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def timm_wrapper_resnet(architecture: str = "test_resnet") -> TimmWrapperForImageClassification:
    torch.manual_seed(0)
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=NUM_LABELS))


def save_timm_hub_folder(folder: Path) -> Path:
    """A tiny timm classifier saved as timm uploads to the Hub (with its model_args.num_classes trap)."""
    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_resnet", num_classes=7), folder)
    return folder


def native_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS)
    return ResNetForImageClassification(config)


FOLDER_SIZES = {"train": 6, "validation": 2, "test": 3}  # images per class
CLASSES = ("cat", "dog")


def write_image_folders(root: Path, sizes=FOLDER_SIZES) -> dict[str, Path]:
    """An `imagefolder` layout: <root>/<split>/<class>/<n>.png with random pixels."""
    rng = np.random.default_rng(0)
    folders = {}
    for split, per_class in sizes.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
                PIL.Image.fromarray(pixels).save(root / split / name / f"{index}.png")
        folders[split] = root / split
    return folders
