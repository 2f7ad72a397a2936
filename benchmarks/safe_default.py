"""The judged runs of the safe default (issue 30): `reinit_when="fitted"` against plain fine-tuning and the paper's
schedule (`"always"`), on seeds and domains none of its rules was chosen on. The table of docs/benchmarks.md's
"The safe default", from the committed result files:

    python benchmarks/safe_default.py                        # the table, re-init counts as recorded
    python benchmarks/safe_default.py --runs_dir /tmp/runs   # also count the re-inits again from the run folders

Each cell pairs, by seed, the three schedules of one `transfer.py` (or `timm_loop.py accuracy`) result file: test
top-1 means, the paired differences with 95% intervals and seeds ahead / behind, and how many of the fitted runs'
planned re-inits re-drew the head (the recipe's runs log it in their `trainer_state.json`, timm's rows record it).
The summary, counts included, is written to `benchmarks/results/safe-default.json`; without `--runs_dir` the counts
are taken from there.
"""

import argparse
import json
import statistics
from pathlib import Path

from transfer import sweep_name
from which_to_pick import compact, difference

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ("original", "rifle", "rifle_fitted")


def grid_cell(epochs: int, num_periods: int) -> tuple:
    """One of the grid's cells (docs' table of issue 24), judged on seeds 11-20."""
    label = f"digits 10-shot, L2-SP, {epochs} epochs, K = {num_periods}"
    return label, f"transfer-{sweep_name('sklearn-10', 56, epochs, num_periods)}-judged.json", "sklearn-10", "l2sp"


CELLS = [  # label, result file, setting (None: timm's file), regularizer
    ("Animal-MNIST 10-shot, L2, 40 epochs, K = 3", "transfer-animal-10-56px-40ep.json", "animal-10", "l2"),
    ("Animal-MNIST 10-shot, L2-SP, 40 epochs, K = 3", "transfer-animal-10-56px-40ep.json", "animal-10", "l2sp"),
    ("MNIST 10-shot, L2-SP, 40 epochs, K = 3", "transfer-mnist-10-56px-40ep-judged.json", "mnist-10", "l2sp"),
    *(grid_cell(epochs, k) for epochs, k in ((12, 3), (12, 5), (12, 2), (24, 5), (24, 3), (24, 2))),
    ("timm's train.py, digits 10-shot, L2, 40 epochs, K = 3", "timm-loop-sklearn-10-56px-40ep-judged.json", None, "l2"),
]


def cell_runs(path: Path, setting: str | None, regularizer: str) -> list[dict]:
    report = json.loads(path.read_text())
    runs = report["runs"] if setting is None else report["results"][setting]["runs"]
    return [run for run in runs if run["regularizer"] == regularizer and run["method"] in SCHEDULES]


def reinits_from_run_folders(runs_dir: Path, sweep: str, regularizer: str, seeds: list[int]) -> tuple[int, int] | None:
    """(done, planned) over the fitted runs' last logged counts; None unless every seed's run folder is found."""
    done = planned = 0
    for seed in seeds:
        found = sorted(runs_dir.glob(f"**/{sweep}/rifle_fitted-{regularizer}-seed{seed}/trainer_state.json"))
        if not found:
            return None
        history = json.loads(found[0].read_text())["log_history"]
        last = [entry for entry in history if "rifle_reinits_planned" in entry][-1]
        done, planned = done + last["rifle_reinits_done"], planned + last["rifle_reinits_planned"]
    return done, planned


def by_method_and_seed(runs: list[dict]) -> tuple[dict, list[int]]:
    """The runs by method and seed, and the seeds on which all three schedules ran (the cell's pairing)."""
    by_method = {}
    for run in runs:
        by_method.setdefault(run["method"], {})[run["seed"]] = run
    return by_method, sorted(set.intersection(*(set(by_method.get(m, {})) for m in SCHEDULES)))


def summarize_cell(label: str, runs: list[dict], reinits: tuple[int, int] | None) -> dict:
    by_method, seeds = by_method_and_seed(runs)
    accuracy = {m: {s: by_method[m][s]["accuracy"] for s in seeds} for m in SCHEDULES}
    if reinits is None and seeds and "reinit_steps" in by_method["rifle_fitted"][seeds[0]]:  # timm's rows
        fitted = [by_method["rifle_fitted"][s] for s in seeds]
        reinits = (
            sum(len(r["reinit_steps"]) for r in fitted),
            sum(len(r["reinit_steps"] + r["kept_steps"]) for r in fitted),
        )
    return {
        "cell": label,
        "seeds": seeds,
        "means": {m: 100 * statistics.fmean(accuracy[m].values()) for m in SCHEDULES} if seeds else {},
        "fitted_minus_plain": difference(accuracy, "rifle_fitted", "original") if seeds else "–",
        "paper_minus_plain": difference(accuracy, "rifle", "original") if seeds else "–",
        "fitted_minus_paper": difference(accuracy, "rifle_fitted", "rifle") if seeds else "–",
        "reinits_done_of_planned": list(reinits) if reinits else None,
    }


def markdown(cells: list[dict]) -> str:
    lines = [
        "| cell | seeds | plain | paper's RIFLE | fitted | fitted − plain | paper's RIFLE − plain "
        "| fitted − paper's RIFLE | re-inits done |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        if not cell["seeds"]:
            continue
        means = " | ".join(f"{cell['means'][m]:.2f}" for m in SCHEDULES)
        reinits = cell["reinits_done_of_planned"]
        lines.append(
            f"| {cell['cell']} | {compact(cell['seeds'])} | {means} | {cell['fitted_minus_plain']} | "
            f"{cell['paper_minus_plain']} | {cell['fitted_minus_paper']} | "
            f"{f'{reinits[0]} of {reinits[1]}' if reinits else '–'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", type=Path, default=None, help="count the re-inits from run folders under it")
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    output = args.results_dir / "safe-default.json"
    recorded = {c["cell"]: c for c in json.loads(output.read_text())["cells"]} if output.is_file() else {}
    cells = []
    for label, name, setting, regularizer in CELLS:
        path = args.results_dir / name
        if not path.is_file():
            continue
        runs = cell_runs(path, setting, regularizer)
        seeds = by_method_and_seed(runs)[1]  # the re-inits are counted on the seeds the table pairs
        reinits = None
        if setting is not None and args.runs_dir is not None:
            sweep = name.removeprefix("transfer-").removesuffix(".json").removesuffix("-judged")
            reinits = reinits_from_run_folders(args.runs_dir, sweep, regularizer, seeds)
        if reinits is None and label in recorded and recorded[label]["seeds"] == seeds:
            reinits = recorded[label]["reinits_done_of_planned"]
        cells.append(summarize_cell(label, runs, reinits))
    output.write_text(json.dumps({"cells": cells}, indent=2) + "\n")
    print(markdown(cells))
    return cells


if __name__ == "__main__":
    main()
