"""Preemption: a signal stops training at the next optimizer-step boundary, with one checkpoint, on every rank.

Clusters stop a job with a signal and a grace period (SLURM's `--signal`, Kubernetes' SIGTERM before
`terminationGracePeriodSeconds`, spot instances), then start it again, often elsewhere. The signal handler
only records the signal. At the next step boundary every rank learns whether any rank received one (one
all-reduce of a flag per optimizer step), all ranks write one checkpoint of that step, and the process exits
with `PREEMPTED_EXIT_CODE` (143), raised as `TrainingPreempted`: no evaluation, no final model, card or push,
so nothing presents a cut-short run as finished. The same command resumes from that checkpoint.

transformers' own `enable_jit_checkpoint` is refused instead: it may save mid-step (gradients computed, update
not applied), is not coordinated across ranks, and lets `train()` return normally, so a script goes on to
finalize the cut-short run.
"""

import logging
import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what SLURM and Kubernetes requeue logic usually keys on
DEFAULT_PREEMPTION_SIGNALS = "SIGTERM,SIGUSR1"
NO_PREEMPTION = ("", "none")
UNCATCHABLE = ("SIGKILL", "SIGSTOP")
JIT_CHECKPOINT_REFUSED = (
    "enable_jit_checkpoint=True: transformers' JIT checkpoint may save in the middle of an optimizer step, does not "
    "coordinate ranks, and lets train() return normally, so the cut-short run is then finalized as if it were done. "
    "hf_rifle handles preemption itself: on SIGTERM or SIGUSR1 every rank stops at the next step boundary, writes "
    f"one checkpoint and exits with status {PREEMPTED_EXIT_CODE}, and the same command resumes "
    "(RifleConfig.preemption_signals, or PreemptionCallback() on a plain Trainer). Remove enable_jit_checkpoint."
)


def parse_signals(names: str) -> tuple[signal.Signals, ...]:
    """'SIGTERM,SIGUSR1' -> the signals; '' or 'none' -> no signals (preemption handling off)."""
    if names.strip().lower() in NO_PREEMPTION:
        return ()
    parsed = []
    for name in (part.strip().upper() for part in names.split(",")):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in UNCATCHABLE or not hasattr(signal.Signals, name):
            raise ValueError(
                f"preemption_signals={names!r}: {name} is not a signal a process can catch. Name catchable signals "
                f"separated by commas (default {DEFAULT_PREEMPTION_SIGNALS!r}), or 'none' to turn preemption off."
            )
        parsed.append(signal.Signals[name])
    return tuple(parsed)


class SignalRecorder:
    """Records the first of `signals` this process receives, and nothing else: the handler runs between two
    bytecodes of whatever the main thread was doing, so acting there could tear a write or a collective."""

    def __init__(self, signals: tuple[signal.Signals, ...]):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        if self.installed or not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Preemption handling is off: signal handlers can only be installed from the main thread.")
            return
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._record)

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def _record(self, number, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number)


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is True on any: one all-reduce of a one-element tensor, or nothing alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class TrainingPreempted(SystemExit):
    """Training stopped on a preemption signal after writing `checkpoint` (None when there was nothing new to
    save). A `SystemExit` with status 143: uncaught, the process exits quietly with that status."""

    def __init__(self, reason: str, checkpoint: str | None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.reason = reason
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        written = f"wrote {self.checkpoint}" if self.checkpoint else "wrote no new checkpoint"
        return (
            f"Preempted ({self.reason}): {written} and stopped, with exit status {PREEMPTED_EXIT_CODE}, before "
            "anything was finalized. Run the same command again to resume."
        )


class PreemptionCallback(TrainerCallback):
    """Preemption handling for any `transformers.Trainer`: on one of `signals` (a comma-separated string, default
    'SIGTERM,SIGUSR1'), received by any rank, every rank stops at the next optimizer-step boundary, writes one
    checkpoint of that step and raises `TrainingPreempted` (exit status 143), so nothing after `train()` runs.

    A signal during evaluation or a checkpoint write lets it finish first; one before the first step (or before
    training began, where the handlers are installed earlier with `install()`) stops at train begin with no new
    checkpoint; one after the last step boundary, as training ends, is given back to the handler the signal had
    before (by default: the process ends), unless `install()` was called, whose caller then owns the decision.
    `RifleTrainer` installs one from `RifleConfig.preemption_signals`.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[RifleTrainerCallback(), PreemptionCallback()])
    """

    def __init__(self, signals: str = DEFAULT_PREEMPTION_SIGNALS):
        self.recorder = SignalRecorder(parse_signals(signals))
        self._installed_at_train_begin = False
        self._stopping = False

    def install(self) -> None:
        """Start recording signals now, before training (the recipe does, before it loads data)."""
        self.recorder.install()

    def on_train_begin(self, args, state, control, **kwargs):
        if args.enable_jit_checkpoint:
            raise ValueError(JIT_CHECKPOINT_REFUSED)
        self._installed_at_train_begin = not self.recorder.installed
        self.recorder.install()
        self.exit_if_signaled(args, state, checkpoint=None)

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed(args):
            self._save_and_stop(control)

    def on_evaluate(self, args, state, control, **kwargs):
        if not self._stopping and self.agreed(args):
            self._save_and_stop(control)

    def on_save(self, args, state, control, **kwargs):
        if self._stopping:
            self._exit(args, state, f"{args.output_dir}/checkpoint-{state.global_step}")
        self.exit_if_signaled(args, state, f"{args.output_dir}/checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._installed_at_train_begin:
            self.recorder.restore()
            if self.recorder.received is not None:  # after the last step boundary: delivered as if never caught
                signal.raise_signal(self.recorder.received)

    def release(self) -> None:
        """Give back the handlers installed at train begin where training ended by an exception, so on_train_end
        never ran (`RifleTrainer.train` calls it); handlers installed earlier with `install()` stay with its caller."""
        if self._installed_at_train_begin:
            self.recorder.restore()

    def exit_if_signaled(self, args, state, checkpoint: str | None) -> None:
        """At a point every rank reaches: raise `TrainingPreempted` there if any rank has received a signal."""
        if self.agreed(args):
            self._exit(args, state, checkpoint)

    def restore(self) -> None:
        """Give the signals back to the handlers they had before `install()`."""
        self.recorder.restore()

    def agreed(self, args) -> bool:
        """Whether any rank has received a signal; every rank must call this at the same point."""
        return any_rank(self.recorder.received is not None, args.device)

    def reason(self) -> str:
        received = self.recorder.received
        return f"{received.name} received by this process" if received else "a signal received by another rank"

    def _save_and_stop(self, control) -> None:
        self._stopping = True
        control.should_evaluate = False
        control.should_save = True
        control.should_training_stop = True

    def _exit(self, args, state, checkpoint: str | None) -> None:
        preempted = TrainingPreempted(f"{self.reason()}, at optimizer step {state.global_step}", checkpoint)
        if state.is_world_process_zero:
            logger.warning("%s", preempted)
        self.recorder.restore()
        if dist.is_available() and dist.is_initialized():
            # Every rank is here (they agreed), so tear the group down while all are alive: gloo may abort otherwise.
            dist.barrier()
            dist.destroy_process_group()
        raise preempted
