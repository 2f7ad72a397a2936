"""When a planned re-initialization goes ahead: `reinit_when="fitted"` re-draws the head only once it has fit.

The paper's premise (Sec. 3, Fig. 2) is that the new head fits the training set early, after which little gradient
reaches the deep layers, and a re-drawn head restarts that flow. Where the head has not fit when its period ends,
re-drawing it throws away a head that was still learning: our grid and timm's train.py with its default augmentation
lost 3 to 31 points that way (docs/benchmarks.md). So the premise is measured at each planned re-init instead of
assumed, as ReDo and continual backprop reset units on a measured statistic rather than on a clock.

The statistic is the head's *top-class loss* on the training batches of the last tenth of the period: -log of the
probability of its top class, the cross-entropy its predictions would have if each top class were the label, as a
fraction of a uniform guess's (log of the number of classes). It needs no labels, so every path computes it the same
way from the head's own output, `attach` included; on the batches of a head that has fit, whose top class is the
label, it is the training loss (over log C). 1 for a head that has learnt nothing, near 0 for a confident one.

A head that has fit is re-drawn only if the new one gets at least as many steps before the run ends as this one has
had (its age, from its own draw): a head that took the whole run so far to fit is not replaced by one with less time;
and, where the run's epochs are known, only if at least `MIN_EPOCHS_PER_PERIOD` epochs are left (`late_redraw_steps`):
the grid found periods shorter than that losing, and its 24-epoch K = 5 cell lost 1.3 points to a head re-drawn with
4.8 epochs left. A kept head follows the backbone's learning rate until the next re-draw (`hf_rifle.attach`), so a run
whose every planned re-init is skipped is plain fine-tuning after its first period.
The threshold `FITTED_LOSS_RATIO` was chosen on recorded runs and judged on fresh seeds, both named in
docs/benchmarks.md ("Re-draw only a fitted head").
"""

import math
from dataclasses import dataclass

import torch

from .schedule import MIN_EPOCHS_PER_PERIOD, period_starts

REINIT_WHEN = ("always", "fitted")
# The safe form (issue 30, docs/benchmarks.md): "always", the paper's schedule, lost up to 31 points where heads had
# not fit; "fitted" was at least as good in every cell measured. CHANGELOG.md says how to get the paper's schedule.
DEFAULT_REINIT_WHEN = "fitted"
# What a saved RIFLE state that does not record its schedule was started with: the default up to 0.1.0.
UNRECORDED_REINIT_WHEN = "always"
# The share of each period, at its end, over which the statistic is averaged (at least one optimizer step).
FIT_WINDOW_FRACTION = 0.1
# docs/benchmarks.md, "Re-draw only a fitted head": a head has fit when its top-class loss on the period's last
# training batches is at most this fraction of a uniform guess's.
FITTED_LOSS_RATIO = 0.25


@dataclass(frozen=True)
class FitDecision:
    """What happened at one planned re-initialization: at optimizer `step` (the start of `period`, from 1) of
    `max_steps`, the head's top-class loss ratio over the window before it (`loss_ratio`; None when no training
    forward of the head was seen there), the steps since the head was drawn (`head_age`), and whether it was
    re-drawn."""

    step: int
    period: int
    loss_ratio: float | None
    head_age: int
    max_steps: int
    redrawn: bool

    min_steps_left: int = 0

    @property
    def fit(self) -> bool:
        return has_fit(self.loss_ratio)

    @property
    def steps_left(self) -> int:
        return self.max_steps - self.step

    @property
    def needs_attention(self) -> bool:
        """Whether the run is not getting what RIFLE promises here, which a user should hear about (WARNING): a planned
        re-init skipped (the head kept), or a head re-drawn although it was measured not to have fit (the paper's
        schedule, `reinit_when="always"`, throwing away a head still learning). A fitted head re-drawn, or one
        re-drawn with no statistic to judge it by, is the method working as asked (INFO)."""
        return not self.redrawn or (self.loss_ratio is not None and not self.fit)

    def measured(self) -> str:
        """The statistic against the threshold, in words."""
        if self.loss_ratio is None:
            return "no training forward of the head was seen in the steps before it"
        return (
            f"its top-class loss on the last {FIT_WINDOW_FRACTION:.0%} of the period's training batches was "
            f"{self.loss_ratio:.2f} of a uniform guess's; fit means at most {FITTED_LOSS_RATIO:.2f}"
        )

    def describe(self, num_periods: int, reinit_when: str, head_name: str | None = None) -> str:
        """The decision in words with the numbers behind it, as logged (at WARNING where it `needs_attention`)."""
        where = f"at step {self.step} of {self.max_steps}"
        if not self.redrawn and not self.fit:
            return f"kept the head {where}: it has not fit yet ({self.measured()})."
        if not self.redrawn and self.steps_left < self.min_steps_left:
            return (
                f"kept the head {where}: it has fit ({self.measured()}), but a new head would have {self.steps_left} "
                f"steps left, under {MIN_EPOCHS_PER_PERIOD} epochs ({self.min_steps_left} steps), too few to fit "
                "and pay off."
            )
        if not self.redrawn:
            return (
                f"kept the head {where}: it has fit ({self.measured()}), but took {self.head_age} steps, more than "
                f"the {self.steps_left} a new head would have left."
            )
        text = (
            f"re-initialized the head {head_name!r} {where} (period {self.period} of {num_periods}); {self.measured()}"
        )
        if reinit_when == "always" and not decide_redraw(
            "fitted", self.loss_ratio, self.head_age, self.steps_left, self.min_steps_left
        ):
            text += "; reinit_when='fitted' would have kept it"
        return text + "."

    def short(self) -> str:
        """One line for the console summary."""
        ratio = "not measured" if self.loss_ratio is None else f"{self.loss_ratio:.2f}"
        return f"step {self.step}: {'re-drawn' if self.redrawn else 'kept'} (top-class loss ratio {ratio})"


def fit_windows(max_steps: int, num_periods: int) -> dict[int, int]:
    """Optimizer step -> the planned re-init step whose fit test it feeds: the last `FIT_WINDOW_FRACTION` of each
    period that ends in a re-initialization (at least its last step)."""
    starts = period_starts(max_steps, num_periods)
    windows = {}
    for begin, reinit in zip(starts, starts[1:]):
        width = max(1, math.ceil(FIT_WINDOW_FRACTION * (reinit - begin)))
        windows.update({step: reinit for step in range(reinit - width, reinit)})
    return windows


@torch.no_grad()
def top_class_loss_ratios(logits: torch.Tensor) -> torch.Tensor:
    """Per example, -log of softmax(`logits`)'s largest probability divided by log(classes), in float32."""
    log_probs = torch.log_softmax(logits.detach().float(), dim=-1)
    return (-log_probs.amax(-1) / math.log(logits.shape[-1])).reshape(-1)


def decide_redraw(
    reinit_when: str, loss_ratio: float | None, head_age: int, steps_left: int, min_steps_left: int = 0
) -> bool:
    """`"always"`: the paper's Algorithm 1. `"fitted"`: only a head shown to have fit (no statistic, no re-draw),
    and only if a new head would get at least as many steps as this one has had, and at least `min_steps_left`."""
    return reinit_when == "always" or (has_fit(loss_ratio) and steps_left >= max(head_age, min_steps_left))


def late_redraw_steps(max_steps: int, num_train_epochs: float | None) -> int:
    """The fewest steps a re-drawn head must have before the run ends under `"fitted"`: `MIN_EPOCHS_PER_PERIOD`
    epochs' worth (0 where the run's epochs are unknown). Below 8 epochs per period the grid lost to plain
    fine-tuning; a head re-drawn later has no time to fit and pay off (docs/benchmarks.md)."""
    if not num_train_epochs:
        return 0
    return math.ceil(MIN_EPOCHS_PER_PERIOD * max_steps / num_train_epochs)


def has_fit(loss_ratio: float | None) -> bool:
    """Whether a head whose top-class loss ratio is `loss_ratio` (None: not measured) counts as fit."""
    return loss_ratio is not None and loss_ratio <= FITTED_LOSS_RATIO
