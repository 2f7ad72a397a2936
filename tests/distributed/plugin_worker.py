"""Under torchrun: train the tiny float64 model with plain Trainer + RifleTrainerCallback or with RifleTrainer
(argv: callback|rifle_trainer OUTPUT_DIR), and save rank 0's final weights for the test to compare."""

import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers import RandomImages, timm_wrapper_resnet, tiny_run_settings  # noqa: E402

from hf_rifle import RifleConfig, RifleTrainer, RifleTrainerCallback  # noqa: E402

METHOD = dict(num_periods=3, regularizer="l2sp", l2sp_alpha=0.5, l2sp_beta=0.1)
SETTINGS = dict(per_device_train_batch_size=2, max_steps=6, logging_steps=500)

if __name__ == "__main__":
    path, output_dir = sys.argv[1], sys.argv[2]
    model = timm_wrapper_resnet().double()
    data = RandomImages()
    data.images = data.images.double()
    if path == "callback":
        args = TrainingArguments(**tiny_run_settings(output_dir, **SETTINGS))
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RifleTrainerCallback(**METHOD)])
    else:
        trainer = RifleTrainer(
            model=model, args=RifleConfig(**tiny_run_settings(output_dir, **SETTINGS), **METHOD), train_dataset=data
        )
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save(model.state_dict(), Path(output_dir) / "weights.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
