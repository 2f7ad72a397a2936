"""`attach` on a model sharded by FSDP2 (`fully_shard`, DTensor parameters) is refused when it is called, on every
rank, with the fix named; it used to train and then fail at the first planned re-init ("FSDP does not support
deepcopy"). Real processes: torchrun, 2 ranks, gloo on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_rifle.sharding import check_not_sharded, sharding_of

from ..helpers import TinyClassifier

WORKER = Path(__file__).with_name("attach_fsdp_worker.py")


def test_a_model_on_one_device_is_not_sharded():
    model = TinyClassifier()
    assert sharding_of(model) is None
    check_not_sharded(model)  # no error


@pytest.mark.multiprocess
@pytest.mark.slow
def test_attach_refuses_a_fully_sharded_model_at_the_call_on_every_rank(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(WORKER), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        refused = result["fsdp2"]["refused"]
        assert refused is not None, "attach took an FSDP2-sharded model"
        assert "fully_shard" in refused and "DistributedDataParallel" in refused, refused
        assert "supports single-device and DDP" in refused, refused
        # The supported setup on the same machines still attaches and re-draws the head at its planned step.
        assert result["ddp"] == {"step": 3, "redrawn": [2]}
