"""Does the input pipeline keep up? hf_rifle's uint8 pipeline against transformers' image-classification example
(`../shared/peer/run_image_classification.py`, the script our users would otherwise run), on the same JPEGs.

    loader      images/s per core (one thread, no workers) from JPEG file to the batch the loader hands over: the
                example's transforms (PIL decode, RandomResizedCrop 224, ToTensor, Normalize) every epoch, against
                ours in the first epoch (cold: decode with libjpeg-turbo, resize to 256, cache, crop, flip) and in
                later epochs (warm: crop and flip of the cached uint8 images). Ours hands over uint8: conversion and
                normalization run on the training device. Target: warm >= 20x the example.
    end-to-end  `hf-rifle-train` against the example script on the same folder, a tiny ViT, one thread, no workers:
                training images/s (Trainer's train_samples_per_second) and the whole command's wall time from a
                cold cache. Targets: >= 2.5x the example's images/s, and a whole command no slower than it.
    gpu         (CUDA only) the recipe's training images/s with ResNet-50 at 224 against a model-only loop on
                device-resident tensors, bf16 and fp32. Target: >= 0.9.

The JPEGs are 500x375 crops of scikit-learn's two sample photographs (`source_photos`), shifted, flipped and
brightness-jittered into distinct images, two classes. The sides alternate, `--repeats` times; medians are reported.

    python benchmarks/pipeline.py                                  # loader and end-to-end, on CPU
    python benchmarks/pipeline.py --parts gpu --images 4096        # on a GPU machine (benchmarks/gpu.sh)
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from torchvision import transforms as tv1

from hf_rifle.paper.sweeps import machine_description
from hf_rifle.recipe.data import EpochSeededDataset, apply_transforms, collate_fn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SCRIPT = ROOT.parent / "shared" / "peer" / "run_image_classification.py"
RESULTS = ROOT / "benchmarks" / "results"
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # the tiny ViT's processor's; values do not change the cost
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["loader", "end-to-end"], choices=["loader", "end-to-end", "gpu"])
    parser.add_argument("--images", type=int, default=512, help="training JPEGs (validation: a quarter as many)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the end-to-end runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--example_script", default=str(EXAMPLE_SCRIPT))
    parser.add_argument("--workdir", default=None, help="where the JPEGs and runs go (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="JSON (default: benchmarks/results/pipeline-<device>.json)")
    return parser.parse_args(argv)


def source_photos(rng) -> list[np.ndarray]:
    """scikit-learn's two sample photographs (427x640); where scikit-learn is missing (the GPU machine), two smooth
    random images of that size, which JPEG compresses about as well."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        coarse = [rng.integers(0, 256, (14, 20, 3), dtype=np.uint8) for _ in range(2)]
        return [np.asarray(PIL.Image.fromarray(image).resize((640, 427), PIL.Image.BICUBIC)) for image in coarse]
    return load_sample_images().images


def write_jpeg_folder(root: Path, train_images: int, seed: int = 0) -> Path:
    """<root>/{train,validation}/{china,flower}/<n>.jpg: 500x375 JPEGs cut from two photographs."""
    rng = np.random.default_rng(seed)
    photos = source_photos(rng)
    for split, count in (("train", train_images), ("validation", max(train_images // 4, 8))):
        for index in range(count):
            label = index % 2
            photo = photos[label]
            top, left = rng.integers(0, photo.shape[0] - 375 + 1), rng.integers(0, photo.shape[1] - 500 + 1)
            pixels = photo[top : top + 375, left : left + 500].astype(np.float32) * rng.uniform(0.8, 1.2)
            pixels = np.clip(pixels, 0, 255).astype(np.uint8)[:, :: rng.choice([1, -1])]
            folder = root / split / ("china", "flower")[label]
            folder.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
    return root


# loader: images/s per core


def example_transform() -> tv1.Compose:
    """The example's training transforms for a processor of size 224 (its `_train_transforms`)."""
    return tv1.Compose(
        [tv1.RandomResizedCrop(224), tv1.RandomHorizontalFlip(), tv1.ToTensor(), tv1.Normalize(MEAN, STD)]
    )


def example_epoch(split: datasets.Dataset, batch_size: int) -> float:
    """One epoch as the example feeds it: `datasets` decodes with PIL, the transforms run per image, batches stack."""
    transform = example_transform()

    def batch_transform(batch):
        batch["pixel_values"] = [transform(image.convert("RGB")) for image in batch["image"]]
        return batch

    split = split.with_transform(batch_transform)
    start = time.perf_counter()
    for first in range(0, len(split), batch_size):
        rows = split[first : first + batch_size]
        torch.stack(rows["pixel_values"])
    return len(split) / (time.perf_counter() - start)


def our_epoch(train: EpochSeededDataset, batch_size: int, epoch: int) -> float:
    """One epoch of ours, up to the uint8 batch the loader hands over: the rest (conversion to float and
    normalization) runs on the training device, and is part of the end-to-end measurement's training steps."""
    train.set_epoch(epoch)
    start = time.perf_counter()
    for first in range(0, len(train), batch_size):
        collate_fn([train[index] for index in range(first, min(first + batch_size, len(train)))])
    return len(train) / (time.perf_counter() - start)


def measure_loader(folder: Path, args) -> dict:
    torch.set_num_threads(1)
    rows = {"example": [], "ours_cold": [], "ours_warm": []}
    for repeat in range(args.repeats):
        splits = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(folder / f"hf-{repeat}"))
        rows["example"].append(example_epoch(splits["train"], args.batch_size))
        cache_root = folder / f"image-cache-{repeat}"  # cold: a new cache each repeat
        start = time.perf_counter()
        only_train = datasets.DatasetDict(train=splits["train"])
        inputs = apply_transforms(only_train, "image", "label", 256, 224, cache_root=cache_root, cache_max_bytes=10**11)
        train = EpochSeededDataset(inputs["train"], seed=0)
        build_seconds = time.perf_counter() - start
        first_epoch = len(train) / our_epoch(train, args.batch_size, 0)
        rows["ours_cold"].append(len(train) / (build_seconds + first_epoch))
        rows["ours_warm"].append(statistics.median(our_epoch(train, args.batch_size, epoch) for epoch in (1, 2)))
    medians = {name: statistics.median(values) for name, values in rows.items()}
    return {
        "images_per_second_per_core": medians,
        "runs": rows,
        "cold_vs_example": medians["ours_cold"] / medians["example"],
        "warm_vs_example": medians["ours_warm"] / medians["example"],
    }


# end-to-end: the two training scripts


def save_tiny_vit(folder: Path) -> Path:
    """A ViT small enough that the input pipeline dominates: 224 px, patches of 32, one layer of width 32."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return folder


def timed_command(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - start


def measure_end_to_end(folder: Path, model: Path, args) -> dict:
    if not Path(args.example_script).is_file():
        raise FileNotFoundError(f"{args.example_script} not found: pass --example_script, or --parts loader")
    common = [
        "--model_name_or_path", str(model), "--train_dir", str(folder / "train"),
        "--validation_dir", str(folder / "validation"), "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size), "--dataloader_num_workers", "0",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0",
    ]  # fmt: skip
    rows = {"example": [], "ours": []}
    for repeat in range(args.repeats):
        for name in ("example", "ours"):  # alternating, so drift hits both alike
            output = folder / f"run-{name}-{repeat}"
            env = {**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "HF_DATASETS_CACHE": str(folder / f"datasets-cache-{name}-{repeat}")}  # fmt: skip
            if name == "example":
                command = [sys.executable, args.example_script, *common, "--output_dir", str(output), "--do_train",
                           "--do_eval", "--remove_unused_columns", "False", "--ignore_mismatched_sizes"]  # fmt: skip
                results_file = output / "train_results.json"
            else:
                command = [sys.executable, str(ROOT / "scripts" / "train.py"), *common, "--output_dir", str(output),
                           "--eval_strategy", "no", "--resize_size", "256", "--crop_size", "224"]  # fmt: skip
                results_file = output / "all_results.json"
            seconds = timed_command(command, env)
            metrics = json.loads(results_file.read_text())
            rows[name].append(
                {"command_seconds": seconds, "train_images_per_second": metrics["train_samples_per_second"]}
            )
    summary = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in rows.items()
    }
    return {
        **summary,
        "runs": rows,
        "train_speed_vs_example": summary["ours"]["train_images_per_second"]
        / summary["example"]["train_images_per_second"],
        "command_time_vs_example": summary["ours"]["command_seconds"] / summary["example"]["command_seconds"],
    }


# gpu: the recipe against a model-only loop


def model_only_images_per_second(bf16: bool, batch_size: int, steps: int = 60, warmup: int = 10) -> float:
    """ResNet-50 fine-tuning steps on device-resident tensors: the most a perfect input pipeline could deliver."""
    import timm

    model = timm.create_model("resnet50", num_classes=2).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pixels = torch.randn(batch_size, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device="cuda")
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(pixels), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def measure_gpu(folder: Path, args) -> dict:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    model_dir = folder / "resnet50"
    TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet50", num_labels=2)).save_pretrained(
        model_dir
    )
    results = {}
    for precision in ("bf16", "fp32"):
        output = folder / f"recipe-{precision}"
        command = [
            sys.executable, str(ROOT / "scripts" / "train.py"), "--model_name_or_path", str(model_dir),
            "--train_dir", str(folder / "train"), "--validation_dir", str(folder / "validation"),
            "--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size),
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
            "--bf16", str(precision == "bf16"), "--fp16", "False", "--output_dir", str(output),
        ]  # fmt: skip
        timed_command(command, {**os.environ, "HF_DATASETS_CACHE": str(folder / "datasets-cache")})
        recipe = json.loads((output / "all_results.json").read_text())["train_samples_per_second"]
        model_only = model_only_images_per_second(precision == "bf16", args.batch_size)
        results[precision] = {
            "recipe_images_per_second": recipe,
            "model_only_images_per_second": model_only,
            "recipe_vs_model_only": recipe / model_only,
        }
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if "gpu" in args.parts and not torch.cuda.is_available():
        raise SystemExit("--parts gpu needs a CUDA device")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "settings": vars(args),
    }
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        folder = write_jpeg_folder(workdir / "jpegs", args.images)
        if "loader" in args.parts:
            report["loader"] = measure_loader(folder, args)
            print(json.dumps(report["loader"]["images_per_second_per_core"]), flush=True)
        if "end-to-end" in args.parts:
            report["end_to_end"] = measure_end_to_end(folder, save_tiny_vit(workdir / "tiny-vit"), args)
            print(json.dumps({k: v for k, v in report["end_to_end"].items() if k != "runs"}), flush=True)
        if "gpu" in args.parts:
            report["gpu"] = measure_gpu(folder, args)
            print(json.dumps(report["gpu"]), flush=True)
    output = Path(args.output or RESULTS / f"pipeline-{'cuda' if device != 'cpu' else 'cpu'}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
