"""Tests run offline: nothing may reach the Hugging Face Hub. The datasets cache (and the recipe's image cache in
it) is the test session's own, so no test reads what an earlier session or a user's runs left there. torch runs one
thread per process (unless OMP_NUM_THREADS says otherwise): the tests train tiny models, which gain nothing from
more, and with a second thread a test runs about 10x slower whenever another process holds a core (measured on 2
cores: 1.7 s against 17 s for two of tests/core/test_checkpoints.py)."""

import os
import tempfile

# Before anything imports torch, huggingface_hub or datasets, which read these once, at import; the processes tests
# start inherit them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_rifle-tests-datasets-"))

import logging

import pytest
import torch

from .helpers import save_timm_hub_folder, write_image_folders


@pytest.fixture(autouse=True)
def process_wide_settings_restored():
    """Benchmarks and scripts that tests run in-process set process-wide state (torch's thread count, a logger's
    level); each test gets it back as it found it, so no later test runs slower or misses a warning."""
    threads, level = torch.get_num_threads(), logging.getLogger("hf_rifle").level
    yield
    torch.set_num_threads(threads)
    logging.getLogger("hf_rifle").setLevel(level)


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    """Image folders (12 training images per class, 2 for validation and test) and a tiny timm model saved as the
    Hub holds it, for a module's recipe runs."""
    root = tmp_path_factory.mktemp("recipe-data")
    folders = write_image_folders(root / "images", sizes={"train": 12, "validation": 2, "test": 2})
    return folders, save_timm_hub_folder(root / "model")
