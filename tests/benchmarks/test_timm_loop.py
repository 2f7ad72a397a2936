"""Smoke test of benchmarks/timm_loop.py: timm's own train.py, as shipped and patched with `hf_rifle.attach`, for one
epoch of one seed (re-inits where attach puts them, a resumable result file), and a tiny run of the hooks' overhead."""

import json
import shutil

import pytest

from hf_rifle import reinit_steps
from tests.benchmarks import load_script

pytestmark = pytest.mark.slow  # two real (1-epoch) runs of timm's train.py, a tiny overhead run: about 2 minutes


@pytest.fixture(scope="module")
def timm_loop():
    return load_script("timm_loop")


def test_accuracy_runs_both_scripts_pairs_them_and_resumes_from_the_file(timm_loop, tmp_path):
    if not timm_loop.PEER_SCRIPT.is_file() or shutil.which("patch") is None:
        pytest.skip(f"needs timm's train.py at {timm_loop.PEER_SCRIPT} and the patch command")
    output = tmp_path / "timm-loop.json"
    argv = ["accuracy", "--epochs", "1", "--resolution", "32", "--seeds", "1", "--output", str(output)]
    result = timm_loop.main([*argv, "--runs_dir", str(tmp_path / "runs")])

    rows = {row["method"]: row for row in result["runs"]}
    assert set(rows) == {"original", "rifle"}
    updates = 100 // 16  # 10 images per class, batch 16, timm drops the last partial batch
    assert rows["rifle"]["reinit_steps"] == reinit_steps(updates, 3)  # attach's K = 3, from the patched script
    assert rows["original"]["reinit_steps"] == []
    assert all(
        0 <= row["accuracy"] <= 1 and row["last_epoch"] == 0 and row["machine"]["cpus"] >= 1 for row in rows.values()
    )
    rifle = next(row for row in result["summary"] if row["method"] == "rifle")
    assert rifle["diff_to_original"] == pytest.approx(rows["rifle"]["accuracy"] - rows["original"]["accuracy"])
    assert "Δ vs Original" in result["table"]
    assert json.loads(output.read_text())["runs"] == result["runs"]

    # As on another machine (no run folders): the seed in the file is not run again.
    again = timm_loop.main([*argv, "--runs_dir", str(tmp_path / "elsewhere")])
    assert again["runs"] == result["runs"]
    assert not (tmp_path / "elsewhere" / "sklearn-10-32px-1ep").exists()


def test_overhead_alternates_the_three_loops_and_times_the_hooks_on_every_step(timm_loop, tmp_path):
    output = tmp_path / "overhead.json"
    warmup, rounds = 1, 6
    timm_loop.main(
        ["overhead", "--model", "test_efficientnet", "--image-size", "32", "--batch-size", "4", "--rounds", str(rounds),
         "--warmup-rounds", str(warmup), "--output", str(output)]
    )  # fmt: skip
    result = json.loads(output.read_text())
    steps = warmup + rounds  # one step of each loop per round: one run each, all three interleaved
    assert result["max_steps"] == steps
    assert result["timed_step_indices"] == [i for i in range(warmup, steps) if i not in reinit_steps(steps, 3)]
    variants = ["plain", "attach_l2", "attach_l2sp"]
    assert result["round_orders"][:3] == [variants, variants[1:] + variants[:1], variants[2:] + variants[:2]]
    assert list(result["variants"]) == variants
    for name, variant in result["variants"].items():
        assert len(variant["step_seconds"]) == len(variant["hook_seconds"]) == steps
        assert (
            all(t == 0 for t in variant["hook_seconds"])
            if name == "plain"
            else all(t > 0 for t in variant["hook_seconds"])
        )
        ratio = variant["ratio_to_plain"]
        assert len(ratio["per_round"]) == len(result["timed_step_indices"])
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert result["variants"]["plain"]["ratio_to_plain"]["median"] == 1.0
    assert set(result["target"]["variants"]) == {"attach_l2", "attach_l2sp"}
