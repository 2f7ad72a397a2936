"""What preemption handling costs per step, and how long a preempted run takes from the signal to its exit.

`agreement` (under `torchrun --nproc_per_node N`, or alone): every optimizer step, all ranks agree on whether any
received a signal, one all-reduce of a one-element tensor. It trains the same model on the same data with
preemption handling off and on, alternating in rounds (order rotating, a warm-up round left out, as
benchmarks/overhead.py does) in the same processes, and reports the median over rounds of each round's ratio of
median step times. It also times the agreement alone and reports (step + agreement) / step, which the noise
between rounds does not swamp.

    torchrun --standalone --nproc_per_node 2 benchmarks/preemption.py agreement --output results/x.json

`exit-time`: runs `hf-rifle-train` as a job does, sends SIGTERM once it has trained a few steps, and times the
signal to the process's exit (the rest of the step, the agreement, one checkpoint written and flushed). For the
offline demo (EfficientNet-Lite0, 56 px) and for ResNet-50 at 224 px (timm's architecture with random weights:
the time depends on the size of the model and its optimizer state, not on their values).

    python benchmarks/preemption.py exit-time --output results/y.json
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, TrainerCallback

from hf_rifle import RifleConfig, RifleTrainer
from hf_rifle.preemption import PREEMPTED_EXIT_CODE, any_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import SyntheticImages, machine_info  # noqa: E402

VARIANTS = ("off", "on")
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


class StepClock(TrainerCallback):
    """Seconds from one step's `on_step_begin` to the next's: everything a step costs, every callback's
    `on_step_end` (where the agreement runs) included."""

    def __init__(self):
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.starts, self.starts[1:])]


def train_round(variant: str, settings, output_dir: str) -> list[float]:
    torch.manual_seed(0)
    config = TimmWrapperConfig(architecture=settings.model, num_labels=10)
    model = TimmWrapperForImageClassification(config)
    data = SyntheticImages(settings.steps * settings.batch_size, settings.batch_size, settings.image_size, 10, 0)
    args = RifleConfig(
        output_dir=output_dir,
        use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=settings.batch_size,
        max_steps=settings.steps,
        num_periods=1,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        preemption_signals="SIGTERM,SIGUSR1" if variant == "on" else "none",
    )
    clock = StepClock()
    RifleTrainer(model=model, args=args, train_dataset=data, callbacks=[clock]).train()
    return clock.step_seconds()[settings.warmup_steps :]


def agreement(settings) -> dict:
    round_medians = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(settings.rounds + 1):
            order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                seconds = train_round(variant, settings, output_dir)
                if round_index > 0:  # the first round warms up
                    round_medians[variant].append(statistics.median(seconds))
    agree = []
    for _ in range(settings.agreement_repeats):
        started = time.perf_counter()
        any_rank(False, "cpu")
        agree.append(time.perf_counter() - started)
    ratios = [on / off for on, off in zip(round_medians["on"], round_medians["off"])]
    step = statistics.median(round_medians["off"])
    return {
        "processes": dist.get_world_size() if dist.is_initialized() else 1,
        "model": settings.model,
        "image_size": settings.image_size,
        "batch_size": settings.batch_size,
        "rounds": settings.rounds,
        "steps_per_round": settings.steps,
        "round_median_step_seconds": round_medians,
        "round_ratios_on_to_off": ratios,
        "ratio_on_to_off": statistics.median(ratios),
        "agreement_median_seconds": statistics.median(agree),
        "ratio_step_plus_agreement_to_step": 1 + statistics.median(agree) / step,
    }


def exit_time(recipe_argv: list[str], signal_after_steps: int) -> dict:
    """Start `hf-rifle-train recipe_argv`, send SIGTERM once `signal_after_steps` steps are logged, and time the
    signal to the "Preempted" line (the step finished and its checkpoint written) and to the exit; the steps
    logged before the signal give the time of one step."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(TRAIN_SCRIPT), *recipe_argv, "--logging_steps", "1", "--disable_tqdm", "True"]
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        logged = []
        for line in process.stdout:
            if line.startswith("{'loss'"):
                logged.append(time.time())
                if len(logged) == signal_after_steps:
                    break
        sent = time.time()
        process.send_signal(signal.SIGTERM)
        process.stdout.read()
        status = process.wait()
        exited = time.time()
        errors.seek(0)
        preempted = [line for line in errors if "Preempted (" in line]
    checkpoint_written = datetime.strptime(preempted[0][:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() if preempted else None
    return {
        "exit_status": status,
        "signal_after_steps": signal_after_steps,
        "step_seconds": statistics.median(later - earlier for earlier, later in zip(logged, logged[1:])),
        "seconds_to_checkpoint_written": checkpoint_written - sent if checkpoint_written else None,
        "seconds_to_exit": exited - sent,
    }


def exit_times(settings) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        resnet = Path(workdir, "resnet50.safetensors")
        save_file(timm.create_model("resnet50").state_dict(), resnet)
        cases = {
            "offline demo (EfficientNet-Lite0, 56 px, batch 16)": [],
            "ResNet-50, 224 px, batch 16": [
                "--model_name_or_path",
                str(resnet),
                "--timm_architecture",
                "resnet50",
                "--resize_size",
                "256",
                "--crop_size",
                "224",
            ],
        }
        for name, extra in cases.items():
            runs = [
                exit_time(["--output_dir", str(Path(workdir, f"{len(results)}-{after}")), *extra], after)
                for after in settings.signal_after_steps
            ]
            assert all(run["exit_status"] == PREEMPTED_EXIT_CODE for run in runs), runs
            results[name] = {
                "runs": runs,
                **{
                    f"{statistic}_{key}": function(run[key] for run in runs)
                    for key in ("step_seconds", "seconds_to_checkpoint_written", "seconds_to_exit")
                    for statistic, function in (("median", statistics.median), ("max", max))
                },
            }
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("agreement", "exit-time"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant and round")
    parser.add_argument("--warmup-steps", type=int, default=3, help="first steps of each run left out")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--agreement-repeats", type=int, default=2000)
    parser.add_argument("--signal-after-steps", type=int, nargs="+", default=[3, 4, 5])
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    settings = parse_args(argv)
    if settings.what == "agreement":
        result = {"agreement": agreement(settings)}
    else:
        result = {"exit_time": exit_times(settings)}
    result["machine"] = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized() or dist.get_rank() == 0:
        settings.output.parent.mkdir(parents=True, exist_ok=True)
        settings.output.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
