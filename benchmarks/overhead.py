"""What RIFLE costs on top of `transformers.Trainer`, measured side by side in one process.

Machines drift (clocks, other jobs), so absolute times mean little and only ratios count. The variants train
the same model from the same weights on the same data and seed, alternating in rounds so drift hits all of
them alike; each round's step times are compared with the plain Trainer's of that round. The order rotates
from round to round (A B C, B C A, C A B, ...): with a fixed order, whatever favours a place in the round
(the first run after the previous round's memory is freed, say) would read as a cost of the method.

    trainer          plain `Trainer`
    rifle_l2sp       `RifleTrainer`: re-init, cyclic head LR and L2-SP (`RifleConfig(regularizer="l2sp")`); the
                     head's learning rate comes from param groups of its own
    callback_l2      plain `Trainer` + `RifleTrainerCallback()`: re-init and cyclic head LR, the head's update
                     recorded before and rescaled after every optimizer step
    callback_l2sp    the same with `RifleTrainerCallback(regularizer="l2sp")`: also adds the L2-SP gradient
    rifle_l2sp_autograd  with `--l2sp-impl both`: the "before" of `rifle_l2sp`, the L2-SP penalty added to the
                         loss and differentiated by autograd (RifleTrainer adds its gradient directly)

Every variant uses SGD momentum 0.9 (the recipe's optimizer), no gradient clipping (`max_grad_norm=0`, as the
method needs) and no weight decay: the L2 of `regularizer="l2"` is the Trainer's own weight decay, which costs
the same with RIFLE as without, so leaving it out of all variants keeps RIFLE's cost alone in the ratios.

On a CPU shared with other jobs, elapsed time mostly measures their comings and goings: `--clock cpu` times
the process's CPU time instead, on one torch thread, which leaves out the time they hold the cores (not the
slower memory and caches they cause).

`--interleave steps` goes further: a round's runs train together, in threads that take turns one optimizer step
each (the order rotated every cycle), so the steps compared lie seconds apart instead of minutes; only one thread
runs at any time, so the process's CPU time is still the running step's. Memory is then not told apart per variant.

A warm-up round runs first and is left out (lazy initialization, allocator growth, cuDNN autotuning). In
each later run, the first `--warmup-steps` steps and the re-init steps (the same step indices for every variant) are
timed and kept in the JSON but left out of medians and ratios: a real run re-initializes K-1 times in
thousands of steps, so the ratios give the steady per-step cost and the re-init is timed on its own.

Besides training steps it times, alone, one head re-initialization, the callback's per-step head-update
rescaling (record before the optimizer step, rescale after) and the L2-SP gradient (added directly, and, with
`--l2sp-impl both`, by autograd through the penalty), and it measures memory: peak CUDA allocation per variant,
or on CPU the process RSS growth next to the exact bytes of the L2-SP reference copy, which is the extra memory
to expect.

    python benchmarks/overhead.py --model resnet50 --image-size 224 --batch-size 8 --device auto
"""

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import psutil
import torch
import transformers
from transformers import (
    PrinterCallback,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hf_rifle
from hf_rifle import (
    RifleConfig,
    RifleTrainer,
    RifleTrainerCallback,
    add_l2sp_gradient_,
    find_head,
    l2sp_penalty,
    reinit_head_at_period_start_,
    reinit_steps,
    split_backbone_and_head,
)
from hf_rifle.optim import record_head_update_, rescale_head_update_
from hf_rifle.regularizers import snapshot

# hf_rifle.attach is also the name of the function the package exports: the module, whose functions the hooks call.
ATTACH_MODULE = importlib.import_module("hf_rifle.attach")

BASELINE = "trainer"
# The full method on both paths, each held to --target-ratio.
TARGET_VARIANTS = ("rifle_l2sp", "callback_l2", "callback_l2sp")
VARIANT_LABELS = {
    "trainer": "Trainer",
    "rifle_l2sp": "RifleTrainer (RIFLE + L2-SP)",
    "callback_l2": "Trainer + RifleTrainerCallback (RIFLE + L2)",
    "callback_l2sp": "Trainer + RifleTrainerCallback (RIFLE + L2-SP)",
    "rifle_l2sp_autograd": "RifleTrainer, L2-SP by autograd (before)",
}
CALLBACK_REGULARIZERS = {"callback_l2": "l2", "callback_l2sp": "l2sp"}
LEARNING_RATE = 0.01
L2SP_STRENGTH = 0.01  # alpha and beta, in every variant and timing that adds L2-SP
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# wall: elapsed time. cpu: this process's CPU time, which leaves out the time other jobs hold a shared CPU's cores.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="resnet50", help="timm architecture, randomly initialized (small: resnet18, test_resnet)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-labels", type=int, default=100, help="classes of the new head")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of one run per variant; ratios are taken per round"
    )
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds run first and left out of the statistics")
    parser.add_argument(
        "--steps-per-round", type=int, default=6, help="optimizer steps of each variant's run in a round"
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="first steps of every run left out of the statistics"
    )
    parser.add_argument("--num-periods", type=int, default=2, help="RIFLE's K: each run re-initializes K-1 times")
    parser.add_argument(
        "--micro-repeats", type=int, default=10, help="repeats of each timing alone (re-init, rescaling, L2-SP)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu (with --device cpu): the process's CPU time on one torch thread, for a CPU "
        "shared with other jobs, whose turns on the cores would otherwise read as this run's time",
    )
    parser.add_argument(
        "--interleave",
        choices=("runs", "steps"),
        default="runs",
        help="runs: a round runs the variants one after another; steps: together, taking turns one step each",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    parser.add_argument("--channels-last", action="store_true", help="model in channels_last memory format")
    parser.add_argument(
        "--l2sp-impl",
        choices=("direct", "both"),
        default="direct",
        help="'both' also times the L2-SP penalty differentiated by autograd (the before), alone and in training",
    )
    parser.add_argument(
        "--target-ratio", type=float, default=1.02, help="step time / Trainer's to meet, for each full-method variant"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, help="JSON path; default benchmarks/results/overhead-<model>-<device>.json"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the ratio's spread needs at least two rounds.")
    if args.warmup_rounds < 0 or args.warmup_steps < 0 or not 1 <= args.num_periods <= args.steps_per_round:
        parser.error("--warmup-rounds/--warmup-steps must be >= 0, --num-periods between 1 and --steps-per-round.")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu needs --device cpu: the CPU time of a CUDA run leaves out the GPU's work.")
    if args.interleave == "steps" and args.l2sp_impl == "both":
        parser.error(
            "--l2sp-impl both needs --interleave runs: the autograd variant replaces a function of hf_rifle.attach for "
            "its run, which variants running at the same time would see too."
        )
    if not timed_step_indices(args):
        parser.error("No step is left to time after the warm-up and re-init steps: raise --steps-per-round.")
    return args


def timed_step_indices(settings: argparse.Namespace) -> list[int]:
    """Step indices that enter the statistics: past the warm-up, and not a re-init step."""
    skipped = set(range(settings.warmup_steps)) | set(reinit_steps(settings.steps_per_round, settings.num_periods))
    return [step for step in range(settings.steps_per_round) if step not in skipped]


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device.")
    return choice


def build_model(architecture: str, num_labels: int, seed: int) -> TimmWrapperForImageClassification:
    """A randomly initialized timm classifier behind transformers' wrapper: the timing does not depend on
    the weights' values, and nothing is downloaded."""
    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=num_labels))


class SyntheticImages(torch.utils.data.Dataset):
    """Random images with labels as the dicts the Trainer's default collator stacks. One batch of pixels is
    reused, so a 224px dataset costs one batch of memory and no per-item generation time."""

    def __init__(self, length: int, batch_size: int, image_size: int, num_labels: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_labels, (length,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index % len(self.pixels)], "labels": self.labels[index]}


def synchronizer(device: str):
    """A function that waits for queued device work, so a timer reads finished work, not launched work."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def resident_bytes() -> int:
    return psutil.Process().memory_info().rss


class StepRecorder(TrainerCallback):
    """The time (`--clock`) of each optimizer step, from `on_step_begin` to `on_step_end`: forward, backward,
    optimizer, scheduler and the callbacks registered after this one (so RIFLE's re-init counts, data loading does
    not). On CPU it also keeps the largest RSS seen at a step's end, when gradients and temporaries are freed."""

    def __init__(self, device: str, clock: str, turns: "TurnTaking | None" = None, variant: str = ""):
        self.turns, self.variant = turns, variant  # with --interleave steps: each step waits for its turn
        self.synchronize = synchronizer(device)
        self.now = CLOCKS[clock]
        self.record_rss = device == "cpu"
        self.step_seconds: list[float] = []
        self.peak_rss = 0
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.turns is not None:
            self.turns.pass_turn(self.variant)
            self.turns.wait_for_turn(self.variant)
        self.synchronize()
        self._started = self.now()

    def on_step_end(self, args, state, control, **kwargs):
        self.synchronize()
        self.step_seconds.append(self.now() - self._started)
        if self.record_rss:
            self.peak_rss = max(self.peak_rss, resident_bytes())


def training_kwargs(settings: argparse.Namespace, device: str, output_dir: str) -> dict:
    """Arguments every variant shares; set explicitly where `RifleConfig` and `TrainingArguments` differ
    (scheduler, clipping, weight decay), so the variants differ by the method alone."""
    return dict(
        output_dir=output_dir,
        max_steps=settings.steps_per_round,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=LEARNING_RATE,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,
        weight_decay=0.0,
        seed=settings.seed,
        bf16=settings.bf16,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def build_trainer(variant: str, model, dataset, settings, device: str, recorder: StepRecorder, output_dir: str):
    """The variant's trainer with `recorder` among its callbacks (`RifleTrainerCallback` moves itself first; its
    re-initialization steps are not timed)."""
    shared = training_kwargs(settings, device, output_dir)
    if variant in ("rifle_l2sp", "rifle_l2sp_autograd"):
        args = RifleConfig(
            **shared,
            num_periods=settings.num_periods,
            reinit_when="always",  # the paper's schedule: every planned re-init (and its cost) happens
            regularizer="l2sp",
            l2sp_alpha=L2SP_STRENGTH,
            l2sp_beta=L2SP_STRENGTH,
        )
        trainer_class = AutogradL2SPTrainer if variant == "rifle_l2sp_autograd" else RifleTrainer
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    else:
        callbacks = [recorder]
        if variant in CALLBACK_REGULARIZERS:
            callbacks.append(full_method_callback(CALLBACK_REGULARIZERS[variant], settings))
        trainer = Trainer(model=model, args=TrainingArguments(**shared), train_dataset=dataset, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-run metrics of every run
    return trainer


def full_method_callback(regularizer: str, settings) -> RifleTrainerCallback:
    """The callback as a user plugs it into a plain Trainer (re-init, cyclic head learning rate by rescaling the
    head's update) with the benchmark's K and L2-SP strengths, on the paper's schedule: every re-init happens."""
    return RifleTrainerCallback(
        num_periods=settings.num_periods,
        reinit_when="always",
        regularizer=regularizer,
        l2sp_alpha=L2SP_STRENGTH,
        l2sp_beta=L2SP_STRENGTH,
    )


def prepare_model(template, settings, device: str):
    """A fresh copy of the starting model per run: identical weights, and nothing (accelerate's forward
    wrappers, re-drawn heads) carried over from an earlier run."""
    model = copy.deepcopy(template).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def release_memory(device: str) -> None:
    """Free the previous run's trainer, model and optimizer, so the next run's memory reading is its own."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(variant: str, template, dataset, settings, device: str, turns=None) -> tuple[list[float], int]:
    """Train one variant for one round; return its step times and its memory reading (peak CUDA
    allocation, or on CPU the RSS growth over the RSS before the run's model copy was made)."""
    release_memory(device)
    rss_before = resident_bytes()
    recorder = StepRecorder(device, settings.clock, turns, variant)
    direct_gradient = contextlib.nullcontext()
    if variant == "rifle_l2sp_autograd":  # its gradient comes from the loss; do not add it a second time
        direct_gradient = mock.patch.object(ATTACH_MODULE, "add_l2sp_gradient_", lambda *args: None)
    with tempfile.TemporaryDirectory() as output_dir, direct_gradient:
        model = prepare_model(template, settings, device)
        build_trainer(variant, model, dataset, settings, device, recorder, output_dir).train()
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else recorder.peak_rss - rss_before
    return recorder.step_seconds, memory


class AutogradL2SPTrainer(RifleTrainer):
    """REFERENCE ONLY, the "before": L2-SP as a term of the loss, its gradient left to autograd (the
    penalty's forward, its backward and the accumulation into .grad). Kept to show what adding the
    gradient directly (`hf_rifle.regularizers.add_l2sp_gradient_`) saves."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss + l2sp_penalty(*self.rifle.handle._l2sp)  # (backbone, reference, head, alpha, beta)


def time_repeats(function, settings, device: str, prepare=lambda: None) -> list[float]:
    """`--micro-repeats` timings (`--clock`) of `function()`, each after an untimed `prepare()`."""
    synchronize, now = synchronizer(device), CLOCKS[settings.clock]
    samples = []
    for _ in range(settings.micro_repeats):
        prepare()
        synchronize()
        started = now()
        function()
        synchronize()
        samples.append(now() - started)
    return samples


def time_reinit(model, settings, device: str) -> list[float]:
    """One re-initialization as the callback does it (`reinit_head_at_period_start_` at the first period
    boundary: find the head, re-draw it, drop its momentum). Momentum is re-created before each repeat so
    every repeat has state to drop."""
    _, head = find_head(model)
    optimizer = torch.optim.SGD(head.parameters(), lr=LEARNING_RATE, momentum=0.9)

    def give_head_momentum():
        for param in head.parameters():
            param.grad = torch.zeros_like(param)
        optimizer.step()

    step = reinit_steps(settings.steps_per_round, settings.num_periods)[0]

    def reinit():
        reinit_head_at_period_start_(
            model, optimizer, step, settings.steps_per_round, settings.num_periods, settings.seed
        )

    return time_repeats(reinit, settings, device, give_head_momentum)


def time_head_rescale(model, settings, device: str) -> list[float]:
    """The callback's per-step work for the head's learning rate, both halves: `record_head_update_` (find the
    head's groups, copy its parameters) before the optimizer step and `rescale_head_update_` after it. The
    optimizer holds the whole model, as the Trainer's does, at half the peak learning rate, as part-way through
    the Trainer's cosine; the head's, at a period start, is the peak, so its update is scaled by 2 (a scale of
    exactly 1 is skipped, and would time nothing)."""
    _, head = find_head(model)
    head_params = list(head.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE / 2, momentum=0.9)

    def record_and_rescale():
        updates = record_head_update_(
            optimizer, head_params, 0, settings.steps_per_round, settings.num_periods, LEARNING_RATE
        )
        rescale_head_update_(updates)

    return time_repeats(record_and_rescale, settings, device)


def time_l2sp_direct(backbone, reference, head, settings, device: str) -> list[float]:
    """`add_l2sp_gradient_` alone, into existing gradients, as both paths run it once per optimizer step."""
    return time_repeats(
        lambda: add_l2sp_gradient_(backbone, reference, head, L2SP_STRENGTH, L2SP_STRENGTH),
        settings,
        device,
        lambda: give_zero_gradients(backbone + head),
    )


def time_l2sp_autograd(backbone, reference, head, settings, device: str) -> list[float]:
    """The before: the penalty's forward and backward, accumulating into existing gradients."""
    return time_repeats(
        lambda: l2sp_penalty(backbone, reference, head, L2SP_STRENGTH, L2SP_STRENGTH).backward(),
        settings,
        device,
        lambda: give_zero_gradients(backbone + head),
    )


def give_zero_gradients(params) -> None:
    for param in params:
        param.grad = torch.zeros_like(param)


def spread(values: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def summarize_variant(step_seconds: list[list[float]], baseline_seconds: list[list[float]], settings) -> dict:
    """Median step time over the timed steps of all rounds, and per round the ratio of medians to the plain
    Trainer's (same step indices)."""
    indices = timed_step_indices(settings)
    timed = [[steps[i] for i in indices] for steps in step_seconds]
    baseline = [[steps[i] for i in indices] for steps in baseline_seconds]
    median_step = statistics.median(t for steps in timed for t in steps)
    ratios = [statistics.median(ours) / statistics.median(theirs) for ours, theirs in zip(timed, baseline)]
    return {
        "median_step_seconds": median_step,
        "images_per_second": settings.batch_size / median_step,
        "ratio_to_trainer": {"per_round": ratios, **spread(ratios)},
    }


def machine_info(device: str) -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_rifle": hf_rifle.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
    }


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timing(samples: list[float]) -> dict:
    return {"median_seconds": statistics.median(samples), "seconds": samples}


def measure_alone(template, settings, device: str) -> tuple[dict, dict]:
    """Re-init, head-update rescaling and L2-SP timings on one device copy of the model, plus the L2-SP
    reference's exact size."""
    model = prepare_model(template, settings, device)
    head_name, head = find_head(model)
    backbone, head_params = split_backbone_and_head(model, head)
    reference = snapshot(backbone)
    implementations = {"direct": time_l2sp_direct}
    if settings.l2sp_impl == "both":
        implementations["autograd_reference"] = time_l2sp_autograd
    l2sp = {"reference_bytes": sum(p.numel() * p.element_size() for p in reference)}
    for name, timer in implementations.items():
        l2sp[name] = timing(timer(backbone, reference, head_params, settings, device))
    if "autograd_reference" in l2sp:
        l2sp["speedup_over_autograd"] = l2sp["autograd_reference"]["median_seconds"] / l2sp["direct"]["median_seconds"]
    head_rescale = time_head_rescale(model, settings, device)
    reinit = time_reinit(model, settings, device)
    model_info = {
        "architecture": settings.model,
        "head_module": head_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "backbone_parameters": sum(p.numel() for p in backbone),
        "head_parameters": sum(p.numel() for p in head_params),
    }
    return model_info, {"reinit": timing(reinit), "head_rescale": timing(head_rescale), "l2sp": l2sp}


class TurnTaking:
    """Runs in threads taking turns, one optimizer step each, in the order `rotated` gives cycle after cycle; a
    thread runs only while it holds the turn (from the start of its step to the start of its next)."""

    def __init__(self, variants: list[str]):
        self.variants = variants
        self.unfinished = set(variants)
        self._turns = self._turn_sequence()
        self._turn = next(self._turns)
        self._condition = threading.Condition()

    def _turn_sequence(self):
        """Endless while any run is unfinished; a run that finished mid-cycle is skipped from then on."""
        for cycle in itertools.count():
            for variant in rotated(self.variants, cycle):
                if variant in self.unfinished:
                    yield variant

    def wait_for_turn(self, variant: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._turn == variant)

    def pass_turn(self, variant: str, finished: bool = False) -> None:
        with self._condition:
            if finished:
                self.unfinished.discard(variant)
            self._turn = next(self._turns) if self.unfinished else None
            self._condition.notify_all()


def run_round_interleaved(variants: list[str], template, dataset, settings, device: str) -> dict:
    """All variants' runs of one round, taking turns step by step: {variant: (step times, None)}. RifleTrainer
    runs in the main thread, the only one where Python lets its preemption handling install signal handlers."""
    turns = TurnTaking(variants)
    results, errors = {}, []

    def take_part(variant: str) -> None:
        turns.wait_for_turn(variant)
        try:
            results[variant] = (run_variant(variant, template, dataset, settings, device, turns)[0], None)
        except BaseException as error:  # raised in the main thread, once every run has ended
            errors.append(error)
        finally:
            turns.pass_turn(variant, finished=True)

    in_main_thread = "rifle_l2sp" if "rifle_l2sp" in variants else variants[0]
    threads = [threading.Thread(target=take_part, args=(v,)) for v in variants if v != in_main_thread]
    for thread in threads:
        thread.start()
    take_part(in_main_thread)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def memory_extra(readings: list, baseline: list) -> float | None:
    """The median extra memory over the plain Trainer's, or None where runs sharing a round are not told apart."""
    if None in readings + baseline:
        return None
    return statistics.median(readings) - statistics.median(baseline)


def rotated(variants: list[str], round_index: int) -> list[str]:
    """`variants` starting from the (round_index mod n)-th: over n rounds each variant runs once in each place."""
    start = round_index % len(variants)
    return variants[start:] + variants[:start]


def run_rounds(variants: list[str], template, settings, device: str) -> tuple[dict, dict, dict, list]:
    """Every variant once per round, the order rotated by one each round: step times and memory readings per
    measured round, the step times of the warm-up rounds, and the order of each measured round."""
    dataset = SyntheticImages(
        settings.steps_per_round * settings.batch_size,
        settings.batch_size,
        settings.image_size,
        settings.num_labels,
        settings.seed,
    )
    warmup_seconds = {variant: [] for variant in variants}
    step_seconds = {variant: [] for variant in variants}
    memory = {variant: [] for variant in variants}
    orders = []
    for round_index in range(-settings.warmup_rounds, settings.rounds):
        warmup = round_index < 0
        name = f"warm-up round {round_index + settings.warmup_rounds + 1}" if warmup else f"round {round_index + 1}"
        order = rotated(variants, round_index)
        if not warmup:
            orders.append(order)
        if settings.interleave == "steps":
            runs = run_round_interleaved(order, template, dataset, settings, device)
        else:
            runs = {variant: run_variant(variant, template, dataset, settings, device) for variant in order}
        for variant in order:
            seconds, memory_reading = runs[variant]
            if warmup:
                warmup_seconds[variant].append(seconds)
            else:
                step_seconds[variant].append(seconds)
                memory[variant].append(memory_reading)
            print(f"{name} {variant}: median step {statistics.median(seconds) * 1e3:.1f} ms", file=sys.stderr)
    release_memory(device)
    return step_seconds, memory, warmup_seconds, orders


def run(settings: argparse.Namespace) -> dict:
    """All rounds, then the timings alone; returns everything that goes into the JSON."""
    device = resolve_device(settings.device)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as image training scripts do; same for every variant
    if settings.clock == "cpu":
        # CPU time sums the process's threads, and a thread spinning while it waits for a partner that another job
        # took the core from would count as work: one thread's CPU time is the step's work alone.
        torch.set_num_threads(1)
    variants = [BASELINE, *TARGET_VARIANTS]
    if settings.l2sp_impl == "both":
        variants.append("rifle_l2sp_autograd")
    template = build_model(settings.model, settings.num_labels, settings.seed)
    step_seconds, memory, warmup_seconds, round_orders = run_rounds(variants, template, settings, device)
    model_info, alone = measure_alone(template, settings, device)

    results = {}
    for variant in variants:
        results[variant] = {
            "label": VARIANT_LABELS[variant],
            **summarize_variant(step_seconds[variant], step_seconds[BASELINE], settings),
            "memory_bytes_per_round": memory[variant],
            "memory_extra_over_trainer_bytes": memory_extra(memory[variant], memory[BASELINE]),
            "step_seconds": step_seconds[variant],
            "warmup_round_step_seconds": warmup_seconds[variant],
        }
    trainer_step = results[BASELINE]["median_step_seconds"]
    per_step_work = [alone["head_rescale"], *(alone["l2sp"].get(impl) for impl in ("direct", "autograd_reference"))]
    for entry in filter(None, per_step_work):
        entry["fraction_of_trainer_step"] = entry["median_seconds"] / trainer_step
    ratios = {variant: results[variant]["ratio_to_trainer"]["median"] for variant in TARGET_VARIANTS}
    return {
        "benchmark": "hf_rifle overhead",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(settings).items()},
        "timed_step_indices": timed_step_indices(settings),
        "round_orders": round_orders,
        "model": model_info,
        "memory_metric": "cuda_max_memory_allocated" if device == "cuda" else "cpu_rss_growth",
        "variants": results,
        **alone,
        "target": {
            "max_ratio": settings.target_ratio,
            "variants": {
                variant: {"ratio": ratio, "met": ratio <= settings.target_ratio} for variant, ratio in ratios.items()
            },
            "met": all(ratio <= settings.target_ratio for ratio in ratios.values()),
        },
    }


def mebibytes(reading, spec: str = ".1f") -> str:
    """A memory reading (bytes, or a list of per-round bytes: their median) for the table; '—' where none."""
    if isinstance(reading, list):
        reading = None if None in reading else statistics.median(reading)
    return "—" if reading is None else format(reading / 2**20, spec)


def markdown_report(result: dict) -> str:
    """The results as a Markdown table, with the timings alone and the target check underneath."""
    memory = "RSS growth" if result["memory_metric"] == "cpu_rss_growth" else "peak CUDA alloc"
    lines = [
        "| variant | median step (ms) | images/s | ratio to Trainer (median) | IQR | min–max "
        f"| {memory} (MiB) | extra (MiB) |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for variant in result["variants"].values():
        ratio = variant["ratio_to_trainer"]
        lines.append(
            f"| {variant['label']} | {variant['median_step_seconds'] * 1e3:.1f} | {variant['images_per_second']:.1f} "
            f"| {ratio['median']:.3f} | {ratio['q1']:.3f}–{ratio['q3']:.3f} | {ratio['min']:.3f}–{ratio['max']:.3f} "
            f"| {mebibytes(variant['memory_bytes_per_round'])} "
            f"| {mebibytes(variant['memory_extra_over_trainer_bytes'], '+.1f')} |"
        )
    l2sp, target, rescale = result["l2sp"], result["target"], result["head_rescale"]
    lines += [
        "",
        f"- one re-init (reinit_head_at_period_start_): {result['reinit']['median_seconds'] * 1e3:.2f} ms",
        f"- head-update rescaling (record_head_update_ + rescale_head_update_), alone: "
        f"{rescale['median_seconds'] * 1e3:.3f} ms = {rescale['fraction_of_trainer_step']:.3%} of a Trainer step",
        f"- L2-SP gradient added directly, alone: {l2sp['direct']['median_seconds'] * 1e3:.2f} ms "
        f"= {l2sp['direct']['fraction_of_trainer_step']:.2%} of a Trainer step",
    ]
    if "autograd_reference" in l2sp:
        autograd_ms = l2sp["autograd_reference"]["median_seconds"] * 1e3
        lines.append(
            f"- L2-SP by autograd through the penalty (before): {autograd_ms:.2f} ms "
            f"= {l2sp['autograd_reference']['fraction_of_trainer_step']:.2%}; direct is "
            f"{l2sp['speedup_over_autograd']:.2f}x as fast"
        )
    lines.append(f"- L2-SP reference copy (expected extra memory): {l2sp['reference_bytes'] / 2**20:.1f} MiB")
    for variant, check in target["variants"].items():
        lines.append(
            f"- target {VARIANT_LABELS[variant]} <= {target['max_ratio']}x Trainer: "
            f"{check['ratio']:.3f}x, {'met' if check['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    settings = parse_args(argv)
    result = run(settings)
    output = settings.output or RESULTS_DIR / f"overhead-{settings.model}-{result['machine']['device']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_report(result))
    print(f"\nwrote {output}")
    return result


if __name__ == "__main__":
    main()
