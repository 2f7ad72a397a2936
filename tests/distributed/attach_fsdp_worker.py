"""Under torchrun: `attach` on the tiny classifier sharded by FSDP2 (`fully_shard` on its head, then on the whole
model, as FSDP2's docs order it) must be refused at the call; the same model under DDP attaches and trains past its
first re-init. Each rank writes what happened to OUTPUT_DIR/rank{rank}.json (argv: OUTPUT_DIR)."""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers import TinyClassifier, fit_batch, learnable_then_random  # noqa: E402

from hf_rifle import attach, reinit_steps  # noqa: E402

MAX_STEPS, NUM_PERIODS = 6, 3


def sharded_attach(mesh) -> dict:
    model = TinyClassifier()
    fully_shard(model.fc, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    try:
        attach(model, optimizer, MAX_STEPS, num_periods=NUM_PERIODS)
    except ValueError as error:
        return {"refused": str(error)}
    return {"refused": None}


def ddp_run(rank: int, world_size: int) -> dict:
    """The supported way: attach on the bare model, DDP around it, trained past the first re-init."""
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rifle = attach(model, optimizer, MAX_STEPS, num_periods=NUM_PERIODS, reinit_when="always")
    ddp = nn.parallel.DistributedDataParallel(model)
    for step in range(reinit_steps(MAX_STEPS, NUM_PERIODS)[0] + 1):
        inputs, labels = fit_batch(step, learnable_then_random(step), rank, world_size)
        nn.functional.cross_entropy(ddp(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"step": rifle.step, "redrawn": [d.step for d in rifle.decisions if d.redrawn]}


if __name__ == "__main__":
    output_dir = Path(sys.argv[1])
    torch.distributed.init_process_group("gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    result = {"fsdp2": sharded_attach(init_device_mesh("cpu", (world_size,))), "ddp": ddp_run(rank, world_size)}
    (output_dir / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
