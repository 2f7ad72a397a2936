"""`RifleTrainer`: the full RIFLE method as a `transformers.Trainer` subclass.

It overrides documented hooks and nothing else: `create_optimizer` (the head gets param groups of its own),
`create_scheduler` (those groups get the cyclic cosine), `training_step` (adds the L2-SP gradient, stops on
a non-finite loss), `log` (reports the L2-SP term), `get_train_dataloader` (an optional
training-only collator) and `create_model_card` (a card that records the method, with a learning-curve
plot). Re-initialization is `RifleTrainerCallback`, installed from the config.
"""

import os
from pathlib import Path

import torch
from transformers import Trainer

from .callback import SHARDED_TRAINING_REFUSED, RifleTrainerCallback
from .card import PLOT_FILE, plot_learning_curve, render_model_card
from .config import RifleConfig
from .heads import find_head
from .optim import HEAD_GROUP_KEY, attach_cyclic_head_schedule_, isolate_head_param_groups_
from .regularizers import add_l2sp_gradient_, l2sp_penalty, snapshot, split_backbone_and_head
from .schedule import position_in_period, reinit_steps


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
        super().__init__(model=model, args=args, **kwargs)
        self.train_data_collator = train_data_collator
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(SHARDED_TRAINING_REFUSED)
        # Image classifiers return a per-batch mean loss and ignore `num_items_in_batch`; the Trainer must
        # divide by the accumulation steps itself, or batch 4 x GA 2 gets twice the gradient of batch 8.
        self.model_accepts_loss_kwargs = False

        _, head = find_head(self.model, args.head_module)
        backbone_params, self._head_params = split_backbone_and_head(self.model, head)
        self._l2sp = None
        if args.regularizer == "l2sp":
            self._l2sp = (backbone_params, snapshot(backbone_params), self._head_params)

        if args.reinit_head:
            if any(isinstance(cb, RifleTrainerCallback) for cb in self.callback_handler.callbacks):
                raise ValueError(
                    "RifleTrainer installs RifleTrainerCallback from its RifleConfig; "
                    "remove the one passed in callbacks."
                )
            self.add_callback(
                RifleTrainerCallback(
                    num_periods=args.num_periods,
                    head_module=args.head_module,
                    head_init=args.head_init,
                    head_init_std=args.head_init_std,
                    reset_optimizer_state=args.reset_head_optimizer_state,
                )
            )

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
            isolate_head_param_groups_(self.optimizer, self._head_params)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
            if self.args.head_lr_schedule == "cyclic_cosine":
                attach_cyclic_head_schedule_(scheduler, num_training_steps, self.args.num_periods)
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):  # Trainer's own NaN filter would silently log an average instead
            raise FloatingPointError(self._non_finite_loss_message(loss.item()))
        if self._l2sp is not None and self.accelerator.sync_gradients:
            # Once per optimizer step, after the last micro-batch's backward (and DDP's gradient averaging),
            # before clipping: the gradient autograd would give for the penalty in the loss, in two foreach passes.
            scale = self.accelerator.scaler.get_scale() if self.accelerator.scaler is not None else 1.0
            add_l2sp_gradient_(*self._l2sp, self.args.l2sp_alpha * scale, self.args.l2sp_beta * scale)
        return loss

    def _non_finite_loss_message(self, value: float) -> str:
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._l2sp is not None and "loss" in logs:
            with torch.no_grad():
                logs["l2sp_loss"] = l2sp_penalty(*self._l2sp, self.args.l2sp_alpha, self.args.l2sp_beta).item()
        super().log(logs, start_time)

    def reinit_steps(self) -> list[int]:
        """Optimizer steps at which this run re-initializes (or re-initialized) the head."""
        return reinit_steps(self.state.max_steps, self.args.num_periods) if self.args.reinit_head else []

    def create_model_card(
        self, model_name=None, finetuned_from=None, dataset=None, dataset_args=None, **kwargs
    ) -> None:
        """Write README.md (the model card) and the learning-curve plot into `output_dir`.

        `push_to_hub` calls this before uploading `output_dir`, so the card travels with the model.
        """
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        reinits = self.reinit_steps()
        plot = plot_learning_curve(self.state.log_history, reinits, output_dir / PLOT_FILE)
        config = self.model.config
        card = render_model_card(
            self.args,
            self.state.log_history,
            self.state.max_steps,
            reinits,
            repo_id=self.hub_model_id or self.args.hub_model_id or model_name or output_dir.name,
            base_model=finetuned_from or getattr(config, "_name_or_path", None),
            dataset=dataset[0] if isinstance(dataset, list) else dataset,
            dataset_config=dataset_args[0] if isinstance(dataset_args, list) else dataset_args,
            timm_architecture=getattr(config, "architecture", None),
            plot_file=plot.name if plot else None,
        )
        card.save(os.path.join(output_dir, "README.md"))
