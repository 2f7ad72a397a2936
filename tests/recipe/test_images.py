"""The uint8 input pipeline: decoding, the resized-image cache, the training crops, normalization on device."""

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from sklearn.datasets import load_sample_images
from torchvision.transforms.v2 import functional as F

from hf_rifle.recipe.data import EpochSeededDataset, apply_transforms, collate_fn
from hf_rifle.recipe.images import (
    STALE_STAGING_SECONDS,
    CachedImages,
    ImageRifleTrainer,
    PrepareImage,
    cache_key,
    cached_images,
    decode_rgb,
    is_convolutional,
    normalize_pixels,
)

from ..helpers import native_resnet, tiny_run_settings

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FEATURES = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))


def encoded(pixels: np.ndarray, fmt: str, **options) -> dict:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return {"bytes": buffer.getvalue(), "path": None}


def photos() -> list[np.ndarray]:
    """Two real photographs (scikit-learn's sample images, 427x640), cut to the issue's 500x375 and a portrait."""
    china, flower = load_sample_images().images
    return [china[:375, :500], flower[:, :300]]


def pil_path(value: dict, resize_size: int, crop_size: int) -> torch.Tensor:
    """What the recipe fed a model before the cache, before normalization: PIL decode, resize, center crop."""
    image = datasets.Image().decode_example(value).convert("RGB")
    return F.pil_to_tensor(F.center_crop(F.resize(image, resize_size), crop_size))


@pytest.mark.parametrize("fmt, options", [("JPEG", {"quality": 75}), ("JPEG", {"quality": 95}), ("PNG", {})])
def test_evaluation_inputs_equal_the_pil_path_within_one_uint8_step(fmt, options):
    for photo in photos():
        value = encoded(photo, fmt, **options)
        ours = PrepareImage(256, center_crop=224)(value)
        difference = (ours.int() - pil_path(value, 256, 224).int()).abs()
        assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
        assert difference.max() <= 1 and difference.float().mean() < 0.01


def test_jpeg_decoding_equals_pil_and_grayscale_and_cmyk_become_rgb():
    photo = photos()[0]
    value = encoded(photo, "JPEG")
    torch.testing.assert_close(decode_rgb(value), F.pil_to_tensor(datasets.Image().decode_example(value)))
    gray = decode_rgb(encoded(photo[..., 0], "JPEG"))
    assert gray.shape == (3, 375, 500) and torch.equal(gray[0], gray[2])
    cmyk = io.BytesIO()
    PIL.Image.fromarray(photo).convert("CMYK").save(cmyk, format="JPEG")
    value = {"bytes": cmyk.getvalue(), "path": None}
    torch.testing.assert_close(
        decode_rgb(value), F.pil_to_tensor(datasets.Image().decode_example(value).convert("RGB"))
    )


def test_a_truncated_jpeg_file_is_named(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(encoded(photos()[0], "JPEG")["bytes"][:2000])
    with pytest.raises(OSError, match=f"Cannot read image {path}: "):
        decode_rgb({"bytes": None, "path": str(path)})


def digit_splits(rows: int = 12) -> datasets.DatasetDict:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8) for i in range(rows)]
    split = datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(image) for image in images], "label": [i % 2 for i in range(rows)]},
        features=FEATURES,
    )
    return datasets.DatasetDict(train=split, validation=split.select(range(4)))


def items(split, epoch: int = 0) -> list:
    seeded = EpochSeededDataset(split, seed=5)
    seeded.set_epoch(epoch)
    return [seeded[index] for index in range(len(seeded))]


def test_cached_inputs_equal_the_decoded_ones_and_later_runs_reuse_the_cache(tmp_path, caplog):
    splits = digit_splits()
    decoded = apply_transforms(splits, "image", "label", 16, 12)
    cached = apply_transforms(splits, "image", "label", 16, 12, cache_root=tmp_path, cache_max_bytes=10**9)
    for name in ("train", "validation"):
        assert cached[name].cached is not None
        for epoch in (0, 1):
            for ours, reference in zip(items(cached[name], epoch), items(decoded[name], epoch)):
                assert torch.equal(ours["pixel_values"], reference["pixel_values"])
                assert ours["labels"] == reference["labels"]
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2  # one per split; no staging folder left
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = apply_transforms(splits, "image", "label", 16, 12, cache_root=tmp_path, cache_max_bytes=10**9)
    assert "Caching" not in caplog.text and sorted(tmp_path.iterdir()) == folders
    assert again["train"].cached.folder == cached["train"].cached.folder


def test_the_cache_key_follows_the_data_and_the_sizes(tmp_path):
    rows = digit_splits()["train"].cast_column("image", datasets.Image(decode=False))
    folders = {
        cached_images("train", subset, "image", prepare, tmp_path, 10**9).folder
        for subset in (rows, rows.select(range(6)))
        for prepare in (PrepareImage(16), PrepareImage(20), PrepareImage(16, center_crop=12))
    }
    assert len(folders) == 6


def test_a_split_over_the_budget_is_decoded_on_the_fly_with_a_warning(tmp_path, caplog):
    rows = digit_splits()["train"].cast_column("image", datasets.Image(decode=False))
    with caplog.at_level(logging.WARNING):
        assert cached_images("train", rows, "image", PrepareImage(16), tmp_path, max_bytes=1000) is None
    assert "Not caching the train split's resized images" in caplog.text and "--image_cache_max_gb" in caplog.text
    assert not any(tmp_path.rglob("*.u8"))


def test_a_build_killed_midway_leaves_no_cache_that_a_later_run_reads(tmp_path):
    rows = digit_splits()["train"].cast_column("image", datasets.Image(decode=False))
    complete = cached_images("train", rows, "image", PrepareImage(16), tmp_path, 10**9)
    expected = [complete[row] for row in range(len(rows))]
    finished = subprocess.Popen(["true"])
    finished.wait()  # a build killed midway, on this machine: its process is gone
    torn = complete.folder.with_name(f"{complete.folder.name}.staging-{socket.gethostname()}-{finished.pid}")
    complete.folder.rename(torn)
    (torn / "index.npy").unlink()  # killed before the index, written last
    rebuilt = cached_images("train", rows, "image", PrepareImage(16), tmp_path, 10**9)
    assert all(torch.equal(rebuilt[row], image) for row, image in enumerate(expected))
    assert not torn.exists()  # the dead build's leftovers are cleared


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_a_leftover_staging_folder_is_removed_only_when_it_provably_belongs_to_a_dead_build(tmp_path):
    """A process id means something on its own machine only: another host's build sharing the cache folder is left
    alone, whatever its id reads here, until nothing in it changed for STALE_STAGING_SECONDS."""
    rows = digit_splits()["train"].cast_column("image", datasets.Image(decode=False))
    key, host, dead = cache_key(rows, "image", PrepareImage(16)), socket.gethostname(), dead_pid()
    day_ago = time.time() - STALE_STAGING_SECONDS - 60
    running = subprocess.Popen(["sleep", "60"])  # a build still at work on this machine
    leftovers = [  # (owner in the name, untouched for a day, kept)
        (f"{host}-{dead}", False, False),  # this machine, process gone
        (f"{host}-{running.pid}", False, True),  # this machine, process running
        (f"node-7-{dead}", False, True),  # another machine's build, which may be running now
        (f"node-8-{dead}", True, False),  # another machine's, untouched for a day
        (f"{dead}", False, True),  # named before hosts were recorded: unknown machine
    ]
    for owner, old, _ in leftovers:
        staging = tmp_path / f"{key}.staging-{owner}"
        staging.mkdir()
        (staging / "pixels.u8").write_bytes(bytes(10))
        if old:
            for path in (staging / "pixels.u8", staging):
                os.utime(path, (day_ago, day_ago))
    try:
        cached_images("train", rows, "image", PrepareImage(16), tmp_path, 10**9)
    finally:
        running.kill()
        running.wait()
    for owner, _, kept in leftovers:
        assert (tmp_path / f"{key}.staging-{owner}").exists() == kept, owner


BUILDER = """
import logging, os, sys, time
from pathlib import Path
import datasets
from hf_rifle.recipe import images
logging.basicConfig(level=logging.INFO)  # a cache build is said at INFO
images._host_name = lambda: os.environ["BUILDER_HOST"]  # two machines sharing the cache folder
rows = datasets.load_from_disk(sys.argv[1])
ready = Path(sys.argv[2], "ready-" + os.environ["BUILDER_HOST"])
ready.touch()
while not Path(sys.argv[2], "go").exists():
    time.sleep(0.01)
cache = images.cached_images("train", rows, "image", images.PrepareImage(16), Path(sys.argv[3]), 10**9)
print(cache.folder)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_launchers_building_one_cache_at_once_both_end_with_one_complete_cache(tmp_path):
    rows = digit_splits(rows=300)["train"].cast_column("image", datasets.Image(decode=False))
    rows.save_to_disk(tmp_path / "rows")
    expected = [PrepareImage(16)(encoded) for encoded in rows["image"]]
    cache_root, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(BUILDER), str(tmp_path / "rows"), str(signals), str(cache_root)],
            env={**os.environ, "BUILDER_HOST": host},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for host in ("node-a", "node-b")
    ]
    deadline = time.monotonic() + 120
    while len(list(signals.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    (signals / "go").touch()  # both loaded their data: they build at once
    outputs = [builder.communicate(timeout=300) for builder in builders]
    for builder, (_, errors) in zip(builders, outputs):
        assert builder.returncode == 0, errors[-3000:]
    assert "Caching the train split" in outputs[0][1] and "Caching the train split" in outputs[1][1]  # both built
    (folder,) = {output.strip() for output, _ in outputs}
    assert [path.name for path in cache_root.iterdir()] == [os.path.basename(folder)]  # no staging folder left
    cache = CachedImages(folder)
    assert all(torch.equal(cache[row], image) for row, image in enumerate(expected))


def broken_splits() -> tuple[datasets.DatasetDict, int]:
    splits = digit_splits()
    rows = splits["train"].cast_column("image", datasets.Image(decode=False)).to_dict()
    broken_row = 3
    rows["image"][broken_row] = {"bytes": rows["image"][broken_row]["bytes"][:50], "path": None}
    splits["train"] = datasets.Dataset.from_dict(rows, features=FEATURES)
    return splits, broken_row


def test_unreadable_cached_rows_stop_the_run_or_are_skipped_and_logged(tmp_path):
    splits, broken_row = broken_splits()
    with pytest.raises(OSError, match=rf"Row {broken_row} of the train split: Cannot read image .*--skip_unreadable"):
        apply_transforms(splits, "image", "label", 16, 12, cache_root=tmp_path / "cache", cache_max_bytes=10**9)
    log = tmp_path / "skipped.jsonl"
    inputs = apply_transforms(splits, "image", "label", 16, 12, log, tmp_path / "cache", 10**9)
    batch = collate_fn([inputs["train"][row] for row in range(len(inputs["train"]))])
    assert len(batch["labels"]) == len(inputs["train"]) - 1
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"split": "train", "row": broken_row, "file": None}
    ]


def test_training_crops_are_uniformly_placed_and_half_flipped():
    """The paper's augmentation: every crop position of the resized image equally likely, flips with p=1/2."""
    ramp = np.tile(np.arange(20, dtype=np.uint8) * 10, (16, 1))  # x position readable from the pixel value
    split = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"image": [PIL.Image.fromarray(ramp)] * 400, "label": [0] * 400}, features=FEATURES
        )
    )
    train = apply_transforms(split, "image", "label", resize_size=16, crop_size=12)["train"]
    starts, flips = [], 0
    for epoch in range(3):
        for item in items(train, epoch):
            row = item["pixel_values"][0, 0].int()
            flipped = bool(row[0] > row[-1])
            flips += flipped
            starts.append(int(row[-1 if flipped else 0]) // 10)
    counts = np.bincount(starts, minlength=20)
    assert set(np.flatnonzero(counts)) == set(range(9))  # 20 - 12 + 1 positions, all used
    assert counts[:9].min() > 0.6 * counts[:9].mean() and abs(flips / len(starts) - 0.5) < 0.06


def test_epochs_reach_persistent_dataloader_workers(tmp_path):
    train = apply_transforms(digit_splits(), "image", "label", 16, 12, cache_root=tmp_path, cache_max_bytes=10**9)
    seeded = EpochSeededDataset(train["train"], seed=5)
    loader = torch.utils.data.DataLoader(
        seeded, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=collate_fn
    )
    for epoch in (0, 1):
        seeded.set_epoch(epoch)
        from_workers = torch.cat([batch["pixel_values"] for batch in loader])
        in_process = torch.stack([item["pixel_values"] for item in items(train["train"], epoch)])
        assert torch.equal(from_workers, in_process)


def test_the_trainer_normalizes_uint8_batches_on_the_device_as_the_float_path(tmp_path):
    model = native_resnet().eval()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    trainer = ImageRifleTrainer(
        model=model, args=RifleConfigLike(tmp_path), pixel_mean=MEAN, pixel_std=STD, channels_last=True
    )
    _, logits, _ = trainer.prediction_step(model, {"pixel_values": pixels, "labels": labels}, False)
    reference = (pixels.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(pixel_values=reference).logits, atol=1e-4, rtol=1e-4)
    assert normalize_pixels(reference, MEAN, STD) is reference  # float batches pass through


def RifleConfigLike(tmp_path, **overrides):
    from hf_rifle import RifleConfig

    return RifleConfig(**tiny_run_settings(tmp_path, **overrides))


def test_each_split_is_evaluated_from_its_own_loader_when_workers_persist(tmp_path):
    """Transformers keeps persistent-worker evaluation loaders under one key whatever the dataset: without a loader
    per split, the test split evaluated after the validation split (the recipe's order, its default on GPUs) would
    be the validation split again."""
    splits = apply_transforms(digit_splits(), "image", "label", resize_size=16, crop_size=12, cache_root=tmp_path)
    validation, test = splits["validation"], splits["train"]  # 4 and 12 images
    trainer = ImageRifleTrainer(
        model=native_resnet(),
        args=RifleConfigLike(tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True),
        pixel_mean=MEAN,
        pixel_std=STD,
        eval_dataset=validation,
        data_collator=collate_fn,
        compute_metrics=lambda predictions: {"images": len(predictions.label_ids)},
    )
    assert trainer.evaluate()["eval_images"] == 4
    assert trainer.evaluate(test, metric_key_prefix="test")["test_images"] == 12
    assert trainer.evaluate()["eval_images"] == 4
    assert trainer.get_eval_dataloader() is trainer.get_eval_dataloader(validation)  # the workers still persist


def test_cnns_are_told_from_vision_transformers():
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, image_size=32, patch_size=8
        )
    )
    assert is_convolutional(native_resnet()) and not is_convolutional(vit)


def test_cached_images_survive_pickling_without_copying_the_pixels(tmp_path):
    import pickle

    rows = digit_splits()["train"].cast_column("image", datasets.Image(decode=False))
    cache = cached_images("train", rows, "image", PrepareImage(16), tmp_path, 10**9)
    cache[0]  # maps the pixels
    restored = pickle.loads(pickle.dumps(cache))
    assert isinstance(restored, CachedImages) and restored._pixels is None
    assert torch.equal(restored[5], cache[5])


def test_building_the_cache_leaves_the_global_random_stream_alone(tmp_path):
    """A run that builds the cache and one that finds it draw the same new head afterwards."""
    state = torch.random.get_rng_state()
    apply_transforms(digit_splits(), "image", "label", 16, 12, cache_root=tmp_path, cache_max_bytes=10**9)
    assert torch.equal(torch.random.get_rng_state(), state)
