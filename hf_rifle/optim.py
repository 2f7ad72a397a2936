"""Give the head its own learning-rate curve, in one of two exact ways.

`RifleTrainer`: the head gets optimizer param groups of its own, with the cyclic cosine in the LR scheduler.
Both must exist before the scheduler is built (a param group added later leaves the scheduler's per-group
lists short and breaks resume), hence they run from `create_optimizer` / `create_scheduler`.

`RifleTrainerCallback` on any Trainer cannot add groups: it rescales the head's update after every optimizer
step by (head learning rate / its group's learning rate). For optimizers whose update is proportional to the
learning rate and whose state does not depend on it, that is the update a learning rate of its own would give,
up to float rounding; `check_update_scales_with_lr` refuses the others.
"""

from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from .schedule import CyclicCosineSchedule, head_lr_factor

HEAD_GROUP_KEY = "rifle_head"


def isolate_head_param_groups_(optimizer: torch.optim.Optimizer, head_params) -> None:
    """Move the head's parameters out of every group into a twin group with the same hyper-parameters.

    Groups are marked with `"rifle_head": True`, a key that is saved with the optimizer's state dict.
    Call before the optimizer has taken a step.
    """
    head_ids = {id(p) for p in head_params}
    backbone_groups, head_groups = [], []
    for group in optimizer.param_groups:
        backbone = [p for p in group["params"] if id(p) not in head_ids]
        head = [p for p in group["params"] if id(p) in head_ids]
        if backbone:
            backbone_groups.append({**group, "params": backbone, HEAD_GROUP_KEY: False})
        if head:
            head_groups.append({**group, "params": head, HEAD_GROUP_KEY: True})
    if not head_groups:
        raise ValueError("None of the head's parameters are in the optimizer: are they frozen (requires_grad=False)?")
    optimizer.param_groups.clear()
    for group in backbone_groups + head_groups:
        optimizer.add_param_group(group)


def head_group_indices(optimizer: torch.optim.Optimizer) -> list[int]:
    return [i for i, group in enumerate(optimizer.param_groups) if group.get(HEAD_GROUP_KEY)]


def attach_cyclic_head_schedule_(scheduler, max_steps: int, num_periods: int, warmup_steps: int = 0) -> None:
    """Put the head's groups of a `LambdaLR` on the cyclic cosine; other groups keep their curve."""
    if not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"head_lr_schedule='cyclic_cosine' needs a LambdaLR-based lr_scheduler_type (cosine, linear, "
            f"constant, ...), got {type(scheduler).__name__}. Pick one of those, or head_lr_schedule='trainer'."
        )
    groups = scheduler.optimizer.param_groups
    indices = head_group_indices(scheduler.optimizer)
    if not indices:
        raise ValueError(
            "head_lr_schedule='cyclic_cosine' needs the head in param groups of its own. A custom optimizer "
            "passed to the trainer must mark them with {'rifle_head': True}, or use head_lr_schedule='trainer'."
        )
    curve = CyclicCosineSchedule(max_steps, num_periods, warmup_steps)
    for i in indices:
        scheduler.lr_lambdas[i] = curve
        groups[i]["lr"] = scheduler.base_lrs[i] * curve(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


# Optimizers whose update is proportional to the learning rate, with state that does not depend on it (torch's,
# bitsandbytes' and Lion's). Adafactor is exact only with relative_step=False, as Trainer builds it.
UPDATE_SCALES_WITH_LR = {
    "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam",
    "Adam8bit", "AdamW8bit", "Adam32bit", "AdamW32bit", "PagedAdam", "PagedAdamW", "PagedAdam8bit", "PagedAdamW8bit",
    "PagedAdam32bit", "PagedAdamW32bit", "Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit",
    "PagedLion32bit", "RMSprop8bit", "RMSprop32bit", "Adagrad8bit", "Adagrad32bit",
}  # fmt: skip


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside accelerate's `AcceleratedOptimizer` (and any other `.optimizer` wrapper)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_update_scales_with_lr(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer for which rescaling the head's update is not a learning rate of its own."""
    inner = base_optimizer(optimizer)
    name = type(inner).__name__
    exact = name in UPDATE_SCALES_WITH_LR or (
        name == "Adafactor" and not any(group.get("relative_step") for group in inner.param_groups)
    )
    if not exact:
        raise ValueError(
            f"RIFLE gives a head that shares a param group with the backbone its cyclic learning rate by rescaling the "
            f"head's update every step (RifleTrainerCallback, attach), which equals a learning rate of its own only "
            f"for optimizers whose update is proportional to the learning rate and whose state does not depend on it "
            f"(SGD, Adam, AdamW, RMSprop, Adagrad, Lion, Adafactor without relative_step, ...). {name} is not known "
            f"to be one. Use RifleTrainer, which gives the head param groups of its own (in another loop: mark them "
            f"{{'{HEAD_GROUP_KEY}': True}} and give them the cyclic curve in their scheduler), or "
            f"head_lr_schedule='trainer' (RIFLE-A: re-initialization only), or an optimizer from that list."
        )


@dataclass
class HeadUpdate:
    """A head parameter before an optimizer step, and the factor its update must be scaled by afterwards."""

    param: torch.nn.Parameter
    before: torch.Tensor
    scale: float


@torch.no_grad()
def record_head_update_(
    optimizer: torch.optim.Optimizer, head_params, step: int, max_steps: int, num_periods: int, peak_lr: float
) -> list[HeadUpdate]:
    """Before `optimizer.step()`: what `rescale_head_update_` needs to give the head its cyclic learning rate.

    The head's learning rate is its group's initial (peak) learning rate times `head_lr_factor`; where the
    group's learning rate is 0 the update is 0 whatever the scale, and the head does not move at that step.
    """
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    updates = []
    for param in head_params:
        group = group_of.get(id(param))
        if group is None or group["lr"] == 0:
            continue
        target = head_learning_rate(group, step, max_steps, num_periods, peak_lr)
        updates.append(HeadUpdate(param, param.detach().clone(), target / group["lr"]))
    return updates


def head_learning_rate(group: dict, step: int, max_steps: int, num_periods: int, peak_lr: float) -> float:
    """The learning rate the head should have at `step` when it shares param `group` with the backbone: the
    group's initial (peak) learning rate, `peak_lr` if the scheduler recorded none, times `head_lr_factor`."""
    factor = head_lr_factor(step, max_steps, num_periods, trainer_lr_is_zero=group["lr"] == 0)
    return group.get("initial_lr", peak_lr) * factor


@torch.no_grad()
def rescale_head_update_(updates: list[HeadUpdate]) -> None:
    """After `optimizer.step()`: w = w_before + scale * (w - w_before) for each recorded head parameter."""
    for update in updates:
        if update.scale != 1.0:
            update.param.sub_(update.before).mul_(update.scale).add_(update.before)
