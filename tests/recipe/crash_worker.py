"""Run the recipe on argv[2:] and SIGKILL this process at a chosen moment, as a pre-empted or OOM-killed job dies:

- `step:N`: right after optimizer step N, before anything else is written;
- `save:N`: half-way through writing checkpoint-N (its weights written, its optimizer file cut short).
- `none`: no kill.
"""

import os
import signal
import sys
from pathlib import Path

from transformers import Trainer, TrainerCallback

from hf_rifle.recipe import main


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_while_saving(step: int) -> None:
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def torn_save(self, output_dir):
        if self.state.global_step == step:
            Path(output_dir, "optimizer.pt").write_bytes(b"PK\x03\x04 half of an optimizer file")
            os.kill(os.getpid(), signal.SIGKILL)
        save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = torn_save


if __name__ == "__main__":
    moment, argv = sys.argv[1], sys.argv[2:]
    callbacks = []
    if moment.startswith("step:"):
        callbacks.append(KillAfterStep(int(moment.removeprefix("step:"))))
    elif moment.startswith("save:"):
        kill_while_saving(int(moment.removeprefix("save:")))
    main(argv, callbacks=callbacks)
