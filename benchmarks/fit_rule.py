"""Judge `reinit_when="fitted"` on seeds its threshold was not chosen on: RIFLE with the fit test, run on the
transfer benchmark's settings and paired with the plain fine-tuning (and paper-schedule RIFLE) runs recorded for the
same seeds in `benchmarks/results/transfer-<cell>.json`, made on a machine of the same kind (runs are deterministic
on one machine: this one reproduced the recorded seeds it re-ran to the last digit).

    python benchmarks/fit_rule.py --cells 12:2 12:3 12:5 24:5 --seeds 3 4 5 6 7 8 9 10   # the grid's short periods
    python benchmarks/fit_rule.py --setting mnist-10 --cells 40:3 --seeds $(seq 1 20)     # MNIST's gain

Each run records its decisions (step, top-class loss ratio, the head's age, re-drawn or not) from the optimizer's
state at the end. Results accumulate in `benchmarks/results/fit-rule-<setting>-l2sp.json`; finished runs are reused.

`--stop_once_decided` ends a run after its last planned re-init when every one re-drew the head: from there it is
the recorded paper-schedule run bit for bit (tests/core/test_fit.py), whose accuracy it takes. Valid only where this
machine reproduces the recorded runs (same kind of machine, 2 torch threads, the same input pipeline); the script
checks that on the first seed, which always runs to the end.
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
from hf_rifle.schedule import reinit_steps

RESULTS = Path(__file__).resolve().parent / "results"
REGULARIZER, RESOLUTION = "l2sp", 56
METHOD = "rifle_fitted"
DECISIONS_FILE = "decisions.json"


class RecordDecisions(TrainerCallback):
    """Write the run's fit-test decisions, as its optimizer's state holds them, into its output folder; with
    `stop_once_decided`, stop after the last planned re-init if every one re-drew the head."""

    def __init__(self, stop_once_decided: bool = False):
        self.stop_once_decided = stop_once_decided

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        decided = state.global_step > reinit_steps(state.max_steps, args.num_periods)[-1]
        if self.stop_once_decided and decided and all(redrawn for *_, redrawn in self.decisions(optimizer)):
            control.should_training_stop = True
            self.on_train_end(args, state, control, optimizer=optimizer, stopped=True)

    def on_train_end(self, args, state, control, optimizer=None, stopped=False, **kwargs):
        path = Path(args.output_dir, DECISIONS_FILE)
        if path.is_file():  # written when the run stopped once decided
            return
        rows = [
            dict(zip(("step", "period", "loss_ratio", "head_age", "redrawn"), r)) for r in self.decisions(optimizer)
        ]
        path.write_text(json.dumps({"decisions": rows, "stopped_once_decided": stopped}, indent=2) + "\n")

    @staticmethod
    def decisions(optimizer) -> list:
        return base_optimizer(optimizer).param_groups[0][STATE_KEY]["decisions"]


def run_fitted(setting, epochs, num_periods, seed, runs_dir: Path, results, stop_once_decided=False) -> dict:
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
            callbacks=[RecordDecisions(stop_once_decided)],
            extensions=[BASELINES],
        )
    record = json.loads((folder / DECISIONS_FILE).read_text())
    if record["stopped_once_decided"]:
        accuracy, source = recorded(setting, epochs, num_periods, results)["rifle"][seed], "the recorded RIFLE run"
    else:
        accuracy, source = json.loads((folder / "all_results.json").read_text())["test_accuracy"], "this run"
    return {
        "seed": seed,
        "accuracy": accuracy,
        "accuracy_from": source,
        "decisions": record["decisions"],
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


def check_reproduces(run: dict, earlier: dict) -> None:
    """A fitted run that re-drew every head is the recorded RIFLE run, to the last digit where this machine
    reproduces the recorded runs; refuse `--stop_once_decided` where it does not."""
    if all(d["redrawn"] for d in run["decisions"]) and run["accuracy"] != earlier["rifle"][run["seed"]]:
        raise SystemExit(
            f"Seed {run['seed']} re-drew every head but ended at {run['accuracy']}, not the recorded RIFLE run's "
            f"{earlier['rifle'][run['seed']]}: this machine does not reproduce the recorded runs (another kind of "
            "machine, thread count or input pipeline), so --stop_once_decided cannot take their accuracies."
        )


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


def markdown(report: dict) -> str:
    """One row per cell: the paired differences over the seeds run here, and the re-inits done of those planned."""
    lines = [
        "| cell | epochs per period | seeds | fitted − plain | paper's RIFLE − plain | fitted − RIFLE "
        "| re-inits done |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(values: dict | None) -> str:
        if not values:
            return "–"
        low, high = values["ci95"]
        return f"{values['points']:+.2f} [{low:+.2f}, {high:+.2f}], {values['ahead']} / {values['behind']}"

    for name, entry in report["cells"].items():
        summary = entry["summary"]
        lines.append(
            f"| {name} | {summary['epochs_per_period']:.1f} | {len(summary['seeds'])} "
            f"| {cell(summary.get('fitted_minus_plain'))} | {cell(summary.get('rifle_minus_plain'))} "
            f"| {cell(summary.get('fitted_minus_rifle'))} | {summary['reinits_done']} of {summary['reinits_planned']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="sklearn-10", choices=list(transfer.SETTINGS))
    parser.add_argument("--cells", nargs="+", default=["12:2", "12:3", "12:5", "24:5"], help="EPOCHS:K")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(3, 11)))
    parser.add_argument("--runs_dir", default="outputs/fit-rule")
    parser.add_argument("--results_dir", default=str(RESULTS), help="where the recorded transfer-<cell>.json are")
    parser.add_argument(
        "--stop_once_decided", action="store_true", help="runs whose heads were all re-drawn take the recorded RIFLE's"
    )
    parser.add_argument("--output", default=None, help="default: <results_dir>/fit-rule-<setting>-l2sp.json")
    parser.add_argument("--summarize_only", action="store_true", help="print the table of the results so far")
    args = parser.parse_args(argv)
    output = Path(args.output or Path(args.results_dir) / f"fit-rule-{args.setting}-{REGULARIZER}.json")
    report = json.loads(output.read_text()) if output.is_file() else {"setting": args.setting, "cells": {}}
    if args.summarize_only:
        print(markdown(report))
        return
    for cell in args.cells:
        epochs, num_periods = map(int, cell.split(":"))
        key = transfer.sweep_name(args.setting, RESOLUTION, epochs, num_periods)
        runs = {run["seed"]: run for run in report["cells"].get(key, {}).get("runs", [])}
        for index, seed in enumerate(args.seeds):
            if seed not in runs:
                stop = args.stop_once_decided and index > 0  # the first runs to the end: the check below
                runs[seed] = run_fitted(
                    args.setting, epochs, num_periods, seed, Path(args.runs_dir), args.results_dir, stop
                )
                if args.stop_once_decided and index == 0:
                    check_reproduces(runs[seed], recorded(args.setting, epochs, num_periods, args.results_dir))
                rows = sorted(runs.values(), key=lambda run: run["seed"])
                summary = summarize(args.setting, epochs, num_periods, rows, args.results_dir)
                report["cells"][key] = {"summary": summary, "runs": rows}
                report["date"] = datetime.date.today().isoformat()
                output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
