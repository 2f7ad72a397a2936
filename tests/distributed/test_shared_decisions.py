"""Decisions that touch shared files are taken once, on two processes (torchrun, gloo on CPU): a resume from an
output folder whose newest checkpoint is torn sets it aside once and starts both ranks from the same complete one,
however often it is tried; a decision that fails gives every rank rank 0's error; a non-finite loss on one rank
stops both at the same step with the same message, naming that rank."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_rifle.checkpoints import SET_ASIDE_PREFIX, checkpoint_folders

from ..recipe.test_preemption import finish, flags, run_worker

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORKER = Path(__file__).with_name("shared_decisions_worker.py")


def torchrun(*argv) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_rifle_trainer_resumes_both_ranks_from_the_same_complete_checkpoint_every_time(tmp_path):
    finished = torchrun(str(WORKER), "resume", str(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "terminate called" not in finished.stderr  # gloo's abort at exit
    for attempt in range(5):
        resumed = {(tmp_path / f"resumed-try{attempt}-rank{rank}").read_text() for rank in (0, 1)}
        assert resumed == {"4"}, f"try {attempt}: both ranks resume from checkpoint-4, the newest complete one"
        set_aside = sorted(path.name for path in (tmp_path / f"try{attempt}").glob(f"{SET_ASIDE_PREFIX}*"))
        assert len(set_aside) == 1 and set_aside[0].startswith(f"{SET_ASIDE_PREFIX}checkpoint-6-"), set_aside
    errors = {(tmp_path / f"decision-error-rank{rank}").read_text() for rank in (0, 1)}
    assert errors == {"decided on rank 0"}  # rank 0's error, on every rank


def test_the_recipe_resumes_both_ranks_from_the_same_complete_checkpoint_every_time(tmp_path, data_and_model):
    """The issue's case: the same command restarted on an output folder whose newest checkpoint lacks its
    trainer_state.json (a kill during a save), several times in a row."""

    def argv(output_dir):  # 9 steps on 2 processes, a checkpoint every 4: checkpoint-4 and checkpoint-8 kept
        return flags(output_dir, data_and_model, "--save_total_limit", "2")

    first = tmp_path / "first"
    prepared = run_worker(argv(first), processes=2)
    errors = finish(prepared)
    assert prepared.returncode == 0, errors[-3000:]
    *_, complete, torn = checkpoint_folders(first)
    for attempt in range(3):
        output_dir = tmp_path / f"try{attempt}"
        shutil.copytree(first, output_dir)
        for progress in output_dir.glob("progress-rank*"):
            progress.unlink()
        (output_dir / torn.name / "trainer_state.json").unlink()
        worker = run_worker(argv(output_dir), processes=2)
        errors = finish(worker)
        assert worker.returncode == 0, f"try {attempt}: {errors[-3000:]}"
        assert "terminate called" not in errors
        first_steps = {int((output_dir / f"progress-rank{rank}").read_text().split()[1]) for rank in (0, 1)}
        assert first_steps == {int(complete.name.split("-")[1]) + 1}, f"try {attempt}: resumed after {complete.name}"
        assert len(list(output_dir.glob(f"{SET_ASIDE_PREFIX}{torn.name}-*"))) == 1
        assert errors.count(f"Checkpoint {output_dir / torn.name} is incomplete") == 1  # said once, by rank 0


def test_a_non_finite_loss_on_one_rank_stops_both_at_the_same_step_with_the_same_message(tmp_path):
    finished = torchrun(str(WORKER), "nan", str(tmp_path))
    assert finished.returncode != 0
    messages = [(tmp_path / f"error-rank{rank}").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1]
    assert messages[0].startswith("The training loss became nan on rank 1 of 2 at optimizer step 2 of 9, in period 1")
    for rank in (0, 1):
        assert f"[rank{rank}]: FloatingPointError: {messages[0]}" in finished.stderr
    assert "Connection closed by peer" not in finished.stderr
