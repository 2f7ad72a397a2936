"""Judge `reinit_when="fitted"` on seeds its threshold was not chosen on: RIFLE with the fit test, run on the
transfer benchmark's settings and paired with the plain fine-tuning (and paper-schedule RIFLE) runs recorded for the
same seeds in `benchmarks/results/transfer-<cell>.json`, made on a machine of the same kind (runs are deterministic
on one machine: this one reproduced the recorded seeds it re-ran to the last digit).

    python benchmarks/fit_rule.py --cells 12:2 12:3 12:5 24:5 --seeds 3 4 5 6 7 8 9 10   # the grid's short periods
    python benchmarks/fit_rule.py --setting mnist-10 --cells 40:3 --seeds $(seq 1 20)     # MNIST's gain

Each run records its decisions (step, top-class loss ratio, the head's age, re-drawn or not) from the optimizer's
state at the end. Results accumulate in `benchmarks/results/fit-rule-<setting>-l2sp.json`; finished runs are reused.
"""

import argparse
import datetime
import json
from pathlib import Path

import transfer
from transformers import TrainerCallback

from hf_rifle.attach import STATE_KEY
from hf_rifle.optim import base_optimizer
from hf_rifle.paper import sweeps
from hf_rifle.paper.baselines import BASELINES, method_flags
from hf_rifle.recipe import main as run_recipe

RESULTS = Path(__file__).resolve().parent / "results"
REGULARIZER, RESOLUTION = "l2sp", 56
METHOD = "rifle_fitted"
DECISIONS_FILE = "decisions.json"


class RecordDecisions(TrainerCallback):
    """Write the run's fit-test decisions, as its optimizer's state holds them, into its output folder."""

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        decisions = base_optimizer(optimizer).param_groups[0][STATE_KEY]["decisions"]
        rows = [dict(zip(("step", "period", "loss_ratio", "head_age", "redrawn"), row)) for row in decisions]
        Path(args.output_dir, DECISIONS_FILE).write_text(json.dumps(rows, indent=2) + "\n")


def run_fitted(setting: str, epochs: int, num_periods: int, seed: int, runs_dir: Path) -> dict:
    """One run with reinit_when="fitted" (reused if finished): its test accuracy and decisions."""
    folder = sweeps.run_folder(runs_dir / transfer.sweep_name(setting, RESOLUTION, epochs, num_periods), METHOD,
                               REGULARIZER, seed)  # fmt: skip
    if not (folder / DECISIONS_FILE).is_file():
        run_recipe(
            [
                *transfer.recipe_flags(epochs, num_periods, RESOLUTION),
                *transfer.SETTINGS[setting],
                *method_flags(METHOD),
                *("--regularizer", REGULARIZER, "--seed", str(seed), "--output_dir", str(folder)),
            ],
            callbacks=[RecordDecisions()],
            extensions=[BASELINES],
        )
    metrics = json.loads((folder / "all_results.json").read_text())
    return {
        "seed": seed,
        "accuracy": metrics["test_accuracy"],
        "decisions": json.loads((folder / DECISIONS_FILE).read_text()),
        "machine": sweeps.machine_description(),
    }


def recorded(setting: str, epochs: int, num_periods: int, results=RESULTS) -> dict[str, dict[int, float]]:
    """The transfer benchmark's recorded test accuracies of this cell: method -> seed -> accuracy."""
    path = Path(results) / f"transfer-{transfer.sweep_name(setting, RESOLUTION, epochs, num_periods)}.json"
    runs = json.loads(path.read_text())["results"][setting]["runs"]
    by_method = {}
    for run in runs:
        if run["regularizer"] == REGULARIZER:
            by_method.setdefault(run["method"], {})[run["seed"]] = run["accuracy"]
    if num_periods != 3 and "original" not in by_method:  # the grid shares each length's plain runs with K = 3
        by_method["original"] = recorded(setting, epochs, 3, results)["original"]
    return by_method


def summarize(setting: str, epochs: int, num_periods: int, runs: list[dict], results=RESULTS) -> dict:
    """Paired differences in points over the seeds run here: fitted - plain, paper's RIFLE - plain, fitted - RIFLE."""
    fitted = {run["seed"]: run["accuracy"] for run in runs}
    earlier = recorded(setting, epochs, num_periods, results)
    cell = {"epochs": epochs, "num_periods": num_periods, "epochs_per_period": epochs / num_periods, "seeds": []}
    cell["seeds"] = sorted(fitted.keys() & earlier["original"].keys())
    for name, compared, baseline in (
        ("fitted_minus_plain", fitted, earlier["original"]),
        ("rifle_minus_plain", earlier.get("rifle", {}), earlier["original"]),
        ("fitted_minus_rifle", fitted, earlier.get("rifle", {})),
    ):
        seeds = [seed for seed in cell["seeds"] if seed in compared and seed in baseline]
        if seeds:
            mean, low, high = sweeps.paired_difference({s: compared[s] for s in seeds}, baseline)
            ahead = sum(compared[s] > baseline[s] for s in seeds)
            behind = sum(compared[s] < baseline[s] for s in seeds)
            cell[name] = {"points": 100 * mean, "ci95": [100 * low, 100 * high], "ahead": ahead, "behind": behind}
    decisions = [d for run in runs for d in run["decisions"]]
    cell["reinits_planned"], cell["reinits_done"] = len(decisions), sum(d["redrawn"] for d in decisions)
    return cell


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="sklearn-10", choices=list(transfer.SETTINGS))
    parser.add_argument("--cells", nargs="+", default=["12:2", "12:3", "12:5", "24:5"], help="EPOCHS:K")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(3, 11)))
    parser.add_argument("--runs_dir", default="outputs/fit-rule")
    parser.add_argument("--results_dir", default=str(RESULTS), help="where the recorded transfer-<cell>.json are")
    parser.add_argument("--output", default=None, help="default: <results_dir>/fit-rule-<setting>-l2sp.json")
    args = parser.parse_args(argv)
    output = Path(args.output or Path(args.results_dir) / f"fit-rule-{args.setting}-{REGULARIZER}.json")
    report = json.loads(output.read_text()) if output.is_file() else {"setting": args.setting, "cells": {}}
    for cell in args.cells:
        epochs, num_periods = map(int, cell.split(":"))
        key = transfer.sweep_name(args.setting, RESOLUTION, epochs, num_periods)
        runs = {run["seed"]: run for run in report["cells"].get(key, {}).get("runs", [])}
        for seed in args.seeds:
            if seed not in runs:
                runs[seed] = run_fitted(args.setting, epochs, num_periods, seed, Path(args.runs_dir))
                rows = sorted(runs.values(), key=lambda run: run["seed"])
                summary = summarize(args.setting, epochs, num_periods, rows, args.results_dir)
                report["cells"][key] = {"summary": summary, "runs": rows}
                report["date"] = datetime.date.today().isoformat()
                output.write_text(json.dumps(report, indent=2) + "\n")
        print(key, json.dumps(report["cells"][key]["summary"]))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
