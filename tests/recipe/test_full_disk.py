"""A disk that fills up under a recipe run, on a real tmpfs mounted by the test: the run stops with an error that
says the disk is full, how much the write needs and what is kept, and once space is freed the same command ends
with the weights of a run that never ran out of space. RifleTrainer on its own says the same."""

import errno
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from transformers import TrainerCallback

from hf_rifle import RifleConfig, RifleTrainer
from hf_rifle.checkpoints import checkpoint_problems
from hf_rifle.recipe import main

from ..helpers import RandomImages, native_resnet, tiny_run_settings
from .test_preemption import assert_same_weights
from .test_preemption import flags as checkpoint_every_4_steps


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs of the test's own; skipped where this process may not mount one (it needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command here, so no small disk to fill: the full-disk tests need one (and root)")
    if mounted.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here (it needs root): {mounted.stderr.strip()}")
    yield disk
    # Lazily: a failed write's file may still be open, held by the traceback pytest keeps.
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Take all of `disk`'s free space but `leave` bytes with one file, as another job writing there would."""
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(disk).free - leave)
    return filler


class FillDiskAfterSave(TrainerCallback):
    """Once checkpoint-`step` is written, leaves room for that checkpoint's weights and half its optimizer state:
    the next checkpoint's weights fit, its optimizer state (written by torch.save) does not."""

    def __init__(self, step: int, disk: Path):
        self.step, self.disk = step, disk

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            checkpoint = Path(args.output_dir, f"checkpoint-{self.step}")
            weights, optimizer = ((checkpoint / name).stat().st_size for name in ("model.safetensors", "optimizer.pt"))
            fill(self.disk, leave=weights + 64_000 + optimizer // 2)


class FillDiskAtTrainEnd(TrainerCallback):
    """When training is over, leaves too little room for the final model."""

    def __init__(self, disk: Path):
        self.disk = disk

    def on_train_end(self, args, state, control, **kwargs):
        fill(self.disk, leave=16_000)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_and_model):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    main(checkpoint_every_4_steps(output_dir, data_and_model))
    return output_dir


def test_a_full_disk_at_a_checkpoint_says_so_keeps_the_last_one_and_the_same_command_resumes(
    small_disk, data_and_model, uninterrupted
):
    output_dir = small_disk / "run"
    argv = checkpoint_every_4_steps(output_dir, data_and_model)
    with pytest.raises(OSError) as stopped:
        main(argv, callbacks=[FillDiskAfterSave(4, small_disk)])

    assert stopped.value.errno == errno.ENOSPC
    assert "unexpected pos" in str(stopped.value.__cause__)  # torch.save's own words, which name no cause
    message = str(stopped.value)
    assert f"The disk under output_dir {output_dir} is full: writing a checkpoint (about " in message
    assert "Kept: checkpoint-4, complete. The partial checkpoint in .hf_rifle-staging/ is never resumed from" in message
    assert "the same hf-rifle-train command (or `train(resume_from_checkpoint=True)`) resumes from checkpoint-4" in (
        message
    )
    assert checkpoint_problems(output_dir / "checkpoint-4") == []
    assert not (output_dir / "checkpoint-8").exists()

    (small_disk / "filler").unlink()
    main(argv)
    assert_same_weights(uninterrupted, output_dir)


def test_a_full_disk_at_the_final_model_says_so_and_the_same_command_writes_it(
    small_disk, data_and_model, uninterrupted
):
    output_dir = small_disk / "run"
    argv = checkpoint_every_4_steps(output_dir, data_and_model)
    with pytest.raises(OSError) as stopped:
        main(argv, callbacks=[FillDiskAtTrainEnd(small_disk)])

    assert stopped.value.errno == errno.ENOSPC
    message = str(stopped.value)
    assert "is full: writing the final model, metrics and model card (about " in message
    assert "Kept: checkpoint-18, complete. After freeing space" in message
    assert not (output_dir / "README.md").exists()

    (small_disk / "filler").unlink()
    main(argv)
    assert_same_weights(uninterrupted, output_dir)
    assert "L2-SP" in (output_dir / "README.md").read_text()


def test_rifle_trainer_outside_the_recipe_says_a_full_disk_as_such(small_disk):
    """The translation lives in RifleTrainer's checkpoint save, so a Trainer user's own script gets it too."""
    output_dir = small_disk / "run"
    trainer = RifleTrainer(
        model=native_resnet(),
        args=RifleConfig(**tiny_run_settings(output_dir, save_strategy="steps", save_steps=3)),
        train_dataset=RandomImages(),
    )
    fill(small_disk, leave=16_000)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(OSError) as stopped:
        trainer.train()

    assert signal.getsignal(signal.SIGTERM) is handler  # the preemption handler is given back after an error too
    assert stopped.value.errno == errno.ENOSPC
    message = str(stopped.value)
    assert f"The disk under output_dir {output_dir} is full: writing a checkpoint (about " in message
    assert "No checkpoint is complete yet." in message
    assert not (output_dir / "checkpoint-3").exists()
