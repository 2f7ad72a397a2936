"""Smoke test of benchmarks/pipeline.py: its loader part on a few JPEGs, and its end-to-end part when the
transformers example it compares against is at hand (../shared/peer)."""

import json

import pytest

from tests.benchmarks import load_script

pytestmark = pytest.mark.slow  # real (tiny) runs of both training scripts: about a minute


def test_loader_part_reports_cold_and_warm_throughput_against_the_example(tmp_path):
    pipeline = load_script("pipeline")
    output = tmp_path / "pipeline.json"
    pipeline.main(["--parts", "loader", "--images", "16", "--repeats", "1", "--output", str(output)])
    loader = json.loads(output.read_text())["loader"]
    assert set(loader["images_per_second_per_core"]) == {"example", "ours_cold", "ours_warm"}
    assert all(speed > 0 for speed in loader["images_per_second_per_core"].values())
    assert loader["warm_vs_example"] > 1  # the cached path skips decoding and resizing altogether


def test_end_to_end_part_runs_both_training_scripts(tmp_path):
    pipeline = load_script("pipeline")
    if not pipeline.EXAMPLE_SCRIPT.is_file():
        pytest.skip(f"the transformers example is not at {pipeline.EXAMPLE_SCRIPT}")
    output = tmp_path / "pipeline.json"
    argv = ["--parts", "end-to-end", "--images", "96", "--epochs", "1", "--repeats", "1", "--output", str(output)]
    pipeline.main(argv)
    result = json.loads(output.read_text())["end_to_end"]
    assert result["ours"]["train_images_per_second"] > 0 and result["example"]["command_seconds"] > 0
