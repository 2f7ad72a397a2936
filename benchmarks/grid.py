"""When does RIFLE help? The paired difference RIFLE − plain fine-tuning (L2-SP, scikit-learn 10-shot) over a grid of
K in {2, 3, 5} periods and {12, 24, 40} epochs, 10 seeds each, plotted against the epochs per period.

Each cell is a `benchmarks/transfer.py` sweep (resumable, one committed result file per cell). Plain fine-tuning
does not depend on K, so it runs once per length, in the K = 3 sweep (the main comparison's, whose 40-epoch runs are
reused): the other K's sweep folders link to its run folders. Cells hold only runs made on this machine with this code
(`--rerun`: rows from elsewhere are replaced, finished run folders here are reused), so no cell mixes machines.

    python benchmarks/grid.py                     # about 2 hours on 2 CPU cores
    python benchmarks/grid.py --summarize_only    # the table and figure from the result files so far
"""

import argparse
import json
import math
from pathlib import Path

import transfer

from hf_rifle.paper.sweeps import paired_difference, run_folder

RESULTS = Path(__file__).resolve().parent / "results"
SETTING, REGULARIZER, RESOLUTION = "sklearn-10", "l2sp", 56


def cell_file(results_dir: Path, epochs: int, num_periods: int) -> Path:
    """transfer.py's default name for the cell: the 40-epoch K = 3 cell is the main comparison's file."""
    return Path(results_dir) / f"transfer-{transfer.sweep_name(SETTING, RESOLUTION, epochs, num_periods)}.json"


def sweep_dir(runs_dir: str, epochs: int, num_periods: int) -> Path:
    return Path(runs_dir) / transfer.sweep_name(SETTING, RESOLUTION, epochs, num_periods)


def share_plain_runs(runs_dir: str, epochs: int, source_periods: int, target_periods: int, seeds) -> None:
    """Link plain fine-tuning's finished run folders of one K into another K's sweep, which then skips them."""
    for seed in seeds:
        source = run_folder(sweep_dir(runs_dir, epochs, source_periods), "original", REGULARIZER, seed).resolve()
        target = run_folder(sweep_dir(runs_dir, epochs, target_periods), "original", REGULARIZER, seed)
        if (source / "all_results.json").is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source, target_is_directory=True)


def summarize(results_dir: Path, epochs_grid, periods_grid) -> dict:
    """Per cell: paired difference RIFLE − Original (points), 95% interval, seeds, positive count."""
    cells = []
    for epochs in epochs_grid:
        for num_periods in sorted(periods_grid):
            path = cell_file(results_dir, epochs, num_periods)
            if not path.is_file():
                continue
            runs = [
                r for r in json.loads(path.read_text())["results"][SETTING]["runs"] if r["regularizer"] == REGULARIZER
            ]
            by_method = {m: {r["seed"]: r["accuracy"] for r in runs if r["method"] == m} for m in ("original", "rifle")}
            seeds = sorted(by_method["rifle"].keys() & by_method["original"].keys())
            if not seeds:
                continue
            mean, low, high = paired_difference(by_method["rifle"], by_method["original"])
            positive = sum(by_method["rifle"][s] > by_method["original"][s] for s in seeds)
            cells.append(
                {
                    "epochs": epochs,
                    "num_periods": num_periods,
                    "epochs_per_period": epochs / num_periods,
                    "seeds": len(seeds),
                    "difference": 100 * mean,
                    "ci95": [100 * low, 100 * high],
                    "positive": positive,
                }
            )
    return {"setting": SETTING, "regularizer": REGULARIZER, "cells": cells}


def markdown(summary: dict) -> str:
    lines = [
        "| epochs | K | epochs per period | seeds | RIFLE − Original (points) | 95% interval | RIFLE ahead |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in summary["cells"]:
        low, high = cell["ci95"]
        interval = "–" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"
        lines.append(
            f"| {cell['epochs']} | {cell['num_periods']} | {cell['epochs_per_period']:.1f} | {cell['seeds']} | "
            f"{cell['difference']:+.2f} | {interval} | {cell['positive']} of {cell['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for epochs in sorted({cell["epochs"] for cell in summary["cells"]}):
        cells = sorted((c for c in summary["cells"] if c["epochs"] == epochs), key=lambda c: c["epochs_per_period"])
        x = [c["epochs_per_period"] for c in cells]
        y = [c["difference"] for c in cells]
        errors = [[c["difference"] - c["ci95"][0] for c in cells], [c["ci95"][1] - c["difference"] for c in cells]]
        axis.errorbar(x, y, yerr=errors, fmt="o-", capsize=3, label=f"{epochs} epochs")
    axis.axhline(0, color="gray", linewidth=1)
    axis.set_xlabel("epochs per period (epochs / K)")
    axis.set_ylabel("RIFLE − Original, test top-1 (points)")
    axis.set_title("scikit-learn 10-shot, L2-SP: paired difference, 95% interval")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", nargs="+", type=int, default=[12, 24, 40])
    parser.add_argument(
        "--num_periods", nargs="+", type=int, default=[3, 2, 5], help="K values; the first runs plain fine-tuning"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(1, 11)))
    parser.add_argument("--runs_dir", default="outputs/transfer")
    parser.add_argument("--results_dir", type=Path, default=RESULTS, help="cell files, table and figure")
    parser.add_argument("--summarize_only", action="store_true")
    args = parser.parse_args(argv)
    if not args.summarize_only:
        for epochs in args.epochs:
            for num_periods in args.num_periods:
                if num_periods != args.num_periods[0]:
                    share_plain_runs(args.runs_dir, epochs, args.num_periods[0], num_periods, args.seeds)
                transfer.main(
                    ["--settings", SETTING, "--regularizers", REGULARIZER, "--epochs", str(epochs),
                     "--num_periods", str(num_periods), "--seeds", *map(str, args.seeds), "--runs_dir", args.runs_dir,
                     "--output", str(cell_file(args.results_dir, epochs, num_periods)), "--rerun"]
                )  # fmt: skip
    summary = summarize(args.results_dir, args.epochs, args.num_periods)
    (args.results_dir / f"grid-{SETTING}-{REGULARIZER}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.results_dir / f"grid-{SETTING}-{REGULARIZER}.md").write_text(markdown(summary))
    if summary["cells"]:
        plot(summary, args.results_dir / "figures" / f"grid-{SETTING}-{REGULARIZER}.png")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
