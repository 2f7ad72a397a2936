"""Crash-safe checkpoints from Python: written complete, torn ones skipped and set aside, named ones checked."""

import json
import logging

import pytest
import torch

from hf_rifle import RifleConfig, RifleTrainer
from hf_rifle.checkpoints import MANIFEST, STAGING_DIR, checkpoint_problems

from ..helpers import RandomImages, timm_wrapper_resnet, tiny_run_settings


def trainer(output_dir, **overrides):
    model = timm_wrapper_resnet()
    settings = tiny_run_settings(
        output_dir, learning_rate=0.05, regularizer="l2sp", num_periods=3, save_strategy="steps", save_steps=3
    )
    return model, RifleTrainer(model=model, args=RifleConfig(**{**settings, **overrides}), train_dataset=RandomImages())


def test_checkpoints_are_complete_with_a_manifest_and_rotation_keeps_the_newest(tmp_path):
    _, run = trainer(tmp_path, save_total_limit=1)
    run.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-9"]
    assert not (tmp_path / STAGING_DIR).exists()
    manifest = json.loads((tmp_path / "checkpoint-9" / MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(manifest["files"])
    assert checkpoint_problems(tmp_path / "checkpoint-9") == []


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


TEARS = {
    "missing-state": (lambda folder: (folder / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "truncated-weights": (lambda folder: truncate(folder / "model.safetensors"), "model.safetensors has"),
    "truncated-optimizer": (lambda folder: truncate(folder / "optimizer.pt"), "optimizer.pt has"),
    "truncated-weights-no-manifest": (
        lambda folder: ((folder / MANIFEST).unlink(), truncate(folder / "model.safetensors")),
        "model.safetensors is truncated",
    ),
    "truncated-optimizer-no-manifest": (
        lambda folder: ((folder / MANIFEST).unlink(), truncate(folder / "optimizer.pt")),
        "optimizer.pt is unreadable",
    ),
}


@pytest.mark.parametrize("tear", list(TEARS))
def test_a_torn_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, tear, caplog):
    uninterrupted_model, first = trainer(tmp_path)  # 9 steps, checkpoints at 3, 6 and 9
    first.train()
    damage, problem = TEARS[tear]
    damage(tmp_path / "checkpoint-9")
    (tmp_path / "checkpoint-6" / "README.md").write_text("an older, complete checkpoint")
    resumed_model, resumed = trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_rifle"):
        resumed.train(resume_from_checkpoint=True)

    warning = next(r.getMessage() for r in caplog.records if "is incomplete" in r.getMessage())
    assert "checkpoint-9" in warning and problem in warning
    set_aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("incomplete-checkpoint-9-")]
    assert len(set_aside) == 1  # kept, not deleted
    for (name, a), b in zip(uninterrupted_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_named_incomplete_checkpoint_is_refused_before_training(tmp_path):
    _, first = trainer(tmp_path, max_steps=3)
    first.train()
    truncate(tmp_path / "checkpoint-3" / "model.safetensors")
    _, again = trainer(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint-3 is incomplete: model.safetensors has \d+ bytes"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert again.state.global_step == 0


def test_a_second_save_of_the_same_step_replaces_the_first_without_a_moment_with_neither(tmp_path, monkeypatch):
    import shutil

    import hf_rifle.trainer

    _, run = trainer(tmp_path, max_steps=3)
    run.train()
    (tmp_path / "checkpoint-3" / "earlier-save.txt").write_text("the first save of step 3")
    complete_after_each_removal, rmtree = [], shutil.rmtree

    def remove_and_look(path, *args, **kwargs):
        rmtree(path, *args, **kwargs)
        complete_after_each_removal.append(checkpoint_problems(tmp_path / "checkpoint-3") == [])

    monkeypatch.setattr(hf_rifle.trainer.shutil, "rmtree", remove_and_look)
    run._save_checkpoint(run.model, trial=None)
    assert complete_after_each_removal and all(complete_after_each_removal)
    assert not (tmp_path / "checkpoint-3" / "earlier-save.txt").exists()  # replaced by the second save
    assert not (tmp_path / STAGING_DIR).exists()
