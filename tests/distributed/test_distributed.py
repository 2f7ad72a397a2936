"""A real 2-process data-parallel run of the recipe (gloo on CPU, through torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_rifle import reinit_steps

from ..helpers import recipe_flags, save_timm_hub_folder, write_image_folders

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_processes_keep_the_head_and_model_identical_on_both_ranks(tmp_path):
    folders = write_image_folders(tmp_path / "images", sizes={"train": 12, "validation": 2, "test": 2})
    output_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        *recipe_flags(
            output_dir,
            "--train_dir",
            str(folders["train"]),
            "--validation_dir",
            str(folders["validation"]),
            "--test_dir",
            str(folders["test"]),
            "--num_periods",
            "3",
            "--num_train_epochs",
            "3",
            "--model_name_or_path",
            str(save_timm_hub_folder(tmp_path / "model")),
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "terminate called" not in finished.stderr  # gloo's abort at exit, seen after otherwise good runs

    ranks = [json.loads((output_dir / f"fingerprints-rank{rank}.json").read_text()) for rank in (0, 1)]
    # 24 images, batch 4 on each of 2 ranks, 3 epochs: 9 steps when data-parallel (18 if each rank trained alone).
    assert ranks[0]["max_steps"] == 9
    steps = reinit_steps(ranks[0]["max_steps"], 3)
    assert len(steps) == 2 and all(str(step) in ranks[0]["heads"] for step in steps)
    assert ranks[0]["heads"] == ranks[1]["heads"]
    assert ranks[0]["model"] == ranks[1]["model"]
    assert (output_dir / "README.md").is_file()


PLUGIN_WORKER = Path(__file__).with_name("plugin_worker.py")


def test_two_processes_give_the_callback_path_rifle_trainers_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    weights = {}
    for path in ("callback", "rifle_trainer"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += [str(PLUGIN_WORKER), path, str(tmp_path / path)]
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert finished.returncode == 0, finished.stderr[-3000:]
        weights[path] = torch.load(tmp_path / path / "weights.pt", weights_only=True)
    for name, value in weights["callback"].items():
        torch.testing.assert_close(value, weights["rifle_trainer"][name], rtol=1e-8, atol=1e-8, msg=name)
