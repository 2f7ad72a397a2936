"""Run the recipe on argv[1:] as a job a cluster may preempt: every optimizer step appends
`<pid> <step>` to `<output_dir>/progress-rank<rank>`, so a test can send real signals to chosen processes at a
chosen point of training; each step takes at least `STEP_SECONDS`, so a signal lands inside a step."""

import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from hf_rifle.recipe import main

STEP_SECONDS = 0.2


class Progress(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(STEP_SECONDS)

    def on_step_end(self, args, state, control, **kwargs):
        path = Path(args.output_dir, f"progress-rank{args.process_index}")
        with open(path, "a") as progress:
            progress.write(f"{os.getpid()} {state.global_step}\n")


if __name__ == "__main__":
    main(sys.argv[1:], callbacks=[Progress()])
