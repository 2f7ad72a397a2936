"""Under torchrun: a plain DDP loop with `attach(..., reinit_when="fitted")` on the tiny classifier, each rank on its
half of every batch (argv: OUTPUT_DIR STOP). It trains the whole run, then trains to step STOP, saves rank 0's model
and optimizer state as Trainer does, and resumes from it on every rank; each rank records both runs' decisions and
weights for the test to compare."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers import TinyClassifier, fit_batch, learnable_then_random  # noqa: E402

from hf_rifle import attach  # noqa: E402

MAX_STEPS = 30


def train(steps, state_file=None):
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rifle = attach(model, optimizer, MAX_STEPS, reinit_when="fitted")  # before loading: as the docs say
    if state_file is not None:
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    ddp = nn.parallel.DistributedDataParallel(model)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for step in steps:
        inputs, labels = fit_batch(step, learnable_then_random(step), rank, world_size)
        nn.functional.cross_entropy(ddp(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, rifle


if __name__ == "__main__":
    output_dir, stop = Path(sys.argv[1]), int(sys.argv[2])
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    full_model, _, full = train(range(MAX_STEPS))
    first_model, first_optimizer, _ = train(range(stop))
    state_file = output_dir / "checkpoint.pt"
    if rank == 0:
        torch.save({"model": first_model.state_dict(), "optimizer": first_optimizer.state_dict()}, state_file)
    torch.distributed.barrier()
    resumed_model, _, resumed = train(range(stop, MAX_STEPS), state_file)
    torch.save(
        {
            "full": {"decisions": full.state_dict()["decisions"], "weights": full_model.state_dict()},
            "resumed": {"decisions": resumed.state_dict()["decisions"], "weights": resumed_model.state_dict()},
        },
        output_dir / f"rank{rank}.pt",
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
