"""The plug-in path against RifleTrainer, side by side on the offline default: ImageNet EfficientNet-Lite0
fine-tuned on 20-shot scikit-learn digits at 56 px for 12 epochs (the demo's settings), SGD 0.01 momentum 0.9,
cosine, no gradient clipping, no weight decay, with

- `trainer`: plain `transformers.Trainer` (fine-tuning, the baseline);
- `trainer_callback`: the same `Trainer` + `RifleTrainerCallback()` (the full method, plugged in);
- `rifle_trainer`: `RifleTrainer` with the same settings.

Every variant of a seed shares its data, augmentation, initial head and batch order. Reports test top-1 per
run and the paired differences (95% t-intervals) of each variant to plain Trainer and of the callback path to
RifleTrainer, which should be indistinguishable.

    python benchmarks/plugin.py                          # 5 seeds, about 15 minutes on 2 CPU cores
    python benchmarks/plugin.py --seeds 1 2 --epochs 4   # a quick look
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed

from hf_rifle import RifleConfig, RifleTrainer, RifleTrainerCallback
from hf_rifle.paper.sweeps import paired_difference
from hf_rifle.recipe import ModelArguments, load_model
from hf_rifle.recipe.data import (
    DataArguments,
    EpochSeededDataset,
    SetEpochCallback,
    apply_transforms,
    collate_fn,
    detect_columns,
)
from hf_rifle.recipe.demo import DIGIT_CLASS_NAMES, load_demo_splits
from hf_rifle.recipe.images import NormalizingCollator
from hf_rifle.recipe.metrics import compute_classification_metrics
from hf_rifle.recipe.models import image_processing_config, image_processor_for

VARIANTS = ("trainer", "trainer_callback", "rifle_trainer")
COMPARISONS = (("trainer_callback", "trainer"), ("rifle_trainer", "trainer"), ("trainer_callback", "rifle_trainer"))
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--epochs", type=int, default=12, help="the demo's 12")
    parser.add_argument("--samples_per_class", type=int, default=20)
    parser.add_argument("--num_periods", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS_DIR / "plugin-sklearn-20-56px.json"))
    return parser.parse_args(argv)


def prepared_data(seed: int, samples_per_class: int, model):
    """The recipe's demo splits for `seed` as uint8 inputs, and a collator normalizing them as `model` expects."""
    data_args = DataArguments(demo=True, samples_per_class=samples_per_class, resize_size=64, crop_size=56)
    splits = load_demo_splits(data_args, seed)
    image_column, label_column = detect_columns(splits["train"].features)
    processor = image_processor_for(model, data_args.resize_size, data_args.crop_size)
    preprocessing = image_processing_config(model, processor)
    inputs = apply_transforms(splits, image_column, label_column, data_args.resize_size, data_args.crop_size)
    return inputs, NormalizingCollator(collate_fn, preprocessing["mean"], preprocessing["std"])


def run(variant: str, seed: int, settings: argparse.Namespace, output_dir: str) -> float:
    """Test top-1 of one variant at one seed."""
    set_seed(seed)  # the new head's initial draw, shared by the variants of a seed
    data_args = DataArguments(demo=True, samples_per_class=settings.samples_per_class)
    with tempfile.TemporaryDirectory() as workdir:
        model = load_model(ModelArguments(), data_args, DIGIT_CLASS_NAMES, workdir)
    splits, collator = prepared_data(seed, settings.samples_per_class, model)
    train = EpochSeededDataset(splits["train"], seed)
    training = dict(
        output_dir=output_dir,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=0.01,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="cosine",
        max_grad_norm=0.0,
        weight_decay=0.0,  # as issue 11 measured: the variants differ by the method alone
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=5,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="warning",
    )
    common = dict(
        model=model,
        train_dataset=train,
        eval_dataset=splits["validation"],
        data_collator=collator,
        compute_metrics=compute_classification_metrics,
        callbacks=[SetEpochCallback(train)],
    )
    method = dict(num_periods=settings.num_periods, reinit_when="always")  # the paper's schedule, as recorded
    if variant == "rifle_trainer":
        trainer = RifleTrainer(args=RifleConfig(**training, **method), **common)
    else:
        callbacks = [RifleTrainerCallback(**method)] if variant == "trainer_callback" else []
        common["callbacks"] += callbacks
        trainer = Trainer(args=TrainingArguments(**training), **common)
    trainer.train()
    return trainer.evaluate(splits["test"], metric_key_prefix="test")["test_accuracy"]


def summarize(runs: list[dict]) -> dict:
    accuracy = {variant: {r["seed"]: r["accuracy"] for r in runs if r["variant"] == variant} for variant in VARIANTS}
    summary = {
        variant: {"mean": statistics.fmean(values.values()), "std": statistics.stdev(values.values())}
        for variant, values in accuracy.items()
        if len(values) > 1
    }
    comparisons = {}
    for variant, baseline in COMPARISONS:
        mean, low, high = paired_difference(accuracy[variant], accuracy[baseline])
        wins = sum(accuracy[variant][s] > accuracy[baseline][s] for s in accuracy[variant])
        comparisons[f"{variant} - {baseline}"] = {"mean": mean, "ci95_low": low, "ci95_high": high, "wins": wins}
    return {"summary": summary, "paired_differences": comparisons}


def main(argv=None) -> dict:
    settings = parse_args(argv)
    output = Path(settings.output)
    partial = output.with_suffix(".partial.json")  # resumable: finished runs are kept and skipped
    runs = json.loads(partial.read_text())["runs"] if partial.is_file() else []
    done = {(r["variant"], r["seed"]) for r in runs}
    output.parent.mkdir(parents=True, exist_ok=True)
    for seed in settings.seeds:
        for variant in VARIANTS:
            if (variant, seed) in done:
                continue
            with tempfile.TemporaryDirectory() as output_dir:
                accuracy = run(variant, seed, settings, output_dir)
            runs.append({"variant": variant, "seed": seed, "accuracy": accuracy})
            partial.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
            print(f"seed {seed} {variant}: test top-1 {100 * accuracy:.2f}%", flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "settings": vars(settings),
        "runs": runs,
        **summarize(runs),
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    partial.unlink()
    print(json.dumps(report["paired_differences"], indent=2))
    return report


if __name__ == "__main__":
    main()
