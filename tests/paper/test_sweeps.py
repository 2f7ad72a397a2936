"""A reduced sweep through the real recipe: tables, paired statistics, figures, and no rerun of finished runs."""

import json
import math
import statistics

import pytest
from scipy.stats import t

from hf_rifle.paper.sweeps import main, paired_difference

from ..helpers import recipe_flags, save_timm_hub_folder, write_image_folders


def test_paired_difference_is_the_t_interval_of_per_seed_differences():
    rifle, original = {1: 0.80, 2: 0.84, 3: 0.81}, {1: 0.78, 2: 0.80, 3: 0.80, 4: 0.5}
    differences = [0.02, 0.04, 0.01]
    mean, low, high = paired_difference(rifle, original)
    half = t.ppf(0.975, 2) * statistics.stdev(differences) / math.sqrt(3)
    assert mean == pytest.approx(statistics.fmean(differences))
    assert (low, high) == pytest.approx((mean - half, mean + half))


@pytest.mark.slow
def test_reduced_sweep_writes_tables_and_figures_and_reuses_finished_runs(tmp_path):
    folders = write_image_folders(tmp_path / "images")
    model = save_timm_hub_folder(tmp_path / "model")
    sweep_dir = tmp_path / "sweep"
    argv = [
        "--methods",
        "original",
        "rifle",
        "--regularizers",
        "l2",
        "--seeds",
        "1",
        "2",
        "--sweep_dir",
        str(sweep_dir),
        "--dataset_label",
        "tiny",
        "--",
        *recipe_flags(
            tmp_path / "unused",
            "--model_name_or_path",
            str(model),
            "--train_dir",
            str(folders["train"]),
            "--test_dir",
            str(folders["test"]),
            "--num_train_epochs",
            "3",
            "--eval_strategy",
            "epoch",
        ),
    ]
    written = main(argv)
    assert {p.name for p in written} == {
        "results.md",
        "results.json",
        "results.csv",
        "figure1_accuracy.png",
        "figure2_gradient_norms.png",
        "figure2_gradient_norms.md",
        "weight_drift.md",
    }
    by_period = (sweep_dir / "figure2_gradient_norms.md").read_text()
    assert "| layer | period | seeds | Original | RIFLE | RIFLE / Original [95% CI] |" in by_period
    assert "| timm_model.layer4.0.conv2 | 2 | 2 |" in by_period  # the second period (after the re-init), both seeds
    drift = (sweep_dir / "weight_drift.md").read_text()
    assert "| layer | Original | RIFLE |" in drift and "| timm_model.layer4." in drift
    layer4 = next(line for line in drift.splitlines() if line.startswith("| timm_model.layer4."))
    assert all(float(cell) > 0 for cell in layer4.strip("|").split("|")[1:])  # the backbone did move
    results = json.loads((sweep_dir / "results.json").read_text())
    accuracy = {(r["method"], r["seed"]): r["accuracy"] for r in results["runs"]}
    assert all(r["machine"]["cpus"] >= 1 and r["machine"]["torch"] for r in results["runs"])  # where each ran
    for seed in (1, 2):
        saved = json.loads((sweep_dir / f"rifle-l2-seed{seed}" / "all_results.json").read_text())
        assert accuracy[("rifle", seed)] == saved["test_accuracy"]
    rifle = next(row for row in results["summary"] if row["method"] == "rifle")
    expected = statistics.fmean(accuracy[("rifle", s)] - accuracy[("original", s)] for s in (1, 2))
    assert rifle["diff_to_original"] == pytest.approx(expected)
    table = (sweep_dir / "results.md").read_text()
    assert (
        "| Dataset | Original | RIFLE |" in table and "| tiny |" in table and "Algorithmic regularizers + L2" in table
    )
    state = json.loads((sweep_dir / "rifle-l2-seed1" / "trainer_state.json").read_text())
    assert any(key.startswith("grad_norm/") for entry in state["log_history"] for key in entry)

    finished = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/all_results.json")}
    main(argv)
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/all_results.json")} == finished


def test_sweep_help_lists_the_baselines_flags_of_its_runs(capsys):
    with pytest.raises(SystemExit):
        main(["--", "--help"])
    help_text = capsys.readouterr().out
    assert all(f"--{flag}" in help_text for flag in ("fc_dropout", "fc_dropconnect", "cnn_dropout", "disturb_label"))
    assert "--num_periods" in help_text and "--train_dir" in help_text


def test_a_run_costs_its_training_less_in_training_evaluations_plus_the_probe_fit(tmp_path):
    from hf_rifle.paper.sweeps import run_seconds

    history = [
        {"linear_probe_seconds": 7.0, "step": 0},
        {"eval_runtime": 2.0, "step": 5},
        {"eval_runtime": 3.0, "step": 10},
        {"train_runtime": 100.0, "step": 10},
        {"eval_runtime": 4.0, "step": 10},  # the final evaluations run after training: not in train_runtime
        {"test_runtime": 9.0, "step": 10},
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert run_seconds(tmp_path, {"train_runtime": 100.0}) == 100.0 - 5.0 + 7.0
