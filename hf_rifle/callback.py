"""`RifleTrainerCallback`: decides *when* to re-initialize the head; `heads` does the work."""

import logging

from transformers import TrainerCallback

from .config import HEAD_INITS, _check_choice, _check_non_negative
from .functional import reinit_head_at_period_start_
from .heads import find_head
from .schedule import period_starts

logger = logging.getLogger(__name__)

SHARDED_TRAINING_REFUSED = (
    "RIFLE supports single-device and DDP (data-parallel) training. FSDP and DeepSpeed shard the head across "
    "ranks, which in-place re-initialization and L2-SP do not handle: launch with DDP."
)


class RifleTrainerCallback(TrainerCallback):
    """Re-initialize the classification head at the start of periods 2..K of any `transformers.Trainer` run.

    With a plain `Trainer` this is the paper's RIFLE-A (re-init only; the head keeps the Trainer's learning
    rate). For the full method, with the head's cyclic learning rate and L2-SP, use `RifleTrainer`, which
    installs this callback itself.

    The callback holds no training state: period starts are recomputed from `state.global_step` and
    `state.max_steps`, and each head is drawn from a generator seeded with (seed, period). A resumed run
    therefore re-draws exactly the heads of the uninterrupted one, with no extra flags.

    Args:
        num_periods: K, the number of equal periods of the run.
        head_module: dotted name of the head; None detects it (see `hf_rifle.find_head`).
        head_init: "default" (the modules' own `reset_parameters()`, as the authors' code) or "normal"
            (N(0, head_init_std^2) weights and zero bias, as Algorithm 1).
        head_init_std: standard deviation for `head_init="normal"`.
        reset_optimizer_state: clear the head's optimizer state (momentum, Adam moments) at each re-init.
        seed: seed of the head draws; None uses `TrainingArguments.seed`.

    Example:
        Given a classifier `model` (here a tiny transformers text classifier) and its `train_dataset`:

        >>> from transformers import Trainer, TrainingArguments
        >>> from hf_rifle import RifleTrainerCallback
        >>> args = TrainingArguments("out", num_train_epochs=3, per_device_train_batch_size=8, report_to="none")
        >>> trainer = Trainer(model, args, train_dataset=train_dataset, callbacks=[RifleTrainerCallback(num_periods=3)])
        >>> trainer.train().global_step  # the head is re-drawn at steps 2 and 4 of 6
        {...}
        6
    """

    def __init__(
        self,
        num_periods: int = 3,
        head_module: str | None = None,
        head_init: str = "default",
        head_init_std: float = 0.01,
        reset_optimizer_state: bool = True,
        seed: int | None = None,
    ):
        if num_periods < 1:
            raise ValueError(f"num_periods must be >= 1, got {num_periods}.")
        _check_choice("head_init", head_init, HEAD_INITS)
        _check_non_negative("head_init_std", head_init_std)
        self.num_periods = num_periods
        self.head_module = head_module
        self.head_init = head_init
        self.head_init_std = head_init_std
        self.reset_optimizer_state = reset_optimizer_state
        self.seed = seed

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Fail before the first step, not at the first period boundary.
        if args.fsdp or args.deepspeed:
            raise ValueError(SHARDED_TRAINING_REFUSED)
        period_starts(state.max_steps, self.num_periods)
        find_head(model, self.head_module)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        done = reinit_head_at_period_start_(
            model,
            optimizer,
            state.global_step,
            state.max_steps,
            self.num_periods,
            args.seed if self.seed is None else self.seed,
            head_module=self.head_module,
            head_init=self.head_init,
            head_init_std=self.head_init_std,
            reset_optimizer_state=self.reset_optimizer_state,
        )
        if done:
            logger.info(
                "RIFLE: re-initialized head %r at step %d (period %d of %d)",
                done.head_name,
                done.step,
                done.period,
                done.num_periods,
            )
