"""When a planned re-initialization goes ahead: `reinit_when="fitted"` re-draws the head only once it has fit.

The paper's premise (Sec. 3, Fig. 2) is that the new head fits the training set early, after which little gradient
reaches the deep layers, and a re-drawn head restarts that flow. Where the head has not fit when its period ends,
re-drawing it throws away a head that was still learning: our grid and timm's train.py with its default augmentation
lost 3 to 31 points that way (docs/benchmarks.md). So the premise is measured at each planned re-init instead of
assumed, as ReDo and continual backprop reset units on a measured statistic rather than on a clock.

The statistic is the entropy of the head's predictions on the training batches of the last tenth of the period,
as a fraction of a uniform guess's (log of the number of classes): 1 for a head that has learnt nothing, near 0 for
one that predicts its training batches confidently. It needs no labels, so every path computes it the same way from
the head's own output, `attach` included; on training batches a head trained by cross-entropy is about as
uncertain as its loss says (measured beside the loss: docs/benchmarks.md, "Re-draw only a fitted head"). The
threshold `FITTED_ENTROPY_RATIO` was chosen on recorded runs and judged on fresh seeds, both named there.
"""

import math
from dataclasses import dataclass

import torch

from .schedule import period_starts

REINIT_WHEN = ("always", "fitted")
# The share of each period, at its end, over which the statistic is averaged (at least one optimizer step).
FIT_WINDOW_FRACTION = 0.1
# docs/benchmarks.md, "Re-draw only a fitted head": the head counts as fit when its training predictions' entropy is
# at most this fraction of a uniform guess's. Chosen on seeds 1-5 of the grid; judged on fresh seeds.
FITTED_ENTROPY_RATIO = 0.35


@dataclass(frozen=True)
class FitDecision:
    """What happened at one planned re-initialization: at optimizer `step` (the start of `period`, from 1), the
    head's prediction entropy over the window before it as a fraction of a uniform guess's (`entropy_ratio`; None
    when no training forward of the head was seen there), and whether the head was re-drawn."""

    step: int
    period: int
    entropy_ratio: float | None
    redrawn: bool

    @property
    def fit(self) -> bool:
        return self.entropy_ratio is not None and self.entropy_ratio <= FITTED_ENTROPY_RATIO

    def measured(self) -> str:
        """The statistic against the threshold, in words."""
        if self.entropy_ratio is None:
            return "no training forward of the head was seen in the steps before it"
        return (
            f"its predictions' entropy on the last {FIT_WINDOW_FRACTION:.0%} of the period's training batches was "
            f"{self.entropy_ratio:.2f} of a uniform guess's; fit means at most {FITTED_ENTROPY_RATIO:.2f}"
        )

    def describe(self, max_steps: int, num_periods: int, reinit_when: str, head_name: str | None = None) -> str:
        """The decision in words with the numbers behind it, as logged at WARNING."""
        if not self.redrawn:
            return f"kept the head at step {self.step} of {max_steps}: it has not fit yet ({self.measured()})."
        text = (
            f"re-initialized the head {head_name!r} at step {self.step} of {max_steps} "
            f"(period {self.period} of {num_periods}); {self.measured()}"
        )
        if reinit_when == "always" and not self.fit:
            text += "; it had not fit, and reinit_when='fitted' would have kept it"
        return text + "."

    def short(self) -> str:
        """One line for the console summary and the model card's table."""
        ratio = "not measured" if self.entropy_ratio is None else f"{self.entropy_ratio:.2f}"
        return f"step {self.step}: {'re-drawn' if self.redrawn else 'kept'} (entropy ratio {ratio})"


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
def prediction_entropy_ratios(logits: torch.Tensor) -> torch.Tensor:
    """Per example, the entropy of softmax(`logits`) over the last dimension divided by log(classes), in float32."""
    log_probs = torch.log_softmax(logits.detach().float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return (entropy / math.log(logits.shape[-1])).reshape(-1)


def decide_redraw(reinit_when: str, entropy_ratio: float | None) -> bool:
    """`"always"`: the paper's Algorithm 1. `"fitted"`: only a head shown to have fit (no statistic, no re-draw)."""
    if reinit_when == "always":
        return True
    return entropy_ratio is not None and entropy_ratio <= FITTED_ENTROPY_RATIO
