"""benchmarks/safe_default.py: each judged cell pairs plain, the paper's schedule and `"fitted"` by seed, and counts
the fitted runs' re-draws from their run folders (the recipe) or their rows (timm's train.py), keeping the counts for
a later summary without the run folders."""

import json

from tests.benchmarks import load_script


def rows(method, accuracies, regularizer="l2sp", **extra):
    return [
        {"method": method, "regularizer": regularizer, "seed": seed, "accuracy": value, **extra}
        for seed, value in accuracies.items()
    ]


def test_cells_pair_the_three_schedules_and_count_reinits(tmp_path, capsys):
    safe_default = load_script("safe_default")
    results, runs_dir = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    grid_runs = [
        *rows("original", {11: 0.80, 12: 0.82, 13: 0.5}),  # seed 13: plain only, left out of the pairing
        *rows("rifle", {11: 0.70, 12: 0.74}),
        *rows("rifle_fitted", {11: 0.81, 12: 0.82}),
    ]
    grid_file = results / "transfer-sklearn-10-56px-12ep-K5-judged.json"
    grid_file.write_text(json.dumps({"results": {"sklearn-10": {"runs": grid_runs}}}))
    for seed, done in ((11, 0), (12, 1)):
        folder = runs_dir / "grid" / "sklearn-10-56px-12ep-K5" / f"rifle_fitted-l2sp-seed{seed}"
        folder.mkdir(parents=True)
        history = [{"loss": 1.0}, {"rifle_reinits_planned": 1, "rifle_reinits_done": 0}]
        history.append({"rifle_reinits_planned": 2, "rifle_reinits_done": done})
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    timm_runs = [
        *rows("original", {11: 0.9}, regularizer="l2"),
        *rows("rifle", {11: 0.8}, regularizer="l2", reinit_steps=[80, 160], kept_steps=[]),
        *rows("rifle_fitted", {11: 0.9}, regularizer="l2", reinit_steps=[160], kept_steps=[80]),
    ]
    (results / "timm-loop-sklearn-10-56px-40ep-judged.json").write_text(json.dumps({"runs": timm_runs}))

    cells = safe_default.main(["--results_dir", str(results), "--runs_dir", str(runs_dir)])
    grid, timm = cells
    assert grid["cell"] == "digits 10-shot, L2-SP, 12 epochs, K = 5" and grid["seeds"] == [11, 12]
    assert round(grid["means"]["original"], 2) == 81.0 and round(grid["means"]["rifle"], 2) == 72.0
    assert grid["fitted_minus_plain"].startswith("+0.50 [") and grid["fitted_minus_plain"].endswith(", 1 / 0")
    assert grid["paper_minus_plain"].startswith("-9.00 [") and grid["fitted_minus_paper"].endswith(", 2 / 0")
    assert grid["reinits_done_of_planned"] == [1, 4]
    assert (
        timm["reinits_done_of_planned"] == [1, 2]
        and timm["paper_minus_plain"].startswith("-10.00 [")
        and timm["paper_minus_plain"].endswith(", 0 / 1")
    )
    assert "| digits 10-shot, L2-SP, 12 epochs, K = 5 | 11–12 | 81.00 | 72.00 | 81.50 |" in capsys.readouterr().out

    # Without the run folders, the counts recorded for the same seeds stand.
    assert safe_default.main(["--results_dir", str(results)]) == cells
