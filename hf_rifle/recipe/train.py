"""The training recipe: a Hub (or local, or packaged) dataset in, a RIFLE fine-tuned classifier out.

Reads top to bottom: parse arguments -> load data -> load model -> transforms -> train -> evaluate ->
save, model card, push. Run as `hf-rifle-train ...`, `python scripts/train.py ...` or, on several GPUs,
`accelerate launch scripts/train.py ...`. With no dataset given it runs the offline demo.
"""

import json
import logging
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from huggingface_hub import HfApi
from transformers import HfArgumentParser, TrainerCallback, set_seed

from ..card import PLOT_FILE
from ..checkpoints import check_resumable, full_disk_explained, newest_complete_checkpoint, tensor_bytes
from ..config import RifleConfig
from ..hub import push_errors_explained, push_repo_id
from ..preemption import PreemptionCallback, parse_signals
from .data import (
    DataArguments,
    EpochSeededDataset,
    SetEpochCallback,
    SkippedImagesCallback,
    apply_transforms,
    collate_fn,
    count_skipped_rows,
    dataset_source,
    detect_columns,
    label_names,
    load_splits,
)
from .demo import DEMO_BASE_MODEL, load_demo_splits, materialize_demo_checkpoint
from .errors import EXIT_CODES_HELP, user_errors_reported
from .images import ImageRifleTrainer, default_cache_root, is_convolutional
from .metrics import compute_classification_metrics
from .models import (
    image_processing_config,
    image_processor_for,
    load_image_classifier,
    load_timm_weights_file,
    model_source,
    save_image_classifier,
)
from .sources import HubSource, loaded_commit, revision_record

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "timm/resnet50.a1_in1k"  # the paper's backbone: ImageNet ResNet-50
CONFIG_FILE = "rifle_config.json"
SKIPPED_IMAGES_FILE = "skipped_images.jsonl"
# Settings that change how a run is logged, saved or shared, not what it trains: a run may resume with others.
OPERATIONAL_SETTINGS = {
    "output_dir",
    "logging_dir",
    "run_name",
    "disable_tqdm",
    "report_to",
    "log_level",
    "log_level_replica",
    "logging_strategy",
    "logging_steps",
    "logging_first_step",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "eval_strategy",
    "eval_steps",
    "per_device_eval_batch_size",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_strategy",
    "hub_private_repo",
    "hub_always_push",
    "resume_from_checkpoint",
    "ddp_timeout",
    "local_rank",
    "cache_dir",
    "prepare_only",
    "image_cache",
    "image_cache_max_gb",
    "preemption_signals",
    "use_cpu",
    # May change on resume (say, on another number of GPUs) while the samples per optimizer step stay the same:
    # RifleTrainerCallback refuses, at train begin, a resume that would change the run's number of steps.
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
}
# The paper's recipe (Sec. 4.1: 40 epochs, batch size 32, SGD momentum 0.9, lr 0.01, cosine; weight decay 1e-4 with
# L2 and shorter side 256 then 224 crops come from RifleConfig and DataArguments) and what a recipe run reports;
# flags and config files override them, and a resumed run keeps the values it started with.
RECIPE_DEFAULTS = {
    "num_train_epochs": 40,
    "per_device_train_batch_size": 32,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "learning_rate": 0.01,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 5,
    "remove_unused_columns": False,
    "report_to": "none",
    "dataloader_num_workers": 2,
}
# The offline demo: few-shot digits at low resolution so the run takes a few minutes on 2 CPU cores.
DEMO_DEFAULTS = {
    "demo": True,
    "output_dir": "outputs/demo",
    "samples_per_class": 20,
    "resize_size": 64,
    "crop_size": 56,
    "num_train_epochs": 24,  # with K=3, periods of 8 epochs: RIFLE's K x length grid ties plain fine-tuning from 8
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "num_periods": 3,
    "dataloader_num_workers": 0,
    "dataloader_persistent_workers": False,
}
DATA_SOURCES = ("dataset_name", "train_dir")
DEMO_HELP = "With no --dataset_name or --train_dir, the offline demo runs, with these defaults: " + ", ".join(
    f"--{name} {value}" for name, value in DEMO_DEFAULTS.items() if name != "demo"
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": f"Hub id or local folder of a pretrained image classifier (timm or transformers format), or a "
            f"weights file with --timm_architecture. Default: {DEFAULT_MODEL}; the demo's packaged EfficientNet-Lite0 "
            "with --demo."
        },
    )
    timm_architecture: str | None = field(
        default=None, metadata={"help": "timm architecture of a weights file given as --model_name_or_path."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the Hub model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub models and datasets are cached."})
    prepare_only: bool = field(
        default=False,
        metadata={
            "help": "Fetch the dataset and the model, at their revisions, into the cache and exit without training "
            "or writing --output_dir: run it where there is network, then the same command without this flag and "
            "with HF_HUB_OFFLINE=1 on machines without (docs/distributed.md)."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Replace a pretrained head of another size by a new one (needed for new labels)."},
    )
    channels_last: bool | None = field(
        default=None,
        metadata={
            "help": "Train in channels_last memory format (faster convolutions with mixed precision on GPUs). "
            "Default: on for CNNs when CUDA is present."
        },
    )


@dataclass(frozen=True)
class RecipeExtension:
    """Adds settings and behaviour to the recipe without the recipe knowing them (the paper kit's baselines
    use it), so `hf-rifle-train` stays the plain recipe and a caller opts in with `main(extensions=[...])`.

    Attributes:
        name: the section of `rifle_config.json` that records the extension's settings.
        arguments: a dataclass parsed by `HfArgumentParser` beside the recipe's own (flags, JSON or YAML).
        prepare_model: `prepare_model(model, settings, args)`, run on the loaded model before training.
        wrap_train_collator: `wrap_train_collator(collator, settings, num_labels, args)` returns the collator
            of training batches only; evaluation keeps the plain one.
        prepare_trainer: `prepare_trainer(trainer, settings, evaluation_inputs, resuming)`, run on the built
            trainer before training: it may add callbacks, or change the model (when not `resuming`: a resumed
            run's weights come from its checkpoint). `evaluation_inputs` are the splits as evaluation sees them,
            the training split's images center-cropped instead of augmented.
        card_settings: `card_settings(settings)`, (name, value) rows for the model card's settings table.
    """

    name: str
    arguments: type
    prepare_model: Callable[[torch.nn.Module, Any, RifleConfig], None] | None = None
    wrap_train_collator: Callable[[Callable, Any, int, RifleConfig], Callable] | None = None
    prepare_trainer: Callable[[Any, Any, dict, bool], None] | None = None
    card_settings: Callable[[Any], list[tuple[str, str]]] | None = None


@dataclass
class RecipeArguments:
    """Everything one recipe run is given: the recipe's own settings and each extension's, by name."""

    model: ModelArguments
    data: DataArguments
    training: RifleConfig
    extensions: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None, extensions: Sequence[RecipeExtension] = ()) -> RecipeArguments:
    """Flags, or a single JSON/YAML file, over the recipe's defaults, and the demo's when no data is named.

    The defaults are the parser's own, so `--help` shows the values a run really uses.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, *(e.arguments for e in extensions), RifleConfig),
        epilog=f"{DEMO_HELP}. {EXIT_CODES_HELP}",
    )
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        if not Path(argv[0]).is_file():
            raise FileNotFoundError(
                f"The config file {argv[0]} does not exist. Pass the path of a JSON or YAML file of hf-rifle-train's "
                "arguments, or the arguments as flags (`hf-rifle-train --help` lists them)."
            )
        settings = yaml.safe_load(Path(argv[0]).read_text())  # YAML reads JSON too
        with settings_checked():
            parsed = parser.parse_dict(
                {**defaults_for(demo=not any(settings.get(key) for key in DATA_SOURCES)), **settings}
            )
    else:
        named = {arg.split("=")[0].removeprefix("--") for arg in argv if arg.startswith("-")}
        asks_for_help = bool(named & {"help", "-h"})
        parser.set_defaults(
            **defaults_for(demo=not asks_for_help and ("demo" in named or not named & set(DATA_SOURCES)))
        )
        with settings_checked():
            *parsed, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if started := started_settings(parsed, named, extensions):  # a resumed run keeps what it started with
            parser.set_defaults(**started)
            with settings_checked():
                *parsed, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if unknown:
            raise ValueError(
                f"Unknown arguments for hf-rifle-train: {' '.join(unknown)}. `hf-rifle-train --help` lists the "
                "recipe's and RIFLE's options; the paper's baselines (--fc_dropout, --disturb_label, ...) are options "
                "of the runs of scripts/reproduce.py, given after `--`."
            )
    model_args, data_args, *extension_settings, args = parsed
    if not args.dataloader_num_workers:  # kept-alive workers need workers (e.g. --dataloader_num_workers 0 on a GPU)
        args.dataloader_persistent_workers = False
    return RecipeArguments(
        model_args, data_args, args, {e.name: settings for e, settings in zip(extensions, extension_settings)}
    )


@contextmanager
def settings_checked():
    """Around building the arguments' dataclasses, whose `__post_init__` checks their fields: a ValueError there is
    about the arguments, also where `TrainingArguments` raises it in transformers' code, so it is re-raised from here,
    as one of hf_rifle's user errors (`hf_rifle.recipe.errors`: one line and exit code 2, no traceback)."""
    try:
        yield
    except ValueError as error:
        raise ValueError(str(error)) from error


def started_settings(parsed: list, named: set[str], extensions: Sequence[RecipeExtension] = ()) -> dict:
    """Where `--output_dir` holds a run to resume: the settings it was started with that the command line does not
    name and that now default to other values (say, after an upgrade changed a default), so the run resumes as it
    began. Settings the command line names are compared by `resume_point`, which refuses a difference."""
    model_args, data_args, *extension_settings, args = parsed
    saved_file = Path(args.output_dir, CONFIG_FILE)
    if not saved_file.is_file():
        return {}
    saved = json.loads(saved_file.read_text())
    run = RecipeArguments(model_args, data_args, args, {e.name: s for e, s in zip(extensions, extension_settings)})
    started = {
        name: saved[section][name]
        for section, settings in run_record(run).items()
        for name, value in settings.items()
        if name not in named | OPERATIONAL_SETTINGS and name in saved.get(section, {}) and saved[section][name] != value
    }
    if started:
        logger.info(
            "Resuming the run in %s with the settings it was started with: %s.",
            args.output_dir,
            ", ".join(f"--{name} {value}" for name, value in sorted(started.items())),
        )
    return started


def defaults_for(demo: bool) -> dict:
    cuda = torch.cuda.is_available()
    hardware = hardware_defaults(
        cuda,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        gpus=torch.cuda.device_count() if cuda else 0,
        mps=torch.backends.mps.is_available(),
    )
    return {**RECIPE_DEFAULTS, **hardware, **(DEMO_DEFAULTS if demo else {})}


def hardware_defaults(cuda: bool, bf16_supported: bool, cpus: int, gpus: int, mps: bool = False) -> dict:
    """Defaults that keep a GPU busy, none on CPU: mixed precision (bf16, or fp16 with loss scaling where bf16 is
    unsupported), a share of the CPU cores as loader workers for each GPU's process, pinned memory and workers kept
    across epochs. Flags and config files override them. Without a GPU there is nothing to pin memory for (torch
    warns at every loader), so pinning is off; and without any accelerator the run is on the CPU explicitly, since
    only then does `torchrun --nproc_per_node N` give data-parallel training (otherwise transformers silently runs
    N independent copies of the run)."""
    if not cuda:
        return {"dataloader_pin_memory": False, **({} if mps else {"use_cpu": True})}
    return {
        "bf16": bf16_supported,
        "fp16": not bf16_supported,
        "dataloader_num_workers": max(2, min(16, cpus // max(gpus, 1) - 1)),
        "dataloader_pin_memory": True,
        "dataloader_persistent_workers": True,
    }


def load_model(model_args: ModelArguments, data_args: DataArguments, names: list[str], workdir: str):
    """The pretrained classifier with a new head for `names`, from the Hub, a folder, a file or the demo package."""
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if model_args.timm_architecture:
        model = load_timm_weights_file(model_args.timm_architecture, model_args.model_name_or_path, **labels)
    else:
        model = load_image_classifier(
            model_args.model_name_or_path or default_model_source(data_args, workdir),
            **labels,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            trust_remote_code=data_args.trust_remote_code,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
        )
    # Set now rather than by transformers' loss at the first step, which would recompile a torch.compile'd model.
    model.config.problem_type = "single_label_classification"
    return model


def default_model_source(data_args: DataArguments, workdir: str) -> str:
    return str(materialize_demo_checkpoint(workdir)) if data_args.demo else DEFAULT_MODEL


def run_record(run: RecipeArguments) -> dict:
    """Everything that defines a run, as saved in `rifle_config.json` (the token is masked by `to_dict`)."""
    record = {
        "model": asdict(run.model),
        "data": asdict(run.data),
        **{name: asdict(settings) for name, settings in run.extensions.items()},
        "training": run.training.to_dict(),
    }
    return json.loads(json.dumps(record))  # as it reads back from the file


def resume_point(output_dir: str, record: dict) -> str | None:
    """The newest complete checkpoint of this same run in `output_dir`, or None for a fresh start.

    A folder holding another run, or files that are not a hf_rifle run, is refused rather than mixed into;
    torn checkpoints (a process killed while writing them) are set aside with a warning. With several processes the
    main one decides and every rank gets its answer, or its error: ranks that each looked at the folder (or set a
    torn checkpoint aside) at their own moment could start from different points, or fail on a moved folder.
    """
    from ..checkpoints import decided_by_main_process

    def decide() -> str | None:
        folder = Path(output_dir)
        if not folder.is_dir() or not any(folder.iterdir()):
            return None
        saved_file = folder / CONFIG_FILE
        if not saved_file.is_file():
            raise ValueError(
                f"--output_dir {folder} is not empty and holds no {CONFIG_FILE}, so it is not a hf_rifle run. "
                "Pass a new or empty --output_dir."
            )
        saved = json.loads(saved_file.read_text())
        differences = sorted(
            f"{section}.{name}"
            for section, settings in record.items()
            for name in settings.keys() | saved.get(section, {}).keys()
            if name not in OPERATIONAL_SETTINGS and settings.get(name) != saved.get(section, {}).get(name)
        )
        if differences:
            raise ValueError(
                f"--output_dir {folder} holds a run with a different configuration (differs in: "
                f"{', '.join(differences)}). Pass a new --output_dir, or delete this one to start over."
            )
        return newest_complete_checkpoint(folder)

    return decided_by_main_process(decide)


@contextmanager
def no_empty_output_dir_left_on_error(output_dir: str, main_process: bool):
    """`Trainer` creates `output_dir` when it is built: an error before anything was written removes it again, on the
    main process only (another rank's removal could race the main process's first write into it)."""
    folder = Path(output_dir)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if main_process and not existed and folder.is_dir() and not any(folder.iterdir()):
            with suppress(OSError):  # another rank wrote into it meanwhile: it stays
                folder.rmdir()
        raise


class RecordRunConfig(TrainerCallback):
    """Writes `rifle_config.json` once every setting has been checked (it is the trainer's last callback, after the
    checks of the others at train begin), so a bad argument leaves no output folder behind and a resume can compare."""

    def __init__(self, record: dict):
        self.record = record

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            Path(args.output_dir, CONFIG_FILE).write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n")


def main(
    argv: list[str] | None = None, callbacks: list | None = None, extensions: Sequence[RecipeExtension] = ()
) -> dict[str, float]:
    """Run the recipe on `argv` (default: the command line); `callbacks` are added to the trainer and
    `extensions` add their settings and hooks (see `RecipeExtension`)."""
    run = parse_args(argv, extensions)
    args = run.training
    configure_logging(args)
    # The token goes where huggingface_hub reads it, never into training_args.bin, logs or the card.
    if args.hub_token:
        os.environ["HF_TOKEN"], args.hub_token = args.hub_token, None
    if run.model.prepare_only:
        return prepare(run)
    set_seed(args.seed)
    record = run_record(run)
    if args.resume_from_checkpoint:  # named explicitly: refused now if incomplete, before data or model load
        check_resumable(args.resume_from_checkpoint)
    newest_checkpoint = resume_point(args.output_dir, record)  # also refuses another run's output_dir
    last_checkpoint = args.resume_from_checkpoint or newest_checkpoint

    if args.push_to_hub and args.process_index == 0:
        # Trainer creates the repository only once data and model are loaded: a Hub that cannot be reached, or a
        # token that cannot write, is said now instead.
        with push_errors_explained(push_repo_id(args), "create"):
            HfApi().create_repo(push_repo_id(args), private=args.hub_private_repo, exist_ok=True)

    # Signals are recorded from here on: one during data loading or the image cache build lets it finish (the next
    # run reuses the cache), then stops the run at train begin; see hf_rifle.preemption.
    preemption = PreemptionCallback(args.preemption_signals) if parse_signals(args.preemption_signals) else None
    if preemption:
        preemption.install()
        callbacks = [*(callbacks or []), preemption]
    try:
        with no_empty_output_dir_left_on_error(args.output_dir, main_process=args.process_index == 0):
            metrics = train_evaluate_save(run, extensions, record, last_checkpoint, callbacks, preemption)
    finally:
        if preemption:
            preemption.restore()
    if torch.distributed.is_initialized():
        # Tear the process group down while every rank is alive: gloo may otherwise abort at exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def configure_logging(args: RifleConfig) -> None:
    """The console as transformers' example scripts set it up (`logging.basicConfig`, `--log_level` on the main
    process, `--log_level_replica` on the others), except that by default (`--log_level passive`) only hf_rifle's
    own INFO shows on the main process: what the run does (images cached, the head replaced for the new labels, each
    head re-drawn) without transformers' and datasets' INFO, which would bury it. Other libraries stay at WARNING; an
    explicit `--log_level` sets every library's level, hf_rifle's included; replicas show warnings only."""
    level = args.get_process_log_level()  # passive: the libraries' own verbosity (WARNING)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    own_level = logging.INFO if args.should_log and args.log_level == "passive" else level
    logging.getLogger("hf_rifle").setLevel(own_level)


def train_evaluate_save(
    run: RecipeArguments,
    extensions: Sequence[RecipeExtension],
    record: dict,
    last_checkpoint,
    callbacks,
    preemption: PreemptionCallback | None = None,
) -> dict[str, float]:
    """The recipe proper: data -> model and preprocessing -> train -> evaluate -> save, card, push.

    A preemption signal after training stops the run before the final writes (after the final evaluation), or
    before the push (after them): the same command then resumes from the newest checkpoint and finalizes."""
    model_args, data_args, args = run.model, run.data, run.training
    # 1. Data, as uint8 images: decoded and resized once into the image cache by the main process, whose cache the
    # other ranks then read
    skipped_log = Path(args.output_dir, SKIPPED_IMAGES_FILE) if data_args.skip_unreadable_images else None
    with args.main_process_first(desc="loading the dataset"):
        splits, image_column, label_column, names = load_labeled_splits(run)
        inputs = apply_transforms(
            splits,
            image_column,
            label_column,
            data_args.resize_size,
            data_args.crop_size,
            skipped_log,
            cache_root=default_cache_root(model_args.cache_dir) if data_args.image_cache else None,
            cache_max_bytes=int(data_args.image_cache_max_gb * 1e9),
            num_workers=args.dataloader_num_workers,
        )
    train_dataset = EpochSeededDataset(inputs["train"], args.seed)

    # 2. Model and its preprocessing (normalization runs on the training device)
    with tempfile.TemporaryDirectory() as workdir:
        model = load_model(model_args, data_args, names, workdir)
    train_collator = None
    for extension in extensions:
        settings = run.extensions[extension.name]
        if extension.prepare_model:
            extension.prepare_model(model, settings, args)
        if extension.wrap_train_collator:
            train_collator = extension.wrap_train_collator(train_collator or collate_fn, settings, len(names), args)
    processor = image_processor_for(
        model,
        data_args.resize_size,
        data_args.crop_size,
        revision=model_args.model_revision,
        cache_dir=model_args.cache_dir,
    )
    preprocessing = image_processing_config(model, processor)
    revisions = hub_revisions(run)  # now: a branch fetched again later by another run may point elsewhere
    channels_last = model_args.channels_last
    if channels_last is None:
        channels_last = torch.cuda.is_available() and is_convolutional(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    # 3. Train (resuming from the last checkpoint in output_dir, if any)
    trainer = ImageRifleTrainer(
        model=model,
        args=args,
        pixel_mean=preprocessing["mean"],
        pixel_std=preprocessing["std"],
        channels_last=channels_last,
        train_dataset=train_dataset,
        eval_dataset=inputs["validation"],
        data_collator=collate_fn,
        train_data_collator=train_collator,
        compute_metrics=compute_classification_metrics,
        processing_class=processor,
        callbacks=callbacks,
    )
    trainer.add_callback(SetEpochCallback(train_dataset))
    if skipped_log is not None:
        trainer.add_callback(SkippedImagesCallback(skipped_log))
    evaluation_inputs = {**inputs, "train": inputs["train"].center_cropped(data_args.crop_size)}
    for extension in extensions:
        if extension.prepare_trainer:
            extension.prepare_trainer(trainer, run.extensions[extension.name], evaluation_inputs, bool(last_checkpoint))
    trainer.add_callback(RecordRunConfig(record))  # last: after every callback's checks at train begin
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)

    # 4. Evaluate on validation, and on the held-out test split when the dataset has one
    metrics = {**train_result.metrics, **trainer.evaluate()}
    if "test" in inputs:
        metrics.update(trainer.evaluate(inputs["test"], metric_key_prefix="test"))
    if preemption:
        preemption.exit_if_signaled(args, trainer.state, checkpoint=None)

    # 5. Save the model, its config and metrics, the card and the plot; push if asked
    card_kwargs = dict(
        finetuned_from=model_args.model_name_or_path or (DEMO_BASE_MODEL if data_args.demo else DEFAULT_MODEL),
        dataset=data_args.dataset_name or data_args.train_dir or f"{data_args.demo_source} digits (offline demo)",
        dataset_args=data_args.dataset_config_name,
        extra_settings=[
            *skipped_images_settings(skipped_log),
            *revisions,
            *(row for e in extensions if e.card_settings for row in e.card_settings(run.extensions[e.name])),
        ],
    )
    with full_disk_explained(
        args.output_dir, "the final model, metrics and model card", lambda: tensor_bytes(trainer.model.state_dict())
    ):
        if trainer.is_world_process_zero():
            save_image_classifier(trainer.model.to(memory_format=torch.contiguous_format), args.output_dir, processor)
            trainer.save_metrics("all", metrics)
            trainer.save_state()  # trainer_state.json: the log history behind the plots
        trainer.create_model_card(**card_kwargs)
    if args.push_to_hub:
        if preemption:
            preemption.exit_if_signaled(args, trainer.state, checkpoint=None)
        trainer.push_to_hub(commit_message=f"{args.method} fine-tuning with hf_rifle", **card_kwargs)
    if trainer.is_world_process_zero():
        print(summary(metrics, trainer))
    return metrics


def load_labeled_splits(run: RecipeArguments):
    """The run's splits (Hub, folders or the demo's digits), their image and label columns, and the class names."""
    model_args, data_args, args = run.model, run.data, run.training
    if data_args.demo:
        splits = load_demo_splits(data_args, args.seed)
    else:
        splits = load_splits(data_args, args.seed, cache_dir=model_args.cache_dir)
    image_column, label_column = detect_columns(
        splits["train"].features, data_args.image_column_name, data_args.label_column_name
    )
    return splits, image_column, label_column, label_names(splits["train"].features, label_column)


def hub_sources(run: RecipeArguments) -> list[tuple[HubSource, str | None]]:
    """The run's Hub dataset and model, if any, each with the cache it is in (None: huggingface_hub's own)."""
    model_name = run.model.model_name_or_path or (None if run.data.demo else DEFAULT_MODEL)
    sources = [
        (dataset_source(run.data), None),
        (model_source(model_name, run.model.model_revision), run.model.cache_dir),
    ]
    return [(source, cache_dir) for source, cache_dir in sources if source]


def hub_revisions(run: RecipeArguments) -> list[tuple[str, str]]:
    """The card's record of what was read from the Hub: each revision asked for, and the commit it was."""
    return [revision_record(source, loaded_commit(source, cache_dir)) for source, cache_dir in hub_sources(run)]


def prepare(run: RecipeArguments) -> dict:
    """`--prepare_only`: load the dataset and the model, with its image processor, exactly as training would, which
    fetches them into the cache; print what was fetched, and write nothing else."""
    model_args, data_args = run.model, run.data
    *_, names = load_labeled_splits(run)
    with tempfile.TemporaryDirectory() as workdir:
        model = load_model(model_args, data_args, names, workdir)
    hub_kwargs = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir)
    image_processor_for(model, data_args.resize_size, data_args.crop_size, **hub_kwargs)
    fetched = [f"{source}, commit {loaded_commit(source, cache_dir)}" for source, cache_dir in hub_sources(run)]
    print(
        "Fetched into the cache: "
        + ("; ".join(fetched) if fetched else "nothing (no Hub dataset or model named)")
        + ". Train on a machine without network with the same command, without --prepare_only, with HF_HUB_OFFLINE=1"
        + " and the same cache (HF_HOME"
        + (", --cache_dir" if model_args.cache_dir else "")
        + ")."
    )
    return {}


def skipped_images_settings(skipped_log) -> list[tuple[str, str]]:
    """The card's record of `--skip_unreadable_images`: how many rows were left out, and where they are listed."""
    if skipped_log is None:
        return []
    return [("unreadable images skipped", f"{count_skipped_rows(skipped_log)} (listed in {SKIPPED_IMAGES_FILE})")]


def cli() -> None:
    """Console entry point (`hf-rifle-train`, `scripts/train.py`): a user error ends in one line on stderr and a
    documented exit code, a bug in its traceback (`hf_rifle.recipe.errors`). Returns None: a returned dict would
    become the exit status."""
    with user_errors_reported("hf-rifle-train"):
        main()


def summary(metrics: dict[str, float], trainer) -> str:
    """The last thing a run prints, the part a person reads first: how far it trained, the accuracies, where the
    outputs are, and the warnings about its settings, which by then have scrolled away above the progress bars."""
    args, state = trainer.args, trainer.state
    run = f"{args.method} ({args.regularizer.upper()}) fine-tuning"
    stopped_early = trainer.stopped_early()
    lines = [
        f"{run} stopped early, after optimizer step {state.global_step} of {state.max_steps} ({stopped_early})."
        if stopped_early
        else f"{run} finished ({state.max_steps} optimizer steps)."
    ]
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if f"{prefix}_accuracy" in metrics:
            top5 = metrics.get(f"{prefix}_top5_accuracy")
            lines.append(
                f"  {split} accuracy: top-1 {100 * metrics[f'{prefix}_accuracy']:.2f}%"
                + (f", top-5 {100 * top5:.2f}%" if top5 is not None else "")
            )
    if decisions := trainer.reinit_decisions():
        done = sum(decision.redrawn for decision in decisions)
        lines.append(
            f"  head re-initializations: {done} of {len(decisions)} planned done (reinit_when={args.reinit_when!r}): "
            + ", ".join(decision.short() for decision in decisions)
        )
    output_dir = Path(args.output_dir).resolve()
    lines += [f"  model and model card: {output_dir / 'README.md'}", f"  learning curve: {output_dir / PLOT_FILE}"]
    if warnings := trainer.rifle.settings_warnings:
        lines.append("  warnings about this run's settings (also in the model card):")
        lines += [textwrap.fill(w, width=116, initial_indent="  - ", subsequent_indent="    ") for w in warnings]
    return "\n".join(lines)
