"""Preemption on two processes (torchrun, gloo on CPU): a real signal to one rank or to the launcher stops every rank
at the same step with one checkpoint; the same command resumes bit for bit; another number of processes on resume
is refused unless the samples per optimizer step are kept, and then RIFLE's periods continue where they were."""

import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_rifle.checkpoints import checkpoint_problems

from ..recipe.test_preemption import (
    assert_nothing_finalized,
    assert_same_weights,
    finish,
    flags,
    reinit_log_steps,
    run_worker,
    wait_for_step,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

PREEMPTED_STEP = re.compile(r"Preempted \((.+?), at optimizer step (\d+)\)")


def six_epochs(output_dir, data, *extra):
    """24 images: on 2 processes of batch 4, 3 steps an epoch, 18 in all; periods start at 0, 6 and 12."""
    return flags(output_dir, data, "--num_train_epochs", "6", *extra)


def preempt(argv: list[str], output_dir: Path, at: int, processes: int, rank: int | None) -> tuple[int, str]:
    """Start the run, send SIGTERM at step `at` to one rank's process (or, with `rank=None`, to the launcher, which
    forwards it to every rank) and check that all ranks stopped after one step with one complete checkpoint and
    nothing finalized. Returns that step and the run's standard error."""
    worker = run_worker(argv, processes)
    lines = wait_for_step(output_dir, at, worker, rank=rank or 0)
    if rank is None:
        worker.send_signal(signal.SIGTERM)
    else:
        os.kill(lines[-1][0], signal.SIGTERM)
    errors = finish(worker)
    assert worker.returncode != 0, errors[-3000:]
    (reason, step), *_ = PREEMPTED_STEP.findall(errors)
    step = int(step)
    assert reason == ("SIGTERM received by this process" if not rank else "a signal received by another rank")
    last_steps = {int(p.read_text().split()[-1]) for p in output_dir.glob("progress-rank*")}
    assert last_steps == {step}, "every rank stops at the same step"
    assert checkpoint_problems(output_dir / f"checkpoint-{step}") == []
    assert_nothing_finalized(output_dir)
    return step, errors


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory, data_and_model):
    output_dir = tmp_path_factory.mktemp("reference")
    process = run_worker(six_epochs(output_dir, data_and_model), processes=2)
    errors = finish(process)
    assert process.returncode == 0, errors[-3000:]
    return output_dir


def test_a_signal_to_one_rank_or_to_the_launcher_stops_all_and_the_same_command_resumes_bit_for_bit(
    tmp_path,
    data_and_model,
    two_process_reference,
):
    argv = six_epochs(tmp_path, data_and_model)
    first, second = sorted(random.Random(20).sample(range(1, 16), 2))
    reinits = []
    for at, rank in ((first, 1), (second, None)):
        _, errors = preempt(argv, tmp_path, at, processes=2, rank=rank)
        reinits += reinit_log_steps(errors)
    process = run_worker(argv, processes=2)
    errors = finish(process)
    assert process.returncode == 0, errors[-3000:]
    assert "terminate called" not in errors  # gloo's abort at exit
    assert reinits + reinit_log_steps(errors) == [6, 12]
    assert_same_weights(two_process_reference, tmp_path)


def test_two_processes_resumed_on_one_are_refused_then_continue_the_periods_with_accumulation(
    tmp_path,
    data_and_model,
    two_process_reference,
):
    argv = six_epochs(tmp_path, data_and_model)
    _, errors = preempt(argv, tmp_path, random.Random(21).randrange(2, 15), processes=2, rank=None)
    reinits = reinit_log_steps(errors)

    refused = run_worker(argv)
    errors = finish(refused)
    assert refused.returncode != 0
    assert (
        "comes from a run of 18 optimizer steps (2 processes x batch 4 x accumulation 1 = 8 samples per step); this "
        "run would take 36 (1 process x batch 4 x accumulation 1 = 4 samples per step)" in errors
    )
    assert "head re-drawn at steps 6, 12" in errors and "(with 1 process: gradient_accumulation_steps=2)" in errors

    resumed = run_worker([*argv, "--gradient_accumulation_steps", "2"])
    errors = finish(resumed)
    assert resumed.returncode == 0, errors[-3000:]
    assert reinits + reinit_log_steps(errors) == [6, 12]
    # The same samples in every step, summed in another order: the weights are equal up to float rounding. (Batch
    # norm's running statistics are not: two batches of 4 update them twice a step on one process, once on two.)
    expected, actual = (load_file(folder / "model.safetensors") for folder in (two_process_reference, tmp_path))
    weights = [key for key in expected if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > len(expected) / 2
    for key in weights:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_one_process_resumed_on_two_is_refused_then_continues_the_periods_with_a_smaller_batch(
    tmp_path,
    data_and_model,
):
    argv = six_epochs(tmp_path, data_and_model)  # one process: 6 steps an epoch, 36 in all, periods at 12 and 24
    _, errors = preempt(argv, tmp_path, random.Random(22).randrange(2, 30), processes=1, rank=None)
    reinits = reinit_log_steps(errors)

    refused = run_worker(argv, processes=2)
    errors = finish(refused)
    assert refused.returncode != 0
    assert "(with 2 processes: per_device_train_batch_size=2, gradient_accumulation_steps=1)" in errors

    resumed = run_worker([*argv, "--per_device_train_batch_size", "2"], processes=2)
    errors = finish(resumed)
    assert resumed.returncode == 0, errors[-3000:]
    assert reinits + reinit_log_steps(errors) == [12, 24]
