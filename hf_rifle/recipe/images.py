"""Images from file to batch as uint8: decoding, the resized-image cache, crops and flips, normalization on device.

The paper's regime is many epochs (40) over a few thousand images, so each image is decoded and resized once,
stored as uint8 in a memory-mapped cache that later epochs and later runs on the same data reuse (keyed by the
dataset's fingerprint and the resize settings), and only the random crop and flip run per epoch, on uint8 tensors.
Batches stay uint8 (a quarter of float32's bytes through the loader and the host-to-device copy) and are
converted and normalized on the training device by `normalize_pixels`.

Every value a model sees equals the per-image PIL path (resize the shorter side, crop, flip) within one uint8
step: torchvision's antialiased uint8 resize follows PIL's, and libjpeg-turbo decodes as PIL does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from ..trainer import RifleTrainer

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what a cache folder holds changes
CACHE_ROOT_NAME = "hf_rifle-images"
JPEG_MAGIC = b"\xff\xd8\xff"
# A staging folder untouched this long belongs to a dead build wherever it ran: a build writes its pixels file
# continuously, and even a split of millions of images is cached within hours.
STALE_STAGING_SECONDS = 24 * 3600
STAGING_INFIX = ".staging-"  # <cache folder>.staging-<host>-<pid>
_PIL_DECODER = datasets.Image()


def decode_rgb(encoded: dict) -> torch.Tensor:
    """Decode one `{"bytes", "path"}` value to a uint8 RGB tensor (3, H, W); an unreadable file raises naming it.

    JPEGs are decoded by libjpeg-turbo (`torchvision.io.decode_jpeg`, about twice PIL's speed with its conversions),
    everything else, and any JPEG that libjpeg-turbo refuses (truncated, CMYK), by PIL as `datasets` decodes it.
    Both apply the EXIF orientation, as `datasets` does.
    """
    data = _encoded_bytes(encoded)
    if data is not None and data[:3] == JPEG_MAGIC:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
                warnings.simplefilter("ignore", DeprecationWarning)
                image = decode_jpeg(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8),
                    mode=ImageReadMode.UNCHANGED,
                    apply_exif_orientation=True,
                )
            if image.shape[0] in (1, 3):
                return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image
        except RuntimeError:
            pass  # PIL decides, and names the problem
    if data is not None:  # read once: PIL decodes the bytes in hand
        encoded = {"path": encoded.get("path"), "bytes": data}
    try:
        return F.pil_to_tensor(_PIL_DECODER.decode_example(encoded).convert("RGB"))
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        where = encoded.get("path") or "(stored as bytes without a file name)"
        raise OSError(f"Cannot read image {where}: {error}. Replace or delete this file and run again.") from error


def _encoded_bytes(encoded: dict) -> bytes | None:
    if encoded.get("bytes") is not None:
        return encoded["bytes"]
    path = encoded.get("path")
    return Path(path).read_bytes() if path and os.path.isfile(path) else None


class PrepareImage:
    """The deterministic part of the transforms, what the cache stores: decode, resize the shorter side to
    `resize_size` (antialiased, as PIL), and for evaluation splits the center crop of `crop_size`."""

    def __init__(self, resize_size: int, center_crop: int | None = None):
        self.resize_size, self.center_crop = resize_size, center_crop

    def __call__(self, encoded: dict) -> torch.Tensor:
        image = F.resize(decode_rgb(encoded), self.resize_size, antialias=True)
        return F.center_crop(image, self.center_crop) if self.center_crop else image

    def describe(self) -> dict:
        return {"resize_size": self.resize_size, "center_crop": self.center_crop, "resize": "bilinear-antialias"}


class RandomCropAndFlip:
    """The paper's training augmentation on a prepared uint8 image: a uniformly placed `crop_size` square and a
    horizontal flip with probability 1/2, drawn from torch's default generator (which `EpochSeededDataset` seeds
    per epoch and row). The crop is a view; only a flip copies."""

    def __init__(self, crop_size: int):
        self.crop_size = crop_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top = int(torch.randint(0, height - self.crop_size + 1, ()))
        left = int(torch.randint(0, width - self.crop_size + 1, ()))
        crop = image[..., top : top + self.crop_size, left : left + self.crop_size]
        return crop.contiguous().flip(-1) if torch.rand(()) < 0.5 else crop  # flips a contiguous copy ~3x faster


class CenterCrop:
    """The center `crop_size` square of a prepared uint8 image: what evaluation sees of a training image."""

    def __init__(self, crop_size: int):
        self.crop_size = crop_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return F.center_crop(image, self.crop_size)


def normalize_pixels(
    pixels: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32, channels_last: bool = False
) -> torch.Tensor:
    """uint8 batch (N, 3, H, W) -> normalized float, on the device `pixels` are on; floats pass through unchanged."""
    if pixels.dtype != torch.uint8:
        return pixels
    mean = torch.as_tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    scale, shift = (1 / (255 * std)).to(pixels.device, dtype), (-mean / std).to(pixels.device, dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # (x / 255 - mean) / std as one conversion and two in-place passes: no temporaries the size of the batch
    return pixels.to(dtype, memory_format=memory_format).mul_(scale).add_(shift)


def is_convolutional(model: torch.nn.Module) -> bool:
    """A CNN (several 2-D convolutions), not a vision transformer whose one convolution is its patch embedding."""
    return sum(isinstance(module, torch.nn.Conv2d) for module in model.modules()) > 1


class NormalizingCollator:
    """A collator whose batches are normalized float pixels, for a plain `Trainer` (the recipe's own trainer
    normalizes on the device instead)."""

    def __init__(self, collator, mean, std):
        self.collator, self.mean, self.std = collator, list(mean), list(std)

    def __call__(self, rows):
        batch = self.collator(rows)
        return {**batch, "pixel_values": normalize_pixels(batch["pixel_values"], self.mean, self.std)}


class CachedImages:
    """One split's prepared images in a cache folder: `pixels.u8` (all images back to back), `index.npy` (offset,
    height, width per row; height 0 marks an unreadable image) and `unreadable.json` (row, file, error).

    The pixels are memory-mapped when first read, so DataLoader workers share the page cache instead of copies.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = np.load(self.folder / "index.npy")
        self.unreadable = json.loads((self.folder / "unreadable.json").read_text())
        self._pixels = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> torch.Tensor | None:
        offset, height, width = (int(value) for value in self.index[row])
        if height == 0:
            return None
        if self._pixels is None:  # copy-on-write: the tensors are views of the file, and writing to one is safe
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="c")
        return torch.from_numpy(self._pixels[offset : offset + 3 * height * width].reshape(3, height, width))

    def __getstate__(self) -> dict:  # a worker maps the file itself rather than receiving a pickled copy
        return {**self.__dict__, "_pixels": None}


def default_cache_root(cache_dir: str | None = None) -> Path:
    """`<cache_dir or the datasets cache>/hf_rifle-images`."""
    return Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / CACHE_ROOT_NAME


def cache_key(rows: datasets.Dataset, image_column: str, prepare: PrepareImage) -> str:
    """The dataset's fingerprint (it changes with the data, the files and every selection) and the settings."""
    described = {"fingerprint": rows._fingerprint, "column": image_column, "format": CACHE_FORMAT, **prepare.describe()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def cached_images(
    split_name: str,
    rows: datasets.Dataset,
    image_column: str,
    prepare: PrepareImage,
    cache_root: Path,
    max_bytes: int,
    num_workers: int = 0,
) -> CachedImages | None:
    """The split's prepared images, from the cache or built into it now; None (decode on the fly) when the
    cache would exceed `max_bytes` or the free disk space, with a warning that says so.

    A cache is built in a private staging folder, named by host and process id, and renamed into place when
    complete, so a run killed while building leaves no cache that a later run could half-read, and two runs building
    the same cache (two launchers on the machines of a cluster sharing one cache folder) both end with one
    complete cache. A leftover staging folder is removed only when it provably belongs to a dead build
    (`is_dead_build`). `rows` must hold the images undecoded (`datasets.Image(decode=False)`).
    """
    folder = Path(cache_root) / cache_key(rows, image_column, prepare)
    if (folder / "index.npy").is_file():
        return CachedImages(folder)
    estimate = _estimated_bytes(rows, image_column, prepare)
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if estimate > max_bytes or estimate > 0.9 * free:
        limit = "--image_cache_max_gb" if estimate > max_bytes else f"the free disk space ({free / 1e9:.1f} GB)"
        logger.warning(
            "Not caching the %s split's resized images: about %.1f GB would exceed %s. Images are decoded and resized "
            "on the fly, every epoch (slower). Raise --image_cache_max_gb or free disk space to cache them.",
            split_name,
            estimate / 1e9,
            limit,
        )
        return None
    logger.info("Caching the %s split (%d images, resized) in %s for later runs too", split_name, len(rows), folder)
    host = _host_name()
    for leftover in folder.parent.glob(f"{folder.name}{STAGING_INFIX}*"):  # of builds killed midway
        if is_dead_build(leftover, host, time.time()):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = folder.with_name(f"{folder.name}{STAGING_INFIX}{host}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # this host and process id are ours: an earlier holder is dead
    try:
        built = _build(staging, rows, image_column, prepare, max_bytes, num_workers)
        if built:
            try:
                staging.rename(folder)
            except OSError:  # another run completed the same cache first
                if not (folder / "index.npy").is_file():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not built:
        logger.warning(
            "Not caching the %s split's resized images: they exceed --image_cache_max_gb; decoding on the fly.",
            split_name,
        )
        return None
    return CachedImages(folder)


def _host_name() -> str:
    """This machine's name as it can appear in a folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "unknown-host"


def staging_owner(staging: Path) -> tuple[str | None, int] | None:
    """(host, pid) from a staging folder's name; host None for the names of hf_rifle before hosts were recorded
    (`<key>.staging-<pid>`); None for a name that is neither."""
    owner = staging.name.split(STAGING_INFIX, 1)[-1]
    host, _, pid = owner.rpartition("-")
    if not pid.isdigit():
        return None
    return (host or None), int(pid)


def is_dead_build(staging: Path, host: str, now: float) -> bool:
    """Whether `staging` provably belongs to a build that is no longer running, so removing it harms no one.

    A process id means something only on its own machine: a build is dead when it ran on this host and its process
    is gone, or, wherever it ran, when nothing in its folder changed for `STALE_STAGING_SECONDS`. A build on another
    machine sharing the cache folder (a cluster's shared `HF_HOME`) is otherwise left alone, however its process id
    reads here.
    """
    try:
        changed = max([staging.stat().st_mtime, *(path.stat().st_mtime for path in staging.iterdir())])
    except OSError:  # removed meanwhile, by its build's end or another run
        return False
    if now - changed > STALE_STAGING_SECONDS:
        return True
    owner = staging_owner(staging)
    return owner is not None and owner[0] == host and not _process_alive(owner[1])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _estimated_bytes(rows, image_column, prepare, sample_size: int = 16) -> int:
    """Bytes of the whole split's prepared images, extrapolated from its first few readable ones."""
    sizes = []
    for encoded in rows.select(range(min(sample_size, len(rows))))[image_column]:
        try:
            sizes.append(prepare(encoded).numel())
        except OSError:
            pass
    return int(np.mean(sizes) * len(rows)) if sizes else 0


class _PreparedRows(torch.utils.data.Dataset):
    """(row, prepared image or the reason it is unreadable), for building a cache with DataLoader workers."""

    def __init__(self, rows, image_column, prepare):
        self.rows, self.image_column, self.prepare = rows, image_column, prepare

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int):
        encoded = self.rows[row][self.image_column]
        try:
            return row, self.prepare(encoded), None
        except OSError as error:
            return row, None, {"row": row, "file": encoded.get("path"), "error": str(error)}


def _build(staging: Path, rows, image_column, prepare, max_bytes: int, num_workers: int) -> bool:
    """Write the cache files into `staging`; False when the images outgrow `max_bytes` (the estimate was low)."""
    staging.mkdir(parents=True)
    index = np.zeros((len(rows), 3), dtype=np.int64)
    unreadable, offset = [], 0
    loader = torch.utils.data.DataLoader(
        _PreparedRows(rows, image_column, prepare), batch_size=None, num_workers=num_workers
    )
    # fork_rng: the loader draws its workers' seed from torch's global generator, and whether a run builds the
    # cache or finds it must not change the random draws that follow (the new head's, for one).
    with torch.random.fork_rng(devices=[]), open(staging / "pixels.u8", "wb") as pixels:
        for row, image, problem in loader:
            if image is None:
                unreadable.append(problem)
                continue
            if offset + image.numel() > max_bytes:
                return False
            pixels.write(image.numpy().tobytes())
            index[row] = (offset, image.shape[1], image.shape[2])
            offset += image.numel()
        pixels.flush()
        os.fsync(pixels.fileno())
    (staging / "unreadable.json").write_text(json.dumps(unreadable))
    np.save(staging / "index.npy", index)  # written last: its presence marks a complete cache
    return True


class ImageRifleTrainer(RifleTrainer):
    """`RifleTrainer` fed uint8 image batches: `pixel_values` are converted and normalized on the training device,
    after the batch was moved there, for training, evaluation and prediction alike (float batches pass through)."""

    def __init__(self, *args, pixel_mean, pixel_std, channels_last: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pixel_mean, self.pixel_std, self.channels_last = list(pixel_mean), list(pixel_std), channels_last
        self._split_loaders = []  # (dataset, its evaluation loader) while workers persist

    def get_eval_dataloader(self, eval_dataset=None):
        """One evaluation loader per split. With persistent workers (the recipe's default on GPUs) transformers keeps
        the loader of every dataset passed in under one key, so evaluating the test split after the validation split
        would read the validation split again."""
        if isinstance(eval_dataset, str) or not self.args.dataloader_persistent_workers:
            return super().get_eval_dataloader(eval_dataset)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        for split, loader in self._split_loaders:
            if split is dataset:
                return loader
        getattr(self, "_eval_dataloaders", {}).pop("eval", None)  # transformers' loader of another split
        loader = super().get_eval_dataloader(dataset)
        self._split_loaders.append((dataset, loader))
        return loader

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = normalize_pixels(
                inputs["pixel_values"], self.pixel_mean, self.pixel_std, channels_last=self.channels_last
            )
        return inputs
