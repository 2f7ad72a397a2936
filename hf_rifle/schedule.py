"""Period arithmetic and the head's cyclic learning-rate curve (pure functions).

RIFLE splits the T optimizer steps of a run into K equal periods. The head is re-initialized when a period
begins and its learning rate follows a cosine that restarts every period; everything here is a function of
the optimizer step, so a resumed run recomputes the same schedule from `global_step` alone.
"""

import math
from bisect import bisect_right
from dataclasses import dataclass

# docs/benchmarks.md, "When does RIFLE help": over K in {2, 3, 5} x {12, 24, 40} epochs, every cell with periods
# under 5 epochs lost to plain fine-tuning (-2.9 to -31 points), 6 epochs lost 2.1, 8 and more tied; below this many
# epochs per period the fresh head may not fit again before the next re-init.
MIN_EPOCHS_PER_PERIOD = 8
SHORT_PERIOD_WARNING = (
    "RIFLE periods of {epochs:.1f} epochs ({num_train_epochs:g} epochs / K={num_periods}): the re-drawn head may not "
    "fit again before the next re-initialization. On few-shot digits (K in 2, 3, 5 x 12, 24, 40 epochs, 10 seeds), "
    "periods under 5 epochs left RIFLE 3 to 31 points behind plain fine-tuning, 6 epochs 2 points, and periods of 8 "
    "or more tied (docs/benchmarks.md, 'When does RIFLE help'). Train longer or lower num_periods (at least "
    f"{MIN_EPOCHS_PER_PERIOD} epochs per period)."
)


def period_starts(max_steps: int, num_periods: int) -> list[int]:
    """Optimizer step at which each period begins: floor(k * T / K) for k = 0..K-1.

    When the run is epoch-based and K divides the epoch count these are epoch starts, as in the authors'
    code. K <= T guarantees distinct starts and at least one optimizer step after the last re-init, so a
    run never ends on a freshly drawn head.
    """
    if num_periods < 1:
        raise ValueError(f"num_periods must be >= 1, got {num_periods}: use 1 to turn RIFLE's periods off.")
    if max_steps < num_periods:
        raise ValueError(
            f"num_periods={num_periods} is more than the run's {max_steps} optimizer steps: every period needs "
            "at least one step. Lower num_periods or train for more steps."
        )
    return [k * max_steps // num_periods for k in range(num_periods)]


def reinit_steps(max_steps: int, num_periods: int) -> list[int]:
    """Steps at which the head is re-initialized: the starts of periods 2..K (never step 0)."""
    return period_starts(max_steps, num_periods)[1:]


def position_in_period(step: int, max_steps: int, num_periods: int) -> tuple[int, int, int]:
    """(period index k from 0, steps tau since that period began, its length P) for optimizer step `step`.

    Steps at or past `max_steps` (the scheduler is stepped once after the last update) count as the end of
    the last period.
    """
    bounds = period_starts(max_steps, num_periods) + [max_steps]
    period = min(max(bisect_right(bounds, step) - 1, 0), num_periods - 1)
    length = bounds[period + 1] - bounds[period]
    return period, min(step - bounds[period], length), length


def cyclic_cosine_factor(step: int, max_steps: int, num_periods: int) -> float:
    """Head learning-rate multiplier 0.5 * (1 + cos(pi * tau / P)).

    Algorithm 1 of the paper prints cos(2*pi*tau/P), which would climb back to eta_max by the end of each
    period; the authors' code uses pi, so every period anneals the fresh head to ~0 before the next
    re-init. We follow the code.
    """
    _, tau, length = position_in_period(step, max_steps, num_periods)
    return 0.5 * (1.0 + math.cos(math.pi * tau / length))


def head_lr_factor(step: int, max_steps: int, num_periods: int, trainer_lr_is_zero: bool = False) -> float:
    """The head's learning rate at optimizer step `step`, as a fraction of the peak learning rate.

    The cyclic cosine, except at a step where the Trainer's own learning rate is 0 (for transformers'
    schedules: the first step of a warmup), where the head does not move either. The callback cannot do
    otherwise (it rescales the head's update, and a zero update stays zero), and `RifleTrainer` follows the
    same rule, so both paths train the same weights.
    """
    return 0.0 if trainer_lr_is_zero else cyclic_cosine_factor(step, max_steps, num_periods)


@dataclass
class CyclicCosineSchedule:
    """`LambdaLR` multiplier for the head's param groups: `head_lr_factor`, where the Trainer's schedule is 0 only
    at the first step of a warmup (`warmup_steps > 0`).

    A dataclass rather than a closure so `LambdaLR.state_dict()` saves its fields into checkpoints.
    """

    max_steps: int
    num_periods: int
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        return head_lr_factor(step, self.max_steps, self.num_periods, trainer_lr_is_zero=step == 0 < self.warmup_steps)


@dataclass(frozen=True)
class RunShape:
    """What a run's optimizer steps are made of. RIFLE's periods (and the learning-rate schedules) are defined on
    `max_steps`, which a resume with another number of processes, batch size or accumulation would change."""

    max_steps: int
    processes: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int

    @property
    def samples_per_step(self) -> int:
        return self.processes * self.per_device_train_batch_size * self.gradient_accumulation_steps

    def describe(self) -> str:
        return (
            f"{self.processes} process{'es' if self.processes > 1 else ''} x batch {self.per_device_train_batch_size} "
            f"x accumulation {self.gradient_accumulation_steps} = {self.samples_per_step} samples per step"
        )


def check_resumed_shape(saved: RunShape, resumed: RunShape, num_periods: int) -> None:
    """Refuse a resume whose run would have another number of optimizer steps than the run it continues, naming
    what changed and the settings that keep the schedule."""
    if saved.max_steps == resumed.max_steps:
        return
    samples, processes = saved.samples_per_step, resumed.processes
    if samples % (processes * resumed.per_device_train_batch_size) == 0:
        fix = f"gradient_accumulation_steps={samples // (processes * resumed.per_device_train_batch_size)}"
    elif samples % processes == 0:
        fix = f"per_device_train_batch_size={samples // processes}, gradient_accumulation_steps=1"
    else:
        fix = f"a number of processes that divides {samples}"
    steps = ", ".join(map(str, reinit_steps(saved.max_steps, num_periods))) or "none"
    raise ValueError(
        f"The checkpoint being resumed comes from a run of {saved.max_steps} optimizer steps ({saved.describe()}); "
        f"this run would take {resumed.max_steps} ({resumed.describe()}). RIFLE's periods (head re-drawn at steps "
        f"{steps}) and the learning-rate schedules are defined on the first run's steps, so resuming like this would "
        f"add or skip re-initializations. Keep {samples} samples per optimizer step (with {processes} "
        f"process{'es' if processes > 1 else ''}: {fix}), or start over in a new output_dir."
    )


def short_period_warning(
    num_train_epochs: float, num_periods: int, reinit_head: bool = True, reinit_when: str = "always"
) -> str | None:
    """The warning for periods too short for a re-drawn head to fit again, or None. Not with reinit_when="fitted",
    whose fit test keeps a head that has not fit at each planned re-init and logs the numbers behind it."""
    epochs = num_train_epochs / num_periods
    if not reinit_head or reinit_when == "fitted" or num_periods == 1 or epochs >= MIN_EPOCHS_PER_PERIOD:
        return None
    return SHORT_PERIOD_WARNING.format(epochs=epochs, num_train_epochs=num_train_epochs, num_periods=num_periods)
