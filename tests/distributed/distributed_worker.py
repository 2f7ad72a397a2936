"""Run the recipe under torchrun and record, on each rank, fingerprints of the head after every re-init
and of the model's parameters at the end, so the test can compare ranks."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_rifle import find_head
from hf_rifle.recipe import main


def fingerprint(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Fingerprints(TrainerCallback):
    def __init__(self):
        self.heads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # After this step's re-init (on_step_begin), before the optimizer touches the fresh head.
        self.heads[state.global_step] = fingerprint(find_head(model)[1].parameters())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = torch.distributed.get_rank()
        # Parameters only: batch norm's running statistics are each rank's own after its last forward (DDP
        # broadcasts rank 0's at the start of every forward), and the saved model holds rank 0's.
        record = {"heads": self.heads, "model": fingerprint(model.parameters()), "max_steps": state.max_steps}
        Path(args.output_dir, f"fingerprints-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:], callbacks=[Fingerprints()])
