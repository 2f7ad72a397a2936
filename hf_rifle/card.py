"""What a RIFLE run reports: final metrics, a learning-curve plot and a model card, all read off the
Trainer's `log_history`, so a card can be written for any finished `RifleTrainer` run.

The plot needs matplotlib, which the core does not require: without it the card says how to get the plot. It is drawn
through matplotlib's object API (a `Figure` on its own Agg canvas), never pyplot: a card written from a notebook or an
application leaves its plotting backend and its open figures as they were.

The card's task (metadata, pipeline tag, tags, how-to-use example) follows the model's: a text classifier's card says
text-classification, which is the `pipeline` filter a Hub user finds it by.
"""

import importlib.util
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import RifleConfig
from .fit import FITTED_LOSS_RATIO, FitDecision
from .hub import is_hub_id

CARD_TEMPLATE_NAME = "rifle_image_classifier.md"
PLOT_FILE = "learning_curve.png"
NO_PLOT_NOTE = "No learning-curve plot: matplotlib was not installed (`pip install matplotlib` adds it to later runs)."
SPLIT_PREFIXES = {"validation": "eval", "test": "test"}
IMAGE_CLASSIFICATION = "image-classification"
# Per task: how the card calls the model and what the model is, where a Hub id for it is not known.
TASK_USAGE = {
    "image-classification": {"example_input": "image.jpg", "model": "image classifier", "data": "image"},
    "text-classification": {"example_input": "A sentence to classify.", "model": "text classifier", "data": "text"},
    "audio-classification": {"example_input": "audio.wav", "model": "audio classifier", "data": "audio"},
}
# The task of a transformers model, by its main input when its class is not in the Auto mappings (a custom class).
TASK_BY_MAIN_INPUT = {
    "pixel_values": "image-classification",
    "input_ids": "text-classification",
    "input_values": "audio-classification",
    "input_features": "audio-classification",
}
REINIT_WHEN_TITLES = {
    "always": "always: at every period start (the paper's Algorithm 1)",
    "fitted": "fitted: at a period start only once the head has fit its training batches",
}


def final_metrics(log_history: list[dict]) -> dict[str, dict[str, float]]:
    """The last logged `<prefix>_accuracy` / `<prefix>_top5_accuracy` of each split, keyed by split name."""
    results = {}
    for split, prefix in SPLIT_PREFIXES.items():
        logged = [entry for entry in log_history if f"{prefix}_accuracy" in entry]
        if logged:
            last = logged[-1]
            results[split] = {
                metric: last[f"{prefix}_{metric}"]
                for metric in ("accuracy", "top5_accuracy")
                if f"{prefix}_{metric}" in last
            }
    return results


def card_template() -> Path:
    """The card template: installed as `hf_rifle.model_cards`; in a source checkout, `model_cards/` beside
    the package."""
    if importlib.util.find_spec("hf_rifle.model_cards") is not None:
        return Path(str(files("hf_rifle.model_cards") / CARD_TEMPLATE_NAME))
    return Path(__file__).resolve().parent.parent / "model_cards" / CARD_TEMPLATE_NAME


def plot_learning_curve(log_history: list[dict], reinit_steps: list[int], path) -> Path | None:
    """Training loss and validation accuracy against the optimizer step (top) and the backbone's and head's
    learning rates (bottom), a dashed line at each re-init.

    Drawn on a `Figure` with its own Agg canvas, not through pyplot: nothing process-wide changes (the caller's
    backend, pyplot's list of open figures), so calling it from a notebook or a GUI application is harmless.
    Returns None, writing nothing, when matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> list[tuple[float, float]]:
        return [(entry["step"], entry[key]) for entry in log_history if key in entry]

    figure = Figure(figsize=(7, 5.5))
    FigureCanvasAgg(figure)  # renders this figure only; pyplot's backend is not consulted
    loss_axis, lr_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if losses := series("loss"):
        loss_axis.plot(*zip(*losses), color="tab:blue", label="training loss")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    accuracy_axis = loss_axis.twinx()
    if accuracies := series("eval_accuracy"):
        accuracy_axis.plot(*zip(*accuracies), "o-", color="tab:green", label="validation accuracy")
    accuracy_axis.set_ylabel("validation top-1 accuracy", color="tab:green")
    for key, label, color in (
        ("learning_rate", "backbone learning rate", "tab:gray"),
        ("head_learning_rate", "head learning rate", "tab:orange"),
    ):
        if rates := series(key):
            lr_axis.plot(*zip(*rates), color=color, label=label)
    lr_axis.set_xlabel("optimizer step")
    lr_axis.set_ylabel("learning rate")
    for axis in (loss_axis, lr_axis):
        for i, step in enumerate(reinit_steps):
            axis.axvline(
                step, color="tab:red", linestyle="--", linewidth=1, label="head re-initialized" if i == 0 else None
            )
    handles = [h for axis in (loss_axis, accuracy_axis) for h in axis.get_legend_handles_labels()[0]]
    if handles:
        loss_axis.legend(handles=handles, loc="center right")
    if lr_axis.get_legend_handles_labels()[0]:
        lr_axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def classification_task(model) -> str:
    """The Hub task of a classifier: `text-classification`, `image-classification` or `audio-classification`.

    Read from the model, not assumed, so that a text classifier's card carries the `pipeline_tag` Hub users filter
    on. A transformers class is looked up in the Auto mappings (`AutoModelForSequenceClassification` and the
    others), a custom one by its `main_input_name`; anything else (a timm model, a plain `nn.Module`) is an image
    classifier, the models RIFLE targets. Wrappers (DDP's `module`, PEFT's `base_model`) are looked through.
    """
    for candidate in _unwrapped(model):
        task = _task_of_class(type(candidate).__name__) or TASK_BY_MAIN_INPUT.get(
            getattr(candidate, "main_input_name", None)
        )
        if task:
            return task
    return IMAGE_CLASSIFICATION


def _unwrapped(model) -> list:
    """`model`, then what DDP (`module`) or PEFT (`base_model.model`) wrap, outermost first."""
    chain = [model]
    for attribute in ("module", "base_model", "model"):
        inner = getattr(chain[-1], attribute, None)
        if inner is not None and inner is not chain[-1] and hasattr(inner, "forward"):
            chain.append(inner)
    return chain


def _task_of_class(class_name: str) -> str | None:
    """The task whose transformers Auto mapping lists `class_name`, or None (not a transformers classifier)."""
    from transformers.models.auto import modeling_auto

    mappings = {
        "text-classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "image-classification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        "audio-classification": modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    }
    for task, mapping in mappings.items():
        for names in mapping.values():
            if class_name in ((names,) if isinstance(names, str) else names):
                return task
    return None


def render_model_card(
    args: RifleConfig,
    log_history: list[dict],
    max_steps: int,
    reinit_steps: list[int],
    *,
    decisions: list[FitDecision] = (),
    repo_id: str,
    base_model: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    timm_architecture: str | None = None,
    plot_file: str | None = PLOT_FILE,
    extra_settings: list[tuple[str, str]] | None = None,
    trained_steps: int | None = None,
    stopped_early: str | None = None,
    warnings: list[str] = (),
    task: str = IMAGE_CLASSIFICATION,
) -> ModelCard:
    """A model card with `model-index` metadata that `huggingface_hub.ModelCard` parses back. A run that stopped
    before `max_steps` says so, with `trained_steps` and the reason `stopped_early`, above its results; the
    `warnings` raised about its settings follow the settings, so a reader of the model on the Hub sees them too.
    `decisions` (one per planned re-initialization reached) give the fit statistic and whether the head was re-drawn.
    `task` (`classification_task(model)`) sets the metadata's task, pipeline tag and tags and the usage example.
    """
    if task not in TASK_USAGE:
        raise ValueError(
            f"task={task!r}: a RIFLE card describes one of {sorted(TASK_USAGE)}; pass classification_task(model)."
        )
    usage = TASK_USAGE[task]
    metrics = final_metrics(log_history)
    eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=_hub_id(dataset) or "local",
            dataset_name=Path(dataset).name,
            dataset_config=dataset_config,
            dataset_split=split,
            metric_type="accuracy",
            metric_name="top-1 accuracy",
            metric_value=values["accuracy"],
        )
        for split, values in metrics.items()
        if dataset
    ]
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        base_model=_hub_id(base_model),
        datasets=[dataset] if _hub_id(dataset) else None,
        eval_results=eval_results or None,
        library_name="timm" if timm_architecture else "transformers",
        pipeline_tag=task,
        tags=[task, "rifle", args.method.lower(), args.regularizer, "hf_rifle"],
        metrics=["accuracy"],
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(card_template()),
        model_name=repo_id.split("/")[-1],
        method=args.method,
        regularizer_name="L2-SP" if args.regularizer == "l2sp" else "L2",
        base_model_link=_link(base_model, "models") or f"A pretrained {usage['model']}",
        dataset_link=_link(dataset, "datasets") or f"a {usage['data']} classification dataset",
        results=[
            {"split": split, "top1": _percent(values.get("accuracy")), "top5": _percent(values.get("top5_accuracy"))}
            for split, values in metrics.items()
        ],
        plot_file=plot_file,
        no_plot_note=NO_PLOT_NOTE,
        settings=run_settings(args) + list(extra_settings or []),
        reinit_steps=", ".join(map(str, reinit_steps)) or "none",
        reinit_when=args.reinit_when,
        decisions=[
            {
                "step": decision.step,
                "loss_ratio": "not measured" if decision.loss_ratio is None else f"{decision.loss_ratio:.3f}",
                "fit": "yes" if decision.fit else "no",
                "head_age": decision.head_age,
                "decision": "re-drawn" if decision.redrawn else "kept",
            }
            for decision in decisions
        ],
        reinits_done=sum(decision.redrawn for decision in decisions),
        fitted_loss_ratio=FITTED_LOSS_RATIO,
        max_steps=max_steps,
        trained_steps=max_steps if trained_steps is None else trained_steps,
        stopped_early=stopped_early,
        warnings=list(warnings),
        repo_id=repo_id,
        timm_architecture=timm_architecture,
        task=task,
        example_input=usage["example_input"],
    )


def run_settings(args: RifleConfig) -> list[tuple[str, str]]:
    """The settings a reader needs to reproduce the run, in the order the paper states them."""
    head_init = f"normal (std {args.head_init_std})" if args.head_init == "normal" else "modules' reset_parameters()"
    settings = [
        ("method", args.method),
        ("periods K", str(args.num_periods)),
        ("head re-initialization", head_init if args.reinit_head else "off"),
        ("re-initialize when", REINIT_WHEN_TITLES[args.reinit_when] if args.reinit_head else "never"),
        (
            "head learning rate",
            "cyclic cosine, restarting every period"
            if args.head_lr_schedule == "cyclic_cosine"
            else "Trainer's schedule",
        ),
        ("head optimizer state reset", str(args.reset_head_optimizer_state and args.reinit_head)),
    ]
    if args.regularizer == "l2sp":
        settings.append(("regularizer", f"L2-SP (alpha {args.l2sp_alpha}, beta {args.l2sp_beta})"))
    settings += [
        ("weight decay", str(args.weight_decay)),
        ("optimizer", f"{_plain(args.optim)} {args.optim_args or ''}".strip()),
        ("learning rate", f"{args.learning_rate} ({_plain(args.lr_scheduler_type)} schedule)"),
        (
            "batch size per device x accumulation",
            f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}",
        ),
        (
            "epochs" if args.max_steps <= 0 else "max steps",
            str(args.num_train_epochs if args.max_steps <= 0 else args.max_steps),
        ),
        ("seed", str(args.seed)),
    ]
    return settings


def _hub_id(name: str | None) -> str | None:
    """Only Hub ids go into metadata and links; local paths and descriptions would not resolve for a reader."""
    return name if is_hub_id(name) else None


def _plain(value) -> str:
    """Enum settings (optim, lr_scheduler_type) by their value, as a user types them."""
    return str(getattr(value, "value", value))


def _link(name: str | None, kind: str) -> str | None:
    if _hub_id(name):
        return f"[{name}](https://huggingface.co/{'' if kind == 'models' else 'datasets/'}{name})"
    return f"`{name}`" if name else None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"
