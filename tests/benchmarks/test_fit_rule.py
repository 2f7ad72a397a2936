"""benchmarks/fit_rule.py: a reinit_when="fitted" run of the transfer benchmark's setting, its decisions read from the
optimizer's state, paired with the recorded runs of its seed; a finished run is not redone."""

import json

import pytest

from tests.benchmarks import load_script

pytestmark = pytest.mark.slow  # one real 1-epoch fine-tuning run of the offline demo


def test_a_fitted_run_is_paired_with_the_recorded_runs_of_its_seed_and_not_redone(tmp_path):
    fit_rule = load_script("fit_rule")
    recorded = {"sklearn-10": {"runs": [
        {"method": "original", "regularizer": "l2sp", "seed": 1, "accuracy": 0.5},
        {"method": "rifle", "regularizer": "l2sp", "seed": 1, "accuracy": 0.4},
    ]}}  # fmt: skip
    (tmp_path / "transfer-sklearn-10-56px-1ep.json").write_text(json.dumps({"results": recorded}))
    argv = ["--cells", "1:3", "--seeds", "1", "--results_dir", str(tmp_path), "--runs_dir", str(tmp_path / "runs")]
    fit_rule.main(argv)
    report = json.loads((tmp_path / "fit-rule-sklearn-10-l2sp.json").read_text())
    (run,) = report["cells"]["sklearn-10-56px-1ep"]["runs"]
    # 100 training images, batch 16: 7 steps in 3 periods, re-inits planned at steps 2 and 4.
    assert [decision["step"] for decision in run["decisions"]] == [2, 4] and run["accuracy_from"] == "this run"
    assert all(0 < decision["loss_ratio"] <= 1 for decision in run["decisions"])
    summary = report["cells"]["sklearn-10-56px-1ep"]["summary"]
    assert summary["fitted_minus_plain"]["points"] == pytest.approx(100 * (run["accuracy"] - 0.5))
    assert summary["rifle_minus_plain"]["points"] == pytest.approx(-10.0)
    assert summary["reinits_planned"] == 2

    (tmp_path / "runs" / "sklearn-10-56px-1ep" / "rifle_fitted-l2sp-seed1" / "all_results.json").unlink()
    fit_rule.main(argv)  # recorded in the report: not run again (its folder would no longer do)
    assert json.loads((tmp_path / "fit-rule-sklearn-10-l2sp.json").read_text())["cells"] == report["cells"]
    assert "| sklearn-10-56px-1ep | 0.3 | 1 |" in fit_rule.markdown(report)
