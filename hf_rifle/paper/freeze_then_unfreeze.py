"""Freeze-then-unfreeze (fastai's `Learner.fine_tune`): train only the new head for a first epoch, then every
layer, the body at a much lower learning rate than the head.

fastai's defaults: one frozen epoch, then the body at 1/100 of the head's learning rate (`lr_mult=100`, from a
`slice(base_lr / lr_mult, base_lr)` spread over its parameter groups: body and head for a timm model such as the one
benchmarked here; fastai's own ResNets split the body in two, at 1/100 and 1/10). Adapted to the runs it is compared
with here: the run's SGD and its one cosine schedule over all epochs set the head's learning rate, and the body's is
that times `body_lr_ratio` (0.01) throughout; fastai's Adam, its two one-cycle schedules (restarted at the unfreeze)
and its halving of the base rate at the unfreeze are not taken over, and the frozen epoch is the first of the run's
epochs (fastai's `fine_tune(epochs)` trains one more). While frozen, the body's parameters take no gradient and its
BatchNorm layers keep their running statistics (fastai trains BatchNorm in a frozen body, its `train_bn=True`), so
the body is bit for bit the pretrained one until the unfreeze.
"""

import math

from torch import nn
from transformers import TrainerCallback

from ..heads import find_head
from ..optim import HEAD_GROUP_KEY, base_optimizer
from ..regularizers import split_backbone_and_head

BODY_LR_RATIO_KEY = "body_lr_ratio"  # marks body param groups already scaled, in the optimizer's saved state


def frozen_steps(num_batches: int, gradient_accumulation_steps: int, frozen_epochs: int) -> int:
    """Optimizer steps of the frozen phase: `frozen_epochs` epochs of `num_batches` batches, counted as Trainer counts
    an epoch's optimizer steps (a last, partial accumulation is a step), whether the run is set in epochs or steps."""
    return frozen_epochs * max(math.ceil(num_batches / gradient_accumulation_steps), 1)


def check_one_device(args) -> None:
    """Refuse several processes or devices: DDP cannot follow a body that starts taking gradients mid-run, and
    DataParallel's replicas would update the frozen body's BatchNorm statistics."""
    if args.world_size > 1 or args.n_gpu > 1:
        raise ValueError(
            "freeze_then_unfreeze runs on one process and one device: DDP cannot follow a body that starts taking "
            "gradients mid-run, and DataParallel's replicas would update the frozen body's BatchNorm statistics. "
            "Run it without torchrun/accelerate launch, on one GPU (e.g. CUDA_VISIBLE_DEVICES=0)."
        )


def scale_body_learning_rates_(optimizer, scheduler, ratio: float) -> None:
    """Multiply the peak learning rate of every body (non-head) param group by `ratio`, in the optimizer and in its
    LR scheduler, once: groups are marked, and a run resumed from a checkpoint loads them marked."""
    groups = base_optimizer(optimizer).param_groups
    if not any(group.get(HEAD_GROUP_KEY) for group in groups):
        raise ValueError(
            "A body learning-rate ratio needs the head in param groups of its own (RifleTrainer makes them)."
        )
    for index, group in enumerate(groups):
        if group.get(HEAD_GROUP_KEY) or BODY_LR_RATIO_KEY in group:
            continue
        group[BODY_LR_RATIO_KEY] = ratio
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
        if scheduler is not None:
            scheduler.base_lrs[index] *= ratio
    if scheduler is not None:
        scheduler._last_lr = [group["lr"] for group in groups]


class FreezeThenUnfreeze(TrainerCallback):
    """Freezes the body for the first `frozen_epochs` (no gradient, BatchNorm statistics kept), then trains it at
    `body_lr_ratio` times the head's learning rate. Decided from the optimizer step, so a resumed run freezes or
    not as the uninterrupted one did. One process on one device only: DDP cannot follow parameters that start taking
    gradients mid-run, and DataParallel's replicas would move the frozen BatchNorm statistics."""

    def __init__(self, frozen_epochs: float = 1, body_lr_ratio: float = 0.01, head_module: str | None = None):
        self.frozen_epochs, self.body_lr_ratio, self.head_module = frozen_epochs, body_lr_ratio, head_module
        self._body_params, self._body_norms, self._frozen_until, self._frozen, self._hook = [], [], 0, False, None

    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, train_dataloader=None, **kwargs
    ):
        if self.frozen_epochs > 0:
            check_one_device(args)
        self._frozen_until = frozen_steps(len(train_dataloader), args.gradient_accumulation_steps, self.frozen_epochs)
        if self.frozen_epochs and self._frozen_until >= state.max_steps:
            raise ValueError(
                f"frozen_epochs={self.frozen_epochs} freezes the body for {self._frozen_until} optimizer steps, but "
                f"the run has {state.max_steps}: the body would never train. Lower --frozen_epochs or train longer."
            )
        _, head = find_head(model, self.head_module)
        self._body_params = split_backbone_and_head(model, head)[0]
        head_modules = set(head.modules())
        self._body_norms = [
            module
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._NormBase)
            and module.track_running_stats
            and module not in head_modules
        ]
        self._hook = model.register_forward_pre_hook(self._keep_frozen_norms_in_eval_mode)
        if self.body_lr_ratio != 1.0:
            scale_body_learning_rates_(optimizer, lr_scheduler, self.body_lr_ratio)
        self._set_frozen(state.global_step < self._frozen_until)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set_frozen(state.global_step < self._frozen_until)

    def on_train_end(self, args, state, control, **kwargs):
        self._set_frozen(False)
        self._hook.remove()

    def _set_frozen(self, frozen: bool) -> None:
        if frozen != self._frozen:
            for param in self._body_params:
                param.requires_grad_(not frozen)
            self._frozen = frozen

    def _keep_frozen_norms_in_eval_mode(self, module, args):
        """Trainer puts the model in training mode at every step; while frozen, the body's norms go back to eval."""
        if self._frozen:
            for norm in self._body_norms:
                norm.eval()
