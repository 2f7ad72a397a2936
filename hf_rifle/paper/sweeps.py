"""Regenerate the paper's comparisons: methods x {L2, L2-SP} x seeds on one dataset, as tables and figures.

Every run is the training recipe with one method's flags (`baselines.METHODS`), in its own folder under
`--sweep_dir`. A finished run (its `all_results.json` exists) is not redone and an interrupted one resumes
from its last checkpoint, so a sweep can be stopped and restarted at will. Runs that differ only in method
share their seeds, hence their data order, augmentation and initial head, which is what makes the paired
difference to "original" meaningful.

    python scripts/reproduce.py --methods original rifle --seeds 1 2 3 -- --demo --num_train_epochs 12
"""

import csv
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..recipe import ModelArguments, load_model
from ..recipe import main as run_recipe
from ..recipe import parse_args as parse_recipe_args
from ..recipe.data import DataArguments
from ..schedule import reinit_steps
from .baselines import BASELINES, METHODS, method_flags
from .diagnostics import (
    GradientNormCallback,
    default_probe_layers,
    gradient_norm_table,
    gradient_norms_by_period,
    mean_ci95,
    plot_accuracy_curves,
    plot_gradient_norms,
    weight_distance_from_pretrained,
)

TABLE_1_METHODS = [
    "original",
    "dropout",
    "dropconnect",
    "cnn_dropout",
    "stochastic_depth",
    "cyclic_lr",
    "disturb_label",
    "rifle",
]
TABLE_2_METHODS = ["original", "rifle_a", "rifle_b", "rifle"]
METHOD_TITLES = {
    "original": "Original",
    "dropout": "Dropout",
    "dropconnect": "DropConn.",
    "cnn_dropout": "CNN-DrO.",
    "stochastic_depth": "StochasticD.",
    "cyclic_lr": "CyclicLR.",
    "disturb_label": "DisturbL.",
    "rifle": "RIFLE",
    "rifle_a": "RIFLE-A",
    "rifle_b": "RIFLE-B",
    "rifle_fitted": "RIFLE (fitted)",
    "lp_ft": "LP-FT",
    "freeze_then_unfreeze": "Freeze-unfreeze",
}
REGULARIZER_TITLES = {"l2": "L2", "l2sp": "L2-SP"}
RECIPE_FLAGS_HELP = (
    "Flags after `--` go to every run: the recipe's, RIFLE's and the baselines' (--fc_dropout, --fc_dropconnect, "
    "--cnn_dropout, --stochastic_depth, --disturb_label); `-- --help` lists them all."
)


@dataclass
class SweepArguments:
    methods: list[str] = field(
        default_factory=lambda: list(TABLE_1_METHODS),
        metadata={
            "help": f"Methods to run, from: {', '.join(METHODS)}. Table 1: the default; "
            f"Table 2: {' '.join(TABLE_2_METHODS)}."
        },
    )
    regularizers: list[str] = field(default_factory=lambda: ["l2", "l2sp"], metadata={"help": "l2 and/or l2sp."})
    seeds: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 5], metadata={"help": "Seeds, shared by all methods."}
    )
    sweep_dir: str = field(default="outputs/reproduce", metadata={"help": "One sub-folder per run, and the tables."})
    dataset_label: str = field(default="offline digits", metadata={"help": "Row name of the dataset in the tables."})
    probe_layers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Layers whose gradient norm is logged each epoch (default: each ResNet stage's last 3x3 conv)."
        },
    )

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS] + [
            r for r in self.regularizers if r not in REGULARIZER_TITLES
        ]
        if unknown:
            raise ValueError(
                f"Unknown methods/regularizers {unknown}: methods are {', '.join(METHODS)}; regularizers l2, l2sp."
            )
        if "original" not in self.methods:
            raise ValueError("--methods must include 'original': every method is compared with it on the same seeds.")


MACHINE_FILE = "machine.json"


def run_folder(sweep_dir, method: str, regularizer: str, seed: int) -> Path:
    return Path(sweep_dir) / f"{method}-{regularizer}-seed{seed}"


def run_sweep(sweep: SweepArguments, recipe_flags: list[str]) -> list[dict]:
    """Run (or reuse) every (seed, method, regularizer) and return one result row per run."""
    results = []
    for seed in sweep.seeds:
        for regularizer in sweep.regularizers:
            for method in sweep.methods:
                folder = run_folder(sweep.sweep_dir, method, regularizer, seed)
                if not (folder / "all_results.json").is_file():
                    run_recipe(
                        [
                            *recipe_flags,
                            *method_flags(method),
                            "--regularizer",
                            regularizer,
                            "--seed",
                            str(seed),
                            "--output_dir",
                            str(folder),
                        ],
                        callbacks=[GradientNormCallback(sweep.probe_layers)],
                        extensions=[BASELINES],
                    )
                    (folder / MACHINE_FILE).write_text(json.dumps(machine_description(), indent=2) + "\n")
                metrics = json.loads((folder / "all_results.json").read_text())
                machine_file = folder / MACHINE_FILE
                results.append(
                    {
                        "method": method,
                        "regularizer": regularizer,
                        "seed": seed,
                        "accuracy": metrics.get("test_accuracy", metrics["eval_accuracy"]),
                        "split": "test" if "test_accuracy" in metrics else "validation",
                        "machine": json.loads(machine_file.read_text()) if machine_file.is_file() else None,
                        "seconds": run_seconds(folder, metrics),
                    }
                )
    return results


def run_seconds(folder: Path, metrics: dict) -> float:
    """What the method cost in wall-clock seconds: its training (Trainer's `train_runtime` less the evaluations
    during it, which not every sweep runs) and what ran before it (LP-FT's probe fit, in the run's log history)."""
    state_file = folder / "trainer_state.json"
    history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    before = sum(entry.get("linear_probe_seconds", 0.0) for entry in history)
    end = next((i for i, entry in enumerate(history) if "train_runtime" in entry), len(history))
    evaluations = sum(entry.get("eval_runtime", 0.0) for entry in history[:end])  # later ones ran after training
    return metrics["train_runtime"] - evaluations + before


def machine_description() -> dict:
    """What a run's numbers depend on beyond its settings: the same seed moves by up to 3 points between machines
    (CPU kernels), so results record where they were computed and only paired differences on one machine count."""
    import os
    import platform

    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)  # fmt: skip
    return {
        "node": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> tuple[float, float, float]:
    """Mean of per-seed differences and its 95% t-interval (NaN bounds with a single seed)."""
    return mean_ci95([values[seed] - baseline[seed] for seed in values if seed in baseline])


def summarize(results: list[dict]) -> list[dict]:
    """Per (regularizer, method): mean ± std over seeds, the paired difference to 'original' with its 95% interval,
    and the sign count (seeds ahead of and behind 'original')."""
    by_run = {}
    for row in results:
        by_run.setdefault((row["regularizer"], row["method"]), {})[row["seed"]] = row["accuracy"]
    summary = []
    for (regularizer, method), values in by_run.items():
        scores = list(values.values())
        baseline = by_run[(regularizer, "original")]
        difference, low, high = paired_difference(values, baseline)
        summary.append(
            {
                "regularizer": regularizer,
                "method": method,
                "seeds": len(scores),
                "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "diff_to_original": difference,
                "diff_ci95_low": low,
                "diff_ci95_high": high,
                "seeds_ahead": sum(values[seed] > baseline[seed] for seed in values if seed in baseline),
                "seeds_behind": sum(values[seed] < baseline[seed] for seed in values if seed in baseline),
            }
        )
    return summary


def markdown_table(summary: list[dict], dataset_label: str, split: str) -> str:
    """Laid out like the paper's tables: one block per regularizer, one column per method, top-1 in %."""
    methods = list(dict.fromkeys(row["method"] for row in summary))
    lines = []
    for regularizer in dict.fromkeys(row["regularizer"] for row in summary):
        rows = {row["method"]: row for row in summary if row["regularizer"] == regularizer}
        methods_run = [m for m in methods if m in rows]
        lines += [
            f"**Algorithmic regularizers + {REGULARIZER_TITLES[regularizer]}** (top-1 {split} accuracy, %, "
            f"mean ± std over {rows['original']['seeds']} seeds; second row: paired difference to Original, 95% CI)",
            "",
            "| Dataset | " + " | ".join(METHOD_TITLES[m] for m in methods_run) + " |",
            "|---" * (len(methods_run) + 1) + "|",
            f"| {dataset_label} | "
            + " | ".join(f"{100 * rows[m]['mean']:.2f} ± {100 * rows[m]['std']:.2f}" for m in methods_run)
            + " |",
            "| Δ vs Original | " + " | ".join(_difference_cell(rows[m]) for m in methods_run) + " |",
            "",
        ]
    return "\n".join(lines)


def _difference_cell(row: dict) -> str:
    if row["method"] == "original":
        return "–"
    low, high = row["diff_ci95_low"], row["diff_ci95_high"]
    interval = "" if math.isnan(low) else f" [{100 * low:+.2f}, {100 * high:+.2f}]"
    signs = f" ({row['seeds_ahead']} ahead, {row['seeds_behind']} behind)"
    return f"{round(100 * row['diff_to_original'], 2) + 0.0:+.2f}{interval}{signs}"  # + 0.0: no "-0.00"


def write_tables(results: list[dict], sweep: SweepArguments) -> list[Path]:
    summary = summarize(results)
    out = Path(sweep.sweep_dir)
    (out / "results.md").write_text(markdown_table(summary, sweep.dataset_label, results[0]["split"]) + "\n")
    (out / "results.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return [out / "results.md", out / "results.json", out / "results.csv"]


def write_figures(sweep: SweepArguments) -> list[Path]:
    """Original against RIFLE (when both ran), first regularizer: Figure 1 for the first seed, Figure 2 averaged
    over every seed, and Figure 2 in numbers (`figure2_gradient_norms.md`: per layer and period, RIFLE / Original)."""
    seed, regularizer = sweep.seeds[0], sweep.regularizers[0]
    compared = [m for m in ("original", "rifle") if m in sweep.methods]
    runs, reinits, all_seeds = {}, {}, {}
    for method in compared:
        histories = {
            s: json.loads((run_folder(sweep.sweep_dir, method, regularizer, s) / "trainer_state.json").read_text())
            for s in sweep.seeds
        }
        config = json.loads((run_folder(sweep.sweep_dir, method, regularizer, seed) / "rifle_config.json").read_text())
        runs[METHOD_TITLES[method]] = histories[seed]["log_history"]
        all_seeds[METHOD_TITLES[method]] = {s: state["log_history"] for s, state in histories.items()}
        training = config["training"]
        reinits[METHOD_TITLES[method]] = (
            reinit_steps(histories[seed]["max_steps"], training["num_periods"]) if training["reinit_head"] else []
        )
    out = Path(sweep.sweep_dir)
    written = [
        plot_accuracy_curves(runs, reinits, out / "figure1_accuracy.png"),
        plot_gradient_norms(
            {label: list(h.values()) for label, h in all_seeds.items()}, out / "figure2_gradient_norms.png"
        ),
    ]
    if len(compared) == 2:
        rows = gradient_norms_by_period(all_seeds["Original"], all_seeds["RIFLE"], [0, *reinits["RIFLE"]])
        (out / "figure2_gradient_norms.md").write_text(
            f"Gradient norm per probed layer and period ({REGULARIZER_TITLES[regularizer]}, seeds "
            f"{', '.join(map(str, sweep.seeds))}): each run's mean over the steps of the period's epochs\n\n"
            + gradient_norm_table(rows)
        )
        written.append(out / "figure2_gradient_norms.md")
    return written


def write_weight_drift(sweep: SweepArguments) -> Path:
    """Which layers move (Section 4.6.1): relative distance ||w - w0|| / ||w0|| of the probed layers from the
    pretrained weights at the end, Original against RIFLE, for the first seed and regularizer."""
    from transformers import AutoModelForImageClassification

    seed, regularizer = sweep.seeds[0], sweep.regularizers[0]
    drift = {}
    for method in [m for m in ("original", "rifle") if m in sweep.methods]:
        folder = run_folder(sweep.sweep_dir, method, regularizer, seed)
        finetuned = AutoModelForImageClassification.from_pretrained(folder)
        record = json.loads((folder / "rifle_config.json").read_text())
        names = [finetuned.config.id2label[i] for i in range(finetuned.config.num_labels)]
        with tempfile.TemporaryDirectory() as workdir:  # the same pretrained model the run started from
            pretrained = load_model(ModelArguments(**record["model"]), DataArguments(**record["data"]), names, workdir)
        layers = sweep.probe_layers or default_probe_layers(finetuned)
        distances = weight_distance_from_pretrained(finetuned, pretrained.state_dict())
        drift[METHOD_TITLES[method]] = {
            layer: distances[f"relative_weight_distance/{layer}.weight"] for layer in layers
        }
    methods = list(drift)
    lines = [
        f"Relative distance ||w - w0|| / ||w0|| from the pretrained weights at the end (seed {seed}, "
        f"{REGULARIZER_TITLES[regularizer]})",
        "",
        "| layer | " + " | ".join(methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for layer in drift[methods[0]]:
        lines.append(f"| {layer} | " + " | ".join(f"{drift[m][layer]:.3e}" for m in methods) + " |")
    path = Path(sweep.sweep_dir) / "weight_drift.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    """`[sweep flags] -- [recipe flags]`: the recipe flags, the baselines' included, are passed to every run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    recipe_flags = argv[split + 1 :]
    if {"-h", "--help"} & set(recipe_flags):
        parse_recipe_args(["--help"], extensions=[BASELINES])  # prints the runs' options and exits
    parser = HfArgumentParser(SweepArguments, epilog=RECIPE_FLAGS_HELP)
    (sweep,) = parser.parse_args_into_dataclasses(argv[:split])
    results = run_sweep(sweep, recipe_flags)
    written = write_tables(results, sweep) + write_figures(sweep) + [write_weight_drift(sweep)]
    print((Path(sweep.sweep_dir) / "results.md").read_text())
    return written
