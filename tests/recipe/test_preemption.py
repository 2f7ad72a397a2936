"""Preemption on one process: real signals stop the recipe at a step boundary with one checkpoint and status 143,
at any moment (a random step, evaluation, a checkpoint write, data loading, after training), and the same command
then resumes to the weights of a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from hf_rifle import PREEMPTED_EXIT_CODE, PreemptionCallback, RifleConfig, RifleTrainer, TrainingPreempted
from hf_rifle.checkpoints import checkpoint_problems
from hf_rifle.recipe import main
from hf_rifle.recipe import train as recipe_train

from ..helpers import RandomImages, StopAt, timm_wrapper_resnet
from .test_reliability import flags as reliability_flags

FINAL_OUTPUTS = ("model.safetensors", "README.md", "all_results.json", "learning_curve.png")
WORKER = Path(__file__).with_name("preemption_worker.py")


def flags(output_dir, data_and_model, *extra):
    """test_reliability's run (24 images, batch 4, 3 epochs: 18 steps, periods start at 0, 6 and 12) with a
    checkpoint every 4 steps."""
    return reliability_flags(output_dir, data_and_model, "--save_strategy", "steps", "--save_steps", "4", *extra)


def assert_same_weights(first: Path, second: Path) -> None:
    expected, actual = (load_file(folder / "model.safetensors") for folder in (first, second))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def assert_nothing_finalized(output_dir: Path) -> None:
    assert not [name for name in FINAL_OUTPUTS if (output_dir / name).exists()]


class SignalSelf(TrainerCallback):
    """Sends a real signal to this process during the first evaluation batch at `step`."""

    def __init__(self, step: int, number=signal.SIGTERM):
        self.step, self.number, self.sent = step, number, False

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.number)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_and_model):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    main(flags(output_dir, data_and_model))
    return output_dir


def test_a_signal_during_evaluation_lets_it_finish_then_checkpoints_that_step(tmp_path, data_and_model, uninterrupted):
    # Evaluation runs at every epoch end (steps 6, 12, 18): signalled during the one at step 6.
    argv = flags(tmp_path, data_and_model)
    with pytest.raises(TrainingPreempted) as stopped:
        main(argv, callbacks=[SignalSelf(6)])
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert stopped.value.checkpoint == f"{tmp_path}/checkpoint-6"
    assert checkpoint_problems(tmp_path / "checkpoint-6") == []
    assert_nothing_finalized(tmp_path)
    main(argv)
    assert_same_weights(uninterrupted, tmp_path)


def test_a_signal_during_a_checkpoint_write_lets_it_finish_then_stops(
    tmp_path, data_and_model, uninterrupted, monkeypatch
):
    save_rng_state = Trainer._save_rng_state

    def signalled_mid_write(self, output_dir):
        if self.state.global_step == 8:
            os.kill(os.getpid(), signal.SIGUSR1)
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", signalled_mid_write)
    argv = flags(tmp_path, data_and_model)
    with pytest.raises(TrainingPreempted) as stopped:
        main(argv)
    assert stopped.value.checkpoint == f"{tmp_path}/checkpoint-8"  # no step trained after it
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-8"]
    assert checkpoint_problems(tmp_path / "checkpoint-8") == []
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)
    main(argv)
    assert_same_weights(uninterrupted, tmp_path)


def test_a_signal_while_the_data_is_prepared_stops_at_train_begin_having_written_nothing(
    tmp_path, data_and_model, uninterrupted, monkeypatch
):
    apply_transforms = recipe_train.apply_transforms

    def signalled_while_caching(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return apply_transforms(*args, **kwargs)  # the image cache is still built whole, for the next run

    monkeypatch.setattr(recipe_train, "apply_transforms", signalled_while_caching)
    output_dir = tmp_path / "run"
    with pytest.raises(TrainingPreempted) as stopped:
        main(flags(output_dir, data_and_model))
    assert stopped.value.checkpoint is None
    assert not output_dir.exists()
    monkeypatch.setattr(recipe_train, "apply_transforms", apply_transforms)
    main(flags(output_dir, data_and_model))
    assert_same_weights(uninterrupted, output_dir)


def test_a_signal_during_the_final_evaluation_stops_before_anything_is_finalized(tmp_path, data_and_model):
    # Without evaluation during training, the only one is after it, at step 18.
    argv = flags(tmp_path, data_and_model, "--eval_strategy", "no", "--save_strategy", "epoch")
    with pytest.raises(TrainingPreempted):
        main(argv, callbacks=[SignalSelf(18)])
    assert_nothing_finalized(tmp_path)
    assert (tmp_path / "checkpoint-18").is_dir()  # the re-run resumes there and only evaluates and finalizes
    main(argv)
    assert (tmp_path / "README.md").is_file() and (tmp_path / "model.safetensors").is_file()


def test_preemption_can_be_turned_off_and_uncatchable_signals_are_refused(tmp_path):
    model, data = timm_wrapper_resnet(), RandomImages()
    settings = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3)
    default = RifleTrainer(model=model, args=RifleConfig(**settings), train_dataset=data)
    assert [type(c) for c in default.callback_handler.callbacks].count(PreemptionCallback) == 1
    off = RifleTrainer(model=model, args=RifleConfig(**settings, preemption_signals="none"), train_dataset=data)
    assert PreemptionCallback not in [type(c) for c in off.callback_handler.callbacks]
    with pytest.raises(ValueError, match="SIGKILL is not a signal a process can catch"):
        RifleConfig(**settings, preemption_signals="SIGTERM,SIGKILL")


def test_transformers_jit_checkpoint_is_refused_naming_the_alternative(tmp_path):
    with pytest.raises(ValueError, match="enable_jit_checkpoint=True.*Remove enable_jit_checkpoint"):
        RifleConfig(output_dir=str(tmp_path), enable_jit_checkpoint=True)
    from hf_rifle import RifleTrainerCallback

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", max_steps=3, enable_jit_checkpoint=True)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        for callback in (RifleTrainerCallback(), PreemptionCallback()):
            trainer = Trainer(timm_wrapper_resnet(), args, train_dataset=RandomImages(), callbacks=[callback])
            with pytest.raises(ValueError, match="PreemptionCallback\\(\\) on a plain Trainer"):
                trainer.train()
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # transformers' JIT checkpoint took SIGTERM when the Trainer was built


def test_a_plain_trainer_with_the_callback_checkpoints_and_exits_instead_of_returning(tmp_path):
    class SignalAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", max_steps=9, per_device_train_batch_size=4)
    trainer = Trainer(
        timm_wrapper_resnet(), args, train_dataset=RandomImages(36), callbacks=[SignalAtStep(), PreemptionCallback()]
    )
    with pytest.raises(TrainingPreempted) as stopped:
        trainer.train()
    assert stopped.value.checkpoint == f"{tmp_path}/checkpoint-5"
    assert trainer.state.global_step == 5 and (tmp_path / "checkpoint-5" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def test_a_signal_as_training_ends_goes_to_the_handler_it_had_before(tmp_path):
    class SignalAtTrainEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: received.append(number))
    try:
        args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", max_steps=2, save_strategy="no")
        callbacks = [SignalAtTrainEnd(), PreemptionCallback()]
        Trainer(timm_wrapper_resnet(), args, train_dataset=RandomImages(), callbacks=callbacks).train()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [signal.SIGUSR1]  # not swallowed: training was over, so there was nothing to checkpoint


@pytest.mark.parametrize(
    "stopper,extra,step,reason",
    [
        (lambda: StopAt(10), [], 10, "a callback set control.should_training_stop"),
        (  # a threshold no evaluation can beat: stops at the second one, after step 12
            lambda: EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0),
            ["--load_best_model_at_end", "True", "--metric_for_best_model", "eval_loss", "--save_strategy", "epoch"],
            12,
            "early stopping, eval_loss did not improve for 1 evaluations",
        ),
    ],
    ids=["user-callback", "early-stopping"],
)
def test_a_run_stopped_before_its_schedule_says_so_in_card_and_summary(
    tmp_path, data_and_model, capsys, stopper, extra, step, reason
):
    main(flags(tmp_path, data_and_model, "--reinit_when", "always", *extra), callbacks=[stopper()])
    card = (tmp_path / "README.md").read_text()
    assert f"**Training stopped early**, after optimizer step {step} of 18 ({reason})" in card
    assert "Head re-initialized at optimizer steps: 6 (of 18)" in card  # the re-init at 12 never happened
    assert f"fine-tuning stopped early, after optimizer step {step} of 18 ({reason})." in capsys.readouterr().out


def run_worker(argv: list[str], processes: int = 1, worker: Path = WORKER) -> subprocess.Popen:
    """The recipe in a subprocess, as a job runs it: plain python, or torchrun with `processes` (gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.Popen(
        [*launcher, str(worker), *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> str:
    """Wait for `process`; its standard error."""
    return process.communicate(timeout=600)[1]


def wait_for_step(output_dir: Path, step: int, process: subprocess.Popen, rank: int = 0) -> list[tuple[int, int]]:
    """The (pid, step) lines of a rank's progress file, once it reached `step` (or its process ended)."""
    progress = output_dir / f"progress-rank{rank}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        lines = (
            [tuple(map(int, line.split())) for line in progress.read_text().splitlines()] if progress.exists() else []
        )
        if lines and lines[-1][1] >= step:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never reached step {step}: {process.communicate()[1][-3000:]}")


def reinit_log_steps(stderr: str) -> list[int]:
    return [
        int(line.split(" at step ")[1].split()[0]) for line in stderr.splitlines() if "re-initialized the head" in line
    ]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_real_signals_at_random_steps_then_the_same_command_ends_with_the_uninterrupted_weights(
    tmp_path, data_and_model
):
    argv = flags(tmp_path / "split", data_and_model)
    reference = run_worker(flags(tmp_path / "full", data_and_model))
    errors = finish(reference)
    assert reference.returncode == 0, errors[-3000:]
    reinits = []
    for number, at in zip((signal.SIGTERM, signal.SIGUSR1), sorted(random.Random(19).sample(range(1, 17), 2))):
        worker = run_worker(argv)
        wait_for_step(tmp_path / "split", at, worker)
        worker.send_signal(number)
        errors = finish(worker)
        assert worker.returncode == PREEMPTED_EXIT_CODE, errors[-3000:]
        assert f"Preempted ({number.name} received by this process" in errors
        assert_nothing_finalized(tmp_path / "split")
        reinits += reinit_log_steps(errors)
    finished = run_worker(argv)
    errors = finish(finished)
    assert finished.returncode == 0, errors[-3000:]
    assert reinits + reinit_log_steps(errors) == [6, 12]  # none repeated, none missed
    assert_same_weights(tmp_path / "full", tmp_path / "split")
