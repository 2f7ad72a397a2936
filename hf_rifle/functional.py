"""RIFLE's per-step work as plain functions, one per step of the method, shared by every caller.

The Trainer adapters (`RifleTrainerCallback`, `RifleTrainer`), the MLP-oracle study and the overhead
benchmark all call these, so the method is written once. The other steps already are single functions:
the head's learning-rate multiplier is `cyclic_cosine_factor` and the L2-SP gradient `add_l2sp_gradient_`.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .heads import clear_optimizer_state_, find_head, head_seed, reinit_head_
from .schedule import period_starts


@dataclass(frozen=True)
class HeadReinit:
    """What `reinit_head_at_period_start_` did: which head, at which optimizer step, for which period (from 1)."""

    head_name: str
    step: int
    period: int
    num_periods: int


@torch.no_grad()
def reinit_head_at_period_start_(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    max_steps: int,
    num_periods: int,
    seed: int,
    *,
    head_module: str | None = None,
    head_init: str = "default",
    head_init_std: float = 0.01,
    reset_optimizer_state: bool = True,
) -> HeadReinit | None:
    """Re-draw the head in place if optimizer step `step` starts one of periods 2..K; else do nothing.

    The sequence is: period arithmetic -> find the head -> seed the draw from (seed, period) -> re-draw ->
    clear the head's optimizer state. Everything is derived from `step`, so a resumed run (or another rank)
    re-draws exactly the same head. Returns what was done, or None when `step` starts no new period.
    """
    starts = period_starts(max_steps, num_periods)
    if step not in starts[1:]:
        return None
    period = starts.index(step)
    head_name, head = find_head(model, head_module)
    reinit_head_(head, head_seed(seed, period), head_init, head_init_std)
    if reset_optimizer_state and optimizer is not None:
        clear_optimizer_state_(optimizer, head.parameters())
    return HeadReinit(head_name=head_name, step=step, period=period + 1, num_periods=num_periods)
