"""RIFLE in a training loop we do not own: timm's own `train.py`, unpatched against patched with `hf_rifle.attach`
(docs/patches/timm_train.diff, three added lines), side by side (issue 20).

`accuracy`: timm's `train.py` (v1.0.28, the offline copy in ../shared/peer/) fine-tunes the ImageNet
EfficientNet-Lite0 (the demo's weights, `--pretrained-path`) on few-shot scikit-learn digits written once per seed as
an image folder (train/validation/test class folders of PNGs, the offline demo's splits). "original" runs the
script as shipped; "rifle" runs a copy patched in a temporary folder with `patch -p1`, which attaches RIFLE with
`attach`'s defaults (K = 3, the head's cyclic cosine learning rate, L2 = the optimizer's weight decay). Both runs
of a seed get the same data, `--seed` and flags: SGD with plain momentum 0.9 (`--opt momentum`; timm's `sgd` is
Nesterov), lr 0.01, cosine stepped per epoch, no warm-up, weight decay 1e-4 (timm leaves biases and norms out of
it), batch 16, 56 px, 40 epochs, no workers, CPU, and timm's default training augmentation (RandomResizedCrop with
scale 0.08-1 and ratio 3/4-4/3, a random interpolation, horizontal flip 0.5, colour jitter 0.4; label smoothing
0.1; the model's dropout 0.2 before the classifier). The test split (50 per class) is evaluated once, after the
last epoch, by the script's own validation (`--val-split test --val-interval <epochs>`): the last epoch's
accuracy, with no model selection on it. The validation split is written but not used.

    python benchmarks/timm_loop.py accuracy                           # seeds 1-5: 20-45 minutes (2-4.5 a run)
    python benchmarks/timm_loop.py accuracy --seeds $(seq 1 10)       # resumes: only runs missing from the file run
    python benchmarks/timm_loop.py accuracy --tag noaug -- --no-aug   # more timm flags (both runs), a file of their own

Results accumulate in benchmarks/results/timm-loop-<setting>-<res>px-<epochs>ep[-<tag>].json, rewritten after every
run, one row per run with the machine it ran on, so a stopped sweep continues where it stopped (on this machine or
another; a file written with other timm flags is refused). The summary is `hf_rifle.paper.sweeps`' (paired
differences to the unpatched script, 95% t-intervals). Each run uses one torch thread (`--threads`): on a 2-core
machine shared with other jobs, two threads wait on each other (a step of this model took 3 to 15 s with two, 0.7 s
with one).

`overhead`: what `attach`'s hooks cost per step in a plain PyTorch loop (forward, loss, backward,
`optimizer.step()`, `zero_grad()`), the timm model and optimizer of the sweep (`tf_efficientnet_lite0` at 56 px,
batch 16, timm's momentum SGD with weight decay 1e-4 in every variant, one thread), in one process: the plain loop,
the same loop with `attach(regularizer="l2")` and with `attach(regularizer="l2sp")`. Each variant trains one run
(RIFLE attached for all of it, K = 3), the three alternating in rounds of `--steps-per-round` steps (1 by default:
neighbouring steps of the three share the machine's load, which on a shared machine moves more from one minute
to the next than the hooks cost), the order rotated every round (as benchmarks/overhead.py does), warm-up rounds
and the two re-init steps left out; the statistic is the median over rounds of the per-round ratio of step times
to the plain loop's. The hooks' own time (the optimizer's pre- and post-step hooks and the model's forward
pre-hook, wrapped in a timer when `attach` registers them) is measured on every step of the same runs, which the
noise between steps does not swamp. The model is randomly initialized: the time does not depend on the weights.

    python benchmarks/timm_loop.py overhead                           # 10 minutes on 2 (shared) cores
    python benchmarks/timm_loop.py overhead --model resnet50 --image-size 224 --batch-size 8
"""

import argparse
import copy
import csv
import datetime
import functools
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import timm
import torch
from timm.optim import create_optimizer_v2

from hf_rifle import attach, reinit_steps
from hf_rifle.attach import RifleHandle
from hf_rifle.paper import sweeps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import rotated, spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEER_SCRIPT = ROOT.parent / "shared" / "peer" / "timm_train.py"
PATCH = ROOT / "docs" / "patches" / "timm_train.diff"
# The script as shipped; patched with hf_rifle.attach (the paper's schedule); the same with reinit_when="fitted".
METHODS = ("original", "rifle", "rifle_fitted")
REGULARIZER = "l2"  # attach's default: L2 is the optimizer's weight decay, the same flag in both runs
SETTINGS = {"sklearn-10": ("sklearn", 10), "sklearn-20": ("sklearn", 20), "mnist-10": ("mnist", 10)}
REINIT_LOG = re.compile(r"RIFLE: re-initialized the head .* at step (\d+) of (\d+)")
KEPT_LOG = re.compile(r"RIFLE: kept the head at step (\d+) of \d+: .*?(?:was ([\d.]+) of a uniform)")
STATISTIC_LOG = re.compile(
    r"RIFLE: (?:re-initialized|kept) the head(?: .*?)? at step (\d+) of \d+.*? was ([\d.]+) of a"
)
VARIANTS = ("plain", "attach_l2", "attach_l2sp")  # the overhead's; the first is the baseline
L2SP_STRENGTH = 0.01
THREADS_HELP = "torch's threads (OMP_NUM_THREADS); 1 by default: on a busy 2-core machine 2 threads wait on each other"


# --- accuracy: timm's train.py, as shipped and patched -----------------------------------------------


def write_image_folders(data_dir: Path, source: str, samples_per_class: int, seed: int) -> Path:
    """The offline demo's splits for `seed` as train/validation/test class folders of PNGs, written once."""
    if (data_dir / "complete").is_file():
        return data_dir
    from hf_rifle.recipe.data import DataArguments
    from hf_rifle.recipe.demo import load_demo_splits

    splits = load_demo_splits(DataArguments(demo=True, demo_source=source, samples_per_class=samples_per_class), seed)
    partial = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for split, dataset in splits.items():
        names = dataset.features["label"].names
        for index, example in enumerate(dataset):
            folder = partial / split / names[example["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{index:05d}.png")
    (partial / "complete").write_text(json.dumps({s: len(d) for s, d in splits.items()}) + "\n")
    shutil.rmtree(data_dir, ignore_errors=True)
    partial.rename(data_dir)
    return data_dir


def demo_weights(runs_dir: Path) -> Path:
    """model.safetensors of the demo's ImageNet EfficientNet-Lite0, written once (checked on two ImageNet photos)."""
    weights = runs_dir / "checkpoint" / "model.safetensors"
    if not weights.is_file():
        from hf_rifle.recipe.demo import materialize_demo_checkpoint

        materialize_demo_checkpoint(runs_dir / "checkpoint")
    return weights


def patched_script(folder: Path, peer_script: Path, reinit_when: str | None = None) -> Path:
    """A copy of timm's train.py with docs/patches/timm_train.diff applied, as a user would patch theirs; with
    `reinit_when`, the attach line passes it (as docs/any_loop.md shows)."""
    folder.mkdir(exist_ok=True)
    shutil.copy(peer_script, folder / "timm_train.py")
    subprocess.run(["patch", "-p1", "--quiet", "-d", str(folder), "-i", str(PATCH)], check=True)
    script = folder / "timm_train.py"
    if reinit_when is not None:
        attach_line = "seed=args.seed, num_train_epochs=args.epochs)"
        text = script.read_text()
        assert text.count(attach_line) == 1, "docs/patches/timm_train.diff's attach line changed"
        script.write_text(text.replace(attach_line, attach_line[:-1] + f', reinit_when="{reinit_when}")'))
    return script


def timm_flags(args, data_dir: Path, weights: Path, seed: int) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--train-split", "train", "--val-split", "test",
        "--val-interval", str(args.epochs),  # the test split once, after the last epoch
        "--model", "tf_efficientnet_lite0", "--pretrained", "--pretrained-path", str(weights), "--num-classes", "10",
        "--input-size", "3", str(args.resolution), str(args.resolution),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", "0.01",
        "--opt", "momentum", "--momentum", "0.9", "--weight-decay", "1e-4",
        "--sched", "cosine", "--warmup-epochs", "0", "--workers", "0", "--device", "cpu",
        "--checkpoint-hist", "1", *args.timm_args, "--seed", str(seed),
    ]  # fmt: skip


def run_timm(script: Path, flags: list[str], run_dir: Path, threads: int) -> dict:
    """One run of the script into `run_dir`: its last-epoch test accuracy, the re-inits it logged, its time."""
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
    run_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(script), *flags, "--output", str(run_dir.parent), "--experiment", run_dir.name]
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        completed = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir)
    seconds = time.perf_counter() - started
    log_text = (run_dir / "log.txt").read_text()
    if completed.returncode != 0:
        raise RuntimeError(
            f"{script.name} failed ({completed.returncode}); the end of {run_dir / 'log.txt'}:\n{log_text[-3000:]}"
        )
    with open(run_dir / "summary.csv") as handle:
        last = list(csv.DictReader(handle))[-1]
    return {
        "accuracy": float(last["eval_top1"]) / 100,
        "test_loss": float(last["eval_loss"]),
        "last_epoch": int(last["epoch"]),
        "last_train_loss": float(last["train_loss"]),
        "reinit_steps": [int(step) for step, _ in REINIT_LOG.findall(log_text)],
        "kept_steps": [int(step) for step, _ in KEPT_LOG.findall(log_text)],
        "fit_statistics": {step: float(ratio) for step, ratio in STATISTIC_LOG.findall(log_text)},
        "seconds": round(seconds, 1),
    }


def accuracy(args) -> dict:
    source, samples_per_class = SETTINGS[args.setting]
    name = f"{args.setting}-{args.resolution}px-{args.epochs}ep" + (f"-{args.tag}" if args.tag else "")
    output = Path(args.output or RESULTS / f"timm-loop-{name}.json")
    runs_dir = Path(args.runs_dir).resolve()  # the script runs in its run folder
    earlier = json.loads(output.read_text()) if output.is_file() else {}
    rows = earlier.get("runs", [])
    requested = [(seed, method) for seed in args.seeds for method in args.methods]  # a seed's runs run together
    if args.rerun:
        rows = [row for row in rows if (row["seed"], row["method"]) not in set(requested)]
    done = {(row["seed"], row["method"]) for row in rows}
    report = {
        "benchmark": "timm train.py, unpatched vs patched with hf_rifle.attach (issue 20)",
        "settings": {**vars(args), "num_periods": 3, "regularizer": REGULARIZER, "timm": timm.__version__},
        "timm_flags": timm_flags(args, Path("DATA"), Path("WEIGHTS"), 0)[:-1] + ["SEED"],
    }
    if rows and earlier.get("timm_flags") != report["timm_flags"]:
        raise ValueError(
            f"{output} holds runs made with other flags ({' '.join(earlier.get('timm_flags', []))}): name these "
            "runs' file with --tag or --output, so that no summary pairs or pools runs of different settings."
        )
    missing = [(seed, method) for seed, method in requested if (seed, method) not in done]
    if not missing:
        return write_report(output, report, rows, args)
    weights = demo_weights(runs_dir)
    with tempfile.TemporaryDirectory() as folder:
        scripts = {
            "original": Path(args.peer_script),
            "rifle": patched_script(Path(folder) / "rifle", Path(args.peer_script), reinit_when="always"),
            "rifle_fitted": patched_script(Path(folder) / "fitted", Path(args.peer_script), reinit_when="fitted"),
        }
        for seed, method in missing:
            data_dir = write_image_folders(
                runs_dir / "data" / f"{args.setting}-seed{seed}", source, samples_per_class, seed
            )
            print(f"{name}: {method} seed {seed} ...", file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            result = run_timm(
                scripts[method],
                timm_flags(args, data_dir, weights, seed),
                runs_dir / name / f"{method}-seed{seed}",
                args.threads,
            )
            print(f"  test top-1 {100 * result['accuracy']:.2f}% in {result['seconds']:.0f} s", file=sys.stderr)
            rows.append(
                {
                    "method": method, "regularizer": REGULARIZER, "seed": seed, "split": "test", **result,
                    "threads": args.threads, "load_average_at_start": load, "date": datetime.date.today().isoformat(),
                    "machine": sweeps.machine_description(),
                }
            )  # fmt: skip
            write_report(output, report, rows, args)
    return write_report(output, report, rows, args)


def write_report(output: Path, report: dict, rows: list[dict], args) -> dict:
    rows = sorted(rows, key=lambda row: (row["seed"], METHODS.index(row["method"])))
    paired = [row for row in rows if (row["seed"], "original") in {(r["seed"], r["method"]) for r in rows}]
    summary = sweeps.summarize(paired) if paired else []
    label = f"timm train.py{f' {args.tag}' if args.tag else ''}, digits {args.setting}, {args.epochs} epochs"
    table = sweeps.markdown_table(summary, label, "test") + "\n" if summary else ""
    full = {**report, "runs": rows, "summary": summary, "table": table}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(full, indent=2) + "\n")
    return full


# --- overhead: attach's hooks in a plain loop ----------------------------------------------------


class HookClock:
    """Wraps `RifleHandle`'s hook methods while `attach` registers them, adding each call's time to `seconds`."""

    HOOKS = ("_before_forward", "_after_head_forward", "_before_update", "_after_update")

    def __init__(self):
        self.seconds = 0.0

    def timed(self, method):
        @functools.wraps(method)
        def timed_method(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed_method

    def patch(self):
        return mock.patch.multiple(RifleHandle, **{name: self.timed(getattr(RifleHandle, name)) for name in self.HOOKS})


class PlainLoop:
    """One variant's training run, a step at a time: timm's optimizer as train.py builds it, and for the attach
    variants RIFLE attached for the whole run (`max_steps` steps, K periods)."""

    def __init__(self, variant: str, template, max_steps: int, settings):
        self.model = copy.deepcopy(template).train()
        self.optimizer = create_optimizer_v2(self.model, "momentum", lr=0.01, weight_decay=1e-4, momentum=0.9)
        self.clock = HookClock()
        self.loss_function = torch.nn.CrossEntropyLoss()
        if variant != "plain":
            with self.clock.patch():
                attach(self.model, self.optimizer, max_steps, num_periods=settings.num_periods,
                       regularizer=variant.removeprefix("attach_"), l2sp_alpha=L2SP_STRENGTH, l2sp_beta=L2SP_STRENGTH,
                       seed=settings.seed, reinit_when="always")  # fmt: skip

    def step(self, images, labels) -> tuple[float, float]:
        """One optimizer step as timm's loop takes it: its time, and the hooks' time within it."""
        self.clock.seconds = 0.0
        started = time.perf_counter()
        self.loss_function(self.model(images), labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started, self.clock.seconds


def overhead(settings) -> dict:
    """Every variant trains one run, all three alternating: each round, `steps_per_round` steps of each, in an order
    rotated every round (with one step per round, neighbouring steps of the three share the machine's load)."""
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    template = timm.create_model(settings.model, num_classes=settings.num_classes)
    size, batch_size = settings.image_size, settings.batch_size
    batches = [
        (torch.randn(batch_size, 3, size, size), torch.randint(settings.num_classes, (batch_size,))) for _ in range(8)
    ]
    rounds = settings.warmup_rounds + settings.rounds
    max_steps = rounds * settings.steps_per_round
    loops = {variant: PlainLoop(variant, template, max_steps, settings) for variant in VARIANTS}
    steps = {variant: [] for variant in VARIANTS}
    hooks = {variant: [] for variant in VARIANTS}
    orders = []
    for round_index in range(rounds):
        order = rotated(list(VARIANTS), round_index)
        orders.append(order)
        for variant in order:
            for _ in range(settings.steps_per_round):
                step_seconds, hook_seconds = loops[variant].step(*batches[len(steps[variant]) % len(batches)])
                steps[variant].append(step_seconds)
                hooks[variant].append(hook_seconds)
        if (round_index + 1) % max(1, rounds // 10) == 0:
            medians = ", ".join(f"{v} {statistics.median(steps[v]) * 1e3:.1f} ms" for v in VARIANTS)
            print(f"round {round_index + 1} of {rounds}: median steps so far {medians}", file=sys.stderr, flush=True)
    indices = timed_indices(settings, max_steps)
    per_round = [
        [i for i in indices if i // settings.steps_per_round == r] for r in range(settings.warmup_rounds, rounds)
    ]
    per_round = [round_steps for round_steps in per_round if round_steps]
    plain_median = statistics.median(steps["plain"][i] for i in indices)
    variants = {}
    for variant in VARIANTS:
        ratios = [
            statistics.median(steps[variant][i] for i in round_steps)
            / statistics.median(steps["plain"][i] for i in round_steps)
            for round_steps in per_round
        ]
        median_step = statistics.median(steps[variant][i] for i in indices)
        hook_timed = [hooks[variant][i] for i in indices]
        hook_median = statistics.median(hook_timed)
        variants[variant] = {
            "median_step_seconds": median_step,
            "ratio_to_plain": {"per_round": ratios, **spread(ratios)},
            "pooled_ratio_to_plain": median_step / plain_median,
            "hook_seconds_per_step": {"median": hook_median, "mean": statistics.fmean(hook_timed)},
            "plain_step_plus_hooks_ratio": (plain_median + hook_median) / plain_median,
            "step_seconds": steps[variant],
            "hook_seconds": hooks[variant],
        }
    checked = ("attach_l2", "attach_l2sp")
    return {
        "benchmark": "hf_rifle.attach hooks in a plain PyTorch loop (issue 20)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**sweeps.machine_description(), "torch_threads": torch.get_num_threads(), "timm": timm.__version__},
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(settings).items()},
        "max_steps": max_steps,
        "timed_step_indices": indices,
        "round_orders": orders,
        "variants": variants,
        "target": {
            "max_ratio": settings.target_ratio,
            "variants": {v: variants[v]["ratio_to_plain"]["median"] <= settings.target_ratio for v in checked},
            "hooks_alone": {v: variants[v]["plain_step_plus_hooks_ratio"] <= settings.target_ratio for v in checked},
        },
    }


def timed_indices(settings, max_steps: int) -> list[int]:
    """Steps in the statistics: not those of the warm-up rounds, not the re-init steps (timed apart in the JSON)."""
    skipped = set(reinit_steps(max_steps, settings.num_periods))
    return [i for i in range(settings.warmup_rounds * settings.steps_per_round, max_steps) if i not in skipped]


def overhead_markdown(result: dict) -> str:
    lines = [
        "| loop | median step (ms) | ratio to plain, median of rounds | IQR | min–max | hooks per step (ms) "
        "| (plain + hooks) / plain |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for name, variant in result["variants"].items():
        ratio = variant["ratio_to_plain"]
        lines.append(
            f"| {name} | {variant['median_step_seconds'] * 1e3:.1f} | {ratio['median']:.3f} "
            f"| {ratio['q1']:.3f}–{ratio['q3']:.3f} | {ratio['min']:.3f}–{ratio['max']:.3f} "
            f"| {variant['hook_seconds_per_step']['median'] * 1e3:.3f} | {variant['plain_step_plus_hooks_ratio']:.4f} |"
        )
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    sweep = parts.add_parser("accuracy", help="timm train.py as shipped vs patched, paired over seeds")
    sweep.add_argument("--setting", default="sklearn-10", choices=list(SETTINGS))
    sweep.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    sweep.add_argument(
        "--methods",
        nargs="+",
        default=["original", "rifle"],
        choices=METHODS,
        help="rifle_fitted: reinit_when='fitted'",
    )
    sweep.add_argument("--epochs", type=int, default=40)
    sweep.add_argument("--resolution", type=int, default=56, help="timm's --input-size; eval resizes to 8/7 of it")
    sweep.add_argument("--batch_size", type=int, default=16)
    sweep.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    sweep.add_argument("--runs_dir", default="outputs/timm-loop", help="data folders, weights, timm's run folders")
    sweep.add_argument("--peer_script", default=str(PEER_SCRIPT), help="timm's train.py (v1.0.28)")
    sweep.add_argument("--tag", default=None, help="names the variant of timm's flags after -- in the file's name")
    sweep.add_argument("timm_args", nargs="*", help="after --: more flags for timm's train.py, in both runs")
    sweep.add_argument("--rerun", action="store_true", help="run the given seeds again, replacing their rows")
    sweep.add_argument(
        "--output", default=None, help="default: benchmarks/results/timm-loop-<setting>-<res>px-<epochs>ep.json"
    )
    cost = parts.add_parser("overhead", help="attach's per-step cost in a plain loop, side by side")
    cost.add_argument("--model", default="tf_efficientnet_lite0", help="timm architecture, randomly initialized")
    cost.add_argument("--image-size", type=int, default=56)
    cost.add_argument("--batch-size", type=int, default=16)
    cost.add_argument("--num-classes", type=int, default=10)
    cost.add_argument("--rounds", type=int, default=200)
    cost.add_argument("--warmup-rounds", type=int, default=5, help="rounds run first and left out")
    cost.add_argument("--steps-per-round", type=int, default=1, help="steps of each variant per round")
    cost.add_argument("--num-periods", type=int, default=3)
    cost.add_argument("--target-ratio", type=float, default=1.02)
    cost.add_argument("--seed", type=int, default=0)
    cost.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    cost.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default: benchmarks/results/timm-loop-overhead-<model>-<size>px-cpu.json",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.part == "accuracy":
        if args.timm_args and not args.tag:
            raise SystemExit(
                "Name the variant that flags after -- make with --tag (it goes into the result file's name)."
            )
        result = accuracy(args)
        print(result["table"] or "no seed has both runs yet")
        return result
    result = overhead(args)
    output = args.output or RESULTS / f"timm-loop-overhead-{args.model}-{args.image_size}px-cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(overhead_markdown(result))
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    logging.getLogger("hf_rifle").setLevel(logging.ERROR)  # the re-init and L2-SP-with-weight-decay warnings
    main()
