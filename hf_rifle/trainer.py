"""`RifleTrainer`: the full RIFLE method as a `transformers.Trainer` subclass.

The method itself is `RifleTrainerCallback` (re-initialization, L2-SP, the logged values), installed from the
config, so the plug-in path and this one share one implementation. On top of it, RifleTrainer overrides
documented hooks and nothing else: `create_optimizer` (the head gets param groups of its own) and
`create_scheduler` (those groups get the cyclic cosine), so the head's learning rate is a real one rather than a
rescaled update and any optimizer works; `training_step` (stops on a non-finite loss); `get_train_dataloader`
(an optional training-only collator); `create_model_card` (a card that records the method, with a plot);
`init_hf_repo` and `push_to_hub` (a Hub that cannot be reached or refuses, said in one line); `train` and
`_save_checkpoint` (crash-safe checkpoints, see `hf_rifle.checkpoints`). It also divides the loss by the
gradient-accumulation steps for models whose loss ignores `num_items_in_batch` (image classifiers, most text
classifiers), which plain Trainer does not; models whose loss uses it keep transformers' normalization.

With several processes, every rank stops at the same optimizer step when the loss is not finite on any of them
(one all-reduce per step), and only the processes that write the output folder move checkpoint folders.
"""

import math
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import EarlyStoppingCallback, Trainer
from transformers.trainer_utils import rotate_checkpoints

from .accumulation import loss_ignores_items_in_batch
from .callback import SHARDED_TRAINING_REFUSED, RifleTrainerCallback
from .card import PLOT_FILE, classification_task, plot_learning_curve, render_model_card
from .checkpoints import (
    STAGING_DIR,
    check_resumable,
    finalize_checkpoint_,
    full_disk_explained,
    newest_complete_checkpoint,
    tensor_bytes,
)
from .config import RifleConfig
from .fit import FitDecision
from .heads import find_head
from .hub import push_errors_explained, push_repo_id
from .optim import HEAD_GROUP_KEY, attach_cyclic_head_schedule_, isolate_head_param_groups_
from .preemption import PreemptionCallback, parse_signals
from .regularizers import split_backbone_and_head
from .schedule import position_in_period, reinit_steps


def non_finite_losses_by_rank(value: float | None, device) -> dict[int, float]:
    """{rank: its non-finite loss} over every rank, from this rank's `value` (None when its loss was finite): one
    all-reduce of a vector with one slot per rank, so every rank learns the same answer at the same step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {} if value is None else {0: value}
    device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    slots = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    if value is not None:
        slots[dist.get_rank()] = value
    dist.all_reduce(slots)  # a sum: the zeros of finite ranks leave nan and ±inf as they are
    return {rank: slot for rank, slot in enumerate(slots.tolist()) if not math.isfinite(slot)}


def describe_non_finite(losses: dict[int, float], world_size: int) -> str:
    """'nan' alone; with several processes also where: 'nan on rank 1 of 2', 'nan on rank 0, inf on rank 1 of 2'."""
    if world_size == 1:
        return ", ".join(str(value) for value in losses.values())
    by_value: dict[str, list[int]] = {}
    for rank, value in sorted(losses.items()):
        by_value.setdefault(str(value), []).append(rank)
    where = ", ".join(
        f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        for value, ranks in by_value.items()
    )
    return f"{where} of {world_size}"


class RifleTrainer(Trainer):
    """`Trainer` with RIFLE: periodic head re-initialization, a cyclic head learning rate, L2 or L2-SP.

    Ablations by config: RIFLE-A = `head_lr_schedule="trainer"`, RIFLE-B = `reinit_head=False`.

    The L2-SP reference w_s is the backbone as passed in, so a run resumed with `resume_from_checkpoint`
    (built from the same pretrained model) keeps pulling towards the pretrained weights, not the checkpoint's.

    Example:
        Given a pretrained classifier `model` (here a tiny transformers text classifier) and its `train_dataset`:

        >>> from hf_rifle import RifleConfig, RifleTrainer
        >>> args = RifleConfig(
        ...     output_dir="out", num_train_epochs=3, per_device_train_batch_size=8, learning_rate=0.01,
        ...     num_periods=3, regularizer="l2sp", report_to="none",
        ... )
        >>> trainer = RifleTrainer(model=model, args=args, train_dataset=train_dataset)
        >>> trainer.train().global_step
        {...}
        6
        >>> trainer.reinit_steps()
        [2, 4]
        >>> trainer.create_model_card()  # README.md in output_dir, as `push_to_hub` uploads it
    """

    def __init__(self, model=None, args: RifleConfig | None = None, train_data_collator=None, **kwargs):
        """`train_data_collator`, if given, collates training batches only (e.g. `DisturbLabelCollator`);
        evaluation keeps `data_collator`, so its labels are never disturbed."""
        if not isinstance(args, RifleConfig):
            raise TypeError(f"RifleTrainer needs args=RifleConfig(...), got {type(args).__name__}.")
        if model is None:
            raise ValueError("RifleTrainer needs a model: its head and pretrained backbone are read at construction.")
        if any(isinstance(callback, RifleTrainerCallback) for callback in kwargs.get("callbacks") or []):
            raise ValueError(
                "RifleTrainer installs RifleTrainerCallback from its RifleConfig; remove the one passed in callbacks."
            )
        # Passed at construction, so with L2-SP the callback records the pretrained backbone before any resume.
        self.rifle = RifleTrainerCallback(**args.method_settings())
        self._checkpoint_staging = None  # set while `_save_checkpoint` writes: see `_get_output_dir`
        callbacks = [self.rifle, *(kwargs.get("callbacks") or [])]
        if parse_signals(args.preemption_signals) and not any(isinstance(c, PreemptionCallback) for c in callbacks):
            callbacks.append(PreemptionCallback(args.preemption_signals))
        kwargs["callbacks"] = callbacks
        super().__init__(model=model, args=args, **kwargs)
        self.train_data_collator = train_data_collator
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(SHARDED_TRAINING_REFUSED)
        # A model whose loss is a per-batch mean ignores `num_items_in_batch`; the Trainer must divide by the
        # accumulation steps itself, or batch 4 x GA 2 gets twice the gradient of batch 8. A model whose loss uses
        # it keeps transformers' normalization (by the items of the whole optimizer step).
        if loss_ignores_items_in_batch(self.model):
            self.model_accepts_loss_kwargs = False
        self._non_finite_loss = None  # this rank's first non-finite loss in the current optimizer step

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints: `True` takes the newest complete one (torn
        ones are set aside with a warning), and a named checkpoint that is incomplete is refused before training.
        The preemption handlers installed at train begin are given back however training ends."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {self.args.output_dir} holds no complete checkpoint to resume "
                    "from. Start without resume_from_checkpoint."
                )
        elif resume_from_checkpoint:
            check_resumable(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:  # a run that raised (a full disk, say) gives the signals back too, not only one that ended
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, PreemptionCallback):
                    callback.release()

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder, flush it and mark it complete, then rename it into place:
        a process killed at any moment leaves either no `checkpoint-N` or a complete one. Old checkpoints are
        rotated out only after the new one is in place. A full disk is said as such (`full_disk_explained`)."""
        run_dir = Path(self._get_output_dir(trial))
        staging = run_dir / STAGING_DIR
        name = f"checkpoint-{self.state.global_step}"
        # Only the processes that write the output folder (`should_save`: global rank 0, or each node's first with
        # save_on_each_node) clear, rename and rotate in it; others moving the same paths would race them.
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # a save that died half-way; never a complete checkpoint
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            with full_disk_explained(run_dir, "a checkpoint", self.checkpoint_bytes):
                super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N (see _get_output_dir)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every rank has written its files (RNG states are per rank)
        if self.args.should_save:
            best = self.state.best_global_step and run_dir / f"checkpoint-{self.state.best_global_step}"
            if best and (best.is_dir() or best.name == name):
                self.state.best_model_checkpoint = str(best)
                self.state.save_to_json(str(staging / name / "trainer_state.json"))
            finalize_checkpoint_(staging / name)
            if (run_dir / name).exists():  # an earlier save of this step: set aside, removed once the new one is in
                (run_dir / name).rename(staging / f"superseded-{name}")
            (staging / name).rename(run_dir / name)
            shutil.rmtree(staging)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint writes: the weights and the optimizer's state."""
        return tensor_bytes(self.model.state_dict(), self.optimizer.state_dict() if self.optimizer else {})

    def _get_output_dir(self, trial) -> str:
        staging = self._checkpoint_staging
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def get_train_dataloader(self):
        if self.train_data_collator is None:
            return super().get_train_dataloader()
        eval_collator, self.data_collator = self.data_collator, self.train_data_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = eval_collator

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            super().create_optimizer(model)
            _, head = find_head(self.model, self.args.head_module)
            isolate_head_param_groups_(self.optimizer, split_backbone_and_head(self.model, head)[1])
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            if self.args.head_lr_schedule == "cyclic_cosine":
                warmup_steps = self.args.get_warmup_steps(num_training_steps)
                attach_cyclic_head_schedule_(scheduler, num_training_steps, self.args.num_periods, warmup_steps)
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step, stopping on a non-finite loss (Trainer's own NaN filter would silently log an average
        instead). The ranks agree at each optimizer step's last micro-batch, before the optimizer step, so every
        rank raises there with the same message, naming the rank(s) whose loss it was."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._non_finite_loss is None and not torch.isfinite(loss):
            self._non_finite_loss = loss.item()
        if self.accelerator.sync_gradients:  # the last micro-batch of this optimizer step, on every rank
            value, self._non_finite_loss = self._non_finite_loss, None
            if losses := non_finite_losses_by_rank(value, self.args.device):
                raise FloatingPointError(self._non_finite_loss_message(losses))
        return loss

    def _non_finite_loss_message(self, losses: dict[int, float]) -> str:
        """The same text on every rank: the value(s) and rank(s), the step and period, the learning rates."""
        value = describe_non_finite(losses, self.args.world_size)
        step = self.state.global_step
        period, tau, length = position_in_period(step, self.state.max_steps, self.args.num_periods)
        learning_rates = ", ".join(
            f"{'head' if group.get(HEAD_GROUP_KEY) else 'backbone'} {group['lr']:.3g}"
            for group in self.optimizer.param_groups
        )
        return (
            f"The training loss became {value} at optimizer step {step} of {self.state.max_steps}, in period "
            f"{period + 1} of {self.args.num_periods} ({tau} of its {length} steps done); learning rates: "
            f"{learning_rates}. Lower learning_rate (or l2sp_alpha/l2sp_beta), or check the inputs for NaNs. "
            f"Checkpoints written so far in {self.args.output_dir} are from before this step."
        )

    def reinit_steps(self) -> list[int]:
        """Optimizer steps at which this run plans to re-initialize the head; with `reinit_when="fitted"`,
        `reinit_decisions()` says which went ahead."""
        return reinit_steps(self.state.max_steps, self.args.num_periods) if self.args.reinit_head else []

    def reinit_decisions(self) -> list[FitDecision]:
        """One `FitDecision` per planned re-initialization reached so far: the fit statistic and whether the head
        was re-drawn."""
        return self.rifle.handle.decisions if self.rifle.handle is not None else []

    def stopped_early(self) -> str | None:
        """Why training ended before its schedule did (`max_steps`), or None when it ran to the end."""
        if self.state.global_step >= self.state.max_steps:
            return None
        for callback in self.callback_handler.callbacks:
            if (
                isinstance(callback, EarlyStoppingCallback)
                and callback.early_stopping_patience_counter >= callback.early_stopping_patience
            ):
                return (
                    f"early stopping, {self.args.metric_for_best_model} did not improve for "
                    f"{callback.early_stopping_patience} evaluations"
                )
        return "a callback set control.should_training_stop"

    def init_hf_repo(self, *args, **kwargs) -> None:
        """Trainer's repository creation (when built with `push_to_hub`), with a Hub that cannot be reached or
        refuses said in one line that names both, before any training."""
        with push_errors_explained(self.hub_model_id or push_repo_id(self.args), "create"):
            super().init_hf_repo(*args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Trainer's upload, with a failure said in one line that also says where the saved model waits."""
        with push_errors_explained(self.hub_model_id or push_repo_id(self.args), "upload to", self.args.output_dir):
            return super().push_to_hub(*args, **kwargs)

    def create_model_card(
        self, model_name=None, finetuned_from=None, dataset=None, dataset_args=None, extra_settings=None, **kwargs
    ) -> None:
        """Write README.md (the model card) and the learning-curve plot into `output_dir`.

        `push_to_hub` calls this before uploading `output_dir`, so the card travels with the model.
        `extra_settings`, (name, value) pairs, join the card's table of settings.
        """
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        decisions = self.reinit_decisions()
        reinits = [decision.step for decision in decisions if decision.redrawn]
        plot = plot_learning_curve(self.state.log_history, reinits, output_dir / PLOT_FILE)
        config = self.model.config
        card = render_model_card(
            self.args,
            self.state.log_history,
            self.state.max_steps,
            reinits,
            decisions=decisions,
            repo_id=self.hub_model_id or self.args.hub_model_id or model_name or output_dir.name,
            base_model=finetuned_from or getattr(config, "_name_or_path", None),
            dataset=dataset[0] if isinstance(dataset, list) else dataset,
            dataset_config=dataset_args[0] if isinstance(dataset_args, list) else dataset_args,
            timm_architecture=getattr(config, "architecture", None),
            plot_file=plot.name if plot else None,
            extra_settings=extra_settings,
            trained_steps=self.state.global_step,
            stopped_early=self.stopped_early(),
            warnings=self.rifle.settings_warnings,
            task=classification_task(self.model),
        )
        card.save(os.path.join(output_dir, "README.md"))
