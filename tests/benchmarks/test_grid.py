"""benchmarks/grid.py: one transfer sweep per (epochs, K) cell, plain fine-tuning run once per length and shared by
every K, and a table of paired differences read back from the cell files."""

import json

import pytest

from tests.benchmarks import BENCHMARKS, load_script

pytestmark = pytest.mark.slow  # six real (1-epoch) fine-tuning runs of the offline demo: two seeds, for an interval


def test_plain_runs_are_shared_across_periods_and_each_cell_is_summarized(tmp_path):
    grid = load_script("grid")
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--epochs", "1", "--num_periods", "3", "2", "--seeds", "1", "2", "--runs_dir", str(runs)]
    summary = grid.main([*argv, "--results_dir", str(results)])

    plain_k2 = runs / "sklearn-10-56px-1ep-K2" / "original-l2sp-seed1"
    assert plain_k2.is_symlink()  # K = 2 did not train plain fine-tuning again
    assert plain_k2.resolve() == (runs / "sklearn-10-56px-1ep" / "original-l2sp-seed1").resolve()

    assert [(c["epochs"], c["num_periods"], c["seeds"]) for c in summary["cells"]] == [(1, 2, 2), (1, 3, 2)]
    for cell, name in zip(
        summary["cells"], ["transfer-sklearn-10-56px-1ep-K2.json", "transfer-sklearn-10-56px-1ep.json"]
    ):
        rows = json.loads((results / name).read_text())["results"]["sklearn-10"]["runs"]
        accuracy = {(row["method"], row["seed"]): row["accuracy"] for row in rows}
        differences = [accuracy["rifle", seed] - accuracy["original", seed] for seed in (1, 2)]
        assert cell["difference"] == pytest.approx(100 * sum(differences) / 2)
        assert cell["ci95"][0] <= cell["difference"] <= cell["ci95"][1]
    assert json.loads((results / "grid-sklearn-10-l2sp.json").read_text()) == summary
    assert "| 1 | 2 | 0.5 | 2 |" in (results / "grid-sklearn-10-l2sp.md").read_text()
    assert (results / "figures" / "grid-sklearn-10-l2sp.png").is_file()
    assert not any(BENCHMARKS.joinpath("results").glob("*-1ep*"))  # nothing written beside the committed results
