"""`RifleConfig`: RIFLE's settings as a `TrainingArguments` subclass.

As with TRL's `SFTConfig`, every field carries its help text, so `HfArgumentParser` reads it from flags
(`--num_periods 3`), JSON or YAML, and `--help` documents it.
"""

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import SchedulerType, TrainingArguments

from .fit import DEFAULT_REINIT_WHEN, FITTED_LOSS_RATIO, REINIT_WHEN
from .preemption import DEFAULT_PREEMPTION_SIGNALS, JIT_CHECKPOINT_REFUSED, parse_signals
from .schedule import MIN_EPOCHS_PER_PERIOD

HEAD_LR_SCHEDULES = ("cyclic_cosine", "trainer")
HEAD_INITS = ("default", "normal")
REGULARIZERS = ("l2", "l2sp")
PAPER_WEIGHT_DECAY = 1e-4  # the authors' code: their "L2" is weight decay 1e-4
# RIFLE's own settings: fields of `RifleConfig` and, same names and defaults, `RifleTrainerCallback`'s arguments.
METHOD_FIELDS = (
    "num_periods",
    "reinit_head",
    "reinit_when",
    "head_lr_schedule",
    "head_init",
    "head_init_std",
    "reset_head_optimizer_state",
    "head_module",
    "regularizer",
    "l2sp_alpha",
    "l2sp_beta",
)


@dataclass
class RifleConfig(TrainingArguments):
    """Training arguments for `RifleTrainer`. Defaults give the full method in its safe form: K=3 periods, the head
    re-initialized at a period start once it has fit (`reinit_when="fitted"`, `hf_rifle.fit`; `"always"` is the
    paper's schedule), cyclic cosine head learning rate, cosine schedule for the backbone, no gradient clipping.

    Ablations: RIFLE-A = `head_lr_schedule="trainer"`; RIFLE-B = `reinit_head=False`.

    Example:
        >>> from hf_rifle import RifleConfig
        >>> args = RifleConfig(output_dir="out", num_periods=3, regularizer="l2sp", l2sp_alpha=0.01)
        >>> args.method, args.lr_scheduler_type.value, args.max_grad_norm
        ('RIFLE', 'cosine', 0.0)
        >>> RifleConfig(output_dir="out", reinit_head=False).method  # the RIFLE-B ablation
        'RIFLE-B'
    """

    lr_scheduler_type: SchedulerType | str = field(
        default="cosine",
        metadata={"help": "Backbone learning-rate schedule over the whole run (the paper: cosine)."},
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "Gradient clipping norm; 0 = off, as in the paper. Clipping would damp the large gradients a "
            "re-drawn head sends into the backbone, which is how RIFLE works."
        },
    )
    weight_decay: float | None = field(
        default=None,
        metadata={
            "help": f"Weight decay; unset = by regularizer: {PAPER_WEIGHT_DECAY} with 'l2' (the authors' L2), 0 with "
            "'l2sp' (which regularizes on its own: weight decay on top of it is refused)."
        },
    )
    num_periods: int = field(
        default=3,
        metadata={
            "help": "K: the run is split into K equal periods; the head is re-initialized at the start of periods 2..K."
        },
    )
    reinit_head: bool = field(
        default=True,
        metadata={"help": "Re-initialize the classification head at each period start (False = RIFLE-B)."},
    )
    reinit_when: Literal["always", "fitted"] = field(
        default=DEFAULT_REINIT_WHEN,
        metadata={
            "help": "'fitted' (the default): re-draw the head at a period start only once it has fit (its top-class "
            f"loss on the period's last training batches at most {FITTED_LOSS_RATIO} of a uniform guess's) and a new "
            f"head has at least as many steps left as this one has had, and at least {MIN_EPOCHS_PER_PERIOD} epochs; "
            "otherwise keep it, on the backbone's learning rate until the next re-draw. 'always': re-draw it at every "
            "period start (the paper's Algorithm 1). A resumed run keeps the schedule it was started with."
        },
    )
    head_lr_schedule: Literal["cyclic_cosine", "trainer"] = field(
        default="cyclic_cosine",
        metadata={
            "help": "'cyclic_cosine': the head's LR is 0.5*lr*(1+cos(pi*tau/P)), restarting every period; "
            "'trainer': the head follows the Trainer's schedule like the backbone (RIFLE-A)."
        },
    )
    head_init: Literal["default", "normal"] = field(
        default="default",
        metadata={
            "help": "'default': the head modules' own reset_parameters() (the authors' code); "
            "'normal': N(0, head_init_std^2) weights and zero bias (Algorithm 1)."
        },
    )
    head_init_std: float = field(default=0.01, metadata={"help": "Standard deviation for head_init='normal'."})
    reset_head_optimizer_state: bool = field(
        default=True,
        metadata={"help": "Clear the head's optimizer state (momentum, Adam moments, step) at each re-init."},
    )
    head_module: str | None = field(
        default=None,
        metadata={"help": "Dotted name of the classification head (e.g. 'fc', 'classifier.1'); None = detect."},
    )
    regularizer: Literal["l2", "l2sp"] = field(
        default="l2",
        metadata={
            "help": f"'l2': plain weight decay ({PAPER_WEIGHT_DECAY} unless weight_decay is set); 'l2sp': add "
            "l2sp_alpha/2*||w-w_pretrained||^2 on the backbone and l2sp_beta/2*||w_head||^2 on the head to the loss."
        },
    )
    l2sp_alpha: float = field(
        default=0.01, metadata={"help": "L2-SP strength on the backbone's drift from its pretrained weights."}
    )
    l2sp_beta: float = field(default=0.01, metadata={"help": "L2-SP strength (plain L2) on the new head."})
    preemption_signals: str = field(
        default=DEFAULT_PREEMPTION_SIGNALS,
        metadata={
            "help": "Signals that preempt the run (comma-separated): on one, received by any rank, every rank stops at "
            "the next optimizer step, writes one checkpoint and exits with status 143; the same command resumes. "
            "'none' turns this off (docs/reliability.md)."
        },
    )

    @property
    def method(self) -> str:
        """The paper's name for this configuration."""
        return method_name(self.reinit_head, self.head_lr_schedule)

    def method_settings(self) -> dict:
        """RIFLE's own settings, as `RifleTrainerCallback(**settings)` takes them."""
        return {name: getattr(self, name) for name in METHOD_FIELDS}

    def __post_init__(self):
        check_method_settings(**self.method_settings())
        if self.weight_decay is None:
            self.weight_decay = PAPER_WEIGHT_DECAY if self.regularizer == "l2" else 0.0
        check_weight_decay(self.regularizer, self.weight_decay)
        parse_signals(self.preemption_signals)
        if self.enable_jit_checkpoint:
            raise ValueError(JIT_CHECKPOINT_REFUSED)
        super().__post_init__()


def method_name(reinit_head: bool, head_lr_schedule: str) -> str:
    """The paper's name: RIFLE, its ablations RIFLE-A (re-init only) and RIFLE-B (cyclic head LR only), or neither."""
    cyclic = head_lr_schedule == "cyclic_cosine"
    if reinit_head:
        return "RIFLE" if cyclic else "RIFLE-A"
    return "RIFLE-B" if cyclic else "fine-tuning"


def check_method_settings(
    num_periods: int,
    head_lr_schedule: str,
    head_init: str,
    head_init_std: float,
    regularizer: str,
    l2sp_alpha: float,
    l2sp_beta: float,
    reinit_when: str = DEFAULT_REINIT_WHEN,
    **flags,
) -> None:
    """One check of RIFLE's settings for `RifleConfig`, `RifleTrainerCallback` and `attach`; errors name the fix."""
    _check_choice("reinit_when", reinit_when, REINIT_WHEN)
    _check_choice("head_lr_schedule", head_lr_schedule, HEAD_LR_SCHEDULES)
    _check_choice("head_init", head_init, HEAD_INITS)
    _check_choice("regularizer", regularizer, REGULARIZERS)
    if not isinstance(num_periods, int) or num_periods < 1:
        raise ValueError(
            f"num_periods must be >= 1 (an integer), got {num_periods}: use 1 for a single period (no re-init)."
        )
    for name, value in (("l2sp_alpha", l2sp_alpha), ("l2sp_beta", l2sp_beta), ("head_init_std", head_init_std)):
        _check_non_negative(name, value)


def check_weight_decay(regularizer: str, weight_decay: float) -> None:
    """L2-SP already pulls every weight (towards the pretrained backbone, towards 0 for the head): weight decay on
    top would regularize twice, with a pull towards 0 that L2-SP exists to replace."""
    _check_non_negative("weight_decay", weight_decay)
    if regularizer == "l2sp" and weight_decay > 0:
        raise ValueError(
            f"regularizer='l2sp' with weight_decay={weight_decay} regularizes twice: L2-SP pulls the backbone towards "
            "its pretrained weights, weight decay towards 0. Set weight_decay=0 (or leave it unset), or use "
            "regularizer='l2' for plain weight decay."
        )


def _check_non_negative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name}={value!r}: choose one of {', '.join(map(repr, choices))}.")
