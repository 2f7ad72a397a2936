"""RIFLE (Li et al., ICML 2020) for the Hugging Face training stack.

Plain functions do the work (`period_starts`, `cyclic_cosine_factor`, `find_head`, `reinit_head_`,
`l2sp_penalty`); `RifleTrainerCallback` and `RifleTrainer` only decide when, inside `transformers.Trainer`.
"""

from .callback import RifleTrainerCallback
from .config import RifleConfig
from .heads import clear_optimizer_state_, find_head, head_seed, reinit_head_
from .regularizers import l2sp_penalty, split_backbone_and_head
from .schedule import cyclic_cosine_factor, period_starts, position_in_period, reinit_steps
from .trainer import RifleTrainer

__all__ = [
    "RifleConfig",
    "RifleTrainer",
    "RifleTrainerCallback",
    "clear_optimizer_state_",
    "cyclic_cosine_factor",
    "find_head",
    "head_seed",
    "l2sp_penalty",
    "period_starts",
    "position_in_period",
    "reinit_head_",
    "reinit_steps",
    "split_backbone_and_head",
]
__version__ = "0.1.0"
