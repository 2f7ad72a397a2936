"""`attach`: the full RIFLE method on any PyTorch training loop, through PyTorch's own hooks.

Everything RIFLE does happens around `optimizer.step()`, so it is one hooked object, as `torch.optim.swa_utils` and
profilers attach to loops they do not own. The hooks sit on the base optimizer (inside accelerate's
`AcceleratedOptimizer`), so they fire once per real update under `GradScaler.step`, gradient accumulation, DDP and
timm's `NativeScaler`:

- before each update: L2-SP's exact gradient is added (to unscaled gradients: GradScaler unscales them before the
  step, and a fused optimizer's are unscaled around the addition), and the head's parameters are recorded when it
  shares a param group with the backbone;
- after it: the head's update is rescaled to its cyclic learning rate, and the step counter advances;
- at the first forward in training mode of a step that starts a period: the head is re-drawn (with
  `reinit_when="fitted"`, the default, only if it has fit: `hf_rifle.fit`). Not after the last update of a period,
  since loops evaluate and save checkpoints in between, which must see the trained head. Under `"fitted"` only a head
  RIFLE re-drew gets the cyclic cosine: the model's own head and a kept one follow the backbone's learning rate, so a
  run whose every planned re-init is skipped is plain fine-tuning, bit for bit;
- after the head's forward in training mode, in the last tenth of a period that ends in a re-init: its top-class
  loss (the fit test's statistic) is added up, and summed over ranks after each of those updates, so every rank
  decides alike.

The step counter, the fit statistic and the decisions travel in the optimizer's param groups, so
`optimizer.state_dict()` / `load_state_dict()`, which every loop already saves and loads, resume the periods and
their decisions; `handle.state_dict()` is there for loops that prefer it.
The method's work is done by the core's plain functions; this module only decides when.
"""

import functools
import logging
from dataclasses import asdict

import torch
from torch import nn

from .config import check_method_settings
from .fit import (
    DEFAULT_REINIT_WHEN,
    UNRECORDED_REINIT_WHEN,
    FitDecision,
    decide_redraw,
    fit_windows,
    late_redraw_steps,
    top_class_loss_ratios,
)
from .functional import HeadReinit, reinit_head_at_period_start_
from .heads import find_head
from .optim import (
    HEAD_GROUP_KEY,
    base_optimizer,
    check_update_scales_with_lr,
    head_learning_rate,
    record_head_update_,
    rescale_head_update_,
)
from .regularizers import add_l2sp_gradient_, l2sp_penalty, snapshot, split_backbone_and_head
from .schedule import (
    RunShape,
    check_resumed_shape,
    period_starts,
    position_in_period,
    reinit_steps,
    short_period_warning,
)
from .sharding import check_not_sharded

logger = logging.getLogger(__name__)

# In every param group, saved with the optimizer: {"step", "max_steps", "num_periods", "run_shape", "reinit_when",
# "fit", "decisions"}: "fit" is the fit test's running [sum, count] of top-class loss ratios (over ranks) before the
# next re-init, "decisions" a [step, period, loss ratio, head age, redrawn] row per planned re-init so far.
# "reinit_when" is the schedule the run was started with, which a resumed run keeps (absent: "always").
STATE_KEY = "rifle_attach"
DEFAULT_SEED = 42  # TrainingArguments' default seed, which the Trainer paths draw the head with by default
L2SP_AFTER_LOAD_REFUSED = (
    "attach(..., regularizer='l2sp') after a checkpoint was loaded: the optimizer's state is at RIFLE step {step}, so "
    "the model holds trained weights, and L2-SP would pull the backbone towards them instead of the pretrained ones. "
    "Call attach before loading the checkpoint (model and optimizer), or pass l2sp_reference=<the pretrained "
    "backbone's values, recorded with hf_rifle.regularizers.snapshot(split_backbone_and_head(model, head)[0]) "
    "before training>."
)
L2SP_WEIGHT_DECAY_WARNING = (
    "regularizer='l2sp' with an optimizer whose weight_decay is {weight_decay}: L2-SP pulls the backbone towards its "
    "pretrained weights and weight decay pulls it towards 0, so the run is regularized twice. Build the optimizer "
    "with weight_decay=0 (AdamW's default is 0.01), or use regularizer='l2'."
)


class RifleHandle:
    """What `attach` returns: RIFLE hooked into a model and its optimizer, with what a loop logs and saves.

    `step` (optimizer updates done, the index of the next one), `period` (1..K), `head_learning_rate` (the head's
    learning rate for the next update), `l2sp_loss` (L2-SP's term, None with L2) and `decisions` (one `FitDecision`
    per planned re-init so far: the fit statistic and whether the head was re-drawn) are for the loop's logs;
    `state_dict()` / `load_state_dict()` for loops that save RIFLE's state apart from the optimizer's;
    `detach()` (or leaving a `with` block) removes every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_steps: int,
        num_periods: int,
        head_params: list[nn.Parameter],
        reinit,
        rescale_head: bool,
        l2sp: tuple | None,
        reinit_on_forward: bool,
        run_shape: RunShape | None = None,
        reinit_when: str = DEFAULT_REINIT_WHEN,
        head: nn.Module | None = None,
        min_steps_left: int = 0,
    ):
        self.max_steps = max_steps
        self.num_periods = num_periods
        self.run_shape = run_shape
        self.reinit_when = reinit_when
        self.min_steps_left = min_steps_left  # "fitted": the fewest steps a re-drawn head must have left
        self.settings_warnings: list[str] = []  # logged by `attach`, kept for a card or a summary
        self._optimizer = optimizer
        self._head_params = head_params
        self._head_ids = {id(p) for p in head_params}
        self._reinit = reinit  # reinit_head_at_period_start_ with everything but the step bound, or None
        self._rescale_head = rescale_head
        head_group = self._head_group()
        self._peak_lr = head_group.get("initial_lr", head_group["lr"])  # torch's LR schedulers record the peak
        self._l2sp = l2sp  # (backbone, its pretrained values, head, alpha, beta), or None
        self._head_updates = []
        self._step = 0
        self._begun_step = None  # the last step whose start was handled (re-initialization checked)
        self._reinit_steps = reinit_steps(max_steps, num_periods) if reinit is not None else []
        self._fit_windows = fit_windows(max_steps, num_periods) if reinit is not None else {}
        self._fit = [0.0, 0.0]  # the fit test's [sum, count] of loss ratios, over ranks, since the last decision
        self._fit_pending = None  # this rank's [sum, count] for the current step, a tensor on the head's device
        self._decisions: dict[int, FitDecision] = {}
        self._resume_from_optimizer()  # before any hook: a refused state leaves nothing attached
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_update),
            optimizer.register_step_post_hook(self._after_update),
            optimizer.register_load_state_dict_post_hook(self._after_load),
        ]
        # Disabled for torch.compile: hooks reading a step counter would otherwise be traced and recompile.
        if reinit_on_forward and reinit is not None:
            self._hooks.append(model.register_forward_pre_hook(torch.compiler.disable(self._before_forward)))
        if self._fit_windows:
            self._hooks.append(head.register_forward_hook(torch.compiler.disable(self._after_head_forward)))

    @property
    def step(self) -> int:
        return self._step

    @property
    def period(self) -> int:
        return position_in_period(self._step, self.max_steps, self.num_periods)[0] + 1

    @property
    def head_learning_rate(self) -> float:
        """The head's learning rate for the next update, as the backbone's is its param group's `lr`."""
        group = self._head_group()
        if self._head_follows_backbone():
            return self._backbone_lr(group)
        if not self._rescale_head:  # head groups of its own, or head_lr_schedule="trainer"
            return group["lr"]
        return head_learning_rate(group, self._step, self.max_steps, self.num_periods, self._peak_lr)

    @property
    def decisions(self) -> list[FitDecision]:
        """One entry per planned re-initialization reached so far, in order."""
        return [self._decisions[step] for step in sorted(self._decisions)]

    @property
    def l2sp_loss(self) -> float | None:
        if self._l2sp is None:
            return None
        with torch.no_grad():
            return l2sp_penalty(*self._l2sp).item()

    def begin_step(self, step: int) -> HeadReinit | None:
        """Start optimizer step `step` (from 0): re-draw the head if it starts one of periods 2..K (with
        `reinit_when="fitted"`, only if the head has fit). The decision is logged, at INFO when the method does what it
        planned and at WARNING when it does not (`FitDecision.needs_attention`): a warning that is always there
        would teach users to ignore the one about a head re-drawn before it fit.

        For loops that count their own steps (Trainer's `global_step`, timm's `num_updates`), called before the
        step's first forward; the forward hook calls it otherwise, and skips a step already begun.
        """
        self._set_step(step)
        self._begun_step = step
        if step not in self._reinit_steps:
            self._follow_backbone_if_not_redrawn()
            return None
        decision = self._decisions.get(step)
        first_time = decision is None
        if first_time:
            decision = self._decide(step)
        done = self._reinit(step=step) if decision.redrawn else None
        self._follow_backbone_if_not_redrawn()
        if first_time and _is_main_process():
            text = decision.describe(self.num_periods, self.reinit_when, done and done.head_name)
            logger.log(logging.WARNING if decision.needs_attention else logging.INFO, "RIFLE: %s", text)
        return done

    def _head_follows_backbone(self) -> bool:
        """Under `"fitted"`, whether the head now is one RIFLE did not draw: the model's own head in the first period,
        or a head kept at the start of this one. Such a head follows the backbone's learning rate, as in plain
        fine-tuning, so that a run whose every planned re-init is skipped is plain fine-tuning, bit for bit; only a
        head RIFLE re-drew gets the cosine that restarts with it (docs/benchmarks.md, "The safe default")."""
        if not self._reinit_steps or self.reinit_when != "fitted":
            return False
        period = position_in_period(self._step, self.max_steps, self.num_periods)[0]
        if period == 0:
            return True
        start = period_starts(self.max_steps, self.num_periods)[period]
        decision = self._decisions.get(start)
        if decision is None and start == self._step and start in self._reinit_steps:  # logged before it is taken
            decision = self._decision_at(start)
        return decision is not None and not decision.redrawn

    def _backbone_lr(self, head_group: dict) -> float:
        """The learning rate `head_group` gets on the backbone's schedule now: the group's own where the head shares
        one with the backbone; for a head group of its own, the first backbone group's, scaled by the ratio of their
        peaks (`initial_lr`) where a loop gave the head another peak (RifleTrainer's groups share one)."""
        if not head_group.get(HEAD_GROUP_KEY):
            return head_group["lr"]
        backbone = next(g for g in self._optimizer.param_groups if not g.get(HEAD_GROUP_KEY))
        head_peak, backbone_peak = head_group.get("initial_lr"), backbone.get("initial_lr")
        if head_peak is None or backbone_peak in (None, 0) or head_peak == backbone_peak:
            return backbone["lr"]
        return head_peak * backbone["lr"] / backbone_peak

    def _decide(self, step: int) -> FitDecision:
        """The planned re-init's decision, recorded in the saved state."""
        decision = self._decisions[step] = self._decision_at(step)
        self._fit = [0.0, 0.0]
        self._set_step(step)
        return decision

    def _decision_at(self, step: int) -> FitDecision:
        """The decision the planned re-init at `step` gets from the statistic gathered before it."""
        total, count = self._fit
        ratio = total / count if count else None
        period = self._reinit_steps.index(step) + 2
        drawn_at = max((d.step for d in self._decisions.values() if d.redrawn and d.step < step), default=0)
        age, steps_left = step - drawn_at, self.max_steps - step
        redraw = decide_redraw(self.reinit_when, ratio, age, steps_left, self.min_steps_left)
        return FitDecision(step, period, ratio, age, self.max_steps, redraw, self.min_steps_left)

    def state_dict(self) -> dict:
        shape = asdict(self.run_shape) if self.run_shape is not None else None
        return {
            "step": self._step,
            "max_steps": self.max_steps,
            "num_periods": self.num_periods,
            "run_shape": shape,
            "reinit_when": self.reinit_when,
            "fit": list(self._fit),
            "decisions": [[d.step, d.period, d.loss_ratio, d.head_age, d.redrawn] for d in self.decisions],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a run from `state_dict()`; refused if it had another max_steps or num_periods."""
        check_same_run(state, self.max_steps, self.num_periods, self.run_shape)
        self._begun_step = None
        self._load(state)

    def detach(self) -> None:
        """Remove every hook: from here on the optimizer and the model train as if RIFLE had never been attached."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._head_updates = []

    def __enter__(self) -> "RifleHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def _before_forward(self, module: nn.Module, args) -> None:
        # The first training forward of each step only: evaluation between steps must see the trained head.
        if module.training and torch.is_grad_enabled() and self._begun_step != self._step:
            self.begin_step(self._step)

    def _after_head_forward(self, module: nn.Module, args, output) -> None:
        """In a fit window, add this training batch's top-class losses to the step's running sum."""
        if self._step not in self._fit_windows or not (module.training and torch.is_grad_enabled()):
            return
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if logits is None or logits.shape[-1] < 2:
            return
        ratios = top_class_loss_ratios(logits)
        batch = torch.stack([ratios.double().sum(), torch.tensor(float(ratios.numel()), device=ratios.device)])
        self._fit_pending = batch if self._fit_pending is None else self._fit_pending + batch

    def _before_update(self, optimizer, args, kwargs) -> None:
        if self._l2sp is not None:
            self._add_l2sp_gradient(optimizer)
        if self._rescale_head and not self._head_follows_backbone():  # otherwise on the backbone's learning rate
            self._head_updates = record_head_update_(
                optimizer, self._head_params, self._step, self.max_steps, self.num_periods, self._peak_lr
            )

    def _after_update(self, optimizer, args, kwargs) -> None:
        rescale_head_update_(self._head_updates)
        self._head_updates = []
        if self._step in self._fit_windows:
            self._add_step_to_fit_statistic()
        self._set_step(self._step + 1)

    def _follow_backbone_if_not_redrawn(self) -> None:
        """At a step's start, while the head is one RIFLE did not draw (`_head_follows_backbone`): head groups of
        their own (RifleTrainer's) take the backbone group's learning rate for this step. Their scheduler sets its
        own curve again after the update, which the next step's start overrides the same way; a head sharing the
        backbone's group is not rescaled."""
        if self._head_follows_backbone():
            for group in self._optimizer.param_groups:
                if group.get(HEAD_GROUP_KEY):
                    group["lr"] = self._backbone_lr(group)

    def _add_step_to_fit_statistic(self) -> None:
        """Sum this step's losses over the ranks (every rank is at the same update) into the running statistic,
        so the decision, and the state each rank saves, is the same on every rank."""
        pending, self._fit_pending = self._fit_pending, None
        device = pending.device if pending is not None else self._head_params[0].device
        pending = pending if pending is not None else torch.zeros(2, dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(pending)
        total, count = pending.tolist()
        self._fit = [self._fit[0] + total, self._fit[1] + count]

    def _after_load(self, optimizer) -> None:
        self._begun_step = None
        self._resume_from_optimizer()

    @torch.no_grad()
    def _add_l2sp_gradient(self, optimizer) -> None:
        """GradScaler unscales the gradients before the step, except for fused optimizers, whose kernel divides by
        the `grad_scale` GradScaler sets on them: their gradients are unscaled around the addition (exactly, the
        scale being a power of 2)."""
        scale = getattr(optimizer, "grad_scale", None)
        backbone, _, head, _, _ = self._l2sp
        grads = [p.grad for p in backbone + head if p.grad is not None] if scale is not None else []
        if grads:
            torch._foreach_div_(grads, scale)
        add_l2sp_gradient_(*self._l2sp)
        if grads:
            torch._foreach_mul_(grads, scale)

    def _resume_from_optimizer(self) -> None:
        """Take the state from the optimizer's param groups where a loaded state put it; else record ours there."""
        stored = stored_state(self._optimizer)
        if stored is not None:
            check_same_run(stored, self.max_steps, self.num_periods, self.run_shape)
            self._load(stored)
        self._set_step(self._step)

    def _load(self, state: dict) -> None:
        # A state saved before the schedule was recorded: "always" (then the default), unless it kept a head.
        kept_a_head = any(not redrawn for *_, redrawn in state.get("decisions", []))
        started_with = state.get("reinit_when") or ("fitted" if kept_a_head else UNRECORDED_REINIT_WHEN)
        if started_with != self.reinit_when and self._reinit_steps and _is_main_process():
            logger.warning(
                "RIFLE: this run was started with reinit_when=%r and resumes with it (asked: %r): a resumed run keeps "
                "the schedule it started with. For %r, start a new run.",
                started_with,
                self.reinit_when,
                self.reinit_when,
            )
        elif self._reinit_steps and _is_main_process() and state["step"] > 0:
            logger.info("RIFLE: resuming at step %d with reinit_when=%r, as started.", state["step"], started_with)
        self.reinit_when = started_with
        self._fit = list(state.get("fit", [0.0, 0.0]))
        self._fit_pending = None
        self._decisions = {
            step: FitDecision(step, period, ratio, age, self.max_steps, redrawn, self.min_steps_left)
            for step, period, ratio, age, redrawn in state.get("decisions", [])
        }
        self._set_step(state["step"])

    def _set_step(self, step: int) -> None:
        self._step = step
        state = self.state_dict()
        for group in self._optimizer.param_groups:
            group[STATE_KEY] = dict(state)  # a new dict: a state dict taken earlier keeps its own

    def _head_group(self) -> dict:
        return next(g for g in self._optimizer.param_groups if any(id(p) in self._head_ids for p in g["params"]))


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    *,
    num_periods: int = 3,
    reinit_head: bool = True,
    head_lr_schedule: str = "cyclic_cosine",
    head_init: str = "default",
    head_init_std: float = 0.01,
    reset_head_optimizer_state: bool = True,
    head_module: str | None = None,
    regularizer: str = "l2",
    l2sp_alpha: float = 0.01,
    l2sp_beta: float = 0.01,
    seed: int = DEFAULT_SEED,
    num_train_epochs: float | None = None,
    reinit_on_forward: bool = True,
    l2sp_reference: list[torch.Tensor] | None = None,
    run_shape: RunShape | None = None,
    reinit_when: str = DEFAULT_REINIT_WHEN,
) -> RifleHandle:
    """Run the full RIFLE method in any training loop that calls `optimizer.step()`: head re-initialization at
    the start of periods 2..K, the head's cyclic cosine learning rate and, with `regularizer="l2sp"`, L2-SP.

    The method's arguments are `RifleConfig`'s, with the same names and defaults; `seed` (of the head draws)
    defaults to `TrainingArguments`' seed, 42, so the Trainer paths and a loop draw the same heads by default.
    `max_steps` is the run's number of optimizer updates (with gradient accumulation: batches / accumulation steps).
    Where the head shares a param group with the backbone, its update is rescaled to its learning rate, exact for
    optimizers whose update is proportional to the learning rate (others are refused here); its peak is the group's
    `initial_lr` (set by torch's LR schedulers), else its learning rate now. Head groups marked
    `{"rifle_head": True}` keep the curve the loop's scheduler gives them. L2 is the optimizer's own weight decay:
    RIFLE adds nothing.

    Call it before loading a checkpoint: L2-SP's reference is the backbone as it is now, the pretrained weights
    (or `l2sp_reference`, their values recorded earlier in `split_backbone_and_head`'s order, for a model that has
    already loaded a checkpoint: the Trainer adapters record them when the Trainer is built).
    The step counter is saved in the optimizer's state dict, so loading that state (before or after `attach`)
    continues the periods; a state from a run with another `max_steps` or `num_periods` is refused. A loop that
    passes `run_shape` (what its steps are made of) has the refusal name the processes, batch size or accumulation
    that changed and the setting that keeps the first run's steps.

    When a step starts a period, the head is re-drawn at that step's first call of `model` in training mode with
    gradients enabled, so evaluations and checkpoints between steps see the trained head. A loop that counts its own
    steps can pass `reinit_on_forward=False` and call `handle.begin_step(step)` before each step instead (also
    the way to keep the periods on the loop's count when fp16 loss scaling skips updates, which then never reach a
    non-fused optimizer).

    Gradient clipping cannot be seen from the optimizer: RIFLE is meant to run without it (clipping damps the
    gradients a re-drawn head sends into the backbone); a loop that clips anyway clips the data gradient only, since
    L2-SP's is added at the step. `num_train_epochs`, if given, lets `reinit_when="fitted"` refuse a re-draw with fewer
    than 8 epochs left (`hf_rifle.fit.late_redraw_steps`) and, with `"always"`, warns about periods too short to fit
    a new head.

    Example:
        Given a pretrained classifier `model` (here a tiny transformers text classifier) and 6 `batches`:

        >>> import torch
        >>> from hf_rifle.attach import attach
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        >>> scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
        >>> rifle = attach(model, optimizer, max_steps=6, num_periods=3, regularizer="l2sp")
        >>> for batch in batches:  # the head is re-drawn at the first forward of steps 2 and 4
        ...     model(**batch).loss.backward()
        ...     optimizer.step()
        ...     scheduler.step()
        ...     optimizer.zero_grad()
        >>> rifle.step, rifle.period, rifle.head_learning_rate  # the cosine of period 3 has reached 0
        (6, 3, 0.0)
    """
    check_not_sharded(model)  # FSDP: refused now, not at the first re-init halfway through the run
    check_method_settings(
        num_periods, head_lr_schedule, head_init, head_init_std, regularizer, l2sp_alpha, l2sp_beta, reinit_when
    )
    period_starts(max_steps, num_periods)  # refuses more periods than steps now, not at a period boundary
    optimizer = base_optimizer(optimizer)
    resumed = stored_state(optimizer)
    if regularizer == "l2sp" and l2sp_reference is None and resumed is not None and resumed["step"] > 0:
        raise ValueError(L2SP_AFTER_LOAD_REFUSED.format(step=resumed["step"]))
    _, head = find_head(model, head_module)
    head_params = _head_params_in(optimizer, head)
    has_head_groups = any(group.get(HEAD_GROUP_KEY) for group in optimizer.param_groups)
    rescale_head = head_lr_schedule == "cyclic_cosine" and not has_head_groups
    if rescale_head:
        check_update_scales_with_lr(optimizer)
    reinit = None
    if reinit_head:
        reinit = functools.partial(
            reinit_head_at_period_start_,
            model,
            optimizer,
            max_steps=max_steps,
            num_periods=num_periods,
            seed=seed,
            head_module=head_module,
            head_init=head_init,
            head_init_std=head_init_std,
            reset_optimizer_state=reset_head_optimizer_state,
        )
    l2sp = None
    if regularizer == "l2sp":
        backbone, head_trainable = split_backbone_and_head(model, head)
        reference = snapshot(backbone) if l2sp_reference is None else l2sp_reference
        l2sp = (backbone, reference, head_trainable, l2sp_alpha, l2sp_beta)
    handle = RifleHandle(
        model,
        optimizer,
        max_steps,
        num_periods,
        head_params,
        reinit,
        rescale_head,
        l2sp,
        reinit_on_forward,
        run_shape,
        reinit_when=reinit_when,
        head=head,
        min_steps_left=late_redraw_steps(max_steps, num_train_epochs),
    )
    handle.settings_warnings = _settings_warnings(
        optimizer, regularizer, reinit_head, num_periods, num_train_epochs, reinit_when
    )
    if _is_main_process():
        for warning in handle.settings_warnings:
            logger.warning(warning)
    return handle


def _settings_warnings(
    optimizer, regularizer: str, reinit_head: bool, num_periods: int, num_train_epochs, reinit_when: str
) -> list[str]:
    """What `attach` can see that silently undoes RIFLE: weight decay on top of L2-SP, periods too short."""
    warnings = []
    weight_decay = max(group.get("weight_decay") or 0.0 for group in optimizer.param_groups)
    if regularizer == "l2sp" and weight_decay > 0:
        warnings.append(L2SP_WEIGHT_DECAY_WARNING.format(weight_decay=weight_decay))
    short = num_train_epochs is not None and short_period_warning(
        num_train_epochs, num_periods, reinit_head, reinit_when
    )
    if short:
        warnings.append(short)
    return warnings


def stored_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """RIFLE's state as a loaded (or earlier attached) optimizer state put it in the param groups, or None."""
    return next((group[STATE_KEY] for group in optimizer.param_groups if STATE_KEY in group), None)


def check_same_run(stored: dict, max_steps: int, num_periods: int, run_shape: RunShape | None = None) -> None:
    """Refuse to continue a run whose periods were defined on another max_steps or num_periods; in the terms of
    processes, batch size and accumulation where both runs recorded them."""
    if (stored["max_steps"], stored["num_periods"]) == (max_steps, num_periods):
        return
    if stored["num_periods"] == num_periods and stored.get("run_shape") and run_shape is not None:
        check_resumed_shape(RunShape(**stored["run_shape"]), run_shape, num_periods)
    saved = ", ".join(map(str, reinit_steps(stored["max_steps"], stored["num_periods"]))) or "none"
    raise ValueError(
        f"The RIFLE state being loaded comes from a run with max_steps={stored['max_steps']}, "
        f"num_periods={stored['num_periods']} (head re-drawn at steps {saved}); this one was attached with "
        f"max_steps={max_steps}, num_periods={num_periods}. Resuming would add or skip re-initializations. Call "
        f"attach(..., max_steps={stored['max_steps']}, num_periods={stored['num_periods']}) as the first run did, or "
        "start a new run without loading this optimizer state."
    )


def _head_params_in(optimizer: torch.optim.Optimizer, head: nn.Module) -> list[nn.Parameter]:
    """The head's parameters, refusing an optimizer that holds none: the head would be re-drawn and never trained."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = list(head.parameters())
    if not any(id(p) in in_optimizer for p in params):
        raise ValueError(
            "None of the head's parameters are in the optimizer: build the optimizer after the head is final (e.g. "
            "after timm's reset_classifier) and from model.parameters(), or name the head with head_module=."
        )
    return params


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )
