"""benchmarks/preemption.py: the per-step cost of the agreement, and the time from a signal to the exit."""

import pytest

from tests.benchmarks import load_script

from ..helpers import recipe_flags, save_timm_hub_folder, write_image_folders


@pytest.mark.slow
def test_agreement_is_timed_with_preemption_handling_off_and_on(tmp_path):
    preemption = load_script("preemption")
    argv = ["agreement", "--output", str(tmp_path / "agreement.json"), "--model", "test_resnet", "--image-size", "32"]
    result = preemption.main([*argv, "--steps", "5", "--warmup-steps", "1", "--rounds", "1", "--batch-size", "4"])[
        "agreement"
    ]
    assert [len(medians) for medians in result["round_median_step_seconds"].values()] == [1, 1]
    assert result["ratio_on_to_off"] > 0 and result["ratio_step_plus_agreement_to_step"] >= 1
    assert (tmp_path / "agreement.json").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_exit_time_is_measured_from_the_signal_to_a_preempted_exit(tmp_path):
    preemption = load_script("preemption")
    folders = write_image_folders(tmp_path / "images", sizes={"train": 12, "validation": 2})
    argv = recipe_flags(
        tmp_path / "run",
        "--model_name_or_path",
        str(save_timm_hub_folder(tmp_path / "model")),
        "--train_dir",
        str(folders["train"]),
        "--validation_dir",
        str(folders["validation"]),
    )
    measured = preemption.exit_time(argv, signal_after_steps=3)
    assert measured["exit_status"] == preemption.PREEMPTED_EXIT_CODE
    assert 0 < measured["seconds_to_checkpoint_written"] < measured["seconds_to_exit"]
    assert measured["step_seconds"] > 0 and len(list((tmp_path / "run").glob("checkpoint-*"))) == 1
