"""Resume through the recipe, refusing other runs' folders, and bad input stopping early and clearly."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_rifle import RifleConfig, RifleTrainer
from hf_rifle.recipe import main

from ..helpers import RandomImages, StopAt, recipe_flags, timm_wrapper_resnet


def flags(output_dir, data_and_model, *extra):
    folders, model = data_and_model
    return recipe_flags(
        output_dir,
        "--model_name_or_path",
        str(model),
        "--train_dir",
        str(folders["train"]),
        "--validation_dir",
        str(folders["validation"]),
        "--regularizer",
        "l2sp",
        "--num_periods",
        "3",
        "--num_train_epochs",
        "3",
        "--reinit_when",  # the paper's schedule: the tiny heads never fit, and these runs must re-draw them
        "always",
        *extra,
    )


@pytest.mark.parametrize("memory_format", [[], ["--channels_last", "True"]], ids=["contiguous", "channels_last"])
def test_recipe_restarted_on_its_output_dir_resumes_to_the_same_model(tmp_path, data_and_model, memory_format):
    # 24 images, batch 4: 6 steps per epoch, 18 in all; periods start at 0, 6, 12. Stop mid-period at 8.
    main(flags(tmp_path / "full", data_and_model, *memory_format))
    interrupted = flags(
        tmp_path / "split", data_and_model, "--save_strategy", "steps", "--save_steps", "4", *memory_format
    )
    main(interrupted, callbacks=[StopAt(8)])
    assert (tmp_path / "split" / "checkpoint-8").is_dir()
    main(interrupted)

    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "split"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    state = json.loads((tmp_path / "split" / "checkpoint-18" / "trainer_state.json").read_text())
    assert state["global_step"] == 18


def test_output_dir_of_a_different_run_is_refused(tmp_path, data_and_model):
    main(flags(tmp_path, data_and_model))
    with pytest.raises(ValueError, match=r"different configuration \(differs in: training\.l2sp_alpha\)"):
        main(flags(tmp_path, data_and_model, "--l2sp_alpha", "0.5"))


def test_foreign_non_empty_output_dir_is_refused(tmp_path, data_and_model):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no rifle_config.json"):
        main(flags(tmp_path, data_and_model))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_more_periods_than_steps_stops_before_anything_is_written(tmp_path, data_and_model):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="num_periods=40 is more than the run's 18 optimizer steps"):
        main(flags(output_dir, data_and_model, "--num_periods", "40"))
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num_periods", "0"], "num_periods must be >= 1"),
        (["--l2sp_alpha", "-1"], "l2sp_alpha must be a finite number >= 0"),
        (["--l2sp_beta", "nan"], "l2sp_beta must be a finite number >= 0"),
        (["--head_init_std", "-0.1"], "head_init_std must be a finite number >= 0"),
        (["--head_module", "timm_model.nothing"], "head_module='timm_model.nothing' does not exist"),
        (["--head_module", "timm_model.global_pool"], "has no trainable parameters"),
        (["--samples_per_class", "13"], "13 images per class are needed, but these classes have fewer: 'cat' \\(12\\)"),
    ],
)
def test_bad_input_stops_with_the_fix_and_writes_nothing(tmp_path, data_and_model, extra, message):
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        main(flags(output_dir, data_and_model, *extra))
    assert not output_dir.exists()


@pytest.mark.parametrize("flag,value", [("--regularizer", "l1"), ("--head_lr_schedule", "step")])
def test_unknown_choices_are_refused_by_the_parser(tmp_path, data_and_model, flag, value, capsys):
    with pytest.raises(SystemExit):
        main(flags(tmp_path / "run", data_and_model, flag, value))
    assert re.search(f"argument {flag}.*: invalid choice: '{value}' \\(choose from", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_stops_with_step_period_and_learning_rates(tmp_path):
    data = RandomImages(size=36)
    data.images[8:12] = float("nan")  # the third batch of four, read in order
    args = RifleConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=9,
        num_periods=3,
        reinit_when="always",  # the paper's schedule: the head on its own cosine from step 0, 0.025 at step 2
        learning_rate=0.1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        train_sampling_strategy="sequential",
    )
    with pytest.raises(
        FloatingPointError,
        match=(
            r"loss became nan at optimizer step 2 of 9, in period 1 of 3 \(2 of its 3 steps done\); "
            r"learning rates: backbone 0\.0\d+, backbone 0\.0\d+, head 0\.025"
        ),
    ):
        RifleTrainer(model=timm_wrapper_resnet(), args=args, train_dataset=data).train()


@pytest.mark.parametrize(
    "sharding", [{"fsdp": "full_shard", "deepspeed": None}, {"fsdp": None, "deepspeed": "ds.json"}]
)
def test_sharded_training_is_refused_naming_the_supported_setups(sharding):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from hf_rifle import RifleTrainerCallback

    state = TrainerState()
    state.max_steps = 10
    with pytest.raises(ValueError, match="supports single-device and DDP .* launch with DDP"):
        RifleTrainerCallback().on_train_begin(
            SimpleNamespace(**sharding), state, TrainerControl(), model=timm_wrapper_resnet()
        )


CRASH_WORKER = Path(__file__).with_name("crash_worker.py")


def run_recipe_process(moment: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, str(CRASH_WORKER), moment, *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("moment", ["step:7", "save:8"], ids=["killed-training", "killed-writing-a-checkpoint"])
def test_a_killed_run_finishes_with_the_same_command_and_the_uninterrupted_weights(tmp_path, data_and_model, moment):
    """SIGKILL, then the very same command again: it resumes from the newest complete checkpoint (4, as 8 was
    never completed) and ends with the weights of a run that was never interrupted."""
    reference = run_recipe_process("none", flags(tmp_path / "full", data_and_model))
    assert reference.returncode == 0, reference.stderr[-3000:]
    argv = flags(tmp_path / "split", data_and_model, "--save_strategy", "steps", "--save_steps", "4")
    killed = run_recipe_process(moment, argv)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "split" / "checkpoint-8").exists()  # a checkpoint is either complete or absent
    assert (tmp_path / "split" / "checkpoint-4").is_dir()
    again = run_recipe_process("none", argv)
    assert again.returncode == 0, again.stderr[-3000:]
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "split"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_an_incomplete_checkpoint_named_on_the_command_line_stops_the_recipe_first(tmp_path, data_and_model):
    argv = flags(tmp_path / "run", data_and_model, "--save_strategy", "steps", "--save_steps", "4")
    main(argv, callbacks=[StopAt(4)])
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="checkpoint-4 is incomplete: trainer_state.json is missing"):
        main([*argv, "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-4")])


def parquet_dataset_with_a_broken_image(folder) -> tuple[Path, int]:
    """A dataset folder as a Hub dataset repo holds it (parquet splits, images as bytes without files), whose
    train split has one truncated image; returns the folder and that row's index."""
    import io

    import datasets
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=["cat", "dog"]))
    folder.mkdir(parents=True)
    broken_row = 5
    for split, size in (("train", 12), ("validation", 4)):
        images = [{"bytes": png(), "path": None} for _ in range(size)]
        if split == "train":
            images[broken_row]["bytes"] = images[broken_row]["bytes"][:60]
        rows = {"image": images, "label": [i % 2 for i in range(size)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder, broken_row


def test_an_undecodable_dataset_row_stops_the_run_naming_split_and_row(tmp_path, data_and_model):
    dataset, row = parquet_dataset_with_a_broken_image(tmp_path / "dataset")
    _, model = data_and_model
    argv = recipe_flags(tmp_path / "run", "--model_name_or_path", str(model), "--dataset_name", str(dataset))
    with pytest.raises(OSError, match=rf"Row {row} of the train split: Cannot read image .*--skip_unreadable_images"):
        main(argv)


def test_undecodable_rows_are_skipped_on_request_and_counted_in_logs_and_card(tmp_path, data_and_model):
    dataset, row = parquet_dataset_with_a_broken_image(tmp_path / "dataset")
    _, model = data_and_model
    output_dir = tmp_path / "run"
    argv = recipe_flags(output_dir, "--model_name_or_path", str(model), "--dataset_name", str(dataset))
    main([*argv, "--skip_unreadable_images", "--logging_steps", "1"])
    skipped = [json.loads(line) for line in (output_dir / "skipped_images.jsonl").read_text().splitlines()]
    assert {(record["split"], record["row"]) for record in skipped} == {("train", row)}
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry for entry in history if "loss" in entry][-1]["skipped_images"] == 1
    assert (
        "| unreadable images skipped | 1 (listed in skipped_images.jsonl) |" in (output_dir / "README.md").read_text()
    )
