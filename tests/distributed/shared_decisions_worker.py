"""Under torchrun, RifleTrainer on the tiny timm classifier (argv: MODE OUTPUT_DIR):

- `resume`: trains 6 steps with a checkpoint every 2, then TRIES times tears the newest checkpoint (its
  trainer_state.json removed, as a kill during a save leaves it) in a fresh copy and resumes with
  `train(resume_from_checkpoint=True)`; each rank writes the step it resumed from, per try. Then every rank calls
  `decided_by_main_process` with a decision that fails differently on each rank and writes the error it got.
- `nan`: trains with rank 1's images turning NaN from its 9th sample on (batch 2, accumulation 2: optimizer step 2);
  each rank writes the error it stopped with.
"""

import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers import RandomImages, timm_wrapper_resnet, tiny_run_settings  # noqa: E402

from hf_rifle import RifleConfig, RifleTrainer  # noqa: E402
from hf_rifle.checkpoints import decided_by_main_process  # noqa: E402

TRIES = 5
TORN = "checkpoint-6"


class RecordResumedStep(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        self.path.write_text(str(state.global_step))


class NanOnRankFrom(RandomImages):
    """RandomImages whose samples are NaN on `rank` from its `first`-th read on (reads happen in order, in this
    process: no loader workers)."""

    def __init__(self, rank: int, first: int, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.first, self.reads = rank, first, 0

    def __getitem__(self, i):
        item = super().__getitem__(i)
        self.reads += 1
        if dist.get_rank() == self.rank and self.reads >= self.first:
            item = {**item, "pixel_values": torch.full_like(item["pixel_values"], float("nan"))}
        return item


def trainer(output_dir: Path, data=None, callbacks=(), **overrides) -> RifleTrainer:
    settings = tiny_run_settings(output_dir, per_device_train_batch_size=2, num_periods=2, **overrides)
    args = RifleConfig(**settings)
    return RifleTrainer(
        model=timm_wrapper_resnet(), args=args, train_dataset=data or RandomImages(32), callbacks=list(callbacks)
    )


def resume(output_dir: Path) -> None:
    first = output_dir / "first"
    trainer(first, max_steps=6, save_strategy="steps", save_steps=2).train()  # sets up the process group
    rank = dist.get_rank()
    for attempt in range(TRIES):
        folder = output_dir / f"try{attempt}"
        if rank == 0:
            shutil.copytree(first, folder)
            (folder / TORN / "trainer_state.json").unlink()
        dist.barrier()
        record = RecordResumedStep(output_dir / f"resumed-try{attempt}-rank{rank}")
        trainer(folder, callbacks=[record], max_steps=6, save_strategy="steps", save_steps=2).train(
            resume_from_checkpoint=True
        )

    def fails_on_each_rank_differently():
        raise ValueError(f"decided on rank {rank}")

    try:
        decided_by_main_process(fails_on_each_rank_differently)
    except ValueError as error:
        (output_dir / f"decision-error-rank{rank}").write_text(str(error))


def nan(output_dir: Path) -> None:
    data = NanOnRankFrom(rank=1, first=9, size=32)
    try:
        trainer(output_dir, data, gradient_accumulation_steps=2, train_sampling_strategy="sequential").train()
    except FloatingPointError as error:
        (output_dir / f"error-rank{dist.get_rank()}").write_text(str(error))
        raise
    finally:  # every rank is here (they agreed): tear the group down while all are alive
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    mode, output_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "resume":
        resume(output_dir)
        dist.barrier()
        dist.destroy_process_group()
    else:
        nan(output_dir)
