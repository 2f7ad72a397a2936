"""LP-FT (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution"): fit the new head as a linear probe on the frozen backbone's features first, then fine-tune
everything from that head.

The probe follows the authors' code (p-lambda's `log_reg_sk.py`): scikit-learn's `LogisticRegression` (L-BFGS,
at most 200 iterations per fit) on the head's input features of the training split, standardized by one mean and
one standard deviation over the whole feature matrix, warm-started along 50 inverse regularization strengths C
from 1e-7 to 1. Where the authors report the C that does best on their test split, the C here is the one that
does best on the run's validation split (the test split stays unseen). Features come from the model in eval mode on
the center crops, as for evaluation (the authors extract them with their test transform). The standardization is
folded into the head's weight and bias, so the head computes the probe's logits on the raw features.

RIFLE is not combined with it: RIFLE replaces the head at every period start after the first, so the probe's head
would shape the first period only, and the question users ask is which of the two to pick.
"""

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..heads import find_head

logger = logging.getLogger(__name__)

PROBE_C_GRID = tuple(np.logspace(-7, 0, 50))  # the authors' sweep
PROBE_MAX_ITER = 200


@dataclass
class LinearProbe:
    """The chosen probe as the head's parameters, and how it was chosen."""

    weight: np.ndarray  # (classes, features), for the raw features
    bias: np.ndarray  # (classes,)
    C: float
    train_accuracy: float
    validation_accuracy: float
    seconds: float = 0.0

    def log_entry(self) -> dict:
        """What the run records of its probe (in `trainer_state.json`'s log history)."""
        return {
            "linear_probe_C": self.C,
            "linear_probe_train_accuracy": self.train_accuracy,
            "linear_probe_validation_accuracy": self.validation_accuracy,
            "linear_probe_seconds": self.seconds,
        }


def fit_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    validation_features: np.ndarray,
    validation_labels: np.ndarray,
    num_classes: int,
    fit_intercept: bool = True,
    c_grid=PROBE_C_GRID,
) -> LinearProbe:
    """Logistic regression on standardized features, C chosen on the validation split (the smallest C among
    ties), returned as the weight and bias of a linear head over the raw features with `num_classes` outputs."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_features = np.asarray(train_features, dtype=np.float64)
    validation_features = np.asarray(validation_features, dtype=np.float64)
    if num_classes < 2:
        raise ValueError(f"A linear probe needs a head with at least two classes; this one has {num_classes}.")
    missing = sorted(set(range(num_classes)) - set(np.unique(train_labels).tolist()))
    if missing:
        raise ValueError(f"A linear probe needs training images of every class; classes {missing} have none.")
    # Centring needs a bias to fold into; a head without one gets the probe on scaled features only.
    mean, std = train_features.mean() if fit_intercept else 0.0, train_features.std() or 1.0
    standardized_train, standardized_validation = (train_features - mean) / std, (validation_features - mean) / std
    probe = LogisticRegression(random_state=0, warm_start=True, max_iter=PROBE_MAX_ITER, fit_intercept=fit_intercept)
    best = None
    with warnings.catch_warnings():
        # The authors cap each fit at 200 iterations; a fit that stops there is their probe too, not a fault.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in c_grid:
            probe.C = float(c)
            probe.fit(standardized_train, train_labels)
            accuracy = float(np.mean(probe.predict(standardized_validation) == validation_labels))
            if best is None or accuracy > best[0]:
                best = (accuracy, float(c), probe.coef_.copy(), np.atleast_1d(probe.intercept_).copy())
    validation_accuracy, c, coef, intercept = best
    if num_classes == 2:  # scikit-learn's one row scores class 1 against class 0: the same softmax as +-row/2
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    # (x - mean) / std @ coef.T + intercept, as a head over the raw features x
    weight, bias = coef / std, intercept - coef.sum(axis=1) * mean / std
    train_accuracy = float(np.mean((train_features @ weight.T + bias).argmax(axis=1) == train_labels))
    return LinearProbe(weight, bias, c, train_accuracy, validation_accuracy)


def linear_layer_of(head: nn.Module) -> nn.Linear:
    """The head's one `nn.Linear`: the head itself, or the single one inside it (e.g. Flatten + Linear)."""
    if isinstance(head, nn.Linear):
        return head
    linears = [module for module in head.modules() if isinstance(module, nn.Linear)]
    if len(linears) != 1:
        raise ValueError(
            f"LP-FT loads a linear probe into the head, which must be one nn.Linear (possibly after a Flatten); "
            f"{type(head).__name__} has {len(linears)}. Pass --head_module naming the linear layer."
        )
    return linears[0]


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, batches) -> tuple[np.ndarray, np.ndarray]:
    """The features `layer` receives, flattened, and the labels, for every batch of (inputs, labels), the
    model in eval mode (its mode is restored after)."""
    captured = []
    hook = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].flatten(1).float().cpu()))
    was_training = model.training
    model.eval()
    labels = []
    try:
        for inputs, batch_labels in batches:
            model(**inputs)
            labels.append(batch_labels.cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured).numpy(), torch.cat(labels).numpy()


def load_linear_probe_(model: nn.Module, probe: LinearProbe, head_module: str | None = None) -> None:
    """Copy the probe into the head's linear layer in place (its Parameter objects stay, so optimizers and RIFLE's
    param groups keep working)."""
    linear = linear_layer_of(find_head(model, head_module)[1])
    if tuple(linear.weight.shape) != probe.weight.shape:
        raise ValueError(
            f"The probe has shape {probe.weight.shape}, the head's linear layer {tuple(linear.weight.shape)}."
        )
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(probe.weight, dtype=linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(torch.as_tensor(probe.bias, dtype=linear.bias.dtype))


def probe_and_load_(model: nn.Module, train_batches, validation_batches, head_module: str | None = None) -> LinearProbe:
    """LP-FT's first stage on `model`: features of both splits, the probe fit on them, loaded into the head."""
    start = time.perf_counter()
    linear = linear_layer_of(find_head(model, head_module)[1])
    # The linear layer's own input: a head may normalize or project before it (BatchNorm + Linear)
    train_features, train_labels = layer_inputs(model, linear, train_batches)
    validation_features, validation_labels = layer_inputs(model, linear, validation_batches)
    probe = fit_linear_probe(
        train_features,
        train_labels,
        validation_features,
        validation_labels,
        num_classes=linear.out_features,
        fit_intercept=linear.bias is not None,
    )
    load_linear_probe_(model, probe, head_module)
    probe.seconds = time.perf_counter() - start
    logger.info(
        "LP-FT: the head starts from a linear probe (C=%.3g chosen on validation: %.1f%% there, %.1f%% on the "
        "training split), fit in %.1f s.",
        probe.C,
        100 * probe.validation_accuracy,
        100 * probe.train_accuracy,
        probe.seconds,
    )
    return probe
