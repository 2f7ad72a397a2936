"""benchmarks/transfer.py resumes from its committed result file: runs already recorded there are not redone,
on this machine or another, and every row says which machine it ran on."""

import json
import shutil

import pytest

from tests.benchmarks import load_script

pytestmark = pytest.mark.slow  # four real (1-epoch) fine-tuning runs of the offline demo: a few minutes


def test_runs_recorded_in_the_result_file_are_not_redone(tmp_path):
    transfer = load_script("transfer")
    output, runs = tmp_path / "transfer.json", tmp_path / "runs"
    common = ["--settings", "sklearn-10", "--epochs", "1", "--regularizers", "l2", "--output", str(output)]
    transfer.main([*common, "--seeds", "1", "--runs_dir", str(runs)])
    first = json.loads(output.read_text())["results"]["sklearn-10"]["runs"]
    shutil.rmtree(runs)  # as on another machine: only the committed result file is there

    transfer.main([*common, "--seeds", "1", "2", "--runs_dir", str(runs)])
    rows = json.loads(output.read_text())["results"]["sklearn-10"]["runs"]
    assert sorted(path.name for path in (runs / "sklearn-10-56px-1ep").glob("*-seed*")) == [
        "original-l2-seed2",
        "rifle-l2-seed2",
    ]  # seed 1 was not run again
    assert [row for row in rows if row["seed"] == 1] == first
    assert {(row["method"], row["seed"]) for row in rows} == {(m, s) for m in ("original", "rifle") for s in (1, 2)}
    assert all(row["machine"]["cpus"] >= 1 for row in rows)

    # Seed 2's runs are in the run folder of this machine: the sweep reuses them beside seed 3, so its
    # figures (Figure 2 averaged over seeds) cover both, not only the seed run now.
    transfer.main([*common, "--seeds", "1", "2", "3", "--runs_dir", str(runs)])
    sweep_rows = json.loads((runs / "sklearn-10-56px-1ep" / "results.json").read_text())["runs"]
    assert sorted({row["seed"] for row in sweep_rows}) == [2, 3]
    assert (runs / "sklearn-10-56px-1ep" / "figure2_gradient_norms.png").is_file()
