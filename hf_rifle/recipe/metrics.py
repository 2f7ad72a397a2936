"""Offline classification metrics for `Trainer(compute_metrics=...)` (no `evaluate.load`, which needs the Hub)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import EvalPrediction


def compute_classification_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Top-1 `accuracy` and, when there are at least 5 classes, `top5_accuracy` (the RIFLE paper's metrics)."""
    logits = eval_pred.predictions
    if isinstance(logits, tuple):  # models that also return hidden states or aux logits
        logits = logits[0]
    logits, labels = np.asarray(logits), np.asarray(eval_pred.label_ids)
    metrics = {"accuracy": top_k_accuracy(logits, labels, 1)}
    if logits.shape[-1] >= 5:
        metrics["top5_accuracy"] = top_k_accuracy(logits, labels, 5)
    return metrics


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the `k` highest logits."""
    top_k = np.argpartition(logits, -k, axis=-1)[:, -k:]
    return float(np.mean(np.any(top_k == labels[:, None], axis=-1)))
