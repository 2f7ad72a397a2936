"""Give the head its own optimizer param groups and its own learning-rate curve.

Both must exist before the LR scheduler is built: a param group added later leaves the scheduler's
per-group lists short and breaks resume. Hence these run from `create_optimizer` / `create_scheduler`.
"""

import torch
from torch.optim.lr_scheduler import LambdaLR

from .schedule import CyclicCosineSchedule

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


def attach_cyclic_head_schedule_(scheduler, max_steps: int, num_periods: int) -> None:
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
    curve = CyclicCosineSchedule(max_steps, num_periods)
    for i in indices:
        scheduler.lr_lambdas[i] = curve
        groups[i]["lr"] = scheduler.base_lrs[i] * curve(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
