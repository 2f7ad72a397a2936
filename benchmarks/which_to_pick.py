"""RIFLE against what users pick instead (LP-FT, freeze-then-unfreeze) and plain fine-tuning, side by side: the
table of docs/benchmarks.md's "Which to pick", from the `transfer.py` result files.

The runs are `transfer.py` sweeps with every compared method on the same seeds (10 images per class, 40 epochs,
K = 3, L2 and L2-SP), for example:

    python benchmarks/transfer.py --settings animal-10 --seeds $(seq 1 10) --methods $METHODS
    python benchmarks/which_to_pick.py              # the table from the result files so far

with METHODS="original rifle rifle_fitted lp_ft freeze_then_unfreeze". Per domain and regularizer: test top-1 (mean
over the seeds every method ran), each method's paired difference to plain fine-tuning and to the best alternative
to RIFLE in that cell (the highest mean of plain, LP-FT and freeze-then-unfreeze), with 95% intervals and seeds
ahead / behind, and the median wall-clock seconds of a run (LP-FT's probe fit included; runs of one machine, two at
a time, so compare within a column).
"""

import argparse
import json
import statistics
from pathlib import Path

from hf_rifle.paper.sweeps import METHOD_TITLES, REGULARIZER_TITLES, paired_difference

ALTERNATIVES = ("original", "lp_ft", "freeze_then_unfreeze")
METHODS = (*ALTERNATIVES, "rifle_fitted", "rifle")
TITLES = {**METHOD_TITLES, "original": "plain", "rifle_fitted": "RIFLE (default)", "rifle": "RIFLE (paper)"}
RESULT_FILES = {  # domain -> transfer.py result file, setting inside it
    "digits": ("benchmarks/results/transfer-sklearn-10-56px-40ep-alternatives.json", "sklearn-10"),
    "MNIST": ("benchmarks/results/transfer-mnist-10-56px-40ep-judged.json", "mnist-10"),
    "Animal-MNIST": ("benchmarks/results/transfer-animal-10-56px-40ep.json", "animal-10"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="Also write the table to this Markdown file.")
    args = parser.parse_args(argv)
    tables = []
    for domain, (path, setting) in RESULT_FILES.items():
        if Path(path).is_file():
            runs = json.loads(Path(path).read_text())["results"].get(setting, {}).get("runs", [])
            tables += [comparison_table(domain, regularizer, runs) for regularizer in REGULARIZER_TITLES]
    text = "\n".join(table for table in tables if table)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


def comparison_table(domain: str, regularizer: str, runs: list[dict]) -> str:
    """One cell's table, over the seeds on which every method that ran has a result ('' unless plain and an
    alternative to RIFLE ran)."""
    by_method = {}
    for run in runs:
        if run["regularizer"] == regularizer and run["method"] in METHODS:
            by_method.setdefault(run["method"], {})[run["seed"]] = run
    if "original" not in by_method or not set(ALTERNATIVES[1:]) & set(by_method):
        return ""
    methods = [m for m in METHODS if m in by_method]
    seeds = sorted(set.intersection(*(set(by_method[m]) for m in methods)))
    accuracy = {m: {s: by_method[m][s]["accuracy"] for s in seeds} for m in methods}
    means = {m: statistics.fmean(accuracy[m].values()) for m in methods}
    best = max((m for m in ALTERNATIVES if m in methods), key=means.get)
    lines = [
        f"**{domain}, {REGULARIZER_TITLES[regularizer]}** (seeds {compact(seeds)}; best alternative: {TITLES[best]})",
        "",
        "| method | test top-1 | − plain | − best alternative | s / run |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        seconds = [by_method[method][s]["seconds"] for s in seeds if by_method[method][s].get("seconds")]
        cost = f"{statistics.median(seconds):.0f}" if seconds else "–"
        lines.append(
            f"| {TITLES[method]} | {100 * means[method]:.2f} | {difference(accuracy, method, 'original')} | "
            f"{difference(accuracy, method, best)} | {cost} |"
        )
    return "\n".join(lines) + "\n"


def difference(accuracy: dict, method: str, baseline: str) -> str:
    """Paired difference in points, its 95% interval, seeds ahead / behind; '–' against itself."""
    if method == baseline:
        return "–"
    mean, low, high = paired_difference(accuracy[method], accuracy[baseline])
    deltas = [accuracy[method][s] - accuracy[baseline][s] for s in accuracy[method]]
    ahead, behind = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}], {ahead} / {behind}"


def compact(seeds: list[int]) -> str:
    """1, 2, 3, 5 -> '1–3, 5'."""
    ranges, start = [], None
    for i, seed in enumerate(seeds):
        start = seed if start is None else start
        if i + 1 == len(seeds) or seeds[i + 1] != seed + 1:
            ranges.append(str(seed) if start == seed else f"{start}–{seed}")
            start = None
    return ", ".join(ranges)


if __name__ == "__main__":
    main()
