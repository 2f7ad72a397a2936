"""The tests' one shared helper module: tiny real models and data, built offline, and a quick recipe run's flags.

It imports only what the core install has (torch, transformers): the slim-install check runs it without timm,
torchvision, datasets or PIL, so those are imported inside the helpers that need them.
"""

import doctest
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TrainerCallback,
)

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
    import timm
    from timm.models import save_for_hf

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
    import PIL.Image

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


def recipe_flags(output_dir, *extra) -> list[str]:
    """Flags of a recipe run small enough for a test: 32 px images, 2 epochs, 2 periods, no checkpoints."""
    return [
        "--output_dir",
        str(output_dir),
        "--resize_size",
        "32",
        "--crop_size",
        "28",
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--num_periods",
        "2",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "True",
        "--save_strategy",
        "no",
        *extra,
    ]


def tiny_bert_config(num_labels: int = 2, **overrides) -> BertConfig:
    """BERT, 1 layer, 16 wide: small enough for a docstring example."""
    return BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=num_labels,
        **overrides,
    )


def tiny_text_classifier(num_labels: int = 2) -> BertForSequenceClassification:
    """A transformers text classifier small enough for a docstring example (`tiny_bert_config`)."""
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels))


def token_dataset(size: int = 16, length: int = 8, num_labels: int = 2, seed: int = 0) -> list[dict]:
    """Random token sequences with labels, as dicts Trainer's default collator stacks."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (size, length), generator=generator)
    labels = torch.randint(0, num_labels, (size,), generator=generator)
    return [{"input_ids": tokens[i], "labels": labels[i]} for i in range(size)]


def run_docstring_example(obj, globs: dict) -> doctest.TestResults:
    """Run the examples in `obj`'s own docstring (not its members') with `globs` predefined."""
    (test,) = doctest.DocTestFinder(recurse=False).find(obj, globs=globs)
    assert test.examples, f"{obj.__qualname__} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    return runner.summarize(verbose=False)


def tiny_run_settings(output_dir, **overrides) -> dict:
    """Trainer settings for a few steps of a tiny model on CPU: SGD momentum, cosine, no clipping, no saving."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=9,
        seed=3,
        learning_rate=0.01,
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,
        optim="sgd",
        optim_args="momentum=0.9",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return {**settings, **overrides}


class StopAt(TrainerCallback):
    """Simulates a pre-empted job: training stops right after `step` (and its checkpoint, if one is due)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


FIT_CLASSES, FIT_FEATURES, FIT_BATCH = 4, 48, 16


class TinyClassifier(torch.nn.Module):
    """A two-layer classifier with an `fc` head that trains in milliseconds, for the fit test of `reinit_when`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Linear(FIT_FEATURES, 32), torch.nn.ReLU())
        self.fc = torch.nn.Linear(32, FIT_CLASSES)

    def forward(self, x):
        return self.fc(self.features(x))


def learnable_then_random(step: int) -> float:
    """A `fit_batch` signal for 30 steps in 3 periods: learnable labels in period 1, independent of the inputs after:
    under reinit_when="fitted" the first head has fit at step 10 (re-drawn), the second has not at step 20 (kept)."""
    return 8.0 if step < 10 else 0.0


def fit_batch(step: int, signal: float, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s batch (this rank's share of it): fresh inputs every step, so nothing can be memorized; the
    label's input feature is raised by `signal`, so with 0 the labels are independent of the inputs."""
    generator = torch.Generator().manual_seed(step)
    labels = torch.randint(0, FIT_CLASSES, (FIT_BATCH,), generator=generator)
    inputs = torch.randn(FIT_BATCH, FIT_FEATURES, generator=generator)
    inputs[torch.arange(FIT_BATCH), labels] += signal
    return inputs[rank::world_size], labels[rank::world_size]
