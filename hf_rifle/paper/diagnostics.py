"""What the paper measures to explain RIFLE (Section 4.5, Figure 1; Section 4.6.1, Figure 2).

Figure 2: the Frobenius norm of the gradient of the last 3x3 convolution of each ResNet stage, averaged over
every step of each epoch, and over seeds (`default_probe_layers`, `GradientNormCallback`, `plot_gradient_norms`).
Figure 1: training and test accuracy per epoch of several runs, with the re-initializations marked
(`plot_accuracy_curves`). And how far each backbone weight moved from its pretrained value
(`weight_distance_from_pretrained`). Beside the gradient norms, the head's fit as `reinit_when="fitted"` measures it
(the head's top-class loss on its training batches over a uniform guess's), to choose and check its threshold.
Measurements go into the Trainer's `log_history`, so they are saved in
`trainer_state.json` with every checkpoint and read back by the plots.
"""

import math
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ..fit import top_class_loss_ratios
from ..heads import find_head
from .stages import residual_stages

GRAD_NORM_PREFIX = "grad_norm/"
HEAD_FIT_KEY = "head_top_class_loss_ratio"


def default_probe_layers(model: nn.Module) -> list[str]:
    """Dotted names of the last spatial convolution of four stages, as in Section 4.6.1.

    ResNets: the last 3x3 convolution of each of the four residual stages (timm's `layerK[-1].conv2` for
    Bottleneck and BasicBlock alike, `timm_model.` in front inside `TimmWrapperForImageClassification`; the
    3x3 `convolution` of the last layer of `resnet.encoder.stages.K` in transformers' native ResNet).
    Models with more stages (timm EfficientNets, the offline demo's model): four stages spread from the
    second to the last, their last depthwise convolution. Other models: pass layer names yourself.
    """
    try:
        stages = residual_stages(model)
    except ValueError:
        raise ValueError(
            f"No ResNet or EfficientNet stages found in {type(model).__name__}, so there are no default probe layers. "
            "Pass the layers to probe, e.g. GradientNormCallback(layers=['blocks.3.conv']) (names from "
            "model.named_modules())."
        ) from None
    if len(stages) > 4:
        last = len(stages) - 1
        stages = [stages[round(1 + i * (last - 1) / 3)] for i in range(4)]
    layers = []
    for stage_name, stage in stages:
        convs = [n for n, m in stage.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
        if not convs:
            raise ValueError(
                f"Stage {stage_name} of {type(model).__name__} has no spatial convolution. Pass the layers to probe "
                "explicitly (layers=[...])."
            )
        layers.append(f"{stage_name}.{convs[-1]}")
    return layers


class GradientNormCallback(TrainerCallback):
    """Log the Frobenius norm of the gradient of each probed layer's weight, averaged over every optimizer step of
    each epoch (one step's reading swings with its batch), as one `log_history` entry per epoch:
    `{"epoch": e, "step": <first step of epoch e>, "grad_norm_steps": n, "grad_norm/<layer>": mean, ...}`, with
    `head_top_class_loss_ratio`: the mean over the epoch's training batches of the head's top-class loss over a
    uniform guess's, the statistic of `reinit_when="fitted"`.

    The gradient is read in `on_pre_optimizer_step`, where it is complete: accumulated over the gradient
    accumulation micro-batches, averaged over the ranks under DDP, unscaled under fp16 (the Trainer always
    computes the total norm first). With `max_grad_norm` > 0 it is the clipped gradient; RIFLE's default is
    no clipping.

    Stateless, so a resumed run continues exactly: the running mean of the current epoch lives in its entry of
    `state.log_history` (saved in `trainer_state.json` with every checkpoint), which each step updates. The epoch
    of a step is the whole part of `state.epoch` before it. The entries are not sent to `report_to` integrations.

    Args:
        layers: dotted module names whose `.weight` gradient is measured; None = `default_probe_layers(model)`.
    """

    def __init__(self, layers: list[str] | None = None):
        self.layers = list(layers) if layers is not None else None
        self._resolved = None
        self._fit = [0.0, 0]  # this step's sum of the head's top-class loss ratios, and their number
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._resolved = self.layers if self.layers is not None else default_probe_layers(model)
        for layer in self._resolved:  # fail before the first step, not at the first measurement
            self._weight(model, layer)
        if self._hook is not None:
            self._hook.remove()
        self._hook = find_head(model, getattr(args, "head_module", None))[1].register_forward_hook(self._head_forward)

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()
        self._hook = None

    def _head_forward(self, module, inputs, output) -> None:
        if module.training and torch.is_grad_enabled():
            ratios = top_class_loss_ratios(output if isinstance(output, torch.Tensor) else output.logits)
            self._fit = [self._fit[0] + ratios.sum().item(), self._fit[1] + ratios.numel()]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._resolved is None:
            self._resolved = self.layers if self.layers is not None else default_probe_layers(model)
        norms = {}
        for layer in self._resolved:
            grad = self._weight(model, layer).grad
            if grad is not None:  # frozen layers have no gradient to report
                norms[f"{GRAD_NORM_PREFIX}{layer}"] = torch.linalg.vector_norm(grad.detach().float()).item()
        if self._fit[1]:
            norms[HEAD_FIT_KEY] = self._fit[0] / self._fit[1]
            self._fit = [0.0, 0]
        if norms:
            add_to_epoch_mean_(state.log_history, float(math.floor(state.epoch or 0.0)), state.global_step, norms)

    @staticmethod
    def _weight(model: nn.Module, layer: str) -> torch.nn.Parameter:
        try:
            weight = model.get_submodule(layer).weight
        except AttributeError:
            raise ValueError(
                f"Cannot probe {layer!r}: {type(model).__name__} has no such module with a weight. Use dotted names "
                "from model.named_modules(), e.g. hf_rifle.paper.diagnostics.default_probe_layers(model)."
            ) from None
        return weight


def add_to_epoch_mean_(log_history: list[dict], epoch: float, step: int, values: dict[str, float]) -> None:
    """Fold one step's `values` into the running means of `epoch`'s entry (created at its first step)."""
    entry = next((e for e in reversed(log_history) if "grad_norm_steps" in e and e["epoch"] == epoch), None)
    if entry is None:
        log_history.append({"epoch": epoch, "step": step, "grad_norm_steps": 1, **values})
        return
    entry["grad_norm_steps"] += 1
    for key, value in values.items():
        entry[key] += (value - entry[key]) / entry["grad_norm_steps"]


@torch.no_grad()
def weight_distance_from_pretrained(
    model: nn.Module, pretrained_state_dict: dict[str, torch.Tensor], head_module: str | None = None
) -> dict[str, float]:
    """How far each backbone parameter moved from its pretrained value.

    Returns, for every parameter tensor except the head's (which RIFLE re-draws, so it has no pretrained
    value to compare with): `"weight_distance/<name>"`: ||w - w0|| (L2 / Frobenius), and
    `"relative_weight_distance/<name>"`: ||w - w0|| / ||w0|| (inf if w0 = 0 and w moved). Flat keys, like
    the Trainer's metrics, so the result can be logged or saved with `trainer.save_metrics`.
    `pretrained_state_dict` is e.g. `{k: v.clone() for k, v in model.state_dict().items()}` taken before training.
    """
    _, head = find_head(model, head_module)
    head_ids = {id(p) for p in head.parameters()}
    distances = {}
    for name, param in model.named_parameters():
        if id(param) in head_ids:
            continue
        if name not in pretrained_state_dict:
            example = next(iter(pretrained_state_dict), None)
            raise KeyError(
                f"Parameter {name!r} is not in pretrained_state_dict (its first key is {example!r}). Pass the state "
                "dict of the same model class before training, e.g. "
                "{k: v.clone() for k, v in model.state_dict().items()}."
            )
        reference = pretrained_state_dict[name].to(device=param.device, dtype=torch.float32)
        if reference.shape != param.shape:
            raise ValueError(
                f"Shape of {name!r} differs: {tuple(param.shape)} now, {tuple(reference.shape)} pretrained."
            )
        distance = torch.linalg.vector_norm(param.float() - reference).item()
        reference_norm = torch.linalg.vector_norm(reference).item()
        distances[f"weight_distance/{name}"] = distance
        distances[f"relative_weight_distance/{name}"] = (
            distance / reference_norm if reference_norm > 0 else (0.0 if distance == 0 else math.inf)
        )
    return distances


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on an Agg canvas: no display needed, and no pyplot backend switched)


def _subplots(rows: int, columns: int, figsize: tuple[float, float], **kwargs):
    """A figure on its own Agg canvas and its axes, as `hf_rifle.card` draws: a notebook's plotting backend stays
    as it was, and no figure is left open in pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, **kwargs)


def _series(log_history: list[dict], key: str) -> list[tuple[float, float]]:
    return [(entry["epoch"], entry[key]) for entry in log_history if key in entry and "epoch" in entry]


def _step_to_epoch(log_history: list[dict], steps: list[int]) -> list[float]:
    """Epoch positions of optimizer steps, interpolated from the (step, epoch) pairs of the log."""
    import numpy as np

    pairs = sorted({(entry["step"], entry["epoch"]) for entry in log_history if "step" in entry and "epoch" in entry})
    if len(pairs) < 2:
        return []
    known_steps, known_epochs = zip(*pairs)
    return [float(np.interp(step, known_steps, known_epochs)) for step in steps]


def plot_accuracy_curves(runs: dict[str, list[dict]], reinit_steps: dict[str, list[int]] | None, path) -> Path:
    """Figure 1: per run, training accuracy (`train_accuracy`; the training loss when a run did not log it)
    and validation accuracy (`eval_accuracy`, plus `test_accuracy` dashed when logged) against the epoch,
    side by side, with a dotted line in the run's colour at each of its head re-initializations.

    Args:
        runs: run label -> that run's `trainer.state.log_history` (or trainer_state.json's "log_history").
        reinit_steps: run label -> optimizer steps of its re-inits (`RifleTrainer.reinit_steps()`); may omit runs.
        path: the PNG to write.
    """
    from matplotlib import rcParams

    reinit_steps = reinit_steps or {}
    train_key = "train_accuracy" if all(_series(h, "train_accuracy") for h in runs.values()) else "loss"
    figure, (train_axis, eval_axis) = _subplots(1, 2, figsize=(11, 4))
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, history) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        if series := _series(history, train_key):
            train_axis.plot(*zip(*series), color=color, label=label)
        if series := _series(history, "eval_accuracy"):
            eval_axis.plot(*zip(*series), "o-", color=color, markersize=3, label=f"{label} (validation)")
        if series := _series(history, "test_accuracy"):
            eval_axis.plot(*zip(*series), "s--", color=color, markersize=3, label=f"{label} (test)")
        for epoch in _step_to_epoch(history, reinit_steps.get(label, [])):
            for axis in (train_axis, eval_axis):
                axis.axvline(epoch, color=color, linestyle=":", linewidth=1)
    train_axis.set_title("training accuracy" if train_key == "train_accuracy" else "training loss")
    train_axis.set_ylabel("top-1 accuracy" if train_key == "train_accuracy" else "loss")
    eval_axis.set_title("validation / test accuracy (dotted: head re-initialized)")
    eval_axis.set_ylabel("top-1 accuracy")
    for axis in (train_axis, eval_axis):
        axis.set_xlabel("epoch")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_gradient_norms(runs: dict[str, list], path, log_scale: bool = False) -> Path:
    """Figure 2: the gradient norm of each probed layer against the epoch, one panel per layer (input side
    first), one line per run label. Reads the `grad_norm/<layer>` entries that `GradientNormCallback` logs.

    Args:
        runs: label -> one run's `log_history`, or a list of several runs' (seeds): their mean per epoch, with a
            band for its 95% t-interval.
        path: the PNG to write.
        log_scale: a logarithmic y axis.
    """
    runs = {label: histories if histories and isinstance(histories[0], list) else [histories]
            for label, histories in runs.items()}  # fmt: skip
    layers = []
    for histories in runs.values():
        for entry in (entry for history in histories for entry in history):
            for key in entry:
                if key.startswith(GRAD_NORM_PREFIX) and key not in layers:
                    layers.append(key)
    if not layers:
        raise ValueError("No grad_norm/<layer> entries in these runs: train them with GradientNormCallback().")
    columns = min(len(layers), 4)
    rows = math.ceil(len(layers) / columns)
    figure, axes = _subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, layers):
        for label, histories in runs.items():
            epochs, means, lows, highs = mean_over_runs(histories, key)
            if epochs:
                axis.plot(epochs, means, "o-", markersize=3, label=f"{label} ({len(histories)} runs)")
                if len(histories) > 1:
                    axis.fill_between(epochs, lows, highs, alpha=0.25)
        axis.set_title(key[len(GRAD_NORM_PREFIX) :], fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_ylabel("||gradient||_F, mean over the epoch's steps")
        if log_scale:
            axis.set_yscale("log")
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(layers) :]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def mean_over_runs(histories: list[list[dict]], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per epoch that every run logged `key` for: the mean over runs and its 95% t-interval (the mean itself as
    both bounds for a single run)."""
    series = [dict(_series(history, key)) for history in histories]
    epochs = sorted(set.intersection(*(set(values) for values in series))) if series else []
    means, lows, highs = [], [], []
    for epoch in epochs:
        mean, low, high = mean_ci95([values[epoch] for values in series])
        means.append(mean)
        lows.append(mean if math.isnan(low) else low)
        highs.append(mean if math.isnan(high) else high)
    return epochs, means, lows, highs


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """The mean of `values` and its 95% t-interval (NaN bounds for a single value)."""
    import statistics

    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half_width = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half_width, mean + half_width


def gradient_norms_by_period(
    baseline: dict[int, list[dict]], compared: dict[int, list[dict]], period_starts: list[int]
) -> list[dict]:
    """Figure 2 in numbers: for each probed layer and period, each run's epoch-mean gradient norm averaged over
    the epochs that start in the period, then over seeds; and the per-seed ratio compared / baseline (RIFLE /
    Original) with its 95% interval. A ratio above 1 after a re-init is the paper's mechanism: more gradient
    reaching that layer.

    Args:
        baseline: seed -> that run's `log_history`, with `GradientNormCallback` entries (Original).
        compared: the same for the method compared (RIFLE), on the same seeds.
        period_starts: the first optimizer step of each period (0, then each re-init step); an epoch belongs to
            the period its first step falls in.
    """
    import bisect
    import statistics

    def period_means(history: list[dict], key: str) -> dict[int, float]:
        by_period = {}
        for entry in history:
            if key in entry and "grad_norm_steps" in entry:
                by_period.setdefault(bisect.bisect_right(period_starts, entry["step"]), []).append(entry[key])
        return {period: statistics.fmean(values) for period, values in by_period.items()}

    seeds = sorted(baseline.keys() & compared.keys())
    layers = list(dict.fromkeys(k for s in seeds for e in baseline[s] for k in e if k.startswith(GRAD_NORM_PREFIX)))
    rows = []
    for key in layers:
        means = {s: (period_means(baseline[s], key), period_means(compared[s], key)) for s in seeds}
        for period in range(1, len(period_starts) + 1):
            paired = [(b[period], c[period]) for b, c in means.values() if period in b and period in c]
            if not paired:
                continue
            ratio, low, high = mean_ci95([c / b for b, c in paired])
            rows.append(
                {
                    "layer": key[len(GRAD_NORM_PREFIX) :],
                    "period": period,
                    "seeds": len(paired),
                    "baseline": statistics.fmean(b for b, _ in paired),
                    "compared": statistics.fmean(c for _, c in paired),
                    "ratio": ratio,
                    "ratio_ci95": [low, high],
                    "seeds_higher": sum(c > b for b, c in paired),
                }
            )
    return rows


def gradient_norm_table(rows: list[dict], baseline: str = "Original", compared: str = "RIFLE") -> str:
    """`gradient_norms_by_period` as a markdown table."""
    lines = [
        f"| layer | period | seeds | {baseline} | {compared} | {compared} / {baseline} [95% CI] | "
        f"seeds {compared} higher |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, high = row["ratio_ci95"]
        interval = "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"
        lines.append(
            f"| {row['layer']} | {row['period']} | {row['seeds']} | {row['baseline']:.3g} | {row['compared']:.3g} | "
            f"{row['ratio']:.2f}{interval} | {row['seeds_higher']} of {row['seeds']} |"
        )
    return "\n".join(lines) + "\n"
