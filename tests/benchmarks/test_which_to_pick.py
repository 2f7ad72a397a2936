"""benchmarks/which_to_pick.py: each cell compares every method on the seeds all of them ran, against plain
fine-tuning and against the best alternative to RIFLE in that cell."""

from tests.benchmarks import load_script


def rows(method, accuracies, seconds=None, regularizer="l2"):
    return [
        {"method": method, "regularizer": regularizer, "seed": seed, "accuracy": value, "seconds": seconds}
        for seed, value in accuracies.items()
    ]


def test_a_cell_pairs_methods_on_common_seeds_against_plain_and_the_best_alternative():
    which = load_script("which_to_pick")
    runs = [
        *rows("original", {1: 0.80, 2: 0.82, 3: 0.84, 4: 0.5}),  # seed 4: plain only, left out of every pairing
        *rows("lp_ft", {1: 0.85, 2: 0.86, 3: 0.86}, seconds=120.0),
        *rows("freeze_then_unfreeze", {1: 0.70, 2: 0.71, 3: 0.72}),
        *rows("rifle_fitted", {1: 0.84, 2: 0.87, 3: 0.86}, seconds=100.0),
        *rows("rifle", {1: 0.90, 2: 0.90, 3: 0.90}, regularizer="l2sp"),  # another cell, which has no plain run
    ]
    table = which.comparison_table("digits", "l2", runs)
    assert "**digits, L2** (seeds 1–3; best alternative: LP-FT)" in table
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert lines["plain"].startswith("| plain | 82.00 | – | -3.67 [")
    assert lines["LP-FT"].startswith("| LP-FT | 85.67 | +3.67 [") and lines["LP-FT"].endswith("| – | 120 |")
    assert ", 3 / 0 | +0.00 [" in lines["RIFLE (default)"] and lines["RIFLE (default)"].endswith(", 1 / 1 | 100 |")
    assert "RIFLE (paper)" not in lines and lines["Freeze-unfreeze"].endswith("| – |")
    assert which.comparison_table("digits", "l2sp", runs) == ""
    assert which.comparison_table("digits", "l2", [r for r in runs if r["method"] in ("original", "rifle")]) == ""
    assert which.compact([1, 2, 3, 5, 7, 8]) == "1–3, 5, 7–8"
