"""RIFLE (Li et al., ICML 2020) for the Hugging Face training stack: the core.

Plain functions do the work (period arithmetic, the head's learning-rate curve, head discovery and
re-initialization, the L2-SP penalty and its gradient); `RifleTrainerCallback` and `RifleTrainer` only decide
when, inside `transformers.Trainer`. This top level needs torch and transformers only: the training recipe
(`hf_rifle.recipe`) and the paper-reproduction kit (`hf_rifle.paper`) build on it and are never imported here.
"""

from .attach import RifleHandle, attach
from .callback import RifleTrainerCallback
from .config import RifleConfig
from .fit import FitDecision
from .functional import HeadReinit, reinit_head_at_period_start_
from .heads import clear_optimizer_state_, find_head, head_seed, reinit_head_
from .preemption import PREEMPTED_EXIT_CODE, PreemptionCallback, TrainingPreempted
from .regularizers import add_l2sp_gradient_, l2sp_penalty, split_backbone_and_head
from .schedule import cyclic_cosine_factor, period_starts, position_in_period, reinit_steps
from .trainer import RifleTrainer

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "FitDecision",
    "HeadReinit",
    "PreemptionCallback",
    "RifleConfig",
    "RifleTrainer",
    "RifleHandle",
    "RifleTrainerCallback",
    "TrainingPreempted",
    "add_l2sp_gradient_",
    "attach",
    "clear_optimizer_state_",
    "cyclic_cosine_factor",
    "find_head",
    "head_seed",
    "l2sp_penalty",
    "period_starts",
    "position_in_period",
    "reinit_head_",
    "reinit_head_at_period_start_",
    "reinit_steps",
    "split_backbone_and_head",
]
__version__ = "0.1.0"
